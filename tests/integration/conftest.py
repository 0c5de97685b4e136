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
