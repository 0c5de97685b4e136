"""What containers, chroots and builds do on a mount (issue 13): one inode
per path, so `..`, getcwd, bind mounts and the kernel's overlayfs work
over equal folders and equal files; and a chroot into an overlay over an
imported Debian root file system runs dpkg, apt-get and perl.

The Debian root comes from `debootstrap --variant=minbase` once per
machine: the tree (without /dev's device nodes) is kept as a tarball in
/var/tmp/castore-test-rootfs/ and every later session unpacks that and
imports it once. Where the Debian archive cannot be reached the chroot
tests skip (saying so); every other test here needs nothing but the
kernel.
"""
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CASTORE, pattern_bytes, run
from test_mount import Mount, expect_errno, make_tree, mount  # noqa: F401

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="needs /dev/fuse and root")



@pytest.fixture
def tree(tmp_path, castore):
    t = make_tree(tmp_path / "tree")
    # a/x and b/x are equal folders; only a has onlyA beside x.
    (t / "a" / "x").mkdir(parents=True)
    (t / "a" / "x" / "f").write_bytes(b"same\n")
    (t / "a" / "onlyA").write_bytes(b"only in a\n")
    (t / "b" / "x").mkdir(parents=True)
    (t / "b" / "x" / "f").write_bytes(b"same\n")
    castore("import", t, "--name", "r")
    return t


class Mounted:
    """Mounts made by a test, unmounted (innermost first) at the end."""

    def __init__(self):
        self.points = []

    def mount(self, *args):
        subprocess.run(["mount", *map(str, args)], check=True)
        self.points.append(str(args[-1]))

    def close(self):
        points, self.points = self.points, []
        for p in reversed(points):
            if subprocess.run(["umount", p], stderr=subprocess.DEVNULL).returncode:
                subprocess.run(["umount", "-l", p], check=False)


@pytest.fixture
def mounted():
    m = Mounted()
    yield m
    m.close()


def overlay(mounted, tmp_path, lower):
    """The kernel's overlayfs with `lower` below, upper and work on a
    tmpfs; returns the merged folder."""
    t = tmp_path / "ovl"
    t.mkdir()
    mounted.mount("-t", "tmpfs", "tmpfs", t)
    for d in ("upper", "work", "merged"):
        (t / d).mkdir()
    mounted.mount("-t", "overlay", "overlay", "-o",
                  f"lowerdir={lower},upperdir={t}/upper,workdir={t}/work",
                  t / "merged")
    return t / "merged"


def overlayfs_kernel_lines():
    p = subprocess.run(["dmesg"], capture_output=True, text=True)
    return [line for line in p.stdout.splitlines() if "overlayfs" in line]


def walk_all(top):
    """lstat of every entry and the bytes of every file below top."""
    seen = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            data = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    data = f.read()
            seen[os.path.relpath(p, top)] = (st.st_mode, data)
    return seen


# One inode per path ------------------------------------------------------------

def test_dotdot_and_getcwd_after_visiting_an_equal_folder(tree, mount):
    m = mount()
    r = m.path / "r"
    script = f"""
        cd {r}/a/x || exit 9
        ls {r}/b/x >/dev/null
        cat ../onlyA
        pwd -P
        /bin/pwd
    """
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["only in a", f"{r}/a/x", f"{r}/a/x"]
    old = os.getcwd()
    try:
        os.chdir(r / "b" / "x")
        os.stat(r / "a" / "x")
        os.listdir(r / "a" / "x")
        assert os.getcwd() == str(r / "b" / "x")
        expect_errno(errno.ENOENT, os.stat, "../onlyA")
        assert os.path.samefile("..", r / "b")
    finally:
        os.chdir(old)


def test_bind_mount_stays_on_its_folder(tree, mount, mounted, tmp_path):
    m = mount()
    r = m.path / "r"
    src = tmp_path / "bound"
    src.mkdir()
    (src / "marker").write_bytes(b"m")
    mounted.mount("--bind", src, r / "empty1")
    assert os.listdir(r / "empty1") == ["marker"]
    assert os.listdir(r / "empty2") == []
    assert os.stat(r / "empty1").st_ino != os.stat(r / "empty2").st_ino


def test_overlay_over_the_mount(tree, mount, mounted, tmp_path):
    m = mount()
    lower = m.path / "r"
    before = walk_all(lower)
    kernel = overlayfs_kernel_lines()
    o = overlay(mounted, tmp_path, lower)

    # Write a new file, then list and read everything else.
    (o / "newfile").write_bytes(b"x\n")
    got = walk_all(o)
    assert got["newfile"][1] == b"x\n"
    assert {k: v for k, v in got.items() if k != "newfile"} == before
    # Append to one of three equal files: the other two stay as they were.
    with open(o / "same.txt", "ab") as f:
        f.write(b"a\n")
    assert (o / "same.txt").read_bytes() == pattern_bytes(777, 5) + b"a\n"
    assert (o / "same2.txt").read_bytes() == pattern_bytes(777, 5)
    assert (o / "same.sh").read_bytes() == pattern_bytes(777, 5)
    # Copy-up of one of two equal empty folders.
    (o / "empty1" / "f").write_bytes(b"in empty1\n")
    assert os.listdir(o / "empty2") == []
    # Rename and delete inside one of two equal folders.
    os.rename(o / "dirA" / "f1", o / "dirA" / "f1.moved")
    os.unlink(o / "dirA" / "sub" / "s.txt")
    assert sorted(os.listdir(o / "dirB")) == ["f1", "sub"]
    assert (o / "dirB" / "sub" / "s.txt").read_bytes() == pattern_bytes(50, 2)
    assert (o / "dirA" / "f1.moved").read_bytes() == pattern_bytes(100, 1)
    # Work inside an equal folder by relative paths, as a build does.
    p = subprocess.run(["sh", "-c", f"cd {o}/a/x && cat ../onlyA && echo y >> f && cat f"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "only in a\nsame\ny\n", p.stderr
    assert (o / "b" / "x" / "f").read_bytes() == b"same\n"
    # Everything still lists and reads (no ESTALE), and nothing else changed.
    got = walk_all(o)
    changed = {"newfile", "same.txt", "empty1/f", "dirA/f1.moved", "a/x/f"}
    gone = {"dirA/f1", "dirA/sub/s.txt"}
    assert set(got) == (set(before) | changed) - gone
    assert all(got[k] == before[k] for k in got if k not in changed)
    # The lower is intact, and the kernel said nothing about overlayfs.
    assert walk_all(lower) == before
    assert overlayfs_kernel_lines() == kernel


# A chroot into an overlay over a Debian root file system -------------------------

@pytest.fixture(scope="session")
def debian_store(tmp_path_factory, rootfs_tar):
    """A store holding the Debian root as root `debian`, imported once per
    session."""
    base = tmp_path_factory.mktemp("debian")
    tree = base / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(rootfs_tar)], check=True)
    store = base / "store"
    run(["import", tree, "--name", "debian"], store=store)
    shutil.rmtree(tree)
    return store


def make_deb(where):
    """A small package built with dpkg-deb: a script and its control file."""
    pkg = where / "castore-hello"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: castore-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: castore tests <tests@castore.invalid>\n"
        "Description: says hello from a chroot on castore\n")
    hello = pkg / "usr" / "bin" / "castore-hello"
    hello.write_text("#!/bin/sh\necho hello from castore\n")
    hello.chmod(0o755)
    deb = where / "castore-hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True)
    return deb


def test_chroot_runs_dpkg_apt_and_perl(debian_store, mounted, tmp_path):
    m = Mount(debian_store, tmp_path / "mnt", [], tmp_path)
    try:
        lower = m.path / "debian"
        kernel = overlayfs_kernel_lines()
        o = overlay(mounted, tmp_path, lower)
        mounted.mount("-t", "proc", "proc", o / "proc")
        mounted.mount("--bind", "/dev", o / "dev")
        deb = make_deb(tmp_path)
        shutil.copy(deb, o / "tmp" / deb.name)

        def chroot(*cmd):
            p = subprocess.run(["chroot", str(o), *cmd], capture_output=True, text=True,
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                               timeout=120)
            assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
            return p.stdout
        listing = chroot("dpkg", "-l")
        assert "ii  base-files" in listing and "ii  dpkg" in listing
        chroot("perl", "-e", "1")
        assert chroot("apt-get", "--version").startswith("apt ")
        chroot("dpkg", "-i", f"/tmp/{deb.name}")
        assert chroot("castore-hello") == "hello from castore\n"
        assert "ii  castore-hello" in chroot("dpkg", "-l", "castore-hello")
        # The package went into the overlay's upper layer, not the lower.
        assert not (lower / "usr" / "bin" / "castore-hello").exists()
        assert "castore-hello" not in (lower / "var" / "lib" / "dpkg" / "status").read_text()
        assert overlayfs_kernel_lines() == kernel
    finally:
        mounted.close()
        m.close()
    err = m.stderr()
    assert "Sanitizer" not in err and "runtime error" not in err, err
