#include "core/digest.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/util.h"

const cas_digest CAS_DIGEST_EMPTY_DIRECTORY = {{
	0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d,
	0xea, 0x36, 0xdc, 0xc9, 0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1,
	0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
}};

void cas_digest_to_hex(const cas_digest *d,
		       char ret_hex[CAS_DIGEST_HEX_LEN + 1])
{
	cas_hex_encode(d->bytes, CAS_DIGEST_LEN, ret_hex);
}

int cas_digest_from_hexn(const char *hex, size_t len, cas_digest *ret)
{
	cas_digest d;
	if (len != CAS_DIGEST_HEX_LEN ||
	    cas_hex_decode(hex, CAS_DIGEST_LEN, d.bytes) < 0)
		return -EINVAL;
	*ret = d;
	return 0;
}

int cas_digest_from_hex(const char *hex, cas_digest *ret)
{
	return cas_digest_from_hexn(hex, strlen(hex), ret);
}

void cas_hasher_init(cas_hasher *h)
{
	blake3_hasher_init(&h->b3);
}

void cas_hasher_update(cas_hasher *h, const void *buf, size_t len)
{
	blake3_hasher_update(&h->b3, buf, len);
}

void cas_hasher_final(const cas_hasher *h, cas_digest *ret)
{
	blake3_hasher_finalize(&h->b3, ret->bytes, CAS_DIGEST_LEN);
}

void cas_hash_buffer(const void *buf, size_t len, cas_digest *ret)
{
	cas_hasher h;
	cas_hasher_init(&h);
	cas_hasher_update(&h, buf, len);
	cas_hasher_final(&h, ret);
}

/* Reads of 128 KiB keep BLAKE3's SIMD lanes full (128 chunks per update)
 * and fit on any thread's stack: no allocation per file, which matters
 * when verify hashes hundreds of thousands of blobs. */
#define HASH_READ_SIZE (128u << 10)

/* Hashes bytes [off, off + len) of fd, stopping early at EOF; returns
 * how many it hashed, or -errno. */
static int64_t hash_pread(int fd, uint64_t off, uint64_t len, cas_digest *ret)
{
	uint8_t buf[HASH_READ_SIZE];
	cas_hasher h;
	cas_hasher_init(&h);
	uint64_t done = 0;
	while (done < len) {
		size_t want =
			(size_t)CAS_MIN((uint64_t)HASH_READ_SIZE, len - done);
		ssize_t n = pread(fd, buf, want, (off_t)(off + done));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (n == 0)
			break;
		cas_hasher_update(&h, buf, (size_t)n);
		done += (uint64_t)n;
	}
	cas_hasher_final(&h, ret);
	return (int64_t)done;
}

int cas_hash_fd(int fd, cas_digest *ret, uint64_t *ret_size)
{
	int64_t n = hash_pread(fd, 0, UINT64_MAX, ret);
	if (n < 0)
		return (int)n;
	if (ret_size)
		*ret_size = (uint64_t)n;
	return 0;
}

int cas_hash_fd_range(int fd, uint64_t off, uint64_t len, cas_digest *ret)
{
	int64_t n = hash_pread(fd, off, len, ret);
	if (n < 0)
		return (int)n;
	return (uint64_t)n == len ? 0 : -EBADMSG;
}

int cas_copy_fd_hashed(int src, int dst, uint64_t size, cas_digest *ret)
{
	_cleanup_free_ uint8_t *buf = malloc(HASH_READ_SIZE);
	if (!buf)
		return -ENOMEM;
	cas_hasher h;
	cas_hasher_init(&h);
	for (uint64_t off = 0; off < size;) {
		size_t want =
			(size_t)CAS_MIN(size - off, (uint64_t)HASH_READ_SIZE);
		ssize_t n = pread(src, buf, want, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return cas_negerrno();
		if (n == 0)
			return -EBADMSG;
		cas_hasher_update(&h, buf, (size_t)n);
		int r = cas_write_all(dst, buf, (size_t)n);
		if (r < 0)
			return r;
		off += (uint64_t)n;
	}
	cas_hasher_final(&h, ret);
	return 0;
}
