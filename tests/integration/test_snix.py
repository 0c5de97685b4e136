"""snix's chunked blobs over gRPC (issue 17), with Debian's python3-grpcio
under snix's names only:

- a grpcio client against `castore serve`: Stat with send_chunks (the
  list adds up, each chunk is its own digest and readable by Read) and
  send_bao (the outboard castore-bao-tool computes, which test_bao checks
  against an independent tree), Put, Directory Get/Put, and the
  BlobStoreService and ChunkStoreService of 2026 (PutChunk, PutBlob of a
  BlobMeta, GetBlob, StatBlob, StatChunk, GetChunk);
- an in-memory grpcio server that keeps a large blob as chunks only, read
  through `castore mount --store grpc+http://...`: its request log shows
  the chunks were read one by one, a corrupt chunk or outboard fails that
  blob (and names the chunk) while other files still read.
"""
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path

import pytest

from conftest import CASTORE, ROOT, run
from test_remote import (Client, b3, code_of, pb, serve, try_mount,  # noqa: F401 (fixtures)
                         unmount)

grpc = pytest.importorskip("grpc")

TOOL = Path(CASTORE).resolve().parents[2] / "tests" / "core" / "castore-bao-tool"
TOOL_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")


@pytest.fixture(scope="module")
def spb():
    """protos/snix_chunks.proto compiled by protoc."""
    out = Path(tempfile.mkdtemp(prefix="castore-snix-pb-"))
    subprocess.run(["protoc", f"-I{ROOT / 'protos'}", f"--python_out={out}",
                    str(ROOT / "protos" / "snix_chunks.proto")], check=True)
    sys.path.insert(0, str(out))
    import snix_chunks_pb2
    yield snix_chunks_pb2
    shutil.rmtree(out, ignore_errors=True)


def big_data(size=3 << 20):
    """Not periodic (content-defined cuts would repeat a period's chunk)."""
    data = b"".join(p.read_bytes() for p in sorted(Path("/usr/include").glob("*.h")))
    while len(data) < size:
        data += data[::-1]
    return data[:size]


def outboard(tmp_path, data):
    """The blob's outboard, from core/bao through its test tool."""
    f, ob = tmp_path / "ob-in", tmp_path / "ob-out"
    f.write_bytes(data)
    subprocess.run([str(TOOL), "hash", str(f), str(ob)], check=True,
                   capture_output=True, env=TOOL_ENV)
    return ob.read_bytes()


class SnixStores:
    """BlobStoreService and ChunkStoreService stubs under snix's names."""

    def __init__(self, spb, target):
        self.S = spb
        self.channel = grpc.insecure_channel(target)
        ch, bs, cs = self.channel, "/snix.castore.v1.BlobStoreService/", \
            "/snix.castore.v1.ChunkStoreService/"
        S = spb
        self.stat_blob = ch.unary_unary(bs + "StatBlob", S.BSStatBlobRequest.SerializeToString,
                                        S.BSStatBlobResponse.FromString)
        self.get_blob = ch.unary_unary(bs + "GetBlob", S.GetBlobRequest.SerializeToString,
                                       S.GetBlobResponse.FromString)
        self.put_blob = ch.unary_unary(bs + "PutBlob", S.PutBlobRequest.SerializeToString,
                                       S.BSPutBlobResponse.FromString)
        self.stat_chunk = ch.unary_unary(cs + "StatChunk", S.StatChunkRequest.SerializeToString,
                                         S.StatChunkResponse.FromString)
        self.get_chunk = ch.unary_stream(cs + "GetChunk", S.GetChunkRequest.SerializeToString,
                                         S.GetChunkResponse.FromString)
        self.put_chunk = ch.stream_unary(cs + "PutChunk", S.PutChunkRequest.SerializeToString,
                                         S.PutChunkResponse.FromString)

    def close(self):
        self.channel.close()


def test_serve_stat_chunks_bao_and_read_chunks(pb, tmp_path, serve):
    st = tmp_path / "srv"
    data = big_data()
    src = tmp_path / "big"
    src.write_bytes(data)
    d = bytes.fromhex(run(["blob", "put", src], store=st).stdout.decode().strip())
    assert d == b3(data)
    s = serve(st)
    c = Client(pb, s.address, "snix")
    B = c.B

    resp = c.stat(B.StatBlobRequest(digest=d, send_chunks=True))
    assert len(resp.chunks) >= 3 and not resp.bao
    off = 0
    for ch in resp.chunks:
        piece = data[off:off + ch.size]
        assert 0 < ch.size <= 1 << 20
        assert ch.digest == b3(piece)
        assert c.read_bytes(ch.digest) == piece
        # A chunk is a blob of its own, with no finer list.
        assert list(c.stat(B.StatBlobRequest(digest=ch.digest, send_chunks=True)).chunks) == []
        off += ch.size
    assert off == len(data)
    # The same list as core/chunker gives through the test tool.
    out = subprocess.run([str(TOOL), "chunks", str(src)], check=True, capture_output=True,
                         env=TOOL_ENV).stdout.decode().split()
    assert [(x.digest.hex(), x.size) for x in resp.chunks] == \
        [(out[i], int(out[i + 1])) for i in range(0, len(out), 2)]

    resp = c.stat(B.StatBlobRequest(digest=d, send_bao=True))
    assert list(resp.chunks) == []
    assert resp.bao == outboard(tmp_path, data)
    both = c.stat(B.StatBlobRequest(digest=d, send_chunks=True, send_bao=True))
    assert len(both.chunks) >= 3 and both.bao == resp.bao

    # A small blob: no list, no outboard; the whole Read still works.
    small = c.put_bytes(b"hello snix\n")
    r = c.stat(B.StatBlobRequest(digest=small, send_chunks=True, send_bao=True))
    assert list(r.chunks) == [] and r.bao == b""
    assert c.read_bytes(d) == data
    assert code_of(lambda: c.stat(B.StatBlobRequest(digest=b"\1" * 32, send_chunks=True))) \
        == grpc.StatusCode.NOT_FOUND

    # Directories under snix's names.
    C, D = c.C, c.D
    leaf = C.Directory(files=[C.FileNode(name=b"big", digest=d, size=len(data))])
    ld = c.dput(iter([leaf])).root_digest
    top = C.Directory(directories=[C.DirectoryNode(name=b"sub", digest=ld, size=1)])
    td = c.dput(iter([leaf, top])).root_digest
    got = list(c.dget(D.GetDirectoryRequest(digest=td, recursive=True)))
    assert got == [top, leaf]
    c.close()


def test_serve_blobstore_and_chunkstore(pb, spb, tmp_path, serve):
    st = tmp_path / "srv"
    run(["blob", "put", "-"], store=st, input=b"a store")
    s = serve(st)
    x = SnixStores(spb, s.address)
    S = spb
    data = big_data(2_500_000)
    cuts = [0, 700_000, 1_500_000, 2_100_000, len(data)]
    pieces = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    for p in pieces:
        assert x.put_chunk(iter([S.PutChunkRequest(data=p[:100_000]),
                                 S.PutChunkRequest(data=p[100_000:])])).digest == b3(p)
        x.stat_chunk(S.StatChunkRequest(digest=b3(p)))
        assert b"".join(m.data for m in x.get_chunk(S.GetChunkRequest(digest=b3(p)))) == p
    d = b3(data)
    meta = S.BlobMeta(chunks=[S.BlobMeta.ChunkMeta(digest=b3(p), size=len(p)) for p in pieces])
    assert code_of(lambda: x.stat_blob(S.BSStatBlobRequest(digest=d))) == grpc.StatusCode.NOT_FOUND
    # A list that does not make up the blob is refused.
    assert code_of(lambda: x.put_blob(S.PutBlobRequest(
        digest=b"\2" * 32, blob_meta=meta))) == grpc.StatusCode.INVALID_ARGUMENT
    missing = S.BlobMeta(chunks=[S.BlobMeta.ChunkMeta(digest=b"\3" * 32, size=5)])
    assert code_of(lambda: x.put_blob(S.PutBlobRequest(digest=d, blob_meta=missing))) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: x.put_blob(S.PutBlobRequest(digest=d))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    x.put_blob(S.PutBlobRequest(digest=d, blob_meta=meta))
    x.stat_blob(S.BSStatBlobRequest(digest=d))
    assert x.get_blob(S.GetBlobRequest(digest=d)).blob_meta == meta
    c = Client(pb, s.address, "snix")
    assert c.read_bytes(d) == data
    # The list given is the one Stat and Read of chunks follow.
    assert [(m.digest, m.size) for m in
            c.stat(c.B.StatBlobRequest(digest=d, send_chunks=True)).chunks] == \
        [(b3(p), len(p)) for p in pieces]
    # A small blob is its own one chunk; the empty blob has none.
    small = c.put_bytes(b"tiny")
    assert [(m.digest, m.size) for m in x.get_blob(S.GetBlobRequest(digest=small)).blob_meta.chunks] \
        == [(small, 4)]
    empty = c.put_bytes(b"")
    assert list(x.get_blob(S.GetBlobRequest(digest=empty)).blob_meta.chunks) == []
    x.put_blob(S.PutBlobRequest(digest=empty, blob_meta=S.BlobMeta()))
    assert code_of(lambda: x.get_blob(S.GetBlobRequest(digest=b"\4" * 32))) \
        == grpc.StatusCode.NOT_FOUND
    x.close()
    c.close()
    run(["verify"], store=st)

    # Read-only: PutBlob and PutChunk are refused.
    s.stop()
    ro = serve(st, args=["--read-only"])
    y = SnixStores(spb, ro.address)
    assert code_of(lambda: y.put_blob(S.PutBlobRequest(digest=d, blob_meta=meta))) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: y.put_chunk(iter([S.PutChunkRequest(data=b"x")]))) \
        == grpc.StatusCode.PERMISSION_DENIED
    y.close()


class ChunkServer:
    """snix's BlobService and DirectoryService only (no tvix names), in
    memory, that keeps large blobs as chunks: Stat answers send_chunks
    with the list (and send_bao with the outboard, when given one); Read
    serves chunks and small blobs, and logs every digest asked."""

    def __init__(self, pb):
        C, B, D = pb
        self.C, self.B, self.D = C, B, D
        self.objects, self.lists, self.baos, self.dirs = {}, {}, {}, {}
        self.reads, self.stats = [], []
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        h = grpc.method_handlers_generic_handler
        self.server.add_generic_rpc_handlers((
            h("snix.castore.v1.BlobService", {
                "Stat": grpc.unary_unary_rpc_method_handler(
                    self.stat, B.StatBlobRequest.FromString, B.StatBlobResponse.SerializeToString),
                "Read": grpc.unary_stream_rpc_method_handler(
                    self.read, B.ReadBlobRequest.FromString, B.BlobChunk.SerializeToString),
            }),
            h("snix.castore.v1.DirectoryService", {
                "Get": grpc.unary_stream_rpc_method_handler(
                    self.dget, D.GetDirectoryRequest.FromString, lambda b: b),
            }),
        ))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"grpc+http://127.0.0.1:{self.port}"

    def add_chunked(self, data, cuts, bao=b""):
        d = b3(data)
        lst = []
        for a, b in zip(cuts, cuts[1:]):
            self.objects[b3(data[a:b])] = data[a:b]
            lst.append((b3(data[a:b]), b - a))
        self.lists[d] = lst
        self.baos[d] = bao
        return d

    def stat(self, req, ctx):
        self.stats.append(req.digest)
        r = self.B.StatBlobResponse()
        if req.digest in self.lists:
            if req.send_chunks:
                for cd, n in self.lists[req.digest]:
                    r.chunks.add(digest=cd, size=n)
            if req.send_bao:
                r.bao = self.baos[req.digest]
        elif req.digest not in self.objects:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no blob")
        return r

    def read(self, req, ctx):
        self.reads.append(req.digest)
        data = self.objects.get(req.digest)
        if data is None:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "chunked blobs are read by chunk")
        for i in range(0, max(len(data), 1), 100_000):
            yield self.B.BlobChunk(data=data[i:i + 100_000])

    def dget(self, req, ctx):
        if req.digest not in self.dirs:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no directory")
        yield self.dirs[req.digest]

    def add_dir(self, files):
        C = self.C
        raw = C.Directory(files=[C.FileNode(name=n, digest=d, size=s)
                                 for n, d, s in sorted(files)]).SerializeToString()
        self.dirs[b3(raw)] = raw
        return b3(raw), len(files)

    def stop(self):
        self.server.stop(None)


@pytest.fixture
def chunkserver(pb):
    s = ChunkServer(pb)
    yield s
    s.stop()


def mount_root(tmp_path, srv, digest, size, name, cache_name=None):
    cache = tmp_path / f"cache-{cache_name or name}"
    if not cache.exists():
        run(["--cache", cache, "roots", "add", "t", "--directory", digest.hex(),
             "--size", str(size)], store=srv.url)
    mnt = tmp_path / f"mnt-{name}"
    p = try_mount(srv.url, mnt, cache)
    if p is None:
        pytest.skip("castore mount does not work in this build")
    return p, mnt


def test_mount_reads_snix_chunks(tmp_path, chunkserver):
    srv = chunkserver
    data = big_data()
    cuts = [0, 300_000, 900_000, 1_000_001, 2_000_000, len(data)]
    good = srv.add_chunked(data, cuts, outboard(tmp_path, data))
    small = b"small file\n"
    srv.objects[b3(small)] = small
    root, n = srv.add_dir([(b"big", good, len(data)), (b"small", b3(small), len(small))])

    p, mnt = mount_root(tmp_path, srv, root, n, "good")
    try:
        assert (mnt / "t" / "big").read_bytes() == data
        assert (mnt / "t" / "small").read_bytes() == small
    finally:
        unmount(p, mnt)
    chunk_digests = [cd for cd, _ in srv.lists[good]]
    # Every chunk read by its own digest (a chunk that straddles two of
    # the cache's ranges is read for each); the whole blob never.
    assert {d for d in srv.reads if d in chunk_digests} == set(chunk_digests)
    assert good not in srv.reads
    assert good in srv.stats


@pytest.mark.parametrize("damage", ["chunk", "outboard"])
def test_mount_snix_corrupt_chunk_fails_its_blob(tmp_path, chunkserver, damage):
    srv = chunkserver
    data = big_data()
    cuts = [0, 400_000, 1_300_000, 2_200_000, len(data)]
    bao = outboard(tmp_path, data)
    d = srv.add_chunked(data, cuts, bao)
    small = b"still fine\n"
    srv.objects[b3(small)] = small
    root, n = srv.add_dir([(b"big", d, len(data)), (b"small", b3(small), len(small))])
    victim = srv.lists[d][2][0]
    if damage == "chunk":
        piece = srv.objects[victim]
        srv.objects[victim] = piece[:10] + bytes([piece[10] ^ 1]) + piece[11:]
    else:
        srv.baos[d] = bao[:100] + bytes([bao[100] ^ 1]) + bao[101:]

    p, mnt = mount_root(tmp_path, srv, root, n, damage)
    try:
        with pytest.raises(OSError) as e:
            (mnt / "t" / "big").read_bytes()
        assert e.value.errno == errno.EIO
        assert (mnt / "t" / "small").read_bytes() == small
    finally:
        unmount(p, mnt)
    err = p.stderr.read().decode()
    if damage == "chunk":
        # The failed range is named: a range's chunks are not hashed on
        # their own, the cache checks every byte it uses against the
        # blob's outboard, and the group holding the flipped byte fails.
        assert d.hex() in err and "do not match the blob's tree" in err, err
        assert victim in srv.reads
    else:
        assert "outboard" in err, err
        assert not any(cd in srv.reads for cd, _ in srv.lists[d])
    # Nothing wrong was cached: the same blob, mended, reads.
    if damage == "chunk":
        srv.objects[victim] = data[cuts[2]:cuts[3]]
    else:
        srv.baos[d] = bao
    p, mnt = mount_root(tmp_path, srv, root, n, damage + "-again", damage)
    try:
        assert (mnt / "t" / "big").read_bytes() == data
    finally:
        unmount(p, mnt)


def test_tvix_server_read_whole(tmp_path, pb):
    """A server that offers no chunk list (tvix's names, no send_chunks)
    is read with one Read of the whole blob, as before."""
    from test_remote import MemoryServer
    srv = MemoryServer(pb)
    try:
        data = big_data(2 << 20)
        srv.blobs[b3(data)] = data
        cache = tmp_path / "cache"
        out = run(["--cache", cache, "blob", "cat", b3(data).hex()], store=srv.url).stdout
        assert out == data
        assert srv.calls["Read"] == 1
    finally:
        srv.stop()


def test_mount_reads_snix_chunks_lazily(tmp_path, chunkserver):
    """With a list and an outboard, the cache holds the blob in part: a
    read of 4 KiB fetches the chunk that holds it, not the others; a
    corrupt chunk fails the reads of the 16 KiB group it corrupts alone
    (the bytes used are checked against the blob's outboard, not the
    chunk's digest: the rest of the chunk is the blob's, verified)."""
    srv = chunkserver
    data = big_data(6 << 20)
    cuts = [0, 1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000, len(data)]
    d = srv.add_chunked(data, cuts, outboard(tmp_path, data))
    root, n = srv.add_dir([(b"big", d, len(data))])
    chunk = [cd for cd, _ in srv.lists[d]]
    victim = chunk[4]
    piece = srv.objects[victim]
    srv.objects[victim] = piece[:10] + bytes([piece[10] ^ 1]) + piece[11:]

    p, mnt = mount_root(tmp_path, srv, root, n, "lazy")
    try:
        with open(mnt / "t" / "big", "rb") as f:
            f.seek(2_500_000)
            assert f.read(4096) == data[2_500_000:2_504_096]
            assert chunk[2] in srv.reads
            assert chunk[0] not in srv.reads and chunk[5] not in srv.reads
            # The flipped byte is at 4,000,010: its group fails.
            f.seek(4_000_000)
            with pytest.raises(OSError) as e:
                f.read(4096)
            assert e.value.errno == errno.EIO
            assert victim in srv.reads
            # Other ranges still read, of the same chunk too; the mended
            # chunk reads next time.
            f.seek(4_500_000)
            assert f.read(4096) == data[4_500_000:4_504_096]
            f.seek(1_500_000)
            assert f.read(4096) == data[1_500_000:1_504_096]
            srv.objects[victim] = piece
            f.seek(4_000_000)
            assert f.read(4096) == data[4_000_000:4_004_096]
    finally:
        unmount(p, mnt)
    assert d not in srv.reads


def test_mount_castore_serve_lazily_across_restart(tmp_path, serve):
    """Through castore serve (list and outboard), a mount reads a large
    file by range; a server restarted meanwhile (its chunk lists are in
    memory) is asked Stat again and the next range reads."""
    st = tmp_path / "srv"
    data = big_data(6 << 20)
    src = tmp_path / "big"
    src.write_bytes(data)
    d = run(["blob", "put", src], store=st).stdout.decode().strip()
    sock = tmp_path / "serve.sock"
    s = serve(st, listen=f"unix:{sock}")
    url = f"grpc+unix:{sock}"
    cache = tmp_path / "cache"
    run(["--cache", cache, "roots", "add", "big", "--file", d, "--size", str(len(data))],
        store=url)
    mnt = tmp_path / "mnt"
    p = try_mount(url, mnt, cache)
    if p is None:
        pytest.skip("castore mount does not work in this build")
    try:
        with open(mnt / "big", "rb") as f:
            f.seek(1_000_000)
            assert f.read(4096) == data[1_000_000:1_004_096]
            s.stop()
            s = serve(st, listen=f"unix:{sock}")
            f.seek(5_000_000)
            assert f.read(4096) == data[5_000_000:5_004_096]
    finally:
        unmount(p, mnt)
    # Only what was read (and its chunks) came: the cache holds no
    # whole blob.
    assert not (cache / "blobs" / d[:2] / d).exists()
