"""castore gc: reclaim, grace, dry run, writers and readers beside it,
SIGKILL, and the leftovers of crashed writers (docs/design.md, "Writers
and gc")."""
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from blake3_py import blake3
from conftest import CASTORE, copy_tree, pattern_bytes, run
from test_mount import Mount


def make_tree(path, seed, smalls=0):
    """A tree with a big and a small file of its own, `smalls` more small
    files of its own (2 KiB each, packed) and shared big and small ones."""
    (path / "own").mkdir(parents=True)
    (path / "own" / "big.bin").write_bytes(pattern_bytes(300000, seed))
    (path / "own" / "small.txt").write_bytes(pattern_bytes(700, seed))
    for i in range(smalls):
        (path / "own" / f"s{i}").write_bytes(
            seed.to_bytes(2, "little") + i.to_bytes(4, "little") + pattern_bytes(2042, i))
    (path / "shared").mkdir()
    for i in range(40):
        (path / "shared" / f"t{i}").write_bytes(i.to_bytes(4, "little") + pattern_bytes(3000, 7))
    (path / "shared.bin").write_bytes(pattern_bytes(200000, 250))
    return path


def digest(data):
    return blake3(data).hex()


def gc(store, *args, check=True):
    p = run(["gc", "--json"] + list(args), store=store, check=check)
    return json.loads(p.stdout) if p.returncode == 0 else p


def has_blob(store, hexd):
    return run(["blob", "stat", hexd], store=store, check=False).returncode == 0


def store_state(store):
    """Every file of the store with its size and mtime (but LMDB's lock
    file, which any open touches)."""
    state = {}
    for root, _, files in os.walk(store):
        for f in files:
            if f == "lock.mdb":
                continue
            st = os.lstat(os.path.join(root, f))
            state[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return state


def usage(store):
    """Bytes the store's objects take on disk: blob files and packs (LMDB's
    file keeps its freed pages for reuse, so it is left out)."""
    total = 0
    for sub in ("blobs", "packs"):
        for root, _, files in os.walk(store / sub):
            total += sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for f in files)
    return total


def same_tree(a, b):
    subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], check=True)


def test_gc_reclaims_what_only_a_removed_root_reached(tmp_path):
    store = tmp_path / "store"
    a = make_tree(tmp_path / "a", 1, smalls=300)
    b = make_tree(tmp_path / "b", 2)
    run(["import", a, "--name", "a"], store=store)
    run(["import", b, "--name", "b"], store=store)
    own_big = digest(pattern_bytes(300000, 1))
    own_small = digest(pattern_bytes(700, 1))
    shared_big = digest(pattern_bytes(200000, 250))
    shared_small = digest((3).to_bytes(4, "little") + pattern_bytes(3000, 7))
    assert all(has_blob(store, d) for d in (own_big, own_small, shared_big, shared_small))
    got = gc(store, "--grace", "0")
    assert got["objects"] == 0, got
    run(["roots", "rm", "a"], store=store)
    got = gc(store, "--grace", "0")
    # a's big file, its 301 small ones and its two Directories.
    assert got["blob_files"] == 1 and got["small_blobs"] == 301, got
    assert got["directories"] == 2, got
    # a's pack held its own small files and the shared ones: mostly dead,
    # so it was rewritten.
    assert got["packs_rewritten"] == 1, got
    assert not has_blob(store, own_big) and not has_blob(store, own_small)
    assert has_blob(store, shared_big) and has_blob(store, shared_small)
    run(["verify"], store=store)
    out = tmp_path / "out"
    run(["export", "b", out], store=store)
    same_tree(b, out)
    fresh = tmp_path / "fresh"
    run(["import", b, "--name", "b"], store=fresh)
    assert usage(store) <= 1.3 * usage(fresh), (usage(store), usage(fresh))
    again = gc(store, "--grace", "0")
    assert again["objects"] == 0 and again["packs_rewritten"] == 0, again


def test_gc_grace_keeps_young_objects(tmp_path):
    store = tmp_path / "store"
    run(["import", make_tree(tmp_path / "a", 1), "--name", "a"], store=store)
    run(["roots", "rm", "a"], store=store)
    lone = pattern_bytes(5000, 9)
    hexd = run(["blob", "put", "-"], store=store, input=lone).stdout.decode().split()[0]
    got = gc(store)  # the default grace: an hour
    assert got["objects"] == 0 and got["kept_young"] > 0, got
    got = gc(store, "--grace", "2h")
    assert got["objects"] == 0, got
    assert has_blob(store, hexd)
    got = gc(store, "--grace", "0")
    assert got["blob_files"] >= 2 and got["directories"] == 3, got
    assert not has_blob(store, hexd)
    p = run(["gc", "--grace", "soon"], store=store, check=False)
    assert p.returncode == 2 and p.stderr.decode().startswith("castore gc: "), p.stderr


def test_gc_dry_run_counts_and_changes_nothing(tmp_path):
    store = tmp_path / "store"
    for name, seed in (("a", 1), ("b", 2)):
        run(["import", make_tree(tmp_path / name, seed), "--name", name], store=store)
    run(["roots", "rm", "a"], store=store)
    (store / "tmp" / "99999999.1.1").write_bytes(b"x" * 1234)  # a dead writer's
    before = store_state(store)
    dry = gc(store, "--dry-run", "--grace", "0")
    assert dry["dry_run"] is True
    assert dry["blob_files"] == 1 and dry["small_blobs"] == 1, dry
    assert dry["directories"] == 2 and dry["tmp_files"] == 1, dry
    line = run(["gc", "--dry-run", "--grace", "0"], store=store).stdout.decode()
    assert "would remove 4 objects" in line, line
    assert store_state(store) == before
    real = gc(store, "--grace", "0")
    assert real["dry_run"] is False
    for k in ("objects", "bytes", "blob_files", "small_blobs", "directories", "tmp_files"):
        assert real[k] == dry[k], (k, real, dry)
    assert not (store / "tmp" / "99999999.1.1").exists()
    line = run(["gc", "--grace", "0"], store=store).stdout.decode()
    assert line.startswith(f"{store}: removed 0 objects") and line.endswith(" s\n"), line
    run(["verify"], store=store)


def test_gc_open_file_survives_its_root_being_collected(tmp_path):
    store = tmp_path / "store"
    a = make_tree(tmp_path / "a", 1, smalls=5)
    run(["import", a, "--name", "a"], store=store)
    m = Mount(store, tmp_path / "mnt", [], tmp_path)
    try:
        big = open(m.path / "a" / "own" / "big.bin", "rb")
        small = open(m.path / "a" / "own" / "s3", "rb")
        run(["roots", "rm", "a"], store=store)
        got = gc(store, "--grace", "0")
        assert got["blob_files"] == 2 and got["small_blobs"] >= 6, got
        assert big.read() == (a / "own" / "big.bin").read_bytes()
        assert small.read() == (a / "own" / "s3").read_bytes()
        big.close()
        small.close()
    finally:
        m.close()
    run(["verify"], store=store)


def test_gc_leftovers_of_a_killed_import_go(tmp_path):
    store = tmp_path / "store"
    src = copy_tree("/usr/share/doc", tmp_path / "doc")
    run(["import", make_tree(tmp_path / "k", 3), "--name", "keep"], store=store)
    p = subprocess.Popen([CASTORE, "--store", str(store), "import", str(src), "--name", "doc"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        staged = [n for n in os.listdir(store / "tmp") if n[0].isdigit()]
        if staged:
            break
        time.sleep(0.001)
    p.kill()
    assert p.wait() == -signal.SIGKILL
    got = gc(store)  # whatever the grace: their writer is gone
    left = [n for n in os.listdir(store / "tmp")]
    assert left == [], (left, got)
    run(["verify"], store=store)
    run(["import", src, "--name", "doc"], store=store)
    run(["verify"], store=store)


def test_gc_leftovers_of_an_enospc_import_go(tmp_path):
    t = tmp_path / "small"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(t)], check=True)
    try:
        store = t / "store"
        run(["import", make_tree(tmp_path / "k", 3), "--name", "keep"], store=store)
        big = tmp_path / "big"
        big.mkdir()
        for i in range(3000):  # 12 MB of small files: packed, until ENOSPC
            (big / f"f{i}").write_bytes(i.to_bytes(4, "little") + pattern_bytes(4000, i % 251))
        p = run(["import", big, "--name", "big"], store=store, check=False)
        assert p.returncode == 1, p
        before = usage(store)
        got = gc(store, "--grace", "0")
        assert got["packs_removed"] + got["packs_truncated"] >= 1, got
        assert usage(store) < before - 4000000, (usage(store), before, got)
        assert [n for n in os.listdir(store / "tmp")] == []
        run(["verify"], store=store)
        run(["import", make_tree(tmp_path / "k2", 4), "--name", "k2"], store=store)
        run(["verify"], store=store)
    finally:
        subprocess.run(["umount", "-l", str(t)], check=False)


def test_gc_killed_at_random_moments_leaves_a_store_verify_accepts(tmp_path):
    store = tmp_path / "store"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        run(["import", make_tree(tmp_path / name, seed, smalls=200), "--name", name], store=store)
    run(["roots", "rm", "a"], store=store)
    run(["roots", "rm", "b"], store=store)
    rnd = random.Random(14)
    for _ in range(8):
        p = subprocess.Popen([CASTORE, "--store", str(store), "gc", "--grace", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.random() * 0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        run(["verify"], store=store)
    gc(store, "--grace", "0")
    run(["verify"], store=store)
    assert gc(store, "--grace", "0")["objects"] == 0
    out = tmp_path / "out"
    run(["export", "c", out], store=store)
    same_tree(tmp_path / "c", out)


def gc_loop(store, stop, errors):
    while not stop.is_set():
        p = run(["gc", "--grace", "0"], store=store, check=False)
        if p.returncode != 0:
            errors.append(p.stderr.decode())


def test_gc_beside_reimports_of_the_tree_it_collects(tmp_path):
    store = tmp_path / "store"
    src = make_tree(tmp_path / "t", 5, smalls=200)
    stop, errors = threading.Event(), []
    th = threading.Thread(target=gc_loop, args=(store, stop, errors))
    run(["import", src, "--name", "t"], store=store)
    th.start()
    try:
        for i in range(6):
            run(["roots", "rm", "t"], store=store)
            run(["import", src, "--name", "t"], store=store)
            out = tmp_path / f"out{i}"
            run(["export", "t", out], store=store)
            same_tree(src, out)
    finally:
        stop.set()
        th.join()
    assert errors == []
    run(["verify"], store=store)


def test_gc_beside_imports_removals_and_a_mount(tmp_path):
    """About half a minute of imports under rotating names, removals of
    old ones, gc in a loop and a mount reading a kept root."""
    store = tmp_path / "store"
    keep = make_tree(tmp_path / "keep", 9, smalls=50)
    trees = [make_tree(tmp_path / f"t{i}", 10 + i, smalls=100) for i in range(3)]
    run(["import", keep, "--name", "keep"], store=store)
    m = Mount(store, tmp_path / "mnt", [], tmp_path)
    stop, errors = threading.Event(), []

    def reader():
        files = sorted(p for p in keep.rglob("*") if p.is_file())
        while not stop.is_set():
            for f in files:
                rel = f.relative_to(keep)
                if (m.path / "keep" / rel).read_bytes() != f.read_bytes():
                    errors.append(f"mount served wrong bytes for {rel}")

    gcs = threading.Thread(target=gc_loop, args=(store, stop, errors))
    rd = threading.Thread(target=reader)
    gcs.start()
    rd.start()
    try:
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            src = trees[n % 3]
            run(["import", src, "--name", f"r{n}"], store=store)
            out = tmp_path / f"out{n}"
            run(["export", f"r{n}", out], store=store)
            same_tree(src, out)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            if n >= 2:
                run(["roots", "rm", f"r{n - 2}"], store=store)
            n += 1
    finally:
        stop.set()
        gcs.join()
        rd.join()
        m.close()
    assert errors == [], errors[:5]
    assert n >= 3
    run(["verify"], store=store)


def test_gc_published_keeps_a_replaced_roots_file_for_the_grace(tmp_path):
    from test_remote import Nginx
    store, pub = tmp_path / "store", tmp_path / "pub"
    t1 = make_tree(tmp_path / "t1", 1, smalls=20)
    t2 = make_tree(tmp_path / "t2", 2, smalls=20)
    run(["import", t1, "--name", "t"], store=store)
    run(["publish", pub], store=store)
    run(["import", t2, "--name", "t"], store=store)
    run(["publish", pub, "t"], store=store)  # replaces t: t1 is history
    own1 = digest(pattern_bytes(300000, 1))
    own2 = digest(pattern_bytes(300000, 2))
    assert (pub / "blobs" / own1[:2] / own1).exists()
    # Within the grace, what the replaced roots file reached stays.
    got = gc(store, "--published", pub)
    assert got["objects"] == 0, got
    dry = gc(store, "--published", pub, "--grace", "0", "--dry-run")
    assert dry["blob_files"] >= 1 and dry["directories"] == 2, dry
    assert (pub / "blobs" / own1[:2] / own1).exists()
    real = gc(store, "--published", pub, "--grace", "0")
    for k in ("objects", "bytes", "blob_files", "directories", "packs_removed"):
        assert real[k] == dry[k], (k, real, dry)
    assert not (pub / "blobs" / own1[:2] / own1).exists()
    assert (pub / "blobs" / own2[:2] / own2).exists()
    assert gc(store, "--published", pub, "--grace", "0")["objects"] == 0
    # What is left serves t2 whole.
    n = Nginx(pub, tmp_path / "nginx")
    try:
        out = tmp_path / "out"
        run(["--cache", tmp_path / "cache", "export", "t", out], store=n.url)
        same_tree(t2, out)
    finally:
        n.stop()


def test_bounded_cache_packs_and_keeps_its_bound(tmp_path):
    """A published tree four times larger than a bounded cache, mostly
    small files: the cache packs them and evicts whole packs."""
    from test_remote import Nginx
    store, pub = tmp_path / "store", tmp_path / "pub"
    src = tmp_path / "src"
    src.mkdir()
    for d in range(8):
        (src / f"d{d}").mkdir()
        for i in range(125):  # 1000 files of 8 KiB: 8 MB
            (src / f"d{d}" / f"f{i}").write_bytes(
                bytes([d, i]) + pattern_bytes(8190, (d * 125 + i) % 251))
    (src / "big").write_bytes(pattern_bytes(1 << 20, 3))
    run(["import", src, "--name", "t"], store=store)
    run(["publish", pub], store=store)
    bound = 2 << 20
    n = Nginx(pub, tmp_path / "nginx")
    cache = tmp_path / "cache"
    try:
        out = tmp_path / "out"
        run(["--cache", cache, "--cache-max", str(bound), "export", "t", out], store=n.url)
        same_tree(src, out)
    finally:
        n.stop()
    assert list((cache / "packs").iterdir()), "the bounded cache packed nothing"
    assert usage(cache) <= 1.1 * bound, usage(cache)


def test_gc_removes_a_collected_blobs_outboard_and_keeps_the_others(tmp_path):
    """A blob over 1 MiB has its outboard beside it (outboards/ab/<hex>):
    collecting the blob takes the outboard too; a kept blob keeps its."""
    store = tmp_path / "store"
    for name, seed in (("gone", 3), ("kept", 4)):
        t = tmp_path / name
        t.mkdir()
        (t / "large.bin").write_bytes(pattern_bytes(2 * 1024 * 1024 + 5, seed))
        run(["import", t, "--name", name], store=store)
    gone = digest(pattern_bytes(2 * 1024 * 1024 + 5, 3))
    kept = digest(pattern_bytes(2 * 1024 * 1024 + 5, 4))
    ob = {d: store / "outboards" / d[:2] / d for d in (gone, kept)}
    assert ob[gone].exists() and ob[kept].exists()
    run(["roots", "rm", "gone"], store=store)
    got = gc(store, "--grace", "0")
    assert got["blob_files"] == 1, got
    assert not has_blob(store, gone) and not ob[gone].exists()
    assert has_blob(store, kept) and ob[kept].exists()
    run(["verify"], store=store)
