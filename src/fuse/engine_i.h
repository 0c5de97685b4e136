/* engine_i.h - the engine's internals, shared with its unit tests.
 *
 * A cursor reads a request that may be scattered over several buffers (a
 * virtio-fs descriptor chain splits anywhere) without ever reading past
 * the end of the input or past a limit set from the request's own length.
 * Every read copies: the input may be memory a guest can change under us,
 * so nothing is checked in place and then used again.
 *
 * Contract: a cursor belongs to one request on one thread; the buffers
 * must stay valid while it is used. Functions return 0 or -errno; after a
 * failure the cursor's position is unspecified (the request is rejected).
 */
#ifndef CAS_FUSE_ENGINE_I_H
#define CAS_FUSE_ENGINE_I_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct cas_fuse_cursor {
	const struct iovec *iov;
	int cnt;
	int idx;     /* current buffer */
	size_t off;  /* offset in iov[idx] */
	size_t left; /* bytes that may still be read */
};

void cas_fuse_cursor_init(struct cas_fuse_cursor *c, const struct iovec *iov,
			  int cnt);
/* Lowers the number of readable bytes to n (never raises it). */
void cas_fuse_cursor_limit(struct cas_fuse_cursor *c, size_t n);
/* Copies exactly n bytes (dst NULL: skips them); -EINVAL if fewer left. */
int cas_fuse_cursor_copy(struct cas_fuse_cursor *c, void *dst, size_t n);
/* Copies min(size, left) bytes into a zeroed dst of `size` bytes, at least
 * `min`: for arguments that grew over protocol versions. */
int cas_fuse_cursor_copy_partial(struct cas_fuse_cursor *c, void *dst,
				 size_t size, size_t min);
/* Copies a NUL-terminated, non-empty name into buf (size bytes with the
 * NUL); -EINVAL if no NUL before the end or empty, -ENAMETOOLONG if it
 * does not fit. */
int cas_fuse_cursor_name(struct cas_fuse_cursor *c, char *buf, size_t size,
			 size_t *ret_len);

/* "LOOKUP", ... or "UNKNOWN", for logs. */
const char *cas_fuse_opcode_name(uint32_t opcode);

#endif
