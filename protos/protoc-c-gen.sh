#!/bin/sh
# Runs protoc-c on tvix's castore protos and writes the generated C flat
# into OUTDIR. tvix's rpc_directory.proto imports
# "tvix/castore/protos/castore.proto", so the protos are staged under that
# path (they are kept verbatim here), and the generated #includes are
# rewritten to the flat names meson can declare as outputs.
#   protoc-c-gen.sh PROTOC_C SRCDIR OUTDIR
set -eu
protoc_c=$1
src=$2
out=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/in/tvix/castore/protos
mkdir -p "$stage" "$tmp/out"
cp "$src/castore.proto" "$src/rpc_blobstore.proto" "$src/rpc_directory.proto" "$stage/"
(cd "$tmp/in" && "$protoc_c" --c_out="$tmp/out" \
	tvix/castore/protos/castore.proto \
	tvix/castore/protos/rpc_blobstore.proto \
	tvix/castore/protos/rpc_directory.proto)
for f in "$tmp"/out/tvix/castore/protos/*.pb-c.[ch]; do
	sed 's|#include "tvix/castore/protos/|#include "|' "$f" >"$out/$(basename "$f")"
done
