/* backing_table_i.h - the engine's tables of passthrough backing ids
 * (private to src/fuse; engine.c holds them under the session's
 * backing_lock).
 *
 * The kernel lets all open files of one inode share one backing file and
 * refuses (EBUSY) an open whose backing id names a different one while
 * another is open. So one id per node id is kept while any open of that
 * node used it, counted per open; the last RELEASE closes it. Opens are
 * keyed by (node id, fh) with a count, since a filesystem may hand out
 * equal fh values. The kernel holds its own reference to the backing file
 * from the open reply on, so closing our id never cuts an open file off.
 *
 * Contract: a table of entries keyed by two 64-bit values; not
 * thread-safe (the caller's lock); insert returns NULL when out of
 * memory; remove frees the entry.
 */
#ifndef CAS_FUSE_BACKING_TABLE_I_H
#define CAS_FUSE_BACKING_TABLE_I_H

#include <stddef.h>
#include <stdint.h>

struct pt_entry {
	uint64_t k1, k2;
	int32_t id;
	uint32_t refs;
	struct pt_entry *next;
};

struct pt_table {
	struct pt_entry **buckets;
	size_t nbuckets, n;
};

struct pt_entry *cas_pt_find(struct pt_table *t, uint64_t k1, uint64_t k2);
struct pt_entry *cas_pt_insert(struct pt_table *t, uint64_t k1, uint64_t k2);
void cas_pt_remove(struct pt_table *t, struct pt_entry *victim);
void cas_pt_clear(struct pt_table *t);

#endif
