/* Unit tests of the FUSE engine: hand-built request bytes in, replies
 * decoded and checked, against a small fake filesystem. No kernel. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/check.h"
#include "core/util.h"
#include "fuse/engine.h"
#include "fuse/engine_i.h"
#include "fuse/fuse_dev.h"
#include "fuse/fuse_kernel_ext.h"

/* ---- the fake filesystem ----
 * 1 /            dir
 * 2 /file        10000 bytes of pattern, read through the buffer
 * 3 /link        -> "file"
 * 4 /dir         empty dir
 * 5 /fdfile      20000 bytes of pattern, read through an fd (passthrough)
 */
#define FILE_SIZE   10000
#define FDFILE_SIZE 20000

struct fake {
	int memfd;
	atomic_uint forgets;
	atomic_ullong forget_sum;
	atomic_uint releases;
	atomic_uint releasedirs;
	atomic_uint read_dones;
	uint64_t last_done_ino, last_done_fh;
	int init_calls, destroy_calls;
	bool init_clear_passthrough;
	bool init_clear_readdirplus;
	bool init_no_opendir;
	bool init_no_open;
	bool with_xattr;
	struct cas_fuse_conn seen_conn;
	/* transport side */
	atomic_int backing_opens, backing_closes, next_backing_id;
	atomic_int backing_attempts;
	int backing_fail; /* -errno backing_open fails with, 0: succeeds */
};

static uint8_t pattern(uint64_t i)
{
	return (uint8_t)(i % 251);
}

static void make_attr(uint64_t ino, struct cas_fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->atime = a->mtime = a->ctime = 1;
	a->nlink = 1;
	a->blksize = 4096;
	switch (ino) {
	case 1:
		a->mode = S_IFDIR | 0555;
		a->nlink = 3;
		a->size = 4;
		break;
	case 2:
		a->mode = S_IFREG | 0444;
		a->size = FILE_SIZE;
		break;
	case 3:
		a->mode = S_IFLNK | 0777;
		a->size = 4;
		break;
	case 4:
		a->mode = S_IFDIR | 0555;
		a->nlink = 2;
		break;
	case 5:
		a->mode = S_IFREG | 0555;
		a->size = FDFILE_SIZE;
		break;
	}
	a->blocks = (a->size + 511) / 512;
}

static int f_init(void *fs, struct cas_fuse_conn *conn)
{
	struct fake *f = fs;
	f->init_calls++;
	if (f->init_clear_passthrough)
		conn->want_passthrough = false;
	if (f->init_clear_readdirplus)
		conn->want_readdirplus = false;
	if (f->init_no_opendir)
		conn->want_no_opendir = true;
	if (f->init_no_open)
		conn->want_no_open = true;
	f->seen_conn = *conn;
	return 0;
}

static void f_destroy(void *fs)
{
	((struct fake *)fs)->destroy_calls++;
}

static const char *names[] = {NULL, NULL, "file", "link", "dir", "fdfile"};

static int f_lookup(void *fs, uint64_t parent, const char *name, size_t namelen,
		    struct cas_fuse_entry *ret)
{
	if (parent != 1)
		return parent <= 5 ? -ENOENT : -ESTALE;
	if (strlen(name) != namelen)
		return -EBADMSG; /* the engine must pass a NUL-terminated name */
	for (uint64_t i = 2; i <= 5; i++) {
		if (strcmp(name, names[i]) == 0) {
			ret->generation = 7;
			ret->entry_valid = UINT64_MAX;
			ret->attr_valid = 1234;
			ret->attr_valid_nsec = 5;
			make_attr(i, &ret->attr);
			return 0;
		}
	}
	if (strcmp(name, "negative") == 0) {
		ret->entry_valid = 99;
		return 0;
	}
	return -ENOENT;
}

static void f_forget(void *fs, uint64_t ino, uint64_t nlookup)
{
	struct fake *f = fs;
	atomic_fetch_add(&f->forgets, 1);
	atomic_fetch_add(&f->forget_sum, nlookup);
}

static int f_getattr(void *fs, uint64_t ino, struct cas_fuse_attr *ret,
		     uint64_t *ret_attr_valid)
{
	if (ino < 1 || ino > 5)
		return -ESTALE;
	make_attr(ino, ret);
	*ret_attr_valid = 4321;
	return 0;
}

static int f_readlink(void *fs, uint64_t ino, char *buf, size_t size)
{
	if (ino != 3)
		return -EINVAL;
	if (size < 4)
		return -ERANGE;
	memcpy(buf, "file", 4);
	return 4;
}

static int f_open(void *fs, uint64_t ino, uint32_t flags,
		  struct cas_fuse_open *ret)
{
	struct fake *f = fs;
	if (ino != 2 && ino != 5)
		return ino == 1 || ino == 4 ? -EISDIR : -ESTALE;
	ret->fh = ino * 100;
	ret->open_flags = CAS_FOPEN_KEEP_CACHE;
	if (ino == 5)
		ret->backing_fd = f->memfd;
	return 0;
}

static int f_read(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
		  uint32_t size, struct cas_fuse_read *ret)
{
	struct fake *f = fs;
	if (ret->fh != fh)
		return -EPROTO;	 /* the engine passes the request's fh */
	if (fh == 0 && ino == 5) /* zero-message open: a handle of our own */
		ret->fh = fh = 4200 + ino * 100;
	else if (fh != ino * 100)
		return -EBADF;
	uint64_t fsize = ino == 2 ? FILE_SIZE : FDFILE_SIZE;
	uint64_t n = off >= fsize ? 0 : fsize - off;
	if (n > size)
		n = size;
	if (ret->len != size)
		return -EPROTO; /* capacity must equal size */
	if (ino == 5) {
		ret->fd = f->memfd;
		ret->fd_offset = off;
		ret->len = n;
		return 0;
	}
	for (uint64_t i = 0; i < n; i++)
		ret->buf[i] = pattern(off + i);
	ret->len = n;
	return 0;
}

static void f_read_done(void *fs, uint64_t ino, uint64_t fh)
{
	struct fake *f = fs;
	atomic_fetch_add(&f->read_dones, 1);
	f->last_done_ino = ino;
	f->last_done_fh = fh;
}

static int f_release(void *fs, uint64_t ino, uint64_t fh)
{
	struct fake *f = fs;
	atomic_fetch_add(&f->releases, 1);
	return fh == ino * 100 ? 0 : -EBADF;
}

static int f_opendir(void *fs, uint64_t ino, uint32_t flags,
		     struct cas_fuse_open *ret)
{
	if (ino != 1 && ino != 4)
		return -ENOTDIR;
	ret->fh = 7;
	ret->open_flags = CAS_FOPEN_CACHE_DIR | CAS_FOPEN_KEEP_CACHE;
	ret->backing_fd = 0; /* must be ignored for directories */
	return 0;
}

static int f_readdir(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
		     struct cas_fuse_dirbuf *db)
{
	if (ino != 1)
		return ino == 4 ? 0 : -ENOTDIR;
	/* offsets: 0 "." 1 ".." 2 file 3 link 4 dir 5 fdfile 6 (end) */
	static const char *all[] = {".", "..", "file", "link", "dir", "fdfile"};
	static const uint64_t inos[] = {1, 1, 2, 3, 4, 5};
	for (uint64_t i = off; i < 6; i++) {
		struct cas_fuse_entry e = {.entry_valid = 11, .attr_valid = 12};
		make_attr(inos[i], &e.attr);
		bool dot = i < 2;
		int r = cas_fuse_dirbuf_add(
			db, (const uint8_t *)all[i], strlen(all[i]), inos[i],
			e.attr.mode, i + 1,
			cas_fuse_dirbuf_plus(db) && !dot ? &e : NULL);
		if (r < 0)
			return r;
		if (r == 0)
			break;
	}
	return 0;
}

static int f_releasedir(void *fs, uint64_t ino, uint64_t fh)
{
	atomic_fetch_add(&((struct fake *)fs)->releasedirs, 1);
	return fh == 7 ? 0 : -EBADF;
}

static int f_statfs(void *fs, uint64_t ino, struct cas_fuse_statfs *ret)
{
	ret->blocks = 1000;
	ret->files = 5;
	ret->bsize = 4096;
	ret->namelen = 255;
	ret->frsize = 4096;
	return 0;
}

static int f_getxattr(void *fs, uint64_t ino, const char *name, char *buf,
		      size_t size)
{
	struct fake *f = fs;
	if (!f->with_xattr)
		return -ENOSYS;
	if (strcmp(name, "user.test") != 0)
		return -ENODATA;
	if (size == 0)
		return 5;
	if (size < 5)
		return -ERANGE;
	memcpy(buf, "value", 5);
	return 5;
}

static int f_listxattr(void *fs, uint64_t ino, char *buf, size_t size)
{
	if (size == 0)
		return 10;
	if (size < 10)
		return -ERANGE;
	memcpy(buf, "user.test", 10);
	return 10;
}

static struct cas_fuse_ops fake_ops = {
	.init = f_init,
	.destroy = f_destroy,
	.lookup = f_lookup,
	.forget = f_forget,
	.getattr = f_getattr,
	.readlink = f_readlink,
	.open = f_open,
	.read = f_read,
	.read_done = f_read_done,
	.release = f_release,
	.opendir = f_opendir,
	.readdir = f_readdir,
	.releasedir = f_releasedir,
	.statfs = f_statfs,
	.getxattr = NULL, /* set per test */
	.listxattr = f_listxattr,
	.access = NULL,
};

static int t_backing_open(void *transport, int fd)
{
	struct fake *f = transport;
	atomic_fetch_add(&f->backing_attempts, 1);
	if (f->backing_fail)
		return f->backing_fail;
	atomic_fetch_add(&f->backing_opens, 1);
	return atomic_fetch_add(&f->next_backing_id, 1) + 1;
}

static int t_backing_close(void *transport, int id)
{
	struct fake *f = transport;
	atomic_fetch_add(&f->backing_closes, 1);
	return 0;
}

/* ---- request building and reply decoding ---- */

struct req {
	uint8_t b[8192];
	size_t len;
};

static void req_start(struct req *r, uint32_t opcode, uint64_t nodeid)
{
	memset(r, 0, sizeof(*r));
	struct fuse_in_header h = {
		.opcode = opcode,
		.unique = 1000 + opcode,
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

static void req_name(struct req *r, const char *name)
{
	req_add(r, name, strlen(name) + 1);
}

/* Sets the header's len to the bytes built. */
static void req_end(struct req *r)
{
	uint32_t len = (uint32_t)r->len;
	memcpy(r->b, &len, sizeof(len));
}

struct out {
	struct cas_fuse_reply reply;
	struct fuse_out_header oh;
	uint8_t *payload;
	size_t payload_len;
};

static uint8_t *reply_buf;
static size_t reply_size;

static void run_iov(struct cas_fuse_session *s, const struct iovec *iov,
		    int cnt, struct out *o)
{
	memset(o, 0, sizeof(*o));
	memset(reply_buf, 0xa5, reply_size);
	o->reply.buf = reply_buf;
	o->reply.buf_size = reply_size;
	CHECK(cas_fuse_session_process(s, iov, cnt, &o->reply) == 0);
	if (!o->reply.send)
		return;
	REQUIRE(o->reply.len >= sizeof(o->oh) && o->reply.len <= reply_size);
	memcpy(&o->oh, reply_buf, sizeof(o->oh));
	CHECK(o->oh.len ==
	      o->reply.len + (o->reply.fd >= 0 ? o->reply.fd_len : 0));
	CHECK(o->oh.unique == o->reply.unique);
	if (o->oh.error != 0)
		CHECK(o->reply.len == sizeof(o->oh) && o->reply.fd < 0);
	o->payload = reply_buf + sizeof(o->oh);
	o->payload_len = o->reply.len - sizeof(o->oh);
}

static void run(struct cas_fuse_session *s, struct req *r, struct out *o)
{
	struct iovec iov = {.iov_base = r->b, .iov_len = r->len};
	run_iov(s, &iov, 1, o);
}

/* Runs a request and returns its error (0, -errno), or 1 when no reply. */
static int run_err(struct cas_fuse_session *s, struct req *r)
{
	struct out o;
	run(s, r, &o);
	return o.reply.send ? o.oh.error : 1;
}

static struct fake fake;

static struct cas_fuse_session *new_session(bool passthrough,
					    uint32_t max_pages)
{
	struct cas_fuse_config cfg = {
		.readonly = true,
		.max_write = 128 * 1024,
		.max_pages = max_pages,
	};
	if (passthrough) {
		cfg.backing_open = t_backing_open;
		cfg.backing_close = t_backing_close;
		cfg.transport = &fake;
	}
	size_t need = cas_fuse_reply_bufsize(&cfg);
	CHECK(need >=
	      sizeof(struct fuse_out_header) + (size_t)max_pages * 4096);
	CHECK(need >= sizeof(struct fuse_out_header) + 65536);
	if (need > reply_size) {
		free(reply_buf);
		reply_buf = malloc(need);
		REQUIRE(reply_buf);
		reply_size = need;
	}
	struct cas_fuse_session *s;
	REQUIRE(cas_fuse_session_new(&fake_ops, &fake, &cfg, &s) == 0);
	return s;
}

static int do_init(struct cas_fuse_session *s, uint32_t minor, uint64_t flags,
		   struct out *o)
{
	struct req r;
	req_start(&r, FUSE_INIT, 0);
	struct fuse_init_in in = {
		.major = 7,
		.minor = minor,
		.max_readahead = 1 << 20,
		.flags = (uint32_t)flags,
		.flags2 = (uint32_t)(flags >> 32),
	};
	/* Before 7.36 the kernel sent only the first 16 bytes. */
	req_add(&r, &in, minor >= 36 ? sizeof(in) : 16);
	req_end(&r);
	run(s, &r, o);
	return o->reply.send ? o->oh.error : 1;
}

static const uint64_t kernel_flags =
	FUSE_ASYNC_READ | FUSE_POSIX_LOCKS | FUSE_ATOMIC_O_TRUNC |
	FUSE_EXPORT_SUPPORT | FUSE_BIG_WRITES | FUSE_DONT_MASK |
	FUSE_SPLICE_WRITE | FUSE_SPLICE_MOVE | FUSE_SPLICE_READ |
	FUSE_FLOCK_LOCKS | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO |
	FUSE_ASYNC_DIO | FUSE_WRITEBACK_CACHE | FUSE_PARALLEL_DIROPS |
	FUSE_MAX_PAGES | FUSE_CACHE_SYMLINKS | FUSE_NO_OPENDIR_SUPPORT |
	FUSE_NO_OPEN_SUPPORT | FUSE_INIT_EXT | FUSE_SECURITY_CTX |
	CAS_FUSE_PASSTHROUGH | CAS_FUSE_NO_EXPORT_SUPPORT;

static struct cas_fuse_session *ready_session(bool passthrough)
{
	struct cas_fuse_session *s = new_session(passthrough, 256);
	struct out o;
	REQUIRE(do_init(s, 45, kernel_flags, &o) == 0);
	return s;
}

/* ---- tests ---- */

static void test_init_new(void)
{
	struct cas_fuse_session *s = new_session(true, 256);
	struct req r;
	struct out o;

	/* Anything before INIT is refused. */
	req_start(&r, FUSE_GETATTR, 1);
	req_end(&r);
	CHECK(run_err(s, &r) == -EIO);
	CHECK(!cas_fuse_session_initialized(s));

	CHECK(do_init(s, 45, kernel_flags, &o) == 0);
	CHECK(cas_fuse_session_initialized(s));
	CHECK(o.payload_len == sizeof(struct cas_fuse_init_out));
	struct cas_fuse_init_out io;
	memcpy(&io, o.payload, sizeof(io));
	CHECK(io.major == 7);
	CHECK(io.minor == 40);
	uint64_t got = io.flags | (uint64_t)io.flags2 << 32;
	CHECK(got & FUSE_ASYNC_READ);
	CHECK(got & FUSE_BIG_WRITES);
	CHECK(got & FUSE_MAX_PAGES);
	CHECK(got & FUSE_DO_READDIRPLUS);
	CHECK(got & FUSE_READDIRPLUS_AUTO);
	CHECK(got & FUSE_PARALLEL_DIROPS);
	CHECK(got & FUSE_CACHE_SYMLINKS);
	CHECK(got & FUSE_INIT_EXT);
	CHECK(got & CAS_FUSE_PASSTHROUGH);
	CHECK(!(got & (FUSE_WRITEBACK_CACHE | FUSE_POSIX_LOCKS |
		       FUSE_EXPORT_SUPPORT | FUSE_NO_OPENDIR_SUPPORT |
		       FUSE_SECURITY_CTX | FUSE_ATOMIC_O_TRUNC)));
	CHECK(io.max_stack_depth == 1);
	CHECK(io.max_pages == 256);
	CHECK(io.max_write >= 4096);
	CHECK(io.max_readahead <= 1 << 20);
	CHECK(fake.init_calls == 1);
	CHECK(fake.seen_conn.can_passthrough && fake.seen_conn.can_readdirplus);
	CHECK(fake.seen_conn.proto_major == 7 &&
	      fake.seen_conn.proto_minor == 45);
	const struct cas_fuse_conn *conn = cas_fuse_session_conn(s);
	CHECK(conn->want_passthrough && conn->want_readdirplus);

	/* A second INIT is a protocol error and changes nothing. */
	CHECK(do_init(s, 45, 0, &o) == -EPROTO);
	CHECK(fake.init_calls == 1);
	CHECK(cas_fuse_session_conn(s)->want_passthrough);
	cas_fuse_session_free(s);

	/* Passthrough offered but the fs declines it. */
	fake.init_clear_passthrough = true;
	fake.init_clear_readdirplus = true;
	s = new_session(true, 64);
	CHECK(do_init(s, 45, kernel_flags, &o) == 0);
	memcpy(&io, o.payload, sizeof(io));
	got = io.flags | (uint64_t)io.flags2 << 32;
	CHECK(!(got & CAS_FUSE_PASSTHROUGH));
	CHECK(!(got & FUSE_DO_READDIRPLUS));
	CHECK(io.max_stack_depth == 0);
	CHECK(io.max_pages == 64);
	/* READDIRPLUS not negotiated: refused. */
	req_start(&r, FUSE_READDIRPLUS, 1);
	struct fuse_read_in rin = {.fh = 7, .size = 4096};
	req_add(&r, &rin, sizeof(rin));
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOSYS);
	cas_fuse_session_free(s);
	fake.init_clear_passthrough = false;
	fake.init_clear_readdirplus = false;

	/* No transport hook: no passthrough even if the kernel offers it. */
	s = new_session(false, 32);
	CHECK(do_init(s, 45, kernel_flags, &o) == 0);
	memcpy(&io, o.payload, sizeof(io));
	CHECK(!((io.flags | (uint64_t)io.flags2 << 32) & CAS_FUSE_PASSTHROUGH));
	CHECK(!fake.seen_conn.can_passthrough);
	cas_fuse_session_free(s);

	/* Passthrough bit offered without FUSE_INIT_EXT is not seen. */
	s = new_session(true, 32);
	CHECK(do_init(s, 45, kernel_flags & ~(uint64_t)FUSE_INIT_EXT, &o) == 0);
	memcpy(&io, o.payload, sizeof(io));
	CHECK(io.flags2 == 0 && !(io.flags & FUSE_INIT_EXT));
	CHECK(!fake.seen_conn.can_passthrough);
	cas_fuse_session_free(s);
}

static void test_init_old(void)
{
	struct out o;
	struct fuse_init_out io;

	/* 7.38 (before passthrough): full-size reply, minor 38, no flags2. */
	struct cas_fuse_session *s = new_session(true, 32);
	CHECK(do_init(s, 38, kernel_flags, &o) == 0);
	CHECK(o.payload_len == sizeof(struct fuse_init_out));
	memcpy(&io, o.payload, sizeof(io));
	CHECK(io.minor == 38);
	CHECK(!(io.flags2 & (CAS_FUSE_PASSTHROUGH >> 32)));
	cas_fuse_session_free(s);

	/* 7.22: the reply shrinks to the 7.22 layout. */
	s = new_session(false, 32);
	CHECK(do_init(s, 22, FUSE_ASYNC_READ | FUSE_BIG_WRITES, &o) == 0);
	CHECK(o.payload_len == FUSE_COMPAT_22_INIT_OUT_SIZE);
	memcpy(&io, o.payload, FUSE_COMPAT_22_INIT_OUT_SIZE);
	CHECK(io.major == 7 && io.minor == 22);
	CHECK(io.flags == (FUSE_ASYNC_READ | FUSE_BIG_WRITES));
	CHECK(io.max_write >= 4096);
	cas_fuse_session_free(s);

	/* 7.8: compat entry and attr replies. */
	s = new_session(false, 32);
	CHECK(do_init(s, 8, FUSE_ASYNC_READ, &o) == 0);
	CHECK(o.payload_len == FUSE_COMPAT_22_INIT_OUT_SIZE);
	struct req r;
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == FUSE_COMPAT_ENTRY_OUT_SIZE);
	req_start(&r, FUSE_GETATTR, 2);
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == FUSE_COMPAT_ATTR_OUT_SIZE);
	cas_fuse_session_free(s);

	/* 7.4: the 8-byte reply; statfs in its old size (7.3). */
	s = new_session(false, 32);
	CHECK(do_init(s, 4, 0, &o) == 0);
	CHECK(o.payload_len == FUSE_COMPAT_INIT_OUT_SIZE);
	memcpy(&io, o.payload, FUSE_COMPAT_INIT_OUT_SIZE);
	CHECK(io.major == 7 && io.minor == 4);
	cas_fuse_session_free(s);
	s = new_session(false, 32);
	CHECK(do_init(s, 3, 0, &o) == 0);
	req_start(&r, FUSE_STATFS, 1);
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == FUSE_COMPAT_STATFS_SIZE);
	cas_fuse_session_free(s);

	/* A newer major: answer with ours, stay uninitialised. */
	s = new_session(false, 32);
	req_start(&r, FUSE_INIT, 0);
	struct fuse_init_in in = {.major = 8, .minor = 1};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.reply.send && o.oh.error == 0 && o.payload_len == 8);
	memcpy(&io, o.payload, 8);
	CHECK(io.major == 7);
	CHECK(!cas_fuse_session_initialized(s));
	CHECK(do_init(s, 45, kernel_flags, &o) == 0);
	CHECK(cas_fuse_session_initialized(s));
	cas_fuse_session_free(s);

	/* An older major is refused. */
	s = new_session(false, 32);
	req_start(&r, FUSE_INIT, 0);
	in = (struct fuse_init_in){.major = 6, .minor = 99};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	CHECK(run_err(s, &r) == -EPROTO);
	CHECK(!cas_fuse_session_initialized(s));
	/* INIT with fewer than 8 bytes of arguments. */
	req_start(&r, FUSE_INIT, 0);
	req_add(&r, &in, 4);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	cas_fuse_session_free(s);
}

static void test_lookup_getattr(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;

	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.reply.send && o.oh.error == 0);
	CHECK(o.oh.unique == 1000 + FUSE_LOOKUP);
	CHECK(o.payload_len == sizeof(struct fuse_entry_out));
	struct fuse_entry_out eo;
	memcpy(&eo, o.payload, sizeof(eo));
	CHECK(eo.nodeid == 2 && eo.attr.ino == 2);
	CHECK(eo.generation == 7);
	CHECK(eo.entry_valid == UINT64_MAX);
	CHECK(eo.attr_valid == 1234 && eo.attr_valid_nsec == 5);
	CHECK(eo.attr.size == FILE_SIZE);
	CHECK(eo.attr.mode == (S_IFREG | 0444));
	CHECK(eo.attr.nlink == 1 && eo.attr.blksize == 4096);
	CHECK(eo.attr.mtime == 1 && eo.attr.blocks == (FILE_SIZE + 511) / 512);

	/* Absent names, negative entries, bad parents. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "nope");
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOENT);
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "negative");
	req_end(&r);
	run(s, &r, &o);
	memcpy(&eo, o.payload, sizeof(eo));
	CHECK(o.oh.error == 0 && eo.nodeid == 0 && eo.entry_valid == 99);
	req_start(&r, FUSE_LOOKUP, 999);
	req_name(&r, "file");
	req_end(&r);
	CHECK(run_err(s, &r) == -ESTALE);

	/* A name without its NUL, an empty name, a name too long. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_add(&r, "file", 4);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	req_start(&r, FUSE_LOOKUP, 1);
	req_add(&r, "\0\0", 2);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	req_start(&r, FUSE_LOOKUP, 1);
	char longname[CAS_FUSE_NAME_MAX + 2];
	memset(longname, 'x', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	req_name(&r, longname);
	req_end(&r);
	CHECK(run_err(s, &r) == -ENAMETOOLONG);
	/* The NUL lies beyond header.len, inside the buffer. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	r.len -= 1;
	req_end(&r);
	r.len += 1;
	CHECK(run_err(s, &r) == -EINVAL);

	/* GETATTR with and without its (7.9+) argument. */
	req_start(&r, FUSE_GETATTR, 5);
	struct fuse_getattr_in gin = {0};
	req_add(&r, &gin, sizeof(gin));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == sizeof(struct fuse_attr_out));
	struct fuse_attr_out ao;
	memcpy(&ao, o.payload, sizeof(ao));
	CHECK(ao.attr_valid == 4321 && ao.attr.ino == 5);
	CHECK(ao.attr.size == FDFILE_SIZE && ao.attr.mode == (S_IFREG | 0555));
	req_start(&r, FUSE_GETATTR, 1);
	req_end(&r);
	run(s, &r, &o);
	memcpy(&ao, o.payload, sizeof(ao));
	CHECK(o.oh.error == 0 && S_ISDIR(ao.attr.mode) && ao.attr.nlink == 3);
	req_start(&r, FUSE_GETATTR, 77);
	req_end(&r);
	CHECK(run_err(s, &r) == -ESTALE);

	/* READLINK, STATFS. */
	req_start(&r, FUSE_READLINK, 3);
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 4 &&
	      memcmp(o.payload, "file", 4) == 0);
	req_start(&r, FUSE_STATFS, 1);
	req_end(&r);
	run(s, &r, &o);
	struct fuse_statfs_out so;
	memcpy(&so, o.payload, sizeof(so));
	CHECK(o.oh.error == 0 && o.payload_len == sizeof(so));
	CHECK(so.st.blocks == 1000 && so.st.files == 5 && so.st.namelen == 255);
	cas_fuse_session_free(s);
}

static uint64_t open_file(struct cas_fuse_session *s, uint64_t ino,
			  uint32_t *ret_flags, int32_t *ret_backing)
{
	struct req r;
	struct out o;
	req_start(&r, FUSE_OPEN, ino);
	struct fuse_open_in in = {.flags = O_RDONLY};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0);
	CHECK(o.payload_len == sizeof(struct cas_fuse_open_out));
	struct cas_fuse_open_out oo;
	memcpy(&oo, o.payload, sizeof(oo));
	if (ret_flags)
		*ret_flags = oo.open_flags;
	if (ret_backing)
		*ret_backing = oo.backing_id;
	return oo.fh;
}

static int release_file(struct cas_fuse_session *s, uint64_t ino, uint64_t fh)
{
	struct req r;
	req_start(&r, FUSE_RELEASE, ino);
	struct fuse_release_in in = {.fh = fh};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	return run_err(s, &r);
}

static void read_req(struct req *r, uint64_t ino, uint64_t fh, uint64_t off,
		     uint32_t size)
{
	req_start(r, FUSE_READ, ino);
	struct fuse_read_in in = {.fh = fh, .offset = off, .size = size};
	req_add(r, &in, sizeof(in));
	req_end(r);
}

static void test_open_read(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;

	/* Writable opens are refused before the fs sees them. */
	uint32_t modes[] = {O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC,
			    O_WRONLY | O_APPEND};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(modes); i++) {
		req_start(&r, FUSE_OPEN, 2);
		struct fuse_open_in in = {.flags = modes[i]};
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		CHECK(run_err(s, &r) == -EROFS);
	}
	req_start(&r, FUSE_OPEN, 1);
	struct fuse_open_in oin = {.flags = O_RDONLY};
	req_add(&r, &oin, sizeof(oin));
	req_end(&r);
	CHECK(run_err(s, &r) == -EISDIR);

	uint32_t flags;
	int32_t backing;
	uint64_t fh = open_file(s, 2, &flags, &backing);
	CHECK(fh == 200);
	CHECK(flags == CAS_FOPEN_KEEP_CACHE);
	CHECK(backing == 0);

	/* Whole file through the buffer, in odd pieces. */
	uint64_t off = 0;
	size_t sizes[] = {1, 4095, 4096, 7, 100000};
	for (size_t i = 0; off < FILE_SIZE;
	     i = (i + 1) % CAS_ARRAY_SIZE(sizes)) {
		read_req(&r, 2, fh, off, (uint32_t)sizes[i]);
		run(s, &r, &o);
		CHECK(o.oh.error == 0 && o.reply.fd == -1);
		size_t want = CAS_MIN(sizes[i], (size_t)(FILE_SIZE - off));
		CHECK(o.payload_len == want);
		bool same = true;
		for (size_t k = 0; k < o.payload_len; k++)
			same &= o.payload[k] == pattern(off + k);
		CHECK(same);
		if (o.payload_len == 0)
			break;
		off += o.payload_len;
	}
	CHECK(off == FILE_SIZE);
	read_req(&r, 2, fh, FILE_SIZE + 5, 4096);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 0 && o.oh.len == 16);

	/* A wrong handle is the fs's error; a short READ is EINVAL. */
	read_req(&r, 2, 12345, 0, 10);
	CHECK(run_err(s, &r) == -EBADF);
	req_start(&r, FUSE_READ, 2);
	req_add(&r, &fh, 8);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	/* The pre-7.9 24-byte fuse_read_in is enough. */
	req_start(&r, FUSE_READ, 2);
	struct fuse_read_in rin = {.fh = fh, .offset = 3, .size = 2};
	req_add(&r, &rin, 24);
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 2 && o.payload[0] == 3);
	CHECK(release_file(s, 2, fh) == 0);

	/* Read through an fd: the reply is the header plus a file range. */
	fh = open_file(s, 5, &flags, &backing);
	CHECK(fh == 500);
	CHECK(!(flags & CAS_FOPEN_PASSTHROUGH)); /* not negotiated */
	CHECK(flags & CAS_FOPEN_KEEP_CACHE);
	read_req(&r, 5, fh, 1000, 65536);
	run(s, &r, &o);
	CHECK(o.oh.error == 0);
	CHECK(o.reply.fd == fake.memfd && o.reply.fd_offset == 1000);
	CHECK(o.reply.fd_len == 19000);
	CHECK(o.reply.len == 16 && o.oh.len == 16 + 19000);
	/* Larger than max_pages: capped. */
	read_req(&r, 5, fh, 0, 4u << 20);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.reply.fd_len == FDFILE_SIZE);
	CHECK(release_file(s, 5, fh) == 0);
	cas_fuse_session_free(s);

	/* max_pages 1: the kernel is told 1 page, but the buffer still holds
	 * the 32 pages of a kernel that ignores it. */
	s = new_session(false, 1);
	CHECK(do_init(s, 45, kernel_flags, &o) == 0);
	struct fuse_init_out io;
	memcpy(&io, o.payload, sizeof(io));
	CHECK(io.max_pages == 1);
	CHECK(cas_fuse_reply_bufsize(&(struct cas_fuse_config){
		      .max_pages = 1}) >= 16 + 32 * 4096);
	fh = open_file(s, 2, NULL, NULL);
	read_req(&r, 2, fh, 0, 10000);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 10000);
	cas_fuse_session_free(s);
}

/* Decodes a READDIR(PLUS) reply into names, checking record layout. */
static size_t decode_dir(const struct out *o, bool plus, char names_out[][16],
			 uint64_t *offs, uint64_t *nodeids, size_t max)
{
	size_t n = 0, pos = 0;
	size_t head = plus ? FUSE_NAME_OFFSET_DIRENTPLUS : FUSE_NAME_OFFSET;
	while (pos < o->payload_len) {
		CHECK(pos % 8 == 0);
		REQUIRE(o->payload_len - pos >= head);
		struct fuse_entry_out eo = {0};
		struct fuse_dirent de;
		if (plus) {
			memcpy(&eo, o->payload + pos, sizeof(eo));
			memcpy(&de, o->payload + pos + sizeof(eo), sizeof(de));
		} else {
			memcpy(&de, o->payload + pos, sizeof(de));
		}
		REQUIRE(de.namelen > 0 && de.namelen < 16);
		size_t rec = FUSE_DIRENT_ALIGN(head + de.namelen);
		REQUIRE(pos + rec <= o->payload_len);
		REQUIRE(n < max);
		memcpy(names_out[n], o->payload + pos + head, de.namelen);
		names_out[n][de.namelen] = '\0';
		for (size_t k = head + de.namelen; k < rec; k++)
			CHECK(o->payload[pos + k] == 0);
		offs[n] = de.off;
		nodeids[n] = plus ? eo.nodeid : de.ino;
		if (plus && eo.nodeid)
			CHECK(eo.attr.ino == de.ino && eo.entry_valid == 11);
		CHECK(de.type == (plus && eo.nodeid
					  ? (eo.attr.mode & S_IFMT) >> 12
					  : de.type));
		n++;
		pos += rec;
	}
	return n;
}

static void test_readdir(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;
	char nm[16][16];
	uint64_t offs[16], ids[16];

	req_start(&r, FUSE_OPENDIR, 1);
	struct fuse_open_in oin = {.flags = O_RDONLY | O_DIRECTORY};
	req_add(&r, &oin, sizeof(oin));
	req_end(&r);
	run(s, &r, &o);
	struct cas_fuse_open_out oo;
	memcpy(&oo, o.payload, sizeof(oo));
	CHECK(o.oh.error == 0 && oo.fh == 7);
	CHECK(oo.open_flags == (CAS_FOPEN_CACHE_DIR | CAS_FOPEN_KEEP_CACHE));
	CHECK(oo.backing_id == 0);

	for (int plus = 0; plus <= 1; plus++) {
		uint32_t opc = plus ? FUSE_READDIRPLUS : FUSE_READDIR;
		req_start(&r, opc, 1);
		struct fuse_read_in in = {.fh = 7, .size = 4096};
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		run(s, &r, &o);
		CHECK(o.oh.error == 0);
		size_t n = decode_dir(&o, plus, nm, offs, ids, 16);
		CHECK(n == 6);
		CHECK(strcmp(nm[0], ".") == 0 && strcmp(nm[1], "..") == 0);
		CHECK(strcmp(nm[2], "file") == 0 &&
		      strcmp(nm[5], "fdfile") == 0);
		CHECK(offs[0] == 1 && offs[5] == 6);
		if (plus) {
			/* "." and "..": no attributes, no lookup. */
			CHECK(ids[0] == 0 && ids[1] == 0);
			CHECK(ids[2] == 2 && ids[5] == 5);
		} else {
			CHECK(ids[2] == 2 && ids[3] == 3);
		}

		/* A small buffer: entries stop where the kernel's size ends,
		 * and the offset resumes after the last one. */
		size_t one = plus ? FUSE_DIRENT_ALIGN(
					    FUSE_NAME_OFFSET_DIRENTPLUS + 4)
				  : FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + 4);
		uint64_t off = 0;
		size_t total = 0;
		for (int iter = 0; iter < 20; iter++) {
			req_start(&r, opc, 1);
			in = (struct fuse_read_in){
				.fh = 7, .offset = off, .size = (uint32_t)one};
			req_add(&r, &in, sizeof(in));
			req_end(&r);
			run(s, &r, &o);
			CHECK(o.oh.error == 0);
			CHECK(o.payload_len <= one);
			n = decode_dir(&o, plus, nm, offs, ids, 16);
			if (n == 0)
				break;
			CHECK(n == 1);
			off = offs[n - 1];
			total += n;
		}
		CHECK(total == 6);
		/* Every record of this directory has the same aligned size:
		 * exactly size / rec of them fit, never a byte more. */
		size_t rec = plus ? 160 : 32;
		size_t sizes[] = {rec - 1,     rec,	rec + 7,
				  2 * rec - 1, 2 * rec, 5 * rec + 3};
		for (size_t k = 0; k < CAS_ARRAY_SIZE(sizes); k++) {
			req_start(&r, opc, 1);
			in = (struct fuse_read_in){.fh = 7,
						   .size = (uint32_t)sizes[k]};
			req_add(&r, &in, sizeof(in));
			req_end(&r);
			run(s, &r, &o);
			CHECK(o.payload_len <= sizes[k]);
			n = decode_dir(&o, plus, nm, offs, ids, 16);
			CHECK(n == sizes[k] / rec);
			CHECK(o.payload_len == n * rec);
		}
		/* Too small for any entry: an empty reply. */
		req_start(&r, opc, 1);
		in = (struct fuse_read_in){.fh = 7, .size = 10};
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		run(s, &r, &o);
		CHECK(o.oh.error == 0 && o.payload_len == 0);
	}
	/* An empty dir, and readdir of a file. */
	req_start(&r, FUSE_READDIR, 4);
	struct fuse_read_in in = {.fh = 7, .size = 4096};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 0);
	req_start(&r, FUSE_READDIR, 2);
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOTDIR);

	req_start(&r, FUSE_RELEASEDIR, 1);
	struct fuse_release_in rin = {.fh = 7};
	req_add(&r, &rin, sizeof(rin));
	req_end(&r);
	CHECK(run_err(s, &r) == 0);
	cas_fuse_session_free(s);
}

static void test_truncated(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;

	/* Shorter than a header: nothing to answer to. */
	for (size_t n = 0; n < sizeof(struct fuse_in_header); n++) {
		req_start(&r, FUSE_GETATTR, 1);
		req_end(&r);
		struct iovec iov = {.iov_base = r.b, .iov_len = n};
		run_iov(s, &iov, 1, &o);
		CHECK(!o.reply.send);
	}
	run_iov(s, NULL, 0, &o);
	CHECK(!o.reply.send);

	/* len larger than the input. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	r.len -= 1;
	CHECK(run_err(s, &r) == -EINVAL);
	/* len smaller than a header. */
	req_start(&r, FUSE_GETATTR, 1);
	req_end(&r);
	uint32_t bad = 10;
	memcpy(r.b, &bad, 4);
	CHECK(run_err(s, &r) == -EINVAL);
	bad = UINT32_MAX;
	memcpy(r.b, &bad, 4);
	CHECK(run_err(s, &r) == -EINVAL);
	/* len smaller than the opcode's minimum (bytes beyond len ignored). */
	read_req(&r, 2, 200, 0, 100);
	bad = sizeof(struct fuse_in_header) + 16;
	memcpy(r.b, &bad, 4);
	CHECK(run_err(s, &r) == -EINVAL);
	req_start(&r, FUSE_OPEN, 2);
	req_add(&r, "\0\0\0", 3);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	req_start(&r, FUSE_GETXATTR, 2);
	req_add(&r, "\0\0\0\0\0\0\0\0", 8);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	/* Extensions longer than the request. */
	req_start(&r, FUSE_GETATTR, 1);
	req_end(&r);
	struct fuse_in_header h;
	memcpy(&h, r.b, sizeof(h));
	h.total_extlen = 1;
	memcpy(r.b, &h, sizeof(h));
	CHECK(run_err(s, &r) == -EINVAL);
	/* Extensions that fit are skipped. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "dir");
	req_add(&r, "\0\0\0\0\0\0\0\0", 8);
	req_end(&r);
	memcpy(&h, r.b, sizeof(h));
	h.total_extlen = 1;
	memcpy(r.b, &h, sizeof(h));
	CHECK(run_err(s, &r) == 0);

	/* Unknown opcodes, a hole in the table, huge ones. */
	uint32_t unknown[] = {0, 7, 19, 53, 99, 4096, 1u << 24, UINT32_MAX};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(unknown); i++) {
		req_start(&r, unknown[i], 1);
		req_end(&r);
		CHECK(run_err(s, &r) == -ENOSYS);
	}
	/* Known but unsupported. */
	uint32_t enosys[] = {FUSE_FLUSH,	FUSE_GETLK,
			     FUSE_SETLK,	FUSE_SETLKW,
			     FUSE_BMAP,		FUSE_POLL,
			     FUSE_LSEEK,	CAS_FUSE_STATX,
			     FUSE_SETUPMAPPING, FUSE_REMOVEMAPPING};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(enosys); i++) {
		req_start(&r, enosys[i], 2);
		req_add(&r, reply_buf, 64);
		req_end(&r);
		CHECK(run_err(s, &r) == -ENOSYS);
	}
	req_start(&r, FUSE_IOCTL, 2);
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOTTY);
	/* Harmless ones answer 0. */
	uint32_t ok[] = {FUSE_FSYNC, FUSE_FSYNCDIR, FUSE_SYNCFS};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(ok); i++) {
		req_start(&r, ok[i], 2);
		req_add(&r, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
			24);
		req_end(&r);
		CHECK(run_err(s, &r) == 0);
	}
	/* INTERRUPT and NOTIFY_REPLY: no reply, whatever their size. */
	req_start(&r, FUSE_INTERRUPT, 0);
	uint64_t u = 1234;
	req_add(&r, &u, sizeof(u));
	req_end(&r);
	CHECK(run_err(s, &r) == 1);
	req_start(&r, FUSE_INTERRUPT, 0);
	req_end(&r);
	r.len += 3; /* len claims less than the input: fine */
	CHECK(run_err(s, &r) == 1);
	req_start(&r, FUSE_NOTIFY_REPLY, 0);
	req_end(&r);
	CHECK(run_err(s, &r) == 1);
	cas_fuse_session_free(s);
}

static void test_split(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;
	uint8_t whole[512];

	/* A LOOKUP and a READ split in two and three pieces everywhere. */
	for (int which = 0; which < 2; which++) {
		if (which == 0) {
			req_start(&r, FUSE_LOOKUP, 1);
			req_name(&r, "fdfile");
			req_end(&r);
		} else {
			read_req(&r, 2, 200, 100, 300);
		}
		run(s, &r, &o);
		REQUIRE(o.oh.error == 0 && o.reply.len <= sizeof(whole));
		size_t wlen = o.reply.len;
		memcpy(whole, reply_buf, wlen);
		int mismatches = 0;
		for (size_t a = 0; a <= r.len; a++) {
			for (size_t b = a; b <= r.len; b++) {
				/* Copies into separate allocations so ASan sees
				 * any read past a piece. */
				uint8_t *p[3];
				struct iovec iov[3];
				size_t cut[4] = {0, a, b, r.len};
				for (int k = 0; k < 3; k++) {
					size_t n = cut[k + 1] - cut[k];
					p[k] = malloc(n ? n : 1);
					memcpy(p[k], r.b + cut[k], n);
					iov[k] = (struct iovec){p[k], n};
				}
				run_iov(s, iov, 3, &o);
				if (o.reply.len != wlen ||
				    memcmp(reply_buf, whole, wlen) != 0)
					mismatches++;
				for (int k = 0; k < 3; k++)
					free(p[k]);
			}
		}
		CHECK(mismatches == 0);
	}
	/* Truncation inside a split request. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	struct iovec iov[2] = {{r.b, 20}, {r.b + 20, r.len - 21}};
	run_iov(s, iov, 2, &o);
	CHECK(o.reply.send && o.oh.error == -EINVAL);
	/* Empty pieces are fine. */
	struct iovec iov4[4] = {
		{r.b, 0}, {r.b, 40}, {r.b, 0}, {r.b + 40, r.len - 40}};
	run_iov(s, iov4, 4, &o);
	CHECK(o.reply.send && o.oh.error == 0);
	cas_fuse_session_free(s);
}

static void test_forget(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;

	atomic_store(&fake.forgets, 0);
	atomic_store(&fake.forget_sum, 0);
	req_start(&r, FUSE_FORGET, 2);
	struct fuse_forget_in fin = {.nlookup = 3};
	req_add(&r, &fin, sizeof(fin));
	req_end(&r);
	CHECK(run_err(s, &r) == 1);
	CHECK(fake.forgets == 1 && fake.forget_sum == 3);
	/* Truncated FORGET: ignored, still no reply. */
	req_start(&r, FUSE_FORGET, 2);
	req_add(&r, &fin, 4);
	req_end(&r);
	CHECK(run_err(s, &r) == 1);
	CHECK(fake.forgets == 1);

	/* BATCH_FORGET: exact, and with counts larger than the entries. */
	uint32_t counts[] = {2, 3, 1000, UINT32_MAX, 0};
	unsigned want[] = {2, 2, 2, 2, 0};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(counts); i++) {
		atomic_store(&fake.forgets, 0);
		req_start(&r, FUSE_BATCH_FORGET, 0);
		struct fuse_batch_forget_in bin = {.count = counts[i]};
		req_add(&r, &bin, sizeof(bin));
		struct fuse_forget_one one[2] = {{2, 1}, {3, 5}};
		req_add(&r, one, sizeof(one));
		req_add(&r, "\1\2\3", 3); /* a partial third entry */
		req_end(&r);
		CHECK(run_err(s, &r) == 1);
		CHECK(fake.forgets == want[i]);
	}
	/* BATCH_FORGET shorter than its header. */
	atomic_store(&fake.forgets, 0);
	req_start(&r, FUSE_BATCH_FORGET, 0);
	req_add(&r, "\5\0\0", 3);
	req_end(&r);
	CHECK(run_err(s, &r) == 1);
	/* Header len larger than the input: still no reply. */
	req_start(&r, FUSE_BATCH_FORGET, 0);
	req_add(&r, "\5\0\0\0\0\0\0\0", 8);
	req_end(&r);
	r.len -= 2;
	CHECK(run_err(s, &r) == 1);
	CHECK(fake.forgets == 0);
	cas_fuse_session_free(s);
}

static void test_readonly(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	uint32_t mods[] = {
		FUSE_SETATTR,	FUSE_SYMLINK,	  FUSE_MKNOD,
		FUSE_MKDIR,	FUSE_UNLINK,	  FUSE_RMDIR,
		FUSE_RENAME,	FUSE_LINK,	  FUSE_WRITE,
		FUSE_SETXATTR,	FUSE_REMOVEXATTR, FUSE_CREATE,
		FUSE_FALLOCATE, FUSE_RENAME2,	  FUSE_COPY_FILE_RANGE,
		FUSE_TMPFILE};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(mods); i++) {
		req_start(&r, mods[i], 2);
		req_add(&r, reply_buf, 80);
		req_name(&r, "x");
		req_end(&r);
		CHECK(run_err(s, &r) == -EROFS);
		/* Even with no arguments at all. */
		req_start(&r, mods[i], 2);
		req_end(&r);
		CHECK(run_err(s, &r) == -EROFS);
	}
	/* ACCESS for writing is refused, the rest allowed (NULL op: ENOSYS,
	 * which the kernel takes as "allowed from now on"). */
	req_start(&r, FUSE_ACCESS, 2);
	struct fuse_access_in ain = {.mask = W_OK};
	req_add(&r, &ain, sizeof(ain));
	req_end(&r);
	CHECK(run_err(s, &r) == -EROFS);
	req_start(&r, FUSE_ACCESS, 2);
	ain.mask = R_OK;
	req_add(&r, &ain, sizeof(ain));
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOSYS);
	cas_fuse_session_free(s);
}

static void test_xattr(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;
	struct fuse_getxattr_in gin = {.size = 100};

	/* No getxattr op: ENOSYS. */
	fake_ops.getxattr = NULL;
	req_start(&r, FUSE_GETXATTR, 2);
	req_add(&r, &gin, sizeof(gin));
	req_name(&r, "user.test");
	req_end(&r);
	CHECK(run_err(s, &r) == -ENOSYS);

	fake_ops.getxattr = f_getxattr;
	fake.with_xattr = true;
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 5 &&
	      memcmp(o.payload, "value", 5) == 0);
	/* size 0 asks for the length. */
	req_start(&r, FUSE_GETXATTR, 2);
	gin.size = 0;
	req_add(&r, &gin, sizeof(gin));
	req_name(&r, "user.test");
	req_end(&r);
	run(s, &r, &o);
	struct fuse_getxattr_out gout;
	memcpy(&gout, o.payload, sizeof(gout));
	CHECK(o.oh.error == 0 && o.payload_len == sizeof(gout) &&
	      gout.size == 5);
	/* Too small, absent, unterminated name. */
	req_start(&r, FUSE_GETXATTR, 2);
	gin.size = 3;
	req_add(&r, &gin, sizeof(gin));
	req_name(&r, "user.test");
	req_end(&r);
	CHECK(run_err(s, &r) == -ERANGE);
	req_start(&r, FUSE_GETXATTR, 2);
	gin.size = 100;
	req_add(&r, &gin, sizeof(gin));
	req_name(&r, "user.other");
	req_end(&r);
	CHECK(run_err(s, &r) == -ENODATA);
	req_start(&r, FUSE_GETXATTR, 2);
	req_add(&r, &gin, sizeof(gin));
	req_add(&r, "user.test", 9);
	req_end(&r);
	CHECK(run_err(s, &r) == -EINVAL);
	/* Huge size: clamped to what we can carry. */
	req_start(&r, FUSE_GETXATTR, 2);
	gin.size = UINT32_MAX;
	req_add(&r, &gin, sizeof(gin));
	req_name(&r, "user.test");
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 5);

	req_start(&r, FUSE_LISTXATTR, 2);
	gin.size = 0;
	req_add(&r, &gin, sizeof(gin));
	req_end(&r);
	run(s, &r, &o);
	memcpy(&gout, o.payload, sizeof(gout));
	CHECK(o.oh.error == 0 && gout.size == 10);
	req_start(&r, FUSE_LISTXATTR, 2);
	gin.size = 64;
	req_add(&r, &gin, sizeof(gin));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && o.payload_len == 10 &&
	      memcmp(o.payload, "user.test", 10) == 0);
	fake_ops.listxattr = NULL;
	CHECK(run_err(s, &r) == -ENOSYS);
	fake_ops.listxattr = f_listxattr;
	fake_ops.getxattr = NULL;
	cas_fuse_session_free(s);
}

static void test_passthrough(void)
{
	struct cas_fuse_session *s = ready_session(true);
	struct req r;
	struct out o;
	atomic_store(&fake.backing_opens, 0);
	atomic_store(&fake.backing_closes, 0);

	/* A file with a backing fd: FOPEN_PASSTHROUGH, an id, and no caching
	 * flags (the kernel refuses them together). */
	uint32_t flags;
	int32_t id1, id2, id3;
	uint64_t fh1 = open_file(s, 5, &flags, &id1);
	CHECK(flags == CAS_FOPEN_PASSTHROUGH);
	CHECK(id1 > 0);
	CHECK(fake.backing_opens == 1);
	/* A second open of the node shares the id. */
	uint64_t fh2 = open_file(s, 5, &flags, &id2);
	CHECK(flags == CAS_FOPEN_PASSTHROUGH && id2 == id1);
	CHECK(fake.backing_opens == 1);
	/* A file without a backing fd: ordinary open. */
	uint64_t fh3 = open_file(s, 2, &flags, &id3);
	CHECK(flags == CAS_FOPEN_KEEP_CACHE && id3 == 0);
	CHECK(release_file(s, 2, fh3) == 0);
	CHECK(fake.backing_closes == 0);
	/* The id lives until the last release of the node. */
	CHECK(release_file(s, 5, fh1) == 0);
	CHECK(fake.backing_closes == 0);
	CHECK(release_file(s, 5, fh2) == 0);
	CHECK(fake.backing_closes == 1);
	/* A stray release changes nothing. */
	CHECK(release_file(s, 5, fh2) == 0);
	CHECK(fake.backing_closes == 1);
	/* Reopen: a new id. */
	fh1 = open_file(s, 5, &flags, &id1);
	CHECK(fake.backing_opens == 2 && id1 > 0 && id1 != id2);
	CHECK(release_file(s, 5, fh1) == 0);
	CHECK(fake.backing_closes == 2);

	/* backing_open failing for a passing reason: a plain open with the
	 * fs's flags, and the next open tries again. */
	fake.backing_fail = -EMFILE;
	fh1 = open_file(s, 5, &flags, &id1);
	CHECK(flags == CAS_FOPEN_KEEP_CACHE && id1 == 0);
	CHECK(release_file(s, 5, fh1) == 0);
	CHECK(fake.backing_closes == 2);
	fake.backing_fail = 0;
	fh1 = open_file(s, 5, &flags, &id1);
	CHECK(flags == CAS_FOPEN_PASSTHROUGH && id1 > 0);
	CHECK(release_file(s, 5, fh1) == 0);
	CHECK(fake.backing_opens == 3 && fake.backing_closes == 3);

	/* A READ answered from an fd holds the open until the transport says
	 * the reply is done: read_done once, for that node and handle; a
	 * buffer READ or an error reply holds nothing. */
	fh1 = open_file(s, 5, NULL, NULL);
	unsigned dones = atomic_load(&fake.read_dones);
	read_req(&r, 5, fh1, 0, 10);
	run(s, &r, &o);
	CHECK(o.reply.fd >= 0 && atomic_load(&fake.read_dones) == dones);
	cas_fuse_reply_done(s, &o.reply);
	CHECK(atomic_load(&fake.read_dones) == dones + 1);
	CHECK(fake.last_done_ino == 5 && fake.last_done_fh == fh1);
	CHECK(o.reply.fd == -1);
	cas_fuse_reply_done(s, &o.reply);
	CHECK(atomic_load(&fake.read_dones) == dones + 1);
	read_req(&r, 5, fh1 + 1, 0, 10);
	run(s, &r, &o);
	cas_fuse_reply_done(s, &o.reply);
	CHECK(atomic_load(&fake.read_dones) == dones + 1);
	CHECK(release_file(s, 5, fh1) == 0);

	/* A failure that will not pass (no privilege): not tried again. */
	fake.backing_fail = -EPERM;
	int attempts = fake.backing_attempts;
	for (int i = 0; i < 3; i++) {
		fh1 = open_file(s, 5, &flags, &id1);
		CHECK(flags == CAS_FOPEN_KEEP_CACHE && id1 == 0);
		CHECK(release_file(s, 5, fh1) == 0);
	}
	CHECK(fake.backing_attempts == attempts + 1);
	fake.backing_fail = 0;
	cas_fuse_session_free(s);
}

/* An OPEN or OPENDIR whose reply the kernel refused (the request was
 * interrupted: ENOENT from /dev/fuse, and the transport marks the reply
 * lost) hands its handle to nobody, who would ever RELEASE it: the
 * engine releases it, passthrough id included. A delivered reply, or a
 * lost one that opened nothing, releases nothing. */
static void test_lost_open(void)
{
	struct cas_fuse_session *s = ready_session(true);
	struct req r;
	struct out o;
	unsigned rel = fake.releases, reldirs = fake.releasedirs;
	int opens = fake.backing_opens, closes = fake.backing_closes;

	req_start(&r, FUSE_OPEN, 5);
	struct fuse_open_in in = {.flags = O_RDONLY};
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0 && fake.backing_opens == opens + 1);
	o.reply.lost = true;
	cas_fuse_reply_done(s, &o.reply);
	CHECK(fake.releases == rel + 1);
	CHECK(fake.backing_closes == closes + 1);

	uint64_t fh = open_file(s, 5, NULL, NULL); /* delivered */
	CHECK(fake.releases == rel + 1);
	CHECK(release_file(s, 5, fh) == 0);
	CHECK(fake.releases == rel + 2);

	req_start(&r, FUSE_OPENDIR, 1);
	req_add(&r, &in, sizeof(in));
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.oh.error == 0);
	o.reply.lost = true;
	cas_fuse_reply_done(s, &o.reply);
	CHECK(fake.releasedirs == reldirs + 1);

	req_start(&r, FUSE_GETATTR, 2);
	struct fuse_getattr_in gin = {0};
	req_add(&r, &gin, sizeof(gin));
	req_end(&r);
	run(s, &r, &o);
	o.reply.lost = true;
	cas_fuse_reply_done(s, &o.reply);
	CHECK(fake.releases == rel + 2 && fake.releasedirs == reldirs + 1);
	cas_fuse_session_free(s);
}

static void test_destroy(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;
	fake.destroy_calls = 0;
	req_start(&r, FUSE_DESTROY, 0);
	req_end(&r);
	run(s, &r, &o);
	CHECK(o.reply.send && o.oh.error == 0 && o.reply.destroyed);
	CHECK(fake.destroy_calls == 1);
	req_start(&r, FUSE_GETATTR, 1);
	req_end(&r);
	CHECK(run_err(s, &r) == -EIO);
	req_start(&r, FUSE_DESTROY, 0);
	req_end(&r);
	CHECK(run_err(s, &r) == -EIO);
	CHECK(fake.destroy_calls == 1);
	cas_fuse_session_free(s);
}

struct thread_arg {
	struct cas_fuse_session *s;
	int id;
	int errors;
};

static void *thread_main(void *p)
{
	struct thread_arg *t = p;
	size_t size = 65536 + 4096;
	uint8_t *buf = malloc(size);
	struct req r;
	for (int i = 0; i < 2000; i++) {
		struct cas_fuse_reply reply = {.buf = buf, .buf_size = size};
		if (i % 3 == 0) {
			req_start(&r, FUSE_LOOKUP, 1);
			req_name(&r, "file");
		} else if (i % 3 == 1) {
			req_start(&r, FUSE_OPEN, 5);
			struct fuse_open_in in = {.flags = O_RDONLY};
			req_add(&r, &in, sizeof(in));
		} else {
			read_req(&r, 2, 200, (uint64_t)(i * 7 % FILE_SIZE),
				 512);
		}
		req_end(&r);
		struct iovec iov = {r.b, r.len};
		cas_fuse_session_process(t->s, &iov, 1, &reply);
		struct fuse_out_header oh;
		memcpy(&oh, buf, sizeof(oh));
		if (!reply.send || oh.error != 0)
			t->errors++;
		if (i % 3 == 1) {
			struct cas_fuse_open_out oo;
			memcpy(&oo, buf + sizeof(oh), sizeof(oo));
			if (!(oo.open_flags & CAS_FOPEN_PASSTHROUGH))
				t->errors++;
			req_start(&r, FUSE_RELEASE, 5);
			struct fuse_release_in rin = {.fh = oo.fh};
			req_add(&r, &rin, sizeof(rin));
			req_end(&r);
			iov = (struct iovec){r.b, r.len};
			cas_fuse_session_process(t->s, &iov, 1, &reply);
		}
	}
	free(buf);
	return NULL;
}

static void test_threads(void)
{
	atomic_store(&fake.backing_opens, 0);
	atomic_store(&fake.backing_closes, 0);
	struct cas_fuse_session *s = ready_session(true);
	pthread_t th[8];
	struct thread_arg args[8];
	for (int i = 0; i < 8; i++) {
		args[i] = (struct thread_arg){.s = s, .id = i};
		REQUIRE(pthread_create(&th[i], NULL, thread_main, &args[i]) ==
			0);
	}
	int errors = 0;
	for (int i = 0; i < 8; i++) {
		pthread_join(th[i], NULL);
		errors += args[i].errors;
	}
	CHECK(errors == 0);
	/* Every id opened was closed again. */
	CHECK(fake.backing_opens == fake.backing_closes);
	CHECK(fake.backing_opens >= 1);
	cas_fuse_session_free(s);
}

static void test_small_reply_buffer(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	uint8_t small[20];
	struct cas_fuse_reply reply = {.buf = small, .buf_size = sizeof(small)};
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	struct iovec iov = {r.b, r.len};
	CHECK(cas_fuse_session_process(s, &iov, 1, &reply) == 0);
	struct fuse_out_header oh;
	memcpy(&oh, small, sizeof(oh));
	CHECK(reply.send && oh.error == -EIO && reply.len == sizeof(oh));
	/* A read into a tiny buffer is cut to it. */
	read_req(&r, 2, 200, 0, 100);
	iov = (struct iovec){r.b, r.len};
	CHECK(cas_fuse_session_process(s, &iov, 1, &reply) == 0);
	memcpy(&oh, small, sizeof(oh));
	CHECK(reply.send && oh.error == 0 && reply.len == sizeof(small));
	/* Smaller than a header: nothing can be sent. */
	reply.buf_size = 8;
	CHECK(cas_fuse_session_process(s, &iov, 1, &reply) == 0);
	CHECK(!reply.send);
	cas_fuse_session_free(s);
}

static void test_cursor(void)
{
	uint8_t a[] = {1, 2, 3}, b[] = {4}, c[] = {5, 6, 0, 8};
	struct iovec iov[] = {{a, 3}, {b, 0}, {b, 1}, {c, 4}};
	struct cas_fuse_cursor cur;
	cas_fuse_cursor_init(&cur, iov, 4);
	CHECK(cur.left == 8);
	uint8_t out[8];
	CHECK(cas_fuse_cursor_copy(&cur, out, 2) == 0 && out[1] == 2);
	CHECK(cas_fuse_cursor_copy(&cur, NULL, 1) == 0);
	char name[8];
	size_t len;
	CHECK(cas_fuse_cursor_name(&cur, name, sizeof(name), &len) == 0);
	CHECK(len == 3 && memcmp(name, "\4\5\6", 4) == 0);
	CHECK(cur.left == 1);
	CHECK(cas_fuse_cursor_copy(&cur, out, 2) == -EINVAL);
	CHECK(cas_fuse_cursor_copy(&cur, out, 1) == 0 && out[0] == 8);
	CHECK(cas_fuse_cursor_copy(&cur, out, 1) == -EINVAL);
	CHECK(cas_fuse_cursor_copy(&cur, out, 0) == 0);

	/* Lengths that wrap size_t do not make the input look long. */
	struct iovec huge[] = {{a, SIZE_MAX}, {b, 2}};
	cas_fuse_cursor_init(&cur, huge, 2);
	CHECK(cur.left == SIZE_MAX);
	cas_fuse_cursor_init(&cur, iov, -3);
	CHECK(cur.left == 0);

	cas_fuse_cursor_init(&cur, iov, 4);
	cas_fuse_cursor_limit(&cur, 5);
	CHECK(cas_fuse_cursor_copy(&cur, out, 6) == -EINVAL);
	CHECK(cas_fuse_cursor_copy(&cur, out, 5) == 0 && out[4] == 5);
	cas_fuse_cursor_limit(&cur, 100);
	CHECK(cur.left == 0);

	/* Partial copies zero-fill. */
	cas_fuse_cursor_init(&cur, iov, 4);
	memset(out, 0xff, sizeof(out));
	uint8_t big[16];
	CHECK(cas_fuse_cursor_copy_partial(&cur, big, sizeof(big), 8) == 0);
	CHECK(big[7] == 8 && big[8] == 0 && big[15] == 0);
	cas_fuse_cursor_init(&cur, iov, 4);
	CHECK(cas_fuse_cursor_copy_partial(&cur, big, sizeof(big), 9) ==
	      -EINVAL);

	CHECK(strcmp(cas_fuse_opcode_name(FUSE_LOOKUP), "LOOKUP") == 0);
	CHECK(strcmp(cas_fuse_opcode_name(12345), "UNKNOWN") == 0);
}

/* What a transport may ask of a reply: shorten its fd part, fail it. */
static void test_reply_rewrites(void)
{
	struct cas_fuse_session *s = ready_session(false);
	struct req r;
	struct out o;
	unsigned dones = atomic_load(&fake.read_dones);

	uint64_t fh = open_file(s, 5, NULL, NULL);
	read_req(&r, 5, fh, 0, 4096);
	run(s, &r, &o);
	REQUIRE(o.reply.fd >= 0 && o.reply.fd_len == 4096);
	cas_fuse_reply_shorten(&o.reply, 1000);
	memcpy(&o.oh, reply_buf, sizeof(o.oh));
	CHECK(o.oh.len == sizeof(o.oh) + 1000 && o.oh.error == 0);
	CHECK(o.reply.fd_len == 1000 && o.reply.len == sizeof(o.oh));
	cas_fuse_reply_shorten(&o.reply, 5000); /* never grows */
	CHECK(o.reply.fd_len == 1000);
	cas_fuse_reply_done(s, &o.reply);
	CHECK(atomic_load(&fake.read_dones) == dones + 1);

	/* Nothing read of what was promised: EIO, and read_done still. */
	run(s, &r, &o);
	REQUIRE(o.reply.fd >= 0);
	cas_fuse_reply_shorten(&o.reply, 0);
	memcpy(&o.oh, reply_buf, sizeof(o.oh));
	CHECK(o.oh.error == -EIO && o.oh.len == sizeof(o.oh));
	CHECK(o.reply.len == sizeof(o.oh) && o.reply.fd_len == 0);
	CHECK(o.oh.unique == o.reply.unique);
	cas_fuse_reply_done(s, &o.reply);
	CHECK(atomic_load(&fake.read_dones) == dones + 2);
	CHECK(release_file(s, 5, fh) == 0);

	/* Fail turns any reply into a bare error; a bogus error is EIO. */
	req_start(&r, FUSE_LOOKUP, 1);
	req_name(&r, "file");
	req_end(&r);
	run(s, &r, &o);
	REQUIRE(o.oh.error == 0 && o.reply.len > sizeof(o.oh));
	cas_fuse_reply_fail(&o.reply, -ENOBUFS);
	memcpy(&o.oh, reply_buf, sizeof(o.oh));
	CHECK(o.oh.error == -ENOBUFS && o.oh.len == sizeof(o.oh));
	cas_fuse_reply_fail(&o.reply, 5);
	memcpy(&o.oh, reply_buf, sizeof(o.oh));
	CHECK(o.oh.error == -EIO);

	/* Answering without a session: by the request's own header. */
	struct iovec iov = {r.b, r.len};
	struct cas_fuse_reply rep = {.buf = reply_buf, .buf_size = reply_size};
	cas_fuse_request_fail(&iov, 1, &rep, -EIO);
	memcpy(&o.oh, reply_buf, sizeof(o.oh));
	CHECK(rep.send && rep.len == sizeof(o.oh) && o.oh.error == -EIO);
	CHECK(o.oh.unique == 1000 + FUSE_LOOKUP && o.oh.len == sizeof(o.oh));
	CHECK(!cas_fuse_request_is_init(&iov, 1));
	iov.iov_len = 20; /* no whole header: nothing to answer */
	cas_fuse_request_fail(&iov, 1, &rep, -EIO);
	CHECK(!rep.send);
	CHECK(!cas_fuse_request_is_init(&iov, 1));
	req_start(&r, FUSE_FORGET, 2);
	struct fuse_forget_in fi = {.nlookup = 0};
	req_add(&r, &fi, sizeof(fi));
	req_end(&r);
	iov = (struct iovec){r.b, r.len};
	cas_fuse_request_fail(&iov, 1, &rep, -EIO);
	CHECK(!rep.send); /* FORGET takes no reply */
	req_start(&r, FUSE_INIT, 0);
	req_end(&r);
	iov = (struct iovec){r.b, r.len};
	CHECK(cas_fuse_request_is_init(&iov, 1));

	CHECK(cas_fuse_session_count(s, FUSE_LOOKUP) == 1);
	CHECK(cas_fuse_session_count(s, FUSE_READ) == 2);
	CHECK(cas_fuse_session_count(s, FUSE_OPEN) == 1);
	CHECK(cas_fuse_session_count(s, FUSE_INIT) == 1);
	CHECK(cas_fuse_session_count(s, FUSE_FORGET) == 0);
	cas_fuse_session_free(s);
}

/* A ring entry as the kernel fills it: in_header, first argument in
 * op_in, the rest in the payload. */
struct ring_ent {
	struct cas_fuse_uring_req_header h;
	uint8_t payload[256 * 1024];
};

static void ring_request(struct ring_ent *e, uint32_t opcode, uint64_t nodeid,
			 const void *arg0, size_t arg0_len, const void *rest,
			 size_t rest_len)
{
	memset(&e->h, 0x5a, sizeof(e->h));
	struct fuse_in_header ih = {
		.len = (uint32_t)(sizeof(ih) + arg0_len + rest_len),
		.opcode = opcode,
		.unique = 4242,
		.nodeid = nodeid,
	};
	memcpy(e->h.in_out, &ih, sizeof(ih));
	if (arg0_len)
		memcpy(e->h.op_in, arg0, arg0_len);
	if (rest_len)
		memcpy(e->payload, rest, rest_len);
	struct cas_fuse_uring_ent_in_out io = {
		.commit_id = 99,
		.payload_sz = (uint32_t)rest_len,
	};
	memcpy(&e->h.ring_ent_in_out, &io, sizeof(io));
}

/* Runs and commits one ring entry; returns the reply's error and leaves
 * the reply header in *ret_oh and the payload size in *ret_len. */
static int ring_run(struct cas_fuse_session *s, struct ring_ent *e,
		    struct fuse_out_header *ret_oh, size_t *ret_len)
{
	struct cas_fuse_reply rep = {.buf = reply_buf, .buf_size = reply_size};
	CHECK(cas_fuse_session_process_uring(s, &e->h, e->payload,
					     sizeof(e->payload), &rep) == 0);
	if (rep.fd >= 0) {
		/* What a transport does: the file data after the reply. */
		ssize_t n =
			pread(rep.fd, e->payload + rep.len - sizeof(*ret_oh),
			      rep.fd_len, (off_t)rep.fd_offset);
		cas_fuse_reply_shorten(&rep, n > 0 ? (size_t)n : 0);
	}
	CHECK(cas_fuse_uring_commit(&e->h, e->payload, sizeof(e->payload),
				    &rep) == 99);
	cas_fuse_reply_done(s, &rep);
	memcpy(ret_oh, e->h.in_out, sizeof(*ret_oh));
	struct cas_fuse_uring_ent_in_out io;
	memcpy(&io, &e->h.ring_ent_in_out, sizeof(io));
	*ret_len = io.payload_sz;
	CHECK(ret_oh->unique == 4242);
	CHECK(ret_oh->len == sizeof(*ret_oh) + io.payload_sz);
	if (ret_oh->error)
		CHECK(io.payload_sz == 0);
	return ret_oh->error;
}

static void test_uring(void)
{
	/* INIT offers io_uring only when the transport asks for it. */
	for (int ask = 0; ask < 2; ask++) {
		struct cas_fuse_config cfg = {.readonly = true,
					      .io_uring = ask};
		struct cas_fuse_session *s;
		REQUIRE(cas_fuse_session_new(&fake_ops, &fake, &cfg, &s) == 0);
		struct out o;
		REQUIRE(do_init(s, 45, kernel_flags | CAS_FUSE_OVER_IO_URING,
				&o) == 0);
		struct fuse_init_out io;
		memcpy(&io, o.payload, sizeof(io));
		CHECK(!!(io.flags2 & (CAS_FUSE_OVER_IO_URING >> 32)) == ask);
		CHECK(o.reply.init);
		CHECK(cas_fuse_session_conn(s)->io_uring == ask);
		cas_fuse_session_free(s);
	}

	struct cas_fuse_session *s = ready_session(false);
	static struct ring_ent e;
	struct fuse_out_header oh;
	size_t len;

	/* LOOKUP: nothing in op_in, the name in the payload. */
	ring_request(&e, FUSE_LOOKUP, 1, NULL, 0, "file", 5);
	CHECK(ring_run(s, &e, &oh, &len) == 0);
	CHECK(len == sizeof(struct fuse_entry_out));
	struct fuse_entry_out eo;
	memcpy(&eo, e.payload, sizeof(eo));
	CHECK(eo.nodeid == 2 && eo.attr.size == FILE_SIZE);

	/* READ: fuse_read_in in op_in; data from a buffer and from an fd. */
	uint64_t fh = open_file(s, 2, NULL, NULL);
	struct fuse_read_in ri = {.fh = fh, .offset = 100, .size = 5000};
	ring_request(&e, FUSE_READ, 2, &ri, sizeof(ri), NULL, 0);
	CHECK(ring_run(s, &e, &oh, &len) == 0);
	CHECK(len == 5000);
	bool same = true;
	for (size_t i = 0; i < len; i++)
		same = same && e.payload[i] == pattern(100 + i);
	CHECK(same);
	CHECK(release_file(s, 2, fh) == 0);
	uint8_t data[FDFILE_SIZE];
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = pattern(i);
	REQUIRE(pwrite(fake.memfd, data, sizeof(data), 0) == sizeof(data));
	fh = open_file(s, 5, NULL, NULL);
	ri = (struct fuse_read_in){.fh = fh, .offset = 19000, .size = 4096};
	ring_request(&e, FUSE_READ, 5, &ri, sizeof(ri), NULL, 0);
	CHECK(ring_run(s, &e, &oh, &len) == 0);
	CHECK(len == 1000);
	same = true;
	for (size_t i = 0; i < len; i++)
		same = same && e.payload[i] == pattern(19000 + i);
	CHECK(same);
	CHECK(release_file(s, 5, fh) == 0);

	/* Entries whose lengths do not add up get EINVAL. */
	struct {
		uint32_t len;
		uint32_t payload_sz;
	} bad[] = {
		{10, 0},       /* shorter than its header */
		{40 + 5, 6},   /* payload past len */
		{40 + 129, 0}, /* op_in cannot hold the rest */
		{40 + 5 + (1u << 20), 5 + (1u << 20)}, /* past the buffer */
		{UINT32_MAX, 0},
	};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(bad); i++) {
		ring_request(&e, FUSE_LOOKUP, 1, NULL, 0, "file", 5);
		struct fuse_in_header ih;
		memcpy(&ih, e.h.in_out, sizeof(ih));
		ih.len = bad[i].len;
		memcpy(e.h.in_out, &ih, sizeof(ih));
		struct cas_fuse_uring_ent_in_out io;
		memcpy(&io, &e.h.ring_ent_in_out, sizeof(io));
		io.payload_sz = bad[i].payload_sz;
		memcpy(&e.h.ring_ent_in_out, &io, sizeof(io));
		CHECK(ring_run(s, &e, &oh, &len) == -EINVAL);
	}
	/* A name without its NUL, an unknown opcode: ordinary errors. */
	ring_request(&e, FUSE_LOOKUP, 1, NULL, 0, "file", 4);
	CHECK(ring_run(s, &e, &oh, &len) == -EINVAL);
	ring_request(&e, 4000, 1, NULL, 0, NULL, 0);
	CHECK(ring_run(s, &e, &oh, &len) == -ENOSYS);
	cas_fuse_session_free(s);
}

/* A fs that wants zero-message opendir gets OPENDIR answered ENOSYS by the
 * engine (the kernel then opens folders itself) and READDIR with fh 0;
 * only where the kernel offered it. */
static void test_no_opendir(void)
{
	for (int offered = 0; offered < 2; offered++) {
		fake.init_no_opendir = true;
		struct cas_fuse_session *s = new_session(false, 32);
		struct out o;
		uint64_t flags = kernel_flags;
		if (!offered)
			flags &= ~(uint64_t)FUSE_NO_OPENDIR_SUPPORT;
		REQUIRE(do_init(s, 45, flags, &o) == 0);
		fake.init_no_opendir = false;
		CHECK(cas_fuse_session_conn(s)->want_no_opendir == offered);
		struct req r;
		req_start(&r, FUSE_OPENDIR, 1);
		struct fuse_open_in in = {.flags = O_RDONLY};
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		CHECK(run_err(s, &r) == (offered ? -ENOSYS : 0));
		req_start(&r, FUSE_READDIR, 1);
		struct fuse_read_in ri = {.fh = 0, .size = 4096};
		req_add(&r, &ri, sizeof(ri));
		req_end(&r);
		run(s, &r, &o);
		CHECK(o.oh.error == 0 && o.payload_len > 0);
		/* Files still open as before. */
		uint64_t fh = open_file(s, 2, NULL, NULL);
		CHECK(fh == 200);
		CHECK(release_file(s, 2, fh) == 0);
		cas_fuse_session_free(s);
	}
}

/* Zero-message open: OPEN answered ENOSYS where the kernel offers it and
 * passthrough is not in use; a READ with fh 0 then holds whatever handle
 * the fs says, and read_done gets that one. */
static void test_no_open(void)
{
	for (int pt = 0; pt < 2; pt++) {
		fake.init_no_open = true;
		struct cas_fuse_session *s = new_session(pt, 32);
		struct out o;
		REQUIRE(do_init(s, 45, kernel_flags, &o) == 0);
		fake.init_no_open = false;
		CHECK(cas_fuse_session_conn(s)->want_no_open == !pt);
		if (pt) {
			uint64_t fh = open_file(s, 5, NULL, NULL);
			CHECK(fh == 500);
			CHECK(release_file(s, 5, fh) == 0);
			cas_fuse_session_free(s);
			continue;
		}
		struct req r;
		req_start(&r, FUSE_OPEN, 5);
		struct fuse_open_in in = {.flags = O_RDONLY};
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		CHECK(run_err(s, &r) == -ENOSYS);
		/* Opens for writing are still refused first. */
		req_start(&r, FUSE_OPEN, 5);
		in.flags = O_WRONLY;
		req_add(&r, &in, sizeof(in));
		req_end(&r);
		CHECK(run_err(s, &r) == -EROFS);
		unsigned dones = atomic_load(&fake.read_dones);
		req_start(&r, FUSE_READ, 5);
		struct fuse_read_in ri = {.fh = 0, .offset = 10, .size = 100};
		req_add(&r, &ri, sizeof(ri));
		req_end(&r);
		run(s, &r, &o);
		CHECK(o.oh.error == 0 && o.reply.fd == fake.memfd &&
		      o.reply.fd_len == 100 && o.reply.fd_offset == 10);
		cas_fuse_reply_done(s, &o.reply);
		CHECK(atomic_load(&fake.read_dones) == dones + 1);
		CHECK(fake.last_done_ino == 5 && fake.last_done_fh == 4700);
		/* A fh the fs does not know is still refused. */
		req_start(&r, FUSE_READ, 2);
		ri.fh = 0;
		req_add(&r, &ri, sizeof(ri));
		req_end(&r);
		CHECK(run_err(s, &r) == -EBADF);
		cas_fuse_session_free(s);
	}
	/* A kernel that does not offer it keeps getting OPEN answered. */
	fake.init_no_open = true;
	struct cas_fuse_session *s = new_session(false, 32);
	struct out o;
	REQUIRE(do_init(s, 45, kernel_flags & ~(uint64_t)FUSE_NO_OPEN_SUPPORT,
			&o) == 0);
	fake.init_no_open = false;
	CHECK(!cas_fuse_session_conn(s)->want_no_open);
	uint64_t fh = open_file(s, 2, NULL, NULL);
	CHECK(fh == 200);
	CHECK(release_file(s, 2, fh) == 0);
	cas_fuse_session_free(s);
}

int main(void)
{
	memset(&fake, 0, sizeof(fake));
	fake.memfd = memfd_create("fdfile", MFD_CLOEXEC);
	REQUIRE(fake.memfd >= 0);
	test_cursor();
	test_init_new();
	test_init_old();
	test_lookup_getattr();
	test_open_read();
	test_readdir();
	test_truncated();
	test_split();
	test_forget();
	test_readonly();
	test_xattr();
	test_passthrough();
	test_lost_open();
	test_destroy();
	test_threads();
	test_small_reply_buffer();
	test_reply_rewrites();
	test_uring();
	test_no_opendir();
	test_no_open();
	close(fake.memfd);
	free(reply_buf);
	return check_exit("test_engine");
}
