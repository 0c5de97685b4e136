/* Unit tests of core/util.c and core/varint.h: the hex codec, the file
 * copy, the varint codec that the Directory and gRPC codecs share, and
 * the unix socket check of serve and virtiofs. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "check.h"
#include "core/util.h"
#include "core/varint.h"

static void test_hex(void)
{
	const uint8_t bytes[] = {0x00, 0x01, 0x7f, 0x80, 0xab, 0xff};
	char hex[2 * sizeof(bytes) + 1];
	uint8_t back[sizeof(bytes)];

	memset(hex, 'x', sizeof(hex));
	cas_hex_encode(bytes, sizeof(bytes), hex);
	CHECK_STREQ(hex, "00017f80abff");
	CHECK(cas_hex_decode(hex, sizeof(bytes), back) == 0);
	CHECK(memcmp(back, bytes, sizeof(bytes)) == 0);
	CHECK(cas_hex_decode("00017F80ABFF", sizeof(bytes), back) == 0);
	CHECK(memcmp(back, bytes, sizeof(bytes)) == 0);
	CHECK(cas_hex_decode("0g", 1, back) == -EINVAL);
	CHECK(cas_hex_decode("g0", 1, back) == -EINVAL);
	CHECK(cas_hex_decode("0", 1, back) == -EINVAL); /* NUL is not hex */
	cas_hex_encode(bytes, 0, hex);
	CHECK_STREQ(hex, "");
}

static int memfd_with(const uint8_t *buf, size_t len)
{
	int fd = memfd_create("test_util", MFD_CLOEXEC);
	REQUIRE(fd >= 0);
	REQUIRE(cas_write_all(fd, buf, len) == 0);
	return fd;
}

static void test_copy_fd(void)
{
	enum { LEN = 3 << 20 }; /* more than one plain-copy chunk */
	uint8_t *src = malloc(LEN), *got = malloc(LEN);
	REQUIRE(src && got);
	for (size_t i = 0; i < LEN; i++)
		src[i] = (uint8_t)(i % 251);
	int in = memfd_with(src, LEN);

	/* From offset 0 whatever in's position (it is at the end here). */
	int out = memfd_create("test_util_out", MFD_CLOEXEC);
	REQUIRE(out >= 0);
	CHECK(cas_copy_fd(in, out, LEN) == 0);
	CHECK(lseek(out, 0, SEEK_END) == LEN);
	CHECK(cas_pread_all(out, got, LEN, 0) == 0);
	CHECK(memcmp(got, src, LEN) == 0);

	/* At out's position: after what is there. */
	CHECK(cas_copy_fd(in, out, 10) == 0);
	CHECK(lseek(out, 0, SEEK_END) == LEN + 10);
	CHECK(cas_pread_all(out, got, 10, LEN) == 0);
	CHECK(memcmp(got, src, 10) == 0);

	/* A source shorter than promised. */
	int out2 = memfd_create("test_util_out2", MFD_CLOEXEC);
	REQUIRE(out2 >= 0);
	CHECK(cas_copy_fd(in, out2, LEN + 1) == -EBADMSG);

	/* A pipe refuses copy_file_range: the plain copy takes over. */
	int p[2];
	REQUIRE(pipe(p) == 0);
	CHECK(cas_copy_fd(in, p[1], 1000) == 0);
	CHECK(read(p[0], got, 1000) == 1000);
	CHECK(memcmp(got, src, 1000) == 0);

	close(p[0]);
	close(p[1]);
	close(out2);
	close(out);
	close(in);
	free(src);
	free(got);
}

static void test_varint(void)
{
	static const uint64_t values[] = {
		0, 1, 127, 128, 300, UINT32_MAX, (uint64_t)1 << 63, UINT64_MAX};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(values); i++) {
		uint8_t buf[CAS_VARINT_MAX];
		uint8_t *end = cas_varint_put(buf, values[i]);
		CHECK((size_t)(end - buf) == cas_varint_len(values[i]));
		const uint8_t *p = buf;
		uint64_t v = 0;
		CHECK(cas_varint_get(&p, end, &v) == 0);
		CHECK(v == values[i]);
		CHECK(p == end);
		/* One byte short. */
		p = buf;
		CHECK(cas_varint_get(&p, end - 1, &v) == -EBADMSG);
	}
	CHECK(cas_varint_len(UINT64_MAX) == CAS_VARINT_MAX);

	/* Ten bytes whose last carries more than the 64th bit. */
	const uint8_t over[] = {0xff, 0xff, 0xff, 0xff, 0xff,
				0xff, 0xff, 0xff, 0xff, 0x02};
	const uint8_t *p = over;
	uint64_t v;
	CHECK(cas_varint_get(&p, over + sizeof(over), &v) == -EOVERFLOW);
	/* Eleven bytes: never ends within the limit. */
	const uint8_t longer[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
				  0x80, 0x80, 0x80, 0x81, 0x00};
	p = longer;
	CHECK(cas_varint_get(&p, longer + sizeof(longer), &v) == -EOVERFLOW);
	/* Longer than needed but within 64 bits: accepted (the Directory
	 * codec refuses it by re-encoding). */
	const uint8_t padded[] = {0x81, 0x00};
	p = padded;
	CHECK(cas_varint_get(&p, padded + sizeof(padded), &v) == 0 && v == 1);
}

/* A live socket is refused, a dead one removed, anything else kept. */
static void test_unix_socket_clear(void)
{
	char dir[] = "/tmp/castore-test-util.XXXXXX", path[128];
	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/s", dir);
	CHECK(cas_unix_socket_clear(path) == 0); /* nothing there */

	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK(fd >= 0);
	CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	CHECK(listen(fd, 1) == 0);
	CHECK(cas_unix_socket_clear(path) == -EADDRINUSE);
	CHECK(access(path, F_OK) == 0);
	close(fd); /* the server is gone, its socket file stays */
	CHECK(access(path, F_OK) == 0);
	CHECK(cas_unix_socket_clear(path) == 0);
	CHECK(access(path, F_OK) < 0 && errno == ENOENT);

	int f = open(path, O_CREAT | O_WRONLY, 0600);
	CHECK(f >= 0);
	close(f);
	CHECK(cas_unix_socket_clear(path) == -EEXIST);
	CHECK(unlink(path) == 0);
	CHECK(rmdir(dir) == 0);
}

int main(void)
{
	test_hex();
	test_copy_fd();
	test_varint();
	test_unix_socket_clear();
	return check_exit("test_util");
}
