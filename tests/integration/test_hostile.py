"""Bytes that lie and shapes that are extreme: flipped bytes in blob files
and packs must never leave `cat` or `export` with exit 0, a chain of
200,000 folders exports with a handful of fds, and an error line that
would be too long keeps its reason."""
import os
import resource
import stat
import subprocess

import pytest

from blake3_py import blake3
from conftest import CASTORE, flip_in, pattern_bytes, run

grpc = pytest.importorskip("grpc")


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def chain_directory(child, size):
    """Directory { directories: [DirectoryNode(name "d", child, size)] }."""
    node = field(1, b"d") + field(2, child)
    if size:  # canonical proto3: a default value is left out
        node += varint(3 << 3) + varint(size)
    return field(1, node)


@pytest.fixture
def damaged(tmp_path, castore, store):
    """A store with one large blob (a file of its own) and one small one
    (in a pack), each with one flipped byte."""
    t = tmp_path / "t"
    t.mkdir()
    big, small = pattern_bytes(300_000, 1), pattern_bytes(5000, 2)
    (t / "big").write_bytes(big)
    (t / "small").write_bytes(small)
    castore("import", t, "--name", "t")
    files = [p for p in (store / "blobs").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].stat().st_size == len(big)
    flip_in(files[0], 123_456)
    packs = list((store / "packs").glob("*.pack"))
    assert len(packs) == 1
    data = packs[0].read_bytes()
    at = data.find(small[1000:1100])
    assert at >= 0
    flip_in(packs[0], at + 10)
    return {"big": (blake3(big).hex(), big), "small": (blake3(small).hex(), small)}


def one_error_line(p, hexd):
    lines = p.stderr.decode().strip().split("\n")
    assert len(lines) == 1, p.stderr
    assert hexd in lines[0] and "does not match its digest" in lines[0], lines
    assert p.returncode == 1


@pytest.mark.parametrize("which", ["big", "small"])
def test_cat_refuses_flipped_bytes(damaged, castore, store, tmp_path, which):
    hexd, good = damaged[which]
    p = castore("cat", f"t/{which}", check=False)
    one_error_line(p, hexd)
    # Written to a regular file, what was written is cut off again.
    out = tmp_path / "out"
    with open(out, "wb") as f:
        f.write(b"before\n")
        f.flush()
        p = subprocess.run([CASTORE, "--store", str(store), "cat", f"t/{which}"],
                           stdout=f, stderr=subprocess.PIPE)
    one_error_line(p, hexd)
    assert out.read_bytes() == b"before\n"
    p = castore("blob", "cat", hexd, check=False)
    one_error_line(p, hexd)


@pytest.mark.parametrize("which", ["big", "small"])
def test_export_refuses_flipped_bytes(damaged, castore, tmp_path, which):
    hexd, good = damaged[which]
    dest = tmp_path / "dest"
    p = castore("export", f"t/{which}", dest, check=False)
    one_error_line(p, hexd)
    assert not dest.exists()
    dest2 = tmp_path / "dest2"
    p = castore("export", "t", dest2, check=False)
    assert p.returncode == 1 and b"does not match its digest" in p.stderr
    # The first bad file ends the export; no file that was left is bad.
    for name, (_, content) in damaged.items():
        f = dest2 / name
        assert not f.exists() or f.read_bytes() == content


def test_deep_chain_exports_with_few_fds(tmp_path, castore, store):
    """200,000 nested folders: put through castore serve's gRPC Put (one
    leaves-first stream), then verify and export them with at most 64
    open files, under the sanitizer build when the suite runs it."""
    levels = 200_000
    empty = blake3(b"")
    digests, msgs = [empty], [b""]
    for i in range(1, levels + 1):
        m = chain_directory(digests[-1], i - 1)
        msgs.append(m)
        digests.append(blake3(m))
    castore("dir", "put", input=b"")
    srv = subprocess.Popen([CASTORE, "--store", str(store), "serve", "--listen",
                            "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = srv.stdout.readline().decode()
        assert line.startswith("listening on "), line
        with grpc.insecure_channel(line.split()[-1]) as ch:
            put = ch.stream_unary("/tvix.castore.v1.DirectoryService/Put",
                                  lambda b: b, lambda b: b)
            resp = put(iter(msgs[1:]), timeout=600)
        assert resp == field(1, digests[-1])
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        srv.stdout.close()
        srv.stderr.close()
    castore("roots", "add", "chain", "--directory", digests[-1].hex(),
            "--size", str(levels))
    castore("verify")

    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    dest = tmp_path / "out"
    p = run(["export", "chain", dest], store=store, preexec_fn=few_fds, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    # Walk down with one fd at a time: exactly `levels` folders, the last
    # empty; then back up, removing them (rm -r and pytest's own clean-up
    # recurse, which a chain this deep defeats or makes slow).
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while True:
            names = os.listdir(fd)
            if not names:
                break
            assert names == ["d"]
            st = os.stat("d", dir_fd=fd, follow_symlinks=False)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            depth += 1
        assert depth == levels
        for _ in range(depth):
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir("d", dir_fd=fd)
    finally:
        os.close(fd)
    assert os.listdir(dest) == []


def test_long_error_line_keeps_its_reason(tmp_path, castore):
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(b"x")
    castore("import", t, "--name", "t")
    dest = tmp_path.joinpath(*["n" * 200] * 15, "out")  # parents missing
    p = castore("export", "t", dest, check=False)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert err.count("\n") == 1 and len(err) <= 2048, err
    assert " ... " in err and err.rstrip().endswith("No such file or directory"), err


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_damaged_data_mdb_is_one_line(tmp_path, castore, store, damage):
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(pattern_bytes(100))
    castore("import", t, "--name", "t")
    db = store / "data.mdb"
    size = db.stat().st_size
    assert size > 8192
    if damage == "truncated":
        os.truncate(db, 8192)
    elif damage == "empty":
        os.truncate(db, 0)
    else:
        db.write_bytes(pattern_bytes(65536, 7))
    before = db.read_bytes()
    for args in (["verify"], ["ls", "t"], ["cat", "t/f"], ["import", t, "--name", "u"],
                 ["roots", "list"]):
        p = castore(*args, check=False)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        lines = p.stderr.decode().strip().split("\n")
        assert len(lines) == 1, (args, lines)
        assert f"store {store}: data.mdb is corrupt (" in lines[0], lines
    assert db.read_bytes() == before  # nothing wrote over it


def test_killed_publish_leaves_nothing_in_the_tree(tmp_path, castore, store):
    """A SIGKILLed publish leaves its unnamed files outside the published
    tree (never under DIR, which a web server serves), and the next
    publish removes them at once and completes. Data: /usr/share/doc."""
    import signal
    import time
    from test_remote import publish_leftovers
    castore("import", "/usr/share/doc", "--name", "doc")
    pub = tmp_path / "pub"
    pub.mkdir()
    st = pub.stat()
    work = pub.parent / f".castore-publish.{st.st_dev:x}.{st.st_ino:x}"
    killed_mid_group = 0
    for _ in range(3):
        p = subprocess.Popen([CASTORE, "--store", str(store), "publish", str(pub)],
                             stderr=subprocess.PIPE)
        # Kill it once it has files waiting to be named.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if work.exists() and any(f.is_file() and f.suffix != ".lock"
                                     for f in work.rglob("*")):
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        killed_mid_group += bool(publish_leftovers(pub))
        assert not (pub / "roots").exists() or p.returncode == 0
        # Under DIR only the layout's folders, each name holding its bytes.
        assert {x.name for x in pub.iterdir()} <= {
            "blobs", "outboards", "directories", "packs", "roots", "trees"}
    assert killed_mid_group > 0
    castore("publish", pub)
    assert publish_leftovers(pub) == []
    assert (pub / "roots").read_text().count("\ndoc\t") == 1


def test_store_whose_creation_was_cut(tmp_path, castore, store):
    """An empty data.mdb in a store holding nothing else is what a writer
    killed while creating it leaves: readers find no store yet, a writer
    starts it afresh."""
    for sub in ("blobs", "packs", "tmp"):
        (store / sub).mkdir(parents=True)
    (store / "data.mdb").write_bytes(b"")
    p = castore("roots", "list", check=False)
    assert p.returncode == 1 and b"no store here yet" in p.stderr, p.stderr
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(b"x")
    castore("import", t, "--name", "t")
    assert castore("cat", "t/f").stdout == b"x"
    castore("verify")
