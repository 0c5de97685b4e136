/* The read-only castore filesystem (DESIGN.md section 4).
 *
 * Inode numbers
 * -------------
 * The kernel names every file by a 64-bit node id that must keep its
 * meaning while the kernel knows it. castore content has no numbers of its
 * own, so we hand them out from one counter and remember which content got
 * which number, in a table keyed by content identity:
 *
 *   directory  its Directory digest
 *   file       (digest, executable): a file and an executable file with
 *              equal bytes differ in mode, so they are two inodes
 *   symlink    its target bytes
 *   root       the root directory is node id 1 (FUSE_ROOT_ID) and has no
 *              key; the named roots below it are content like any other
 *
 * So the same content reached by any path (two equal subtrees, a root and
 * a folder inside another root) is one inode: equal files share st_ino and
 * page cache. An inode lives while the kernel holds a lookup reference to
 * it: LOOKUP and every READDIRPLUS entry add one, FORGET removes n. At zero
 * it is freed (with its cached Directory), and meeting the same content
 * later gives a new number: numbers come from a counter that never goes
 * back, so a number never changes meaning during a mount, which is what
 * the kernel requires; "same content, same inode" holds for as long as
 * the kernel remembers the inode, which is as long as anyone can compare.
 *
 * Each inode sits in two hash tables (chained, power-of-two buckets): by
 * node id for every request, by content key for LOOKUP and READDIRPLUS.
 * One mutex (fs->lock) guards both and every inode's counts; the critical
 * sections touch no store and allocate only when an inode is created.
 *
 * A directory's Directory is read from the store the first time the inode
 * needs it (its attributes need the entry and subdirectory counts) and
 * kept, decoded, for the inode's life: lookups in it are binary searches.
 *
 * File handles hold the blob's fd (one per open, none per inode). READ
 * finds its handle in a table of slots that never moves, without a lock.
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

enum inode_kind {
	KIND_ROOT = 0,
	KIND_DIRECTORY = CAS_NODE_DIRECTORY,
	KIND_FILE = CAS_NODE_FILE,
	KIND_SYMLINK = CAS_NODE_SYMLINK,
};

struct cas_inode {
	struct cas_inode *next_by_ino; /* protected by fs->lock */
	struct cas_inode *next_by_key; /* protected by fs->lock */
	uint64_t ino;
	uint64_t nlookup; /* protected by fs->lock */
	uint32_t busy;	  /* protected by fs->lock: operations in flight */
	uint32_t key_hash;
	uint8_t kind;
	bool executable;
	uint64_t size; /* file: blob size; symlink: target length */
	/* Directories: loaded once, then immutable until the inode dies. */
	_Atomic(cas_directory *) dir;
	/* Directory/file: the 32-byte digest; symlink: the target. */
	size_t key_len;
	uint8_t key[];
};

struct hash_table {
	struct cas_inode **buckets;
	size_t mask; /* buckets - 1 */
};

/* Handle slots live in chunks that are never freed or moved, so READ can
 * find its slot without a lock: a slot's `fh` says which open it serves
 * now (generation << 32 | index); 0 means free. */
#define HANDLE_CHUNK_BITS 10
#define HANDLE_CHUNK	  (1u << HANDLE_CHUNK_BITS)
#define HANDLE_MAX_CHUNKS 4096

struct root_list {
	size_t n;
	cas_node *nodes[];
};

struct cas_handle {
	_Atomic uint64_t fh;
	/* One reference for the open, one per READ whose reply still uses the
	 * fd: the kernel sends RELEASE only after the last READ's reply, but a
	 * guest may send RELEASE on one queue while a READ of the same handle
	 * is being copied on another. The fd is closed at zero, never under
	 * a READ. Taken only from a non-zero count (handle_hold), so a stale
	 * hold on a recycled slot is undone before it can matter. */
	_Atomic uint32_t refs;
	/* Atomic because READ reads them without a lock. */
	_Atomic int fd;		 /* file: the blob, or a file holding it */
	_Atomic uint64_t size;	 /* file: the blob's size */
	uint64_t base;		 /* where the blob starts in fd */
	bool fd_owned;		 /* else the store's (a pack): not closed */
	uint8_t *data;		 /* small file: its bytes instead of fd */
	struct root_list *roots; /* root directory: snapshot at opendir */
	uint32_t idx;		 /* this slot's index, fixed */
	uint32_t next_free;	 /* protected by fs->handle_lock */
};

struct cas_fs {
	cas_store *store;
	struct cas_fs_options opts;

	pthread_mutex_t lock;
	struct hash_table by_ino; /* protected by lock */
	struct hash_table by_key; /* protected by lock */
	size_t n_inodes;	  /* protected by lock */
	uint64_t next_ino;	  /* protected by lock */
	struct cas_inode *root;

	atomic_size_t memory; /* inodes, tables, Directories, handles */

	/* Digests whose absence was logged (an inode may die and come back;
	 * the log line comes once per mount). */
	pthread_mutex_t logged_lock;
	cas_digest logged[LOGGED_MAX]; /* protected by logged_lock */
	size_t n_logged;	       /* protected by logged_lock */

	pthread_mutex_t handle_lock;
	_Atomic(struct cas_handle *) chunks[HANDLE_MAX_CHUNKS];
	uint32_t n_slots;    /* protected by handle_lock */
	uint32_t free_head;  /* protected by handle_lock; UINT32_MAX: none */
	uint32_t handle_gen; /* protected by handle_lock */
};

/* Hashing ------------------------------------------------------------- */

static uint32_t key_hash(uint8_t kind, bool executable, const uint8_t *key,
			 size_t len)
{
	uint64_t h;
	if (kind != KIND_SYMLINK) {
		/* A digest is already uniformly random. */
		memcpy(&h, key, sizeof(h));
	} else {
		h = 0xcbf29ce484222325ull; /* FNV-1a */
		for (size_t i = 0; i < len; i++)
			h = (h ^ key[i]) * 0x100000001b3ull;
	}
	h ^= (uint64_t)kind * 0x9e3779b97f4a7c15ull +
	     (executable ? 0x51ed27 : 0);
	h ^= h >> 29;
	return (uint32_t)(h ^ (h >> 32));
}

static size_t ino_bucket(const struct hash_table *t, uint64_t ino)
{
	uint64_t h = ino * 0x9e3779b97f4a7c15ull;
	return (size_t)(h >> 32) & t->mask;
}

static int table_init(struct hash_table *t, size_t n)
{
	t->buckets = calloc(n, sizeof(*t->buckets));
	if (!t->buckets)
		return -ENOMEM;
	t->mask = n - 1;
	return 0;
}

/* Doubles both tables when they are fuller than one inode per bucket.
 * Called with fs->lock held; a failed allocation just keeps the chains
 * longer. */
static void tables_grow(struct cas_fs *fs)
{
	size_t n = (fs->by_ino.mask + 1) * 2;
	struct cas_inode **bi = calloc(n, sizeof(*bi));
	struct cas_inode **bk = calloc(n, sizeof(*bk));
	if (!bi || !bk) {
		free(bi);
		free(bk);
		return;
	}
	size_t old = fs->by_ino.mask + 1;
	struct hash_table ti = {bi, n - 1}, tk = {bk, n - 1};
	for (size_t i = 0; i < old; i++) {
		struct cas_inode *in, *next;
		for (in = fs->by_ino.buckets[i]; in; in = next) {
			next = in->next_by_ino;
			size_t b = ino_bucket(&ti, in->ino);
			in->next_by_ino = bi[b];
			bi[b] = in;
		}
		for (in = fs->by_key.buckets[i]; in; in = next) {
			next = in->next_by_key;
			size_t b = in->key_hash & tk.mask;
			in->next_by_key = bk[b];
			bk[b] = in;
		}
	}
	free(fs->by_ino.buckets);
	free(fs->by_key.buckets);
	fs->by_ino = ti;
	fs->by_key = tk;
	atomic_fetch_add(&fs->memory, 2 * (n - old) * sizeof(*bi));
}

/* Inode table --------------------------------------------------------- */

static struct cas_inode *find_by_ino(struct cas_fs *fs, uint64_t ino)
{
	struct cas_inode *in = fs->by_ino.buckets[ino_bucket(&fs->by_ino, ino)];
	while (in && in->ino != ino)
		in = in->next_by_ino;
	return in;
}

static void unlink_inode(struct cas_fs *fs, struct cas_inode *in)
{
	struct cas_inode **p =
		&fs->by_ino.buckets[ino_bucket(&fs->by_ino, in->ino)];
	while (*p != in)
		p = &(*p)->next_by_ino;
	*p = in->next_by_ino;
	p = &fs->by_key.buckets[in->key_hash & fs->by_key.mask];
	while (*p != in)
		p = &(*p)->next_by_key;
	*p = in->next_by_key;
	fs->n_inodes--;
}

static void inode_free(struct cas_fs *fs, struct cas_inode *in)
{
	cas_directory *d = atomic_load(&in->dir);
	size_t bytes = malloc_usable_size(in);
	if (d)
		bytes += malloc_usable_size(d);
	atomic_fetch_sub(&fs->memory, bytes);
	cas_directory_free(d);
	free(in);
}

/* Takes an in-flight reference on the inode numbered ino, or NULL. */
static struct cas_inode *inode_get(struct cas_fs *fs, uint64_t ino)
{
	pthread_mutex_lock(&fs->lock);
	struct cas_inode *in = find_by_ino(fs, ino);
	if (in)
		in->busy++;
	pthread_mutex_unlock(&fs->lock);
	return in;
}

/* Drops an in-flight reference and `nlookup` lookup references. Called
 * with fs->lock held; returns the inode if it must now be freed (after
 * unlocking). */
static struct cas_inode *inode_unref_locked(struct cas_fs *fs,
					    struct cas_inode *in, uint32_t busy,
					    uint64_t nlookup)
{
	in->busy -= CAS_MIN(busy, in->busy);
	in->nlookup -= CAS_MIN(nlookup, in->nlookup);
	if (in->nlookup || in->busy || in == fs->root)
		return NULL;
	unlink_inode(fs, in);
	return in;
}

static void inode_unref(struct cas_fs *fs, struct cas_inode *in, uint32_t busy,
			uint64_t nlookup)
{
	if (!in)
		return;
	pthread_mutex_lock(&fs->lock);
	struct cas_inode *dead = inode_unref_locked(fs, in, busy, nlookup);
	pthread_mutex_unlock(&fs->lock);
	if (dead)
		inode_free(fs, dead);
}

static void inode_put(struct cas_fs *fs, struct cas_inode *in)
{
	inode_unref(fs, in, 1, 0);
}

/* The inode of a node's content, created if the kernel does not know it
 * yet; returned with one lookup and one in-flight reference. */
struct content_key {
	uint8_t kind;
	bool exec;
	const uint8_t *key;
	size_t len;
	uint32_t hash;
};

static int node_key(const cas_node *node, struct content_key *ret)
{
	ret->kind = (uint8_t)node->type;
	ret->exec = node->type == CAS_NODE_FILE && node->executable;
	if (node->type == CAS_NODE_SYMLINK) {
		ret->key = node->target;
		ret->len = node->target_len;
	} else if (node->type == CAS_NODE_DIRECTORY ||
		   node->type == CAS_NODE_FILE) {
		ret->key = node->digest.bytes;
		ret->len = CAS_DIGEST_LEN;
	} else {
		return -EIO;
	}
	ret->hash = key_hash(ret->kind, ret->exec, ret->key, ret->len);
	return 0;
}

/* Called with fs->lock held. */
static struct cas_inode *find_by_key(struct cas_fs *fs,
				     const struct content_key *k)
{
	struct cas_inode *in = fs->by_key.buckets[k->hash & fs->by_key.mask];
	for (; in; in = in->next_by_key)
		if (in->key_hash == k->hash && in->kind == k->kind &&
		    in->executable == k->exec && in->key_len == k->len &&
		    !memcmp(in->key, k->key, k->len))
			break;
	return in;
}

/* The number a plain READDIR shows for a node: its inode's if the kernel
 * knows one, else a fresh number (READDIR takes no lookup reference, so
 * no inode is made for it; a later LOOKUP gives another number). */
static uint64_t ino_for_listing(struct cas_fs *fs, const cas_node *node)
{
	struct content_key k;
	if (node_key(node, &k) < 0)
		return 0;
	pthread_mutex_lock(&fs->lock);
	struct cas_inode *in = find_by_key(fs, &k);
	uint64_t ino = in ? in->ino : fs->next_ino++;
	pthread_mutex_unlock(&fs->lock);
	return ino;
}

static int inode_for_node(struct cas_fs *fs, const cas_node *node,
			  struct cas_inode **ret)
{
	struct content_key k;
	int r = node_key(node, &k);
	if (r < 0)
		return r;
	uint8_t kind = k.kind;
	bool exec = k.exec;
	const uint8_t *key = k.key;
	size_t len = k.len;
	uint32_t h = k.hash;

	pthread_mutex_lock(&fs->lock);
	struct cas_inode *in = find_by_key(fs, &k);
	if (in) {
		in->nlookup++;
		in->busy++;
		pthread_mutex_unlock(&fs->lock);
		*ret = in;
		return 0;
	}
	pthread_mutex_unlock(&fs->lock);

	/* Allocate outside the lock, then insert unless another thread
	 * created the same content meanwhile. */
	struct cas_inode *new = calloc(1, sizeof(*new) + len);
	if (!new)
		return -ENOMEM;
	new->kind = kind;
	new->executable = exec;
	new->key_hash = h;
	new->key_len = len;
	memcpy(new->key, key, len);
	new->size =
		node->type == CAS_NODE_SYMLINK ? node->target_len : node->size;
	new->nlookup = 1;
	new->busy = 1;

	pthread_mutex_lock(&fs->lock);
	in = find_by_key(fs, &k);
	if (in) {
		in->nlookup++;
		in->busy++;
		pthread_mutex_unlock(&fs->lock);
		free(new);
		*ret = in;
		return 0;
	}
	new->ino = fs->next_ino++;
	size_t b = ino_bucket(&fs->by_ino, new->ino);
	new->next_by_ino = fs->by_ino.buckets[b];
	fs->by_ino.buckets[b] = new;
	b = h & fs->by_key.mask;
	new->next_by_key = fs->by_key.buckets[b];
	fs->by_key.buckets[b] = new;
	if (++fs->n_inodes > fs->by_ino.mask + 1)
		tables_grow(fs);
	pthread_mutex_unlock(&fs->lock);
	atomic_fetch_add(&fs->memory, malloc_usable_size(new));
	*ret = new;
	return 0;
}

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

/* The inode's Directory, read from the store on first use. A missing or
 * broken Directory is EIO for whatever needed it, logged once. */
static int inode_directory(struct cas_fs *fs, struct cas_inode *in,
			   const cas_directory **ret)
{
	cas_directory *d = atomic_load_explicit(&in->dir, memory_order_acquire);
	if (_likely_(d)) {
		*ret = d;
		return 0;
	}
	cas_digest dg;
	memcpy(dg.bytes, in->key, CAS_DIGEST_LEN);
	int r = cas_store_directory_get(fs->store, &dg, &d);
	if (r < 0) {
		if (first_report(fs, in->key)) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			digest_hex(in->key, hex);
			if (r == -ENOENT)
				cas_log_error(
					"directory %s: absent from the store",
					hex);
			else
				cas_log_errno(r, "directory %s: %m", hex);
		}
		return -EIO;
	}
	cas_directory *expected = NULL;
	if (atomic_compare_exchange_strong_explicit(&in->dir, &expected, d,
						    memory_order_acq_rel,
						    memory_order_acquire)) {
		atomic_fetch_add(&fs->memory, malloc_usable_size(d));
	} else {
		cas_directory_free(d);
		d = expected;
	}
	*ret = d;
	return 0;
}

struct root_count {
	uint64_t entries, directories;
};

static int count_root(void *userdata, const char *name, const cas_node *node)
{
	struct root_count *c = userdata;
	c->entries++;
	if (node->type == CAS_NODE_DIRECTORY)
		c->directories++;
	return 0;
}

static void fill_attr(struct cas_inode *in, uint64_t size, uint64_t nsubdirs,
		      struct cas_fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = in->ino;
	a->atime = a->mtime = a->ctime = TIME_SECONDS;
	a->blksize = BLKSIZE;
	a->size = size;
	a->blocks = size / 512 + (size % 512 != 0);
	switch (in->kind) {
	case KIND_ROOT:
	case KIND_DIRECTORY:
		a->mode = S_IFDIR | 0555;
		a->nlink =
			(uint32_t)CAS_MIN(2 + nsubdirs, (uint64_t)UINT32_MAX);
		break;
	case KIND_FILE:
		a->mode = S_IFREG | (in->executable ? 0555 : 0444);
		a->nlink = 1;
		break;
	default:
		a->mode = S_IFLNK | 0777;
		a->nlink = 1;
		break;
	}
}

/* Attributes of an inode; directories need their Directory (the counts). */
static int inode_attr(struct cas_fs *fs, struct cas_inode *in,
		      struct cas_fuse_attr *ret)
{
	if (in->kind == KIND_ROOT) {
		struct root_count c = {0, 0};
		int r = fs->store->ops->roots_foreach(fs->store, count_root,
						      &c);
		if (r < 0) {
			cas_log_errno(r, "list roots: %m");
			return -EIO;
		}
		fill_attr(in, c.entries, c.directories, ret);
		return 0;
	}
	if (in->kind == KIND_DIRECTORY) {
		const cas_directory *d;
		int r = inode_directory(fs, in, &d);
		if (r < 0)
			return r;
		fill_attr(in, cas_directory_count(d), d->n_directories, ret);
		return 0;
	}
	fill_attr(in, in->size, 0, ret);
	return 0;
}

/* Lookup reply for a node found in `parent`: creates or references the
 * inode (one lookup reference, kept on success) and fills the entry. */
static int entry_for_node(struct cas_fs *fs, const cas_node *node, bool in_root,
			  struct cas_fuse_entry *ret,
			  struct cas_inode **ret_inode)
{
	struct cas_inode *in;
	int r = inode_for_node(fs, node, &in);
	if (r < 0)
		return r;
	memset(ret, 0, sizeof(*ret));
	r = inode_attr(fs, in, &ret->attr);
	if (r < 0) {
		inode_unref(fs, in, 1, 1);
		return r;
	}
	ret->generation = 0;
	ret->entry_valid = in_root ? ROOT_ENTRY_VALID : FOREVER;
	ret->attr_valid = FOREVER;
	if (ret_inode)
		*ret_inode = in; /* the caller drops the in-flight reference */
	else
		inode_put(fs, in);
	return 0;
}

/* Operations ----------------------------------------------------------- */

static int fs_init(void *fs_, struct cas_fuse_conn *conn)
{
	return 0;
}

static void fs_destroy(void *fs_)
{
}

static int fs_lookup(void *fs_, uint64_t parent, const char *name,
		     size_t namelen, struct cas_fuse_entry *ret)
{
	struct cas_fs *fs = fs_;
	if (namelen > NAME_MAX_LEN)
		return -ENAMETOOLONG;
	if (!cas_name_valid((const uint8_t *)name, namelen))
		return -ENOENT;
	struct cas_inode *dir = inode_get(fs, parent);
	if (!dir)
		return -ESTALE;
	int r;
	if (dir->kind == KIND_ROOT) {
		cas_node *node = NULL;
		if (strlen(name) != namelen) {
			r = -ENOENT;
		} else {
			r = fs->store->ops->root_get(fs->store, name, &node);
			if (r < 0 && r != -ENOENT) {
				cas_log_errno(r, "root %s: %m", name);
				r = -EIO;
			}
			if (r >= 0)
				r = entry_for_node(fs, node, true, ret, NULL);
			free(node);
		}
	} else if (dir->kind == KIND_DIRECTORY) {
		const cas_directory *d;
		r = inode_directory(fs, dir, &d);
		if (r >= 0) {
			const cas_node *node = cas_directory_find(
				d, (const uint8_t *)name, namelen);
			if (node) {
				r = entry_for_node(fs, node, false, ret, NULL);
			} else {
				/* Content never changes: the kernel may
				 * remember the absence forever. */
				memset(ret, 0, sizeof(*ret));
				ret->entry_valid = FOREVER;
				r = 0;
			}
		}
	} else {
		r = -ENOTDIR;
	}
	inode_put(fs, dir);
	return r;
}

static void fs_forget(void *fs_, uint64_t ino, uint64_t nlookup)
{
	struct cas_fs *fs = fs_;
	pthread_mutex_lock(&fs->lock);
	struct cas_inode *in = find_by_ino(fs, ino), *dead = NULL;
	if (in)
		dead = inode_unref_locked(fs, in, 0, nlookup);
	pthread_mutex_unlock(&fs->lock);
	if (dead)
		inode_free(fs, dead);
}

static int fs_getattr(void *fs_, uint64_t ino, struct cas_fuse_attr *ret,
		      uint64_t *ret_attr_valid)
{
	struct cas_fs *fs = fs_;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r = inode_attr(fs, in, ret);
	*ret_attr_valid = in->kind == KIND_ROOT ? ROOT_ENTRY_VALID : FOREVER;
	inode_put(fs, in);
	return r;
}

static int fs_readlink(void *fs_, uint64_t ino, char *buf, size_t size)
{
	struct cas_fs *fs = fs_;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r;
	if (in->kind != KIND_SYMLINK) {
		r = -EINVAL;
	} else {
		size_t n = CAS_MIN(size, in->key_len);
		memcpy(buf, in->key, n);
		r = (int)CAS_MIN(n, (size_t)INT32_MAX);
	}
	inode_put(fs, in);
	return r;
}

static struct cas_handle *handle_slot(struct cas_fs *fs, uint32_t idx)
{
	struct cas_handle *chunk = atomic_load_explicit(
		&fs->chunks[idx >> HANDLE_CHUNK_BITS], memory_order_acquire);
	return chunk ? &chunk[idx & (HANDLE_CHUNK - 1)] : NULL;
}

/* A free slot, claimed: its fh is returned in *ret_fh once the caller has
 * filled it (handle_publish). */
static int handle_new(struct cas_fs *fs, struct cas_handle **ret)
{
	pthread_mutex_lock(&fs->handle_lock);
	uint32_t idx = fs->free_head;
	if (idx != UINT32_MAX) {
		fs->free_head = handle_slot(fs, idx)->next_free;
	} else {
		if (fs->n_slots >= HANDLE_MAX_CHUNKS * HANDLE_CHUNK) {
			pthread_mutex_unlock(&fs->handle_lock);
			return -ENFILE;
		}
		idx = fs->n_slots;
		uint32_t c = idx >> HANDLE_CHUNK_BITS;
		if (!atomic_load(&fs->chunks[c])) {
			struct cas_handle *chunk =
				calloc(HANDLE_CHUNK, sizeof(*chunk));
			if (!chunk) {
				pthread_mutex_unlock(&fs->handle_lock);
				return -ENOMEM;
			}
			for (uint32_t i = 0; i < HANDLE_CHUNK; i++)
				chunk[i].idx = c << HANDLE_CHUNK_BITS | i;
			atomic_store_explicit(&fs->chunks[c], chunk,
					      memory_order_release);
			atomic_fetch_add(&fs->memory,
					 HANDLE_CHUNK * sizeof(*chunk));
		}
		fs->n_slots++;
	}
	/* Generations are 31 bits (returned as an int), never 0. */
	uint32_t gen = ++fs->handle_gen & INT32_MAX;
	if (gen == 0)
		gen = fs->handle_gen = 1;
	pthread_mutex_unlock(&fs->handle_lock);
	struct cas_handle *h = handle_slot(fs, idx);
	if (!h)
		return -EIO; /* cannot happen: the slot's chunk exists */
	h->fd = -1;
	h->size = 0;
	h->base = 0;
	h->fd_owned = true;
	h->data = NULL;
	h->roots = NULL;
	atomic_store(&h->refs, 1);
	/* Not findable until the caller fills it and calls handle_publish. */
	*ret = h;
	return (int)(gen & INT32_MAX);
}

static uint64_t handle_publish(struct cas_handle *h, uint32_t gen)
{
	uint64_t fh = (uint64_t)gen << 32 | h->idx;
	atomic_store_explicit(&h->fh, fh, memory_order_release);
	return fh;
}

static struct cas_handle *handle_find(struct cas_fs *fs, uint64_t fh)
{
	if (fh == 0)
		return NULL;
	struct cas_handle *h = handle_slot(fs, (uint32_t)fh);
	if (!h || atomic_load_explicit(&h->fh, memory_order_acquire) != fh)
		return NULL;
	return h;
}

static void handle_free(struct cas_fs *fs, struct cas_handle *h)
{
	atomic_store(&h->fh, 0);
	int fd = atomic_exchange(&h->fd, -1);
	if (fd >= 0 && h->fd_owned)
		close(fd);
	free(h->data);
	h->data = NULL;
	if (h->roots) {
		for (size_t i = 0; i < h->roots->n; i++)
			free(h->roots->nodes[i]);
		free(h->roots);
		h->roots = NULL;
	}
	pthread_mutex_lock(&fs->handle_lock);
	h->next_free = fs->free_head;
	fs->free_head = h->idx;
	pthread_mutex_unlock(&fs->handle_lock);
}

static void handle_unref(struct cas_fs *fs, struct cas_handle *h)
{
	if (atomic_fetch_sub(&h->refs, 1) == 1)
		handle_free(fs, h);
}

/* A READ's hold on handle fh, or NULL if fh is not a current open. */
static struct cas_handle *handle_hold(struct cas_fs *fs, uint64_t fh)
{
	struct cas_handle *h = handle_find(fs, fh);
	if (!h)
		return NULL;
	uint32_t refs = atomic_load(&h->refs);
	do {
		if (refs == 0)
			return NULL;
	} while (!atomic_compare_exchange_weak(&h->refs, &refs, refs + 1));
	/* Released, or released and reused, between find and hold? */
	if (atomic_load_explicit(&h->fh, memory_order_acquire) != fh) {
		handle_unref(fs, h);
		return NULL;
	}
	return h;
}

/* Removes the handle fh if it is current; -EBADF otherwise. */
static int handle_release(struct cas_fs *fs, uint64_t fh)
{
	struct cas_handle *h = handle_find(fs, fh);
	if (!h)
		return -EBADF;
	uint64_t expected = fh;
	/* Only one release wins, even if a confused peer sends two. */
	if (!atomic_compare_exchange_strong(&h->fh, &expected, 0))
		return -EBADF;
	handle_unref(fs, h);
	return 0;
}

static int fs_open(void *fs_, uint64_t ino, uint32_t flags,
		   struct cas_fuse_open *ret)
{
	struct cas_fs *fs = fs_;
	if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC))
		return -EROFS;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r;
	if (in->kind != KIND_FILE) {
		r = in->kind == KIND_SYMLINK ? -ELOOP : -EISDIR;
		goto out;
	}
	cas_digest dg;
	memcpy(dg.bytes, in->key, CAS_DIGEST_LEN);
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
	if (r == -ENOENT && in->size <= SMALL_FILE)
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
	if (r < 0) {
		if (first_report(fs, in->key)) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			cas_digest_to_hex(&dg, hex);
			if (r == -ENOENT)
				cas_log_error("blob %s: absent from the store",
					      hex);
			else
				cas_log_errno(r, "blob %s: %m", hex);
		}
		r = -EIO;
		goto out;
	}
	struct cas_handle *h;
	r = handle_new(fs, &h);
	if (r < 0) {
		if (fd >= 0 && owned)
			close(fd);
		free(data);
		goto out;
	}
	h->fd = fd;
	h->fd_owned = owned;
	h->base = base;
	h->data = data;
	h->size = size;
	ret->fh = handle_publish(h, (uint32_t)r);
	ret->open_flags = CAS_FOPEN_KEEP_CACHE | CAS_FOPEN_NOFLUSH;
	/* Passthrough needs a file that is the blob from offset 0. */
	ret->backing_fd = owned && base == 0 ? fd : -1;
	r = 0;
out:
	inode_put(fs, in);
	return r;
}

/* The hot path: no lock, no allocation; a copy only for small files. */
static int fs_read(void *fs_, uint64_t ino, uint64_t fh, uint64_t off,
		   uint32_t size, struct cas_fuse_read *ret)
{
	struct cas_fs *fs = fs_;
	struct cas_handle *h = handle_hold(fs, fh);
	if (!h)
		return -EBADF;
	int fd = atomic_load_explicit(&h->fd, memory_order_relaxed);
	uint64_t bsize = atomic_load_explicit(&h->size, memory_order_relaxed);
	uint64_t len = off < bsize ? CAS_MIN((uint64_t)size, bsize - off) : 0;
	if (h->data) {
		/* Copied now: the hold ends here, read_done is not called. */
		len = CAS_MIN(len, (uint64_t)ret->len);
		if (len > 0)
			memcpy(ret->buf, h->data + off, (size_t)len);
		ret->len = (size_t)len;
		handle_unref(fs, h);
		return 0;
	}
	if (fd < 0) { /* a directory's handle */
		handle_unref(fs, h);
		return -EBADF;
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
	struct cas_handle *h = handle_slot(fs, (uint32_t)fh);
	if (h)
		handle_unref(fs, h);
}

static int fs_release(void *fs_, uint64_t ino, uint64_t fh)
{
	return handle_release(fs_, fh);
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
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r = 0;
	ret->backing_fd = -1;
	if (in->kind == KIND_DIRECTORY) {
		const cas_directory *d;
		r = inode_directory(fs, in, &d);
		ret->fh = 0;
		ret->open_flags = CAS_FOPEN_CACHE_DIR | CAS_FOPEN_KEEP_CACHE;
	} else if (in->kind == KIND_ROOT) {
		/* Without --list-root the root opens (tar -C, fchdir and
		 * openat need that) but READDIR says EPERM. */
		if (!fs->opts.list_root) {
			ret->fh = 0;
			ret->open_flags = 0;
			goto out;
		}
		/* Roots change while mounted: a snapshot per opendir, so
		 * offsets stay meaningful, and no kernel cache. */
		struct root_list *l =
			calloc(1, sizeof(*l) + 16 * sizeof(cas_node *));
		if (!l) {
			r = -ENOMEM;
			goto out;
		}
		l->n = 0;
		/* collect_root grows at powers of two; start from 16 slots. */
		r = fs->store->ops->roots_foreach(fs->store, collect_root, &l);
		struct cas_handle *h = NULL;
		if (r >= 0)
			r = handle_new(fs, &h);
		if (r < 0) {
			for (size_t i = 0; i < l->n; i++)
				free(l->nodes[i]);
			free(l);
			if (r != -ENOMEM && r != -ENFILE) {
				cas_log_errno(r, "list roots: %m");
				r = -EIO;
			}
			goto out;
		}
		h->roots = l;
		ret->fh = handle_publish(h, (uint32_t)r);
		ret->open_flags = 0;
		r = 0;
	} else {
		r = -ENOTDIR;
	}
out:
	inode_put(fs, in);
	return r;
}

/* One entry of a listing; for READDIRPLUS with a lookup reference that
 * stays only if the entry fit. Returns 1 if added, 0 if full. */
static int add_node(struct cas_fs *fs, struct cas_fuse_dirbuf *db,
		    const cas_node *node, bool in_root, uint64_t next_off)
{
	if (node->name_len > NAME_MAX_LEN)
		return 1; /* cannot be served; skipped */
	uint32_t dtype = node->type == CAS_NODE_DIRECTORY ? S_IFDIR
			 : node->type == CAS_NODE_FILE	  ? S_IFREG
							  : S_IFLNK;
	if (!cas_fuse_dirbuf_plus(db))
		return cas_fuse_dirbuf_add(db, node->name, node->name_len,
					   ino_for_listing(fs, node), dtype,
					   next_off, NULL);
	struct cas_inode *in;
	int r = inode_for_node(fs, node, &in);
	if (r < 0)
		return r;
	struct cas_fuse_entry e;
	memset(&e, 0, sizeof(e));
	uint64_t ino = in->ino;
	if (inode_attr(fs, in, &e.attr) >= 0) {
		e.entry_valid = in_root ? ROOT_ENTRY_VALID : FOREVER;
		e.attr_valid = FOREVER;
		r = cas_fuse_dirbuf_add(db, node->name, node->name_len, ino,
					dtype, next_off, &e);
		inode_unref(fs, in, 1, r == 1 ? 0 : 1);
		return r;
	}
	/* Its Directory is unreadable: list the name without attributes
	 * (node id 0); a later LOOKUP reports the EIO. */
	inode_unref(fs, in, 1, 1);
	memset(&e, 0, sizeof(e));
	return cas_fuse_dirbuf_add(db, node->name, node->name_len, ino, dtype,
				   next_off, &e);
}

/* "." and "..": never a lookup reference (the engine sends node id 0). */
static int add_dot(struct cas_fuse_dirbuf *db, const char *name, uint64_t ino,
		   uint64_t next_off)
{
	return cas_fuse_dirbuf_add(db, (const uint8_t *)name, strlen(name), ino,
				   S_IFDIR, next_off, NULL);
}

/* Offsets: 1 after ".", 2 after "..", 3 + i after entry i (directories,
 * then files, then symlinks: each list is sorted, so an offset is an
 * index and resuming costs nothing). */
static int fs_readdir(void *fs_, uint64_t ino, uint64_t fh, uint64_t off,
		      struct cas_fuse_dirbuf *db)
{
	struct cas_fs *fs = fs_;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r = 0;
	if (in->kind == KIND_ROOT && !fs->opts.list_root) {
		r = -EPERM;
		goto out;
	}
	if (off == 0) {
		r = add_dot(db, ".", ino, 1);
		if (r <= 0)
			goto out;
		off = 1;
	}
	if (off == 1) {
		r = add_dot(db, "..",
			    in->kind == KIND_ROOT ? ino : CAS_FUSE_ROOT_ID, 2);
		if (r <= 0)
			goto out;
		off = 2;
	}
	if (in->kind == KIND_ROOT) {
		struct cas_handle *h = handle_find(fs, fh);
		if (!h || !h->roots) {
			r = fs->opts.list_root ? -EBADF : -EPERM;
			goto out;
		}
		for (uint64_t i = off - 2; i < h->roots->n; i++) {
			r = add_node(fs, db, h->roots->nodes[i], true, i + 3);
			if (r <= 0)
				break;
		}
	} else if (in->kind == KIND_DIRECTORY) {
		const cas_directory *d;
		r = inode_directory(fs, in, &d);
		if (r < 0)
			goto out;
		size_t n = cas_directory_count(d);
		for (uint64_t i = off - 2; i < n; i++) {
			const cas_node *node;
			if (i < d->n_directories)
				node = &d->directories[i];
			else if (i < d->n_directories + d->n_files)
				node = &d->files[i - d->n_directories];
			else
				node = &d->symlinks[i - d->n_directories -
						    d->n_files];
			r = add_node(fs, db, node, false, i + 3);
			if (r <= 0)
				break;
		}
	} else {
		r = -ENOTDIR;
	}
out:
	inode_put(fs, in);
	/* A full buffer is not an error: the kernel asks again from the
	 * last offset. */
	return r < 0 ? r : 0;
}

static int fs_releasedir(void *fs_, uint64_t ino, uint64_t fh)
{
	if (fh == 0)
		return 0;
	return handle_release(fs_, fh);
}

static int fs_statfs(void *fs_, uint64_t ino, struct cas_fuse_statfs *ret)
{
	struct cas_fs *fs = fs_;
	memset(ret, 0, sizeof(*ret));
	ret->bsize = BLKSIZE;
	ret->frsize = BLKSIZE;
	ret->namelen = NAME_MAX_LEN;
	pthread_mutex_lock(&fs->lock);
	ret->files = fs->n_inodes;
	pthread_mutex_unlock(&fs->lock);
	return 0;
}

#define XATTR_BLOB	"user.castore.blob.digest"
#define XATTR_DIRECTORY "user.castore.directory.digest"

/* The one xattr an inode has, or NULL. */
static const char *xattr_name(const struct cas_inode *in)
{
	return in->kind == KIND_FILE	    ? XATTR_BLOB
	       : in->kind == KIND_DIRECTORY ? XATTR_DIRECTORY
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
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	const char *mine = xattr_name(in);
	int r;
	if (!mine || strcmp(name, mine) != 0) {
		r = -ENODATA;
	} else if (size == 0) {
		r = CAS_DIGEST_HEX_LEN;
	} else if (size < CAS_DIGEST_HEX_LEN) {
		r = -ERANGE;
	} else {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		digest_hex(in->key, hex);
		memcpy(buf, hex, CAS_DIGEST_HEX_LEN);
		r = CAS_DIGEST_HEX_LEN;
	}
	inode_put(fs, in);
	return r;
}

static int fs_listxattr(void *fs_, uint64_t ino, char *buf, size_t size)
{
	struct cas_fs *fs = fs_;
	if (!fs->opts.show_xattr)
		return -ENOSYS;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	const char *mine = xattr_name(in);
	size_t len = mine ? strlen(mine) + 1 : 0;
	int r = (int)len;
	if (size && len > size)
		r = -ERANGE;
	else if (size && len)
		memcpy(buf, mine, len);
	inode_put(fs, in);
	return r;
}

static int fs_access(void *fs_, uint64_t ino, uint32_t mask)
{
	struct cas_fs *fs = fs_;
	struct cas_inode *in = inode_get(fs, ino);
	if (!in)
		return -ESTALE;
	int r = 0;
	if (mask & W_OK)
		r = -EROFS;
	else if ((mask & X_OK) && in->kind == KIND_FILE && !in->executable)
		r = -EACCES;
	inode_put(fs, in);
	return r;
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
	fs->next_ino = CAS_FUSE_ROOT_ID + 1;
	fs->free_head = UINT32_MAX;
	pthread_mutex_init(&fs->lock, NULL);
	pthread_mutex_init(&fs->handle_lock, NULL);
	pthread_mutex_init(&fs->logged_lock, NULL);
	const size_t initial = 1024;
	fs->root = calloc(1, sizeof(*fs->root));
	if (!fs->root || table_init(&fs->by_ino, initial) < 0 ||
	    table_init(&fs->by_key, initial) < 0) {
		cas_fs_free(fs);
		return -ENOMEM;
	}
	/* The root has no content key: it is found by number only. */
	fs->root->ino = CAS_FUSE_ROOT_ID;
	fs->root->kind = KIND_ROOT;
	fs->root->nlookup = 1;
	fs->root->key_hash = UINT32_MAX;
	fs->by_ino.buckets[ino_bucket(&fs->by_ino, fs->root->ino)] = fs->root;
	fs->by_key.buckets[fs->root->key_hash & fs->by_key.mask] = fs->root;
	fs->n_inodes = 1;
	atomic_store(&fs->memory, sizeof(*fs) + 2 * initial * sizeof(void *) +
					  malloc_usable_size(fs->root));
	*ret = fs;
	return 0;
}

void cas_fs_free(struct cas_fs *fs)
{
	if (!fs)
		return;
	if (fs->by_ino.buckets) {
		for (size_t i = 0; i <= fs->by_ino.mask; i++) {
			struct cas_inode *in = fs->by_ino.buckets[i], *next;
			for (; in; in = next) {
				next = in->next_by_ino;
				if (in == fs->root)
					continue;
				cas_directory_free(atomic_load(&in->dir));
				free(in);
			}
		}
	}
	free(fs->root);
	free(fs->by_ino.buckets);
	free(fs->by_key.buckets);
	for (size_t c = 0; c < HANDLE_MAX_CHUNKS; c++) {
		struct cas_handle *chunk = atomic_load(&fs->chunks[c]);
		if (!chunk)
			break;
		for (size_t i = 0; i < HANDLE_CHUNK; i++)
			if (atomic_load(&chunk[i].fh))
				handle_free(fs, &chunk[i]);
		free(chunk);
	}
	pthread_mutex_destroy(&fs->lock);
	pthread_mutex_destroy(&fs->handle_lock);
	pthread_mutex_destroy(&fs->logged_lock);
	free(fs);
}

void cas_fs_get_stats(struct cas_fs *fs, struct cas_fs_stats *ret)
{
	pthread_mutex_lock(&fs->lock);
	ret->inodes = fs->n_inodes;
	pthread_mutex_unlock(&fs->lock);
	ret->memory_bytes = atomic_load(&fs->memory);
}
