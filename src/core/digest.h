/* digest.h - BLAKE3-256 digests: the names of blobs and Directories.
 *
 * Contract: plain values, no allocation, thread-safe. Shown to people as
 * 64 lowercase hex characters, like b3sum. Hashing uses the official
 * BLAKE3 C implementation with its SIMD dispatch; feed whole files in large
 * pieces (hashing 4 KiB pieces independently halves the rate).
 */
#ifndef CAS_CORE_DIGEST_H
#define CAS_CORE_DIGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <blake3.h>

#define CAS_DIGEST_LEN	   32
#define CAS_DIGEST_HEX_LEN 64

typedef struct cas_digest {
	uint8_t bytes[CAS_DIGEST_LEN];
} cas_digest;

/* Digest of the empty Directory (zero bytes): af1349b9...41f3262. */
extern const cas_digest CAS_DIGEST_EMPTY_DIRECTORY;

static inline bool cas_digest_eq(const cas_digest *a, const cas_digest *b)
{
	return memcmp(a->bytes, b->bytes, CAS_DIGEST_LEN) == 0;
}

/* Writes 64 hex characters and a NUL into ret_hex. */
void cas_digest_to_hex(const cas_digest *d,
		       char ret_hex[CAS_DIGEST_HEX_LEN + 1]);
/* Parses exactly 64 hex characters (either case) followed by NUL.
 * -EINVAL for anything else. */
int cas_digest_from_hex(const char *hex, cas_digest *ret);
/* Same for a counted string that need not be NUL-terminated. */
int cas_digest_from_hexn(const char *hex, size_t len, cas_digest *ret);

typedef struct cas_hasher {
	blake3_hasher b3;
} cas_hasher;

void cas_hasher_init(cas_hasher *h);
void cas_hasher_update(cas_hasher *h, const void *buf, size_t len);
void cas_hasher_final(const cas_hasher *h, cas_digest *ret);

/* BLAKE3-256 of one buffer. */
void cas_hash_buffer(const void *buf, size_t len, cas_digest *ret);

/* Hashes a whole file from its current contents with pread (offset 0 to
 * EOF), in large reads. Sets *ret_size to the number of bytes hashed. */
int cas_hash_fd(int fd, cas_digest *ret, uint64_t *ret_size);
/* Hashes bytes [off, off + len) of fd (a blob inside a pack, say);
 * -EBADMSG if the file ends before them. */
int cas_hash_fd_range(int fd, uint64_t off, uint64_t len, cas_digest *ret);

/* Copies size bytes from src (pread from offset 0) to dst (write at its
 * position) and hashes what it wrote, so a reader that emits a blob can
 * check it without reading it twice. -EBADMSG if src is shorter than
 * size; the caller compares *ret with the digest it expected. */
int cas_copy_fd_hashed(int src, int dst, uint64_t size, cas_digest *ret);

#endif
