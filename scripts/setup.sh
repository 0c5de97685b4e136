#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for castore: installs every package
# the project needs, builds, and runs the main job on a sample tree
# (imports /usr/include into a demo store and mounts it).
#   scripts/setup.sh            everything
#   scripts/setup.sh --no-demo  packages and build only (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

mapfile -t pkgs < <(grep -v '^#' scripts/packages.txt | grep -v '^$')
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${#missing[@]} packages: ${missing[*]}"
	$SUDO apt-get update -q
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ -d build ] || meson setup build --buildtype=release
ninja -C build

[ "$demo" = 1 ] || exit 0

# The main job: a real tree of this machine into a store, served as files.
demo_dir=${CASTORE_DEMO_DIR:-/var/tmp/castore-demo}
mkdir -p "$demo_dir/mnt"
export CASTORE_STORE="$demo_dir/store"
./build/src/cli/castore import /usr/include --name include
./build/src/cli/castore roots list
mountpoint -q "$demo_dir/mnt" && umount -l "$demo_dir/mnt"
./build/src/cli/castore mount "$demo_dir/mnt" --list-root &
pid=$!
for _ in $(seq 100); do mountpoint -q "$demo_dir/mnt" && break; sleep 0.1; done
ls -l "$demo_dir/mnt" "$demo_dir/mnt/include" | head -20 || true
# Symlinks compared as links: some of /usr/include's point outside it.
same=0
diff -r --no-dereference /usr/include "$demo_dir/mnt/include" && same=1
kill -TERM "$pid"
wait "$pid"
if [ "$same" = 1 ]; then
	echo "setup: /usr/include served by castore mount is identical to the original"
else
	echo "setup: the mounted tree differs from /usr/include" >&2
	exit 1
fi
