"""castore mount: the filesystem of DESIGN.md section 4, mounted for real.

Every test builds its own store, mounts it with `castore mount` in the
background, and checks what the kernel shows through the mount point. The
mount fixture always unmounts (umount -l) and kills the process at
teardown, whatever the test did.

The whole module runs once per transport: /dev/fuse (`--transport
devfuse`, with the kernel's io_uring switch off) and FUSE over io_uring
(`--transport io-uring`, with /sys/module/fuse/parameters/enable_uring
set for the test and restored after it; skipped where the kernel lacks
it).
"""
import ctypes
import errno
import filecmp
import json
import os
import platform
import random
import signal
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CASTORE, copy_tree, flip_in, pattern_bytes, run

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="needs /dev/fuse and root")


ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


def set_enable_uring(on):
    """Sets the kernel's FUSE io_uring switch; returns what it was."""
    old = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("1" if on else "0")
    return old in ("Y", "1")


# The transport the current test mounts with (set by the fixture below).
TRANSPORT = ["devfuse"]


# The switch is the machine's: test suites of several checkouts running at
# once would flip it under each other's mounts. Each test holds this lock
# while it depends on the switch.
URING_LOCK = "/tmp/castore-enable-uring.lock"


@pytest.fixture(autouse=True, params=["devfuse", "io-uring"])
def transport(request):
    """Runs each test with one transport, the kernel switch set to match
    (under URING_LOCK), and restores the switch afterwards."""
    import fcntl
    if request.param == "io-uring" and not ENABLE_URING.exists():
        pytest.skip("kernel without FUSE over io_uring")
    with open(URING_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = set_enable_uring(request.param == "io-uring") if ENABLE_URING.exists() else None
        TRANSPORT[0] = request.param
        try:
            yield request.param
        finally:
            TRANSPORT[0] = "devfuse"
            if old is not None:
                set_enable_uring(old)


class Mount:
    def __init__(self, store, path, args, tmp, env=None):
        self.path = Path(path)
        self.errlog = Path(tmp) / f"mount-{os.getpid()}-{time.monotonic_ns()}.err"
        self.path.mkdir(parents=True, exist_ok=True)
        args = list(args)
        if not any(a.startswith("--transport") for a in args):
            args += ["--transport", TRANSPORT[0]]
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(
            [CASTORE, "--store", str(store), "mount", str(path)] + args,
            stdout=subprocess.DEVNULL, stderr=open(self.errlog, "wb"), env=e)
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"castore mount exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not mounted after 15 s: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self):
        return self.errlog.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Sends sig and returns the exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def close(self):
        # A second signal ends a mount that still serves open files.
        for _ in range(2):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if os.path.ismount(self.path):
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def mount(store, tmp_path):
    """mount(*args) mounts the test's store at a fresh folder; returns a
    Mount whose .path is the mount point."""
    mounts = []

    def start(*args, env=None):
        m = Mount(store, tmp_path / f"mnt{len(mounts)}", args, tmp_path, env=env)
        mounts.append(m)
        return m
    yield start
    for m in mounts:
        m.close()
    for m in mounts:
        # A sanitizer build reports at exit; a report fails the test.
        err = m.stderr()
        assert "Sanitizer" not in err and "runtime error" not in err, err


def roots_json(castore):
    return {r["name"]: r for r in json.loads(castore("roots", "list", "--json").stdout)}


def b3(data):
    p = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True)
    return p.stdout.decode().strip()


def make_tree(base):
    """A small tree with every kind of entry and some equal content."""
    t = Path(base)
    (t / "dirA" / "sub" / "deep" / "deeper").mkdir(parents=True)
    (t / "top.txt").write_bytes(pattern_bytes(1000))
    (t / "same.txt").write_bytes(pattern_bytes(777, 5))
    (t / "same.sh").write_bytes(pattern_bytes(777, 5))
    os.chmod(t / "same.sh", 0o755)
    (t / "same2.txt").write_bytes(pattern_bytes(777, 5))
    (t / "big.bin").write_bytes(pattern_bytes(3 * 1024 * 1024 + 17, 9))
    (t / "empty.txt").write_bytes(b"")
    os.symlink("top.txt", t / "link")
    os.symlink("top.txt", t / "link2")
    os.symlink("dirA/sub/deep/deeper/leaf.txt", t / "deeplink")
    (t / "dirA" / "f1").write_bytes(pattern_bytes(100, 1))
    (t / "dirA" / "sub" / "s.txt").write_bytes(pattern_bytes(50, 2))
    (t / "dirA" / "sub" / "deep" / "deeper" / "leaf.txt").write_bytes(b"leaf\n")
    (t / "dirA" / "sub" / "deep" / "d.txt").write_bytes(pattern_bytes(10, 3))
    os.symlink("../s.txt", t / "dirA" / "sub" / "deep" / "up")
    # dirB equals dirA: one Directory digest, two paths, two inodes.
    subprocess.run(["cp", "-a", str(t / "dirA"), str(t / "dirB")], check=True)
    (t / "Case").mkdir()
    (t / "Case" / "Name").write_bytes(b"upper\n")
    (t / "Case" / "name").write_bytes(b"lower\n")
    (t / "empty1").mkdir()
    (t / "empty2").mkdir()
    return t


@pytest.fixture
def tree(tmp_path, castore):
    """The small tree, imported as root `r`."""
    t = make_tree(tmp_path / "tree")
    castore("import", t, "--name", "r")
    return t


def expect_errno(err, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, f"{fn.__name__}{args}: {e.value}"


# The root ------------------------------------------------------------------

def test_root_listing_refused_but_lookup_works(tree, mount):
    m = mount()
    expect_errno(errno.EPERM, os.listdir, m.path)
    # The root itself opens (tar -C, fchdir); only its listing is refused.
    fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd2 = os.open("r/top.txt", os.O_RDONLY, dir_fd=fd)
        assert os.read(fd2, 10) == pattern_bytes(10)
        os.close(fd2)
    finally:
        os.close(fd)
    assert os.path.isdir(m.path / "r")
    assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
    expect_errno(errno.ENOENT, os.stat, m.path / "nosuchroot")


def test_root_listing_allowed(tree, castore, mount):
    castore("import", tree / "top.txt", "--name", "afile")
    castore("roots", "add", "alink", "--symlink", "r/top.txt")
    m = mount("--list-root")
    assert sorted(os.listdir(m.path)) == ["afile", "alink", "r"]
    st = os.stat(m.path)
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_size == 3
    assert st.st_nlink == 1  # not counted (DESIGN.md section 4)


def test_root_entries_of_every_kind(tree, castore, mount):
    castore("import", tree / "same.sh", "--name", "tool")
    castore("roots", "add", "alink", "--symlink", "r/top.txt")
    m = mount()
    st = os.stat(m.path / "tool")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
    assert (m.path / "tool").read_bytes() == pattern_bytes(777, 5)
    assert os.readlink(m.path / "alink") == "r/top.txt"
    assert (m.path / "alink").read_bytes() == pattern_bytes(1000)


def test_root_added_while_mounted(tree, castore, mount):
    m = mount("--list-root")
    expect_errno(errno.ENOENT, os.stat, m.path / "later")
    castore("import", tree / "top.txt", "--name", "later")
    assert (m.path / "later").read_bytes() == pattern_bytes(1000)
    assert "later" in os.listdir(m.path)


# Reading ---------------------------------------------------------------------

def test_read_files_at_root_and_deep(tree, mount):
    m = mount()
    r = m.path / "r"
    assert (r / "top.txt").read_bytes() == pattern_bytes(1000)
    assert (r / "dirA" / "sub" / "deep" / "deeper" / "leaf.txt").read_bytes() == b"leaf\n"
    assert (r / "empty.txt").read_bytes() == b""
    assert os.stat(r / "dirA" / "sub" / "s.txt").st_size == 50


# READ data takes three ways: FUSE passthrough (the kernel reads the blob;
# the default as root), splice through a pipe, and pread + writev for
# small READs. Data tests run with and without passthrough.
MODES = pytest.mark.parametrize("mode", [[], ["--no-passthrough"]],
                                ids=["passthrough", "splice"])


def daemon_io(m, field):
    with open(f"/proc/{m.proc.pid}/io") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1])


def daemon_wchar(m):
    return daemon_io(m, "wchar")


def daemon_syscr(m):
    return daemon_io(m, "syscr")


@MODES
def test_big_file(tree, mount, mode):
    m = mount(*mode)
    before = daemon_wchar(m)
    data = (m.path / "r" / "big.bin").read_bytes()
    # Spliced or passed through, the data is never written from a
    # userspace buffer (write/writev would count it in wchar).
    assert daemon_wchar(m) - before < 1024 * 1024
    # With passthrough, READs never reach the daemon (each request the
    # daemon takes is one read() of /dev/fuse: syscr). The page cache is
    # dropped first, so that the bytes must come from somewhere.
    with open(m.path / "r" / "big.bin", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        r0 = daemon_syscr(m)
        assert len(f.read()) == len(data)
        requests = daemon_syscr(m) - r0
    if mode:
        assert requests >= 3
    else:
        assert requests <= 1
    assert len(data) == 3 * 1024 * 1024 + 17
    assert data == pattern_bytes(3 * 1024 * 1024 + 17, 9)
    # Unaligned reads across the 1 MiB boundaries and past the end.
    with open(m.path / "r" / "big.bin", "rb", buffering=0) as f:
        for off in (0, 1, 4095, 1024 * 1024 - 3, 2 * 1024 * 1024 + 5,
                    3 * 1024 * 1024 + 10, 3 * 1024 * 1024 + 17, 10 ** 9):
            got = os.pread(f.fileno(), 1024 * 1024 + 7, off)
            assert got == data[off:off + 1024 * 1024 + 7]


@MODES
def test_mmap(tree, mount, mode):
    import mmap
    m = mount(*mode)
    data = pattern_bytes(3 * 1024 * 1024 + 17, 9)
    with open(m.path / "r" / "big.bin", "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert len(mm) == len(data)
            assert mm[:4096] == data[:4096]
            assert mm[-5000:] == data[-5000:]
            assert mm[:] == data


def test_symlinks(tree, mount):
    m = mount()
    r = m.path / "r"
    assert os.readlink(r / "link") == "top.txt"
    assert (r / "link").read_bytes() == pattern_bytes(1000)
    assert (r / "deeplink").read_bytes() == b"leaf\n"
    assert (r / "dirA" / "sub" / "deep" / "up").read_bytes() == pattern_bytes(50, 2)
    st = os.lstat(r / "link")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("top.txt")


def test_names_and_targets_longer_than_the_kernel_takes(castore, store, mount, tmp_path):
    """A symlink target of 4,096 bytes (the kernel takes 4,095) is
    ENAMETOOLONG, with no log line per access; a name of 300 bytes (the
    kernel takes 255) is left out of listings, said once per Directory,
    and `castore ls` still shows it."""
    from test_cli import enc_directory
    blob = castore("blob", "put", input=b"x\n").stdout.decode().strip()
    long_name = b"n" * 300
    d = enc_directory(
        files=[{"name": b"ok", "digest": blob, "size": 2},
               {"name": long_name, "digest": blob, "size": 2}],
        symlinks=[{"name": b"l4095", "target": b"t" * 4095},
                  {"name": b"l4096", "target": b"t" * 4096}])
    digest = castore("dir", "put", input=d).stdout.decode().strip()
    castore("roots", "add", "x", "--directory", digest, "--size", "4")
    m = mount()
    x = m.path / "x"
    assert os.readlink(x / "l4095") == "t" * 4095
    for _ in range(3):
        expect_errno(errno.ENAMETOOLONG, os.readlink, x / "l4096")
    for _ in range(3):
        assert sorted(os.listdir(x)) == ["l4095", "l4096", "ok"]
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
    assert (x / "ok").read_bytes() == b"x\n"
    assert m.stop() == 0
    err = m.stderr()
    lines = [ln for ln in err.splitlines() if "over 255" in ln]
    assert len(lines) == 1 and digest in lines[0] and "300 bytes" in lines[0], err
    assert "4096" not in err and "readlink" not in err.lower(), err
    listed = castore("ls", "x").stdout
    assert long_name in listed, listed
    # export writes it where the target file system takes it; ext4 and
    # tmpfs do not: one line with the reason, exit 1.
    p = castore("export", "x", tmp_path / "out", check=False)
    assert p.returncode == 1 and b"File name too long" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr


def test_readdir(tree, mount):
    m = mount()
    r = m.path / "r"
    assert sorted(os.listdir(r)) == sorted(os.listdir(tree))
    assert sorted(os.listdir(r / "dirA" / "sub")) == ["deep", "s.txt"]
    # ls -a style: "." and ".." come too.
    out = subprocess.run(["ls", "-a", str(r / "Case")], capture_output=True,
                         check=True).stdout.split()
    assert out == [b".", b"..", b"Name", b"name"]


def test_readdir_deep_before_parent(tree, mount):
    m = mount()
    deep = m.path / "r" / "dirB" / "sub" / "deep"
    assert sorted(os.listdir(deep)) == ["d.txt", "deeper", "up"]
    st = os.stat(m.path / "r" / "dirA" / "sub" / "deep" / "deeper" / "leaf.txt")
    assert st.st_size == 5


# Attributes ------------------------------------------------------------------

def entries_below(path):
    """What castore v1 calls a directory's size: every entry below it."""
    n = 0
    for e in os.scandir(path):
        n += 1
        if e.is_dir(follow_symlinks=False):
            n += entries_below(e.path)
    return n


def test_attributes(tree, mount):
    m = mount()
    r = m.path / "r"
    # A folder's st_size is its DirectoryNode size (entries below it) and
    # its nlink 1: both come from the parent, without the folder's
    # Directory (DESIGN.md section 4).
    checks = {
        "": (stat.S_IFDIR, 0o555, entries_below(tree), 1),
        "top.txt": (stat.S_IFREG, 0o444, 1000, 1),
        "same.sh": (stat.S_IFREG, 0o555, 777, 1),
        "empty.txt": (stat.S_IFREG, 0o444, 0, 1),
        "big.bin": (stat.S_IFREG, 0o444, 3 * 1024 * 1024 + 17, 1),
        "link": (stat.S_IFLNK, 0o777, 7, 1),
        "dirA": (stat.S_IFDIR, 0o555, 8, 1),
        "dirA/sub": (stat.S_IFDIR, 0o555, 6, 1),
        "dirA/sub/deep": (stat.S_IFDIR, 0o555, 4, 1),
        "empty1": (stat.S_IFDIR, 0o555, 0, 1),
    }
    for name, (fmt, mode, size, nlink) in checks.items():
        st = os.lstat(r / name) if name else os.lstat(r)
        assert stat.S_IFMT(st.st_mode) == fmt, name
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert st.st_size == size, name
        assert st.st_nlink == nlink, name
        assert st.st_uid == 0 and st.st_gid == 0, name
        assert st.st_mtime == 1 and st.st_atime == 1 and st.st_ctime == 1, name
        assert st.st_blocks == (size + 511) // 512, name


def numbers(top):
    """st_ino of every path below top, and the d_ino listings show."""
    st, d = {}, {}
    for dirpath, dirs, files in os.walk(top):
        for e in os.scandir(dirpath):
            d[e.path] = e.inode()
            st[e.path] = os.lstat(e.path).st_ino
    return st, d


def test_one_inode_per_path(tree, store, mount):
    m = mount()
    r = m.path / "r"
    st, d = numbers(r)
    # Equal folders, equal files, equal symlinks: one number per path,
    # never shown under another, and d_ino is st_ino.
    assert len(st) == entries_below(tree)
    assert len(set(st.values())) == len(st)
    assert os.lstat(r).st_ino not in st.values()
    assert d == st
    # Stable after the kernel forgets everything and looks it up again.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert numbers(r) == (st, d)
    # A second root holding the same content gets numbers of its own.
    run(["import", tree, "--name", "r2"], store=store)
    st2, _ = numbers(m.path / "r2")
    assert not set(st2.values()) & set(st.values())


GETDENTS64 = {"x86_64": 217, "aarch64": 61}[platform.machine()]


def dents(path):
    """{name: d_ino} of path's listing as getdents64 returns it, "." and
    ".." included (os.scandir leaves them out)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(1 << 16)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out = {}
    try:
        while True:
            n = libc.syscall(GETDENTS64, fd, buf, len(buf))
            assert n >= 0, os.strerror(ctypes.get_errno())
            if n == 0:
                return out
            raw, off = buf.raw[:n], 0
            while off < n:
                ino, _, reclen = struct.unpack_from("<QqH", raw, off)
                name = raw[off + 19:off + reclen].split(b"\0", 1)[0]
                out[name] = ino
                off += reclen
    finally:
        os.close(fd)


def test_dot_dot_is_the_parent(tree, mount):
    """A folder's ".." carries its parent's number, as on ext4; a named
    root's is the mount's root. Equal folders under two parents show two
    parents."""
    m = mount("--list-root")
    r = m.path / "r"
    folders = [r] + [Path(dp) / d for dp, ds, _ in os.walk(r) for d in ds]
    assert len(folders) > 10
    for again in (False, True):
        if again:
            # Forgotten and looked up again, deepest first: the same.
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            folders.reverse()
        for f in folders:
            d = dents(f)
            assert d[b"."] == os.stat(f).st_ino, f
            assert d[b".."] == os.stat(f.parent).st_ino, f
    assert dents(r)[b".."] == os.stat(m.path).st_ino == 1
    assert dents(m.path)[b".."] == 1
    a, b = dents(r / "dirA" / "sub"), dents(r / "dirB" / "sub")
    assert a[b".."] != b[b".."]
    # ls -ia says the same.
    out = subprocess.run(["ls", "-ia", str(r / "dirA" / "sub" / "deep")],
                         capture_output=True, check=True).stdout.split()
    got = dict(zip(out[1::2], map(int, out[0::2])))
    assert got[b".."] == os.stat(r / "dirA" / "sub").st_ino
    # cd .. and pwd -P follow the kernel's own "..", which agrees.
    p = subprocess.run("cd deep/deeper && cd ../.. && pwd -P && ls -di .",
                       shell=True, cwd=r / "dirB" / "sub", capture_output=True, check=True)
    pwd, ls = p.stdout.decode().splitlines()
    assert pwd == str(r / "dirB" / "sub")
    assert int(ls.split()[0]) == os.stat(r / "dirB" / "sub").st_ino


def test_exact_names(tree, mount):
    m = mount()
    c = m.path / "r" / "Case"
    assert (c / "Name").read_bytes() == b"upper\n"
    assert (c / "name").read_bytes() == b"lower\n"
    for wrong in ("NAME", "nAme", "name ", "Name\n"):
        expect_errno(errno.ENOENT, os.stat, c / wrong)
    expect_errno(errno.ENOENT, os.stat, m.path / "R")


# Read-only -------------------------------------------------------------------

def test_every_write_is_erofs(tree, mount):
    m = mount()
    r = m.path / "r"
    f = r / "top.txt"
    attempts = [
        (os.open, r / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        (os.open, f, os.O_WRONLY),
        (os.open, f, os.O_RDWR),
        (os.open, f, os.O_RDONLY | os.O_TRUNC),
        (os.mkdir, r / "newdir"),
        (os.unlink, f),
        (os.rmdir, r / "empty1"),
        (os.rename, f, r / "moved"),
        (os.chmod, f, 0o777),
        (os.chown, f, 1, 1),
        (os.truncate, f, 0),
        (os.utime, f, (5, 5)),
        (os.setxattr, f, "user.x", b"1"),
        (os.removexattr, f, "user.x"),
        (os.symlink, "top.txt", r / "newlink"),
        (os.link, f, r / "hard"),
        (os.mknod, r / "fifo", stat.S_IFIFO | 0o644),
    ]
    for fn, *args in attempts:
        expect_errno(errno.EROFS, fn, *args)
    assert f.read_bytes() == pattern_bytes(1000)


# Absent content --------------------------------------------------------------

def test_absent_directory_and_blob_are_eio(tree, castore, mount):
    gone_dir = "ab" * 32
    gone_blob = "cd" * 32
    castore("roots", "add", "gonedir", "--directory", gone_dir, "--size", "3")
    castore("roots", "add", "goneblob", "--file", gone_blob, "--size", "10")
    m = mount()
    for _ in range(2):
        expect_errno(errno.EIO, os.listdir, m.path / "gonedir")
        expect_errno(errno.EIO, os.stat, m.path / "gonedir" / "x")
        expect_errno(errno.EIO, (m.path / "goneblob").read_bytes)
    # Their attributes come from the root nodes: stat works.
    assert os.stat(m.path / "goneblob").st_size == 10
    st = os.stat(m.path / "gonedir")
    assert stat.S_ISDIR(st.st_mode) and st.st_size == 3
    # The rest keeps working.
    assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
    err = m.stderr()
    assert err.count(gone_dir) == 1, err
    assert err.count(gone_blob) == 1, err


def drop_directories(store, digests):
    """Removes Directories from a local store's LMDB (mdb_dump, filter,
    mdb_load into a fresh environment): a store that lacks them, as a
    partial remote cache may."""
    dbs = {}
    for db in ("directories", "roots", "blobs"):
        dbs[db] = subprocess.run(["mdb_dump", "-s", db, str(store)], capture_output=True,
                                 text=True, check=True).stdout.split("\n")
    lines = dbs["directories"]
    head = lines.index("HEADER=END") + 1
    end = lines.index("DATA=END")
    body = lines[head:end]
    kept = [kv for pair in zip(body[0::2], body[1::2]) if pair[0].strip() not in digests
            for kv in pair]
    assert len(kept) == len(body) - 2 * len(digests)
    dbs["directories"] = lines[:head] + kept + lines[end:]
    (store / "data.mdb").unlink()
    (store / "lock.mdb").unlink()
    for db, text in dbs.items():
        subprocess.run(["mdb_load", "-s", db, str(store)], input="\n".join(text),
                       text=True, check=True, capture_output=True)


def test_folder_attributes_need_no_directory(tmp_path, store, castore, mount):
    # 1,000 subfolders whose Directories are not in the store: ls -l of
    # their parent lists and stats all of them; only inside one fails.
    t = tmp_path / "t"
    for i in range(1000):
        (t / f"s{i:04d}").mkdir(parents=True)
        (t / f"s{i:04d}" / "f").write_bytes(b"%d" % i)
    castore("import", t, "--name", "wide")
    top = json.loads(castore("dir", "get", roots_json(castore)["wide"]["digest"],
                             "--json").stdout)
    drop_directories(store, {d["digest"] for d in top["directories"]})
    m = mount()
    w = m.path / "wide"
    p = subprocess.run(["ls", "-l", str(w)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len([x for x in p.stdout.splitlines() if x.startswith("dr-xr-xr-x 1 ")]) == 1000
    assert os.stat(w / "s0999").st_size == 1
    expect_errno(errno.EIO, os.listdir, w / "s0500")
    expect_errno(errno.EIO, os.stat, w / "s0500" / "f")
    # Nothing was read for the others: only s0500 is reported missing.
    assert m.stderr().count("absent from the store") == 1, m.stderr()


# xattrs ------------------------------------------------------------------------

def test_xattrs_off(tree, mount):
    m = mount()
    for p in ("r/top.txt", "r/dirA"):
        with pytest.raises(OSError) as e:
            os.getxattr(m.path / p, "user.castore.blob.digest")
        assert e.value.errno == errno.ENOTSUP
        # ENOSYS from the filesystem: the kernel says EOPNOTSUPP and stops
        # asking for the rest of the mount.
        expect_errno(errno.ENOTSUP, os.listxattr, m.path / p)


def test_xattrs_on(tree, castore, mount):
    m = mount("--show-xattr")
    r = m.path / "r"
    top = os.getxattr(r / "top.txt", "user.castore.blob.digest").decode()
    assert top == b3(pattern_bytes(1000))
    assert os.listxattr(r / "top.txt") == ["user.castore.blob.digest"]
    rdig = os.getxattr(r, "user.castore.directory.digest").decode()
    assert rdig == roots_json(castore)["r"]["digest"]
    assert os.listxattr(r) == ["user.castore.directory.digest"]
    expect_errno(errno.ENODATA, os.getxattr, r / "top.txt", "user.other")
    expect_errno(errno.ENODATA, os.getxattr, r / "top.txt",
                 "user.castore.directory.digest")
    assert os.listxattr(r / "link", follow_symlinks=False) == []


# Concurrency -----------------------------------------------------------------

@MODES
def test_threads_read_random_ranges(tree, mount, mode):
    m = mount("--threads", "4", *mode)
    data = pattern_bytes(3 * 1024 * 1024 + 17, 9)
    path = m.path / "r" / "big.bin"
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        try:
            with open(path, "rb", buffering=0) as f:
                for _ in range(300):
                    off = rnd.randrange(0, len(data) + 100)
                    n = rnd.choice([1, 512, 4096, 65536, 200000, 1 << 20])
                    got = os.pread(f.fileno(), n, off)
                    if got != data[off:off + n]:
                        errors.append((seed, off, n))
                        return
        except OSError as e:
            errors.append((seed, str(e)))
    ts = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


# Names and sizes ---------------------------------------------------------------

def test_names_with_newlines_and_non_utf8(tmp_path, castore, mount):
    t = tmp_path / "t"
    t.mkdir()
    names = [b"new\nline", b"\xff\xfe-latin1-\xe9", b"tab\there", b" lead",
             b"-dash", b"\xe2\x98\x83 snow", b"a" * 255]
    for i, n in enumerate(names):
        with open(os.path.join(bytes(t), n), "wb") as f:
            f.write(pattern_bytes(10 + i, i))
    castore("import", t, "--name", "n")
    m = mount()
    d = os.path.join(bytes(m.path), b"n")
    assert sorted(os.listdir(d)) == sorted(names)
    for i, n in enumerate(names):
        with open(os.path.join(d, n), "rb") as f:
            assert f.read() == pattern_bytes(10 + i, i)


def test_directory_of_20000_entries(tmp_path, castore, mount):
    t = tmp_path / "t"
    t.mkdir()
    for i in range(20000):
        (t / f"e{i:05d}").write_bytes(b"%d" % (i % 7))
    castore("import", t, "--name", "wide")
    m = mount()
    w = m.path / "wide"
    got = os.listdir(w)
    assert len(got) == 20000 and sorted(got) == sorted(os.listdir(t))
    assert os.stat(w).st_size == 20000
    assert (w / "e19999").read_bytes() == b"%d" % (19999 % 7)
    assert (w / "e00000").read_bytes() == b"0"
    # Seven distinct contents, but one inode per path.
    assert len({os.stat(w / n).st_ino for n in got[:500]}) == 500


def test_usr_include_compares_file_by_file(tmp_path, castore, mount):
    src = copy_tree("/usr/include", tmp_path / "inc")
    castore("import", src, "--name", "inc")
    m = mount()
    top = m.path / "inc"
    nfiles = 0
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        mroot = os.path.normpath(top / rel)
        assert sorted(os.listdir(mroot)) == sorted(dirs + files), rel
        for name in files:
            s, d = os.path.join(root, name), os.path.join(mroot, name)
            if os.path.islink(s):
                assert os.readlink(d) == os.readlink(s), d
                continue
            sst, dst = os.lstat(s), os.lstat(d)
            assert dst.st_size == sst.st_size, d
            assert bool(dst.st_mode & 0o111) == bool(sst.st_mode & 0o111), d
            assert filecmp.cmp(s, d, shallow=False), d
            nfiles += 1
        for name in dirs:
            s = os.path.join(root, name)
            if os.path.islink(s):
                assert os.readlink(os.path.join(mroot, name)) == os.readlink(s)
    assert nfiles > 1000


# Process life ------------------------------------------------------------------

def test_sigterm_unmounts_and_exits_0(tree, mount):
    m = mount()
    assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
    assert m.stop(signal.SIGTERM) == 0
    assert not os.path.ismount(m.path)


def wait_unmounted(path):
    deadline = time.monotonic() + 15
    while os.path.ismount(path):
        assert time.monotonic() < deadline, f"{path} still mounted"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_detaches_and_open_files_keep_reading(tree, mount, sig):
    m = mount()
    big = pattern_bytes(3 * 1024 * 1024 + 17, 9)
    f = open(m.path / "r" / "big.bin", "rb")
    d = os.open(m.path / "r" / "dirA", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert f.read(10) == big[:10]
        m.proc.send_signal(sig)
        wait_unmounted(m.path)
        # The path is free: nothing new opens through it.
        expect_errno(errno.ENOENT, os.stat, m.path / "r" / "top.txt")
        assert os.listdir(m.path) == []
        # What was open keeps working: reads, and lookups under an open
        # folder.
        assert f.read() == big[10:]
        f.seek(1000)
        assert f.read(5) == big[1000:1005]
        with open(f"/proc/self/fd/{d}/f1", "rb") as g:
            assert g.read() == pattern_bytes(100, 1)
        assert m.proc.poll() is None  # still serving: files are open
    finally:
        f.close()
        os.close(d)
    # The last file closed: the kernel ends the connection, we exit.
    assert m.proc.wait(timeout=15) == 0


def test_second_signal_ends_at_once(tree, mount):
    m = mount()
    f = open(m.path / "r" / "big.bin", "rb")
    d = os.open(m.path / "r" / "dirA", os.O_RDONLY | os.O_DIRECTORY)
    try:
        f.read(10)
        m.proc.send_signal(signal.SIGTERM)
        wait_unmounted(m.path)
        assert m.proc.poll() is None
        assert m.stop(signal.SIGTERM) == 0
        # The daemon is gone: what needs it fails, nothing hangs. With
        # io_uring too the daemon ended the connection before it left
        # (else the rings' teardown, after the exit, made this fail as
        # aborted or cancelled).
        with pytest.raises(OSError) as e:
            os.stat(f"/proc/self/fd/{d}/sub/s.txt")
        assert e.value.errno == errno.ENOTCONN, e.value
    finally:
        f.close()
        os.close(d)


def test_sigusr1_logs_request_counts(tree, mount):
    m = mount()
    assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
    c = request_counts(m)
    assert c["INIT"] == 1 and c["LOOKUP"] >= 2, c
    # A second dump counts on from the first.
    assert (m.path / "r" / "same.txt").read_bytes() == pattern_bytes(777, 5)
    c2 = request_counts(m)
    assert c2["LOOKUP"] == c["LOOKUP"] + 1, (c, c2)
    assert m.stop() == 0


def test_unmount_from_outside_exits_0(tree, mount):
    m = mount()
    os.listdir(m.path / "r")
    subprocess.run(["umount", str(m.path)], check=True)
    assert m.proc.wait(timeout=15) == 0


def test_lazy_unmount_from_outside_exits_0(tree, mount):
    m = mount()
    os.listdir(m.path / "r")
    subprocess.run(["umount", "-l", str(m.path)], check=True)
    assert m.proc.wait(timeout=15) == 0


def test_missing_mountpoint_exits_1(tree, tmp_path, store):
    missing = tmp_path / "does" / "not" / "exist"
    p = run(["mount", missing], store=store, check=False, timeout=30)
    assert p.returncode == 1
    assert str(missing).encode() in p.stderr
    assert b"No such file" in p.stderr


def test_mountpoint_not_a_directory_exits_1(tree, tmp_path, store):
    p = run(["mount", tree / "top.txt"], store=store, check=False, timeout=30)
    assert p.returncode == 1 and b"top.txt" in p.stderr


def test_busy_mountpoint_exits_1(tree, mount, store):
    m = mount()
    p = run(["mount", m.path], store=store, check=False, timeout=30)
    assert p.returncode == 1
    assert b"already a mount point" in p.stderr
    # The first mount is untouched.
    assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)


def as_nobody(*cmd):
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                           "--clear-groups"] + [str(c) for c in cmd],
                          capture_output=True, timeout=60)


@pytest.fixture
def public_dir():
    """A folder that user nobody can reach (tmp_path is root's only)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="castore-mount-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for m in Path(d).iterdir():
        if in_mountinfo(m):
            subprocess.run(["umount", "-l", str(m)], check=False)
    shutil.rmtree(d, ignore_errors=True)


def test_allow_other(public_dir, castore, store, mount):
    t = make_tree(public_dir / "tree")
    castore("import", t, "--name", "r")
    plain = Mount(store, public_dir / "plain", [], public_dir)
    other = Mount(store, public_dir / "other", ["--allow-other"], public_dir)
    try:
        p = as_nobody("cat", public_dir / "plain" / "r" / "top.txt")
        assert p.returncode != 0 and b"Permission denied" in p.stderr
        p = as_nobody("cat", public_dir / "other" / "r" / "top.txt")
        assert p.returncode == 0 and p.stdout == pattern_bytes(1000)
    finally:
        plain.close()
        other.close()


def in_mountinfo(path):
    """Whether path is a mount point, without stat (which a FUSE mount of
    another user refuses even to root)."""
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == want:
                return True
    return False


def mount_as_nobody(store, mnt, err):
    """castore mount as user nobody (through fusermount3); returns the
    process once the mount is there."""
    proc = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         CASTORE, "--store", str(store), "mount", str(mnt)],
        stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    deadline = time.monotonic() + 15
    while not in_mountinfo(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            end_mount(proc, mnt)
            raise AssertionError(err.read_text())
        time.sleep(0.02)
    return proc


def end_mount(proc, mnt):
    """Kills a mount process that is still there and detaches its mount."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if in_mountinfo(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_root_owned_store_read_by_nobody(public_dir):
    """A user who can read every file of root's store reads the store
    (without write access to lock.mdb); writing fails with one line."""
    t = make_tree(public_dir / "tree")
    rstore = public_dir / "store"
    run(["import", t, "--name", "r"], store=rstore)
    assert (rstore / "lock.mdb").stat().st_uid == 0
    before = set(rstore.glob("*.mdb"))

    def nobody(*args):
        return as_nobody(CASTORE, "--store", rstore, *args)
    p = nobody("ls", "r")
    assert p.returncode == 0, p.stderr
    assert b"top.txt" in p.stdout and b"dirA" in p.stdout
    p = nobody("cat", "r/dirA/sub/s.txt")
    assert p.returncode == 0 and p.stdout == pattern_bytes(50, 2), p.stderr
    p = nobody("roots", "list")
    assert p.returncode == 0 and p.stdout.startswith(b"r directory "), p.stderr
    p = nobody("verify")
    assert p.returncode == 0, p.stderr
    dest = public_dir / "out"
    dest.mkdir()
    os.chown(dest, 65534, 65534)
    p = nobody("export", "r", dest / "r")
    assert p.returncode == 0, p.stderr
    assert (dest / "r" / "big.bin").read_bytes() == (t / "big.bin").read_bytes()
    # Writing: one line naming the store and the reason, exit 1.
    p = nobody("import", t, "--name", "x")
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert str(rstore).encode() in line and b"Permission denied" in line
    # A root writer keeps committing while nobody reads.
    for i in range(3):
        (t / f"new{i}").write_bytes(pattern_bytes(100 + i, i))
        run(["import", t, "--name", f"r{i}"], store=rstore)
        p = nobody("cat", f"r{i}/new{i}")
        assert p.returncode == 0 and p.stdout == pattern_bytes(100 + i, i)
    assert run(["verify"], store=rstore).returncode == 0
    # The reader wrote nothing into root's LMDB files.
    assert all(p.stat().st_uid == 0 for p in rstore.glob("*.mdb"))
    assert before == set(rstore.glob("*.mdb"))
    if not os.path.exists("/usr/bin/fusermount3"):
        return
    mnt = public_dir / "mnt"
    mnt.mkdir()
    os.chown(mnt, 65534, 65534)
    err = public_dir / "err"
    proc = mount_as_nobody(rstore, mnt, err)
    try:
        p = as_nobody("cat", mnt / "r" / "top.txt")
        assert p.returncode == 0 and p.stdout == pattern_bytes(1000), p.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, err.read_text()
    finally:
        end_mount(proc, mnt)


def test_unprivileged_mount_via_fusermount3(public_dir, castore, store):
    if not os.path.exists("/usr/bin/fusermount3"):
        pytest.skip("fusermount3 (fuse3) not installed")
    t = make_tree(public_dir / "tree")
    ustore = public_dir / "store"
    run(["import", t, "--name", "r"], store=ustore)
    mnt = public_dir / "mnt"
    mnt.mkdir()
    subprocess.run(["chown", "-R", "nobody:nogroup", str(ustore), str(mnt)], check=True)
    err = public_dir / "err"
    proc = mount_as_nobody(ustore, mnt, err)
    try:
        p = as_nobody("cat", mnt / "r" / "dirA" / "sub" / "s.txt")
        assert p.returncode == 0 and p.stdout == pattern_bytes(50, 2), p.stderr
        # The mount belongs to nobody: root is kept out without allow_other.
        expect_errno(errno.EACCES, os.stat, mnt / "r")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, err.read_text()
        assert not in_mountinfo(mnt)
    finally:
        end_mount(proc, mnt)


def request_counts(m):
    """The mount's requests per opcode so far (its SIGUSR1 dump, which
    ends with the total)."""
    import re
    n = m.stderr().count(" in all\n")
    m.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while m.stderr().count(" in all\n") <= n:
        assert m.proc.poll() is None and time.monotonic() < deadline, m.stderr()
        time.sleep(0.02)
    err = m.stderr()
    end = err.rindex(" in all\n")
    start = err.rfind(" in all\n", 0, end)
    block = err[start + 1 if start >= 0 else 0:end]
    return {k: int(v) for k, v in re.findall(r"requests: ([A-Z_]+) +(\d+)", block)}


def settled_counts(m, release, open_):
    """request_counts once every open has had its release, or after 10 s:
    the kernel sends RELEASE and RELEASEDIR after close() has returned,
    in the background, so the last ones may still be on their way."""
    deadline = time.monotonic() + 10
    while True:
        c = request_counts(m)
        if c.get(release, 0) >= c.get(open_, 0) or time.monotonic() > deadline:
            return c
        time.sleep(0.05)


def test_folders_open_without_asking(tree, mount):
    """Zero-message opendir: the first OPENDIR is answered ENOSYS and the
    kernel opens every folder itself from then on, listings cached; with
    --list-root (the root listing must follow roots that come and go) the
    daemon keeps being asked."""
    m = mount()
    for _ in range(3):
        listing = sorted(p.relative_to(m.path) for p in (m.path / "r").rglob("*"))
    assert Path("r/dirA/sub/deep/deeper/leaf.txt") in listing
    c = request_counts(m)
    assert c.get("OPENDIR", 0) == 1, c
    assert c.get("RELEASEDIR", 0) == 0, c
    # Each folder listed once, from the daemon; the passes after the
    # first come from the kernel's cache.
    folders = sum(1 for p in listing if (m.path / p).is_dir()) + 1
    assert c.get("READDIRPLUS", 0) + c.get("READDIR", 0) <= 2 * folders, c
    m2 = mount("--list-root")
    for _ in range(3):
        sorted((m2.path / "r").rglob("*"))
    c = settled_counts(m2, "RELEASEDIR", "OPENDIR")
    assert c.get("OPENDIR", 0) >= 3 * folders, c
    assert c.get("RELEASEDIR", 0) == c.get("OPENDIR"), c


@MODES
def test_files_open_without_asking(tmp_path, castore, mount, mode):
    """Zero-message open where passthrough is not used: the first OPEN is
    answered ENOSYS and the kernel opens every file itself (no OPEN, no
    RELEASE, no FLUSH per file); READs come without a handle and find the
    content by inode, through a small table of handles. With passthrough
    (chosen in each open reply) every open still asks."""
    t = tmp_path / "many"
    t.mkdir()
    # More files than the table's 64 slots, packed and not, read
    # interleaved so that slots are replaced under open files.
    sizes = [10, 5000, 70000, 300000]
    for i in range(150):
        (t / f"f{i:03d}").write_bytes(pattern_bytes(sizes[i % 4] + i, i % 7))
    castore("import", t, "--name", "many")
    m = mount(*mode)
    base = m.path / "many"
    files = [open(base / f"f{i:03d}", "rb", buffering=0) for i in range(150)]
    try:
        got = [bytearray() for _ in files]
        for _ in range(10):
            for f, g in zip(files, got):
                g += f.read(32 * 1024)
        for i, g in enumerate(got):
            g += files[i].read()
            assert bytes(g) == (t / f"f{i:03d}").read_bytes(), i
    finally:
        for f in files:
            f.close()
    for _ in range(2):
        for i in range(150):
            assert (base / f"f{i:03d}").read_bytes() == (t / f"f{i:03d}").read_bytes()
    c = request_counts(m) if mode else settled_counts(m, "RELEASE", "OPEN")
    if mode:
        assert c.get("OPEN", 0) == 1, c
        assert c.get("RELEASE", 0) == 0, c
        assert c.get("FLUSH", 0) <= 1, c
        assert c.get("READ", 0) >= 150, c
    else:
        assert c.get("OPEN", 0) >= 3 * 150, c
        assert c.get("RELEASE", 0) == c["OPEN"], c


def uring_completions(pid):
    """Completions the process's io_uring instances have posted (fdinfo)."""
    total = rings = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("CqTail:"):
                total += int(line.split()[1])
                rings += 1
    return rings, total


def test_transport_serves_usr_include_linux(tmp_path, castore, mount, transport):
    """/usr/include/linux read whole through the mount matches; with
    io_uring its rings carry the requests (fdinfo shows the completions),
    with /dev/fuse there are none."""
    castore("import", "/usr/include/linux", "--name", "inc")
    m = mount(env={"CASTORE_LOG": "info"})
    before = uring_completions(m.proc.pid)
    nfiles = 0
    for root, dirs, files in os.walk("/usr/include/linux"):
        rel = os.path.relpath(root, "/usr/include/linux")
        for name in files:
            src = os.path.join(root, name)
            if os.path.islink(src):
                continue
            with open(src, "rb") as a, open(m.path / "inc" / rel / name, "rb") as b:
                assert a.read() == b.read(), src
            nfiles += 1
    rings, total = uring_completions(m.proc.pid)
    if transport == "io-uring":
        assert "transport FUSE over io_uring" in m.stderr()
        # One ring per possible CPU, each with its entries' completions.
        assert rings >= 1
        assert total - before[1] >= nfiles, (before, total, nfiles)
    else:
        assert "transport /dev/fuse" in m.stderr()
        assert rings == 0
    assert m.stop() == 0


def possible_cpus():
    n = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@pytest.mark.parametrize("transport", ["io-uring"], indirect=True)
def test_uring_threads_serve_every_queue(tree, mount, transport):
    """--threads N gives io_uring N workers (at most one per kernel queue,
    and the kernel has one queue per possible CPU), each with one ring
    holding the entries of its share of the queues: with one worker, a
    single ring serves every queue."""
    queues = possible_cpus()
    for threads, rings_want in ((1, 1), (queues + 3, queues)):
        m = mount("--threads", str(threads), env={"CASTORE_LOG": "info"})
        for _ in range(2):
            for p in (m.path / "r").rglob("*"):
                if p.is_file() and not p.is_symlink():
                    assert p.read_bytes() == (tree / p.relative_to(m.path / "r")).read_bytes()
        rings, total = uring_completions(m.proc.pid)
        assert rings == rings_want and total > 0, (rings, total)
        assert f"{queues} queues of 8 entries, {rings_want} threads" in m.stderr(), m.stderr()
        assert m.stop() == 0


@pytest.mark.parametrize("transport", ["devfuse"], indirect=True)
def test_auto_transport_follows_the_kernel(tree, store, mount, transport):
    """auto: io_uring when the kernel has it on, else /dev/fuse; saying
    which. io-uring with it off fails with the reason. It sets the switch
    itself, so it runs once, not once per transport."""
    if not ENABLE_URING.exists():
        pytest.skip("kernel without FUSE over io_uring")
    old = set_enable_uring(False)
    try:
        m = mount("--transport", "auto", env={"CASTORE_LOG": "info"})
        assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
        assert "transport /dev/fuse" in m.stderr()
        assert uring_completions(m.proc.pid)[0] == 0
        assert m.stop() == 0
        p = run(["mount", m.path, "--transport", "io-uring"],
                store=store, check=False, timeout=30)
        assert p.returncode == 1
        assert b"enable_uring" in p.stderr and str(m.path).encode() in p.stderr
        set_enable_uring(True)
        m = mount("--transport", "auto", env={"CASTORE_LOG": "info"})
        assert (m.path / "r" / "top.txt").read_bytes() == pattern_bytes(1000)
        assert "transport FUSE over io_uring" in m.stderr()
        assert uring_completions(m.proc.pid)[1] > 0
        assert m.stop() == 0
    finally:
        set_enable_uring(old)


def test_usage(store):
    assert run(["mount", "--help"], store=store).stdout.startswith(b"Usage: castore mount")
    assert run(["mount"], store=store, check=False).returncode == 2
    assert run(["mount", "/x", "--threads", "0"], store=store, check=False).returncode == 2
    assert run(["mount", "/x", "/y"], store=store, check=False).returncode == 2
    assert run(["mount", "/x", "--transport", "tcp"], store=store, check=False).returncode == 2


# Verified reads ---------------------------------------------------------------

@pytest.fixture
def damaged(tmp_path, castore, store):
    """A store whose large blob (a file of its own), packed blob and tiny
    packed blob each have one flipped bit, beside a good file."""
    t = tmp_path / "t"
    t.mkdir()
    # Not pattern_bytes: its shifts of one cycle would be found in each
    # other when the pack is searched for the bytes to flip.
    rnd = random.Random(16)
    files = {"big": rnd.randbytes(300_000), "small": rnd.randbytes(5000),
             "tiny": rnd.randbytes(900), "good": rnd.randbytes(20_000)}
    for name, data in files.items():
        (t / name).write_bytes(data)
    castore("import", t, "--name", "t")
    blob_files = [p for p in (store / "blobs").rglob("*") if p.is_file()]
    assert len(blob_files) == 1
    flip_in(blob_files[0], 123_456)
    pack, = (store / "packs").glob("*.pack")
    data = pack.read_bytes()
    for name in ("small", "tiny"):
        at = data.find(files[name][500:600])
        assert at >= 0
        flip_in(pack, at + 10)
    return {name: (b3(data), data) for name, data in files.items()}


@pytest.mark.parametrize("mode", ["passthrough", "no-passthrough"])
def test_flipped_bytes_are_never_served(damaged, mount, mode):
    m = mount(*(["--no-passthrough"] if mode == "no-passthrough" else []))
    for _ in range(2):
        for name in ("big", "small", "tiny"):
            expect_errno(errno.EIO, (m.path / "t" / name).read_bytes)
        # Not a byte: not the first page, whatever is flipped further on.
        with open(m.path / "t" / "small", "rb", buffering=0) as f:
            expect_errno(errno.EIO, f.read, 100)
    assert (m.path / "t" / "good").read_bytes() == damaged["good"][1]
    err = m.stderr()
    for name in ("big", "small", "tiny"):
        hexd = damaged[name][0]
        lines = [l for l in err.splitlines() if hexd in l]
        assert len(lines) == 1 and "does not match its digest" in lines[0], err


def test_trust_large_serves_large_blobs_unhashed(damaged, mount):
    """--trust-large: the documented trade (docs/filesystem.md). The large
    blob's flipped bit reaches the reader; packed blobs are still checked."""
    m = mount("--trust-large")
    got = (m.path / "t" / "big").read_bytes()
    want = damaged["big"][1]
    assert len(got) == len(want) and got != want
    assert sum(a != b for a, b in zip(got, want)) == 1
    expect_errno(errno.EIO, (m.path / "t" / "small").read_bytes)
    assert (m.path / "t" / "good").read_bytes() == damaged["good"][1]


def test_large_blob_checked_by_range_without_passthrough(tmp_path, castore, store, mount):
    """Without passthrough every READ reaches the daemon, so a blob with an
    outboard (over 1 MiB) is checked by range: the groups before a
    flipped byte read, the group holding it is EIO (one line per mount).
    With passthrough the same blob fails at open, whole."""
    t = tmp_path / "t"
    t.mkdir()
    data = random.Random(17).randbytes(3 << 20)
    (t / "huge").write_bytes(data)
    castore("import", t, "--name", "t")
    blob, = [p for p in (store / "blobs").rglob("*") if p.is_file()]
    flip_in(blob, (2 << 20) + 100)
    hexd = b3(data)
    m = mount("--no-passthrough")
    with open(m.path / "t" / "huge", "rb", buffering=0) as f:
        # No readahead into the bad group behind the reader's back.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        assert f.read(1 << 20) == data[:1 << 20]
        f.seek(2 << 20)
        expect_errno(errno.EIO, f.read, 4096)
        f.seek((2 << 20) + 64 * 1024)
        assert f.read(4096) == data[(2 << 20) + 65536:(2 << 20) + 65536 + 4096]
    expect_errno(errno.EIO, (m.path / "t" / "huge").read_bytes)
    lines = [l for l in m.stderr().splitlines() if hexd in l]
    assert len(lines) == 1 and "does not match its digest" in lines[0], m.stderr()
    m2 = mount()
    expect_errno(errno.EIO, open, m2.path / "t" / "huge", "rb")
