#!/bin/bash
# bench/bao.sh - what the BLAKE3 outboard and the chunk lists cost, and
# what the chunk lists dedup.
#
# 1. Plain BLAKE3 (cas_hash_buffer, the library's hasher) against one pass
#    of BLAKE3 + outboard (cas_bao_hash_buffer) over the same bytes in
#    memory, side by side in one process (castore-bao-tool bench: best of
#    5 of each, alternating): a 1 GiB file of real binaries, and every
#    file of /usr/share (blobs up to CAS_BAO_THRESHOLD keep plain hashing,
#    as import would). Target: at most 1.05x.
# 2. The chunker over the 1 GiB file (warm page cache) against b3sum -l 1
#    of the same file: chunking costs a second hashing pass.
# 3. Dedup between two versions of a real large file: the Debian kernel
#    packages in $KERNEL_DIR (apt-get download linux-image-6.1.0-N-amd64-
#    unsigned for two or more N), their .deb files, their uncompressed
#    data.tar (dpkg-deb --fsys-tarfile) and their largest file (amdgpu.ko,
#    19 MB, uncompressed): the share of the newer file's bytes whose
#    chunks the older one already has. Content-defined chunks (64 KiB/
#    256 KiB/1 MiB, and 4/16/64 KiB) against fixed chunks of the same
#    average, aligned to outboard groups.
#
# Run under the shared lock: flock /tmp/castore-bench.lock bench/bao.sh
# Environment: BENCH_DIR (default /var/tmp/castore-bench), KERNEL_DIR
# (default $BENCH_DIR/kernel), TOOL (default the release build's
# tests/core/castore-bao-tool).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/castore-bench}
KERNEL_DIR=${KERNEL_DIR:-$BENCH_DIR/kernel}
TOOL=${TOOL:-$ROOT/build/tests/core/castore-bao-tool}
LOG=$BENCH_DIR/logs/bao.log

NAME=bao.sh
NEED_HINT="b3sum dpkg findutils"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

need b3sum dpkg-deb find awk
[[ -x $TOOL ]] || die "no castore-bao-tool at $TOOL (ninja -C build)"
mkdir -p "$BENCH_DIR/logs"
: >"$LOG"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

BIG=$BENCH_DIR/big.bin
if [[ ! -f $BIG || $(stat -c %s "$BIG") != $((1 << 30)) ]]; then
	echo "making the 1 GiB file of binaries ..."
	find /usr/lib /usr/bin -type f -size +64k -print0 2>/dev/null |
		xargs -0 cat 2>/dev/null | head -c $((1 << 30)) >"$BIG" || true
fi

echo "== 1. BLAKE3 vs BLAKE3 + outboard, in memory"
"$TOOL" bench "$BIG" | sed 's/^/1 GiB file: /'
find /usr/share -type f -print0 2>/dev/null | "$TOOL" bench - | sed 's/^/usr\/share: /'

echo "== 2. chunker vs b3sum, 1 GiB file, warm"
cat "$BIG" >/dev/null
for run in 1 2 3; do
	timed b3sum -l 32 --num-threads 1 "$BIG" && keep_min b3 "$T"
	timed "$TOOL" chunks "$BIG" && keep_min cdc "$T"
done
echo "b3sum one thread $(us2s "${R[b3]}") s, chunk list $(us2s "${R[cdc]}") s" \
	"($(ratio "${R[cdc]}" "${R[b3]}")x)"

echo "== 3. dedup between kernel versions"
shopt -s nullglob
debs=("$KERNEL_DIR"/linux-image-*.deb)
((${#debs[@]} >= 2)) || die "need two kernel .deb files in $KERNEL_DIR"
# Versions sort by name (6.1.0-54 < 6.1.0-57).
mapfile -t debs < <(printf '%s\n' "${debs[@]}" | sort -V)

# share OLD NEW MIN AVG MAX: bytes of NEW's chunks that OLD has, of NEW.
share() {
	"$TOOL" chunks "$1" "$3" "$4" "$5" >"$BENCH_DIR/old.chunks"
	"$TOOL" chunks "$2" "$3" "$4" "$5" >"$BENCH_DIR/new.chunks"
	awk 'NR == FNR { have[$1] = 1; next }
	     { total += $2; n++; if ($1 in have) { shared += $2; s++ } }
	     END { printf "%5.1f %% of %d MB (%d of %d chunks)", 100 * shared / total,
		   total / 1e6, s, n }' "$BENCH_DIR/old.chunks" "$BENCH_DIR/new.chunks"
}

pair() {
	local old=$1 new=$2 what=$3
	echo "$what: CDC 64K/256K/1M $(share "$old" "$new" 65536 262144 1048576)"
	echo "$what: fixed 256K      $(share "$old" "$new" 262144 262144 262144)"
	echo "$what: CDC 4K/16K/64K  $(share "$old" "$new" 4096 16384 65536)"
	echo "$what: fixed 16K       $(share "$old" "$new" 16384 16384 16384)"
}

largest() { # the largest file of a package, extracted to $2
	local name
	name=$(dpkg-deb -c "$1" | sort -k3 -n | tail -n 1 | awk '{ print $6 }')
	dpkg-deb --fsys-tarfile "$1" | tar -xO "$name" >"$2"
	basename "$name"
}

for ((i = 1; i < ${#debs[@]}; i++)); do
	old=${debs[i - 1]} new=${debs[i]}
	label="$(basename "$old" | cut -d_ -f2) -> $(basename "$new" | cut -d_ -f2)"
	pair "$old" "$new" ".deb $label"
	dpkg-deb --fsys-tarfile "$old" >"$BENCH_DIR/old.tar"
	dpkg-deb --fsys-tarfile "$new" >"$BENCH_DIR/new.tar"
	pair "$BENCH_DIR/old.tar" "$BENCH_DIR/new.tar" "data.tar $label"
	largest "$old" "$BENCH_DIR/old.file" >/dev/null
	file=$(largest "$new" "$BENCH_DIR/new.file")
	pair "$BENCH_DIR/old.file" "$BENCH_DIR/new.file" "$file $label"
done
rm -f "$BENCH_DIR"/old.* "$BENCH_DIR"/new.*
