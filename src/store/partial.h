/* partial.h - large blobs held in part: the local store's write path for
 * a blob that arrives range by range (a remote cache's large blobs).
 *
 * A partial blob of `size` bytes is three things in the store:
 *   DIR/outboards/ab/<hex>   its outboard (core/bao.h), verified against
 *                            the digest before anything else is written
 *   DIR/partial/<hex>        a sparse file of `size` bytes holding the
 *                            groups (16 KiB, CAS_BAO_GROUP_SIZE) present
 *   DIR/partial/<hex>.ranges its range record: which groups are present
 *                            (cas_partial_record_*, below)
 * A group is written only after the caller verified its bytes against
 * the outboard (cas_bao_verify_groups); a group that fails is never
 * written. The record says a group is present only once its bytes are
 * durable: records are written after an fdatasync of the data file, so
 * a crash loses groups at most, never makes one lie. When every group is
 * present the file is made durable and renamed to blobs/ab/<hex> (never
 * over an existing name): the partial blob has become an ordinary blob.
 *
 * Readers read the data file (cas_partial_fd) only at groups that
 * cas_partial_has says are present; the fd stays valid (and its bytes
 * right) after completion, since the rename keeps the inode.
 *
 * Threads: a cas_partial has its own lock; any thread may call any
 * function, and several processes may hold the same partial blob (each
 * writes verified bytes, which are the same bytes; each record write
 * holds what that process knows, so one may drop another's groups -
 * losing work, never lying). Ownership: the opener frees it.
 */
#ifndef CAS_STORE_PARTIAL_H
#define CAS_STORE_PARTIAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

struct cas_partial;

/* Opens the partial blob d of `size` bytes in the local store s,
 * creating it if absent. outboard (outboard_len bytes; NULL: the one the
 * store keeps beside d) is checked against d and size first: -EBADMSG
 * when it disagrees, -ENOENT when NULL and the store has none. When the
 * store already holds the whole blob, *ret is complete from the start.
 * -EINVAL for a store that is not local, -EROFS for a read-only one. */
int cas_partial_open(cas_store *s, const cas_digest *d, uint64_t size,
		     const uint8_t *outboard, size_t outboard_len,
		     struct cas_partial **ret);
/* Writes the record (after a sync) and frees. */
void cas_partial_close(struct cas_partial *p);

/* The verified outboard (borrowed, valid as long as p), and the size. */
const uint8_t *cas_partial_outboard(const struct cas_partial *p,
				    size_t *ret_len);
uint64_t cas_partial_size(const struct cas_partial *p);
/* An O_RDONLY fd of the bytes (the caller's to close). */
int cas_partial_open_fd(struct cas_partial *p, int *ret_fd);

/* True when groups [first, first + n) are all present. */
bool cas_partial_has(struct cas_partial *p, uint64_t first, uint64_t n);
/* The number of groups present. */
uint64_t cas_partial_count(struct cas_partial *p);
/* True once the blob is whole (and named in blobs/, or being named). */
bool cas_partial_complete(struct cas_partial *p);

/* Writes the bytes of groups [first, first + n), data_len being those
 * groups' exact length, which the caller has verified against the
 * outboard: readable at once. 1 when a sync is due (the blob is whole,
 * or 256 MiB were written since the last record): the caller then calls
 * cas_partial_sync, from a thread that may wait for the disk (a
 * reader should not); else 0. */
int cas_partial_write(struct cas_partial *p, uint64_t first,
		      const uint8_t *data, size_t data_len);
/* Makes what was written durable (fdatasync), then names the blob when
 * it is whole (1), else writes the record (0). */
int cas_partial_sync(struct cas_partial *p);

/* The range record: "CASPART1", the digest (32 bytes), the size (8
 * bytes, little-endian), then one bit per group (bit g % 8 of byte
 * g / 8; bits past the last group zero). A record that does not decode
 * is -EBADMSG (then the partial blob starts again empty). */
#define CAS_PARTIAL_MAGIC      "CASPART1"
#define CAS_PARTIAL_HEADER_LEN (8 + 32 + 8)
/* Bytes of the record of a blob of this size (0 on overflow). */
size_t cas_partial_record_len(uint64_t size);
/* Decodes a record: its digest and size, and its bitmap (borrowed, in
 * buf, cas_partial_record_len(size) - header bytes). */
int cas_partial_record_decode(const uint8_t *buf, size_t len,
			      cas_digest *ret_digest, uint64_t *ret_size,
			      const uint8_t **ret_bits);

#endif
