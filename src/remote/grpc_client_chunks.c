/* grpc_client_chunks.c - the client's reads of large blobs by chunk
 * (grpc_i.h): against a server that answers Stat `send_chunks` with a
 * list (snix; castore serve), a blob is fetched as its chunks, several
 * at a time on one connection, each verified against its own digest
 * before any of its bytes go on, and against the blob's outboard too
 * when the server also sends one (`send_bao`); the cache then checks the
 * whole against the blob's digest as for any fetch. A server that gives
 * no list (a small blob, tvix) is read whole with one Read, as before.
 *
 * Memory: at most WINDOW_BYTES of chunks are held at once; a list whose
 * chunk is over CHUNK_MAX is refused (snix cuts at most 1 MiB).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/bao.h"
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
 * it gives no answer to use (read the blob whole), -EIO (logged) for an
 * answer that does not decode or a chunk over CHUNK_MAX. */
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
		return r == -ENOENT ? -ENOENT : -ENOTSUP;
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
		r = fetch(fetch_ud, ds, k, max, window_cb, &w);
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
