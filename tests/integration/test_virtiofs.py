"""castore virtiofs: a real Linux guest mounts the store over vhost-user-fs.

The test imports a tree, starts `castore virtiofs`, builds an initramfs
(busybox-static, the virtio and virtiofs modules of Debian's kernel, the
init of tests/integration/guest/ and a check script written from what the
host knows of the tree) and boots QEMU with TCG. The guest checks contents
(sha256 computed here), modes, symlinks, inode sharing, a large directory,
a file of several MiB and that writes fail, then prints one result line on
the serial console. A second guest boots against the same daemon.
"""
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CASTORE, pattern_bytes, run

HERE = Path(__file__).resolve().parent
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = "/bin/busybox"
TAG = "castore"
# Load order: each after what it depends on (modules.dep).
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev",
           "virtio_pci_legacy_dev", "virtio_pci", "fuse", "virtiofs"]
BOOT_TIMEOUT = 240
LARGE_DIR = 2000
BIG_FILE = 6 * 1024 * 1024 + 12345


def find_kernel():
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    for k in reversed(kernels):
        version = k[len("/boot/vmlinuz-"):]
        if os.path.isdir(f"/lib/modules/{version}") and os.access(k, os.R_OK):
            return k, version
    return None, None


KERNEL, KVERSION = find_kernel()

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(KERNEL is None, reason="no readable /boot/vmlinuz-* with its modules"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
    pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed"),
]


def module_files(version):
    """Maps each needed module to its file; built-in ones are left out."""
    base = Path(f"/lib/modules/{version}")
    builtin = set()
    if (base / "modules.builtin").exists():
        for line in (base / "modules.builtin").read_text().split():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    paths = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        paths[name] = base / path
    out = []
    for m in MODULES:
        if m in builtin:
            continue
        if m not in paths:
            pytest.skip(f"kernel {version} has no module {m}")
        out.append((m, paths[m]))
    return out


def copy_module(src, dst):
    """Copies a module, decompressed (busybox insmod may not read xz/zstd)."""
    s = str(src)
    if s.endswith(".ko"):
        shutil.copyfile(s, dst)
        return
    tool = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"]}
    for ext, cmd in tool.items():
        if s.endswith(ext):
            with open(dst, "wb") as f:
                subprocess.run(cmd + [s], stdout=f, check=True)
            return
    raise AssertionError(f"unknown module format: {s}")


def write(path, data, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def make_tree(root):
    """The served tree; returns what the guest should find there."""
    write(root / "hello.txt", pattern_bytes(1000, 1))
    write(root / "empty", b"")
    big = pattern_bytes(251 * 64, 2)
    write(root / "big.bin", (big * (BIG_FILE // len(big) + 1))[:BIG_FILE])
    write(root / "tool.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root / "name with space.txt", b"spaced\n")
    # Same content twice: two paths, two inodes (one blob).
    write(root / "dup_a.txt", pattern_bytes(333, 3))
    write(root / "sub" / "dup_b.txt", pattern_bytes(333, 3))
    write(root / "dup_x.txt", pattern_bytes(333, 3), 0o755)
    # Two identical directories: two inodes (one Directory).
    for d in ("copy1", "copy2"):
        write(root / d / "same.txt", b"same\n")
        write(root / d / "inner" / "deeper.txt", b"deeper\n")
    write(root / "a" / "b" / "c" / "d" / "e" / "leaf.txt", b"leaf\n")
    os.symlink("hello.txt", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    for i in range(LARGE_DIR):
        write(root / "large" / f"f{i:04d}", f"file {i}\n".encode())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checks_script(root):
    """The guest's /checks.sh and /expected.sha256."""
    q = shlex.quote
    sums = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            # A sample of the large directory: under TCG each file read costs
            # the guest milliseconds; the listing checks all of them.
            if rel.parts[0] == "large" and int(name[1:]) % 97:
                continue
            if p.is_file():
                sums.append(f"{sha256(p)}  {rel}\n")
    top = sorted(os.listdir(root))
    big = (root / "big.bin").read_bytes()
    slice_sum = hashlib.sha256(big[3 << 20:4 << 20]).hexdigest()
    # A folder's st_size is every entry below it, its nlink 1 (DESIGN.md 4).
    below = sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))

    lines = [
        # Without --list-root the root opens but its listing is refused
        # (EPERM from getdents; busybox ls then shows nothing and may
        # still exit 0), while lookups work.
        "[ -z \"$(ls -A /mnt 2>/dev/null)\" ] || "
        "fail 'root directory listed without --list-root'",
        "cd /mnt/data || fail 'cd /mnt/data'",
        "sha256sum -c /expected.sha256 >/tmp/sums 2>&1 || "
        "fail \"checksums: $(grep -v ': OK$' /tmp/sums | head -n 3 | tr '\\n' ' ')\"",
        # Listing of the top directory, and its attributes.
        f"[ \"$(ls -A | tr '\\n' /)\" = {q('/'.join(top) + '/')} ] || "
        "fail \"top listing: $(ls -A | tr '\\n' /)\"",
        f"[ \"$(stat -c '%a %h %s %u %g' .)\" = '555 1 {below} 0 0' ] || "
        "fail \"top dir attrs: $(stat -c '%a %h %s %u %g' .)\"",
        # Modes and sizes.
        "[ \"$(stat -c '%a %h %s %u %g' hello.txt)\" = '444 1 1000 0 0' ] || "
        "fail \"hello.txt attrs: $(stat -c '%a %h %s %u %g' hello.txt)\"",
        "[ \"$(stat -c '%a %s' tool.sh)\" = '555 18' ] || "
        "fail \"tool.sh attrs: $(stat -c '%a %s' tool.sh)\"",
        "[ \"$(stat -c '%a %s' empty)\" = '444 0' ] || fail 'empty file attrs'",
        f"[ \"$(stat -c '%s' big.bin)\" = '{BIG_FILE}' ] || fail 'big.bin size'",
        # An offset read in the middle of the big file.
        f"[ \"$(dd if=big.bin bs=1048576 skip=3 count=1 2>/dev/null | sha256sum | cut -c1-64)\" = '{slice_sum}' ] || "
        "fail 'big.bin slice at 3 MiB'",
        # Symlinks.
        "[ \"$(readlink link)\" = 'hello.txt' ] || fail 'link target'",
        "[ \"$(readlink dangling)\" = '/nonexistent/target' ] || fail 'dangling target'",
        "[ \"$(stat -c '%a %s %F' link)\" = '777 9 symbolic link' ] || "
        "fail \"link attrs: $(stat -c '%a %s %F' link)\"",
        "[ -L dangling ] && [ ! -e dangling ] || fail 'dangling link resolves'",
        # One inode per path, equal content or not.
        "[ \"$(stat -c %i dup_a.txt)\" != \"$(stat -c %i sub/dup_b.txt)\" ] || fail 'two paths, one inode'",
        "[ \"$(stat -c %i dup_a.txt)\" != \"$(stat -c %i dup_x.txt)\" ] || fail 'executable shares an inode'",
        "[ \"$(stat -c %i copy1)\" != \"$(stat -c %i copy2)\" ] || fail 'equal folders share an inode'",
        "[ \"$(stat -c %i copy1/inner/deeper.txt)\" != \"$(stat -c %i copy2/inner/deeper.txt)\" ] || "
        "fail 'equal nested files share an inode'",
        "(cd copy1/inner && ls ../../copy2/inner >/dev/null && [ \"$(pwd -P)\" = \"$PWD\" ] && "
        "cat ../same.txt >/dev/null) || fail 'getcwd after an equal folder'",
        "[ \"$(cat a/b/c/d/e/leaf.txt)\" = leaf ] || fail 'deep file'",
        # The large directory, listed plainly and with attributes.
        f"[ \"$(ls large | wc -l)\" = {LARGE_DIR} ] || fail \"large dir: $(ls large | wc -l) entries\"",
        f"[ \"$(ls -l large | grep -c '^-r--r--r--')\" = {LARGE_DIR} ] || fail 'large dir long listing'",
        f"[ \"$(stat -c '%s %h' large)\" = '{LARGE_DIR} 1' ] || fail \"large dir attrs: $(stat -c '%s %h' large)\"",
        f"[ \"$(cat large/f{LARGE_DIR - 1:04d})\" = 'file {LARGE_DIR - 1}' ] || fail 'last file of the large dir'",
        "[ ! -e nonexistent ] || fail 'a name that does not exist'",
        # Writes fail, with EROFS.
        "( echo x > newfile ) 2>/dev/null && fail 'create succeeded'",
        "( echo x >> hello.txt ) 2>/dev/null && fail 'append succeeded'",
        "mkdir newdir 2>/tmp/err && fail 'mkdir succeeded'",
        "grep -q 'Read-only file system' /tmp/err || fail \"mkdir error: $(cat /tmp/err)\"",
        "rm -f hello.txt 2>/dev/null; [ -f hello.txt ] || fail 'rm succeeded'",
        "mv hello.txt moved 2>/dev/null && fail 'rename succeeded'",
        "chmod 777 hello.txt 2>/dev/null && fail 'chmod succeeded'",
        "ln -s x newlink 2>/dev/null && fail 'symlink succeeded'",
        "[ \"$(stat -c '%a %s' hello.txt)\" = '444 1000' ] || fail 'hello.txt changed'",
        # Everything again, from the page cache and the kernel's caches.
        "sha256sum -c /expected.sha256 >/tmp/sums 2>&1 || fail 'checksums, second pass'",
        # Unmount (FUSE_DESTROY) and mount again (a second FUSE_INIT on
        # the same device: a fresh session).
        "cd /",
        "umount /mnt || fail 'umount'",
        f"mount -t virtiofs {TAG} /mnt || fail 'mount again'",
        "cd /mnt/data || fail 'cd after remount'",
        "sha256sum -c /expected.sha256 >/tmp/sums 2>&1 || fail 'checksums after remount'",
        "cd /",
    ]
    return "\n".join(lines) + "\n", "".join(sums)


def build_initramfs(dest, checks, sums):
    work = dest.parent / "initramfs-root"
    (work / "bin").mkdir(parents=True)
    (work / "lib" / "modules").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, work / "bin" / "busybox")
    os.chmod(work / "bin" / "busybox", 0o755)
    shutil.copyfile(HERE / "guest" / "init.sh", work / "init")
    os.chmod(work / "init", 0o755)
    names = []
    for name, path in module_files(KVERSION):
        copy_module(path, work / "lib" / "modules" / f"{name}.ko")
        names.append(name)
    (work / "modules").write_text("\n".join(names) + "\n")
    (work / "tag").write_text(TAG + "\n")
    (work / "checks.sh").write_text(checks)
    (work / "expected.sha256").write_text(sums)
    files = subprocess.run(["find", "."], cwd=work, capture_output=True, check=True).stdout
    with open(dest, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=work, input=files,
                       stdout=f, check=True)
    return dest


def qemu_cmd(initramfs, sock, log, append=""):
    return [
        QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "1",
        "-m", "512M",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa", "node,memdev=mem",
        "-kernel", KERNEL, "-initrd", str(initramfs),
        "-append", "console=ttyS0 panic=-1 rdinit=/init loglevel=4" + append,
        "-chardev", f"socket,id=char0,path={sock}",
        "-device", f"vhost-user-fs-pci,chardev=char0,tag={TAG}",
        "-display", "none", "-nodefaults",
        "-serial", f"file:{log}",
    ]


def boot(initramfs, sock, log):
    """Boots one guest to its end; returns the serial console's text."""
    cmd = qemu_cmd(initramfs, sock, log) + ["-no-reboot"]
    p = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert p.returncode == 0, f"qemu exited {p.returncode}: {p.stderr[-2000:]!r}\n{text[-3000:]}"
    return text


def qmp(path, command):
    """Runs one QMP command on QEMU's monitor socket."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    f = s.makefile("rwb")
    f.readline()  # greeting
    for cmd in ("qmp_capabilities", command):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
        assert "return" in reply, reply
    s.close()


def wait_results(log, count, proc, timeout=BOOT_TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count("CASTORE-RESULT") >= count:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"qemu exited {proc.returncode}: {text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no result {count} in time: {text[-3000:]}")


def boot_reset_boot(initramfs, sock, log, tmp):
    """Boots a guest, resets it once it passed (the device is stopped
    and started again on the same connection), lets it pass again."""
    mon = tmp / "qmp.sock"
    cmd = qemu_cmd(initramfs, sock, log, " castore.hold") + [
        "-qmp", f"unix:{mon},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_results(log, 1, proc)
        qmp(mon, "system_reset")
        text = wait_results(log, 2, proc)
        qmp(mon, "quit")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [l.strip() for l in text.splitlines() if l.startswith("CASTORE-RESULT")]


def result_line(text):
    lines = [l.strip() for l in text.splitlines() if l.startswith("CASTORE-RESULT")]
    assert len(lines) == 1, f"expected one result line, console:\n{text[-4000:]}"
    return lines[0]


def wait_socket(path, proc, timeout=30, stale=None):
    """Waits for the daemon's socket (not the stale one left before)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"castore virtiofs exited {proc.returncode}: "
                                 f"{proc.stderr.read()[-2000:]!r}")
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_ino, st.st_ctime_ns) != stale:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError("castore virtiofs did not create its socket")


def stop_daemon(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("castore virtiofs did not end on SIGTERM")
    return rc


@pytest.fixture
def served(tmp_path, castore, store):
    """An imported tree and a running `castore virtiofs` for it."""
    data = tmp_path / "data"
    make_tree(data)
    castore("import", data, "--name", "data")
    checks, sums = checks_script(data)
    initramfs = build_initramfs(tmp_path / "initramfs.cpio", checks, sums)
    sock = tmp_path / "vhost.sock"
    # A stale socket from an earlier run is replaced.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    st = os.lstat(sock)
    stale = (st.st_ino, st.st_ctime_ns)
    proc = subprocess.Popen([CASTORE, "--store", str(store), "virtiofs", "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_socket(sock, proc, stale=stale)
        yield proc, sock, initramfs, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def daemon_state(pid):
    """The daemon's open fds and its mappings of guest memory. The store
    keeps the fds of its pack files open once read (local.h: a bounded
    cache that belongs to the store, not to a guest), so those are not
    counted."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if not (target.endswith(".pack") and "/packs/" in target):
            fds += 1
    with open(f"/proc/{pid}/maps") as f:
        guest = sum(1 for l in f if "memfd:" in l)
    return fds, guest


def wait_idle(proc, idle, timeout=20):
    """Waits until the daemon holds what it held before any guest."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        now = daemon_state(proc.pid)
        if now == idle:
            return
        time.sleep(0.1)
    raise AssertionError(f"after the guest left the daemon holds {now} (fds, guest "
                         f"mappings), before it held {idle}")


def test_two_guests(served):
    proc, sock, initramfs, tmp = served
    idle = daemon_state(proc.pid)
    assert idle[1] == 0
    text = boot(initramfs, sock, tmp / "console1.log")
    assert result_line(text) == "CASTORE-RESULT ok", f"guest 1:\n{text[-4000:]}"
    assert proc.poll() is None, "daemon ended after guest 1"
    # Disconnected: memory unmapped, every fd of that guest closed.
    wait_idle(proc, idle)
    # The second guest is also rebooted while connected.
    results = boot_reset_boot(initramfs, sock, tmp / "console2.log", tmp)
    assert results == ["CASTORE-RESULT ok"] * 2, \
        (tmp / "console2.log").read_text(errors="replace")[-4000:]
    assert proc.poll() is None, "daemon ended after guest 2"
    wait_idle(proc, idle)
    assert stop_daemon(proc) == 0
    assert not sock.exists(), "socket left behind"
    err = proc.stderr.read().decode(errors="replace")
    assert "Sanitizer" not in err and "runtime error" not in err, err[-4000:]


def test_refuses_non_socket(tmp_path, store, castore):
    castore("roots", "add", "x", "--symlink", "target")
    path = tmp_path / "regular"
    path.write_text("keep me")
    p = run(["virtiofs", "--socket", path], store=store, check=False, timeout=30)
    assert p.returncode == 1
    assert str(path).encode() in p.stderr
    assert path.read_text() == "keep me"
    p = run(["virtiofs"], store=store, check=False, timeout=30)
    assert p.returncode == 2


GET_FEATURES = b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00"


def served_connection(sock, timeout=30):
    """A connection the daemon serves: it answers GET_FEATURES. Until the
    daemon has seen the previous frontend leave, it refuses a new one
    (closes it at once), so this tries again until then."""
    end = time.monotonic() + timeout
    while True:
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(timeout)
        c.connect(str(sock))
        c.sendall(GET_FEATURES)
        reply = b""
        try:
            while len(reply) < 20:
                got = c.recv(20 - len(reply))
                if not got:
                    break
                reply += got
        except ConnectionResetError:
            pass
        if len(reply) == 20:
            assert reply[:4] == b"\x01\x00\x00\x00"
            return c
        c.close()
        assert time.monotonic() < end, "the daemon never served a new frontend"
        time.sleep(0.05)


def test_sigint_without_guest(tmp_path, store, castore):
    castore("roots", "add", "x", "--symlink", "target")
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([CASTORE, "--store", str(store), "virtiofs", "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_socket(sock, proc)
        # Bound under another name, renamed once listening: nothing else left.
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("s.sock.")]
        # A client that connects and leaves at once is survived.
        served_connection(sock).close()
        # Garbage from a served frontend: its connection is dropped...
        c = served_connection(sock)
        c.sendall(b"\xff" * 12)
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
        c.close()
        # ...and the daemon serves the next one.
        served_connection(sock).close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def features(c):
    """Asks a served connection GET_FEATURES once more."""
    c.sendall(GET_FEATURES)
    reply = b""
    while len(reply) < 20:
        got = c.recv(20 - len(reply))
        assert got, "connection closed"
        reply += got
    return reply


def test_signal_removes_socket_and_keeps_the_frontend(tmp_path, store, castore):
    """SIGTERM: the socket goes at once, the connected frontend keeps its
    session until it leaves; then the daemon ends. A second signal ends
    it at once."""
    castore("roots", "add", "x", "--symlink", "target")
    sock = tmp_path / "s.sock"
    for second_signal in (False, True):
        proc = subprocess.Popen([CASTORE, "--store", str(store), "virtiofs", "--socket", str(sock)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_socket(sock, proc)
            c = served_connection(sock)
            proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + 30
            while sock.exists():
                assert time.monotonic() < end, "socket still there"
                time.sleep(0.02)
            # Still served, by the same daemon.
            assert features(c)[:4] == b"\x01\x00\x00\x00"
            assert proc.poll() is None
            if second_signal:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
                c.close()
            else:
                c.close()
                assert proc.wait(timeout=30) == 0
            assert not sock.exists()
            err = proc.stderr.read().decode(errors="replace")
            assert "Sanitizer" not in err and "runtime error" not in err, err[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
