/* cache_tree.c - Directories into the cache: a missing Directory is
 * fetched with its closure (in one request, or one tree level per round),
 * verified, and committed leaves first in one batch (cache_i.h).
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
	uint64_t bytes;		  /* received so far, repeats included */
	/* Directories received, and DirectoryNodes named by the distinct
	 * ones: a stream may send each at most once per name (and the
	 * root once), so one that repeats without end is cut at once. */
	uint64_t received, named;
	cas_digest root; /* the Directory asked for */
};

/* Verifies and keeps one fetched Directory; names its children. */
static int tree_accept(struct tree_fetch *t, const cas_digest *want,
		       const uint8_t *buf, size_t len)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], got_hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest d;
	const char *why = NULL;
	int r;

	/* A remote that streams Directories without end (repeating one,
	 * say) is cut where a tree file would be (remote_i.h). */
	if (len > CAS_LAYOUT_TREE_MAX - t->bytes) {
		cas_digest_to_hex(want ? want : &t->root, hex);
		return cas_log_internal(t->level, -EIO,
					"directory %s from %s: more than %u "
					"bytes of Directories",
					hex, t->c->what, CAS_LAYOUT_TREE_MAX);
	}
	t->bytes += len;
	cas_directory_digest(buf, len, &d);
	cas_digest_to_hex(&d, got_hex);
	if (++t->received > t->named + 1)
		return cas_log_internal(t->level, -EIO,
					"directory %s from %s: sent more often "
					"than Directories name it",
					got_hex, t->c->what);
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
	t->named += f->dir->n_directories;
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
			if ((r = cas_array_grow(&out, &cap, n_out + 1,
						sizeof(*out), 64)) < 0)
				break;
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
			unsigned long mark = cas_log_error_count();
			r = b->ops->put(b, fr->f->buf, fr->f->len, &put_d);
			if (r < 0) {
				/* The batch names what it refused (a child's
				 * wrong size, say): one line, not two. */
				char hex[CAS_DIGEST_HEX_LEN + 1];
				cas_digest_to_hex(&fr->d, hex);
				r = r == -EBADMSG || r == -ENOENT ? -EIO : r;
				if (cas_log_error_count() == mark)
					r = cas_log_errno(
						r, "directory %s: cache: %m",
						hex);
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
	struct tree_fetch t = {.c = c, .level = CAS_LOG_ERROR, .root = *d};
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
		t = (struct tree_fetch){
			.c = c, .level = CAS_LOG_ERROR, .root = *d};
		r = fetch_tree_levels(&t, d, hex);
	}
	if (r == -EIO || r == -ENOMEM || r == -ENOENT)
		; /* logged where it happened, or absent */
	else if (r < 0) {
		char why[128];
		(void)cas_log_errno(
			r, "directory %s from %s: %s", hex, c->what,
			cas_cache_fetch_why(r, 0, why, sizeof(why)));
		r = -EIO;
	}
	if (r >= 0)
		r = tree_commit(&t, d);
	cas_dmap_release(&t.got, fetched_dir_free);
	cas_dmap_release(&t.wanted, NULL);
	return r;
}

static int ensure_dir(struct cache_store *c, const cas_digest *d)
{
	bool owner;
	struct inflight *e =
		cas_cache_inflight_join(c, &c->dirs_inflight, d, &owner);
	if (!e)
		return -ENOMEM;
	if (!owner)
		return cas_cache_inflight_wait(c, &c->dirs_inflight, e, NULL);
	int r = cache_has_dir(c, d) ? 0 : fetch_tree(c, d);
	cas_cache_inflight_done(c, &c->dirs_inflight, e, r);
	return r;
}

int cas_cache_directory_get_raw(cas_store *s, const cas_digest *d,
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
	if (r >= 0) {
		cas_cache_declare_dir(c, *ret_buf, *ret_len);
		cas_cache_prefetch_directory(c, d, *ret_buf, *ret_len);
	}
	return r;
}

int cas_cache_directory_has(cas_store *s, const cas_digest *d)
{
	struct cache_store *c = to_cache(s);
	if (cache_has_dir(c, d))
		return 1;
	int r = ensure_dir(c, d);
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

int cas_cache_dir_batch_new(cas_store *s, cas_dir_batch **ret)
{
	struct cache_store *c = to_cache(s);
	return c->cache->ops->dir_batch_new(c->cache, ret);
}

/* Roots ------------------------------------------------------------------ */
