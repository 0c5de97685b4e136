"""Remote stores end to end (issue 6): `castore serve` against Debian's
python3-grpcio with messages protoc generates from tvix's protos, `castore
push` into an in-memory Python gRPC server, an empty cache reading through
grpc+http:// and through a real nginx serving `castore publish`, corrupt
and unreachable remotes, SIGKILL in the middle of a Put, --cache-max.

Run: CASTORE_BIN=$PWD/build-remote/src/cli/castore /usr/bin/python3 -m pytest -q tests/integration/test_remote.py
"""
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest

from conftest import CASTORE, ROOT, copy_tree, pattern_bytes, run

grpc = pytest.importorskip("grpc")


# --- tvix protos -> Python ------------------------------------------------

def _compile_protos():
    """protoc --python_out for castore.proto and tvix's rpc protos, staged
    where tvix's import path ("tvix/castore/protos/castore.proto") finds
    them; returns the three modules."""
    if not shutil.which("protoc"):
        pytest.skip("protoc not found (Debian package protobuf-compiler)")
    out = Path(tempfile.mkdtemp(prefix="castore-remote-pb-"))
    stage = out / "tvix" / "castore" / "protos"
    stage.mkdir(parents=True)
    for name in ("castore.proto", "rpc_blobstore.proto", "rpc_directory.proto"):
        shutil.copy(ROOT / "protos" / name, stage / name)
    subprocess.run(["protoc", f"-I{out}", f"--python_out={out}",
                    *(f"tvix/castore/protos/{n}" for n in
                      ("castore.proto", "rpc_blobstore.proto", "rpc_directory.proto"))],
                   check=True)
    for d in (out / "tvix", out / "tvix" / "castore", stage):
        (d / "__init__.py").touch()
    sys.path.insert(0, str(out))
    from tvix.castore.protos import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2
    return castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2


@pytest.fixture(scope="module")
def pb():
    return _compile_protos()


def b3(data):
    p = subprocess.run(["b3sum", "--no-names", "-"], input=data,
                       capture_output=True, check=True)
    return bytes.fromhex(p.stdout.decode().strip())


def store_temp_fds(pid, store):
    """The unnamed temporary files (O_TMPFILE in STORE/tmp) process pid has
    open: a blob being written."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(store / "tmp") + "/"):
            found.append(target)
    return found


def wait_for(what, cond, timeout=60):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trees_equal(a, b):
    """Recursive comparison: names, types, bytes, symlink targets, x bit."""
    for root, dirs, files in os.walk(a):
        rel = os.path.relpath(root, a)
        other = os.path.join(b, rel)
        assert sorted(os.listdir(root)) == sorted(os.listdir(other)), rel
        for name in dirs + files:
            p, q = os.path.join(root, name), os.path.join(other, name)
            if os.path.islink(p):
                assert os.readlink(p) == os.readlink(q), (rel, name)
            elif os.path.isfile(p):
                assert os.path.isfile(q) and not os.path.islink(q), (rel, name)
                assert filecmp.cmp(p, q, shallow=False), (rel, name)
                assert bool(os.stat(p).st_mode & 0o111) == bool(os.stat(q).st_mode & 0o111)
    return True


def make_tree(path):
    """A small tree with every kind of entry, odd names included."""
    path.mkdir()
    (path / "empty").write_bytes(b"")
    (path / "small").write_bytes(b"hello\n")
    (path / "big").write_bytes(pattern_bytes(3 * 1024 * 1024 + 17))
    (path / "exe").write_bytes(b"#!/bin/sh\n")
    (path / "exe").chmod(0o755)
    (path / "sub" / "deeper").mkdir(parents=True)
    (path / "sub" / "deeper" / "x").write_bytes(pattern_bytes(5000, 3))
    (path / "sub" / "same").write_bytes(b"hello\n")
    (path / "emptydir").mkdir()
    os.symlink("small", path / "link")
    os.symlink("../nowhere", path / "sub" / "dangling")
    (path / "sp ace%\t").write_bytes(b"odd name\n")
    return path


@pytest.fixture
def tree(tmp_path):
    t = make_tree(tmp_path / "tree")
    copy_tree("/usr/include/linux", t / "include", limit_files=60)
    return t


@pytest.fixture
def filled(tmp_path, tree):
    """A local store holding `tree` as root "t"; returns the store path."""
    st = tmp_path / "store"
    run(["import", tree, "--name", "t"], store=st)
    return st


def root_digest(store, name="t", field=2):
    out = run(["roots", "list"], store=store).stdout.decode().splitlines()
    for line in out:
        parts = line.split()
        if parts[0] == name:
            return parts[field]
    raise AssertionError(out)


# --- castore serve --------------------------------------------------------

class Serve:
    def __init__(self, store, listen="127.0.0.1:0", args=(), **popen):
        self.proc = subprocess.Popen([CASTORE, "--store", str(store), "serve",
                                      "--listen", listen, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     **popen)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening on "), (line, self.proc.stderr.read())
        self.address = line.split()[-1]

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=20)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(store, listen="127.0.0.1:0", args=(), **popen):
        s = Serve(store, listen, args, **popen)
        servers.append(s)
        return s
    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


class Client:
    """castore gRPC through grpcio's generic API, under tvix's package name
    or snix's (package="snix")."""

    def __init__(self, pb, target, package="tvix"):
        C, B, D = pb
        self.C, self.B, self.D = C, B, D
        self.channel = grpc.insecure_channel(target)
        ch = _Renamed(self.channel, package)
        self.stat = ch.unary_unary("/tvix.castore.v1.BlobService/Stat",
                                   B.StatBlobRequest.SerializeToString,
                                   B.StatBlobResponse.FromString)
        self.read = ch.unary_stream("/tvix.castore.v1.BlobService/Read",
                                    B.ReadBlobRequest.SerializeToString,
                                    B.BlobChunk.FromString)
        self.put = ch.stream_unary("/tvix.castore.v1.BlobService/Put",
                                   B.BlobChunk.SerializeToString,
                                   B.PutBlobResponse.FromString)
        self.dget = ch.unary_stream("/tvix.castore.v1.DirectoryService/Get",
                                    D.GetDirectoryRequest.SerializeToString,
                                    C.Directory.FromString)
        self.dput = ch.stream_unary("/tvix.castore.v1.DirectoryService/Put",
                                    C.Directory.SerializeToString,
                                    D.PutDirectoryResponse.FromString)
        self.raw_stat = ch.unary_unary("/tvix.castore.v1.BlobService/Stat",
                                       lambda b: b, B.StatBlobResponse.FromString)
        self.raw_dput = ch.stream_unary("/tvix.castore.v1.DirectoryService/Put",
                                        lambda b: b, D.PutDirectoryResponse.FromString)

    def put_bytes(self, data, chunk=100_000):
        return self.put(iter([self.B.BlobChunk(data=data[i:i + chunk])
                              for i in range(0, len(data), chunk)] or
                             [self.B.BlobChunk()])).digest

    def read_bytes(self, digest):
        return b"".join(c.data for c in self.read(self.B.ReadBlobRequest(digest=digest)))

    def close(self):
        self.channel.close()


class _Renamed:
    """A channel whose method paths are in another package."""

    def __init__(self, channel, package):
        self.channel, self.package = channel, package

    def __getattr__(self, kind):
        def make(path, *a, **kw):
            path = path.replace("/tvix.castore.v1.", f"/{self.package}.castore.v1.")
            return getattr(self.channel, kind)(path, *a, **kw)
        return make


def code_of(fn):
    try:
        r = fn()
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
            list(r)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_serve_blobs_with_grpcio(pb, tmp_path, serve):
    st = tmp_path / "srv"
    s = serve(st)
    c = Client(pb, s.address)
    B = c.B
    for data in (b"", b"x", pattern_bytes(1 << 20), pattern_bytes(5 * 1024 * 1024 + 3, 7)):
        d = c.put_bytes(data)
        assert d == b3(data)
        c.stat(B.StatBlobRequest(digest=d))
        chunks = list(c.read(B.ReadBlobRequest(digest=d)))
        got = b"".join(x.data for x in chunks)
        assert got == data
        # Bounded chunks: never the whole blob in one message.
        assert all(len(x.data) <= 1 << 20 for x in chunks)
        # The store has it under its b3sum name.
        assert (st / "blobs" / d.hex()[:2] / d.hex()).read_bytes() == data
    # Putting again is fine and answers the same digest.
    assert c.put_bytes(b"x") == b3(b"x")
    absent = b3(b"not stored")
    assert code_of(lambda: c.stat(B.StatBlobRequest(digest=absent))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.read(B.ReadBlobRequest(digest=absent))) == grpc.StatusCode.NOT_FOUND
    for bad in (b"", b"\1" * 31, b"\1" * 33):
        assert code_of(lambda: c.stat(B.StatBlobRequest(digest=bad))) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.read(B.ReadBlobRequest(digest=bad))) == grpc.StatusCode.INVALID_ARGUMENT
    # Undecodable request bytes: that call fails, the server keeps going.
    assert code_of(lambda: c.raw_stat(b"\x0a\xff")) == grpc.StatusCode.INVALID_ARGUMENT
    c.stat(B.StatBlobRequest(digest=b3(b"x")))
    c.close()
    assert s.stop() == 0
    run(["verify"], store=st)


def test_serve_directories_with_grpcio(pb, tmp_path, serve, filled):
    s = serve(filled)
    c = Client(pb, s.address)
    C, D = c.C, c.D
    root = bytes.fromhex(root_digest(filled))
    got = list(c.dget(D.GetDirectoryRequest(digest=root, recursive=True)))
    digests = [b3(m.SerializeToString()) for m in got]
    assert digests[0] == root
    assert len(set(digests)) == len(digests)          # each digest once
    seen = {root}
    for m in got:                                     # parents first
        assert b3(m.SerializeToString()) in seen
        for dn in m.directories:
            seen.add(dn.digest)
    assert seen == set(digests) | {bytes.fromhex(
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")} or seen == set(digests)
    one = list(c.dget(D.GetDirectoryRequest(digest=root)))
    assert len(one) == 1 and one[0] == got[0]
    # Every file of the tree is readable and hashes to its name.
    for m in got:
        for f in m.files[:5]:
            data = c.read_bytes(f.digest)
            assert b3(data) == f.digest and len(data) == f.size

    # Put: leaves first, answer is the root; a second server gets it whole.
    st2 = tmp_path / "srv2"
    s2 = serve(st2)
    c2 = Client(pb, s2.address)
    for m in got:
        for f in m.files:
            c2.put_bytes(c.read_bytes(f.digest))
    r = c2.dput(iter(reversed(got)))
    assert r.root_digest == root
    assert [b3(m.SerializeToString()) for m in
            c2.dget(D.GetDirectoryRequest(digest=root, recursive=True))] == digests
    out = tmp_path / "out"
    c2.close()
    s2.stop()
    run(["roots", "add", "t", "--directory", root.hex(), "--size",
         str(sum(1 + d.size for d in got[0].directories) + len(got[0].files) +
             len(got[0].symlinks))],
        store=st2)
    run(["export", "t", out], store=st2)

    absent = b3(b"no such directory")
    assert code_of(lambda: c.dget(D.GetDirectoryRequest(digest=absent))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.dget(D.GetDirectoryRequest(digest=b"\0" * 5))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.dget(D.GetDirectoryRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    # Invalid Directories: unsorted, dangling child, bad name, garbage.
    leaf = C.Directory(files=[C.FileNode(name=b"a", digest=b3(b"a"), size=1)])
    unsorted = C.Directory(files=[C.FileNode(name=b"b", digest=b3(b"b"), size=1),
                                  C.FileNode(name=b"a", digest=b3(b"a"), size=1)])
    dangling = C.Directory(directories=[C.DirectoryNode(name=b"d", digest=absent, size=1)])
    badname = C.Directory(symlinks=[C.SymlinkNode(name=b"a/b", target=b"x")])
    for msgs in ([unsorted], [dangling], [badname], [leaf, dangling]):
        assert code_of(lambda: c.dput(iter(msgs))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.raw_dput(iter([b"\xff\xff"]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.dput(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT
    # All or nothing: the valid leaf of the refused stream was not stored.
    assert code_of(lambda: c.dget(D.GetDirectoryRequest(
        digest=b3(leaf.SerializeToString())))) == grpc.StatusCode.NOT_FOUND
    # A child stored before is enough (it need not be in the stream).
    sub = got[0].directories[0]
    parent = C.Directory(directories=[C.DirectoryNode(name=b"again", digest=sub.digest, size=sub.size)])
    assert c.dput(iter([parent])).root_digest == b3(parent.SerializeToString())
    c.close()
    s.stop()
    run(["verify"], store=filled)


def test_serve_many_clients_and_unix_socket(pb, tmp_path, serve, filled):
    sock = tmp_path / "castore.sock"
    s = serve(filled, f"unix:{sock}")
    datas = [pattern_bytes(200_000 + i * 1000, i) for i in range(8)]

    def worker(i):
        c = Client(pb, f"unix:{sock}")
        d = c.put_bytes(datas[i])
        for _ in range(5):
            assert c.read_bytes(d) == datas[i]
        c.close()
        return d
    with futures.ThreadPoolExecutor(8) as ex:
        ds = list(ex.map(worker, range(8)))
    assert ds == [b3(x) for x in datas]
    # grpc+unix:// as a remote store: an empty cache exports the tree.
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    r = root_digest(filled)
    run(["--cache", cache, "roots", "add", "t", "--directory", r, "--size", "1"],
        store=f"grpc+unix://{sock}")
    run(["--cache", cache, "export", "t", out], store=f"grpc+unix://{sock}")
    trees_equal(out, Path(tmp_path / "tree"))
    assert s.stop(signal.SIGINT) == 0
    assert not sock.exists()


def test_serve_malformed_frames(tmp_path, serve, filled):
    s = serve(filled)
    host, port = s.address.rsplit(":", 1)
    # Not HTTP/2 at all, then a compressed gRPC message, then an oversized
    # length: each fails its own connection or call only.
    with socket.create_connection((host, int(port))) as k:
        k.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        k.settimeout(5)
        try:
            k.recv(100)
        except OSError:
            pass
    for body in (b"\x01\x00\x00\x00\x02\x0a\x00", b"\x00\xff\xff\xff\xff\x0a"):
        p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-",
                            "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                            "-H", "te: trailers", "--data-binary", "@-",
                            f"http://{s.address}/tvix.castore.v1.BlobService/Stat"],
                           input=body, capture_output=True, timeout=30)
        assert b"grpc-status: 12" in p.stdout or b"grpc-status: 8" in p.stdout, p.stdout
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-",
                        "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                        "--data-binary", "x", f"http://{s.address}/no.Such/Method"],
                       capture_output=True, timeout=30)
    assert b"grpc-status: 12" in p.stdout
    # Still serving.
    out = tmp_path / "out"
    run(["--cache", tmp_path / "c", "roots", "add", "t", "--directory",
         root_digest(filled), "--size", "1"], store=f"grpc+http://{s.address}")
    run(["--cache", tmp_path / "c", "export", "t", out], store=f"grpc+http://{s.address}")
    assert s.stop() == 0


def test_sigkill_mid_put(pb, tmp_path, serve):
    st = tmp_path / "srv"
    s = serve(st)
    c = Client(pb, s.address)
    data = pattern_bytes(8 * 1024 * 1024, 11)
    killed = threading.Event()

    def slow_chunks():
        for i in range(0, len(data), 256 * 1024):
            yield c.B.BlobChunk(data=data[i:i + 256 * 1024])
            if i >= 2 * 1024 * 1024:
                killed.wait(60)  # the rest only once the server is gone

    errors = []

    def put():
        try:
            c.put(slow_chunks())
        except grpc.RpcError as e:
            errors.append(e.code())
    t = threading.Thread(target=put)
    t.start()
    # Killed while the blob is being written: its temporary file is open.
    wait_for("the server to write the blob",
             lambda: store_temp_fds(s.proc.pid, st))
    s.proc.kill()
    s.proc.wait()
    killed.set()
    t.join(30)
    assert errors, "the Put should have failed"
    c.close()
    run(["verify"], store=st)
    assert not (st / "blobs" / b3(data).hex()[:2] / b3(data).hex()).exists()
    s2 = serve(st)
    c2 = Client(pb, s2.address)
    assert c2.put_bytes(data, chunk=256 * 1024) == b3(data)
    assert c2.read_bytes(b3(data)) == data
    c2.close()
    s2.stop()
    run(["verify"], store=st)


def test_disconnect_mid_put_leaves_nothing(tmp_path, serve):
    st = tmp_path / "srv"
    s = serve(st)
    # A client that sends one whole BlobChunk and half of the next, then
    # is gone (curl -T - sends stdin as it comes).
    chunk = b"z" * 100000
    msg = b"\x0a" + bytes([0xa0, 0x8d, 0x06]) + chunk  # field 1, 100000 bytes
    body = b"\x00" + len(msg).to_bytes(4, "big") + msg
    body += bytes([0, 0, 0x10, 0, 0]) + b"\x0a" + b"\x80\x80\x04" + b"z" * 1000
    p = subprocess.Popen(["curl", "-s", "--http2-prior-knowledge", "-H",
                          "content-type: application/grpc", "-X", "POST", "-T", "-",
                          f"http://{s.address}/tvix.castore.v1.BlobService/Put"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        p.stdin.write(body)
        p.stdin.flush()
        # The first chunk is being written into the store's tmp/ ...
        wait_for("the server to start the blob",
                 lambda: store_temp_fds(s.proc.pid, st))
    finally:
        p.kill()
        p.wait()
    # ... and the disconnect drops it.
    wait_for("the server to drop the blob",
             lambda: not store_temp_fds(s.proc.pid, st))
    assert s.stop() == 0
    run(["verify"], store=st)
    tmp = st / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())
    blobs = st / "blobs"
    assert not blobs.exists() or not any(f for _, _, fs in os.walk(blobs) for f in fs)


# --- castore push into an in-memory Python server --------------------------

class _Unknown(grpc.GenericRpcHandler):
    """Records the paths no other handler took (grpcio answers them
    UNIMPLEMENTED)."""

    def __init__(self, log):
        self.log = log

    def service(self, details):
        self.log.append(details.method)
        return None


class MemoryServer:
    """An independent castore gRPC server (grpcio, in memory) under tvix's
    package name, or snix's (package="snix"); `unknown` lists the paths
    asked that it does not serve."""

    def __init__(self, pb, package="tvix"):
        C, B, D = pb
        self.C, self.B, self.D = C, B, D
        self.blobs, self.dirs = {}, {}
        self.unknown = []
        self.calls = {"Stat": 0, "BlobPut": 0, "DirGet": 0, "DirPut": 0, "Read": 0}
        self.corrupt = set()
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        h = grpc.method_handlers_generic_handler
        self.server.add_generic_rpc_handlers((
            h(f"{package}.castore.v1.BlobService", {
                "Stat": grpc.unary_unary_rpc_method_handler(
                    self.stat, B.StatBlobRequest.FromString, B.StatBlobResponse.SerializeToString),
                "Read": grpc.unary_stream_rpc_method_handler(
                    self.read, B.ReadBlobRequest.FromString, B.BlobChunk.SerializeToString),
                "Put": grpc.stream_unary_rpc_method_handler(
                    self.put, B.BlobChunk.FromString, B.PutBlobResponse.SerializeToString),
            }),
            h(f"{package}.castore.v1.DirectoryService", {
                "Get": grpc.unary_stream_rpc_method_handler(
                    self.dget, D.GetDirectoryRequest.FromString, lambda b: b),
                "Put": grpc.stream_unary_rpc_method_handler(
                    self.dput, lambda b: b, D.PutDirectoryResponse.SerializeToString),
            }),
            _Unknown(self.unknown),
        ))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"grpc+http://127.0.0.1:{self.port}"

    def stat(self, req, ctx):
        self.calls["Stat"] += 1
        if len(req.digest) != 32:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest")
        if req.digest not in self.blobs:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no blob")
        return self.B.StatBlobResponse()

    def read(self, req, ctx):
        self.calls["Read"] += 1
        data = self.blobs.get(req.digest)
        if data is None:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no blob")
        if req.digest in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        for i in range(0, max(len(data), 1), 100_000):
            yield self.B.BlobChunk(data=data[i:i + 100_000])

    def put(self, it, ctx):
        self.calls["BlobPut"] += 1
        data = b"".join(c.data for c in it)
        d = b3(data)
        self.blobs[d] = data
        return self.B.PutBlobResponse(digest=d)

    def dget(self, req, ctx):
        self.calls["DirGet"] += 1
        if req.digest not in self.dirs:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no directory")
        todo, seen = [req.digest], {req.digest}
        while todo:
            d = todo.pop(0)
            raw = self.dirs[d]
            yield raw
            if req.recursive:
                for dn in self.C.Directory.FromString(raw).directories:
                    if dn.digest not in seen:
                        seen.add(dn.digest)
                        todo.append(dn.digest)

    def dput(self, it, ctx):
        self.calls["DirPut"] += 1
        last, batch = None, {}
        for raw in it:
            m = self.C.Directory.FromString(raw)
            for dn in m.directories:
                if dn.digest not in batch and dn.digest not in self.dirs:
                    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "dangling")
            last = b3(raw)
            batch[last] = raw
        if last is None:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty")
        self.dirs.update(batch)
        return self.D.PutDirectoryResponse(root_digest=last)

    def stop(self):
        self.server.stop(None)


@pytest.fixture
def memserver(pb):
    s = MemoryServer(pb)
    yield s
    s.stop()


def try_mount(store, mnt, cache=None, extra=()):
    """Starts castore mount; returns the process, or None if mounting does
    not work on this build (the caller skips)."""
    mnt.mkdir(exist_ok=True)
    cmd = [CASTORE, "--store", str(store)]
    if cache:
        cmd += ["--cache", str(cache)]
    cmd += ["mount", str(mnt), *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(100):
        if os.path.ismount(mnt):
            return p
        if p.poll() is not None:
            return None
        time.sleep(0.1)
    p.kill()
    p.wait()
    return None


def unmount(p, mnt):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        subprocess.run(["umount", "-l", str(mnt)])
        p.kill()
        p.wait()


def test_push_and_read_back(tmp_path, filled, tree, memserver):
    run(["push", memserver.url, "t"], store=filled)
    n_blobs, n_dirs = len(memserver.blobs), len(memserver.dirs)
    assert n_blobs > 50 and n_dirs >= 4
    for d, data in memserver.blobs.items():
        assert b3(data) == d
    # Again: nothing is sent.
    before = dict(memserver.calls)
    run(["push", memserver.url, "t"], store=filled)
    assert memserver.calls["BlobPut"] == before["BlobPut"]
    assert memserver.calls["DirPut"] == before["DirPut"]

    # An empty cache in front of the Python server exports the same tree.
    cache = tmp_path / "cache"
    url = memserver.url
    r = root_digest(filled)
    run(["--cache", cache, "roots", "add", "t", "--directory", r, "--size", "1"], store=url)
    out = tmp_path / "out"
    run(["--cache", cache, "export", "t", out], store=url)
    trees_equal(tree, out)
    # Cached: the server is not asked again.
    reads = memserver.calls["Read"]
    run(["--cache", cache, "export", "t", tmp_path / "out2"], store=url)
    assert memserver.calls["Read"] == reads

    # One wrong byte: refused with the digest named, and not cached.
    victim = b3((tree / "sub" / "deeper" / "x").read_bytes())
    memserver.corrupt.add(victim)
    cache2 = tmp_path / "cache2"
    run(["--cache", cache2, "roots", "add", "t", "--directory", r, "--size", "1"], store=url)
    p = run(["--cache", cache2, "cat", "t/sub/deeper/x"], store=url, check=False)
    assert p.returncode == 1
    assert victim.hex() in p.stderr.decode()
    assert not (cache2 / "blobs" / victim.hex()[:2] / victim.hex()).exists()
    run(["--cache", cache2, "cat", "t/small"], store=url)
    memserver.corrupt.clear()
    p = run(["--cache", cache2, "cat", "t/sub/deeper/x"], store=url)
    assert p.stdout == (tree / "sub" / "deeper" / "x").read_bytes()


def test_push_resumes(tmp_path, filled, memserver):
    # Half of the blobs are there already (an interrupted push).
    full = MemoryServer(memserver.B and (memserver.C, memserver.B, memserver.D))
    run(["push", full.url, "t"], store=filled)
    items = sorted(full.blobs.items())
    full.stop()
    for d, data in items[: len(items) // 2]:
        memserver.blobs[d] = data
    run(["push", memserver.url, "t"], store=filled)
    assert memserver.calls["BlobPut"] == len(items) - len(items) // 2
    assert memserver.blobs.keys() == dict(items).keys()


def test_mount_grpc_remote(tmp_path, filled, tree, memserver):
    run(["push", memserver.url, "t"], store=filled)
    cache = tmp_path / "cache"
    url = memserver.url
    # The size must be the Directory's own: the mount numbers inodes by it
    # and refuses a folder whose size disagrees (docs/filesystem.md).
    run(["--cache", cache, "roots", "add", "t", "--directory", root_digest(filled),
         "--size", root_digest(filled, field=3)], store=url)
    mnt = tmp_path / "mnt"
    p = try_mount(url, mnt, cache)
    if p is None:
        pytest.skip("castore mount does not work in this build")
    try:
        trees_equal(tree, mnt / "t")
    finally:
        unmount(p, mnt)


# --- publish + nginx ------------------------------------------------------

class Nginx:
    def __init__(self, root, workdir):
        if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
            pytest.skip("nginx not installed (Debian package nginx-light)")
        self.port = free_port()
        self.dir = workdir
        workdir.mkdir(exist_ok=True)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {workdir}/access.log;
  client_body_temp_path {workdir};
  proxy_temp_path {workdir};
  fastcgi_temp_path {workdir};
  uwsgi_temp_path {workdir};
  scgi_temp_path {workdir};
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
  }}
}}
""")
        self.proc = None
        self.start()

    def start(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(self.conf), "-p", str(self.dir)],
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(self.proc.stderr.read())
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def requests(self):
        return (self.dir / "access.log").read_text()


def publish_leftovers(pub):
    """What publish left outside the layout: files in its work folder
    beside DIR (docs/remote.md), and no DIR/tmp at all. gc.lock and
    roots.history are state kept there on purpose (gc --published)."""
    assert not (pub / "tmp").exists()
    st = pub.stat()
    work = pub.parent / f".castore-publish.{st.st_dev:x}.{st.st_ino:x}"
    return sorted(p for p in work.rglob("*")
                  if p.name not in ("gc.lock", "roots.history")) if work.exists() else []


@pytest.fixture
def published(tmp_path, filled):
    pub = tmp_path / "pub"
    run(["publish", pub], store=filled)
    return pub


@pytest.fixture
def nginx(tmp_path, published):
    n = Nginx(published, tmp_path / "nginx")
    yield n
    n.stop()


def test_publish_layout(tmp_path, filled, tree, published):
    r = root_digest(filled)
    assert (published / "directories" / r[:2] / r).is_file()
    data = (tree / "big").read_bytes()
    d = b3(data).hex()
    assert (published / "blobs" / d[:2] / d).read_bytes() == data
    roots = (published / "roots").read_text().splitlines()
    assert any(line.startswith("t\t") for line in roots)
    # Every Directory file hashes to its name; every blob too (one b3sum).
    paths = [Path(root) / f for kind in ("blobs", "directories")
             for root, _, files in os.walk(published / kind) for f in files]
    sums = subprocess.run(["b3sum", "--no-names", *map(str, paths)],
                          capture_output=True, check=True).stdout.decode().split()
    assert sums == [p.name for p in paths]
    # Publishing again writes nothing new and keeps the files as they are.
    stamp = {p: p.stat().st_mtime_ns for p in published.rglob("*") if p.is_file()
             and p.name != "roots"}
    run(["publish", published], store=filled)
    after = {p: p.stat().st_mtime_ns for p in published.rglob("*") if p.is_file()
             and p.name != "roots"}
    assert after == stamp
    # A second root under another name: both are published, the new
    # objects only are added.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "new").write_bytes(b"new content\n")
    run(["import", extra, "--name", "other"], store=filled)
    run(["publish", published, "other"], store=filled)
    names = [line.split("\t")[0] for line in (published / "roots").read_text().splitlines()
             if not line.startswith("#")]
    assert sorted(names) == ["other", "t"]
    assert not publish_leftovers(published)


def expected_packs(pb, published):
    """The pack each published Directory must have, worked out here from
    the Directory files and the blob files (docs/remote.md): its files of
    1 to 64 KiB back to back, in its order, when there are two or more."""
    castore_pb2 = pb[0]
    want = {}
    for f in (published / "directories").rglob("*"):
        if not f.is_file():
            continue
        d = castore_pb2.Directory()
        d.ParseFromString(f.read_bytes())
        small = [x.digest.hex() for x in d.files if 0 < x.size <= 65536]
        if len(small) >= 2:
            want[f.name] = b"".join((published / "blobs" / h[:2] / h).read_bytes()
                                    for h in small)
    return want


def published_packs(published):
    return {p.name: p for p in (published / "packs").rglob("*") if p.is_file()}


def test_publish_packs(pb, published):
    want = expected_packs(pb, published)
    assert len(want) >= 2  # the root and include/ at least
    got = {name: p.read_bytes() for name, p in published_packs(published).items()}
    assert got == want


def request_counts(log):
    """GETs per folder of the layout, and the statuses of the pack ones."""
    counts, pack_status = {}, set()
    for line in log.splitlines():
        path, status = line.split('"')[1].split()[1], line.split('"')[2].split()[0]
        kind = path.split("/")[1]
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "packs":
            pack_status.add(status)
    return counts, pack_status


def export_counting(tmp_path, tree, published, nginx):
    """Exports root t through nginx into an empty cache (checked equal, and
    verified); returns the GETs per folder, the statuses of the pack ones,
    and how many blobs the layout has."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    run(["--cache", cache, "export", "t", out], store=nginx.url)
    trees_equal(tree, out)
    assert "no problems" in run(["verify"], store=cache).stdout.decode()
    counts, pack_status = request_counts(nginx.requests())
    n_blobs = sum(1 for p in (published / "blobs").rglob("*") if p.is_file())
    return counts, pack_status, n_blobs


def test_http_export_uses_packs(tmp_path, tree, published, nginx):
    counts, pack_status, n_blobs = export_counting(tmp_path, tree, published, nginx)
    # Ranges of packs (206), and fewer blob GETs than blobs: the small
    # files came with their Directory's pack.
    assert counts.get("packs", 0) >= 1 and pack_status == {"206"}
    assert counts.get("blobs", 0) < n_blobs - 30


@pytest.mark.parametrize("damage", ["corrupt", "absent"])
def test_http_bad_packs_fall_back(tmp_path, tree, published, nginx, damage):
    # Packs of wrong bytes, or a layout without packs: the blobs are
    # fetched one by one, and nothing wrong is cached.
    for p in published_packs(published).values():
        if damage == "absent":
            p.unlink()
        else:
            p.write_bytes(bytes(b ^ 0x20 for b in p.read_bytes()))
    counts, _, n_blobs = export_counting(tmp_path, tree, published, nginx)
    assert counts.get("blobs", 0) >= n_blobs - 1  # the empty blob is never asked


def test_publish_tree_file(pb, filled, published):
    # The root's Directories, each as a varint length and its bytes, the
    # root first, each after one that names it, each once: every
    # Directory file of the layout (all belong to root t).
    castore_pb2 = pb[0]
    r = root_digest(filled)
    data = (published / "trees" / r[:2] / r).read_bytes()
    msgs, pos = [], 0
    while pos < len(data):
        n, shift = 0, 0
        while True:
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        msgs.append(data[pos:pos + n])
        pos += n
    assert pos == len(data)
    digests = [b3(m).hex() for m in msgs]
    assert digests[0] == r and len(set(digests)) == len(digests)
    files = {p.name for p in (published / "directories").rglob("*") if p.is_file()}
    empty = b3(b"").hex()
    assert set(digests) == files - {empty} or set(digests) == files
    named = {r}
    for m in msgs:
        d = castore_pb2.Directory()
        d.ParseFromString(m)
        assert b3(m).hex() in named
        named |= {x.digest.hex() for x in d.directories}


def layout_closed(pb, pub):
    """Every Directory file of a layout promises what it names: the
    Directory files below it, its blobs, and its pack when it has two or
    more files of 1 to 64 KiB. Returns how many Directory files there are."""
    castore_pb2 = pb[0]
    dirs = [p for p in (pub / "directories").rglob("*") if p.is_file()]
    for f in dirs:
        d = castore_pb2.Directory()
        d.ParseFromString(f.read_bytes())
        for x in d.directories:
            h = x.digest.hex()
            assert (pub / "directories" / h[:2] / h).is_file(), (f.name, h)
        for x in d.files:
            h = x.digest.hex()
            assert (pub / "blobs" / h[:2] / h).stat().st_size == x.size, (f.name, h)
        if sum(1 for x in d.files if 0 < x.size <= 65536) >= 2:
            assert (pub / "packs" / f.name[:2] / f.name).is_file(), f.name
    return len(dirs)


def test_publish_failed_then_again(pb, tmp_path):
    """Publish names its objects in groups (one syncfs each), leaves
    first. One that fails part way (a blob missing from the store) says
    which blob, writes no roots file, leaves nothing behind, and every
    Directory it named promises all it names; publishing again, once the
    blob is back, completes the layout. Data: /usr/share/doc."""
    store, pub = tmp_path / "store", tmp_path / "pub"
    run(["import", "/usr/share/doc", "--name", "doc"], store=store)
    # A blob file of the store (over 64 KiB) met late in publish's order.
    src = sorted((p for p in Path("/usr/share/doc").rglob("*")
                  if p.is_file() and not p.is_symlink()
                  and p.stat().st_size > 65536), key=str)[-1]
    h = b3(src.read_bytes()).hex()
    blob = store / "blobs" / h[:2] / h
    assert blob.is_file()
    aside = tmp_path / "aside"
    blob.rename(aside)
    p = run(["publish", pub], store=store, check=False)
    assert p.returncode != 0
    assert h in p.stderr.decode()
    assert not (pub / "roots").exists()
    assert not publish_leftovers(pub)
    named = layout_closed(pb, pub)
    assert named > 0  # groups before the failure were named
    aside.rename(blob)
    run(["publish", pub], store=store)
    assert (pub / "roots").read_text().count("\ndoc\t") == 1
    r = root_digest(store, "doc")
    assert (pub / "directories" / r[:2] / r).is_file()
    assert layout_closed(pb, pub) > named
    assert not publish_leftovers(pub)
    dest = tmp_path / "dest"
    run(["export", "doc", dest], store=store)
    trees_equal("/usr/share/doc", dest)


def test_publish_same_pid_concurrently(pb, tmp_path):
    """Two publishers into one folder, each pid 1 of its own pid namespace
    (as in two containers), publishing different trees at once: their
    unnamed objects wait side by side in the work folder, and none is ever named with
    the other's bytes. Data: /usr/share/doc and /usr/include."""
    pub = tmp_path / "pub"
    procs = []
    for name, src in (("doc", "/usr/share/doc"), ("inc", "/usr/include")):
        store = tmp_path / name
        run(["import", src, "--name", name], store=store)
        procs.append(subprocess.Popen(
            ["unshare", "--pid", "--fork", CASTORE, "--store", str(store),
             "publish", str(pub)], stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    # Every object holds the bytes its name promises.
    files = [f for kind in ("blobs", "directories")
             for f in (pub / kind).rglob("*") if f.is_file()]
    assert len(files) > 2 * 4096  # more than a group each
    sums = subprocess.run(["xargs", "-0", "b3sum"], check=True, capture_output=True,
                          input=b"\0".join(bytes(f) for f in files)).stdout
    lines = sums.decode().splitlines()
    assert len(lines) == len(files)
    for line in lines:
        digest, path = line.split(None, 1)
        assert Path(path).name == digest, line
    layout_closed(pb, pub)
    assert not publish_leftovers(pub)
    # The roots file is replaced whole by each (the last one wins); once
    # both published again, both roots are there, with their Directories.
    for name in ("doc", "inc"):
        run(["publish", pub], store=tmp_path / name)
    roots = (pub / "roots").read_text()
    for name in ("doc", "inc"):
        assert f"\n{name}\t" in roots
        r = root_digest(tmp_path / name, name)
        assert (pub / "directories" / r[:2] / r).is_file()


@pytest.mark.parametrize("damage", ["none", "corrupt", "absent"])
def test_http_tree_file(tmp_path, filled, tree, published, nginx, damage):
    # One GET for the whole tree of Directories; a tree file with a wrong
    # byte, or none, costs the Directory files' GETs, never a wrong byte.
    r = root_digest(filled)
    f = published / "trees" / r[:2] / r
    if damage == "absent":
        f.unlink()
    elif damage == "corrupt":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    counts, _, _ = export_counting(tmp_path, tree, published, nginx)
    assert counts.get("trees", 0) == 1
    if damage == "none":
        assert counts.get("directories", 0) == 0
    else:
        assert counts.get("directories", 0) >= 4


def test_http_server_ignoring_range(tmp_path, tree, published):
    # Python's http.server answers a Range request with the whole file
    # (200): the reader takes its range out of it.
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(published))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        cache = tmp_path / "cache"
        out = tmp_path / "out"
        run(["--cache", cache, "export", "t", out], store=url)
        trees_equal(tree, out)
        assert "no problems" in run(["verify"], store=cache).stdout.decode()
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_export_equal(tmp_path, tree, nginx):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    p = run(["--cache", cache, "roots", "list"], store=nginx.url)
    assert p.stdout.decode().split()[0] == "t"
    run(["--cache", cache, "export", "t", out], store=nginx.url)
    trees_equal(tree, out)
    # Everything is cached now: with nginx gone, the same export works.
    nginx.stop()
    p = run(["--cache", cache, "cat", "t/big"], store=nginx.url)
    assert p.stdout == (tree / "big").read_bytes()


def test_http_corrupt_blob_refused(tmp_path, tree, published, nginx):
    data = (tree / "sub" / "deeper" / "x").read_bytes()
    d = b3(data).hex()
    f = published / "blobs" / d[:2] / d
    bad = bytearray(data)
    bad[100] ^= 0x40
    f.write_bytes(bytes(bad))
    cache = tmp_path / "cache"
    p = run(["--cache", cache, "cat", "t/sub/deeper/x"], store=nginx.url, check=False)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert d in err and "hash" in err
    assert not (cache / "blobs" / d[:2] / d).exists()
    # The rest still works, and the fixed file is taken.
    run(["--cache", cache, "cat", "t/small"], store=nginx.url)
    f.write_bytes(data)
    p = run(["--cache", cache, "cat", "t/sub/deeper/x"], store=nginx.url)
    assert p.stdout == data


def test_http_corrupt_directory_refused(tmp_path, filled, published, nginx):
    r = root_digest(filled)
    # Without the root's tree file, which has the right bytes.
    (published / "trees" / r[:2] / r).unlink()
    f = published / "directories" / r[:2] / r
    good = f.read_bytes()
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    cache = tmp_path / "cache"
    p = run(["--cache", cache, "ls", "t"], store=nginx.url, check=False)
    assert p.returncode == 1 and r in p.stderr.decode()
    f.write_bytes(good)
    run(["--cache", cache, "ls", "t"], store=nginx.url)


def test_http_unreachable_then_back(tmp_path, tree, nginx):
    cache = tmp_path / "cache"
    run(["--cache", cache, "ls", "t"], store=nginx.url)
    nginx.stop()
    p = run(["--cache", cache, "cat", "t/big"], store=nginx.url, check=False)
    assert p.returncode == 1
    err = p.stderr.decode().strip()
    assert err and "Traceback" not in err
    nginx.start()
    p = run(["--cache", cache, "cat", "t/big"], store=nginx.url)
    assert p.stdout == (tree / "big").read_bytes()


def test_http_mount(tmp_path, tree, nginx):
    mnt = tmp_path / "mnt"
    cache = tmp_path / "cache"
    p = try_mount(nginx.url, mnt, cache)
    if p is None:
        pytest.skip("castore mount does not work in this build")
    try:
        trees_equal(tree, mnt / "t")
        # A blob corrupted on the server: EIO through the mount, not cached.
        data = (tree / "sub" / "same").read_bytes()
        assert (mnt / "t" / "sub" / "same").read_bytes() == data
    finally:
        unmount(p, mnt)


def test_http_mount_eio(tmp_path, tree, published, nginx):
    data = pattern_bytes(777_777, 5)
    extra = tmp_path / "e"
    extra.mkdir()
    (extra / "f").write_bytes(data)
    d = b3(data).hex()
    mnt = tmp_path / "mnt"
    cache = tmp_path / "cache"
    p0 = try_mount(nginx.url, mnt, cache)
    if p0 is None:
        pytest.skip("castore mount does not work in this build")
    unmount(p0, mnt)
    st = tmp_path / "store"
    run(["import", extra, "--name", "e"], store=st)
    run(["publish", published, "e"], store=st)
    f = published / "blobs" / d[:2] / d
    f.write_bytes(b"X" + data[1:])
    p = try_mount(nginx.url, mnt, cache)
    try:
        with pytest.raises(OSError) as e:
            (mnt / "e" / "f").read_bytes()
        assert e.value.errno == 5
        assert not (cache / "blobs" / d[:2] / d).exists()
    finally:
        unmount(p, mnt)


def test_cache_max(tmp_path, published, nginx):
    # Ten 1 MiB blobs through a cache bounded to 3 MiB.
    st = tmp_path / "store2"
    src = tmp_path / "many"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(pattern_bytes(1 << 20, i + 1))
    run(["import", src, "--name", "many"], store=st)
    run(["publish", published, "many"], store=st)
    cache = tmp_path / "cache"
    for i in range(10):
        p = run(["--cache", cache, "--cache-max", "3M", "cat", f"many/f{i}"], store=nginx.url)
        assert p.stdout == (src / f"f{i}").read_bytes()
        total = sum(f.stat().st_size for f in (cache / "blobs").rglob("*") if f.is_file())
        assert total <= 3 << 20
    # The most recent one is kept.
    d = b3((src / "f9").read_bytes()).hex()
    assert (cache / "blobs" / d[:2] / d).exists()
    # What is left is intact (verify would call evicted blobs missing).
    for f in (cache / "blobs").rglob("*"):
        if f.is_file() and len(f.name) == 64:
            assert b3(f.read_bytes()).hex() == f.name


def test_sigterm_mid_put_stops_cleanly(pb, tmp_path, serve):
    st = tmp_path / "srv"
    s = serve(st)
    c = Client(pb, s.address)
    data = pattern_bytes(4 * 1024 * 1024, 13)
    stopped = threading.Event()

    def slow_chunks():
        for i in range(0, len(data), 128 * 1024):
            yield c.B.BlobChunk(data=data[i:i + 128 * 1024])
            if i >= 512 * 1024:
                stopped.wait(60)  # the rest only once the server is gone

    errors = []

    def put():
        try:
            c.put(slow_chunks())
        except grpc.RpcError as e:
            errors.append(e.code())
    t = threading.Thread(target=put)
    t.start()
    wait_for("the server to write the blob",
             lambda: store_temp_fds(s.proc.pid, st))
    # The server ends although the Put is unfinished, exit 0, and that
    # Put leaves nothing behind.
    assert s.stop(signal.SIGTERM) == 0
    stopped.set()
    t.join(30)
    assert errors
    c.close()
    run(["verify"], store=st)
    d = b3(data).hex()
    assert not (st / "blobs" / d[:2] / d).exists()
    assert not any((st / "tmp").iterdir()) if (st / "tmp").exists() else True
