"""Outboards in the local store (src/store/outboard.c).

Every blob over 1 MiB gets its BLAKE3 outboard beside it, written in the
pass that hashes it (import, blob put); `blob outboard` reads it back
(the store API snix's send_bao serves); verify checks it byte for byte.
The expected outboard comes from test_bao.py's independent Python tree.
"""
import os
import subprocess

import pytest

from conftest import CASTORE, pattern_bytes, run
from test_bao import Tree

MiB = 1 << 20
GROUP = 16 * 1024


def b3(path):
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


def ob_path(store, hexd):
    return store / "outboards" / hexd[:2] / hexd


@pytest.fixture
def tree(tmp_path):
    t = tmp_path / "tree"
    t.mkdir()
    # Around the threshold: 1 MiB has none, 1 MiB + 1 has one; a size
    # that ends inside a group; a small one.
    for name, size, seed in [("at", MiB, 1), ("over", MiB + 1, 2),
                             ("big", 2 * MiB + 3 * GROUP + 5, 3),
                             ("small", 5000, 4)]:
        (t / name).write_bytes(pattern_bytes(size, seed))
    return t


def test_import_writes_outboards_of_large_blobs(tree, store):
    run(["import", tree], store=store)
    for name in ("at", "over", "big", "small"):
        f = tree / name
        h = b3(f)
        size = f.stat().st_size
        if size > MiB:
            assert ob_path(store, h).read_bytes() == Tree(f.read_bytes()).outboard(), name
        else:
            assert not ob_path(store, h).exists(), name
    assert run(["verify"], store=store).returncode == 0


def test_blob_outboard_reads_stored_or_computes(tree, store):
    run(["import", tree], store=store)
    for name in ("at", "over", "small"):
        f = tree / name
        out = run(["blob", "outboard", b3(f)], store=store).stdout
        assert out == Tree(f.read_bytes()).outboard(), name
    # A large blob whose outboard is gone (a store written before
    # outboards): computed from the blob when asked for.
    h = b3(tree / "over")
    ob_path(store, h).unlink()
    assert run(["verify"], store=store).returncode == 0
    out = run(["blob", "outboard", h], store=store).stdout
    assert out == Tree((tree / "over").read_bytes()).outboard()
    p = run(["blob", "outboard", "00" * 32], store=store, check=False)
    assert p.returncode == 1 and b"not in the store" in p.stderr


def test_blob_put_writes_the_outboard(tmp_path, store):
    f = tmp_path / "f"
    f.write_bytes(pattern_bytes(MiB + 7 * GROUP + 1, 9))
    h = run(["blob", "put", f], store=store).stdout.decode().strip()
    assert h == b3(f)
    assert ob_path(store, h).read_bytes() == Tree(f.read_bytes()).outboard()


@pytest.mark.parametrize("damage", ["flip", "short", "long"])
def test_verify_finds_a_damaged_outboard(tree, store, damage):
    run(["import", tree], store=store)
    h = b3(tree / "big")
    p = ob_path(store, h)
    data = bytearray(p.read_bytes())
    os.chmod(p, 0o644)
    if damage == "flip":
        data[64 * 5 + 3] ^= 1
    elif damage == "short":
        data = data[:-64]
    else:
        data += b"\0" * 64
    p.write_bytes(bytes(data))
    r = run(["verify"], store=store, check=False)
    assert r.returncode == 1
    line = [ln for ln in r.stderr.decode().splitlines() if h in ln]
    assert len(line) == 1, r.stderr
    if damage == "flip":
        assert "outboard differs" in line[0] and "node 5" in line[0]
    else:
        assert "outboard has" in line[0]
    # The blob itself is fine, and the damaged outboard is not served.
    assert run(["blob", "cat", h], store=store).stdout == (tree / "big").read_bytes()
    if damage != "flip":
        assert run(["blob", "outboard", h], store=store, check=False).returncode == 1
