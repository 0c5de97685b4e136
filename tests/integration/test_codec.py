"""Cross-checks the core codec against an independent encoder.

Directories are built in Python with python3-protobuf (castore_pb.py, from
our own protos/castore.proto) and serialized canonically; the same bytes go
through our C codec (tests/core/castore-codec-tool). Digests must equal
b3sum of the Python bytes, re-encodings must equal them byte for byte, and
what protobuf happily parses but castore v1 forbids must be refused with
its own reason. Finally a real tree is imported and every Directory the
store holds is compared with the one Python builds from the same files.
"""
import os
import random
import subprocess
from pathlib import Path

import pytest

import castore_pb as pb
from conftest import CASTORE, copy_tree, pattern_bytes, run

EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
U64 = (1 << 64) - 1


def _tool_path():
    build = os.environ.get("CASTORE_BUILD_DIR")
    if build:
        return Path(build) / "tests" / "core" / "castore-codec-tool"
    # CASTORE_BIN is <build>/src/cli/castore.
    return Path(CASTORE).resolve().parents[2] / "tests" / "core" / "castore-codec-tool"


TOOL = _tool_path()


@pytest.fixture(scope="module", autouse=True)
def _need_tool():
    if not TOOL.exists():
        pytest.fail(f"{TOOL} not built (set CASTORE_BUILD_DIR or CASTORE_BIN)")


def tool(mode, data):
    p = subprocess.run([str(TOOL), mode], input=data, capture_output=True, timeout=120)
    assert p.returncode in (0, 1), (mode, p.returncode, p.stderr[-2000:])
    return p.returncode, p.stdout.decode()


def batch(blobs):
    """Our decoder on many Directories with one run: per input, ("ok",
    digest, encoded hex) or ("refused", reason)."""
    p = subprocess.run([str(TOOL), "batch"],
                       input="".join(b.hex() + "\n" for b in blobs).encode(),
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = []
    for line in p.stdout.decode().splitlines():
        if line.startswith("refused "):
            out.append(("refused", line[len("refused "):]))
        else:
            status, dig, enc = line.split(" ")
            assert status == "ok", line
            out.append((status, dig, enc))
    assert len(out) == len(blobs)
    return out


def decode(data):
    """Our decoder's verdict: (fields dict, entry lines) or the refusal."""
    rc, out = tool("decode", data)
    lines = out.splitlines()
    if rc == 1:
        assert len(lines) == 1 and lines[0].startswith("refused "), out
        return None, lines[0][len("refused "):]
    head = dict(line.split(" ", 1) for line in lines[:3])
    return head, lines[3:]


def refusal(data):
    head, why = decode(data)
    assert head is None, f"accepted: {data.hex()}"
    return why


def hexname(b):
    return b.hex() if b else "-"


def entry_lines(d):
    """The entry lines the tool prints, from a (sorted) protobuf Directory."""
    out = []
    for n in d.directories:
        out.append(f"d {hexname(n.name)} {n.digest.hex()} {n.size}")
    for n in d.files:
        out.append(f"f {hexname(n.name)} {n.digest.hex()} {n.size} {int(n.executable)}")
    for n in d.symlinks:
        out.append(f"s {hexname(n.name)} {hexname(n.target)}")
    return out


def expected_size(d):
    return len(d.directories) + len(d.files) + len(d.symlinks) + \
        sum(n.size for n in d.directories)


def digest(seed):
    return bytes((seed * 7 + i) % 256 for i in range(32))


def check_accepted(d):
    """d (a protobuf Directory) through our codec, both ways."""
    data = pb.canonical_directory_bytes(d)
    head, entries = decode(data)
    assert head is not None, f"refused: {entries}: {data.hex()}"
    assert head["encoded"] == (data.hex() or "-")
    assert head["digest"] == pb.b3sum_hex(data)
    assert int(head["size"]) == expected_size(d)
    canon = pb.Directory.FromString(data)
    assert entries == entry_lines(canon)
    # Our encoder, fed the entries in reverse order, sorts and writes the
    # same bytes.
    rc, out = tool("encode", ("\n".join(reversed(entries)) + "\n").encode())
    assert rc == 0, out
    enc = dict(line.split(" ", 1) for line in out.splitlines())
    assert enc["encoded"] == (data.hex() or "-")
    assert enc["digest"] == head["digest"]
    # And protobuf reads our bytes back as the same message.
    assert pb.Directory.FromString(bytes.fromhex(data.hex())) == canon
    return head["digest"]


def test_empty_directory():
    assert pb.canonical_directory_bytes(pb.Directory()) == b""
    head, entries = decode(b"")
    assert head == {"digest": EMPTY, "size": "0", "encoded": "-"}
    assert entries == []
    assert pb.b3sum_hex(b"") == EMPTY


def hand_made():
    d1 = pb.Directory()
    d1.files.add(name=b"hello", digest=digest(1), size=5)
    yield "one-file", d1

    d2 = pb.Directory()
    d2.directories.add(name=b"sub", digest=digest(2), size=3)
    d2.directories.add(name=b"a\nb", digest=digest(3), size=0)
    d2.directories.add(name=b"\xff\xfe", digest=digest(4), size=(1 << 62))
    d2.files.add(name=b"exe", digest=digest(5), size=1 << 40, executable=True)
    d2.files.add(name=b"empty", digest=digest(6), size=0)
    d2.files.add(name=b"max", digest=digest(7), size=U64, executable=True)
    d2.files.add(name="caf\u00e9".encode(), digest=digest(8), size=127)
    d2.files.add(name=b"\x01\x7f\\\"'", digest=digest(9), size=128)
    d2.symlinks.add(name=b"link", target=b"../somewhere/else")
    d2.symlinks.add(name=b"\x80", target=b"\xff\n /..")
    d2.symlinks.add(name=b" ", target=b"/")
    yield "all-lists", d2

    d3 = pb.Directory()
    d3.directories.add(name=b"a" * 1000, digest=digest(10), size=U64 - 2)
    d3.symlinks.add(name=b"b", target=b"t" * 70000)
    yield "big", d3

    d4 = pb.Directory()
    for i in range(300):
        d4.files.add(name=f"f{i:04d}".encode(), digest=digest(i), size=i,
                     executable=bool(i % 3 == 0))
    yield "many-files", d4


@pytest.mark.parametrize("name,d", list(hand_made()), ids=[n for n, _ in hand_made()])
def test_hand_made(name, d):
    check_accepted(d)


def random_name(rng, taken):
    while True:
        n = rng.choice([1, 1, 2, 3, 5, 8, 20, 255])
        name = bytes(rng.choice(range(1, 256)) for _ in range(n)).replace(b"/", b"_")
        if name in (b".", b"..") or name in taken:
            continue
        taken.add(name)
        return name


def random_directory(rng):
    d = pb.Directory()
    taken = set()
    for _ in range(rng.choice([0, 1, 2, 5, 12])):
        size = rng.choice([0, 1, 300, 1 << 20, rng.getrandbits(40), rng.getrandbits(58)])
        d.directories.add(name=random_name(rng, taken), digest=rng.randbytes(32),
                          size=size)
    for _ in range(rng.choice([0, 1, 3, 9, 30])):
        d.files.add(name=random_name(rng, taken), digest=rng.randbytes(32),
                    size=rng.choice([0, 1, 4096, U64, rng.getrandbits(64)]),
                    executable=rng.random() < 0.3)
    for _ in range(rng.choice([0, 1, 4])):
        target = bytes(rng.choice(range(1, 256)) for _ in range(rng.choice([1, 2, 30, 200])))
        d.symlinks.add(name=random_name(rng, taken), target=target)
    assert expected_size(d) <= U64
    return d


def test_random_directories():
    rng = random.Random(20261125)
    dirs = [random_directory(rng) for _ in range(400)]
    blobs = [pb.canonical_directory_bytes(d) for d in dirs]
    results = batch(blobs)
    digests = pb.b3sum_many(blobs)
    for data, res, want in zip(blobs, results, digests):
        assert res == ("ok", want, data.hex() or "-"), data.hex()
    # A few through the full decode/encode path as well.
    for d in dirs[:6]:
        check_accepted(d)


def test_every_byte_in_names():
    """Each single byte but NUL, '/' and '.' is a valid name; spread over
    the three lists they must stay sorted and round-trip."""
    d = pb.Directory()
    for b in range(1, 256):
        if b in (0x2f, 0x2e):
            continue
        name = bytes([b])
        if b % 3 == 0:
            d.directories.add(name=name, digest=digest(b), size=b)
        elif b % 3 == 1:
            d.files.add(name=name, digest=digest(b), size=b, executable=bool(b & 1))
        else:
            d.symlinks.add(name=name, target=bytes([b, b]))
    d.files.add(name=b"..x", digest=digest(0))
    d.files.add(name=b"...", digest=digest(0))
    check_accepted(d)


def raw(d):
    """Serialization as protobuf writes it, not sorted."""
    return d.SerializeToString(deterministic=True)


def refusals():
    """(id, bytes, reason); protobuf itself parses every one of them."""
    d = pb.Directory()
    d.files.add(name=b"b", digest=digest(1))
    d.files.add(name=b"a", digest=digest(2))
    yield "unsorted", raw(d), "names not sorted"

    d = pb.Directory()
    d.directories.add(name=b"B", digest=digest(1))
    d.directories.add(name=b"A", digest=digest(2))
    yield "unsorted-dirs", raw(d), "names not sorted"

    d = pb.Directory()
    d.symlinks.add(name=b"x", target=b"1")
    d.symlinks.add(name=b"x", target=b"2")
    yield "duplicate", raw(d), "duplicate name"

    d = pb.Directory()
    d.directories.add(name=b"a", digest=digest(1))
    d.files.add(name=b"a", digest=digest(1))
    yield "duplicate-across", raw(d), "duplicate name"

    d = pb.Directory()
    d.files.add(name=b"m", digest=digest(1))
    d.symlinks.add(name=b"a", target=b"t")
    d.symlinks.add(name=b"m", target=b"t")
    yield "duplicate-file-symlink", raw(d), "duplicate name"

    for ident, name, why in [("empty-name", b"", "empty name"),
                             ("dot", b".", 'name is "."'),
                             ("dotdot", b"..", 'name is ".."'),
                             ("slash", b"a/b", "name contains '/'"),
                             ("nul", b"a\0b", "name contains NUL")]:
        d = pb.Directory()
        d.files.add(name=name, digest=digest(1), size=1)
        yield ident, raw(d), why
        d = pb.Directory()
        d.symlinks.add(name=name, target=b"t")
        yield ident + "-symlink", raw(d), why

    for n in (0, 31, 33):
        d = pb.Directory()
        d.directories.add(name=b"d", digest=digest(1)[:n] + b"\0" * max(0, n - 32))
        yield f"digest-{n}", raw(d), "digest is not 32 bytes"
        d = pb.Directory()
        d.files.add(name=b"f", digest=(digest(1) * 2)[:n], size=9)
        yield f"file-digest-{n}", raw(d), "digest is not 32 bytes"

    d = pb.Directory()
    d.symlinks.add(name=b"l")
    yield "empty-target", raw(d), "empty symlink target"
    d = pb.Directory()
    d.symlinks.add(name=b"l", target=b"a\0b")
    yield "target-nul", raw(d), "symlink target contains NUL"

    d = pb.Directory()
    d.directories.add(name=b"a", digest=digest(1), size=1 << 63)
    d.directories.add(name=b"b", digest=digest(1), size=1 << 63)
    yield "size-overflow", raw(d), "size overflow"

    # Lists out of field order: protobuf merges them; castore refuses.
    f = pb.Directory()
    f.files.add(name=b"f", digest=digest(1))
    s = pb.Directory()
    s.directories.add(name=b"d", digest=digest(2))
    yield "lists-out-of-order", raw(f) + raw(s), "not canonical encoding"

    # A default value written out (protobuf's parser accepts it).
    body = pb.FileNode(name=b"f", digest=digest(1)).SerializeToString() + b"\x18\x00"
    yield "size-zero-present", b"\x12" + bytes([len(body)]) + body, "not canonical encoding"
    body = pb.FileNode(name=b"f", digest=digest(1)).SerializeToString() + b"\x20\x00"
    yield "executable-false-present", b"\x12" + bytes([len(body)]) + body, \
        "not canonical encoding"
    # A non-minimal length varint.
    body = pb.FileNode(name=b"f", digest=digest(1)).SerializeToString()
    yield "long-varint", b"\x12" + bytes([0x80 | len(body), 0]) + body, \
        "not canonical encoding"

    # Unknown fields: protobuf keeps them; castore refuses.
    d = pb.Directory()
    d.files.add(name=b"f", digest=digest(1))
    yield "unknown-top", raw(d) + b"\x22\x00", "unknown field"
    body = pb.FileNode(name=b"f", digest=digest(1)).SerializeToString() + b"\x2a\x01x"
    yield "unknown-in-node", b"\x12" + bytes([len(body)]) + body, "unknown field"
    body = pb.DirectoryNode(name=b"d", digest=digest(1)).SerializeToString() + b"\x20\x01"
    yield "executable-on-directory", b"\x0a" + bytes([len(body)]) + body, "unknown field"


REFUSALS = list(refusals())


@pytest.fixture(scope="module")
def refusal_verdicts():
    return dict(zip((r[0] for r in REFUSALS), batch([r[1] for r in REFUSALS])))


@pytest.mark.parametrize("ident,data,why", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(ident, data, why, refusal_verdicts):
    pb.Directory.FromString(data)  # protobuf's own parser accepts it
    assert refusal_verdicts[ident] == ("refused", why)


def test_refusal_alone():
    """The single-input path gives the same verdict as the batch."""
    ident, data, why = REFUSALS[0]
    assert refusal(data) == why


def test_malformed_wire():
    """What protobuf's parser refuses, ours refuses too, for its reason."""
    d = pb.Directory()
    d.files.add(name=b"name", digest=digest(1), size=123456789, executable=True)
    data = pb.canonical_directory_bytes(d)
    cuts = [data[:cut] for cut in range(1, len(data))]
    for cut in cuts:
        with pytest.raises(Exception):
            pb.Directory.FromString(cut)
    cases = [
        (b"\x0a" + b"\xff" * 10 + b"\x01", "varint overflow"),
        (b"\x0a" + b"\x80" * 9 + b"\x02", "varint overflow"),
        (b"\x08\x01", "bad wire type"),
        (b"\x0f", "bad wire type"),
        (b"\x02\x00", "invalid field number"),
    ] + [(cut, "truncated input") for cut in cuts]
    verdicts = batch([c[0] for c in cases])
    for (data, why), verdict in zip(cases, verdicts):
        assert verdict == ("refused", why), data.hex()


def test_nodes():
    cases = []
    n = pb.Node()
    n.directory.name = b"dir"
    n.directory.digest = digest(1)
    n.directory.size = 42
    cases.append((n, f"d {b'dir'.hex()} {digest(1).hex()} 42"))
    n = pb.Node()
    n.file.name = b"\xffx"
    n.file.digest = digest(2)
    n.file.size = U64
    n.file.executable = True
    cases.append((n, f"f ff78 {digest(2).hex()} {U64} 1"))
    n = pb.Node()
    n.file.digest = digest(3)  # a root node without a name
    cases.append((n, f"f - {digest(3).hex()} 0 0"))
    n = pb.Node()
    n.symlink.name = b"l"
    n.symlink.target = b"/t"
    cases.append((n, "s 6c 2f74"))
    for msg, line in cases:
        data = msg.SerializeToString(deterministic=True)
        rc, out = tool("node-decode", data)
        assert rc == 0 and out.strip() == line, out
        rc, out = tool("node-encode", (line + "\n").encode())
        assert rc == 0 and out.strip() == "encoded " + data.hex(), out

    n = pb.Node()
    n.symlink.name = b"l"
    rc, out = tool("node-decode", n.SerializeToString())
    assert rc == 1 and out.strip() == "refused empty symlink target"
    rc, out = tool("node-decode", b"")
    assert rc == 1 and out.strip() == "refused empty node"
    two = cases[0][0].SerializeToString() * 2
    rc, out = tool("node-decode", two)
    assert rc == 1 and out.strip() == "refused more than one node"


def python_import(path):
    """The root node of a tree computed in Python only: file digests by
    b3sum, Directories by protobuf, digests of their canonical bytes by
    b3sum. Returns (root digest hex, root size, {digest hex: bytes})."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    file_digest = dict(zip(files, pb.b3sum_many([p.read_bytes() for p in files])))
    directories = {}

    def build(p):
        d = pb.Directory()
        for child in sorted(os.listdir(p)):
            c = p / child
            name = os.fsencode(child)
            if c.is_symlink():
                d.symlinks.add(name=name, target=os.fsencode(os.readlink(c)))
            elif c.is_dir():
                dig, size = build(c)
                d.directories.add(name=name, digest=bytes.fromhex(dig), size=size)
            else:
                st = c.stat()
                d.files.add(name=name, digest=bytes.fromhex(file_digest[c]),
                            size=st.st_size, executable=bool(st.st_mode & 0o111))
        data = pb.canonical_directory_bytes(d)
        dig = pb.b3sum_hex(data)
        directories[dig] = data
        return dig, expected_size(d)

    root, size = build(path)
    return root, size, directories


def test_imported_tree_matches_python(tmp_path, store):
    """Every Directory of a real imported tree is the one Python builds."""
    src = copy_tree("/usr/share/doc", tmp_path / "tree", limit_files=120)
    # Names and bits the real tree may lack.
    (src / "exe").write_bytes(pattern_bytes(5000))
    os.chmod(src / "exe", 0o755)
    (src / "empty").write_bytes(b"")
    (src / "caf\u00e9 \n\x7f").write_bytes(b"x")
    (src / os.fsdecode(b"\xff\xfe")).mkdir()
    (src / os.fsdecode(b"\xff\xfe") / "deep").write_bytes(pattern_bytes(70000, 3))
    os.symlink("../somewhere", src / "link")
    (src / "emptydir").mkdir()

    root, size, directories = python_import(src)
    assert len(directories) > 10
    out = run(["import", src, "--name", "tree"], store=store).stdout.decode()
    assert out.split() == ["tree", "directory", root, str(size)]
    assert EMPTY in directories
    digests = sorted(directories)
    stored = [run(["dir", "get", dig], store=store).stdout for dig in digests]
    for dig, got in zip(digests, stored):
        assert got == directories[dig], dig
    for dig, verdict in zip(digests, batch(stored)):
        assert verdict[:2] == ("ok", dig)
