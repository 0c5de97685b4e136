/* publish.c - `castore publish DIR [NAME...]`: the static HTTP layout
 * (docs/remote.md).
 *
 *   DIR/blobs/ab/<hex>        the blob's bytes
 *   DIR/outboards/ab/<hex>    a large blob's outboard (core/bao.h)
 *   DIR/directories/ab/<hex>  the Directory's canonical bytes
 *   DIR/packs/ab/<hex>        its small files back to back (remote_i.h)
 *   DIR/trees/ab/<hex>        a root Directory's closure (remote_i.h)
 *   DIR/roots                 the published roots (remote_i.h format)
 *
 * Files being written wait outside the published tree, in a work folder
 * beside DIR on the same file system (see work_open), so a web server
 * that serves DIR never serves half-written bytes, and what a killed
 * publish left is found and removed by the next one at once.
 *
 * Objects are written leaves first (a Directory after all it names and
 * its pack), each to a temporary file then linked into place without
 * overwriting, so a Directory file that exists promises its whole
 * closure and its pack, and publishing again skips it. Names are given
 * in groups: the written objects wait unnamed until PUBLISH_GROUP do,
 * one syncfs makes them durable, then each is linked in the order it
 * was written - so no name points at bytes a crash could cut, and the
 * order above holds at any moment. (An fdatasync per object cost 43 s
 * of the 48 s /usr/share took.) All objects are named before the roots
 * file is replaced by rename: a reader never sees a root whose objects
 * are missing.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <dirent.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/bao.h"
#include "core/log.h"
#include "core/varint.h"
#include "core/util.h"
#include "remote/remote.h"
#include "remote/remote_i.h"

#define PUBLISH_GROUP 4096

/* An object written to tmp, to be linked at path once durable. */
struct pending_name {
	char tmp[48];
	char path[96];
};

struct publisher {
	cas_store *s;
	int dirfd;
	int workfd;  /* the work folder beside DIR */
	int tmpfd;   /* this publisher's own folder in it */
	int lockfd;  /* flock held on <id>.lock while we run */
	int gcfd;    /* gc.lock in the work folder, shared while we run */
	char id[17]; /* its name */
	char *dir;
	/* Objects known to be in DIR. Two maps: the empty file and the empty
	 * Directory have the same digest. */
	struct cas_dmap blobs_done, dirs_done;
	struct cas_remote_progress p;
	cas_remote_progress_cb progress;
	void *userdata;
	uint64_t tmp_seq;	      /* names in our own folder */
	struct pending_name *pending; /* in the order written */
	size_t n_pending, cap_pending;
};

static void tick(struct publisher *pb)
{
	if (pb->progress && ((pb->p.blobs + pb->p.directories) & 255) == 0)
		pb->progress(pb->userdata, &pb->p);
}

static void object_path(const char *kind, const cas_digest *d, char *buf,
			size_t size)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	snprintf(buf, size, "%s/%.2s/%s", kind, hex, hex);
}

static int ensure_fanout(struct publisher *pb, const char *path)
{
	char sub[64];
	const char *slash = strrchr(path, '/');
	size_t n = (size_t)(slash - path);
	memcpy(sub, path, n);
	sub[n] = 0;
	if (mkdirat(pb->dirfd, sub, 0755) < 0 && errno != EEXIST)
		return cas_negerrno();
	return 0;
}

/* A new file in this publisher's own folder (its name into tmp). */
static int tmp_open(struct publisher *pb, const char *suffix, char *tmp,
		    size_t size)
{
	snprintf(tmp, size, "%016llx%s", (unsigned long long)pb->tmp_seq++,
		 suffix);
	int fd = openat(pb->tmpfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
			0644);
	return fd < 0 ? cas_negerrno() : fd;
}

/* A temporary file for the object at path, whose fan-out folder it
 * makes. */
static int tmp_create(struct publisher *pb, const char *path, char *tmp,
		      size_t size)
{
	int r = ensure_fanout(pb, path);
	return r < 0 ? r : tmp_open(pb, "", tmp, size);
}

/* The written temporary file (r: how writing it went) is to get its
 * name with the next group (publish_flush); a failed one is removed. */
static int tmp_commit(struct publisher *pb, const char *tmp, const char *path,
		      int r)
{
	if (r >= 0 && pb->n_pending == pb->cap_pending) {
		size_t cap = pb->cap_pending ? 2 * pb->cap_pending : 256;
		struct pending_name *np =
			realloc(pb->pending, cap * sizeof(*np));
		if (np) {
			pb->pending = np;
			pb->cap_pending = cap;
		} else {
			r = -ENOMEM;
		}
	}
	if (r < 0) {
		(void)unlinkat(pb->tmpfd, tmp, 0);
		return r;
	}
	struct pending_name *p = &pb->pending[pb->n_pending++];
	snprintf(p->tmp, sizeof(p->tmp), "%s", tmp);
	snprintf(p->path, sizeof(p->path), "%s", path);
	return 0;
}

/* Names the objects written so far: one syncfs, then each linked in the
 * order written (an existing name is left alone: it holds the same
 * bytes), the temporary names removed. A later publish skips names that
 * exist, so a name must never point at bytes a crash could cut. On a
 * failure nothing after it is named. */
static int publish_flush(struct publisher *pb)
{
	if (pb->n_pending == 0)
		return 0;
	int r = syncfs(pb->dirfd) < 0 ? cas_negerrno() : 0;
	if (r < 0)
		cas_log_errno(r, "%s: syncfs: %m", pb->dir);
	for (size_t i = 0; i < pb->n_pending; i++) {
		const struct pending_name *p = &pb->pending[i];
		if (r >= 0 &&
		    linkat(pb->tmpfd, p->tmp, pb->dirfd, p->path, 0) < 0 &&
		    errno != EEXIST)
			r = cas_log_errno(cas_negerrno(), "%s/%s: %m", pb->dir,
					  p->path);
		(void)unlinkat(pb->tmpfd, p->tmp, 0);
	}
	pb->n_pending = 0;
	return r;
}

static int maybe_flush(struct publisher *pb)
{
	return pb->n_pending >= PUBLISH_GROUP ? publish_flush(pb) : 0;
}

/* Writes an object from an fd (blob) or a buffer (Directory) to path. */
static int write_object(struct publisher *pb, const char *path, int in_fd,
			uint64_t size, const void *buf, size_t len)
{
	char tmp[128];
	int r;
	_cleanup_close_ int fd = tmp_create(pb, path, tmp, sizeof(tmp));
	if (fd < 0)
		return fd;
	if (in_fd >= 0)
		r = cas_copy_fd(in_fd, fd, size);
	else
		r = len ? cas_write_all(fd, buf, len) : 0;
	return tmp_commit(pb, tmp, path, r);
}

static bool object_exists(struct publisher *pb, const char *path)
{
	return faccessat(pb->dirfd, path, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
}

/* A large blob's outboard beside it (docs/remote.md, "The HTTP
 * layout"): readers fetch it to verify ranges of the blob. */
static int publish_outboard(struct publisher *pb, const cas_digest *d,
			    const char *hex)
{
	char path[128];
	object_path("outboards", d, path, sizeof(path));
	if (object_exists(pb, path))
		return 0;
	if (!pb->s->ops->blob_outboard_open)
		return 0; /* a store that keeps none: readers read it whole */
	_cleanup_close_ int fd = -1;
	uint64_t len;
	int r = pb->s->ops->blob_outboard_open(pb->s, d, &fd, &len);
	if (r < 0)
		return cas_log_errno(r, "blob %s: outboard: %m", hex);
	r = write_object(pb, path, fd, len, NULL, 0);
	if (r < 0)
		return cas_log_errno(r,
				     "blob %s: write its outboard into %s: %m",
				     hex, pb->dir);
	pb->p.sent_objects++;
	pb->p.sent_bytes += len;
	return 0;
}

static int publish_blob(struct publisher *pb, const cas_digest *d)
{
	char path[128], hex[CAS_DIGEST_HEX_LEN + 1];
	int r = cas_dmap_put(&pb->blobs_done, d, NULL);
	if (r <= 0)
		return r;
	pb->p.blobs++;
	tick(pb);
	object_path("blobs", d, path, sizeof(path));
	cas_digest_to_hex(d, hex);
	struct stat st;
	if (fstatat(pb->dirfd, path, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		/* Published before; by a castore without outboards, maybe. */
		if (!cas_bao_wants_outboard((uint64_t)st.st_size))
			return 0;
		return publish_outboard(pb, d, hex);
	}
	_cleanup_close_ int fd = -1;
	uint64_t size;
	r = pb->s->ops->blob_open(pb->s, d, &fd, &size);
	if (r < 0)
		return cas_log_errno(r, "blob %s: %m", hex);
	/* The outboard is written (and so named) before the blob. */
	if (cas_bao_wants_outboard(size) &&
	    (r = publish_outboard(pb, d, hex)) < 0)
		return r;
	r = write_object(pb, path, fd, size, NULL, 0);
	if (r < 0)
		return cas_log_errno(r, "blob %s: write into %s: %m", hex,
				     pb->dir);
	pb->p.sent_objects++;
	pb->p.sent_bytes += size;
	return 0;
}

/* The pack of Directory d (remote_i.h), written before the Directory so
 * that a Directory file promises its pack too. A file whose bytes do
 * not have the size the Directory gives leaves the Directory without a
 * pack: readers then fetch its blobs one by one. */
static int publish_pack(struct publisher *pb, const cas_digest *d,
			const cas_directory *dir)
{
	char path[128], tmp[128], hex[CAS_DIGEST_HEX_LEN + 1];
	uint64_t len;
	_cleanup_free_ uint64_t *off =
		malloc((dir->n_files ? dir->n_files : 1) * sizeof(*off));
	if (!off)
		return -ENOMEM;
	if (cas_layout_pack_offsets(dir, off, &len) == 0)
		return 0;
	object_path("packs", d, path, sizeof(path));
	if (object_exists(pb, path))
		return 0;
	int r = 0;
	_cleanup_close_ int fd = tmp_create(pb, path, tmp, sizeof(tmp));
	if (fd < 0)
		return fd;
	for (size_t i = 0; i < dir->n_files && r >= 0; i++) {
		const cas_node *f = &dir->files[i];
		_cleanup_free_ uint8_t *buf = NULL;
		uint64_t size;
		if (off[i] == UINT64_MAX)
			continue;
		r = cas_store_blob_read(pb->s, &f->digest, f->size, &buf,
					&size);
		if (r == -EFBIG || (r >= 0 && size != f->size)) {
			cas_digest_to_hex(d, hex);
			cas_log_debug("directory %s: a file's size is not its "
				      "blob's: no pack",
				      hex);
			(void)unlinkat(pb->tmpfd, tmp, 0);
			return 0;
		}
		if (r >= 0)
			r = cas_write_all(fd, buf, size);
	}
	r = tmp_commit(pb, tmp, path, r);
	if (r < 0) {
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r,
				     "directory %s: write its pack into %s: %m",
				     hex, pb->dir);
	}
	pb->p.sent_bytes += len;
	return 0;
}

struct pub_frame {
	cas_digest d;
	uint8_t *raw;
	size_t raw_len;
	cas_directory *dir;
	size_t next_child;
};

static void frame_release(struct pub_frame *f)
{
	free(f->raw);
	cas_directory_free(f->dir);
}

/* Loads Directory d into a frame; 1 when it needs publishing, 0 when
 * DIR already has it (and so its closure). */
static int frame_load(struct publisher *pb, const cas_digest *d,
		      struct pub_frame *f)
{
	char path[128], hex[CAS_DIGEST_HEX_LEN + 1];
	const char *why = NULL;
	int r = cas_dmap_put(&pb->dirs_done, d, NULL);
	if (r <= 0)
		return r;
	pb->p.directories++;
	tick(pb);
	object_path("directories", d, path, sizeof(path));
	if (object_exists(pb, path))
		return 0;
	cas_digest_to_hex(d, hex);
	*f = (struct pub_frame){.d = *d};
	r = pb->s->ops->directory_get_raw(pb->s, d, &f->raw, &f->raw_len);
	if (r < 0)
		return cas_log_errno(r, "directory %s: %m", hex);
	r = cas_directory_decode(f->raw, f->raw_len, &f->dir, &why);
	if (r < 0) {
		free(f->raw);
		return cas_log_errno(r, "directory %s: %s", hex,
				     why ? why : "?");
	}
	return 1;
}

/* Publishes Directory d and everything below it that DIR lacks, leaves
 * first, without recursion (depth comes from the data). */
static int publish_tree(struct publisher *pb, const cas_digest *root)
{
	struct pub_frame *stack = NULL;
	size_t depth = 0, cap = 16;
	int r;

	stack = malloc(cap * sizeof(*stack));
	if (!stack)
		return -ENOMEM;
	r = frame_load(pb, root, &stack[0]);
	if (r <= 0)
		goto out;
	depth = 1;
	while (depth > 0) {
		struct pub_frame *f = &stack[depth - 1];
		cas_directory *dir = f->dir;
		if (f->next_child == 0)
			for (size_t i = 0; i < dir->n_files; i++)
				if ((r = publish_blob(
					     pb, &dir->files[i].digest)) < 0)
					goto out;
		if (f->next_child < dir->n_directories) {
			const cas_digest *cd =
				&dir->directories[f->next_child++].digest;
			if (depth == cap) {
				cap *= 2;
				struct pub_frame *ns =
					realloc(stack, cap * sizeof(*ns));
				if (!ns) {
					r = -ENOMEM;
					goto out;
				}
				stack = ns;
				f = &stack[depth - 1];
			}
			r = frame_load(pb, cd, &stack[depth]);
			if (r < 0)
				goto out;
			if (r > 0)
				depth++;
			continue;
		}
		char path[128];
		r = publish_pack(pb, &f->d, dir);
		if (r < 0)
			goto out;
		object_path("directories", &f->d, path, sizeof(path));
		r = write_object(pb, path, -1, 0, f->raw, f->raw_len);
		if (r < 0) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			cas_digest_to_hex(&f->d, hex);
			r = cas_log_errno(r, "directory %s: write into %s: %m",
					  hex, pb->dir);
			goto out;
		}
		pb->p.sent_objects++;
		pb->p.sent_bytes += f->raw_len;
		frame_release(f);
		depth--;
		if ((r = maybe_flush(pb)) < 0)
			goto out;
	}
	r = 0;
out:
	for (size_t i = 0; i < depth; i++)
		frame_release(&stack[i]);
	free(stack);
	return r;
}

/* The Directories of root's closure in one file (remote_i.h), written
 * once its objects are: a reader gets a whole tree's structure with one
 * GET instead of one per Directory. */
static int publish_tree_file(struct publisher *pb, const cas_digest *root)
{
	char path[128], tmp[128], hex[CAS_DIGEST_HEX_LEN + 1];
	if (cas_digest_eq(root, &CAS_DIGEST_EMPTY_DIRECTORY))
		return 0;
	object_path("trees", root, path, sizeof(path));
	if (object_exists(pb, path))
		return 0;
	_cleanup_close_ int fd = tmp_create(pb, path, tmp, sizeof(tmp));
	if (fd < 0)
		return fd;
	struct cas_dmap seen = {0};
	cas_digest *queue = malloc(sizeof(*queue));
	size_t head = 0, tail = 0, cap = 1;
	int r = queue ? cas_dmap_put(&seen, root, NULL) : -ENOMEM;
	if (r >= 0)
		queue[tail++] = *root;
	/* Breadth first: each Directory after the one that names it. */
	while (r >= 0 && head < tail) {
		const cas_digest d = queue[head++];
		_cleanup_free_ uint8_t *raw = NULL;
		size_t len = 0;
		cas_directory *dir = NULL;
		uint8_t lenbuf[10];
		r = pb->s->ops->directory_get_raw(pb->s, &d, &raw, &len);
		if (r >= 0)
			r = cas_directory_decode(raw, len, &dir, NULL);
		if (r >= 0)
			r = cas_write_all(
				fd, lenbuf,
				(size_t)(cas_varint_put(lenbuf, len) - lenbuf));
		if (r >= 0 && len)
			r = cas_write_all(fd, raw, len);
		for (size_t i = 0; r >= 0 && i < dir->n_directories; i++) {
			const cas_digest *cd = &dir->directories[i].digest;
			r = cas_dmap_put(&seen, cd, NULL);
			if (r <= 0)
				continue;
			if (tail == cap) {
				cas_digest *nq =
					realloc(queue, 2 * cap * sizeof(*nq));
				if (!nq) {
					r = -ENOMEM;
					break;
				}
				queue = nq;
				cap *= 2;
			}
			queue[tail++] = *cd;
		}
		cas_directory_free(dir);
	}
	free(queue);
	cas_dmap_release(&seen, NULL);
	r = tmp_commit(pb, tmp, path, r < 0 ? r : 0);
	if (r < 0) {
		cas_digest_to_hex(root, hex);
		return cas_log_errno(r,
				     "directory %s: write its tree into %s: %m",
				     hex, pb->dir);
	}
	return 0;
}

static int publish_node(struct publisher *pb, const cas_node *node)
{
	switch (node->type) {
	case CAS_NODE_DIRECTORY: {
		int r = publish_tree(pb, &node->digest);
		return r < 0 ? r : publish_tree_file(pb, &node->digest);
	}
	case CAS_NODE_FILE: {
		int r = publish_blob(pb, &node->digest);
		return r < 0 ? r : maybe_flush(pb);
	}
	default:
		return 0;
	}
}

struct root_entry {
	char *name;
	cas_node *node;
};

struct root_set {
	struct root_entry *v;
	size_t n;
};

static void root_set_release(struct root_set *rs)
{
	for (size_t i = 0; i < rs->n; i++) {
		free(rs->v[i].name);
		free(rs->v[i].node);
	}
	free(rs->v);
	rs->v = NULL;
	rs->n = 0;
}

/* Adds or replaces name. */
static int root_set_put(void *userdata, const char *name, const cas_node *node)
{
	struct root_set *rs = userdata;
	cas_node *dup = cas_node_dup(node);
	if (!dup)
		return -ENOMEM;
	for (size_t i = 0; i < rs->n; i++)
		if (strcmp(rs->v[i].name, name) == 0) {
			free(rs->v[i].node);
			rs->v[i].node = dup;
			return 0;
		}
	struct root_entry *nv = realloc(rs->v, (rs->n + 1) * sizeof(*nv));
	char *nname = strdup(name);
	if (!nv || !nname) {
		free(dup);
		free(nname);
		if (nv)
			rs->v = nv;
		return -ENOMEM;
	}
	rs->v = nv;
	nv[rs->n++] = (struct root_entry){nname, dup};
	return 0;
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct root_entry *)a)->name,
		      ((const struct root_entry *)b)->name);
}

static int read_roots_file(struct publisher *pb, struct root_set *rs)
{
	_cleanup_free_ char *buf = NULL;
	size_t len = 0;
	int r = cas_read_file_at(pb->dirfd, "roots", &buf, &len);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return r;
	r = cas_roots_file_parse(buf, len, root_set_put, rs);
	if (r == -EBADMSG)
		return cas_log_errno(
			r, "%s/roots: malformed; remove it to publish afresh",
			pb->dir);
	return r;
}

/* The roots file about to be replaced goes to the work folder's
 * roots.history as "@<seconds>" and its lines: `gc --published` keeps
 * what it reached for the grace after this moment, for the clients that
 * fetched it just before (publish_gc.c). */
static int roots_history_append(struct publisher *pb)
{
	_cleanup_free_ char *buf = NULL;
	size_t len = 0;
	int r = cas_read_file_at(pb->dirfd, "roots", &buf, &len);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return r;
	_cleanup_close_ int h =
		openat(pb->workfd, "roots.history",
		       O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (h < 0)
		return cas_negerrno();
	char head[32];
	int n = snprintf(head, sizeof(head), "@%lld\n", (long long)time(NULL));
	if ((r = cas_write_all(h, head, (size_t)n)) < 0 ||
	    (r = cas_write_all(h, buf, len)) < 0)
		return r;
	if (len && buf[len - 1] != '\n' && (r = cas_write_all(h, "\n", 1)) < 0)
		return r;
	return fsync(h) < 0 ? cas_negerrno() : 0;
}

static int write_roots_file(struct publisher *pb, struct root_set *rs)
{
	char tmp[128];
	int fd = tmp_open(pb, ".roots", tmp, sizeof(tmp));
	if (fd < 0)
		return fd;
	FILE *f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return -ENOMEM;
	}
	qsort(rs->v, rs->n, sizeof(*rs->v), by_name);
	int r = 0;
	fputs("# castore published roots v1: percent-encoded name TAB hex "
	      "Node\n",
	      f);
	for (size_t i = 0; i < rs->n && r >= 0; i++)
		r = cas_roots_file_write_line(f, rs->v[i].name, rs->v[i].node);
	if (fflush(f) != 0 || fsync(fileno(f)) < 0)
		r = r < 0 ? r : cas_negerrno();
	if (fclose(f) != 0 && r >= 0)
		r = cas_negerrno();
	if (r >= 0 && (r = roots_history_append(pb)) < 0)
		cas_log_errno(r, "%s: roots.history: %m", pb->dir);
	if (r >= 0 && renameat(pb->tmpfd, tmp, pb->dirfd, "roots") < 0)
		r = cas_negerrno();
	if (r < 0)
		(void)unlinkat(pb->tmpfd, tmp, 0);
	else if (fsync(pb->dirfd) < 0)
		r = cas_negerrno();
	return r;
}

static int collect_all(void *userdata, const char *name, const cas_node *node)
{
	return root_set_put(userdata, name, node);
}

/* Empties and removes folder `name` in parent (a publisher's own folder:
 * flat, regular files only). */
static void remove_folder(int parent, const char *name)
{
	int fd = openat(parent, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd >= 0) {
		DIR *d = fdopendir(fd);
		if (!d) {
			close(fd);
			return;
		}
		struct dirent *de;
		while ((de = readdir(d)))
			if (de->d_name[0] != '.')
				(void)unlinkat(fd, de->d_name, 0);
		closedir(d);
	}
	(void)unlinkat(parent, name, AT_REMOVEDIR);
}

/* What killed publishers left: a <id>.lock nobody holds names a folder
 * <id> whose files no one will name. A lock file appears locked (see
 * work_open), so a publisher starting now is never taken for a dead
 * one. */
static void work_sweep(struct publisher *pb)
{
	int fd = openat(pb->workfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		if (fd >= 0)
			close(fd);
		return;
	}
	time_t now = time(NULL);
	struct dirent *de;
	while ((de = readdir(d))) {
		size_t n = strlen(de->d_name);
		struct stat st;
		if (n == 16 + 9 && !strcmp(de->d_name + 16, ".lock.new") &&
		    fstatat(pb->workfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) ==
			    0 &&
		    st.st_mtime + 3600 < now) {
			(void)unlinkat(pb->workfd, de->d_name, 0);
			continue;
		}
		if (n != 16 + 5 || strcmp(de->d_name + 16, ".lock") ||
		    !strncmp(de->d_name, pb->id, 16))
			continue;
		int lfd = openat(pb->workfd, de->d_name,
				 O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (lfd < 0)
			continue;
		if (flock(lfd, LOCK_EX | LOCK_NB) == 0) {
			char sub[17];
			memcpy(sub, de->d_name, 16);
			sub[16] = 0;
			remove_folder(pb->workfd, sub);
			(void)unlinkat(pb->workfd, de->d_name, 0);
		}
		close(lfd);
	}
	closedir(d);
}

/* The work folder: DIR/../.castore-publish.<dev>.<ino of DIR>, beside
 * DIR so that linkat and rename reach DIR, named by DIR's identity so
 * two layouts in one parent do not share one. When DIR is the root of
 * its file system (its parent is elsewhere), it is DIR/.castore-publish
 * instead: hidden, but inside the tree (docs/remote.md). Then this
 * publisher's own folder in it, locked while it runs. */
int cas_publish_work_open(int dirfd, const char *dir, int *ret_workfd)
{
	struct stat st, pst;
	char name[64];
	if (fstat(dirfd, &st) < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", dir);
	int parent = openat(dirfd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (parent >= 0 &&
	    (fstat(parent, &pst) < 0 || pst.st_dev != st.st_dev ||
	     pst.st_ino == st.st_ino)) {
		close(parent);
		parent = -1;
	}
	if (parent >= 0)
		snprintf(name, sizeof(name), ".castore-publish.%llx.%llx",
			 (unsigned long long)st.st_dev,
			 (unsigned long long)st.st_ino);
	else
		snprintf(name, sizeof(name), ".castore-publish");
	int base = parent >= 0 ? parent : dirfd;
	if (mkdirat(base, name, 0700) < 0 && errno != EEXIST) {
		int r = cas_negerrno();
		if (parent >= 0)
			close(parent);
		return cas_log_errno(r, "%s: work folder %s: %m", dir, name);
	}
	int fd = openat(base, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	int r = fd < 0 ? cas_negerrno() : 0;
	if (parent >= 0)
		close(parent);
	if (r < 0)
		return cas_log_errno(r, "%s: work folder %s: %m", dir, name);
	*ret_workfd = fd;
	return 0;
}

static int work_open(struct publisher *pb)
{
	int r = cas_publish_work_open(pb->dirfd, pb->dir, &pb->workfd);
	if (r < 0)
		return r;
	/* Shared for the whole run: `gc --published` takes it exclusively,
	 * so it never removes an object this publish found present and
	 * skipped (publish_gc.c). */
	pb->gcfd = openat(pb->workfd, "gc.lock", O_CREAT | O_RDWR | O_CLOEXEC,
			  0600);
	if (pb->gcfd < 0 || flock(pb->gcfd, LOCK_SH) < 0)
		return cas_log_errno(cas_negerrno(),
				     "%s: work folder gc.lock: %m", pb->dir);

	uint64_t id;
	if (getrandom(&id, sizeof(id), GRND_NONBLOCK) != sizeof(id))
		id = (uint64_t)time(NULL) << 20 ^ (uint64_t)getpid();
	snprintf(pb->id, sizeof(pb->id), "%016llx", (unsigned long long)id);
	char lock_new[32], lock[32], proc[64];
	snprintf(lock_new, sizeof(lock_new), "%s.lock.new", pb->id);
	snprintf(lock, sizeof(lock), "%s.lock", pb->id);
	/* The lock file appears already locked: made unnamed, locked, then
	 * linked. Where the file system has no O_TMPFILE, it is made under
	 * a ".new" name and renamed once locked (work_sweep waits an hour
	 * before it takes such a file for a dead publisher's). */
	int r2 = -1;
	pb->lockfd =
		openat(pb->workfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (pb->lockfd >= 0) {
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", pb->lockfd);
		r2 = flock(pb->lockfd, LOCK_EX) < 0 ||
				     linkat(AT_FDCWD, proc, pb->workfd, lock,
					    AT_SYMLINK_FOLLOW) < 0 ||
				     mkdirat(pb->workfd, pb->id, 0700) < 0
			     ? -1
			     : 0;
	} else if (errno == EOPNOTSUPP || errno == EISDIR) {
		pb->lockfd =
			openat(pb->workfd, lock_new,
			       O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		r2 = pb->lockfd < 0 || flock(pb->lockfd, LOCK_EX) < 0 ||
				     mkdirat(pb->workfd, pb->id, 0700) < 0 ||
				     renameat(pb->workfd, lock_new, pb->workfd,
					      lock) < 0
			     ? -1
			     : 0;
	}
	if (r2 < 0)
		return cas_log_errno(cas_negerrno(), "%s: work folder: %m",
				     pb->dir);
	pb->tmpfd = openat(pb->workfd, pb->id,
			   O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (pb->tmpfd < 0)
		return cas_log_errno(cas_negerrno(), "%s: work folder: %m",
				     pb->dir);
	work_sweep(pb);
	/* DIR/tmp/ is where publishers before this one wrote: what they left
	 * is an hour old by now unless one still runs. */
	int old = openat(pb->dirfd, "tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (old >= 0) {
		cas_remove_stale_files(old, 3600);
		close(old);
		(void)unlinkat(pb->dirfd, "tmp", AT_REMOVEDIR);
	}
	return 0;
}

static void work_close(struct publisher *pb)
{
	if (pb->tmpfd >= 0) {
		close(pb->tmpfd);
		remove_folder(pb->workfd, pb->id);
	}
	if (pb->lockfd >= 0) {
		char lock[32];
		snprintf(lock, sizeof(lock), "%s.lock", pb->id);
		(void)unlinkat(pb->workfd, lock, 0);
		close(pb->lockfd);
	}
	if (pb->gcfd >= 0)
		close(pb->gcfd);
	if (pb->workfd >= 0)
		close(pb->workfd);
}

int cas_remote_publish(cas_store *s, const char *dir, char *const *names,
		       size_t n_names, cas_remote_progress_cb progress,
		       void *userdata, struct cas_remote_progress *ret_stats)
{
	struct publisher pb = {.s = s,
			       .dirfd = -1,
			       .workfd = -1,
			       .tmpfd = -1,
			       .lockfd = -1,
			       .gcfd = -1,
			       .progress = progress,
			       .userdata = userdata};
	struct root_set todo = {0}, published = {0};
	int r;

	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return cas_log_errno(cas_negerrno(), "%s: %m", dir);
	pb.dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pb.dirfd < 0)
		return cas_log_errno(cas_negerrno(), "%s: %m", dir);
	pb.dir = strdup(dir);
	if (!pb.dir) {
		r = -ENOMEM;
		goto out;
	}
	static const char *const subdirs[] = {"blobs", "outboards",
					      "directories", "packs", "trees"};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(subdirs); i++)
		if (mkdirat(pb.dirfd, subdirs[i], 0755) < 0 &&
		    errno != EEXIST) {
			r = cas_log_errno(cas_negerrno(), "%s/%s: %m", dir,
					  subdirs[i]);
			goto out;
		}
	if ((r = work_open(&pb)) < 0)
		goto out;

	if (n_names == 0) {
		r = s->ops->roots_foreach(s, collect_all, &todo);
		if (r < 0) {
			r = cas_log_errno(r, "list roots: %m");
			goto out;
		}
	}
	for (size_t i = 0; i < n_names; i++) {
		cas_node *node = NULL;
		r = s->ops->root_get(s, names[i], &node);
		if (r < 0) {
			r = cas_log_errno(r, "root %s: %m", names[i]);
			goto out;
		}
		r = root_set_put(&todo, names[i], node);
		free(node);
		if (r < 0)
			goto out;
	}
	for (size_t i = 0; i < todo.n; i++) {
		r = publish_node(&pb, todo.v[i].node);
		if (r < 0) {
			cas_log_error("root %s: not published", todo.v[i].name);
			goto out;
		}
	}
	/* Every object named, and the names durable (publish_flush syncs
	 * the bytes before it links), before any root names them. */
	if ((r = publish_flush(&pb)) < 0)
		goto out;
	if (syncfs(pb.dirfd) < 0) {
		r = cas_log_errno(cas_negerrno(), "%s: syncfs: %m", dir);
		goto out;
	}
	r = read_roots_file(&pb, &published);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < todo.n && r >= 0; i++)
		r = root_set_put(&published, todo.v[i].name, todo.v[i].node);
	if (r >= 0)
		r = write_roots_file(&pb, &published);
	if (r < 0)
		r = cas_log_errno(r, "%s/roots: %m", dir);
	if (progress)
		progress(userdata, &pb.p);
	if (ret_stats)
		*ret_stats = pb.p;
out:
	/* After a failure, what was written whole is still worth naming:
	 * publishing again skips it. */
	if (pb.tmpfd >= 0)
		(void)publish_flush(&pb);
	work_close(&pb);
	free(pb.pending);
	root_set_release(&todo);
	root_set_release(&published);
	cas_dmap_release(&pb.blobs_done, NULL);
	cas_dmap_release(&pb.dirs_done, NULL);
	free(pb.dir);
	close(pb.dirfd);
	return r < 0 ? r : 0;
}
