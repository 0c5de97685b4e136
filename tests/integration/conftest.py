"""Shared fixtures for the integration tests (run as root, real mounts).

CASTORE_BIN names the castore binary (scripts/test sets it to the
sanitizer build); the default is build/src/cli/castore.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASTORE = os.environ.get("CASTORE_BIN", str(ROOT / "build" / "src" / "cli" / "castore"))


def run(args, store=None, input=None, check=True, timeout=600, env=None, **kw):
    """Runs castore with args; returns the CompletedProcess (bytes)."""
    cmd = [CASTORE]
    if store is not None:
        cmd += ["--store", str(store)]
    cmd += [str(a) for a in args]
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\nstdout: {p.stdout[-2000:]!r}\nstderr: {p.stderr[-2000:]!r}")
    return p


@pytest.fixture
def store(tmp_path):
    """An empty store folder (created by the first writing command)."""
    return tmp_path / "store"


@pytest.fixture
def castore(store):
    """castore(args..., check=True, input=None) bound to the test's store."""
    def call(*args, **kw):
        return run(args, store=store, **kw)
    return call


def copy_tree(src, dst, limit_files=None):
    """Copies a real tree of this machine (symlinks kept, unreadable and
    special files skipped) so tests own their data."""
    count = 0
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in dirs + files:
            s = os.path.join(root, name)
            d = os.path.join(dst, rel, name)
            if os.path.islink(s):
                os.symlink(os.readlink(s), d)
                if name in dirs:
                    dirs.remove(name)
            elif os.path.isfile(s):
                try:
                    shutil.copy2(s, d)
                except OSError:
                    continue
                count += 1
                if limit_files and count >= limit_files:
                    return dst
    return dst


def flip_in(path, offset):
    """Flips one bit of the byte at offset of a store's file (a blob
    file or a pack: read-only, so made writable first)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def pattern_bytes(n, seed=0):
    """Deterministic test data: BLAKE3's i % 251 pattern, shifted by seed."""
    return bytes((i + seed) % 251 for i in range(n))


# The Debian root file system of the container and import tests -------------

ROOTFS_CACHE = Path("/var/tmp/castore-test-rootfs")
ROOTFS_TAR = ROOTFS_CACHE / "bookworm-minbase.tar"


def build_rootfs_tarball():
    """debootstrap --variant=minbase into a temporary folder, then a
    tarball of it without /dev's contents (device nodes stay out of a
    castore tree). Returns None, with the reason, when it cannot be made."""
    if not shutil.which("debootstrap"):
        return "debootstrap is not installed (scripts/packages.txt has it)"
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    work = ROOTFS_CACHE / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        p = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(work),
                            "http://deb.debian.org/debian"],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            return "debootstrap failed: " + (p.stdout + p.stderr)[-500:]
        tmp = ROOTFS_TAR.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["tar", "-C", str(work), "--exclude=./dev/*", "-cf", str(tmp), "."],
                       check=True)
        os.rename(tmp, ROOTFS_TAR)
        return None
    except subprocess.TimeoutExpired:
        return "debootstrap took over 10 minutes"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs_tar():
    """The tarball of a `debootstrap --variant=minbase` root, made once per
    machine (kept in ROOTFS_CACHE); the test skips, saying why, only where
    the Debian archive cannot be reached."""
    if not ROOTFS_TAR.exists():
        why = build_rootfs_tarball()
        if why:
            pytest.skip(f"no Debian root file system: {why}")
    return ROOTFS_TAR
