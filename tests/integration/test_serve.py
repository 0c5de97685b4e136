"""`castore serve` facing hostile or careless peers (issue 16) and speaking
snix's package names as well as tvix's (issue 17): floods of idle
connections, the idle timeout, EMFILE under a low ulimit, --read-only, the
disk reserve, a large Directory Put, live unix sockets, the warning for
every interface; the client against grpcio servers under each name.

Every peer is local (loopback or a unix socket); limits are measured on
the server process (/proc: threads, fds, CPU ticks, anonymous RSS), never
by elapsed time.
"""
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading

import pytest

from conftest import ROOT, pattern_bytes, run
from test_remote import (Client, MemoryServer, b3, code_of, filled, pb,  # noqa: F401 (fixtures)
                         root_digest, serve, trees_equal, tree)

grpc = pytest.importorskip("grpc")


# --- raw HTTP/2, for peers grpcio will not play ---------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    """A header as a literal without indexing, new name, no Huffman."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def open_put_stream(sock):
    """Sends the preface and the HEADERS of a blob Put, without END_STREAM:
    a call in flight, so the connection is not idle."""
    hdrs = b"".join(hpack_literal(n, v) for n, v in (
        (b":method", b"POST"), (b":scheme", b"http"),
        (b":path", b"/snix.castore.v1.BlobService/Put"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    sock.sendall(PREFACE + frame(4, 0, 0) + frame(1, 0x4, 1, hdrs))


def read_frames_until_eof(sock):
    """Frame types the server sent until it closed the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    types, pos = [], 0
    while pos + 9 <= len(data):
        n = int.from_bytes(data[pos:pos + 3], "big")
        types.append(data[pos + 3])
        pos += 9 + n
    return types


# --- the server process, seen from /proc ------------------------------------

def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def fds_of(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_ticks(pid):
    """utime + stime of the whole process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


def wait_until(what, cond, tries=600):
    """Waits for a condition of the server's state (bounded, not timed)."""
    ev = threading.Event()
    for _ in range(tries):
        if cond():
            return
        ev.wait(0.05)
    raise AssertionError(f"never: {what}")


def stat_ok(pb, target, package="tvix"):
    c = Client(pb, target, package)
    try:
        d = b3(b"x")
        return code_of(lambda: c.stat(c.B.StatBlobRequest(digest=d)))
    finally:
        c.close()


def stop_and_stderr(s):
    s.proc.send_signal(signal.SIGTERM)
    _, err = s.proc.communicate(timeout=20)
    return err.decode()


# --- snix's names and tvix's -------------------------------------------------

def test_serve_answers_both_package_names(pb, tmp_path, serve):
    s = serve(tmp_path / "srv")
    snix, tvix = Client(pb, s.address, "snix"), Client(pb, s.address, "tvix")
    data = pattern_bytes(300_000)
    d = snix.put_bytes(data)
    assert d == b3(data)
    assert tvix.read_bytes(d) == data
    assert snix.read_bytes(tvix.put_bytes(b"abc")) == b"abc"
    for c in (snix, tvix):
        assert code_of(lambda: c.stat(c.B.StatBlobRequest(digest=d))) == grpc.StatusCode.OK
    C, D = snix.C, snix.D
    leaf = C.Directory(files=[C.FileNode(name=b"f", digest=d, size=len(data))])
    ld = snix.dput(iter([leaf])).root_digest
    assert ld == b3(leaf.SerializeToString())
    assert [m.SerializeToString() for m in tvix.dget(D.GetDirectoryRequest(digest=ld))] == \
        [leaf.SerializeToString()]
    other = Client(pb, s.address, "nix")
    assert code_of(lambda: other.stat(other.B.StatBlobRequest(digest=d))) == \
        grpc.StatusCode.UNIMPLEMENTED
    for c in (snix, tvix, other):
        c.close()


@pytest.mark.parametrize("package", ["snix", "tvix"])
def test_client_speaks_each_name(pb, tmp_path, filled, tree, package):
    """push and an empty cache's export against a grpcio server that knows
    one name only; the client asks snix's first and, against tvix's,
    falls back once per process."""
    m = MemoryServer(pb, package)
    try:
        run(["push", m.url, "t"], store=filled)
        run(["--cache", tmp_path / "c", "roots", "add", "t", "--directory",
             root_digest(filled), "--size", "1"], store=m.url)
        out = tmp_path / "out"
        run(["--cache", tmp_path / "c", "export", "t", out], store=m.url)
        assert trees_equal(tree, out)
        if package == "snix":
            assert m.unknown == []
        else:
            # One snix attempt per process (push, roots add asks nothing,
            # export): the choice is remembered for every later call.
            assert len(m.unknown) == 2, m.unknown
            assert all(u.startswith("/snix.castore.v1.") for u in m.unknown)
    finally:
        m.stop()


def test_grpc_unix_single_slash(pb, tmp_path, serve, filled, tree):
    sock = tmp_path / "s.sock"
    serve(filled, f"unix:{sock}")
    out = tmp_path / "out"
    url = f"grpc+unix:{sock}"
    run(["--cache", tmp_path / "c", "roots", "add", "t", "--directory",
         root_digest(filled), "--size", "1"], store=url)
    run(["--cache", tmp_path / "c", "export", "t", out], store=url)
    assert trees_equal(tree, out)


# --- what a writer may do ------------------------------------------------------

def count_blob_files(store):
    return sum(len(fs) for _, _, fs in os.walk(store / "blobs"))


def test_serve_read_only_refuses_every_put(pb, tmp_path, serve, filled):
    before = count_blob_files(filled)
    s = serve(filled, args=["--read-only"])
    c = Client(pb, s.address, "snix")
    C, D = c.C, c.D
    data = pattern_bytes(500_000, seed=7)
    assert code_of(lambda: c.put_bytes(data)) == grpc.StatusCode.PERMISSION_DENIED
    leaf = C.Directory(symlinks=[C.SymlinkNode(name=b"l", target=b"t")])
    assert code_of(lambda: c.dput(iter([leaf]))) == grpc.StatusCode.PERMISSION_DENIED
    # Reading still works.
    root = bytes.fromhex(root_digest(filled))
    assert len(list(c.dget(D.GetDirectoryRequest(digest=root, recursive=True)))) > 1
    c.close()
    s.stop()
    assert count_blob_files(filled) == before
    assert run(["dir", "get", b3(leaf.SerializeToString()).hex()], store=filled,
               check=False).returncode == 1


def test_serve_reserve_refuses_put(pb, tmp_path, serve):
    st = tmp_path / "srv"
    run(["blob", "put", "-"], store=st, input=b"seed")
    s = serve(st, args=["--reserve", "1000T"])
    c = Client(pb, s.address)
    C = c.C
    assert code_of(lambda: c.put_bytes(b"abc" * 1000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    leaf = C.Directory(symlinks=[C.SymlinkNode(name=b"l", target=b"t")])
    assert code_of(lambda: c.dput(iter([leaf]))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    c.close()
    s.stop()
    s = serve(st, args=["--reserve", "0"])
    c = Client(pb, s.address)
    assert c.put_bytes(b"abc" * 1000) == b3(b"abc" * 1000)
    c.close()


def varint(n):
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7f | 0x80])
        n >>= 7
    return out + bytes([n])


def directory_messages(n, seed):
    """n distinct canonical leaf Directories of about 4 KiB each (16 files
    with 194-byte names, sorted), as raw bytes."""
    digest = bytes(range(32))
    for i in range(n):
        files = b""
        for j in range(16):
            name = b"%08d-%02d-%d-" % (i, j, seed) + b"n" * 180
            node = b"\x0a" + varint(len(name)) + name + b"\x12\x20" + digest + b"\x18\x05"
            files += b"\x12" + varint(len(node)) + node
        yield files


def test_serve_large_directory_put_stays_bounded(pb, tmp_path, serve):
    """A Put of 128 MiB of Directories: the server commits as it goes, so
    its anonymous memory grows by far less than the stream."""
    st = tmp_path / "srv"
    env = dict(os.environ)
    # ASan keeps freed memory in quarantine (256 MiB by default): what is
    # measured is the server's own holding.
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=4"
    s = serve(st, env=env)
    c = Client(pb, s.address)
    pid = s.proc.pid
    assert c.put_bytes(b"warm") == b3(b"warm")
    base = rss_anon_kib(pid)
    peak = [base]
    n = 32 * 1024
    last = []

    def msgs():
        for i, m in enumerate(directory_messages(n, 1)):
            if i % 512 == 0:
                peak[0] = max(peak[0], rss_anon_kib(pid))
            last[:] = [m]
            yield m
    resp = c.raw_dput(msgs())
    peak[0] = max(peak[0], rss_anon_kib(pid))
    assert resp.root_digest == b3(last[0])
    growth_mib = (peak[0] - base) / 1024
    assert growth_mib < 64, f"server grew by {growth_mib:.0f} MiB for a 128 MiB Put"
    c.close()
    s.stop()
    # Every step was committed: the first and the last are stored.
    first = next(directory_messages(1, 1))
    for raw in (first, last[0]):
        run(["dir", "get", b3(raw).hex()], store=st)


# --- connections ---------------------------------------------------------------

def test_serve_idle_flood_bounded_and_served(pb, tmp_path, serve):
    """800 idle connections from one address: the threads stay the pool's,
    the fds stay under the limit, and the next client is served."""
    s = serve(tmp_path / "srv")   # the defaults: 4 threads, 256 connections
    pid = s.proc.pid
    assert stat_ok(pb, s.address) == grpc.StatusCode.NOT_FOUND
    threads = threads_of(pid)
    host, port = s.address.rsplit(":", 1)
    socks = []
    try:
        for _ in range(800):
            socks.append(socket.create_connection((host, int(port))))
        assert stat_ok(pb, s.address, "snix") == grpc.StatusCode.NOT_FOUND
        assert threads_of(pid) <= threads
        # At most the limit stays open (plus the store's and the pool's).
        wait_until("idle connections closed", lambda: fds_of(pid) < 256 + 30)
        # The oldest were closed, with a GOAWAY (type 7) after SETTINGS.
        socks[0].settimeout(30)
        assert 7 in read_frames_until_eof(socks[0])
    finally:
        for k in socks:
            k.close()
    assert s.stop() == 0


def test_serve_idle_timeout_closes(pb, tmp_path, serve):
    s = serve(tmp_path / "srv", args=["--idle-timeout", "1"])
    host, port = s.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as k:
        k.sendall(PREFACE + frame(4, 0, 0))
        k.settimeout(60)
        assert 7 in read_frames_until_eof(k)   # GOAWAY, then closed
    assert stat_ok(pb, s.address) == grpc.StatusCode.NOT_FOUND


def test_serve_emfile_does_not_spin(pb, tmp_path, serve):
    """Under a limit of 64 fds, with every connection busy (a call open)
    and more waiting in the backlog, accept fails with EMFILE: the server
    pauses instead of spinning, and serves again once fds come back."""
    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    s = serve(tmp_path / "srv", args=["--threads", "1"], preexec_fn=low_nofile)
    pid = s.proc.pid
    host, port = s.address.rsplit(":", 1)
    busy = []
    try:
        for _ in range(90):
            k = socket.create_connection((host, int(port)))
            open_put_stream(k)
            busy.append(k)
        wait_until("fds exhausted", lambda: fds_of(pid) >= 60)
        t0 = cpu_ticks(pid)
        threading.Event().wait(3)
        ticks = cpu_ticks(pid) - t0
        # A spinning accept loop takes a core: ~300 ticks in 3 s.
        assert ticks < 40, f"{ticks} CPU ticks in 3 s while out of fds"
    finally:
        for k in busy:
            k.close()
    assert stat_ok(pb, s.address) == grpc.StatusCode.NOT_FOUND
    err = stop_and_stderr(s)
    assert err.count("Too many open files") == 1, err


def test_serve_refuses_a_live_socket(pb, tmp_path, serve, filled):
    sock = tmp_path / "s.sock"
    first = serve(filled, f"unix:{sock}")
    p = run(["serve", "--listen", f"unix:{sock}"], store=filled, check=False, timeout=30)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "a live server answers on this socket" in lines[0], lines
    p = run(["virtiofs", "--socket", sock], store=filled, check=False, timeout=30)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "a live server answers on this socket" in lines[0], lines
    # The first server still answers.
    assert stat_ok(pb, f"unix:{sock}") == grpc.StatusCode.NOT_FOUND
    # Once it is gone (SIGKILL: the socket stays), the path is taken over.
    first.stop(signal.SIGKILL)
    assert sock.exists()
    second = serve(filled, f"unix:{sock}")
    assert stat_ok(pb, f"unix:{sock}") == grpc.StatusCode.NOT_FOUND
    second.stop()


def test_serve_says_when_every_interface_listens(tmp_path, serve):
    st = tmp_path / "srv"
    s = serve(st, "127.0.0.1:0")
    assert "every network interface" not in stop_and_stderr(s)
    s = serve(st, ":0", args=["--read-only"])
    err = stop_and_stderr(s)
    assert "every network interface (read-only)" in err and err.count("\n") == 1, err
    s = serve(st, "0.0.0.0:0")
    err = stop_and_stderr(s)
    assert "every network interface, read-write" in err and err.count("\n") == 1, err
    p = run(["serve", "--help"], store=st)
    assert b"--read-only" in p.stdout and b"Exposing serve" in p.stdout


# --- the exposure docs/remote.md shows: nginx, TLS, client certificates -------

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    """A CA, a server certificate for localhost and a client certificate,
    all signed by the CA; and a client certificate signed by nobody."""
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=castore test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, extra in (("server", ["-addext", "subjectAltName=DNS:localhost"]),
                        ("client", []), ("stranger", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", *extra, cwd=d)
        if name == "stranger":
            openssl("req", "-x509", "-key", f"{name}.key", "-in", f"{name}.csr",
                    "-days", "2", "-out", f"{name}.crt", cwd=d)
        else:
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "2", "-copy_extensions", "copy",
                    "-out", f"{name}.crt", cwd=d)


def test_serve_behind_nginx_with_client_certificates(pb, tmp_path, serve, filled, tree):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx) or not shutil.which("openssl"):
        pytest.skip("nginx (nginx-light) or openssl missing")
    from test_remote import free_port
    tls, work = tmp_path / "tls", tmp_path / "nginx"
    make_certs(tls)
    work.mkdir()
    sock = work / "serve.sock"
    serve(tmp_path / "srv", f"unix:{sock}")
    port = free_port()
    conf = (ROOT / "docs" / "serve-nginx.conf").read_text()
    for old, new in (("user www-data;", "user root;"), ("listen 443", f"listen 127.0.0.1:{port}"),
                     ("/etc/castore/tls/clients-ca.crt", str(tls / "ca.crt")),
                     ("/etc/castore/tls/", f"{tls}/"), ("/run/castore/", f"{work}/"),
                     ("/var/log/castore/", f"{work}/"), ("/var/lib/castore/", f"{work}/")):
        assert old in conf, old
        conf = conf.replace(old, new)
    (work / "nginx.conf").write_text(conf)
    p = subprocess.Popen([nginx, "-c", str(work / "nginx.conf"), "-p", str(work),
                          "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        wait_until("nginx listening", lambda: subprocess.run(
            ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode != 7)
        ca = (tls / "ca.crt").read_bytes()

        def channel(who):
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=(tls / f"{who}.key").read_bytes(),
                certificate_chain=(tls / f"{who}.crt").read_bytes())
            return grpc.secure_channel(f"localhost:{port}", creds)

        C, B, D = pb
        ch = channel("client")
        put = ch.stream_unary("/snix.castore.v1.BlobService/Put",
                              B.BlobChunk.SerializeToString, B.PutBlobResponse.FromString)
        read = ch.unary_stream("/snix.castore.v1.BlobService/Read",
                               B.ReadBlobRequest.SerializeToString, B.BlobChunk.FromString)
        data = pattern_bytes(3_000_000, seed=3)   # over nginx's default body limit
        d = put(iter([B.BlobChunk(data=data[i:i + 500_000])
                      for i in range(0, len(data), 500_000)]), timeout=60).digest
        assert d == b3(data)
        assert b"".join(c.data for c in read(B.ReadBlobRequest(digest=d), timeout=60)) == data
        ch.close()
        # No certificate of the CA's: no call gets through.
        ch = channel("stranger")
        stat = ch.unary_unary("/snix.castore.v1.BlobService/Stat",
                              B.StatBlobRequest.SerializeToString, B.StatBlobResponse.FromString)
        assert code_of(lambda: stat(B.StatBlobRequest(digest=d), timeout=30)) != grpc.StatusCode.OK
        ch.close()

        # castore's own client through the same proxy: grpc+https://.
        url = f"grpc+https://localhost:{port}"
        env = {"SSL_CERT_FILE": str(tls / "ca.crt"),
               "CASTORE_TLS_CERT": str(tls / "client.crt"),
               "CASTORE_TLS_KEY": str(tls / "client.key")}
        run(["push", url, "t"], store=filled, env=env)
        out = tmp_path / "out"
        run(["--cache", tmp_path / "c", "roots", "add", "t", "--directory",
             root_digest(filled), "--size", "1"], store=url, env=env)
        run(["--cache", tmp_path / "c", "export", "t", out], store=url, env=env)
        assert trees_equal(tree, out)
        # Without the client certificate, or trusting another CA: one line.
        for bad in ({"SSL_CERT_FILE": str(tls / "ca.crt"), "CASTORE_TLS_CERT": ""},
                    dict(env, SSL_CERT_FILE=str(tls / "stranger.crt"))):
            c2 = tmp_path / f"c{len(bad)}"
            run(["--cache", c2, "roots", "add", "t", "--directory",
                 root_digest(filled), "--size", "1"], store=url, env=bad)
            p2 = run(["--cache", c2, "export", "t", tmp_path / "o2"],
                     store=url, env=bad, check=False)
            err = p2.stderr.decode().strip().splitlines()
            assert p2.returncode == 1, err
            # The first line says why (the proxy's refusal, or the
            # certificate); export adds its own line after it.
            assert url in err[0] and ("HTTP status 400" in err[0] or
                                      "TLS handshake" in err[0]), err
    finally:
        p.terminate()
        p.wait(timeout=20)
