/* export.c - store -> filesystem.
 *
 * Works through the cas_store operations only, so any backend can be
 * exported. Everything is created relative to the parent folder's fd
 * (names are arbitrary bytes without '/' or NUL); modes are set with
 * fchmod so the umask does not change them. Blob bytes move with
 * copy_file_range from the blob's fd (read/write where it is refused);
 * small blobs are read whole and written, with no fd of their own (the
 * local store keeps them in packs).
 */
#include "store/import.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"

static int export_node(cas_store *s, int dir_fd, const char *name,
		       const char *path, const cas_node *node);

/* Read whole up to this size: the local store packs blobs this small,
 * and a pack has no fd per blob to copy from. */
#define SMALL_FILE (64u << 10)

static int export_file(cas_store *s, int dir_fd, const char *name,
		       const char *path, const cas_node *node)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&node->digest, hex);
	_cleanup_close_ int src = -1;
	_cleanup_free_ uint8_t *data = NULL;
	uint64_t size;
	int r = node->size <= SMALL_FILE
			? cas_store_blob_read(s, &node->digest, SMALL_FILE,
					      &data, &size)
			: s->ops->blob_open(s, &node->digest, &src, &size);
	if (r == -EFBIG)
		return cas_log_errno(-EBADMSG,
				     "export %s: blob %s has more than %u "
				     "bytes, expected %llu",
				     path, hex, SMALL_FILE,
				     (unsigned long long)node->size);
	if (r == -ENOENT)
		return cas_log_errno(r, "export %s: blob %s is missing", path,
				     hex);
	if (r < 0)
		return cas_log_errno(r, "export %s: blob %s: %m", path, hex);
	if (size != node->size)
		return cas_log_errno(
			-EBADMSG,
			"export %s: blob %s has %llu bytes, expected %llu",
			path, hex, (unsigned long long)size,
			(unsigned long long)node->size);
	mode_t mode = node->executable ? 0755 : 0644;
	_cleanup_close_ int dst = openat(
		dir_fd, name,
		O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
	if (dst < 0)
		return cas_log_errno(cas_negerrno(), "export %s: %m", path);
	r = data ? cas_write_all(dst, data, (size_t)size)
		 : cas_copy_fd(src, dst, size);
	if (r == -EBADMSG)
		return cas_log_errno(
			r, "export %s: blob %s is shorter than %llu bytes",
			path, hex, (unsigned long long)size);
	if (r < 0)
		return cas_log_errno(r, "export %s: %m", path);
	if (fchmod(dst, mode) < 0)
		return cas_log_errno(cas_negerrno(), "export %s: chmod: %m",
				     path);
	return 0;
}

static int export_directory(cas_store *s, int dir_fd, const char *name,
			    const char *path, const cas_node *node)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&node->digest, hex);
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	int r = cas_store_directory_get(s, &node->digest, &d);
	if (r == -ENOENT)
		return cas_log_errno(r, "export %s: directory %s is missing",
				     path, hex);
	if (r < 0)
		return cas_log_errno(r, "export %s: directory %s: %m", path,
				     hex);
	if (mkdirat(dir_fd, name, 0755) < 0)
		return cas_log_errno(cas_negerrno(), "export %s: mkdir: %m",
				     path);
	_cleanup_close_ int fd = openat(
		dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "export %s: %m", path);
	if (fchmod(fd, 0755) < 0)
		return cas_log_errno(cas_negerrno(), "export %s: chmod: %m",
				     path);
	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	for (int l = 0; l < 3; l++) {
		for (size_t i = 0; i < counts[l]; i++) {
			const cas_node *c = &lists[l][i];
			_cleanup_free_ char *cname =
				strndup((const char *)c->name, c->name_len);
			_cleanup_free_ char *cpath = NULL;
			if (!cname ||
			    asprintf(&cpath, "%s/%s", path, cname) < 0) {
				cpath = NULL;
				return -ENOMEM;
			}
			r = export_node(s, fd, cname, cpath, c);
			if (r < 0)
				return r;
		}
	}
	return 0;
}

static int export_node(cas_store *s, int dir_fd, const char *name,
		       const char *path, const cas_node *node)
{
	switch (node->type) {
	case CAS_NODE_DIRECTORY:
		return export_directory(s, dir_fd, name, path, node);
	case CAS_NODE_FILE:
		return export_file(s, dir_fd, name, path, node);
	case CAS_NODE_SYMLINK: {
		_cleanup_free_ char *target =
			strndup((const char *)node->target, node->target_len);
		if (!target)
			return -ENOMEM;
		if (symlinkat(target, dir_fd, name) < 0)
			return cas_log_errno(cas_negerrno(),
					     "export %s: symlink: %m", path);
		return 0;
	}
	}
	return cas_log_errno(-EINVAL, "export %s: unknown node type", path);
}

int cas_export(cas_store *s, const cas_node *node, const char *dest)
{
	const char *why = cas_node_check(node, true);
	if (why)
		return cas_log_errno(-EINVAL, "export %s: %s", dest, why);
	return export_node(s, AT_FDCWD, dest, dest, node);
}
