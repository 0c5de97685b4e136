#include "castorefs/verified_i.h"

#include <errno.h>

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
