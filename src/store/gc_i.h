/* gc_i.h - what gc.c (mark and sweep) shares with gc_pack.c (packs).
 *
 * Contract: private to the two files; one gc runs at a time per store
 * (gc.run), in one thread.
 */
#ifndef CAS_STORE_GC_I_H
#define CAS_STORE_GC_I_H

#include "store/local_i.h"

/* A pack file as gc found it, and what the sweep kept of it. */
struct gc_pack {
	uint64_t id;
	int64_t mtime; /* its last append: the write time of its blobs */
	uint64_t size;
	uint64_t live_n, live_bytes, end; /* entries kept; end of the last */
	int fd;	    /* O_RDWR, flock'ed by gc: no live writer; else -1 */
	bool owned; /* a live writer appends to it: left alone */
};

struct gc_packs {
	struct gc_pack *v; /* sorted by id */
	size_t n, cap;
};

/* Calls fn(userdata, fd, name) for each entry of folder fd (not . or
 * ..) until it returns < 0; fd stays open. */
int cas_gc_each_entry(int fd, int (*fn)(void *, int, const char *),
		      void *userdata);

/* Lists packs/ with sizes and times. */
int cas_gc_packs_list(struct cas_local *ls, struct gc_packs *p);
struct gc_pack *cas_gc_pack_find(struct gc_packs *p, uint64_t id);
/* Takes each pack's flock where no writer holds it (under gc.lock, so no
 * writer creates a pack meanwhile); a dry run only tries. */
void cas_gc_packs_lock(struct gc_packs *p, int packs_fd, bool dry_run);
/* Removes the packs that hold nothing, rewrites those below the live
 * threshold into one new pack, truncates unindexed tails; counts into
 * st (a dry run only counts). */
int cas_gc_packs_collect(struct cas_local *ls, struct gc_packs *p, bool dry_run,
			 struct cas_gc_stats *st);
void cas_gc_packs_release(struct gc_packs *p);

#endif
