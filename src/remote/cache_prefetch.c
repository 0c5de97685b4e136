/* cache_prefetch.c - fetching ahead of readers: the walk over the
 * Directories a reader reads, the prefetch workers and their batches
 * (pack ranges, batched transports), and the large-blob worker
 * (cache_i.h).
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
#include "remote/cache_i.h"

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
/* A fetched blob: verified, then kept in memory for the pack, or put in
 * a file. */
static int batch_stage(struct batch *b, size_t k, const uint8_t *buf,
		       size_t len)
{
	cas_digest got;
	cas_hash_buffer(buf, len, &got);
	int r = cas_cache_check_fetched(b->c, &b->it[k].digest, &got, true);
	if (r == 0 && b->c->pack_small && len <= CAS_LOCAL_PACK_MAX)
		r = cas_cache_mem_stage(b->c, &b->it[k].digest, buf, len);
	else if (r == 0)
		r = cas_cache_file_stage(b->c, &b->it[k].digest, buf, len);
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
		cas_cache_inflight_unref_locked(&c->blobs_inflight, b->e[k]);
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
		struct inflight *e = cas_cache_inflight_join(
			c, &c->blobs_inflight, &v[i].digest, &owner);
		if (!e)
			continue;
		if (!owner ||
		    cas_cache_held_stat(c, &v[i].digest, &size) == 0) {
			/* Fetched by another thread, or already here. */
			if (owner) {
				cas_cache_inflight_done(c, &c->blobs_inflight,
							e, 0);
			} else {
				pthread_mutex_lock(&c->lock);
				cas_cache_inflight_unref_locked(
					&c->blobs_inflight, e);
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
			cas_cache_inflight_unref_locked(&c->blobs_inflight,
							b->e[k]);
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
		cas_cache_inflight_unref_locked(&c->blobs_inflight, b->e[i]);
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
			r = cas_cache_ensure_blob(c, &v[0].digest, v[0].size,
						  true);
		cas_cache_maybe_evict(c, 0);
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
		int r = cas_cache_ensure_blob(c, &it.digest, it.size, true);
		cas_cache_maybe_evict(c, 0);
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

void cas_cache_walk_clear(struct cache_store *c)
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
	    cas_cache_held_stat(c, &n->digest, &size) != -ENOENT)
		return WANT_NONE;
	/* Large blobs read by range come as their readers go (readahead;
	 * export asks for all of one at once): a mount that reads 4 KiB
	 * of a large file must not fetch the rest behind its back. */
	if (n->size > PREFETCH_MAX_SIZE && cas_cache_ranged(c))
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
void cas_cache_prefetch_directory(struct cache_store *c, const cas_digest *d,
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
	cas_cache_walk_clear(c);
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
void cas_cache_walk_credit(struct cache_store *c, uint64_t size)
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
