/* Fuzz target: castorefs itself, driven through the FUSE engine the way
 * the kernel drives it, over a real local store.
 *
 * The store is built once per process in a temporary folder: a small
 * tree with every kind of entry (packed and unpacked files, an empty and
 * an executable one, equal folders, symlinks, nesting) imported twice,
 * as roots "r" and "s", and a root naming a Directory the store lacks.
 * Each input gets a fresh filesystem and session, a valid INIT, then a
 * sequence of requests, so that state carries from one to the next
 * (LOOKUP then OPEN, READ, READDIRPLUS, FORGET...): inode numbers are
 * preorder indexes and handles small integers, which the fuzzer finds.
 *
 * Input: one control byte (bit 0: --list-root, bit 1: xattrs, bit 2:
 * keep the requests' own len and unique fields instead of fixing them
 * up), then requests, each a 16-bit little-endian length and that many
 * bytes. Every reply must be well formed; after the session ends, the
 * filesystem must hold no inode the kernel was not told of. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "castorefs/castorefs.h"
#include "core/log.h"
#include "fuse/engine.h"
#include "fuzz_fs.h"
#include "store/import.h"
#include "store/local.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char base[64];
static cas_store *store;

static void put_file(const char *rel, size_t len, mode_t mode)
{
	char p[256];
	snprintf(p, sizeof(p), "%s/%s", base, rel);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, mode);
	if (fd < 0)
		abort();
	for (size_t i = 0; i < len; i++) {
		uint8_t b = (uint8_t)(i * 7 + len);
		if (write(fd, &b, 1) != 1)
			abort();
	}
	close(fd);
}

static void put_dir(const char *rel)
{
	char p[256];
	snprintf(p, sizeof(p), "%s/%s", base, rel);
	if (mkdir(p, 0755) < 0)
		abort();
}

static void put_link(const char *rel, const char *target)
{
	char p[256];
	snprintf(p, sizeof(p), "%s/%s", base, rel);
	if (symlink(target, p) < 0)
		abort();
}

static int rm_one(const char *p, const struct stat *st, int flag,
		  struct FTW *ftw)
{
	return remove(p);
}

static void cleanup(void)
{
	cas_store_free(store);
	nftw(base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void build_store(void)
{
	snprintf(base, sizeof(base), "/tmp/fuzz-castorefs-XXXXXX");
	if (!mkdtemp(base))
		abort();
	put_dir("t");
	put_dir("t/a");
	put_dir("t/a/deep");
	put_dir("t/b");
	put_dir("t/b/deep");
	put_dir("t/empty");
	put_file("t/small", 100, 0644);
	put_file("t/exec", 3000, 0755);
	put_file("t/zero", 0, 0644);
	put_file("t/big", 200000, 0644); /* a blob file of its own */
	put_file("t/a/deep/f", 10, 0644);
	put_file("t/b/deep/f", 10, 0644);
	put_link("t/l", "small");
	put_link("t/a/up", "../small");
	char dir[128], src[128];
	snprintf(dir, sizeof(dir), "%s/store", base);
	snprintf(src, sizeof(src), "%s/t", base);
	struct cas_local_options o = {.create = true};
	if (cas_local_open(dir, &o, &store) < 0 ||
	    cas_import(store, src, "r", NULL, NULL, NULL) < 0 ||
	    cas_import(store, src, "s", NULL, NULL, NULL) < 0)
		abort();
	/* A root whose Directory the store lacks: stat works, listing it
	 * is EIO. */
	cas_node missing = {.type = CAS_NODE_DIRECTORY, .size = 3};
	memset(missing.digest.bytes, 0x5a, CAS_DIGEST_LEN);
	if (store->ops->root_set(store, "m", &missing) < 0)
		abort();
	atexit(cleanup);
}

static int next_id;

static int t_backing_open(void *transport, int fd)
{
	return ++next_id;
}

static int t_backing_close(void *transport, int id)
{
	return 0;
}

static void check_reply(const struct cas_fuse_reply *reply)
{
	if (!reply->send)
		return;
	if (reply->len < sizeof(struct fuse_out_header) ||
	    reply->len > reply->buf_size)
		abort();
	struct fuse_out_header oh;
	memcpy(&oh, reply->buf, sizeof(oh));
	size_t total = reply->len + (reply->fd >= 0 ? reply->fd_len : 0);
	if (oh.len != total || oh.unique != reply->unique)
		abort();
	if (oh.error > 0 || oh.error < -4095)
		abort();
	if (oh.error != 0 && reply->len != sizeof(oh))
		abort();
}

static void send_req(struct cas_fuse_session *s, void *req, size_t len,
		     uint8_t *buf, size_t bufsize)
{
	/* Its own allocation, so that ASan sees a read past its end. */
	void *copy = malloc(len ? len : 1);
	if (!copy)
		abort();
	memcpy(copy, req, len);
	struct iovec iov = {copy, len};
	struct cas_fuse_reply reply = {.buf = buf, .buf_size = bufsize};
	if (cas_fuse_session_process(s, &iov, 1, &reply) != 0)
		abort();
	check_reply(&reply);
	cas_fuse_reply_done(s, &reply);
	free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	if (!store) {
		/* Missing Directories and bad requests are logged once
		 * each; that is what the filesystem should do, not news. */
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
		build_store();
	}
	uint8_t c0 = data[0];
	data++;
	size--;

	struct cas_fs_options fo = {.list_root = c0 & 1,
				    .show_xattr = (c0 & 2) != 0};
	struct cas_fs *fs;
	if (cas_fs_new(store, &fo, &fs) < 0)
		return 0;
	struct cas_fuse_config cfg = {
		.readonly = true,
		.max_write = 1 << 20,
		.max_pages = 32,
		.backing_open = t_backing_open,
		.backing_close = t_backing_close,
	};
	struct cas_fuse_session *s;
	if (cas_fuse_session_new(cas_fs_ops(), fs, &cfg, &s) < 0) {
		cas_fs_free(fs);
		return 0;
	}
	static uint8_t *buf;
	static size_t bufsize;
	if (!buf) {
		bufsize = cas_fuse_reply_bufsize(
			&(struct cas_fuse_config){.max_pages = 32});
		buf = malloc(bufsize);
		if (!buf)
			abort();
	}
	struct fuzz_init_req init =
		fuzz_init_request(45, 65536, 1u << 5 /* passthrough */);
	send_req(s, &init, sizeof(init), buf, bufsize);

	uint64_t unique = 2;
	while (size >= 2) {
		size_t n = (size_t)data[0] | (size_t)data[1] << 8;
		data += 2;
		size -= 2;
		if (n > size)
			n = size;
		uint8_t req[65536 + 2];
		memcpy(req, data, n);
		if (!(c0 & 4) && n >= sizeof(struct fuse_in_header)) {
			struct fuse_in_header h;
			memcpy(&h, req, sizeof(h));
			h.len = (uint32_t)n;
			h.unique = unique++;
			memcpy(req, &h, sizeof(h));
		}
		send_req(s, req, n, buf, bufsize);
		data += n;
		size -= n;
	}
	cas_fuse_session_free(s);
	cas_fs_free(fs);
	return 0;
}
