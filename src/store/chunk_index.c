/* chunk_index.c - chunk lists of large blobs and chunk -> blob lookups
 * (chunk_index.h). Two tables under one lock: blob digest -> its list,
 * chunk digest -> where it lies. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/dmap.h"
#include "core/util.h"
#include "store/chunk_index.h"

struct blob_list {
	cas_chunk *chunks;
	size_t n;
	uint64_t size;
};

struct chunk_place {
	cas_digest blob;
	uint64_t off, size;
};

struct cas_chunk_index {
	cas_store *store;
	pthread_mutex_t lock;
	struct cas_dmap blobs;	/* digest -> blob_list; lock */
	struct cas_dmap chunks; /* digest -> chunk_place; lock */
};

int cas_chunk_index_new(cas_store *s, cas_chunk_index **ret)
{
	cas_chunk_index *x = calloc(1, sizeof(*x));
	if (!x)
		return -ENOMEM;
	x->store = s;
	pthread_mutex_init(&x->lock, NULL);
	*ret = x;
	return 0;
}

static void blob_list_free(void *v)
{
	struct blob_list *b = v;
	if (b)
		free(b->chunks);
	free(b);
}

void cas_chunk_index_free(cas_chunk_index *x)
{
	if (!x)
		return;
	cas_dmap_release(&x->blobs, blob_list_free);
	cas_dmap_release(&x->chunks, free);
	pthread_mutex_destroy(&x->lock);
	free(x);
}

/* Enters list b of blob d (taking it). Called with x->lock held. */
static int enter_locked(cas_chunk_index *x, const cas_digest *d,
			struct blob_list *b)
{
	int r = cas_dmap_put(&x->blobs, d, b);
	if (r <= 0) {
		blob_list_free(b);
		return r;
	}
	uint64_t off = 0;
	for (size_t i = 0; i < b->n; i++) {
		struct chunk_place *p = malloc(sizeof(*p));
		if (!p)
			return -ENOMEM;
		*p = (struct chunk_place){*d, off, b->chunks[i].size};
		off += b->chunks[i].size;
		if ((r = cas_dmap_put(&x->chunks, &b->chunks[i].digest, p)) <=
		    0)
			free(p); /* known from another blob, or no memory */
		if (r < 0)
			return r;
	}
	return 0;
}

static int copy_out(const struct blob_list *b, cas_chunk **ret, size_t *ret_n,
		    uint64_t *ret_size)
{
	*ret = NULL;
	*ret_n = b->n;
	if (ret_size)
		*ret_size = b->size;
	if (b->n == 0)
		return 0;
	*ret = malloc(b->n * sizeof(**ret));
	if (!*ret)
		return -ENOMEM;
	memcpy(*ret, b->chunks, b->n * sizeof(**ret));
	return 0;
}

int cas_chunk_index_list(cas_chunk_index *x, const cas_digest *d,
			 cas_chunk **ret, size_t *ret_n, uint64_t *ret_size)
{
	cas_store *s = x->store;
	uint64_t size;
	int r, fd = -1;

	pthread_mutex_lock(&x->lock);
	struct cas_dmap_entry *e = cas_dmap_find(&x->blobs, d);
	if (e) {
		r = copy_out(e->value, ret, ret_n, ret_size);
		goto out;
	}
	r = s->ops->blob_stat(s, d, &size);
	if (r < 0)
		goto out;
	if (!cas_bao_wants_outboard(size)) {
		/* Small: no list, and nothing to remember. */
		*ret = NULL;
		*ret_n = 0;
		if (ret_size)
			*ret_size = size;
		r = 0;
		goto out;
	}
	struct blob_list *b = calloc(1, sizeof(*b));
	if (!b) {
		r = -ENOMEM;
		goto out;
	}
	r = s->ops->blob_open(s, d, &fd, &b->size);
	if (r >= 0)
		r = cas_chunklist_from_fd(fd, CAS_CHUNK_MIN, CAS_CHUNK_AVG,
					  CAS_CHUNK_MAX, &b->chunks, &b->n);
	if (fd >= 0)
		close(fd);
	if (r < 0) {
		blob_list_free(b);
		goto out;
	}
	r = copy_out(b, ret, ret_n, ret_size);
	if (r >= 0)
		r = enter_locked(x, d, b);
	else
		blob_list_free(b);
	if (r < 0) {
		free(*ret);
		*ret = NULL;
	}
out:
	pthread_mutex_unlock(&x->lock);
	return r;
}

int cas_chunk_index_add(cas_chunk_index *x, const cas_digest *d,
			const cas_chunk *chunks, size_t n)
{
	struct blob_list *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->n = n;
	for (size_t i = 0; i < n; i++)
		b->size += chunks[i].size;
	if (n) {
		b->chunks = malloc(n * sizeof(*chunks));
		if (!b->chunks) {
			free(b);
			return -ENOMEM;
		}
		memcpy(b->chunks, chunks, n * sizeof(*chunks));
	}
	pthread_mutex_lock(&x->lock);
	int r = enter_locked(x, d, b);
	pthread_mutex_unlock(&x->lock);
	return r;
}

int cas_chunk_index_find(cas_chunk_index *x, const cas_digest *d,
			 cas_digest *ret_blob, uint64_t *ret_off,
			 uint64_t *ret_size)
{
	int r = -ENOENT;
	pthread_mutex_lock(&x->lock);
	struct cas_dmap_entry *e = cas_dmap_find(&x->chunks, d);
	if (e) {
		const struct chunk_place *p = e->value;
		*ret_blob = p->blob;
		*ret_off = p->off;
		*ret_size = p->size;
		r = 0;
	}
	pthread_mutex_unlock(&x->lock);
	return r;
}
