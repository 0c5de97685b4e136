/* store.c - convenience wrappers over the cas_store operations. */
#include "store/store.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"

#define PUT_FD_CHUNK (1u << 20)

int cas_store_directory_get(cas_store *s, const cas_digest *d,
			    cas_directory **ret)
{
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len = 0;
	const char *why = NULL;
	int r = s->ops->directory_get_raw(s, d, &buf, &len);
	if (r < 0)
		return r;
	r = cas_directory_decode(buf, len, ret, &why);
	if (r == -EBADMSG) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "directory %s: %s", hex,
				     why ? why : "cannot decode");
	}
	return r;
}

int cas_store_directory_put(cas_store *s, const void *buf, size_t len,
			    cas_digest *ret_digest)
{
	cas_dir_batch *b;
	int r = s->ops->dir_batch_new(s, &b);
	if (r < 0)
		return r;
	r = b->ops->put(b, buf, len, ret_digest);
	if (r < 0) {
		b->ops->abort(b);
		return r;
	}
	return b->ops->commit(b, NULL, NULL);
}

/* The first size bytes of fd, malloc'd; what names them in a message. */
static int read_whole(const cas_digest *d, const char *what, int fd,
		      uint64_t size, size_t max, uint8_t **ret_buf)
{
	if (size > max)
		return -EFBIG;
	uint8_t *buf = malloc(size ? size : 1);
	if (!buf)
		return -ENOMEM;
	int r = cas_pread_all(fd, buf, (size_t)size, 0);
	if (r < 0) {
		free(buf);
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r == -EBADMSG ? -EIO : r, "read %s %s: %m",
				     what, hex);
	}
	*ret_buf = buf;
	return 0;
}

int cas_store_blob_read_fd(const cas_digest *d, int fd, uint64_t size,
			   size_t max, uint8_t **ret_buf, uint64_t *ret_size)
{
	int r = read_whole(d, "blob", fd, size, max, ret_buf);
	if (r == 0)
		*ret_size = size;
	return r;
}

int cas_store_blob_read(cas_store *s, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size)
{
	if (s->ops->blob_read)
		return s->ops->blob_read(s, d, max, ret_buf, ret_size);
	_cleanup_close_ int fd = -1;
	uint64_t size;
	int r = s->ops->blob_open(s, d, &fd, &size);
	if (r < 0)
		return r;
	return cas_store_blob_read_fd(d, fd, size, max, ret_buf, ret_size);
}

int cas_store_blob_outboard_read(cas_store *s, const cas_digest *d, size_t max,
				 uint8_t **ret_buf, size_t *ret_len)
{
	if (!s->ops->blob_outboard_open)
		return -ENOTSUP;
	_cleanup_close_ int fd = -1;
	uint64_t len;
	int r = s->ops->blob_outboard_open(s, d, &fd, &len);
	if (r < 0)
		return r;
	*ret_buf = NULL;
	*ret_len = 0;
	if (len == 0)
		return 0;
	r = read_whole(d, "outboard of blob", fd, len, max, ret_buf);
	if (r == 0)
		*ret_len = (size_t)len;
	return r;
}

int cas_store_blob_open_whole(cas_store *s, const cas_digest *d, uint64_t size,
			      int *ret_fd, uint64_t *ret_size)
{
	int r = -ENOTSUP;
	if (s->ops->blob_open_ranged && s->ops->blob_ensure)
		r = s->ops->blob_open_ranged(s, d, size, ret_fd);
	if (r == -ENOTSUP)
		return s->ops->blob_open(s, d, ret_fd, ret_size);
	if (r == 0 && (r = s->ops->blob_ensure(s, d, 0, size)) < 0)
		close(*ret_fd);
	if (r >= 0)
		*ret_size = size;
	return r < 0 ? r : 0;
}

int cas_store_blob_put_fd(cas_store *s, int fd, cas_digest *ret_digest,
			  uint64_t *ret_size)
{
	_cleanup_free_ uint8_t *buf = malloc(PUT_FD_CHUNK);
	if (!buf)
		return -ENOMEM;
	cas_blob_writer *w;
	int r = s->ops->blob_writer_new(s, &w);
	if (r < 0)
		return r;
	for (;;) {
		ssize_t n = read(fd, buf, PUT_FD_CHUNK);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			r = cas_negerrno();
			w->ops->abort(w);
			return cas_log_errno(r, "read blob input: %m");
		}
		if (n == 0)
			break;
		r = w->ops->write(w, buf, (size_t)n);
		if (r < 0) {
			w->ops->abort(w);
			return r;
		}
	}
	return w->ops->commit(w, NULL, ret_digest, ret_size);
}

bool cas_root_name_valid(const char *name)
{
	return name && cas_name_valid((const uint8_t *)name, strlen(name));
}
