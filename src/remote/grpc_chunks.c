/* grpc_chunks.c - snix's chunk messages on the wire (grpc_i.h) and the
 * server's answers that need them (grpc_server_i.h): Stat with
 * `send_chunks` and `send_bao`, Read of a chunk, and snix's
 * BlobStoreService (StatBlob, GetBlob, PutBlob of a BlobMeta) whose
 * chunks ChunkStoreService moves (StatChunk, GetChunk and PutChunk are
 * Stat, Read and Put under other names: same messages, field for field).
 *
 * Messages (protos/snix_chunks.proto and tvix's rpc_blobstore.proto):
 *     StatBlobRequest  { bytes digest = 1; bool send_chunks = 2;
 *                        bool send_bao = 3; }
 *     StatBlobResponse { repeated ChunkMeta chunks = 2; bytes bao = 3; }
 *     ChunkMeta        { bytes digest = 1; uint64 size = 2; }
 *     BlobMeta         { repeated ChunkMeta chunks = 2; }
 *     GetBlobResponse  { BlobMeta blob_meta = 1; }
 *     PutBlobRequest   { bytes digest = 1; BlobMeta blob_meta = 2; }
 * Everything here is decoded with a bounds-checked cursor (core/varint.h);
 * peers' bytes never crash it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"
#include "core/util.h"
#include "core/varint.h"
#include "remote/grpc_i.h"
#include "remote/grpc_server_i.h"
#include "store/chunk_index.h"

/* Wire ------------------------------------------------------------------- */

struct field {
	uint32_t num;
	unsigned wire;
	uint64_t v;	  /* varint */
	const uint8_t *b; /* length-delimited */
	size_t blen;
};

/* The next field of [*p, end): 1, 0 at the end, -EBADMSG. */
static int next_field(const uint8_t **p, const uint8_t *end, struct field *f)
{
	uint64_t tag;
	if (*p == end)
		return 0;
	if (cas_varint_get(p, end, &tag) < 0 || (tag >> 3) == 0 ||
	    (tag >> 3) > UINT32_MAX)
		return -EBADMSG;
	*f = (struct field){.num = (uint32_t)(tag >> 3),
			    .wire = (unsigned)(tag & 7)};
	switch (f->wire) {
	case 0:
		return cas_varint_get(p, end, &f->v) < 0 ? -EBADMSG : 1;
	case 1:
		if (end - *p < 8)
			return -EBADMSG;
		*p += 8;
		return 1;
	case 2:
		if (cas_varint_get(p, end, &f->v) < 0 ||
		    f->v > (uint64_t)(end - *p))
			return -EBADMSG;
		f->b = *p;
		f->blen = (size_t)f->v;
		*p += f->blen;
		return 1;
	case 5:
		if (end - *p < 4)
			return -EBADMSG;
		*p += 4;
		return 1;
	default:
		return -EBADMSG;
	}
}

int cas_grpc_decode_stat_request(const uint8_t *msg, size_t len,
				 cas_digest *ret, bool *ret_chunks,
				 bool *ret_bao, const char **ret_why)
{
	const uint8_t *p = msg, *end = msg + len;
	struct field f;
	bool have = false;
	int r;
	*ret_chunks = *ret_bao = false;
	*ret_why = "malformed StatBlobRequest";
	while ((r = next_field(&p, end, &f)) > 0) {
		if (f.num == 1 && f.wire == 2) {
			if (f.blen != CAS_DIGEST_LEN) {
				*ret_why = "digest is not 32 bytes";
				return -EINVAL;
			}
			memcpy(ret->bytes, f.b, CAS_DIGEST_LEN);
			have = true;
		} else if ((f.num == 2 || f.num == 3) && f.wire == 0) {
			*(f.num == 2 ? ret_chunks : ret_bao) = f.v != 0;
		} else if (f.num <= 3) {
			return -EINVAL;
		}
	}
	if (r < 0)
		return -EINVAL;
	if (!have) {
		*ret_why = "digest is not 32 bytes";
		return -EINVAL;
	}
	return 0;
}

int cas_grpc_encode_stat_request(const cas_digest *d, bool chunks, bool bao,
				 uint8_t **ret, size_t *ret_len)
{
	size_t body = 2 + CAS_DIGEST_LEN + (chunks ? 2 : 0) + (bao ? 2 : 0);
	uint8_t *buf = malloc(5 + body), *p;
	if (!buf)
		return -ENOMEM;
	cas_grpc_frame_prefix(buf, body);
	p = buf + 5;
	*p++ = 0x0a;
	*p++ = CAS_DIGEST_LEN;
	memcpy(p, d->bytes, CAS_DIGEST_LEN);
	p += CAS_DIGEST_LEN;
	if (chunks) {
		*p++ = 0x10;
		*p++ = 1;
	}
	if (bao) {
		*p++ = 0x18;
		*p++ = 1;
	}
	*ret = buf;
	*ret_len = 5 + body;
	return 0;
}

/* Bytes of one ChunkMeta. */
static size_t chunk_meta_len(const cas_chunk *c)
{
	return 2 + CAS_DIGEST_LEN + 1 + cas_varint_len(c->size);
}

/* Writes the chunks as repeated ChunkMeta of field `num`. */
static uint8_t *put_chunks(uint8_t *p, unsigned num, const cas_chunk *c,
			   size_t n)
{
	for (size_t i = 0; i < n; i++) {
		*p++ = (uint8_t)(num << 3 | 2);
		p = cas_varint_put(p, chunk_meta_len(&c[i]));
		*p++ = 0x0a;
		*p++ = CAS_DIGEST_LEN;
		memcpy(p, c[i].digest.bytes, CAS_DIGEST_LEN);
		p += CAS_DIGEST_LEN;
		*p++ = 0x10;
		p = cas_varint_put(p, c[i].size);
	}
	return p;
}

static size_t chunks_len(const cas_chunk *c, size_t n)
{
	size_t len = 0;
	for (size_t i = 0; i < n; i++) {
		size_t m = chunk_meta_len(&c[i]);
		len += 1 + cas_varint_len(m) + m;
	}
	return len;
}

int cas_grpc_encode_stat_response(const cas_chunk *chunks, size_t n,
				  const uint8_t *bao, size_t bao_len,
				  uint8_t **ret, size_t *ret_len)
{
	size_t body = chunks_len(chunks, n);
	if (bao_len)
		body += 1 + cas_varint_len(bao_len) + bao_len;
	if (body > CAS_GRPC_MAX_MESSAGE)
		return -EMSGSIZE;
	uint8_t *buf = malloc(5 + body), *p;
	if (!buf)
		return -ENOMEM;
	cas_grpc_frame_prefix(buf, body);
	p = put_chunks(buf + 5, 2, chunks, n);
	if (bao_len) {
		*p++ = 0x1a;
		p = cas_varint_put(p, bao_len);
		memcpy(p, bao, bao_len);
	}
	*ret = buf;
	*ret_len = 5 + body;
	return 0;
}

/* Decodes one ChunkMeta: digest of 32 bytes, size above 0. */
static int decode_chunk_meta(const uint8_t *b, size_t len, cas_chunk *ret)
{
	const uint8_t *p = b, *end = b + len;
	struct field f;
	bool have = false;
	int r;
	ret->size = 0;
	while ((r = next_field(&p, end, &f)) > 0) {
		if (f.num == 1 && f.wire == 2 && f.blen == CAS_DIGEST_LEN) {
			memcpy(ret->digest.bytes, f.b, CAS_DIGEST_LEN);
			have = true;
		} else if (f.num == 2 && f.wire == 0) {
			ret->size = f.v;
		} else if (f.num <= 2) {
			return -EBADMSG;
		}
	}
	return r < 0 || !have || ret->size == 0 ? -EBADMSG : 0;
}

/* Appends a ChunkMeta to *v. */
static int push_chunk(cas_chunk **v, size_t *n, size_t *cap, const uint8_t *b,
		      size_t len)
{
	if (cas_array_grow(v, cap, *n + 1, sizeof(**v), 64) < 0)
		return -ENOMEM;
	int r = decode_chunk_meta(b, len, &(*v)[*n]);
	if (r < 0)
		return r;
	(*n)++;
	return 0;
}

int cas_grpc_decode_stat_response(const uint8_t *msg, size_t len,
				  cas_chunk **ret_chunks, size_t *ret_n,
				  const uint8_t **ret_bao, size_t *ret_bao_len)
{
	const uint8_t *p = msg, *end = msg + len;
	struct field f;
	cas_chunk *v = NULL;
	size_t n = 0, cap = 0;
	int r;
	*ret_bao = NULL;
	*ret_bao_len = 0;
	while ((r = next_field(&p, end, &f)) > 0) {
		if (f.num == 2 && f.wire == 2)
			r = push_chunk(&v, &n, &cap, f.b, f.blen);
		else if (f.num == 3 && f.wire == 2) {
			*ret_bao = f.b;
			*ret_bao_len = f.blen;
		} else if (f.num == 2 || f.num == 3)
			r = -EBADMSG;
		if (r < 0)
			break;
	}
	if (r < 0) {
		free(v);
		return r == -ENOMEM ? r : -EBADMSG;
	}
	*ret_chunks = v;
	*ret_n = n;
	return 0;
}

/* GetBlobResponse { BlobMeta blob_meta = 1 { repeated ChunkMeta = 2 } }. */
static int encode_get_blob_response(const cas_chunk *chunks, size_t n,
				    uint8_t **ret, size_t *ret_len)
{
	size_t meta = chunks_len(chunks, n);
	size_t body = 1 + cas_varint_len(meta) + meta;
	if (body > CAS_GRPC_MAX_MESSAGE)
		return -EMSGSIZE;
	uint8_t *buf = malloc(5 + body), *p;
	if (!buf)
		return -ENOMEM;
	cas_grpc_frame_prefix(buf, body);
	p = buf + 5;
	*p++ = 0x0a;
	p = cas_varint_put(p, meta);
	put_chunks(p, 2, chunks, n);
	*ret = buf;
	*ret_len = 5 + body;
	return 0;
}

/* PutBlobRequest: the digest and the BlobMeta's chunks (malloc'd). */
static int decode_put_blob_request(const uint8_t *msg, size_t len,
				   cas_digest *ret, cas_chunk **ret_chunks,
				   size_t *ret_n, const char **ret_why)
{
	const uint8_t *p = msg, *end = msg + len;
	struct field f, g;
	cas_chunk *v = NULL;
	size_t n = 0, cap = 0;
	bool have = false;
	int r;
	*ret_why = "malformed PutBlobRequest";
	while ((r = next_field(&p, end, &f)) > 0) {
		if (f.num == 1 && f.wire == 2 && f.blen == CAS_DIGEST_LEN) {
			memcpy(ret->bytes, f.b, CAS_DIGEST_LEN);
			have = true;
		} else if (f.num == 2 && f.wire == 2) {
			const uint8_t *q = f.b, *qend = f.b + f.blen;
			while ((r = next_field(&q, qend, &g)) > 0) {
				if (g.num == 2 && g.wire == 2)
					r = push_chunk(&v, &n, &cap, g.b,
						       g.blen);
				else if (g.num == 2)
					r = -EBADMSG;
				if (r < 0)
					break;
			}
		} else if (f.num <= 2) {
			r = -EBADMSG;
		}
		if (r < 0)
			break;
	}
	if (r < 0 || !have) {
		free(v);
		if (r == -ENOMEM)
			return r;
		if (!have && r == 0)
			*ret_why = "digest is not 32 bytes";
		return -EINVAL;
	}
	*ret_chunks = v;
	*ret_n = n;
	return 0;
}

/* The server ------------------------------------------------------------- */

/* The outboard of blob d (none for a blob of one group): the one the
 * store keeps (or computes and keeps), read; computed here from the
 * blob's bytes only for a store that keeps none. The client verifies
 * it against d whichever way it came. */
static int blob_outboard(cas_store *s, const cas_digest *d, uint8_t **ret,
			 size_t *ret_len)
{
	int r = cas_store_blob_outboard_read(s, d, CAS_GRPC_MAX_MESSAGE / 2,
					     ret, ret_len);
	if (r != -ENOTSUP)
		return r;
	int fd;
	uint64_t size;
	cas_digest got;
	if ((r = s->ops->blob_open(s, d, &fd, &size)) < 0)
		return r;
	r = cas_bao_hash_fd(fd, &got, &size, ret, ret_len);
	close(fd);
	if (r >= 0 && !cas_digest_eq(&got, d)) {
		free(*ret);
		*ret = NULL;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(-EIO,
				     "blob %s: its bytes do not "
				     "hash to its name",
				     hex);
	}
	return r;
}

int cas_grpc_serve_stat(const struct cas_grpc_session_env *env,
			const uint8_t *req, size_t len, uint8_t **ret,
			size_t *ret_len, const char **ret_why)
{
	cas_store *s = env->store;
	cas_digest d, blob;
	bool want_chunks, want_bao;
	uint64_t size, off;
	_cleanup_free_ cas_chunk *chunks = NULL;
	_cleanup_free_ uint8_t *bao = NULL;
	size_t n = 0, bao_len = 0;
	int r = cas_grpc_decode_stat_request(req, len, &d, &want_chunks,
					     &want_bao, ret_why);
	if (r < 0)
		return r;
	*ret_why = NULL;
	r = s->ops->blob_stat(s, &d, &size);
	if (r == -ENOENT && env->chunks &&
	    cas_chunk_index_find(env->chunks, &d, &blob, &off, &size) == 0)
		/* A chunk: a blob of its own to Read, with no finer list. */
		return cas_grpc_encode_stat_response(NULL, 0, NULL, 0, ret,
						     ret_len);
	if (r < 0) {
		*ret_why = r == -ENOENT ? "blob not found" : NULL;
		return r;
	}
	if (want_chunks && env->chunks &&
	    (r = cas_chunk_index_list(env->chunks, &d, &chunks, &n, NULL)) < 0)
		return r;
	if (want_bao && cas_bao_wants_outboard(size) &&
	    cas_bao_outboard_size(size) <= CAS_GRPC_MAX_MESSAGE / 2 &&
	    (r = blob_outboard(s, &d, &bao, &bao_len)) < 0)
		return r;
	r = cas_grpc_encode_stat_response(chunks, n, bao, bao_len, ret,
					  ret_len);
	if (r == -EMSGSIZE) /* a list too long for one message: none */
		r = cas_grpc_encode_stat_response(NULL, 0, bao, bao_len, ret,
						  ret_len);
	return r;
}

int cas_grpc_serve_locate_chunk(const struct cas_grpc_session_env *env,
				const cas_digest *d, int *ret_fd,
				uint64_t *ret_base, uint64_t *ret_size,
				bool *ret_borrowed)
{
	cas_store *s = env->store;
	cas_digest blob;
	uint64_t off, size, bsize;
	if (!env->chunks ||
	    cas_chunk_index_find(env->chunks, d, &blob, &off, &size) < 0)
		return -ENOENT;
	/* Large blobs are files, never packed: blob_open. */
	int r = s->ops->blob_open(s, &blob, ret_fd, &bsize);
	if (r < 0)
		return r;
	if (off > bsize || size > bsize - off) {
		close(*ret_fd);
		*ret_fd = -1;
		return -EIO;
	}
	*ret_base = off;
	*ret_size = size;
	*ret_borrowed = false;
	return 0;
}

int cas_grpc_serve_stat_blob(const struct cas_grpc_session_env *env,
			     const uint8_t *req, size_t len, uint8_t **ret,
			     size_t *ret_len, const char **ret_why)
{
	cas_store *s = env->store;
	cas_digest d;
	uint64_t size;
	int r = cas_grpc_decode_read(req, len, &d, ret_why);
	if (r < 0)
		return r;
	r = s->ops->blob_stat(s, &d, &size);
	if (r < 0) {
		*ret_why = r == -ENOENT ? "blob not found" : NULL;
		return r;
	}
	return cas_grpc_encode_stat_response(NULL, 0, NULL, 0, ret, ret_len);
}

int cas_grpc_serve_get_blob(const struct cas_grpc_session_env *env,
			    const uint8_t *req, size_t len, uint8_t **ret,
			    size_t *ret_len, const char **ret_why)
{
	cas_store *s = env->store;
	cas_digest d;
	uint64_t size;
	_cleanup_free_ cas_chunk *chunks = NULL;
	size_t n = 0;
	int r = cas_grpc_decode_read(req, len, &d, ret_why);
	if (r < 0)
		return r;
	*ret_why = NULL;
	if (env->chunks)
		r = cas_chunk_index_list(env->chunks, &d, &chunks, &n, &size);
	else
		r = s->ops->blob_stat(s, &d, &size);
	if (r < 0) {
		*ret_why = r == -ENOENT ? "blob not found" : NULL;
		return r;
	}
	/* An empty list describes the empty blob alone: a small one is
	 * its own one chunk. */
	cas_chunk self = {d, size};
	if (n == 0 && size > 0)
		return encode_get_blob_response(&self, 1, ret, ret_len);
	return encode_get_blob_response(chunks, n, ret, ret_len);
}

/* Writes chunk c (a blob of the store) into w, checking its size. */
static int copy_chunk(cas_store *s, const cas_chunk *c, cas_blob_writer *w,
		      uint8_t *buf, size_t buf_size)
{
	int fd;
	uint64_t size;
	int r = s->ops->blob_open(s, &c->digest, &fd, &size);
	if (r < 0)
		return r;
	if (size != c->size) {
		close(fd);
		return -EINVAL;
	}
	for (uint64_t off = 0; off < size && r >= 0;) {
		size_t want = (size_t)CAS_MIN(size - off, (uint64_t)buf_size);
		r = cas_pread_all(fd, buf, want, off);
		if (r >= 0)
			r = w->ops->write(w, buf, want);
		off += want;
	}
	close(fd);
	return r < 0 ? r : 0;
}

int cas_grpc_serve_put_blob(const struct cas_grpc_session_env *env,
			    const uint8_t *req, size_t len, uint8_t **ret,
			    size_t *ret_len, const char **ret_why)
{
	cas_store *s = env->store;
	cas_digest d, got;
	uint64_t size;
	_cleanup_free_ cas_chunk *chunks = NULL;
	size_t n = 0;
	cas_blob_writer *w = NULL;
	int r = decode_put_blob_request(req, len, &d, &chunks, &n, ret_why);
	if (r < 0)
		return r;
	/* BLAKE3 of no bytes: the empty blob (and the empty Directory). */
	if (n == 0 && !cas_digest_eq(&d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
		*ret_why = "an empty chunk list describes the empty blob only";
		return -EINVAL;
	}
	_cleanup_free_ uint8_t *buf = malloc(CAS_GRPC_CHUNK);
	if (!buf)
		return -ENOMEM;
	/* The blob is assembled from its chunks, which must be stored
	 * (PutChunk): hashing the whole proves the list right, and each
	 * chunk is then where the list says. */
	r = s->ops->blob_writer_new(s, &w);
	if (r < 0) {
		*ret_why = "cannot write to the store";
		return -EIO;
	}
	for (size_t i = 0; i < n && r >= 0; i++) {
		r = copy_chunk(s, &chunks[i], w, buf, CAS_GRPC_CHUNK);
		if (r == -ENOENT)
			*ret_why = "a chunk of the list is not stored";
		else if (r == -EINVAL)
			*ret_why = "a chunk's size is not the list's";
	}
	if (r < 0) {
		w->ops->abort(w);
		if (r != -ENOENT && r != -EINVAL) {
			*ret_why = "cannot write to the store";
			r = -EIO;
		}
		return r;
	}
	r = w->ops->commit(w, &d, &got, &size);
	if (r == -EBADMSG) {
		*ret_why = "the chunks do not make up the blob";
		return -EINVAL;
	}
	if (r < 0) {
		*ret_why = "cannot write to the store";
		return -EIO;
	}
	if (env->chunks && cas_bao_wants_outboard(size) &&
	    cas_chunk_index_add(env->chunks, &d, chunks, n) < 0)
		return -ENOMEM;
	return cas_grpc_encode_stat_response(NULL, 0, NULL, 0, ret, ret_len);
}
