/* backing_table.c - tables of passthrough backing ids (backing_table_i.h),
 * out of engine.c. */
#include <stdlib.h>

#include "fuse/backing_table_i.h"

static size_t pt_hash(const struct pt_table *t, uint64_t k1, uint64_t k2)
{
	uint64_t h = k1 * 0x9e3779b97f4a7c15ULL ^ (k2 + 0x632be59bd9b4e019ULL);
	h ^= h >> 29;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 32;
	return (size_t)(h & (t->nbuckets - 1));
}

struct pt_entry *cas_pt_find(struct pt_table *t, uint64_t k1, uint64_t k2)
{
	if (t->nbuckets == 0)
		return NULL;
	for (struct pt_entry *e = t->buckets[pt_hash(t, k1, k2)]; e;
	     e = e->next)
		if (e->k1 == k1 && e->k2 == k2)
			return e;
	return NULL;
}

struct pt_entry *cas_pt_insert(struct pt_table *t, uint64_t k1, uint64_t k2)
{
	if (t->n >= t->nbuckets) {
		size_t nb = t->nbuckets ? t->nbuckets * 2 : 64;
		struct pt_entry **b = calloc(nb, sizeof(*b));
		if (!b)
			return NULL;
		struct pt_table nt = {.buckets = b, .nbuckets = nb, .n = t->n};
		for (size_t i = 0; i < t->nbuckets; i++) {
			struct pt_entry *e = t->buckets[i];
			while (e) {
				struct pt_entry *next = e->next;
				size_t h = pt_hash(&nt, e->k1, e->k2);
				e->next = b[h];
				b[h] = e;
				e = next;
			}
		}
		free(t->buckets);
		*t = nt;
	}
	struct pt_entry *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->k1 = k1;
	e->k2 = k2;
	size_t h = pt_hash(t, k1, k2);
	e->next = t->buckets[h];
	t->buckets[h] = e;
	t->n++;
	return e;
}

void cas_pt_remove(struct pt_table *t, struct pt_entry *victim)
{
	struct pt_entry **pp = &t->buckets[pt_hash(t, victim->k1, victim->k2)];
	for (; *pp; pp = &(*pp)->next) {
		if (*pp == victim) {
			*pp = victim->next;
			free(victim);
			t->n--;
			return;
		}
	}
}

void cas_pt_clear(struct pt_table *t)
{
	for (size_t i = 0; i < t->nbuckets; i++) {
		struct pt_entry *e = t->buckets[i];
		while (e) {
			struct pt_entry *next = e->next;
			free(e);
			e = next;
		}
	}
	free(t->buckets);
	*t = (struct pt_table){0};
}
