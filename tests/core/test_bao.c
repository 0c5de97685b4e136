/* Unit tests of core/bao: digests against the BLAKE3 library's own hasher
 * at every size that matters (empty, around a chunk, around every group
 * boundary of the first tree levels), fed whole and in odd pieces; the
 * outboard, group checks and range proofs; and that a flipped byte of the
 * data, the outboard or a proof fails exactly the groups it touches.
 * b3sum and a second implementation of the tree in Python check the same
 * from outside (tests/integration/test_bao.py). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/bao.h"
#include "core/digest.h"
#include "core/util.h"

#define GS CAS_BAO_GROUP_SIZE

struct buf {
	uint8_t *bytes;
	size_t len;
};

static int collect(void *ctx, const uint8_t *bytes, size_t len)
{
	struct buf *b = ctx;
	CHECK(len % CAS_BAO_NODE_SIZE == 0);
	b->bytes = realloc(b->bytes, b->len + len);
	REQUIRE(b->bytes);
	memcpy(b->bytes + b->len, bytes, len);
	b->len += len;
	return 0;
}

/* Digest and outboard of data fed in pieces of `step` bytes. */
static void encode_in_steps(const uint8_t *data, size_t len, size_t step,
			    cas_digest *ret, struct buf *ob)
{
	cas_bao_encoder *e;
	REQUIRE(cas_bao_encoder_new(collect, ob, &e) == 0);
	for (size_t off = 0; off < len; off += step)
		CHECK(cas_bao_encoder_update(e, data + off,
					     CAS_MIN(step, len - off)) == 0);
	CHECK(cas_bao_encoder_update(e, data, 0) == 0);
	CHECK(cas_bao_encoder_final(e, ret) == 0);
	cas_bao_encoder_free(e);
}

/* Range proofs of single groups and of a few longer ranges all verify;
 * with a flipped data byte in group bad, exactly the ranges holding it
 * fail, naming it. */
static void check_proofs(const uint8_t *data, size_t len, const cas_digest *d,
			 const uint8_t *ob, size_t ob_len)
{
	uint64_t groups = cas_bao_groups(len);
	uint8_t *copy = malloc(len ? len : 1);
	REQUIRE(copy);
	memcpy(copy, data, len);
	uint64_t bad = groups / 2;
	if (len)
		copy[bad * GS + CAS_MIN((size_t)GS, len - bad * GS) / 2] ^=
			0x40;
	for (uint64_t g = 0; g < groups; g++) {
		for (uint64_t span = 1; span <= 3 && g + span <= groups;
		     span++) {
			uint64_t off = g * GS;
			uint64_t rlen = CAS_MIN(span * GS, len - off);
			size_t plen;
			REQUIRE(cas_bao_proof_size(len, off, rlen, &plen) == 0);
			uint8_t *proof = malloc(plen + 1);
			REQUIRE(proof);
			CHECK(cas_bao_proof_extract(len, ob, ob_len, off, rlen,
						    proof) == 0);
			uint64_t at = 99;
			CHECK(cas_bao_proof_verify(d, len, off, rlen, proof,
						   plen, data + off, &at) == 0);
			/* Wrong length of proof: refused. */
			CHECK(cas_bao_proof_verify(d, len, off, rlen, proof,
						   plen + 1, data + off,
						   &at) == -EBADMSG);
			int r = cas_bao_proof_verify(d, len, off, rlen, proof,
						     plen, copy + off, &at);
			bool holds = len && bad >= g && bad < g + span;
			CHECK(r == (holds ? -EBADMSG : 0));
			if (holds)
				CHECK(at == bad);
			/* A flipped byte of the proof fails the range. */
			if (plen) {
				proof[plen / 3] ^= 1;
				CHECK(cas_bao_proof_verify(
					      d, len, off, rlen, proof, plen,
					      data + off, NULL) == -EBADMSG);
			}
			free(proof);
		}
	}
	/* The whole blob as one range. */
	uint64_t at = 99;
	size_t plen;
	REQUIRE(cas_bao_proof_size(len, 0, len, &plen) == 0);
	CHECK(plen == ob_len);
	CHECK(cas_bao_verify_groups(d, len, ob, ob_len, 0, copy, len, &at) ==
	      (len ? -EBADMSG : 0));
	if (len)
		CHECK(at == bad);
	free(copy);
}

static void check_size(size_t len)
{
	uint8_t *data = check_pattern(len);
	cas_digest want, d;
	cas_hash_buffer(data, len, &want);

	uint64_t ob_len = cas_bao_outboard_size(len);
	CHECK(ob_len == (cas_bao_groups(len) - 1) * CAS_BAO_NODE_SIZE);
	uint8_t *ob = malloc(ob_len + 1);
	REQUIRE(ob);
	CHECK(cas_bao_hash_buffer(data, len, &d, ob) == 0);
	if (!cas_digest_eq(&d, &want))
		fprintf(stderr, "size %zu: digest differs\n", len);
	CHECK(cas_digest_eq(&d, &want));

	/* The same in pieces of every awkward size. */
	const size_t steps[] = {1, 1000, 1024, GS - 1, GS, GS + 1, 3 * GS};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(steps); i++) {
		if (steps[i] == 1 && len > 200000)
			continue;
		struct buf b = {0};
		encode_in_steps(data, len, steps[i], &d, &b);
		CHECK(cas_digest_eq(&d, &want));
		CHECK(b.len == ob_len);
		CHECK(b.len == 0 || memcmp(b.bytes, ob, b.len) == 0);
		free(b.bytes);
	}

	CHECK(cas_bao_outboard_verify(&want, len, ob, ob_len) == 0);
	CHECK(cas_bao_outboard_verify(&want, len, ob, ob_len + 1) == -EBADMSG);
	uint64_t at = 99;
	CHECK(cas_bao_verify_groups(&want, len, ob, ob_len, 0, data, len,
				    &at) == 0);
	/* Each flipped byte of the outboard is found by the whole check. */
	for (uint64_t i = 0; i < ob_len; i += 29) {
		ob[i] ^= 0x01;
		CHECK(cas_bao_outboard_verify(&want, len, ob, ob_len) ==
		      -EBADMSG);
		ob[i] ^= 0x01;
	}
	check_proofs(data, len, &want, ob, ob_len);
	free(ob);
	free(data);
}

static void test_sizes(void)
{
	const size_t small[] = {0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 4097};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(small); i++)
		check_size(small[i]);
	/* Every group boundary of trees up to 34 groups (root splits at 2,
	 * 4, 8, 16 and 32 groups), then boundaries of larger trees. */
	for (size_t g = 1; g <= 34; g++) {
		check_size(g * GS - 1);
		check_size(g * GS);
		check_size(g * GS + 1);
	}
	const size_t large[] = {64, 65, 127, 128, 129, 1000};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(large); i++) {
		check_size(large[i] * GS);
		check_size(large[i] * GS + 1000);
	}
}

static void test_ranges(void)
{
	size_t plen;
	uint64_t size = 5 * GS + 100;
	CHECK(cas_bao_proof_size(size, 1, GS, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(size, 0, 0, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(size, 0, GS + 1, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(size, 5 * GS, 101, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(size, 5 * GS, 100, &plen) == 0);
	CHECK(cas_bao_proof_size(size, 6 * GS, 1, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(size, UINT64_MAX - 10, 20, &plen) == -EINVAL);
	CHECK(cas_bao_proof_size(0, 0, 0, &plen) == 0 && plen == 0);
	CHECK(cas_bao_proof_size(0, 0, 1, &plen) == -EINVAL);
	/* 6 groups: root [0,4)+[4,6); the proof of group 5 is the root and
	 * the node of [4,6). */
	CHECK(cas_bao_proof_size(size, 5 * GS, 100, &plen) == 0 &&
	      plen == 2 * CAS_BAO_NODE_SIZE);
	uint8_t none[1] = {0};
	CHECK(cas_bao_verify_groups(NULL, size, none, 0, 0, none, 1, NULL) ==
	      -EINVAL);
	CHECK(cas_bao_verify_groups(NULL, size, none, 0, 9, none, GS, NULL) ==
	      -EINVAL);
}

static void test_fd(void)
{
	char path[] = "/tmp/castore-test-bao.XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0);
	unlink(path);
	size_t len = 40 * GS + 7;
	uint8_t *data = check_pattern(len);
	REQUIRE(write(fd, data, len) == (ssize_t)len);
	cas_digest d, want;
	uint8_t *ob = NULL;
	size_t ob_len = 0;
	uint64_t size = 0;
	CHECK(cas_bao_hash_fd(fd, &d, &size, &ob, &ob_len) == 0);
	CHECK(size == len && ob_len == cas_bao_outboard_size(len));
	uint8_t *ob2 = malloc(ob_len);
	REQUIRE(ob2);
	CHECK(cas_bao_hash_buffer(data, len, &want, ob2) == 0);
	CHECK(cas_digest_eq(&d, &want) && memcmp(ob, ob2, ob_len) == 0);
	free(ob);
	free(ob2);
	/* A small file: no outboard at all. */
	REQUIRE(ftruncate(fd, 100) == 0);
	ob = (uint8_t *)1;
	CHECK(cas_bao_hash_fd(fd, &d, &size, &ob, &ob_len) == 0);
	CHECK(size == 100 && ob == NULL && ob_len == 0);
	cas_hash_buffer(data, 100, &want);
	CHECK(cas_digest_eq(&d, &want));
	close(fd);
	free(data);
}

static int fail_emit(void *ctx, const uint8_t *bytes, size_t len)
{
	return -ENOSPC;
}

static void test_emit_error(void)
{
	size_t len = 600 * GS;
	uint8_t *data = check_pattern(len);
	cas_bao_encoder *e;
	cas_digest d;
	REQUIRE(cas_bao_encoder_new(fail_emit, NULL, &e) == 0);
	int r = cas_bao_encoder_update(e, data, len);
	if (r == 0)
		r = cas_bao_encoder_final(e, &d);
	CHECK(r == -ENOSPC);
	cas_bao_encoder_free(e);
	free(data);
}

int main(void)
{
	test_sizes();
	test_ranges();
	test_fd();
	test_emit_error();
	return check_exit("test_bao");
}
