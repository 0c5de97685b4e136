/* Unit tests of core/chunker: cut points stay within min..max, do not
 * depend on how the stream is split into pieces, and survive an insertion
 * (the chunks after it are the same chunks); the chunk list of a file
 * adds up and names each chunk by its digest; the codec round-trips and
 * refuses everything that is not canonical. The data is a deterministic
 * xorshift stream (a periodic pattern such as i % 251 would cut at every
 * period or never). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/chunker.h"
#include "core/digest.h"
#include "core/util.h"

static uint8_t *noise(size_t len, uint64_t seed)
{
	uint8_t *p = malloc(len ? len : 1);
	REQUIRE(p);
	uint64_t x = seed | 1;
	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (uint8_t)(x >> 32);
	}
	return p;
}

/* Cut offsets of data fed in pieces of `step` bytes. */
static size_t cuts(const uint8_t *data, size_t len, size_t step, uint64_t min,
		   uint64_t avg, uint64_t max, uint64_t *ret, size_t cap)
{
	cas_chunker c;
	REQUIRE(cas_chunker_init(&c, min, avg, max) == 0);
	size_t n = 0;
	for (size_t off = 0; off < len;) {
		size_t piece = CAS_MIN(step, len - off), i = 0;
		while (i < piece) {
			bool cut;
			i += cas_chunker_next(&c, data + off + i, piece - i,
					      &cut);
			if (cut) {
				REQUIRE(n < cap);
				ret[n++] = off + i;
			}
		}
		off += piece;
	}
	if (n == 0 || ret[n - 1] != len) {
		REQUIRE(n < cap);
		ret[n++] = len;
	}
	return n;
}

static void test_bounds_and_pieces(void)
{
	size_t len = 24u << 20;
	uint8_t *data = noise(len, 7);
	static uint64_t a[1024], b[1024];
	size_t na = cuts(data, len, len, CAS_CHUNK_MIN, CAS_CHUNK_AVG,
			 CAS_CHUNK_MAX, a, 1024);
	uint64_t prev = 0;
	for (size_t i = 0; i < na; i++) {
		uint64_t size = a[i] - prev;
		CHECK(size <= CAS_CHUNK_MAX);
		CHECK(size >= CAS_CHUNK_MIN || i == na - 1);
		prev = a[i];
	}
	/* About 256 KiB on average: between 150 and 400 KiB on 24 MiB. */
	CHECK(len / na > (150u << 10) && len / na < (400u << 10));
	const size_t steps[] = {1000, 4096, 65536 + 3, 1u << 20};
	for (size_t s = 0; s < CAS_ARRAY_SIZE(steps); s++) {
		size_t nb = cuts(data, len, steps[s], CAS_CHUNK_MIN,
				 CAS_CHUNK_AVG, CAS_CHUNK_MAX, b, 1024);
		CHECK(nb == na && memcmp(a, b, na * sizeof(a[0])) == 0);
	}
	/* min = avg = max: fixed chunks. */
	size_t nf =
		cuts(data, len, 77777, 1u << 18, 1u << 18, 1u << 18, b, 1024);
	CHECK(nf == len / (1u << 18));
	for (size_t i = 0; i < nf; i++)
		CHECK(b[i] == (i + 1) * (1u << 18));
	free(data);
}

static void test_insertion(void)
{
	/* 100 bytes inserted at 5 MiB: the cuts after a few chunks past it
	 * are the old cuts moved by 100. */
	size_t len = 16u << 20, at = 5u << 20, ins = 100;
	uint8_t *data = noise(len, 11);
	uint8_t *edited = malloc(len + ins);
	REQUIRE(edited);
	memcpy(edited, data, at);
	memset(edited + at, 0x5a, ins);
	memcpy(edited + at + ins, data + at, len - at);
	static uint64_t a[1024], b[1024];
	size_t na = cuts(data, len, len, CAS_CHUNK_MIN, CAS_CHUNK_AVG,
			 CAS_CHUNK_MAX, a, 1024);
	size_t nb = cuts(edited, len + ins, len + ins, CAS_CHUNK_MIN,
			 CAS_CHUNK_AVG, CAS_CHUNK_MAX, b, 1024);
	size_t shared = 0, after = 0;
	for (size_t i = 0; i < na; i++) {
		if (a[i] <= at)
			continue;
		after++;
		for (size_t j = 0; j < nb; j++)
			if (b[j] == a[i] + ins)
				shared++;
	}
	CHECK(after > 30);
	CHECK(shared + 3 >= after);
	free(data);
	free(edited);
}

static void test_fd_and_codec(void)
{
	char path[] = "/tmp/castore-test-chunker.XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0);
	unlink(path);
	size_t len = (5u << 20) + 12345;
	uint8_t *data = noise(len, 3);
	REQUIRE(write(fd, data, len) == (ssize_t)len);
	cas_chunk *chunks;
	size_t n;
	REQUIRE(cas_chunklist_from_fd(fd, CAS_CHUNK_MIN, CAS_CHUNK_AVG,
				      CAS_CHUNK_MAX, &chunks, &n) == 0);
	uint64_t off = 0;
	for (size_t i = 0; i < n; i++) {
		cas_digest d;
		cas_hash_buffer(data + off, chunks[i].size, &d);
		CHECK(cas_digest_eq(&d, &chunks[i].digest));
		off += chunks[i].size;
	}
	CHECK(off == len && n > 5);

	uint8_t *enc;
	size_t enc_len;
	REQUIRE(cas_chunklist_encode(chunks, n, &enc, &enc_len) == 0);
	cas_chunk *back;
	size_t nback;
	const char *why = NULL;
	CHECK(cas_chunklist_decode(enc, enc_len, len, &back, &nback, &why) ==
	      0);
	CHECK(nback == n && memcmp(back, chunks, n * sizeof(*back)) == 0);
	free(back);
	CHECK(cas_chunklist_decode(enc, enc_len, len + 1, &back, &nback,
				   &why) == -EBADMSG);
	CHECK(why && strstr(why, "add up"));
	CHECK(cas_chunklist_decode(enc, enc_len - 1, UINT64_MAX, &back, &nback,
				   &why) == -EBADMSG);
	/* Every single flipped bit of the framing is refused or decodes to
	 * another list; it never crashes (the fuzzer explores further). */
	for (size_t i = 0; i < 40; i++) {
		enc[i] ^= 0x80;
		int r = cas_chunklist_decode(enc, enc_len, UINT64_MAX, &back,
					     &nback, &why);
		if (r == 0)
			free(back);
		else
			CHECK(r == -EBADMSG && why);
		enc[i] ^= 0x80;
	}
	/* A size of 0 is not encoded, nor decoded. */
	cas_chunk zero = {.size = 0};
	uint8_t *z;
	size_t zl;
	CHECK(cas_chunklist_encode(&zero, 1, &z, &zl) == -EINVAL);
	uint8_t zero_enc[2 + 2 + 32 + 2] = {0x0a, 36, 0x0a, 32};
	zero_enc[36] = 0x10;
	zero_enc[37] = 0;
	CHECK(cas_chunklist_decode(zero_enc, sizeof(zero_enc), UINT64_MAX,
				   &back, &nback, &why) == -EBADMSG);
	/* The empty list is the empty encoding. */
	CHECK(cas_chunklist_decode(enc, 0, 0, &back, &nback, &why) == 0 &&
	      nback == 0);
	free(back);
	free(enc);
	free(chunks);
	close(fd);
	free(data);
}

int main(void)
{
	CHECK(cas_chunker_init(&(cas_chunker){0}, 0, 4, 8) == -EINVAL);
	CHECK(cas_chunker_init(&(cas_chunker){0}, 4, 6, 8) == -EINVAL);
	CHECK(cas_chunker_init(&(cas_chunker){0}, 8, 4, 8) == -EINVAL);
	test_bounds_and_pieces();
	test_insertion();
	test_fd_and_codec();
	return check_exit("test_chunker");
}
