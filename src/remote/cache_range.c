/* cache_range.c - large remote blobs fetched range by range (cache_i.h,
 * "Large blobs by range"; docs/remote.md "Large blobs by range").
 *
 * A range blob is a partial blob of the cache's store (store/partial.h)
 * plus what is in flight: one bit per group being fetched (`busy`). A
 * group is fetched by whoever claims it (sets its busy bit): the reader
 * that needs it, or a range thread for readahead. A run is verified
 * against the outboard before a byte of it is written; a group that
 * fails is left out (never written) and logged once per blob, and its
 * readers get -EIO; the groups around it are written. Readers wait on
 * `cond` until none of their groups is busy, then find them present or
 * not (the fetch failed: -EIO, for them alone; the next read tries
 * again).
 *
 * Range blobs live as long as the cache (a mount's handles keep their
 * digests, not pointers); each holds its outboard, 0.4 % of the blob.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/cache_i.h"
#include "store/partial.h"

#define G CAS_BAO_GROUP_SIZE

struct range_blob {
	cas_digest d;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	uint64_t size, groups;
	struct cas_partial *p;
	const uint8_t *outboard; /* p's, verified */
	size_t outboard_len;
	uint8_t *busy;	   /* a bit per group; ranges.lock */
	uint64_t seq_end;  /* where the last read ended; ranges.lock */
	uint64_t window;   /* readahead bytes; ranges.lock */
	uint64_t ra_next;  /* first group readahead did not look at; lock */
	uint64_t failures; /* runs that failed, ever; ranges.lock */
};

/* Not for a bounded cache: its eviction counts and removes blob files,
 * and a partial blob is none (left for later, docs/remote.md). */
bool cas_cache_ranged(const struct cache_store *c)
{
	return c->fetcher->ops->blob_range_fetch &&
	       c->fetcher->ops->outboard_fetch && c->cache_max == 0;
}

static bool busy_get(const struct range_blob *rb, uint64_t g)
{
	return (rb->busy[g / 8] >> (g % 8)) & 1;
}

static void busy_set(struct range_blob *rb, uint64_t g, bool on)
{
	if (on)
		rb->busy[g / 8] |= (uint8_t)(1u << (g % 8));
	else
		rb->busy[g / 8] &= (uint8_t) ~(1u << (g % 8));
}

static void range_blob_free(void *v)
{
	struct range_blob *rb = v;
	if (!rb)
		return;
	cas_partial_close(rb->p);
	free(rb->busy);
	free(rb);
}

/* Logs a bad range once per blob (a mount's readers ask again and
 * again), then at debug level. */
static int range_bad(struct cache_store *c, struct range_blob *rb,
		     uint64_t group, const char *why)
{
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_lock(&cr->lock);
	bool first = cas_dmap_put(&cr->bad_logged, &rb->d, NULL) > 0;
	pthread_mutex_unlock(&cr->lock);
	return cas_log_internal(
		first ? CAS_LOG_ERROR : CAS_LOG_DEBUG, -EIO,
		"blob %s: bytes %llu-%llu from %s: %s", rb->hex,
		(unsigned long long)(group * G),
		(unsigned long long)CAS_MIN((group + 1) * G, rb->size) - 1,
		c->what, why);
}

/* Fetches groups [first, first + n) (at most RANGE_RUN bytes) into buf,
 * verifies them against the outboard and writes those that verify.
 * Returns 0 or -EIO (some did not come or failed). Busy bits are the
 * caller's to clear. */
static int fetch_run(struct cache_store *c, struct range_blob *rb,
		     uint64_t first, uint64_t n, uint8_t *buf, bool *ret_sync)
{
	uint64_t off = first * G;
	size_t len = (size_t)CAS_MIN(n * G, rb->size - off);
	if (atomic_load_explicit(&c->closing, memory_order_relaxed))
		return -ECANCELED;
	size_t got = 0;
	int r = c->fetcher->ops->blob_range_fetch(c->fetcher, &rb->d, off, len,
						  buf, &got);
	if (r < 0)
		return range_bad(c, rb, first,
				 r == -ENOENT ? "absent" : "fetch failed");
	if (got != len)
		return range_bad(c, rb, first + got / G, "cut short");
	/* Verified group by group: a bad one costs only itself. */
	int ret = 0;
	uint64_t g = first, end = first + n;
	while (g < end) {
		uint64_t bad = end;
		size_t at = (size_t)((g - first) * G);
		r = cas_bao_verify_groups(&rb->d, rb->size, rb->outboard,
					  rb->outboard_len, g, buf + at,
					  len - at, &bad);
		if (r < 0 && r != -EBADMSG)
			return r;
		if (r == 0)
			bad = end;
		if (bad > g) {
			size_t wlen = (size_t)CAS_MIN((bad - g) * G,
						      (uint64_t)(len - at));
			int w = cas_partial_write(rb->p, g, buf + at, wlen);
			if (w < 0)
				ret = w;
			else if (w == 1)
				*ret_sync = true;
		}
		if (bad < end) {
			ret = range_bad(c, rb, bad,
					"do not match the blob's tree (its "
					"digest)");
			g = bad + 1;
		} else {
			g = end;
		}
	}
	return ret;
}

static void run_done(struct cache_store *c, struct range_blob *rb,
		     uint64_t first, uint64_t n, int r)
{
	pthread_mutex_lock(&c->ranges.lock);
	if (r < 0)
		rb->failures++;
	for (uint64_t g = first; g < first + n; g++)
		busy_set(rb, g, false);
	pthread_cond_broadcast(&c->ranges.cond);
	pthread_mutex_unlock(&c->ranges.lock);
}

static void *range_main(void *arg)
{
	struct cache_store *c = arg;
	struct cache_ranges *cr = &c->ranges;
	/* One run buffer for the thread's life: a fresh one per run was
	 * mapped, faulted in page by page and given back each time (a
	 * fifth of a cold sequential read's CPU). */
	_cleanup_free_ uint8_t *buf = malloc(RANGE_RUN);
	pthread_mutex_lock(&cr->lock);
	for (;;) {
		while (cr->q_len == 0 && !cr->stopping)
			pthread_cond_wait(&cr->job_cond, &cr->lock);
		if (cr->q_len == 0)
			break;
		struct range_job j = cr->queue[cr->q_head];
		cr->q_head = (cr->q_head + 1) % RANGE_QUEUE;
		cr->q_len--;
		pthread_mutex_unlock(&cr->lock);
		bool sync = j.n == 0; /* a sync job (below) */
		if (j.n > 0) {
			int r = cr->stopping ? -ECANCELED
				: !buf	     ? -ENOMEM
				       : fetch_run(c, j.rb, j.first, j.n, buf,
						   &sync);
			run_done(c, j.rb, j.first, j.n, r);
		}
		/* After its readers were woken: the disk's time is ours. */
		if (sync)
			(void)cas_partial_sync(j.rb->p);
		pthread_mutex_lock(&cr->lock);
	}
	pthread_mutex_unlock(&cr->lock);
	return NULL;
}

/* Queues a job for the range threads (started as needed): false when
 * the queue is full or no thread runs. ranges.lock held. */
static bool queue_locked(struct cache_store *c, struct range_job j)
{
	struct cache_ranges *cr = &c->ranges;
	if (cr->q_len == RANGE_QUEUE)
		return false;
	if (cr->n_threads < RANGE_THREADS &&
	    pthread_create(&cr->threads[cr->n_threads], NULL, range_main, c) ==
		    0)
		cr->n_threads++;
	if (cr->n_threads == 0)
		return false;
	cr->queue[(cr->q_head + cr->q_len++) % RANGE_QUEUE] = j;
	pthread_cond_signal(&cr->job_cond);
	return true;
}

/* A reader does not wait for the disk: a range thread syncs (or the
 * reader itself, when the queue is full). */
static void sync_later(struct cache_store *c, struct range_blob *rb)
{
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_lock(&cr->lock);
	bool queued =
		!cr->stopping && queue_locked(c, (struct range_job){rb, 0, 0});
	pthread_mutex_unlock(&cr->lock);
	if (!queued)
		(void)cas_partial_sync(rb->p);
}

/* Claims the missing, idle groups of [first, end) in runs of at most
 * RANGE_RUN: the first run is the caller's (*ret_first, *ret_n; n 0 when
 * none), the others go to the range threads (or to the caller too,
 * when the queue is full: own[] up to max_own). ranges.lock held. */
struct claim {
	uint64_t first, n;
};
static size_t claim_runs(struct cache_store *c, struct range_blob *rb,
			 uint64_t first, uint64_t end, bool queue,
			 struct claim *own, size_t max_own)
{
	size_t n_own = 0;
	uint64_t g = first;
	while (g < end) {
		if (busy_get(rb, g) || cas_partial_has(rb->p, g, 1)) {
			g++;
			continue;
		}
		uint64_t n = 0;
		while (g + n < end && n < RANGE_RUN / G &&
		       !busy_get(rb, g + n) &&
		       !cas_partial_has(rb->p, g + n, 1))
			n++;
		bool to_thread = queue && (n_own > 0 || max_own == 0) &&
				 queue_locked(c, (struct range_job){rb, g, n});
		if (!to_thread && n_own == max_own)
			break;
		for (uint64_t i = g; i < g + n; i++)
			busy_set(rb, i, true);
		if (!to_thread)
			own[n_own++] = (struct claim){g, n};
		g += n;
	}
	return n_own;
}

/* The range blob of d (made on first use: its outboard from the cache,
 * else from the remote, verified). -ENOENT: the remote has no outboard
 * for it (read it whole). */
static int range_blob_get(struct cache_store *c, const cas_digest *d,
			  uint64_t size, struct range_blob **ret)
{
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_lock(&cr->lock);
	struct cas_dmap_entry *e = cas_dmap_find(&cr->blobs, d);
	struct range_blob *rb = e ? e->value : NULL;
	pthread_mutex_unlock(&cr->lock);
	if (rb) {
		*ret = rb;
		return rb->size == size ? 0 : -EBADMSG;
	}
	pthread_mutex_lock(&cr->open_lock);
	pthread_mutex_lock(&cr->lock);
	e = cas_dmap_find(&cr->blobs, d);
	rb = e ? e->value : NULL;
	pthread_mutex_unlock(&cr->lock);
	int r = 0;
	if (rb)
		goto out;
	if (!(rb = calloc(1, sizeof(*rb)))) {
		r = -ENOMEM;
		goto out;
	}
	rb->d = *d;
	cas_digest_to_hex(d, rb->hex);
	rb->size = size;
	rb->groups = cas_bao_groups(size);
	rb->busy = calloc(1, (size_t)(rb->groups + 7) / 8);
	if (!rb->busy) {
		r = -ENOMEM;
		goto out;
	}
	r = cas_partial_open(c->cache, d, size, NULL, 0, &rb->p);
	if (r == -ENOENT || r == -EBADMSG) {
		/* No outboard kept (or a bad one): the remote's. */
		_cleanup_free_ uint8_t *ob = NULL;
		size_t len = 0;
		r = c->fetcher->ops->outboard_fetch(
			c->fetcher, d, (size_t)cas_bao_outboard_size(size), &ob,
			&len);
		if (r == 0)
			r = cas_partial_open(c->cache, d, size, ob, len,
					     &rb->p);
		if (r == -EBADMSG)
			r = cas_log_errno(-EIO,
					  "blob %s: the outboard from %s does "
					  "not match its digest and size %llu",
					  rb->hex, c->what,
					  (unsigned long long)size);
		else if (r < 0 && r != -ENOENT)
			r = cas_log_errno(-EIO, "blob %s: outboard from %s: %m",
					  rb->hex, c->what);
	}
	if (r < 0)
		goto out;
	rb->outboard = cas_partial_outboard(rb->p, &rb->outboard_len);
	pthread_mutex_lock(&cr->lock);
	r = cas_dmap_put(&cr->blobs, d, rb);
	pthread_mutex_unlock(&cr->lock);
	r = r < 0 ? r : 0;
out:
	pthread_mutex_unlock(&cr->open_lock);
	if (r < 0 && rb && (!e || rb != e->value)) {
		range_blob_free(rb);
		rb = NULL;
	}
	*ret = rb;
	return r;
}

int cas_cache_blob_open_ranged(cas_store *s, const cas_digest *d, uint64_t size,
			       int *ret_fd)
{
	struct cache_store *c = to_cache(s);
	/* The caller's Node says the size: a whole fetch (-ENOTSUP, then
	 * blob_open) is bounded by it. */
	cas_cache_declare(c, d, size);
	if (!cas_cache_ranged(c) || !cas_bao_wants_outboard(size))
		return -ENOTSUP;
	uint64_t held;
	int r = cas_cache_held_open(c, d, ret_fd, &held);
	if (r == 0) {
		cas_cache_mark_used(c, *ret_fd);
		if (held == size)
			return 1;
		close(*ret_fd);
		return -EBADMSG;
	}
	if (r != -ENOENT)
		return r;
	struct range_blob *rb;
	r = range_blob_get(c, d, size, &rb);
	if (r == -ENOENT)
		return -ENOTSUP; /* no outboard published: whole, as before */
	if (r < 0)
		return r;
	if (cas_partial_complete(rb->p)) {
		r = cas_cache_held_open(c, d, ret_fd, &held);
		if (r == 0)
			return 1;
	}
	return cas_partial_open_fd(rb->p, ret_fd);
}

int cas_cache_blob_ensure(cas_store *s, const cas_digest *d, uint64_t off,
			  uint64_t len)
{
	struct cache_store *c = to_cache(s);
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_lock(&cr->lock);
	struct cas_dmap_entry *e = cas_dmap_find(&cr->blobs, d);
	struct range_blob *rb = e ? e->value : NULL;
	pthread_mutex_unlock(&cr->lock);
	if (!rb)
		return 0; /* opened whole */
	if (off >= rb->size || len == 0)
		return 0;
	len = CAS_MIN(len, rb->size - off);
	uint64_t first = off / G, end = (off + len + G - 1) / G;
	cas_cache_walk_credit(c, len);
	/* Claim what nobody fetches, fetch the first run (a long range,
	 * export's whole blob, goes out in parallel runs), wait for the
	 * rest; again while runs remain unclaimed (a full queue). A failed
	 * fetch (someone's readahead, quiet) is tried once more by us;
	 * a second failure is ours to report. */
	for (unsigned failed = 0;;) {
		struct claim own[4];
		pthread_mutex_lock(&cr->lock);
		uint64_t fails = rb->failures;
		size_t n_own = claim_runs(c, rb, first, end, true, own,
					  CAS_ARRAY_SIZE(own));
		pthread_mutex_unlock(&cr->lock);
		bool sync = false;
		uint64_t most = 0;
		for (size_t i = 0; i < n_own; i++)
			most = CAS_MAX(most, own[i].n * G);
		_cleanup_free_ uint8_t *buf =
			most ? malloc((size_t)most) : NULL;
		for (size_t i = 0; i < n_own; i++) {
			int r = buf ? fetch_run(c, rb, own[i].first, own[i].n,
						buf, &sync)
				    : -ENOMEM;
			run_done(c, rb, own[i].first, own[i].n, r);
		}
		if (sync)
			sync_later(c, rb);
		pthread_mutex_lock(&cr->lock);
		for (;;) {
			bool busy = false;
			for (uint64_t g = first; !busy && g < end; g++)
				busy = busy_get(rb, g);
			if (!busy)
				break;
			pthread_cond_wait(&cr->cond, &cr->lock);
		}
		bool more_failed = rb->failures != fails;
		pthread_mutex_unlock(&cr->lock);
		if (cas_partial_has(rb->p, first, end - first))
			break;
		if (atomic_load(&c->closing) || (more_failed && ++failed == 2))
			return -EIO;
	}

	/* A sequential reader (this read starts where the last ended) gets
	 * the window ahead fetched in the background, doubling as it goes
	 * on; any other read resets it. */
	pthread_mutex_lock(&cr->lock);
	if (off == rb->seq_end && off + len < rb->size) {
		rb->window = rb->window ? CAS_MIN(rb->window * 2,
						  (uint64_t)RANGE_RA_MAX)
					: RANGE_RA_MIN;
		uint64_t ra_end = CAS_MIN((off + len + rb->window + G - 1) / G,
					  rb->groups);
		uint64_t from = CAS_MAX(end, rb->ra_next);
		if (from < ra_end)
			(void)claim_runs(c, rb, from, ra_end, true, NULL, 0);
		rb->ra_next = CAS_MAX(rb->ra_next, ra_end);
	} else if (off != rb->seq_end) {
		rb->window = 0;
		rb->ra_next = 0;
	}
	rb->seq_end = off + len;
	pthread_mutex_unlock(&cr->lock);
	return 0;
}

void cas_cache_ranges_init(struct cache_store *c)
{
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_init(&cr->lock, NULL);
	pthread_mutex_init(&cr->open_lock, NULL);
	pthread_cond_init(&cr->cond, NULL);
	pthread_cond_init(&cr->job_cond, NULL);
}

void cas_cache_ranges_stop(struct cache_store *c)
{
	struct cache_ranges *cr = &c->ranges;
	pthread_mutex_lock(&cr->lock);
	cr->stopping = true;
	pthread_cond_broadcast(&cr->job_cond);
	unsigned n = cr->n_threads;
	pthread_mutex_unlock(&cr->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(cr->threads[i], NULL);
}

void cas_cache_ranges_release(struct cache_store *c)
{
	struct cache_ranges *cr = &c->ranges;
	cas_dmap_release(&cr->blobs, range_blob_free);
	cas_dmap_release(&cr->bad_logged, NULL);
	pthread_cond_destroy(&cr->cond);
	pthread_cond_destroy(&cr->job_cond);
	pthread_mutex_destroy(&cr->open_lock);
	pthread_mutex_destroy(&cr->lock);
}
