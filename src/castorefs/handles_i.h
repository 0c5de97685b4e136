/* handles_i.h - castorefs's open-file handles (private to src/castorefs).
 *
 * A handle is what an OPEN (or OPENDIR, or a READ without a handle)
 * hands the kernel as its fh: the blob's fd or bytes, or a snapshot of
 * the roots. Slots live in chunks that are never freed or moved, so READ
 * finds its slot from the fh without a lock: a slot's `fh` says which
 * open it serves now (generation << 32 | index); 0 means free. A handle
 * is reference counted: one for the open, one per READ whose reply still
 * uses it, so a RELEASE that races a READ on another queue never closes
 * an fd under it.
 *
 * Contract: thread-safe. cas_handle_new gives a claimed slot that nobody
 * can find until cas_handle_publish; an fh from a request may be any
 * value (a guest's), and functions taking one return NULL or -EBADF for
 * anything that is not a current open.
 */
#ifndef CAS_CASTOREFS_HANDLES_I_H
#define CAS_CASTOREFS_HANDLES_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/digest.h"
#include "core/directory.h"
#include "castorefs/verified_i.h"

#define HANDLE_CHUNK_BITS 10
#define HANDLE_CHUNK	  (1u << HANDLE_CHUNK_BITS)
#define HANDLE_MAX_CHUNKS 4096

struct root_list {
	size_t n;
	cas_node *nodes[];
};

struct cas_handle {
	_Atomic uint64_t fh;
	/* One reference for the open, one per READ whose reply still uses the
	 * fd: the kernel sends RELEASE only after the last READ's reply, but a
	 * guest may send RELEASE on one queue while a READ of the same handle
	 * is being copied on another. The fd is closed at zero, never under
	 * a READ. Taken only from a non-zero count (cas_handle_hold), so a stale
	 * hold on a recycled slot is undone before it can matter. */
	_Atomic uint32_t refs;
	/* Atomic because READ reads them without a lock. */
	_Atomic int fd;	       /* file: the blob, or a file holding it */
	_Atomic uint64_t size; /* file: the blob's size */
	uint64_t base;	       /* where the blob starts in fd */
	bool fd_owned;	       /* else the store's (a pack): not closed */
	uint8_t *data;	       /* small file: its bytes instead of fd */
	uint64_t ino;	       /* file: whose content, set before publish */
	/* A large remote blob held in part (store.h blob_open_ranged):
	 * each READ first asks the store for its range. Fixed at open. */
	bool ranged;
	/* Data or a pack range: 0 until the first READ hashes it, then 1
	 * (right) or -1 (wrong: every READ fails). verified_i.h */
	_Atomic int checked;
	/* A large blob checked by range as READs come (verified_i.h);
	 * NULL when checked whole at open, or not at all. Fixed at open. */
	struct cas_range_check *rc;
	cas_digest digest;
	struct root_list *roots; /* root directory: snapshot at opendir */
	uint32_t idx;		 /* this slot's index, fixed */
	uint32_t next_free;	 /* protected by the table's lock */
};

struct cas_handle_table {
	pthread_mutex_t lock;
	_Atomic(struct cas_handle *) chunks[HANDLE_MAX_CHUNKS];
	uint32_t n_slots;      /* protected by lock */
	uint32_t free_head;    /* protected by lock; UINT32_MAX: none */
	uint32_t gen;	       /* protected by lock */
	atomic_size_t *memory; /* the mount's heap count */
};

void cas_handle_table_init(struct cas_handle_table *t, atomic_size_t *memory);
/* Frees every handle still open, then the slots. */
void cas_handle_table_release(struct cas_handle_table *t);

/* The slot of index idx (an fh's low 32 bits), or NULL. */
struct cas_handle *cas_handle_slot(struct cas_handle_table *t, uint32_t idx);
/* A free slot, claimed and reset, in *ret: returns its generation (for
 * cas_handle_publish) or -ENFILE/-ENOMEM. */
int cas_handle_new(struct cas_handle_table *t, struct cas_handle **ret);
/* Makes h findable by the fh returned. */
uint64_t cas_handle_publish(struct cas_handle *h, uint32_t gen);
/* The handle that fh names now, or NULL (not held: for opendir's own
 * use of a root snapshot, under the kernel's ordering). */
struct cas_handle *cas_handle_find(struct cas_handle_table *t, uint64_t fh);
/* A READ's hold on handle fh, or NULL if fh is not a current open. */
struct cas_handle *cas_handle_hold(struct cas_handle_table *t, uint64_t fh);
/* Drops a reference; the last one frees the handle (closes its fd). */
void cas_handle_unref(struct cas_handle_table *t, struct cas_handle *h);
/* Removes the handle fh if it is current; -EBADF otherwise. */
int cas_handle_release(struct cas_handle_table *t, uint64_t fh);

#endif
