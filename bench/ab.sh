#!/bin/bash
# bench/ab.sh - A/B of two castore binaries on the write paths, for a
# change that must not cost speed (e.g. a refactor of the store).
#
#   bench/ab.sh OLD_CASTORE NEW_CASTORE
#
# Interleaved rounds (A then B, RUNS times), each step from a fresh store
# or cache:
#   import of $IMPORT_SRC (default /usr/share) into a fresh store, page
#     cache warm (the tree is read just before), as bench/import.sh does:
#     wall, user and system time;
#   export of $REMOTE_SRC (default /usr/share/doc) from `castore serve`
#     (gRPC on a unix socket) through a fresh cache, caches dropped first:
#     unbounded, and bounded by --cache-max $CACHE_MAX (default 64M; the
#     MiB its blob files hold afterwards are shown).
# Run under `flock /tmp/castore-bench.lock`; note the load average (printed
# at the start and the end) beside the figures.
# Environment: BENCH_DIR (default /var/tmp/castore-bench), RUNS (3),
# IMPORT_SRC, REMOTE_SRC, CACHE_MAX.
set -euo pipefail
[[ $# == 2 ]] || {
	echo "usage: bench/ab.sh OLD_CASTORE NEW_CASTORE" >&2
	exit 2
}
[[ $(id -u) == 0 ]] || {
	echo "ab.sh: run as root (drops caches)" >&2
	exit 1
}
BIN_A=$(realpath "$1") BIN_B=$(realpath "$2")
B=${BENCH_DIR:-/var/tmp/castore-bench}/ab
RUNS=${RUNS:-3}
IMPORT_SRC=${IMPORT_SRC:-/usr/share}
REMOTE_SRC=${REMOTE_SRC:-/usr/share/doc}
CACHE_MAX=${CACHE_MAX:-64M}
mkdir -p "$B"
pid=
cleanup() {
	[[ -z $pid ]] || kill "$pid" 2>/dev/null || true
	rm -rf "$B"
}
trap cleanup EXIT

ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
fresh_remote() { # which digest size
	rm -rf "$B/cache-$1" "$B/dest-$1"
	"$bin" --store "grpc+unix://$B/sock-$1" --cache "$B/cache-$1" \
		roots add doc --directory "$2" --size "$3"
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 1; i <= RUNS; i++)); do
	for which in A B; do
		bin=$([[ $which == A ]] && echo "$BIN_A" || echo "$BIN_B")
		rm -rf "$B/istore-$which"
		# Warm again: the exports below drop the caches.
		tar -cf - "$IMPORT_SRC" 2>/dev/null >/dev/null
		sync
		imp=$({ /usr/bin/time -f "wall=%e user=%U sys=%S" "$bin" \
			--store "$B/istore-$which" import "$IMPORT_SRC" \
			--name s >/dev/null; } 2>&1)
		rm -rf "$B/istore-$which" "$B/store-$which"
		read -r _ _ dig size < <("$bin" --store "$B/store-$which" \
			import "$REMOTE_SRC" --name doc)
		rm -f "$B/sock-$which"
		"$bin" --store "$B/store-$which" serve \
			--listen "unix:$B/sock-$which" >/dev/null 2>&1 &
		pid=$!
		for _ in $(seq 100); do
			[[ -S $B/sock-$which ]] && break
			sleep 0.1
		done
		fresh_remote "$which" "$dig" "$size"
		t0=$(date +%s%N)
		"$bin" --store "grpc+unix://$B/sock-$which" \
			--cache "$B/cache-$which" export doc "$B/dest-$which"
		te=$(ms "$t0")
		fresh_remote "$which" "$dig" "$size"
		t0=$(date +%s%N)
		"$bin" --store "grpc+unix://$B/sock-$which" \
			--cache "$B/cache-$which" --cache-max "$CACHE_MAX" \
			export doc "$B/dest-$which"
		tb=$(ms "$t0")
		mb=$(du -sm "$B/cache-$which/blobs" | cut -f1)
		kill "$pid"
		wait "$pid" 2>/dev/null || true
		pid=
		echo "round $i $which: import $imp; export ${te} ms;" \
			"bounded export ${tb} ms (blob files ${mb} MiB)"
	done
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
