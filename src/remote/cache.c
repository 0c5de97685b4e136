/* cache.c - the remote store's cas_store: its operations table, roots
 * (the cache's plus those the remote publishes), its life (new, free),
 * and the in-flight table through which concurrent readers of one absent
 * object wait for one fetch (cache_i.h has the whole picture).
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

/* In-flight table ------------------------------------------------------ */

/* Returns the entry for d, creating it (*ret_owner = true: the caller
 * fetches and must call cas_cache_inflight_done) or joining it. */
struct inflight *cas_cache_inflight_join(struct cache_store *c,
					 struct cas_dmap *map,
					 const cas_digest *d, bool *ret_owner)
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

void cas_cache_inflight_unref_locked(struct cas_dmap *map, struct inflight *e)
{
	if (--e->refs > 0)
		return;
	struct cas_dmap_entry *me = cas_dmap_find(map, &e->digest);
	if (me && me->value == e)
		cas_dmap_remove(map, me);
	free(e);
}

int cas_cache_inflight_wait(struct cache_store *c, struct cas_dmap *list,
			    struct inflight *e, bool *ret_quiet)
{
	pthread_mutex_lock(&c->lock);
	while (!e->done)
		pthread_cond_wait(&c->cond, &c->lock);
	int r = e->r;
	if (ret_quiet)
		*ret_quiet = e->quiet;
	cas_cache_inflight_unref_locked(list, e);
	pthread_mutex_unlock(&c->lock);
	return r;
}

void cas_cache_inflight_done(struct cache_store *c, struct cas_dmap *list,
			     struct inflight *e, int r)
{
	pthread_mutex_lock(&c->lock);
	e->done = true;
	e->r = r;
	pthread_cond_broadcast(&c->cond);
	cas_cache_inflight_unref_locked(list, e);
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
	int r = ret_fd ? cas_cache_held_open(c, d, ret_fd, ret_size)
		       : cas_cache_held_read(c, d, max, ret_buf, ret_size);
	bool fetched = false;
	/* Another thread's eviction may remove the blob between its fetch
	 * and our open: fetch again, a few times. */
	for (unsigned attempt = 0; r == -ENOENT && attempt < 3; attempt++) {
		r = cas_cache_ensure_blob(c, d, CAS_FETCH_UNSIZED, false);
		if (r < 0)
			return r;
		fetched = true;
		r = ret_fd ? cas_cache_held_open(c, d, ret_fd, ret_size)
			   : cas_cache_held_read(c, d, max, ret_buf, ret_size);
	}
	if (r >= 0)
		cas_cache_walk_credit(c, *ret_size);
	if (r >= 0 && ret_fd)
		cas_cache_mark_used(c, *ret_fd);
	if (fetched)
		cas_cache_maybe_evict(c, 0);
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
		cas_cache_walk_credit(c, *ret_size);
	return r;
}

static int cache_blob_stat(cas_store *s, const cas_digest *d,
			   uint64_t *ret_size)
{
	struct cache_store *c = to_cache(s);
	int r = cas_cache_held_stat(c, d, ret_size);
	if (r != -ENOENT)
		return r;
	/* tvix's Stat carries no size, and a size not checked against the
	 * bytes is not worth reporting: fetch the blob. */
	r = cas_cache_ensure_blob(c, d, CAS_FETCH_UNSIZED, false);
	if (r < 0)
		return r;
	r = cas_cache_held_stat(c, d, ret_size);
	cas_cache_maybe_evict(c, 0);
	return r;
}

static int cache_blob_writer_new(cas_store *s, cas_blob_writer **ret)
{
	struct cache_store *c = to_cache(s);
	return c->cache->ops->blob_writer_new(c->cache, ret);
}

struct load_roots {
	struct cache_store *c;
	struct published_root *list;
	size_t n;
};

static int load_root_cb(void *userdata, const char *name, const cas_node *node)
{
	struct load_roots *l = userdata;
	if (node->type == CAS_NODE_FILE)
		cas_cache_declare(l->c, &node->digest, node->size);
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
	struct load_roots l = {.c = c};
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

cas_store *cas_cache_local_store(cas_store *s)
{
	return to_cache(s)->cache;
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
	cas_cache_ranges_stop(c);
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
	cas_cache_mgroup_free(c->mfill);
	cas_cache_mgroup_free(c->mspare);
	cas_ingest_free(c->ingest);
	pthread_cond_destroy(&c->pub_cond);
	free(c->pq);
	if (c->walk)
		cas_cache_walk_clear(c);
	free(c->walk);
	pthread_mutex_destroy(&c->walk_lock);
	cas_dmap_release(&c->prefetched, NULL);
	cas_dmap_release(&c->blobs_inflight, NULL);
	cas_dmap_release(&c->dirs_inflight, NULL);
	cas_dmap_release(&c->bad_logged, NULL);
	cas_dmap_release(&c->declared, NULL);
	cas_cache_ranges_release(c); /* before the cache store it writes */
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
	.blob_open_ranged = cas_cache_blob_open_ranged,
	.blob_ensure = cas_cache_blob_ensure,
	.directory_get_raw = cas_cache_directory_get_raw,
	.directory_has = cas_cache_directory_has,
	.dir_batch_new = cas_cache_dir_batch_new,
	.root_get = cache_root_get,
	.roots_foreach = cache_roots_foreach,
	.root_set = cache_root_set,
	.root_remove = cache_root_remove,
	.free = cache_free,
};

int cas_cache_store_new(cas_fetcher *f, const char *what,
			const struct cas_remote_options *opts, cas_store **ret)
{
	/* The cache never imports; what it packs, the publisher packs. */
	struct cas_local_options lo = {
		.create = true, .no_inline = true, .cache = true};
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
	f->cancel = &c->closing;
	pthread_mutex_init(&c->lock, NULL);
	pthread_mutex_init(&c->evict_lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_cond_init(&c->pq_cond, NULL);
	pthread_cond_init(&c->lq_cond, NULL);
	pthread_mutex_init(&c->walk_lock, NULL);
	cas_cache_ranges_init(c);
	/* Its deadlines must not move with the wall clock. */
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->pub_cond, &ca);
	pthread_condattr_destroy(&ca);
	c->cache_max = opts->cache_max;
	/* Bounded or not: a bounded cache evicts whole packs (its packs
	 * kept to a sixteenth of the bound, below). */
	c->pack_small = true;
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
	/* The cache folder itself is made by cas_local_open. */
	r = cas_mkdir_parents(c->cache_dir);
	if (r < 0) {
		r = cas_log_errno(r, "cache %s: %m", c->cache_dir);
		goto fail;
	}
	r = cas_local_open(c->cache_dir, &lo, &c->cache);
	if (r < 0) {
		r = cas_log_errno(r, "cache %s: %m", c->cache_dir);
		goto fail;
	}
	r = cas_ingest_new(c->cache, &c->ingest);
	if (r < 0) {
		r = cas_log_errno(r, "cache %s: %m", c->cache_dir);
		goto fail;
	}
	if (c->cache_max) {
		c->pack_max =
			CAS_MAX(c->cache_max / 16, 2 * CAS_LOCAL_PACK_MAX);
		cas_ingest_set_pack_max(c->ingest, c->pack_max);
		int64_t bytes = cas_local_blob_bytes(c->cache);
		c->cache_bytes = bytes > 0 ? (uint64_t)bytes : 0;
		cas_cache_maybe_evict(c, 0);
	}
	*ret = &c->base;
	return 0;
fail:
	cache_free(&c->base);
	return r;
}
