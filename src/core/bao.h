/* bao.h - the BLAKE3 tree of a blob: outboards and verified ranges.
 *
 * A blob's BLAKE3 digest is the root of a binary tree over its 1 KiB
 * chunks. Cut the tree at groups of 2^CAS_BAO_GROUP_LOG chunks (16 KiB)
 * and keep the parent nodes above the groups: that is the blob's
 * outboard. With it, any range of whole groups can be checked against the
 * digest alone, whoever sent the bytes and the outboard.
 *
 * Layout (ours; docs/remote.md "Verified ranges"): the outboard is the
 * tree's parent nodes above the groups in post-order, each node 64 bytes
 * (the left child's chaining value, then the right's), nothing else: no
 * header (the size comes from the blob's Node) and no group bytes. A blob
 * of n groups has n - 1 nodes; a blob of one group (up to 16 KiB) has an
 * empty outboard. Post-order is the order in which a single pass over the
 * bytes finishes the nodes, so the encoder appends and never seeks.
 *
 * A range proof is the subset of the outboard that one range needs: the
 * nodes whose subtree meets the range, in pre-order (root first), so a
 * verifier checks each node against its parent's value before it trusts
 * it. Ranges start at a group boundary and end at one or at the blob's
 * end.
 *
 * Contract: plain functions over caller buffers, thread-safe, no global
 * state. The encoder is one object per stream, used by one thread at a
 * time. Every function that reads an outboard, a proof or a range checks
 * its lengths first: those bytes come from peers and disks, and a bad
 * one is -EBADMSG, never a crash. Sizes that overflow are -EINVAL.
 */
#ifndef CAS_CORE_BAO_H
#define CAS_CORE_BAO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/digest.h"

#define CAS_BAO_CHUNK_SIZE 1024u
#define CAS_BAO_GROUP_LOG  4u /* 2^4 chunks per group */
#define CAS_BAO_GROUP_SIZE (CAS_BAO_CHUNK_SIZE << CAS_BAO_GROUP_LOG)
#define CAS_BAO_NODE_SIZE  64u
/* Blobs larger than this keep an outboard beside them (1 MiB: the size
 * above which import and the remote cache already treat a blob as
 * large; smaller ones travel whole in one request). */
#define CAS_BAO_THRESHOLD (1u << 20)

/* Groups of a blob of this size: at least one (the empty blob too). */
uint64_t cas_bao_groups(uint64_t size);
/* Bytes of the outboard of a blob of this size: (groups - 1) * 64. */
uint64_t cas_bao_outboard_size(uint64_t size);
static inline bool cas_bao_wants_outboard(uint64_t size)
{
	return size > CAS_BAO_THRESHOLD;
}

/* Single pass: the digest and the outboard of a stream of bytes, at the
 * speed of plain hashing (blake3_hash_many over whole groups). The emit
 * callback receives the outboard's bytes in order, in pieces of whole
 * nodes; a negative return stops the stream and is returned by the next
 * update or final. emit may be NULL (digest only). */
typedef int (*cas_bao_emit_fn)(void *ctx, const uint8_t *bytes, size_t len);
typedef struct cas_bao_encoder cas_bao_encoder;

/* -ENOMEM or 0. */
int cas_bao_encoder_new(cas_bao_emit_fn emit, void *ctx, cas_bao_encoder **ret);
void cas_bao_encoder_free(cas_bao_encoder *e);
int cas_bao_encoder_update(cas_bao_encoder *e, const void *buf, size_t len);
/* Emits the last nodes and gives the digest (the same as b3sum's). The
 * encoder is spent afterwards; free it. */
int cas_bao_encoder_final(cas_bao_encoder *e, cas_digest *ret_digest);

/* The digest and outboard of one buffer; ret_outboard has room for
 * cas_bao_outboard_size(len) bytes (or is NULL). */
int cas_bao_hash_buffer(const void *buf, size_t len, cas_digest *ret_digest,
			uint8_t *ret_outboard);
/* The same for a whole file read with pread from offset 0 to EOF. The
 * outboard is malloc'ed (NULL when empty) and owned by the caller. */
int cas_bao_hash_fd(int fd, cas_digest *ret_digest, uint64_t *ret_size,
		    uint8_t **ret_outboard, size_t *ret_outboard_len);

/* Checks a whole outboard against the digest of a blob of this size:
 * -EBADMSG when its length is wrong or any node disagrees (groups - 2
 * compressions). After this, its group values can be trusted. */
int cas_bao_outboard_verify(const cas_digest *digest, uint64_t size,
			    const uint8_t *outboard, size_t outboard_len);
/* Checks the bytes of groups [first, first + n) (data_len must be those
 * groups' exact length) against an outboard already verified (or one the
 * store wrote itself). For a blob of one group the outboard is empty and
 * the digest is needed instead: pass it in digest (else it may be NULL).
 * -EBADMSG names the first group that fails in *ret_bad_group. */
int cas_bao_verify_groups(const cas_digest *digest, uint64_t size,
			  const uint8_t *outboard, size_t outboard_len,
			  uint64_t first, const uint8_t *data, size_t data_len,
			  uint64_t *ret_bad_group);

/* Range proofs. A range [off, off + len) is valid when len > 0 (or the
 * blob is empty and off = len = 0), off is a multiple of the group size
 * and off + len is one too or the blob's end; anything else is -EINVAL. */
int cas_bao_proof_size(uint64_t size, uint64_t off, uint64_t len,
		       size_t *ret_len);
/* Copies the proof of the range out of an outboard (trusted or not: the
 * proof is verified on its own). ret_proof has cas_bao_proof_size bytes. */
int cas_bao_proof_extract(uint64_t size, const uint8_t *outboard,
			  size_t outboard_len, uint64_t off, uint64_t len,
			  uint8_t *ret_proof);
/* Verifies a range's bytes with its proof against the digest alone.
 * 0, -EINVAL for a range that is not one, -EBADMSG when the proof has
 * the wrong length or any node or group disagrees; then *ret_bad_group
 * (may be NULL) is the first group whose bytes cannot be trusted. */
int cas_bao_proof_verify(const cas_digest *digest, uint64_t size, uint64_t off,
			 uint64_t len, const uint8_t *proof, size_t proof_len,
			 const uint8_t *data, uint64_t *ret_bad_group);

#endif
