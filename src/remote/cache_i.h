/* cache_i.h - what the files of the cache share. The cache is a remote store: the cas_store ops read through a local cache
 * (an ordinary local store), fetching what it lacks from a fetcher
 * (remote_i.h) and checking every byte before it is used or cached.
 *
 * Blobs: fetched whole into a file in the cache's tmp/ while hashed;
 * bytes that do not hash to the name are dropped (file removed), -EIO,
 * logged with both digests. A verified blob is "staged": readable at once
 * through its tmp/ file, but named (renamed to its place in blobs/) only
 * by the publisher thread, in groups, after one syncfs has made the group
 * durable - so a name never points at bytes a power loss could have
 * lost, and no fetch waits for a sync of its own (docs/remote.md).
 * Small blobs (at most CAS_LOCAL_PACK_MAX bytes) of an unbounded cache
 * never get a file: they are gathered in memory, readable from there at
 * once, and the publisher appends each group (full, or 1 s old) to a
 * pack of the cache's own (local.h: written, synced, then indexed), as
 * import does.
 * A file per small blob cost a create, a rename and an open each, more
 * than the transfer itself. A bounded cache keeps files: eviction works
 * on them one blob at a time.
 * Concurrent readers of one absent blob wait for one fetch: `inflight`
 * lists the digests being fetched, `cond` wakes the waiters.
 *
 * Directories: the cache stores a Directory only after its children
 * (closure), so a missing Directory is fetched with every Directory below
 * it that the cache lacks - in one request when the transport streams
 * subtrees (gRPC Get recursive), else one tree level per round of
 * concurrent GETs - verified (hash, canonical decode), then committed
 * leaves first in one batch.
 *
 * Roots: the cache's, plus those the remote publishes (HTTP); the cache's
 * win on a name both have. roots add and rm change the cache only.
 *
 * Files, one concern each: cache.c (the ops table, roots, life, the
 * in-flight table), cache_fetch.c (blob fetch, verification, staging and
 * the publisher that names staged blobs), cache_prefetch.c (prefetch
 * walks, batches, the large-blob worker), cache_tree.c (Directory
 * closures). Contract: private to src/remote; struct cache_store's fields
 * say which lock protects them; the cache is a cas_store and shares its
 * thread-safety and ownership rules (store.h).
 */
#ifndef CAS_REMOTE_CACHE_I_H
#define CAS_REMOTE_CACHE_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "core/directory.h"
#include "remote/remote_i.h"
#include "store/ingest.h"
#include "store/local.h"

struct inflight {
	cas_digest digest;
	unsigned refs;
	bool done;
	bool quiet; /* a prefetch: its failure is not the waiter's answer */
	int r;
};

/* Prefetch: when a Directory is read, the small blobs it names that the
 * cache lacks - and those of the Directories below it that the cache
 * holds, up to PREFETCH_AHEAD blobs ahead - are fetched by worker
 * threads, so that a reader going through the files (export, cp -r, a
 * build) finds them cached or in flight instead of paying one round trip
 * per file. A transport that fetches batches (blobs_fetch: streams of one
 * HTTP/2 connection, or parallel transfers) gets up to PREFETCH_BATCH
 * blobs per call from one or two threads; else each of 8 threads fetches
 * one blob at a time. Bounded queue; off with $CASTORE_PREFETCH=0 (else
 * that many threads). */
#define PREFETCH_DEFAULT_THREADS 8
#define PREFETCH_BATCH_THREADS	 2
#define PREFETCH_MAX_THREADS	 32
#define PREFETCH_QUEUE		 8192
#define PREFETCH_AHEAD		 4096
#define PREFETCH_BATCH		 256
#define PREFETCH_BATCH_BYTES	 (4u << 20)
#define PREFETCH_MAX_SIZE	 (1u << 20)
#define PREFETCH_MAX_DEPTH	 64

/* Larger blobs are prefetched too, but one at a time by a thread of their
 * own, streamed to a file as a reader's fetch is (no batch, no memory
 * copy): a reader would otherwise fetch them itself, one by one, each a
 * pause in its work. The walk queues them in order, up to LARGE_QUEUE,
 * and goes on with the small ones behind them; the large worker starts
 * the next one only once readers have read, since the walk began, as
 * many bytes as the large blobs it started, less LARGE_AHEAD: so a
 * mount's ls (no blob read) fetches none, a cat of one file at most
 * LARGE_AHEAD bytes of them, and an export stays that far ahead. */
#define LARGE_QUEUE 64
#define LARGE_AHEAD (64ull << 20)

struct prefetch_item {
	cas_digest digest;
	uint64_t size;
	/* Where the published layout's pack of its Directory holds it
	 * (remote_i.h); off UINT64_MAX when in none. */
	cas_digest pack;
	uint64_t off;
};

/* Pack ranges: a run of queued blobs of one pack is one request, taking
 * in gaps of up to RANGE_GAP bytes (blobs already cached or fetched by
 * another thread) rather than splitting, up to RANGE_MAX bytes. */
#define RANGE_GAP (64u << 10)
#define RANGE_MAX (8u << 20)

/* Small blobs gathered in memory for the cache's pack: group bytes back
 * to back in buf (aligned for O_DIRECT), v[i] where each lies. A group
 * is written when full, or MGROUP_DELAY_MS after its first blob, and
 * stays readable from memory until the next one is written (mspare): a
 * reader a little behind the prefetch (export, a few thousand blobs)
 * then copies from memory instead of reading back from the disk what
 * went there with O_DIRECT, one small read each. */
#define MGROUP_BYTES	(16u << 20)
#define MGROUP_BLOBS	16384
#define MGROUP_DELAY_MS 1000

struct mgroup {
	uint8_t *buf;
	size_t used, n;
	struct cas_local_small *v; /* MGROUP_BLOBS entries */
	struct timespec first;	   /* CLOCK_MONOTONIC, of v[0] */
};

/* Staging: a group is published once this many blobs wait, or this long
 * after the first of them; fetchers wait when STAGED_MAX are unnamed. */
#define STAGE_GROUP    4096
#define STAGE_DELAY_MS 200
#define STAGED_MAX     65536

/* One level of the prefetch walk (cache_prefetch.c). */
struct walk_frame {
	cas_digest d;
	cas_directory *dir;
	uint64_t *off;	  /* where its pack holds its files, or NULL */
	uint8_t *want;	  /* walk_wants of its files, once looked up */
	size_t next_dir;  /* the next Directory below to enter */
	size_t next_file; /* then the next file to queue */
};

/* Large blobs by range (cache_range.c): a blob over CAS_BAO_THRESHOLD
 * whose remote publishes its outboard is held in part (store/partial.h)
 * and fetched RANGE_RUN bytes at most per request, each run verified
 * against the outboard before it is written. A reader waits for the
 * groups of its own range; a sequential one (each read starting where
 * the last ended) also gets a readahead window that doubles from
 * RANGE_RA_MIN to RANGE_RA_MAX, fetched by RANGE_THREADS background
 * threads in parallel runs. */
#define RANGE_RUN     (4u << 20)
#define RANGE_RA_MIN  (1u << 20)
#define RANGE_RA_MAX  (64u << 20)
#define RANGE_THREADS 4
#define RANGE_QUEUE   256

struct range_blob;
struct range_job {
	struct range_blob *rb;
	uint64_t first, n; /* groups */
};

struct cache_ranges {
	pthread_mutex_t lock; /* taken after cache_store.lock, never before */
	pthread_cond_t cond;  /* a run finished */
	pthread_cond_t job_cond;   /* workers: a job or stop */
	pthread_mutex_t open_lock; /* one range blob opened at a time */
	struct cas_dmap blobs;	   /* digest -> range_blob; lock */
	struct range_job queue[RANGE_QUEUE]; /* ring; lock */
	size_t q_head, q_len;		     /* protected by lock */
	bool stopping;			     /* protected by lock */
	pthread_t threads[RANGE_THREADS];
	unsigned n_threads;	    /* protected by lock */
	struct cas_dmap bad_logged; /* blobs reported wrong; lock */
};

/* Declared sizes: a blob is fetched at most to the size a FileNode gave
 * it (docs/remote.md, "What the client accepts"). The cache learns the
 * sizes from the Directories and roots it hands out and from
 * blob_open_ranged; the table keeps the last DECLARED_MAX of them (then
 * starts anew), so a reader that opens a file of a Directory it read
 * long before may find no size: then the transport's bound holds
 * (remote_i.h). */
#define DECLARED_MAX (1u << 18)

struct published_root {
	char *name;
	cas_node *node;
};

struct cache_store {
	cas_store base;
	cas_fetcher *fetcher;
	cas_store *cache;
	char *what; /* the URL, for messages */
	char *cache_dir;
	uint64_t cache_max;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct cas_dmap blobs_inflight;	  /* -> inflight; protected by lock */
	struct cas_dmap dirs_inflight;	  /* -> inflight; protected by lock */
	bool roots_loaded;		  /* protected by lock */
	struct published_root *published; /* protected by lock */
	size_t n_published;		  /* protected by lock */
	uint64_t cache_bytes;		  /* protected by lock */

	pthread_mutex_t evict_lock; /* one eviction at a time */

	unsigned prefetch_threads; /* 0: no prefetch */
	pthread_t workers[PREFETCH_MAX_THREADS];
	unsigned n_workers; /* protected by lock */
	pthread_cond_t pq_cond;
	struct prefetch_item *pq;     /* protected by lock: ring */
	size_t pq_head, pq_len;	      /* protected by lock */
	bool stopping;		      /* protected by lock */
	atomic_bool closing;	      /* cache_free began: abort fetches */
	struct timespec paused_until; /* protected by lock */
	struct cas_dmap prefetched; /* Directories walked; protected by lock */
	pthread_mutex_t walk_lock;  /* the walk; taken before lock */
	struct walk_frame *walk;    /* PREFETCH_MAX_DEPTH; walk_lock */
	size_t walk_depth;	    /* protected by walk_lock */
	unsigned walk_budget;	    /* blobs it may queue; lock */
	bool walk_active;	    /* it has more to go; lock */
	bool walk_kick;		    /* a worker is to continue it; lock */
	uint64_t walk_read_bytes;   /* readers read since it began; lock */
	uint64_t walk_large_bytes;  /* large worker started since; lock */
	bool walk_large_full;	    /* it waits for room in lq; lock */
	struct prefetch_item lq[LARGE_QUEUE]; /* ring; lock */
	size_t lq_head, lq_len;		      /* protected by lock */
	bool large_started;		      /* protected by lock */
	pthread_t large_worker;
	pthread_cond_t lq_cond;
	struct cas_dmap
		bad_logged;	  /* blobs reported wrong; protected by lock */
	struct cas_dmap declared; /* digest -> size (uintptr_t); lock */

	/* Every blob goes into the cache through the store's one write
	 * path (store/ingest.h): staged files, the pack, eviction. */
	struct cas_ingest *ingest;
	struct cas_dmap staged;		  /* digest -> cas_ingest_file; lock */
	struct cas_ingest_file **pending; /* staged, not yet synced; lock */
	size_t n_pending, cap_pending;	  /* protected by lock */
	bool publisher_started;		  /* protected by lock */
	bool publisher_stopping;	  /* protected by lock */
	bool sync_failed_logged;	  /* protected by lock */
	bool publishing;       /* a group is out; protected by lock */
	unsigned flushers;     /* in cas_cache_flush; lock */
	uint64_t staged_bytes; /* protected by lock */
	pthread_t publisher;
	pthread_cond_t pub_cond; /* publisher: work; fetchers: room */

	bool pack_small;	 /* small blobs go to a pack */
	uint64_t pack_max;	 /* bounded: a pack's and group's size */
	struct mgroup *mfill;	 /* being filled; protected by lock */
	struct mgroup *mwrite;	 /* being written; protected by lock */
	struct mgroup *mspare;	 /* written, readable, for reuse; lock */
	bool mem_full;		 /* a stager waits for room; lock */
	bool pack_failed_logged; /* protected by lock */
	struct cas_dmap mstaged; /* digest -> entry of a group; lock */
	bool packs_found;	 /* a pack range was fetched; lock */
	bool no_packs;		 /* the layout has none; lock */

	struct cache_ranges ranges; /* large blobs by range, own lock */
};

static inline struct cache_store *to_cache(cas_store *s)
{
	return (struct cache_store *)s;
}

/* cache.c: the in-flight table (one fetch for all who ask at once). */
void cas_cache_inflight_done(struct cache_store *c, struct cas_dmap *list,
			     struct inflight *e, int r);
struct inflight *cas_cache_inflight_join(struct cache_store *c,
					 struct cas_dmap *map,
					 const cas_digest *d, bool *ret_owner);
void cas_cache_inflight_unref_locked(struct cas_dmap *map, struct inflight *e);
int cas_cache_inflight_wait(struct cache_store *c, struct cas_dmap *list,
			    struct inflight *e, bool *ret_quiet);

/* cache_fetch.c: blob fetches, verification, staging, the publisher. */
int cas_cache_held_open(struct cache_store *c, const cas_digest *d, int *ret_fd,
			uint64_t *ret_size);
int cas_cache_held_read(struct cache_store *c, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size);
int cas_cache_held_stat(struct cache_store *c, const cas_digest *d,
			uint64_t *ret_size);
int cas_cache_check_fetched(struct cache_store *c, const cas_digest *d,
			    const cas_digest *got, bool quiet);
/* max: the declared size, or CAS_FETCH_UNSIZED for the one the cache
 * learnt (cas_cache_declared). */
int cas_cache_ensure_blob(struct cache_store *c, const cas_digest *d,
			  uint64_t max, bool quiet);
void cas_cache_declare(struct cache_store *c, const cas_digest *d,
		       uint64_t size);
/* Declares the sizes of the files of a Directory's (verified) bytes. */
void cas_cache_declare_dir(struct cache_store *c, const uint8_t *buf,
			   size_t len);
/* The size declared for d, or CAS_FETCH_UNSIZED. */
uint64_t cas_cache_declared(struct cache_store *c, const cas_digest *d);
/* The reason of a failed fetch for its one error line. */
const char *cas_cache_fetch_why(int r, uint64_t max, char *buf, size_t size);
void cas_cache_mark_used(struct cache_store *c, int fd);
void cas_cache_maybe_evict(struct cache_store *c, uint64_t added);
int cas_cache_mem_stage(struct cache_store *c, const cas_digest *d,
			const uint8_t *buf, size_t len);
void cas_cache_mgroup_free(struct mgroup *g);
int cas_cache_file_stage(struct cache_store *c, const cas_digest *d,
			 const uint8_t *buf, size_t len);

/* cache_range.c: large blobs by range. */
bool cas_cache_ranged(const struct cache_store *c);
void cas_cache_ranges_init(struct cache_store *c);
void cas_cache_ranges_stop(struct cache_store *c);
void cas_cache_ranges_release(struct cache_store *c);
int cas_cache_blob_open_ranged(cas_store *s, const cas_digest *d, uint64_t size,
			       int *ret_fd);
int cas_cache_blob_ensure(cas_store *s, const cas_digest *d, uint64_t off,
			  uint64_t len);

/* cache_prefetch.c: prefetch walks and batches. */
void cas_cache_prefetch_directory(struct cache_store *c, const cas_digest *d,
				  const uint8_t *buf, size_t len);
void cas_cache_walk_clear(struct cache_store *c);
void cas_cache_walk_credit(struct cache_store *c, uint64_t size);

/* cache_tree.c: Directory closures. */
int cas_cache_dir_batch_new(cas_store *s, cas_dir_batch **ret);
int cas_cache_directory_get_raw(cas_store *s, const cas_digest *d,
				uint8_t **ret_buf, size_t *ret_len);
int cas_cache_directory_has(cas_store *s, const cas_digest *d);

#endif
