/* cache.c - a remote store: the cas_store ops read through a local cache
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
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote_i.h"
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

struct staged_blob {
	char tmp[48]; /* name in the cache's tmp/ */
	uint64_t size;
	cas_digest digest;
};

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
		bad_logged; /* blobs reported wrong; protected by lock */

	int tmp_fd; /* the cache's tmp/ */
	pid_t pid;  /* in tmp/ names (O_EXCL settles a clash after fork) */
	atomic_uint_fast64_t tmp_counter;
	struct cas_dmap staged;	       /* digest -> staged_blob; lock */
	struct staged_blob **pending;  /* staged, not yet synced; lock */
	size_t n_pending, cap_pending; /* protected by lock */
	bool publisher_started;	       /* protected by lock */
	bool publisher_stopping;       /* protected by lock */
	bool sync_failed_logged;       /* protected by lock */
	bool publishing;	       /* a group is out; protected by lock */
	unsigned flushers;	       /* in cas_cache_flush; lock */
	uint64_t staged_bytes;	       /* protected by lock */
	pthread_t publisher;
	pthread_cond_t pub_cond; /* publisher: work; fetchers: room */

	bool pack_small;	     /* small blobs go to a pack (unbounded) */
	struct cas_local_pack *pack; /* the publisher's */
	struct mgroup *mfill;	     /* being filled; protected by lock */
	struct mgroup *mwrite;	     /* being written; protected by lock */
	struct mgroup *mspare;	     /* written, readable, for reuse; lock */
	bool mem_full;		     /* a stager waits for room; lock */
	bool pack_failed_logged;     /* protected by lock */
	struct cas_dmap mstaged;     /* digest -> entry of a group; lock */
	bool packs_found;	     /* a pack range was fetched; lock */
	bool no_packs;		     /* the layout has none; lock */
};

static struct cache_store *to_cache(cas_store *s)
{
	return (struct cache_store *)s;
}

/* In-flight table ------------------------------------------------------ */

/* Returns the entry for d, creating it (*ret_owner = true: the caller
 * fetches and must call inflight_done) or joining it. */
static struct inflight *inflight_join(struct cache_store *c,
				      struct cas_dmap *map, const cas_digest *d,
				      bool *ret_owner)
{
	pthread_mutex_lock(&c->lock);
	struct cas_dmap_entry *me = map->n ? cas_dmap_find(map, d) : NULL;
	struct inflight *e = me ? me->value : NULL;
	if (e) {
		e->refs++;
		*ret_owner = false;
	} else {
		e = calloc(1, sizeof(*e));
		if (e) {
			e->digest = *d;
			e->refs = 1;
			if (cas_dmap_put(map, d, e) < 0) {
				free(e);
				e = NULL;
			}
		}
		*ret_owner = true;
	}
	pthread_mutex_unlock(&c->lock);
	return e;
}

static void inflight_unref_locked(struct cas_dmap *map, struct inflight *e)
{
	if (--e->refs > 0)
		return;
	struct cas_dmap_entry *me = cas_dmap_find(map, &e->digest);
	if (me && me->value == e)
		cas_dmap_remove(map, me);
	free(e);
}

static int inflight_wait(struct cache_store *c, struct cas_dmap *list,
			 struct inflight *e, bool *ret_quiet)
{
	pthread_mutex_lock(&c->lock);
	while (!e->done)
		pthread_cond_wait(&c->cond, &c->lock);
	int r = e->r;
	if (ret_quiet)
		*ret_quiet = e->quiet;
	inflight_unref_locked(list, e);
	pthread_mutex_unlock(&c->lock);
	return r;
}

static void inflight_done(struct cache_store *c, struct cas_dmap *list,
			  struct inflight *e, int r)
{
	pthread_mutex_lock(&c->lock);
	e->done = true;
	e->r = r;
	pthread_cond_broadcast(&c->cond);
	inflight_unref_locked(list, e);
	pthread_mutex_unlock(&c->lock);
}

/* Blobs ------------------------------------------------------------------ */

/* Transports hand over small pieces (libcurl: 16 KiB, whatever its
 * buffer size): gathered into SINK_BUFFER bytes, they cost one write and
 * one wide hash update each instead of dozens. From the second buffer
 * of a blob on, a helper thread hashes one buffer while the fetching
 * thread writes it and fills the other, so that hashing a large blob
 * overlaps its download instead of adding to it. */
#define SINK_BUFFER (1u << 20)

struct blob_sink {
	struct cache_store *c;
	char *tmp; /* the file's name in tmp/, once made */
	int fd;	   /* -1 until the first buffer is written out */
	cas_hasher hasher;
	uint64_t size;
	uint8_t *bufs[2]; /* SINK_BUFFER bytes each, allocated when needed */
	unsigned cur;	  /* the buffer being filled */
	size_t len;	  /* bytes in it */

	bool threaded; /* the hashing thread runs */
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	const uint8_t *job; /* protected by lock: to hash, or NULL */
	size_t job_len;	    /* protected by lock */
	bool stop;	    /* protected by lock */
};

static void blob_sink_free(struct blob_sink *b)
{
	free(b->bufs[0]);
	free(b->bufs[1]);
	b->bufs[0] = b->bufs[1] = NULL;
}

static void *sink_hash_main(void *arg)
{
	struct blob_sink *b = arg;
	pthread_mutex_lock(&b->lock);
	for (;;) {
		while (!b->job && !b->stop)
			pthread_cond_wait(&b->cond, &b->lock);
		if (!b->job)
			break;
		const uint8_t *job = b->job;
		size_t len = b->job_len;
		pthread_mutex_unlock(&b->lock);
		cas_hasher_update(&b->hasher, job, len);
		pthread_mutex_lock(&b->lock);
		b->job = NULL;
		pthread_cond_broadcast(&b->cond);
	}
	pthread_mutex_unlock(&b->lock);
	return NULL;
}

/* Waits until the hashing thread is idle (the hasher is then ours). */
static void sink_hash_wait(struct blob_sink *b)
{
	if (!b->threaded)
		return;
	pthread_mutex_lock(&b->lock);
	while (b->job)
		pthread_cond_wait(&b->cond, &b->lock);
	pthread_mutex_unlock(&b->lock);
}

/* The blob's file in tmp/, made when its first buffer is written out (a
 * small blob that the cache packs never has one). */
static int sink_open(struct blob_sink *b)
{
	struct cache_store *c = b->c;
	for (int tries = 0; b->fd < 0 && tries < 100; tries++) {
		snprintf(b->tmp, sizeof(((struct staged_blob *)0)->tmp),
			 "remote.%ld.%llu", (long)c->pid,
			 (unsigned long long)atomic_fetch_add(&c->tmp_counter,
							      1));
		b->fd = openat(c->tmp_fd, b->tmp,
			       O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
		if (b->fd < 0 && errno != EEXIST)
			break;
	}
	if (b->fd >= 0)
		return 0;
	b->tmp[0] = 0;
	return cas_log_errno(cas_negerrno(), "cache %s: create in tmp/: %m",
			     c->cache_dir);
}

static int blob_sink_flush(struct blob_sink *b)
{
	if (b->len == 0)
		return 0;
	if (b->fd < 0) {
		int r = sink_open(b);
		if (r < 0)
			return r;
	}
	const uint8_t *buf = b->bufs[b->cur];
	size_t len = b->len;
	b->len = 0;
	sink_hash_wait(b);
	if (!b->threaded && b->size > len && !b->bufs[1]) {
		/* A second buffer: the blob is large enough for the thread. */
		b->bufs[1] = malloc(SINK_BUFFER);
		if (b->bufs[1] && pthread_mutex_init(&b->lock, NULL) == 0) {
			pthread_cond_init(&b->cond, NULL);
			b->threaded = pthread_create(&b->thread, NULL,
						     sink_hash_main, b) == 0;
			if (!b->threaded) {
				pthread_cond_destroy(&b->cond);
				pthread_mutex_destroy(&b->lock);
			}
		}
	}
	if (b->threaded && b->bufs[1]) {
		pthread_mutex_lock(&b->lock);
		b->job = buf;
		b->job_len = len;
		pthread_cond_broadcast(&b->cond);
		pthread_mutex_unlock(&b->lock);
		b->cur ^= 1;
	} else {
		cas_hasher_update(&b->hasher, buf, len);
	}
	return cas_write_all(b->fd, buf, len);
}

static int blob_sink_write(void *userdata, const void *buf, size_t len)
{
	struct blob_sink *b = userdata;
	/* The cache is closing: a prefetch in flight (a large blob, maybe
	 * on a slow link) must not hold it open. */
	if (atomic_load_explicit(&b->c->closing, memory_order_relaxed))
		return -ECANCELED;
	b->size += len;
	if (!b->bufs[b->cur] && !(b->bufs[b->cur] = malloc(SINK_BUFFER)))
		return -ENOMEM;
	while (len > 0) {
		size_t n = CAS_MIN(len, SINK_BUFFER - b->len);
		memcpy(b->bufs[b->cur] + b->len, buf, n);
		b->len += n;
		buf = (const uint8_t *)buf + n;
		len -= n;
		if (b->len == SINK_BUFFER) {
			int r = blob_sink_flush(b);
			if (r < 0)
				return r;
		}
	}
	return 0;
}

/* Flushes what is buffered (when ok; keep_small: unless the blob is all
 * in the buffer, which then holds it) and ends the hashing thread. */
static int blob_sink_finish(struct blob_sink *b, bool ok)
{
	int r = 0;
	if (ok && b->fd < 0 && b->c->pack_small &&
	    b->size <= CAS_LOCAL_PACK_MAX) {
		/* All in bufs[cur]: hashed here, handed to the pack. */
		if (b->len)
			cas_hasher_update(&b->hasher, b->bufs[b->cur], b->len);
		return 0;
	}
	if (ok)
		r = blob_sink_flush(b);
	if (b->threaded) {
		pthread_mutex_lock(&b->lock);
		b->stop = true;
		pthread_cond_broadcast(&b->cond);
		pthread_mutex_unlock(&b->lock);
		/* The thread hashes its last job before it sees stop. */
		pthread_join(b->thread, NULL);
		pthread_cond_destroy(&b->cond);
		pthread_mutex_destroy(&b->lock);
		b->threaded = false;
	}
	blob_sink_free(b);
	return r;
}

static void maybe_evict(struct cache_store *c, uint64_t added)
{
	if (c->cache_max == 0)
		return;
	pthread_mutex_lock(&c->lock);
	c->cache_bytes += added;
	bool over = c->cache_bytes > c->cache_max;
	pthread_mutex_unlock(&c->lock);
	if (!over)
		return;
	pthread_mutex_lock(&c->evict_lock);
	/* Down to 90 %, so that eviction does not run on every fetch.
	 * Staged blobs are not files in blobs/ yet (nor evictable): room
	 * is made for them among the named ones. */
	pthread_mutex_lock(&c->lock);
	uint64_t staged = c->staged_bytes, target = c->cache_max / 10 * 9;
	pthread_mutex_unlock(&c->lock);
	int64_t now = cas_cache_evict(c->cache_dir,
				      target > staged ? target - staged : 0);
	if (now >= 0) {
		pthread_mutex_lock(&c->lock);
		c->cache_bytes = (uint64_t)now + c->staged_bytes;
		pthread_mutex_unlock(&c->lock);
	}
	pthread_mutex_unlock(&c->evict_lock);
}

static void *publisher_main(void *arg);

static int start_publisher_locked(struct cache_store *c)
{
	if (c->publisher_started)
		return 0;
	if (pthread_create(&c->publisher, NULL, publisher_main, c) != 0)
		return -EAGAIN;
	c->publisher_started = true;
	return 0;
}

/* Hands a verified blob file to the publisher (waits while STAGED_MAX
 * blobs are unnamed). Takes sb. */
static int stage_blob(struct cache_store *c, struct staged_blob *sb)
{
	int r = 0;

	pthread_mutex_lock(&c->lock);
	while (c->staged.n >= STAGED_MAX && c->publisher_started &&
	       !c->publisher_stopping)
		pthread_cond_wait(&c->pub_cond, &c->lock);
	r = start_publisher_locked(c);
	if (r >= 0 && c->n_pending == c->cap_pending) {
		size_t cap = c->cap_pending ? c->cap_pending * 2 : 256;
		struct staged_blob **np =
			realloc(c->pending, cap * sizeof(*np));
		if (np) {
			c->pending = np;
			c->cap_pending = cap;
		} else {
			r = -ENOMEM;
		}
	}
	if (r >= 0)
		r = cas_dmap_put(&c->staged, &sb->digest, sb);
	if (r > 0) {
		c->pending[c->n_pending++] = sb;
		c->staged_bytes += sb->size;
		if (c->n_pending == 1 || c->n_pending >= STAGE_GROUP)
			pthread_cond_broadcast(&c->pub_cond);
	}
	pthread_mutex_unlock(&c->lock);
	if (r <= 0) {
		/* Staged already by another fetch, or no room: drop ours. */
		(void)unlinkat(c->tmp_fd, sb->tmp, 0);
		free(sb);
	}
	return r < 0 ? r : 0;
}

/* Bytes that hashed to `got` for d: 0 when right, else -EIO, logged once
 * per digest (a mount's readers may ask again and again) unless quiet. */
static int check_fetched(struct cache_store *c, const cas_digest *d,
			 const cas_digest *got, bool quiet)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], got_hex[CAS_DIGEST_HEX_LEN + 1];
	if (cas_digest_eq(got, d))
		return 0;
	pthread_mutex_lock(&c->lock);
	if (!quiet && cas_dmap_put(&c->bad_logged, d, NULL) == 0)
		quiet = true;
	pthread_mutex_unlock(&c->lock);
	cas_digest_to_hex(d, hex);
	cas_digest_to_hex(got, got_hex);
	return cas_log_internal(quiet ? CAS_LOG_DEBUG : CAS_LOG_ERROR, -EIO,
				"blob %s: remote sent bytes that hash to %s",
				hex, got_hex);
}

static bool mgroup_room(const struct mgroup *g, size_t len)
{
	return g->n < MGROUP_BLOBS && g->used + len <= MGROUP_BYTES;
}

/* Drops g's blobs from mstaged (read from the pack from now on); lock. */
static void mgroup_forget(struct cache_store *c, const struct mgroup *g)
{
	for (size_t i = 0; i < g->n; i++) {
		struct cas_dmap_entry *e =
			cas_dmap_find(&c->mstaged, &g->v[i].digest);
		if (e && e->value == &g->v[i])
			cas_dmap_remove(&c->mstaged, e);
	}
}

static struct mgroup *mgroup_new(struct cache_store *c)
{
	struct mgroup *g = c->mspare;
	if (g) {
		mgroup_forget(c, g);
		c->mspare = NULL;
		g->used = g->n = 0;
		return g;
	}
	g = calloc(1, sizeof(*g));
	if (!g)
		return NULL;
	g->buf = aligned_alloc(CAS_LOCAL_PACK_ALIGN, MGROUP_BYTES);
	g->v = calloc(MGROUP_BLOBS, sizeof(*g->v));
	if (!g->buf || !g->v) {
		free(g->buf);
		free(g->v);
		free(g);
		return NULL;
	}
	return g;
}

static void mgroup_free(struct mgroup *g)
{
	if (!g)
		return;
	free(g->buf);
	free(g->v);
	free(g);
}

/* Adds a verified small blob to the group in memory (readable at once,
 * packed by the publisher); waits while both groups are full. */
static int mem_stage(struct cache_store *c, const cas_digest *d,
		     const uint8_t *buf, size_t len)
{
	int r;
	pthread_mutex_lock(&c->lock);
	for (;;) {
		r = start_publisher_locked(c);
		if (r < 0 || (c->mstaged.n && cas_dmap_find(&c->mstaged, d)))
			goto out;
		if (!c->mfill || mgroup_room(c->mfill, len) ||
		    c->publisher_stopping)
			break;
		c->mem_full = true;
		pthread_cond_broadcast(&c->pub_cond);
		pthread_cond_wait(&c->pub_cond, &c->lock);
	}
	if (!c->mfill && !(c->mfill = mgroup_new(c))) {
		r = -ENOMEM;
		goto out;
	}
	struct mgroup *g = c->mfill;
	if (!mgroup_room(g, len)) {
		r = -ENOSPC; /* stopping: not kept */
		goto out;
	}
	struct cas_local_small *e = &g->v[g->n];
	*e = (struct cas_local_small){*d, g->used, len};
	r = cas_dmap_put(&c->mstaged, d, e);
	if (r > 0) {
		if (len)
			memcpy(g->buf + g->used, buf, len);
		g->used += len;
		if (++g->n == 1) {
			clock_gettime(CLOCK_MONOTONIC, &g->first);
			pthread_cond_broadcast(&c->pub_cond);
		}
	}
out:
	pthread_mutex_unlock(&c->lock);
	return r < 0 ? r : 0;
}

static int fetch_blob(struct cache_store *c, const cas_digest *d, bool quiet)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	struct staged_blob *sb;
	cas_digest got;
	int r;

	cas_digest_to_hex(d, hex);
	sb = calloc(1, sizeof(*sb));
	if (!sb)
		return -ENOMEM;
	sb->digest = *d;
	struct blob_sink b = {.c = c, .tmp = sb->tmp, .fd = -1};
	cas_hasher_init(&b.hasher);
	r = c->fetcher->ops->blob_fetch(c->fetcher, d, blob_sink_write, &b);
	int fr = blob_sink_finish(&b, r >= 0);
	if (r >= 0)
		r = fr;
	if (b.fd >= 0 && close(b.fd) < 0 && r >= 0)
		r = cas_log_errno(cas_negerrno(), "blob %s: cache %s: %m", hex,
				  c->cache_dir);
	if (r >= 0) {
		cas_hasher_final(&b.hasher, &got);
		r = check_fetched(c, d, &got, quiet);
	} else if (r != -ENOENT) {
		r = cas_log_internal(quiet ? CAS_LOG_DEBUG : CAS_LOG_ERROR,
				     -EIO, "blob %s: fetch from %s failed: %m",
				     hex, c->what);
	}
	if (r >= 0 && b.fd < 0) {
		/* Small, all in memory: to the pack. */
		r = mem_stage(c, d, b.bufs[b.cur], b.size);
		blob_sink_free(&b);
		free(sb);
		return r < 0 ? cas_log_errno(r, "blob %s: cache %s: %m", hex,
					     c->cache_dir)
			     : 0;
	}
	blob_sink_free(&b);
	if (r < 0) {
		if (sb->tmp[0])
			(void)unlinkat(c->tmp_fd, sb->tmp, 0);
		free(sb);
		return r;
	}
	sb->size = b.size;
	r = stage_blob(c, sb);
	if (r < 0)
		return cas_log_errno(r, "blob %s: cache %s: %m", hex,
				     c->cache_dir);
	/* Counted now, evicted by the caller once it holds the blob open
	 * (flocked): evicting here could remove the blob just fetched. */
	if (c->cache_max) {
		pthread_mutex_lock(&c->lock);
		c->cache_bytes += b.size;
		pthread_mutex_unlock(&c->lock);
	}
	return 0;
}

/* Names one synced staged blob in the cache's blobs/ (never over a name
 * that exists: that one holds the same bytes). */
static void publish_staged(struct cache_store *c, const struct staged_blob *sb)
{
	char path[4096], hex[CAS_DIGEST_HEX_LEN + 1];
	int r = cas_local_blob_path(c->cache, &sb->digest, path, sizeof(path));
	for (int attempt = 0; r == 0 && attempt < 2; attempt++) {
		if (renameat2(c->tmp_fd, sb->tmp, AT_FDCWD, path,
			      RENAME_NOREPLACE) == 0)
			return;
		r = cas_negerrno();
		if (r == -EEXIST)
			break;
		if (r == -EINVAL) {
			/* A file system without RENAME_NOREPLACE. */
			if (linkat(c->tmp_fd, sb->tmp, AT_FDCWD, path, 0) < 0 &&
			    errno != EEXIST)
				r = cas_negerrno();
			else
				r = -EEXIST;
			break;
		}
		if (r != -ENOENT)
			break;
		/* The fan-out folder is missing. */
		char *slash = strrchr(path, '/');
		*slash = 0;
		if (mkdir(path, 0755) < 0 && errno != EEXIST) {
			r = cas_negerrno();
			break;
		}
		*slash = '/';
		r = 0;
	}
	(void)unlinkat(c->tmp_fd, sb->tmp, 0);
	if (r < 0 && r != -EEXIST) {
		cas_digest_to_hex(&sb->digest, hex);
		cas_log_warning("blob %s: cache %s: cannot name it: %s", hex,
				c->cache_dir, strerror(-r));
	}
}

/* When mfill is to be written: its deadline (MGROUP_DELAY_MS after its
 * first blob) in *ret_when, and whether it is due now. */
static bool mfill_due(const struct cache_store *c, struct timespec *ret_when)
{
	if (!c->mfill || c->mfill->n == 0)
		return false;
	struct timespec now, when = c->mfill->first;
	when.tv_nsec += MGROUP_DELAY_MS % 1000 * 1000000L;
	when.tv_sec += MGROUP_DELAY_MS / 1000 + when.tv_nsec / 1000000000L;
	when.tv_nsec %= 1000000000L;
	if (ret_when)
		*ret_when = when;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return c->mem_full || c->publisher_stopping || c->flushers > 0 ||
	       !mgroup_room(c->mfill, CAS_LOCAL_PACK_MAX) ||
	       now.tv_sec > when.tv_sec ||
	       (now.tv_sec == when.tv_sec && now.tv_nsec >= when.tv_nsec);
}

static bool publisher_has_work(const struct cache_store *c)
{
	return c->n_pending > 0 || mfill_due(c, NULL);
}

/* Appends a group of small blobs to the cache's pack: written, synced,
 * then indexed (local.h). */
static int mgroup_write(struct cache_store *c, struct mgroup *g)
{
	size_t padded = (g->used + CAS_LOCAL_PACK_ALIGN - 1) /
			CAS_LOCAL_PACK_ALIGN * CAS_LOCAL_PACK_ALIGN;
	memset(g->buf + g->used, 0, padded - g->used);
	int r = 0;
	if (!c->pack)
		r = cas_local_pack_new(c->cache, &c->pack);
	if (r == 0)
		r = cas_local_pack_append(c->pack, g->buf, padded, g->v, g->n,
					  NULL);
	return r;
}

/* Publishes the staged blobs in groups: waits for a group to gather,
 * makes it durable with one syncfs, then names each blob; and appends
 * the small blobs gathered in memory to the pack. Until named, a staged
 * blob is read through its tmp/ file (staged_open), a small one from
 * memory (mem_get). */
static void *publisher_main(void *arg)
{
	struct cache_store *c = arg;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		struct timespec until;
		while (!publisher_has_work(c) && !c->publisher_stopping) {
			if (c->mfill && c->mfill->n > 0) {
				(void)mfill_due(c, &until);
				(void)pthread_cond_timedwait(&c->pub_cond,
							     &c->lock, &until);
			} else {
				pthread_cond_wait(&c->pub_cond, &c->lock);
			}
		}
		if (!publisher_has_work(c))
			break;
		clock_gettime(CLOCK_MONOTONIC, &until);
		until.tv_nsec += STAGE_DELAY_MS * 1000000L;
		until.tv_sec += until.tv_nsec / 1000000000L;
		until.tv_nsec %= 1000000000L;
		while (c->n_pending > 0 && c->n_pending < STAGE_GROUP &&
		       !c->publisher_stopping && c->staged.n < STAGED_MAX &&
		       c->flushers == 0 && !c->mem_full &&
		       pthread_cond_timedwait(&c->pub_cond, &c->lock, &until) ==
			       0)
			;
		struct staged_blob **group = c->pending;
		size_t n = c->n_pending;
		c->pending = NULL;
		c->n_pending = c->cap_pending = 0;
		struct mgroup *mg = NULL;
		if (mfill_due(c, NULL)) {
			mg = c->mwrite = c->mfill;
			c->mfill = NULL;
			c->mem_full = false;
			pthread_cond_broadcast(&c->pub_cond); /* room */
		}
		c->publishing = true;
		pthread_mutex_unlock(&c->lock);

		int pack_r = mg ? mgroup_write(c, mg) : 0;
		bool synced = true;
		int sync_errno = 0;
		if (n > 0) {
			/* Every byte of the group was written before this. */
			synced = syncfs(c->tmp_fd) == 0;
			sync_errno = errno;
		}
		for (size_t i = 0; synced && i < n; i++)
			publish_staged(c, group[i]);

		pthread_mutex_lock(&c->lock);
		if (!synced && !c->sync_failed_logged) {
			c->sync_failed_logged = true;
			cas_log_warning("cache %s: syncfs: %s; blobs fetched "
					"are not kept",
					c->cache_dir, strerror(sync_errno));
		}
		if (pack_r < 0 && !c->pack_failed_logged) {
			c->pack_failed_logged = true;
			cas_log_warning("cache %s: pack: %s; small blobs "
					"fetched are not kept",
					c->cache_dir, strerror(-pack_r));
		}
		for (size_t i = 0; i < n; i++) {
			struct cas_dmap_entry *e =
				cas_dmap_find(&c->staged, &group[i]->digest);
			if (e)
				cas_dmap_remove(&c->staged, e);
			/* Open fds keep the bytes; the name goes. */
			if (!synced)
				(void)unlinkat(c->tmp_fd, group[i]->tmp, 0);
			c->staged_bytes -= group[i]->size;
			free(group[i]);
		}
		free(group);
		if (mg) {
			/* Indexed now (or lost): still read from memory
			 * until the next group is written. */
			c->mwrite = NULL;
			if (c->mspare) {
				mgroup_forget(c, c->mspare);
				mgroup_free(c->mspare);
			}
			c->mspare = mg;
		}
		pthread_mutex_unlock(&c->lock);
		maybe_evict(c, 0);
		pthread_mutex_lock(&c->lock);
		c->publishing = false;
		pthread_cond_broadcast(&c->pub_cond);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

void cas_cache_flush(cas_store *s)
{
	struct cache_store *c = to_cache(s);
	pthread_mutex_lock(&c->lock);
	c->flushers++;
	pthread_cond_broadcast(&c->pub_cond);
	while (c->publisher_started && (publisher_has_work(c) || c->publishing))
		pthread_cond_wait(&c->pub_cond, &c->lock);
	c->flushers--;
	pthread_mutex_unlock(&c->lock);
}

/* Opens a staged blob: 0, or -ENOENT when it is not staged (any more:
 * the publisher may have named it meanwhile, so look in the cache). */
static int staged_open(struct cache_store *c, const cas_digest *d, int *ret_fd,
		       uint64_t *ret_size)
{
	int r = -ENOENT;

	pthread_mutex_lock(&c->lock);
	struct cas_dmap_entry *e =
		c->staged.n ? cas_dmap_find(&c->staged, d) : NULL;
	if (e) {
		struct staged_blob *sb = e->value;
		int fd = openat(c->tmp_fd, sb->tmp, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			*ret_fd = fd;
			if (ret_size)
				*ret_size = sb->size;
			r = 0;
		} else if (errno != ENOENT) {
			r = cas_negerrno();
		}
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

static bool is_staged(struct cache_store *c, const cas_digest *d,
		      uint64_t *ret_size)
{
	pthread_mutex_lock(&c->lock);
	struct cas_dmap_entry *e =
		c->staged.n ? cas_dmap_find(&c->staged, d) : NULL;
	if (e)
		*ret_size = ((struct staged_blob *)e->value)->size;
	else if ((e = c->mstaged.n ? cas_dmap_find(&c->mstaged, d) : NULL))
		*ret_size = ((struct cas_local_small *)e->value)->len;
	pthread_mutex_unlock(&c->lock);
	return e != NULL;
}

/* A small blob gathered in memory: 0 with a copy (malloc'd) if it has at
 * most max bytes (else -EFBIG), -ENOENT when it is not there (any more:
 * look in the cache). */
static int mem_get(struct cache_store *c, const cas_digest *d, size_t max,
		   uint8_t **ret_buf, uint64_t *ret_size)
{
	int r = -ENOENT;
	pthread_mutex_lock(&c->lock);
	struct cas_dmap_entry *e =
		c->mstaged.n ? cas_dmap_find(&c->mstaged, d) : NULL;
	if (e) {
		const struct cas_local_small *v = e->value;
		/* An entry of mfill's, mwrite's or mspare's table. */
		const struct mgroup *g = c->mspare;
		const struct mgroup *gs[] = {c->mfill, c->mwrite};
		for (size_t i = 0; i < 2; i++)
			if (gs[i] && (uintptr_t)v >= (uintptr_t)gs[i]->v &&
			    (uintptr_t)v < (uintptr_t)(gs[i]->v + MGROUP_BLOBS))
				g = gs[i];
		uint8_t *buf =
			v->len > max ? NULL : malloc(v->len ? v->len : 1);
		r = v->len > max ? -EFBIG : buf ? 0 : -ENOMEM;
		if (buf) {
			memcpy(buf, g->buf + v->off, v->len);
			*ret_buf = buf;
			*ret_size = v->len;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

/* The cache's blob_stat, staged blobs included. */
static int cached_blob_stat(struct cache_store *c, const cas_digest *d,
			    uint64_t *ret_size)
{
	uint64_t size;
	if (is_staged(c, d, ret_size ? ret_size : &size))
		return 0;
	return c->cache->ops->blob_stat(c->cache, d,
					ret_size ? ret_size : &size);
}

/* The cache's blob_open, staged blobs included. */
static int cached_blob_open(struct cache_store *c, const cas_digest *d,
			    int *ret_fd, uint64_t *ret_size)
{
	_cleanup_free_ uint8_t *buf = NULL;
	uint64_t size;
	int r = mem_get(c, d, SIZE_MAX, &buf, &size);
	if (r == 0) {
		r = cas_memfd_sealed(buf, size, ret_fd);
		if (r == 0 && ret_size)
			*ret_size = size;
		return r;
	}
	if (r != -ENOENT)
		return r;
	r = staged_open(c, d, ret_fd, ret_size);
	if (r != -ENOENT)
		return r;
	return c->cache->ops->blob_open(c->cache, d, ret_fd, ret_size);
}

/* The cache's blob_read, staged blobs included. */
static int cached_blob_read(struct cache_store *c, const cas_digest *d,
			    size_t max, uint8_t **ret_buf, uint64_t *ret_size)
{
	int r = mem_get(c, d, max, ret_buf, ret_size);
	if (r != -ENOENT)
		return r;
	_cleanup_close_ int fd = -1;
	uint64_t size;
	r = staged_open(c, d, &fd, &size);
	if (r == -ENOENT)
		return cas_store_blob_read(c->cache, d, max, ret_buf, ret_size);
	if (r < 0)
		return r;
	return cas_store_blob_read_fd(d, fd, size, max, ret_buf, ret_size);
}

/* A shared flock marks the blob as in use for eviction (evict.c); the
 * access time orders the blobs for it. */
static void mark_used(struct cache_store *c, int fd)
{
	if (c->cache_max == 0)
		return;
	(void)flock(fd, LOCK_SH | LOCK_NB);
	struct timespec ts[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};
	(void)futimens(fd, ts);
}

/* Makes sure the cache holds d: 0, -ENOENT, -EIO. One fetch for all the
 * threads that ask at once. */
static int ensure_blob(struct cache_store *c, const cas_digest *d, bool quiet)
{
	for (unsigned attempt = 0;; attempt++) {
		bool owner, was_quiet = false;
		uint64_t size;
		struct inflight *e =
			inflight_join(c, &c->blobs_inflight, d, &owner);
		if (!e)
			return -ENOMEM;
		if (!owner) {
			int r = inflight_wait(c, &c->blobs_inflight, e,
					      &was_quiet);
			/* A failed prefetch logged nothing: a reader asks
			 * again itself, so that its error is reported. */
			if (r < 0 && was_quiet && !quiet && attempt < 3)
				continue;
			return r;
		}
		e->quiet = quiet;
		/* It may have landed between the caller's miss and the join. */
		int r = cached_blob_stat(c, d, &size);
		if (r == -ENOENT)
			r = fetch_blob(c, d, quiet);
		inflight_done(c, &c->blobs_inflight, e, r);
		return r;
	}
}

/* One prefetch batch: the blobs this worker owns in the in-flight table
 * (it), their entries and results; the pack ranges that fetch runs of
 * them; and the blobs fetched alone (ds, idx: their index in it). */
#define BATCH_RETRY 1 /* r: a range did not give it; fetch it alone */

struct batch {
	struct cache_store *c;
	struct prefetch_item it[PREFETCH_BATCH];
	struct inflight *e[PREFETCH_BATCH];
	int r[PREFETCH_BATCH];
	size_t n;
	struct cas_fetch_range ranges[PREFETCH_BATCH];
	size_t range_of[PREFETCH_BATCH]; /* SIZE_MAX: fetched alone */
	size_t range_first[PREFETCH_BATCH], range_end[PREFETCH_BATCH];
	size_t n_ranges;
	bool pack_absent, pack_found;
	cas_digest ds[PREFETCH_BATCH];
	size_t idx[PREFETCH_BATCH];
	size_t n_ds;
};

/* A verified blob that was fetched whole into memory but goes to a file
 * (too large for the pack, or a bounded cache): written to tmp/, staged. */
static int file_stage(struct cache_store *c, const cas_digest *d,
		      const uint8_t *buf, size_t len)
{
	struct staged_blob *sb = calloc(1, sizeof(*sb));
	if (!sb)
		return -ENOMEM;
	sb->digest = *d;
	sb->size = len;
	struct blob_sink b = {.c = c, .tmp = sb->tmp, .fd = -1};
	int r = sink_open(&b);
	if (r >= 0)
		r = cas_write_all(b.fd, buf, len);
	if (b.fd >= 0 && close(b.fd) < 0 && r >= 0)
		r = cas_negerrno();
	if (r < 0) {
		if (sb->tmp[0])
			(void)unlinkat(c->tmp_fd, sb->tmp, 0);
		free(sb);
		return r;
	}
	r = stage_blob(c, sb);
	if (r >= 0 && c->cache_max) {
		pthread_mutex_lock(&c->lock);
		c->cache_bytes += len;
		pthread_mutex_unlock(&c->lock);
	}
	return r;
}

/* A fetched blob: verified, then kept in memory for the pack, or put in
 * a file. */
static int batch_stage(struct batch *b, size_t k, const uint8_t *buf,
		       size_t len)
{
	cas_digest got;
	cas_hash_buffer(buf, len, &got);
	int r = check_fetched(b->c, &b->it[k].digest, &got, true);
	if (r == 0 && b->c->pack_small && len <= CAS_LOCAL_PACK_MAX)
		r = mem_stage(b->c, &b->it[k].digest, buf, len);
	else if (r == 0)
		r = file_stage(b->c, &b->it[k].digest, buf, len);
	return r;
}

static void batch_blob(void *userdata, size_t j, int r, const uint8_t *buf,
		       size_t len)
{
	struct batch *b = userdata;
	size_t k = b->idx[j];
	if (r == 0)
		r = batch_stage(b, k, buf, len);
	b->r[k] = r < 0 && r != -ENOENT ? -EIO : r;
	if (r == 0) {
		/* A reader waiting for it need not wait for the rest of the
		 * batch; woken only then (waking every reader per blob costs
		 * each a sleep and a wake per blob). */
		struct cache_store *c = b->c;
		pthread_mutex_lock(&c->lock);
		bool waited = b->e[k]->refs > 1;
		b->e[k]->done = true;
		b->e[k]->r = 0;
		inflight_unref_locked(&c->blobs_inflight, b->e[k]);
		b->e[k] = NULL;
		if (waited)
			pthread_cond_broadcast(&c->cond);
		pthread_mutex_unlock(&c->lock);
	}
}

static void batch_range(void *userdata, size_t i, int r, const uint8_t *buf,
			size_t len)
{
	struct batch *b = userdata;
	const struct cas_fetch_range *rg = &b->ranges[i];
	if (r == -ENOENT)
		b->pack_absent = true;
	else if (r == 0)
		b->pack_found = true;
	for (size_t k = b->range_first[i]; k < b->range_end[i]; k++) {
		if (b->range_of[k] != i)
			continue;
		uint64_t at = b->it[k].off - rg->off;
		/* Anything wrong with the pack (absent, short, bytes that
		 * are not the blob): the blob is fetched alone, whose
		 * answer is the one that counts. */
		b->r[k] = BATCH_RETRY;
		if (r == 0 && at + b->it[k].size <= len &&
		    batch_stage(b, k, buf + at, (size_t)b->it[k].size) == 0)
			b->r[k] = 0;
	}
}

/* Groups the batch's packed blobs into ranges of their packs; a range
 * of one blob is not worth one (the blob is fetched alone). */
static void batch_plan_ranges(struct batch *b, bool packs)
{
	size_t n_tent = 0;
	size_t count[PREFETCH_BATCH];
	for (size_t k = 0; k < b->n; k++) {
		const struct prefetch_item *it = &b->it[k];
		b->range_of[k] = SIZE_MAX;
		if (!packs || it->off == UINT64_MAX)
			continue;
		struct cas_fetch_range *cur =
			n_tent ? &b->ranges[n_tent - 1] : NULL;
		uint64_t end = cur ? cur->off + cur->len : 0;
		if (cur && cas_digest_eq(&cur->pack, &it->pack) &&
		    it->off >= end && it->off - end <= RANGE_GAP &&
		    it->off + it->size - cur->off <= RANGE_MAX) {
			cur->len = it->off + it->size - cur->off;
		} else {
			cur = &b->ranges[n_tent];
			*cur = (struct cas_fetch_range){it->pack, it->off,
							it->size};
			b->range_first[n_tent] = k;
			count[n_tent++] = 0;
		}
		b->range_of[k] = n_tent - 1;
		b->range_end[n_tent - 1] = k + 1;
		count[n_tent - 1]++;
	}
	/* Keep the ranges of two or more blobs, renumbered. */
	size_t map[PREFETCH_BATCH];
	b->n_ranges = 0;
	for (size_t i = 0; i < n_tent; i++) {
		map[i] = count[i] >= 2 ? b->n_ranges : SIZE_MAX;
		if (count[i] < 2)
			continue;
		b->ranges[b->n_ranges] = b->ranges[i];
		b->range_first[b->n_ranges] = b->range_first[i];
		b->range_end[b->n_ranges] = b->range_end[i];
		b->n_ranges++;
	}
	for (size_t k = 0; k < b->n; k++)
		if (b->range_of[k] != SIZE_MAX)
			b->range_of[k] = map[b->range_of[k]];
}

/* Fetches blobs of up to PREFETCH_MAX_SIZE (those nobody else is
 * fetching and the cache still lacks): runs of a published pack with
 * ranges_fetch, the rest (and what a range did not give) with one
 * blobs_fetch call; waiters are woken once the ranges are in, and at the
 * end. Returns -EIO when any failed for a reason other than absence. */
static int prefetch_batch(struct cache_store *c, const struct prefetch_item *v,
			  size_t n)
{
	struct batch *b = malloc(sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->c = c;
	b->n = 0;
	b->pack_absent = b->pack_found = false;
	for (size_t i = 0; i < n; i++) {
		bool owner;
		uint64_t size;
		struct inflight *e = inflight_join(c, &c->blobs_inflight,
						   &v[i].digest, &owner);
		if (!e)
			continue;
		if (!owner || cached_blob_stat(c, &v[i].digest, &size) == 0) {
			/* Fetched by another thread, or already here. */
			if (owner) {
				inflight_done(c, &c->blobs_inflight, e, 0);
			} else {
				pthread_mutex_lock(&c->lock);
				inflight_unref_locked(&c->blobs_inflight, e);
				pthread_mutex_unlock(&c->lock);
			}
			continue;
		}
		e->quiet = true;
		b->it[b->n] = v[i];
		b->e[b->n] = e;
		b->r[b->n] = -EIO;
		b->n++;
	}
	pthread_mutex_lock(&c->lock);
	bool packs = !c->no_packs;
	pthread_mutex_unlock(&c->lock);
	batch_plan_ranges(b, packs);
	if (b->n_ranges)
		(void)c->fetcher->ops->ranges_fetch(
			c->fetcher, b->ranges, b->n_ranges, batch_range, b);
	b->n_ds = 0;
	pthread_mutex_lock(&c->lock);
	for (size_t k = 0; k < b->n; k++)
		if (b->range_of[k] == SIZE_MAX || b->r[k] == BATCH_RETRY) {
			b->r[k] = -EIO;
			b->ds[b->n_ds] = b->it[k].digest;
			b->idx[b->n_ds++] = k;
		} else {
			/* Its readers need not wait for the larger blobs
			 * fetched next. */
			b->e[k]->done = true;
			b->e[k]->r = 0;
			inflight_unref_locked(&c->blobs_inflight, b->e[k]);
			b->e[k] = NULL;
		}
	if (b->n_ds < b->n)
		pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	int r = 0;
	if (b->n_ds)
		r = c->fetcher->ops->blobs_fetch(c->fetcher, b->ds, b->n_ds,
						 PREFETCH_MAX_SIZE, batch_blob,
						 b);
	pthread_mutex_lock(&c->lock);
	/* A layout published without packs: stop asking for them. */
	c->packs_found |= b->pack_found;
	if (b->pack_absent && !c->packs_found)
		c->no_packs = true;
	for (size_t i = 0; i < b->n; i++) {
		if (!b->e[i])
			continue;
		b->e[i]->done = true;
		b->e[i]->r = b->r[i];
		if (b->r[i] == -EIO)
			r = -EIO;
		inflight_unref_locked(&c->blobs_inflight, b->e[i]);
	}
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	free(b);
	return r < 0 ? -EIO : 0;
}

static void walk_continue(struct cache_store *c);

/* The remote fails: stop prefetching for a while rather than fail every
 * queued blob (the caller drops its queue). lock held. */
static void prefetch_pause(struct cache_store *c)
{
	clock_gettime(CLOCK_MONOTONIC, &c->paused_until);
	c->paused_until.tv_sec += 5;
}

static void *prefetch_main(void *arg)
{
	struct cache_store *c = arg;
	struct prefetch_item v[PREFETCH_BATCH];
	bool batched = c->fetcher->ops->blobs_fetch != NULL;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		while (!c->stopping && c->pq_len == 0 && !c->walk_kick)
			pthread_cond_wait(&c->pq_cond, &c->lock);
		if (c->stopping)
			break;
		/* A batch (every queued blob is at most PREFETCH_MAX_SIZE),
		 * or one blob. */
		size_t n = 0;
		uint64_t bytes = 0;
		while (c->pq_len > 0 && n < (batched ? PREFETCH_BATCH : 1) &&
		       bytes < PREFETCH_BATCH_BYTES) {
			v[n] = c->pq[c->pq_head];
			bytes += v[n++].size;
			c->pq_head = (c->pq_head + 1) % PREFETCH_QUEUE;
			c->pq_len--;
		}
		bool more = c->walk_kick || c->pq_len < PREFETCH_AHEAD / 2;
		c->walk_kick = false;
		pthread_mutex_unlock(&c->lock);
		if (more)
			walk_continue(c);
		if (n == 0) {
			pthread_mutex_lock(&c->lock);
			continue;
		}
		int r;
		if (batched)
			r = prefetch_batch(c, v, n);
		else
			r = ensure_blob(c, &v[0].digest, true);
		maybe_evict(c, 0);
		pthread_mutex_lock(&c->lock);
		if (r == -EIO) {
			prefetch_pause(c);
			c->pq_len = 0;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* Whether the large worker may start a blob of size bytes (LARGE_QUEUE's
 * comment); the size comes from the remote: no overflow. lock held. */
static bool large_admitted(const struct cache_store *c, uint64_t size)
{
	uint64_t limit = c->walk_read_bytes + LARGE_AHEAD;
	return c->walk_read_bytes > 0 && size <= limit &&
	       c->walk_large_bytes <= limit - size;
}

static void walk_run(struct cache_store *c);

/* The large worker: one blob at a time from lq, in order, each once
 * readers are far enough; it continues the walk when that waits for
 * room in lq (blocking on walk_lock: a walk_run in progress may have
 * found lq full already). */
static void *large_main(void *arg)
{
	struct cache_store *c = arg;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		while (!c->stopping &&
		       !(c->lq_len > 0 &&
			 large_admitted(c, c->lq[c->lq_head].size)))
			pthread_cond_wait(&c->lq_cond, &c->lock);
		if (c->stopping)
			break;
		struct prefetch_item it = c->lq[c->lq_head];
		c->lq_head = (c->lq_head + 1) % LARGE_QUEUE;
		c->lq_len--;
		c->walk_large_bytes += it.size;
		bool go_on = c->walk_large_full;
		c->walk_large_full = false;
		pthread_mutex_unlock(&c->lock);
		if (go_on) {
			pthread_mutex_lock(&c->walk_lock);
			walk_run(c);
			pthread_mutex_unlock(&c->walk_lock);
		}
		int r = ensure_blob(c, &it.digest, true);
		maybe_evict(c, 0);
		pthread_mutex_lock(&c->lock);
		if (r == -EIO) {
			prefetch_pause(c);
			c->lq_len = 0;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* The prefetch walk: one per cache, a stack of the Directories it is in.
 * It goes in export's order - the Directories below one first, then its
 * own files - and queues the small blobs the cache lacks until
 * PREFETCH_AHEAD wait; workers continue it as they drain the queue, so
 * it stays ahead of the reader instead of restarting behind it; each blob
 * a reader reads lets it go one further (walk_budget), so that it stays
 * at most PREFETCH_AHEAD ahead and stops when nobody reads. A
 * Directory is marked when the walk enters it, so each is walked once. A
 * reader that reads a Directory the walk has not entered is elsewhere:
 * the walk moves there (the old one is dropped). */
struct walk_frame {
	cas_digest d;
	cas_directory *dir;
	uint64_t *off;	  /* where its pack holds its files, or NULL */
	uint8_t *want;	  /* walk_wants of its files, once looked up */
	size_t next_dir;  /* the next Directory below to enter */
	size_t next_file; /* then the next file to queue */
};

static void walk_clear(struct cache_store *c)
{
	for (size_t i = 0; i < c->walk_depth; i++) {
		cas_directory_free(c->walk[i].dir);
		free(c->walk[i].off);
		free(c->walk[i].want);
	}
	c->walk_depth = 0;
}

/* Enters Directory d (buf: its bytes) unless the walk has been there;
 * walk_lock held. */
static void walk_push(struct cache_store *c, const cas_digest *d,
		      const uint8_t *buf, size_t len)
{
	cas_directory *dir = NULL;
	if (c->walk_depth == PREFETCH_MAX_DEPTH ||
	    cas_directory_decode(buf, len, &dir, NULL) < 0)
		return;
	pthread_mutex_lock(&c->lock);
	bool seen = cas_dmap_put(&c->prefetched, d, NULL) <= 0;
	bool packs = c->fetcher->ops->ranges_fetch && !c->no_packs;
	pthread_mutex_unlock(&c->lock);
	if (seen) {
		cas_directory_free(dir);
		return;
	}
	uint64_t *off = NULL;
	if (packs && dir->n_files &&
	    (off = malloc(dir->n_files * sizeof(*off))) &&
	    cas_layout_pack_offsets(dir, off, &(uint64_t){0}) == 0) {
		free(off);
		off = NULL;
	}
	c->walk[c->walk_depth++] =
		(struct walk_frame){.d = *d, .dir = dir, .off = off};
}

enum walk_want { WANT_NONE, WANT_SMALL, WANT_LARGE };

/* Whether and where the walk queues file i of f: a blob the cache lacks. */
static uint8_t walk_wants(struct cache_store *c, const struct walk_frame *f,
			  size_t i)
{
	const cas_node *n = &f->dir->files[i];
	uint64_t size;
	/* Within a bounded cache, prefetch must not push out what is
	 * being read. */
	if ((c->cache_max && n->size > c->cache_max / 64) ||
	    cached_blob_stat(c, &n->digest, &size) != -ENOENT)
		return WANT_NONE;
	return n->size <= PREFETCH_MAX_SIZE ? WANT_SMALL : WANT_LARGE;
}

static void *large_main(void *arg);

/* Queues large file i of f for the large worker: false when the walk
 * must wait for room in lq; c->lock held. */
static bool walk_queue_large(struct cache_store *c, const struct walk_frame *f,
			     size_t i)
{
	const cas_node *n = &f->dir->files[i];
	if (c->lq_len == LARGE_QUEUE) {
		c->walk_large_full = true;
		return false;
	}
	if (!c->large_started) {
		if (pthread_create(&c->large_worker, NULL, large_main, c) != 0)
			return true; /* no thread: the reader fetches it */
		c->large_started = true;
	}
	c->lq[(c->lq_head + c->lq_len++) % LARGE_QUEUE] =
		(struct prefetch_item){n->digest, n->size, f->d, UINT64_MAX};
	c->walk_budget--;
	pthread_cond_signal(&c->lq_cond);
	return true;
}

/* One more prefetch worker, if the cache may have one; lock held. */
static void spawn_worker(struct cache_store *c)
{
	if (c->n_workers < c->prefetch_threads &&
	    pthread_create(&c->workers[c->n_workers], NULL, prefetch_main, c) ==
		    0)
		c->n_workers++;
}

/* Queues file i of f; c->lock held, the queue not full. */
static void walk_queue_file(struct cache_store *c, const struct walk_frame *f,
			    size_t i)
{
	const cas_node *n = &f->dir->files[i];
	c->pq[(c->pq_head + c->pq_len) % PREFETCH_QUEUE] =
		(struct prefetch_item){n->digest, n->size, f->d,
				       f->off ? f->off[i] : UINT64_MAX};
	c->pq_len++;
	c->walk_budget--;
	if (c->n_workers < c->pq_len)
		spawn_worker(c);
	pthread_cond_signal(&c->pq_cond);
}

/* Goes on until PREFETCH_AHEAD blobs wait or the walk is done;
 * walk_lock held. */
static void walk_run(struct cache_store *c)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&c->lock);
	while (c->walk_depth > 0 && !c->stopping &&
	       now.tv_sec >= c->paused_until.tv_sec &&
	       c->pq_len < PREFETCH_AHEAD && c->walk_budget > 0) {
		struct walk_frame *f = &c->walk[c->walk_depth - 1];
		if (f->next_dir < f->dir->n_directories) {
			const cas_digest *sub =
				&f->dir->directories[f->next_dir++].digest;
			if (cas_dmap_find(&c->prefetched, sub))
				continue;
			pthread_mutex_unlock(&c->lock);
			uint8_t *buf = NULL;
			size_t len = 0;
			/* Only what the cache holds: a Directory comes with
			 * its closure, so below a held one all are held. */
			if (c->cache->ops->directory_get_raw(c->cache, sub,
							     &buf, &len) == 0)
				walk_push(c, sub, buf, len);
			free(buf);
			pthread_mutex_lock(&c->lock);
			continue;
		}
		/* Looked up unlocked, once (a walk that waits goes on from
		 * there), queued in one go: a worker that wakes takes the
		 * Directory's run whole (one range of its pack). */
		if (!f->want) {
			size_t nf = f->dir->n_files;
			pthread_mutex_unlock(&c->lock);
			uint8_t *want = malloc(nf ? nf : 1);
			for (size_t i = 0; want && i < nf; i++)
				want[i] = walk_wants(c, f, i);
			pthread_mutex_lock(&c->lock);
			if (!want)
				break;
			f->want = want;
		}
		bool full = false;
		for (; f->next_file < f->dir->n_files; f->next_file++) {
			full = c->pq_len == PREFETCH_QUEUE || c->stopping ||
			       c->walk_budget == 0;
			if (full)
				break;
			uint8_t w = f->want[f->next_file];
			if (w == WANT_LARGE) {
				full = !walk_queue_large(c, f, f->next_file);
				if (full)
					break;
			} else if (w == WANT_SMALL) {
				walk_queue_file(c, f, f->next_file);
			}
		}
		if (full)
			break;
		cas_directory_free(f->dir);
		free(f->off);
		free(f->want);
		c->walk_depth--;
	}
	c->walk_active = c->walk_depth > 0;
	pthread_mutex_unlock(&c->lock);
}

/* A worker that drained the queue below half continues the walk (unless
 * another thread is at it). */
static void walk_continue(struct cache_store *c)
{
	if (pthread_mutex_trylock(&c->walk_lock) != 0)
		return;
	walk_run(c);
	pthread_mutex_unlock(&c->walk_lock);
}

/* A reader read Directory d: if the walk has not been there, it starts
 * there. */
static void prefetch_directory(struct cache_store *c, const cas_digest *d,
			       const uint8_t *buf, size_t len)
{
	struct timespec now;
	if (c->prefetch_threads == 0)
		return;
	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&c->lock);
	bool skip = c->stopping || now.tv_sec < c->paused_until.tv_sec ||
		    (c->prefetched.n && cas_dmap_find(&c->prefetched, d));
	pthread_mutex_unlock(&c->lock);
	if (skip)
		return;
	pthread_mutex_lock(&c->walk_lock);
	walk_clear(c);
	pthread_mutex_lock(&c->lock);
	c->walk_budget = PREFETCH_AHEAD;
	c->walk_read_bytes = c->walk_large_bytes = 0;
	/* Large blobs of the old place not started yet are dropped. */
	c->lq_len = 0;
	c->walk_large_full = false;
	pthread_mutex_unlock(&c->lock);
	walk_push(c, d, buf, len);
	walk_run(c);
	pthread_mutex_unlock(&c->walk_lock);
}

/* A reader read a blob of size bytes: the walk may go one further. It
 * stays PREFETCH_AHEAD ahead of a reader, and stops when nobody reads (a
 * mount's ls does not fetch the store). */
static void walk_credit(struct cache_store *c, uint64_t size)
{
	if (!c->prefetch_threads)
		return;
	pthread_mutex_lock(&c->lock);
	c->walk_budget += c->walk_budget < PREFETCH_AHEAD;
	c->walk_read_bytes += size ? size : 1;
	/* The workers are idle once the queue is drained: wake one to go
	 * on (not the reader: it has reading to do); there may be none yet
	 * (no small blob was wanted so far). */
	if (c->walk_active && !c->walk_kick &&
	    c->walk_budget >= PREFETCH_BATCH &&
	    c->pq_len < PREFETCH_AHEAD / 2) {
		c->walk_kick = true;
		if (c->n_workers == 0)
			spawn_worker(c);
		pthread_cond_signal(&c->pq_cond);
	}
	/* The next large blob may now be started (only then: a read per
	 * blob would otherwise wake the large worker for nothing). */
	if (c->lq_len && large_admitted(c, c->lq[c->lq_head].size))
		pthread_cond_signal(&c->lq_cond);
	pthread_mutex_unlock(&c->lock);
}

/* blob_open (ret_fd) or blob_read (ret_buf), fetching what is absent. */
static int cache_blob_get(struct cache_store *c, const cas_digest *d,
			  int *ret_fd, size_t max, uint8_t **ret_buf,
			  uint64_t *ret_size)
{
	uint64_t size;
	if (!ret_size)
		ret_size = &size;
	int r = ret_fd ? cached_blob_open(c, d, ret_fd, ret_size)
		       : cached_blob_read(c, d, max, ret_buf, ret_size);
	bool fetched = false;
	/* Another thread's eviction may remove the blob between its fetch
	 * and our open: fetch again, a few times. */
	for (unsigned attempt = 0; r == -ENOENT && attempt < 3; attempt++) {
		r = ensure_blob(c, d, false);
		if (r < 0)
			return r;
		fetched = true;
		r = ret_fd ? cached_blob_open(c, d, ret_fd, ret_size)
			   : cached_blob_read(c, d, max, ret_buf, ret_size);
	}
	if (r >= 0)
		walk_credit(c, *ret_size);
	if (r >= 0 && ret_fd)
		mark_used(c, *ret_fd);
	if (fetched)
		maybe_evict(c, 0);
	return r;
}

static int cache_blob_open(cas_store *s, const cas_digest *d, int *ret_fd,
			   uint64_t *ret_size)
{
	return cache_blob_get(to_cache(s), d, ret_fd, 0, NULL, ret_size);
}

static int cache_blob_read(cas_store *s, const cas_digest *d, size_t max,
			   uint8_t **ret_buf, uint64_t *ret_size)
{
	struct cache_store *c = to_cache(s);
	uint64_t size;
	int fd;
	if (c->cache_max) {
		/* Through an fd, which marks the blob used for eviction. */
		int r = cache_blob_get(c, d, &fd, 0, NULL, &size);
		if (r < 0)
			return r;
		r = cas_store_blob_read_fd(d, fd, size, max, ret_buf, ret_size);
		close(fd);
		return r;
	}
	return cache_blob_get(c, d, NULL, max, ret_buf, ret_size);
}

/* Where the cache's pack holds a blob; what is not packed yet (or not
 * fetched) is -ENOENT, and the caller reads or opens it instead. */
static int cache_blob_locate(cas_store *s, const cas_digest *d, int *ret_fd,
			     uint64_t *ret_off, uint64_t *ret_size)
{
	struct cache_store *c = to_cache(s);
	if (!c->cache->ops->blob_locate)
		return -ENOENT;
	int r = c->cache->ops->blob_locate(c->cache, d, ret_fd, ret_off,
					   ret_size);
	/* Else the caller opens or reads it, which counts then. */
	if (r >= 0)
		walk_credit(c, *ret_size);
	return r;
}

static int cache_blob_stat(cas_store *s, const cas_digest *d,
			   uint64_t *ret_size)
{
	struct cache_store *c = to_cache(s);
	int r = cached_blob_stat(c, d, ret_size);
	if (r != -ENOENT)
		return r;
	/* tvix's Stat carries no size, and a size not checked against the
	 * bytes is not worth reporting: fetch the blob. */
	r = ensure_blob(c, d, false);
	if (r < 0)
		return r;
	r = cached_blob_stat(c, d, ret_size);
	maybe_evict(c, 0);
	return r;
}

static int cache_blob_writer_new(cas_store *s, cas_blob_writer **ret)
{
	struct cache_store *c = to_cache(s);
	return c->cache->ops->blob_writer_new(c->cache, ret);
}

/* Directories ------------------------------------------------------------ */

struct fetched_dir {
	uint8_t *buf;
	size_t len;
	cas_directory *dir;
};

static void fetched_dir_free(void *p)
{
	struct fetched_dir *f = p;
	if (!f)
		return;
	free(f->buf);
	cas_directory_free(f->dir);
	free(f);
}

struct tree_fetch {
	struct cache_store *c;
	struct cas_dmap got;	  /* digest -> fetched_dir */
	struct cas_dmap wanted;	  /* digests named and not yet received */
	enum cas_log_level level; /* of what goes wrong: CAS_LOG_DEBUG when
				 * there is a fallback */
};

/* Verifies and keeps one fetched Directory; names its children. */
static int tree_accept(struct tree_fetch *t, const cas_digest *want,
		       const uint8_t *buf, size_t len)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], got_hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest d;
	const char *why = NULL;
	int r;

	cas_directory_digest(buf, len, &d);
	cas_digest_to_hex(&d, got_hex);
	if (want && !cas_digest_eq(want, &d)) {
		cas_digest_to_hex(want, hex);
		return cas_log_internal(
			t->level, -EIO,
			"directory %s: remote sent bytes that hash to %s", hex,
			got_hex);
	}
	if (!want && !cas_dmap_find(&t->wanted, &d))
		return cas_log_internal(t->level, -EIO,
					"directory %s: sent by %s but named by "
					"no Directory before it",
					got_hex, t->c->what);
	if (cas_dmap_find(&t->got, &d))
		return 0;
	struct fetched_dir *f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	r = cas_directory_decode(buf, len, &f->dir, &why);
	if (r < 0) {
		free(f);
		if (r == -ENOMEM)
			return r;
		return cas_log_internal(
			t->level, -EIO,
			"directory %s: remote sent an invalid Directory: %s",
			got_hex, why ? why : "?");
	}
	if (len > 0 && !(f->buf = malloc(len))) {
		fetched_dir_free(f);
		return -ENOMEM;
	}
	if (len > 0)
		memcpy(f->buf, buf, len);
	f->len = len;
	r = cas_dmap_put(&t->got, &d, f);
	if (r < 0) {
		fetched_dir_free(f);
		return r;
	}
	for (size_t i = 0; i < f->dir->n_directories; i++) {
		r = cas_dmap_put(&t->wanted, &f->dir->directories[i].digest,
				 NULL);
		if (r < 0)
			return r;
	}
	return 0;
}

static int tree_cb(void *userdata, const cas_digest *want, const uint8_t *buf,
		   size_t len)
{
	return tree_accept(userdata, want, buf, len);
}

/* True if the cache has d (the empty Directory always). */
static bool cache_has_dir(struct cache_store *c, const cas_digest *d)
{
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY))
		return true;
	return c->cache->ops->directory_has(c->cache, d) > 0;
}

/* Children of the Directories in `level` that neither the fetch nor the
 * cache has, each once. */
static int next_level(struct tree_fetch *t, const cas_digest *level, size_t n,
		      cas_digest **ret, size_t *ret_n)
{
	struct cas_dmap seen = {0};
	cas_digest *out = NULL;
	size_t n_out = 0, cap = 0;
	int r = 0;

	for (size_t i = 0; i < n && r >= 0; i++) {
		struct cas_dmap_entry *e = cas_dmap_find(&t->got, &level[i]);
		if (!e)
			continue;
		struct fetched_dir *f = e->value;
		for (size_t j = 0; j < f->dir->n_directories; j++) {
			const cas_digest *cd = &f->dir->directories[j].digest;
			if (cas_dmap_find(&t->got, cd))
				continue;
			r = cas_dmap_put(&seen, cd, NULL);
			if (r <= 0)
				continue;
			if (cache_has_dir(t->c, cd))
				continue;
			if (n_out == cap) {
				cap = cap ? cap * 2 : 64;
				cas_digest *nb =
					realloc(out, cap * sizeof(*out));
				if (!nb) {
					r = -ENOMEM;
					break;
				}
				out = nb;
			}
			out[n_out++] = *cd;
		}
	}
	cas_dmap_release(&seen, NULL);
	if (r < 0) {
		free(out);
		return r;
	}
	*ret = out;
	*ret_n = n_out;
	return 0;
}

/* Commits the fetched Directories below and including root, leaves first
 * (iterative post-order: a remote controls the depth). */
static int tree_commit(struct tree_fetch *t, const cas_digest *root)
{
	struct frame {
		struct fetched_dir *f;
		cas_digest d;
		size_t next_child;
	};
	struct cas_dmap done = {0};
	struct frame *stack = NULL;
	size_t depth = 0, cap = 0;
	cas_dir_batch *b = NULL;
	int r;

	r = t->c->cache->ops->dir_batch_new(t->c->cache, &b);
	if (r < 0)
		return r;
	struct cas_dmap_entry *re = cas_dmap_find(&t->got, root);
	if (!re) {
		r = -EIO;
		goto out;
	}
	cap = 64;
	stack = malloc(cap * sizeof(*stack));
	if (!stack) {
		r = -ENOMEM;
		goto out;
	}
	stack[depth++] = (struct frame){re->value, *root, 0};
	while (depth > 0) {
		struct frame *fr = &stack[depth - 1];
		if (fr->next_child < fr->f->dir->n_directories) {
			const cas_digest *cd =
				&fr->f->dir->directories[fr->next_child++]
					 .digest;
			struct cas_dmap_entry *ce = cas_dmap_find(&t->got, cd);
			if (!ce || cas_dmap_find(&done, cd))
				continue; /* in the cache, or put already */
			if (depth == cap) {
				cap *= 2;
				struct frame *ns =
					realloc(stack, cap * sizeof(*ns));
				if (!ns) {
					r = -ENOMEM;
					goto out;
				}
				stack = ns;
			}
			stack[depth++] = (struct frame){ce->value, *cd, 0};
			continue;
		}
		if (cas_dmap_find(&done, &fr->d) == NULL) {
			cas_digest put_d;
			r = b->ops->put(b, fr->f->buf, fr->f->len, &put_d);
			if (r < 0) {
				char hex[CAS_DIGEST_HEX_LEN + 1];
				cas_digest_to_hex(&fr->d, hex);
				r = cas_log_errno(
					r == -EBADMSG || r == -ENOENT ? -EIO
								      : r,
					"directory %s: cache: %m", hex);
				goto out;
			}
			r = cas_dmap_put(&done, &fr->d, NULL);
			if (r < 0)
				goto out;
		}
		depth--;
	}
	r = b->ops->commit(b, NULL, NULL);
	b = NULL;
	if (r < 0)
		r = cas_log_errno(r, "cache %s: commit Directories: %m",
				  t->c->cache_dir);
out:
	if (b)
		b->ops->abort(b);
	free(stack);
	cas_dmap_release(&done, NULL);
	return r;
}

/* d and the Directories below it in one request (directory_fetch_tree);
 * each one named must arrive or be in the cache. */
static int fetch_tree_whole(struct tree_fetch *t, const cas_digest *d,
			    const char *hex)
{
	struct cache_store *c = t->c;
	int r = cas_dmap_put(&t->wanted, d, NULL);
	if (r >= 0)
		r = c->fetcher->ops->directory_fetch_tree(c->fetcher, d,
							  tree_cb, t);
	for (size_t i = 0; r >= 0 && i < t->wanted.cap; i++) {
		struct cas_dmap_entry *e = &t->wanted.slots[i];
		if (!e->used || cas_dmap_find(&t->got, &e->digest) ||
		    cache_has_dir(c, &e->digest))
			continue;
		char chex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(&e->digest, chex);
		r = cas_dmap_find(&t->got, d)
			    ? cas_log_internal(t->level, -EIO,
					       "directory %s: %s did not send "
					       "it (below %s)",
					       chex, c->what, hex)
			    : -ENOENT;
	}
	return r;
}

/* d, then the Directories below it the cache lacks, one tree level per
 * directories_fetch call. */
static int fetch_tree_levels(struct tree_fetch *t, const cas_digest *d,
			     const char *hex)
{
	struct cache_store *c = t->c;
	cas_digest *level = malloc(sizeof(*level));
	size_t n = 1;
	int r = level ? 0 : -ENOMEM;
	if (level)
		level[0] = *d;
	bool first = true;
	while (r >= 0 && n > 0) {
		r = c->fetcher->ops->directories_fetch(c->fetcher, level, n,
						       tree_cb, t);
		if (r == -ENOENT && !first)
			r = cas_log_errno(-EIO,
					  "directory %s: a Directory below it "
					  "is missing on %s",
					  hex, c->what);
		first = false;
		cas_digest *nl = NULL;
		size_t nn = 0;
		if (r >= 0)
			r = next_level(t, level, n, &nl, &nn);
		free(level);
		level = nl;
		n = nn;
	}
	free(level);
	return r;
}

static int fetch_tree(struct cache_store *c, const cas_digest *d)
{
	const struct cas_fetcher_ops *ops = c->fetcher->ops;
	struct tree_fetch t = {.c = c, .level = CAS_LOG_ERROR};
	char hex[CAS_DIGEST_HEX_LEN + 1];
	int r = -ENOSYS;

	cas_digest_to_hex(d, hex);
	if (ops->directory_fetch_tree) {
		if (ops->tree_optional)
			t.level = CAS_LOG_DEBUG;
		r = fetch_tree_whole(&t, d, hex);
	}
	if (r < 0 && r != -ENOMEM &&
	    (!ops->directory_fetch_tree || ops->tree_optional)) {
		/* Whatever the tree request gave is dropped: the
		 * Directories' own answers decide. */
		cas_dmap_release(&t.got, fetched_dir_free);
		cas_dmap_release(&t.wanted, NULL);
		t = (struct tree_fetch){.c = c, .level = CAS_LOG_ERROR};
		r = fetch_tree_levels(&t, d, hex);
	}
	if (r == -EIO || r == -ENOMEM || r == -ENOENT)
		; /* logged where it happened, or absent */
	else if (r < 0)
		r = cas_log_errno(-EIO,
				  "directory %s: fetch from %s failed: %m", hex,
				  c->what);
	if (r >= 0)
		r = tree_commit(&t, d);
	cas_dmap_release(&t.got, fetched_dir_free);
	cas_dmap_release(&t.wanted, NULL);
	return r;
}

static int ensure_dir(struct cache_store *c, const cas_digest *d)
{
	bool owner;
	struct inflight *e = inflight_join(c, &c->dirs_inflight, d, &owner);
	if (!e)
		return -ENOMEM;
	if (!owner)
		return inflight_wait(c, &c->dirs_inflight, e, NULL);
	int r = cache_has_dir(c, d) ? 0 : fetch_tree(c, d);
	inflight_done(c, &c->dirs_inflight, e, r);
	return r;
}

static int cache_directory_get_raw(cas_store *s, const cas_digest *d,
				   uint8_t **ret_buf, size_t *ret_len)
{
	struct cache_store *c = to_cache(s);
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
		*ret_buf = NULL;
		*ret_len = 0;
		return 0;
	}
	int r = c->cache->ops->directory_get_raw(c->cache, d, ret_buf, ret_len);
	if (r == -ENOENT) {
		r = ensure_dir(c, d);
		if (r < 0)
			return r;
		r = c->cache->ops->directory_get_raw(c->cache, d, ret_buf,
						     ret_len);
	}
	if (r >= 0)
		prefetch_directory(c, d, *ret_buf, *ret_len);
	return r;
}

static int cache_directory_has(cas_store *s, const cas_digest *d)
{
	struct cache_store *c = to_cache(s);
	if (cache_has_dir(c, d))
		return 1;
	int r = ensure_dir(c, d);
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

static int cache_dir_batch_new(cas_store *s, cas_dir_batch **ret)
{
	struct cache_store *c = to_cache(s);
	return c->cache->ops->dir_batch_new(c->cache, ret);
}

/* Roots ------------------------------------------------------------------ */

struct load_roots {
	struct published_root *list;
	size_t n;
};

static int load_root_cb(void *userdata, const char *name, const cas_node *node)
{
	struct load_roots *l = userdata;
	struct published_root *nl = realloc(l->list, (l->n + 1) * sizeof(*nl));
	if (!nl)
		return -ENOMEM;
	l->list = nl;
	nl[l->n].name = strdup(name);
	nl[l->n].node = cas_node_dup(node);
	if (!nl[l->n].name || !nl[l->n].node) {
		free(nl[l->n].name);
		free(nl[l->n].node);
		return -ENOMEM;
	}
	l->n++;
	return 0;
}

static void free_roots(struct published_root *list, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(list[i].name);
		free(list[i].node);
	}
	free(list);
}

/* The last roots file fetched from this remote is kept in the cache
 * folder (remote-roots/<BLAKE3 of the URL>), so that what is cached stays
 * readable while the remote is unreachable. */
static void roots_copy_path(struct cache_store *c, char *buf, size_t size,
			    bool tmp)
{
	cas_digest d;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_hash_buffer(c->what, strlen(c->what), &d);
	cas_digest_to_hex(&d, hex);
	snprintf(buf, size, "%s/remote-roots/%s%s", c->cache_dir, hex,
		 tmp ? ".tmp" : "");
}

static void roots_copy_save(struct cache_store *c, const char *buf, size_t len)
{
	char path[4096], tmp[4096];
	snprintf(path, sizeof(path), "%s/remote-roots", c->cache_dir);
	(void)mkdir(path, 0755);
	roots_copy_path(c, path, sizeof(path), false);
	roots_copy_path(c, tmp, sizeof(tmp), true);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	int r = cas_write_all(fd, buf, len);
	close(fd);
	if (r < 0 || rename(tmp, path) < 0)
		(void)unlink(tmp);
}

static int roots_copy_load(struct cache_store *c, char **ret_buf,
			   size_t *ret_len)
{
	char path[4096];
	struct stat st;
	roots_copy_path(c, path, sizeof(path), false);
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0)
		return -ENOENT;
	char *buf = malloc((size_t)st.st_size + 1);
	if (!buf)
		return -ENOMEM;
	int r = cas_pread_all(fd, buf, (size_t)st.st_size, 0);
	if (r < 0) {
		free(buf);
		return r;
	}
	*ret_buf = buf;
	*ret_len = (size_t)st.st_size;
	return 0;
}

/* Loads the published roots once (again after a failure). */
static int load_published(struct cache_store *c)
{
	if (!c->fetcher->ops->roots_fetch)
		return 0;
	pthread_mutex_lock(&c->lock);
	bool loaded = c->roots_loaded;
	pthread_mutex_unlock(&c->lock);
	if (loaded)
		return 0;
	struct load_roots l = {0};
	_cleanup_free_ char *buf = NULL;
	size_t len = 0;
	bool stale = false;
	int r = c->fetcher->ops->roots_fetch(c->fetcher, &buf, &len);
	if (r == -EIO && roots_copy_load(c, &buf, &len) == 0) {
		cas_log_warning(
			"%s: unreachable; using the roots fetched before",
			c->what);
		stale = true;
		r = 0;
	}
	if (r < 0)
		return r == -ENOMEM ? r : -EIO;
	r = cas_roots_file_parse(buf, len, load_root_cb, &l);
	if (r < 0) {
		free_roots(l.list, l.n);
		if (r == -ENOMEM)
			return r;
		return cas_log_errno(-EIO, "%s: malformed roots file", c->what);
	}
	if (!stale)
		roots_copy_save(c, buf ? buf : "", len);
	pthread_mutex_lock(&c->lock);
	if (!c->roots_loaded) {
		c->published = l.list;
		c->n_published = l.n;
		c->roots_loaded = true;
		l.list = NULL;
		l.n = 0;
	}
	pthread_mutex_unlock(&c->lock);
	free_roots(l.list, l.n);
	return 0;
}

/* After load_published succeeded the list never changes: no lock. */
static const struct published_root *find_published(struct cache_store *c,
						   const char *name)
{
	for (size_t i = 0; i < c->n_published; i++)
		if (strcmp(c->published[i].name, name) == 0)
			return &c->published[i];
	return NULL;
}

static int cache_root_get(cas_store *s, const char *name, cas_node **ret)
{
	struct cache_store *c = to_cache(s);
	int r = c->cache->ops->root_get(c->cache, name, ret);
	if (r != -ENOENT)
		return r;
	r = load_published(c);
	if (r < 0)
		return r;
	const struct published_root *p = find_published(c, name);
	if (!p)
		return -ENOENT;
	cas_node n = *p->node;
	n.name = (const uint8_t *)p->name;
	n.name_len = strlen(p->name);
	*ret = cas_node_dup(&n);
	return *ret ? 0 : -ENOMEM;
}

struct foreach_ctx {
	cas_root_cb cb;
	void *userdata;
	char **names;
	size_t n;
};

static int foreach_local_cb(void *userdata, const char *name,
			    const cas_node *node)
{
	struct foreach_ctx *f = userdata;
	char **nn = realloc(f->names, (f->n + 1) * sizeof(*nn));
	if (!nn)
		return -ENOMEM;
	f->names = nn;
	if (!(nn[f->n] = strdup(name)))
		return -ENOMEM;
	f->n++;
	return f->cb(f->userdata, name, node);
}

static int cache_roots_foreach(cas_store *s, cas_root_cb cb, void *userdata)
{
	struct cache_store *c = to_cache(s);
	struct foreach_ctx f = {cb, userdata, NULL, 0};
	int r = load_published(c);
	if (r >= 0)
		r = c->cache->ops->roots_foreach(c->cache, foreach_local_cb,
						 &f);
	for (size_t i = 0; r >= 0 && i < c->n_published; i++) {
		const struct published_root *p = &c->published[i];
		bool shadowed = false;
		for (size_t j = 0; j < f.n && !shadowed; j++)
			shadowed = strcmp(f.names[j], p->name) == 0;
		if (shadowed)
			continue;
		cas_node n = *p->node;
		n.name = (const uint8_t *)p->name;
		n.name_len = strlen(p->name);
		r = cb(userdata, p->name, &n);
	}
	for (size_t j = 0; j < f.n; j++)
		free(f.names[j]);
	free(f.names);
	return r;
}

static int cache_root_set(cas_store *s, const char *name, const cas_node *node)
{
	struct cache_store *c = to_cache(s);
	return c->cache->ops->root_set(c->cache, name, node);
}

static int cache_root_remove(cas_store *s, const char *name)
{
	struct cache_store *c = to_cache(s);
	int r = c->cache->ops->root_remove(c->cache, name);
	if (r != -ENOENT)
		return r;
	if (load_published(c) >= 0 && find_published(c, name))
		return cas_log_errno(
			-EROFS, "root %s: published by %s, not removable here",
			name, c->what);
	return r;
}

static void cache_free(cas_store *s)
{
	struct cache_store *c = to_cache(s);
	atomic_store(&c->closing, true);
	pthread_mutex_lock(&c->lock);
	c->stopping = true;
	pthread_cond_broadcast(&c->pq_cond);
	pthread_cond_broadcast(&c->lq_cond);
	unsigned n = c->n_workers;
	bool large = c->large_started;
	pthread_mutex_unlock(&c->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(c->workers[i], NULL);
	if (large)
		pthread_join(c->large_worker, NULL);
	/* Names what is staged (one last syncfs) before the cache closes. */
	pthread_mutex_lock(&c->lock);
	c->publisher_stopping = true;
	pthread_cond_broadcast(&c->pub_cond);
	bool started = c->publisher_started;
	pthread_mutex_unlock(&c->lock);
	if (started)
		pthread_join(c->publisher, NULL);
	cas_dmap_release(&c->staged, free);
	free(c->pending);
	cas_dmap_release(&c->mstaged, NULL);
	mgroup_free(c->mfill);
	mgroup_free(c->mspare);
	cas_local_pack_close(c->pack);
	if (c->tmp_fd >= 0)
		close(c->tmp_fd);
	pthread_cond_destroy(&c->pub_cond);
	free(c->pq);
	if (c->walk)
		walk_clear(c);
	free(c->walk);
	pthread_mutex_destroy(&c->walk_lock);
	cas_dmap_release(&c->prefetched, NULL);
	cas_dmap_release(&c->blobs_inflight, NULL);
	cas_dmap_release(&c->dirs_inflight, NULL);
	cas_dmap_release(&c->bad_logged, NULL);
	pthread_cond_destroy(&c->pq_cond);
	pthread_cond_destroy(&c->lq_cond);
	if (c->fetcher)
		c->fetcher->ops->free(c->fetcher);
	cas_store_free(c->cache);
	free_roots(c->published, c->n_published);
	pthread_mutex_destroy(&c->lock);
	pthread_mutex_destroy(&c->evict_lock);
	pthread_cond_destroy(&c->cond);
	free(c->what);
	free(c->cache_dir);
	free(c);
}

static const struct cas_store_ops cache_ops = {
	.blob_stat = cache_blob_stat,
	.blob_open = cache_blob_open,
	.blob_read = cache_blob_read,
	.blob_locate = cache_blob_locate,
	.blob_writer_new = cache_blob_writer_new,
	.directory_get_raw = cache_directory_get_raw,
	.directory_has = cache_directory_has,
	.dir_batch_new = cache_dir_batch_new,
	.root_get = cache_root_get,
	.roots_foreach = cache_roots_foreach,
	.root_set = cache_root_set,
	.root_remove = cache_root_remove,
	.free = cache_free,
};

/* mkdir -p of path's parents (the cache folder itself is made by
 * cas_local_open). */
static int mkdir_parents(const char *path)
{
	_cleanup_free_ char *p = strdup(path);
	if (!p)
		return -ENOMEM;
	for (char *q = p + 1; *q; q++) {
		if (*q != '/')
			continue;
		*q = 0;
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return cas_negerrno();
		*q = '/';
	}
	return 0;
}

int cas_cache_store_new(cas_fetcher *f, const char *what,
			const struct cas_remote_options *opts, cas_store **ret)
{
	/* The cache never imports; what it packs, the publisher packs. */
	struct cas_local_options lo = {.create = true, .no_inline = true};
	struct cache_store *c = NULL;
	int r;

	if (!opts || !opts->cache_dir) {
		f->ops->free(f);
		return cas_log_errno(-EINVAL,
				     "%s: a remote store needs a cache folder",
				     what);
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		f->ops->free(f);
		return -ENOMEM;
	}
	c->base.ops = &cache_ops;
	c->fetcher = f;
	pthread_mutex_init(&c->lock, NULL);
	pthread_mutex_init(&c->evict_lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_cond_init(&c->pq_cond, NULL);
	pthread_cond_init(&c->lq_cond, NULL);
	pthread_mutex_init(&c->walk_lock, NULL);
	/* Its deadlines must not move with the wall clock. */
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->pub_cond, &ca);
	pthread_condattr_destroy(&ca);
	c->tmp_fd = -1;
	c->pid = getpid();
	c->cache_max = opts->cache_max;
	c->pack_small = c->cache_max == 0;
	c->prefetch_threads = f->ops->blobs_fetch ? PREFETCH_BATCH_THREADS
						  : PREFETCH_DEFAULT_THREADS;
	const char *pf = getenv("CASTORE_PREFETCH");
	if (pf && *pf)
		c->prefetch_threads =
			(unsigned)CAS_MIN(strtoul(pf, NULL, 10),
					  (unsigned long)PREFETCH_MAX_THREADS);
	if (c->prefetch_threads &&
	    (!(c->pq = calloc(PREFETCH_QUEUE, sizeof(*c->pq))) ||
	     !(c->walk = calloc(PREFETCH_MAX_DEPTH, sizeof(*c->walk))))) {
		r = -ENOMEM;
		goto fail;
	}
	c->what = strdup(what);
	c->cache_dir = strdup(opts->cache_dir);
	if (!c->what || !c->cache_dir) {
		r = -ENOMEM;
		goto fail;
	}
	r = mkdir_parents(c->cache_dir);
	if (r < 0) {
		r = cas_log_errno(r, "cache %s: %m", c->cache_dir);
		goto fail;
	}
	r = cas_local_open(c->cache_dir, &lo, &c->cache);
	if (r < 0) {
		r = cas_log_errno(r, "cache %s: %m", c->cache_dir);
		goto fail;
	}
	{
		_cleanup_free_ char *tmp = NULL;
		if (asprintf(&tmp, "%s/tmp", c->cache_dir) < 0) {
			tmp = NULL;
			r = -ENOMEM;
			goto fail;
		}
		c->tmp_fd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (c->tmp_fd < 0) {
			r = cas_log_errno(cas_negerrno(), "cache %s: %m", tmp);
			goto fail;
		}
	}
	if (c->cache_max) {
		int64_t bytes = cas_cache_blob_bytes(c->cache_dir);
		c->cache_bytes = bytes > 0 ? (uint64_t)bytes : 0;
		maybe_evict(c, 0);
	}
	*ret = &c->base;
	return 0;
fail:
	cache_free(&c->base);
	return r;
}
