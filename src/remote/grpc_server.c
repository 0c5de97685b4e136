/* grpc_server.c - `castore serve`: a store as tvix.castore.v1
 * BlobService and DirectoryService, gRPC over HTTP/2 cleartext (prior
 * knowledge) with libnghttp2's server session (remote.h).
 *
 * One thread per connection, each a poll loop over one socket: bytes read
 * go to nghttp2_session_mem_recv, whose callbacks run the calls; frames
 * nghttp2 wants to send are gathered into a buffer and written when the
 * socket takes them. Request messages are decoded as they arrive (Put
 * streams write to a blob writer or a Directory batch message by
 * message); responses are produced by a data source that fills one
 * message at a time (Read: CAS_GRPC_CHUNK bytes read with pread; Get: one
 * Directory), so no blob is ever held whole in memory.
 *
 * A stream that ends without END_STREAM (client gone, RST_STREAM,
 * connection closed, server stopping) aborts its writer or batch: nothing
 * half-written is published. A malformed message fails its call; a
 * malformed HTTP/2 frame fails its connection; neither touches others.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote.h"
#include "remote/remote_i.h"
#include "store/local.h"

#define POLL_MS 200
#define OUT_CAP (256u << 10)

struct server {
	cas_store *store;
	/* Set by a signal handler, read only by the accept loop's thread
	 * (connection threads block the signals); it copies it to stopping,
	 * which connection threads read. */
	volatile sig_atomic_t *stop;
	atomic_bool stopping;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned n_conns; /* protected by lock */
};

struct stream;

struct conn {
	struct server *srv;
	int fd;
	/* Every open stream: nghttp2_session_del does not report the
	 * streams it drops, so they are freed (Puts aborted) from here. */
	struct stream *streams;
	nghttp2_session *session;
	uint8_t *out;
	size_t out_len, out_pos;
};

struct stream {
	struct stream *prev, *next; /* in conn->streams */
	struct conn *conn;
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
	cas_dir_batch *batch;
	cas_digest last;

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

static void stream_free(struct stream *st)
{
	if (!st)
		return;
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
static int respond_error(struct conn *c, struct stream *st, int status,
			 const char *message)
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
	int r = nghttp2_submit_response(c->session, st->id, nva,
					CAS_ARRAY_SIZE(nva), NULL);
	return r == 0 ? 0 : -EPROTO;
}

static int fail_call(struct conn *c, struct stream *st, int r, const char *why)
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
static void next_message(struct conn *c, struct stream *st)
{
	cas_store *s = c->srv->store;
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
	struct conn *c = user_data;
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

static int respond_stream(struct conn *c, struct stream *st)
{
	nghttp2_nv nva[] = {
		NV(":status", "200"),
		NV("content-type", "application/grpc"),
	};
	nghttp2_data_provider dp = {.read_callback = data_read};
	st->responded = true;
	int r = nghttp2_submit_response(c->session, st->id, nva,
					CAS_ARRAY_SIZE(nva), &dp);
	return r == 0 ? 0 : -EPROTO;
}

static int respond_unary(struct conn *c, struct stream *st, int kind,
			 const cas_digest *d)
{
	int r = cas_grpc_encode_digest_msg(kind, d, false, &st->reply,
					   &st->reply_len);
	if (r < 0)
		return fail_call(c, st, r, "out of memory");
	return respond_stream(c, st);
}

/* Calls ------------------------------------------------------------------ */

static int on_message(void *userdata, const uint8_t *msg, size_t len);

struct msg_ctx {
	struct conn *c;
	struct stream *st;
	const char *why;
};

static int on_message(void *userdata, const uint8_t *msg, size_t len)
{
	struct msg_ctx *m = userdata;
	struct stream *st = m->st;
	cas_store *s = m->c->srv->store;
	int r;

	st->n_msgs++;
	switch (st->method) {
	case CAS_GRPC_BLOB_PUT: {
		const uint8_t *data;
		size_t dlen;
		r = cas_grpc_decode_blob_chunk(msg, len, &data, &dlen, &m->why);
		if (r < 0)
			return r;
		if (!st->writer) {
			r = s->ops->blob_writer_new(s, &st->writer);
			if (r < 0) {
				m->why = "cannot write to the store";
				return -EIO;
			}
		}
		r = dlen ? st->writer->ops->write(st->writer, data, dlen) : 0;
		if (r < 0)
			m->why = "cannot write to the store";
		return r < 0 ? -EIO : 0;
	}
	case CAS_GRPC_DIRECTORY_PUT:
		if (!st->batch) {
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
		if (r < 0)
			m->why = "cannot write to the store";
		return r < 0 ? -EIO : 0;
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
static int finish_call(struct conn *c, struct stream *st)
{
	cas_store *s = c->srv->store;
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
		if (st->n_msgs != 1)
			return fail_call(c, st, -EINVAL,
					 "one request message expected");
		break;
	default:
		break;
	}
	switch (st->method) {
	case CAS_GRPC_BLOB_STAT: {
		uint64_t size;
		r = cas_grpc_decode_stat(st->req, st->req_len, &d, &why);
		if (r < 0)
			return fail_call(c, st, r, why);
		r = s->ops->blob_stat(s, &d, &size);
		if (r < 0)
			return fail_call(c, st, r,
					 r == -ENOENT ? "blob not found"
						      : NULL);
		return respond_unary(c, st, CAS_GRPC_MSG_STAT_RESPONSE, &d);
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
		if (!st->batch)
			return fail_call(c, st, -EINVAL, "no Directory sent");
		/* Blobs Put before are written without fsync (local.h):
		 * durable before a Directory that names them. */
		if (cas_store_is_local(s) && (r = cas_local_sync(s)) < 0)
			return fail_call(c, st, -EIO,
					 "cannot write to the store");
		cas_dir_batch *b = TAKE_PTR(st->batch);
		r = b->ops->commit(b, NULL, NULL);
		if (r < 0)
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
	struct conn *c = user_data;
	st->id = frame->hd.stream_id;
	st->fd = -1;
	st->conn = c;
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
	struct conn *c = user_data;
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
	}
	if (r == 0 && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
		r = finish_call(c, st);
	return r < 0 ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags,
			 int32_t stream_id, const uint8_t *data, size_t len,
			 void *user_data)
{
	struct conn *c = user_data;
	struct stream *st =
		nghttp2_session_get_stream_user_data(session, stream_id);
	if (!st || st->responded || st->failed)
		return 0;
	struct msg_ctx m = {c, st, NULL};
	int r = cas_grpc_reader_feed(&st->reader, data, len, on_message, &m);
	if (r < 0) {
		const char *why = m.why;
		if (r == -EPROTONOSUPPORT)
			why = "compressed messages are not supported";
		else if (r == -EMSGSIZE)
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

/* Connections ---------------------------------------------------------------- */

/* Gathers what nghttp2 wants to send and writes as much as the socket
 * takes. Returns 0, or -errno when the connection is dead. */
static int conn_flush(struct conn *c)
{
	for (;;) {
		while (c->out_len < OUT_CAP / 2) {
			const uint8_t *data;
			ssize_t n = nghttp2_session_mem_send(c->session, &data);
			if (n < 0)
				return -EPROTO;
			if (n == 0)
				break;
			if ((size_t)n > OUT_CAP - c->out_len) {
				/* Bigger than the room left: send what is
				 * buffered first, keep this piece next. */
				uint8_t *nb =
					realloc(c->out, c->out_len + (size_t)n);
				if (!nb)
					return -ENOMEM;
				c->out = nb;
			}
			memcpy(c->out + c->out_len, data, (size_t)n);
			c->out_len += (size_t)n;
		}
		if (c->out_pos == c->out_len) {
			c->out_pos = c->out_len = 0;
			return 0;
		}
		ssize_t w = send(c->fd, c->out + c->out_pos,
				 c->out_len - c->out_pos,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		c->out_pos += (size_t)w;
		if (c->out_pos == c->out_len)
			c->out_pos = c->out_len = 0;
		else
			return 0; /* the socket is full */
	}
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	struct server *srv = c->srv;
	nghttp2_session_callbacks *cbs = NULL;
	uint8_t *in = malloc(64 * 1024);
	bool stopping = false;

	c->out = malloc(OUT_CAP);
	if (!in || !c->out || nghttp2_session_callbacks_new(&cbs) != 0)
		goto out;
	nghttp2_session_callbacks_set_on_begin_headers_callback(
		cbs, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cbs,
							     on_frame_recv);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
		cbs, on_data_chunk);
	nghttp2_session_callbacks_set_on_stream_close_callback(cbs,
							       on_stream_close);
	if (nghttp2_session_server_new(&c->session, cbs, c) != 0)
		goto out;
	nghttp2_settings_entry settings[] = {
		{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 128},
		{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 20},
		{NGHTTP2_SETTINGS_MAX_FRAME_SIZE, 1u << 16},
	};
	if (nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings,
				    CAS_ARRAY_SIZE(settings)) != 0)
		goto out;
	nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0,
					      16u << 20);

	while (nghttp2_session_want_read(c->session) ||
	       nghttp2_session_want_write(c->session) || c->out_len > 0) {
		if (conn_flush(c) < 0)
			break;
		if (atomic_load_explicit(&srv->stopping,
					 memory_order_relaxed) &&
		    !stopping) {
			/* GOAWAY; the streams still open are closed with
			 * the session below, aborting their Puts. */
			stopping = true;
			nghttp2_session_terminate_session(c->session,
							  NGHTTP2_NO_ERROR);
			(void)conn_flush(c);
			break;
		}
		if (!nghttp2_session_want_read(c->session) && c->out_len == 0 &&
		    !nghttp2_session_want_write(c->session))
			break;
		struct pollfd p = {c->fd, POLLIN, 0};
		if (c->out_len > 0)
			p.events |= POLLOUT;
		int pr = poll(&p, 1, POLL_MS);
		if (pr < 0 && errno != EINTR)
			break;
		if (pr <= 0)
			continue;
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(c->fd, in, 64 * 1024, MSG_DONTWAIT);
			if (n < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (n <= 0)
				break; /* peer gone */
			ssize_t done = nghttp2_session_mem_recv(c->session, in,
								(size_t)n);
			if (done < 0) {
				cas_log_debug("grpc connection: %s",
					      nghttp2_strerror((int)done));
				(void)conn_flush(
					c); /* GOAWAY if nghttp2 queued one */
				break;
			}
		}
	}
out:
	/* Frees every stream still open: unfinished Puts are aborted. */
	if (c->session)
		nghttp2_session_del(c->session);
	while (c->streams)
		stream_free(c->streams);
	if (cbs)
		nghttp2_session_callbacks_del(cbs);
	close(c->fd);
	free(in);
	free(c->out);
	free(c);
	pthread_mutex_lock(&srv->lock);
	srv->n_conns--;
	pthread_cond_broadcast(&srv->cond);
	pthread_mutex_unlock(&srv->lock);
	return NULL;
}

/* Listening ---------------------------------------------------------------- */

static int listen_unix(const char *path, int *ret_fd)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	/* A socket left by a server that died is replaced. */
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		(void)unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return cas_negerrno();
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, 128) < 0) {
		int r = cas_negerrno();
		close(fd);
		return r;
	}
	*ret_fd = fd;
	return 0;
}

static int listen_tcp(const char *spec, int *ret_fd, char *bound, size_t size)
{
	_cleanup_free_ char *host = strdup(spec);
	if (!host)
		return -ENOMEM;
	char *colon = strrchr(host, ':');
	if (!colon)
		return -EINVAL;
	*colon = 0;
	const char *port = colon + 1, *h = host;
	size_t hl = strlen(host);
	if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
		host[hl - 1] = 0;
		h = host + 1;
	}
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
			*res = NULL;
	int gr = getaddrinfo(*h ? h : NULL, port, &hints, &res);
	if (gr != 0) {
		cas_log_error("listen %s: %s", spec, gai_strerror(gr));
		return -EINVAL;
	}
	int r = -EADDRNOTAVAIL;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
				0);
		if (fd < 0) {
			r = cas_negerrno();
			continue;
		}
		int one = 1;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
		    listen(fd, 128) < 0) {
			r = cas_negerrno();
			close(fd);
			continue;
		}
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		char hbuf[NI_MAXHOST], pbuf[NI_MAXSERV];
		if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
		    getnameinfo((struct sockaddr *)&ss, sl, hbuf, sizeof(hbuf),
				pbuf, sizeof(pbuf),
				NI_NUMERICHOST | NI_NUMERICSERV) == 0)
			snprintf(bound, size,
				 ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s",
				 hbuf, pbuf);
		*ret_fd = fd;
		r = 0;
		break;
	}
	freeaddrinfo(res);
	return r;
}

int cas_grpc_serve(cas_store *s, const char *listen_spec,
		   volatile sig_atomic_t *stop,
		   void (*ready)(void *userdata, const char *address),
		   void *userdata)
{
	struct server srv = {.store = s, .stop = stop};
	char bound[512];
	int lfd = -1, r;
	bool is_unix = strncmp(listen_spec, "unix:", 5) == 0;

	size_t spec_len = CAS_MIN(strlen(listen_spec), sizeof(bound) - 1);
	memcpy(bound, listen_spec, spec_len);
	bound[spec_len] = 0;
	if (is_unix)
		r = listen_unix(listen_spec + 5, &lfd);
	else
		r = listen_tcp(listen_spec, &lfd, bound, sizeof(bound));
	if (r < 0)
		return cas_log_errno(r, "listen %s: %m", listen_spec);
	pthread_mutex_init(&srv.lock, NULL);
	pthread_cond_init(&srv.cond, NULL);
	if (ready)
		ready(userdata, bound);

	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	r = 0;
	/* Set by a signal handler, or by another thread (tests). */
	while (!__atomic_load_n(stop, __ATOMIC_RELAXED)) {
		struct pollfd p = {lfd, POLLIN, 0};
		int pr = poll(&p, 1, POLL_MS);
		if (pr <= 0)
			continue;
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue; /* EMFILE, a client gone: keep serving */
		int one = 1;
		if (!is_unix)
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
				   sizeof(one));
		struct conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->srv = &srv;
		c->fd = fd;
		pthread_mutex_lock(&srv.lock);
		srv.n_conns++;
		pthread_mutex_unlock(&srv.lock);
		pthread_t t;
		sigset_t block, old;
		sigemptyset(&block);
		sigaddset(&block, SIGINT);
		sigaddset(&block, SIGTERM);
		pthread_sigmask(SIG_BLOCK, &block, &old);
		int cr = pthread_create(&t, &attr, conn_main, c);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (cr != 0) {
			pthread_mutex_lock(&srv.lock);
			srv.n_conns--;
			pthread_mutex_unlock(&srv.lock);
			close(fd);
			free(c);
		}
	}
	atomic_store_explicit(&srv.stopping, true, memory_order_relaxed);
	pthread_attr_destroy(&attr);
	close(lfd);
	if (is_unix)
		(void)unlink(listen_spec + 5);
	/* Each connection notices stopping within POLL_MS. */
	pthread_mutex_lock(&srv.lock);
	while (srv.n_conns > 0)
		pthread_cond_wait(&srv.cond, &srv.lock);
	pthread_mutex_unlock(&srv.lock);
	pthread_cond_destroy(&srv.cond);
	pthread_mutex_destroy(&srv.lock);
	return r;
}
