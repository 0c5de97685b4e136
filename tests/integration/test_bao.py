"""The BLAKE3 tree of core/bao checked from outside.

Digests against b3sum; outboards and range proofs against a second
implementation: the pure Python compression function of blake3_py and a
chunk-level tree written here, with the outboard read off
as "every parent node whose subtree holds more than one group's 16 chunks,
in post-order". It shares no code and no group arithmetic with bao.c.
Then flipped bytes: in the data, exactly the group that holds it fails;
in the outboard, exactly the groups under the node that holds it.

The C side runs through tests/core/castore-bao-tool (built beside
castore). Sizes stay small: pure Python compresses some 50k blocks a
second.
"""
import os
import subprocess
from pathlib import Path

import pytest

import blake3_py
from blake3_py import chunk_cv
from conftest import CASTORE, pattern_bytes

TOOL = Path(CASTORE).resolve().parents[2] / "tests" / "core" / "castore-bao-tool"
GROUP = 16 * 1024
CHUNK = 1024
CHUNKS_PER_GROUP = GROUP // CHUNK

# The compression function and chunk chaining values come from
# blake3_py (pure Python, from the BLAKE3 paper); the group tree and the
# outboard order below are this file's own.


class Tree:
    """The chunk-level BLAKE3 tree of one blob, and its outboard nodes."""

    def __init__(self, data):
        self.data = data
        n = max(1, -(-len(data) // CHUNK))
        self.nodes = []  # (post-order index, pre-order index, first chunk, chunks, bytes)
        self.pre = 0
        self.digest = self._cv(0, n, True)

    def _cv(self, first, n, root):
        if n == 1:
            return chunk_cv(self.data[first * CHUNK:(first + 1) * CHUNK], first, root)
        left = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
        above = n > CHUNKS_PER_GROUP
        if above:
            rec = [None, self.pre, first, n, None]
            self.pre += 1
        node = self._cv(first, left, False) + self._cv(first + left, n - left, False)
        if above:
            rec[0] = len(self.nodes)
            rec[4] = node
            self.nodes.append(tuple(rec))
        return blake3_py.parent_cv(node[:32], node[32:], root)

    def outboard(self):
        return b"".join(n[4] for n in self.nodes)  # appended in post-order

    def groups_of(self, node):
        first, n = node[2], node[3]
        return range(first // CHUNKS_PER_GROUP, -(-(first + n) // CHUNKS_PER_GROUP))

    def proof(self, first_group, end_group, outboard=None):
        """Pre-order nodes whose groups meet [first_group, end_group), taken
        from outboard (default: this tree's own) at their post-order place."""
        ob = self.outboard() if outboard is None else outboard
        meet = [n for n in self.nodes
                if self.groups_of(n).start < end_group and self.groups_of(n).stop > first_group]
        return b"".join(ob[n[0] * 64:n[0] * 64 + 64] for n in sorted(meet, key=lambda n: n[1]))


# ---- helpers ----

@pytest.fixture(scope="module", autouse=True)
def _need_tool():
    if not TOOL.exists():
        pytest.fail(f"{TOOL} not built")


# The tool is a short-lived test driver that leaves its buffers to exit;
# LeakSanitizer would fail it for that, not for anything of core/.
TOOL_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")


def tool(*args):
    p = subprocess.run([str(TOOL)] + [str(a) for a in args], capture_output=True,
                       timeout=120, env=TOOL_ENV)
    assert p.returncode in (0, 1), (args, p.returncode, p.stderr[-2000:])
    return p.returncode, p.stdout.decode().strip()


def b3sum(path):
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


def sizes():
    out = [0, 1, 1023, 1024, 1025, 4097]
    for g in range(1, 10):
        out += [g * GROUP - 1, g * GROUP, g * GROUP + 1]
    return out + [16 * GROUP + 1, 33 * GROUP - 1, 33 * GROUP + 1]


def test_digests_and_outboards(tmp_path):
    for size in sizes():
        data = pattern_bytes(size, seed=size % 7)
        f = tmp_path / "blob"
        f.write_bytes(data)
        tree = Tree(data)
        rc, digest = tool("hash", f, tmp_path / "ob")
        assert rc == 0
        assert digest == b3sum(f) == tree.digest.hex(), size
        ob = (tmp_path / "ob").read_bytes()
        groups = max(1, -(-size // GROUP))
        assert len(ob) == (groups - 1) * 64, size
        assert ob == tree.outboard(), size
        rc, out = tool("verify-outboard", digest, size, tmp_path / "ob")
        assert (rc, out) == (0, "ok"), size


def _ranges(groups):
    for first in range(groups):
        for span in (1, 2, 3, groups):
            if first + span <= groups:
                yield first, first + span


def test_range_proofs_match_and_verify(tmp_path):
    for size in (6 * GROUP + 100, 9 * GROUP, 17 * GROUP + 1):
        data = pattern_bytes(size, seed=3)
        blob = tmp_path / "blob"
        blob.write_bytes(data)
        tree = Tree(data)
        groups = -(-size // GROUP)
        for a, b in _ranges(groups):
            off, end = a * GROUP, min(b * GROUP, size)
            proof = tmp_path / "proof"
            rc, _ = tool("proof", blob, off, end - off, proof)
            assert rc == 0
            assert proof.read_bytes() == tree.proof(a, b), (size, a, b)
            part = tmp_path / "part"
            part.write_bytes(data[off:end])
            rc, out = tool("verify-range", tree.digest.hex(), size, off, end - off, proof, part)
            assert (rc, out) == (0, "ok"), (size, a, b)
        # Not a range: unaligned start, past the end.
        rc, out = tool("verify-range", tree.digest.hex(), size, 1, GROUP, proof, part)
        assert rc == 1 and out.startswith("refused")


def test_flipped_data_byte_fails_its_group_alone(tmp_path):
    size = 9 * GROUP + 500
    data = bytearray(pattern_bytes(size, seed=5))
    tree = Tree(bytes(data))
    groups = -(-size // GROUP)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    ob = tmp_path / "ob"
    tool("hash", blob, ob)
    for bad in (0, 4, groups - 1):
        corrupt = bytearray(data)
        corrupt[bad * GROUP + 77] ^= 0x10
        whole = tmp_path / "whole"
        whole.write_bytes(corrupt)
        assert tool("verify-groups", tree.digest.hex(), size, ob, 0, whole) == (1, f"bad group {bad}")
        for g in range(groups):
            off, end = g * GROUP, min((g + 1) * GROUP, size)
            proof, part = tmp_path / "proof", tmp_path / "part"
            proof.write_bytes(tree.proof(g, g + 1))
            part.write_bytes(corrupt[off:end])
            rc, out = tool("verify-range", tree.digest.hex(), size, off, end - off, proof, part)
            assert (rc, out) == ((1, f"bad group {g}") if g == bad else (0, "ok")), (bad, g)


def test_flipped_outboard_byte_fails_the_groups_under_its_node(tmp_path):
    size = 11 * GROUP + 1
    data = pattern_bytes(size, seed=9)
    tree = Tree(data)
    groups = -(-size // GROUP)
    good = tree.outboard()
    for node in tree.nodes:
        for half in (0, 32):  # a byte of the left child's value, of the right's
            ob = bytearray(good)
            ob[node[0] * 64 + half + 5] ^= 0x01
            path = tmp_path / "ob"
            path.write_bytes(ob)
            rc, _ = tool("verify-outboard", tree.digest.hex(), size, path)
            assert rc == 1
            under = tree.groups_of(node)
            for g in range(groups):
                off, end = g * GROUP, min((g + 1) * GROUP, size)
                proof, part = tmp_path / "proof", tmp_path / "part"
                proof.write_bytes(tree.proof(g, g + 1, bytes(ob)))
                part.write_bytes(data[off:end])
                rc, out = tool("verify-range", tree.digest.hex(), size, off, end - off, proof, part)
                want = (1, f"bad group {g}") if g in under else (0, "ok")
                assert (rc, out) == want, (node[:4], half, g)


def test_chunk_list_adds_up_and_names_chunks(tmp_path):
    blob = tmp_path / "blob"
    # Not periodic, or content-defined cuts would follow the period.
    data = b"".join(Path(p).read_bytes() for p in sorted(Path("/usr/include").glob("*.h")))[:3 << 20]
    blob.write_bytes(data)
    rc, out = tool("chunks", blob)
    assert rc == 0
    off = 0
    lines = out.splitlines()
    assert len(lines) >= 3
    for i, line in enumerate(lines):
        hexd, n = line.split()
        n = int(n)
        assert n <= 1 << 20 and (n >= 64 << 10 or i == len(lines) - 1)
        piece = tmp_path / "piece"
        piece.write_bytes(data[off:off + n])
        assert hexd == b3sum(piece)
        off += n
    assert off == len(data)
