/* Unit tests of castorefs: FUSE request bytes through the engine into the
 * filesystem, over a local store made in a temporary folder. No kernel.
 *
 * The tree imported as root "r":
 *   a, b       equal bytes (two paths: two inodes, one blob)
 *   x          the same bytes, executable
 *   big        300000 bytes of pattern
 *   l          symlink -> a
 *   d1/, d2/   equal folders holding "f" (two inodes, one Directory)
 *   wide/      3000 files
 * plus roots "gonedir" and "goneblob" whose content is absent, and
 * "liar", whose root node says 5 entries below it where its Directory
 * (d1's) has 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/check.h"
#include "castorefs/castorefs.h"
#include "core/util.h"
#include "fuse/engine.h"
#include "store/import.h"
#include "store/local.h"

static char tmpdir[] = "/tmp/test-castorefs-XXXXXX";
static cas_store *store;
static struct cas_fs *fs;
static struct cas_fuse_session *session;
/* Each thread has its own reply buffer (the concurrency test). */
static __thread uint8_t *reply_buf;
static __thread size_t reply_size;
static size_t reply_need;

static void reply_buf_ensure(void)
{
	if (reply_need > reply_size) {
		free(reply_buf);
		reply_buf = malloc(reply_need);
		REQUIRE(reply_buf);
		reply_size = reply_need;
	}
}

/* ---- building the store ---- */

static void write_file(const char *rel, size_t size, unsigned seed, mode_t mode)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/tree/%s", tmpdir, rel);
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
	REQUIRE(fd >= 0);
	uint8_t *buf = malloc(size + 1);
	REQUIRE(buf);
	for (size_t i = 0; i < size; i++)
		buf[i] = (uint8_t)((i + seed) % 251);
	REQUIRE(cas_write_all(fd, buf, size) == 0);
	free(buf);
	close(fd);
}

static void make_dir(const char *rel)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/tree/%s", tmpdir, rel);
	REQUIRE(mkdir(path, 0755) == 0);
}

static void make_store(void)
{
	REQUIRE(mkdtemp(tmpdir));
	make_dir("");
	write_file("a", 1000, 1, 0644);
	write_file("b", 1000, 1, 0644);
	write_file("x", 1000, 1, 0755);
	write_file("big", 300000, 2, 0644);
	char path[512];
	snprintf(path, sizeof(path), "%s/tree/l", tmpdir);
	REQUIRE(symlink("a", path) == 0);
	make_dir("d1");
	make_dir("d2");
	write_file("d1/f", 10, 3, 0644);
	write_file("d2/f", 10, 3, 0644);
	make_dir("wide");
	for (int i = 0; i < 3000; i++) {
		char rel[64];
		snprintf(rel, sizeof(rel), "wide/n%04d", i);
		write_file(rel, 4, (unsigned)i, 0644);
	}

	char sdir[512];
	snprintf(sdir, sizeof(sdir), "%s/store", tmpdir);
	struct cas_local_options lo = {.create = true};
	REQUIRE(cas_local_open(sdir, &lo, &store) == 0);
	snprintf(path, sizeof(path), "%s/tree", tmpdir);
	struct cas_import_options io = {.threads = 1};
	REQUIRE(cas_import(store, path, "r", &io, NULL, NULL) == 0);

	cas_node gone = {.type = CAS_NODE_DIRECTORY, .size = 3};
	memset(gone.digest.bytes, 0xab, CAS_DIGEST_LEN);
	REQUIRE(store->ops->root_set(store, "gonedir", &gone) == 0);
	gone.type = CAS_NODE_FILE;
	gone.size = 10;
	memset(gone.digest.bytes, 0xcd, CAS_DIGEST_LEN);
	REQUIRE(store->ops->root_set(store, "goneblob", &gone) == 0);
	cas_node *r = NULL;
	REQUIRE(store->ops->root_get(store, "r", &r) == 0);
	cas_directory *d = NULL;
	REQUIRE(cas_store_directory_get(store, &r->digest, &d) == 0);
	cas_node liar = *cas_directory_find(d, (const uint8_t *)"d1", 2);
	liar.size = 5;
	REQUIRE(store->ops->root_set(store, "liar", &liar) == 0);
	cas_directory_free(d);
	free(r);
}

/* ---- requests ---- */

struct req {
	uint8_t b[8192];
	size_t len;
};

struct out {
	struct cas_fuse_reply reply;
	int error;
	uint8_t *payload;
	size_t payload_len;
};

static void req_start(struct req *r, uint32_t opcode, uint64_t nodeid)
{
	static atomic_ullong unique = 1;
	memset(r, 0, sizeof(*r));
	struct fuse_in_header h = {
		.opcode = opcode,
		.unique = atomic_fetch_add(&unique, 1),
		.nodeid = nodeid,
	};
	memcpy(r->b, &h, sizeof(h));
	r->len = sizeof(h);
}

static void req_add(struct req *r, const void *p, size_t n)
{
	REQUIRE(r->len + n <= sizeof(r->b));
	memcpy(r->b + r->len, p, n);
	r->len += n;
}

static void run(struct req *r, struct out *o)
{
	uint32_t len = (uint32_t)r->len;
	memcpy(r->b, &len, sizeof(len));
	memset(o, 0, sizeof(*o));
	o->reply.buf = reply_buf;
	o->reply.buf_size = reply_size;
	o->reply.fd = -1;
	struct iovec iov = {r->b, r->len};
	REQUIRE(cas_fuse_session_process(session, &iov, 1, &o->reply) == 0);
	if (!o->reply.send)
		return;
	struct fuse_out_header oh;
	REQUIRE(o->reply.len >= sizeof(oh));
	memcpy(&oh, reply_buf, sizeof(oh));
	o->error = oh.error;
	o->payload = reply_buf + sizeof(oh);
	o->payload_len = o->reply.len - sizeof(oh);
}

static void init_session(struct cas_fs_options opts)
{
	if (session)
		cas_fuse_session_free(session);
	cas_fs_free(fs);
	REQUIRE(cas_fs_new(store, &opts, &fs) == 0);
	struct cas_fuse_config cfg = {
		.readonly = true,
		.max_write = 65536,
		.max_pages = 256,
	};
	REQUIRE(cas_fuse_session_new(cas_fs_ops(), fs, &cfg, &session) == 0);
	reply_need = cas_fuse_reply_bufsize(&cfg);
	reply_buf_ensure();
	struct req r;
	struct out o;
	req_start(&r, FUSE_INIT, 0);
	uint64_t flags = FUSE_ASYNC_READ | FUSE_DO_READDIRPLUS |
			 FUSE_READDIRPLUS_AUTO | FUSE_MAX_PAGES |
			 FUSE_INIT_EXT | FUSE_SPLICE_READ | FUSE_SPLICE_MOVE;
	struct fuse_init_in in = {
		.major = 7,
		.minor = 40,
		.max_readahead = 1 << 20,
		.flags = (uint32_t)flags,
		.flags2 = (uint32_t)(flags >> 32),
	};
	req_add(&r, &in, sizeof(in));
	run(&r, &o);
	REQUIRE(o.error == 0);
}

/* LOOKUP; returns the error, fills *ret. */
static int lookup(uint64_t parent, const char *name, struct fuse_entry_out *ret)
{
	struct req r;
	struct out o;
	req_start(&r, FUSE_LOOKUP, parent);
	req_add(&r, name, strlen(name) + 1);
	run(&r, &o);
	memset(ret, 0, sizeof(*ret));
	if (o.error == 0) {
		REQUIRE(o.payload_len >= sizeof(*ret));
		memcpy(ret, o.payload, sizeof(*ret));
	}
	return o.error;
}

static uint64_t lookup_ino(uint64_t parent, const char *name)
{
	struct fuse_entry_out e;
	int r = lookup(parent, name, &e);
	CHECK(r == 0);
	return r == 0 ? e.nodeid : 0;
}

static void forget(uint64_t ino, uint64_t n)
{
	struct req r;
	struct out o;
	req_start(&r, FUSE_FORGET, ino);
	struct fuse_forget_in in = {.nlookup = n};
	req_add(&r, &in, sizeof(in));
	run(&r, &o);
	if (o.reply.send)
		REQUIRE(!"FORGET got a reply");
}

static int getattr(uint64_t ino, struct fuse_attr *ret)
{
	struct req r;
	struct out o;
	req_start(&r, FUSE_GETATTR, ino);
	struct fuse_getattr_in in = {0};
	req_add(&r, &in, sizeof(in));
	run(&r, &o);
	if (o.error == 0) {
		struct fuse_attr_out ao;
		REQUIRE(o.payload_len >= sizeof(ao));
		memcpy(&ao, o.payload, sizeof(ao));
		*ret = ao.attr;
	}
	return o.error;
}

static int open_(uint32_t opcode, uint64_t ino, uint32_t flags,
		 uint64_t *ret_fh, uint32_t *ret_open_flags)
{
	struct req r;
	struct out o;
	req_start(&r, opcode, ino);
	struct fuse_open_in in = {.flags = flags};
	req_add(&r, &in, sizeof(in));
	run(&r, &o);
	if (o.error == 0) {
		struct fuse_open_out oo;
		REQUIRE(o.payload_len >= sizeof(oo));
		memcpy(&oo, o.payload, sizeof(oo));
		*ret_fh = oo.fh;
		if (ret_open_flags)
			*ret_open_flags = oo.open_flags;
	}
	return o.error;
}

static int release(uint32_t opcode, uint64_t ino, uint64_t fh)
{
	struct req r;
	struct out o;
	req_start(&r, opcode, ino);
	struct fuse_release_in in = {.fh = fh};
	req_add(&r, &in, sizeof(in));
	run(&r, &o);
	return o.error;
}

static size_t live_inodes(void)
{
	struct cas_fs_stats st;
	cas_fs_get_stats(fs, &st);
	return st.inodes;
}

/* ---- tests ---- */

static void test_lookup_and_attributes(void)
{
	struct fuse_entry_out e;
	CHECK(lookup(1, "r", &e) == 0);
	uint64_t r = e.nodeid;
	CHECK(r > 1);
	CHECK(e.attr.mode == (S_IFDIR | 0555));
	/* Its DirectoryNode size: a b x big l d1 d2 wide, d1/f, d2/f and
	 * wide's 3000 files. */
	CHECK(e.attr.size == 8 + 2 + 3000);
	CHECK(e.attr.nlink == 1);
	CHECK(e.attr.mtime == 1 && e.attr.uid == 0 && e.attr.gid == 0);

	CHECK(lookup(r, "a", &e) == 0);
	CHECK(e.attr.mode == (S_IFREG | 0444) && e.attr.size == 1000);
	CHECK(e.attr.nlink == 1 && e.attr.blocks == 2);
	uint64_t a = e.nodeid;
	/* One inode per path, equal content or not. */
	CHECK(lookup_ino(r, "b") != a);
	CHECK(lookup(r, "x", &e) == 0);
	CHECK(e.attr.mode == (S_IFREG | 0555) && e.nodeid != a);
	CHECK(lookup(r, "l", &e) == 0);
	CHECK(e.attr.mode == (S_IFLNK | 0777) && e.attr.size == 1);
	uint64_t d1 = lookup_ino(r, "d1"), d2 = lookup_ino(r, "d2");
	CHECK(d1 != d2);
	CHECK(lookup_ino(d1, "f") != lookup_ino(d2, "f"));
	/* Preorder: r, then d1, d1/f, d2, d2/f, wide and its 3000 files,
	 * then a b big (files), x, then l. */
	CHECK(d1 == r + 1 && lookup_ino(d1, "f") == r + 2 && d2 == r + 3);
	CHECK(lookup_ino(r, "wide") == r + 5);
	CHECK(lookup_ino(r, "a") == r + 3006);
	CHECK(lookup_ino(r, "x") == r + 3009);
	CHECK(lookup_ino(r, "l") == r + 3010);

	/* Exact names; absent names are negative entries (node id 0). */
	CHECK(lookup(r, "A", &e) == 0 && e.nodeid == 0);
	CHECK(lookup(r, "nothere", &e) == 0 && e.nodeid == 0);
	CHECK(lookup(1, "R", &e) == -ENOENT);
	CHECK(lookup(a, "child", &e) == -ENOTDIR);
	CHECK(lookup(999999, "a", &e) == -ESTALE);

	/* Names in a wide folder are found by binary search. */
	uint64_t w = lookup_ino(r, "wide");
	CHECK(lookup(w, "n0000", &e) == 0 && e.attr.size == 4);
	CHECK(lookup(w, "n2999", &e) == 0 && e.attr.size == 4);
	CHECK(lookup(w, "n3000", &e) == 0 && e.nodeid == 0);
	struct fuse_attr at;
	CHECK(getattr(w, &at) == 0 && at.size == 3000 && at.nlink == 1);
	CHECK(lookup_ino(w, "n0000") == w + 1);
	CHECK(lookup_ino(w, "n2999") == w + 3000);
	CHECK(getattr(1, &at) == 0 && at.mode == (S_IFDIR | 0555));
}

static void test_forget_releases(void)
{
	/* A fresh mount: the kernel knows nothing yet. */
	init_session((struct cas_fs_options){0});
	size_t before = live_inodes();
	uint64_t r = lookup_ino(1, "r");
	uint64_t a = lookup_ino(r, "a");
	CHECK(lookup_ino(r, "a") == a);
	CHECK(live_inodes() == before + 2);
	size_t with = live_inodes();
	/* Two lookups of a: one forget of 1 keeps it. */
	forget(a, 1);
	CHECK(live_inodes() == with);
	struct fuse_attr at;
	CHECK(getattr(a, &at) == 0);
	forget(a, 1);
	CHECK(live_inodes() == with - 1);
	CHECK(getattr(a, &at) == -ESTALE);
	/* Looked up again, the path gets its number back: numbers are
	 * computed from the path, not remembered. */
	CHECK(lookup_ino(r, "a") == a);
	forget(a, 1);
	/* So does a folder the kernel forgot, and everything below it. */
	uint64_t w = lookup_ino(r, "wide");
	uint64_t n5 = lookup_ino(w, "n0005");
	forget(n5, 1);
	forget(w, 1);
	CHECK(getattr(w, &at) == -ESTALE);
	CHECK(lookup_ino(r, "wide") == w && lookup_ino(w, "n0005") == n5);
	forget(n5, 1);
	forget(w, 1);
	/* Forgetting more than known, or unknown numbers, is harmless. */
	forget(r, 1000000);
	forget(123456789, 1);
	forget(1, 5); /* the root stays */
	CHECK(getattr(1, &at) == 0);
}

static void test_readdirplus_counts_lookups(void)
{
	uint64_t r = lookup_ino(1, "r");
	uint64_t fh = 0;
	uint32_t oflags = 0;
	CHECK(open_(FUSE_OPENDIR, r, O_RDONLY, &fh, &oflags) == 0);
	CHECK(oflags & FOPEN_CACHE_DIR);
	CHECK(oflags & FOPEN_KEEP_CACHE);
	size_t before = live_inodes();

	/* Read the whole listing in small pieces. */
	uint64_t off = 0;
	unsigned names = 0, dots = 0;
	uint64_t nodeids[32];
	unsigned n_nodeids = 0;
	for (int round = 0; round < 100; round++) {
		struct req q;
		struct out o;
		req_start(&q, FUSE_READDIRPLUS, r);
		struct fuse_read_in in = {.fh = fh, .offset = off, .size = 400};
		req_add(&q, &in, sizeof(in));
		run(&q, &o);
		CHECK(o.error == 0);
		if (o.error || o.payload_len == 0)
			break;
		size_t p = 0;
		while (p + FUSE_NAME_OFFSET_DIRENTPLUS <= o.payload_len) {
			struct fuse_direntplus dp;
			memcpy(&dp, o.payload + p, sizeof(dp));
			const char *name = (const char *)o.payload + p +
					   FUSE_NAME_OFFSET_DIRENTPLUS;
			bool dot = (dp.dirent.namelen == 1 && name[0] == '.') ||
				   (dp.dirent.namelen == 2 &&
				    !memcmp(name, "..", 2));
			if (dot) {
				dots++;
				CHECK(dp.entry_out.nodeid == 0);
			} else {
				names++;
				CHECK(dp.entry_out.nodeid != 0);
				CHECK(dp.entry_out.nodeid == dp.dirent.ino);
				if (n_nodeids < 32)
					nodeids[n_nodeids++] =
						dp.entry_out.nodeid;
			}
			off = dp.dirent.off;
			p += FUSE_DIRENTPLUS_SIZE(&dp);
		}
	}
	CHECK(dots == 2);
	CHECK(names == 8);
	CHECK(live_inodes() > before);
	/* One lookup reference per entry: forgetting each once brings the
	 * table back. */
	for (unsigned i = 0; i < n_nodeids; i++)
		forget(nodeids[i], 1);
	CHECK(live_inodes() == before);
	CHECK(release(FUSE_RELEASEDIR, r, fh) == 0);
}

/* A plain READDIR takes no lookup reference, yet its d_ino is the number
 * a LOOKUP of the name gives, before and after. */
static void test_readdir_ino(void)
{
	uint64_t r = lookup_ino(1, "r");
	uint64_t fh = 0;
	CHECK(open_(FUSE_OPENDIR, r, O_RDONLY, &fh, NULL) == 0);
	size_t before = live_inodes();
	struct req q;
	struct out o;
	req_start(&q, FUSE_READDIR, r);
	struct fuse_read_in in = {.fh = fh, .size = 4096};
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == 0);
	CHECK(live_inodes() == before);
	/* The lookups below reuse the reply buffer. */
	static uint8_t list[4096];
	size_t len = CAS_MIN(o.payload_len, sizeof(list));
	memcpy(list, o.payload, len);
	unsigned n = 0;
	for (size_t p = 0; p + FUSE_NAME_OFFSET <= len;) {
		struct fuse_dirent d;
		memcpy(&d, list + p, sizeof(d));
		char name[256];
		memcpy(name, list + p + FUSE_NAME_OFFSET, d.namelen);
		name[d.namelen] = 0;
		p += FUSE_DIRENT_SIZE(&d);
		if (!strcmp(name, ".") || !strcmp(name, ".."))
			continue;
		n++;
		uint64_t ino = lookup_ino(r, name);
		CHECK(d.ino == ino);
		forget(ino, 1);
	}
	CHECK(n == 8);
	CHECK(release(FUSE_RELEASEDIR, r, fh) == 0);
	forget(r, 1);
}

/* 3000 inodes at once: the table grows, then forgets in a scattered
 * order (records move, the index shifts back, chunks are freed) while
 * every inode still held keeps its number and content. */
static void test_table_grows_and_shrinks(void)
{
	init_session((struct cas_fs_options){0});
	uint64_t r = lookup_ino(1, "r");
	uint64_t w = lookup_ino(r, "wide");
	size_t before = live_inodes();
	for (int i = 0; i < 3000; i++) {
		char name[16];
		snprintf(name, sizeof(name), "n%04d", i);
		CHECK(lookup_ino(w, name) == w + 1 + (uint64_t)i);
	}
	CHECK(live_inodes() == before + 3000);
	struct cas_fs_stats big;
	cas_fs_get_stats(fs, &big);
	bool ok = true;
	for (int k = 0; k < 3000; k++) {
		int i = (k * 7) % 3000; /* 7 is prime to 3000: each once */
		forget(w + 1 + (uint64_t)i, 1);
		if (k % 100 == 99 && k + 1 < 3000) {
			int j = ((k + 1) * 7) % 3000; /* not forgotten yet */
			struct fuse_attr at;
			ok = ok && getattr(w + 1 + (uint64_t)j, &at) == 0 &&
			     at.size == 4 && at.ino == w + 1 + (uint64_t)j;
			ok = ok && getattr(w + 1 + (uint64_t)i, &at) == -ESTALE;
		}
	}
	CHECK(ok);
	CHECK(live_inodes() == before);
	struct cas_fs_stats small;
	cas_fs_get_stats(fs, &small);
	/* FORGET gave the records back: 3000 of them take 192 KB. */
	CHECK(small.memory_bytes + 120000 < big.memory_bytes);
	forget(w, 1);
	forget(r, 1);
}

static void test_read(void)
{
	uint64_t r = lookup_ino(1, "r");
	uint64_t big = lookup_ino(r, "big");
	uint64_t fh = 0;
	uint32_t oflags = 0;
	CHECK(open_(FUSE_OPEN, big, O_WRONLY, &fh, NULL) == -EROFS);
	CHECK(open_(FUSE_OPEN, big, O_RDONLY, &fh, &oflags) == 0);
	CHECK(oflags & FOPEN_KEEP_CACHE);

	struct req q;
	struct out o;
	req_start(&q, FUSE_READ, big);
	struct fuse_read_in in = {.fh = fh, .offset = 299000, .size = 4096};
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == 0);
	/* Data comes as a range of the blob's fd, clamped at the end. */
	size_t n = o.reply.fd >= 0 ? o.reply.fd_len : o.payload_len;
	CHECK(n == 1000);
	uint8_t buf[1000];
	if (o.reply.fd >= 0) {
		CHECK(pread(o.reply.fd, buf, sizeof(buf),
			    (off_t)o.reply.fd_offset) == (ssize_t)sizeof(buf));
	} else {
		memcpy(buf, o.payload, CAS_MIN(sizeof(buf), o.payload_len));
	}
	bool same = true;
	for (size_t i = 0; i < sizeof(buf); i++)
		same = same && buf[i] == (uint8_t)((299000 + i + 2) % 251);
	CHECK(same);
	cas_fuse_reply_done(session, &o.reply);

	in.offset = 400000;
	req_start(&q, FUSE_READ, big);
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == 0 && o.payload_len == 0 &&
	      (o.reply.fd < 0 || o.reply.fd_len == 0));
	cas_fuse_reply_done(session, &o.reply);

	/* A RELEASE that overtakes a READ still being sent (a guest may send
	 * them on two queues) does not close the fd under it: the fd lives
	 * until the transport says the reply is done. */
	uint64_t fh2 = 0;
	CHECK(open_(FUSE_OPEN, big, O_RDONLY, &fh2, NULL) == 0);
	struct fuse_read_in in2 = {.fh = fh2, .offset = 0, .size = 100};
	req_start(&q, FUSE_READ, big);
	req_add(&q, &in2, sizeof(in2));
	run(&q, &o);
	CHECK(o.error == 0 && o.reply.fd >= 0);
	int held_fd = o.reply.fd;
	CHECK(release(FUSE_RELEASE, big, fh2) == 0);
	CHECK(pread(held_fd, buf, 100, 0) == 100 && buf[5] == (5 + 2) % 251);
	req_start(&q, FUSE_READ, big); /* the handle is gone for new READs */
	req_add(&q, &in2, sizeof(in2));
	struct out o2;
	run(&q, &o2);
	CHECK(o2.error == -EBADF);
	cas_fuse_reply_done(session, &o.reply);
	CHECK(fcntl(held_fd, F_GETFD) < 0 && errno == EBADF);

	/* A stale or made-up handle is refused. */
	in.offset = 0;
	in.fh = fh ^ (1ull << 40);
	req_start(&q, FUSE_READ, big);
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == -EBADF);

	CHECK(release(FUSE_RELEASE, big, fh) == 0);
	in.fh = fh;
	req_start(&q, FUSE_READ, big);
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == -EBADF);

	/* Without a handle (the kernel opened the file itself: zero-message
	 * open) READ finds the content by inode, and holds it until the
	 * reply is done. */
	in.fh = 0;
	in.offset = 299000;
	for (int k = 0; k < 2; k++) {
		req_start(&q, FUSE_READ, big);
		req_add(&q, &in, sizeof(in));
		run(&q, &o);
		CHECK(o.error == 0);
		n = o.reply.fd >= 0 ? o.reply.fd_len : o.payload_len;
		CHECK(n == 1000);
		memset(buf, 0, sizeof(buf));
		if (o.reply.fd >= 0)
			CHECK(pread(o.reply.fd, buf, sizeof(buf),
				    (off_t)o.reply.fd_offset) ==
			      (ssize_t)sizeof(buf));
		else
			memcpy(buf, o.payload, sizeof(buf));
		CHECK(buf[0] == (uint8_t)((299000 + 2) % 251) &&
		      buf[999] == (uint8_t)((299999 + 2) % 251));
		cas_fuse_reply_done(session, &o.reply);
	}
	req_start(&q, FUSE_READ, r); /* a folder has no content to read */
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == -EISDIR);

	/* readlink */
	uint64_t l = lookup_ino(r, "l");
	req_start(&q, FUSE_READLINK, l);
	run(&q, &o);
	CHECK(o.error == 0 && o.payload_len == 1 && o.payload[0] == 'a');
}

/* OPENDIR, READDIR from the start, RELEASEDIR: READDIR's error. */
static int readdir_error(uint64_t ino)
{
	uint64_t fh = 0;
	int r = open_(FUSE_OPENDIR, ino, O_RDONLY, &fh, NULL);
	if (r < 0)
		return r;
	struct req q;
	struct out o;
	req_start(&q, FUSE_READDIR, ino);
	struct fuse_read_in in = {.fh = fh, .size = 4096};
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	r = o.error;
	CHECK(release(FUSE_RELEASEDIR, ino, fh) == 0);
	return r;
}

static void test_absent_content(void)
{
	struct fuse_entry_out e;
	/* EIO for what needs the absent content, the rest keeps working. A
	 * folder's attributes come from its parent: stat works, looking up
	 * or listing inside it does not. */
	CHECK(lookup(1, "gonedir", &e) == 0);
	CHECK(e.attr.mode == (S_IFDIR | 0555) && e.attr.size == 3);
	uint64_t gone = e.nodeid;
	struct fuse_attr at;
	CHECK(getattr(gone, &at) == 0 && at.size == 3 && at.nlink == 1);
	CHECK(lookup(gone, "x", &e) == -EIO);
	CHECK(readdir_error(gone) == -EIO);
	forget(gone, 1);
	/* A Directory whose size disagrees with its node's: EIO, since its
	 * entries would take numbers outside its range. */
	uint64_t liar = lookup_ino(1, "liar");
	CHECK(lookup(liar, "f", &e) == -EIO);
	CHECK(readdir_error(liar) == -EIO);
	forget(liar, 1);
	CHECK(lookup(1, "goneblob", &e) == 0);
	CHECK(e.attr.size == 10);
	uint64_t fh;
	CHECK(open_(FUSE_OPEN, e.nodeid, O_RDONLY, &fh, NULL) == -EIO);
	CHECK(lookup_ino(1, "r") != 0);
}

static void test_root_listing_and_xattrs(void)
{
	/* Without list_root the root opens but its listing is refused. */
	uint64_t fh;
	CHECK(open_(FUSE_OPENDIR, 1, O_RDONLY, &fh, NULL) == 0);
	struct req q;
	struct out o;
	req_start(&q, FUSE_READDIRPLUS, 1);
	struct fuse_read_in rin = {.fh = fh, .size = 4096};
	req_add(&q, &rin, sizeof(rin));
	run(&q, &o);
	CHECK(o.error == -EPERM);
	CHECK(release(FUSE_RELEASEDIR, 1, fh) == 0);

	uint64_t r = lookup_ino(1, "r");
	req_start(&q, FUSE_GETXATTR, r);
	struct fuse_getxattr_in gin = {.size = 100};
	req_add(&q, &gin, sizeof(gin));
	req_add(&q, "user.castore.directory.digest", 30);
	run(&q, &o);
	CHECK(o.error == -ENOSYS);

	init_session(
		(struct cas_fs_options){.list_root = true, .show_xattr = true});
	CHECK(open_(FUSE_OPENDIR, 1, O_RDONLY, &fh, NULL) == 0);
	struct fuse_read_in in = {.fh = fh, .size = 4096};
	req_start(&q, FUSE_READDIR, 1);
	req_add(&q, &in, sizeof(in));
	run(&q, &o);
	CHECK(o.error == 0);
	unsigned n = 0;
	for (size_t p = 0; p + FUSE_NAME_OFFSET <= o.payload_len;) {
		struct fuse_dirent d;
		memcpy(&d, o.payload + p, sizeof(d));
		n++;
		p += FUSE_DIRENT_SIZE(&d);
	}
	CHECK(n == 2 + 4); /* . .. goneblob gonedir liar r */
	CHECK(release(FUSE_RELEASEDIR, 1, fh) == 0);

	r = lookup_ino(1, "r");
	req_start(&q, FUSE_GETXATTR, r);
	req_add(&q, &gin, sizeof(gin));
	req_add(&q, "user.castore.directory.digest", 30);
	run(&q, &o);
	CHECK(o.error == 0);
	if (o.error == 0) {
		const char *want = NULL;
		cas_node *node = NULL;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		if (store->ops->root_get(store, "r", &node) == 0) {
			cas_digest_to_hex(&node->digest, hex);
			want = hex;
		}
		CHECK(want && o.payload_len == CAS_DIGEST_HEX_LEN &&
		      !memcmp(o.payload, want, CAS_DIGEST_HEX_LEN));
		free(node);
	}
	req_start(&q, FUSE_GETXATTR, r);
	req_add(&q, &gin, sizeof(gin));
	req_add(&q, "user.castore.blob.digest", 25);
	run(&q, &o);
	CHECK(o.error == -ENODATA);
}

/* Lookups, forgets, reads and listings from several threads at once, with
 * every lookup reference given back: afterwards only the root is left.
 * (Run under -fsanitize=thread to check the locking.) */
static atomic_uint hammer_failures;

/* CHECK counts without locks; threads count their own failures. */
#define HCHECK(cond)                                                           \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, \
				__LINE__, #cond);                              \
			atomic_fetch_add(&hammer_failures, 1);                 \
		}                                                              \
	} while (0)

static uint64_t hlookup(uint64_t parent, const char *name)
{
	struct fuse_entry_out e;
	int r = lookup(parent, name, &e);
	HCHECK(r == 0 && e.nodeid != 0);
	return e.nodeid;
}

static void *hammer(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;
	reply_buf_ensure();
	for (int i = 0; i < 300; i++) {
		uint64_t r = hlookup(1, "r");
		const char *names[] = {"a", "b", "x", "big", "l", "d1", "d2"};
		const char *name = names[(seed + (unsigned)i) % 7];
		uint64_t n = hlookup(r, name);
		struct fuse_attr at;
		HCHECK(getattr(n, &at) == 0);
		if (S_ISREG(at.mode)) {
			uint64_t fh = 0;
			HCHECK(open_(FUSE_OPEN, n, O_RDONLY, &fh, NULL) == 0);
			struct req q;
			struct out o;
			req_start(&q, FUSE_READ, n);
			struct fuse_read_in in = {.fh = fh, .size = 4096};
			req_add(&q, &in, sizeof(in));
			run(&q, &o);
			HCHECK(o.error == 0);
			/* Released while the READ's data is still "in flight". */
			HCHECK(release(FUSE_RELEASE, n, fh) == 0);
			uint8_t b[16];
			HCHECK(o.reply.fd < 0 ||
			       pread(o.reply.fd, b, sizeof(b), 0) >= 0);
			cas_fuse_reply_done(session, &o.reply);
			/* And without a handle (zero-message open): the
			 * threads share the handles kept per inode. */
			in.fh = 0;
			in.offset = (uint64_t)i % 7;
			req_start(&q, FUSE_READ, n);
			req_add(&q, &in, sizeof(in));
			run(&q, &o);
			HCHECK(o.error == 0);
			HCHECK(o.reply.fd < 0 ||
			       pread(o.reply.fd, b, sizeof(b),
				     (off_t)o.reply.fd_offset) >= 0);
			cas_fuse_reply_done(session, &o.reply);
		} else if (S_ISDIR(at.mode)) {
			forget(hlookup(n, "f"), 1);
		}
		forget(n, 1);
		forget(r, 1);
	}
	free(reply_buf);
	reply_buf = NULL;
	reply_size = 0;
	return NULL;
}

static void test_concurrency(void)
{
	init_session((struct cas_fs_options){0});
	pthread_t t[4];
	for (uintptr_t i = 0; i < 4; i++)
		REQUIRE(pthread_create(&t[i], NULL, hammer, (void *)i) == 0);
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	CHECK(atomic_load(&hammer_failures) == 0);
	CHECK(live_inodes() == 1);
}

int main(void)
{
	make_store();
	init_session((struct cas_fs_options){0});
	test_lookup_and_attributes();
	test_forget_releases();
	test_readdirplus_counts_lookups();
	test_readdir_ino();
	test_table_grows_and_shrinks();
	test_read();
	test_absent_content();
	test_root_listing_and_xattrs();
	test_concurrency();

	struct cas_fs_stats st;
	cas_fs_get_stats(fs, &st);
	CHECK(st.inodes >= 1 && st.memory_bytes > 0);
	cas_fuse_session_free(session);
	cas_fs_free(fs);
	cas_store_free(store);
	free(reply_buf);
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
	return check_exit("castorefs");
}
