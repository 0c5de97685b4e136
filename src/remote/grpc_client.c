/* grpc_client.c - a castore gRPC client (grpc_i.h) that speaks snix's
 * package names or tvix's: connections, calls, and batches of Reads (the
 * fetcher of grpc+ remote stores is grpc_fetcher.c).
 *
 * HTTP/2 with prior knowledge over TCP or a unix socket, or over TLS with
 * ALPN (grpc_tls.c), on libnghttp2's
 * client session. (libcurl speaks it too, but Debian 12's 7.88 fails every
 * request after the first on a reused prior-knowledge connection - curl
 * issue 10634 - and a connection per call costs a handshake and, on the
 * server, a thread per call.) Connections are pooled: a call takes one
 * (one stream at a time), runs it to the end with blocking I/O in a poll
 * loop, and gives it back if it is still good; a call on a reused
 * connection that dies before any answer is retried once on a new one.
 *
 * cas_grpc_blobs_fetch runs many Read streams at once on one
 * connection, in the calling thread: each stream's state is its nghttp2
 * stream user data, frames queued by all of them go out in one send, and
 * a recv takes whatever the socket holds, so a batch of small blobs
 * costs a few syscalls rather than a few per blob.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote_i.h"

/* No byte of an answer (headers or data of a stream; PINGs and other
 * frames do not count) for cas_fetch_stall_s(): the call fails; the
 * wait is cut in slices of POLL_SLICE_MS to look at the cancel flag. */
#define POLL_SLICE_MS 1000
#define MAX_IDLE      16
#define RBUF_SIZE     (256u << 10)
#define WBUF_SIZE     (64u << 10)
/* Streams of one blobs_fetch open at once (and at most what the server
 * allows). */
#define BATCH_STREAMS 64

struct h2conn {
	int fd;
	struct cas_grpc_tls *tls; /* grpc+https://, else NULL */
	/* A client made with cas_grpc_client_new_transport: its connection
	 * instead of fd. */
	const struct cas_grpc_transport *xport;
	void *xconn;
	nghttp2_session *session;
	bool broken;	 /* transport failed or GOAWAY: not reusable */
	bool rfull;	 /* the last recv filled rbuf: more is likely waiting */
	unsigned closed; /* streams closed so far */
	uint64_t progress; /* answer headers and data received, counted */
	const cas_grpc_client *client;
	uint8_t rbuf[RBUF_SIZE];
	uint8_t wbuf[WBUF_SIZE];
};

struct cas_grpc_client {
	char *url;	 /* as given, for messages */
	char *authority; /* HOST:PORT, or "localhost" */
	char *host, *port;
	char *unix_path;		 /* or NULL */
	struct cas_grpc_tls_ctx *tls;	 /* grpc+https://, else NULL */
	struct cas_grpc_transport xport; /* .read set: not a socket */
	/* The package the server answers under (enum cas_grpc_package), or
	 * -1 until a call has told: snix's names are tried first, tvix's
	 * after an UNIMPLEMENTED. */
	atomic_int package;
	pthread_mutex_t learn_lock; /* one call learns it; the others wait */
	pthread_mutex_t lock;
	struct h2conn *idle[MAX_IDLE]; /* protected by lock */
	size_t n_idle;		       /* protected by lock */
	/* The fetcher's cancel flag (remote_i.h), or NULL; set once. */
	const atomic_bool *const *cancel;
};

const char *cas_grpc_client_url(const cas_grpc_client *c)
{
	return c->url;
}

static void conn_free(struct h2conn *h)
{
	if (!h)
		return;
	if (h->session)
		nghttp2_session_del(h->session);
	cas_grpc_tls_free(h->tls);
	if (h->xconn)
		h->xport->close(h->xconn);
	if (h->fd >= 0)
		close(h->fd);
	free(h);
}

/* A client named `url` that has no peer yet; NULL when out of memory. */
static cas_grpc_client *client_alloc(const char *url)
{
	cas_grpc_client *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	pthread_mutex_init(&c->lock, NULL);
	atomic_init(&c->package, -1);
	pthread_mutex_init(&c->learn_lock, NULL);
	c->url = strdup(url);
	if (!c->url) {
		cas_grpc_client_free(c);
		return NULL;
	}
	return c;
}

int cas_grpc_client_new_transport(const struct cas_grpc_transport *t,
				  cas_grpc_client **ret)
{
	cas_grpc_client *c = client_alloc("grpc+transport:");
	if (!c)
		return -ENOMEM;
	c->xport = *t;
	c->authority = strdup("localhost");
	if (!c->authority) {
		cas_grpc_client_free(c);
		return -ENOMEM;
	}
	*ret = c;
	return 0;
}

int cas_grpc_client_new(const char *url, cas_grpc_client **ret)
{
	cas_grpc_client *c = client_alloc(url);
	if (!c)
		return -ENOMEM;
	bool https = strncmp(url, "grpc+https://", 13) == 0;
	if (https || strncmp(url, "grpc+http://", 12) == 0) {
		const char *hp = url + (https ? 13 : 12);
		size_t n = strcspn(hp, "/?#");
		c->authority = strndup(hp, n);
		if (!c->authority)
			goto oom;
		char *colon = strrchr(c->authority, ':');
		char *close_br = strrchr(c->authority, ']');
		if (colon && close_br && colon < close_br)
			colon = NULL; /* [v6] without a port */
		/* https has a default port; plain gRPC has none. */
		if (n == 0 || (!colon && !https) || (colon && !colon[1])) {
			cas_grpc_client_free(c);
			return cas_log_errno(-EINVAL, "%s: HOST:PORT expected",
					     url);
		}
		const char *h = c->authority;
		size_t hl = colon ? (size_t)(colon - c->authority)
				  : strlen(c->authority);
		if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
			h++;
			hl -= 2;
		}
		c->host = strndup(h, hl);
		c->port = strdup(colon ? colon + 1 : "443");
		if (!c->host || !c->port)
			goto oom;
		if (https) {
			int r = cas_grpc_tls_ctx_new(url, &c->tls);
			if (r < 0) {
				cas_grpc_client_free(c);
				return r;
			}
		}
	} else if (strncmp(url, "grpc+unix:", 10) == 0 &&
		   (strncmp(url + 10, "///", 3) == 0 ||
		    (url[10] == '/' && url[11] != '/'))) {
		/* grpc+unix:///PATH (tvix) or grpc+unix:/PATH (snix). */
		c->unix_path = strdup(url + (url[11] == '/' ? 12 : 10));
		c->authority = strdup("localhost");
		if (!c->unix_path || !c->authority)
			goto oom;
	} else {
		cas_grpc_client_free(c);
		return cas_log_errno(
			-EINVAL,
			"%s: not grpc+http://HOST:PORT, grpc+https://HOST or "
			"grpc+unix:///PATH",
			url);
	}
	*ret = c;
	return 0;
oom:
	cas_grpc_client_free(c);
	return -ENOMEM;
}

void cas_grpc_client_free(cas_grpc_client *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n_idle; i++)
		conn_free(c->idle[i]);
	pthread_mutex_destroy(&c->lock);
	pthread_mutex_destroy(&c->learn_lock);
	cas_grpc_tls_ctx_free(c->tls);
	free(c->url);
	free(c->authority);
	free(c->host);
	free(c->port);
	free(c->unix_path);
	free(c);
}

struct call {
	int32_t stream_id;
	bool done;     /* stream closed */
	bool answered; /* any frame of the answer arrived */
	uint32_t rst;  /* error code the stream closed with */
	int status;    /* grpc-status, -1 until seen */
	char message[512];
	int http_status;
	struct cas_grpc_reader reader;
	cas_grpc_msg_cb on_msg;
	void *msg_ud;
	int r; /* first error of a callback, or of framing */
	const uint8_t *req;
	size_t req_len, req_pos;
	cas_grpc_produce produce;
	void *produce_ud;
	/* When not 0: a response message announced longer than this fails
	 * the call with -EFBIG before it is buffered. */
	size_t max_msg;
};

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = (char)(c | 0x20);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static void percent_decode(const uint8_t *in, size_t len, char *out,
			   size_t size)
{
	size_t o = 0;
	for (size_t i = 0; i < len && o + 1 < size; i++) {
		if (in[i] == '%' && i + 2 < len &&
		    hexval((char)in[i + 1]) >= 0 &&
		    hexval((char)in[i + 2]) >= 0) {
			char ch = (char)(hexval((char)in[i + 1]) << 4 |
					 hexval((char)in[i + 2]));
			out[o++] = ch >= 0x20 && ch != 0x7f ? ch : '?';
			i += 2;
		} else {
			out[o++] = in[i] >= 0x20 && in[i] < 0x7f ? (char)in[i]
								 : '?';
		}
	}
	out[o] = 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
		     const uint8_t *name, size_t namelen, const uint8_t *value,
		     size_t valuelen, uint8_t flags, void *user_data)
{
	struct call *call = nghttp2_session_get_stream_user_data(
		session, frame->hd.stream_id);
	if (!call)
		return 0;
	call->answered = true;
	((struct h2conn *)user_data)->progress++;
	if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
		char v[8];
		size_t n = CAS_MIN(valuelen, sizeof(v) - 1);
		memcpy(v, value, n);
		v[n] = 0;
		call->http_status = atoi(v);
	} else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
		char v[12];
		size_t n = CAS_MIN(valuelen, sizeof(v) - 1);
		memcpy(v, value, n);
		v[n] = 0;
		call->status = atoi(v);
	} else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
		percent_decode(value, valuelen, call->message,
			       sizeof(call->message));
	}
	return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags,
			 int32_t stream_id, const uint8_t *data, size_t len,
			 void *user_data)
{
	struct call *call =
		nghttp2_session_get_stream_user_data(session, stream_id);
	if (!call || call->r < 0)
		return 0;
	call->answered = true;
	((struct h2conn *)user_data)->progress++;
	/* Not a gRPC answer (a proxy's error page): its status says it. */
	if (call->http_status != 200)
		return 0;
	call->r = cas_grpc_reader_feed(&call->reader, data, len, call->on_msg,
				       call->msg_ud);
	if (call->r == 0 && call->max_msg && call->reader.in_msg &&
	    call->reader.msg_len > call->max_msg)
		call->r = -EFBIG;
	if (call->r < 0)
		nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id,
					  NGHTTP2_CANCEL);
	return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
			   uint32_t error_code, void *user_data)
{
	struct h2conn *h = user_data;
	struct call *call =
		nghttp2_session_get_stream_user_data(session, stream_id);
	h->closed++;
	if (call) {
		call->done = true;
		call->rst = error_code;
	}
	return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
			 void *user_data)
{
	struct h2conn *h = user_data;
	if (frame->hd.type == NGHTTP2_GOAWAY)
		h->broken = true;
	return 0;
}

static ssize_t request_read(nghttp2_session *session, int32_t stream_id,
			    uint8_t *buf, size_t length, uint32_t *data_flags,
			    nghttp2_data_source *source, void *user_data)
{
	struct call *call = source->ptr;
	if (call->produce) {
		ssize_t n = call->produce(call->produce_ud, buf, length);
		if (n < 0) {
			call->r = (int)n;
			return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
		}
		if (n == 0)
			*data_flags |= NGHTTP2_DATA_FLAG_EOF;
		return n;
	}
	size_t n = CAS_MIN(length, call->req_len - call->req_pos);
	memcpy(buf, call->req + call->req_pos, n);
	call->req_pos += n;
	if (call->req_pos == call->req_len)
		*data_flags |= NGHTTP2_DATA_FLAG_EOF;
	return (ssize_t)n;
}

static int connect_to(cas_grpc_client *c, int *ret_fd)
{
	int fd = -1, r = -ECONNREFUSED;
	if (c->unix_path) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		if (strlen(c->unix_path) >= sizeof(sa.sun_path))
			return -ENAMETOOLONG;
		strcpy(sa.sun_path, c->unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return cas_negerrno();
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			r = cas_negerrno();
			close(fd);
			return r;
		}
		*ret_fd = fd;
		return 0;
	}
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICSERV},
			*res = NULL;
	if (getaddrinfo(c->host, c->port, &hints, &res) != 0)
		return -EHOSTUNREACH;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			r = cas_negerrno();
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
			int one = 1;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
				   sizeof(one));
			r = 0;
			break;
		}
		r = cas_negerrno();
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (r == 0)
		*ret_fd = fd;
	return r;
}

static int conn_new(cas_grpc_client *c, struct h2conn **ret)
{
	nghttp2_session_callbacks *cbs;
	struct h2conn *h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->fd = -1;
	h->client = c;
	int r;
	if (c->xport.read) {
		h->xport = &c->xport;
		r = c->xport.connect(c->xport.userdata, &h->xconn);
	} else {
		r = connect_to(c, &h->fd);
	}
	if (r < 0) {
		free(h);
		return r;
	}
	if (c->tls && (r = cas_grpc_tls_connect(c->tls, h->fd, c->url, c->host,
						&h->tls)) < 0) {
		conn_free(h);
		return r;
	}
	if (nghttp2_session_callbacks_new(&cbs) != 0) {
		conn_free(h);
		return -ENOMEM;
	}
	nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
		cbs, on_data_chunk);
	nghttp2_session_callbacks_set_on_stream_close_callback(cbs,
							       on_stream_close);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cbs,
							     on_frame_recv);
	r = nghttp2_session_client_new(&h->session, cbs, h);
	nghttp2_session_callbacks_del(cbs);
	if (r != 0) {
		h->session = NULL;
		conn_free(h);
		return -ENOMEM;
	}
	nghttp2_settings_entry settings[] = {
		{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
		{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 8u << 20},
		{NGHTTP2_SETTINGS_MAX_FRAME_SIZE, 1u << 18},
	};
	nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, settings,
				CAS_ARRAY_SIZE(settings));
	nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0,
					      64u << 20);
	*ret = h;
	return 0;
}

/* Reads what is there into h->rbuf without waiting: the count, 0 at
 * the end, -EAGAIN for nothing yet, else -errno. */
static ssize_t conn_read(struct h2conn *h)
{
	if (h->tls)
		return cas_grpc_tls_read(h->tls, h->rbuf, sizeof(h->rbuf));
	if (h->xport)
		return h->xport->read(h->xconn, h->rbuf, sizeof(h->rbuf));
	ssize_t n = recv(h->fd, h->rbuf, sizeof(h->rbuf), MSG_DONTWAIT);
	return n < 0 ? cas_negerrno() : n;
}

/* A pooled connection that still looks alive, or NULL. */
static struct h2conn *conn_take_idle(cas_grpc_client *c)
{
	for (;;) {
		struct h2conn *h = NULL;
		pthread_mutex_lock(&c->lock);
		if (c->n_idle > 0)
			h = c->idle[--c->n_idle];
		pthread_mutex_unlock(&c->lock);
		if (!h)
			return NULL;
		/* Closed by the peer while idle? (A GOAWAY or PING is read
		 * and handled here too.) */
		struct pollfd p = {h->fd, POLLIN, 0};
		bool ok = true;
		if (h->xport || poll(&p, 1, 0) > 0 ||
		    (h->tls && cas_grpc_tls_pending(h->tls))) {
			ssize_t n = conn_read(h);
			ok = n == -EAGAIN ||
			     (n > 0 &&
			      nghttp2_session_mem_recv(h->session, h->rbuf,
						       (size_t)n) >= 0);
		}
		if (ok && !h->broken && nghttp2_session_want_read(h->session))
			return h;
		conn_free(h);
	}
}

static void conn_put_idle(cas_grpc_client *c, struct h2conn *h)
{
	pthread_mutex_lock(&c->lock);
	if (c->n_idle < MAX_IDLE) {
		c->idle[c->n_idle++] = h;
		h = NULL;
	}
	pthread_mutex_unlock(&c->lock);
	conn_free(h);
}

static int send_all(int fd, const uint8_t *data, size_t len)
{
	size_t off = 0;
	while (off < len) {
		ssize_t w = send(fd, data + off, len - off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return cas_negerrno();
		off += (size_t)w;
	}
	return 0;
}

static int conn_write(struct h2conn *h, const uint8_t *data, size_t len)
{
	if (h->xport)
		return h->xport->write(h->xconn, data, len);
	return h->tls ? cas_grpc_tls_write_all(h->tls, data, len)
		      : send_all(h->fd, data, len);
}

/* Sends what nghttp2 has queued, blocking until the socket takes it.
 * nghttp2 hands out about a frame at a time: they are gathered so that
 * the requests of many streams go out in one send. */
static int conn_send(struct h2conn *h)
{
	size_t len = 0;
	int r;
	for (;;) {
		const uint8_t *data;
		ssize_t n = nghttp2_session_mem_send(h->session, &data);
		if (n < 0)
			return -EPROTO;
		if (n == 0)
			break;
		if ((size_t)n <= WBUF_SIZE - len) {
			memcpy(h->wbuf + len, data, (size_t)n);
			len += (size_t)n;
			continue;
		}
		/* data is valid until the next mem_send: out now. */
		if ((r = conn_write(h, h->wbuf, len)) < 0 ||
		    (r = conn_write(h, data, (size_t)n)) < 0)
			return r;
		len = 0;
	}
	return conn_write(h, h->wbuf, len);
}

/* Says whether there is nothing left to wait for on a connection; may
 * submit more streams. */
typedef bool (*conn_step)(void *userdata);

/* Moves frames both ways until step says it is finished: 0, or -errno
 * for a transport failure. */
static int conn_pump(struct h2conn *h, conn_step step, void *userdata)
{
	const int stall_ms = (int)cas_fetch_stall_s() * 1000;
	uint64_t seen = h->progress;
	int idle_ms = 0;
	for (;;) {
		bool finished = step(userdata);
		unsigned closed = h->closed;
		int r = conn_send(h);
		if (finished)
			return 0; /* the send was best effort: WINDOW_UPDATEs */
		if (r < 0)
			return r;
		if (h->closed != closed)
			continue; /* sending our RST_STREAM closed a stream */
		if (!h->rfull && !h->xport &&
		    !(h->tls && cas_grpc_tls_pending(h->tls))) {
			const atomic_bool *const *cancel = h->client->cancel;
			if (cancel && *cancel &&
			    atomic_load_explicit(*cancel, memory_order_relaxed))
				return -ECANCELED;
			if (h->progress != seen) {
				seen = h->progress;
				idle_ms = 0;
			}
			if (idle_ms >= stall_ms)
				return -ETIMEDOUT;
			struct pollfd p = {h->fd, POLLIN, 0};
			struct timespec t0, t1;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			int pr = poll(&p, 1, POLL_SLICE_MS);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			idle_ms += (int)((t1.tv_sec - t0.tv_sec) * 1000 +
					 (t1.tv_nsec - t0.tv_nsec) / 1000000);
			if (pr < 0 && errno == EINTR)
				continue;
			if (pr < 0)
				return cas_negerrno();
			if (pr == 0)
				continue;
		}
		ssize_t n = conn_read(h);
		h->rfull = n == (ssize_t)sizeof(h->rbuf);
		if (n == -EAGAIN || n == -EINTR)
			continue;
		if (n < 0)
			return (int)n;
		if (n == 0)
			return -ECONNRESET;
		if (nghttp2_session_mem_recv(h->session, h->rbuf, (size_t)n) <
		    0)
			return -EPROTO;
	}
}

/* Opens a stream for call on h (its state is the stream user data). */
static int conn_submit(cas_grpc_client *c, struct h2conn *h, const char *path,
		       struct call *call)
{
	nghttp2_nv nva[] = {
		{(uint8_t *)":method", (uint8_t *)"POST", 7, 4,
		 NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)":scheme", (uint8_t *)(c->tls ? "https" : "http"),
		 7, c->tls ? 5 : 4, NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)":path", (uint8_t *)path, 5, strlen(path),
		 NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)":authority", (uint8_t *)c->authority, 10,
		 strlen(c->authority), NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12,
		 16, NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)"te", (uint8_t *)"trailers", 2, 8,
		 NGHTTP2_NV_FLAG_NONE},
		{(uint8_t *)"user-agent",
		 (uint8_t *)"castore/0.1 grpc-c-nghttp2", 10, 26,
		 NGHTTP2_NV_FLAG_NONE},
	};
	nghttp2_data_provider dp = {.source.ptr = call,
				    .read_callback = request_read};

	call->stream_id = nghttp2_submit_request(
		h->session, NULL, nva, CAS_ARRAY_SIZE(nva), &dp, call);
	return call->stream_id < 0 ? -EPROTO : 0;
}

static bool call_step(void *userdata)
{
	const struct call *call = userdata;
	return call->done;
}

/* Runs one call on h: 0 when the stream closed (see call), or -errno
 * for a transport failure. */
static int conn_run(cas_grpc_client *c, struct h2conn *h, const char *path,
		    struct call *call)
{
	int r = conn_submit(c, h, path, call);
	return r < 0 ? r : conn_pump(h, call_step, call);
}

/* The outcome of a closed stream when its answer is a proper one: the
 * grpc-status as errno. Else -EIO with why saying what was wrong. */
static int call_outcome(const struct call *call, char *why, size_t size)
{
	why[0] = 0;
	if (call->http_status != 200)
		snprintf(why, size, "HTTP status %d", call->http_status);
	else if (call->status < 0)
		snprintf(why, size,
			 "no grpc-status (stream closed with HTTP/2 error %u)",
			 call->rst);
	else if (call->status == 0 && !cas_grpc_reader_idle(&call->reader))
		snprintf(why, size, "truncated response message");
	else
		return cas_grpc_errno_from_status(call->status);
	return -EIO;
}

static int ignore_msg(void *userdata, const uint8_t *msg, size_t len)
{
	return 0;
}

static int call_path(cas_grpc_client *c, const char *path, const uint8_t *req,
		     size_t req_len, cas_grpc_produce produce, void *produce_ud,
		     cas_grpc_msg_cb on_msg, void *msg_ud, int *ret_status,
		     char *ret_message, size_t message_size)
{
	struct call call;
	int r;

	for (int attempt = 0;; attempt++) {
		call = (struct call){.status = -1,
				     .on_msg = on_msg ? on_msg : ignore_msg,
				     .msg_ud = msg_ud,
				     .req = req,
				     .req_len = req_len,
				     .produce = produce,
				     .produce_ud = produce_ud};
		struct h2conn *h = attempt == 0 ? conn_take_idle(c) : NULL;
		bool reused = h != NULL;
		if (!h) {
			r = conn_new(c, &h);
			if (r < 0) {
				r = cas_log_errno(-EIO,
						  "%s: cannot connect: %s",
						  c->url, strerror(-r));
				break;
			}
		}
		r = conn_run(c, h, path, &call);
		if (r < 0 || h->broken || call.r < 0 || !call.done) {
			conn_free(h);
		} else {
			conn_put_idle(c, h);
		}
		/* The server may have closed an idle connection just now;
		 * once nothing was answered, a fresh one is safe to try
		 * (a streamed request cannot be replayed). */
		if (r < 0 && reused && !call.answered && !produce &&
		    call.r == 0 && r != -ETIMEDOUT && r != -ECANCELED)
			continue;
		/* A stall or a cancel is the caller's to report, naming
		 * the object (one line). */
		if (r < 0 && call.r == 0 && r != -ETIMEDOUT && r != -ECANCELED)
			r = cas_log_errno(-EIO, "%s%s: %s", c->url, path,
					  strerror(-r));
		break;
	}
	/* A bad message fails the call whether or not the connection
	 * survived it (a peer may send one and hang up). */
	if (call.r < 0) {
		r = call.r == -EPROTONOSUPPORT || call.r == -EMSGSIZE
			    ? cas_log_errno(-EIO,
					    "%s%s: bad response message: %s",
					    c->url, path, strerror(-call.r))
			    : call.r;
	} else if (r >= 0) {
		char why[128];
		r = call_outcome(&call, why, sizeof(why));
		if (why[0])
			r = cas_log_errno(r, "%s%s: %s", c->url, path, why);
	}
	if (ret_status)
		*ret_status = call.status;
	if (ret_message && message_size)
		snprintf(ret_message, message_size, "%s", call.message);
	cas_grpc_reader_release(&call.reader);
	return r;
}

static int client_package(cas_grpc_client *c);

int cas_grpc_call(cas_grpc_client *c, enum cas_grpc_method m,
		  const uint8_t *req, size_t req_len, cas_grpc_produce produce,
		  void *produce_ud, cas_grpc_msg_cb on_msg, void *msg_ud,
		  int *ret_status, char *ret_message, size_t message_size)
{
	char path[96];
	int status = -1, r;
	int pkg = atomic_load(&c->package);

	/* A streamed request cannot be sent twice: the package is learnt
	 * first, from a Stat. */
	if (pkg < 0 && produce && (pkg = client_package(c)) < 0) {
		if (ret_status)
			*ret_status = -1;
		if (ret_message && message_size)
			ret_message[0] = 0;
		return pkg;
	}
	if (pkg >= 0)
		return call_path(
			c, cas_grpc_method_path(m, pkg, path, sizeof(path)),
			req, req_len, produce, produce_ud, on_msg, msg_ud,
			ret_status, ret_message, message_size);

	/* Threads that start at once (a mount's workers) wait for the one
	 * call that learns, so the wrong name is tried once per client. */
	pthread_mutex_lock(&c->learn_lock);
	pkg = atomic_load(&c->package);
	bool learning = pkg < 0;
	if (learning)
		pkg = CAS_GRPC_SNIX;
	r = call_path(c, cas_grpc_method_path(m, pkg, path, sizeof(path)), req,
		      req_len, produce, produce_ud, on_msg, msg_ud, &status,
		      ret_message, message_size);
	if (learning && status == CAS_GRPC_UNIMPLEMENTED) {
		pkg = CAS_GRPC_TVIX;
		r = call_path(c,
			      cas_grpc_method_path(m, pkg, path, sizeof(path)),
			      req, req_len, produce, produce_ud, on_msg, msg_ud,
			      &status, ret_message, message_size);
		if (status == CAS_GRPC_UNIMPLEMENTED)
			learning = false; /* neither: nothing learnt */
	}
	/* Any grpc-status but UNIMPLEMENTED says the server knows the name. */
	if (learning && status >= 0)
		atomic_store(&c->package, pkg);
	pthread_mutex_unlock(&c->learn_lock);
	if (ret_status)
		*ret_status = status;
	return r;
}

/* The package the server answers under, learnt with a Stat of the zero
 * digest when no call has told yet (NOT_FOUND tells as well as any). */
static int client_package(cas_grpc_client *c)
{
	int pkg = atomic_load(&c->package);
	if (pkg >= 0)
		return pkg;
	_cleanup_free_ uint8_t *req = NULL;
	size_t req_len;
	cas_digest zero = {{0}};
	int status;
	int r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_STAT_REQUEST, &zero,
					   false, &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(c, CAS_GRPC_BLOB_STAT, req, req_len, NULL, NULL, NULL,
			  NULL, &status, NULL, 0);
	pkg = atomic_load(&c->package);
	if (pkg >= 0)
		return pkg;
	if (status >= 0)
		return cas_log_errno(-EIO,
				     "%s: answers neither snix.castore.v1 nor "
				     "tvix.castore.v1 BlobService/Stat",
				     c->url);
	return r < 0 ? r : -EIO;
}

/* Reads: BlobChunks to a bounded sink ------------------------------- */

static int bounded_sink(void *userdata, const void *buf, size_t len)
{
	struct cas_grpc_read *rc = userdata;
	if (len > rc->max - rc->got)
		return -EFBIG;
	rc->got += len;
	return rc->sink(rc->userdata, buf, len);
}

int cas_grpc_read_sink(void *userdata, const void *buf, size_t len)
{
	return bounded_sink(userdata, buf, len);
}

int cas_grpc_read_msg(void *userdata, const uint8_t *msg, size_t len)
{
	const uint8_t *data;
	size_t dlen;
	const char *why;
	if (cas_grpc_decode_blob_chunk(msg, len, &data, &dlen, &why) < 0)
		return -EIO;
	return dlen ? bounded_sink(userdata, data, dlen) : 0;
}

/* Batches of Reads on one connection ------------------------------------ */

struct batch_slot {
	struct call call;
	struct cas_grpc_read rc; /* the BlobChunks go to slot_sink */
	struct batch *b;
	size_t index; /* into ds; SIZE_MAX when free */
	uint8_t *req;
	size_t req_len;
	uint8_t *buf; /* the blob so far */
	size_t len, cap;
	uint8_t *ext; /* or the caller's buffer for it (dest), ext_cap */
	size_t ext_cap;
};

struct batch {
	cas_grpc_client *client;
	struct h2conn *h;
	const cas_digest *ds;
	const struct cas_grpc_dest *dest;
	size_t n, max, next;
	size_t max_msg; /* for call.max_msg */
	char path[96];	/* of Read, in the server's package */
	cas_fetch_blob_cb cb;
	void *userdata;
	struct batch_slot *slots;
	size_t n_open;
	/* Streams a dead connection left unanswered, sent again on a new
	 * one (at most BATCH_STREAMS). */
	size_t *again;
	size_t n_again;
	bool stop;     /* submit no more: the rest fail */
	bool answered; /* the server answered a stream */
};

static int slot_sink(void *userdata, const void *data, size_t dlen)
{
	struct batch_slot *s = userdata;
	if (dlen > s->b->max - s->len)
		return -EFBIG;
	if (s->ext) {
		if (dlen > s->ext_cap - s->len)
			return -EFBIG;
		memcpy(s->ext + s->len, data, dlen);
		s->len += dlen;
		return 0;
	}
	if (s->len + dlen > s->cap) {
		/* Of the size it should have, when told (a range's chunk),
		 * else grown: a chunk grown from a page was copied again and
		 * again. */
		size_t want = s->b->dest ? s->b->dest[s->index].cap : 0;
		size_t cap = s->cap ? s->cap : CAS_MAX(want, (size_t)4096);
		while (cap < s->len + dlen)
			cap *= 2;
		cap = CAS_MIN(cap, s->b->max);
		uint8_t *nb = realloc(s->buf, cap);
		if (!nb)
			return -ENOMEM;
		s->buf = nb;
		s->cap = cap;
	}
	memcpy(s->buf + s->len, data, dlen);
	s->len += dlen;
	return 0;
}

/* Hands slot s's result to the caller and frees the slot. */
static void slot_finish(struct batch *b, struct batch_slot *s, int r)
{
	size_t i = s->index;
	s->index = SIZE_MAX;
	b->answered |= s->call.answered;
	b->n_open--;
	cas_grpc_reader_release(&s->call.reader);
	free(s->req);
	s->req = NULL;
	b->cb(b->userdata, i, r, r == 0 ? (s->ext ? s->ext : s->buf) : NULL,
	      r == 0 ? s->len : 0);
}

/* A closed stream's result: only absence and size are told apart. */
static int slot_result(const struct batch_slot *s)
{
	char why[128];
	if (s->call.r == -EFBIG)
		return -EFBIG;
	if (s->call.r < 0)
		return -EIO;
	int r = call_outcome(&s->call, why, sizeof(why));
	return r == 0 || r == -ENOENT ? r : -EIO;
}

static bool batch_more(const struct batch *b)
{
	return !b->stop && (b->n_again > 0 || b->next < b->n);
}

static int slot_start(struct batch *b, struct batch_slot *s, size_t i)
{
	int r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_READ_REQUEST, &b->ds[i],
					   false, &s->req, &s->req_len);
	if (r < 0) {
		b->cb(b->userdata, i, -EIO, NULL, 0);
		return r;
	}
	s->index = i;
	s->len = 0;
	s->ext = b->dest && b->dest[i].buf ? b->dest[i].buf : NULL;
	s->ext_cap = s->ext ? b->dest[i].cap : 0;
	s->rc = (struct cas_grpc_read){slot_sink, s, UINT64_MAX, 0};
	s->call = (struct call){.status = -1,
				.on_msg = cas_grpc_read_msg,
				.msg_ud = &s->rc,
				.req = s->req,
				.req_len = s->req_len,
				.max_msg = b->max_msg};
	s->call.reader.bytes_cb = cas_grpc_read_sink;
	b->n_open++;
	r = conn_submit(b->client, b->h, b->path, &s->call);
	if (r < 0)
		slot_finish(b, s, -EIO);
	return r;
}

static bool batch_step(void *userdata)
{
	struct batch *b = userdata;
	uint32_t peer = nghttp2_session_get_remote_settings(
		b->h->session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
	size_t limit = CAS_MIN((size_t)BATCH_STREAMS, (size_t)peer);
	if (limit == 0)
		limit = 1;

	for (size_t k = 0; k < BATCH_STREAMS; k++) {
		struct batch_slot *s = &b->slots[k];
		if (s->index != SIZE_MAX && s->call.done)
			slot_finish(b, s, slot_result(s));
	}
	for (size_t k = 0; k < BATCH_STREAMS && b->n_open < limit; k++) {
		struct batch_slot *s = &b->slots[k];
		if (s->index != SIZE_MAX)
			continue;
		if (!batch_more(b))
			break;
		size_t i = b->n_again > 0 ? b->again[--b->n_again] : b->next++;
		if (slot_start(b, s, i) < 0)
			b->stop = true; /* out of memory, or nghttp2 refuses */
	}
	return b->n_open == 0 && !batch_more(b);
}

/* Every index not yet answered gets r. */
static void batch_fail_rest(struct batch *b, int r)
{
	for (size_t k = 0; k < BATCH_STREAMS; k++)
		if (b->slots[k].index != SIZE_MAX)
			slot_finish(b, &b->slots[k], r);
	while (b->n_again > 0)
		b->cb(b->userdata, b->again[--b->n_again], r, NULL, 0);
	for (; b->next < b->n; b->next++)
		b->cb(b->userdata, b->next, r, NULL, 0);
}

int cas_grpc_blobs_fetch(cas_grpc_client *client, const cas_digest *ds,
			 size_t n, size_t max, const struct cas_grpc_dest *dest,
			 cas_grpc_blob_cb cb, void *userdata)
{
	struct batch b = {.client = client,
			  .ds = ds,
			  .dest = dest,
			  .n = n,
			  .max = max,
			  .cb = cb,
			  .userdata = userdata};
	bool retried = false;
	int r = 0;

	if (n == 0)
		return 0;
	int pkg = client_package(client);
	if (pkg < 0) {
		for (size_t i = 0; i < n; i++)
			cb(userdata, i, -EIO, NULL, 0);
		return -EIO;
	}
	cas_grpc_method_path(CAS_GRPC_BLOB_READ, pkg, b.path, sizeof(b.path));
	/* A BlobChunk's own fields take a few bytes; unknown ones get some
	 * room too. */
	b.max_msg = max < SIZE_MAX - 1024 ? max + 1024 : 0;
	b.slots = calloc(BATCH_STREAMS, sizeof(*b.slots));
	b.again = calloc(BATCH_STREAMS, sizeof(*b.again));
	if (!b.slots || !b.again) {
		free(b.slots);
		free(b.again);
		for (size_t i = 0; i < n; i++)
			cb(userdata, i, -ENOMEM, NULL, 0);
		return -ENOMEM;
	}
	for (size_t k = 0; k < BATCH_STREAMS; k++) {
		b.slots[k].b = &b;
		b.slots[k].index = SIZE_MAX;
	}
	for (;;) {
		struct h2conn *h = retried ? NULL : conn_take_idle(client);
		if (!h && (r = conn_new(client, &h)) < 0) {
			cas_log_debug("%s: cannot connect: %s",
				      cas_grpc_client_url(client),
				      strerror(-r));
			r = b.answered ? 0 : -EIO; /* could not even start */
			batch_fail_rest(&b, -EIO);
			break;
		}
		b.h = h;
		r = conn_pump(h, batch_step, &b);
		if (r == 0) {
			if (h->broken || b.n_open > 0)
				conn_free(h);
			else
				conn_put_idle(client, h);
			batch_fail_rest(&b, -EIO); /* after a refused submit */
			break;
		}
		cas_log_debug("%s: Read batch: %s", cas_grpc_client_url(client),
			      strerror(-r));
		r = 0;
		/* Streams the dead connection closed in full are good; those
		 * with no answer at all go once more on a new connection. */
		for (size_t k = 0; k < BATCH_STREAMS; k++) {
			struct batch_slot *s = &b.slots[k];
			if (s->index == SIZE_MAX)
				continue;
			if (s->call.done) {
				slot_finish(&b, s, slot_result(s));
			} else if (!retried && !s->call.answered) {
				b.again[b.n_again++] = s->index;
				s->index = SIZE_MAX;
				b.n_open--;
				cas_grpc_reader_release(&s->call.reader);
				free(s->req);
				s->req = NULL;
			} else {
				slot_finish(&b, s, -EIO);
			}
		}
		conn_free(h);
		b.h = NULL;
		if (retried) {
			r = b.answered ? 0 : -EIO;
			batch_fail_rest(&b, -EIO);
			break;
		}
		retried = true;
	}
	for (size_t k = 0; k < BATCH_STREAMS; k++)
		free(b.slots[k].buf);
	free(b.slots);
	free(b.again);
	return r;
}

void cas_grpc_client_set_cancel(cas_grpc_client *c,
				const atomic_bool *const *cancel)
{
	c->cancel = cancel;
}
