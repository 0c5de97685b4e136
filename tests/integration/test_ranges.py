"""Large remote blobs by range: `castore publish` writes outboards beside
large blobs, and a cache reads them by Range GETs from a real nginx,
each range verified against the outboard and the digest before use
(docs/remote.md, "Large blobs by range").

nginx's access log counts the bytes it sent; a flipped byte in the
published blob fails its range alone; an outage fails reads and they
work again after; the cache verifies what it holds and no more.
"""
import errno
import os
import re
import subprocess
import time

import pytest

from conftest import run
from test_remote import Nginx, try_mount, unmount

MiB = 1 << 20
GROUP = 16 * 1024
BIG = 64 * MiB


def big_bytes(n=BIG):
    # BLAKE3's i % 251 pattern, built by repetition (fast).
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def b3(path):
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def layout(tmp_path):
    """A store with root t (big: 64 MiB, small: 5 bytes), published."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(big_bytes())
    (tree / "small").write_bytes(b"small")
    store = tmp_path / "store"
    run(["import", tree, "--name", "t"], store=store)
    pub = tmp_path / "pub"
    run(["publish", pub], store=store)
    return tree, store, pub, b3(tree / "big")


@pytest.fixture
def server(tmp_path, layout):
    n = Nginx(layout[2], tmp_path / "nginx")
    yield n
    n.stop()


def sent(nginx, what="/blobs/"):
    """Bytes nginx sent for requests whose path has `what`, and statuses."""
    total, statuses = 0, []
    for line in nginx.requests().splitlines():
        m = re.search(r'"GET (\S+) [^"]*" (\d+) (\d+)', line)
        if m and what in m.group(1):
            statuses.append(int(m.group(2)))
            total += int(m.group(3))
    return total, statuses


def sent_when(nginx, what, done):
    """sent(), once done(bytes, statuses) holds: nginx logs a request
    after its last byte went out, so a reader may see its bytes before
    the log line exists (waits at most 20 s, then returns what is
    there)."""
    deadline = time.monotonic() + 20
    while True:
        got = sent(nginx, what)
        if done(*got) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


@pytest.fixture
def mounted(tmp_path, server):
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    p = try_mount(server.url, mnt, cache=cache)
    if p is None:
        pytest.skip("castore mount does not work here")
    yield mnt, cache
    unmount(p, mnt)


def pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_publish_writes_outboards_beside_large_blobs(layout):
    tree, store, pub, h = layout
    assert (pub / "blobs" / h[:2] / h).read_bytes() == big_bytes()
    ob = (pub / "outboards" / h[:2] / h).read_bytes()
    assert ob == run(["blob", "outboard", h], store=store).stdout
    assert len(ob) == (BIG // GROUP - 1) * 64
    small = b3(tree / "small")
    assert not (pub / "outboards" / small[:2] / small).exists()
    # A layout without it (an older castore's): read whole, as before.


def test_mount_reads_4k_of_a_large_file_lazily(mounted, server, layout):
    mnt, cache = mounted
    h = layout[3]
    data = big_bytes()
    off = 32 * MiB
    assert pread(mnt / "t" / "big", off, 4096) == data[off:off + 4096]
    ob_bytes, _ = sent_when(server, "/outboards/", lambda b, st: st)
    blob_bytes, statuses = sent_when(server, "/blobs/" + h[:2], lambda b, st: st)
    assert ob_bytes == (BIG // GROUP - 1) * 64
    # The range (plus the kernel's readahead), never the file.
    assert 0 < blob_bytes <= 4 * MiB, blob_bytes
    assert statuses and set(statuses) == {206}
    # Another range of the same file: only its groups come.
    assert pread(mnt / "t" / "big", 5 * MiB + 100, 10) == data[5 * MiB + 100:5 * MiB + 110]
    n = len(statuses)
    total, statuses = sent_when(server, "/blobs/" + h[:2], lambda b, st: len(st) > n)
    assert len(statuses) > n and total <= 8 * MiB
    # What the cache holds verifies; what it never fetched is no problem.
    r = run(["verify"], store=cache, check=False)
    assert r.returncode == 0, r.stderr


def test_sequential_read_and_export_fetch_everything_once(tmp_path, mounted, server, layout):
    mnt, cache = mounted
    with open(mnt / "t" / "big", "rb") as f:
        assert f.read() == big_bytes()
    # Readahead fetched ahead of the reader, each byte once.
    h = layout[3]
    assert sent_when(server, "/blobs/" + h[:2], lambda b, st: b >= BIG)[0] == BIG
    # A fresh cache's export fetches the whole blob in parallel ranges;
    # the blob is then whole in the cache, and the cache verifies.
    out, cache2 = tmp_path / "out", tmp_path / "cache2"
    run(["--cache", cache2, "export", "t", out], store=server.url)
    assert (out / "big").read_bytes() == big_bytes()
    assert (cache2 / "blobs" / h[:2] / h).stat().st_size == BIG
    assert run(["verify"], store=cache2).returncode == 0


def test_flipped_byte_fails_its_range_alone(tmp_path, layout, server):
    tree, store, pub, h = layout
    blob = pub / "blobs" / h[:2] / h
    bad = 40 * MiB + 3 * GROUP + 17
    with open(blob, "r+b") as f:
        f.seek(bad)
        b = f.read(1)
        f.seek(bad)
        f.write(bytes([b[0] ^ 1]))
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    p = try_mount(server.url, mnt, cache=cache)
    if p is None:
        pytest.skip("castore mount does not work here")
    try:
        data = big_bytes()
        # (A read that starts in a good group before it ends short at
        # the bad one, as reads do.)
        with pytest.raises(OSError) as e:
            pread(mnt / "t" / "big", bad - 5, 10)
        assert e.value.errno == errno.EIO
        assert pread(mnt / "t" / "big", bad - 100, 200) == data[bad - 100:bad - 17]
        # The groups around it read (the one before, the one after).
        g = bad // GROUP * GROUP
        assert pread(mnt / "t" / "big", g - 4096, 4096) == data[g - 4096:g]
        assert pread(mnt / "t" / "big", g + GROUP, 4096) == data[g + GROUP:g + GROUP + 4096]
        assert pread(mnt / "t" / "big", MiB, 4096) == data[MiB:MiB + 4096]
    finally:
        unmount(p, mnt)
    assert h in p.stderr.read().decode()
    # The bad group was never written: the cache verifies.
    r = run(["verify"], store=cache, check=False)
    assert r.returncode == 0, r.stderr


def test_outage_fails_reads_then_they_work_again(tmp_path, mounted, server):
    mnt, cache = mounted
    data = big_bytes()
    assert pread(mnt / "t" / "big", 0, 4096) == data[:4096]
    server.stop()
    with pytest.raises(OSError) as e:
        pread(mnt / "t" / "big", 50 * MiB, 4096)
    assert e.value.errno == errno.EIO
    # What is cached still reads.
    assert pread(mnt / "t" / "big", 0, 4096) == data[:4096]
    server.start()
    assert pread(mnt / "t" / "big", 50 * MiB, 4096) == data[50 * MiB:50 * MiB + 4096]


def test_cache_verify_checks_the_ranges_it_holds(tmp_path, server, layout):
    h = layout[3]
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    p = try_mount(server.url, mnt, cache=cache)
    if p is None:
        pytest.skip("castore mount does not work here")
    off = 20 * MiB
    try:
        assert pread(mnt / "t" / "big", off, 4096) == big_bytes()[off:off + 4096]
    finally:
        unmount(p, mnt)
    # The cache knows it is one; the partial blob's record names what it
    # fetched (written when the cache closed), which verifies.
    assert (cache / "castore-cache").exists()
    part = cache / "partial" / h
    assert (cache / "partial" / (h + ".ranges")).stat().st_size > 0
    r = run(["verify"], store=cache, check=False)
    assert r.returncode == 0, r.stderr
    with open(part, "r+b") as f:
        f.seek(off + 5)
        b = f.read(1)
        f.seek(off + 5)
        f.write(bytes([b[0] ^ 1]))
    r = run(["verify"], store=cache, check=False)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.decode().splitlines() if h in ln]
    assert len(lines) == 1 and f"group {off // GROUP} " in lines[0], r.stderr


def test_gc_collects_partial_blobs_no_root_reaches(tmp_path, server, layout):
    """gc of a cache: a partial blob its roots reach stays; once none
    does, it goes with its range record and outboard after the grace;
    a dry run only counts it."""
    h = layout[3]
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    p = try_mount(server.url, mnt, cache=cache)
    if p is None:
        pytest.skip("castore mount does not work here")
    try:
        assert pread(mnt / "t" / "big", 7 * MiB, 4096) == big_bytes()[7 * MiB:7 * MiB + 4096]
    finally:
        unmount(p, mnt)
    part, rec = cache / "partial" / h, cache / "partial" / (h + ".ranges")
    ob = cache / "outboards" / h[:2] / h
    assert part.exists() and rec.exists() and ob.exists()
    import json

    def gc(*args):
        return json.loads(run(["gc", "--json", *args], store=cache).stdout)

    # Reached from a root of the cache: kept, whatever the grace.
    name, kind, digest, size = run(["roots", "list"], store=layout[1]).stdout.decode().split()[:4]
    run(["roots", "add", name, f"--{kind}", digest, "--size", size], store=cache)
    assert gc("--grace", "0")["partial_blobs"] == 0
    assert part.exists() and rec.exists() and ob.exists()
    run(["roots", "rm", name], store=cache)
    # Counted, not removed, by a dry run; young ones stay.
    got = gc("--grace", "0", "--dry-run")
    assert got["partial_blobs"] == 1 and got["partial_bytes"] >= GROUP, got
    assert gc()["partial_blobs"] == 0 and part.exists()
    got = gc("--grace", "0")
    assert got["partial_blobs"] == 1, got
    assert not part.exists() and not rec.exists() and not ob.exists()
    r = run(["verify"], store=cache, check=False)
    assert r.returncode == 0, r.stderr
