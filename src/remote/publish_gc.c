/* publish_gc.c - `castore gc --published DIR`: collect a published HTTP
 * layout (publish.c writes it; docs/remote.md, "Collecting a published
 * layout").
 *
 * Kept: the closure of every root of DIR/roots, and of every root of a
 * roots file that was replaced less than the grace ago (publish appends
 * the file it replaces to roots.history in its work folder, headed by
 * "@<seconds>"), so a client that fetched the previous roots file a
 * moment ago still finds every object of it; and every object whose
 * file is younger than the grace (with its closure, for Directories).
 * The rest goes: Directory files first, each only after every Directory
 * to be removed that names it (a Directory file that exists promises its
 * closure, and publish skips such a Directory, so a SIGKILL must never
 * leave one without a child), then packs, trees and blobs. gc holds the
 * work folder's gc.lock exclusively; every publish holds it shared for
 * its run, so none finds an object present that gc then removes. A dry
 * run takes no lock and changes nothing.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/dmap.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote.h"
#include "remote/remote_i.h"

/* A Directory file larger than this is not read (not one publish wrote). */
#define DIR_FILE_MAX (64u << 20)

struct pgc {
	int dirfd;
	const char *dir;
	const struct cas_gc_options *o;
	struct cas_gc_stats *st;
	int64_t cutoff; /* written at or before this: old enough to go */
	struct cas_dmap marked;
	cas_digest *stack;
	size_t n_stack, cap_stack;
	struct doomed *doomed; /* while they are listed */
};

static void rel_path(const char *kind, const cas_digest *d, char *buf,
		     size_t size)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	snprintf(buf, size, "%s/%.2s/%s", kind, hex, hex);
}

/* The Directory file of d, decoded and checked against its name; NULL
 * when absent or not a Directory of that digest. */
static cas_directory *dir_read(struct pgc *g, const cas_digest *d)
{
	char rel[128];
	rel_path("directories", d, rel, sizeof(rel));
	_cleanup_close_ int fd =
		openat(g->dirfd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    (uint64_t)st.st_size > DIR_FILE_MAX)
		return NULL;
	_cleanup_free_ uint8_t *buf = malloc((size_t)st.st_size + 1);
	if (!buf || cas_pread_all(fd, buf, (size_t)st.st_size, 0) < 0)
		return NULL;
	cas_digest got;
	cas_directory_digest(buf, (size_t)st.st_size, &got);
	cas_directory *dir = NULL;
	if (!cas_digest_eq(&got, d) ||
	    cas_directory_decode(buf, (size_t)st.st_size, &dir, NULL) < 0)
		return NULL;
	return dir;
}

static int mark_directory(struct pgc *g, const cas_digest *d)
{
	int r = cas_dmap_put(&g->marked, d, NULL);
	if (r <= 0)
		return r;
	if ((r = cas_array_grow(&g->stack, &g->cap_stack, g->n_stack + 1,
				sizeof(*g->stack), 256)) < 0)
		return r;
	g->stack[g->n_stack++] = *d;
	return 0;
}

static int mark_closure(struct pgc *g)
{
	while (g->n_stack) {
		cas_digest d = g->stack[--g->n_stack];
		_cleanup_(cas_directory_freep) cas_directory *dir =
			dir_read(g, &d);
		if (!dir)
			continue;
		int r;
		for (size_t i = 0; i < dir->n_directories; i++)
			if ((r = mark_directory(
				     g, &dir->directories[i].digest)) < 0)
				return r;
		for (size_t i = 0; i < dir->n_files; i++)
			if ((r = cas_dmap_put(&g->marked, &dir->files[i].digest,
					      NULL)) < 0)
				return r;
	}
	return 0;
}

static int mark_root(void *userdata, const char *name, const cas_node *node)
{
	(void)name;
	struct pgc *g = userdata;
	if (node->type == CAS_NODE_DIRECTORY)
		return mark_directory(g, &node->digest);
	if (node->type == CAS_NODE_FILE)
		return cas_dmap_put(&g->marked, &node->digest, NULL) < 0
			       ? -ENOMEM
			       : 0;
	return 0;
}

/* Marks from the roots files replaced within the grace and drops the
 * older ones from the history (rewritten by rename, not in a dry run). */
static int mark_history(struct pgc *g, int workfd)
{
	_cleanup_free_ char *buf = NULL;
	size_t len = 0;
	int r = cas_read_file_at(workfd, "roots.history", &buf, &len);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return r;
	_cleanup_free_ char *keep = malloc(len + 1);
	if (!keep)
		return -ENOMEM;
	size_t n_keep = 0, dropped = 0;
	char *p = buf, *end = buf + len;
	while (p < end) {
		/* A block: "@<seconds>\n" then lines up to the next '@'. */
		char *nl = memchr(p, '\n', (size_t)(end - p));
		if (*p != '@' || !nl)
			break; /* damaged: the rest is not trusted, kept */
		long long t = strtoll(p + 1, NULL, 10);
		char *body = nl + 1, *next = body;
		while (next < end && *next != '@') {
			char *e = memchr(next, '\n', (size_t)(end - next));
			next = e ? e + 1 : end;
		}
		if (t > g->cutoff) {
			r = cas_roots_file_parse(body, (size_t)(next - body),
						 mark_root, g);
			if (r < 0 && r != -EBADMSG)
				return r;
			memcpy(keep + n_keep, p, (size_t)(next - p));
			n_keep += (size_t)(next - p);
		} else {
			dropped++;
		}
		p = next;
	}
	if (p < end) { /* what could not be read stays, and keeps nothing */
		memcpy(keep + n_keep, p, (size_t)(end - p));
		n_keep += (size_t)(end - p);
	}
	if (g->o->dry_run || dropped == 0)
		return 0;
	int fd = openat(workfd, "roots.history.new",
			O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return cas_negerrno();
	r = cas_write_all(fd, keep, n_keep);
	if (r == 0 && fsync(fd) < 0)
		r = cas_negerrno();
	close(fd);
	if (r == 0 &&
	    renameat(workfd, "roots.history.new", workfd, "roots.history") < 0)
		r = cas_negerrno();
	return r;
}

/* Calls fn(g, fan_fd, name, digest, st) for every object file of kind. */
typedef int (*object_fn)(struct pgc *g, int fan_fd, const char *name,
			 const cas_digest *d, const struct stat *st);

static int each_object(struct pgc *g, const char *kind, object_fn fn)
{
	int kfd = openat(g->dirfd, kind, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (kfd < 0)
		return errno == ENOENT ? 0 : cas_negerrno();
	DIR *top = fdopendir(kfd);
	if (!top) {
		close(kfd);
		return -ENOMEM;
	}
	struct dirent *de;
	int r = 0;
	while (r == 0 && (de = readdir(top))) {
		if (strlen(de->d_name) != 2 || de->d_name[0] == '.')
			continue;
		int ffd =
			openat(kfd, de->d_name,
			       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (ffd < 0)
			continue;
		DIR *fan = fdopendir(ffd);
		if (!fan) {
			close(ffd);
			continue;
		}
		struct dirent *fe;
		while (r == 0 && (fe = readdir(fan))) {
			cas_digest d;
			struct stat st;
			if (cas_digest_from_hex(fe->d_name, &d) < 0 ||
			    fstatat(ffd, fe->d_name, &st, AT_SYMLINK_NOFOLLOW) <
				    0 ||
			    !S_ISREG(st.st_mode))
				continue;
			r = fn(g, ffd, fe->d_name, &d, &st);
		}
		closedir(fan);
	}
	closedir(top);
	return r;
}

static bool is_marked(const struct pgc *g, const cas_digest *d)
{
	return g->marked.n && cas_dmap_find(&g->marked, d);
}

/* Young Directories are kept with their closure. */
static int mark_young(struct pgc *g, int fan_fd, const char *name,
		      const cas_digest *d, const struct stat *st)
{
	(void)fan_fd;
	(void)name;
	if (is_marked(g, d) || st->st_mtime <= g->cutoff)
		return 0;
	int r = mark_directory(g, d);
	return r < 0 ? r : mark_closure(g);
}

/* The Directories to remove, with how many of them name each. */
struct doomed {
	struct cas_dmap index; /* digest -> 1 + position in v */
	struct doomed_dir {
		cas_digest digest;
		uint64_t size;
		size_t parents;
		size_t first_child, n_children; /* into children */
	} * v;
	size_t n, cap;
	size_t *children;
	size_t n_children, cap_children;
};

static int list_doomed(struct pgc *g, int fan_fd, const char *name,
		       const cas_digest *d, const struct stat *st)
{
	(void)fan_fd;
	(void)name;
	struct doomed *dm = g->doomed;
	if (is_marked(g, d))
		return 0;
	int r = cas_array_grow(&dm->v, &dm->cap, dm->n + 1, sizeof(*dm->v), 64);
	if (r < 0)
		return r;
	dm->v[dm->n] = (struct doomed_dir){*d, (uint64_t)st->st_size, 0, 0, 0};
	if ((r = cas_dmap_put(&dm->index, d, (void *)(uintptr_t)(dm->n + 1))) <
	    0)
		return r;
	dm->n++;
	return 0;
}

static int link_doomed(struct pgc *g, struct doomed *dm)
{
	for (size_t i = 0; i < dm->n; i++) {
		_cleanup_(cas_directory_freep) cas_directory *dir =
			dir_read(g, &dm->v[i].digest);
		dm->v[i].first_child = dm->n_children;
		if (!dir)
			continue;
		for (size_t c = 0; c < dir->n_directories; c++) {
			struct cas_dmap_entry *e = cas_dmap_find(
				&dm->index, &dir->directories[c].digest);
			if (!e)
				continue;
			int r = cas_array_grow(&dm->children, &dm->cap_children,
					       dm->n_children + 1,
					       sizeof(*dm->children), 256);
			if (r < 0)
				return r;
			size_t k = (size_t)(uintptr_t)e->value - 1;
			dm->children[dm->n_children++] = k;
			dm->v[k].parents++;
			dm->v[i].n_children++;
		}
	}
	return 0;
}

/* Parents first (Kahn's order): a Directory file goes only once no
 * Directory file that names it is left. */
static int remove_doomed(struct pgc *g, struct doomed *dm)
{
	_cleanup_free_ size_t *queue = malloc((dm->n + 1) * sizeof(*queue));
	if (!queue)
		return -ENOMEM;
	size_t head = 0, tail = 0;
	for (size_t i = 0; i < dm->n; i++)
		if (dm->v[i].parents == 0)
			queue[tail++] = i;
	while (head < tail) {
		struct doomed_dir *x = &dm->v[queue[head++]];
		char rel[128];
		rel_path("directories", &x->digest, rel, sizeof(rel));
		if (!g->o->dry_run && unlinkat(g->dirfd, rel, 0) < 0 &&
		    errno != ENOENT)
			return cas_log_errno(cas_negerrno(),
					     "%s: remove %s: %m", g->dir, rel);
		g->st->directories++;
		g->st->directory_bytes += x->size;
		for (size_t c = 0; c < x->n_children; c++) {
			size_t k = dm->children[x->first_child + c];
			if (--dm->v[k].parents == 0)
				queue[tail++] = k;
		}
	}
	/* A cycle cannot be (digests), but damaged files could fake one:
	 * what is left stays. */
	return 0;
}

static int remove_object(struct pgc *g, int fan_fd, const char *name,
			 const cas_digest *d, const struct stat *st,
			 uint64_t *ret_n, uint64_t *ret_bytes)
{
	if (is_marked(g, d))
		return 0;
	if (st->st_mtime > g->cutoff) {
		g->st->kept_young++;
		return 0;
	}
	if (!g->o->dry_run && unlinkat(fan_fd, name, 0) < 0)
		return 0;
	(*ret_n)++;
	*ret_bytes += (uint64_t)st->st_size;
	return 0;
}

static int remove_blob(struct pgc *g, int fan_fd, const char *name,
		       const cas_digest *d, const struct stat *st)
{
	return remove_object(g, fan_fd, name, d, st, &g->st->blob_files,
			     &g->st->blob_file_bytes);
}

static int remove_pack(struct pgc *g, int fan_fd, const char *name,
		       const cas_digest *d, const struct stat *st)
{
	return remove_object(g, fan_fd, name, d, st, &g->st->packs_removed,
			     &g->st->pack_bytes);
}

static int collect(struct pgc *g, int workfd)
{
	_cleanup_free_ char *roots = NULL;
	size_t len = 0;
	int r = cas_read_file_at(g->dirfd, "roots", &roots, &len);
	if (r == -ENOENT)
		return cas_log_errno(r, "%s: no published roots file here",
				     g->dir);
	if (r < 0)
		return r;
	if ((r = cas_roots_file_parse(roots, len, mark_root, g)) < 0)
		return r == -EBADMSG
			       ? cas_log_errno(r, "%s/roots: malformed", g->dir)
			       : r;
	if ((r = mark_history(g, workfd)) < 0 || (r = mark_closure(g)) < 0)
		return r;
	if ((r = each_object(g, "directories", mark_young)) < 0)
		return r;
	g->st->reachable = g->marked.n;

	struct doomed dm = {0};
	g->doomed = &dm;
	r = each_object(g, "directories", list_doomed);
	g->doomed = NULL;
	if (r == 0)
		r = link_doomed(g, &dm);
	if (r == 0)
		r = remove_doomed(g, &dm);
	cas_dmap_release(&dm.index, NULL);
	free(dm.v);
	free(dm.children);
	if (r < 0)
		return r;
	/* A removed Directory's pack and tree file, and dead blobs. */
	if ((r = each_object(g, "packs", remove_pack)) < 0 ||
	    (r = each_object(g, "trees", remove_pack)) < 0)
		return r;
	return each_object(g, "blobs", remove_blob);
}

int cas_remote_publish_gc(const char *dir, const struct cas_gc_options *o,
			  struct cas_gc_stats *ret)
{
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	struct cas_gc_stats st = {0};
	struct pgc g = {.dir = dir, .o = o, .st = &st};
	g.cutoff = (int64_t)time(NULL) - (int64_t)o->grace_s;
	g.dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (g.dirfd < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", dir);
	int workfd = -1, lockfd = -1;
	int r = cas_publish_work_open(g.dirfd, dir, &workfd);
	if (r == 0 && !o->dry_run) {
		lockfd = openat(workfd, "gc.lock", O_CREAT | O_RDWR | O_CLOEXEC,
				0600);
		while (lockfd >= 0 && flock(lockfd, LOCK_EX) < 0 &&
		       errno == EINTR)
			;
		if (lockfd < 0)
			r = cas_log_errno(cas_negerrno(),
					  "%s: work folder gc.lock: %m", dir);
	}
	if (r == 0)
		r = collect(&g, workfd);
	if (lockfd >= 0)
		close(lockfd);
	if (workfd >= 0)
		close(workfd);
	close(g.dirfd);
	cas_dmap_release(&g.marked, NULL);
	free(g.stack);
	if (r < 0)
		return r;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	st.seconds = (double)(t1.tv_sec - t0.tv_sec) +
		     (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	*ret = st;
	return 0;
}
