"""BLAKE3 in pure Python, written from the BLAKE3 paper's description, so
the tests can name objects they build without a b3sum process per object
(slow: use it for small inputs). hash(b"") must equal b3sum's empty digest.
"""

IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
      0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
BLOCK, CHUNK = 64, 1024
M32 = 0xFFFFFFFF


def _g(v, a, b, c, d, x, y):
    v[a] = (v[a] + v[b] + x) & M32
    t = v[d] ^ v[a]
    v[d] = ((t >> 16) | (t << 16)) & M32
    v[c] = (v[c] + v[d]) & M32
    t = v[b] ^ v[c]
    v[b] = ((t >> 12) | (t << 20)) & M32
    v[a] = (v[a] + v[b] + y) & M32
    t = v[d] ^ v[a]
    v[d] = ((t >> 8) | (t << 24)) & M32
    v[c] = (v[c] + v[d]) & M32
    t = v[b] ^ v[c]
    v[b] = ((t >> 7) | (t << 25)) & M32


def compress(cv, block, counter, block_len, flags):
    """The 16-word state after the compression function."""
    m = [int.from_bytes(block[i:i + 4], "little") for i in range(0, 64, 4)]
    v = list(cv) + list(IV[:4]) + [counter & M32, (counter >> 32) & M32,
                                   block_len, flags]
    for r in range(7):
        _g(v, 0, 4, 8, 12, m[0], m[1])
        _g(v, 1, 5, 9, 13, m[2], m[3])
        _g(v, 2, 6, 10, 14, m[4], m[5])
        _g(v, 3, 7, 11, 15, m[6], m[7])
        _g(v, 0, 5, 10, 15, m[8], m[9])
        _g(v, 1, 6, 11, 12, m[10], m[11])
        _g(v, 2, 7, 8, 13, m[12], m[13])
        _g(v, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[p] for p in PERM]
    return [v[i] ^ v[i + 8] for i in range(8)] + [v[i + 8] ^ cv[i] for i in range(8)]


def _words(b):
    return b"".join(w.to_bytes(4, "little") for w in b)


def chunk_cv(data, counter, root=False):
    """Chaining value of one chunk (<= 1024 bytes); with root, the digest."""
    cv = IV
    blocks = [data[i:i + BLOCK] for i in range(0, len(data), BLOCK)] or [b""]
    for i, blk in enumerate(blocks):
        flags = (CHUNK_START if i == 0 else 0) | (CHUNK_END if i == len(blocks) - 1 else 0)
        if root and i == len(blocks) - 1:
            flags |= ROOT
        out = compress(cv, blk.ljust(BLOCK, b"\0"), counter, len(blk), flags)
        cv = out[:8]
    return _words(cv)


def parent_cv(left, right, root=False):
    block = left + right
    cv = compress(IV, block, 0, BLOCK, PARENT | (ROOT if root else 0))[:8]
    return _words(cv)


def _tree(data, counter, root):
    """CV of the subtree over data (a whole number of chunks but the last),
    whose first chunk has index counter: left subtree is the largest power
    of two chunks that leaves at least one byte to the right."""
    if len(data) <= CHUNK:
        return chunk_cv(data, counter, root)
    chunks = (len(data) + CHUNK - 1) // CHUNK
    left = 1
    while left * 2 < chunks:
        left *= 2
    split = left * CHUNK
    return parent_cv(_tree(data[:split], counter, False),
                     _tree(data[split:], counter + left, False), root)


def blake3(data):
    """The 32-byte BLAKE3 digest of data."""
    return _tree(bytes(data), 0, True)
