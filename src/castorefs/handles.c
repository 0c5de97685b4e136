#include "castorefs/handles_i.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

void cas_handle_table_init(struct cas_handle_table *t, atomic_size_t *memory)
{
	pthread_mutex_init(&t->lock, NULL);
	for (size_t c = 0; c < HANDLE_MAX_CHUNKS; c++)
		atomic_init(&t->chunks[c], NULL);
	t->n_slots = 0;
	t->free_head = UINT32_MAX;
	t->gen = 0;
	t->memory = memory;
}

/* idx comes from a request's fh: any value a guest sends. */
struct cas_handle *cas_handle_slot(struct cas_handle_table *t, uint32_t idx)
{
	if (idx >> HANDLE_CHUNK_BITS >= HANDLE_MAX_CHUNKS)
		return NULL;
	struct cas_handle *chunk = atomic_load_explicit(
		&t->chunks[idx >> HANDLE_CHUNK_BITS], memory_order_acquire);
	return chunk ? &chunk[idx & (HANDLE_CHUNK - 1)] : NULL;
}

int cas_handle_new(struct cas_handle_table *t, struct cas_handle **ret)
{
	pthread_mutex_lock(&t->lock);
	uint32_t idx = t->free_head;
	if (idx != UINT32_MAX) {
		t->free_head = cas_handle_slot(t, idx)->next_free;
	} else {
		if (t->n_slots >= HANDLE_MAX_CHUNKS * HANDLE_CHUNK) {
			pthread_mutex_unlock(&t->lock);
			return -ENFILE;
		}
		idx = t->n_slots;
		uint32_t c = idx >> HANDLE_CHUNK_BITS;
		if (!atomic_load(&t->chunks[c])) {
			struct cas_handle *chunk =
				calloc(HANDLE_CHUNK, sizeof(*chunk));
			if (!chunk) {
				pthread_mutex_unlock(&t->lock);
				return -ENOMEM;
			}
			for (uint32_t i = 0; i < HANDLE_CHUNK; i++)
				chunk[i].idx = c << HANDLE_CHUNK_BITS | i;
			atomic_store_explicit(&t->chunks[c], chunk,
					      memory_order_release);
			atomic_fetch_add(t->memory,
					 HANDLE_CHUNK * sizeof(*chunk));
		}
		t->n_slots++;
	}
	/* Generations are 31 bits (returned as an int), never 0. */
	uint32_t gen = ++t->gen & INT32_MAX;
	if (gen == 0)
		gen = t->gen = 1;
	pthread_mutex_unlock(&t->lock);
	struct cas_handle *h = cas_handle_slot(t, idx);
	if (!h)
		return -EIO; /* cannot happen: the slot's chunk exists */
	h->fd = -1;
	h->size = 0;
	h->base = 0;
	h->fd_owned = true;
	h->data = NULL;
	h->ino = 0;
	h->roots = NULL;
	atomic_store(&h->checked, 0);
	h->rc = NULL;
	atomic_store(&h->refs, 1);
	/* Not findable until the caller fills it and calls handle_publish. */
	*ret = h;
	return (int)(gen & INT32_MAX);
}

uint64_t cas_handle_publish(struct cas_handle *h, uint32_t gen)
{
	uint64_t fh = (uint64_t)gen << 32 | h->idx;
	atomic_store_explicit(&h->fh, fh, memory_order_release);
	return fh;
}

struct cas_handle *cas_handle_find(struct cas_handle_table *t, uint64_t fh)
{
	if (fh == 0)
		return NULL;
	struct cas_handle *h = cas_handle_slot(t, (uint32_t)fh);
	if (!h || atomic_load_explicit(&h->fh, memory_order_acquire) != fh)
		return NULL;
	return h;
}

static void handle_free(struct cas_handle_table *t, struct cas_handle *h)
{
	atomic_store(&h->fh, 0);
	int fd = atomic_exchange(&h->fd, -1);
	if (fd >= 0 && h->fd_owned)
		close(fd);
	free(h->data);
	h->data = NULL;
	cas_range_check_free(h->rc);
	h->rc = NULL;
	if (h->roots) {
		for (size_t i = 0; i < h->roots->n; i++)
			free(h->roots->nodes[i]);
		free(h->roots);
		h->roots = NULL;
	}
	pthread_mutex_lock(&t->lock);
	h->next_free = t->free_head;
	t->free_head = h->idx;
	pthread_mutex_unlock(&t->lock);
}

void cas_handle_unref(struct cas_handle_table *t, struct cas_handle *h)
{
	if (atomic_fetch_sub(&h->refs, 1) == 1)
		handle_free(t, h);
}

struct cas_handle *cas_handle_hold(struct cas_handle_table *t, uint64_t fh)
{
	struct cas_handle *h = cas_handle_find(t, fh);
	if (!h)
		return NULL;
	uint32_t refs = atomic_load(&h->refs);
	do {
		if (refs == 0)
			return NULL;
	} while (!atomic_compare_exchange_weak(&h->refs, &refs, refs + 1));
	/* Released, or released and reused, between find and hold? */
	if (atomic_load_explicit(&h->fh, memory_order_acquire) != fh) {
		cas_handle_unref(t, h);
		return NULL;
	}
	return h;
}

int cas_handle_release(struct cas_handle_table *t, uint64_t fh)
{
	struct cas_handle *h = cas_handle_find(t, fh);
	if (!h)
		return -EBADF;
	uint64_t expected = fh;
	/* Only one release wins, even if a confused peer sends two. */
	if (!atomic_compare_exchange_strong(&h->fh, &expected, 0))
		return -EBADF;
	cas_handle_unref(t, h);
	return 0;
}

void cas_handle_table_release(struct cas_handle_table *t)
{
	for (size_t c = 0; c < HANDLE_MAX_CHUNKS; c++) {
		struct cas_handle *chunk = atomic_load(&t->chunks[c]);
		if (!chunk)
			break;
		for (size_t i = 0; i < HANDLE_CHUNK; i++)
			if (atomic_load(&chunk[i].fh))
				handle_free(t, &chunk[i]);
		free(chunk);
	}
	pthread_mutex_destroy(&t->lock);
}
