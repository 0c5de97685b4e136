#!/bin/bash
# bench/virtiofs.sh - castore virtiofs against QEMU's virtiofsd, guest side.
#
# The same guest work through both daemons: a QEMU guest (-accel tcg; nested
# KVM does not work here) with Debian's kernel and a busybox initramfs
# mounts the virtio-fs tag and times, with /proc/uptime deltas (10 ms
# resolution), inside the guest:
#   seq_cold   dd of a $BIG_MB MiB file of binaries (first read)
#   seq_warm   the same again (guest page cache)
#   ls_cold    ls -lR of a tree (readdir and stat of every entry)
#   ls_warm    the same again
#   read_tree  tar cf - of the tree | cat (every file read; metadata warm)
# and prints "BENCH name seconds" lines on the serial console. The tree is
# a copy of /usr/share/cmake-3.25 from $BENCH_DIR/share (3,193 entries,
# 18 MB: under TCG every guest instruction is emulated, so the tree is kept
# small).
# virtiofsd exports the data as a plain directory (-o cache=auto, its
# default); castore serves it after `castore import`. Every boot starts a
# fresh daemon with the host's caches dropped and a fresh guest, so every
# "cold" is cold on both sides. Best of $RUNS boots per daemon, alternating.
# The initramfs is built the way tests/integration/test_virtiofs.py does it,
# with its guest init (tests/integration/guest/init.sh), which runs the
# guest's /checks.sh: here, the timed work.
#
# Environment: BENCH_DIR (default /var/tmp/castore-bench), RUNS (3), BIG_MB
# (256), GUEST_RA_KB (the guest's read_ahead_kb for the mount; empty: its
# default, 128), VIRTIOFS_TREE ($BENCH_DIR/share/cmake-3.25), CASTORE (default
# build/src/cli/castore; use a release build), VIRTIOFSD
# (/usr/lib/qemu/virtiofsd), BOOT_TIMEOUT (600 s per guest).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
RUNS=${RUNS:-3}
BIG_MB=${BIG_MB:-256}
CASTORE=${CASTORE:-$ROOT/build/src/cli/castore}
VIRTIOFSD=${VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
TREE_SRC=${VIRTIOFS_TREE:-$BENCH_DIR/share/cmake-3.25}
GUEST_INIT=$ROOT/tests/integration/guest/init.sh
WORK=$BENCH_DIR/virtiofs
LOG=$BENCH_DIR/logs/virtiofs.log
TAG=castore
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs)

NAME=virtiofs.sh
NEED_HINT="qemu-system-x86 busybox-static cpio xz-utils zstd"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

need qemu-system-x86_64 cpio awk timeout
[[ -x /bin/busybox ]] || die "no /bin/busybox (apt-get install -y busybox-static)"
[[ -x $VIRTIOFSD ]] || die "no virtiofsd at $VIRTIOFSD (apt-get install -y qemu-system-x86)"
[[ -r $GUEST_INIT ]] || die "no guest init at $GUEST_INIT"
[[ $(id -u) == 0 ]] || die "run as root (drops caches)"
[[ -x $CASTORE ]] || die "no castore binary at $CASTORE (set CASTORE=...)"

KERNEL= KVER=
for k in $(ls -r /boot/vmlinuz-* 2>/dev/null); do
	v=${k#/boot/vmlinuz-}
	if [[ -r $k && -d /lib/modules/$v ]]; then
		KERNEL=$k KVER=$v
		break
	fi
done
[[ -n $KERNEL ]] || die "no readable /boot/vmlinuz-* with its modules (apt-get install -y linux-image-amd64)"

mkdir -p "$BENCH_DIR/logs"
rm -rf "$WORK"
mkdir -p "$WORK"
: >"$LOG"

if [[ ! -e $BENCH_DIR/share.done ]]; then
	echo "copying /usr/share to $BENCH_DIR/share ..."
	rm -rf "$BENCH_DIR/share"
	cp -a /usr/share "$BENCH_DIR/share"
	touch "$BENCH_DIR/share.done"
fi

declare -a DAEMON_PIDS=()
cleanup() {
	local pid
	for pid in "${DAEMON_PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$WORK"
}
trap cleanup EXIT

# --- data -------------------------------------------------------------------
DATA=$WORK/export/data
mkdir -p "$DATA"
echo "making the data: $BIG_MB MiB of binaries and a copy of $TREE_SRC ..."
find /usr/lib /usr/bin -type f -size +64k -print0 2>/dev/null |
	xargs -0 cat 2>/dev/null | head -c $((BIG_MB << 20)) >"$DATA/big.bin" || true
[[ $(stat -c %s "$DATA/big.bin") == $((BIG_MB << 20)) ]] || die "could not gather $BIG_MB MiB of binaries"
[[ -d $TREE_SRC ]] || die "no tree at $TREE_SRC (set VIRTIOFS_TREE to a folder of a few thousand files)"
cp -a "$TREE_SRC" "$DATA/tree"
ntree=$(find "$DATA/tree" | wc -l)
tree_mb=$(du -sm --apparent-size "$DATA/tree" | cut -f1)

castore_ok=1
if ! "$CASTORE" --store "$WORK/store" import "$DATA" --name data >>"$LOG" 2>&1; then
	echo "virtiofs.sh: castore import failed; castore not measured (see $LOG)" >&2
	castore_ok=0
fi

# --- the guest --------------------------------------------------------------
modfile() { # the file of module $1 in modules.dep, or nothing if built in
	local base=/lib/modules/$KVER m=$1 line name
	if [[ -e $base/modules.builtin ]] &&
		sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$base/modules.builtin" | grep -qx "$m"; then
		return 0
	fi
	while IFS=: read -r line _; do
		name=${line##*/}
		name=${name%%.ko*}
		name=${name//-/_}
		if [[ $name == "$m" ]]; then
			echo "$base/$line"
			return 0
		fi
	done <"$base/modules.dep"
	return 1
}

IRD=$WORK/initramfs-root
mkdir -p "$IRD/bin" "$IRD/lib/modules"
cp /bin/busybox "$IRD/bin/busybox"
cp "$GUEST_INIT" "$IRD/init"
chmod 755 "$IRD/init" "$IRD/bin/busybox"
: >"$IRD/modules"
for m in "${MODULES[@]}"; do
	if ! f=$(modfile "$m"); then
		die "kernel $KVER has no module $m"
	fi
	[[ -n $f ]] || continue # built in
	case $f in
	*.ko) cp "$f" "$IRD/lib/modules/$m.ko" ;;
	*.ko.xz) xz -dc "$f" >"$IRD/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dcq "$f" >"$IRD/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$IRD/lib/modules/$m.ko" ;;
	*) die "unknown module format: $f" ;;
	esac
	echo "$m" >>"$IRD/modules"
done
echo "$TAG" >"$IRD/tag"
echo "${GUEST_RA_KB:-}" >"$IRD/ra_kb"
: >"$IRD/expected.sha256"
# Sourced by init after the mount; init prints the result line and powers off.
cat >"$IRD/checks.sh" <<'EOF'
now() { cut -d' ' -f1 /proc/uptime; }
bench() {
	name=$1
	shift
	t0=$(now)
	"$@" >/dev/null 2>&1 || fail "bench $name"
	t1=$(now)
	echo "BENCH $name $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
}
tar_tree() { tar cf - tree | cat >/dev/null; }
cd /mnt/data || fail 'cd /mnt/data'
# GUEST_RA_KB: the guest's readahead for the mount (FUSE caps it at the
# bdi's default 128 KiB, so a cold sequential read is 128 KiB READs).
ra=$(cat /ra_kb 2>/dev/null)
if [ -n "$ra" ]; then
	dev=$(awk '$5 == "/mnt" { print $3 }' /proc/self/mountinfo)
	echo "$ra" >"/sys/class/bdi/$dev/read_ahead_kb" || fail "read_ahead_kb of $dev"
fi
bench seq_cold dd if=big.bin of=/dev/null bs=1048576
bench seq_warm dd if=big.bin of=/dev/null bs=1048576
bench ls_cold ls -lR tree
bench ls_warm ls -lR tree
bench read_tree tar_tree
cd /
EOF
(cd "$IRD" && find . | cpio -o -H newc --quiet) >"$WORK/initramfs.cpio"

# boot SOCKET CONSOLE: one guest to its end.
boot() {
	timeout "$BOOT_TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 1G \
		-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
		-kernel "$KERNEL" -initrd "$WORK/initramfs.cpio" \
		-append "console=ttyS0 panic=-1 rdinit=/init loglevel=4" \
		-chardev "socket,id=char0,path=$1" \
		-device "vhost-user-fs-pci,chardev=char0,tag=$TAG" \
		-display none -nodefaults -no-reboot -serial "file:$2" >>"$LOG" 2>&1
}

wait_socket() {
	local i
	for ((i = 0; i < 300; i++)); do
		[[ -S $1 ]] && return 0
		kill -0 "$2" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

declare -A BEST
METRICS=(seq_cold seq_warm ls_cold ls_warm read_tree)

# run_boot DAEMON ROUND: fresh daemon, caches dropped, one guest.
run_boot() {
	local d=$1 r=$2 sock=$WORK/$1.sock con=$WORK/console-$1-$2.log pid line name val t0 t1
	rm -f "$sock"
	sync
	echo 3 >/proc/sys/vm/drop_caches
	case $d in
	virtiofsd)
		"$VIRTIOFSD" --socket-path="$sock" -o source="$WORK/export" -o cache=auto >>"$LOG" 2>&1 &
		;;
	castore)
		"$CASTORE" --store "$WORK/store" virtiofs --socket "$sock" >>"$LOG" 2>&1 &
		;;
	esac
	pid=$!
	DAEMON_PIDS+=("$pid")
	if ! wait_socket "$sock" "$pid"; then
		echo "virtiofs.sh: $d did not create its socket (see $LOG)" >&2
		return 1
	fi
	t0=${EPOCHREALTIME/[.,]/}
	boot "$sock" "$con" || echo "virtiofs.sh: qemu for $d exited $? (see $con)" >&2
	t1=${EPOCHREALTIME/[.,]/}
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	cat "$con" >>"$LOG"
	if ! grep -q '^CASTORE-RESULT ok' "$con"; then
		echo "virtiofs.sh: $d round $r: guest did not finish: $(grep -a CASTORE-RESULT "$con" | tr -d '\r' || echo 'no result line')" >&2
		return 1
	fi
	echo "  $d round $r: boot and work $(awk -v u=$((t1 - t0)) 'BEGIN { printf "%.1f", u / 1e6 }') s (host clock)"
	while read -r line name val; do
		[[ $line == BENCH ]] || continue
		printf '    %-10s %s s\n' "$name" "$val"
		if [[ -z ${BEST[$d.$name]:-} ]] || awk -v a="$val" -v b="${BEST[$d.$name]}" 'BEGIN { exit !(a < b) }'; then
			BEST[$d.$name]=$val
		fi
	done < <(tr -d '\r' <"$con")
}

DAEMONS=(virtiofsd)
((castore_ok)) && DAEMONS+=(castore)
declare -A DFAILED
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "booting guests ($RUNS rounds) ..."
for ((round = 1; round <= RUNS; round++)); do
	for d in "${DAEMONS[@]}"; do
		[[ -z ${DFAILED[$d]:-} ]] || continue
		run_boot "$d" "$round" || DFAILED[$d]=1
	done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------
echo
echo "castore virtiofs benchmark - $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, host kernel $(uname -r), guest kernel $KVER (TCG, 1 vCPU)"
echo "load average before: $load_before, after: $load_after (figures are unreliable when it exceeds $(nproc))"
echo "data: a $BIG_MB MiB file of binaries; tree = copy of $TREE_SRC, $ntree entries, $tree_mb MB"
echo "seconds timed inside the guest (/proc/uptime, 10 ms); best of $RUNS boots; speed = virtiofsd s / castore s"
echo
printf '%-32s %12s %12s %10s\n' "guest work" "virtiofsd s" "castore s" "speed"
declare -A DESC=(
	[seq_cold]="read $BIG_MB MiB file, cold"
	[seq_warm]="read $BIG_MB MiB file, warm"
	[ls_cold]="ls -lR tree, cold"
	[ls_warm]="ls -lR tree, warm"
	[read_tree]="tar c tree | cat (read all)"
)
for m in "${METRICS[@]}"; do
	v=${BEST[virtiofsd.$m]:--}
	c=${BEST[castore.$m]:--}
	sp=-
	if [[ $v != - && $c != - ]]; then
		sp=$(awk -v a="$v" -v b="$c" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "inf" }')
	fi
	printf '%-32s %12s %12s %10s\n' "${DESC[$m]}" "$v" "$c" "$sp"
done
echo
if ((!castore_ok)) || [[ -n ${DFAILED[castore]:-} ]]; then
	echo "MISSED: castore virtiofs not measured (import or guest failed; see $LOG)"
	exit 0
fi
if [[ -n ${DFAILED[virtiofsd]:-} ]]; then
	echo "not compared: virtiofsd failed (see $LOG)"
	exit 0
fi
for m in "${METRICS[@]}"; do
	v=${BEST[virtiofsd.$m]:-} c=${BEST[castore.$m]:-}
	[[ -n $v && -n $c ]] || { echo "not compared: $m"; continue; }
	if awk -v a="$v" -v b="$c" 'BEGIN { exit !(b <= a) }'; then
		echo "met: ${DESC[$m]}: castore $c s, virtiofsd $v s (target: at least as fast)"
	else
		echo "MISSED: ${DESC[$m]}: castore $c s, virtiofsd $v s (target: at least as fast)"
	fi
done
