/* inodes_i.h - castorefs's inode table, Directory cache and named-root
 * bases (private to src/castorefs).
 *
 * Inode numbers are a preorder index of the path within its named root
 * (see the block comment in inodes.c): a number is computed, never looked
 * up, so nothing is remembered for an inode the kernel has forgotten.
 *
 * - struct cas_inode_table: the inodes the kernel holds a lookup
 *   reference to, as fixed 56-byte records in dense chunks, found by number
 *   through an open-addressing index of 32-bit record ids. Callers get
 *   copies; records move (a FORGET moves the last record into the hole).
 * - struct cas_dir_cache: decoded Directories by digest, with the spans
 *   that number their children; bounded by bytes, least recently used
 *   first out. Entries are reference counted; one in use is never freed.
 * - struct cas_root_bases: the first number of each (name, root node) met
 *   during the mount, so a root keeps its numbers while it is not
 *   replaced, and a replaced root gets fresh ones.
 *
 * Contract: each structure has its own mutex and every function here is
 * thread-safe. No function does I/O under a lock; cas_dir_cache_get reads
 * the store outside it.
 */
#ifndef CAS_CASTOREFS_INODES_I_H
#define CAS_CASTOREFS_INODES_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/directory.h"
#include "store/store.h"

enum cas_inode_kind {
	CAS_INODE_ROOT = 0,
	CAS_INODE_DIRECTORY = CAS_NODE_DIRECTORY,
	CAS_INODE_FILE = CAS_NODE_FILE,
	CAS_INODE_SYMLINK = CAS_NODE_SYMLINK,
};

/* A symlink that is a named root has no parent Directory. */
#define CAS_INODE_NO_INDEX UINT32_MAX

#define CAS_INODE_NLOOKUP_MAX ((1u << 28) - 1)

/* One inode as the table keeps it (56 bytes). */
struct cas_inode {
	uint64_t ino;
	/* directory: its DirectoryNode size (entries below it); file: blob
	 * size; symlink: target length */
	uint64_t size;
	/* directory: its Directory; file: its blob; symlink: the Directory
	 * that holds it (the target is read from there) */
	uint8_t digest[CAS_DIGEST_LEN];
	/* Lookup references; saturates: an inode at CAS_INODE_NLOOKUP_MAX
	 * is never freed (its true count is unknown). */
	uint32_t nlookup : 28;
	uint32_t kind : 3; /* enum cas_inode_kind */
	uint32_t executable : 1;
	union {
		uint32_t
			index; /* symlink: its index in the parent's symlinks */
		/* directory: its number minus its parent's, which readdir
		 * shows as ".."; 0: the parent is the root folder (for a
		 * named root, or when the distance needs more than 32 bits) */
		uint32_t up;
	};
};

struct cas_inode_table {
	pthread_mutex_t lock;
	struct cas_inode **chunks; /* protected by lock; records 0..n-1 */
	size_t n_chunks;	   /* protected by lock: allocated chunks */
	size_t chunks_cap;	   /* protected by lock: slots in chunks */
	uint32_t *slots;       /* protected by lock: record id + 1, 0 free */
	size_t mask;	       /* protected by lock: slots - 1 */
	size_t n;	       /* protected by lock: live records */
	atomic_size_t *memory; /* the filesystem's byte count */
};

int cas_inode_table_init(struct cas_inode_table *t, atomic_size_t *memory);
void cas_inode_table_release(struct cas_inode_table *t);
/* A copy of inode ino; -ESTALE if the kernel holds no reference to it. */
int cas_inode_table_get(struct cas_inode_table *t, uint64_t ino,
			struct cas_inode *ret);
/* One more lookup reference to `in` (ino and content filled by the
 * caller; nlookup ignored), inserted if new. -ENOMEM. */
int cas_inode_table_ref(struct cas_inode_table *t, const struct cas_inode *in);
/* FORGET: drops n references; the record goes at zero. Unknown numbers
 * are ignored. */
void cas_inode_table_forget(struct cas_inode_table *t, uint64_t ino,
			    uint64_t n);
size_t cas_inode_table_count(struct cas_inode_table *t);

/* A cached Directory: immutable while referenced. */
struct cas_dir_entry {
	cas_digest digest;
	cas_directory *dir;
	/* spans[j]: entries below this folder before its j-th directory,
	 * i.e. the sum of (1 + size) over directories[0..j-1];
	 * spans[n_directories] covers all of them. */
	uint64_t *spans;
	uint64_t size; /* entries below it, as counted here */
	bool size_ok;  /* size fits 64 bits */
	uint32_t refs; /* protected by the cache's lock */
	bool cached;   /* protected by the cache's lock: in hash and LRU */
	size_t bytes;  /* heap held, for the bound */
	struct cas_dir_entry *next_hash, *lru_prev, *lru_next;
};

#define CAS_DIR_CACHE_BUCKETS 4096

struct cas_dir_cache {
	pthread_mutex_t lock;
	struct cas_dir_entry *buckets[CAS_DIR_CACHE_BUCKETS]; /* by lock */
	struct cas_dir_entry lru; /* protected by lock: head, MRU first */
	size_t bytes;		  /* protected by lock: cached entries */
	size_t limit;
	atomic_size_t *memory;
};

void cas_dir_cache_init(struct cas_dir_cache *c, size_t limit,
			atomic_size_t *memory);
void cas_dir_cache_release(struct cas_dir_cache *c);
/* The Directory with digest d, from the cache or read from the store and
 * decoded (cas_store_directory_get's errors). Release with put. */
int cas_dir_cache_get(struct cas_dir_cache *c, cas_store *store,
		      const cas_digest *d, struct cas_dir_entry **ret);
void cas_dir_cache_put(struct cas_dir_cache *c, struct cas_dir_entry *e);

/* The number of a folder's entry `node` (which must point into e->dir's
 * lists) when the folder itself is number `ino`. The caller has checked
 * that the folder's declared size equals e->size, so ino + e->size fits. */
uint64_t cas_dir_entry_ino(const struct cas_dir_entry *e, uint64_t ino,
			   const cas_node *node);

struct cas_root_base;
struct cas_root_bases {
	pthread_mutex_t lock;
	struct cas_root_base *buckets[256]; /* protected by lock */
	struct cas_root_base **by_base;	    /* protected by lock: sorted */
	size_t n, cap;			    /* protected by lock */
	uint64_t next;			    /* protected by lock */
	atomic_size_t *memory;
};

void cas_root_bases_init(struct cas_root_bases *b, uint64_t first,
			 atomic_size_t *memory);
void cas_root_bases_release(struct cas_root_bases *b);
/* The first number of root `name` with node `node`: the one it had if
 * this pair was met before, else the next free range (1 + its size for a
 * directory). -EOVERFLOW when the 64-bit numbers are used up, -ENOMEM. */
int cas_root_bases_get(struct cas_root_bases *b, const char *name,
		       const cas_node *node, uint64_t *ret_base);
/* The target of the symlink root numbered base, copied into buf (up to
 * size bytes); its length, or -ENOENT. */
int cas_root_bases_target(struct cas_root_bases *b, uint64_t base, char *buf,
			  size_t size);

#endif
