#!/bin/bash
# bench/run-all.sh - every benchmark in order (import, fs, virtiofs, remote, gc),
# each printing its own table; the output is also kept in
# $BENCH_DIR/logs/run-all-<date>.txt. Environment as for each script
# (BENCH_DIR, RUNS, CASTORE, ...); see BENCHMARKS.md.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
export BENCH_DIR
mkdir -p "$BENCH_DIR/logs"
OUT=$BENCH_DIR/logs/run-all-$(date -u +%Y%m%dT%H%M%SZ).txt

status=0
for b in import fs virtiofs remote gc; do
	echo "=== bench/$b.sh" | tee -a "$OUT"
	if ! "$HERE/$b.sh" 2>&1 | tee -a "$OUT"; then
		echo "=== bench/$b.sh failed" | tee -a "$OUT"
		status=1
	fi
done
echo "all output: $OUT"
exit $status
