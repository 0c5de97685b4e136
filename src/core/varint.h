/* varint.h - protobuf base-128 varints: the one codec behind the castore
 * Directory encoding (directory.c) and the gRPC messages of src/remote.
 *
 * Contract: header-only, no state, thread-safe. Decoding reads untrusted
 * bytes and never looks past `end`; it accepts at most 10 bytes, the last
 * of them 0 or 1, so every accepted varint fits 64 bits. It does not
 * refuse a longer-than-needed encoding: the Directory codec does that by
 * re-encoding.
 */
#ifndef CAS_CORE_VARINT_H
#define CAS_CORE_VARINT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define CAS_VARINT_MAX 10

static inline size_t cas_varint_len(uint64_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

/* Writes v at p (up to CAS_VARINT_MAX bytes); returns the end. */
static inline uint8_t *cas_varint_put(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* Reads one varint at *p and moves *p past it. -EBADMSG when the input
 * ends first, -EOVERFLOW when it does not fit 64 bits. */
static inline int cas_varint_get(const uint8_t **p, const uint8_t *end,
				 uint64_t *ret)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < CAS_VARINT_MAX; i++) {
		if (*p >= end)
			return -EBADMSG;
		uint8_t b = *(*p)++;
		if (i == CAS_VARINT_MAX - 1 && b > 1)
			return -EOVERFLOW;
		v |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			*ret = v;
			return 0;
		}
	}
	return -EOVERFLOW;
}

#endif
