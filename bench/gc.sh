#!/bin/bash
# bench/gc.sh - castore gc against verify and a re-import, and beside an
# import (issue 14).
#
# Data: three versions of the /usr/share copy ($BENCH_DIR/share, made
# once) that differ in a tenth of their files: each hard-links the copy
# and replaces a tenth of its files (a different tenth each) with a
# changed copy. One store holds the three imports; root v1 is removed, so
# gc has v1's own tenth and its Directories to collect.
# Measured in one run, each step cold (caches dropped before it):
#   castore gc --grace 0 (wall time, peak RSS), castore verify of the same
#   store afterwards, and a re-import of v1 into it afterwards;
#   the store's size after gc against a fresh store holding v2 and v3;
#   an import of v2 into a store that held v3 (removed), alone, and the
#   same import with `castore gc --grace 0` run again and again (a pause
#   of 1 s between runs) on that store meanwhile: the first one collects
#   v3's own objects while the import finds the shared ones present.
# Targets: gc <= 0.5x the re-import, peak RSS <= 64 MB, size <= 1.1x the
# fresh store; the import beside gc within 1.2x of the import alone.
#
# Environment: BENCH_DIR (default /var/tmp/castore-bench), CASTORE (default
# build/src/cli/castore of this checkout; a release build). Wrap the run in
# `flock /tmp/castore-bench.lock` on a shared machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
CASTORE=${CASTORE:-$ROOT/build/src/cli/castore}
WORK=$BENCH_DIR/gc
LOG=$BENCH_DIR/logs/gc.log

NAME=gc.sh
NEED_HINT="time findutils"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

need /usr/bin/time find awk du
[[ $(id -u) == 0 ]] || die "run as root (drops caches)"
[[ -x $CASTORE ]] || die "no castore binary at $CASTORE (set CASTORE=...)"

mkdir -p "$BENCH_DIR/logs"
: >"$LOG"
if [[ ! -e $BENCH_DIR/share.done ]]; then
	echo "copying /usr/share to $BENCH_DIR/share ..."
	rm -rf "$BENCH_DIR/share"
	cp -a /usr/share "$BENCH_DIR/share"
	touch "$BENCH_DIR/share.done"
fi
SHARE=$BENCH_DIR/share
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

# Hard links but for every tenth regular file (offset 0, 3 or 7), which
# becomes a copy with one more line.
variant() {
	local dst=$1 off=$2
	cp -al "$SHARE" "$dst"
	find "$dst" -type f | awk -v o="$off" 'NR % 10 == o' | while IFS= read -r f; do
		cp --remove-destination "$f" "$f.new" 2>/dev/null || continue
		echo "castore gc bench $off" >>"$f.new"
		mv -f "$f.new" "$f"
	done
}
echo "making the versions ..."
variant "$WORK/v1" 0
variant "$WORK/v2" 3
variant "$WORK/v3" 7

S=$WORK/store
F=$WORK/fresh
for v in v1 v2 v3; do
	"$CASTORE" --store "$S" import "$WORK/$v" --name "$v" >>"$LOG" 2>&1
done
for v in v2 v3; do
	"$CASTORE" --store "$F" import "$WORK/$v" --name "$v" >>"$LOG" 2>&1
done
"$CASTORE" --store "$S" roots rm v1 >>"$LOG" 2>&1

size() { du -s --block-size=1 "$1" | awk '{ print $1 }'; }

drop_caches
echo "+ gc --grace 0" >>"$LOG"
t0=${EPOCHREALTIME/[.,]/}
/usr/bin/time -f "%M" -o "$WORK/rss" "$CASTORE" --store "$S" gc --grace 0 >>"$LOG" 2>&1
t1=${EPOCHREALTIME/[.,]/}
T_GC=$((t1 - t0))
RSS_KB=$(cat "$WORK/rss")
SIZE_S=$(size "$S")
SIZE_F=$(size "$F")
drop_caches
timed "$CASTORE" --store "$S" verify
T_VERIFY=$T
drop_caches
timed "$CASTORE" --store "$S" import "$WORK/v1" --name v1
T_REIMPORT=$T

# An import alone, and the same beside gc, into stores that held v3.
for e in e1 e2; do
	"$CASTORE" --store "$WORK/$e" import "$WORK/v3" --name v3 >>"$LOG" 2>&1
	"$CASTORE" --store "$WORK/$e" roots rm v3 >>"$LOG" 2>&1
done
drop_caches
timed "$CASTORE" --store "$WORK/e1" import "$WORK/v2" --name v2
T_ALONE=$T
drop_caches
(
	while [[ ! -e $WORK/stop ]]; do
		"$CASTORE" --store "$WORK/e2" gc --grace 0 >>"$WORK/gcloop.log" 2>&1 || true
		sleep 1
	done
) &
LOOP=$!
timed "$CASTORE" --store "$WORK/e2" import "$WORK/v2" --name v2
T_BESIDE=$T
touch "$WORK/stop"
wait "$LOOP"
GCS=$(grep -c "removed" "$WORK/gcloop.log" || true)
"$CASTORE" --store "$WORK/e2" verify >>"$LOG" 2>&1 || die "verify after gc beside import failed"

echo
echo "castore gc bench, $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| step | time (s) | ratio |"
echo "|---|---|---|"
echo "| gc --grace 0 (one of three roots removed) | $(us2s "$T_GC") | 1.00 |"
echo "| verify (same store, after gc) | $(us2s "$T_VERIFY") | $(ratio "$T_VERIFY" "$T_GC") |"
echo "| re-import of the removed tree | $(us2s "$T_REIMPORT") | $(ratio "$T_REIMPORT" "$T_GC") |"
echo
echo "gc / re-import: $(ratio "$T_GC" "$T_REIMPORT") (target <= 0.5)"
echo "gc peak RSS: $((RSS_KB / 1024)) MB (target <= 64)"
echo "store after gc: $SIZE_S bytes; fresh store of v2+v3: $SIZE_F bytes; ratio $(ratio "$SIZE_S" "$SIZE_F") (target <= 1.1)"
echo "import alone: $(us2s "$T_ALONE") s; beside gc ($GCS gc runs): $(us2s "$T_BESIDE") s; ratio $(ratio "$T_BESIDE" "$T_ALONE") (target <= 1.2)"
