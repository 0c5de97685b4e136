/* Unit tests of src/remote: gRPC framing and decoders, the published roots
 * file, the digest map, and the verified cache in front of a fake fetcher
 * (verification, nothing wrong cached, one fetch for concurrent readers,
 * Directory closures fetched leaves first, absence, eviction). */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../core/check.h"
#include "core/directory.h"
#include "core/log.h"
#include "remote/grpc_i.h"
#include "remote/remote.h"
#include "store/ingest.h"
#include "remote/remote_i.h"
#include "store/local.h"

static char base[] = "/tmp/castore-test-remote-XXXXXX";

/* Framing ------------------------------------------------------------------ */

struct collected {
	uint8_t buf[4096];
	size_t lens[16];
	size_t n, total;
};

static int collect(void *userdata, const uint8_t *msg, size_t len)
{
	struct collected *c = userdata;
	if (c->n >= 16 || c->total + len > sizeof(c->buf))
		return -E2BIG;
	memcpy(c->buf + c->total, msg, len);
	c->total += len;
	c->lens[c->n++] = len;
	return 0;
}

static int collect_bytes(void *userdata, const void *buf, size_t len)
{
	struct collected *c = userdata;
	if (c->total + len > sizeof(c->buf))
		return -E2BIG;
	memcpy(c->buf + c->total, buf, len);
	c->total += len;
	return 0;
}

/* With bytes_cb, a BlobChunk that is one data field and arrives in
 * pieces is not gathered: its data goes to bytes_cb as it comes; one
 * with any other field goes to cb whole. */
static void test_reader_bytes(void)
{
	uint8_t stream[600];
	uint8_t data[300];
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i * 7);
	size_t n = cas_grpc_blob_chunk_header(stream, sizeof(data));
	memcpy(stream + n, data, sizeof(data));
	n += sizeof(data);
	/* data then an unknown varint field (2 = 1) */
	cas_grpc_frame_prefix(stream + n, 5);
	memcpy(stream + n + 5, "\x0a\x01z\x10\x01", 5);
	n += 10;
	for (size_t piece = 1; piece <= 7; piece += 3) {
		struct cas_grpc_reader r = {.bytes_cb = collect_bytes};
		struct collected c = {0};
		for (size_t at = 0; at < n; at += piece)
			CHECK(cas_grpc_reader_feed(&r, stream + at,
						   CAS_MIN(piece, n - at),
						   collect, &c) == 0);
		CHECK(cas_grpc_reader_idle(&r));
		/* 300 bytes direct, then the other message whole */
		CHECK(c.n == 1 && c.lens[0] == 5);
		CHECK(c.total == sizeof(data) + 5);
		CHECK(memcmp(c.buf, data, sizeof(data)) == 0);
		CHECK(memcmp(c.buf + sizeof(data), "\x0a\x01z\x10\x01", 5) ==
		      0);
		cas_grpc_reader_release(&r);
	}
}

static void test_reader(void)
{
	uint8_t stream[64];
	size_t n = 0;
	cas_grpc_frame_prefix(stream, 3);
	memcpy(stream + 5, "abc", 3);
	cas_grpc_frame_prefix(stream + 8, 0);
	cas_grpc_frame_prefix(stream + 13, 2);
	memcpy(stream + 18, "de", 2);
	n = 20;

	/* Whole, and byte by byte: the same messages. */
	for (int bytewise = 0; bytewise < 2; bytewise++) {
		struct cas_grpc_reader r = {0};
		struct collected c = {0};
		if (bytewise)
			for (size_t i = 0; i < n; i++)
				CHECK(cas_grpc_reader_feed(&r, stream + i, 1,
							   collect, &c) == 0);
		else
			CHECK(cas_grpc_reader_feed(&r, stream, n, collect,
						   &c) == 0);
		CHECK(c.n == 3);
		CHECK(c.lens[0] == 3 && c.lens[1] == 0 && c.lens[2] == 2);
		CHECK(memcmp(c.buf, "abcde", 5) == 0);
		CHECK(cas_grpc_reader_idle(&r));
		cas_grpc_reader_release(&r);
	}
	/* Truncated: not idle. */
	struct cas_grpc_reader r = {0};
	struct collected c = {0};
	CHECK(cas_grpc_reader_feed(&r, stream, 6, collect, &c) == 0);
	CHECK(!cas_grpc_reader_idle(&r));
	cas_grpc_reader_release(&r);
	/* Compressed, oversized. */
	uint8_t comp[] = {1, 0, 0, 0, 1, 'x'};
	CHECK(cas_grpc_reader_feed(&r, comp, sizeof(comp), collect, &c) ==
	      -EPROTONOSUPPORT);
	cas_grpc_reader_release(&r);
	uint8_t big[] = {0, 0xff, 0, 0, 0};
	CHECK(cas_grpc_reader_feed(&r, big, sizeof(big), collect, &c) ==
	      -EMSGSIZE);
	cas_grpc_reader_release(&r);
	/* A callback error stops and is returned. */
	struct collected full = {.n = 16};
	CHECK(cas_grpc_reader_feed(&r, stream, n, collect, &full) == -E2BIG);
	cas_grpc_reader_release(&r);
}

static void test_messages(void)
{
	cas_digest d, got;
	const char *why = NULL;
	bool recursive = false;
	uint8_t *buf;
	size_t len;

	cas_hash_buffer("x", 1, &d);
	REQUIRE(cas_grpc_encode_digest_msg(CAS_GRPC_MSG_STAT_REQUEST, &d, false,
					   &buf, &len) == 0);
	CHECK(cas_grpc_decode_stat(buf + 5, len - 5, &got, &why) == 0 &&
	      cas_digest_eq(&d, &got));
	CHECK(cas_grpc_decode_read(buf + 5, len - 5, &got, &why) == 0);
	CHECK(cas_grpc_decode_get(buf + 5, len - 5, &got, &recursive, &why) ==
		      0 &&
	      !recursive);
	free(buf);
	REQUIRE(cas_grpc_encode_digest_msg(CAS_GRPC_MSG_GET_REQUEST, &d, true,
					   &buf, &len) == 0);
	CHECK(cas_grpc_decode_get(buf + 5, len - 5, &got, &recursive, &why) ==
		      0 &&
	      recursive);
	CHECK(cas_digest_eq(&d, &got));
	/* Short digest. */
	buf[6] = 31;
	CHECK(cas_grpc_decode_get(buf + 5, 2 + 31, &got, &recursive, &why) ==
	      -EINVAL);
	CHECK_STREQ(why, "digest is not 32 bytes");
	free(buf);
	/* No digest at all. */
	CHECK(cas_grpc_decode_get((const uint8_t *)"\x10\x01", 2, &got,
				  &recursive, &why) == -EINVAL);
	CHECK(cas_grpc_decode_stat((const uint8_t *)"", 0, &got, &why) ==
	      -EINVAL);
	CHECK(cas_grpc_decode_stat((const uint8_t *)"\x0a\x05", 2, &got,
				   &why) == -EINVAL);
	REQUIRE(cas_grpc_encode_digest_msg(CAS_GRPC_MSG_PUT_BLOB_RESPONSE, &d,
					   false, &buf, &len) == 0);
	CHECK(cas_grpc_decode_digest_response(buf + 5, len - 5, false, &got) ==
	      0);
	CHECK(cas_grpc_decode_digest_response(buf + 5, len - 5, true, &got) ==
	      0);
	free(buf);
	REQUIRE(cas_grpc_encode_digest_msg(CAS_GRPC_MSG_STAT_RESPONSE, &d,
					   false, &buf, &len) == 0);
	CHECK(len == 5);
	free(buf);

	/* BlobChunk header + data decodes in place. */
	uint8_t chunk[16 + 300];
	size_t h = cas_grpc_blob_chunk_header(chunk, 300);
	memset(chunk + h, 'q', 300);
	const uint8_t *data;
	size_t dlen;
	CHECK(chunk[1] == 0 && chunk[4] == h - 5 + 300 - 256);
	CHECK(cas_grpc_decode_blob_chunk(chunk + 5, h - 5 + 300, &data, &dlen,
					 &why) == 0);
	CHECK(dlen == 300 && data == chunk + h);
	CHECK(cas_grpc_blob_chunk_header(chunk, 0) == 5);
	CHECK(cas_grpc_decode_blob_chunk(chunk + 5, 0, &data, &dlen, &why) ==
		      0 &&
	      dlen == 0);
	CHECK(cas_grpc_decode_blob_chunk((const uint8_t *)"\x0a\x09xx", 4,
					 &data, &dlen, &why) == -EINVAL);
	CHECK(cas_grpc_decode_blob_chunk((const uint8_t *)"\x08\x01", 2, &data,
					 &dlen, &why) == -EINVAL);
	/* Unknown fields are skipped. */
	CHECK(cas_grpc_decode_blob_chunk((const uint8_t *)"\x10\x05\x0a\x01z",
					 5, &data, &dlen, &why) == 0 &&
	      dlen == 1 && data[0] == 'z');

	/* Both package names, the same methods. */
	char path[96];
	static const char *const paths[] = {
		"/snix.castore.v1.BlobService/Put",
		"/tvix.castore.v1.BlobService/Put",
		"/snix.castore.v1.DirectoryService/Get",
		"/tvix.castore.v1.DirectoryService/Get",
	};
	for (size_t i = 0; i < 4; i++)
		CHECK(cas_grpc_method_from_path(paths[i], strlen(paths[i])) ==
		      (i < 2 ? CAS_GRPC_BLOB_PUT : CAS_GRPC_DIRECTORY_GET));
	CHECK_STREQ(cas_grpc_method_path(CAS_GRPC_BLOB_READ, CAS_GRPC_SNIX,
					 path, sizeof(path)),
		    "/snix.castore.v1.BlobService/Read");
	CHECK_STREQ(cas_grpc_method_path(CAS_GRPC_DIRECTORY_PUT, CAS_GRPC_TVIX,
					 path, sizeof(path)),
		    "/tvix.castore.v1.DirectoryService/Put");
	CHECK(cas_grpc_method_from_path("/x", 2) == CAS_GRPC_UNKNOWN_METHOD);
	CHECK(cas_grpc_method_from_path("/nix.castore.v1.BlobService/Put",
					31) == CAS_GRPC_UNKNOWN_METHOD);
	CHECK(cas_grpc_method_from_path("/snix.castore.v1.BlobService/Pu",
					31) == CAS_GRPC_UNKNOWN_METHOD);
	CHECK(cas_grpc_method_from_path("/snix.castore.v1xBlobService/Put",
					32) == CAS_GRPC_UNKNOWN_METHOD);
	CHECK(cas_grpc_status_from_errno(-ENOENT) == CAS_GRPC_NOT_FOUND);
	CHECK(cas_grpc_status_from_errno(-EBADMSG) ==
	      CAS_GRPC_INVALID_ARGUMENT);
	CHECK(cas_grpc_errno_from_status(CAS_GRPC_NOT_FOUND) == -ENOENT);
	CHECK(cas_grpc_errno_from_status(CAS_GRPC_UNAVAILABLE) == -EIO);

	char enc[64];
	cas_grpc_percent_encode("a%b\n\xff", enc, sizeof(enc));
	CHECK_STREQ(enc, "a%25b%0A%FF");
}

/* Roots file ------------------------------------------------------------- */

struct roots_seen {
	char names[8][64];
	cas_node nodes[8];
	size_t n;
};

static int root_cb(void *userdata, const char *name, const cas_node *node)
{
	struct roots_seen *s = userdata;
	if (s->n >= 8)
		return -E2BIG;
	snprintf(s->names[s->n], 64, "%s", name);
	s->nodes[s->n++] = *node;
	return 0;
}

static void test_roots_file(void)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	cas_node dir = {.type = CAS_NODE_DIRECTORY, .size = 7};
	cas_node file = {.type = CAS_NODE_FILE, .size = 3, .executable = true};
	cas_node link = {.type = CAS_NODE_SYMLINK,
			 .target = (const uint8_t *)"t",
			 .target_len = 1};
	cas_hash_buffer("d", 1, &dir.digest);
	cas_hash_buffer("f", 1, &file.digest);
	REQUIRE(f);
	CHECK(cas_roots_file_write_line(f, "plain", &dir) == 0);
	CHECK(cas_roots_file_write_line(f, "sp ace\t%\n\xc3\xa9", &file) == 0);
	CHECK(cas_roots_file_write_line(f, "l", &link) == 0);
	fclose(f);
	CHECK(strchr(buf, ' ') == NULL);
	struct roots_seen s = {0};
	CHECK(cas_roots_file_parse(buf, len, root_cb, &s) == 0);
	CHECK(s.n == 3);
	CHECK_STREQ(s.names[0], "plain");
	CHECK(s.nodes[0].type == CAS_NODE_DIRECTORY && s.nodes[0].size == 7 &&
	      cas_digest_eq(&s.nodes[0].digest, &dir.digest));
	CHECK_STREQ(s.names[1], "sp ace\t%\n\xc3\xa9");
	CHECK(s.nodes[1].type == CAS_NODE_FILE && s.nodes[1].executable);
	CHECK(s.nodes[2].type == CAS_NODE_SYMLINK &&
	      s.nodes[2].target_len == 1);
	free(buf);

	static const char *const bad[] = {
		"name\n",
		"\t0a00\n",
		"a%zz\t0a00\n",
		"a%2\t0a00\n",
		"a\t0a0\n",
		"a\tzz\n",
		"a%2Fb\t1a03120178\n",
		"a%00\t1a03120178\n",
		"..\t1a03120178\n",
		"a\t1a0312017878\n",
	};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(bad); i++) {
		struct roots_seen t = {0};
		int r = cas_roots_file_parse(bad[i], strlen(bad[i]), root_cb,
					     &t);
		if (r != -EBADMSG)
			fprintf(stderr, "accepted bad roots line %zu\n", i);
		CHECK(r == -EBADMSG);
	}
	struct roots_seen t = {0};
	const char *ok = "# comment\r\n\n%2ex\t1a03120178\r\n";
	CHECK(cas_roots_file_parse(ok, strlen(ok), root_cb, &t) == 0 &&
	      t.n == 1);
	CHECK_STREQ(t.names[0], ".x");
	(void)t;
}

static void test_dmap(void)
{
	struct cas_dmap m = {0};
	cas_digest d;
	for (unsigned i = 0; i < 5000; i++) {
		cas_hash_buffer(&i, sizeof(i), &d);
		CHECK(cas_dmap_put(&m, &d, (void *)(uintptr_t)(i + 1)) == 1);
	}
	for (unsigned i = 0; i < 5000; i++) {
		cas_hash_buffer(&i, sizeof(i), &d);
		struct cas_dmap_entry *e = cas_dmap_find(&m, &d);
		CHECK(e && e->value == (void *)(uintptr_t)(i + 1));
		CHECK(cas_dmap_put(&m, &d, NULL) == 0);
	}
	unsigned x = 99999;
	cas_hash_buffer(&x, sizeof(x), &d);
	CHECK(cas_dmap_find(&m, &d) == NULL);
	CHECK(m.n == 5000);
	/* Removing every third keeps the others findable (the runs they
	 * share are shifted, not cut). */
	for (unsigned i = 0; i < 5000; i += 3) {
		cas_hash_buffer(&i, sizeof(i), &d);
		struct cas_dmap_entry *e = cas_dmap_find(&m, &d);
		REQUIRE(e);
		cas_dmap_remove(&m, e);
	}
	for (unsigned i = 0; i < 5000; i++) {
		cas_hash_buffer(&i, sizeof(i), &d);
		struct cas_dmap_entry *e = cas_dmap_find(&m, &d);
		if (i % 3 == 0)
			CHECK(e == NULL);
		else
			CHECK(e && e->value == (void *)(uintptr_t)(i + 1));
	}
	CHECK(m.n == 5000 - 1667);
	for (unsigned i = 0; i < 5000; i += 3) {
		cas_hash_buffer(&i, sizeof(i), &d);
		CHECK(cas_dmap_put(&m, &d, (void *)(uintptr_t)(i + 1)) == 1);
	}
	CHECK(m.n == 5000);
	cas_dmap_release(&m, NULL);
}

/* The cache in front of a fake fetcher --------------------------------- */

/* Serves the objects of a local store ("the remote"), counting requests,
 * with optional delay and corruption. */
struct fake {
	cas_fetcher base;
	cas_store *origin;
	pthread_mutex_t lock;
	unsigned blob_fetches;
	unsigned large_fetches; /* blob_fetch of blobs over 1 MiB */
	unsigned batches;	/* blobs_fetch calls */
	unsigned dir_fetches;
	unsigned delay_ms;
	bool corrupt;
	bool corrupt_batch; /* blobs_fetch only */
	bool offline;
	bool tree;	    /* offer directory_fetch_tree */
	unsigned ranges;    /* pack ranges asked for (ranges_fetch) */
	bool packs_absent;  /* ranges_fetch: every pack is -ENOENT */
	bool corrupt_packs; /* ranges_fetch: one wrong byte per blob */
	size_t piece; /* deliver blobs in pieces of this size (0: halves) */
	unsigned piece_delay_ms; /* a pause after each piece */
	unsigned pieces;	 /* delivered, in all */
	bool refused;		 /* the sink refused a piece */
};

static int fake_blob_fetch(cas_fetcher *f, const cas_digest *d, uint64_t max,
			   cas_fetch_sink sink, void *userdata)
{
	struct fake *k = (struct fake *)f;
	pthread_mutex_lock(&k->lock);
	k->blob_fetches++;
	pthread_mutex_unlock(&k->lock);
	if (k->offline)
		return -EIO;
	if (k->delay_ms)
		usleep(k->delay_ms * 1000);
	int fd;
	uint64_t size;
	int r = k->origin->ops->blob_open(k->origin, d, &fd, &size);
	if (r < 0)
		return r;
	if (size > (1u << 20)) {
		pthread_mutex_lock(&k->lock);
		k->large_fetches++;
		pthread_mutex_unlock(&k->lock);
	}
	uint8_t *buf = malloc(size ? size : 1);
	REQUIRE(buf && cas_pread_all(fd, buf, size, 0) == 0);
	close(fd);
	if (k->corrupt && size)
		buf[size / 2] ^= 1;
	/* In pieces, as a network delivers. */
	if (k->piece) {
		r = 0;
		for (uint64_t off = 0; r >= 0 && off < size; off += k->piece) {
			r = sink(userdata, buf + off,
				 (size_t)CAS_MIN(k->piece, size - off));
			pthread_mutex_lock(&k->lock);
			k->pieces++;
			k->refused |= r < 0;
			pthread_mutex_unlock(&k->lock);
			if (k->piece_delay_ms)
				usleep(k->piece_delay_ms * 1000);
		}
	} else {
		r = sink(userdata, buf, size / 2);
		if (r >= 0)
			r = sink(userdata, buf + size / 2, size - size / 2);
	}
	free(buf);
	return r;
}

static int fake_directories_fetch(cas_fetcher *f, const cas_digest *ds,
				  size_t n, cas_fetch_dir_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	for (size_t i = 0; i < n; i++) {
		uint8_t *buf = NULL;
		size_t len = 0;
		k->dir_fetches++;
		if (k->offline)
			return -EIO;
		int r = k->origin->ops->directory_get_raw(k->origin, &ds[i],
							  &buf, &len);
		if (r < 0)
			return r;
		if (k->corrupt && len)
			buf[0] ^= 0x80;
		r = cb(userdata, &ds[i], buf, len);
		free(buf);
		if (r < 0)
			return r;
	}
	return 0;
}

static int fake_fetch_tree(cas_fetcher *f, const cas_digest *d,
			   cas_fetch_dir_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	/* Breadth first, parents before children, each once. */
	cas_digest queue[64];
	size_t head = 0, tail = 0;
	queue[tail++] = *d;
	k->dir_fetches++;
	while (head < tail) {
		uint8_t *buf = NULL;
		size_t len = 0;
		int r = k->origin->ops->directory_get_raw(
			k->origin, &queue[head++], &buf, &len);
		if (r < 0)
			return r;
		cas_directory *dir = NULL;
		REQUIRE(cas_directory_decode(buf, len, &dir, NULL) == 0);
		for (size_t i = 0; i < dir->n_directories && tail < 64; i++) {
			bool seen = false;
			for (size_t j = 0; j < tail; j++)
				seen |= cas_digest_eq(
					&queue[j], &dir->directories[i].digest);
			if (!seen)
				queue[tail++] = dir->directories[i].digest;
		}
		cas_directory_free(dir);
		if (k->corrupt && len)
			buf[0] ^= 0x80;
		r = cb(userdata, NULL, buf, len);
		free(buf);
		if (r < 0)
			return r;
	}
	return 0;
}

static void fake_free(cas_fetcher *f)
{
	(void)f; /* owned by the test */
}

static struct cas_fetcher_ops fake_ops = {
	.blob_fetch = fake_blob_fetch,
	.directories_fetch = fake_directories_fetch,
	.free = fake_free,
};
static struct cas_fetcher_ops fake_tree_ops = {
	.blob_fetch = fake_blob_fetch,
	.directories_fetch = fake_directories_fetch,
	.directory_fetch_tree = fake_fetch_tree,
	.free = fake_free,
};

static void put_blob(cas_store *s, const void *buf, size_t len, cas_digest *ret)
{
	cas_blob_writer *w;
	REQUIRE(s->ops->blob_writer_new(s, &w) == 0);
	REQUIRE(w->ops->write(w, buf, len) == 0);
	REQUIRE(w->ops->commit(w, NULL, ret, NULL) == 0);
}

static cas_store *open_cache(struct fake *k, const char *name, uint64_t max)
{
	char dir[256];
	cas_store *s;
	snprintf(dir, sizeof(dir), "%s/%s", base, name);
	struct cas_remote_options o = {.cache_dir = dir, .cache_max = max};
	REQUIRE(cas_cache_store_new(&k->base, "fake://", &o, &s) == 0);
	return s;
}

struct reader_arg {
	cas_store *s;
	cas_digest d;
	int r;
};

static void *reader(void *arg)
{
	struct reader_arg *a = arg;
	int fd;
	uint64_t size;
	a->r = a->s->ops->blob_open(a->s, &a->d, &fd, &size);
	if (a->r == 0)
		close(fd);
	return NULL;
}

static void test_cache_blobs(cas_store *origin)
{
	struct fake k = {.base.ops = &fake_ops, .origin = origin};
	pthread_mutex_init(&k.lock, NULL);
	uint8_t data[100000];
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i % 251);
	cas_digest d, absent;
	put_blob(origin, data, sizeof(data), &d);
	cas_hash_buffer("absent", 6, &absent);

	cas_store *s = open_cache(&k, "cache-blobs", 0);
	int fd;
	uint64_t size;
	/* Wrong bytes: EIO, nothing cached. */
	k.corrupt = true;
	CHECK(s->ops->blob_open(s, &d, &fd, &size) == -EIO);
	char path[512], hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&d, hex);
	snprintf(path, sizeof(path), "%s/cache-blobs/blobs/%.2s/%s", base, hex,
		 hex);
	CHECK(access(path, F_OK) < 0);
	/* Offline: EIO; back: fine. */
	k.corrupt = false;
	k.offline = true;
	CHECK(s->ops->blob_open(s, &d, &fd, &size) == -EIO);
	k.offline = false;
	/* Concurrent readers of one absent blob: one fetch. */
	k.blob_fetches = 0;
	k.delay_ms = 200;
	pthread_t t[8];
	struct reader_arg a[8];
	for (int i = 0; i < 8; i++) {
		a[i] = (struct reader_arg){s, d, -1};
		REQUIRE(pthread_create(&t[i], NULL, reader, &a[i]) == 0);
	}
	for (int i = 0; i < 8; i++) {
		pthread_join(t[i], NULL);
		CHECK(a[i].r == 0);
	}
	CHECK(k.blob_fetches == 1);
	k.delay_ms = 0;
	/* Cached: no fetch. */
	CHECK(s->ops->blob_open(s, &d, &fd, &size) == 0 &&
	      size == sizeof(data));
	uint8_t back[100000];
	CHECK(cas_pread_all(fd, back, sizeof(back), 0) == 0 &&
	      memcmp(back, data, sizeof(data)) == 0);
	close(fd);
	CHECK(k.blob_fetches == 1);
	/* Absent on the remote too. */
	CHECK(s->ops->blob_open(s, &absent, &fd, &size) == -ENOENT);
	CHECK(s->ops->blob_stat(s, &d, &size) == 0 && size == sizeof(data));
	/* Named in blobs/ once synced (by the publisher, at the latest when
	 * the store closes), and nothing staged is left in tmp/. */
	cas_store_free(s);
	CHECK(access(path, F_OK) == 0);
	snprintf(path, sizeof(path), "%s/cache-blobs/tmp", base);
	DIR *td = opendir(path);
	REQUIRE(td);
	struct dirent *de;
	while ((de = readdir(td)))
		CHECK(strncmp(de->d_name, "remote.", 7) != 0);
	closedir(td);
	/* A reopened cache serves it without a fetch. */
	k.blob_fetches = 1;
	s = open_cache(&k, "cache-blobs", 0);
	CHECK(s->ops->blob_open(s, &d, &fd, &size) == 0 &&
	      size == sizeof(data));
	close(fd);
	CHECK(k.blob_fetches == 1);
	cas_store_free(s);
	pthread_mutex_destroy(&k.lock);
}

/* Blobs of several MiB, delivered in small odd pieces, go through the
 * cache's buffering and its hashing thread: the bytes and the check must
 * come out the same as for small blobs. */
static void test_cache_large_blobs(cas_store *origin)
{
	struct fake k = {.base.ops = &fake_ops, .origin = origin};
	pthread_mutex_init(&k.lock, NULL);
	const size_t sizes[] = {(1u << 20), (1u << 20) + 1, (5u << 20) + 123,
				(3u << 20)};
	const size_t pieces[] = {16391, 1u << 20, 4096, 300000};
	cas_store *s = open_cache(&k, "cache-large", 0);
	for (size_t t = 0; t < CAS_ARRAY_SIZE(sizes); t++) {
		uint8_t *data = malloc(sizes[t]), *back = malloc(sizes[t]);
		REQUIRE(data && back);
		for (size_t i = 0; i < sizes[t]; i++)
			data[i] = (uint8_t)((i * 7 + t) % 253);
		cas_digest d;
		put_blob(origin, data, sizes[t], &d);
		k.piece = pieces[t];
		int fd;
		uint64_t size;
		/* One wrong byte in the middle is caught on this path too. */
		k.corrupt = true;
		CHECK(s->ops->blob_open(s, &d, &fd, &size) == -EIO);
		k.corrupt = false;
		CHECK(s->ops->blob_open(s, &d, &fd, &size) == 0 &&
		      size == sizes[t]);
		CHECK(cas_pread_all(fd, back, sizes[t], 0) == 0 &&
		      memcmp(back, data, sizes[t]) == 0);
		close(fd);
		free(data);
		free(back);
	}
	cas_store_free(s);
	pthread_mutex_destroy(&k.lock);
}

/* root/{a/{x}, b/{x}} with a and b the same Directory, plus a file. */
static void build_tree(cas_store *origin, cas_digest *ret_root)
{
	cas_digest fx, leaf, mid;
	put_blob(origin, "xx", 2, &fx);
	cas_node lf[] = {{.type = CAS_NODE_FILE,
			  .name = (const uint8_t *)"x",
			  .name_len = 1,
			  .digest = fx,
			  .size = 2}};
	cas_directory dl = {.files = lf, .n_files = 1};
	uint8_t *b1, *b2, *b3;
	size_t l1, l2, l3;
	REQUIRE(cas_directory_encode(&dl, &b1, &l1, NULL) == 0);
	cas_directory_digest(b1, l1, &leaf);
	cas_node md[] = {{.type = CAS_NODE_DIRECTORY,
			  .name = (const uint8_t *)"leaf",
			  .name_len = 4,
			  .digest = leaf,
			  .size = 1}};
	cas_directory dm = {.directories = md, .n_directories = 1};
	REQUIRE(cas_directory_encode(&dm, &b2, &l2, NULL) == 0);
	cas_directory_digest(b2, l2, &mid);
	cas_node rd[] = {
		{.type = CAS_NODE_DIRECTORY,
		 .name = (const uint8_t *)"a",
		 .name_len = 1,
		 .digest = mid,
		 .size = 2},
		{.type = CAS_NODE_DIRECTORY,
		 .name = (const uint8_t *)"b",
		 .name_len = 1,
		 .digest = mid,
		 .size = 2},
	};
	cas_directory dr = {.directories = rd, .n_directories = 2};
	REQUIRE(cas_directory_encode(&dr, &b3, &l3, NULL) == 0);
	cas_dir_batch *b;
	REQUIRE(origin->ops->dir_batch_new(origin, &b) == 0);
	cas_digest got;
	REQUIRE(b->ops->put(b, b1, l1, &got) == 0);
	REQUIRE(b->ops->put(b, b2, l2, &got) == 0);
	REQUIRE(b->ops->put(b, b3, l3, ret_root) == 0);
	REQUIRE(b->ops->commit(b, NULL, NULL) == 0);
	free(b1);
	free(b2);
	free(b3);
}

static void test_cache_directories(cas_store *origin, bool tree)
{
	struct fake k = {.base.ops = tree ? &fake_tree_ops : &fake_ops,
			 .origin = origin,
			 .tree = tree};
	pthread_mutex_init(&k.lock, NULL);
	cas_digest root;
	build_tree(origin, &root);
	cas_store *s = open_cache(&k, tree ? "cache-tree" : "cache-levels", 0);
	uint8_t *buf;
	size_t len;

	k.corrupt = true;
	CHECK(s->ops->directory_get_raw(s, &root, &buf, &len) == -EIO);
	CHECK(s->ops->directory_has(s, &root) < 0);
	k.corrupt = false;
	k.dir_fetches = 0;
	CHECK(s->ops->directory_get_raw(s, &root, &buf, &len) == 0);
	free(buf);
	/* Whole closure fetched (one request, or one per level), each once. */
	CHECK(k.dir_fetches == (tree ? 1u : 3u));
	cas_directory *dir;
	REQUIRE(cas_store_directory_get(s, &root, &dir) == 0);
	unsigned before = k.dir_fetches;
	cas_directory *mid;
	CHECK(cas_store_directory_get(s, &dir->directories[0].digest, &mid) ==
	      0);
	CHECK(k.dir_fetches == before);
	cas_directory_free(mid);
	cas_directory_free(dir);
	cas_digest absent;
	cas_hash_buffer("no dir", 6, &absent);
	CHECK(s->ops->directory_get_raw(s, &absent, &buf, &len) == -ENOENT);
	CHECK(s->ops->directory_has(s, &absent) == 0);
	CHECK(s->ops->directory_get_raw(s, &CAS_DIGEST_EMPTY_DIRECTORY, &buf,
					&len) == 0 &&
	      len == 0);

	/* The cache is an ordinary local store that verify accepts. */
	char dirpath[256];
	snprintf(dirpath, sizeof(dirpath), "%s/%s", base,
		 tree ? "cache-tree" : "cache-levels");
	cas_store_free(s);
	cas_store *ls;
	struct cas_local_options lo = {0};
	REQUIRE(cas_local_open(dirpath, &lo, &ls) == 0);
	CHECK(ls->ops->directory_has(ls, &root) == 1);
	cas_store_free(ls);
	pthread_mutex_destroy(&k.lock);
}

static void test_evict(cas_store *origin)
{
	struct fake k = {.base.ops = &fake_ops, .origin = origin};
	pthread_mutex_init(&k.lock, NULL);
	/* Larger than CAS_LOCAL_PACK_MAX: files (packs are evicted whole,
	 * test_cache_packs). */
	cas_digest d[6];
	static uint8_t data[70000];
	for (int i = 0; i < 6; i++) {
		memset(data, 'a' + i, sizeof(data));
		put_blob(origin, data, sizeof(data), &d[i]);
	}
	cas_store *s = open_cache(&k, "cache-evict", 175000);
	int held = -1, fd;
	uint64_t size;
	/* The first stays open: it is never evicted. */
	REQUIRE(s->ops->blob_open(s, &d[0], &held, &size) == 0);
	for (int i = 1; i < 6; i++) {
		REQUIRE(s->ops->blob_open(s, &d[i], &fd, &size) == 0);
		close(fd);
		usleep(20000); /* distinct access times */
	}
	char dir[256];
	snprintf(dir, sizeof(dir), "%s/cache-evict", base);
	/* Fetched blobs are named (and the cache trimmed) in the background. */
	cas_cache_flush(s);
	int64_t bytes = cas_local_blob_bytes(cas_cache_local_store(s));
	CHECK(bytes > 0 && bytes <= 175000);
	char path[512], hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&d[0], hex);
	snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", dir, hex, hex);
	CHECK(access(path, F_OK) == 0); /* held open */
	cas_digest_to_hex(&d[5], hex);
	snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", dir, hex, hex);
	CHECK(access(path, F_OK) == 0); /* most recent */
	cas_digest_to_hex(&d[1], hex);
	snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", dir, hex, hex);
	CHECK(access(path, F_OK) < 0); /* least recent */
	close(held);
	/* Evicted blobs come back on demand. */
	CHECK(s->ops->blob_open(s, &d[1], &fd, &size) == 0);
	close(fd);
	CHECK(cas_local_evict(cas_cache_local_store(s), 0) >= 0);
	CHECK(cas_local_blob_bytes(cas_cache_local_store(s)) == 0);
	cas_store_free(s);
	pthread_mutex_destroy(&k.lock);
}

static void test_grpc_blobs_fetch(void);
static void test_http_blobs_fetch(void);

/* Small blobs in the cache's pack ------------------------------------ */

static int fake_blobs_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
			    size_t max, cas_fetch_blob_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	pthread_mutex_lock(&k->lock);
	k->batches++;
	k->blob_fetches += (unsigned)n;
	bool corrupt = k->corrupt_batch;
	pthread_mutex_unlock(&k->lock);
	for (size_t i = 0; i < n; i++) {
		uint8_t *buf = NULL;
		uint64_t size = 0;
		int r = k->offline ? -EIO
				   : cas_store_blob_read(k->origin, &ds[i], max,
							 &buf, &size);
		if (r == 0 && corrupt && size)
			buf[size - 1] ^= 1;
		cb(userdata, i, r, buf, (size_t)size);
		free(buf);
	}
	return 0;
}

static struct cas_fetcher_ops fake_batch_ops = {
	.blob_fetch = fake_blob_fetch,
	.blobs_fetch = fake_blobs_fetch,
	.directories_fetch = fake_directories_fetch,
	.directory_fetch_tree = fake_fetch_tree,
	.free = fake_free,
};

static unsigned count_entries(const char *dir, const char *suffix)
{
	DIR *d = opendir(dir);
	unsigned n = 0;
	if (!d)
		return 0;
	struct dirent *de;
	while ((de = readdir(d))) {
		size_t l = strlen(de->d_name), sl = strlen(suffix);
		n += de->d_name[0] != '.' && l >= sl &&
		     strcmp(de->d_name + l - sl, suffix) == 0;
	}
	closedir(d);
	return n;
}

static void blob_file_path(const char *cache, const cas_digest *d, char *buf,
			   size_t size)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	snprintf(buf, size, "%s/%s/blobs/%.2s/%s", base, cache, hex, hex);
}

static void wait_fetches(struct fake *k, unsigned n)
{
	for (int i = 0; i < 6000; i++) {
		pthread_mutex_lock(&k->lock);
		unsigned got = k->blob_fetches;
		pthread_mutex_unlock(&k->lock);
		if (got >= n)
			return;
		usleep(10000);
	}
}

/* An unbounded cache packs the small blobs it fetches: readable at once
 * (from memory), in its pack and in no file once flushed, kept across a
 * reopen; wrong bytes are never packed; a bounded cache keeps files. */
static void test_cache_packs(cas_store *origin)
{
	struct fake k = {.base.ops = &fake_ops, .origin = origin};
	pthread_mutex_init(&k.lock, NULL);
	uint8_t data[1000];
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i * 13 % 256);
	cas_digest d;
	put_blob(origin, data, sizeof(data), &d);
	char path[512], packs[512];

	cas_store *s = open_cache(&k, "cache-packs", 0);
	uint8_t *buf = NULL;
	uint64_t size = 0;
	int fd;
	k.corrupt = true;
	CHECK(cas_store_blob_read(s, &d, 4096, &buf, &size) == -EIO);
	k.corrupt = false;
	CHECK(cas_store_blob_read(s, &d, 999, &buf, &size) == -EFBIG);
	CHECK(cas_store_blob_read(s, &d, 4096, &buf, &size) == 0 &&
	      size == sizeof(data) && memcmp(buf, data, size) == 0);
	free(buf);
	unsigned fetches = k.blob_fetches;
	/* From memory until packed: an fd too, and the size. */
	CHECK(s->ops->blob_open(s, &d, &fd, &size) == 0 &&
	      size == sizeof(data));
	uint8_t back[1000];
	CHECK(cas_pread_all(fd, back, sizeof(back), 0) == 0 &&
	      memcmp(back, data, sizeof(data)) == 0);
	close(fd);
	CHECK(s->ops->blob_stat(s, &d, &size) == 0 && size == sizeof(data));
	cas_cache_flush(s);
	uint64_t off = 0;
	CHECK(s->ops->blob_locate(s, &d, &fd, &off, &size) == 0 &&
	      size == sizeof(data));
	CHECK(cas_pread_all(fd, back, sizeof(back), off) == 0 &&
	      memcmp(back, data, sizeof(data)) == 0);
	CHECK(k.blob_fetches == fetches);
	blob_file_path("cache-packs", &d, path, sizeof(path));
	CHECK(access(path, F_OK) < 0);
	snprintf(packs, sizeof(packs), "%s/cache-packs/packs", base);
	CHECK(count_entries(packs, ".pack") == 1);
	cas_store_free(s);
	/* Reopened: no fetch; the cache is a store verify accepts. */
	s = open_cache(&k, "cache-packs", 0);
	CHECK(cas_store_blob_read(s, &d, 4096, &buf, &size) == 0 &&
	      size == sizeof(data) && memcmp(buf, data, size) == 0);
	free(buf);
	CHECK(k.blob_fetches == fetches);
	cas_store_free(s);
	cas_store *ls;
	struct cas_local_options lo = {0};
	snprintf(path, sizeof(path), "%s/cache-packs", base);
	REQUIRE(cas_local_open(path, &lo, &ls) == 0);
	CHECK(cas_local_verify(ls, NULL, NULL) == 0);
	cas_store_free(ls);

	/* Bounded: packed too; eviction drops the pack whole once no writer
	 * appends to it. */
	s = open_cache(&k, "cache-packs-bounded", 1u << 30);
	CHECK(cas_store_blob_read(s, &d, 4096, &buf, &size) == 0 &&
	      size == sizeof(data) && memcmp(buf, data, size) == 0);
	free(buf);
	cas_cache_flush(s);
	blob_file_path("cache-packs-bounded", &d, path, sizeof(path));
	CHECK(access(path, F_OK) < 0);
	snprintf(packs, sizeof(packs), "%s/cache-packs-bounded/packs", base);
	CHECK(count_entries(packs, ".pack") == 1);
	CHECK(cas_local_evict(cas_cache_local_store(s), 0) > 0); /* its own */
	cas_store_free(s);
	snprintf(path, sizeof(path), "%s/cache-packs-bounded", base);
	REQUIRE(cas_local_open(path, &lo, &ls) == 0);
	CHECK(cas_local_evict(ls, 0) == 0);
	CHECK(count_entries(packs, ".pack") == 0);
	CHECK(cas_local_verify(ls, NULL, NULL) == 0);
	cas_store_free(ls);
	pthread_mutex_destroy(&k.lock);
}

/* Prefetch through blobs_fetch: reading a Directory fetches, in batches,
 * the small blobs of the Directories below it too, and every one of them
 * is then read without a fetch; a corrupt blob among them is not cached
 * and its reader gets EIO. */
static void test_cache_prefetch_batches(cas_store *origin)
{
	enum { N = 300 };
	struct fake k = {.base.ops = &fake_batch_ops, .origin = origin};
	pthread_mutex_init(&k.lock, NULL);
	cas_node files[N];
	char names[N][8];
	for (int i = 0; i < N; i++) {
		char content[64];
		int len =
			snprintf(content, sizeof(content), "prefetched %d", i);
		snprintf(names[i], sizeof(names[i]), "f%03d", i);
		files[i] = (cas_node){.type = CAS_NODE_FILE,
				      .name = (const uint8_t *)names[i],
				      .name_len = 4,
				      .size = (uint64_t)len};
		put_blob(origin, content, (size_t)len, &files[i].digest);
	}
	cas_directory sub = {.files = files, .n_files = N};
	uint8_t *b1, *b2;
	size_t l1, l2;
	cas_digest sub_d, root_d;
	REQUIRE(cas_directory_encode(&sub, &b1, &l1, NULL) == 0);
	cas_directory_digest(b1, l1, &sub_d);
	cas_node rd[] = {{.type = CAS_NODE_DIRECTORY,
			  .name = (const uint8_t *)"sub",
			  .name_len = 3,
			  .digest = sub_d,
			  .size = N}};
	cas_directory root = {.directories = rd, .n_directories = 1};
	REQUIRE(cas_directory_encode(&root, &b2, &l2, NULL) == 0);
	cas_dir_batch *b;
	REQUIRE(origin->ops->dir_batch_new(origin, &b) == 0);
	REQUIRE(b->ops->put(b, b1, l1, &sub_d) == 0);
	REQUIRE(b->ops->put(b, b2, l2, &root_d) == 0);
	REQUIRE(b->ops->commit(b, NULL, NULL) == 0);
	free(b1);
	free(b2);

	cas_store *s = open_cache(&k, "cache-prefetch", 0);
	uint8_t *buf = NULL;
	size_t len = 0;
	/* Only the root is read: the blobs below it come anyway. */
	REQUIRE(s->ops->directory_get_raw(s, &root_d, &buf, &len) == 0);
	free(buf);
	wait_fetches(&k, N);
	cas_cache_flush(s);
	CHECK(k.blob_fetches == N);
	CHECK(k.batches >= 1 && k.batches < N / 2);
	for (int i = 0; i < N; i++) {
		uint8_t *data = NULL;
		uint64_t size = 0;
		char want[64];
		int wl = snprintf(want, sizeof(want), "prefetched %d", i);
		CHECK(cas_store_blob_read(s, &files[i].digest, 4096, &data,
					  &size) == 0 &&
		      size == (uint64_t)wl && memcmp(data, want, size) == 0);
		free(data);
	}
	CHECK(k.blob_fetches == N);
	cas_store_free(s);

	int fd_unused;
	uint64_t size;
	/* Corrupt batches: nothing cached (and prefetch pauses: the remote
	 * fails); a reader fetches for itself and gets the right bytes. */
	k.corrupt_batch = true;
	k.blob_fetches = 0;
	s = open_cache(&k, "cache-prefetch-bad", 0);
	REQUIRE(s->ops->directory_get_raw(s, &sub_d, &buf, &len) == 0);
	free(buf);
	wait_fetches(&k, 1);
	uint8_t *data = NULL;
	CHECK(cas_store_blob_read(s, &files[7].digest, 4096, &data, &size) ==
		      0 &&
	      size == files[7].size && memcmp(data, "prefetched 7", 12) == 0);
	free(data);
	cas_cache_flush(s);
	for (int i = 0; i < N; i++) {
		uint64_t off;
		int r = s->ops->blob_locate(s, &files[i].digest, &fd_unused,
					    &off, &size);
		CHECK(i == 7 ? r == 0 : r == -ENOENT); /* 7: fetched right */
	}
	cas_store_free(s); /* joins the prefetch threads */
	k.corrupt_batch = false;
	pthread_mutex_destroy(&k.lock);
}

/* Pack ranges (the published layout's packs) ------------------------- */

/* Builds the pack of Directory ds[i].pack from the origin, as publish
 * does (remote_i.h), and hands out the range asked for. */
static int fake_ranges_fetch(cas_fetcher *f, const struct cas_fetch_range *v,
			     size_t n, cas_fetch_blob_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	pthread_mutex_lock(&k->lock);
	k->ranges += (unsigned)n;
	bool absent = k->packs_absent, corrupt = k->corrupt_packs;
	pthread_mutex_unlock(&k->lock);
	for (size_t i = 0; i < n; i++) {
		cas_directory *dir = NULL;
		uint64_t off[512], len = 0;
		if (absent ||
		    cas_store_directory_get(k->origin, &v[i].pack, &dir) < 0) {
			cb(userdata, i, -ENOENT, NULL, 0);
			continue;
		}
		REQUIRE(dir->n_files <= 512);
		REQUIRE(cas_layout_pack_offsets(dir, off, &len) >= 2);
		uint8_t *pack = malloc(len);
		REQUIRE(pack);
		for (size_t j = 0; j < dir->n_files; j++) {
			uint8_t *buf = NULL;
			uint64_t size = 0;
			if (off[j] == UINT64_MAX)
				continue;
			REQUIRE(cas_store_blob_read(k->origin,
						    &dir->files[j].digest,
						    65536, &buf, &size) == 0);
			memcpy(pack + off[j], buf, size);
			if (corrupt)
				pack[off[j]] ^= 1;
			free(buf);
		}
		REQUIRE(v[i].off + v[i].len <= len);
		cb(userdata, i, 0, pack + v[i].off, (size_t)v[i].len);
		free(pack);
		cas_directory_free(dir);
	}
	return 0;
}

static struct cas_fetcher_ops fake_range_ops = {
	.blob_fetch = fake_blob_fetch,
	.blobs_fetch = fake_blobs_fetch,
	.ranges_fetch = fake_ranges_fetch,
	.directories_fetch = fake_directories_fetch,
	.free = fake_free,
};

/* Reading a Directory prefetches its small files as ranges of its pack
 * (a blob the cache has is a gap, not a split), a 200 KiB one in a batch
 * to a file (the one over 1 MiB goes alone: test_cache_prefetch_large);
 * a corrupt or absent pack costs blob fetches, never a wrong byte. */
static void test_cache_prefetch_ranges(cas_store *origin)
{
	enum { N = 200 };
	static char names[N + 2][8];
	cas_node files[N + 2];
	for (int i = 0; i < N + 2; i++) {
		size_t len = i < N    ? 100 + (size_t)i
			     : i == N ? 200000
				      : 1100000;
		uint8_t *data = malloc(len);
		REQUIRE(data);
		for (size_t j = 0; j < len; j++)
			data[j] = (uint8_t)(j * 7 + (size_t)i);
		snprintf(names[i], sizeof(names[i]), "r%03d", i);
		files[i] = (cas_node){.type = CAS_NODE_FILE,
				      .name = (const uint8_t *)names[i],
				      .name_len = 4,
				      .size = len};
		put_blob(origin, data, len, &files[i].digest);
		free(data);
	}
	cas_directory dir = {.files = files, .n_files = N + 2};
	uint8_t *raw;
	size_t raw_len;
	cas_digest d;
	REQUIRE(cas_directory_encode(&dir, &raw, &raw_len, NULL) == 0);
	REQUIRE(cas_store_directory_put(origin, raw, raw_len, &d) == 0);

	for (int round = 0; round < 3; round++) {
		struct fake k = {.base.ops = &fake_range_ops, .origin = origin};
		pthread_mutex_init(&k.lock, NULL);
		k.corrupt_packs = round == 1;
		k.packs_absent = round == 2;
		char name[64];
		snprintf(name, sizeof(name), "cache-ranges-%d", round);
		cas_store *s = open_cache(&k, name, 0);
		uint8_t *buf = NULL;
		uint64_t size;
		/* One blob in the middle first: a gap in the ranges. */
		CHECK(cas_store_blob_read(s, &files[N / 2].digest, 65536, &buf,
					  &size) == 0 &&
		      size == files[N / 2].size);
		free(buf);
		CHECK(k.blob_fetches == 1);
		size_t len;
		REQUIRE(s->ops->directory_get_raw(s, &d, &buf, &len) == 0);
		free(buf);
		/* Wait until the small blobs are in the pack and the 200 KiB
		 * one in its file (looking without fetching). */
		char path[512];
		blob_file_path(name, &files[N].digest, path, sizeof(path));
		for (int i = 0; i < 6000; i++) {
			int have = access(path, F_OK) == 0;
			cas_cache_flush(s);
			for (int j = 0; j < N; j++) {
				int fd;
				uint64_t off, sz;
				have += s->ops->blob_locate(s, &files[j].digest,
							    &fd, &off,
							    &sz) == 0;
			}
			if (have == N + 1)
				break;
			usleep(10000);
		}
		pthread_mutex_lock(&k.lock);
		unsigned fetches = k.blob_fetches - k.large_fetches,
			 ranges = k.ranges;
		pthread_mutex_unlock(&k.lock);
		if (round == 0) {
			/* The first read and the 200 KiB file alone; the rest
			 * (a gap in the middle) in ranges, one per batch. */
			CHECK(fetches >= 2 && fetches < 10);
			CHECK(ranges >= 1 && ranges < 10);
		} else if (round == 1) {
			CHECK(fetches == N + 1);
		} else {
			CHECK(fetches == N + 1);
			CHECK(ranges <= 2); /* stops asking after a 404 */
		}
		for (int i = 0; i < N + 2; i++) {
			uint8_t *data = NULL;
			CHECK(cas_store_blob_read(s, &files[i].digest, 2000000,
						  &data, &size) == 0 &&
			      size == files[i].size);
			for (size_t j = 0; data && j < size; j++)
				if (data[j] != (uint8_t)(j * 7 + (size_t)i)) {
					CHECK(!"wrong byte");
					break;
				}
			free(data);
		}
		CHECK(access(path, F_OK) == 0);
		cas_store_free(s);
		cas_store *ls;
		struct cas_local_options lo = {0};
		snprintf(path, sizeof(path), "%s/%s", base, name);
		REQUIRE(cas_local_open(path, &lo, &ls) == 0);
		CHECK(cas_local_verify(ls, NULL, NULL) == 0);
		cas_store_free(ls);
		pthread_mutex_destroy(&k.lock);
	}
	free(raw);
}

/* Blobs over 1 MiB are prefetched one at a time, streamed to files: none
 * before a reader reads a blob (a Directory read alone, as ls, fetches
 * none); then as far as the bytes read allow plus 64 MiB, so the walk
 * waits at a 70 MiB blob until that one is read, and goes on after it. */
static uint8_t large_byte(size_t i, size_t j)
{
	return (uint8_t)(j * 31 + i + (j >> 12));
}

static unsigned large_count(struct fake *k)
{
	pthread_mutex_lock(&k->lock);
	unsigned n = k->large_fetches;
	pthread_mutex_unlock(&k->lock);
	return n;
}

static bool large_wait(struct fake *k, unsigned n)
{
	for (int i = 0; i < 6000 && large_count(k) < n; i++)
		usleep(10000);
	return large_count(k) == n;
}

static void large_check(cas_store *s, const cas_node *f, size_t i)
{
	int fd;
	uint64_t size;
	REQUIRE(s->ops->blob_open(s, &f->digest, &fd, &size) == 0);
	CHECK(size == f->size);
	uint8_t *data = malloc(size);
	REQUIRE(data && cas_pread_all(fd, data, size, 0) == 0);
	for (size_t j = 0; j < size; j++)
		if (data[j] != large_byte(i, j)) {
			CHECK(!"wrong byte");
			break;
		}
	free(data);
	close(fd);
}

/* Puts n blobs (large_byte(i + seed, j)) and the Directory of files
 * that names them (names sorted) into origin. */
static void put_files_dir(cas_store *origin, const char *const *names,
			  const size_t *sizes, size_t n, size_t seed,
			  cas_node *files, cas_digest *ret)
{
	for (size_t i = 0; i < n; i++) {
		uint8_t *data = malloc(sizes[i] ? sizes[i] : 1);
		REQUIRE(data);
		for (size_t j = 0; j < sizes[i]; j++)
			data[j] = large_byte(i + seed, j);
		files[i] = (cas_node){.type = CAS_NODE_FILE,
				      .name = (const uint8_t *)names[i],
				      .name_len = strlen(names[i]),
				      .size = sizes[i]};
		put_blob(origin, data, sizes[i], &files[i].digest);
		free(data);
	}
	cas_directory dir = {.files = files, .n_files = n};
	uint8_t *raw;
	size_t raw_len;
	REQUIRE(cas_directory_encode(&dir, &raw, &raw_len, NULL) == 0);
	REQUIRE(cas_store_directory_put(origin, raw, raw_len, ret) == 0);
	free(raw);
}

/* A cache named name over fake k (made here, batching), in which a
 * reader has read Directory d: the prefetch walk starts there. */
static cas_store *cache_read_dir(struct fake *k, cas_store *origin,
				 const char *name, const cas_digest *d)
{
	*k = (struct fake){.base.ops = &fake_batch_ops, .origin = origin};
	pthread_mutex_init(&k->lock, NULL);
	cas_store *s = open_cache(k, name, 0);
	uint8_t *buf = NULL;
	size_t len;
	REQUIRE(s->ops->directory_get_raw(s, d, &buf, &len) == 0);
	free(buf);
	return s;
}

static void test_cache_prefetch_large(cas_store *origin)
{
	/* Sorted by name: small a*, then b0 b1 (prefetched at once), c
	 * (70 MiB: more than the head start), d (after c). */
	static const char *const names[] = {"a0", "a1", "a2", "b0",
					    "b1", "c",	"d"};
	static const size_t sizes[] = {
		100, 200, 300, 1536u << 10, 2u << 20, 70u << 20, 1200u << 10};
	enum { N = 7 };
	cas_node files[N];
	cas_digest d;
	put_files_dir(origin, names, sizes, N, 0, files, &d);

	struct fake k;
	cas_store *s = cache_read_dir(&k, origin, "cache-large-prefetch", &d);
	uint8_t *buf = NULL;
	wait_fetches(&k, 3); /* the small ones */
	usleep(300000);
	CHECK(large_count(&k) == 0);

	uint64_t size;
	CHECK(cas_store_blob_read(s, &files[0].digest, 4096, &buf, &size) ==
		      0 &&
	      size == 100);
	free(buf);
	CHECK(large_wait(&k, 2)); /* b0, b1 */
	usleep(300000);
	CHECK(large_count(&k) == 2); /* not c, nor d behind it */
	large_check(s, &files[3], 3);
	large_check(s, &files[4], 4);
	CHECK(large_count(&k) == 2);  /* read from the cache */
	large_check(s, &files[5], 5); /* the reader fetches c */
	CHECK(large_wait(&k, 4));     /* and d comes by itself */
	large_check(s, &files[6], 6);
	CHECK(large_count(&k) == 4);
	cas_store_free(s);
	pthread_mutex_destroy(&k.lock);
}

/* A large blob the walk cannot start yet (nothing read so far) does not
 * hold back the small ones behind it; and with no small blob wanted at
 * all, a read still gets the large ones going. */
static void test_cache_prefetch_past_large(cas_store *origin)
{
	enum { NS = 40 };
	static char small_names[NS][8];
	const char *names[NS + 1] = {"a-big"};
	size_t sizes[NS + 1] = {2u << 20};
	for (int i = 0; i < NS; i++) {
		snprintf(small_names[i], sizeof(small_names[i]), "s%02d", i);
		names[i + 1] = small_names[i];
		sizes[i + 1] = 100 + (size_t)i;
	}
	cas_node files[NS + 1];
	cas_digest d;
	put_files_dir(origin, names, sizes, NS + 1, 100, files, &d);

	struct fake k;
	cas_store *s = cache_read_dir(&k, origin, "cache-past-large", &d);
	wait_fetches(&k, NS);
	pthread_mutex_lock(&k.lock);
	CHECK(k.blob_fetches == NS && k.batches >= 1 && k.large_fetches == 0);
	pthread_mutex_unlock(&k.lock);
	cas_store_free(s);
	pthread_mutex_destroy(&k.lock);

	static const char *const lnames[] = {"l0", "l1", "l2", "l3"};
	static const size_t lsizes[] = {2u << 20, 2u << 20, 2u << 20, 2u << 20};
	put_files_dir(origin, lnames, lsizes, 4, 200, files, &d);
	struct fake k2;
	s = cache_read_dir(&k2, origin, "cache-only-large", &d);
	int fd;
	uint64_t size;
	REQUIRE(s->ops->blob_open(s, &files[0].digest, &fd, &size) == 0);
	close(fd);
	CHECK(large_wait(&k2, 4)); /* l0 by the reader, l1-l3 by themselves */
	for (int i = 1; i < 4; i++) {
		REQUIRE(s->ops->blob_open(s, &files[i].digest, &fd, &size) ==
			0);
		close(fd);
	}
	CHECK(large_count(&k2) == 4);
	cas_store_free(s);
	pthread_mutex_destroy(&k2.lock);
}

/* Closing the cache aborts a large prefetch in flight (at its next
 * buffer) rather than waiting for the whole blob, which over a slow link
 * would hold the process: nothing of it is kept, and verify finds
 * nothing else wrong with the cache. */
/* verify's problems: counted; whether one names want (a hex digest). */
struct problems {
	const char *want;
	unsigned n;
	bool named;
};

static void note_problem(void *userdata, const char *problem)
{
	struct problems *p = userdata;
	p->n++;
	p->named |= strstr(problem, p->want) != NULL &&
		    strstr(problem, "is missing") != NULL;
}

static void test_cache_close_cancels(cas_store *origin)
{
	static const char *const names[] = {"a", "b"};
	static const size_t sizes[] = {100, 8u << 20};
	cas_node files[2];
	cas_digest d;
	put_files_dir(origin, names, sizes, 2, 40, files, &d);

	struct fake k = {.base.ops = &fake_batch_ops,
			 .origin = origin,
			 .piece = 64u << 10,
			 .piece_delay_ms = 50}; /* 8 MiB: 128 pieces, 6.4 s */
	pthread_mutex_init(&k.lock, NULL);
	cas_store *s = open_cache(&k, "cache-close", 0);
	uint8_t *buf = NULL;
	size_t len;
	uint64_t size;
	REQUIRE(s->ops->directory_get_raw(s, &d, &buf, &len) == 0);
	free(buf);
	CHECK(cas_store_blob_read(s, &files[0].digest, 4096, &buf, &size) ==
		      0 &&
	      size == 100);
	free(buf);
	CHECK(large_wait(&k, 1)); /* b is on its way */
	cas_store_free(s);
	CHECK(k.refused);
	CHECK(k.pieces < 128);

	char path[512];
	snprintf(path, sizeof(path), "%s/cache-close", base);
	cas_store *ls;
	struct cas_local_options lo = {0};
	REQUIRE(cas_local_open(path, &lo, &ls) == 0);
	CHECK(ls->ops->blob_stat(ls, &files[1].digest, &size) == -ENOENT);
	CHECK(ls->ops->blob_stat(ls, &files[0].digest, &size) == 0);
	/* A cache holds what was read: b is absent, and nothing is wrong
	 * (the store knows it is a cache: verify does not count it). */
	CHECK(cas_local_is_cache(ls));
	char bhex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&files[1].digest, bhex);
	struct problems p = {.want = bhex};
	CHECK(cas_local_verify(ls, note_problem, &p) == 0);
	CHECK(p.n == 0);
	cas_store_free(ls);
	pthread_mutex_destroy(&k.lock);
}

int main(void)
{
	cas_log_set_level(CAS_LOG_ERROR + 0);
	REQUIRE(mkdtemp(base));
	test_reader();
	test_reader_bytes();
	test_messages();
	test_roots_file();
	test_dmap();
	char origin_dir[256];
	snprintf(origin_dir, sizeof(origin_dir), "%s/origin", base);
	struct cas_local_options lo = {.create = true};
	cas_store *origin;
	REQUIRE(cas_local_open(origin_dir, &lo, &origin) == 0);
	test_cache_blobs(origin);
	test_cache_large_blobs(origin);
	test_cache_directories(origin, false);
	test_cache_directories(origin, true);
	test_evict(origin);
	test_cache_packs(origin);
	test_cache_prefetch_batches(origin);
	test_cache_prefetch_ranges(origin);
	test_cache_prefetch_large(origin);
	test_cache_prefetch_past_large(origin);
	test_cache_close_cancels(origin);
	cas_store_free(origin);
	test_grpc_blobs_fetch();
	test_http_blobs_fetch();
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", base);
	return check_exit("test_remote");
}

/* blobs_fetch over gRPC (cas_grpc_serve in this process) and HTTP
 * (python3's http.server on a layout written here) ----------------------- */

static const size_t batch_sizes[] = {0,	     1,	 4096, 65536, 65537,
				     300000, 17, 1000, 32768, 65535};
enum {
	BATCH_N_SIZES = CAS_ARRAY_SIZE(batch_sizes),
	BATCH_N_ABSENT = 3,
	BATCH_N = 300,
	BATCH_MAX = 65536,
};

/* Every size (one above max), absences and duplicates, interleaved. */
struct batch_fixture {
	uint8_t *blobs[BATCH_N_SIZES];
	cas_digest present[BATCH_N_SIZES], absent[BATCH_N_ABSENT];
	cas_digest ds[BATCH_N];
	int want_r[BATCH_N];
	const uint8_t *want_buf[BATCH_N];
	size_t want_len[BATCH_N];
	unsigned calls[BATCH_N];
	size_t bad; /* results that differ from want */
};

static void batch_fixture_init(struct batch_fixture *x, cas_store *store)
{
	memset(x, 0, sizeof(*x));
	for (size_t k = 0; k < BATCH_N_SIZES; k++) {
		x->blobs[k] = malloc(batch_sizes[k] + 1);
		REQUIRE(x->blobs[k]);
		for (size_t j = 0; j < batch_sizes[k]; j++)
			x->blobs[k][j] = (uint8_t)(j * 31 + k * 7 + (j >> 9));
		put_blob(store, x->blobs[k], batch_sizes[k], &x->present[k]);
	}
	for (size_t k = 0; k < BATCH_N_ABSENT; k++) {
		char s[16];
		snprintf(s, sizeof(s), "absent %zu", k);
		cas_hash_buffer(s, strlen(s), &x->absent[k]);
	}
	for (size_t i = 0; i < BATCH_N; i++) {
		size_t k = (i * 7) % (BATCH_N_SIZES + BATCH_N_ABSENT);
		if (k < BATCH_N_SIZES) {
			x->ds[i] = x->present[k];
			x->want_r[i] = batch_sizes[k] > BATCH_MAX ? -EFBIG : 0;
			x->want_buf[i] = x->blobs[k];
			x->want_len[i] = batch_sizes[k];
		} else {
			x->ds[i] = x->absent[k - BATCH_N_SIZES];
			x->want_r[i] = -ENOENT;
		}
	}
}

static void batch_fixture_release(struct batch_fixture *x)
{
	for (size_t k = 0; k < BATCH_N_SIZES; k++)
		free(x->blobs[k]);
}

static void batch_cb(void *userdata, size_t i, int r, const uint8_t *buf,
		     size_t len)
{
	struct batch_fixture *x = userdata;
	REQUIRE(i < BATCH_N);
	x->calls[i]++;
	if (r != x->want_r[i]) {
		fprintf(stderr, "blobs_fetch[%zu]: %d, expected %d\n", i, r,
			x->want_r[i]);
		x->bad++;
	} else if (r == 0 && (len != x->want_len[i] ||
			      (len && memcmp(buf, x->want_buf[i], len) != 0))) {
		fprintf(stderr, "blobs_fetch[%zu]: wrong bytes (%zu)\n", i,
			len);
		x->bad++;
	}
}

/* One batch of the first n; every index answered once, as expected. */
static void batch_check(cas_fetcher *f, struct batch_fixture *x, size_t n,
			int want)
{
	memset(x->calls, 0, sizeof(x->calls));
	x->bad = 0;
	CHECK(f->ops->blobs_fetch(f, x->ds, n, BATCH_MAX, batch_cb, x) == want);
	CHECK(x->bad == 0);
	for (size_t i = 0; i < BATCH_N; i++)
		CHECK(x->calls[i] == (i < n));
}

/* Batches of all, again (on kept connections), of one and of none. */
static void batch_check_all(cas_fetcher *f, struct batch_fixture *x)
{
	REQUIRE(f->ops->blobs_fetch);
	batch_check(f, x, BATCH_N, 0);
	batch_check(f, x, BATCH_N, 0);
	batch_check(f, x, 1, 0);
	batch_check(f, x, 0, 0);
}

/* The server gone: -EIO for every index, and for the call. */
static void batch_check_gone(cas_fetcher *f, struct batch_fixture *x)
{
	for (size_t i = 0; i < BATCH_N; i++)
		x->want_r[i] = -EIO;
	batch_check(f, x, BATCH_N, -EIO);
}

static int count_sink(void *userdata, const void *buf, size_t len)
{
	*(size_t *)userdata += len;
	return 0;
}

struct serve_arg {
	cas_store *store;
	char listen[300];
	volatile sig_atomic_t stop;
	volatile int ready;
	int r;
};

static void serve_ready(void *userdata, const char *address)
{
	struct serve_arg *a = userdata;
	__atomic_store_n(&a->ready, 1, __ATOMIC_RELEASE);
}

static void *serve_main(void *arg)
{
	struct serve_arg *a = arg;
	a->r = cas_grpc_serve(a->store, a->listen, NULL, &a->stop, serve_ready,
			      a);
	/* also when listening failed */
	__atomic_store_n(&a->ready, 1, __ATOMIC_RELEASE);
	return NULL;
}

static void test_grpc_blobs_fetch(void)
{
	static struct batch_fixture x;
	struct serve_arg a = {0};
	char dir[256], url[300];
	cas_store *store;
	cas_fetcher *f;
	pthread_t t;

	snprintf(dir, sizeof(dir), "%s/grpc-origin", base);
	struct cas_local_options lo = {.create = true};
	REQUIRE(cas_local_open(dir, &lo, &store) == 0);
	batch_fixture_init(&x, store);
	a.store = store;
	snprintf(a.listen, sizeof(a.listen), "unix:%s/grpc.sock", base);
	REQUIRE(pthread_create(&t, NULL, serve_main, &a) == 0);
	while (!__atomic_load_n(&a.ready, __ATOMIC_ACQUIRE))
		usleep(1000);
	REQUIRE(a.r == 0);
	snprintf(url, sizeof(url), "grpc+unix://%s/grpc.sock", base);
	REQUIRE(cas_grpc_fetcher_new(url, &f) == 0);
	batch_check_all(f, &x);
	/* A plain call still works on a connection a batch used. */
	size_t got = 0;
	CHECK(f->ops->blob_fetch(f, &x.present[3], CAS_FETCH_UNSIZED,
				 count_sink, &got) == 0);
	CHECK(got == batch_sizes[3]);

	/* A server restarted: the pooled connection is dead, a batch still
	 * gets every blob. */
	__atomic_store_n(&a.stop, 1, __ATOMIC_RELAXED);
	pthread_join(t, NULL);
	a.stop = 0;
	a.ready = 0;
	REQUIRE(pthread_create(&t, NULL, serve_main, &a) == 0);
	while (!__atomic_load_n(&a.ready, __ATOMIC_ACQUIRE))
		usleep(1000);
	REQUIRE(a.r == 0);
	batch_check(f, &x, BATCH_N, 0);

	__atomic_store_n(&a.stop, 1, __ATOMIC_RELAXED);
	pthread_join(t, NULL);
	batch_check_gone(f, &x);
	f->ops->free(f);
	cas_store_free(store);
	batch_fixture_release(&x);
}

/* A free TCP port of 127.0.0.1 (free a moment ago). */
static int free_port(void)
{
	struct sockaddr_in sa = {.sin_family = AF_INET,
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	REQUIRE(fd >= 0);
	REQUIRE(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	REQUIRE(getsockname(fd, (struct sockaddr *)&sa, &sl) == 0);
	close(fd);
	return ntohs(sa.sin_port);
}

static bool port_open(int port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET,
				 .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	REQUIRE(fd >= 0);
	bool ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

static void test_http_blobs_fetch(void)
{
	static struct batch_fixture x;
	char dir[256], path[512], url[64], port_s[16];
	cas_store *store;
	cas_fetcher *f;

	if (access("/usr/bin/python3", X_OK) != 0) {
		fprintf(stderr, "test_http_blobs_fetch: skipped, no python3\n");
		return;
	}
	snprintf(dir, sizeof(dir), "%s/http-origin", base);
	struct cas_local_options lo = {.create = true};
	REQUIRE(cas_local_open(dir, &lo, &store) == 0);
	batch_fixture_init(&x, store);
	/* The published layout of those blobs (docs/remote.md). */
	snprintf(dir, sizeof(dir), "%s/http-layout", base);
	REQUIRE(mkdir(dir, 0755) == 0);
	snprintf(path, sizeof(path), "%s/blobs", dir);
	REQUIRE(mkdir(path, 0755) == 0);
	for (size_t k = 0; k < BATCH_N_SIZES; k++) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(&x.present[k], hex);
		snprintf(path, sizeof(path), "%s/blobs/%.2s", dir, hex);
		REQUIRE(mkdir(path, 0755) == 0 || errno == EEXIST);
		snprintf(path, sizeof(path), "%s/blobs/%.2s/%s", dir, hex, hex);
		FILE *fp = fopen(path, "wb");
		REQUIRE(fp);
		REQUIRE(fwrite(x.blobs[k], 1, batch_sizes[k], fp) ==
			batch_sizes[k]);
		REQUIRE(fclose(fp) == 0);
	}

	int port = free_port();
	snprintf(port_s, sizeof(port_s), "%d", port);
	pid_t pid = fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		dup2(null, 1);
		dup2(null, 2);
		execl("/usr/bin/python3", "python3", "-m", "http.server",
		      "--bind", "127.0.0.1", "--directory", dir, port_s,
		      (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 1000 && !port_open(port); i++)
		usleep(10000);
	CHECK(port_open(port));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/", port);
	REQUIRE(cas_http_fetcher_new(url, &f) == 0);
	batch_check_all(f, &x);

	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	batch_check_gone(f, &x);
	f->ops->free(f);
	cas_store_free(store);
	batch_fixture_release(&x);
}
