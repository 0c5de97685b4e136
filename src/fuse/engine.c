/* engine.c - FUSE request decoding, dispatch and reply encoding.
 *
 * Every request goes through the same gate in cas_fuse_session_process:
 * the fixed header is copied out of the (possibly scattered, possibly
 * guest-owned) input, its length checked against the real input, the
 * opcode looked up in one table that knows each opcode's minimum argument
 * size and whether it modifies, and only then is a handler called. The
 * handlers read arguments through the same bounds-checked cursor, copying
 * everything they use, so a request changed under us after the check
 * cannot make us read out of bounds.
 */
#include "fuse/engine.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/log.h"
#include "fuse/backing_table_i.h"
#include "fuse/engine_i.h"
#include "fuse/fuse_kernel_ext.h"

/* The protocol minor we speak: 7.40 brings passthrough. */
#define CAS_FUSE_OUR_MINOR	   40
#define CAS_FUSE_DEFAULT_MAX_PAGES 32
#define CAS_FUSE_DEFAULT_MAX_WRITE (128 * 1024)
#define CAS_FUSE_PAGE		   4096
/* Opcodes we count one by one: every one up to STATX (52), then the rest. */
#define CAS_FUSE_COUNT_SLOTS 54

_Static_assert(CAS_FUSE_REPLY_HEADER_SIZE == sizeof(struct fuse_out_header),
	       "reply header size");

/* ---- directory buffers ---- */

struct cas_fuse_dirbuf {
	uint8_t *buf;
	size_t size;
	size_t len;
	bool plus;
};

static void fill_attr(struct fuse_attr *out, const struct cas_fuse_attr *a)
{
	*out = (struct fuse_attr){
		.ino = a->ino,
		.size = a->size,
		.blocks = a->blocks,
		.atime = a->atime,
		.mtime = a->mtime,
		.ctime = a->ctime,
		.atimensec = a->atimensec,
		.mtimensec = a->mtimensec,
		.ctimensec = a->ctimensec,
		.mode = a->mode,
		.nlink = a->nlink,
		.uid = a->uid,
		.gid = a->gid,
		.rdev = a->rdev,
		.blksize = a->blksize,
	};
}

static void fill_entry(struct fuse_entry_out *out,
		       const struct cas_fuse_entry *e)
{
	*out = (struct fuse_entry_out){
		.nodeid = e->attr.ino,
		.generation = e->generation,
		.entry_valid = e->entry_valid,
		.attr_valid = e->attr_valid,
		.entry_valid_nsec = e->entry_valid_nsec,
		.attr_valid_nsec = e->attr_valid_nsec,
	};
	fill_attr(&out->attr, &e->attr);
}

int cas_fuse_dirbuf_add(struct cas_fuse_dirbuf *db, const uint8_t *name,
			size_t namelen, uint64_t ino, uint32_t mode,
			uint64_t next_off, const struct cas_fuse_entry *entry)
{
	if (namelen == 0 || namelen > CAS_FUSE_NAME_MAX)
		return -EINVAL;
	size_t head = db->plus ? FUSE_NAME_OFFSET_DIRENTPLUS : FUSE_NAME_OFFSET;
	size_t rec = FUSE_DIRENT_ALIGN(head + namelen);
	if (rec > db->size - db->len)
		return 0;
	uint8_t *p = db->buf + db->len;
	struct fuse_dirent de = {
		.ino = ino,
		.off = next_off,
		.namelen = (uint32_t)namelen,
		.type = (mode & S_IFMT) >> 12,
	};
	if (db->plus) {
		struct fuse_entry_out eo = {0};
		if (entry)
			fill_entry(&eo, entry);
		memcpy(p, &eo, sizeof(eo));
		memcpy(p + offsetof(struct fuse_direntplus, dirent), &de,
		       sizeof(de));
	} else {
		memcpy(p, &de, sizeof(de));
	}
	memcpy(p + head, name, namelen);
	memset(p + head + namelen, 0, rec - head - namelen);
	db->len += rec;
	return 1;
}

bool cas_fuse_dirbuf_plus(const struct cas_fuse_dirbuf *db)
{
	return db->plus;
}

/* ---- the session ---- */

struct cas_fuse_session {
	const struct cas_fuse_ops *ops;
	void *fs;
	struct cas_fuse_config cfg;
	uint32_t max_pages; /* cfg's, defaulted */

	pthread_mutex_t init_lock; /* serialises INIT and DESTROY */
	/* Set (release) once conn/minor/passthrough are final; read with
	 * acquire by every request. */
	atomic_bool initialized;
	atomic_bool destroyed;
	struct cas_fuse_conn conn; /* written once under init_lock */
	uint32_t minor;		   /* negotiated: min(ours, kernel's) */
	bool passthrough;	   /* negotiated and wanted */

	/* Set when backing_open failed in a way every later call would too
	 * (no privilege, stacking too deep): opens then skip the ioctl. */
	atomic_bool backing_broken;
	pthread_mutex_t backing_lock;
	/* backing_table_i.h; protected by backing_lock */
	struct pt_table nodes; /* node id -> backing id, refs */
	struct pt_table opens; /* (node id, fh) -> refs */

	/* Requests per opcode (the last slot: opcodes past the table). */
	atomic_uint_fast64_t counts[CAS_FUSE_COUNT_SLOTS];
};

static uint32_t cfg_max_pages(const struct cas_fuse_config *cfg)
{
	uint32_t p =
		cfg->max_pages ? cfg->max_pages : CAS_FUSE_DEFAULT_MAX_PAGES;
	return CAS_MIN(p, 65535u);
}

size_t cas_fuse_reply_bufsize(const struct cas_fuse_config *cfg)
{
	/* A kernel that does not negotiate FUSE_MAX_PAGES reads up to its
	 * default 32 pages at once, whatever we asked for. A READ answered
	 * short means end of file to the kernel, so the buffer must hold
	 * the largest READ it can send. */
	size_t pages = CAS_MAX(cfg_max_pages(cfg),
			       (uint32_t)CAS_FUSE_DEFAULT_MAX_PAGES);
	size_t payload = pages * CAS_FUSE_PAGE;
	payload = CAS_MAX(payload, (size_t)CAS_FUSE_XATTR_SIZE_MAX);
	payload = CAS_MAX(payload, (size_t)CAS_FUSE_NAME_MAX + 1);
	return sizeof(struct fuse_out_header) + payload;
}

size_t cas_fuse_request_bufsize(const struct cas_fuse_config *cfg)
{
	uint32_t max_write =
		cfg->max_write ? cfg->max_write : CAS_FUSE_DEFAULT_MAX_WRITE;
	size_t req = sizeof(struct fuse_in_header) +
		     sizeof(struct fuse_write_in) + max_write;
	return CAS_MAX(req, (size_t)FUSE_MIN_READ_BUFFER) + CAS_FUSE_PAGE;
}

int cas_fuse_session_new(const struct cas_fuse_ops *ops, void *fs,
			 const struct cas_fuse_config *cfg,
			 struct cas_fuse_session **ret)
{
	struct cas_fuse_session *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->ops = ops;
	s->fs = fs;
	s->cfg = *cfg;
	s->max_pages = cfg_max_pages(cfg);
	pthread_mutex_init(&s->init_lock, NULL);
	pthread_mutex_init(&s->backing_lock, NULL);
	atomic_init(&s->initialized, false);
	atomic_init(&s->destroyed, false);
	atomic_init(&s->backing_broken, false);
	for (size_t i = 0; i < CAS_FUSE_COUNT_SLOTS; i++)
		atomic_init(&s->counts[i], 0);
	*ret = s;
	return 0;
}

void cas_fuse_session_free(struct cas_fuse_session *s)
{
	if (!s)
		return;
	/* Backing ids still registered die with the connection; the
	 * transport may be gone already, so they are not closed here. */
	cas_pt_clear(&s->nodes);
	cas_pt_clear(&s->opens);
	pthread_mutex_destroy(&s->init_lock);
	pthread_mutex_destroy(&s->backing_lock);
	free(s);
}

bool cas_fuse_session_initialized(const struct cas_fuse_session *s)
{
	return atomic_load_explicit(&s->initialized, memory_order_acquire);
}

const struct cas_fuse_conn *
cas_fuse_session_conn(const struct cas_fuse_session *s)
{
	return &s->conn;
}

/* ---- replies ---- */

#define OUT_HDR sizeof(struct fuse_out_header)
/* A handler's way of saying "this request takes no reply". */
#define NO_REPLY 1

/* Reserves `size` zeroed payload bytes; NULL if the buffer is too small. */
static void *reply_payload(struct cas_fuse_reply *reply, size_t size)
{
	if (reply->buf_size < OUT_HDR || size > reply->buf_size - OUT_HDR)
		return NULL;
	memset(reply->buf + OUT_HDR, 0, size);
	reply->len = OUT_HDR + size;
	return reply->buf + OUT_HDR;
}

static size_t reply_room(const struct cas_fuse_reply *reply)
{
	return reply->buf_size > OUT_HDR ? reply->buf_size - OUT_HDR : 0;
}

static void reply_finish(struct cas_fuse_reply *reply, int error)
{
	if (reply->buf_size < OUT_HDR) {
		reply->send = false;
		return;
	}
	if (error < 0) {
		/* Only a real errno may reach the kernel: it rejects others
		 * and would leave the caller hanging. */
		if (error < -4095)
			error = -EIO;
		reply->len = OUT_HDR;
		reply->fd = -1;
		reply->fd_len = 0;
		reply->fd_offset = 0;
	}
	struct fuse_out_header oh = {
		.len = (uint32_t)(reply->len +
				  (reply->fd >= 0 ? reply->fd_len : 0)),
		.error = error < 0 ? error : 0,
		.unique = reply->unique,
	};
	memcpy(reply->buf, &oh, sizeof(oh));
	reply->send = true;
}

/* ---- request context and handlers ---- */

struct req {
	struct cas_fuse_session *s;
	struct fuse_in_header h;
	struct cas_fuse_cursor *c;
	struct cas_fuse_reply *reply;
};

static size_t entry_out_size(const struct cas_fuse_session *s)
{
	return s->minor < 9 ? FUSE_COMPAT_ENTRY_OUT_SIZE
			    : sizeof(struct fuse_entry_out);
}

static size_t attr_out_size(const struct cas_fuse_session *s)
{
	return s->minor < 9 ? FUSE_COMPAT_ATTR_OUT_SIZE
			    : sizeof(struct fuse_attr_out);
}

static int do_init(struct req *q)
{
	struct cas_fuse_session *s = q->s;
	struct fuse_init_in in;
	int r = cas_fuse_cursor_copy_partial(q->c, &in, sizeof(in), 8);
	if (r < 0)
		return r;

	pthread_mutex_lock(&s->init_lock);
	if (atomic_load_explicit(&s->initialized, memory_order_relaxed)) {
		pthread_mutex_unlock(&s->init_lock);
		return -EPROTO;
	}
	if (in.major < 7) {
		pthread_mutex_unlock(&s->init_lock);
		cas_log_error("fuse: kernel protocol %u.%u is too old",
			      in.major, in.minor);
		return -EPROTO;
	}
	if (in.major > 7) {
		/* Tell a newer kernel what we speak; it sends another INIT. */
		pthread_mutex_unlock(&s->init_lock);
		struct fuse_init_out *o =
			reply_payload(q->reply, FUSE_COMPAT_INIT_OUT_SIZE);
		if (!o)
			return -EIO;
		o->major = 7;
		o->minor = CAS_FUSE_OUR_MINOR;
		return 0;
	}

	uint32_t minor = CAS_MIN(in.minor, (uint32_t)CAS_FUSE_OUR_MINOR);
	uint64_t offered = in.flags;
	if (minor >= 36 && (in.flags & FUSE_INIT_EXT))
		offered |= (uint64_t)in.flags2 << 32;

	uint32_t readahead = in.max_readahead;
	if (s->cfg.max_readahead && s->cfg.max_readahead < readahead)
		readahead = s->cfg.max_readahead;
	uint32_t max_write = s->cfg.max_write ? s->cfg.max_write
					      : CAS_FUSE_DEFAULT_MAX_WRITE;
	max_write = CAS_MAX(max_write, (uint32_t)CAS_FUSE_PAGE);

	struct cas_fuse_conn conn = {
		.proto_major = in.major,
		.proto_minor = in.minor,
		.max_readahead = readahead,
		.max_write = max_write,
		.max_pages = s->max_pages,
		.can_passthrough = (offered & CAS_FUSE_PASSTHROUGH) &&
				   minor >= CAS_FUSE_MINOR_PASSTHROUGH &&
				   s->cfg.backing_open != NULL,
		.can_readdirplus = (offered & FUSE_DO_READDIRPLUS) != 0,
		.io_uring = s->cfg.io_uring &&
			    (offered & CAS_FUSE_OVER_IO_URING) != 0,
		.can_no_opendir = (offered & FUSE_NO_OPENDIR_SUPPORT) != 0,
		.can_no_open = (offered & FUSE_NO_OPEN_SUPPORT) != 0,
	};
	conn.want_passthrough = conn.can_passthrough;
	conn.want_readdirplus = conn.can_readdirplus;
	if (s->ops->init) {
		r = s->ops->init(s->fs, &conn);
		if (r < 0) {
			pthread_mutex_unlock(&s->init_lock);
			return cas_log_errno(r, "fuse: filesystem init: %m");
		}
	}
	/* What init may not change stays what was negotiated. */
	conn.want_passthrough = conn.want_passthrough && conn.can_passthrough;
	conn.want_readdirplus = conn.want_readdirplus && conn.can_readdirplus;
	conn.want_no_opendir = conn.want_no_opendir && conn.can_no_opendir;
	conn.want_no_open =
		conn.want_no_open && conn.can_no_open && !conn.want_passthrough;
	conn.max_pages = CAS_MIN(CAS_MAX(conn.max_pages, 1u), s->max_pages);
	conn.max_readahead = CAS_MIN(conn.max_readahead, in.max_readahead);
	conn.max_write = CAS_MAX(conn.max_write, (uint32_t)CAS_FUSE_PAGE);

	uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES |
			FUSE_PARALLEL_DIROPS | FUSE_CACHE_SYMLINKS;
	if (conn.want_readdirplus)
		want |= FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO;
	if (conn.want_passthrough)
		want |= CAS_FUSE_PASSTHROUGH;
	if (conn.io_uring)
		want |= CAS_FUSE_OVER_IO_URING;
	want &= offered;
	if (offered & FUSE_INIT_EXT)
		want |= FUSE_INIT_EXT;
	else
		want &= 0xffffffffULL;

	size_t out_size = minor < 5    ? FUSE_COMPAT_INIT_OUT_SIZE
			  : minor < 23 ? FUSE_COMPAT_22_INIT_OUT_SIZE
				       : sizeof(struct cas_fuse_init_out);
	struct cas_fuse_init_out out = {
		.major = 7,
		.minor = minor,
		.max_readahead = conn.max_readahead,
		.flags = (uint32_t)want,
		.flags2 = (uint32_t)(want >> 32),
		.max_background = 64,
		.congestion_threshold = 48,
		.max_write = conn.max_write,
		.time_gran = 1,
		.max_pages = (uint16_t)conn.max_pages,
		.max_stack_depth = (want & CAS_FUSE_PASSTHROUGH) ? 1 : 0,
	};
	void *p = reply_payload(q->reply, out_size);
	if (!p) {
		pthread_mutex_unlock(&s->init_lock);
		return -EIO;
	}
	memcpy(p, &out, out_size);

	s->conn = conn;
	s->minor = minor;
	s->passthrough = (want & CAS_FUSE_PASSTHROUGH) != 0;
	atomic_store_explicit(&s->initialized, true, memory_order_release);
	pthread_mutex_unlock(&s->init_lock);
	q->reply->init = true;
	cas_log_debug("fuse: kernel %u.%u, speaking 7.%u, flags %#llx%s%s",
		      in.major, in.minor, minor, (unsigned long long)want,
		      s->passthrough ? ", passthrough" : "",
		      conn.io_uring ? ", io_uring" : "");
	return 0;
}

static int do_destroy(struct req *q)
{
	struct cas_fuse_session *s = q->s;
	pthread_mutex_lock(&s->init_lock);
	bool was = atomic_exchange(&s->destroyed, true);
	pthread_mutex_unlock(&s->init_lock);
	if (!was && s->ops->destroy)
		s->ops->destroy(s->fs);
	q->reply->destroyed = true;
	reply_payload(q->reply, 0);
	return 0;
}

static int do_lookup(struct req *q)
{
	char name[CAS_FUSE_NAME_MAX + 1];
	size_t namelen;
	int r = cas_fuse_cursor_name(q->c, name, sizeof(name), &namelen);
	if (r < 0)
		return r;
	if (!q->s->ops->lookup)
		return -ENOSYS;
	struct cas_fuse_entry e = {0};
	r = q->s->ops->lookup(q->s->fs, q->h.nodeid, name, namelen, &e);
	if (r < 0)
		return r;
	struct fuse_entry_out eo;
	fill_entry(&eo, &e);
	size_t size = entry_out_size(q->s);
	void *p = reply_payload(q->reply, size);
	if (!p)
		return -EIO;
	memcpy(p, &eo, size);
	return 0;
}

static int do_forget(struct req *q)
{
	struct fuse_forget_in in;
	if (cas_fuse_cursor_copy(q->c, &in, sizeof(in)) < 0)
		return NO_REPLY;
	if (q->s->ops->forget)
		q->s->ops->forget(q->s->fs, q->h.nodeid, in.nlookup);
	return NO_REPLY;
}

static int do_batch_forget(struct req *q)
{
	struct fuse_batch_forget_in in;
	if (cas_fuse_cursor_copy(q->c, &in, sizeof(in)) < 0)
		return NO_REPLY;
	/* Honour the entries that are really there, however many the count
	 * claims. */
	size_t have = q->c->left / sizeof(struct fuse_forget_one);
	size_t n = CAS_MIN((size_t)in.count, have);
	if (n < in.count)
		cas_log_debug("fuse: BATCH_FORGET claims %u entries, has %zu",
			      in.count, have);
	for (size_t i = 0; i < n; i++) {
		struct fuse_forget_one one;
		if (cas_fuse_cursor_copy(q->c, &one, sizeof(one)) < 0)
			break;
		if (q->s->ops->forget)
			q->s->ops->forget(q->s->fs, one.nodeid, one.nlookup);
	}
	return NO_REPLY;
}

static int do_getattr(struct req *q)
{
	/* fuse_getattr_in (7.9+) only matters for handles; we ignore it. */
	if (!q->s->ops->getattr)
		return -ENOSYS;
	struct cas_fuse_attr a = {0};
	uint64_t valid = 0;
	int r = q->s->ops->getattr(q->s->fs, q->h.nodeid, &a, &valid);
	if (r < 0)
		return r;
	struct fuse_attr_out ao = {.attr_valid = valid};
	fill_attr(&ao.attr, &a);
	size_t size = attr_out_size(q->s);
	void *p = reply_payload(q->reply, size);
	if (!p)
		return -EIO;
	memcpy(p, &ao, size);
	return 0;
}

static int do_readlink(struct req *q)
{
	if (!q->s->ops->readlink)
		return -ENOSYS;
	size_t size =
		CAS_MIN(reply_room(q->reply), (size_t)CAS_FUSE_NAME_MAX + 1);
	char *buf = reply_payload(q->reply, size);
	if (!buf)
		return -EIO;
	int r = q->s->ops->readlink(q->s->fs, q->h.nodeid, buf, size);
	if (r < 0)
		return r;
	/* The kernel takes at most a page less its NUL: a longer target is
	 * the caller's ENAMETOOLONG (as the kernel's own file systems say),
	 * not a reply the kernel refuses, which would be EIO plus an error
	 * on our write for each access. The room above lets us see it. */
	if ((size_t)r > CAS_FUSE_NAME_MAX)
		return -ENAMETOOLONG;
	q->reply->len = OUT_HDR + (size_t)r;
	return 0;
}

/* Takes a reference on the node's backing id, opening one if needed.
 * Returns the id or -errno. */
static int backing_get(struct cas_fuse_session *s, uint64_t nodeid, uint64_t fh,
		       int fd)
{
	pthread_mutex_lock(&s->backing_lock);
	struct pt_entry *node = cas_pt_find(&s->nodes, nodeid, 0);
	int r;
	if (!node) {
		/* Opening under the lock keeps two racing opens of one node
		 * from registering two ids; it is one ioctl. */
		r = s->cfg.backing_open(s->cfg.transport, fd);
		if (r < 0)
			goto out;
		node = cas_pt_insert(&s->nodes, nodeid, 0);
		if (!node) {
			if (s->cfg.backing_close)
				s->cfg.backing_close(s->cfg.transport, r);
			r = -ENOMEM;
			goto out;
		}
		node->id = r;
	}
	struct pt_entry *open = cas_pt_find(&s->opens, nodeid, fh);
	if (!open)
		open = cas_pt_insert(&s->opens, nodeid, fh);
	if (!open) {
		if (node->refs == 0) {
			if (s->cfg.backing_close)
				s->cfg.backing_close(s->cfg.transport,
						     node->id);
			cas_pt_remove(&s->nodes, node);
		}
		r = -ENOMEM;
		goto out;
	}
	open->refs++;
	node->refs++;
	r = node->id;
out:
	pthread_mutex_unlock(&s->backing_lock);
	return r;
}

static void backing_put(struct cas_fuse_session *s, uint64_t nodeid,
			uint64_t fh)
{
	if (!s->passthrough)
		return;
	pthread_mutex_lock(&s->backing_lock);
	struct pt_entry *open = cas_pt_find(&s->opens, nodeid, fh);
	struct pt_entry *node = cas_pt_find(&s->nodes, nodeid, 0);
	if (open && node) {
		if (--open->refs == 0)
			cas_pt_remove(&s->opens, open);
		if (--node->refs == 0) {
			if (s->cfg.backing_close)
				s->cfg.backing_close(s->cfg.transport,
						     node->id);
			cas_pt_remove(&s->nodes, node);
		}
	}
	pthread_mutex_unlock(&s->backing_lock);
}

static int do_open(struct req *q, bool dir)
{
	struct cas_fuse_session *s = q->s;
	struct fuse_open_in in;
	int r = cas_fuse_cursor_copy(q->c, &in, sizeof(in));
	if (r < 0)
		return r;
	if (s->cfg.readonly &&
	    ((in.flags & O_ACCMODE) != O_RDONLY || (in.flags & O_TRUNC)))
		return -EROFS;
	int (*op)(void *, uint64_t, uint32_t, struct cas_fuse_open *) =
		dir ? s->ops->opendir : s->ops->open;
	/* The kernel takes this ENOSYS as "open every folder (file) yourself,
	 * cached" (engine.h, want_no_opendir, want_no_open): no more OPENDIR
	 * and RELEASEDIR (OPEN and RELEASE). */
	if (!op || (dir ? s->conn.want_no_opendir : s->conn.want_no_open))
		return -ENOSYS;
	struct cas_fuse_open o = {.backing_fd = -1};
	r = op(s->fs, q->h.nodeid, in.flags, &o);
	if (r < 0)
		return r;

	struct cas_fuse_open_out out = {
		.fh = o.fh,
		.open_flags = o.open_flags & ~CAS_FOPEN_PASSTHROUGH_BIT,
	};
	if (!dir && o.backing_fd >= 0 && s->passthrough &&
	    !atomic_load_explicit(&s->backing_broken, memory_order_relaxed)) {
		int id = backing_get(s, q->h.nodeid, o.fh, o.backing_fd);
		if (id >= 0) {
			/* The kernel refuses passthrough combined with any
			 * caching flag. */
			out.open_flags &= FOPEN_DIRECT_IO | FOPEN_NOFLUSH;
			out.open_flags |= CAS_FOPEN_PASSTHROUGH_BIT;
			out.backing_id = id;
		} else if (id == -EPERM || id == -ELOOP || id == -ENOTTY ||
			   id == -EOPNOTSUPP) {
			if (!atomic_exchange(&s->backing_broken, true))
				cas_log_warning_errno(
					id, "fuse: passthrough unavailable, "
					    "reads go through us: %m");
		} else {
			cas_log_debug_errno(
				id, "fuse: backing open of node %llu: %m",
				(unsigned long long)q->h.nodeid);
		}
	}
	void *p = reply_payload(q->reply, sizeof(out));
	if (!p)
		return -EIO; /* cannot happen: the buffer holds a header+page */
	memcpy(p, &out, sizeof(out));
	q->reply->open_kind = dir ? 2 : 1;
	q->reply->open_ino = q->h.nodeid;
	q->reply->open_fh = o.fh;
	return 0;
}

static int release_handle(struct cas_fuse_session *s, uint64_t ino, uint64_t fh,
			  bool dir)
{
	int (*op)(void *, uint64_t, uint64_t) =
		dir ? s->ops->releasedir : s->ops->release;
	int r = op ? op(s->fs, ino, fh) : 0;
	if (!dir)
		backing_put(s, ino, fh);
	return r;
}

static int do_release(struct req *q, bool dir)
{
	struct fuse_release_in in;
	int r = cas_fuse_cursor_copy_partial(q->c, &in, sizeof(in), 8);
	if (r < 0)
		return r;
	r = release_handle(q->s, q->h.nodeid, in.fh, dir);
	reply_payload(q->reply, 0);
	return r < 0 ? r : 0;
}

static int do_read(struct req *q)
{
	struct cas_fuse_session *s = q->s;
	struct fuse_read_in in;
	/* Before 7.9 fuse_read_in had 24 bytes; we use only those. */
	int r = cas_fuse_cursor_copy_partial(q->c, &in, sizeof(in), 24);
	if (r < 0)
		return r;
	if (!s->ops->read)
		return -ENOSYS;
	/* Only a request no kernel sends is larger than the buffer the
	 * transport sized with cas_fuse_reply_bufsize. */
	size_t size = CAS_MIN((size_t)in.size, reply_room(q->reply));
	uint8_t *buf = reply_payload(q->reply, 0);
	if (!buf)
		return -EIO;
	struct cas_fuse_read rd = {
		.buf = buf, .len = size, .fd = -1, .fh = in.fh};
	r = s->ops->read(s->fs, q->h.nodeid, in.fh, in.offset, (uint32_t)size,
			 &rd);
	if (r < 0)
		return r;
	if (rd.len > size) {
		if (rd.fd >= 0 && s->ops->read_done)
			s->ops->read_done(s->fs, q->h.nodeid, rd.fh);
		return cas_log_errno(
			-EIO,
			"fuse: read of node %llu returned %zu > %zu bytes",
			(unsigned long long)q->h.nodeid, rd.len, size);
	}
	if (rd.fd >= 0) {
		q->reply->len = OUT_HDR;
		q->reply->fd = rd.fd;
		q->reply->fd_offset = rd.fd_offset;
		q->reply->fd_len = rd.len;
		q->reply->fd_ino = q->h.nodeid;
		q->reply->fd_fh = rd.fh;
	} else {
		q->reply->len = OUT_HDR + rd.len;
	}
	return 0;
}

static int do_readdir(struct req *q, bool plus)
{
	struct cas_fuse_session *s = q->s;
	struct fuse_read_in in;
	int r = cas_fuse_cursor_copy_partial(q->c, &in, sizeof(in), 24);
	if (r < 0)
		return r;
	if (!s->ops->readdir)
		return -ENOSYS;
	if (plus && !s->conn.want_readdirplus)
		return -ENOSYS;
	uint8_t *buf = reply_payload(q->reply, 0);
	if (!buf)
		return -EIO;
	struct cas_fuse_dirbuf db = {
		.buf = buf,
		.size = CAS_MIN((size_t)in.size, reply_room(q->reply)),
		.plus = plus,
	};
	r = s->ops->readdir(s->fs, q->h.nodeid, in.fh, in.offset, &db);
	/* Entries already added stand even if the fs then failed: for
	 * READDIRPLUS each one counted a lookup the kernel must learn of.
	 * The next call, starting after them, reports the error. */
	if (r < 0 && db.len == 0)
		return r;
	q->reply->len = OUT_HDR + db.len;
	return 0;
}

static int do_statfs(struct req *q)
{
	struct cas_fuse_statfs st = {0};
	if (q->s->ops->statfs) {
		int r = q->s->ops->statfs(q->s->fs, q->h.nodeid, &st);
		if (r < 0)
			return r;
	} else {
		st.namelen = 255;
		st.bsize = 512;
	}
	struct fuse_statfs_out o = {
		.st =
			{
				.blocks = st.blocks,
				.bfree = st.bfree,
				.bavail = st.bavail,
				.files = st.files,
				.ffree = st.ffree,
				.bsize = st.bsize,
				.namelen = st.namelen,
				.frsize = st.frsize,
			},
	};
	size_t size = q->s->minor < 4 ? FUSE_COMPAT_STATFS_SIZE : sizeof(o);
	void *p = reply_payload(q->reply, size);
	if (!p)
		return -EIO;
	memcpy(p, &o, size);
	return 0;
}

/* Shared tail of GETXATTR and LISTXATTR: size 0 asks for the length. */
static int xattr_reply(struct req *q, uint32_t want_size, const char *name)
{
	struct cas_fuse_session *s = q->s;
	size_t room = reply_room(q->reply);
	if (room < sizeof(struct fuse_getxattr_out))
		return -EIO;
	char *buf = reply_payload(q->reply, 0);
	if (!buf)
		return -EIO;
	size_t size = CAS_MIN((size_t)want_size, room);
	size = CAS_MIN(size, (size_t)CAS_FUSE_XATTR_SIZE_MAX);
	int r = name ? s->ops->getxattr(s->fs, q->h.nodeid, name, buf, size)
		     : s->ops->listxattr(s->fs, q->h.nodeid, buf, size);
	if (r < 0)
		return r;
	if (want_size == 0) {
		struct fuse_getxattr_out o = {.size = (uint32_t)r};
		memcpy(reply_payload(q->reply, sizeof(o)), &o, sizeof(o));
		return 0;
	}
	if ((size_t)r > size)
		return -ERANGE;
	q->reply->len = OUT_HDR + (size_t)r;
	return 0;
}

static int do_getxattr(struct req *q)
{
	struct fuse_getxattr_in in;
	int r = cas_fuse_cursor_copy(q->c, &in, sizeof(in));
	if (r < 0)
		return r;
	char name[CAS_FUSE_NAME_MAX + 1];
	size_t namelen;
	r = cas_fuse_cursor_name(q->c, name, sizeof(name), &namelen);
	if (r < 0)
		return r;
	if (!q->s->ops->getxattr)
		return -ENOSYS;
	return xattr_reply(q, in.size, name);
}

static int do_listxattr(struct req *q)
{
	struct fuse_getxattr_in in;
	int r = cas_fuse_cursor_copy(q->c, &in, sizeof(in));
	if (r < 0)
		return r;
	if (!q->s->ops->listxattr)
		return -ENOSYS;
	return xattr_reply(q, in.size, NULL);
}

static int do_access(struct req *q)
{
	struct fuse_access_in in;
	int r = cas_fuse_cursor_copy(q->c, &in, sizeof(in));
	if (r < 0)
		return r;
	if (q->s->cfg.readonly && (in.mask & W_OK))
		return -EROFS;
	if (!q->s->ops->access)
		return -ENOSYS; /* the kernel then stops asking: allowed */
	r = q->s->ops->access(q->s->fs, q->h.nodeid, in.mask);
	if (r < 0)
		return r;
	reply_payload(q->reply, 0);
	return 0;
}

static int do_ok(struct req *q)
{
	reply_payload(q->reply, 0);
	return 0;
}

static int do_no_reply(struct req *q)
{
	return NO_REPLY;
}

/* ---- the opcode table ---- */

enum {
	OP_MODIFIES = 1 << 0, /* EROFS when read-only */
	OP_NO_REPLY = 1 << 1, /* the kernel expects no answer */
	OP_BEFORE_INIT = 1 << 2,
};

struct opdesc {
	const char *name;
	uint32_t min_size; /* bytes of arguments after fuse_in_header */
	uint32_t flags;
	int (*handler)(struct req *q); /* NULL: answer `error` */
	int error;
};

static int do_open_file(struct req *q)
{
	return do_open(q, false);
}
static int do_opendir(struct req *q)
{
	return do_open(q, true);
}
static int do_release_file(struct req *q)
{
	return do_release(q, false);
}
static int do_releasedir(struct req *q)
{
	return do_release(q, true);
}
static int do_readdir_plain(struct req *q)
{
	return do_readdir(q, false);
}
static int do_readdirplus(struct req *q)
{
	return do_readdir(q, true);
}

#define MOD(op, nm, min)              \
	[op] = {.name = nm,           \
		.min_size = min,      \
		.flags = OP_MODIFIES, \
		.error = -ENOSYS}
#define UNSUP(op, nm, min, err) \
	[op] = {.name = nm, .min_size = min, .error = err}

static const struct opdesc opcodes[] = {
	[FUSE_LOOKUP] = {"LOOKUP", 2, 0, do_lookup, 0},
	[FUSE_FORGET] = {"FORGET", 8, OP_NO_REPLY, do_forget, 0},
	[FUSE_GETATTR] = {"GETATTR", 0, 0, do_getattr, 0},
	MOD(FUSE_SETATTR, "SETATTR", 0),
	[FUSE_READLINK] = {"READLINK", 0, 0, do_readlink, 0},
	MOD(FUSE_SYMLINK, "SYMLINK", 0),
	MOD(FUSE_MKNOD, "MKNOD", 0),
	MOD(FUSE_MKDIR, "MKDIR", 0),
	MOD(FUSE_UNLINK, "UNLINK", 0),
	MOD(FUSE_RMDIR, "RMDIR", 0),
	MOD(FUSE_RENAME, "RENAME", 0),
	MOD(FUSE_LINK, "LINK", 0),
	[FUSE_OPEN] = {"OPEN", 8, 0, do_open_file, 0},
	[FUSE_READ] = {"READ", 24, 0, do_read, 0},
	MOD(FUSE_WRITE, "WRITE", 0),
	[FUSE_STATFS] = {"STATFS", 0, 0, do_statfs, 0},
	[FUSE_RELEASE] = {"RELEASE", 8, 0, do_release_file, 0},
	[FUSE_FSYNC] = {"FSYNC", 0, 0, do_ok, 0},
	MOD(FUSE_SETXATTR, "SETXATTR", 0),
	[FUSE_GETXATTR] = {"GETXATTR", 10, 0, do_getxattr, 0},
	[FUSE_LISTXATTR] = {"LISTXATTR", 8, 0, do_listxattr, 0},
	MOD(FUSE_REMOVEXATTR, "REMOVEXATTR", 0),
	/* Nothing is ever written through us, so there is nothing to flush;
	 * ENOSYS makes the kernel stop sending FLUSH for the connection
	 * (files it opened itself, zero-message open, lack FOPEN_NOFLUSH). */
	UNSUP(FUSE_FLUSH, "FLUSH", 0, -ENOSYS),
	[FUSE_INIT] = {"INIT", 8, OP_BEFORE_INIT, do_init, 0},
	[FUSE_OPENDIR] = {"OPENDIR", 8, 0, do_opendir, 0},
	[FUSE_READDIR] = {"READDIR", 24, 0, do_readdir_plain, 0},
	[FUSE_RELEASEDIR] = {"RELEASEDIR", 8, 0, do_releasedir, 0},
	[FUSE_FSYNCDIR] = {"FSYNCDIR", 0, 0, do_ok, 0},
	UNSUP(FUSE_GETLK, "GETLK", 0, -ENOSYS),
	UNSUP(FUSE_SETLK, "SETLK", 0, -ENOSYS),
	UNSUP(FUSE_SETLKW, "SETLKW", 0, -ENOSYS),
	[FUSE_ACCESS] = {"ACCESS", 8, 0, do_access, 0},
	MOD(FUSE_CREATE, "CREATE", 0),
	[FUSE_INTERRUPT] = {"INTERRUPT", 0, OP_NO_REPLY, do_no_reply, 0},
	UNSUP(FUSE_BMAP, "BMAP", 0, -ENOSYS),
	[FUSE_DESTROY] = {"DESTROY", 0, 0, do_destroy, 0},
	UNSUP(FUSE_IOCTL, "IOCTL", 0, -ENOTTY),
	UNSUP(FUSE_POLL, "POLL", 0, -ENOSYS),
	[FUSE_NOTIFY_REPLY] = {"NOTIFY_REPLY", 0, OP_NO_REPLY, do_no_reply, 0},
	[FUSE_BATCH_FORGET] = {"BATCH_FORGET", 8, OP_NO_REPLY, do_batch_forget,
			       0},
	MOD(FUSE_FALLOCATE, "FALLOCATE", 0),
	[FUSE_READDIRPLUS] = {"READDIRPLUS", 24, 0, do_readdirplus, 0},
	MOD(FUSE_RENAME2, "RENAME2", 0),
	UNSUP(FUSE_LSEEK, "LSEEK", 0, -ENOSYS),
	MOD(FUSE_COPY_FILE_RANGE, "COPY_FILE_RANGE", 0),
	UNSUP(FUSE_SETUPMAPPING, "SETUPMAPPING", 0, -ENOSYS),
	UNSUP(FUSE_REMOVEMAPPING, "REMOVEMAPPING", 0, -ENOSYS),
	[FUSE_SYNCFS] = {"SYNCFS", 0, 0, do_ok, 0},
	MOD(FUSE_TMPFILE, "TMPFILE", 0),
	UNSUP(CAS_FUSE_STATX, "STATX", 0, -ENOSYS),
};

const char *cas_fuse_opcode_name(uint32_t opcode)
{
	if (opcode < CAS_ARRAY_SIZE(opcodes) && opcodes[opcode].name)
		return opcodes[opcode].name;
	return "UNKNOWN";
}

void cas_fuse_reply_done(struct cas_fuse_session *s,
			 struct cas_fuse_reply *reply)
{
	if (reply->fd >= 0 && s->ops->read_done)
		s->ops->read_done(s->fs, reply->fd_ino, reply->fd_fh);
	reply->fd = -1;
	reply->fd_len = 0;
	if (reply->lost && reply->open_kind)
		(void)release_handle(s, reply->open_ino, reply->open_fh,
				     reply->open_kind == 2);
	reply->open_kind = 0;
	reply->lost = false;
}

int cas_fuse_session_process(struct cas_fuse_session *s, const struct iovec *in,
			     int in_cnt, struct cas_fuse_reply *reply)
{
	reply->len = 0;
	reply->fd = -1;
	reply->fd_offset = 0;
	reply->fd_len = 0;
	reply->send = false;
	reply->destroyed = false;
	reply->unique = 0;
	reply->fd_ino = reply->fd_fh = 0;
	reply->lost = false;
	reply->open_kind = 0;
	reply->init = false;

	struct cas_fuse_cursor c;
	cas_fuse_cursor_init(&c, in, in_cnt);
	struct req q = {.s = s, .c = &c, .reply = reply};
	/* Without a whole header there is no `unique` to answer to. */
	if (cas_fuse_cursor_copy(&c, &q.h, sizeof(q.h)) < 0) {
		cas_log_debug("fuse: request of %zu bytes has no header",
			      c.left);
		return 0;
	}
	reply->unique = q.h.unique;
	atomic_fetch_add_explicit(
		&s->counts[CAS_MIN(q.h.opcode,
				   (uint32_t)CAS_FUSE_COUNT_SLOTS - 1)],
		1, memory_order_relaxed);

	const struct opdesc *op = NULL;
	if (q.h.opcode < CAS_ARRAY_SIZE(opcodes) && opcodes[q.h.opcode].name)
		op = &opcodes[q.h.opcode];
	bool no_reply = op && (op->flags & OP_NO_REPLY);

	int r;
	size_t args = c.left;
	size_t ext = (size_t)q.h.total_extlen * 8;
	if (q.h.len < sizeof(q.h) || q.h.len - sizeof(q.h) > args ||
	    ext > q.h.len - sizeof(q.h)) {
		r = -EINVAL;
		goto done;
	}
	/* Bytes past `len` are not part of this request; extensions (7.38+)
	 * trail the arguments and are for operations we refuse anyway. */
	cas_fuse_cursor_limit(&c, q.h.len - sizeof(q.h) - ext);

	if (!op) {
		cas_log_debug("fuse: unknown opcode %u", q.h.opcode);
		r = -ENOSYS;
		goto done;
	}
	if (!(op->flags & OP_BEFORE_INIT) && !cas_fuse_session_initialized(s)) {
		r = -EIO;
		goto done;
	}
	if (atomic_load_explicit(&s->destroyed, memory_order_acquire)) {
		r = -EIO;
		goto done;
	}
	if (c.left < op->min_size) {
		r = -EINVAL;
		goto done;
	}
	if ((op->flags & OP_MODIFIES) && s->cfg.readonly) {
		r = -EROFS;
		goto done;
	}
	if (!op->handler) {
		r = op->error;
		goto done;
	}
	r = op->handler(&q);
	if (r == NO_REPLY) {
		reply->send = false;
		reply->len = 0;
		return 0;
	}
done:
	if (no_reply) {
		reply->send = false;
		reply->len = 0;
		return 0;
	}
	if (r < 0)
		cas_log_debug_errno(r, "fuse: %s unique %llu node %llu: %m",
				    op ? op->name : "UNKNOWN",
				    (unsigned long long)q.h.unique,
				    (unsigned long long)q.h.nodeid);
	reply_finish(reply, r < 0 ? r : 0);
	return 0;
}

/* ---- what transports may do to a reply ---- */

void cas_fuse_reply_fail(struct cas_fuse_reply *reply, int error)
{
	if (!reply->send)
		return;
	/* Keep reply->fd: cas_fuse_reply_done still owes read_done. */
	reply->len = OUT_HDR;
	reply->fd_len = 0;
	reply->fd_offset = 0;
	reply->init = false;
	if (error >= 0 || error < -4095)
		error = -EIO;
	struct fuse_out_header oh = {
		.len = OUT_HDR,
		.error = error,
		.unique = reply->unique,
	};
	memcpy(reply->buf, &oh, sizeof(oh));
}

void cas_fuse_reply_shorten(struct cas_fuse_reply *reply, size_t fd_sent)
{
	if (!reply->send || reply->fd < 0 || fd_sent >= reply->fd_len)
		return;
	if (fd_sent == 0) {
		cas_fuse_reply_fail(reply, -EIO);
		return;
	}
	reply->fd_len = fd_sent;
	uint32_t len = (uint32_t)(reply->len + fd_sent);
	memcpy(reply->buf + offsetof(struct fuse_out_header, len), &len,
	       sizeof(len));
}

static bool request_header(const struct iovec *in, int in_cnt,
			   struct fuse_in_header *ret)
{
	struct cas_fuse_cursor c;
	cas_fuse_cursor_init(&c, in, in_cnt);
	return cas_fuse_cursor_copy(&c, ret, sizeof(*ret)) == 0;
}

void cas_fuse_request_fail(const struct iovec *in, int in_cnt,
			   struct cas_fuse_reply *reply, int error)
{
	struct fuse_in_header h;
	reply->len = 0;
	reply->fd = -1;
	reply->fd_len = 0;
	reply->send = false;
	reply->open_kind = 0;
	reply->lost = false;
	reply->init = false;
	reply->destroyed = false;
	if (!request_header(in, in_cnt, &h) || reply->buf_size < OUT_HDR)
		return;
	if (h.opcode < CAS_ARRAY_SIZE(opcodes) &&
	    (opcodes[h.opcode].flags & OP_NO_REPLY))
		return;
	reply->unique = h.unique;
	reply->send = true;
	cas_fuse_reply_fail(reply, error);
}

bool cas_fuse_request_is_init(const struct iovec *in, int in_cnt)
{
	struct fuse_in_header h;
	return request_header(in, in_cnt, &h) && h.opcode == FUSE_INIT;
}

/* ---- request counts ---- */

uint64_t cas_fuse_session_count(struct cas_fuse_session *s, uint32_t opcode)
{
	return atomic_load_explicit(
		&s->counts[CAS_MIN(opcode, (uint32_t)CAS_FUSE_COUNT_SLOTS - 1)],
		memory_order_relaxed);
}

void cas_fuse_session_log_counts(struct cas_fuse_session *s, int level,
				 const char *title)
{
	uint64_t n[CAS_FUSE_COUNT_SLOTS];
	uint64_t total = 0;
	for (size_t i = 0; i < CAS_FUSE_COUNT_SLOTS; i++) {
		n[i] = atomic_load_explicit(&s->counts[i],
					    memory_order_relaxed);
		total += n[i];
	}
	for (;;) {
		size_t best = 0;
		for (size_t i = 1; i < CAS_FUSE_COUNT_SLOTS; i++)
			if (n[i] > n[best])
				best = i;
		if (n[best] == 0)
			break;
		cas_log_internal(level, 0, "%s: %-12s %llu", title,
				 best == CAS_FUSE_COUNT_SLOTS - 1
					 ? "OTHER"
					 : cas_fuse_opcode_name((uint32_t)best),
				 (unsigned long long)n[best]);
		n[best] = 0;
	}
	/* Last, so that a reader knows the dump is whole. */
	cas_log_internal(level, 0, "%s: %llu in all", title,
			 (unsigned long long)total);
}
