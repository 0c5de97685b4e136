/* grpc_fetcher.c - the fetcher (remote_i.h) of grpc+http://, grpc+https://
 * and grpc+unix:// remote stores, on the gRPC client (grpc_client.c):
 * a blob by Read (or by its chunks, grpc_client_chunks.c), Directories by
 * Get (one, or a whole tree), batches of small blobs, and a large blob's
 * outboard and ranges. It only moves bytes: the cache checks them.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote_i.h"

struct grpc_fetcher {
	cas_fetcher base;
	cas_grpc_client *client;
	struct cas_grpc_lists *lists; /* of large blobs held in part */
};

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

static int blobs_via(void *fetch_ud, const cas_digest *ds, size_t n, size_t max,
		     const struct cas_grpc_dest *dest, cas_grpc_blob_cb cb,
		     void *userdata)
{
	struct grpc_fetcher *g = fetch_ud;
	return cas_grpc_blobs_fetch(g->client, ds, n, max, dest, cb, userdata);
}

static int grpc_blobs_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
			    size_t max, cas_fetch_blob_cb cb, void *userdata)
{
	return blobs_via(f, ds, n, max, NULL, cb, userdata);
}

static int grpc_blob_fetch(cas_fetcher *f, const cas_digest *d, uint64_t max,
			   cas_fetch_sink sink, void *userdata)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	/* tvix's Stat carries no size: a blob no FileNode sized is
	 * bounded by the documented maximum. */
	struct cas_grpc_read rc = {
		sink, userdata,
		max == CAS_FETCH_UNSIZED ? CAS_FETCH_UNSIZED_MAX : max, 0};
	_cleanup_free_ uint8_t *req = NULL;
	size_t req_len;
	char message[512];
	int status;
	/* By chunks where the server offers them (grpc_client_chunks.c). */
	int r = cas_grpc_fetch_chunked(g->client, blobs_via, f, d,
				       cas_grpc_read_sink, &rc);
	if (r != 0)
		return r < 0 ? r : 0;
	r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_READ_REQUEST, d, false,
				       &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(g->client, CAS_GRPC_BLOB_READ, req, req_len, NULL,
			  NULL, cas_grpc_read_msg, &rc, &status, message,
			  sizeof(message));
	if (r < 0)
		return call_failed(g, "Read", r, status, message);
	return 0;
}

struct dir_ctx {
	cas_fetch_dir_cb cb;
	void *userdata;
	const cas_digest *want;
	unsigned count;
	bool extra; /* a non-recursive Get sent a second Directory */
};

static int dir_msg(void *userdata, const uint8_t *msg, size_t len)
{
	struct dir_ctx *dc = userdata;
	if (dc->want && dc->count > 0) {
		dc->extra = true; /* non-recursive: one Directory, no more */
		return -EPROTO;
	}
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
	int r = cas_grpc_encode_digest_msg(CAS_GRPC_MSG_GET_REQUEST, d,
					   recursive, &req, &req_len);
	if (r < 0)
		return r;
	r = cas_grpc_call(g->client, CAS_GRPC_DIRECTORY_GET, req, req_len, NULL,
			  NULL, dir_msg, dc, &status, message, sizeof(message));
	if (dc->extra) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(-EIO,
				     "directory %s from %s: a Get of one "
				     "Directory answered with more than one",
				     hex, cas_grpc_client_url(g->client));
	}
	if (r < 0)
		return call_failed(g, "DirectoryService/Get", r, status,
				   message);
	/* An OK Get with no Directory: the server does not have it. */
	if (dc->count == 0 && dc->want)
		return -ENOENT;
	return 0;
}

static int grpc_directories_fetch(cas_fetcher *f, const cas_digest *ds,
				  size_t n, cas_fetch_dir_cb cb, void *userdata)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	for (size_t i = 0; i < n; i++) {
		struct dir_ctx dc = {cb, userdata, &ds[i], 0, false};
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
	struct dir_ctx dc = {cb, userdata, NULL, 0, false};
	int r = get_call(g, d, true, &dc);
	if (r >= 0 && dc.count == 0)
		return -ENOENT;
	return r;
}

/* blobs_fetch: one connection, up to BATCH_STREAMS Read streams on it. */

static void grpc_fetcher_free(cas_fetcher *f)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	cas_grpc_client_free(g->client);
	cas_grpc_lists_free(g->lists);
	free(g);
}

static int grpc_outboard_fetch(cas_fetcher *f, const cas_digest *d, size_t max,
			       uint8_t **ret_buf, size_t *ret_len)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	return cas_grpc_outboard_fetch(g->client, g->lists, d, max, ret_buf,
				       ret_len);
}

static int grpc_blob_range_fetch(cas_fetcher *f, const cas_digest *d,
				 uint64_t off, size_t len, uint8_t *buf,
				 size_t *ret_len)
{
	struct grpc_fetcher *g = (struct grpc_fetcher *)f;
	return cas_grpc_range_fetch(g->client, g->lists, blobs_via, f, d, off,
				    len, buf, ret_len);
}

static const struct cas_fetcher_ops grpc_fetcher_ops = {
	.blob_fetch = grpc_blob_fetch,
	.directories_fetch = grpc_directories_fetch,
	.directory_fetch_tree = grpc_directory_fetch_tree,
	.blobs_fetch = grpc_blobs_fetch,
	.outboard_fetch = grpc_outboard_fetch,
	.blob_range_fetch = grpc_blob_range_fetch,
	.free = grpc_fetcher_free,
};

int cas_grpc_fetcher_new_client(cas_grpc_client *client, cas_fetcher **ret)
{
	struct grpc_fetcher *g = calloc(1, sizeof(*g));
	int r = g ? cas_grpc_lists_new(&g->lists) : -ENOMEM;
	if (r < 0) {
		free(g);
		cas_grpc_client_free(client);
		return r;
	}
	g->client = client;
	g->base.ops = &grpc_fetcher_ops;
	cas_grpc_client_set_cancel(client, &g->base.cancel);
	*ret = &g->base;
	return 0;
}

int cas_grpc_fetcher_new(const char *url, cas_fetcher **ret)
{
	cas_grpc_client *client;
	int r = cas_grpc_client_new(url, &client);
	return r < 0 ? r : cas_grpc_fetcher_new_client(client, ret);
}
