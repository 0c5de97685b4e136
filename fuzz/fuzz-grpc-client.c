/* Fuzz target: the gRPC client (grpc_client.c, grpc_client_chunks.c) as
 * a hostile server answers it: HTTP/2 frames of every kind (SETTINGS,
 * HEADERS and trailers with any :status, grpc-status and grpc-message,
 * DATA cut anywhere, RST_STREAM, GOAWAY, WINDOW_UPDATE, PING), gRPC
 * messages across frames, and a connection that ends anywhere, mid-frame
 * included.
 *
 * Input: two control bytes, then what "the server" sends, as records:
 * each read of the client gets the next one. A record is a 16-bit
 * little-endian length and that many bytes; length 0xffff is the end of
 * the connection (the client's next connection gets the records after
 * it), 0xfffe is "nothing yet" (-EAGAIN). After the last record every
 * read says the connection is closed, so every call ends. A connection
 * the client keeps between calls is checked for what arrived while it
 * was idle: that takes a record too (0xfffe: nothing).
 * Byte 0 picks the call (a unary Stat, a streamed Put, or one of the
 * fetcher's: blob_fetch, directories_fetch, directory_fetch_tree,
 * blobs_fetch, outboard_fetch, blob_range_fetch); byte 1 has flags (bit
 * 0: every write on connections after the first fails) and in its high
 * bits a size bound (max for blobs_fetch and outboard_fetch, the length
 * of a range).
 *
 * Checked beyond "no crash": blobs_fetch calls back once per index, with
 * at most max bytes; results are the errnos the contracts name; an OK
 * call has grpc-status 0; the message returned is NUL-terminated; an
 * outboard or a range is no longer than asked. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct peer {
	const uint8_t *data;
	size_t size, pos;
	bool fail_writes;
	unsigned conns;
};

struct conn {
	struct peer *p;
	unsigned n;
	bool closed;
};

static int t_connect(void *userdata, void **ret)
{
	struct peer *p = userdata;
	struct conn *c = malloc(sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->p = p;
	c->n = p->conns++;
	c->closed = false;
	*ret = c;
	return 0;
}

static ssize_t t_read(void *conn, void *buf, size_t len)
{
	struct conn *c = conn;
	struct peer *p = c->p;
	if (c->closed || p->size - p->pos < 2)
		return 0;
	size_t n = p->data[p->pos] | (size_t)p->data[p->pos + 1] << 8;
	p->pos += 2;
	if (n == 0xffff) {
		c->closed = true;
		return 0;
	}
	if (n == 0xfffe)
		return -EAGAIN;
	n = CAS_MIN(n, p->size - p->pos);
	if (n > len)
		__builtin_trap(); /* records are shorter than the client's rbuf */
	memcpy(buf, p->data + p->pos, n);
	p->pos += n;
	return (ssize_t)n;
}

static int t_write(void *conn, const void *buf, size_t len)
{
	struct conn *c = conn;
	return c->p->fail_writes && c->n > 0 ? -EPIPE : 0;
}

static void t_close(void *conn)
{
	free(conn);
}

static void check_errno(int r)
{
	if (r > 0 || (r < 0 && r != -ENOENT && r != -EINVAL && r != -EIO &&
		      r != -EFBIG && r != -ENOMEM)) {
		fprintf(stderr, "unexpected result %d\n", r);
		__builtin_trap();
	}
}

static int count_msg(void *userdata, const uint8_t *msg, size_t len)
{
	(*(size_t *)userdata) += len;
	return 0;
}

static int sink(void *userdata, const void *buf, size_t len)
{
	(*(size_t *)userdata) += len;
	return 0;
}

static int dir_cb(void *userdata, const cas_digest *want, const uint8_t *buf,
		  size_t len)
{
	(*(size_t *)userdata)++;
	return 0;
}

struct blobs {
	size_t max;
	unsigned calls[3];
};

static void blob_cb(void *userdata, size_t i, int r, const uint8_t *buf,
		    size_t len)
{
	struct blobs *b = userdata;
	if (i >= 3 || b->calls[i]++ > 0)
		__builtin_trap();
	if (r == 0 && (len > b->max || (len > 0 && !buf)))
		__builtin_trap();
	if (r < 0 && r != -ENOENT && r != -EFBIG && r != -EIO && r != -ENOMEM)
		__builtin_trap();
	if (len > 0)
		(void)((volatile const uint8_t *)buf)[len - 1];
}

struct producer {
	unsigned left;
};

/* Up to 40 pieces of request stream, 16 KiB each where the session asks
 * for that much: more than the peer's first window. What they hold does
 * not matter to the client. */
static ssize_t produce(void *userdata, uint8_t *buf, size_t size)
{
	struct producer *pr = userdata;
	if (pr->left == 0)
		return 0;
	size_t n = CAS_MIN(size, (size_t)16 << 10);
	memset(buf, 0, n);
	pr->left--;
	return (ssize_t)n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool quiet;
	if (!quiet) {
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
		quiet = true;
	}
	if (size < 2)
		return 0;
	unsigned op = data[0] % 8u;
	struct peer p = {
		.data = data + 2, .size = size - 2, .fail_writes = data[1] & 1};
	size_t max = (size_t)1 << (data[1] >> 4); /* 1 B .. 32 KiB */
	struct cas_grpc_transport t = {t_connect, t_read, t_write, t_close, &p};
	cas_grpc_client *client;
	if (cas_grpc_client_new_transport(&t, &client) < 0)
		return 0;

	cas_digest d = {{0}}, ds[3];
	for (int i = 0; i < 3; i++)
		memset(&ds[i], 0x11 * (i + 1), sizeof(ds[i]));
	size_t count = 0;
	int status = -1, r;
	char message[64];

	if (op < 2) {
		_cleanup_free_ uint8_t *req = NULL;
		size_t req_len;
		struct producer pr = {40};
		if (op == 0 &&
		    cas_grpc_encode_digest_msg(CAS_GRPC_MSG_STAT_REQUEST, &d,
					       false, &req, &req_len) < 0) {
			cas_grpc_client_free(client);
			return 0;
		}
		memset(message, 'x', sizeof(message));
		r = op == 0 ? cas_grpc_call(client, CAS_GRPC_BLOB_STAT, req,
					    req_len, NULL, NULL, count_msg,
					    &count, &status, message,
					    sizeof(message))
			    : cas_grpc_call(client, CAS_GRPC_BLOB_PUT, NULL, 0,
					    produce, &pr, count_msg, &count,
					    &status, message, sizeof(message));
		if (r > 0 || (r == 0 && status != 0) ||
		    memchr(message, 0, sizeof(message)) == NULL)
			__builtin_trap();
		cas_grpc_client_free(client);
		return 0;
	}

	cas_fetcher *f;
	if (cas_grpc_fetcher_new_client(client, &f) < 0)
		return 0;
	switch (op) {
	case 2:
		check_errno(f->ops->blob_fetch(f, &d, 4096, sink, &count));
		break;
	case 3:
		check_errno(
			f->ops->directories_fetch(f, ds, 2, dir_cb, &count));
		break;
	case 4:
		check_errno(
			f->ops->directory_fetch_tree(f, &d, dir_cb, &count));
		break;
	case 5: {
		struct blobs b = {.max = max};
		r = f->ops->blobs_fetch(f, ds, 3, max, blob_cb, &b);
		check_errno(r);
		for (int i = 0; i < 3; i++)
			if (b.calls[i] != 1)
				__builtin_trap();
		break;
	}
	case 6: {
		uint8_t *buf = NULL;
		size_t len = 0;
		r = f->ops->outboard_fetch(f, &d, max, &buf, &len);
		check_errno(r);
		if (r == 0 && len > max)
			__builtin_trap();
		free(buf);
		break;
	}
	default: {
		uint8_t buf[4096];
		size_t len = SIZE_MAX;
		size_t want = CAS_MIN(max, sizeof(buf));
		r = f->ops->blob_range_fetch(f, &d, data[1] * 1000u, want, buf,
					     &len);
		check_errno(r);
		if (r == 0 && len > want)
			__builtin_trap();
		break;
	}
	}
	f->ops->free(f);
	return 0;
}
