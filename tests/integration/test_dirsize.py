"""DirectoryNode.size is checked as tvix and snix check it (issue 16): a
DirectoryNode's size must equal the size of the Directory it names (its
entries plus its children's sizes). A Directory whose child has a wrong
size is refused, with one line naming the Directory, the child and both
sizes, wherever it enters a store: `dir put`, gRPC Put, the remote cache
(here from an HTTP layout); `roots add --size` is checked when the content
is present. The protobuf bytes are built here (castore_pb), digests by
b3sum.
"""
import functools
import http.server
import threading

import pytest

from castore_pb import (Directory, DirectoryNode, FileNode, Node, b3sum_hex,
                        canonical_directory_bytes)
from conftest import CASTORE, run

BLOB = b"hello!"


def objects(claimed):
    """(child bytes, child hex, parent bytes, parent hex, parent size) with
    the parent's DirectoryNode "sub" claiming size `claimed` (right: 1)."""
    child = canonical_directory_bytes(Directory(files=[FileNode(
        name=b"f", digest=bytes.fromhex(b3sum_hex(BLOB)), size=len(BLOB))]))
    chex = b3sum_hex(child)
    parent = canonical_directory_bytes(Directory(directories=[DirectoryNode(
        name=b"sub", digest=bytes.fromhex(chex), size=claimed)]))
    return child, chex, parent, b3sum_hex(parent), 1 + claimed


def one_size_line(stderr, phex, chex, claimed):
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("castore"), line
    assert phex in line and chex in line, line
    assert f"has size {claimed}, but its Directory's size is 1" in line, line


def test_dir_put_refuses_wrong_child_size(store):
    child, chex, parent, phex, _ = objects(5)
    run(["blob", "put", "-"], store=store, input=BLOB)
    assert run(["dir", "put"], store=store, input=child).stdout.decode().strip() == chex
    p = run(["dir", "put"], store=store, input=parent, check=False)
    assert p.returncode == 1
    one_size_line(p.stderr, phex, chex, 5)
    assert run(["dir", "get", phex], store=store, check=False).returncode == 1
    # A size of 0 (which would defeat the overflow bound) is refused too.
    _, _, zero, zhex, _ = objects(0)
    p = run(["dir", "put"], store=store, input=zero, check=False)
    assert p.returncode == 1
    one_size_line(p.stderr, zhex, chex, 0)
    # The right size is taken.
    _, _, good, ghex, _ = objects(1)
    assert run(["dir", "put"], store=store, input=good).stdout.decode().strip() == ghex
    assert run(["verify"], store=store).returncode == 0


def test_roots_add_checks_size_when_present(store):
    child, chex, _, _, _ = objects(1)
    run(["dir", "put"], store=store, input=child)
    p = run(["roots", "add", "r", "--directory", chex, "--size", "7"], store=store,
            check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and chex in lines[0] and "7" in lines[0] and \
        "size 1" in lines[0], lines
    assert "r\t" not in run(["roots", "list"], store=store).stdout.decode()
    run(["roots", "add", "r", "--directory", chex, "--size", "1"], store=store)
    # A blob that is present: its size; content that is absent: not checked.
    run(["blob", "put", "-"], store=store, input=BLOB)
    p = run(["roots", "add", "b", "--file", b3sum_hex(BLOB), "--size", "9"],
            store=store, check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    run(["roots", "add", "b", "--file", b3sum_hex(BLOB), "--size", "6"], store=store)
    run(["roots", "add", "lazy", "--directory", "ab" * 32, "--size", "3"], store=store)


def test_grpc_put_refuses_wrong_child_size(tmp_path):
    grpc = pytest.importorskip("grpc")
    import test_remote
    st = tmp_path / "served"
    run(["blob", "put", "-"], store=st, input=b"seed")
    srv = test_remote.Serve(st)
    try:
        ch = grpc.insecure_channel(srv.address)
        put = ch.stream_unary("/tvix.castore.v1.DirectoryService/Put",
                              lambda b: b, lambda b: b)
        child, chex, parent, phex, _ = objects(5)
        with pytest.raises(grpc.RpcError) as e:
            put(iter([child, parent]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ch.close()
    finally:
        srv.stop()
    assert run(["dir", "get", phex], store=st, check=False).returncode == 1


def test_cache_refuses_wrong_child_size_from_http(tmp_path):
    # An HTTP layout written by hand: the Directory files and a roots file,
    # no tree file (the reader falls back to the Directory files).
    pub = tmp_path / "pub"
    child, chex, parent, phex, psize = objects(5)
    for hexd, data in ((chex, child), (phex, parent)):
        f = pub / "directories" / hexd[:2] / hexd
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    node = Node(directory=DirectoryNode(name=b"", digest=bytes.fromhex(phex), size=psize))
    (pub / "roots").write_text("# castore published roots v1\n"
                               f"r\t{node.SerializeToString().hex()}\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(pub)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        p = run(["--cache", tmp_path / "cache", "ls", "r"], store=url, check=False,
                timeout=120)
    finally:
        srv.shutdown()
        srv.server_close()
    assert p.returncode == 1
    one_size_line(p.stderr, phex, chex, 5)
