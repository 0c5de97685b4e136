"""Error lines (issue 16, docs/cli.md "Exit status and errors"): a sample of
verbs run into their failures, each failure exactly one line on stderr of
the form `castore VERB: OBJECT: reason`, exit 1. Real failures: an absent
and an unreadable store, a digest that is not there, flipped bytes in a
blob file and a pack, a full disk (a small tmpfs) under import and blob
put, a remote that is down (gRPC and HTTP, through the CLI and through a
mount), a long path.
"""
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import CASTORE, flip_in, pattern_bytes, run

ABSENT = "ab" * 32
CAPS = "-dac_override,-dac_read_search"
# Without these capabilities root is held to the permission bits.
NO_DAC = ["setpriv", f"--inh-caps={CAPS}", f"--bounding-set={CAPS}"]


def the_line(p, verb, obj, reason, status=1):
    """p failed with exactly one stderr line `castore VERB: OBJECT...:
    ...REASON`; returns it."""
    text = p.stderr.decode("utf-8", "replace")
    assert p.returncode == status, (p.returncode, text)
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    line = text[:-1]
    prefix = f"castore {verb}: {obj}"
    assert line.startswith(prefix), (prefix, line)
    assert re.search(reason, line[len(prefix):]), (reason, line)
    # The verb is not said twice ("castore import: import ...").
    assert not line[len(f"castore {verb}: "):].startswith(verb + " "), line
    return line


@pytest.fixture
def tree(tmp_path):
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    (t / "big").write_bytes(pattern_bytes(300_000, 1))
    (t / "small").write_bytes(pattern_bytes(5000, 2))
    (t / "sub" / "f").write_bytes(pattern_bytes(100, 3))
    return t


@pytest.fixture
def filled(castore, store, tree):
    castore("import", tree, "--name", "t")
    return store


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs: a store on it runs out of space."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the store -------------------------------------------------------------

def test_absent_store(tmp_path):
    store = tmp_path / "none"
    for args, verb in ((["ls", "t"], "ls"), (["cat", "t/f"], "cat"),
                       (["roots", "list"], "roots list"), (["verify"], "verify"),
                       (["blob", "stat", ABSENT], "blob stat"),
                       (["export", "t", tmp_path / "out"], "export")):
        p = run(args, store=store, check=False)
        the_line(p, verb, f"store {store}: ", "No such file or directory|no store here")
    assert not store.exists()


def test_store_url_of_an_unknown_scheme():
    """grpc:// (snix writes grpc+http://) is a URL, not a folder."""
    for url in ("grpc://127.0.0.1:1", "s3://bucket/x"):
        p = run(["ls", "t"], store=url, check=False)
        the_line(p, "ls", f"store {url}: ", "not a store URL")


def test_unreadable_store(filled, tmp_path):
    os.chmod(filled / "data.mdb", 0)
    for args, verb in ((["ls", "t"], "ls"), (["roots", "list"], "roots list"),
                       (["dir", "get", ABSENT], "dir get")):
        p = subprocess.run(NO_DAC + [CASTORE, "--store", str(filled)] + args,
                           capture_output=True, timeout=60)
        the_line(p, verb, f"store {filled}: ", "Permission denied$")


def test_digest_not_there(filled, castore):
    p = castore("blob", "cat", ABSENT, check=False)
    the_line(p, "blob cat", f"blob {ABSENT}: ", "not in the store$")
    p = castore("dir", "get", ABSENT, check=False)
    the_line(p, "dir get", f"directory {ABSENT}: ", "not in the store$")
    # Not a digest at all: a usage error, the same form.
    p = castore("blob", "cat", "zz", check=False)
    the_line(p, "blob cat", "zz: ", "not a digest", status=2)


def test_no_such_root_or_entry(filled, castore):
    the_line(castore("ls", "nope", check=False), "ls", "nope: ", "no such root$")
    the_line(castore("cat", "t/nope", check=False), "cat", "t/nope: ", "no such entry$")
    the_line(castore("roots", "rm", "nope", check=False), "roots rm", "nope: ", "no such root$")


@pytest.mark.parametrize("which", ["big", "small"])
def test_corrupt_object(filled, castore, tree, tmp_path, which):
    """A flipped byte in a blob file (big) or in a pack (small)."""
    content = (tree / which).read_bytes()
    hexd = next(ln.split("\t")[1] for ln in castore("ls", "t").stdout.decode().splitlines()
                if ln.endswith("\t" + which))
    if which == "big":
        flip_in(filled / "blobs" / hexd[:2] / hexd, 123_456)
    else:
        pack = next((filled / "packs").glob("*.pack"))
        flip_in(pack, pack.read_bytes().find(content[1000:1100]) + 10)
    reason = "content does not match its digest$"
    the_line(castore("cat", f"t/{which}", check=False), "cat", f"blob {hexd}: ", reason)
    the_line(castore("blob", "cat", hexd, check=False), "blob cat", f"blob {hexd}: ", reason)
    dest = tmp_path / "dest"
    p = castore("export", f"t/{which}", dest, check=False)
    the_line(p, "export", f"{dest}: blob {hexd}: ", reason)
    assert not dest.exists()
    p = castore("verify", check=False)
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 1 and len(lines) == 2, lines
    assert lines[0].startswith(f"castore verify: blob {hexd}: "), lines
    assert lines[1] == f"castore verify: {filled}: 1 problem found", lines


# --- a full disk -------------------------------------------------------------

def assert_clean(store):
    """Nothing half-written is left, and what is there verifies."""
    assert list((store / "tmp").iterdir()) == []
    run(["verify"], store=store)
    assert run(["roots", "list"], store=store).stdout == b""


def test_enospc_import_is_one_line(small_fs):
    """/usr/share/doc (over 100 MiB here) into an 8 MiB store: hashing
    threads and the callers above the store all meet the full disk; one
    line names the store and the reason."""
    store = small_fs / "s"
    p = run(["import", "/usr/share/doc", "--name", "d"], store=store, check=False)
    the_line(p, "import", f"store {store}: ", ": No space left on device$")
    assert_clean(store)
    # The same with small files only, which go to packs.
    p = run(["import", "/usr/share/man", "--name", "m"], store=store, check=False)
    the_line(p, "import", f"store {store}: ", ": No space left on device$")
    assert_clean(store)


def test_enospc_blob_put_is_one_line(small_fs, tmp_path):
    store = small_fs / "s"
    big = tmp_path / "big"
    big.write_bytes(pattern_bytes(12 << 20, 4))
    p = run(["blob", "put", big], store=store, check=False)
    the_line(p, "blob put", f"store {store}: ", ": No space left on device$")
    assert_clean(store)


# --- a remote that is down ---------------------------------------------------

def test_remote_down(tmp_path):
    port = closed_port()
    grpc = f"grpc+http://127.0.0.1:{port}"
    p = run(["--cache", tmp_path / "c1", "blob", "cat", ABSENT], store=grpc, check=False)
    the_line(p, "blob cat", f"{grpc}: ", "Connection refused$")
    http = f"http://127.0.0.1:{port}/"
    p = run(["--cache", tmp_path / "c2", "cat", "t/f"], store=http, check=False)
    the_line(p, "cat", f"{http}", "[Cc]ouldn't connect|Connection refused")


@pytest.fixture
def served(filled, tmp_path):
    """filled behind `castore serve` on a loopback port; yields (url,
    server)."""
    srv = subprocess.Popen([CASTORE, "--store", str(filled), "serve", "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = srv.stdout.readline().decode()
        assert line.startswith("listening on "), line
        yield "grpc+http://" + line.split()[-1], srv
    finally:
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
        srv.wait(30)
        srv.stdout.close()


def test_remote_goes_down(served, filled, tmp_path):
    """A cache that knows the root, its remote gone: the CLI and a mount
    name the remote once per failure."""
    url, srv = served
    cache = tmp_path / "cache"
    listed = run(["roots", "list"], store=filled).stdout.decode().split()
    run(["--cache", cache, "roots", "add", "t", "--directory", listed[2], "--size", listed[3]],
        store=url)
    srv.send_signal(signal.SIGTERM)
    srv.wait(30)
    for args, verb in ((["ls", "t"], "ls"), (["cat", "t/sub/f"], "cat"),
                       (["export", "t", tmp_path / "out"], "export")):
        p = run(["--cache", cache] + args, store=url, check=False)
        the_line(p, verb, f"{url}: ", "Connection refused$")

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    errlog = tmp_path / "mount.err"
    m = subprocess.Popen([CASTORE, "--store", url, "--cache", str(cache), "mount", str(mnt)],
                         stdout=subprocess.DEVNULL, stderr=open(errlog, "wb"))
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            assert m.poll() is None and time.monotonic() < deadline, errlog.read_text()
            time.sleep(0.02)
        with pytest.raises(OSError):
            os.listdir(mnt / "t")
    finally:
        m.send_signal(signal.SIGTERM)
        assert m.wait(30) == 0
    lines = errlog.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"castore mount: {url}: "), lines
    assert lines[0].endswith("Connection refused"), lines


# --- long lines ----------------------------------------------------------------

def test_long_path_is_cut_in_the_middle(filled, castore, tmp_path):
    """A destination of 3,000 bytes whose parents are missing: the line is
    cut in the middle, and keeps the verb, the start of the path and the
    reason."""
    dest = tmp_path.joinpath(*["n" * 200] * 15, "out")
    p = castore("export", "t", dest, check=False)
    line = the_line(p, "export", str(dest)[:100], r" \.\.\. .*: mkdir: No such file or directory$")
    assert len(line) + 1 <= 2048 and str(dest)[-50:] in line, line
