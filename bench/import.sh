#!/bin/bash
# bench/import.sh - castore import against the hashing floor and its peers.
#
# Data: a copy of /usr/share (tens of thousands of files, about 1 GB) under
# $BENCH_DIR/share, made once and reused by the other benchmarks.
# Measured in one run, page cache warm for every contender (the tree is read
# once first), so the figures compare CPU and write work, not disk reads:
#   castore import into an empty store, and again into a store that already
#   holds everything; the hashing floor (b3sum over every file, one thread;
#   also b3sum with its default threads); casync make; mksquashfs (zstd, and
#   uncompressed); ostree commit (bare-user).
# Each figure is the best of $RUNS runs. Two columns: the command alone, and
# the command followed by `sync` (castore syncs its blobs itself; the peers
# leave their output dirty in the page cache). Ratios are to the b3sum floor.
#
# Environment: BENCH_DIR (default /var/tmp/castore-bench), RUNS (3),
# SLOW_RUNS (1: mksquashfs -comp zstd takes a minute or more per run and is
# far from the others),
# CASTORE (default build/src/cli/castore of this checkout; use a release
# build: meson setup build-release --buildtype=release).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
RUNS=${RUNS:-3}
SLOW_RUNS=${SLOW_RUNS:-1} # runs of mksquashfs -comp zstd (minutes each)
CASTORE=${CASTORE:-$ROOT/build/src/cli/castore}
WORK=$BENCH_DIR/import
LOG=$BENCH_DIR/logs/import.log

NAME=import.sh
NEED_HINT="b3sum casync squashfs-tools ostree findutils"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

need b3sum casync mksquashfs ostree find xargs awk
[[ $(id -u) == 0 ]] || die "run as root (drops caches, compares system-wide sync)"
[[ -x $CASTORE ]] || die "no castore binary at $CASTORE (set CASTORE=...)"

mkdir -p "$BENCH_DIR/logs" "$WORK"
: >"$LOG"

# The shared data set: a copy of /usr/share, made once.
make_share() {
	if [[ ! -e $BENCH_DIR/share.done ]]; then
		echo "copying /usr/share to $BENCH_DIR/share ..."
		rm -rf "$BENCH_DIR/share"
		cp -a /usr/share "$BENCH_DIR/share"
		touch "$BENCH_DIR/share.done"
	fi
}
make_share
SHARE=$BENCH_DIR/share

# The outputs are deleted at the end; the next run waits until that
# deletion is five minutes old (ext4's RECENTCY_DIRTY), see below.
STAMP=$BENCH_DIR/logs/import.deleted
cleanup() {
	rm -rf "$WORK"
	date +%s >"$STAMP"
}
if [[ -e $WORK ]]; then
	rm -rf "$WORK"
	date +%s >"$STAMP"
fi
if [[ -e $STAMP ]]; then
	wait_s=$(($(cat "$STAMP") + 300 - $(date +%s)))
	if ((wait_s > 0)); then
		echo "waiting ${wait_s} s: the last run's outputs were deleted less than 5 minutes ago"
		sleep "$wait_s"
	fi
fi
mkdir -p "$WORK"
trap cleanup EXIT

# Times "$@" (stdout/stderr to the log): wall clock in $T, user+system CPU
# time of the command and its children in $CPU (both µs); returns its exit
# status. CPU time says how much work a contender does even when other
# processes on the machine make the wall clock unreliable. (It replaces
# lib.sh's, which keeps no CPU time.)
timed() {
	local rc TIMEFORMAT='%3R %3U %3S'
	echo "+ $*" >>"$LOG"
	{ time { "$@" >>"$LOG" 2>&1 && rc=0 || rc=$?; }; } 2>"$WORK/.time"
	read -r T CPU < <(awk '{ printf "%d %d", $1 * 1e6, ($2 + $3) * 1e6 }' "$WORK/.time")
	return $rc
}

# run_one KEY: runs PREP_KEY, then times CMD_KEY alone and followed by
# sync; keeps the best of each (BEST[KEY], BESTS[KEY], µs), then POST_KEY.
# A failing command marks KEY failed and is not run again.
declare -A BEST BESTS BESTC FAILED
run_one() {
	local key=$1 tc ts cpu
	[[ -z ${FAILED[$key]:-} ]] || return 0
	if ! "prep_$key" >>"$LOG" 2>&1; then
		FAILED[$key]=1
		return 0
	fi
	sync
	warm
	if ! timed "cmd_$key"; then
		FAILED[$key]=1
		echo "  $key: FAILED (see $LOG)" >&2
		tail -n 5 "$LOG" >&2
		"post_$key" >>"$LOG" 2>&1
		return 0
	fi
	tc=$T cpu=$CPU
	timed sync || true
	ts=$((tc + T))
	if [[ -z ${BESTC[$key]:-} ]] || ((cpu < BESTC[$key])); then
		BESTC[$key]=$cpu
	fi
	if [[ -z ${BEST[$key]:-} ]] || ((tc < BEST[$key])); then
		BEST[$key]=$tc
	fi
	if [[ -z ${BESTS[$key]:-} ]] || ((ts < BESTS[$key])); then
		BESTS[$key]=$ts
	fi
	printf '  %-20s %8.3f s (+sync %8.3f s, CPU %8.3f s)\n' "$key" "$(us2s "$tc")" "$(us2s "$ts")" "$(us2s "$cpu")"
	"post_$key" >>"$LOG" 2>&1
}

# Warm the page cache: every file read once, and the metadata. Done before
# every run: other work on the machine may drop or evict the cache.
warm() {
	find "$SHARE" -type f -print0 | xargs -0 cat >/dev/null
	find "$SHARE" -printf '%s %m\n' >/dev/null
}
echo "warming the page cache with $SHARE ..."
warm

nfiles=$(find "$SHARE" -type f | wc -l)
nentries=$(find "$SHARE" | wc -l)
bytes=$(du -sb --apparent-size "$SHARE" | cut -f1)

# The b3sum floor. xargs cuts the file list into command lines of at most
# -s bytes; with relative names and the largest -s the kernel takes, the
# whole tree fits in a few b3sum processes. Count them to say so.
XARGS_S=$(($(getconf ARG_MAX) - 65536))
nproc_b3=$(cd "$SHARE" && find . -type f -print0 | xargs -0 -s $XARGS_S sh -c 'echo x' sh | wc -l)

# The contenders: prep_KEY, cmd_KEY (timed), post_KEY.
CONTENDERS=(b3sum_1thread b3sum_default castore_cold castore_again casync_make
	mksquashfs_zstd mksquashfs_plain ostree_commit)
prep_b3sum_1thread() { :; }
cmd_b3sum_1thread() (cd "$SHARE" && find . -type f -print0 | xargs -0 -s $XARGS_S b3sum --num-threads 1 >/dev/null)
post_b3sum_1thread() { :; }
prep_b3sum_default() { :; }
cmd_b3sum_default() (cd "$SHARE" && find . -type f -print0 | xargs -0 -s $XARGS_S b3sum >/dev/null)
post_b3sum_default() { :; }
# Every run writes to a new folder, and nothing is deleted until the end:
# on ext4, files created within minutes of a mass deletion pay for the
# inode allocator skipping recently freed inodes (recently_deleted(), seen
# at 18% of an import's profile here), so deleting the previous run's
# output before each run measured the deletion, not the contender.
prep_castore_cold() { :; }
cmd_castore_cold() { "$CASTORE" --store "$WORK/store.$round" import "$SHARE" --name share; }
post_castore_cold() { :; }
# Into the store the cold import of this round just filled.
prep_castore_again() { [[ -z ${FAILED[castore_cold]:-} ]]; }
cmd_castore_again() { "$CASTORE" --store "$WORK/store.$round" import "$SHARE" --name share; }
post_castore_again() { :; }
prep_casync_make() { :; }
cmd_casync_make() { casync make --store="$WORK/casync.$round.castr" "$WORK/x.$round.caidx" "$SHARE"; }
post_casync_make() { :; }
prep_mksquashfs_zstd() { :; }
cmd_mksquashfs_zstd() { mksquashfs "$SHARE" "$WORK/zstd.$round.sqfs" -comp zstd -noappend -no-progress; }
post_mksquashfs_zstd() { :; }
prep_mksquashfs_plain() { :; }
cmd_mksquashfs_plain() { mksquashfs "$SHARE" "$WORK/plain.$round.sqfs" -noI -noD -noF -noX -noappend -no-progress; }
post_mksquashfs_plain() { :; }
prep_ostree_commit() { ostree init --repo="$WORK/ostree.$round" --mode=bare-user; }
cmd_ostree_commit() { ostree commit --repo="$WORK/ostree.$round" -b b "$SHARE"; }
post_ostree_commit() { :; }

# Rounds: every contender once per round, so that a change of load on the
# machine falls on all of them alike.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "measuring, $RUNS rounds ..."
for ((round = 1; round <= RUNS; round++)); do
	echo " round $round"
	for key in "${CONTENDERS[@]}"; do
		[[ $key != mksquashfs_zstd ]] || ((round <= SLOW_RUNS)) || continue
		run_one "$key"
	done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

floor=${BEST[b3sum_1thread]:-}
[[ -n $floor && -z ${FAILED[b3sum_1thread]:-} ]] || die "the b3sum floor failed; see $LOG"

echo
echo "castore import benchmark - $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r)"
echo "data: copy of /usr/share, $nentries entries, $nfiles files, $((bytes / 1000000)) MB; page cache warm for all"
echo "best of $RUNS rounds (mksquashfs zstd: $SLOW_RUNS); ratio = time / b3sum floor (one thread); +sync = the command then sync;"
echo "CPU = user+system seconds of the command and its children (robust to other load; the import uses 2 threads)"
echo "b3sum floor: find | xargs -0 b3sum --num-threads 1, split by xargs into $nproc_b3 b3sum process(es)"
echo "load average before: $load_before, after: $load_after (figures are unreliable when it exceeds $(nproc))"
echo
printf '%-34s %9s %7s %9s %7s %9s %7s\n' contender seconds ratio '+sync s' ratio 'CPU s' ratio
row() {
	local key=$1 label=$2
	if [[ -n ${FAILED[$key]:-} || -z ${BEST[$key]:-} ]]; then
		printf '%-34s %9s\n' "$label" FAILED
		return
	fi
	printf '%-34s %9s %6sx %9s %6sx %9s %6sx\n' "$label" \
		"$(us2s "${BEST[$key]}")" "$(ratio "${BEST[$key]}" "$floor")" \
		"$(us2s "${BESTS[$key]}")" "$(ratio "${BESTS[$key]}" "$floor")" \
		"$(us2s "${BESTC[$key]}")" "$(ratio "${BESTC[$key]}" "${BESTC[b3sum_1thread]}")"
}
row b3sum_1thread "b3sum floor (1 thread)"
row b3sum_default "b3sum (default threads)"
row castore_cold "castore import (empty store)"
row castore_again "castore import (store has all)"
row casync_make "casync make"
row mksquashfs_zstd "mksquashfs -comp zstd"
row mksquashfs_plain "mksquashfs uncompressed"
row ostree_commit "ostree commit (bare-user)"

# Verdicts: castore's own time (it syncs itself) against the floor and
# against the peers' times without their sync (the stricter comparison).
echo
if [[ -n ${FAILED[castore_cold]:-} ]]; then
	echo "MISSED: castore import failed (see $LOG)"
else
	c=${BEST[castore_cold]}
	r=$(ratio "$c" "$floor")
	if awk -v r="$r" 'BEGIN { exit !(r <= 1.2) }'; then
		echo "met: castore import cold ${r}x the b3sum floor (target <= 1.2x)"
	else
		echo "MISSED: castore import cold ${r}x the b3sum floor (target <= 1.2x)"
	fi
	for p in casync_make mksquashfs_zstd ostree_commit; do
		if [[ -n ${FAILED[$p]:-} ]]; then
			echo "not compared: $p failed"
		elif ((c < BEST[$p])); then
			echo "met: castore import faster than $p ($(ratio "${BEST[$p]}" "$c")x)"
		else
			echo "MISSED: castore import slower than $p ($(ratio "$c" "${BEST[$p]}")x its time)"
		fi
	done
	echo "(CPU: castore import $(ratio "${BESTC[castore_cold]}" "${BESTC[b3sum_1thread]}")x the floor's CPU time)"
fi
