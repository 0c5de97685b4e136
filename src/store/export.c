/* export.c - store -> filesystem.
 *
 * Works through the cas_store operations only, so any backend can be
 * exported. The walk is iterative: one frame per level (the decoded
 * Directory and where the walk is in it) and one open directory fd in
 * all, whatever the depth. Going down opens the new folder relative to
 * the current one; going back up opens ".." and checks that it is the
 * folder the walk came from (same device and inode), so a concurrent
 * rename cannot make export write outside DEST. Names are arbitrary
 * bytes without '/' or NUL; modes are set with fchmod so the umask does
 * not change them.
 *
 * Every byte written is hashed on its way out: small blobs are checked
 * before the file is created, large ones while they are copied, and a
 * file whose bytes do not hash to its digest is removed again before the
 * error is reported (what was exported before it stays: export is not
 * atomic).
 */
#include "store/import.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"

/* Read whole up to this size: the local store packs blobs this small,
 * and a pack has no fd per blob to copy from. */
#define SMALL_FILE (64u << 10)

/* The path of the entry being written, for error lines only: grows and
 * shrinks with the walk, so memory stays linear in the depth. */
struct path {
	char *buf;
	size_t len, cap;
};

static int path_push(struct path *p, const uint8_t *name, size_t len)
{
	size_t need = p->len + 1 + len + 1;
	if (need > p->cap) {
		size_t cap = CAS_MAX(need, p->cap * 2);
		char *b = realloc(p->buf, cap);
		if (!b)
			return -ENOMEM;
		p->buf = b;
		p->cap = cap;
	}
	p->buf[p->len++] = '/';
	memcpy(p->buf + p->len, name, len);
	p->len += len;
	p->buf[p->len] = '\0';
	return 0;
}

/* The last component of the path: NUL-terminated, as *at() calls want. */
static const char *path_leaf(const struct path *p, size_t name_len)
{
	return p->buf + p->len - name_len;
}

static void path_pop(struct path *p, size_t name_len)
{
	p->len -= name_len + 1;
	p->buf[p->len] = '\0';
}

static int blob_mismatch(int dir_fd, const char *name, const char *path,
			 const char *hex)
{
	if (name)
		(void)unlinkat(dir_fd, name, 0);
	return cas_log_errno(-EBADMSG,
			     "%s: blob %s: content does not match its "
			     "digest",
			     path, hex);
}

static int export_file(cas_store *s, int dir_fd, const char *name,
		       const char *path, const cas_node *node)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&node->digest, hex);
	_cleanup_close_ int src = -1;
	_cleanup_free_ uint8_t *data = NULL;
	uint64_t size;
	cas_digest got;
	/* What the store names itself (a remote that is down, a pack that
	 * cannot be read) is not named again here. */
	unsigned long mark = cas_log_thread_error_count();
	int r = node->size <= SMALL_FILE
			? cas_store_blob_read(s, &node->digest, SMALL_FILE,
					      &data, &size)
			: cas_store_blob_open_whole(s, &node->digest,
						    node->size, &src, &size);
	if (r == -EFBIG)
		return cas_log_errno(-EBADMSG,
				     "%s: blob %s has more than %u "
				     "bytes, expected %llu",
				     path, hex, SMALL_FILE,
				     (unsigned long long)node->size);
	if (r == -ENOENT)
		return cas_log_errno(r, "%s: blob %s is missing", path, hex);
	if (r < 0)
		return cas_log_errno_if_silent(mark, r, "%s: blob %s: %m", path,
					       hex);
	if (size != node->size)
		return cas_log_errno(
			-EBADMSG, "%s: blob %s has %llu bytes, expected %llu",
			path, hex, (unsigned long long)size,
			(unsigned long long)node->size);
	if (data) {
		cas_hash_buffer(data, (size_t)size, &got);
		if (!cas_digest_eq(&got, &node->digest))
			return blob_mismatch(-1, NULL, path, hex);
	}
	mode_t mode = node->executable ? 0755 : 0644;
	_cleanup_close_ int dst = openat(
		dir_fd, name,
		O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
	if (dst < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", path);
	r = data ? cas_write_all(dst, data, (size_t)size)
		 : cas_copy_fd_hashed(src, dst, size, &got);
	if (r == -EBADMSG) {
		(void)unlinkat(dir_fd, name, 0);
		return cas_log_errno(r,
				     "%s: blob %s is shorter than %llu bytes",
				     path, hex, (unsigned long long)size);
	}
	if (r < 0)
		return cas_log_errno(r, "%s: %m", path);
	if (!data && !cas_digest_eq(&got, &node->digest))
		return blob_mismatch(dir_fd, name, path, hex);
	if (fchmod(dst, mode) < 0)
		return cas_log_errno(cas_negerrno(), "%s: chmod: %m", path);
	return 0;
}

static int export_symlink(int dir_fd, const char *name, const char *path,
			  const cas_node *node)
{
	_cleanup_free_ char *target =
		strndup((const char *)node->target, node->target_len);
	if (!target)
		return -ENOMEM;
	if (symlinkat(target, dir_fd, name) < 0)
		return cas_log_errno(cas_negerrno(), "%s: symlink: %m", path);
	return 0;
}

/* Creates folder `name` in dir_fd, and returns its fd, its Directory
 * and its identity (to recognise it again from below through ".."). */
static int enter_directory(cas_store *s, int dir_fd, const char *name,
			   const char *path, const cas_node *node,
			   cas_directory **ret_d, int *ret_fd,
			   struct stat *ret_st)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(&node->digest, hex);
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	unsigned long mark = cas_log_thread_error_count();
	int r = cas_store_directory_get(s, &node->digest, &d);
	if (r == -ENOENT)
		return cas_log_errno(r, "%s: directory %s is missing", path,
				     hex);
	if (r < 0)
		return cas_log_errno_if_silent(mark, r, "%s: directory %s: %m",
					       path, hex);
	if (mkdirat(dir_fd, name, 0755) < 0)
		return cas_log_errno(cas_negerrno(), "%s: mkdir: %m", path);
	_cleanup_close_ int fd = openat(
		dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", path);
	if (fchmod(fd, 0755) < 0 || fstat(fd, ret_st) < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", path);
	*ret_d = TAKE_PTR(d);
	*ret_fd = TAKE_FD(fd);
	return 0;
}

struct frame {
	cas_directory *d;
	size_t next;	 /* index over directories, then files, then symlinks */
	size_t name_len; /* of this folder's name in the path */
	dev_t dev;
	ino_t ino;
};

static const cas_node *frame_child(const struct frame *f, size_t i)
{
	const cas_directory *d = f->d;
	if (i < d->n_directories)
		return &d->directories[i];
	i -= d->n_directories;
	if (i < d->n_files)
		return &d->files[i];
	i -= d->n_files;
	return i < d->n_symlinks ? &d->symlinks[i] : NULL;
}

static int export_tree(cas_store *s, const cas_node *root, const char *dest)
{
	struct path path = {0};
	struct frame *stack = NULL;
	size_t depth = 0, cap = 0;
	int fd = -1, r;
	struct stat st;

	path.buf = strdup(dest);
	if (!path.buf)
		return -ENOMEM;
	path.len = path.cap = strlen(dest);
	path.cap++;

	cas_directory *d = NULL;
	r = enter_directory(s, AT_FDCWD, dest, dest, root, &d, &fd, &st);
	if (r < 0)
		goto out;
	stack = malloc(sizeof(*stack) * (cap = 64));
	if (!stack) {
		cas_directory_free(d);
		r = -ENOMEM;
		goto out;
	}
	stack[depth++] = (struct frame){d, 0, 0, st.st_dev, st.st_ino};

	while (depth) {
		struct frame *f = &stack[depth - 1];
		const cas_node *c = frame_child(f, f->next++);
		if (!c) {
			/* This folder is done: back to the one above. */
			size_t name_len = f->name_len;
			cas_directory_free(f->d);
			depth--;
			if (!depth)
				break;
			path_pop(&path, name_len);
			int up = openat(fd, "..",
					O_RDONLY | O_DIRECTORY | O_CLOEXEC);
			if (up < 0 || fstat(up, &st) < 0) {
				r = cas_log_errno(cas_negerrno(), "%s: %m",
						  path.buf);
				if (up >= 0)
					close(up);
				goto out;
			}
			close(fd);
			fd = up;
			if (st.st_dev != stack[depth - 1].dev ||
			    st.st_ino != stack[depth - 1].ino) {
				r = cas_log_errno(-ESTALE,
						  "%s: moved while "
						  "being exported",
						  path.buf);
				goto out;
			}
			continue;
		}
		r = path_push(&path, c->name, c->name_len);
		if (r < 0)
			goto out;
		const char *name = path_leaf(&path, c->name_len);
		if (c->type == CAS_NODE_FILE)
			r = export_file(s, fd, name, path.buf, c);
		else if (c->type == CAS_NODE_SYMLINK)
			r = export_symlink(fd, name, path.buf, c);
		else {
			if (depth == cap) {
				struct frame *ns =
					realloc(stack, sizeof(*ns) * cap * 2);
				if (!ns) {
					r = -ENOMEM;
					goto out;
				}
				stack = ns;
				cap *= 2;
			}
			int cfd;
			r = enter_directory(s, fd, name, path.buf, c, &d, &cfd,
					    &st);
			if (r >= 0) {
				close(fd);
				fd = cfd;
				stack[depth++] =
					(struct frame){d, 0, c->name_len,
						       st.st_dev, st.st_ino};
				continue;
			}
		}
		if (r < 0)
			goto out;
		path_pop(&path, c->name_len);
	}
	r = 0;
out:
	while (depth)
		cas_directory_free(stack[--depth].d);
	free(stack);
	free(path.buf);
	if (fd >= 0)
		close(fd);
	return r;
}

int cas_export(cas_store *s, const cas_node *node, const char *dest)
{
	const char *why = cas_node_check(node, true);
	if (why)
		return cas_log_errno(-EINVAL, "%s: %s", dest, why);
	switch (node->type) {
	case CAS_NODE_DIRECTORY:
		return export_tree(s, node, dest);
	case CAS_NODE_FILE:
		return export_file(s, AT_FDCWD, dest, dest, node);
	case CAS_NODE_SYMLINK:
		return export_symlink(AT_FDCWD, dest, dest, node);
	}
	return cas_log_errno(-EINVAL, "%s: unknown node type", dest);
}
