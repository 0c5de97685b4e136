/* Fuzz target: a `castore serve` connection (grpc_session.c) fed what a
 * client sends, HTTP/2 frames and gRPC messages alike: HEADERS of every
 * method under both package names, DATA split anywhere, trailers, resets,
 * GOAWAY, partial frames. The store behind it is a small fake in memory
 * (some blobs and the empty Directory exist; Puts are taken and dropped).
 *
 * Input: the first byte picks how the rest is cut (each piece one
 * cas_grpc_session_recv); the rest follows the client preface, which is
 * sent first. After every piece the session's output is drained, as the
 * server's event loop does. Checked beyond "no crash": every byte the
 * session counted in the shared budget is given back when it is freed. */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "remote/grpc_server_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The fake store ---------------------------------------------------------- */

static const uint8_t blob_bytes[] = "castore fuzz blob";

/* A blob exists when its digest starts with an even byte. */
static int fake_blob_stat(cas_store *s, const cas_digest *d, uint64_t *ret)
{
	if (d->bytes[0] & 1)
		return -ENOENT;
	*ret = d->bytes[1] == 0 ? 0 : sizeof(blob_bytes);
	return 0;
}

static int fake_blob_open(cas_store *s, const cas_digest *d, int *ret_fd,
			  uint64_t *ret_size)
{
	uint64_t size;
	int r = fake_blob_stat(s, d, &size);
	if (r < 0)
		return r;
	r = cas_memfd_sealed(blob_bytes, (size_t)size, ret_fd);
	*ret_size = size;
	return r;
}

struct fake_writer {
	cas_blob_writer base;
	uint64_t len;
};

static int fw_write(cas_blob_writer *w, const void *buf, size_t len)
{
	((struct fake_writer *)w)->len += len;
	return 0;
}

static int fw_commit(cas_blob_writer *w, const cas_digest *expected,
		     cas_digest *ret_digest, uint64_t *ret_size)
{
	struct fake_writer *f = (struct fake_writer *)w;
	memset(ret_digest, 0, sizeof(*ret_digest));
	if (ret_size)
		*ret_size = f->len;
	free(f);
	return 0;
}

static void fw_abort(cas_blob_writer *w)
{
	free(w);
}

static const struct cas_blob_writer_ops fw_ops = {fw_write, fw_commit,
						  fw_abort};

static int fake_blob_writer_new(cas_store *s, cas_blob_writer **ret)
{
	struct fake_writer *f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->base.ops = &fw_ops;
	*ret = &f->base;
	return 0;
}

static int fake_directory_get_raw(cas_store *s, const cas_digest *d,
				  uint8_t **ret_buf, size_t *ret_len)
{
	if (!cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY))
		return -ENOENT;
	*ret_buf = NULL;
	*ret_len = 0;
	return 0;
}

static int fake_directory_has(cas_store *s, const cas_digest *d)
{
	return cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY) ? 1 : 0;
}

/* A batch validates each Directory as the real one does (canonical
 * decode) but keeps nothing; children are taken as stored. */
static int fb_put(cas_dir_batch *b, const void *buf, size_t len,
		  cas_digest *ret_digest)
{
	cas_directory *dir = NULL;
	const char *why;
	int r = cas_directory_decode(buf, len, &dir, &why);
	if (r < 0)
		return r;
	cas_directory_free(dir);
	memset(ret_digest, 0, sizeof(*ret_digest));
	return 0;
}

static int fb_commit(cas_dir_batch *b, const char *root_name,
		     const cas_node *root_node)
{
	free(b);
	return 0;
}

static void fb_abort(cas_dir_batch *b)
{
	free(b);
}

static const struct cas_dir_batch_ops fb_ops = {fb_put, fb_commit, fb_abort};

static int fake_dir_batch_new(cas_store *s, cas_dir_batch **ret)
{
	cas_dir_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->ops = &fb_ops;
	*ret = b;
	return 0;
}

static void fake_free(cas_store *s)
{
}

static const struct cas_store_ops fake_ops = {
	.blob_stat = fake_blob_stat,
	.blob_open = fake_blob_open,
	.blob_writer_new = fake_blob_writer_new,
	.directory_get_raw = fake_directory_get_raw,
	.directory_has = fake_directory_has,
	.dir_batch_new = fake_dir_batch_new,
	.free = fake_free,
};

static cas_store fake_store = {&fake_ops};

/* The session --------------------------------------------------------------- */

static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static int drain(struct cas_grpc_session *s)
{
	/* A Read answer is bounded by the fake blobs; a loop of frames is
	 * bounded by flow control, which the fuzzer's WINDOW_UPDATEs can
	 * only open so far. */
	for (int i = 0; i < 4096; i++) {
		const uint8_t *out;
		ssize_t n = cas_grpc_session_send(s, &out);
		if (n <= 0)
			return (int)n;
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	size_t piece = data[0] == 0 ? size : data[0];
	bool read_only = data[0] == 0xff;
	data++;
	size--;

	atomic_uint_least64_t buffered;
	atomic_init(&buffered, 0);
	struct cas_grpc_session_env env = {
		.store = &fake_store,
		.read_only = read_only,
		.buffered = &buffered,
	};
	struct cas_grpc_session *s;
	/* Chunk lists as serve keeps them (snix's send_chunks, GetBlob). */
	if (cas_chunk_index_new(&fake_store, &env.chunks) < 0)
		return 0;
	if (cas_grpc_session_new(&env, &s) < 0) {
		cas_chunk_index_free(env.chunks);
		return 0;
	}
	int r = cas_grpc_session_recv(s, preface, sizeof(preface) - 1);
	if (r == 0)
		r = drain(s);
	while (r == 0 && size > 0 && cas_grpc_session_alive(s)) {
		size_t n = CAS_MIN(piece, size);
		r = cas_grpc_session_recv(s, data, n);
		data += n;
		size -= n;
		if (drain(s) < 0)
			break;
	}
	(void)cas_grpc_session_streams(s);
	cas_grpc_session_goaway(s);
	(void)drain(s);
	cas_grpc_session_free(s);
	cas_chunk_index_free(env.chunks);
	if (atomic_load(&buffered) != 0)
		__builtin_trap();
	return 0;
}
