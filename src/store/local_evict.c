/* local_evict.c - eviction of blob files, for a bounded cache
 * (--cache-max; ingest.h).
 *
 * Only blob files are evicted (Directories are small and a Directory's
 * presence promises its children; packed blobs stay until gc rewrites
 * packs). Least recently used first: the cache marks a blob used
 * (cas_local_blob_mark_used) whenever it hands it out, which sets its
 * access time and takes a shared flock on the fd; flock locks live as
 * long as the open file, so a blob whose exclusive flock cannot be taken
 * is in use, by this process or another, and is kept.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>

#include "core/log.h"
#include "core/util.h"
#include "store/local_i.h"

struct blob_file {
	char name[3 + CAS_DIGEST_HEX_LEN + 1]; /* "ab/<hex>" */
	struct timespec atime;
	uint64_t size;
};

struct blob_list {
	struct blob_file *v;
	size_t n, cap;
	uint64_t total;
};

static bool is_hex_name(const char *name)
{
	cas_digest d;
	return cas_digest_from_hex(name, &d) == 0;
}

/* Lists DIR/blobs/xx/<hex>; keep_list false: only sums the sizes. */
static int list_blobs(struct cas_local *ls, struct blob_list *l, bool keep_list)
{
	int bfd = openat(ls->blobs_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (bfd < 0)
		return cas_negerrno();
	DIR *top = fdopendir(bfd);
	if (!top) {
		close(bfd);
		return cas_negerrno();
	}
	struct dirent *de;
	int r = 0;
	while (r >= 0 && (de = readdir(top))) {
		if (strlen(de->d_name) != 2 || de->d_name[0] == '.')
			continue;
		int sfd = openat(bfd, de->d_name,
				 O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (sfd < 0)
			continue;
		DIR *sub = fdopendir(sfd);
		if (!sub) {
			close(sfd);
			continue;
		}
		struct dirent *fe;
		while ((fe = readdir(sub))) {
			struct stat st;
			if (!is_hex_name(fe->d_name) ||
			    fstatat(sfd, fe->d_name, &st, AT_SYMLINK_NOFOLLOW) <
				    0 ||
			    !S_ISREG(st.st_mode))
				continue;
			l->total += (uint64_t)st.st_size;
			if (!keep_list)
				continue;
			if ((r = cas_array_grow(&l->v, &l->cap, l->n + 1,
						sizeof(*l->v), 1024)) < 0)
				break;
			struct blob_file *b = &l->v[l->n++];
			memcpy(b->name, de->d_name, 2);
			b->name[2] = '/';
			memcpy(b->name + 3, fe->d_name, CAS_DIGEST_HEX_LEN + 1);
			b->atime = st.st_atim;
			b->size = (uint64_t)st.st_size;
		}
		closedir(sub);
	}
	closedir(top);
	return r;
}

int64_t cas_local_blob_bytes(cas_store *s)
{
	struct blob_list l = {0};
	int r = list_blobs(to_local(s), &l, false);
	return r < 0 ? r : (int64_t)l.total;
}

static int by_atime(const void *a, const void *b)
{
	const struct blob_file *x = a, *y = b;
	if (x->atime.tv_sec != y->atime.tv_sec)
		return x->atime.tv_sec < y->atime.tv_sec ? -1 : 1;
	if (x->atime.tv_nsec != y->atime.tv_nsec)
		return x->atime.tv_nsec < y->atime.tv_nsec ? -1 : 1;
	return 0;
}

int64_t cas_local_evict(cas_store *s, uint64_t target)
{
	struct cas_local *ls = to_local(s);
	struct blob_list l = {0};
	int r = list_blobs(ls, &l, true);
	if (r < 0) {
		free(l.v);
		return cas_log_errno(r, "cache %s: list blobs: %m", ls->dir);
	}
	if (l.n > 1)
		qsort(l.v, l.n, sizeof(*l.v), by_atime);
	size_t evicted = 0;
	for (size_t i = 0; i < l.n && l.total > target; i++) {
		_cleanup_close_ int fd =
			openat(ls->blobs_fd, l.v[i].name,
			       O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (fd < 0)
			continue;
		if (flock(fd, LOCK_EX | LOCK_NB) < 0)
			continue; /* open somewhere: in use */
		if (unlinkat(ls->blobs_fd, l.v[i].name, 0) < 0)
			continue;
		l.total -= l.v[i].size;
		evicted++;
	}
	if (evicted)
		cas_log_debug("cache %s: evicted %zu blobs, %llu bytes left",
			      ls->dir, evicted, (unsigned long long)l.total);
	free(l.v);
	return (int64_t)l.total;
}

void cas_local_blob_mark_used(int fd)
{
	(void)flock(fd, LOCK_SH | LOCK_NB);
	struct timespec ts[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};
	(void)futimens(fd, ts);
}
