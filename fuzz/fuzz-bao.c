/* Fuzz target: the outboard and range-proof verifiers of core/bao (bytes
 * from remote peers and from disks), two ways at once.
 *
 * Untrusted: the input names a blob size, a range, a digest, a proof and
 * the range's bytes; the verifiers must answer 0, -EINVAL or -EBADMSG and
 * never read out of bounds. The same bytes go through the whole-outboard
 * check and the group check too.
 *
 * Round trip: the input's tail is taken as a blob; its own outboard and
 * the proof of a range must verify, and one flipped byte (of the range's
 * bytes or of the proof, where the input says) must fail exactly there.
 * Those aborts test our code, not the peer.
 *
 * Layout: size u32 | first group u16 | groups u16 | flip u32 | digest 32
 *         | proof length u16 | proof | data (the rest, zero-padded). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/bao.h"
#include "core/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                    \
	do {                                                               \
		if (!(cond)) {                                             \
			fprintf(stderr, "fuzz-bao: %s:%d: %s\n", __FILE__, \
				__LINE__, #cond);                          \
			abort();                                           \
		}                                                          \
	} while (0)

#define GS CAS_BAO_GROUP_SIZE
/* Blobs of up to 80 groups: every shape of the first levels, cheaply. */
#define MAX_BLOB (80u * GS)

struct cursor {
	const uint8_t *p, *end;
};

static uint64_t take(struct cursor *c, unsigned bytes)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < bytes && c->p < c->end; i++)
		v |= (uint64_t)*c->p++ << (8 * i);
	return v;
}

static void untrusted(uint64_t blob, uint64_t first, uint64_t n,
		      const uint8_t *digest_bytes, const uint8_t *proof,
		      size_t proof_len, const uint8_t *rest, size_t rest_len)
{
	cas_digest d;
	memset(d.bytes, 0, sizeof(d.bytes));
	memcpy(d.bytes, digest_bytes, CAS_DIGEST_LEN);
	uint64_t off = first * GS;
	uint64_t len = off < blob ? CAS_MIN(n * GS, blob - off) : n * GS;
	uint8_t *range = calloc(1, (size_t)len + 1);
	INVARIANT(range);
	memcpy(range, rest, (size_t)CAS_MIN(len, (uint64_t)rest_len));
	uint64_t bad = UINT64_MAX;
	int r = cas_bao_proof_verify(&d, blob, off, len, proof, proof_len,
				     range, &bad);
	INVARIANT(r == 0 || r == -EINVAL || r == -EBADMSG);
	/* The empty blob's one group holds no bytes: n may be 0 there. */
	if (r == -EBADMSG)
		INVARIANT(bad >= first && bad < first + CAS_MAX(n, 1));
	r = cas_bao_outboard_verify(&d, blob, proof, proof_len);
	INVARIANT(r == 0 || r == -EBADMSG);
	r = cas_bao_verify_groups(&d, blob, proof, proof_len, first, range,
				  (size_t)len, &bad);
	INVARIANT(r == 0 || r == -EINVAL || r == -EBADMSG);
	size_t plen;
	if (cas_bao_proof_size(blob, off, len, &plen) == 0) {
		uint8_t *out = malloc(plen + 1);
		INVARIANT(out);
		r = cas_bao_proof_extract(blob, proof, proof_len, off, len,
					  out);
		INVARIANT(r == 0 || r == -EBADMSG);
		free(out);
	}
	free(range);
}

static void round_trip(const uint8_t *blob, size_t size, uint64_t first,
		       uint64_t n, uint64_t flip)
{
	uint64_t groups = cas_bao_groups(size);
	first %= groups;
	n = 1 + n % (groups - first);
	uint64_t off = first * GS, len = CAS_MIN(n * GS, size - off);
	if (size == 0)
		off = len = 0;

	size_t ob_len = (size_t)cas_bao_outboard_size(size);
	uint8_t *ob = malloc(ob_len + 1);
	INVARIANT(ob);
	cas_digest d;
	INVARIANT(cas_bao_hash_buffer(blob, size, &d, ob) == 0);
	INVARIANT(cas_bao_outboard_verify(&d, size, ob, ob_len) == 0);
	size_t plen;
	INVARIANT(cas_bao_proof_size(size, off, len, &plen) == 0);
	uint8_t *proof = malloc(plen + 1);
	INVARIANT(proof);
	INVARIANT(cas_bao_proof_extract(size, ob, ob_len, off, len, proof) ==
		  0);
	uint64_t bad = UINT64_MAX;
	const uint8_t *range = blob + off;
	INVARIANT(cas_bao_proof_verify(&d, size, off, len, proof, plen, range,
				       &bad) == 0);
	INVARIANT(cas_bao_verify_groups(&d, size, ob, ob_len, first, range,
					(size_t)len, &bad) == 0);

	/* One flipped byte: of the range (its group must be named) or of
	 * the proof (some group of the range must be). */
	uint64_t where = flip % (len + plen + 1);
	if (where < len) {
		uint8_t *copy = malloc((size_t)len);
		INVARIANT(copy);
		memcpy(copy, range, (size_t)len);
		copy[where] ^= 0x01;
		INVARIANT(cas_bao_proof_verify(&d, size, off, len, proof, plen,
					       copy, &bad) == -EBADMSG);
		INVARIANT(bad == first + where / GS);
		INVARIANT(cas_bao_verify_groups(&d, size, ob, ob_len, first,
						copy, (size_t)len,
						&bad) == -EBADMSG);
		INVARIANT(bad == first + where / GS);
		free(copy);
	} else if (where < len + plen) {
		proof[where - len] ^= 0x01;
		INVARIANT(cas_bao_proof_verify(&d, size, off, len, proof, plen,
					       range, &bad) == -EBADMSG);
		INVARIANT(bad >= first && bad < first + n);
	}
	free(proof);
	free(ob);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct cursor c = {data, data + size};
	uint64_t blob = take(&c, 4) % (MAX_BLOB + 1);
	uint64_t first = take(&c, 2), n = take(&c, 2) % 128, flip = take(&c, 4);
	uint8_t digest[CAS_DIGEST_LEN] = {0};
	for (unsigned i = 0; i < CAS_DIGEST_LEN; i++)
		digest[i] = (uint8_t)take(&c, 1);
	size_t proof_len = (size_t)take(&c, 2);
	proof_len = CAS_MIN(proof_len, (size_t)(c.end - c.p));
	const uint8_t *proof = c.p;
	c.p += proof_len;
	size_t rest = (size_t)(c.end - c.p);

	untrusted(blob, first, n, digest, proof, proof_len, c.p, rest);
	/* The round trip on the tail as a blob, which libFuzzer grows. */
	round_trip(proof, proof_len + rest, first, n, flip);
	return 0;
}
