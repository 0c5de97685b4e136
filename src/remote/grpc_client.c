/* grpc_client.c - a tvix castore gRPC client on libcurl (grpc_i.h), and
 * the fetcher of grpc+http:// and grpc+unix:// remote stores.
 *
 * libcurl speaks HTTP/2 with prior knowledge over TCP or a unix socket,
 * streams request bodies from a read callback and response bodies to a
 * write callback, and hands HTTP/2 trailers to the header callback, where
 * grpc-status and grpc-message are picked up. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote_i.h"

struct cas_grpc_client {
	bool reuse;       /* libcurl reuses prior-knowledge HTTP/2 right */
	char *url;        /* as given, for messages */
	char *base;       /* http://HOST:PORT */
	char *unix_path;  /* or NULL */
	struct cas_curl_pool pool;
	struct curl_slist *headers;
};

const char *cas_grpc_client_url(const cas_grpc_client *c)
{
	return c->url;
}

int cas_grpc_client_new(const char *url, cas_grpc_client **ret)
{
	int r = cas_curl_init();
	if (r < 0)
		return r;
	cas_grpc_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->url = strdup(url);
	if (strncmp(url, "grpc+http://", 12) == 0) {
		const char *hostport = url + 12;
		size_t n = strcspn(hostport, "/?#");
		if (n == 0) {
			cas_grpc_client_free(c);
			return cas_log_errno(-EINVAL, "%s: no HOST:PORT", url);
		}
		if (asprintf(&c->base, "http://%.*s", (int)n, hostport) < 0)
			c->base = NULL;
	} else if (strncmp(url, "grpc+unix://", 12) == 0 && url[12] == '/') {
		c->unix_path = strdup(url + 12);
		c->base = strdup("http://localhost");
		if (!c->unix_path) {
			cas_grpc_client_free(c);
			return -ENOMEM;
		}
	} else {
		cas_grpc_client_free(c);
		return cas_log_errno(-EINVAL, "%s: not grpc+http://HOST:PORT or grpc+unix:///PATH",
				     url);
	}
	struct curl_slist *h = NULL;
	static const char *const hdrs[] = { "Content-Type: application/grpc",
					    "TE: trailers", "Expect:",
					    "grpc-accept-encoding: identity" };
	for (size_t i = 0; i < CAS_ARRAY_SIZE(hdrs); i++) {
		struct curl_slist *n = curl_slist_append(h, hdrs[i]);
		if (!n)
			break;
		h = n;
	}
	c->headers = h;
	if (!c->url || !c->base || !c->headers) {
		cas_grpc_client_free(c);
		return -ENOMEM;
	}
	cas_curl_pool_init(&c->pool);
	/* libcurl before 8.0 fails every request after the first on a
	 * reused prior-knowledge HTTP/2 connection ("Error in the HTTP2
	 * framing layer", curl issue 10634): there, one connection per
	 * call. */
	c->reuse = curl_version_info(CURLVERSION_NOW)->version_num >= 0x080000;
	*ret = c;
	return 0;
}

void cas_grpc_client_free(cas_grpc_client *c)
{
	if (!c)
		return;
	if (c->headers) {
		cas_curl_pool_release(&c->pool);
		curl_slist_free_all(c->headers);
	}
	free(c->url);
	free(c->base);
	free(c->unix_path);
	free(c);
}

struct call {
	int status; /* -1 until seen */
	char message[512];
	long http_code;
	struct cas_grpc_reader reader;
	cas_grpc_msg_cb on_msg;
	void *msg_ud;
	int r; /* error from the message callback or framing */
	cas_grpc_produce produce;
	void *produce_ud;
	int produce_r;
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

static void percent_decode(const char *in, size_t len, char *out, size_t size)
{
	size_t o = 0;
	for (size_t i = 0; i < len && o + 1 < size; i++) {
		if (in[i] == '%' && i + 2 < len && hexval(in[i + 1]) >= 0 &&
		    hexval(in[i + 2]) >= 0) {
			char ch = (char)(hexval(in[i + 1]) << 4 | hexval(in[i + 2]));
			out[o++] = ch >= 0x20 && ch != 0x7f ? ch : '?';
			i += 2;
		} else {
			out[o++] = in[i];
		}
	}
	out[o] = 0;
}

static size_t header_cb(char *buf, size_t size, size_t nitems, void *userdata)
{
	struct call *call = userdata;
	size_t len = size * nitems, n = len;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	if (n > 12 && strncasecmp(buf, "grpc-status:", 12) == 0) {
		const char *v = buf + 12;
		while (*v == ' ')
			v++;
		call->status = atoi(v);
	} else if (n > 13 && strncasecmp(buf, "grpc-message:", 13) == 0) {
		size_t off = 13;
		while (off < n && buf[off] == ' ')
			off++;
		percent_decode(buf + off, n - off, call->message,
			       sizeof(call->message));
	}
	return len;
}

static size_t write_cb(char *buf, size_t size, size_t nmemb, void *userdata)
{
	struct call *call = userdata;
	size_t len = size * nmemb;
	if (call->r < 0)
		return 0;
	call->r = cas_grpc_reader_feed(&call->reader, (const uint8_t *)buf, len,
				       call->on_msg, call->msg_ud);
	return call->r < 0 ? 0 : len;
}

static size_t read_cb(char *buf, size_t size, size_t nitems, void *userdata)
{
	struct call *call = userdata;
	ssize_t n = call->produce(call->produce_ud, (uint8_t *)buf, size * nitems);
	if (n < 0) {
		call->produce_r = (int)n;
		return CURL_READFUNC_ABORT;
	}
	return (size_t)n;
}

static int ignore_msg(void *userdata, const uint8_t *msg, size_t len)
{
	return 0;
}

int cas_grpc_call(cas_grpc_client *c, const char *path, const uint8_t *req,
		  size_t req_len, cas_grpc_produce produce, void *produce_ud,
		  cas_grpc_msg_cb on_msg, void *msg_ud, int *ret_status,
		  char *ret_message, size_t message_size)
{
	struct call call = { .status = -1, .on_msg = on_msg ? on_msg : ignore_msg,
			     .msg_ud = msg_ud, .produce = produce,
			     .produce_ud = produce_ud };
	char url[4096];
	int r;

	CURL *e = cas_curl_pool_get(&c->pool);
	if (!e)
		return -ENOMEM;
	snprintf(url, sizeof(url), "%s%s", c->base, path);
	curl_easy_setopt(e, CURLOPT_URL, url);
	if (c->unix_path)
		curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, c->unix_path);
	curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
			 (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, 60L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "castore/0.1 grpc-c-curl");
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->headers);
	curl_easy_setopt(e, CURLOPT_POST, 1L);
	if (!c->reuse)
		curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
	if (produce) {
		curl_easy_setopt(e, CURLOPT_READFUNCTION, read_cb);
		curl_easy_setopt(e, CURLOPT_READDATA, &call);
		curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 512L * 1024);
	} else {
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, req);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req_len);
	}
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, &call);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, &call);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 512L * 1024);
	if (getenv("CASTORE_CURL_VERBOSE"))
		curl_easy_setopt(e, CURLOPT_VERBOSE, 1L);

	CURLcode cc = curl_easy_perform(e);
	curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &call.http_code);
	if (call.produce_r < 0) {
		r = call.produce_r;
	} else if (call.r < 0) {
		r = call.r == -EPROTONOSUPPORT || call.r == -EMSGSIZE
			    ? cas_log_errno(-EIO, "%s%s: bad response message: %m",
					    c->url, path)
			    : call.r;
	} else if (cc != CURLE_OK && call.status < 0) {
		r = cas_log_errno(-EIO, "%s%s: %s", c->url, path,
				  curl_easy_strerror(cc));
	} else if (call.http_code != 200) {
		r = cas_log_errno(-EIO, "%s%s: HTTP status %ld", c->url, path,
				  call.http_code);
	} else if (call.status < 0) {
		r = cas_log_errno(-EIO, "%s%s: no grpc-status", c->url, path);
	} else if (call.status == 0 && !cas_grpc_reader_idle(&call.reader)) {
		r = cas_log_errno(-EIO, "%s%s: truncated response message",
				  c->url, path);
	} else {
		r = cas_grpc_errno_from_status(call.status);
	}
	if (ret_status)
		*ret_status = call.status;
	if (ret_message && message_size)
		snprintf(ret_message, message_size, "%s", call.message);
	cas_grpc_reader_release(&call.reader);
	cas_curl_pool_put(&c->pool, e);
	return r;
}

/* The fetcher -------------------------------------------------------- */

struct grpc_fetcher {
	cas_fetcher base;
	cas_grpc_client *client;
};

struct read_ctx {
	cas_fetch_sink sink;
	void *userdata;
};

static int read_msg(void *userdata, const uint8_t *msg, size_t len)
{
	struct read_ctx *rc = userdata;
	const uint8_t *data;
	size_t dlen;
	const char *why;
	if (cas_grpc_decode_blob_chunk(msg, len, &data, &dlen, &why) < 0)
		return -EIO;
	return dlen ? rc->sink(rc->userdata, data, dlen) : 0;
}

/* Logs a failed call that is not a plain absence. */
static int call_failed(struct grpc_fetcher *g, const char *what, int r,
		       int status, const char *message)
{
	if (r == -ENOENT || status < 0)
		return r;
	return cas_log_errno(-EIO, "%s: %s: grpc-status %d: %s",
			     cas_grpc_client_url(g->client), what, status,
			     message[0] ? message : "(no message)");
}

static int grpc_blob_fetch(cas_fetcher *f, const cas_digest *d,
			   cas_fetch_sink sink, void *userdata)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	struct read_ctx rc = { sink, userdata };
	_cleanup_free_ uint8_t *req = NULL;
	size_t req_len;
	char message[512];
	int status;
	int r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_READ_REQUEST, d, false,
					   &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(g->client, CAS_GRPC_PATH_BLOB_READ, req, req_len, NULL,
			  NULL, read_msg, &rc, &status, message, sizeof(message));
	if (r < 0)
		return call_failed(g, "Read", r, status, message);
	return 0;
}

struct dir_ctx {
	cas_fetch_dir_cb cb;
	void *userdata;
	const cas_digest *want;
	unsigned count;
};

static int dir_msg(void *userdata, const uint8_t *msg, size_t len)
{
	struct dir_ctx *dc = userdata;
	if (dc->want && dc->count > 0)
		return 0; /* non-recursive: one Directory expected */
	dc->count++;
	return dc->cb(dc->userdata, dc->want, msg, len);
}

static int get_call(struct grpc_fetcher *g, const cas_digest *d, bool recursive,
		    struct dir_ctx *dc)
{
	_cleanup_free_ uint8_t *req = NULL;
	size_t req_len;
	char message[512];
	int status;
	int r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_GET_REQUEST, d, recursive,
					   &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(g->client, CAS_GRPC_PATH_DIRECTORY_GET, req, req_len,
			  NULL, NULL, dir_msg, dc, &status, message,
			  sizeof(message));
	if (r < 0)
		return call_failed(g, "DirectoryService/Get", r, status, message);
	/* An OK Get with no Directory: the server does not have it. */
	if (dc->count == 0 && dc->want)
		return -ENOENT;
	return 0;
}

static int grpc_directories_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
				  cas_fetch_dir_cb cb, void *userdata)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	for (size_t i = 0; i < n; i++) {
		struct dir_ctx dc = { cb, userdata, &ds[i], 0 };
		int r = get_call(g, &ds[i], false, &dc);
		if (r < 0)
			return r;
	}
	return 0;
}

static int grpc_directory_fetch_tree(cas_fetcher *f, const cas_digest *d,
				     cas_fetch_dir_cb cb, void *userdata)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	struct dir_ctx dc = { cb, userdata, NULL, 0 };
	int r = get_call(g, d, true, &dc);
	if (r >= 0 && dc.count == 0)
		return -ENOENT;
	return r;
}

static void grpc_fetcher_free(cas_fetcher *f)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	cas_grpc_client_free(g->client);
	free(g);
}

static const struct cas_fetcher_ops grpc_fetcher_ops = {
	.blob_fetch = grpc_blob_fetch,
	.directories_fetch = grpc_directories_fetch,
	.directory_fetch_tree = grpc_directory_fetch_tree,
	.free = grpc_fetcher_free,
};

int cas_grpc_fetcher_new(const char *url, cas_fetcher **ret)
{
	struct grpc_fetcher *g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	int r = cas_grpc_client_new(url, &g->client);
	if (r < 0) {
		free(g);
		return r;
	}
	g->base.ops = &grpc_fetcher_ops;
	*ret = &g->base;
	return 0;
}
