#!/bin/bash
# bench/remote.sh - castore's remote stores against the local store and curl.
#
# Data: the copy of /usr/share under $BENCH_DIR/share (shared with the other
# benchmarks) and a 1 GiB file of real binaries (deleted at the end), both
# imported into a local store. The store is served over loopback twice:
# `castore serve` (tvix castore gRPC, grpc+http://127.0.0.1:PORT) and nginx
# serving the output of `castore publish` (http://127.0.0.1:PORT).
# Measured, best of $RUNS rounds, every run with the host's caches dropped
# first (so servers and local store read from disk alike) and every remote
# run into an empty cache:
#   export of the tree: from the local store, from gRPC, from HTTP; each
#     timed alone and followed by `sync` (the remote ones also write their
#     cache; the ratio uses the +sync figure so that deferred writeback is
#     counted for all);
#   cold sequential read of the 1 GiB file (dd bs=1M) through a mount of
#     each remote (and of the local store, for reference), beside
#     `curl -o /dev/null` of the same bytes from nginx, and beside four
#     parallel `curl -r` of its quarters (the mount fetches ranges in
#     parallel, so one stream is not its floor);
#   for reference, the requests alone: `curl --parallel` (16 at once, as
#     castore's HTTP fetcher) of every blob of the tree from nginx, cold,
#     without writing anything - the floor of one GET per blob;
#   large blobs by range (HTTP), each step cold (fresh cache, fresh
#     mount, caches dropped): 4 KiB at offset 512 MiB of the 1 GiB file
#     (dd) beside `curl -r` of the same 4 KiB, and 1,000 random 4 KiB
#     reads (a fixed seed, posix_fadvise RANDOM as a random reader
#     says so); the bytes nginx sent for each, from its access log.
#
# Environment: BENCH_DIR (default /var/tmp/castore-bench), RUNS (3),
# CASTORE (default build/src/cli/castore; use a release build), RA_KB
# (1024, read_ahead_kb of the mounts, as in fs.sh), BIG_MB (1024).
set -euo pipefail
trap 'echo "remote.sh: command failed at line $LINENO" >&2' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
RUNS=${RUNS:-3}
RA_KB=${RA_KB:-1024}
BIG_MB=${BIG_MB:-1024}
CASTORE=${CASTORE:-$ROOT/build/src/cli/castore}
WORK=$BENCH_DIR/remote
LOG=$BENCH_DIR/logs/remote.log

NAME=remote.sh
NEED_HINT="nginx-light curl util-linux iproute2"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

need curl ss mountpoint dd awk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "no nginx (apt-get install -y nginx-light)"
[[ $(id -u) == 0 ]] || die "run as root (mounts, drops caches)"
[[ -x $CASTORE ]] || die "no castore binary at $CASTORE (set CASTORE=...)"

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
SHARE=$BENCH_DIR/share
STORE=$WORK/store
MNT=$WORK/mnt

SERVE_PID= NGINX_PID= MOUNT_PID=
cleanup() {
	if [[ -n $MOUNT_PID ]]; then
		umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
		wait "$MOUNT_PID" 2>/dev/null || true
	fi
	[[ -z $SERVE_PID ]] || { kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; }
	[[ -z $NGINX_PID ]] || { kill "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true; }
	rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
	local p
	for p in $(seq 18000 18999 | shuf); do
		[[ -z $(ss -Hltn "sport = :$p") ]] && { echo "$p"; return 0; }
	done
	return 1
}

# --- data, store, servers ---------------------------------------------------
echo "making the $BIG_MB MiB file of binaries and importing ..."
mkdir -p "$WORK/big"
find /usr/lib /usr/bin -type f -size +64k -print0 2>/dev/null |
	xargs -0 cat 2>/dev/null | head -c $((BIG_MB << 20)) >"$WORK/big/big.bin" || true
[[ $(stat -c %s "$WORK/big/big.bin") == $((BIG_MB << 20)) ]] || die "could not gather $BIG_MB MiB of binaries"
read -r _ share_type share_digest share_size < <("$CASTORE" --store "$STORE" import "$SHARE" --name share) ||
	die "castore import of $SHARE failed"
read -r _ big_type big_digest big_size < <("$CASTORE" --store "$STORE" import "$WORK/big" --name big) ||
	die "castore import of $WORK/big failed"
rm -f "$WORK/big/big.bin"
[[ $share_type == directory && $big_type == directory ]] || die "unexpected import output"

echo "publishing and starting the servers ..."
OK_GRPC=1 OK_HTTP=1
if ! "$CASTORE" --store "$STORE" publish "$WORK/pub" >>"$LOG" 2>&1; then
	echo "remote.sh: castore publish failed; HTTP not measured (see $LOG)" >&2
	OK_HTTP=0
fi
BIG_BLOB=$(find "$WORK/pub/blobs" -type f -size $((BIG_MB << 20))c 2>/dev/null | head -n 1 || true)
[[ -n $BIG_BLOB ]] || OK_HTTP=0

HTTP_PORT=$(free_port) || die "no free port"
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
	log_format bytes '\$status \$body_bytes_sent \$request_uri';
	access_log $WORK/nginx/access.log bytes;
	sendfile on;
	tcp_nopush on;
	default_type application/octet-stream;
	client_body_temp_path $WORK/nginx/body;
	proxy_temp_path $WORK/nginx/proxy;
	fastcgi_temp_path $WORK/nginx/fastcgi;
	uwsgi_temp_path $WORK/nginx/uwsgi;
	scgi_temp_path $WORK/nginx/scgi;
	server {
		listen 127.0.0.1:$HTTP_PORT;
		root $WORK/pub;
	}
}
EOF
if ((OK_HTTP)); then
	"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >>"$LOG" 2>&1 &
	NGINX_PID=$!
	for ((i = 0; i < 100; i++)); do
		curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/roots" 2>/dev/null && break
		sleep 0.1
	done
	curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/roots" || { echo "remote.sh: nginx did not start (see $WORK/nginx/error.log)" >&2; OK_HTTP=0; }
fi
HTTP_URL=http://127.0.0.1:$HTTP_PORT
BIG_URL=$HTTP_URL/${BIG_BLOB#"$WORK/pub/"}

"$CASTORE" --store "$STORE" serve --listen 127.0.0.1:0 >"$WORK/serve.out" 2>&1 &
SERVE_PID=$!
GRPC_ADDR=
for ((i = 0; i < 100; i++)); do
	GRPC_ADDR=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$WORK/serve.out" | head -n 1)
	[[ -n $GRPC_ADDR ]] && break
	kill -0 "$SERVE_PID" 2>/dev/null || break
	sleep 0.1
done
if [[ -z $GRPC_ADDR ]]; then
	echo "remote.sh: castore serve did not start: $(tail -n 3 "$WORK/serve.out")" >&2
	OK_GRPC=0
fi
GRPC_URL=grpc+http://${GRPC_ADDR#*://}

# --- measurements -----------------------------------------------------------
# A fresh cache for SOURCE (local, grpc, http); gRPC has no roots, so they
# are added to its cache (that fetches nothing).
fresh_cache() {
	rm -rf "$WORK/cache" "$WORK/dest"
	if [[ $1 == grpc ]]; then
		"$CASTORE" --store "$GRPC_URL" --cache "$WORK/cache" roots add share \
			--directory "$share_digest" --size "$share_size" &&
			"$CASTORE" --store "$GRPC_URL" --cache "$WORK/cache" roots add big \
				--directory "$big_digest" --size "$big_size"
	fi
}
store_args() {
	case $1 in
	local) echo "--store $STORE" ;;
	grpc) echo "--store $GRPC_URL --cache $WORK/cache" ;;
	http) echo "--store $HTTP_URL --cache $WORK/cache" ;;
	esac
}
# shellcheck disable=SC2046
do_export() { "$CASTORE" $(store_args "$1") export share "$WORK/dest"; }
do_dd() { dd if="$MNT/big/big.bin" of=/dev/null bs=1M status=none; }
do_mount_read() { do_mount_cmd "$1" do_dd; }
do_curl() { curl -fsS -o /dev/null "$BIG_URL"; }
# The same bytes as four Range GETs at once: the mount's readahead runs
# ranges in parallel (four threads and the reader), which read nginx's
# disk at several places at once; one stream is not its floor.
do_curl_par() {
	local q=$(((BIG_MB << 20) / 4)) i pids=() rc=0
	for ((i = 0; i < 4; i++)); do
		curl -fsS -o /dev/null -r "$((i * q))-$(((i + 1) * q - 1))" "$BIG_URL" &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || rc=1; done
	return $rc
}
# Bytes nginx sent since the access log had $1 bytes (lines logged after).
ACCESS=$WORK/nginx/access.log
log_mark() { stat -c %s "$ACCESS" 2>/dev/null || echo 0; }
sent_since() { tail -c +$(($1 + 1)) "$ACCESS" | awk '{ s += $2 } END { print s + 0 }'; }
SEEK_OFF=$(((BIG_MB << 20) / 2))
do_curl_4k() { curl -fsS -o /dev/null -r "$SEEK_OFF-$((SEEK_OFF + 4095))" "$BIG_URL"; }
do_seek_4k() { dd if="$MNT/big/big.bin" of=/dev/null bs=4096 skip=$((SEEK_OFF / 4096)) count=1 status=none; }
do_random_4k() {
	python3 - "$MNT/big/big.bin" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
size = os.fstat(fd).st_size
rng = random.Random(17)
for _ in range(1000):
    off = rng.randrange(0, size // 4096) * 4096
    assert len(os.pread(fd, 4096, off)) == 4096
PY
}
# Mounts SRC fresh (read_ahead_kb RA_KB), drops caches, times CMD.
do_mount_cmd() {
	local src=$1 cmd=$2 bdi i rc=0
	mkdir -p "$MNT"
	# shellcheck disable=SC2046
	"$CASTORE" $(store_args "$src") mount "$MNT" >>"$LOG" 2>&1 &
	MOUNT_PID=$!
	for ((i = 0; i < 300; i++)); do
		mountpoint -q "$MNT" && break
		kill -0 "$MOUNT_PID" 2>/dev/null || break
		sleep 0.1
	done
	if ! mountpoint -q "$MNT"; then
		wait "$MOUNT_PID" 2>/dev/null || true
		MOUNT_PID=
		return 1
	fi
	bdi=$(mountpoint -d "$MNT")
	echo "$RA_KB" >"/sys/class/bdi/$bdi/read_ahead_kb"
	drop_caches
	timed "$cmd" || rc=$?
	umount "$MNT" || umount -l "$MNT"
	wait "$MOUNT_PID" 2>/dev/null || true
	MOUNT_PID=
	return $rc
}
# Every blob of the published tree but the big one, as a curl config.
NBLOBS=0
if ((OK_HTTP)); then
	find "$WORK/pub/blobs" -type f ! -size $((BIG_MB << 20))c -printf '%P\n' |
		awk -v u="$HTTP_URL/blobs/" '{ print "url = \"" u $0 "\"\noutput = \"/dev/null\"" }' \
			>"$WORK/blobs.curl"
	NBLOBS=$(grep -c '^url' "$WORK/blobs.curl")
fi
do_curl_blobs() { curl -fsS --parallel --parallel-max 16 -K "$WORK/blobs.curl"; }

SOURCES=(local)
((OK_GRPC)) && SOURCES+=(grpc)
((OK_HTTP)) && SOURCES+=(http)
declare -A FAILED
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= RUNS; round++)); do
	echo " round $round"
	for s in "${SOURCES[@]}"; do
		[[ -z ${FAILED[$s.export]:-} ]] || continue
		fresh_cache "$s" >>"$LOG" 2>&1 || { FAILED[$s.export]=1; continue; }
		drop_caches
		if ! timed do_export "$s"; then
			FAILED[$s.export]=1
			echo "  export from $s: FAILED (see $LOG)"
			continue
		fi
		tc=$T
		timed sync || true
		keep_min "$s.export" $tc
		keep_min "$s.export_sync" $((tc + T))
		echo "  export from $s: $(us2s $tc) s (+sync $(us2s $((tc + T))) s)"
	done
	for s in "${SOURCES[@]}"; do
		[[ -z ${FAILED[$s.read]:-} ]] || continue
		fresh_cache "$s" >>"$LOG" 2>&1 || { FAILED[$s.read]=1; continue; }
		if ! do_mount_read "$s"; then
			FAILED[$s.read]=1
			echo "  cold read through a mount of $s: FAILED (see $LOG)"
			continue
		fi
		keep_min "$s.read" $T
		echo "  cold read through a mount of $s: $(us2s $T) s"
	done
	if ((OK_HTTP)) && [[ -z ${FAILED[curl_blobs]:-} ]]; then
		drop_caches
		if timed do_curl_blobs; then
			keep_min curl_blobs $T
			echo "  curl --parallel of the tree's $NBLOBS blobs: $(us2s $T) s"
		else
			FAILED[curl_blobs]=1
		fi
	fi
	if ((OK_HTTP)) && [[ -z ${FAILED[curl]:-} ]]; then
		drop_caches
		if timed do_curl; then
			keep_min curl $T
			echo "  curl of the blob from nginx: $(us2s $T) s"
		else
			FAILED[curl]=1
		fi
	fi
	if ((OK_HTTP)) && [[ -z ${FAILED[curl_par]:-} ]]; then
		drop_caches
		if timed do_curl_par; then
			keep_min curl_par $T
			echo "  curl of the blob as 4 parallel ranges: $(us2s $T) s"
		else
			FAILED[curl_par]=1
		fi
	fi
	if ((OK_HTTP)); then
		drop_caches
		m=$(log_mark)
		if timed do_curl_4k; then
			keep_min curl4k $T
			keep_max curl4k.bytes "$(sent_since "$m")"
			echo "  curl -r of 4 KiB at $SEEK_OFF: $(us2s $T) s"
		fi
		for step in seek_4k random_4k; do
			[[ -z ${FAILED[$step]:-} ]] || continue
			fresh_cache http >>"$LOG" 2>&1
			m=$(log_mark)
			if do_mount_cmd http "do_$step"; then
				keep_min "$step" $T
				keep_max "$step.bytes" "$(sent_since "$m")"
				echo "  $step through a mount of nginx: $(us2s $T) s, nginx sent $(sent_since "$m") bytes"
			else
				FAILED[$step]=1
				echo "  $step through a mount of nginx: FAILED (see $LOG)"
			fi
		done
	fi
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$WORK/cache" "$WORK/dest"

# --- report -----------------------------------------------------------------
nentries=$(find "$SHARE" | wc -l)
echo
echo "castore remote benchmark - $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r)"
echo "load average before: $load_before, after: $load_after (figures are unreliable when it exceeds $(nproc))"
echo "data: copy of /usr/share ($nentries entries) and a $BIG_MB MiB file; servers on loopback; caches dropped before every run; best of $RUNS"
echo
printf '%-34s %10s %12s %10s\n' "export of the tree" "seconds" "+sync s" "ratio"
declare -A SLABEL=([local]="from the local store" [grpc]="from castore serve (gRPC)" [http]="from nginx (published layout)")
for s in local grpc http; do
	if [[ -z ${R[$s.export]:-} ]]; then
		printf '%-34s %10s\n' "${SLABEL[$s]}" "$([[ -n ${FAILED[$s.export]:-} ]] && echo FAILED || echo 'not measured')"
		continue
	fi
	printf '%-34s %10s %12s %9sx\n' "${SLABEL[$s]}" "$(us2s "${R[$s.export]}")" \
		"$(us2s "${R[$s.export_sync]}")" \
		"$([[ -n ${R[local.export_sync]:-} ]] && ratio "${R[$s.export_sync]}" "${R[local.export_sync]}" || echo -)"
done
if [[ -n ${R[curl_blobs]:-} ]]; then
	printf '%-34s %10s %12s %9sx\n' "curl --parallel, every blob" "$(us2s "${R[curl_blobs]}")" "-" \
		"$([[ -n ${R[local.export_sync]:-} ]] && ratio "${R[curl_blobs]}" "${R[local.export_sync]}" || echo -)"
fi
echo "(ratio = +sync time / local +sync time; target <= 2x; the curl row is"
echo " the requests alone, $NBLOBS GETs from nginx writing nothing: a floor for HTTP)"
echo
printf '%-34s %10s %8s %10s %10s\n' "cold read of the $BIG_MB MiB file" "seconds" "GB/s" "vs curl" "vs curl x4"
gbs() { awk -v u="$1" -v b=$((BIG_MB << 20)) 'BEGIN { printf "%.2f", b / u / 1000 }'; }
rowr() {
	local key=$1 label=$2
	if [[ -z ${R[$key]:-} ]]; then
		printf '%-34s %10s\n' "$label" "$([[ -n ${FAILED[$key]:-} ]] && echo FAILED || echo 'not measured')"
		return
	fi
	printf '%-34s %10s %8s %9sx %9sx\n' "$label" "$(us2s "${R[$key]}")" "$(gbs "${R[$key]}")" \
		"$([[ -n ${R[curl]:-} ]] && ratio "${R[curl]}" "${R[$key]}" || echo -)" \
		"$([[ -n ${R[curl_par]:-} ]] && ratio "${R[curl_par]}" "${R[$key]}" || echo -)"
}
rowr curl "curl -o /dev/null from nginx"
rowr curl_par "curl, 4 ranges in parallel"
rowr local.read "mount of the local store"
rowr grpc.read "mount of castore serve (gRPC)"
rowr http.read "mount of nginx (HTTP)"
echo "(vs curl = curl time / mount time, i.e. speed relative to curl; target >= 1.0x (issue 17, HTTP and gRPC);"
echo " vs curl x4: the same against four parallel Range GETs, the floor of a reader that fetches ranges in parallel)"
echo
printf '%-46s %10s %12s %14s\n' "large blobs by range (HTTP, cold)" "seconds" "vs curl -r" "bytes sent"
rowb() {
	local key=$1 label=$2
	if [[ -z ${R[$key]:-} ]]; then
		printf '%-46s %10s\n' "$label" "$([[ -n ${FAILED[$key]:-} ]] && echo FAILED || echo 'not measured')"
		return
	fi
	printf '%-46s %10s %11sx %14s\n' "$label" "$(us2s "${R[$key]}")" \
		"$([[ -n ${R[curl4k]:-} ]] && ratio "${R[$key]}" "${R[curl4k]}" || echo -)" "${R[$key.bytes]:-?}"
}
rowb curl4k "curl -r of 4 KiB at 512 MiB"
rowb seek_4k "mount: 4 KiB at 512 MiB (dd)"
rowb random_4k "mount: 1,000 random 4 KiB reads"
echo "(vs curl -r = time / curl -r's time: target <= 3x for the single read; bytes: worst round;"
echo " targets: <= 8 MiB for the single read, <= 1,000 x 16 KiB + the outboard for the random ones)"
echo
for s in grpc http; do
	if [[ -n ${R[$s.export_sync]:-} && -n ${R[local.export_sync]:-} ]]; then
		r=$(ratio "${R[$s.export_sync]}" "${R[local.export_sync]}")
		if awk -v r="$r" 'BEGIN { exit !(r <= 2.0) }'; then
			echo "met: export ${SLABEL[$s]} ${r}x local (target <= 2x)"
		else
			echo "MISSED: export ${SLABEL[$s]} ${r}x local (target <= 2x)"
		fi
	else
		echo "MISSED: export ${SLABEL[$s]} not measured"
	fi
	if [[ -n ${R[$s.read]:-} && -n ${R[curl]:-} ]]; then
		r=$(ratio "${R[curl]}" "${R[$s.read]}")
		want=1.0
		if awk -v r="$r" -v w="$want" 'BEGIN { exit !(r >= w) }'; then
			echo "met: cold read through a mount ${SLABEL[$s]} ${r}x curl (target >= ${want}x)"
		else
			echo "MISSED: cold read through a mount ${SLABEL[$s]} ${r}x curl (target >= ${want}x)"
		fi
	else
		echo "MISSED: cold read through a mount ${SLABEL[$s]} not measured"
	fi
done
if [[ -n ${R[seek_4k]:-} && -n ${R[curl4k]:-} ]]; then
	r=$(ratio "${R[seek_4k]}" "${R[curl4k]}")
	v=$(awk -v r="$r" 'BEGIN { print (r <= 3.0) ? "met" : "MISSED" }')
	echo "$v: 4 KiB at 512 MiB through a mount of nginx ${r}x curl -r (target <= 3x)"
	v=$(awk -v b="${R[seek_4k.bytes]}" 'BEGIN { print (b <= 8 * 1048576) ? "met" : "MISSED" }')
	echo "$v: 4 KiB at 512 MiB: nginx sent ${R[seek_4k.bytes]} bytes (target <= 8 MiB)"
else
	echo "MISSED: 4 KiB at 512 MiB through a mount of nginx not measured"
fi
if [[ -n ${R[random_4k.bytes]:-} ]]; then
	limit=$((1000 * 16384 + (BIG_MB << 20) / 16384 * 64))
	v=$(awk -v b="${R[random_4k.bytes]}" -v l=$limit 'BEGIN { print (b <= l) ? "met" : "MISSED" }')
	echo "$v: 1,000 random 4 KiB reads: nginx sent ${R[random_4k.bytes]} bytes (target <= $limit)"
else
	echo "MISSED: 1,000 random 4 KiB reads not measured"
fi
