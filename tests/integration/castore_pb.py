"""The castore v1 messages as an independent encoder for the tests.

At import, protos/castore.proto (our own copy of the castore v1 data model)
is compiled by protoc into a temporary folder, as a descriptor set, and its
messages are built with Debian's python3-protobuf in a private descriptor
pool, so that another test module loading tvix's own castore.proto into the
default pool cannot clash with it.

    Directory, DirectoryNode, FileNode, SymlinkNode, Node   message classes
    canonical_directory_bytes(dir_msg)   sorted lists, deterministic bytes
    b3sum_hex(data) / b3sum_many(list)   digests computed by b3sum(1)
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "castore.proto"
PACKAGE = "tvix.castore.v1"


def _compile():
    protoc = shutil.which("protoc")
    if not protoc:
        raise ImportError("protoc not found (Debian package protobuf-compiler)")
    with tempfile.TemporaryDirectory(prefix="castore-pb-") as tmp:
        out = Path(tmp) / "castore.desc"
        subprocess.run([protoc, f"-I{PROTO.parent}", f"--descriptor_set_out={out}",
                        str(PROTO)], check=True, capture_output=True)
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        pool.Add(fdp)
    classes = {}
    for name in ("Directory", "DirectoryNode", "FileNode", "SymlinkNode", "Node"):
        desc = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
        if hasattr(message_factory, "GetMessageClass"):
            classes[name] = message_factory.GetMessageClass(desc)
        else:
            classes[name] = message_factory.MessageFactory(pool).GetPrototype(desc)
    return classes


_classes = _compile()
Directory = _classes["Directory"]
DirectoryNode = _classes["DirectoryNode"]
FileNode = _classes["FileNode"]
SymlinkNode = _classes["SymlinkNode"]
Node = _classes["Node"]


def canonical_directory_bytes(dir_msg):
    """The canonical encoding of a Directory: each list sorted bytewise by
    name (a sorted copy; dir_msg is left as it is), proto3 defaults omitted
    (protobuf does that), fields in number order, deterministic output."""
    d = Directory()
    d.CopyFrom(dir_msg)
    for field in (d.directories, d.files, d.symlinks):
        entries = sorted(field, key=lambda n: n.name)
        copies = []
        for e in entries:
            c = type(e)()
            c.CopyFrom(e)
            copies.append(c)
        del field[:]
        field.extend(copies)
    return d.SerializeToString(deterministic=True)


def b3sum_hex(data):
    """BLAKE3-256 of data as b3sum prints it."""
    p = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True,
                       check=True)
    return p.stdout.decode().split()[0]


def b3sum_many(blobs):
    """b3sum of each of blobs, with one b3sum run."""
    if not blobs:
        return []
    with tempfile.TemporaryDirectory(prefix="castore-b3-") as tmp:
        paths = []
        for i, data in enumerate(blobs):
            path = os.path.join(tmp, f"{i:06d}")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        p = subprocess.run(["b3sum", "--no-names", *paths], capture_output=True,
                           check=True)
    out = p.stdout.decode().split()
    assert len(out) == len(blobs)
    return out
