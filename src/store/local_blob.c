/* local_blob.c - reading blob files of the local store (DIR/blobs/ab/<hex>)
 * and the blob operations that look in packs first (local_pack.c).
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

int cas_local_blob_exists(struct cas_local *ls, const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	if (fstatat(ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0)
		return 1;
	if (errno == ENOENT)
		return 0;
	return cas_log_errno(cas_negerrno(), "stat blob %s: %m", rel + 3);
}

int cas_local_blob_path(cas_store *s, const cas_digest *d, char *buf,
			size_t size)
{
	struct cas_local *ls = to_local(s);
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int n = snprintf(buf, size, "%s/blobs/%s", ls->dir, rel);
	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

int cas_local_blob_stat(cas_store *s, const cas_digest *d, uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	int r = cas_local_packed_get(ls, d, PACKED_SIZE, &size, NULL, NULL);
	if (r != 0) {
		if (r > 0 && ret_size)
			*ret_size = size;
		return r < 0 ? r : 0;
	}
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	if (fstatat(ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		if (errno == ENOENT)
			return -ENOENT;
		return cas_log_errno(cas_negerrno(), "stat blob %s: %m",
				     rel + 3);
	}
	if (!S_ISREG(st.st_mode))
		return cas_log_errno(-EIO, "blob %s: not a regular file",
				     rel + 3);
	if (ret_size)
		*ret_size = (uint64_t)st.st_size;
	return 0;
}

/* A blob file opened and checked to be a regular file. */
static int blob_file_open(struct cas_local *ls, const cas_digest *d,
			  int *ret_fd, uint64_t *ret_size)
{
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	_cleanup_close_ int fd =
		openat(ls->blobs_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		if (errno == ENOENT)
			return -ENOENT;
		return cas_log_errno(cas_negerrno(), "open blob %s: %m",
				     rel + 3);
	}
	if (fstat(fd, &st) < 0)
		return cas_log_errno(cas_negerrno(), "stat blob %s: %m",
				     rel + 3);
	if (!S_ISREG(st.st_mode))
		return cas_log_errno(-EIO, "blob %s: not a regular file",
				     rel + 3);
	*ret_size = (uint64_t)st.st_size;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

int cas_local_blob_open(cas_store *s, const cas_digest *d, int *ret_fd,
			uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	int r = cas_local_packed_get(ls, d, PACKED_MEMFD, &size, NULL, ret_fd);
	if (r == 0)
		r = blob_file_open(ls, d, ret_fd, &size);
	else if (r > 0)
		r = 0;
	if (r == 0 && ret_size)
		*ret_size = size;
	return r;
}

int cas_local_blob_read(cas_store *s, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	uint8_t *buf = NULL;
	int r = cas_local_packed_get(ls, d, PACKED_COPY, &size, &buf, NULL);
	if (r > 0 && size > max) {
		free(buf);
		return -EFBIG;
	}
	if (r == 0) {
		_cleanup_close_ int fd = -1;
		if ((r = blob_file_open(ls, d, &fd, &size)) < 0)
			return r;
		if (size > max)
			return -EFBIG;
		if (!(buf = malloc(size ? size : 1)))
			return -ENOMEM;
		if ((r = cas_pread_all(fd, buf, size, 0)) < 0) {
			free(buf);
			char hex[CAS_DIGEST_HEX_LEN + 1];
			cas_digest_to_hex(d, hex);
			return cas_log_errno(r == -EBADMSG ? -EIO : r,
					     "read blob %s: %m", hex);
		}
	}
	if (r < 0)
		return r;
	*ret_buf = buf;
	*ret_size = size;
	return 0;
}
