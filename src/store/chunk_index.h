/* chunk_index.h - the chunk lists of a store's large blobs, and the way
 * back from a chunk to the blob that holds it: what a server needs to
 * answer snix's Stat `send_chunks`, GetBlob, and a Read or GetChunk of a
 * chunk's digest (docs/remote.md "Chunks").
 *
 * A blob over CAS_BAO_THRESHOLD (1 MiB) is described by its FastCDC
 * chunk list (core/chunker.h); a smaller one by none (the blob is its own
 * one chunk). Lists are computed lazily from the blob's bytes on the
 * first question about that blob, or taken from a PutBlob that assembled
 * the blob from its chunks, and kept in memory for the life of the index
 * (one pass of the chunker per blob and process). Each chunk of a list
 * is entered as (blob, offset, size); a chunk found in several blobs
 * keeps the first. Nothing is written to the store.
 *
 * Contract: thread-safe (one lock; a list being computed holds it, so two
 * threads never chunk one blob twice). Lists returned are copies,
 * malloc'd, the caller's.
 */
#ifndef CAS_STORE_CHUNK_INDEX_H
#define CAS_STORE_CHUNK_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "core/chunker.h"
#include "store/store.h"

typedef struct cas_chunk_index cas_chunk_index;

/* An index over store s (which must outlive it). */
int cas_chunk_index_new(cas_store *s, cas_chunk_index **ret);
void cas_chunk_index_free(cas_chunk_index *x);

/* The chunk list of blob d: *ret_n = 0 (and *ret NULL) for a blob of at
 * most CAS_BAO_THRESHOLD bytes. -ENOENT when the store lacks the blob. */
int cas_chunk_index_list(cas_chunk_index *x, const cas_digest *d,
			 cas_chunk **ret, size_t *ret_n, uint64_t *ret_size);
/* Records the list of blob d, which the caller assembled from exactly
 * these chunks (so each chunk's bytes are at its offset). */
int cas_chunk_index_add(cas_chunk_index *x, const cas_digest *d,
			const cas_chunk *chunks, size_t n);
/* Where chunk d lies: the blob, the offset in it and the chunk's size.
 * -ENOENT when no list known to the index has it. */
int cas_chunk_index_find(cas_chunk_index *x, const cas_digest *d,
			 cas_digest *ret_blob, uint64_t *ret_off,
			 uint64_t *ret_size);

#endif
