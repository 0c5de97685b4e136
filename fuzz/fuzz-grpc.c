/* Fuzz target: what `castore serve` and the remote stores decode from
 * the network. The first byte picks the message kind, the second where
 * the rest is split in two pieces (two DATA frames); the rest is a gRPC
 * byte stream (5-byte prefixes and messages), each message decoded as
 * the server or client does: Stat/Read/Get requests (protobuf-c),
 * BlobChunk (in place), Directory (canonical decoder), Put responses.
 * Kind 7 feeds the bytes to the published roots file parser instead.
 * First bytes 0xf0 and 0xf1 (which no older corpus file starts with) are
 * snix's chunk messages: a StatBlobResponse as the client takes it (its
 * chunk list, and its bao checked as an outboard of a blob of the list's
 * size), and a StatBlobRequest with its flags as the server takes it.
 * First byte 0xf2: a Read's BlobChunk stream, fed whole and then in
 * pieces of the second byte's size (at least 1) with bytes_cb set, as
 * the client reads it: both must give the same bytes and the same
 * outcome. */
#include <stddef.h>
#include <stdint.h>

#include <stdlib.h>
#include <string.h>

#include "core/util.h"

#include "core/bao.h"
#include "core/directory.h"
#include "remote/grpc_i.h"
#include "remote/remote_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int on_msg(void *userdata, const uint8_t *msg, size_t len)
{
	unsigned kind = *(const unsigned *)userdata;
	const char *why = NULL;
	cas_digest d;
	bool recursive;
	const uint8_t *chunk;
	size_t chunk_len;
	cas_directory *dir = NULL;

	switch (kind) {
	case 0xf0: {
		cas_chunk *chunks = NULL;
		size_t n = 0, bao_len = 0;
		const uint8_t *bao = NULL;
		uint64_t total = 0;
		if (cas_grpc_decode_stat_response(msg, len, &chunks, &n, &bao,
						  &bao_len) < 0)
			break;
		for (size_t i = 0; i < n; i++) {
			if (chunks[i].size == 0)
				__builtin_trap();
			total += chunks[i].size;
		}
		if (bao_len && (bao < msg || bao + bao_len > msg + len))
			__builtin_trap();
		cas_digest zero = {{0}};
		(void)cas_bao_outboard_verify(&zero, total, bao, bao_len);
		free(chunks);
		break;
	}
	case 0xf1: {
		bool c, b;
		(void)cas_grpc_decode_stat_request(msg, len, &d, &c, &b, &why);
		break;
	}
	case 0:
		(void)cas_grpc_decode_stat(msg, len, &d, &why);
		break;
	case 1:
		(void)cas_grpc_decode_read(msg, len, &d, &why);
		break;
	case 2:
		(void)cas_grpc_decode_get(msg, len, &d, &recursive, &why);
		break;
	case 3:
		if (cas_grpc_decode_blob_chunk(msg, len, &chunk, &chunk_len,
					       &why) == 0 &&
		    chunk_len > 0 &&
		    (chunk < msg || chunk + chunk_len > msg + len))
			__builtin_trap();
		break;
	case 4:
		if (cas_directory_decode(msg, len, &dir, &why) == 0)
			cas_directory_free(dir);
		break;
	case 5:
		(void)cas_grpc_decode_digest_response(msg, len, false, &d);
		break;
	default:
		(void)cas_grpc_decode_digest_response(msg, len, true, &d);
		break;
	}
	return 0;
}

struct out {
	uint8_t *buf;
	size_t len, cap;
};

static int out_bytes(void *userdata, const void *buf, size_t len)
{
	struct out *o = userdata;
	if (len > o->cap - o->len)
		__builtin_trap(); /* more data than the stream held */
	memcpy(o->buf + o->len, buf, len);
	o->len += len;
	return 0;
}

static int out_chunk(void *userdata, const uint8_t *msg, size_t len)
{
	const uint8_t *data;
	size_t dlen;
	const char *why;
	if (cas_grpc_decode_blob_chunk(msg, len, &data, &dlen, &why) < 0)
		return -EIO;
	return out_bytes(userdata, data, dlen);
}

/* The same stream whole and piece-wise with bytes_cb: the same bytes. */
static void chunk_stream(const uint8_t *data, size_t size, size_t piece)
{
	struct out whole = {malloc(size ? size : 1), 0, size};
	struct out parts = {malloc(size ? size : 1), 0, size};
	if (!whole.buf || !parts.buf)
		abort();
	struct cas_grpc_reader r = {0};
	int rw = cas_grpc_reader_feed(&r, data, size, out_chunk, &whole);
	bool idle_w = cas_grpc_reader_idle(&r);
	cas_grpc_reader_release(&r);
	r.bytes_cb = out_bytes;
	int rp = 0;
	for (size_t at = 0; at < size && rp == 0; at += piece)
		rp = cas_grpc_reader_feed(&r, data + at,
					  CAS_MIN(piece, size - at), out_chunk,
					  &parts);
	bool idle_p = cas_grpc_reader_idle(&r);
	cas_grpc_reader_release(&r);
	if ((rw == 0) != (rp == 0))
		__builtin_trap();
	if (rw == 0 && (idle_w != idle_p || (idle_w && whole.len != parts.len)))
		__builtin_trap();
	/* A stream cut inside a message: what came of it direct is more
	 * than whole gave, but a start of the same bytes. */
	if (rw == 0 && (parts.len < whole.len ||
			memcmp(whole.buf, parts.buf, whole.len) != 0))
		__builtin_trap();
	free(whole.buf);
	free(parts.buf);
}

static int on_root(void *userdata, const char *name, const cas_node *node)
{
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	unsigned kind =
		data[0] >= 0xf0 && data[0] <= 0xf2 ? data[0] : data[0] % 8u;
	size_t split = data[1];
	data += 2;
	size -= 2;
	if (kind == 0xf2) {
		chunk_stream(data, size, split ? split : 1);
		return 0;
	}
	if (kind == 7) {
		(void)cas_roots_file_parse((const char *)data, size, on_root,
					   NULL);
		return 0;
	}
	if (split > size)
		split = size;
	struct cas_grpc_reader r = {0};
	int rc = cas_grpc_reader_feed(&r, data, split, on_msg, &kind);
	if (rc == 0)
		(void)cas_grpc_reader_feed(&r, data + split, size - split,
					   on_msg, &kind);
	cas_grpc_reader_release(&r);
	return 0;
}
