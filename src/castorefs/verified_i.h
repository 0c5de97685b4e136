/* verified_i.h - the mount's check of the bytes it serves (private to
 * src/castorefs; docs/filesystem.md, "Verified reads").
 *
 * A store keeps blobs under their digest but does not re-hash what it
 * hands out; disks flip bits. The mount serves no byte of a blob before
 * the blob has hashed right in this mount:
 * - a blob the mount holds in memory or serves from inside a pack (at
 *   most CAS_LOCAL_PACK_MAX bytes) is hashed on its handle's first READ,
 *   so an open that the page cache answers costs nothing;
 * - a larger blob, which the kernel may read through passthrough without
 *   asking us, is hashed whole at its first open in the mount and then
 *   remembered by digest (cas_verified_large), unless the mount was told
 *   to trust large blobs;
 * - but where every READ reaches us (no passthrough: virtio-fs,
 *   --no-passthrough) a blob with an outboard (over 1 MiB) is checked by
 *   range instead: each READ's 16 KiB groups against the outboard, the
 *   first time the open reads them (struct cas_range_check), so a reader
 *   of its first bytes waits for those alone.
 *
 * Contract: thread-safe; no I/O under the lock (two first opens of one
 * large blob may both hash it, and both agree).
 */
#ifndef CAS_CASTOREFS_VERIFIED_I_H
#define CAS_CASTOREFS_VERIFIED_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/digest.h"
#include "core/dmap.h"
#include "store/store.h"

/* 0 if buf (when not NULL) or bytes [off, off + len) of fd hash to d;
 * -EBADMSG if they do not (or fd ends first); -errno if fd fails. */
int cas_verify_bytes(const cas_digest *d, const uint8_t *buf, int fd,
		     uint64_t off, uint64_t len);

/* The large blobs that hashed right in this mount. */
struct cas_verified {
	pthread_mutex_t lock;
	struct cas_dmap large; /* protected by lock; values unused */
	atomic_size_t *memory; /* the mount's heap count */
	size_t counted;	       /* bytes of `large` counted in memory */
};

void cas_verified_init(struct cas_verified *v, atomic_size_t *memory);
void cas_verified_release(struct cas_verified *v);

/* Blob d, `size` bytes from offset 0 of fd: 0 if it hashed right in this
 * mount before, or does now (it is then remembered); else as
 * cas_verify_bytes. */
int cas_verified_large(struct cas_verified *v, const cas_digest *d, int fd,
		       uint64_t size);

/* The groups of one open of a large blob checked so far, and the blob's
 * outboard, verified against its digest at open. */
struct cas_range_check;

/* -ENOENT when the store keeps no outboard for d (or a wrong one): check
 * the blob whole instead. */
int cas_range_check_open(cas_store *s, const cas_digest *d, uint64_t size,
			 struct cas_range_check **ret);
/* 0 once bytes [off, off + len) of the blob (at offset 0 of fd) are
 * checked: those not yet are read and verified now. -EBADMSG when a
 * group does not match, -errno when fd fails. Lock-free; concurrent
 * callers may check a group twice. */
int cas_range_check(struct cas_range_check *rc, int fd, uint64_t off,
		    uint64_t len);
void cas_range_check_free(struct cas_range_check *rc);

#endif
