#include "castorefs/verified_i.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/util.h"

int cas_verify_bytes(const cas_digest *d, const uint8_t *buf, int fd,
		     uint64_t off, uint64_t len)
{
	cas_digest got;
	if (buf) {
		cas_hash_buffer(buf, (size_t)len, &got);
	} else {
		int r = cas_hash_fd_range(fd, off, len, &got);
		if (r < 0)
			return r;
	}
	return cas_digest_eq(&got, d) ? 0 : -EBADMSG;
}

void cas_verified_init(struct cas_verified *v, atomic_size_t *memory)
{
	pthread_mutex_init(&v->lock, NULL);
	v->large = (struct cas_dmap){0};
	v->memory = memory;
	v->counted = 0;
}

void cas_verified_release(struct cas_verified *v)
{
	cas_dmap_release(&v->large, NULL);
	atomic_fetch_sub(v->memory, v->counted);
	pthread_mutex_destroy(&v->lock);
}

int cas_verified_large(struct cas_verified *v, const cas_digest *d, int fd,
		       uint64_t size)
{
	pthread_mutex_lock(&v->lock);
	bool known = cas_dmap_find(&v->large, d) != NULL;
	pthread_mutex_unlock(&v->lock);
	if (known)
		return 0;
	int r = cas_verify_bytes(d, NULL, fd, 0, size);
	if (r < 0)
		return r;
	pthread_mutex_lock(&v->lock);
	/* Not remembering it (no memory) only costs a second hash later. */
	(void)cas_dmap_put(&v->large, d, NULL);
	size_t now = v->large.cap * sizeof(struct cas_dmap_entry);
	atomic_fetch_add(v->memory, now - v->counted);
	v->counted = now;
	pthread_mutex_unlock(&v->lock);
	return 0;
}

struct cas_range_check {
	cas_digest d;
	uint64_t size, groups;
	uint8_t *outboard;
	size_t outboard_len;
	_Atomic uint8_t bits[]; /* a bit per group checked */
};

int cas_range_check_open(cas_store *s, const cas_digest *d, uint64_t size,
			 struct cas_range_check **ret)
{
	if (!cas_bao_wants_outboard(size))
		return -ENOENT;
	uint8_t *ob = NULL;
	size_t len = 0;
	int r = cas_store_blob_outboard_read(
		s, d, (size_t)cas_bao_outboard_size(size), &ob, &len);
	/* None, or one that disagrees with the digest (verify names it):
	 * the blob is hashed whole instead, which needs no outboard. */
	if (r < 0 || cas_bao_outboard_verify(d, size, ob, len) < 0) {
		free(ob);
		return r == -ENOMEM ? r : -ENOENT;
	}
	uint64_t groups = cas_bao_groups(size);
	struct cas_range_check *rc =
		calloc(1, sizeof(*rc) + (size_t)(groups + 7) / 8);
	if (!rc) {
		free(ob);
		return -ENOMEM;
	}
	*rc = (struct cas_range_check){.d = *d,
				       .size = size,
				       .groups = groups,
				       .outboard = ob,
				       .outboard_len = len};
	*ret = rc;
	return 0;
}

static bool checked(struct cas_range_check *rc, uint64_t g)
{
	return atomic_load_explicit(&rc->bits[g / 8], memory_order_acquire) &
	       (1u << (g % 8));
}

/* Groups read and verified at once: BLAKE3 hashes them side by side. */
#define CHECK_GROUPS 8

int cas_range_check(struct cas_range_check *rc, int fd, uint64_t off,
		    uint64_t len)
{
	if (len == 0 || off >= rc->size)
		return 0;
	uint64_t first = off / CAS_BAO_GROUP_SIZE;
	uint64_t end = (CAS_MIN(off + len, rc->size) + CAS_BAO_GROUP_SIZE - 1) /
		       CAS_BAO_GROUP_SIZE;
	uint8_t buf[CHECK_GROUPS * CAS_BAO_GROUP_SIZE];
	for (uint64_t g = first; g < end;) {
		if (checked(rc, g)) {
			g++;
			continue;
		}
		uint64_t n = 1;
		while (n < CHECK_GROUPS && g + n < end && !checked(rc, g + n))
			n++;
		uint64_t at = g * CAS_BAO_GROUP_SIZE;
		size_t glen =
			(size_t)CAS_MIN(n * CAS_BAO_GROUP_SIZE, rc->size - at);
		int r = cas_pread_all(fd, buf, glen, at);
		if (r < 0)
			return r;
		uint64_t bad;
		r = cas_bao_verify_groups(&rc->d, rc->size, rc->outboard,
					  rc->outboard_len, g, buf, glen, &bad);
		if (r < 0)
			return r;
		for (uint64_t i = g; i < g + n; i++)
			atomic_fetch_or_explicit(&rc->bits[i / 8],
						 (uint8_t)(1u << (i % 8)),
						 memory_order_release);
		g += n;
	}
	return 0;
}

void cas_range_check_free(struct cas_range_check *rc)
{
	if (rc)
		free(rc->outboard);
	free(rc);
}
