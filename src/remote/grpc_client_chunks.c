/* grpc_client_chunks.c - the client's reads of large blobs by chunk
 * (grpc_i.h): against a server that answers Stat `send_chunks` with a
 * list (snix; castore serve), a blob is fetched as its chunks, several
 * at a time on one connection, each verified against its own digest
 * before any of its bytes go on, and against the blob's outboard too
 * when the server also sends one (`send_bao`); the cache then checks the
 * whole against the blob's digest as for any fetch. A server that gives
 * no list (a small blob, tvix) is read whole with one Read, as before.
 *
 * With a list and an outboard, the cache may hold the blob in part
 * (its partial blobs): then it asks for the outboard (outboard_fetch:
 * the Stat, whose list is kept here) and for ranges (blob_range_fetch:
 * the chunks that cover the range, each received into its place in the
 * range, or, for the two that stick out of it, into the thread's edge
 * room and their part inside copied; they are not hashed on their own, since the cache checks
 * every byte of the range against the outboard before use, which is the
 * blob's digest: a chunk's own hash would only check bytes again, or
 * refuse right bytes of a chunk spoilt elsewhere).
 *
 * Memory: at most WINDOW_BYTES of chunks are held at once; a list whose
 * chunk is over CHUNK_MAX is refused (snix cuts at most 1 MiB).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/bao.h"
#include "core/chunker.h"
#include "core/dmap.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"

#define WINDOW_CHUNKS 16
#define WINDOW_BYTES  (16u << 20)
#define CHUNK_MAX     (8u << 20)

struct stat_reply {
	uint8_t *msg;
	size_t len;
	unsigned count;
};

static int stat_msg(void *userdata, const uint8_t *msg, size_t len)
{
	struct stat_reply *sr = userdata;
	if (sr->count++ > 0)
		return -EBADMSG; /* unary: one message */
	sr->msg = malloc(len ? len : 1);
	if (!sr->msg)
		return -ENOMEM;
	memcpy(sr->msg, msg, len);
	sr->len = len;
	return 0;
}

/* The outboard check of the bytes as they go by: whole groups are
 * verified against the (verified) outboard, the rest waits. */
struct group_check {
	const cas_digest *digest;
	uint64_t size;
	const uint8_t *bao;
	size_t bao_len;
	uint8_t buf[CAS_BAO_GROUP_SIZE];
	size_t fill;
	uint64_t group;
};

static int group_feed(struct group_check *gc, const uint8_t *data, size_t len,
		      bool last)
{
	while (len > 0 || (last && gc->fill > 0)) {
		size_t take = CAS_MIN(len, sizeof(gc->buf) - gc->fill);
		memcpy(gc->buf + gc->fill, data, take);
		gc->fill += take;
		data += take;
		len -= take;
		if (gc->fill < sizeof(gc->buf) && !(last && len == 0))
			return 0;
		uint64_t bad;
		if (cas_bao_verify_groups(gc->digest, gc->size, gc->bao,
					  gc->bao_len, gc->group, gc->buf,
					  gc->fill, &bad) < 0)
			return -EBADMSG;
		gc->group++;
		gc->fill = 0;
	}
	return 0;
}

struct window {
	const cas_digest *blob;
	const char *url;
	const cas_chunk *chunks; /* of this window */
	bool quiet;		 /* a failed chunk is the caller's to report */
	uint8_t *bufs[WINDOW_CHUNKS];
	int r[WINDOW_CHUNKS];
	/* A range (range_once): each chunk's part inside [out_off, out_off
	 * + out_len) goes straight into out, the chunk starting at
	 * at[i] of the blob, and is not hashed on its own: the caller
	 * checks every byte it uses against the blob's outboard (the
	 * fetcher's contract: a range is unverified). NULL out: whole
	 * chunks into bufs, each checked against its digest. */
	uint8_t *out;
	uint64_t out_off, out_len;
	uint64_t at[WINDOW_CHUNKS];
};

static void window_cb(void *userdata, size_t i, int r, const uint8_t *buf,
		      size_t len)
{
	struct window *w = userdata;
	const cas_chunk *c = &w->chunks[i];
	char bhex[CAS_DIGEST_HEX_LEN + 1], chex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest got;

	cas_digest_to_hex(w->blob, bhex);
	cas_digest_to_hex(&c->digest, chex);
	if (r == 0 && len != c->size)
		r = -EBADMSG;
	if (r == 0 && w->out) {
		uint64_t from = CAS_MAX(w->at[i], w->out_off);
		uint64_t to = CAS_MIN(w->at[i] + len, w->out_off + w->out_len);
		uint8_t *place = w->out + (from - w->out_off);
		if (to > from && place != buf + (from - w->at[i]))
			memcpy(w->out + (from - w->out_off),
			       buf + (from - w->at[i]), (size_t)(to - from));
		w->r[i] = 0;
		return;
	}
	if (r == 0) {
		cas_hasher h;
		cas_hasher_init(&h);
		cas_hasher_update(&h, buf, len);
		cas_hasher_final(&h, &got);
		if (!cas_digest_eq(&got, &c->digest))
			r = -EBADMSG;
	}
	if (r == 0 && !(w->bufs[i] = malloc(len)))
		r = -ENOMEM;
	if (r == 0) {
		memcpy(w->bufs[i], buf, len);
	} else if (w->quiet) {
		cas_log_debug("blob %s: chunk %s from %s: %s", bhex, chex,
			      w->url, strerror(-r));
	} else if (r == -EBADMSG) {
		cas_log_error("blob %s: chunk %s from %s: wrong bytes (%zu, "
			      "%" PRIu64 " expected)",
			      bhex, chex, w->url, len, c->size);
	} else {
		cas_log_error("blob %s: chunk %s from %s: %s", bhex, chex,
			      w->url, r == -ENOENT ? "absent" : strerror(-r));
	}
	w->r[i] = r;
}

/* Stat with send_chunks and send_bao: the list (malloc'd) and the bao
 * (pointing into *ret_msg, which the caller frees), and the size the
 * list adds up to. -ENOENT when the server lacks the blob, -ENOTSUP when
 * it answers but gives nothing to use (read the blob whole), -EIO
 * (logged) when it cannot be reached, for an answer that does not decode
 * or a chunk over CHUNK_MAX. */
static int stat_list(cas_grpc_client *client, const cas_digest *d,
		     uint8_t **ret_msg, cas_chunk **ret_chunks, size_t *ret_n,
		     const uint8_t **ret_bao, size_t *ret_bao_len,
		     uint64_t *ret_total)
{
	_cleanup_free_ uint8_t *req = NULL;
	struct stat_reply sr = {0};
	size_t req_len;
	char message[256], hex[CAS_DIGEST_HEX_LEN + 1];
	const char *url = cas_grpc_client_url(client);
	int status;
	uint64_t total = 0;

	cas_digest_to_hex(d, hex);
	int r = cas_grpc_encode_stat_request(d, true, true, &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(client, CAS_GRPC_BLOB_STAT, req, req_len, NULL, NULL,
			  stat_msg, &sr, &status, message, sizeof(message));
	if (r < 0 || sr.count != 1) {
		free(sr.msg);
		/* A transport failure is logged already; a server that
		 * answers but not with a list is read whole. */
		if (r == -EBADMSG && status < 0)
			return cas_log_errno(-EIO,
					     "blob %s: %s: Stat answer of more "
					     "than one message",
					     hex, url);
		if (r == -ENOENT || (r < 0 && status < 0))
			return r;
		return -ENOTSUP;
	}
	r = cas_grpc_decode_stat_response(sr.msg, sr.len, ret_chunks, ret_n,
					  ret_bao, ret_bao_len);
	if (r < 0) {
		free(sr.msg);
		return cas_log_errno(-EIO,
				     "blob %s: %s: Stat answer does not decode",
				     hex, url);
	}
	for (size_t i = 0; i < *ret_n; i++) {
		if (ret_chunks[0][i].size > CHUNK_MAX ||
		    total + ret_chunks[0][i].size < total) {
			free(sr.msg);
			free(*ret_chunks);
			*ret_chunks = NULL;
			return cas_log_errno(-EIO,
					     "blob %s: %s: a chunk of the list "
					     "is over %u bytes",
					     hex, url, CHUNK_MAX);
		}
		total += ret_chunks[0][i].size;
	}
	*ret_msg = sr.msg;
	*ret_total = total;
	return 0;
}

int cas_grpc_fetch_chunked(cas_grpc_client *client, cas_grpc_blobs_fn fetch,
			   void *fetch_ud, const cas_digest *d,
			   int (*sink)(void *, const void *, size_t),
			   void *sink_ud)
{
	_cleanup_free_ cas_chunk *chunks = NULL;
	_cleanup_free_ struct group_check *gc = NULL;
	_cleanup_free_ uint8_t *msg = NULL;
	const uint8_t *bao;
	size_t n = 0, bao_len;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	const char *url = cas_grpc_client_url(client);
	uint64_t total = 0;

	cas_digest_to_hex(d, hex);
	int r = stat_list(client, d, &msg, &chunks, &n, &bao, &bao_len, &total);
	if (r == -ENOTSUP)
		return 0; /* no list to be had: Read it whole */
	if (r < 0)
		return r;
	if (n < 2)
		return 0; /* small, or one chunk: the blob itself */
	if (bao_len > 0) {
		gc = malloc(sizeof(*gc));
		if (!gc)
			return -ENOMEM;
		*gc = (struct group_check){.digest = d,
					   .size = total,
					   .bao = bao,
					   .bao_len = bao_len};
		if (cas_bao_outboard_verify(d, total, bao, bao_len) < 0)
			return cas_log_errno(-EIO,
					     "blob %s: %s: the outboard does "
					     "not match the blob's digest",
					     hex, url);
	}

	struct window w = {.blob = d, .url = url};
	cas_digest ds[WINDOW_CHUNKS];
	uint64_t off = 0;
	for (size_t i = 0; i < n && r >= 0;) {
		size_t k = 0, bytes = 0, max = 0;
		while (i + k < n && k < WINDOW_CHUNKS &&
		       (k == 0 || bytes + chunks[i + k].size <= WINDOW_BYTES)) {
			ds[k] = chunks[i + k].digest;
			bytes += chunks[i + k].size;
			max = CAS_MAX(max, (size_t)chunks[i + k].size);
			k++;
		}
		w.chunks = &chunks[i];
		for (size_t j = 0; j < k; j++) {
			w.bufs[j] = NULL;
			w.r[j] = -EIO;
		}
		r = fetch(fetch_ud, ds, k, max, NULL, window_cb, &w);
		for (size_t j = 0; j < k; j++) {
			if (r >= 0 && w.r[j] < 0)
				r = -EIO;
			if (r >= 0 && gc &&
			    group_feed(gc, w.bufs[j], chunks[i + j].size,
				       i + j == n - 1) < 0)
				r = cas_log_errno(
					-EIO,
					"blob %s: %s: chunk at %" PRIu64
					" disagrees with the outboard",
					hex, url, off);
			if (r >= 0)
				r = sink(sink_ud, w.bufs[j],
					 chunks[i + j].size);
			off += chunks[i + j].size;
			free(w.bufs[j]);
		}
		i += k;
	}
	return r < 0 ? r : 1;
}

/* Ranges of large blobs (the cache's partial blobs: remote_i.h's
 * outboard_fetch and blob_range_fetch) -------------------------------- */

/* The lists of the blobs whose outboard was fetched, for the ranges
 * that follow. Bounded: past LISTS_MAX blobs, the table starts over (a
 * range of a forgotten blob asks Stat again). */
#define LISTS_MAX 1024

struct blob_list {
	cas_chunk *chunks;
	uint64_t *offs; /* n + 1: where each chunk starts, then the size */
	size_t n;
};

struct cas_grpc_lists {
	pthread_mutex_t lock;
	struct cas_dmap m; /* digest -> blob_list; lock */
};

static void blob_list_free(void *v)
{
	struct blob_list *b = v;
	if (b) {
		free(b->chunks);
		free(b->offs);
	}
	free(b);
}

int cas_grpc_lists_new(struct cas_grpc_lists **ret)
{
	struct cas_grpc_lists *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	pthread_mutex_init(&l->lock, NULL);
	*ret = l;
	return 0;
}

void cas_grpc_lists_free(struct cas_grpc_lists *l)
{
	if (!l)
		return;
	cas_dmap_release(&l->m, blob_list_free);
	pthread_mutex_destroy(&l->lock);
	free(l);
}

/* The blob's list and outboard from the server (both needed for ranges):
 * the list is kept in l; the outboard copied out (malloc'd). -ENOENT
 * when the server gives no list of two chunks or more, or no outboard. */
static int learn(cas_grpc_client *client, struct cas_grpc_lists *l,
		 const cas_digest *d, size_t max, uint8_t **ret_bao,
		 size_t *ret_bao_len)
{
	struct blob_list *b = calloc(1, sizeof(*b));
	const uint8_t *bao;
	size_t bao_len;
	uint64_t total;
	uint8_t *msg = NULL;
	if (!b)
		return -ENOMEM;
	int r = stat_list(client, d, &msg, &b->chunks, &b->n, &bao, &bao_len,
			  &total);
	if (r == -ENOTSUP)
		r = -ENOENT; /* no list: the blob is read whole */
	if (r == 0 && (b->n < 2 || bao_len == 0))
		r = -ENOENT;
	if (r == 0 && bao_len > max)
		r = -EIO;
	if (r == 0 && !(b->offs = malloc((b->n + 1) * sizeof(*b->offs))))
		r = -ENOMEM;
	if (r == 0 && ret_bao && !(*ret_bao = malloc(bao_len)))
		r = -ENOMEM;
	if (r < 0) {
		free(msg);
		blob_list_free(b);
		return r;
	}
	if (ret_bao) {
		memcpy(*ret_bao, bao, bao_len);
		*ret_bao_len = bao_len;
	}
	free(msg);
	b->offs[0] = 0;
	for (size_t i = 0; i < b->n; i++)
		b->offs[i + 1] = b->offs[i] + b->chunks[i].size;
	pthread_mutex_lock(&l->lock);
	if (l->m.n >= LISTS_MAX)
		cas_dmap_release(&l->m, blob_list_free);
	struct cas_dmap_entry *e = cas_dmap_find(&l->m, d);
	if (e) {
		blob_list_free(e->value);
		e->value = b;
		r = 0;
	} else {
		r = cas_dmap_put(&l->m, d, b);
	}
	pthread_mutex_unlock(&l->lock);
	if (r < 0) {
		blob_list_free(b);
		if (ret_bao)
			free(*ret_bao);
		return r;
	}
	return 0;
}

int cas_grpc_outboard_fetch(cas_grpc_client *client, struct cas_grpc_lists *l,
			    const cas_digest *d, size_t max, uint8_t **ret_buf,
			    size_t *ret_len)
{
	return learn(client, l, d, max, ret_buf, ret_len);
}

/* A copy of the list's chunks [i, j) covering [off, off + len), and
 * where chunk i starts. -ENOENT when the list is not known. */
static int cover(struct cas_grpc_lists *l, const cas_digest *d, uint64_t off,
		 size_t len, cas_chunk **ret, size_t *ret_n,
		 uint64_t *ret_first_off)
{
	int r = -ENOENT;
	pthread_mutex_lock(&l->lock);
	struct cas_dmap_entry *e = cas_dmap_find(&l->m, d);
	if (e) {
		const struct blob_list *b = e->value;
		uint64_t end = off + len;
		size_t lo = 0, hi = b->n; /* first chunk ending after off */
		while (lo < hi) {
			size_t mid = lo + (hi - lo) / 2;
			if (b->offs[mid + 1] <= off)
				lo = mid + 1;
			else
				hi = mid;
		}
		size_t j = lo;
		while (j < b->n && b->offs[j] < end)
			j++;
		*ret_n = j - lo;
		*ret_first_off = lo < b->n ? b->offs[lo] : b->offs[b->n];
		*ret = malloc((*ret_n ? *ret_n : 1) * sizeof(**ret));
		r = *ret ? 0 : -ENOMEM;
		if (*ret && *ret_n)
			memcpy(*ret, &b->chunks[lo], *ret_n * sizeof(**ret));
	}
	pthread_mutex_unlock(&l->lock);
	return r;
}

/* Room for the chunks that stick out of a range (its first and last),
 * one per thread for its life: allocated per range, they were new pages
 * to fault in each time (a fifth of a cold read's CPU). */
#define EDGE_ROOM (2u * CAS_CHUNK_MAX)
static pthread_key_t edge_key;
static pthread_once_t edge_once = PTHREAD_ONCE_INIT;

static void edge_key_make(void)
{
	if (pthread_key_create(&edge_key, free) != 0)
		edge_key = (pthread_key_t)-1;
}

static uint8_t *edge_room(void)
{
	pthread_once(&edge_once, edge_key_make);
	if (edge_key == (pthread_key_t)-1)
		return NULL;
	uint8_t *p = pthread_getspecific(edge_key);
	if (!p && (p = malloc(EDGE_ROOM)) && pthread_setspecific(edge_key, p)) {
		free(p);
		p = NULL;
	}
	return p;
}

static int range_once(cas_grpc_client *client, struct cas_grpc_lists *l,
		      cas_grpc_blobs_fn fetch, void *fetch_ud,
		      const cas_digest *d, uint64_t off, size_t len,
		      uint8_t *buf, size_t *ret_len, bool *ret_absent)
{
	_cleanup_free_ cas_chunk *chunks = NULL;
	size_t n = 0;
	uint64_t at;
	*ret_len = 0;
	int r = cover(l, d, off, len, &chunks, &n, &at);
	if (r == -ENOENT) {
		/* Forgotten (or another process's open): ask again. */
		r = learn(client, l, d, SIZE_MAX, NULL, NULL);
		if (r == 0)
			r = cover(l, d, off, len, &chunks, &n, &at);
	}
	if (r < 0)
		return r;
	struct window w = {.blob = d,
			   .url = cas_grpc_client_url(client),
			   .quiet = true,
			   .out = buf,
			   .out_off = off,
			   .out_len = len};
	cas_digest ds[WINDOW_CHUNKS];
	struct cas_grpc_dest dest[WINDOW_CHUNKS];
	for (size_t i = 0; i < n && r >= 0;) {
		size_t k = 0, bytes = 0, max = 0;
		while (i + k < n && k < WINDOW_CHUNKS &&
		       (k == 0 || bytes + chunks[i + k].size <= WINDOW_BYTES)) {
			ds[k] = chunks[i + k].digest;
			bytes += chunks[i + k].size;
			max = CAS_MAX(max, (size_t)chunks[i + k].size);
			k++;
		}
		w.chunks = &chunks[i];
		uint8_t *edge = edge_room();
		size_t edge_used = 0;
		for (size_t j = 0, a = at; j < k; j++) {
			w.bufs[j] = NULL;
			w.r[j] = -EIO;
			w.at[j] = a;
			/* A chunk wholly inside the range is read into its
			 * place; one that sticks out, into the thread's edge
			 * room (or a buffer of its size). */
			uint64_t size = chunks[i + j].size;
			uint8_t *to = NULL;
			if (a >= off && a + size <= off + len) {
				to = buf + (a - off);
			} else if (edge && size <= EDGE_ROOM - edge_used) {
				to = edge + edge_used;
				edge_used += (size_t)size;
			}
			dest[j] = (struct cas_grpc_dest){to, (size_t)size};
			a += chunks[i + j].size;
		}
		r = fetch(fetch_ud, ds, k, max, dest, window_cb, &w);
		for (size_t j = 0; j < k; j++) {
			if (w.r[j] == -ENOENT)
				*ret_absent = true;
			if (r >= 0 && w.r[j] < 0)
				r = -EIO;
			/* The part of this chunk inside [off, off + len) is
			 * in buf already (window_cb). */
			uint64_t cend = at + chunks[i + j].size;
			if (r >= 0 &&
			    CAS_MIN(cend, off + len) > CAS_MAX(at, off))
				*ret_len = (size_t)(CAS_MIN(cend, off + len) -
						    off);
			at = cend;
		}
		i += k;
	}
	return r < 0 ? r : 0;
}

int cas_grpc_range_fetch(cas_grpc_client *client, struct cas_grpc_lists *l,
			 cas_grpc_blobs_fn fetch, void *fetch_ud,
			 const cas_digest *d, uint64_t off, size_t len,
			 uint8_t *buf, size_t *ret_len)
{
	bool absent = false;
	int r = range_once(client, l, fetch, fetch_ud, d, off, len, buf,
			   ret_len, &absent);
	/* A server keeps its chunk lists in memory (castore serve does): a
	 * restarted one knows a chunk again after a Stat of its blob. */
	if (r < 0 && absent && learn(client, l, d, SIZE_MAX, NULL, NULL) == 0)
		r = range_once(client, l, fetch, fetch_ud, d, off, len, buf,
			       ret_len, &absent);
	return r;
}
