/* cursor.c - the bounds-checked cursor over a request's buffers
 * (engine_i.h), out of engine.c: the one way a handler reads its input. */
#include <errno.h>
#include <string.h>

#include "core/util.h"
#include "fuse/engine_i.h"

void cas_fuse_cursor_init(struct cas_fuse_cursor *c, const struct iovec *iov,
			  int cnt)
{
	*c = (struct cas_fuse_cursor){.iov = iov, .cnt = cnt > 0 ? cnt : 0};
	size_t total = 0;
	for (int i = 0; i < c->cnt; i++) {
		/* Saturate: a wrapping sum must not make a short input look
		 * long. */
		if (iov[i].iov_len > SIZE_MAX - total) {
			total = SIZE_MAX;
			break;
		}
		total += iov[i].iov_len;
	}
	c->left = total;
}

void cas_fuse_cursor_limit(struct cas_fuse_cursor *c, size_t n)
{
	if (n < c->left)
		c->left = n;
}

int cas_fuse_cursor_copy(struct cas_fuse_cursor *c, void *dst, size_t n)
{
	if (n > c->left)
		return -EINVAL;
	uint8_t *out = dst;
	c->left -= n;
	while (n > 0) {
		if (c->idx >= c->cnt)
			return -EINVAL; /* unreachable: left counted these */
		const struct iovec *v = &c->iov[c->idx];
		size_t avail = v->iov_len - c->off;
		if (avail == 0) {
			c->idx++;
			c->off = 0;
			continue;
		}
		size_t k = CAS_MIN(avail, n);
		if (out) {
			memcpy(out, (const uint8_t *)v->iov_base + c->off, k);
			out += k;
		}
		c->off += k;
		n -= k;
	}
	return 0;
}

int cas_fuse_cursor_copy_partial(struct cas_fuse_cursor *c, void *dst,
				 size_t size, size_t min)
{
	size_t n = CAS_MIN(size, c->left);
	if (n < min)
		return -EINVAL;
	memset(dst, 0, size);
	return cas_fuse_cursor_copy(c, dst, n);
}

int cas_fuse_cursor_name(struct cas_fuse_cursor *c, char *buf, size_t size,
			 size_t *ret_len)
{
	/* Copy byte-wise up to the NUL: the name's end is only known from
	 * the bytes we copied, never from a second look at the input. */
	for (size_t i = 0;; i++) {
		if (c->left == 0)
			return -EINVAL; /* no NUL inside the request */
		if (i >= size)
			return -ENAMETOOLONG;
		int r = cas_fuse_cursor_copy(c, &buf[i], 1);
		if (r < 0)
			return r;
		if (buf[i] == '\0') {
			if (i == 0)
				return -EINVAL;
			*ret_len = i;
			return 0;
		}
	}
}
