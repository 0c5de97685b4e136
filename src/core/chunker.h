/* chunker.h - chunk lists: a large blob described as a list of smaller
 * blobs (digest, size), the form snix's Stat `send_chunks` answers with.
 *
 * Cut points are content-defined (FastCDC: a gear hash over the bytes,
 * a harder condition before the average size than after it), 256 KiB on
 * average, never under 64 KiB nor over 1 MiB, as snix's object store
 * cuts them. docs/remote.md "Chunk lists" gives the choice and its
 * measured dedup against chunks aligned to outboard groups (which the
 * same chunker cuts with min = avg = max).
 *
 * The stored and transmitted form of a list is canonical protobuf,
 *     message ChunkList { repeated ChunkMeta chunks = 1; }
 *     message ChunkMeta { bytes digest = 1; uint64 size = 2; }
 * whose ChunkMeta is byte for byte the one of snix's StatBlobResponse
 * (field 2 there) and BlobMeta: a server re-frames the entries without
 * decoding them.
 *
 * Contract: no global state, thread-safe; a cas_chunker is one object per
 * stream, used by one thread at a time. Decoding reads untrusted bytes:
 * -EBADMSG with a static reason in *ret_why, never a crash. Lists from
 * these functions are malloc'ed and owned by the caller.
 */
#ifndef CAS_CORE_CHUNKER_H
#define CAS_CORE_CHUNKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/digest.h"

#define CAS_CHUNK_MIN (64u << 10)
#define CAS_CHUNK_AVG (256u << 10)
#define CAS_CHUNK_MAX (1u << 20)

typedef struct cas_chunk {
	cas_digest digest;
	uint64_t size;
} cas_chunk;

typedef struct cas_chunker {
	uint64_t gear[256];
	uint64_t mask_small, mask_large; /* before avg, from avg on */
	uint64_t min, avg, max;
	uint64_t pos; /* bytes of the current chunk seen */
	uint64_t hash;
} cas_chunker;

/* Sizes must satisfy 1 <= min <= avg <= max, avg a power of two; the
 * defaults are CAS_CHUNK_MIN/AVG/MAX. min = avg = max cuts fixed chunks.
 * -EINVAL otherwise. */
int cas_chunker_init(cas_chunker *c, uint64_t min, uint64_t avg, uint64_t max);
/* How many of the len bytes at buf belong to the current chunk. *ret_cut
 * says whether the chunk ends there (then the next call starts the next
 * chunk); when it is false, all len bytes were taken. The last chunk of
 * a stream ends with the stream, whatever *ret_cut said. */
size_t cas_chunker_next(cas_chunker *c, const uint8_t *buf, size_t len,
			bool *ret_cut);

/* The chunk list of a whole file (pread from offset 0 to EOF), with the
 * given chunker parameters. A file of n bytes gives chunks whose sizes
 * add up to n; the empty file gives an empty list. */
int cas_chunklist_from_fd(int fd, uint64_t min, uint64_t avg, uint64_t max,
			  cas_chunk **ret_chunks, size_t *ret_n);

/* Canonical encoding of a list (see above). Every size must be > 0. */
int cas_chunklist_encode(const cas_chunk *chunks, size_t n, uint8_t **ret,
			 size_t *ret_len);
/* Decodes exactly the canonical encoding: digests of 32 bytes, sizes
 * above 0, no unknown fields, nothing left over. When blob_size is not
 * UINT64_MAX the sizes must add up to it. */
int cas_chunklist_decode(const uint8_t *buf, size_t len, uint64_t blob_size,
			 cas_chunk **ret_chunks, size_t *ret_n,
			 const char **ret_why);

#endif
