/* dmap.c - digest -> pointer map (dmap.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/dmap.h"

static size_t slot_of(const cas_digest *d, size_t cap)
{
	uint64_t h;
	memcpy(&h, d->bytes, sizeof(h));
	return (size_t)(h & (cap - 1));
}

struct cas_dmap_entry *cas_dmap_find(const struct cas_dmap *m,
				     const cas_digest *d)
{
	if (m->cap == 0)
		return NULL;
	for (size_t i = slot_of(d, m->cap);; i = (i + 1) & (m->cap - 1)) {
		struct cas_dmap_entry *e = &m->slots[i];
		if (!e->used)
			return NULL;
		if (cas_digest_eq(&e->digest, d))
			return e;
	}
}

static int grow(struct cas_dmap *m)
{
	size_t cap = m->cap ? m->cap * 2 : 64;
	struct cas_dmap_entry *slots = calloc(cap, sizeof(*slots));
	if (!slots)
		return -ENOMEM;
	for (size_t j = 0; j < m->cap; j++) {
		struct cas_dmap_entry *e = &m->slots[j];
		if (!e->used)
			continue;
		size_t i = slot_of(&e->digest, cap);
		while (slots[i].used)
			i = (i + 1) & (cap - 1);
		slots[i] = *e;
	}
	free(m->slots);
	m->slots = slots;
	m->cap = cap;
	return 0;
}

int cas_dmap_put(struct cas_dmap *m, const cas_digest *d, void *value)
{
	if (cas_dmap_find(m, d))
		return 0;
	if ((m->n + 1) * 4 > m->cap * 3) {
		int r = grow(m);
		if (r < 0)
			return r;
	}
	size_t i = slot_of(d, m->cap);
	while (m->slots[i].used)
		i = (i + 1) & (m->cap - 1);
	m->slots[i] = (struct cas_dmap_entry){*d, value, true};
	m->n++;
	return 1;
}

void cas_dmap_remove(struct cas_dmap *m, struct cas_dmap_entry *e)
{
	size_t mask = m->cap - 1, hole = (size_t)(e - m->slots);

	/* Backward shift: move up every later entry of the run whose home
	 * slot is not between the hole and it, so lookups never stop at the
	 * hole too early. */
	for (size_t j = (hole + 1) & mask; m->slots[j].used;
	     j = (j + 1) & mask) {
		size_t home = slot_of(&m->slots[j].digest, m->cap);
		if (((j - home) & mask) >= ((j - hole) & mask)) {
			m->slots[hole] = m->slots[j];
			hole = j;
		}
	}
	m->slots[hole] = (struct cas_dmap_entry){0};
	m->n--;
}

void cas_dmap_release(struct cas_dmap *m, void (*free_value)(void *))
{
	if (free_value)
		for (size_t i = 0; i < m->cap; i++)
			if (m->slots[i].used)
				free_value(m->slots[i].value);
	free(m->slots);
	*m = (struct cas_dmap){0};
}

void cas_dmap_clear(struct cas_dmap *m)
{
	if (m->slots)
		memset(m->slots, 0, m->cap * sizeof(*m->slots));
	m->n = 0;
}
