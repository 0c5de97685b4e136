/* Unit tests of core/digest: hex form, BLAKE3 known answers, fd hashing.
 *
 * The known answers are BLAKE3-256 of BLAKE3's own test input (byte i is
 * i % 251) as printed by Debian's b3sum; the test does not need b3sum. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/digest.h"
#include "core/util.h"

static const struct {
	size_t len;
	const char *hex;
} known[] = {
	{0, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
	{1, "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213"},
	{1023,
	 "10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11"},
	{1024,
	 "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7"},
	{1025,
	 "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444"},
	{65536,
	 "68d647e619a930e7b1082f74f334b0c65a315725569bdc123f0ee11881717bfe"},
	{1048577,
	 "2f053cd7472cf0cd2f9adaf45c1180255b91b9a865404a63671a0ee5f792ed33"},
};

static void test_hex(void)
{
	const char *hex = known[1].hex;
	cas_digest d, e;
	char out[CAS_DIGEST_HEX_LEN + 1];

	CHECK(cas_digest_from_hex(hex, &d) == 0);
	cas_digest_to_hex(&d, out);
	CHECK_STREQ(out, hex);
	CHECK(d.bytes[0] == 0x2d && d.bytes[31] == 0x13);

	/* Upper case parses to the same digest; output is always lower. */
	char upper[CAS_DIGEST_HEX_LEN + 1];
	for (size_t i = 0; i <= CAS_DIGEST_HEX_LEN; i++)
		upper[i] = (char)(hex[i] >= 'a' && hex[i] <= 'f' ? hex[i] - 32
								 : hex[i]);
	CHECK(cas_digest_from_hex(upper, &e) == 0);
	CHECK(cas_digest_eq(&d, &e));

	/* Every byte value survives the round trip. */
	for (int v = 0; v < 256; v += 32) {
		for (int i = 0; i < CAS_DIGEST_LEN; i++)
			d.bytes[i] = (uint8_t)(v + i);
		cas_digest_to_hex(&d, out);
		CHECK(strlen(out) == CAS_DIGEST_HEX_LEN);
		CHECK(cas_digest_from_hex(out, &e) == 0 &&
		      cas_digest_eq(&d, &e));
	}

	/* Refusals leave *ret alone. */
	memset(&e, 0x5a, sizeof(e));
	cas_digest before = e;
	char buf[80];
	snprintf(buf, sizeof(buf), "%.63s", hex);
	CHECK(cas_digest_from_hex(buf, &e) == -EINVAL);
	snprintf(buf, sizeof(buf), "%s0", hex);
	CHECK(cas_digest_from_hex(buf, &e) == -EINVAL);
	CHECK(cas_digest_from_hex("", &e) == -EINVAL);
	const char bad[] = {'g', 'G', ' ', 'x', '-', ':', '/', '@', '`', '\n'};
	for (size_t b = 0; b < sizeof(bad); b++)
		for (size_t pos = 0; pos < CAS_DIGEST_HEX_LEN; pos += 21) {
			snprintf(buf, sizeof(buf), "%s", hex);
			buf[pos] = bad[b];
			CHECK(cas_digest_from_hex(buf, &e) == -EINVAL);
		}
	snprintf(buf, sizeof(buf), "%s", hex);
	buf[CAS_DIGEST_HEX_LEN - 1] = 'z';
	CHECK(cas_digest_from_hex(buf, &e) == -EINVAL);
	CHECK(cas_digest_eq(&e, &before));

	/* Counted form: the characters after len do not matter. */
	snprintf(buf, sizeof(buf), "%sXYZ", hex);
	CHECK(cas_digest_from_hexn(buf, CAS_DIGEST_HEX_LEN, &e) == 0);
	CHECK(cas_digest_from_hex(hex, &d) == 0 && cas_digest_eq(&d, &e));
	CHECK(cas_digest_from_hexn(buf, CAS_DIGEST_HEX_LEN + 1, &e) == -EINVAL);
	CHECK(cas_digest_from_hexn(buf, CAS_DIGEST_HEX_LEN - 1, &e) == -EINVAL);
	/* An embedded NUL is not hex. */
	snprintf(buf, sizeof(buf), "%s", hex);
	buf[10] = 0;
	CHECK(cas_digest_from_hexn(buf, CAS_DIGEST_HEX_LEN, &e) == -EINVAL);
}

static void test_known_answers(void)
{
	for (size_t k = 0; k < CAS_ARRAY_SIZE(known); k++) {
		_cleanup_free_ uint8_t *p = check_pattern(known[k].len);
		cas_digest want, got;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		REQUIRE(cas_digest_from_hex(known[k].hex, &want) == 0);

		cas_hash_buffer(p, known[k].len, &got);
		cas_digest_to_hex(&got, hex);
		if (!cas_digest_eq(&got, &want))
			fprintf(stderr, "len %zu: got %s\n", known[k].len, hex);
		CHECK(cas_digest_eq(&got, &want));

		/* Incremental, in uneven pieces, gives the same digest. */
		cas_hasher h;
		cas_hasher_init(&h);
		size_t off = 0, step = 1;
		while (off < known[k].len) {
			size_t n = CAS_MIN(step, known[k].len - off);
			cas_hasher_update(&h, p + off, n);
			off += n;
			step = step * 3 + 7;
		}
		cas_hasher_final(&h, &got);
		CHECK(cas_digest_eq(&got, &want));
	}

	CHECK(cas_digest_from_hex(known[0].hex, &(cas_digest){{0}}) == 0);
	cas_digest empty;
	cas_hash_buffer(NULL, 0, &empty);
	CHECK(cas_digest_eq(&empty, &CAS_DIGEST_EMPTY_DIRECTORY));
}

static int tmpfile_with(const uint8_t *p, size_t len)
{
	char path[] = "/tmp/cas-test-digest-XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0);
	unlink(path);
	REQUIRE(cas_write_all(fd, p, len) == 0);
	return fd;
}

static void test_hash_fd(void)
{
	/* Around the 1 MiB read size, and larger than it. */
	const size_t lens[] = {
		0, 1, 1025, (1u << 20) - 1, 1u << 20, (1u << 20) + 1, 3u << 20};
	for (size_t k = 0; k < CAS_ARRAY_SIZE(lens); k++) {
		_cleanup_free_ uint8_t *p = check_pattern(lens[k]);
		_cleanup_close_ int fd = tmpfile_with(p, lens[k]);
		cas_digest a, b;
		uint64_t size = 12345;
		cas_hash_buffer(p, lens[k], &a);
		CHECK(cas_hash_fd(fd, &b, &size) == 0);
		CHECK(cas_digest_eq(&a, &b));
		CHECK(size == lens[k]);
		/* From offset 0 whatever the file position. */
		CHECK(lseek(fd, 7, SEEK_SET) >= 0 || lens[k] == 0);
		CHECK(cas_hash_fd(fd, &b, NULL) == 0 && cas_digest_eq(&a, &b));
	}

	_cleanup_free_ uint8_t *p = check_pattern(1048577);
	_cleanup_close_ int fd = tmpfile_with(p, 1048577);
	cas_digest d, want;
	REQUIRE(cas_digest_from_hex(known[6].hex, &want) == 0);
	CHECK(cas_hash_fd(fd, &d, NULL) == 0 && cas_digest_eq(&d, &want));

	CHECK(cas_hash_fd(-1, &d, NULL) == -EBADF);
	int dfd = open("/", O_RDONLY | O_DIRECTORY);
	REQUIRE(dfd >= 0);
	CHECK(cas_hash_fd(dfd, &d, NULL) == -EISDIR);
	close(dfd);
}

static void test_util(void)
{
	uint8_t buf[64];
	_cleanup_free_ uint8_t *p = check_pattern(100);
	_cleanup_close_ int fd = tmpfile_with(p, 100);
	CHECK(cas_pread_all(fd, buf, 50, 40) == 0 && !memcmp(buf, p + 40, 50));
	CHECK(cas_pread_all(fd, buf, 61, 40) == -EBADMSG);
	CHECK(cas_pread_all(-1, buf, 1, 0) == -EBADF);
	CHECK(cas_write_all(-1, buf, 1) == -EBADF);

	int fds[2];
	REQUIRE(pipe(fds) == 0);
	close(fds[0]);
	/* EPIPE with SIGPIPE ignored: the error comes back as -errno. */
	signal(SIGPIPE, SIG_IGN);
	CHECK(cas_write_all(fds[1], buf, 1) == -EPIPE);
	close(fds[1]);

	errno = 0;
	CHECK(cas_negerrno() == -EIO);
	errno = ENOENT;
	CHECK(cas_negerrno() == -ENOENT);

	char *q = strdup("x");
	{
		_cleanup_free_ char *owned = q;
		char *taken = TAKE_PTR(owned);
		CHECK(owned == NULL && taken == q);
	}
	free(q);
}

int main(void)
{
	test_hex();
	test_known_answers();
	test_hash_fd();
	test_util();
	return check_exit("test_digest");
}
