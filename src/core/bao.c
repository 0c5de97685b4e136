/* bao.c - the BLAKE3 tree above 16 KiB groups (see bao.h for the layout).
 *
 * BLAKE3's tree is left-balanced: a subtree of n leaves splits into a
 * left part of the largest power of two below n and the rest. Since
 * every split of more than one group's worth of chunks falls on a
 * multiple of 16 chunks, the groups are whole subtrees and the tree above
 * them is the same left-balanced tree over groups. In post-order the
 * subtree of n groups whose first node is number `base` holds its nodes
 * at base .. base + n - 2: the left subtree's first, then the right's,
 * then its own node last (at base + n - 2). Every walk below carries
 * (start group, n groups, base) and needs no other index.
 *
 * The chunk and parent compressions come from the BLAKE3 C library
 * (blake3_impl.h): blake3_hash_many does 8 or 16 chunks (or parents) at
 * once with SIMD, the way the library's own hasher does, so a pass that
 * also yields the outboard costs what plain hashing costs.
 */
#include "core/bao.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <blake3_impl.h>

#include "core/util.h"

#define CHUNKS_PER_GROUP (1u << CAS_BAO_GROUP_LOG)
#define BLOCKS_PER_CHUNK (CAS_BAO_CHUNK_SIZE / BLAKE3_BLOCK_LEN)
#define CV_LEN		 BLAKE3_OUT_LEN
/* Whole groups hashed per blake3_hash_many call: 128 chunks, as many as
 * the library's own hasher takes from one 128 KiB update. */
#define BATCH_GROUPS 8u
/* Nodes the encoder gathers before it calls emit. */
#define OUT_NODES 256u

static uint64_t pow2_below(uint64_t n)
{
	/* The left subtree of n >= 2 leaves: the largest power of two < n. */
	return 1ull << (63 - __builtin_clzll(n - 1));
}

static void parent_cv(const uint8_t node[CAS_BAO_NODE_SIZE], uint8_t flags,
		      uint8_t ret_cv[CV_LEN])
{
	uint32_t cv[8];
	memcpy(cv, IV, sizeof(cv));
	blake3_compress_in_place(cv, node, BLAKE3_BLOCK_LEN, 0,
				 (uint8_t)(PARENT | flags));
	store_cv_words(ret_cv, cv);
}

/* Non-root chaining values of n whole groups (n <= BATCH_GROUPS) whose
 * first is group number g: the chunks at once, then the four levels of
 * parents inside each group, each level at once. */
static void full_groups_cv(const uint8_t *data, size_t n, uint64_t g,
			   uint8_t *ret_cvs)
{
	const uint8_t *inputs[BATCH_GROUPS * CHUNKS_PER_GROUP];
	uint8_t a[BATCH_GROUPS * CHUNKS_PER_GROUP * CV_LEN];
	uint8_t b[BATCH_GROUPS * CHUNKS_PER_GROUP / 2 * CV_LEN];
	size_t m = n * CHUNKS_PER_GROUP;

	for (size_t i = 0; i < m; i++)
		inputs[i] = data + i * CAS_BAO_CHUNK_SIZE;
	blake3_hash_many(inputs, m, BLOCKS_PER_CHUNK, IV, g * CHUNKS_PER_GROUP,
			 true, 0, CHUNK_START, CHUNK_END, a);
	/* Pairs never straddle groups: each group has an even number of
	 * values on every level below its own. Ping-pong between a and b so
	 * that no call reads what it writes. */
	uint8_t *from = a, *to = b;
	for (unsigned level = 0; level < CAS_BAO_GROUP_LOG; level++) {
		m /= 2;
		for (size_t i = 0; i < m; i++)
			inputs[i] = from + i * 2 * CV_LEN;
		blake3_hash_many(inputs, m, 1, IV, 0, false, PARENT, 0, 0, to);
		uint8_t *t = from;
		from = to;
		to = t;
	}
	memcpy(ret_cvs, from, n * CV_LEN);
}

/* A chunk of 1..1024 bytes, block by block (the last chunk of a blob). */
static void chunk_cv(const uint8_t *p, size_t len, uint64_t counter,
		     uint8_t ret_cv[CV_LEN])
{
	uint32_t cv[8];
	memcpy(cv, IV, sizeof(cv));
	size_t blocks = (len + BLAKE3_BLOCK_LEN - 1) / BLAKE3_BLOCK_LEN;
	for (size_t i = 0; i < blocks; i++) {
		uint8_t block[BLAKE3_BLOCK_LEN] = {0};
		size_t n = CAS_MIN(len - i * BLAKE3_BLOCK_LEN,
				   (size_t)BLAKE3_BLOCK_LEN);
		memcpy(block, p + i * BLAKE3_BLOCK_LEN, n);
		uint8_t flags = (uint8_t)((i == 0 ? CHUNK_START : 0) |
					  (i == blocks - 1 ? CHUNK_END : 0));
		blake3_compress_in_place(cv, block, (uint8_t)n, counter, flags);
	}
	store_cv_words(ret_cv, cv);
}

/* Left-balanced merge of n >= 1 chaining values (never the root). */
static void merge_cvs(const uint8_t *cvs, size_t n, uint8_t ret_cv[CV_LEN])
{
	if (n == 1) {
		memcpy(ret_cv, cvs, CV_LEN);
		return;
	}
	size_t left = (size_t)pow2_below(n);
	uint8_t node[CAS_BAO_NODE_SIZE];
	merge_cvs(cvs, left, node);
	merge_cvs(cvs + left * CV_LEN, n - left, node + CV_LEN);
	parent_cv(node, 0, ret_cv);
}

/* Non-root chaining value of group g holding len bytes (1..16 KiB). */
static void group_cv(const uint8_t *data, size_t len, uint64_t g,
		     uint8_t ret_cv[CV_LEN])
{
	if (len == CAS_BAO_GROUP_SIZE) {
		full_groups_cv(data, 1, g, ret_cv);
		return;
	}
	const uint8_t *inputs[CHUNKS_PER_GROUP];
	uint8_t cvs[CHUNKS_PER_GROUP * CV_LEN];
	size_t full = len / CAS_BAO_CHUNK_SIZE, tail = len % CAS_BAO_CHUNK_SIZE;
	for (size_t i = 0; i < full; i++)
		inputs[i] = data + i * CAS_BAO_CHUNK_SIZE;
	if (full)
		blake3_hash_many(inputs, full, BLOCKS_PER_CHUNK, IV,
				 g * CHUNKS_PER_GROUP, true, 0, CHUNK_START,
				 CHUNK_END, cvs);
	if (tail)
		chunk_cv(data + full * CAS_BAO_CHUNK_SIZE, tail,
			 g * CHUNKS_PER_GROUP + full, cvs + full * CV_LEN);
	merge_cvs(cvs, full + (tail ? 1 : 0), ret_cv);
}

uint64_t cas_bao_groups(uint64_t size)
{
	uint64_t n =
		size / CAS_BAO_GROUP_SIZE + (size % CAS_BAO_GROUP_SIZE ? 1 : 0);
	return n ? n : 1;
}

uint64_t cas_bao_outboard_size(uint64_t size)
{
	return (cas_bao_groups(size) - 1) * CAS_BAO_NODE_SIZE;
}

/* ---- the encoder ---- */

struct cas_bao_encoder {
	cas_bao_emit_fn emit;
	void *ctx;
	int error;	 /* first failure of emit, returned from then on */
	uint64_t groups; /* groups pushed on the stack so far */
	unsigned depth;
	uint8_t stack[64][CV_LEN]; /* subtrees not merged yet, left first */
	size_t out_len;
	uint8_t out[OUT_NODES * CAS_BAO_NODE_SIZE];
	/* A group not yet whole, or the first group held back while it may
	 * still be the whole blob (then its value would be the root). */
	size_t buf_len;
	uint8_t buf[CAS_BAO_GROUP_SIZE];
};

static void flush_out(cas_bao_encoder *e)
{
	if (e->out_len && e->emit && !e->error) {
		int r = e->emit(e->ctx, e->out, e->out_len);
		if (r < 0)
			e->error = r;
	}
	e->out_len = 0;
}

static void emit_node(cas_bao_encoder *e, const uint8_t node[64])
{
	if (!e->emit)
		return;
	memcpy(e->out + e->out_len, node, CAS_BAO_NODE_SIZE);
	e->out_len += CAS_BAO_NODE_SIZE;
	if (e->out_len == sizeof(e->out))
		flush_out(e);
}

/* Merges the top two subtrees into their parent, emitting its node. */
static void merge_top(cas_bao_encoder *e)
{
	uint8_t node[CAS_BAO_NODE_SIZE];
	memcpy(node, e->stack[e->depth - 2], CV_LEN);
	memcpy(node + CV_LEN, e->stack[e->depth - 1], CV_LEN);
	emit_node(e, node);
	parent_cv(node, 0, e->stack[e->depth - 2]);
	e->depth--;
}

/* Pushes group number e->groups. Before it, the subtrees left of it that
 * are complete are merged: after t groups the stack holds one subtree per
 * set bit of t (BLAKE3's own rule), and more bytes follow each of them,
 * so none of these merges is the root. */
static void push_group(cas_bao_encoder *e, const uint8_t cv[CV_LEN])
{
	while (e->depth > (unsigned)__builtin_popcountll(e->groups))
		merge_top(e);
	memcpy(e->stack[e->depth++], cv, CV_LEN);
	e->groups++;
}

static void take_groups(cas_bao_encoder *e, const uint8_t *p, size_t n)
{
	uint8_t cvs[BATCH_GROUPS * CV_LEN];
	full_groups_cv(p, n, e->groups, cvs);
	for (size_t i = 0; i < n; i++)
		push_group(e, cvs + i * CV_LEN);
}

int cas_bao_encoder_new(cas_bao_emit_fn emit, void *ctx, cas_bao_encoder **ret)
{
	cas_bao_encoder *e = malloc(sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->emit = emit;
	e->ctx = ctx;
	e->error = 0;
	e->groups = 0;
	e->depth = 0;
	e->out_len = 0;
	e->buf_len = 0;
	*ret = e;
	return 0;
}

void cas_bao_encoder_free(cas_bao_encoder *e)
{
	free(e);
}

int cas_bao_encoder_update(cas_bao_encoder *e, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len > 0 && !e->error) {
		if (e->buf_len == CAS_BAO_GROUP_SIZE) {
			/* The first group, and more follows: not the root. */
			take_groups(e, e->buf, 1);
			e->buf_len = 0;
		}
		if (e->buf_len == 0 && len >= CAS_BAO_GROUP_SIZE &&
		    !(e->groups == 0 && len == CAS_BAO_GROUP_SIZE)) {
			/* Whole groups straight from the caller's bytes. */
			size_t n = CAS_MIN(len / CAS_BAO_GROUP_SIZE,
					   (size_t)BATCH_GROUPS);
			take_groups(e, p, n);
			p += n * CAS_BAO_GROUP_SIZE;
			len -= n * CAS_BAO_GROUP_SIZE;
			continue;
		}
		size_t take = CAS_MIN(len, CAS_BAO_GROUP_SIZE - e->buf_len);
		memcpy(e->buf + e->buf_len, p, take);
		e->buf_len += take;
		p += take;
		len -= take;
		if (e->buf_len == CAS_BAO_GROUP_SIZE && e->groups > 0) {
			take_groups(e, e->buf, 1);
			e->buf_len = 0;
		}
	}
	return e->error;
}

int cas_bao_encoder_final(cas_bao_encoder *e, cas_digest *ret_digest)
{
	if (e->error)
		return e->error;
	if (e->groups == 0) {
		/* One group at most: the root lies inside it, no outboard. */
		blake3_hasher h;
		blake3_hasher_init(&h);
		blake3_hasher_update(&h, e->buf, e->buf_len);
		blake3_hasher_finalize(&h, ret_digest->bytes, CAS_DIGEST_LEN);
		return 0;
	}
	if (e->buf_len > 0) {
		uint8_t cv[CV_LEN];
		group_cv(e->buf, e->buf_len, e->groups, cv);
		push_group(e, cv);
		e->buf_len = 0;
	}
	/* The first group was taken only once a second one began, so at
	 * least two subtrees wait here; the last merge is the root. */
	while (e->depth > 2)
		merge_top(e);
	uint8_t node[CAS_BAO_NODE_SIZE];
	memcpy(node, e->stack[0], CV_LEN);
	memcpy(node + CV_LEN, e->stack[1], CV_LEN);
	emit_node(e, node);
	flush_out(e);
	if (e->error)
		return e->error;
	parent_cv(node, ROOT, ret_digest->bytes);
	return 0;
}

/* ---- one buffer, one file ---- */

struct sink {
	uint8_t *buf;
	size_t len, cap;
	bool grow;
};

static int sink_emit(void *ctx, const uint8_t *bytes, size_t len)
{
	struct sink *s = ctx;
	if (len > s->cap - s->len) {
		if (!s->grow)
			return -EOVERFLOW;
		size_t cap = CAS_MAX(s->cap * 2, s->len + len);
		uint8_t *n = realloc(s->buf, cap);
		if (!n)
			return -ENOMEM;
		s->buf = n;
		s->cap = cap;
	}
	memcpy(s->buf + s->len, bytes, len);
	s->len += len;
	return 0;
}

int cas_bao_hash_buffer(const void *buf, size_t len, cas_digest *ret_digest,
			uint8_t *ret_outboard)
{
	struct sink s = {ret_outboard, 0, (size_t)cas_bao_outboard_size(len),
			 false};
	cas_bao_encoder *e;
	int r = cas_bao_encoder_new(ret_outboard ? sink_emit : NULL, &s, &e);
	if (r < 0)
		return r;
	r = cas_bao_encoder_update(e, buf, len);
	if (r >= 0)
		r = cas_bao_encoder_final(e, ret_digest);
	cas_bao_encoder_free(e);
	return r;
}

/* The same read size as cas_hash_fd: eight whole groups per read. */
#define HASH_READ_SIZE (BATCH_GROUPS * CAS_BAO_GROUP_SIZE)

int cas_bao_hash_fd(int fd, cas_digest *ret_digest, uint64_t *ret_size,
		    uint8_t **ret_outboard, size_t *ret_outboard_len)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return cas_negerrno();
	struct sink s = {NULL, 0, 0, true};
	if (st.st_size > 0) {
		s.cap = (size_t)cas_bao_outboard_size((uint64_t)st.st_size);
		if (s.cap && !(s.buf = malloc(s.cap)))
			return -ENOMEM;
	}
	_cleanup_free_ uint8_t *buf = malloc(HASH_READ_SIZE);
	cas_bao_encoder *e = NULL;
	int r = buf ? cas_bao_encoder_new(sink_emit, &s, &e) : -ENOMEM;
	uint64_t off = 0;
	while (r >= 0) {
		ssize_t n = pread(fd, buf, HASH_READ_SIZE, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			r = cas_negerrno();
			break;
		}
		if (n == 0) {
			r = cas_bao_encoder_final(e, ret_digest);
			break;
		}
		off += (uint64_t)n;
		r = cas_bao_encoder_update(e, buf, (size_t)n);
	}
	cas_bao_encoder_free(e);
	if (r < 0) {
		free(s.buf);
		return r;
	}
	if (s.len == 0) {
		free(s.buf);
		s.buf = NULL;
	}
	if (ret_size)
		*ret_size = off;
	*ret_outboard = s.buf;
	*ret_outboard_len = s.len;
	return 0;
}

/* ---- verification ---- */

static const uint8_t *node_at(const uint8_t *outboard, uint64_t index)
{
	return outboard + index * CAS_BAO_NODE_SIZE;
}

/* The subtree of n >= 2 groups at post-order base, whose value must be
 * expect (flags: ROOT for the whole tree). */
static int check_subtree(const uint8_t *outboard, uint64_t n, uint64_t base,
			 const uint8_t expect[CV_LEN], uint8_t flags)
{
	const uint8_t *node = node_at(outboard, base + n - 2);
	uint8_t cv[CV_LEN];
	parent_cv(node, flags, cv);
	if (memcmp(cv, expect, CV_LEN) != 0)
		return -EBADMSG;
	uint64_t left = pow2_below(n);
	if (left >= 2) {
		int r = check_subtree(outboard, left, base, node, 0);
		if (r < 0)
			return r;
	}
	if (n - left >= 2)
		return check_subtree(outboard, n - left, base + left - 1,
				     node + CV_LEN, 0);
	return 0;
}

int cas_bao_outboard_verify(const cas_digest *digest, uint64_t size,
			    const uint8_t *outboard, size_t outboard_len)
{
	uint64_t groups = cas_bao_groups(size);
	if (outboard_len != cas_bao_outboard_size(size))
		return -EBADMSG;
	if (groups == 1)
		return 0; /* nothing to check: the digest covers the bytes */
	return check_subtree(outboard, groups, 0, digest->bytes, ROOT);
}

/* Where the outboard keeps group g's value: a child half of one node. */
static const uint8_t *leaf_cv(const uint8_t *outboard, uint64_t groups,
			      uint64_t g)
{
	uint64_t start = 0, n = groups, base = 0;
	for (;;) {
		const uint8_t *node = node_at(outboard, base + n - 2);
		uint64_t left = pow2_below(n);
		if (g < start + left) {
			if (left == 1)
				return node;
			n = left;
		} else {
			start += left;
			base += left - 1;
			n -= left;
			if (n == 1)
				return node + CV_LEN;
		}
	}
}

static uint64_t group_len(uint64_t size, uint64_t g)
{
	uint64_t off = g * CAS_BAO_GROUP_SIZE;
	return CAS_MIN(size - off, (uint64_t)CAS_BAO_GROUP_SIZE);
}

/* Checks a range and turns it into groups [ret_first, ret_end). */
static int range_groups(uint64_t size, uint64_t off, uint64_t len,
			uint64_t *ret_first, uint64_t *ret_end)
{
	if (size == 0) {
		if (off != 0 || len != 0)
			return -EINVAL;
		*ret_first = 0;
		*ret_end = 1;
		return 0;
	}
	if (len == 0 || off > size || len > size - off ||
	    off % CAS_BAO_GROUP_SIZE != 0 ||
	    ((off + len) % CAS_BAO_GROUP_SIZE != 0 && off + len != size))
		return -EINVAL;
	*ret_first = off / CAS_BAO_GROUP_SIZE;
	*ret_end = cas_bao_groups(off + len);
	return 0;
}

static bool whole_blob_matches(const cas_digest *digest, const uint8_t *data,
			       size_t len)
{
	cas_digest d;
	cas_hash_buffer(data, len, &d);
	return digest && cas_digest_eq(&d, digest);
}

int cas_bao_verify_groups(const cas_digest *digest, uint64_t size,
			  const uint8_t *outboard, size_t outboard_len,
			  uint64_t first, const uint8_t *data, size_t data_len,
			  uint64_t *ret_bad_group)
{
	uint64_t groups = cas_bao_groups(size), a, end;
	if (first >= groups)
		return -EINVAL;
	int r = range_groups(size, first * CAS_BAO_GROUP_SIZE, data_len, &a,
			     &end);
	if (r < 0)
		return r;
	if (outboard_len != cas_bao_outboard_size(size))
		return -EBADMSG;
	if (groups == 1) {
		if (whole_blob_matches(digest, data, data_len))
			return 0;
		if (ret_bad_group)
			*ret_bad_group = 0;
		return -EBADMSG;
	}
	for (uint64_t g = a; g < end;) {
		/* Whole groups in batches, a short last group alone. */
		uint8_t cvs[BATCH_GROUPS * CV_LEN];
		const uint8_t *p = data + (g - a) * CAS_BAO_GROUP_SIZE;
		uint64_t n = CAS_MIN(end - g, (uint64_t)BATCH_GROUPS);
		if (group_len(size, g + n - 1) < CAS_BAO_GROUP_SIZE)
			n--;
		if (n > 0) {
			full_groups_cv(p, (size_t)n, g, cvs);
		} else {
			group_cv(p, (size_t)group_len(size, g), g, cvs);
			n = 1;
		}
		for (uint64_t i = 0; i < n; i++) {
			const uint8_t *want = leaf_cv(outboard, groups, g + i);
			if (memcmp(cvs + i * CV_LEN, want, CV_LEN) != 0) {
				if (ret_bad_group)
					*ret_bad_group = g + i;
				return -EBADMSG;
			}
		}
		g += n;
	}
	return 0;
}

/* ---- range proofs ---- */

struct proof_walk {
	uint64_t first, end; /* the range's groups */
	const uint8_t *outboard;
	uint8_t *out;	      /* extract: where the next node goes */
	const uint8_t *proof; /* verify: the proof, its length, a cursor */
	size_t proof_len, pos;
	uint64_t size;
	const uint8_t *data;
	uint64_t bad_group;
};

static bool meets(const struct proof_walk *w, uint64_t start, uint64_t n)
{
	return start < w->end && start + n > w->first;
}

static size_t count_nodes(const struct proof_walk *w, uint64_t start,
			  uint64_t n)
{
	if (n == 1 || !meets(w, start, n))
		return 0;
	uint64_t left = pow2_below(n);
	return 1 + count_nodes(w, start, left) +
	       count_nodes(w, start + left, n - left);
}

int cas_bao_proof_size(uint64_t size, uint64_t off, uint64_t len,
		       size_t *ret_len)
{
	struct proof_walk w = {0};
	int r = range_groups(size, off, len, &w.first, &w.end);
	if (r < 0)
		return r;
	*ret_len = count_nodes(&w, 0, cas_bao_groups(size)) * CAS_BAO_NODE_SIZE;
	return 0;
}

static void extract(struct proof_walk *w, uint64_t start, uint64_t n,
		    uint64_t base)
{
	if (n == 1 || !meets(w, start, n))
		return;
	memcpy(w->out, node_at(w->outboard, base + n - 2), CAS_BAO_NODE_SIZE);
	w->out += CAS_BAO_NODE_SIZE;
	uint64_t left = pow2_below(n);
	extract(w, start, left, base);
	extract(w, start + left, n - left, base + left - 1);
}

int cas_bao_proof_extract(uint64_t size, const uint8_t *outboard,
			  size_t outboard_len, uint64_t off, uint64_t len,
			  uint8_t *ret_proof)
{
	struct proof_walk w = {.outboard = outboard, .out = ret_proof};
	int r = range_groups(size, off, len, &w.first, &w.end);
	if (r < 0)
		return r;
	if (outboard_len != cas_bao_outboard_size(size))
		return -EBADMSG;
	extract(&w, 0, cas_bao_groups(size), 0);
	return 0;
}

/* Pre-order, as the proof is laid out: a node is checked against the
 * value its parent gave before its own halves are believed. */
static int verify_subtree(struct proof_walk *w, uint64_t start, uint64_t n,
			  const uint8_t expect[CV_LEN], uint8_t flags)
{
	uint8_t cv[CV_LEN];
	if (n == 1) {
		const uint8_t *p =
			w->data + (start - w->first) * CAS_BAO_GROUP_SIZE;
		group_cv(p, (size_t)group_len(w->size, start), start, cv);
		if (memcmp(cv, expect, CV_LEN) != 0) {
			w->bad_group = start;
			return -EBADMSG;
		}
		return 0;
	}
	/* The caller checked the proof's length against the range. */
	const uint8_t *node = w->proof + w->pos;
	w->pos += CAS_BAO_NODE_SIZE;
	parent_cv(node, flags, cv);
	if (memcmp(cv, expect, CV_LEN) != 0) {
		w->bad_group = CAS_MAX(start, w->first);
		return -EBADMSG;
	}
	uint64_t left = pow2_below(n);
	int r = 0;
	if (meets(w, start, left))
		r = verify_subtree(w, start, left, node, 0);
	if (r >= 0 && meets(w, start + left, n - left))
		r = verify_subtree(w, start + left, n - left, node + CV_LEN, 0);
	return r;
}

int cas_bao_proof_verify(const cas_digest *digest, uint64_t size, uint64_t off,
			 uint64_t len, const uint8_t *proof, size_t proof_len,
			 const uint8_t *data, uint64_t *ret_bad_group)
{
	size_t want;
	int r = cas_bao_proof_size(size, off, len, &want);
	if (r < 0)
		return r;
	struct proof_walk w = {.proof = proof,
			       .proof_len = proof_len,
			       .size = size,
			       .data = data};
	r = range_groups(size, off, len, &w.first, &w.end);
	if (r < 0)
		return r;
	if (proof_len != want) {
		w.bad_group = w.first;
		r = -EBADMSG;
	} else if (cas_bao_groups(size) == 1) {
		/* One group: the digest is its own root, no proof. */
		if (!whole_blob_matches(digest, data, (size_t)len)) {
			w.bad_group = 0;
			r = -EBADMSG;
		}
	} else {
		r = verify_subtree(&w, 0, cas_bao_groups(size), digest->bytes,
				   ROOT);
	}
	if (r < 0 && ret_bad_group)
		*ret_bad_group = w.bad_group;
	return r;
}
