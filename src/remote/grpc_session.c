/* grpc_session.c - one connection of `castore serve` (grpc_server_i.h):
 * castore's BlobService and DirectoryService, under snix's and tvix's
 * package names, on libnghttp2's server session.
 *
 * Bytes received go to nghttp2_session_mem_recv, whose callbacks run the
 * calls; what nghttp2 wants to send is handed out by
 * cas_grpc_session_send. Request messages are decoded as they arrive
 * (Put streams write to a blob writer or a Directory batch message by
 * message); responses are produced by a data source that fills one
 * message at a time (Read: CAS_GRPC_CHUNK bytes read with pread; Get: one
 * Directory), so no blob is ever held whole in memory, and a Directory
 * Put commits in steps of CAS_GRPC_SERVE_DIR_STEP bytes.
 *
 * A stream that ends without END_STREAM (client gone, RST_STREAM,
 * connection closed, server stopping) aborts its writer or batch: nothing
 * half-written is published (a Directory Put keeps the steps it has
 * committed: each is closed under its children). A malformed message
 * fails its call; a malformed HTTP/2 frame fails its connection; neither
 * touches others.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/grpc_server_i.h"
#include "remote/remote_i.h"
#include "store/local.h"

struct stream;

struct cas_grpc_session {
	const struct cas_grpc_session_env *env;
	/* Every open stream: nghttp2_session_del does not report the
	 * streams it drops, so they are freed (Puts aborted) from here. */
	struct stream *streams;
	unsigned n_streams;
	nghttp2_session *h2;
};

struct stream {
	struct stream *prev, *next; /* in conn->streams */
	struct cas_grpc_session *conn;
	int32_t id;
	enum cas_grpc_method method;
	bool grpc_content_type;
	bool responded; /* a response was submitted: ignore further input */
	bool ended;	/* the client has sent END_STREAM */
	/* A call that failed before the client finished sending: the
	 * trailers-only answer waits for END_STREAM (libcurl before 8.x
	 * stalls on an answer that comes while it is still uploading). */
	bool failed;
	int fail_status;
	char fail_message[256];
	struct cas_grpc_reader reader;

	/* unary request (Stat, Read, Get) */
	uint8_t *req;
	size_t req_len;
	unsigned n_msgs;

	/* Put */
	cas_blob_writer *writer;
	uint64_t put_bytes, reserve_checked; /* blob bytes written, checked */
	cas_dir_batch *batch;
	size_t batch_bytes; /* of the Directories in batch */
	unsigned n_dirs;    /* Directories received */
	cas_digest last;
	/* Bytes this stream counts in env->buffered: its partial message
	 * and its batch. */
	uint64_t buffered;

	/* response data: the message being sent */
	uint8_t *out;
	size_t out_len, out_pos, out_cap;
	bool out_done; /* no more messages after out */
	int end_status;
	char end_message[256];

	/* Read: bytes [base, base + size) of fd, which is the store's own
	 * (a pack: never closed here) when borrowed. */
	int fd;
	bool borrowed;
	uint64_t base, size, off;

	/* Get recursive: breadth first, each digest once */
	bool recursive;
	struct cas_dmap seen;
	cas_digest *queue;
	size_t q_head, q_tail, q_cap;
	/* unary response */
	uint8_t *reply;
	size_t reply_len;
};

/* Sets what st counts in the server's budget to its partial message and
 * its batch. False when the budget is now exceeded. */
static bool budget_update(struct stream *st)
{
	atomic_uint_least64_t *total = st->conn->env->buffered;
	uint64_t now =
		st->batch_bytes + (st->reader.msg ? st->reader.msg_cap : 0);
	if (now <= st->buffered) {
		atomic_fetch_sub(total, st->buffered - now);
		st->buffered = now;
		return true;
	}
	uint64_t add = now - st->buffered;
	st->buffered = now;
	return atomic_fetch_add(total, add) + add <=
	       CAS_GRPC_SERVE_BUFFERED_MAX;
}

static void stream_free(struct stream *st)
{
	if (!st)
		return;
	st->conn->n_streams--;
	if (st->prev)
		st->prev->next = st->next;
	else
		st->conn->streams = st->next;
	if (st->next)
		st->next->prev = st->prev;
	if (st->writer)
		st->writer->ops->abort(st->writer);
	if (st->batch)
		st->batch->ops->abort(st->batch);
	if (st->fd >= 0 && !st->borrowed)
		close(st->fd);
	cas_grpc_reader_release(&st->reader);
	st->batch_bytes = 0;
	(void)budget_update(st);
	cas_dmap_release(&st->seen, NULL);
	free(st->queue);
	free(st->req);
	free(st->out);
	free(st->reply);
	free(st);
}

/* Responses ---------------------------------------------------------------- */

#define NV(n, v)                                                          \
	{                                                                 \
		(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), \
			NGHTTP2_NV_FLAG_NO_COPY_NAME                      \
	}

/* Trailers-only response: the call failed before any message. */
static int respond_error(struct cas_grpc_session *c, struct stream *st,
			 int status, const char *message)
{
	char code[16], msg[768];
	snprintf(code, sizeof(code), "%d", status);
	cas_grpc_percent_encode(message, msg, sizeof(msg));
	nghttp2_nv nva[] = {
		NV(":status", "200"),
		NV("content-type", "application/grpc"),
		NV("grpc-status", code),
		NV("grpc-message", msg),
	};
	st->responded = true;
	int r = nghttp2_submit_response(c->h2, st->id, nva, CAS_ARRAY_SIZE(nva),
					NULL);
	return r == 0 ? 0 : -EPROTO;
}

static int fail_call(struct cas_grpc_session *c, struct stream *st, int r,
		     const char *why)
{
	if (st->responded || st->failed)
		return 0;
	if (st->writer) {
		st->writer->ops->abort(st->writer);
		st->writer = NULL;
	}
	if (st->batch) {
		st->batch->ops->abort(st->batch);
		st->batch = NULL;
	}
	/* Nothing more is read from this stream: its memory goes back. */
	cas_grpc_reader_release(&st->reader);
	st->batch_bytes = 0;
	(void)budget_update(st);
	st->failed = true;
	st->fail_status = cas_grpc_status_from_errno(r);
	snprintf(st->fail_message, sizeof(st->fail_message), "%s",
		 why ? why : strerror(-r));
	if (!st->ended)
		return 0;
	return respond_error(c, st, st->fail_status, st->fail_message);
}

static int ensure_out(struct stream *st, size_t len)
{
	if (st->out_cap >= len)
		return 0;
	uint8_t *n = realloc(st->out, len);
	if (!n)
		return -ENOMEM;
	st->out = n;
	st->out_cap = len;
	return 0;
}

/* Produces the next response message into st->out; sets out_done when
 * there is none (or on an error, recorded as the end status). */
static void next_message(struct cas_grpc_session *c, struct stream *st)
{
	cas_store *s = c->env->store;
	st->out_len = st->out_pos = 0;
	switch (st->method) {
	case CAS_GRPC_BLOB_READ: {
		if (st->off >= st->size && st->off > 0) {
			st->out_done = true;
			return;
		}
		size_t want = (size_t)CAS_MIN(st->size - st->off,
					      (uint64_t)CAS_GRPC_CHUNK);
		if (ensure_out(st, 16 + want) < 0) {
			st->end_status = CAS_GRPC_INTERNAL;
			snprintf(st->end_message, sizeof(st->end_message),
				 "out of memory");
			st->out_done = true;
			return;
		}
		size_t h = cas_grpc_blob_chunk_header(st->out, want);
		int r = cas_pread_all(st->fd, st->out + h, want,
				      st->base + st->off);
		if (r < 0) {
			st->end_status = CAS_GRPC_INTERNAL;
			snprintf(st->end_message, sizeof(st->end_message),
				 "reading blob: %s", strerror(-r));
			st->out_done = true;
			return;
		}
		st->out_len = h + want;
		st->off += want;
		if (st->size == 0)
			st->off = 1; /* the one empty chunk is sent */
		return;
	}
	case CAS_GRPC_DIRECTORY_GET: {
		if (st->q_head == st->q_tail) {
			st->out_done = true;
			return;
		}
		cas_digest d = st->queue[st->q_head++];
		uint8_t *raw = NULL;
		size_t len = 0;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		int r = s->ops->directory_get_raw(s, &d, &raw, &len);
		cas_directory *dir = NULL;
		if (r >= 0 && st->recursive)
			r = cas_directory_decode(raw, len, &dir, NULL);
		for (size_t i = 0; r >= 0 && dir && i < dir->n_directories;
		     i++) {
			const cas_digest *cd = &dir->directories[i].digest;
			int pr = cas_dmap_put(&st->seen, cd, NULL);
			if (pr < 0) {
				r = pr;
				break;
			}
			if (pr == 0)
				continue;
			if (st->q_tail == st->q_cap) {
				size_t cap = st->q_cap * 2;
				cas_digest *nq =
					realloc(st->queue, cap * sizeof(*nq));
				if (!nq) {
					r = -ENOMEM;
					break;
				}
				st->queue = nq;
				st->q_cap = cap;
			}
			st->queue[st->q_tail++] = *cd;
		}
		cas_directory_free(dir);
		if (r >= 0)
			r = ensure_out(st, 5 + len);
		if (r < 0) {
			free(raw);
			cas_digest_to_hex(&d, hex);
			st->end_status = CAS_GRPC_INTERNAL;
			snprintf(st->end_message, sizeof(st->end_message),
				 "directory %s: %s", hex, strerror(-r));
			st->out_done = true;
			return;
		}
		cas_grpc_frame_prefix(st->out, len);
		if (len)
			memcpy(st->out + 5, raw, len);
		free(raw);
		st->out_len = 5 + len;
		return;
	}
	default:
		/* Unary: the one reply, then done. */
		if (st->reply) {
			if (ensure_out(st, st->reply_len) < 0) {
				st->out_done = true;
				return;
			}
			memcpy(st->out, st->reply, st->reply_len);
			st->out_len = st->reply_len;
			free(st->reply);
			st->reply = NULL;
		} else {
			st->out_done = true;
		}
		return;
	}
}

static ssize_t data_read(nghttp2_session *session, int32_t stream_id,
			 uint8_t *buf, size_t length, uint32_t *data_flags,
			 nghttp2_data_source *source, void *user_data)
{
	struct cas_grpc_session *c = user_data;
	struct stream *st =
		nghttp2_session_get_stream_user_data(session, stream_id);
	if (!st)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	if (st->out_pos == st->out_len && !st->out_done)
		next_message(c, st);
	size_t n = CAS_MIN(length, st->out_len - st->out_pos);
	memcpy(buf, st->out + st->out_pos, n);
	st->out_pos += n;
	if (st->out_pos == st->out_len && !st->out_done) {
		/* Look ahead so that EOF goes with the last bytes. */
		if (st->method != CAS_GRPC_BLOB_READ &&
		    st->method != CAS_GRPC_DIRECTORY_GET && !st->reply)
			st->out_done = true;
		else if (st->method == CAS_GRPC_BLOB_READ &&
			 st->off >= st->size)
			st->out_done = true;
		else if (st->method == CAS_GRPC_DIRECTORY_GET &&
			 st->q_head == st->q_tail)
			st->out_done = true;
	}
	if (st->out_pos == st->out_len && st->out_done) {
		char code[16], msg[768];
		snprintf(code, sizeof(code), "%d", st->end_status);
		cas_grpc_percent_encode(st->end_message, msg, sizeof(msg));
		nghttp2_nv trailers[] = {
			NV("grpc-status", code),
			NV("grpc-message", msg),
		};
		*data_flags |=
			NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
		if (nghttp2_submit_trailer(session, stream_id, trailers,
					   st->end_message[0] ? 2 : 1) != 0)
			return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	}
	return (ssize_t)n;
}

static int respond_stream(struct cas_grpc_session *c, struct stream *st)
{
	nghttp2_nv nva[] = {
		NV(":status", "200"),
		NV("content-type", "application/grpc"),
	};
	nghttp2_data_provider dp = {.read_callback = data_read};
	st->responded = true;
	int r = nghttp2_submit_response(c->h2, st->id, nva, CAS_ARRAY_SIZE(nva),
					&dp);
	return r == 0 ? 0 : -EPROTO;
}

static int respond_unary(struct cas_grpc_session *c, struct stream *st,
			 int kind, const cas_digest *d)
{
	int r = cas_grpc_encode_digest_msg(kind, d, false, &st->reply,
					   &st->reply_len);
	if (r < 0)
		return fail_call(c, st, r, "out of memory");
	return respond_stream(c, st);
}

/* A unary answer built elsewhere (grpc_chunks.c): r < 0 fails the call. */
static int respond_built(struct cas_grpc_session *c, struct stream *st, int r,
			 uint8_t *reply, size_t reply_len, const char *why)
{
	if (r < 0)
		return fail_call(c, st, r, why);
	st->reply = reply;
	st->reply_len = reply_len;
	return respond_stream(c, st);
}

/* Calls ------------------------------------------------------------------ */

static int on_message(void *userdata, const uint8_t *msg, size_t len);

struct msg_ctx {
	struct cas_grpc_session *c;
	struct stream *st;
	const char *why;
};

/* -ENOSPC when the store's file system has less free space than the
 * reserve. A file system that cannot be asked is not refused: the write
 * itself then fails if it must. */
static int check_reserve(const struct cas_grpc_session_env *env)
{
	struct statvfs v;
	if (!env->reserve_dir || env->reserve == 0 ||
	    statvfs(env->reserve_dir, &v) < 0)
		return 0;
	return (uint64_t)v.f_bavail * v.f_frsize < env->reserve ? -ENOSPC : 0;
}

#define RESERVE_WHY "free space on the server is below its reserve"

/* Commits the Directories of a Put received so far: each is stored with
 * its closure (leaves first), so what a step commits never dangles. */
static int dir_step(struct cas_grpc_session *c, struct stream *st)
{
	cas_store *s = c->env->store;
	/* Blobs Put before are written without fsync (local.h): durable
	 * before a Directory that names them. */
	if (cas_store_is_local(s) && cas_local_sync(s) < 0)
		return -EIO;
	cas_dir_batch *b = TAKE_PTR(st->batch);
	int r = b->ops->commit(b, NULL, NULL);
	st->batch_bytes = 0;
	(void)budget_update(st);
	return r < 0 ? -EIO : 0;
}

static int on_message(void *userdata, const uint8_t *msg, size_t len)
{
	struct msg_ctx *m = userdata;
	struct stream *st = m->st;
	const struct cas_grpc_session_env *env = m->c->env;
	cas_store *s = env->store;
	int r;

	st->n_msgs++;
	switch (st->method) {
	case CAS_GRPC_BLOB_PUT: {
		const uint8_t *data;
		size_t dlen;
		r = cas_grpc_decode_blob_chunk(msg, len, &data, &dlen, &m->why);
		if (r < 0)
			return r;
		if (st->put_bytes - st->reserve_checked >=
			    CAS_GRPC_SERVE_RESERVE_CHECK ||
		    !st->writer) {
			st->reserve_checked = st->put_bytes;
			if ((r = check_reserve(env)) < 0) {
				m->why = RESERVE_WHY;
				return r;
			}
		}
		if (!st->writer) {
			r = s->ops->blob_writer_new(s, &st->writer);
			if (r < 0) {
				m->why = "cannot write to the store";
				return -EIO;
			}
		}
		r = dlen ? st->writer->ops->write(st->writer, data, dlen) : 0;
		st->put_bytes += dlen;
		if (r < 0)
			m->why = "cannot write to the store";
		return r < 0 ? -EIO : 0;
	}
	case CAS_GRPC_DIRECTORY_PUT:
		if (!st->batch) {
			if ((r = check_reserve(env)) < 0) {
				m->why = RESERVE_WHY;
				return r;
			}
			r = s->ops->dir_batch_new(s, &st->batch);
			if (r < 0) {
				m->why = "cannot write to the store";
				return -EIO;
			}
		}
		r = st->batch->ops->put(st->batch, msg, len, &st->last);
		if (r == -EBADMSG || r == -ENOENT || r == -EINVAL) {
			m->why = r == -ENOENT
					 ? "Directory names a child Directory "
					   "that is neither earlier in the "
					   "stream nor stored"
					 : "invalid Directory";
			return -EINVAL;
		}
		if (r < 0) {
			m->why = "cannot write to the store";
			return -EIO;
		}
		st->n_dirs++;
		st->batch_bytes += len;
		/* A long stream is stored in steps, so that its memory stays
		 * bounded; a server short of memory for requests steps
		 * early. */
		if ((!budget_update(st) ||
		     st->batch_bytes >= CAS_GRPC_SERVE_DIR_STEP) &&
		    dir_step(m->c, st) < 0) {
			m->why = "cannot write to the store";
			return -EIO;
		}
		return 0;
	default:
		if (st->n_msgs > 1) {
			m->why = "more than one request message";
			return -EINVAL;
		}
		st->req = malloc(len ? len : 1);
		if (!st->req)
			return -ENOMEM;
		memcpy(st->req, msg, len);
		st->req_len = len;
		return 0;
	}
}

/* The client has sent everything: answer. */
static int finish_call(struct cas_grpc_session *c, struct stream *st)
{
	cas_store *s = c->env->store;
	const char *why = NULL;
	cas_digest d;
	int r;

	st->ended = true;
	if (st->responded)
		return 0;
	if (st->failed)
		return respond_error(c, st, st->fail_status, st->fail_message);
	if (!cas_grpc_reader_idle(&st->reader))
		return fail_call(c, st, -EINVAL, "truncated message");
	switch (st->method) {
	case CAS_GRPC_BLOB_STAT:
	case CAS_GRPC_BLOB_READ:
	case CAS_GRPC_DIRECTORY_GET:
	case CAS_GRPC_BS_STAT_BLOB:
	case CAS_GRPC_BS_GET_BLOB:
	case CAS_GRPC_BS_PUT_BLOB:
		if (st->n_msgs != 1)
			return fail_call(c, st, -EINVAL,
					 "one request message expected");
		break;
	default:
		break;
	}
	switch (st->method) {
	case CAS_GRPC_BLOB_STAT:
	case CAS_GRPC_BS_STAT_BLOB:
	case CAS_GRPC_BS_GET_BLOB:
	case CAS_GRPC_BS_PUT_BLOB: {
		uint8_t *reply = NULL;
		size_t reply_len = 0;
		int (*answer)(const struct cas_grpc_session_env *,
			      const uint8_t *, size_t, uint8_t **, size_t *,
			      const char **) =
			st->method == CAS_GRPC_BLOB_STAT ? cas_grpc_serve_stat
			: st->method == CAS_GRPC_BS_STAT_BLOB
				? cas_grpc_serve_stat_blob
			: st->method == CAS_GRPC_BS_GET_BLOB
				? cas_grpc_serve_get_blob
				: cas_grpc_serve_put_blob;
		r = answer(c->env, st->req, st->req_len, &reply, &reply_len,
			   &why);
		return respond_built(c, st, r, reply, reply_len, why);
	}
	case CAS_GRPC_BLOB_READ:
		r = cas_grpc_decode_read(st->req, st->req_len, &d, &why);
		if (r < 0)
			return fail_call(c, st, r, why);
		/* A packed blob is read where it lies: blob_open would copy
		 * it into a memfd first. */
		r = s->ops->blob_locate
			    ? s->ops->blob_locate(s, &d, &st->fd, &st->base,
						  &st->size)
			    : -ENOENT;
		st->borrowed = r == 0;
		if (r == -ENOENT)
			r = s->ops->blob_open(s, &d, &st->fd, &st->size);
		/* A chunk of a large blob (snix's send_chunks). */
		if (r == -ENOENT)
			r = cas_grpc_serve_locate_chunk(c->env, &d, &st->fd,
							&st->base, &st->size,
							&st->borrowed);
		if (r < 0) {
			st->fd = -1;
			return fail_call(c, st, r,
					 r == -ENOENT ? "blob not found"
						      : NULL);
		}
		return respond_stream(c, st);
	case CAS_GRPC_DIRECTORY_GET: {
		r = cas_grpc_decode_get(st->req, st->req_len, &d,
					&st->recursive, &why);
		if (r < 0)
			return fail_call(c, st, r, why);
		/* Absence is known before the first message. */
		if (!cas_digest_eq(&d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
			r = s->ops->directory_has(s, &d);
			if (r == 0)
				r = -ENOENT;
			if (r < 0)
				return fail_call(c, st, r,
						 r == -ENOENT
							 ? "directory not found"
							 : NULL);
		}
		st->q_cap = 64;
		st->queue = malloc(st->q_cap * sizeof(*st->queue));
		if (!st->queue || cas_dmap_put(&st->seen, &d, NULL) < 0)
			return fail_call(c, st, -ENOMEM, NULL);
		st->queue[st->q_tail++] = d;
		return respond_stream(c, st);
	}
	case CAS_GRPC_BLOB_PUT: {
		uint64_t size;
		if (!st->writer && s->ops->blob_writer_new(s, &st->writer) < 0)
			return fail_call(c, st, -EIO,
					 "cannot write to the store");
		cas_blob_writer *w = TAKE_PTR(st->writer);
		r = w->ops->commit(w, NULL, &d, &size);
		if (r < 0)
			return fail_call(c, st, -EIO,
					 "cannot write to the store");
		return respond_unary(c, st, CAS_GRPC_MSG_PUT_BLOB_RESPONSE, &d);
	}
	case CAS_GRPC_DIRECTORY_PUT: {
		if (st->n_dirs == 0)
			return fail_call(c, st, -EINVAL, "no Directory sent");
		if (st->batch && dir_step(c, st) < 0)
			return fail_call(c, st, -EIO,
					 "cannot write to the store");
		return respond_unary(c, st, CAS_GRPC_MSG_PUT_DIRECTORY_RESPONSE,
				     &st->last);
	}
	default:
		return fail_call(c, st, -EPROTONOSUPPORT, "unknown method");
	}
}

/* nghttp2 callbacks -------------------------------------------------------- */

static int on_begin_headers(nghttp2_session *session,
			    const nghttp2_frame *frame, void *user_data)
{
	if (frame->hd.type != NGHTTP2_HEADERS ||
	    frame->headers.cat != NGHTTP2_HCAT_REQUEST)
		return 0;
	struct stream *st = calloc(1, sizeof(*st));
	if (!st)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	struct cas_grpc_session *c = user_data;
	st->id = frame->hd.stream_id;
	st->fd = -1;
	st->conn = c;
	c->n_streams++;
	st->next = c->streams;
	if (c->streams)
		c->streams->prev = st;
	c->streams = st;
	nghttp2_session_set_stream_user_data(session, st->id, st);
	return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
		     const uint8_t *name, size_t namelen, const uint8_t *value,
		     size_t valuelen, uint8_t flags, void *user_data)
{
	if (frame->hd.type != NGHTTP2_HEADERS ||
	    frame->headers.cat != NGHTTP2_HCAT_REQUEST)
		return 0;
	struct stream *st = nghttp2_session_get_stream_user_data(
		session, frame->hd.stream_id);
	if (!st)
		return 0;
	if (namelen == 5 && memcmp(name, ":path", 5) == 0)
		st->method = cas_grpc_method_from_path((const char *)value,
						       valuelen);
	else if (namelen == 12 && memcmp(name, "content-type", 12) == 0)
		st->grpc_content_type =
			valuelen >= 16 &&
			memcmp(value, "application/grpc", 16) == 0;
	return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
			 void *user_data)
{
	struct cas_grpc_session *c = user_data;
	if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA)
		return 0;
	struct stream *st = nghttp2_session_get_stream_user_data(
		session, frame->hd.stream_id);
	if (!st)
		return 0;
	int r = 0;
	if (frame->hd.type == NGHTTP2_HEADERS &&
	    frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
		if (!st->grpc_content_type)
			r = fail_call(c, st, -EINVAL,
				      "content-type is not application/grpc");
		else if (st->method == CAS_GRPC_UNKNOWN_METHOD)
			r = fail_call(c, st, -EPROTONOSUPPORT,
				      "unknown method");
		else if (c->env->read_only &&
			 (st->method == CAS_GRPC_BLOB_PUT ||
			  st->method == CAS_GRPC_BS_PUT_BLOB ||
			  st->method == CAS_GRPC_DIRECTORY_PUT))
			r = fail_call(c, st, -EROFS, "the server is read-only");
	}
	if (r == 0 && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
		r = finish_call(c, st);
	return r < 0 ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags,
			 int32_t stream_id, const uint8_t *data, size_t len,
			 void *user_data)
{
	struct cas_grpc_session *c = user_data;
	struct stream *st =
		nghttp2_session_get_stream_user_data(session, stream_id);
	if (!st || st->responded || st->failed)
		return 0;
	struct msg_ctx m = {c, st, NULL};
	int r = cas_grpc_reader_feed(&st->reader, data, len, on_message, &m);
	if (r == 0 && !budget_update(st) && st->reader.msg) {
		r = -EMSGSIZE;
		m.why = "the server's memory for requests is full";
	}
	if (r < 0) {
		const char *why = m.why;
		if (r == -EPROTONOSUPPORT)
			why = "compressed messages are not supported";
		else if (r == -EMSGSIZE && !why)
			why = "message too large";
		if (fail_call(c, st, r, why) < 0)
			return NGHTTP2_ERR_CALLBACK_FAILURE;
	}
	return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
			   uint32_t error_code, void *user_data)
{
	struct stream *st =
		nghttp2_session_get_stream_user_data(session, stream_id);
	if (st) {
		nghttp2_session_set_stream_user_data(session, stream_id, NULL);
		stream_free(st); /* aborts an unfinished Put */
	}
	return 0;
}

/* The session ------------------------------------------------------------- */

int cas_grpc_session_new(const struct cas_grpc_session_env *env,
			 struct cas_grpc_session **ret)
{
	nghttp2_session_callbacks *cbs = NULL;
	struct cas_grpc_session *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->env = env;
	if (nghttp2_session_callbacks_new(&cbs) != 0) {
		free(c);
		return -ENOMEM;
	}
	nghttp2_session_callbacks_set_on_begin_headers_callback(
		cbs, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cbs,
							     on_frame_recv);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
		cbs, on_data_chunk);
	nghttp2_session_callbacks_set_on_stream_close_callback(cbs,
							       on_stream_close);
	int r = nghttp2_session_server_new(&c->h2, cbs, c);
	nghttp2_session_callbacks_del(cbs);
	if (r != 0) {
		free(c);
		return -ENOMEM;
	}
	nghttp2_settings_entry settings[] = {
		{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
		 CAS_GRPC_SERVE_STREAMS},
		{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
		 CAS_GRPC_SERVE_STREAM_WINDOW},
		{NGHTTP2_SETTINGS_MAX_FRAME_SIZE, 1u << 16},
	};
	if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, settings,
				    CAS_ARRAY_SIZE(settings)) != 0 ||
	    nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0,
						  CAS_GRPC_SERVE_CONN_WINDOW) !=
		    0) {
		cas_grpc_session_free(c);
		return -ENOMEM;
	}
	*ret = c;
	return 0;
}

void cas_grpc_session_free(struct cas_grpc_session *c)
{
	if (!c)
		return;
	nghttp2_session_del(c->h2);
	while (c->streams)
		stream_free(c->streams); /* aborts unfinished Puts */
	free(c);
}

int cas_grpc_session_recv(struct cas_grpc_session *c, const uint8_t *buf,
			  size_t len)
{
	ssize_t n = nghttp2_session_mem_recv(c->h2, buf, len);
	if (n < 0) {
		cas_log_debug("grpc connection: %s", nghttp2_strerror((int)n));
		return -EPROTO;
	}
	return 0;
}

ssize_t cas_grpc_session_send(struct cas_grpc_session *c, const uint8_t **ret)
{
	ssize_t n = nghttp2_session_mem_send(c->h2, ret);
	return n < 0 ? -EPROTO : n;
}

bool cas_grpc_session_alive(struct cas_grpc_session *c)
{
	return nghttp2_session_want_read(c->h2) ||
	       nghttp2_session_want_write(c->h2);
}

bool cas_grpc_session_want_write(struct cas_grpc_session *c)
{
	return nghttp2_session_want_write(c->h2);
}

unsigned cas_grpc_session_streams(const struct cas_grpc_session *c)
{
	return c->n_streams;
}

void cas_grpc_session_goaway(struct cas_grpc_session *c)
{
	(void)nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
}
