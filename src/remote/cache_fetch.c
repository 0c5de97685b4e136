/* cache_fetch.c - blobs into the cache: fetched whole while hashed,
 * verified, staged (a tmp/ file, or a small blob in memory for the
 * pack), then named by the publisher thread in groups after one syncfs;
 * reads of what the cache holds, staged blobs included (cache_i.h).
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
#include "store/ingest.h"

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
	char *name; /* its staged file's name (store/ingest.h), once made */
	int fd;	    /* -1 until the first buffer is written out */
	cas_hasher hasher;
	uint64_t size;
	uint64_t max;	  /* the declared size: one byte more is -EFBIG */
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

/* The blob's staged file, made when its first buffer is written out (a
 * small blob that the cache packs never has one). */
static int sink_open(struct blob_sink *b)
{
	int r = cas_ingest_stage_create(b->c->ingest, &b->fd, b->name);
	if (r < 0) {
		b->fd = -1;
		b->name[0] = 0;
	}
	return r;
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
	/* Whatever the transport does: never more than declared into
	 * tmp/ (a server streaming without end would fill the disk). */
	if (len > b->max - b->size)
		return -EFBIG;
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

void cas_cache_maybe_evict(struct cache_store *c, uint64_t added)
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
	int64_t now = cas_local_evict(c->cache,
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
static int stage_blob(struct cache_store *c, struct cas_ingest_file *sb)
{
	int r = 0;

	pthread_mutex_lock(&c->lock);
	while (c->staged.n >= STAGED_MAX && c->publisher_started &&
	       !c->publisher_stopping)
		pthread_cond_wait(&c->pub_cond, &c->lock);
	r = start_publisher_locked(c);
	if (r >= 0)
		r = cas_array_grow(&c->pending, &c->cap_pending,
				   c->n_pending + 1, sizeof(*c->pending), 256);
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
		cas_ingest_stage_discard(c->ingest, sb->name);
		free(sb);
	}
	return r < 0 ? r : 0;
}

/* Bytes that hashed to `got` for d: 0 when right, else -EIO, logged once
 * per digest (a mount's readers may ask again and again) unless quiet. */
int cas_cache_check_fetched(struct cache_store *c, const cas_digest *d,
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

/* A bounded cache writes groups of at most its pack size (a sixteenth of
 * its bound), so that its packs, evicted whole, stay small beside it. */
static bool mgroup_room(const struct cache_store *c, const struct mgroup *g,
			size_t len)
{
	size_t max = c->pack_max ? (size_t)CAS_MIN(c->pack_max, MGROUP_BYTES)
				 : MGROUP_BYTES;
	return g->n < MGROUP_BLOBS && g->used + len <= max;
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

void cas_cache_mgroup_free(struct mgroup *g)
{
	if (!g)
		return;
	free(g->buf);
	free(g->v);
	free(g);
}

/* Adds a verified small blob to the group in memory (readable at once,
 * packed by the publisher); waits while both groups are full. */
int cas_cache_mem_stage(struct cache_store *c, const cas_digest *d,
			const uint8_t *buf, size_t len)
{
	int r;
	pthread_mutex_lock(&c->lock);
	for (;;) {
		r = start_publisher_locked(c);
		if (r < 0 || (c->mstaged.n && cas_dmap_find(&c->mstaged, d)))
			goto out;
		if (!c->mfill || mgroup_room(c, c->mfill, len) ||
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
	if (!mgroup_room(c, g, len)) {
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

const char *cas_cache_fetch_why(int r, uint64_t max, char *buf, size_t size)
{
	if (r == -EFBIG && max != CAS_FETCH_UNSIZED)
		snprintf(buf, size, "more bytes than its declared size %llu",
			 (unsigned long long)max);
	else if (r == -EFBIG)
		snprintf(buf, size,
			 "more bytes than the remote announced "
			 "or than %llu",
			 (unsigned long long)CAS_FETCH_UNSIZED_MAX);
	else if (r == -ETIMEDOUT)
		snprintf(buf, size, "stalled for %u s", cas_fetch_stall_s());
	else if (r == -ECANCELED)
		snprintf(buf, size, "cancelled: the cache is closing");
	else
		snprintf(buf, size, "%s", strerror(-r));
	return buf;
}

/* Declared sizes ----------------------------------------------------- */

_Static_assert(sizeof(uintptr_t) >= sizeof(uint64_t), "sizes as values");

void cas_cache_declare(struct cache_store *c, const cas_digest *d,
		       uint64_t size)
{
	pthread_mutex_lock(&c->lock);
	if (c->declared.n >= DECLARED_MAX)
		cas_dmap_clear(&c->declared);
	struct cas_dmap_entry *e = cas_dmap_find(&c->declared, d);
	/* Two FileNodes may disagree: one is wrong, and the hash check
	 * refuses its bytes anyway; the larger bound refuses nothing the
	 * other one would take. */
	if (e && (uintptr_t)e->value < size)
		e->value = (void *)(uintptr_t)size;
	else if (!e)
		(void)cas_dmap_put(&c->declared, d, (void *)(uintptr_t)size);
	pthread_mutex_unlock(&c->lock);
}

void cas_cache_declare_dir(struct cache_store *c, const uint8_t *buf,
			   size_t len)
{
	cas_directory *dir = NULL;
	const char *why;
	if (cas_directory_decode(buf, len, &dir, &why) < 0)
		return;
	for (size_t i = 0; i < dir->n_files; i++)
		cas_cache_declare(c, &dir->files[i].digest, dir->files[i].size);
	cas_directory_free(dir);
}

uint64_t cas_cache_declared(struct cache_store *c, const cas_digest *d)
{
	uint64_t size = CAS_FETCH_UNSIZED;
	pthread_mutex_lock(&c->lock);
	struct cas_dmap_entry *e =
		c->declared.n ? cas_dmap_find(&c->declared, d) : NULL;
	if (e)
		size = (uintptr_t)e->value;
	pthread_mutex_unlock(&c->lock);
	return size;
}

/* The most bytes a fetch of d may bring: what its FileNode declared (max,
 * or learnt), and never more than a bounded cache holds (a blob larger
 * than --cache-max could not stay anyway); CAS_FETCH_UNSIZED when none
 * of these is known (the transport bounds it then). */
static uint64_t fetch_bound(struct cache_store *c, const cas_digest *d,
			    uint64_t max)
{
	if (max == CAS_FETCH_UNSIZED)
		max = cas_cache_declared(c, d);
	if (c->cache_max && (max == CAS_FETCH_UNSIZED || max > c->cache_max))
		max = c->cache_max;
	return max;
}

static int fetch_blob(struct cache_store *c, const cas_digest *d, uint64_t max,
		      bool quiet)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	struct cas_ingest_file *sb;
	cas_digest got;
	int r;

	cas_digest_to_hex(d, hex);
	sb = calloc(1, sizeof(*sb));
	if (!sb)
		return -ENOMEM;
	sb->digest = *d;
	struct blob_sink b = {.c = c,
			      .name = sb->name,
			      .fd = -1,
			      .max = max == CAS_FETCH_UNSIZED ? UINT64_MAX
							      : max};
	cas_hasher_init(&b.hasher);
	r = c->fetcher->ops->blob_fetch(c->fetcher, d, max, blob_sink_write,
					&b);
	int fr = blob_sink_finish(&b, r >= 0);
	if (r >= 0)
		r = fr;
	if (b.fd >= 0 && close(b.fd) < 0 && r >= 0)
		r = cas_log_errno(cas_negerrno(), "blob %s: cache %s: %m", hex,
				  c->cache_dir);
	if (r >= 0) {
		cas_hasher_final(&b.hasher, &got);
		r = cas_cache_check_fetched(c, d, &got, quiet);
	} else if (r != -ENOENT) {
		char why[128];
		if (r == -EFBIG && max == c->cache_max &&
		    cas_cache_declared(c, d) != max)
			snprintf(why, sizeof(why),
				 "more bytes than the cache holds "
				 "(--cache-max %llu)",
				 (unsigned long long)max);
		else
			(void)cas_cache_fetch_why(r, max, why, sizeof(why));
		(void)cas_log_internal(quiet ? CAS_LOG_DEBUG : CAS_LOG_ERROR, r,
				       "blob %s from %s: %s", hex, c->what,
				       why);
		r = -EIO;
	}
	if (r >= 0 && b.fd < 0) {
		/* Small, all in memory: to the pack. */
		r = cas_cache_mem_stage(c, d, b.bufs[b.cur], b.size);
		blob_sink_free(&b);
		free(sb);
		return r < 0 ? cas_log_errno(r, "blob %s: cache %s: %m", hex,
					     c->cache_dir)
			     : 0;
	}
	blob_sink_free(&b);
	if (r < 0) {
		if (sb->name[0])
			cas_ingest_stage_discard(c->ingest, sb->name);
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
	       !mgroup_room(c, c->mfill, CAS_LOCAL_PACK_MAX) ||
	       now.tv_sec > when.tv_sec ||
	       (now.tv_sec == when.tv_sec && now.tv_nsec >= when.tv_nsec);
}

static bool publisher_has_work(const struct cache_store *c)
{
	return c->n_pending > 0 || mfill_due(c, NULL);
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
		struct cas_ingest_file **group = c->pending;
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

		/* The store's one write path (store/ingest.h): the pack
		 * group written, synced and indexed; one syncfs; the files
		 * named. */
		struct cas_ingest_file *files =
			n ? malloc(n * sizeof(*files)) : NULL;
		for (size_t i = 0; files && i < n; i++)
			files[i] = *group[i];
		struct cas_ingest_group g = {.files = files,
					     .n_files = files ? n : 0};
		if (mg) {
			g.small_buf = mg->buf;
			g.small_len = mg->used;
			g.smalls = mg->v;
			g.n_smalls = mg->n;
		}
		struct cas_ingest_result res = {0};
		(void)cas_ingest_commit(c->ingest, &g, &res);
		int pack_r = res.pack_r;
		uint64_t packed = mg && pack_r == 0 ? mg->used : 0;
		/* Without memory for the list, the group is not named. */
		bool synced = res.sync_r == 0 && (files || n == 0);
		int sync_errno = res.sync_r < 0 ? -res.sync_r : ENOMEM;
		free(files);

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
				cas_ingest_stage_discard(c->ingest,
							 group[i]->name);
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
				cas_cache_mgroup_free(c->mspare);
			}
			c->mspare = mg;
		}
		pthread_mutex_unlock(&c->lock);
		/* The pack grew by the group (a bounded cache counts it). */
		cas_cache_maybe_evict(c, packed);
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
		struct cas_ingest_file *sb = e->value;
		int fd = -1;
		r = cas_ingest_stage_open(c->ingest, sb->name, &fd);
		if (r == 0) {
			*ret_fd = fd;
			if (ret_size)
				*ret_size = sb->size;
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
		*ret_size = ((struct cas_ingest_file *)e->value)->size;
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
int cas_cache_held_stat(struct cache_store *c, const cas_digest *d,
			uint64_t *ret_size)
{
	uint64_t size;
	if (is_staged(c, d, ret_size ? ret_size : &size))
		return 0;
	return c->cache->ops->blob_stat(c->cache, d,
					ret_size ? ret_size : &size);
}

/* The cache's blob_open, staged blobs included. */
int cas_cache_held_open(struct cache_store *c, const cas_digest *d, int *ret_fd,
			uint64_t *ret_size)
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
int cas_cache_held_read(struct cache_store *c, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size)
{
	int r = mem_get(c, d, max, ret_buf, ret_size);
	if (r != -ENOENT)
		return r;
	_cleanup_close_ int fd = -1;
	uint64_t size = 0;
	r = staged_open(c, d, &fd, &size);
	if (r == -ENOENT)
		return cas_store_blob_read(c->cache, d, max, ret_buf, ret_size);
	if (r < 0)
		return r;
	return cas_store_blob_read_fd(d, fd, size, max, ret_buf, ret_size);
}

/* Marks the blob as in use and recently used for eviction (a bounded
 * cache only; store/local_evict.c). */
void cas_cache_mark_used(struct cache_store *c, int fd)
{
	if (c->cache_max == 0)
		return;
	cas_local_blob_mark_used(fd);
}

/* Makes sure the cache holds d: 0, -ENOENT, -EIO. One fetch for all the
 * threads that ask at once. */
int cas_cache_ensure_blob(struct cache_store *c, const cas_digest *d,
			  uint64_t max, bool quiet)
{
	for (unsigned attempt = 0;; attempt++) {
		bool owner, was_quiet = false;
		uint64_t size;
		struct inflight *e = cas_cache_inflight_join(
			c, &c->blobs_inflight, d, &owner);
		if (!e)
			return -ENOMEM;
		if (!owner) {
			int r = cas_cache_inflight_wait(c, &c->blobs_inflight,
							e, &was_quiet);
			/* A failed prefetch logged nothing: a reader asks
			 * again itself, so that its error is reported. */
			if (r < 0 && was_quiet && !quiet && attempt < 3)
				continue;
			return r;
		}
		e->quiet = quiet;
		/* It may have landed between the caller's miss and the join. */
		int r = cas_cache_held_stat(c, d, &size);
		if (r == -ENOENT)
			r = fetch_blob(c, d, fetch_bound(c, d, max), quiet);
		cas_cache_inflight_done(c, &c->blobs_inflight, e, r);
		return r;
	}
}

/* A verified blob in memory, staged as a file (a bounded cache, or one
 * too large for the pack). */
int cas_cache_file_stage(struct cache_store *c, const cas_digest *d,
			 const uint8_t *buf, size_t len)
{
	struct cas_ingest_file *sb = calloc(1, sizeof(*sb));
	if (!sb)
		return -ENOMEM;
	sb->digest = *d;
	sb->size = len;
	struct blob_sink b = {.c = c, .name = sb->name, .fd = -1};
	int r = sink_open(&b);
	if (r >= 0)
		r = cas_write_all(b.fd, buf, len);
	if (b.fd >= 0 && close(b.fd) < 0 && r >= 0)
		r = cas_negerrno();
	if (r < 0) {
		if (sb->name[0])
			cas_ingest_stage_discard(c->ingest, sb->name);
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
