/* dmap.h - the digest-keyed hash table of every layer: digest -> pointer,
 * open addressing with linear probing (digests are uniformly distributed,
 * so their first bytes are the hash), grown at 3/4 full.
 *
 * Contract: not thread-safe (the owner's lock protects it); values are
 * the caller's (cas_dmap_release can free them). A zeroed struct is an
 * empty table.
 */
#ifndef CAS_CORE_DMAP_H
#define CAS_CORE_DMAP_H

#include <stdbool.h>
#include <stddef.h>

#include "core/digest.h"

struct cas_dmap_entry {
	cas_digest digest;
	void *value;
	bool used;
};
struct cas_dmap {
	struct cas_dmap_entry *slots;
	size_t cap, n;
};
/* 1 if added, 0 if the digest was there (value unchanged), -ENOMEM. */
int cas_dmap_put(struct cas_dmap *m, const cas_digest *d, void *value);
/* The entry, or NULL. */
struct cas_dmap_entry *cas_dmap_find(const struct cas_dmap *m,
				     const cas_digest *d);
/* Removes e (from cas_dmap_find; its value is the caller's). Other
 * entries may move: pointers to them are stale afterwards. */
void cas_dmap_remove(struct cas_dmap *m, struct cas_dmap_entry *e);
/* Frees the table; free_value (may be NULL) is called on each value. */
void cas_dmap_release(struct cas_dmap *m, void (*free_value)(void *));
/* Empties the table, keeping its room (values are not freed). */
void cas_dmap_clear(struct cas_dmap *m);

#endif
