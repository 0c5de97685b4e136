/* chunker.c - FastCDC cut points and the chunk-list codec (chunker.h).
 *
 * The gear hash shifts one bit per byte, so its top bits depend on the
 * last 64 bytes: the conditions test the top bits (mask_small and
 * mask_large are high-bit masks), and a cut depends only on the bytes
 * just before it, never on where the blob started. That is what lets two
 * versions of a file share the chunks after an insertion. Bytes before
 * `min` are not hashed at all (FastCDC's skip), which also makes
 * chunking faster than hashing. The normalised conditions (two more
 * bits before the average, two fewer after) keep sizes near the average.
 */
#include "core/chunker.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/util.h"
#include "core/varint.h"

/* A fixed table: every castore cuts the same bytes at the same places.
 * splitmix64 from a fixed seed, computed per chunker (256 steps). */
static void fill_gear(uint64_t gear[256])
{
	uint64_t x = 0x636173746f726531ull; /* "castore1" */
	for (unsigned i = 0; i < 256; i++) {
		uint64_t z = (x += 0x9e3779b97f4a7c15ull);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		gear[i] = z ^ (z >> 31);
	}
}

static uint64_t top_bits(unsigned bits)
{
	return bits == 0 ? 0 : bits >= 64 ? ~0ull : ~0ull << (64 - bits);
}

int cas_chunker_init(cas_chunker *c, uint64_t min, uint64_t avg, uint64_t max)
{
	if (min < 1 || min > avg || avg > max || (avg & (avg - 1)) != 0)
		return -EINVAL;
	fill_gear(c->gear);
	unsigned bits = (unsigned)__builtin_ctzll(avg);
	c->mask_small = top_bits(bits + 2);
	c->mask_large = top_bits(bits >= 2 ? bits - 2 : 0);
	c->min = min;
	c->avg = avg;
	c->max = max;
	c->pos = 0;
	c->hash = 0;
	return 0;
}

size_t cas_chunker_next(cas_chunker *c, const uint8_t *buf, size_t len,
			bool *ret_cut)
{
	size_t i = 0;
	*ret_cut = false;
	if (c->pos < c->min) {
		size_t skip = (size_t)CAS_MIN(c->min - c->pos, (uint64_t)len);
		i += skip;
		c->pos += skip;
	}
	uint64_t h = c->hash, pos = c->pos;
	/* Before avg the harder condition, then the easier one, then max. */
	while (i < len && pos >= c->min) {
		if (pos >= c->max) {
			*ret_cut = true;
			break;
		}
		uint64_t stop = pos < c->avg ? c->avg : c->max;
		uint64_t mask = pos < c->avg ? c->mask_small : c->mask_large;
		size_t n = (size_t)CAS_MIN(stop - pos, (uint64_t)(len - i));
		size_t j = i, end = i + n;
		for (; j < end; j++) {
			h = (h << 1) + c->gear[buf[j]];
			if (!(h & mask))
				break;
		}
		if (j < end) {
			/* The byte at j matched: the chunk ends after it. */
			pos += j + 1 - i;
			i = j + 1;
			*ret_cut = true;
			break;
		}
		pos += n;
		i = end;
	}
	if (!*ret_cut && pos >= c->max && c->max > 0)
		*ret_cut = true;
	if (*ret_cut) {
		c->pos = 0;
		c->hash = 0;
	} else {
		c->pos = pos;
		c->hash = h;
	}
	return i;
}

/* ---- lists ---- */

struct list {
	cas_chunk *chunks;
	size_t n, cap;
};

static int list_push(struct list *l, const cas_chunk *c)
{
	int r = cas_array_grow(&l->chunks, &l->cap, l->n + 1,
			       sizeof(*l->chunks), 64);
	if (r < 0)
		return r;
	l->chunks[l->n++] = *c;
	return 0;
}

#define READ_SIZE (128u << 10)

int cas_chunklist_from_fd(int fd, uint64_t min, uint64_t avg, uint64_t max,
			  cas_chunk **ret_chunks, size_t *ret_n)
{
	cas_chunker ch;
	int r = cas_chunker_init(&ch, min, avg, max);
	if (r < 0)
		return r;
	_cleanup_free_ uint8_t *buf = malloc(READ_SIZE);
	if (!buf)
		return -ENOMEM;
	struct list l = {0};
	cas_hasher h;
	cas_hasher_init(&h);
	cas_chunk cur = {.size = 0};
	uint64_t off = 0;
	for (;;) {
		ssize_t got = pread(fd, buf, READ_SIZE, (off_t)off);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			r = cas_negerrno();
			goto fail;
		}
		if (got == 0)
			break;
		off += (uint64_t)got;
		for (size_t i = 0; i < (size_t)got;) {
			bool cut;
			size_t n = cas_chunker_next(&ch, buf + i,
						    (size_t)got - i, &cut);
			cas_hasher_update(&h, buf + i, n);
			cur.size += n;
			i += n;
			if (cut) {
				cas_hasher_final(&h, &cur.digest);
				if ((r = list_push(&l, &cur)) < 0)
					goto fail;
				cas_hasher_init(&h);
				cur.size = 0;
			}
		}
	}
	if (cur.size > 0) {
		cas_hasher_final(&h, &cur.digest);
		if ((r = list_push(&l, &cur)) < 0)
			goto fail;
	}
	*ret_chunks = l.chunks;
	*ret_n = l.n;
	return 0;
fail:
	free(l.chunks);
	return r;
}

/* ---- codec ---- */

#define TAG_CHUNK  0x0a /* ChunkList.chunks = 1, length-delimited */
#define TAG_DIGEST 0x0a /* ChunkMeta.digest = 1, length-delimited */
#define TAG_SIZE   0x10 /* ChunkMeta.size = 2, varint */

static size_t meta_len(uint64_t size)
{
	return 2 + CAS_DIGEST_LEN + 1 + cas_varint_len(size);
}

int cas_chunklist_encode(const cas_chunk *chunks, size_t n, uint8_t **ret,
			 size_t *ret_len)
{
	size_t len = 0;
	for (size_t i = 0; i < n; i++) {
		if (chunks[i].size == 0)
			return -EINVAL;
		size_t m = meta_len(chunks[i].size);
		len += 1 + cas_varint_len(m) + m;
	}
	uint8_t *out = malloc(len ? len : 1);
	if (!out)
		return -ENOMEM;
	uint8_t *p = out;
	for (size_t i = 0; i < n; i++) {
		*p++ = TAG_CHUNK;
		p = cas_varint_put(p, meta_len(chunks[i].size));
		*p++ = TAG_DIGEST;
		*p++ = CAS_DIGEST_LEN;
		memcpy(p, chunks[i].digest.bytes, CAS_DIGEST_LEN);
		p += CAS_DIGEST_LEN;
		*p++ = TAG_SIZE;
		p = cas_varint_put(p, chunks[i].size);
	}
	*ret = out;
	*ret_len = len;
	return 0;
}

/* One varint in its shortest form (canonical: the encoder writes no
 * other). */
static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *ret,
		      const char **why)
{
	const uint8_t *start = *p;
	if (cas_varint_get(p, end, ret) < 0) {
		*why = "bad varint";
		return -EBADMSG;
	}
	if ((size_t)(*p - start) != cas_varint_len(*ret)) {
		*why = "varint not in its shortest form";
		return -EBADMSG;
	}
	return 0;
}

static int decode_meta(const uint8_t *p, const uint8_t *end, cas_chunk *ret,
		       const char **why)
{
	if (end - p < 2 || p[0] != TAG_DIGEST || p[1] != CAS_DIGEST_LEN) {
		*why = "chunk without a 32-byte digest first";
		return -EBADMSG;
	}
	p += 2;
	if (end - p < CAS_DIGEST_LEN) {
		*why = "truncated digest";
		return -EBADMSG;
	}
	memcpy(ret->digest.bytes, p, CAS_DIGEST_LEN);
	p += CAS_DIGEST_LEN;
	if (p == end || *p != TAG_SIZE) {
		*why = "chunk without a size after its digest";
		return -EBADMSG;
	}
	p++;
	int r = get_varint(&p, end, &ret->size, why);
	if (r < 0)
		return r;
	if (ret->size == 0) {
		*why = "chunk of size 0";
		return -EBADMSG;
	}
	if (p != end) {
		*why = "unknown field in chunk";
		return -EBADMSG;
	}
	return 0;
}

int cas_chunklist_decode(const uint8_t *buf, size_t len, uint64_t blob_size,
			 cas_chunk **ret_chunks, size_t *ret_n,
			 const char **ret_why)
{
	const char *why_local;
	const char **why = ret_why ? ret_why : &why_local;
	const uint8_t *p = buf, *end = buf + len;
	struct list l = {0};
	uint64_t total = 0;
	int r;
	while (p < end) {
		if (*p++ != TAG_CHUNK) {
			*why = "unknown field";
			r = -EBADMSG;
			goto fail;
		}
		uint64_t m;
		if ((r = get_varint(&p, end, &m, why)) < 0)
			goto fail;
		if (m > (uint64_t)(end - p)) {
			*why = "truncated chunk";
			r = -EBADMSG;
			goto fail;
		}
		cas_chunk c;
		if ((r = decode_meta(p, p + m, &c, why)) < 0)
			goto fail;
		p += m;
		if (c.size > UINT64_MAX - total) {
			*why = "chunk sizes overflow";
			r = -EBADMSG;
			goto fail;
		}
		total += c.size;
		if ((r = list_push(&l, &c)) < 0)
			goto fail;
	}
	if (blob_size != UINT64_MAX && total != blob_size) {
		*why = "chunk sizes do not add up to the blob's";
		r = -EBADMSG;
		goto fail;
	}
	*ret_chunks = l.chunks;
	*ret_n = l.n;
	return 0;
fail:
	free(l.chunks);
	return r;
}
