"""Import of real trees (issue 13): --skip-special, --exclude, --skip-private
and the report of what castore v1 could not keep, on trees built here with
the things it cannot hold (device nodes, fifos, sockets, setuid and sticky
modes, private modes, owners, xattrs, hard links), and on a debootstrap
minbase root."""
import fnmatch
import json
import os
import resource
import shutil
import socket
import stat
import subprocess

import pytest

from conftest import CASTORE, pattern_bytes, run


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")


@pytest.fixture(autouse=True)
def umask_022():
    """Modes in these trees are the test's, not the caller's umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def import_json(store, tree, *opts, name="t"):
    """Imports with --json; returns (the JSON object, stderr lines)."""
    p = run(["import", tree, "--name", name, "--json", *opts], store=store)
    return json.loads(p.stdout), p.stderr.decode().splitlines()


def names(store, path):
    p = run(["ls", path], store=store)
    return sorted(line.split(b"\t")[4].decode() for line in p.stdout.splitlines())


def add_specials(where):
    """A fifo, a socket, a character and a block device in where."""
    os.mkfifo(where / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(where / "sock"))
    s.close()
    os.mknod(where / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(where / "loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))


def plain_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(pattern_bytes(1000))
    (tree / "sub" / "b.bin").write_bytes(pattern_bytes(200000, 3))
    return tree


def test_special_files_are_an_error_that_names_the_option(tmp_path):
    tree = plain_tree(tmp_path)
    os.mkfifo(tree / "sub" / "fifo")
    p = run(["import", tree, "--name", "t"], store=tmp_path / "store", check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert str(tree / "sub" / "fifo") in lines[0]
    assert "fifo" in lines[0] and "--skip-special" in lines[0]
    assert p.stdout == b""


def test_skip_special(tmp_path):
    tree = plain_tree(tmp_path)
    add_specials(tree / "sub")
    store = tmp_path / "store"
    out, err = import_json(store, tree, "--skip-special")
    assert names(store, "t/sub") == ["b.bin"]
    assert out["not_kept"]["special_skipped"] == 4
    assert out["files"] == 2 and out["root"]["name"] == "t"
    assert len(err) == 1 and "4 special files skipped" in err[0], err
    # Nothing else was lost: that is all the line says.
    assert err[0].endswith(": 4 special files skipped"), err
    run(["verify"], store=store)


def test_nothing_lost_nothing_said(tmp_path):
    tree = plain_tree(tmp_path)
    os.symlink("a.txt", tree / "link")
    store = tmp_path / "store"
    p = run(["import", tree, "--name", "t"], store=store)
    assert p.stderr == b""
    assert p.stdout.startswith(b"t directory ")
    out, err = import_json(store, tree, name="u")
    assert err == []
    assert set(out["not_kept"].values()) == {0}


def test_exclude(tmp_path):
    tree = plain_tree(tmp_path)
    for d in ["dev", "proc/self", "etc", "sub/dev", "sub/etc", "cache", "sub/x/cache"]:
        (tree / d).mkdir(parents=True)
    (tree / "sub" / "cache.txt").write_bytes(b"a file named like the folder")
    (tree / "sub" / "cachefile").write_bytes(b"x")
    os.symlink("x", tree / "sub" / "cache")  # a symlink, not a folder
    (tree / "proc" / "self" / "status").write_bytes(b"s")
    (tree / "proc" / "version").write_bytes(b"v")
    (tree / "etc" / "shadow").write_bytes(b"root:*:")
    (tree / "etc" / "passwd").write_bytes(b"root:x:0:0")
    (tree / "sub" / "etc" / "shadow").write_bytes(b"kept: not at the top")
    (tree / "m.pyc").write_bytes(b"c")
    (tree / "sub" / "x" / "n.pyc").write_bytes(b"c")
    (tree / "sub" / "x" / "n.py").write_bytes(b"p")
    (tree / "top").write_bytes(b"t")
    (tree / "sub" / "top").write_bytes(b"kept: /top is anchored")
    # An excluded folder is not walked: a fifo inside it is no error.
    os.mkfifo(tree / "dev" / "fifo")
    os.mkfifo(tree / "sub" / "dev" / "fifo")
    store = tmp_path / "store"
    out, err = import_json(store, tree, "--exclude", "dev", "--exclude", "proc/*",
                           "--exclude", "*.pyc", "--exclude", "etc/shadow",
                           "--exclude", "/top", "--exclude", "cache/")
    assert err == []
    assert names(store, "t") == ["a.txt", "etc", "proc", "sub"]
    assert names(store, "t/proc") == []
    assert names(store, "t/etc") == ["passwd"]
    assert names(store, "t/sub") == ["b.bin", "cache", "cache.txt", "cachefile", "etc",
                                     "top", "x"]
    assert names(store, "t/sub/etc") == ["shadow"]
    assert names(store, "t/sub/x") == ["n.py"]
    # dev, sub/dev, proc/self, proc/version, etc/shadow, m.pyc,
    # sub/x/n.pyc, top, cache, sub/x/cache
    assert out["excluded"] == 10
    # Without the options the same tree fails on the first fifo.
    p = run(["import", tree, "--name", "u"], store=store, check=False)
    assert p.returncode == 1 and b"--skip-special" in p.stderr
    # An empty pattern is a usage error.
    p = run(["import", tree, "--exclude", "/"], store=store, check=False)
    assert p.returncode == 2 and b"empty pattern" in p.stderr


def lossy_tree(tmp_path):
    """Every kind of loss once or twice, with the expected counts."""
    tree = plain_tree(tmp_path)
    t = tree
    (t / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(t / "suid", 0o4755)
    (t / "sgid-dir").mkdir()
    os.chmod(t / "sgid-dir", 0o2755)
    (t / "tmp").mkdir()
    os.chmod(t / "tmp", 0o1777)
    (t / "shadow").write_bytes(b"root:$6$secret:")
    os.chmod(t / "shadow", 0o640)
    (t / "private").mkdir()
    (t / "private" / "inside").write_bytes(b"in a 0700 folder")
    os.chmod(t / "private", 0o700)
    (t / "owned").write_bytes(b"o")
    os.chown(t / "owned", 1000, 1000)
    (t / "group").write_bytes(b"g")
    os.chown(t / "group", 0, 42)
    (t / "xattr").write_bytes(b"x")
    os.setxattr(t / "xattr", "user.castore.test", b"v")
    (t / "h1").write_bytes(pattern_bytes(5000, 7))
    os.link(t / "h1", t / "h2")
    os.link(t / "h1", t / "sub" / "h3")
    os.symlink("shadow", t / "link")  # a symlink loses nothing
    expect = {"special_skipped": 0, "setid_dropped": 3, "private_kept": 2,
              "private_skipped": 0, "owners_dropped": 2, "xattrs_dropped": 1,
              "hardlinks_split": 3}
    return tree, expect


def test_loss_report(tmp_path):
    tree, expect = lossy_tree(tmp_path)
    store = tmp_path / "store"
    out, err = import_json(store, tree)
    assert out["not_kept"] == expect
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"castore import: {tree}: not kept"), line
    for part in ["3 setuid/setgid/sticky modes dropped",
                 "2 private files and folders now readable by everyone",
                 "2 owners other than root dropped",
                 "1 file or folder with xattrs (dropped)",
                 "3 hard-linked files stored as files of their own"]:
        assert part in line, line
    assert "special" not in line and "skipped" not in line
    # Kept, readable by everyone, in the store.
    assert names(store, "t/private") == ["inside"]
    assert run(["cat", "t/shadow"], store=store).stdout == b"root:$6$secret:"
    # The text form prints the same line and the root node.
    p = run(["import", tree, "--name", "u"], store=store)
    assert p.stderr.decode().splitlines() == [line]
    assert p.stdout.decode().split()[:3] == ["u", "directory", out["root"]["digest"]]


def test_skip_private(tmp_path):
    tree, expect = lossy_tree(tmp_path)
    add_specials(tree / "sub")
    store = tmp_path / "store"
    out, err = import_json(store, tree, "--skip-private", "--skip-special")
    expect.update(private_kept=0, private_skipped=2, special_skipped=4)
    assert out["not_kept"] == expect
    assert "2 private files and folders skipped" in err[0]
    assert "now readable by everyone" not in err[0]
    listed = names(store, "t")
    assert "shadow" not in listed and "private" not in listed
    assert "link" in listed and "owned" in listed  # a dangling symlink stays
    run(["verify"], store=store)


def expected_losses(tree, excludes):
    """The counts docs/cli.md promises, computed from lstat of the tree:
    anchored patterns against the relative path (an excluded folder is not
    walked, so '*' crossing '/' in fnmatch makes no difference here),
    others against the name."""
    c = dict.fromkeys(["special_skipped", "setid_dropped", "private_kept",
                       "private_skipped", "owners_dropped", "xattrs_dropped",
                       "hardlinks_split"], 0)
    excluded = 0

    def note(path, st):
        others = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & others != others:
            c["private_kept"] += 1
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            c["setid_dropped"] += 1
        if st.st_uid or st.st_gid:
            c["owners_dropped"] += 1
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            c["hardlinks_split"] += 1
        if os.listxattr(path):
            c["xattrs_dropped"] += 1

    note(tree, os.lstat(tree))
    stack = [tree]
    while stack:
        d = stack.pop()
        for e in os.scandir(d):
            rel = os.path.relpath(e.path, tree)
            if any(fnmatch.fnmatchcase(rel if "/" in x else e.name, x.strip("/"))
                   for x in excludes):
                excluded += 1
                continue
            st = os.lstat(e.path)
            if stat.S_ISLNK(st.st_mode):
                continue
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                c["special_skipped"] += 1
                continue
            note(e.path, st)
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
    return c, excluded


def test_debootstrap_root(tmp_path, rootfs_tar):
    tree = tmp_path / "root"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(rootfs_tar)], check=True)
    # The cached tarball leaves /dev's nodes out; put the usual ones back,
    # and a fifo where a running system has one.
    for name, kind, dev in [("null", stat.S_IFCHR, (1, 3)), ("zero", stat.S_IFCHR, (1, 5)),
                            ("tty", stat.S_IFCHR, (5, 0)), ("loop0", stat.S_IFBLK, (7, 0))]:
        os.mknod(tree / "dev" / name, kind | 0o666, os.makedev(*dev))
    (tree / "run" / "systemd").mkdir(parents=True, exist_ok=True)
    os.mkfifo(tree / "run" / "initctl")
    (tree / "proc" / "1").mkdir()
    excludes = ["proc/*", "var/cache/apt/*.bin", "*.pyc", "/var/log/"]
    expect, excluded = expected_losses(tree, excludes)
    # What a minbase root really holds, so the report has something to say.
    assert expect["special_skipped"] == 5
    assert expect["setid_dropped"] > 0  # su, passwd, /tmp
    assert expect["private_kept"] > 0  # /etc/shadow, /root
    assert expect["owners_dropped"] > 0  # group shadow
    store = tmp_path / "store"
    p = run(["import", tree, "--name", "debian"], store=store, check=False)
    assert p.returncode == 1 and b"--skip-special" in p.stderr
    args = ["--skip-special"] + [a for x in excludes for a in ("--exclude", x)]
    out, err = import_json(store, tree, *args, name="debian")
    assert out["not_kept"] == expect
    assert out["excluded"] == excluded and excluded > 0
    assert len(err) == 1 and f"{expect['special_skipped']} special files skipped" in err[0]
    assert names(store, "debian/proc") == []
    assert "log" not in names(store, "debian/var")
    assert "null" not in names(store, "debian/dev")
    assert run(["cat", "debian/etc/shadow"], store=store).stdout == \
        (tree / "etc" / "shadow").read_bytes()
    shutil.rmtree(tree)


DEEP = 200_000


def deep_file(level):
    """The file a level of the deep chain holds (every 997th), or None."""
    if level % 997 == 0 or level == DEEP:
        return f"f{level}", pattern_bytes(level % 5000 + 1, level % 251)
    return None


def build_chain(top):
    """top/d/d/.../d, DEEP folders below top, built one fd at a time (a
    path this long is past PATH_MAX); some levels hold a file."""
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(1, DEEP + 1):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            f = deep_file(level)
            if f:
                w = os.open(f[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                os.write(w, f[1])
                os.close(w)
    finally:
        os.close(fd)


def check_chain(top):
    """Walks down top's chain, one fd at a time, checking each level."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth in range(1, DEEP + 1):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            f = deep_file(depth)
            names = sorted(os.listdir(fd))
            assert names == sorted(([f[0]] if f else []) + (["d"] if depth < DEEP else [])), \
                (depth, names)
            st = os.stat(".", dir_fd=fd)
            assert stat.S_IMODE(st.st_mode) == 0o755
            if f:
                st = os.stat(f[0], dir_fd=fd, follow_symlinks=False)
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
                r = os.open(f[0], os.O_RDONLY, dir_fd=fd)
                try:
                    assert os.read(r, 10000) == f[1], depth
                finally:
                    os.close(r)
    finally:
        os.close(fd)


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs for the deep chains: building one there is quick, and the
    unmount removes it (rm -r of 200,000 levels takes tens of seconds)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_deep_chain_imports_with_few_fds(tmp_path, tmpfs):
    """200,000 nested folders (some with a file) import with 256 files
    allowed (the walk holds a bounded number of folder fds; the recursive
    one ran out at about 1,000 levels), verify, export identical, and the
    export imports to the same root."""
    tree, dest = tmpfs / "chain", tmpfs / "out"
    store = tmp_path / "store"

    def nofile(n):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    build_chain(tree)
    p = run(["import", tree, "--name", "chain", "--json"], store=store,
            preexec_fn=nofile(256), check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    nfiles = sum(1 for lv in range(1, DEEP + 1) if deep_file(lv))
    assert out["directories"] == DEEP + 1 and out["files"] == nfiles
    assert out["root"]["size"] == DEEP + nfiles
    run(["verify"], store=store)
    p = run(["export", "chain", dest], store=store, preexec_fn=nofile(64), check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    check_chain(dest)
    p = run(["import", dest, "--json"], store=store, preexec_fn=nofile(256))
    assert json.loads(p.stdout)["root"]["digest"] == out["root"]["digest"]


def test_import_error_names_the_deep_path(tmp_path):
    """A failure deep in the walk names the whole path (rebuilt from the
    folders' names, which is all a folder keeps)."""
    tree = tmp_path / "t"
    deep = tree.joinpath(*[f"l{i}" for i in range(40)])
    deep.mkdir(parents=True)
    os.mkfifo(deep / "fifo")
    p = run(["import", tree, "--name", "t"], store=tmp_path / "store", check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and f"{deep / 'fifo'}: unsupported file type (fifo" in lines[0], lines


def test_wide_tree_imports_with_few_fds(tmp_path):
    """1,000 folders of two small files: the queued files' folders stay
    open for the workers, but no more of them than the file limit allows
    (64 here; without the bound the queue held about 128)."""
    tree = tmp_path / "wide"
    for i in range(1000):
        (tree / f"{i:04}").mkdir(parents=True)
        for j in range(2):
            (tree / f"{i:04}" / f"f{j}").write_bytes(pattern_bytes(i % 50 + 1, i + j))
    store = tmp_path / "store"
    p = run(["import", tree, "--name", "w", "--json"], store=store, check=False,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["files"] == 2000 and out["directories"] == 1001
    run(["verify"], store=store)
    assert run(["cat", "w/0777/f1"], store=store).stdout == pattern_bytes(777 % 50 + 1, 778)
