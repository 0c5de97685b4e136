/* The read-only castore filesystem (DESIGN.md section 4, issue 13).
 *
 * Every path has its own inode, numbered by its preorder index within its
 * named root (inodes.c explains the numbering and the table). An inode's
 * attributes come from the node its parent holds, so stat and READDIRPLUS
 * of a folder never read the folder's Directory; looking up or listing in
 * it does, through the Directory cache, where equal folders share one
 * decoded Directory.
 *
 * Operations copy the inode record out of the table (a lock, no
 * allocation) and work on the copy: records move, and no reference to
 * one is ever held outside the table's lock.
 *
 * File handles hold the blob's fd (one per open, none per inode). Equal
 * files open the same blob, so they share its page cache and its pack
 * range. READ finds its handle in a table of slots that never moves,
 * without a lock.
 */
#include "castorefs/castorefs.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "castorefs/handles_i.h"
#include "castorefs/inodes_i.h"
#include "castorefs/verified_i.h"
#include "core/log.h"
#include "core/util.h"

#define FOREVER UINT64_MAX
/* Named roots may be replaced while mounted (roots add/rm), so the root
 * directory's entries and attributes are revalidated now and then; all
 * else is content and cached forever. */
#define ROOT_ENTRY_VALID 1
#define TIME_SECONDS	 1
#define BLKSIZE		 4096
#define NAME_MAX_LEN	 255
#define LOGGED_MAX	 256
/* Files up to this size are read whole at open (the local store keeps
 * blobs this small in packs, see local.h). */
#define SMALL_FILE	    4096
#define SEQUENTIAL_HINT_MIN (1u << 20)
/* Decoded Directories kept for folders nobody is using right now. The
 * kernel caches what it looked up, so this serves the folders being
 * walked; a larger bound buys little and costs memory per inode. */
#define DIR_CACHE_BYTES (256u << 10)
/* See cas_fs_new: 4 MiB (cache_i.h's RANGE_RUN) and a page. */
#define CAS_FS_MMAP_THRESHOLD ((4u << 20) + 4096)

/* Handles kept for READs that come without one (zero-message open). */
#define INO_HANDLES 64

struct cas_fs {
	cas_store *store;
	struct cas_fs_options opts;

	struct cas_inode_table inodes;
	struct cas_dir_cache dirs;
	struct cas_root_bases roots;
	struct cas_verified verified;
	/* No passthrough on this connection: every READ reaches us, so large
	 * blobs are checked by range (verified_i.h). Set at each INIT. */
	_Atomic bool range_checks;

	atomic_size_t memory; /* inodes, index, Directories, handles */

	/* Digests whose absence or inconsistency was logged (the log line
	 * comes once per mount). */
	pthread_mutex_t logged_lock;
	cas_digest logged[LOGGED_MAX]; /* protected by logged_lock */
	size_t n_logged;	       /* protected by logged_lock */

	struct cas_handle_table handles;
	/* READs without a handle: fh of a handle per ino % INO_HANDLES
	 * (handle_hold_ino), 0 for none. */
	_Atomic uint64_t ino_handles[INO_HANDLES];
};

/* Content -------------------------------------------------------------- */

static void digest_hex(const uint8_t *d, char hex[CAS_DIGEST_HEX_LEN + 1])
{
	cas_digest dg;
	memcpy(dg.bytes, d, CAS_DIGEST_LEN);
	cas_digest_to_hex(&dg, hex);
}

/* True the first time a digest is reported (then: once per mount, for the
 * first LOGGED_MAX of them; a store missing more has bigger problems and
 * a line per failure is fine). */
static bool first_report(struct cas_fs *fs, const uint8_t *digest)
{
	bool first = true;
	pthread_mutex_lock(&fs->logged_lock);
	for (size_t i = 0; i < fs->n_logged && first; i++)
		if (!memcmp(fs->logged[i].bytes, digest, CAS_DIGEST_LEN))
			first = false;
	if (first && fs->n_logged < LOGGED_MAX)
		memcpy(fs->logged[fs->n_logged++].bytes, digest,
		       CAS_DIGEST_LEN);
	pthread_mutex_unlock(&fs->logged_lock);
	return first;
}

/* A copy of inode ino (the root folder is not in the table). */
static int inode_get(struct cas_fs *fs, uint64_t ino, struct cas_inode *ret)
{
	if (ino == CAS_FUSE_ROOT_ID) {
		memset(ret, 0, sizeof(*ret));
		ret->ino = CAS_FUSE_ROOT_ID;
		ret->kind = CAS_INODE_ROOT;
		return 0;
	}
	return cas_inode_table_get(&fs->inodes, ino, ret);
}

/* The Directory of folder `in`, checked against the size its parent
 * declared. A missing, broken or inconsistent Directory is EIO for
 * whatever needed it, logged once. Release with cas_dir_cache_put. */
static int folder_directory(struct cas_fs *fs, const struct cas_inode *in,
			    struct cas_dir_entry **ret)
{
	cas_digest dg;
	memcpy(dg.bytes, in->digest, CAS_DIGEST_LEN);
	struct cas_dir_entry *e;
	/* A failure the store names itself (a remote that is down, a
	 * Directory that does not decode) is not named again. */
	unsigned long mark = cas_log_thread_error_count();
	int r = cas_dir_cache_get(&fs->dirs, fs->store, &dg, &e);
	if (r < 0) {
		if (first_report(fs, in->digest)) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			digest_hex(in->digest, hex);
			if (r == -ENOENT)
				cas_log_error(
					"directory %s: absent from the store",
					hex);
			else
				cas_log_errno_if_silent(
					mark, r, "directory %s: %m", hex);
		}
		return r == -ENOMEM ? r : -EIO;
	}
	if (_unlikely_(!e->size_ok || e->size != in->size)) {
		/* Its entries would take numbers that are not its own. */
		if (first_report(fs, in->digest)) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			digest_hex(in->digest, hex);
			cas_log_error(
				"directory %s: holds %s%llu entries below "
				"it, its parent says %llu",
				hex, e->size_ok ? "" : "more than ",
				(unsigned long long)e->size,
				(unsigned long long)in->size);
		}
		cas_dir_cache_put(&fs->dirs, e);
		return -EIO;
	}
	*ret = e;
	return 0;
}

/* The inode record of `node`, numbered ino, in folder parent_ino;
 * `parent` is the Directory that holds it (NULL for a named root). */
static void node_inode(const cas_node *node, uint64_t ino, uint64_t parent_ino,
		       const struct cas_dir_entry *parent,
		       struct cas_inode *ret)
{
	memset(ret, 0, sizeof(*ret));
	ret->ino = ino;
	ret->kind = node->type;
	ret->index = CAS_INODE_NO_INDEX;
	if (node->type == CAS_NODE_DIRECTORY) {
		/* The record has 32 bits to spare: a parent further away
		 * (4 x 10^9 entries before the folder) shows as the root. */
		uint64_t up = ino - parent_ino;
		ret->up = parent_ino != CAS_FUSE_ROOT_ID && up < UINT32_MAX
				  ? (uint32_t)up
				  : 0;
	}
	if (node->type == CAS_NODE_SYMLINK) {
		ret->size = node->target_len;
		if (parent) {
			memcpy(ret->digest, parent->digest.bytes,
			       CAS_DIGEST_LEN);
			ret->index = (uint32_t)(node - parent->dir->symlinks);
		}
	} else {
		ret->size = node->size;
		ret->executable =
			node->type == CAS_NODE_FILE && node->executable;
		memcpy(ret->digest, node->digest.bytes, CAS_DIGEST_LEN);
	}
}

/* The number of named root `name` with node `node`. */
static int root_ino(struct cas_fs *fs, const char *name, const cas_node *node,
		    uint64_t *ret)
{
	int r = cas_root_bases_get(&fs->roots, name, node, ret);
	if (r == -EOVERFLOW) {
		cas_log_error("root %s: its %llu entries do not fit the "
			      "mount's 64-bit inode numbers",
			      name, (unsigned long long)node->size);
		return -EIO;
	}
	return r;
}

static int count_root(void *userdata, const char *name, const cas_node *node)
{
	uint64_t *n = userdata;
	(*n)++;
	return 0;
}

/* Attributes come from the record alone: a folder's size is its
 * DirectoryNode's, nlink is 1 ("not counted", as on btrfs). */
static void fill_attr(const struct cas_inode *in, struct cas_fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = in->ino;
	a->atime = a->mtime = a->ctime = TIME_SECONDS;
	a->blksize = BLKSIZE;
	a->size = in->size;
	a->blocks = in->size / 512 + (in->size % 512 != 0);
	a->nlink = 1;
	switch (in->kind) {
	case CAS_INODE_ROOT:
	case CAS_INODE_DIRECTORY:
		a->mode = S_IFDIR | 0555;
		break;
	case CAS_INODE_FILE:
		a->mode = S_IFREG | (in->executable ? 0555 : 0444);
		break;
	default:
		a->mode = S_IFLNK | 0777;
		break;
	}
}

static int inode_attr(struct cas_fs *fs, const struct cas_inode *in,
		      struct cas_fuse_attr *ret)
{
	if (in->kind == CAS_INODE_ROOT) {
		struct cas_inode root = *in;
		int r = fs->store->ops->roots_foreach(fs->store, count_root,
						      &root.size);
		if (r < 0) {
			cas_log_errno(r, "list roots: %m");
			return -EIO;
		}
		fill_attr(&root, ret);
		return 0;
	}
	fill_attr(in, ret);
	return 0;
}

/* Lookup reply for `in`: takes one lookup reference and fills the entry. */
static int entry_for_inode(struct cas_fs *fs, const struct cas_inode *in,
			   bool in_root, struct cas_fuse_entry *ret)
{
	int r = cas_inode_table_ref(&fs->inodes, in);
	if (r < 0)
		return r;
	memset(ret, 0, sizeof(*ret));
	fill_attr(in, &ret->attr);
	ret->entry_valid = in_root ? ROOT_ENTRY_VALID : FOREVER;
	ret->attr_valid = FOREVER;
	return 0;
}

/* Operations ----------------------------------------------------------- */

static int fs_init(void *fs_, struct cas_fuse_conn *conn)
{
	struct cas_fs *fs = fs_;
	/* Folders never change and readdir of one needs no handle, so the
	 * kernel may open them without asking (one round trip less per
	 * folder and pass); only the root listing (--list-root) needs its
	 * per-open snapshot and no kernel cache, as roots come and go. */
	conn->want_no_opendir = !fs->opts.list_root;
	/* Likewise files, unless passthrough is used: it is set up in the
	 * open reply, so the kernel must ask. READ then finds the blob by
	 * node id (handle_hold_ino). */
	conn->want_no_open = !conn->want_passthrough;
	atomic_store(&fs->range_checks, !conn->want_passthrough);
	return 0;
}

static void fs_destroy(void *fs_)
{
}

static int lookup_root(struct cas_fs *fs, const char *name, size_t namelen,
		       struct cas_fuse_entry *ret)
{
	if (strlen(name) != namelen)
		return -ENOENT;
	_cleanup_free_ cas_node *node = NULL;
	int r = fs->store->ops->root_get(fs->store, name, &node);
	if (r < 0) {
		if (r == -ENOENT)
			return r;
		cas_log_errno(r, "root %s: %m", name);
		return -EIO;
	}
	uint64_t ino;
	r = root_ino(fs, name, node, &ino);
	if (r < 0)
		return r;
	struct cas_inode in;
	node_inode(node, ino, CAS_FUSE_ROOT_ID, NULL, &in);
	return entry_for_inode(fs, &in, true, ret);
}

static int fs_lookup(void *fs_, uint64_t parent, const char *name,
		     size_t namelen, struct cas_fuse_entry *ret)
{
	struct cas_fs *fs = fs_;
	if (namelen > NAME_MAX_LEN)
		return -ENAMETOOLONG;
	if (!cas_name_valid((const uint8_t *)name, namelen))
		return -ENOENT;
	struct cas_inode dir;
	int r = inode_get(fs, parent, &dir);
	if (r < 0)
		return r;
	if (dir.kind == CAS_INODE_ROOT)
		return lookup_root(fs, name, namelen, ret);
	if (dir.kind != CAS_INODE_DIRECTORY)
		return -ENOTDIR;
	struct cas_dir_entry *e;
	r = folder_directory(fs, &dir, &e);
	if (r < 0)
		return r;
	const cas_node *node =
		cas_directory_find(e->dir, (const uint8_t *)name, namelen);
	if (node) {
		struct cas_inode in;
		node_inode(node, cas_dir_entry_ino(e, dir.ino, node), dir.ino,
			   e, &in);
		r = entry_for_inode(fs, &in, false, ret);
	} else {
		/* Content never changes: the kernel may remember the
		 * absence forever. */
		memset(ret, 0, sizeof(*ret));
		ret->entry_valid = FOREVER;
	}
	cas_dir_cache_put(&fs->dirs, e);
	return r;
}

static void fs_forget(void *fs_, uint64_t ino, uint64_t nlookup)
{
	struct cas_fs *fs = fs_;
	if (ino != CAS_FUSE_ROOT_ID)
		cas_inode_table_forget(&fs->inodes, ino, nlookup);
}

static int fs_getattr(void *fs_, uint64_t ino, struct cas_fuse_attr *ret,
		      uint64_t *ret_attr_valid)
{
	struct cas_fs *fs = fs_;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	*ret_attr_valid =
		in.kind == CAS_INODE_ROOT ? ROOT_ENTRY_VALID : FOREVER;
	return inode_attr(fs, &in, ret);
}

static int fs_readlink(void *fs_, uint64_t ino, char *buf, size_t size)
{
	struct cas_fs *fs = fs_;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	if (in.kind != CAS_INODE_SYMLINK)
		return -EINVAL;
	if (in.index == CAS_INODE_NO_INDEX) {
		r = cas_root_bases_target(&fs->roots, in.ino, buf, size);
		return r == -ENOENT ? -EIO : r;
	}
	/* The target lives in the Directory that holds the symlink. */
	cas_digest dg;
	memcpy(dg.bytes, in.digest, CAS_DIGEST_LEN);
	struct cas_dir_entry *e;
	unsigned long mark = cas_log_thread_error_count();
	r = cas_dir_cache_get(&fs->dirs, fs->store, &dg, &e);
	if (r < 0) {
		if (first_report(fs, in.digest)) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			digest_hex(in.digest, hex);
			cas_log_errno_if_silent(mark, r, "directory %s: %m",
						hex);
		}
		return r == -ENOMEM ? r : -EIO;
	}
	r = -EIO;
	if (in.index < e->dir->n_symlinks) {
		const cas_node *l = &e->dir->symlinks[in.index];
		size_t n = CAS_MIN(size, l->target_len);
		memcpy(buf, l->target, n);
		r = (int)CAS_MIN(n, (size_t)INT32_MAX);
	}
	cas_dir_cache_put(&fs->dirs, e);
	return r;
}

/* What went wrong with blob d, logged once per mount; -EIO to return. */
static int report_blob(struct cas_fs *fs, const cas_digest *d, int r)
{
	if (first_report(fs, d->bytes)) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		if (r == -ENOENT)
			cas_log_error("blob %s: absent from the store", hex);
		else if (r == -EBADMSG)
			cas_log_error("blob %s: content does not match its "
				      "digest",
				      hex);
		else
			cas_log_errno(r, "blob %s: %m", hex);
	}
	return -EIO;
}

/* 0 once the bytes of h (data or a pack range) have hashed right. */
static int handle_check(struct cas_fs *fs, struct cas_handle *h, int fd,
			uint64_t size)
{
	int c = atomic_load_explicit(&h->checked, memory_order_acquire);
	if (c == 0) {
		int r = cas_verify_bytes(&h->digest, h->data, fd, h->base,
					 size);
		if (r < 0)
			(void)report_blob(fs, &h->digest, r);
		c = r < 0 ? -1 : 1;
		atomic_store_explicit(&h->checked, c, memory_order_release);
	}
	return c > 0 ? 0 : -EIO;
}

/* A handle for the content of file ino, filled and not published yet:
 * returns its generation (cas_handle_publish) or -errno. */
static int handle_open(struct cas_fs *fs, uint64_t ino, struct cas_handle **ret)
{
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	if (in.kind != CAS_INODE_FILE)
		return in.kind == CAS_INODE_SYMLINK ? -ELOOP : -EISDIR;
	cas_digest dg;
	memcpy(dg.bytes, in.digest, CAS_DIGEST_LEN);
	int fd = -1;
	uint64_t size = 0, base = 0;
	uint8_t *data = NULL;
	bool owned = true;
	/* A blob inside a file the store keeps open (a pack) is served from
	 * there, spliced, with no fd of its own. Else a small file is read
	 * whole now and served from memory (cheaper than an fd and a
	 * passthrough backing file per open); a larger one gets its fd. */
	r = -ENOENT;
	if (fs->store->ops->blob_locate) {
		r = fs->store->ops->blob_locate(fs->store, &dg, &fd, &base,
						&size);
		owned = r < 0;
	}
	bool ranged = false;
	if (r == -ENOENT && in.size > SMALL_FILE &&
	    fs->store->ops->blob_open_ranged) {
		/* A remote cache reads a large blob by range, as READs come,
		 * instead of fetching it whole now. */
		r = fs->store->ops->blob_open_ranged(fs->store, &dg, in.size,
						     &fd);
		ranged = r == 0;
		if (r >= 0) {
			size = in.size;
			r = 0;
		} else if (r == -ENOTSUP) {
			r = -ENOENT;
		}
	}
	if (r == -ENOENT && in.size <= SMALL_FILE)
		r = cas_store_blob_read(fs->store, &dg, SMALL_FILE, &data,
					&size);
	else if (r == -ENOENT) {
		r = fs->store->ops->blob_open(fs->store, &dg, &fd, &size);
		/* Its own fd becomes the passthrough backing file, whose
		 * readahead then serves the kernel's reads: files are mostly
		 * read start to end, so let it grow to twice the default. */
		if (r >= 0 && size > SEQUENTIAL_HINT_MIN)
			(void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	}
	/* A large blob may be read by the kernel itself (passthrough), so
	 * it is checked before the open succeeds, unless no READ can pass
	 * us by: then by range, if the store has its outboard. The rest at
	 * first READ. */
	struct cas_range_check *rc = NULL;
	if (r >= 0 && fd >= 0 && owned && !ranged && !fs->opts.trust_large &&
	    (!atomic_load(&fs->range_checks) ||
	     cas_range_check_open(fs->store, &dg, size, &rc) < 0) &&
	    (r = cas_verified_large(&fs->verified, &dg, fd, size)) < 0)
		close(fd);
	if (r < 0)
		return report_blob(fs, &dg, r);
	struct cas_handle *h;
	int gen = cas_handle_new(&fs->handles, &h);
	if (gen < 0) {
		if (fd >= 0 && owned)
			close(fd);
		free(data);
		cas_range_check_free(rc);
		return gen;
	}
	h->ino = ino;
	h->fd = fd;
	h->fd_owned = owned;
	h->base = base;
	h->data = data;
	h->size = size;
	h->ranged = ranged;
	h->rc = rc;
	h->digest = dg;
	*ret = h;
	return gen;
}

static int fs_open(void *fs_, uint64_t ino, uint32_t flags,
		   struct cas_fuse_open *ret)
{
	struct cas_fs *fs = fs_;
	if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC))
		return -EROFS;
	struct cas_handle *h;
	int r = handle_open(fs, ino, &h);
	if (r < 0)
		return r;
	ret->fh = cas_handle_publish(h, (uint32_t)r);
	ret->open_flags = CAS_FOPEN_KEEP_CACHE | CAS_FOPEN_NOFLUSH;
	/* Passthrough needs a file that is the blob from offset 0, and one
	 * that is whole: the kernel would read a partial one unasked. */
	ret->backing_fd = h->fd_owned && h->base == 0 && !h->ranged && !h->rc
				  ? h->fd
				  : -1;
	return 0;
}

/* A READ without a handle (zero-message open: the kernel opened the file
 * itself) holds one of the handles kept per inode in a small table, found
 * by ino, made on a miss (replacing the slot's previous one): so a read
 * costs no store lookup or open while its file is being read, and the
 * table bounds the fds so kept (no fd per inode). Returns the handle,
 * held, or NULL with *ret_error set. */
static struct cas_handle *handle_hold_ino(struct cas_fs *fs, uint64_t ino,
					  int *ret_error)
{
	_Atomic uint64_t *slot = &fs->ino_handles[ino % INO_HANDLES];
	uint64_t fh = atomic_load_explicit(slot, memory_order_acquire);
	struct cas_handle *h = fh ? cas_handle_hold(&fs->handles, fh) : NULL;
	if (h) {
		if (h->ino == ino)
			return h;
		cas_handle_unref(&fs->handles, h);
	}
	int r = handle_open(fs, ino, &h);
	if (r < 0) {
		*ret_error = r;
		return NULL;
	}
	atomic_fetch_add(&h->refs, 1); /* the READ's; the slot keeps one */
	fh = cas_handle_publish(h, (uint32_t)r);
	uint64_t old = atomic_exchange(slot, fh);
	if (old)
		(void)cas_handle_release(&fs->handles, old);
	return h;
}

/* The hot path: no lock, no allocation; a copy only for small files, a
 * hash only on a handle's first READ. */
static int fs_read(void *fs_, uint64_t ino, uint64_t fh, uint64_t off,
		   uint32_t size, struct cas_fuse_read *ret)
{
	struct cas_fs *fs = fs_;
	struct cas_handle *h;
	if (fh == 0) {
		int r = -EBADF;
		h = handle_hold_ino(fs, ino, &r);
		if (!h)
			return r;
		ret->fh = atomic_load_explicit(&h->fh, memory_order_relaxed);
	} else {
		h = cas_handle_hold(&fs->handles, fh);
	}
	if (!h)
		return -EBADF;
	int fd = atomic_load_explicit(&h->fd, memory_order_relaxed);
	uint64_t bsize = atomic_load_explicit(&h->size, memory_order_relaxed);
	if ((h->data || (fd >= 0 && !h->fd_owned)) &&
	    handle_check(fs, h, fd, bsize) < 0) {
		cas_handle_unref(&fs->handles, h);
		return -EIO;
	}
	uint64_t len = off < bsize ? CAS_MIN((uint64_t)size, bsize - off) : 0;
	if (h->data) {
		/* Copied now: the hold ends here, read_done is not called. */
		len = CAS_MIN(len, (uint64_t)ret->len);
		if (len > 0)
			memcpy(ret->buf, h->data + off, (size_t)len);
		ret->len = (size_t)len;
		cas_handle_unref(&fs->handles, h);
		return 0;
	}
	if (fd < 0) { /* a directory's handle */
		cas_handle_unref(&fs->handles, h);
		return -EBADF;
	}
	if (h->rc && len > 0) {
		int r = cas_range_check(h->rc, fd, off, len);
		if (r < 0) {
			(void)report_blob(fs, &h->digest, r);
			cas_handle_unref(&fs->handles, h);
			return -EIO;
		}
	}
	if (h->ranged && len > 0) {
		/* Only a range blob_open_ranged gave: the store fetches and
		 * verifies what is missing (a lock and maybe a wait, off the
		 * hot path of whole blobs). */
		int r = fs->store->ops->blob_ensure(fs->store, &h->digest, off,
						    len);
		if (r < 0) {
			cas_handle_unref(&fs->handles, h);
			return -EIO;
		}
	}
	ret->fd = fd;
	ret->fd_offset = h->base + off;
	ret->len = (size_t)len;
	return 0;
}

/* The transport has sent the data of a READ that fs_read held. */
static void fs_read_done(void *fs_, uint64_t ino, uint64_t fh)
{
	struct cas_fs *fs = fs_;
	struct cas_handle *h = cas_handle_slot(&fs->handles, (uint32_t)fh);
	if (h)
		cas_handle_unref(&fs->handles, h);
}

static int fs_release(void *fs_, uint64_t ino, uint64_t fh)
{
	struct cas_fs *fs = fs_;
	return cas_handle_release(&fs->handles, fh);
}

static int collect_root(void *userdata, const char *name, const cas_node *node)
{
	struct root_list **l = userdata;
	size_t n = (*l)->n;
	if ((n & (n - 1)) == 0 || n == 0) {
		size_t cap = n ? n * 2 : 16;
		struct root_list *nl =
			realloc(*l, sizeof(**l) + cap * sizeof(cas_node *));
		if (!nl)
			return -ENOMEM;
		*l = nl;
	}
	cas_node *dup = cas_node_dup(node);
	if (!dup)
		return -ENOMEM;
	(*l)->nodes[n] = dup;
	(*l)->n = n + 1;
	return 0;
}

static int fs_opendir(void *fs_, uint64_t ino, uint32_t flags,
		      struct cas_fuse_open *ret)
{
	struct cas_fs *fs = fs_;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	ret->backing_fd = -1;
	ret->fh = 0;
	if (in.kind == CAS_INODE_DIRECTORY) {
		/* The Directory is read by READDIR, which the kernel sends only
		 * while it has no cached listing: a warm opendir reads nothing
		 * (the Directory may have left our cache long ago). An absent
		 * Directory is then READDIR's EIO. */
		ret->open_flags = CAS_FOPEN_CACHE_DIR | CAS_FOPEN_KEEP_CACHE;
		return 0;
	}
	if (in.kind != CAS_INODE_ROOT)
		return -ENOTDIR;
	/* Without --list-root the root opens (tar -C, fchdir and openat
	 * need that) but READDIR says EPERM. */
	ret->open_flags = 0;
	if (!fs->opts.list_root)
		return 0;
	/* Roots change while mounted: a snapshot per opendir, so offsets
	 * stay meaningful, and no kernel cache. collect_root grows the
	 * list at powers of two; it starts with 16 slots. */
	struct root_list *l = calloc(1, sizeof(*l) + 16 * sizeof(cas_node *));
	if (!l)
		return -ENOMEM;
	r = fs->store->ops->roots_foreach(fs->store, collect_root, &l);
	struct cas_handle *h = NULL;
	if (r >= 0)
		r = cas_handle_new(&fs->handles, &h);
	if (r < 0) {
		for (size_t i = 0; i < l->n; i++)
			free(l->nodes[i]);
		free(l);
		if (r != -ENOMEM && r != -ENFILE) {
			cas_log_errno(r, "list roots: %m");
			r = -EIO;
		}
		return r;
	}
	h->roots = l;
	ret->fh = cas_handle_publish(h, (uint32_t)r);
	return 0;
}

static uint32_t node_dtype(const cas_node *node)
{
	return node->type == CAS_NODE_DIRECTORY ? S_IFDIR
	       : node->type == CAS_NODE_FILE	? S_IFREG
						: S_IFLNK;
}

/* One entry of a listing; for READDIRPLUS with a lookup reference that
 * stays only if the entry fit. Returns 1 if added, 0 if full. */
static int add_inode(struct cas_fs *fs, struct cas_fuse_dirbuf *db,
		     const cas_node *node, const struct cas_inode *in,
		     bool in_root, uint64_t next_off)
{
	if (node->name_len > NAME_MAX_LEN)
		return 1; /* cannot be served; skipped */
	if (!cas_fuse_dirbuf_plus(db))
		return cas_fuse_dirbuf_add(db, node->name, node->name_len,
					   in->ino, node_dtype(node), next_off,
					   NULL);
	struct cas_fuse_entry e;
	int r = entry_for_inode(fs, in, in_root, &e);
	if (r < 0)
		return r;
	r = cas_fuse_dirbuf_add(db, node->name, node->name_len, in->ino,
				node_dtype(node), next_off, &e);
	if (r != 1)
		cas_inode_table_forget(&fs->inodes, in->ino, 1);
	return r;
}

/* "." and "..": never a lookup reference (the engine sends node id 0). */
static int add_dot(struct cas_fuse_dirbuf *db, const char *name, uint64_t ino,
		   uint64_t next_off)
{
	return cas_fuse_dirbuf_add(db, (const uint8_t *)name, strlen(name), ino,
				   S_IFDIR, next_off, NULL);
}

static int readdir_roots(struct cas_fs *fs, uint64_t fh, uint64_t off,
			 struct cas_fuse_dirbuf *db)
{
	struct cas_handle *h = cas_handle_find(&fs->handles, fh);
	if (!h || !h->roots)
		return fs->opts.list_root ? -EBADF : -EPERM;
	int r = 1;
	for (uint64_t i = off - 2; i < h->roots->n && r > 0; i++) {
		const cas_node *node = h->roots->nodes[i];
		/* collect_root keeps the name NUL-terminated. */
		uint64_t ino;
		struct cas_inode in;
		r = root_ino(fs, (const char *)node->name, node, &ino);
		if (r == -EIO) {
			r = 1; /* it cannot be numbered: not listed */
			continue;
		}
		if (r < 0)
			return r;
		node_inode(node, ino, CAS_FUSE_ROOT_ID, NULL, &in);
		r = add_inode(fs, db, node, &in, true, i + 3);
	}
	return r;
}

static int readdir_folder(struct cas_fs *fs, const struct cas_inode *dir,
			  struct cas_dir_entry *e, uint64_t off,
			  struct cas_fuse_dirbuf *db)
{
	const cas_directory *d = e->dir;
	size_t n = cas_directory_count(d);
	int r = 1;
	for (uint64_t i = off - 2; i < n && r > 0; i++) {
		const cas_node *node;
		if (i < d->n_directories)
			node = &d->directories[i];
		else if (i < d->n_directories + d->n_files)
			node = &d->files[i - d->n_directories];
		else
			node = &d->symlinks[i - d->n_directories - d->n_files];
		if (node->name_len > NAME_MAX_LEN) {
			/* The kernel takes no longer name (NAME_MAX): said
			 * once per Directory, not per listing. */
			if (first_report(fs, dir->digest)) {
				char hex[CAS_DIGEST_HEX_LEN + 1];
				digest_hex(dir->digest, hex);
				cas_log_error("directory %s: a name of %zu "
					      "bytes (over 255) is left out "
					      "of listings",
					      hex, node->name_len);
			}
			continue;
		}
		struct cas_inode in;
		node_inode(node, cas_dir_entry_ino(e, dir->ino, node), dir->ino,
			   e, &in);
		r = add_inode(fs, db, node, &in, false, i + 3);
	}
	return r;
}

/* Offsets: 1 after ".", 2 after "..", 3 + i after entry i (directories,
 * then files, then symlinks: each list is sorted, so an offset is an
 * index and resuming costs nothing). ".." shows the parent's number
 * (the root folder's for a named root and for the root itself). */
static int fs_readdir(void *fs_, uint64_t ino, uint64_t fh, uint64_t off,
		      struct cas_fuse_dirbuf *db)
{
	struct cas_fs *fs = fs_;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	if (in.kind == CAS_INODE_ROOT && !fs->opts.list_root)
		return -EPERM;
	if (in.kind != CAS_INODE_ROOT && in.kind != CAS_INODE_DIRECTORY)
		return -ENOTDIR;
	/* The Directory first: an unreadable folder lists nothing, not
	 * even "." and "..". */
	struct cas_dir_entry *e = NULL;
	if (in.kind == CAS_INODE_DIRECTORY) {
		r = folder_directory(fs, &in, &e);
		if (r < 0)
			return r;
	}
	r = 1;
	if (off == 0) {
		r = add_dot(db, ".", ino, 1);
		off = 1;
	}
	if (r > 0 && off == 1) {
		r = add_dot(db, "..",
			    in.kind == CAS_INODE_DIRECTORY && in.up
				    ? in.ino - in.up
				    : CAS_FUSE_ROOT_ID,
			    2);
		off = 2;
	}
	if (r > 0 && e)
		r = readdir_folder(fs, &in, e, off, db);
	else if (r > 0)
		r = readdir_roots(fs, fh, off, db);
	cas_dir_cache_put(&fs->dirs, e);
	/* A full buffer is not an error: the kernel asks again from the
	 * last offset. */
	return r < 0 ? r : 0;
}

static int fs_releasedir(void *fs_, uint64_t ino, uint64_t fh)
{
	if (fh == 0)
		return 0;
	struct cas_fs *fs = fs_;
	return cas_handle_release(&fs->handles, fh);
}

static int fs_statfs(void *fs_, uint64_t ino, struct cas_fuse_statfs *ret)
{
	struct cas_fs *fs = fs_;
	memset(ret, 0, sizeof(*ret));
	ret->bsize = BLKSIZE;
	ret->frsize = BLKSIZE;
	ret->namelen = NAME_MAX_LEN;
	ret->files = cas_inode_table_count(&fs->inodes) + 1;
	return 0;
}

#define XATTR_BLOB	"user.castore.blob.digest"
#define XATTR_DIRECTORY "user.castore.directory.digest"

/* The one xattr an inode has, or NULL. */
static const char *xattr_name(const struct cas_inode *in)
{
	return in->kind == CAS_INODE_FILE	 ? XATTR_BLOB
	       : in->kind == CAS_INODE_DIRECTORY ? XATTR_DIRECTORY
						 : NULL;
}

static int fs_getxattr(void *fs_, uint64_t ino, const char *name, char *buf,
		       size_t size)
{
	struct cas_fs *fs = fs_;
	/* The kernel stops asking after one ENOSYS: without --show-xattr
	 * nothing costs a round trip. */
	if (!fs->opts.show_xattr)
		return -ENOSYS;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	const char *mine = xattr_name(&in);
	if (!mine || strcmp(name, mine) != 0)
		return -ENODATA;
	if (size == 0)
		return CAS_DIGEST_HEX_LEN;
	if (size < CAS_DIGEST_HEX_LEN)
		return -ERANGE;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	digest_hex(in.digest, hex);
	memcpy(buf, hex, CAS_DIGEST_HEX_LEN);
	return CAS_DIGEST_HEX_LEN;
}

static int fs_listxattr(void *fs_, uint64_t ino, char *buf, size_t size)
{
	struct cas_fs *fs = fs_;
	if (!fs->opts.show_xattr)
		return -ENOSYS;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	const char *mine = xattr_name(&in);
	size_t len = mine ? strlen(mine) + 1 : 0;
	if (size && len > size)
		return -ERANGE;
	if (size && len)
		memcpy(buf, mine, len);
	return (int)len;
}

static int fs_access(void *fs_, uint64_t ino, uint32_t mask)
{
	struct cas_fs *fs = fs_;
	struct cas_inode in;
	int r = inode_get(fs, ino, &in);
	if (r < 0)
		return r;
	if (mask & W_OK)
		return -EROFS;
	if ((mask & X_OK) && in.kind == CAS_INODE_FILE && !in.executable)
		return -EACCES;
	return 0;
}

static const struct cas_fuse_ops castorefs_ops = {
	.init = fs_init,
	.destroy = fs_destroy,
	.lookup = fs_lookup,
	.forget = fs_forget,
	.getattr = fs_getattr,
	.readlink = fs_readlink,
	.open = fs_open,
	.read = fs_read,
	.read_done = fs_read_done,
	.release = fs_release,
	.opendir = fs_opendir,
	.readdir = fs_readdir,
	.releasedir = fs_releasedir,
	.statfs = fs_statfs,
	.getxattr = fs_getxattr,
	.listxattr = fs_listxattr,
	.access = fs_access,
};

const struct cas_fuse_ops *cas_fs_ops(void)
{
	return &castorefs_ops;
}

/* Lifetime ------------------------------------------------------------- */

int cas_fs_new(cas_store *store, const struct cas_fs_options *opts,
	       struct cas_fs **ret)
{
	struct cas_fs *fs = calloc(1, sizeof(*fs));
	if (!fs)
		return -ENOMEM;
	fs->store = store;
	if (opts)
		fs->opts = *opts;
	/* Decoded Directories of large folders are large, short-lived blocks.
	 * glibc raises its mmap threshold each time one is freed, after which
	 * they come from the arenas, where they fragment the heap for good:
	 * a find and a tar c of /usr/share left 175-184 bytes of RssAnon per
	 * entry with the moving threshold, 84-98 with it fixed (BENCHMARKS.md).
	 * Fixed just above a range run (4 MiB), not at glibc's 128 KiB: a
	 * remote mount's chunks and runs, received by the thousand, then come
	 * from the heap instead of an mmap, page faults and a munmap each
	 * (a cold 1 GiB read over gRPC: 3.4 s at 128 KiB, 2.5 s at this,
	 * 93-98 B per entry at both). The process is the filesystem's
	 * server, so the setting is ours. */
	mallopt(M_MMAP_THRESHOLD, CAS_FS_MMAP_THRESHOLD);
	atomic_store(&fs->memory, sizeof(*fs));
	if (cas_inode_table_init(&fs->inodes, &fs->memory) < 0) {
		free(fs);
		return -ENOMEM;
	}
	cas_dir_cache_init(&fs->dirs, DIR_CACHE_BYTES, &fs->memory);
	cas_root_bases_init(&fs->roots, CAS_FUSE_ROOT_ID + 1, &fs->memory);
	cas_verified_init(&fs->verified, &fs->memory);
	cas_handle_table_init(&fs->handles, &fs->memory);
	pthread_mutex_init(&fs->logged_lock, NULL);
	*ret = fs;
	return 0;
}

void cas_fs_free(struct cas_fs *fs)
{
	if (!fs)
		return;
	cas_handle_table_release(&fs->handles);
	cas_inode_table_release(&fs->inodes);
	cas_dir_cache_release(&fs->dirs);
	cas_root_bases_release(&fs->roots);
	cas_verified_release(&fs->verified);
	pthread_mutex_destroy(&fs->logged_lock);
	free(fs);
}

void cas_fs_get_stats(struct cas_fs *fs, struct cas_fs_stats *ret)
{
	ret->inodes = cas_inode_table_count(&fs->inodes) + 1;
	ret->memory_bytes = atomic_load(&fs->memory);
}
