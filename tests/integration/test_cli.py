"""The castore command line, end to end (issue 2's "Done when" list as far
as it goes through the CLI): import/export of real trees, re-import,
refusals, crashes, concurrency, verify, and the plumbing verbs.

Run: CASTORE_BIN=$PWD/build-cli-san/src/cli/castore /usr/bin/python3 -m pytest -q tests/integration/test_cli.py
"""
import base64
import importlib
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CASTORE, ROOT, copy_tree, pattern_bytes, run

EMPTY_DIR = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
HEX = set("0123456789abcdef")


# --- helpers -------------------------------------------------------------

def b3sum_bytes(data):
    p = subprocess.run(["b3sum", "--no-names", "-"], input=data, capture_output=True, check=True)
    return p.stdout.decode().strip()


def b3sum_files(paths):
    """Digests of many files with one b3sum run (in order)."""
    out = []
    paths = list(paths)
    for i in range(0, len(paths), 500):
        p = subprocess.run(["b3sum", "--no-names", *paths[i:i + 500]],
                           capture_output=True, check=True)
        out += p.stdout.decode().split()
    assert len(out) == len(paths)
    return out


def one_line(stderr):
    """The stderr of a failure: exactly one line; returned decoded."""
    text = stderr.decode("utf-8", "replace")
    lines = text.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected one error line, got {text!r}"
    # docs/cli.md: "castore VERB: OBJECT: reason" ("castore: " before a verb).
    assert re.match(r"castore( [a-z]+){0,2}: \S", lines[0]), lines[0]
    return lines[0]


def count_blob_files(store):
    """Files under blobs/ and packs/, and the bytes of the packs: what a
    store holds of blobs (small ones are packed, see src/store/local.h)."""
    n = 0
    for _, _, files in os.walk(Path(store) / "blobs"):
        n += len(files)
    packs = list((Path(store) / "packs").glob("*.pack"))
    return n, len(packs), sum(p.stat().st_size for p in packs)


def roots_json(castore):
    return json.loads(castore("roots", "list", "--json").stdout)


def assert_no_roots(store):
    """Nothing registered: the store was not created, or has no root."""
    if not (Path(store) / "data.mdb").exists() and not Path(store).exists():
        return
    p = run(["roots", "list", "--json"], store=store, check=False)
    if p.returncode == 0:
        assert json.loads(p.stdout) == []
    p = run(["verify"], store=store, check=False)
    assert p.returncode == 0, p.stderr


def is_exec(mode):
    return bool(mode & 0o111)


def compare_trees(a, b):
    """Same names, types, symlink targets and executable bits everywhere;
    contents are compared by diff -r."""
    a, b = os.fsencode(a), os.fsencode(b)
    checked = 0
    for root, dirs, files in os.walk(a):
        rel = os.path.relpath(root, a)
        other = os.path.join(b, rel)
        assert sorted(os.listdir(root)) == sorted(os.listdir(other)), rel
        for name in dirs + files:
            sa = os.lstat(os.path.join(root, name))
            sb = os.lstat(os.path.join(other, name))
            assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), (rel, name)
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(os.path.join(root, name)) == os.readlink(os.path.join(other, name))
            elif stat.S_ISREG(sa.st_mode):
                assert is_exec(sa.st_mode) == is_exec(sb.st_mode), (rel, name)
                assert sa.st_size == sb.st_size, (rel, name)
            checked += 1
    return checked


def diff_r(a, b):
    p = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def add_oddities(tree):
    """Symlinks (relative, absolute, dangling, to a directory), executables,
    a name with a newline, names that are not UTF-8, empty file and dir."""
    t = os.fsencode(tree)
    j = os.path.join
    os.makedirs(j(t, b"odd/empty-dir"))
    os.makedirs(j(t, b"odd/sub\xfe-dir/deeper"))
    with open(j(t, b"odd/tool"), "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(j(t, b"odd/tool"), 0o755)
    with open(j(t, b"odd/owner-x"), "wb") as f:
        f.write(pattern_bytes(1000, 3))
    os.chmod(j(t, b"odd/owner-x"), 0o744)
    with open(j(t, b"odd/new\nline"), "wb") as f:
        f.write(b"a name with a newline\n")
    with open(j(t, b"odd/bad\xffname"), "wb") as f:
        f.write(pattern_bytes(70000, 1))
    with open(j(t, b"odd/sub\xfe-dir/deeper/big"), "wb") as f:
        f.write(pattern_bytes(3 << 20, 7))
    open(j(t, b"odd/empty"), "wb").close()
    os.symlink(b"tool", j(t, b"odd/rel-link"))
    os.symlink(b"/usr/include/stdio.h", j(t, b"odd/abs-link"))
    os.symlink(b"does/not/exist", j(t, b"odd/dangling"))
    os.symlink(b"sub\xfe-dir", j(t, b"odd/dir-link"))
    os.makedirs(j(t, b"odd/targets"))
    os.symlink(b"target with\nnewline \xff", j(t, b"odd/targets/odd-target"))
    os.symlink(b"../new\nline", j(t, b"odd/empty-dir/up"))


def import_root(castore, path, name):
    """Imports path as name; returns (digest, size) of the root node."""
    p = castore("import", path, "--name", name)
    fields = p.stdout.decode().split()
    assert fields[0] == name and fields[1] == "directory", p.stdout
    assert len(fields) == 4 and set(fields[2]) <= HEX and len(fields[2]) == 64
    return fields[2], int(fields[3])


# --- fixtures --------------------------------------------------------------

@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Copies of /usr/include and part of /usr/share/doc, each with the
    oddities added; made once for the module, never modified by tests."""
    base = tmp_path_factory.mktemp("trees")
    inc = copy_tree("/usr/include", str(base / "include"))
    doc = copy_tree("/usr/share/doc", str(base / "doc"), limit_files=3000)
    add_oddities(inc)
    add_oddities(doc)
    return {"include": Path(inc), "doc": Path(doc)}


@pytest.fixture(scope="module")
def crash_tree(tmp_path_factory):
    """Part of /usr/include plus one large file: an import of it takes long
    enough to be killed at many different moments (walking small files,
    copying the large blob, committing), while verify stays quick."""
    base = tmp_path_factory.mktemp("crash")
    t = copy_tree("/usr/include", str(base / "crash"), limit_files=800)
    chunk = pattern_bytes(1 << 20, 11)
    with open(os.path.join(t, "large"), "wb") as f:
        for i in range(160):
            f.write(chunk[i:] + chunk[:i])
    add_oddities(t)
    return Path(t)


@pytest.fixture(scope="module")
def xcheck_tree(tmp_path_factory):
    """Real folders small enough to walk Directory by Directory through
    the CLI (one process per Directory): /usr/include/linux and
    /usr/include/x86_64-linux-gnu, about 50 folders, plus the oddities."""
    base = tmp_path_factory.mktemp("xcheck")
    t = base / "xcheck"
    copy_tree("/usr/include/linux", str(t / "linux"))
    copy_tree("/usr/include/x86_64-linux-gnu", str(t / "x86_64-linux-gnu"))
    add_oddities(t)
    return t


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    t = base / "small"
    t.mkdir()
    (t / "a.txt").write_bytes(pattern_bytes(5000))
    (t / "b").mkdir()
    (t / "b" / "c.bin").write_bytes(pattern_bytes(200000, 9))
    add_oddities(t)
    return t


# --- import / export -------------------------------------------------------

@pytest.mark.parametrize("which", ["include", "doc"])
def test_import_export_roundtrip(trees, which, castore, store, tmp_path):
    src = trees[which]
    digest, size = import_root(castore, src, which)
    assert digest != EMPTY_DIR and size > 100
    roots = roots_json(castore)
    assert roots == [{"name": which, "type": "directory", "digest": digest, "size": size}]

    dest = tmp_path / "out"
    castore("export", which, dest)
    diff_r(src, dest)
    assert compare_trees(src, dest) > 100
    assert compare_trees(dest, src) > 100
    # Export writes 0755 for executables, 0644 otherwise.
    assert stat.S_IMODE(os.lstat(dest / "odd" / "owner-x").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "odd" / "empty").st_mode) == 0o644

    # Exporting onto an existing path is refused.
    p = castore("export", which, dest, check=False)
    assert p.returncode == 1 and str(dest) in one_line(p.stderr)


def test_reimport_same_digest_no_new_blob(trees, castore, store):
    src = trees["include"]
    d1, s1 = import_root(castore, src, "first")
    blobs = count_blob_files(store)
    assert blobs[0] > 10 and blobs[1] == 1 and blobs[2] > 1000000
    d2, s2 = import_root(castore, src, "second")
    assert (d1, s1) == (d2, s2)
    assert count_blob_files(store) == blobs
    # Re-importing under the same name replaces the root with itself.
    d3, _ = import_root(castore, Path(str(src) + "///"), "first")
    assert d3 == d1
    assert [r["name"] for r in roots_json(castore)] == ["first", "second"]


def test_import_default_name_and_file_root(small_tree, castore, store):
    p = castore("import", str(small_tree) + "/")
    assert p.stdout.decode().split()[:2] == ["small", "directory"]
    p = castore("import", ".", "--name", "dot", cwd=small_tree)
    assert p.stdout.decode().split()[:2] == ["dot", "directory"]
    p = castore("import", "b/..", cwd=small_tree)
    assert p.stdout.decode().split()[:2] == ["small", "directory"]
    p = castore("import", small_tree / "a.txt")
    assert p.stdout.decode().split() == ["a.txt", "file", b3sum_bytes(pattern_bytes(5000)), "5000"]
    p = castore("import", small_tree / "odd" / "tool")
    assert p.stdout.decode().split()[-1] == "executable"
    # PATH itself is followed when it is a symlink (as cp -r does).
    p = castore("import", small_tree / "odd" / "rel-link", "--name", "ln")
    assert p.stdout.decode().split()[:2] == ["ln", "file"]
    assert {r["name"] for r in roots_json(castore)} == {"small", "dot", "a.txt", "tool", "ln"}
    # A pipe gets no progress line: stderr stays empty on success.
    assert castore("import", small_tree, "--name", "again").stderr == b""


def test_progress_only_on_a_terminal(crash_tree, store):
    """stderr on a pty gets the progress line (files, bytes, rate), updated
    in place with \r and cleared at the end; stdout stays the root line."""
    master, slave = os.openpty()
    try:
        p = subprocess.Popen([CASTORE, "--store", str(store), "import", str(crash_tree)],
                             stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the pty's other side is closed
                break
            if not chunk:
                break
            seen += chunk
        out, _ = p.communicate(timeout=600)
    finally:
        os.close(master)
    assert p.returncode == 0
    assert out.split()[:2] == [b"crash", b"directory"]
    assert b"\r" in seen and b" files, " in seen and b"/s" in seen, seen[-500:]
    assert seen.endswith(b"\r\x1b[K"), seen[-200:]


def test_empty_directory_digest(castore, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = castore("import", empty)
    assert p.stdout.decode().split() == ["empty", "directory", EMPTY_DIR, "0"]
    assert castore("dir", "put", input=b"").stdout.decode().strip() == EMPTY_DIR
    assert castore("dir", "get", EMPTY_DIR).stdout == b""
    assert b3sum_bytes(b"") == EMPTY_DIR
    assert castore("ls", "empty").stdout == b""


# --- refusals --------------------------------------------------------------

def bad_tree(tmp_path, kind):
    """A tree with good files and one entry import must refuse; returns
    (tree, path of the bad entry, command prefix)."""
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "good.txt").write_bytes(pattern_bytes(10000))
    (tree / "sub" / "also-good").write_bytes(pattern_bytes(300000, 5))
    bad = tree / "sub" / "deeper" / f"bad-{kind}"
    prefix = []
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(bad))
        s.close()
    elif kind == "device":
        os.mknod(bad, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind in ("unreadable-file", "unreadable-dir"):
        # We run as root, and root reads a mode-000 file. The import runs
        # without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv) so that
        # the permission bits apply to it, as to any user.
        if kind == "unreadable-file":
            bad.write_bytes(b"secret")
        else:
            bad.mkdir()
            (bad / "inside").write_bytes(b"secret")
        os.chmod(bad, 0)
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    elif kind == "missing":
        tree = bad = tmp_path / "no" / "such" / "path"
    else:
        raise AssertionError(kind)
    return tree, bad, prefix


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "unreadable-file",
                                  "unreadable-dir", "missing"])
def test_import_refuses(tmp_path, store, kind):
    tree, bad, prefix = bad_tree(tmp_path, kind)
    if prefix:
        # The sanity check that the setup is real: without the capability
        # the entry really is unreadable.
        probe = subprocess.run(prefix + ["cat" if kind == "unreadable-file" else "ls", str(bad)],
                               capture_output=True)
        assert probe.returncode != 0
    cmd = prefix + [CASTORE, "--store", str(store), "import", str(tree), "--name", "t"]
    p = subprocess.run(cmd, capture_output=True, timeout=120)
    assert p.returncode == 1, p
    line = one_line(p.stderr)
    assert str(bad) in line, line
    assert p.stdout == b""
    assert_no_roots(store)


def test_import_refusal_leaves_store_usable(tmp_path, castore, store, small_tree):
    import_root(castore, small_tree, "keep")
    tree, bad, _ = bad_tree(tmp_path, "fifo")
    p = castore("import", tree, "--name", "t", check=False)
    assert p.returncode == 1 and str(bad) in one_line(p.stderr)
    assert [r["name"] for r in roots_json(castore)] == ["keep"]
    castore("verify")


# --- usage errors ----------------------------------------------------------

USAGE_CASES = [
    ["frobnicate"],
    [],
    ["--no-such-option", "roots", "list"],
    ["import"],
    ["import", "/usr/include", "--name", "a/b"],
    ["import", "/usr/include", "--name", ".."],
    ["import", "/usr/include", "--name", ""],
    ["import", "/usr/include", "--threads", "many"],
    ["import", "/", ],
    ["import", "/usr/include", "--bogus"],
    ["export", "x"],
    ["ls"],
    ["ls", "../x"],
    ["cat", "a", "b"],
    ["blob"],
    ["blob", "eat", EMPTY_DIR],
    ["blob", "cat", "abc"],
    ["blob", "cat", EMPTY_DIR[:-1] + "g"],
    ["blob", "stat", EMPTY_DIR + "0"],
    ["blob", "stat"],
    ["dir", "get", "zz"],
    ["dir", "get"],
    ["dir", "put", "extra"],
    ["roots", "add", "a/b", "--symlink", "x"],
    ["roots", "add", "..", "--symlink", "x"],
    ["roots", "add", ".", "--symlink", "x"],
    ["roots", "add", "", "--symlink", "x"],
    ["roots", "add", "r", "--file", EMPTY_DIR, "--size", "12x"],
    ["roots", "add", "r", "--file", EMPTY_DIR, "--size", "-1"],
    ["roots", "add", "r", "--file", EMPTY_DIR],
    ["roots", "add", "r", "--directory", "xyz", "--size", "1"],
    ["roots", "add", "r"],
    ["roots", "add", "r", "--symlink", "x", "--file", EMPTY_DIR, "--size", "1"],
    ["roots", "add", "r", "--symlink", ""],
    ["roots", "rm", "a/b"],
    ["roots", "rm"],
    ["roots", "frob"],
    ["verify", "extra"],
    ["--cache-max", "lots", "roots", "list"],
    ["--store"],
]


@pytest.mark.parametrize("args", USAGE_CASES, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors(args, castore, store):
    p = castore(*args, check=False)
    assert p.returncode == 2, p
    one_line(p.stderr)
    assert p.stdout == b""
    assert not store.exists(), "a usage error must not create the store"


VERBS_HELP = [["--help"], ["import", "--help"], ["export", "--help"], ["ls", "--help"],
              ["cat", "--help"], ["verify", "--help"], ["blob", "--help"],
              ["blob", "put", "--help"], ["blob", "cat", "--help"], ["blob", "stat", "--help"],
              ["dir", "--help"], ["dir", "put", "--help"], ["dir", "get", "--help"],
              ["roots", "--help"], ["roots", "list", "--help"], ["roots", "add", "--help"],
              ["roots", "rm", "--help"]]


@pytest.mark.parametrize("args", VERBS_HELP, ids=" ".join)
def test_help(args, castore, store):
    p = castore(*args)
    assert p.stdout.startswith(b"Usage: castore") and p.stderr == b""
    assert not store.exists()


def test_version(castore):
    assert castore("--version").stdout.startswith(b"castore ")


def test_missing_store_is_a_failure(castore, store):
    for args in (["ls", "x"], ["roots", "list"], ["verify"], ["blob", "stat", EMPTY_DIR],
                 ["roots", "rm", "x"]):
        p = castore(*args, check=False)
        assert p.returncode == 1, (args, p)
        assert str(store) in one_line(p.stderr)
    assert not store.exists()


def test_import_needs_a_local_store(small_tree, tmp_path):
    # Nothing listens on port 9: the store is never reached either way.
    p = run(["--cache", tmp_path / "cache", "import", small_tree], store="http://127.0.0.1:9/",
            check=False)
    assert p.returncode == 1, p
    line = one_line(p.stderr)
    assert "http://127.0.0.1:9/" in line
    assert "local store" in line or "not built in" in line, line


def test_default_store_path(tmp_path, small_tree):
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": "", "CASTORE_STORE": ""}
    run(["import", small_tree / "a.txt"], env=env)
    assert (tmp_path / "home" / ".local" / "share" / "castore").is_dir()
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    run(["import", small_tree / "a.txt"], env=env)
    assert (tmp_path / "xdg" / "castore").is_dir()
    env["CASTORE_STORE"] = str(tmp_path / "envstore")
    run(["import", small_tree / "a.txt"], env=env)
    assert (tmp_path / "envstore").is_dir()
    p = run(["roots", "list"], env=env)
    assert p.stdout.split()[0] == b"a.txt"


# --- crashes and concurrency -------------------------------------------------

def test_sigkill_during_import(crash_tree, store, tmp_path):
    src = crash_tree
    cmd = [CASTORE, "--store", str(store), "import", str(src), "--name", "inc"]
    # How long a whole import takes here, into a fresh store (then thrown away).
    t0 = time.monotonic()
    run(["import", src, "--name", "probe"], store=tmp_path / "probe-store")
    full = time.monotonic() - t0
    # And into a store that has every blob (the later rounds are partly so).
    t0 = time.monotonic()
    run(["import", src, "--name", "probe"], store=tmp_path / "probe-store")
    warm = time.monotonic() - t0
    rng = random.Random(20261125)
    killed = 0
    for i in range(5):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, (full if i == 0 else warm) * 0.8))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        killed += p.returncode == -signal.SIGKILL
        # verify re-hashes every blob (slow under the sanitizers); damage
        # from an earlier kill would persist (blobs are never rewritten,
        # LMDB commits are atomic), so checking every other time still
        # catches it.
        if i % 2 == 1 or i == 4:
            v = run(["verify"], store=store, check=False)
            assert v.returncode == 0, (i, v.stderr[-2000:])
    assert killed >= 2, "the imports ended before the kills; the tree is too small"
    p = run(["import", src, "--name", "inc"], store=store)
    probe = run(["roots", "list", "--json"], store=tmp_path / "probe-store").stdout
    assert p.stdout.split()[2].decode() == json.loads(probe)[0]["digest"]
    run(["verify"], store=store)


def test_concurrent_imports(xcheck_tree, crash_tree, store, tmp_path):
    jobs = [("inc1", crash_tree), ("inc2", crash_tree), ("doc", xcheck_tree)]
    procs = [subprocess.Popen([CASTORE, "--store", str(store), "import", str(src), "--name", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, src in jobs]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    digests = {out.split()[0].decode(): out.split()[2].decode() for out, _ in outs}
    assert digests["inc1"] == digests["inc2"]
    run(["verify"], store=store)
    roots = {r["name"]: r["digest"] for r in json.loads(run(["roots", "list", "--json"], store=store).stdout)}
    assert roots == digests
    dest = tmp_path / "doc-out"
    run(["export", "doc", dest], store=store)
    diff_r(xcheck_tree, dest)


# --- verify ------------------------------------------------------------------

def test_verify_finds_flipped_byte(small_tree, castore, store):
    import_root(castore, small_tree, "s")
    castore("verify")
    target = pattern_bytes(200000, 9)
    digest = b3sum_bytes(target)
    blob = [Path(r) / f for r, _, fs in os.walk(store / "blobs") for f in fs
            if f.endswith(digest[4:])]
    assert len(blob) == 1, "the blob of b/c.bin is a file under blobs/"
    blob = blob[0]
    os.chmod(blob, os.stat(blob).st_mode | stat.S_IWUSR)
    with open(blob, "r+b") as f:
        f.seek(12345)
        b = f.read(1)
        f.seek(12345)
        f.write(bytes([b[0] ^ 0x01]))
    p = castore("verify", check=False)
    assert p.returncode == 1
    err = p.stderr.decode()
    problems = [line for line in err.splitlines() if digest in line]
    assert problems, err
    # The untouched blobs are not reported.
    good = b3sum_bytes(pattern_bytes(5000))
    assert good not in err


def test_verify_finds_missing_directory_of_a_root(castore, store):
    # A root may name content that is absent (roots add); verify reports it.
    castore("roots", "add", "ghost", "--directory", "ab" * 32, "--size", "3")
    p = castore("verify", check=False)
    assert p.returncode == 1
    assert "ab" * 32 in p.stderr.decode() or "ghost" in p.stderr.decode()


# --- blobs -----------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1024, 65537, (4 << 20) + 3])
def test_blob_roundtrip(size, castore, tmp_path):
    data = pattern_bytes(size, size % 7)
    f = tmp_path / "data"
    f.write_bytes(data)
    expect = b3sum_files([str(f)])[0]
    assert castore("blob", "put", f).stdout.decode() == expect + "\n"
    assert castore("blob", "put", "-", input=data).stdout.decode() == expect + "\n"
    assert castore("blob", "put", input=data).stdout.decode() == expect + "\n"
    assert castore("blob", "cat", expect).stdout == data
    assert castore("blob", "cat", expect.upper()).stdout == data
    assert castore("blob", "stat", expect).stdout == f"{size}\n".encode()


def test_blob_errors(castore, tmp_path):
    castore("blob", "put", input=b"x")
    absent = b3sum_bytes(b"not stored")
    for verb in ("cat", "stat"):
        p = castore("blob", verb, absent, check=False)
        assert p.returncode == 1 and absent in one_line(p.stderr) and p.stdout == b""
    missing = tmp_path / "missing-file"
    p = castore("blob", "put", missing, check=False)
    assert p.returncode == 1 and str(missing) in one_line(p.stderr)


# --- directories -------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field, payload):
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def enc_dir_node(name, digest, size):
    return ld(1, name) + ld(2, bytes.fromhex(digest)) + (varint(3 << 3) + varint(size) if size else b"")


def enc_file_node(name, digest, size, executable=False):
    return (ld(1, name) + ld(2, bytes.fromhex(digest)) +
            (varint(3 << 3) + varint(size) if size else b"") +
            (varint(4 << 3) + b"\x01" if executable else b""))


def enc_symlink_node(name, target):
    return ld(1, name) + ld(2, target)


def enc_directory(dirs=(), files=(), symlinks=()):
    """Our own encoder, independent of the C one: entries as the JSON of
    dir get gives them (names as bytes)."""
    out = b""
    for d in sorted(dirs, key=lambda e: e["name"]):
        out += ld(1, enc_dir_node(d["name"], d["digest"], d["size"]))
    for f in sorted(files, key=lambda e: e["name"]):
        out += ld(2, enc_file_node(f["name"], f["digest"], f["size"], f.get("executable", False)))
    for s in sorted(symlinks, key=lambda e: e["name"]):
        out += ld(3, enc_symlink_node(s["name"], s["target"]))
    return out


def json_bytes(entry, key):
    if key + "_base64" in entry:
        raw = base64.b64decode(entry[key + "_base64"])
        assert entry[key] == raw.decode("utf-8", "replace")
        return raw
    return entry[key].encode()


def test_dir_put_get_roundtrip(castore, store):
    blob = castore("blob", "put", input=b"hello\n").stdout.decode().strip()
    leaf = enc_directory(files=[{"name": b"f", "digest": blob, "size": 6}])
    leaf_d = castore("dir", "put", input=leaf).stdout.decode().strip()
    assert leaf_d == b3sum_bytes(leaf)
    top = enc_directory(
        dirs=[{"name": b"sub", "digest": leaf_d, "size": 1},
              {"name": b"zempty", "digest": EMPTY_DIR, "size": 0}],
        files=[{"name": b"new\nline", "digest": blob, "size": 6, "executable": True},
               {"name": b"\xff\xfe", "digest": "00" * 32, "size": 1 << 40}],
        symlinks=[{"name": b"l\"\\ink", "target": b"tar\x01get\xc0\x80"},
                  {"name": "ünïcode".encode(), "target": "→".encode()}])
    top_d = castore("dir", "put", input=top).stdout.decode().strip()
    assert top_d == b3sum_bytes(top)
    assert castore("dir", "get", top_d).stdout == top
    j = json.loads(castore("dir", "get", top_d, "--json").stdout)
    assert [e["name"] for e in j["directories"]] == ["sub", "zempty"]
    assert j["directories"][0] == {"name": "sub", "type": "directory", "digest": leaf_d, "size": 1}
    f0, f1 = j["files"]
    assert f0 == {"name": "new\nline", "type": "file", "digest": blob, "size": 6, "executable": True}
    assert f1["name"] == "\ufffd\ufffd" and base64.b64decode(f1["name_base64"]) == b"\xff\xfe"
    assert f1["size"] == 1 << 40 and f1["executable"] is False
    s0, s1 = j["symlinks"]
    assert s0["name"] == "l\"\\ink" and "name_base64" not in s0
    assert json_bytes(s0, "target") == b"tar\x01get\xc0\x80"   # overlong: not UTF-8
    assert s1 == {"name": "ünïcode", "type": "symlink", "target": "→"}
    # Re-encoding what the JSON says gives the stored bytes back.
    rebuilt = enc_directory(
        dirs=[dict(e, name=json_bytes(e, "name")) for e in j["directories"]],
        files=[dict(e, name=json_bytes(e, "name")) for e in j["files"]],
        symlinks=[dict(e, name=json_bytes(e, "name"), target=json_bytes(e, "target")) for e in j["symlinks"]])
    assert rebuilt == top
    # Putting it again is a success that changes nothing.
    assert castore("dir", "put", input=top).stdout.decode().strip() == top_d
    # A missing Directory is a failure naming it.
    p = castore("dir", "get", "cd" * 32, check=False)
    assert p.returncode == 1 and "cd" * 32 in one_line(p.stderr)


GOOD = "11" * 32
MALFORMED = {
    "truncated": b"\x0a",
    "truncated-length": ld(2, enc_file_node(b"a", GOOD, 1))[:-3],
    "wire-type": b"\x08\x01",
    "unknown-field": ld(4, b""),
    "unknown-inner-field": ld(2, enc_file_node(b"a", GOOD, 1) + ld(9, b"x")),
    "varint-overflow": ld(2, ld(1, b"a") + ld(2, bytes(32)) + b"\x18" + b"\xff" * 10 + b"\x01"),
    "unsorted": ld(2, enc_file_node(b"b", GOOD, 1)) + ld(2, enc_file_node(b"a", GOOD, 1)),
    "duplicate-across": ld(2, enc_file_node(b"a", GOOD, 1)) + ld(3, enc_symlink_node(b"a", b"t")),
    "name-dotdot": ld(2, enc_file_node(b"..", GOOD, 1)),
    "name-slash": ld(2, enc_file_node(b"a/b", GOOD, 1)),
    "name-empty": ld(2, ld(2, bytes(32))),
    "name-nul": ld(3, enc_symlink_node(b"a\0b", b"t")),
    "digest-31": ld(2, ld(1, b"a") + ld(2, bytes(31))),
    "empty-target": ld(3, ld(1, b"a")),
    "target-nul": ld(3, enc_symlink_node(b"a", b"t\0")),
    "default-present": ld(2, ld(1, b"a") + ld(2, bytes(32)) + b"\x18\x00"),
    "fields-reordered": ld(2, ld(2, bytes(32)) + ld(1, b"a")),
    "size-overflow": (ld(1, enc_dir_node(b"a", EMPTY_DIR, (1 << 64) - 1)) +
                      ld(1, enc_dir_node(b"b", EMPTY_DIR, 1))),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_dir_put_refuses_malformed(case, castore, store):
    p = castore("dir", "put", input=MALFORMED[case], check=False)
    assert p.returncode == 1, p
    line = one_line(p.stderr)
    assert "refused" in line, line
    assert p.stdout == b""


def test_dir_put_refuses_missing_child(castore, store):
    child = "ee" * 32
    data = enc_directory(dirs=[{"name": b"c", "digest": child, "size": 1}])
    p = castore("dir", "put", input=data, check=False)
    assert p.returncode == 1 and child in one_line(p.stderr)
    p = castore("dir", "get", b3sum_bytes(data), check=False)
    assert p.returncode == 1


# --- roots -------------------------------------------------------------------

def test_roots_add_list_rm(castore, store):
    assert castore("roots", "list", "--json", check=False).returncode == 1  # no store yet
    castore("roots", "add", "d", "--directory", "ab" * 32, "--size", "7")
    castore("roots", "add", "f", "--file", "CD" * 32, "--size", "18446744073709551615", "--executable")
    castore("roots", "add", "g", "--size", "0", "--file", "ef" * 32)
    castore("roots", "add", "s", "--symlink", "some/where")
    castore("roots", "add", "name with spaces", "--symlink", "t\xe9")
    castore("roots", "add", "--symlink", "x", "--", "-dash")
    assert roots_json(castore) == [
        {"name": "-dash", "type": "symlink", "target": "x"},
        {"name": "d", "type": "directory", "digest": "ab" * 32, "size": 7},
        {"name": "f", "type": "file", "digest": "cd" * 32, "size": 18446744073709551615, "executable": True},
        {"name": "g", "type": "file", "digest": "ef" * 32, "size": 0, "executable": False},
        {"name": "name with spaces", "type": "symlink", "target": "t\xe9"},
        {"name": "s", "type": "symlink", "target": "some/where"},
    ]
    text = castore("roots", "list").stdout.decode().splitlines()
    assert text[1] == f"d directory {'ab' * 32} 7"
    assert text[2] == f"f file {'cd' * 32} 18446744073709551615 executable"
    assert text[5] == "s symlink some/where"
    # Replacing a root.
    castore("roots", "add", "s", "--symlink", "elsewhere")
    castore("roots", "rm", "d")
    castore("roots", "rm", "--", "-dash")
    got = {r["name"]: r for r in roots_json(castore)}
    assert set(got) == {"f", "g", "name with spaces", "s"}
    assert got["s"]["target"] == "elsewhere"
    p = castore("roots", "rm", "d", check=False)
    assert p.returncode == 1 and "d" in one_line(p.stderr)
    # A root whose content is absent: ls names the missing Directory.
    castore("roots", "add", "d", "--directory", "ab" * 32, "--size", "7")
    p = castore("ls", "d", check=False)
    assert p.returncode == 1 and "ab" * 32 in one_line(p.stderr)


def test_roots_json_non_utf8_target(castore, store):
    subprocess.run([CASTORE, "--store", str(store), "roots", "add", "weird", "--symlink", b"\xff/x\n"],
                   check=True)
    (r,) = roots_json(castore)
    assert r["target"] == "\ufffd/x\n" and base64.b64decode(r["target_base64"]) == b"\xff/x\n"


# --- ls and cat --------------------------------------------------------------

def parse_ls(out):
    """ls lines: TYPE, DIGEST|TARGET, SIZE, X, NAME separated by tabs. Names
    here hold no tab; a name with a newline spans two lines, so lines are
    joined back while the next one does not start with a known type."""
    entries = []
    for line in out.split(b"\n")[:-1]:
        parts = line.split(b"\t")
        if len(parts) >= 5 and parts[0] in (b"directory", b"file", b"symlink"):
            entries.append(parts[:4] + [b"\t".join(parts[4:])])
        else:
            entries[-1][4] += b"\n" + line
    return entries


def test_ls_and_cat(small_tree, castore, store):
    import_root(castore, small_tree, "s")
    odd = os.fsencode(small_tree / "odd")
    entries = parse_ls(castore("ls", "s/odd").stdout)
    names = [e[4] for e in entries]
    assert names == sorted(os.listdir(odd))
    by = {e[4]: e for e in entries}
    assert by[b"tool"][0] == b"file" and by[b"tool"][3] == b"x"
    assert by[b"bad\xffname"][1].decode() == b3sum_bytes(pattern_bytes(70000, 1))
    assert by[b"bad\xffname"][2] == b"70000" and by[b"bad\xffname"][3] == b"-"
    assert by[b"rel-link"] == [b"symlink", b"tool", b"4", b"-", b"rel-link"]
    assert by[b"targets"][0] == b"directory"
    assert by[b"empty-dir"][0] == b"directory"
    assert by[b"empty-dir"][2] == b"1"  # one entry: the symlink "up"
    assert by[b"new\nline"][0] == b"file"
    # The root lists like any directory; trailing and double slashes are fine.
    top = [e[4] for e in parse_ls(castore("ls", "s").stdout)]
    assert top == sorted(os.listdir(os.fsencode(small_tree)))
    assert castore("ls", "s//odd/").stdout == castore("ls", "s/odd").stdout
    # ls of a file shows that one entry.
    assert parse_ls(castore("ls", "s/b/c.bin").stdout) == [
        [b"file", b3sum_bytes(pattern_bytes(200000, 9)).encode(), b"200000", b"-", b"c.bin"]]

    assert castore("cat", "s/b/c.bin").stdout == pattern_bytes(200000, 9)
    assert castore("cat", "s/odd/empty").stdout == b""
    p = subprocess.run([CASTORE, "--store", str(store), "cat", b"s/odd/bad\xffname"],
                       capture_output=True, check=True)
    assert p.stdout == pattern_bytes(70000, 1)
    p = subprocess.run([CASTORE, "--store", str(store), "cat", b"s/odd/sub\xfe-dir/deeper/big"],
                       capture_output=True, check=True)
    assert p.stdout == pattern_bytes(3 << 20, 7)
    for spec in ("s/odd/rel-link", "s/odd", "s", "s/odd/nothing", "s/a.txt/below",
                 "s/odd/dir-link/deeper", "nosuchroot/x", "s/./a.txt", "s/b/../a.txt"):
        p = castore("cat", spec, check=False)
        assert p.returncode == 1, spec
        line = one_line(p.stderr)
        assert (spec.split("/")[0] if spec.startswith("nosuch") else spec) in line, line
    p = castore("ls", "s/nothing", check=False)
    assert p.returncode == 1 and "s/nothing" in one_line(p.stderr)

    # export of a sub-path.
    dest = store.parent / "sub-export"
    castore("export", "s/b", dest)
    assert (dest / "c.bin").read_bytes() == pattern_bytes(200000, 9)


# --- cross-check against an independent encoder -------------------------------

def load_castore_pb():
    """The messages of protos/castore.proto compiled by protoc
    (castore_pb.py, shared by the integration tests); None when the project
    has no castore.proto, and then our own Python encoder above is the
    independent one."""
    if not (ROOT / "protos" / "castore.proto").exists():
        return None
    return importlib.import_module("castore_pb")


def test_every_directory_of_a_real_tree(xcheck_tree, castore, store, tmp_path):
    """Walks every Directory of an imported real tree with `dir get`: its
    bytes hash (b3sum) to its key, re-encode the same with an independent
    encoder (python3-protobuf when castore.proto exists, and our own
    Python one), and say what the filesystem holds."""
    src = os.fsencode(xcheck_tree)
    root_d, root_size = import_root(castore, xcheck_tree, "x")
    pb = load_castore_pb()
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    seen = []
    file_checks = []

    def walk(digest, path):
        raw = castore("dir", "get", digest).stdout
        (raw_dir / digest).write_bytes(raw)
        seen.append(digest)
        j = json.loads(castore("dir", "get", digest, "--json").stdout) if len(seen) <= 8 or b"odd" in path else None
        if pb is not None:
            msg = pb.Directory()
            msg.ParseFromString(raw)
            assert msg.SerializeToString(deterministic=True) == raw
            dirs = [{"name": d.name, "digest": d.digest.hex(), "size": d.size} for d in msg.directories]
            files = [{"name": f.name, "digest": f.digest.hex(), "size": f.size,
                      "executable": f.executable} for f in msg.files]
            links = [{"name": s.name, "target": s.target} for s in msg.symlinks]
        else:
            jj = j or json.loads(castore("dir", "get", digest, "--json").stdout)
            dirs = [dict(e, name=json_bytes(e, "name")) for e in jj["directories"]]
            files = [dict(e, name=json_bytes(e, "name")) for e in jj["files"]]
            links = [dict(e, name=json_bytes(e, "name"), target=json_bytes(e, "target"))
                     for e in jj["symlinks"]]
        assert enc_directory(dirs, files, links) == raw
        if j is not None:
            assert [json_bytes(e, "name") for e in j["files"]] == [f["name"] for f in files]
            assert [e["digest"] for e in j["directories"]] == [d["digest"] for d in dirs]
        # What the filesystem holds.
        on_disk = sorted(os.listdir(path))
        assert sorted([e["name"] for e in dirs + files + links]) == on_disk
        size = len(on_disk)
        for s in links:
            assert os.readlink(os.path.join(path, s["name"])) == s["target"]
        for f in files:
            st = os.lstat(os.path.join(path, f["name"]))
            assert stat.S_ISREG(st.st_mode) and st.st_size == f["size"]
            assert is_exec(st.st_mode) == f["executable"]
            file_checks.append((os.path.join(path, f["name"]), f["digest"]))
        for d in dirs:
            assert stat.S_ISDIR(os.lstat(os.path.join(path, d["name"])).st_mode)
            size += walk(d["digest"], os.path.join(path, d["name"]))
            assert d["size"] == sizes[d["digest"]]
        sizes[digest] = size
        return size

    sizes = {}
    assert walk(root_d, src) == root_size
    assert len(seen) > 40
    names = sorted(set(seen))
    assert b3sum_files([str(raw_dir / n) for n in names]) == names
    # Every file's digest is b3sum's.
    sample = file_checks[::7] + [fc for fc in file_checks if b"odd" in fc[0]]
    assert b3sum_files([os.fsdecode(p) for p, _ in sample]) == [d for _, d in sample]
