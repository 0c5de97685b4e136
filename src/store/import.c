/* import.c - filesystem -> store.
 *
 * Threads: the calling thread walks the tree (getdents64, readlinkat,
 * fstatat only for DT_UNKNOWN) and is the only one that touches the
 * Directory batch; N workers take file jobs from a bounded queue, each
 * opening its file relative to its folder's fd, reading it once and
 * publishing the blob when the store lacks it. When the queue is full the
 * walker runs jobs itself instead of sleeping, so both cores stay busy.
 *
 * Small files are read whole into a per-thread buffer, hashed, and written
 * from that same buffer. Large files are hashed with large reads and then,
 * if absent, read again and written; the source's size, mtime and ctime
 * must be unchanged afterwards, so a file modified while it is imported is
 * an error rather than a blob stored under a wrong name.
 *
 * Where blobs go (local.h): the smallest, when the store lacks them, are
 * copied into an in-memory group that the publisher thread appends to
 * the import's pack and indexes in one transaction; the others are staged
 * as files (O_DIRECT for the large ones, from the aligned per-thread
 * buffer) and published by the publisher after one syncfs per group.
 * Both groups are bounded: a worker that finds the small-blob group at
 * its limit waits for the publisher.
 *
 * Lifetime of a folder (struct imp_dir): the walker lists it completely
 * (so its entry array never moves), queues its files, then walks its
 * subfolders depth first. `pending` counts what is unfinished: each file,
 * each subfolder, plus one for the walker's own pass. Whoever drops it to
 * zero completes the folder: a worker hands it to the walker's ready list,
 * the walker encodes it (cas_directory_sort + encode), puts it into the
 * batch, writes its node into the parent's entry, frees it, and releases
 * the parent in turn. Only ancestors of the walk and folders with queued
 * files are alive at once, so memory stays linear in the depth.
 *
 * The walk is iterative and its open fds are bounded whatever the depth
 * (as export's): the ancestors are the parent chain of imp_dirs, each
 * knowing where it is in its entries, and a folder keeps no path, only its
 * name in its parent (error lines rebuild the path). A folder's fd is
 * counted (`fd_refs`): one per queued file, whose worker opens it relative
 * to the folder, plus one while the walker holds it. The walker holds only
 * the WALKER_FDS folders nearest to where it is, so an ordinary tree never
 * reopens anything; coming back up to a folder whose fd was closed, it
 * opens ".." of the child and checks that it is the same folder (device
 * and inode), so a concurrent rename cannot graft another tree in. Folders
 * with queued files are bounded by fd_limit: past it the walker runs
 * queued jobs itself, as when the queue is full.
 *
 * Top level: PATH itself is followed if it is a symlink (importing a link
 * to a tree imports the tree); inside the tree, symlinks are recorded.
 *
 * Filters and losses: excluded entries (import_exclude_i.h) and, with
 * skip_special, special files never become entries (the walker sees them
 * in the listing). What castore v1 drops is counted from the fstat of the
 * open fd that is read anyway (a file's by its worker, a folder's by the
 * walker), plus one flistxattr; with skip_private such an entry is marked
 * `skip` there and left out when its folder is encoded.
 */
#include "store/import.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/dmap.h"
#include "core/log.h"
#include "store/import_i.h"

/* The entry that names folder dir in its parent (not for PATH itself). */
static const struct imp_entry *dir_entry(const struct imp_dir *dir)
{
	return &dir->parent->entries[dir->parent_index];
}

/* "PATH/a/b/NAME" (dir may be NULL: NAME alone), rebuilt from the names
 * of dir's ancestors: folders keep no path of their own. Safe from any
 * thread: the names of a listed folder never move, and a folder outlives
 * its subfolders. */
static char *entry_path(const struct importer *imp, const struct imp_dir *dir,
			const char *name, size_t *ret_len)
{
	size_t nlen = name ? strlen(name) : 0, len = nlen;
	if (dir) {
		len += imp->root_len + (name ? 1 : 0);
		for (const struct imp_dir *d = dir; d->parent; d = d->parent)
			len += 1 + dir_entry(d)->name_len;
	}
	char *p = malloc(len + 1);
	if (!p)
		return NULL;
	size_t at = len;
	p[at] = 0;
	at -= nlen;
	if (name)
		memcpy(p + at, name, nlen);
	if (dir) {
		if (name)
			p[--at] = '/';
		for (const struct imp_dir *d = dir; d->parent; d = d->parent) {
			const struct imp_entry *e = dir_entry(d);
			at -= e->name_len;
			memcpy(p + at, d->parent->names + e->name_off,
			       e->name_len);
			p[--at] = '/';
		}
		memcpy(p, imp->root_path, imp->root_len);
	}
	*ret_len = len;
	return p;
}

/* Logs "PATH/NAME: why" with unprintable bytes escaped. */
static int path_error(struct importer *imp, const struct imp_dir *dir,
		      const char *name, int r, const char *why)
{
	size_t len = 0;
	_cleanup_free_ char *raw = entry_path(imp, dir, name, &len);
	size_t size = 4 * len + 1;
	_cleanup_free_ char *esc = raw ? malloc(size) : NULL;
	if (esc)
		cas_escape_name((const uint8_t *)raw, len, esc, size);
	if (why)
		cas_log_error("%s: %s", esc ? esc : "?", why);
	else
		cas_log_errno(r, "%s: %m", esc ? esc : "?");
	cas_imp_set_error(imp, r);
	return r;
}

/* A special file inside the tree, where --skip-special would skip it. */
static const char *special_refused(mode_t mode)
{
	if (S_ISFIFO(mode))
		return "unsupported file type (fifo; --skip-special skips it)";
	if (S_ISSOCK(mode))
		return "unsupported file type (socket; --skip-special skips "
		       "it)";
	if (S_ISCHR(mode))
		return "unsupported file type (character device; "
		       "--skip-special skips it)";
	if (S_ISBLK(mode))
		return "unsupported file type (block device; --skip-special "
		       "skips it)";
	return "unsupported file type";
}

static const char *type_name(mode_t mode)
{
	if (S_ISFIFO(mode))
		return "unsupported file type (fifo)";
	if (S_ISSOCK(mode))
		return "unsupported file type (socket)";
	if (S_ISCHR(mode))
		return "unsupported file type (character device)";
	if (S_ISBLK(mode))
		return "unsupported file type (block device)";
	return "unsupported file type";
}

static struct cas_import_progress counts(struct importer *imp)
{
	return (struct cas_import_progress){
		.files = atomic_load(&imp->files),
		.directories = imp->directories,
		.symlinks = imp->symlinks,
		.bytes = atomic_load(&imp->bytes),
		.blobs_added = atomic_load(&imp->blobs_added),
		.excluded = imp->excluded,
		.special = imp->special,
		.setid = atomic_load(&imp->setid),
		.private_kept = atomic_load(&imp->private_kept),
		.private_skipped = atomic_load(&imp->private_skipped),
		.owners = atomic_load(&imp->owners),
		.xattrs = atomic_load(&imp->xattrs),
		.hardlinks = atomic_load(&imp->hardlinks),
	};
}

static void progress(struct importer *imp, bool force)
{
	if (!imp->opts || !imp->opts->progress)
		return;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
	long long ns = (now.tv_sec - imp->last_progress.tv_sec) * 1000000000ll +
		       (now.tv_nsec - imp->last_progress.tv_nsec);
	if (!force && ns < PROGRESS_NS)
		return;
	imp->last_progress = now;
	struct cas_import_progress p = counts(imp);
	imp->opts->progress(imp->opts->userdata, &p);
}

/* What castore v1 cannot keep ------------------------------------------ */

static void count(_Atomic uint64_t *c)
{
	atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* Counts what a file's or folder's inode has that castore v1 drops, and
 * says whether it is to be left out (private, with skip_private). A
 * folder is readable by everyone with r and x for others. */
static bool note_losses(struct importer *imp, int fd, const struct stat *st,
			bool may_skip)
{
	mode_t others = S_ISDIR(st->st_mode) ? S_IROTH | S_IXOTH : S_IROTH;
	if ((st->st_mode & others) != others) {
		if (may_skip && imp->opts && imp->opts->skip_private) {
			count(&imp->private_skipped);
			return true;
		}
		count(&imp->private_kept);
	}
	if (st->st_mode & (S_ISUID | S_ISGID | S_ISVTX))
		count(&imp->setid);
	if (st->st_uid != 0 || st->st_gid != 0)
		count(&imp->owners);
	if (S_ISREG(st->st_mode) && st->st_nlink > 1)
		count(&imp->hardlinks);
	/* ACLs and file capabilities are xattrs too. */
	if (flistxattr(fd, NULL, 0) > 0)
		count(&imp->xattrs);
	return false;
}

static double elapsed(const struct timespec *t0)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t0->tv_sec) +
	       (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* Files ---------------------------------------------------------------- */

/* Hashes (and if needed publishes) one open regular file. */
static int import_fd(struct importer *imp, int fd, const struct stat *st,
		     uint8_t *buf, cas_digest *ret_digest, uint64_t *ret_size,
		     const struct imp_dir *dir, const char *name)
{
	uint64_t total = 0;
	cas_digest d;
	char staged[CAS_INGEST_NAME_LEN];
	int r;

	if ((uint64_t)st->st_size < SMALL_FILE) {
		/* One read normally; a read of exactly st_size is taken as
		 * the end so that small files cost no second read(). */
		for (;;) {
			ssize_t n = read(fd, buf + total, SMALL_FILE - total);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				return path_error(imp, dir, name,
						  cas_negerrno(), NULL);
			}
			total += (uint64_t)n;
			if (n == 0 || total == (uint64_t)st->st_size ||
			    total == SMALL_FILE)
				break;
		}
		if (total < SMALL_FILE) {
			cas_hash_buffer(buf, total, &d);
			if (cas_ingest_packs(imp->in, total))
				r = cas_imp_small_add(imp, buf, total, &d);
			else if ((r = cas_ingest_has(imp->in, &d, false)) ==
					 0 &&
				 (r = cas_ingest_stage_buffer(
					  imp->in, buf, total, staged)) == 0)
				r = cas_imp_stage_add(imp, staged, NULL, &d,
						      total);
			if (r < 0)
				return path_error(imp, dir, name, r, NULL);
			goto done;
		}
		total = 0; /* it grew: take the large-file path */
	}

	/* One pass gives the digest and, for a blob over the threshold,
	 * its outboard (core/bao.h), kept beside the blob. */
	struct cas_ingest_outboard ob;
	cas_ingest_outboard_init(imp->in, &ob);
	bool want_ob = cas_bao_wants_outboard((uint64_t)st->st_size);
	cas_bao_encoder *enc = NULL;
	r = cas_bao_encoder_new(want_ob ? cas_ingest_outboard_emit : NULL, &ob,
				&enc);
	for (; r == 0;) {
		ssize_t n = pread(fd, buf, SMALL_FILE, (off_t)total);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			r = cas_negerrno();
		else if (n == 0)
			break;
		else if ((r = cas_bao_encoder_update(enc, buf, (size_t)n)) == 0)
			total += (uint64_t)n;
	}
	if (r == 0)
		r = cas_bao_encoder_final(enc, &d);
	cas_bao_encoder_free(enc);
	if (r == 0 && total != (uint64_t)st->st_size)
		r = -EBADMSG;
	if (r == 0)
		r = cas_ingest_has(imp->in, &d, false);
	char ob_name[CAS_INGEST_NAME_LEN] = "";
	if (r == 0 && want_ob)
		r = cas_ingest_outboard_stage(&ob, false, ob_name);
	cas_ingest_outboard_release(&ob);
	if (r == 0 && (r = cas_ingest_stage_fd(imp->in, fd, total, st, buf,
					       SMALL_FILE, staged)) == 0)
		r = cas_imp_stage_add(imp, staged, ob_name[0] ? ob_name : NULL,
				      &d, total);
	else if (ob_name[0])
		cas_ingest_stage_discard(imp->in, ob_name);
	if (r == -EBADMSG)
		return path_error(imp, dir, name, r,
				  "file changed while it was imported");
	if (r < 0)
		return path_error(imp, dir, name, r, NULL);
done:
	atomic_fetch_add_explicit(&imp->files, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&imp->bytes, total, memory_order_relaxed);
	*ret_digest = d;
	*ret_size = total;
	return 0;
}

static void dir_ready(struct importer *imp, struct imp_dir *dir);

/* Drops one reference to dir's fd (a queued file's or the walker's). */
static void dir_fd_put(struct importer *imp, struct imp_dir *dir)
{
	int fd = dir->fd; /* read while still held */
	if (atomic_fetch_sub(&dir->fd_refs, 1) == 1) {
		close(fd);
		atomic_fetch_sub(&imp->open_fds, 1);
	}
}

static void run_job(struct importer *imp, const struct imp_job *job,
		    uint8_t *buf)
{
	struct imp_dir *dir = job->dir;
	struct imp_entry *e = &dir->entries[job->index];
	const char *name = dir->names + e->name_off;

	if (!cas_imp_failed(imp)) {
		int fd = openat(dir->fd, name,
				O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK |
					O_NOCTTY);
		struct stat st;
		if (fd < 0) {
			if (errno == ELOOP)
				path_error(
					imp, dir, name, -ELOOP,
					"file changed while it was imported");
			else
				path_error(imp, dir, name, cas_negerrno(),
					   NULL);
		} else if (fstat(fd, &st) < 0) {
			path_error(imp, dir, name, cas_negerrno(), NULL);
		} else if (!S_ISREG(st.st_mode)) {
			path_error(imp, dir, name, -EINVAL,
				   type_name(st.st_mode));
		} else if (note_losses(imp, fd, &st, true)) {
			e->skip = true;
		} else {
			e->executable = (st.st_mode & 0111) != 0;
			import_fd(imp, fd, &st, buf, &e->digest, &e->size, dir,
				  name);
		}
		if (fd >= 0)
			close(fd);
	}
	dir_fd_put(imp, dir);
	if (atomic_fetch_sub(&dir->pending, 1) == 1)
		dir_ready(imp, dir);
}

/* Called by a worker (or the walker) that finished a folder's last file. */
static void dir_ready(struct importer *imp, struct imp_dir *dir)
{
	pthread_mutex_lock(&imp->lock);
	if (cas_array_grow(&imp->ready, &imp->cap_ready, imp->n_ready + 1,
			   sizeof(*imp->ready), 64) < 0) {
		pthread_mutex_unlock(&imp->lock);
		cas_imp_set_error(imp, -ENOMEM);
		return;
	}
	imp->ready[imp->n_ready++] = dir;
	pthread_cond_signal(&imp->walker_cond);
	pthread_mutex_unlock(&imp->lock);
}

static void *worker_main(void *arg)
{
	struct importer *imp = arg;
	uint8_t *buf = aligned_alloc(CAS_INGEST_ALIGN, SMALL_FILE);
	if (!buf)
		cas_imp_set_error(imp, -ENOMEM);
	pthread_mutex_lock(&imp->lock);
	for (;;) {
		while (imp->q_len == 0 && !imp->stop)
			pthread_cond_wait(&imp->job_cond, &imp->lock);
		if (imp->q_len == 0)
			break;
		struct imp_job job = imp->queue[imp->q_head];
		imp->q_head = (imp->q_head + 1) % QUEUE_CAP;
		imp->q_len--;
		pthread_mutex_unlock(&imp->lock);
		if (!buf)
			cas_imp_set_error(imp, -ENOMEM);
		run_job(imp, &job, buf);
		pthread_mutex_lock(&imp->lock);
	}
	pthread_mutex_unlock(&imp->lock);
	free(buf);
	return NULL;
}

static void submit(struct importer *imp, struct imp_dir *dir, size_t index)
{
	struct imp_job job = {dir, index};
	pthread_mutex_lock(&imp->lock);
	/* Each queued job may hold its folder's fd: past fd_limit the
	 * queue is run down too. */
	while (imp->q_len == QUEUE_CAP ||
	       (imp->q_len &&
		atomic_load_explicit(&imp->open_fds, memory_order_relaxed) >
			imp->fd_limit)) {
		/* Full: do the oldest job here rather than wait. */
		struct imp_job old = imp->queue[imp->q_head];
		imp->q_head = (imp->q_head + 1) % QUEUE_CAP;
		imp->q_len--;
		pthread_mutex_unlock(&imp->lock);
		run_job(imp, &old, imp->walker_buf);
		pthread_mutex_lock(&imp->lock);
	}
	imp->queue[(imp->q_head + imp->q_len) % QUEUE_CAP] = job;
	imp->q_len++;
	pthread_cond_signal(&imp->job_cond);
	pthread_mutex_unlock(&imp->lock);
}

/* Folders (walker only) ------------------------------------------------ */

static void dir_free(struct importer *imp, struct imp_dir *dir)
{
	if (dir->live_prev)
		dir->live_prev->live_next = dir->live_next;
	else
		imp->live = dir->live_next;
	if (dir->live_next)
		dir->live_next->live_prev = dir->live_prev;
	/* Still held only after a failure (the workers are gone then). */
	if (atomic_load(&dir->fd_refs) > 0) {
		close(dir->fd);
		atomic_fetch_sub(&imp->open_fds, 1);
	}
	free(dir->entries);
	free(dir->names);
	free(dir);
}

/* A folder opened as fd (taken, also on failure), held by the walker. */
static struct imp_dir *dir_new(struct importer *imp, struct imp_dir *parent,
			       size_t parent_index, int fd,
			       const struct stat *st)
{
	struct imp_dir *dir = calloc(1, sizeof(*dir));
	if (!dir) {
		close(fd);
		return NULL;
	}
	dir->parent = parent;
	dir->parent_index = parent_index;
	dir->fd = fd;
	dir->fd_refs = 1;
	dir->walker_ref = true;
	dir->dev = st->st_dev;
	dir->ino = st->st_ino;
	atomic_fetch_add(&imp->open_fds, 1);
	dir->live_next = imp->live;
	if (imp->live)
		imp->live->live_prev = dir;
	imp->live = dir;
	return dir;
}

static int names_add(struct imp_dir *dir, const char *s, size_t len,
		     uint32_t *ret_off)
{
	if (dir->names_len + len + 1 > dir->cap_names) {
		size_t cap =
			CAS_MAX(dir->cap_names * 2, dir->names_len + len + 1);
		cap = CAS_MAX(cap, 64u);
		if (cap > UINT32_MAX)
			return -E2BIG;
		char *n = realloc(dir->names, cap);
		if (!n)
			return -ENOMEM;
		dir->names = n;
		dir->cap_names = cap;
	}
	memcpy(dir->names + dir->names_len, s, len);
	dir->names[dir->names_len + len] = 0;
	*ret_off = (uint32_t)dir->names_len;
	dir->names_len += len + 1;
	return 0;
}

static int entry_add(struct importer *imp, struct imp_dir *dir,
		     const char *name, uint8_t type)
{
	if (dir->n_entries == dir->cap_entries) {
		/* Small at first: a deep chain keeps one per level. */
		size_t cap = dir->cap_entries ? dir->cap_entries * 2 : 4;
		struct imp_entry *e = realloc(dir->entries, cap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		dir->entries = e;
		dir->cap_entries = cap;
	}
	struct imp_entry *e = &dir->entries[dir->n_entries];
	memset(e, 0, sizeof(*e));
	e->type = type;
	size_t len = strlen(name);
	int r = names_add(dir, name, len, &e->name_off);
	if (r < 0)
		return r;
	e->name_len = (uint32_t)len;
	if (type == CAS_NODE_SYMLINK) {
		char target[4096];
		ssize_t n = readlinkat(dir->fd, name, target, sizeof(target));
		if (n < 0)
			return path_error(imp, dir, name, cas_negerrno(), NULL);
		if (n == 0 || (size_t)n == sizeof(target))
			return path_error(imp, dir, name, -EINVAL,
					  "symlink target too long or empty");
		/* name_off is stable: offsets, not pointers. */
		r = names_add(dir, target, (size_t)n, &e->target_off);
		if (r < 0)
			return r;
		e->target_len = (uint32_t)n;
		imp->symlinks++;
	}
	dir->n_entries++;
	return 0;
}

static int list_dir(struct importer *imp, struct imp_dir *dir)
{
	for (;;) {
		ssize_t n = getdents64(dir->fd, imp->dents, GETDENTS_BUF);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return path_error(imp, dir, NULL, cas_negerrno(), NULL);
		}
		if (n == 0)
			return 0;
		for (ssize_t off = 0; off < n;) {
			struct dirent64 *de =
				(struct dirent64 *)(imp->dents + off);
			off += de->d_reclen;
			const char *name = de->d_name;
			if (name[0] == '.' &&
			    (name[1] == 0 || (name[1] == '.' && name[2] == 0)))
				continue;
			unsigned t = de->d_type;
			if (t == DT_UNKNOWN) {
				struct stat st;
				if (fstatat(dir->fd, name, &st,
					    AT_SYMLINK_NOFOLLOW) < 0)
					return path_error(imp, dir, name,
							  cas_negerrno(), NULL);
				t = IFTODT(st.st_mode);
			}
			int r = cas_import_excludes_match(
				&imp->excludes, imp->rel, imp->rel_len, name,
				t == DT_DIR);
			if (r < 0)
				return path_error(imp, dir, name, r, NULL);
			if (r > 0) {
				imp->excluded++;
				continue;
			}
			uint8_t type;
			if (t == DT_DIR) {
				type = CAS_NODE_DIRECTORY;
			} else if (t == DT_REG) {
				type = CAS_NODE_FILE;
			} else if (t == DT_LNK) {
				type = CAS_NODE_SYMLINK;
			} else if (imp->opts && imp->opts->skip_special) {
				imp->special++;
				continue;
			} else {
				return path_error(imp, dir, name, -EINVAL,
						  special_refused(DTTOIF(t)));
			}
			r = entry_add(imp, dir, name, type);
			if (r < 0)
				return cas_imp_failed(imp)
					       ? r
					       : path_error(imp, dir, name, r,
							    NULL);
		}
	}
}

/* Encodes a folder whose subtree is done, puts it into the batch, hands
 * its node to the parent and frees it; then the parent, if that was its
 * last piece. */
static int dir_complete(struct importer *imp, struct imp_dir *dir)
{
	while (dir) {
		size_t n = dir->n_entries, nd = 0, nf = 0;
		for (size_t i = 0; i < n; i++) {
			uint8_t t = dir->entries[i].type;
			nd += t == CAS_NODE_DIRECTORY && !dir->entries[i].skip;
			nf += t == CAS_NODE_FILE && !dir->entries[i].skip;
		}
		_cleanup_free_ cas_node *nodes =
			calloc(n ? n : 1, sizeof(*nodes));
		if (!nodes)
			return -ENOMEM;
		cas_directory d = {
			.directories = nodes,
			.files = nodes + nd,
			.symlinks = nodes + nd + nf,
		};
		for (size_t i = 0; i < n; i++) {
			const struct imp_entry *e = &dir->entries[i];
			cas_node *node;
			if (e->skip)
				continue;
			if (e->type == CAS_NODE_DIRECTORY)
				node = &d.directories[d.n_directories++];
			else if (e->type == CAS_NODE_FILE)
				node = &d.files[d.n_files++];
			else
				node = &d.symlinks[d.n_symlinks++];
			*node = (cas_node){
				.type = e->type,
				.name = (const uint8_t *)dir->names +
					e->name_off,
				.name_len = e->name_len,
				.digest = e->digest,
				.size = e->size,
				.executable = e->executable,
			};
			if (e->type == CAS_NODE_SYMLINK) {
				node->target = (const uint8_t *)dir->names +
					       e->target_off;
				node->target_len = e->target_len;
			}
		}
		cas_directory_sort(&d);
		_cleanup_free_ uint8_t *buf = NULL;
		size_t len = 0;
		uint64_t size = 0;
		const char *why = NULL;
		cas_digest digest;
		int r = cas_directory_size(&d, &size);
		if (r < 0)
			return path_error(imp, dir, NULL, r,
					  "directory size overflows");
		r = cas_directory_encode(&d, &buf, &len, &why);
		if (r < 0)
			return path_error(imp, dir, NULL, r, why);
		r = imp->batch->ops->put(imp->batch, buf, len, &digest);
		if (r < 0)
			return path_error(imp, dir, NULL, r, NULL);
		imp->directories++;

		struct imp_dir *parent = dir->parent;
		if (parent) {
			struct imp_entry *e =
				&parent->entries[dir->parent_index];
			e->digest = digest;
			e->size = size;
		} else {
			imp->root = (cas_node){.type = CAS_NODE_DIRECTORY,
					       .digest = digest,
					       .size = size};
			imp->root_done = true;
		}
		dir_free(imp, dir);
		dir = parent && atomic_fetch_sub(&parent->pending, 1) == 1
			      ? parent
			      : NULL;
	}
	return 0;
}

/* Completes the folders that workers finished. */
static int drain_ready(struct importer *imp)
{
	for (;;) {
		pthread_mutex_lock(&imp->lock);
		struct imp_dir *dir =
			imp->n_ready ? imp->ready[--imp->n_ready] : NULL;
		pthread_mutex_unlock(&imp->lock);
		if (!dir)
			return 0;
		if (cas_imp_failed(imp))
			continue; /* freed with the live list */
		int r = dir_complete(imp, dir);
		if (r < 0) {
			cas_imp_set_error(imp, r);
			return r;
		}
	}
}

static int entry_cmp(const void *a, const void *b, void *names_)
{
	const struct imp_entry *x = a, *y = b;
	const char *names = names_;
	size_t n = CAS_MIN(x->name_len, y->name_len);
	int c = memcmp(names + x->name_off, names + y->name_off, n);
	if (c)
		return c;
	return x->name_len < y->name_len ? -1 : x->name_len > y->name_len;
}

/* Lists a folder the walker has just opened and queues its files. */
static int dir_enter(struct importer *imp, struct imp_dir *dir)
{
	int r = list_dir(imp, dir);
	if (r < 0)
		return r;
	/* In name order, as a mount lists them: a tree read through the
	 * mount then finds its small blobs in the pack, and its large ones
	 * on disk, in roughly the order the import wrote them. */
	if (dir->n_entries > 1)
		qsort_r(dir->entries, dir->n_entries, sizeof(*dir->entries),
			entry_cmp, dir->names);
	size_t nsub = 0, nfiles = 0;
	for (size_t i = 0; i < dir->n_entries; i++) {
		nsub += dir->entries[i].type != CAS_NODE_SYMLINK;
		nfiles += dir->entries[i].type == CAS_NODE_FILE;
	}
	atomic_store(&dir->pending, nsub + 1);
	atomic_fetch_add(&dir->fd_refs, nfiles);
	for (size_t i = 0; i < dir->n_entries && !cas_imp_failed(imp); i++) {
		if (dir->entries[i].type == CAS_NODE_FILE)
			submit(imp, dir, i);
		if ((i & 255) == 255)
			progress(imp, false);
	}
	return 0;
}

/* The walker lets go of dir's fd (it may stay open for queued files). */
static void walker_release(struct importer *imp, struct imp_dir *dir)
{
	if (dir->walker_ref) {
		dir->walker_ref = false;
		dir_fd_put(imp, dir);
	}
}

/* The walker, back in dir from its subfolder child, takes dir's fd again:
 * the one still open for queued files, or ".." of child when it is the
 * same folder as before. */
static int walker_hold(struct importer *imp, struct imp_dir *dir,
		       const struct imp_dir *child)
{
	if (dir->walker_ref)
		return 0;
	size_t n = atomic_load(&dir->fd_refs);
	while (n > 0)
		if (atomic_compare_exchange_weak(&dir->fd_refs, &n, n + 1)) {
			dir->walker_ref = true;
			return 0;
		}
	/* No reference: no worker looks at dir->fd now. */
	_cleanup_close_ int fd =
		openat(child->fd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		return path_error(imp, dir, NULL, cas_negerrno(), NULL);
	if (st.st_dev != dir->dev || st.st_ino != dir->ino)
		return path_error(imp, dir, NULL, -ESTALE,
				  "folder moved while it was imported");
	dir->fd = TAKE_FD(fd);
	atomic_store(&dir->fd_refs, 1);
	atomic_fetch_add(&imp->open_fds, 1);
	dir->walker_ref = true;
	return 0;
}

static int rel_push(struct importer *imp, const char *name, size_t len)
{
	int r = cas_array_grow(&imp->rel, &imp->rel_cap, imp->rel_len + len + 2,
			       1, 256);
	if (r < 0)
		return r;
	if (imp->rel_len)
		imp->rel[imp->rel_len++] = '/';
	memcpy(imp->rel + imp->rel_len, name, len);
	imp->rel_len += len;
	imp->rel[imp->rel_len] = 0;
	return 0;
}

static void rel_pop(struct importer *imp, size_t len)
{
	imp->rel_len -= len;
	if (imp->rel_len)
		imp->rel_len--; /* the '/' before it */
	imp->rel[imp->rel_len] = 0;
}

/* Opens dir's next subfolder that is not left out (*ret NULL: none left). */
static int next_subfolder(struct importer *imp, struct imp_dir *dir,
			  struct imp_dir **ret)
{
	*ret = NULL;
	while (dir->next < dir->n_entries) {
		int r = cas_imp_failed(imp);
		if (r < 0)
			return r;
		size_t i = dir->next++;
		struct imp_entry *e = &dir->entries[i];
		if (e->type != CAS_NODE_DIRECTORY)
			continue;
		const char *name = dir->names + e->name_off;
		int fd =
			openat(dir->fd, name,
			       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			return path_error(imp, dir, name, cas_negerrno(), NULL);
		struct stat st;
		if (fstat(fd, &st) < 0) {
			r = path_error(imp, dir, name, cas_negerrno(), NULL);
			close(fd);
			return r;
		}
		if (note_losses(imp, fd, &st, true)) {
			/* The walker's own share keeps dir pending. */
			e->skip = true;
			close(fd);
			atomic_fetch_sub(&dir->pending, 1);
			continue;
		}
		if (!(*ret = dir_new(imp, dir, i, fd, &st)))
			return -ENOMEM;
		return 0;
	}
	return 0;
}

/* Depth first from root (held, not yet listed), without recursion. */
static int walk(struct importer *imp, struct imp_dir *root)
{
	struct imp_dir *cur = root;
	int r = dir_enter(imp, cur);
	while (r == 0) {
		struct imp_dir *child;
		if ((r = next_subfolder(imp, cur, &child)) < 0)
			break;
		if (child) {
			const struct imp_entry *e = dir_entry(child);
			if ((r = rel_push(imp, cur->names + e->name_off,
					  e->name_len)) < 0)
				break;
			/* The folder WALKER_FDS levels up is let go. */
			struct imp_dir *far = child;
			for (int k = 0; k < WALKER_FDS && far; k++)
				far = far->parent;
			if (far)
				walker_release(imp, far);
			cur = child;
			r = dir_enter(imp, cur);
			continue;
		}
		/* cur's walk is done: back up to its parent. */
		struct imp_dir *parent = cur->parent;
		if (parent && (r = walker_hold(imp, parent, cur)) < 0)
			break;
		walker_release(imp, cur);
		if (parent)
			rel_pop(imp, dir_entry(cur)->name_len);
		if (atomic_fetch_sub(&cur->pending, 1) == 1 &&
		    (r = dir_complete(imp, cur)) < 0)
			break;
		if (!(cur = parent))
			break;
		if ((r = drain_ready(imp)) < 0)
			break;
		progress(imp, false);
	}
	return r;
}

/* Waits for the workers' last folders, with progress every 100 ms. */
static int wait_root(struct importer *imp)
{
	for (;;) {
		int r = drain_ready(imp);
		if (r < 0)
			return r;
		if ((r = cas_imp_failed(imp)) < 0)
			return r;
		if (imp->root_done)
			return 0;
		pthread_mutex_lock(&imp->lock);
		if (imp->n_ready == 0 && !cas_imp_failed(imp)) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += PROGRESS_NS;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&imp->walker_cond, &imp->lock,
					       &ts);
		}
		pthread_mutex_unlock(&imp->lock);
		progress(imp, false);
	}
}

static int import_tree(struct importer *imp, int fd, const struct stat *st,
		       unsigned threads)
{
	pthread_t tids[64];
	unsigned started = 0;
	int r = 0;

	struct imp_dir *root = dir_new(imp, NULL, 0, fd, st);
	if (!root)
		return -ENOMEM;
	pthread_t publisher;
	r = -pthread_create(&publisher, NULL, cas_imp_publisher_main, imp);
	if (r < 0) {
		dir_free(imp, root);
		return r;
	}
	for (; started < threads && started < CAS_ARRAY_SIZE(tids); started++) {
		r = -pthread_create(&tids[started], NULL, worker_main, imp);
		if (r < 0)
			break;
	}
	if (r == 0)
		r = walk(imp, root);
	if (r == 0)
		r = wait_root(imp);
	if (r < 0)
		cas_imp_set_error(imp, r);
	/* Unblock and join the workers; on failure they skip what is left. */
	pthread_mutex_lock(&imp->lock);
	imp->stop = true;
	pthread_cond_broadcast(&imp->job_cond);
	pthread_mutex_unlock(&imp->lock);
	for (unsigned i = 0; i < started; i++)
		pthread_join(tids[i], NULL);
	pthread_mutex_lock(&imp->stage_lock);
	imp->stage_stop = true;
	pthread_cond_signal(&imp->stage_cond);
	pthread_mutex_unlock(&imp->stage_lock);
	pthread_join(publisher, NULL);
	while (imp->live)
		dir_free(imp, imp->live);
	return cas_imp_failed(imp);
}

int cas_import(cas_store *s, const char *path, const char *name,
	       const struct cas_import_options *opts, cas_node **ret_node,
	       struct cas_import_progress *ret_progress)
{
	if (!cas_store_is_local(s))
		return cas_log_errno(-EOPNOTSUPP, "%s: the store is not local",
				     path);
	if (name && !cas_root_name_valid(name))
		return cas_log_errno(-EINVAL, "%s: invalid root name", path);

	_cleanup_free_ char *clean = strdup(path);
	struct importer *imp = calloc(1, sizeof(*imp));
	if (!imp)
		return -ENOMEM;
	imp->store = s;
	imp->opts = opts;
	pthread_mutex_init(&imp->lock, NULL);
	pthread_cond_init(&imp->job_cond, NULL);
	pthread_cond_init(&imp->walker_cond, NULL);
	pthread_mutex_init(&imp->stage_lock, NULL);
	pthread_cond_init(&imp->stage_cond, NULL);
	pthread_cond_init(&imp->small_cond, NULL);
	clock_gettime(CLOCK_MONOTONIC_COARSE, &imp->last_progress);
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	cas_node node = {0};
	int r;

	imp->walker_buf = aligned_alloc(CAS_INGEST_ALIGN, SMALL_FILE);
	imp->dents = malloc(GETDENTS_BUF);
	imp->rel = calloc(1, imp->rel_cap = 256);
	if (!imp->walker_buf || !imp->dents || !imp->rel) {
		r = -ENOMEM;
		goto out;
	}
	if ((r = s->ops->dir_batch_new(s, &imp->batch)) < 0)
		goto out;
	if ((r = cas_ingest_new(s, &imp->in)) < 0)
		goto out;

	/* Messages name "PATH/a/b", without a doubled slash. */
	if (!clean) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t l = strlen(clean); l > 1 && clean[l - 1] == '/'; l--)
		clean[l - 1] = 0;
	path = clean;
	imp->root_path = path;
	imp->root_len = strlen(path);
	struct rlimit nofile;
	imp->fd_limit = DIR_FDS_MAX;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 &&
	    nofile.rlim_cur != RLIM_INFINITY)
		imp->fd_limit = CAS_MIN(imp->fd_limit,
					CAS_MAX((size_t)nofile.rlim_cur / 4,
						(size_t)WALKER_FDS));
	if (opts &&
	    (r = cas_import_excludes_init(&imp->excludes, opts->excludes,
					  opts->n_excludes)) < 0)
		goto out;
	struct stat st;
	if (stat(path, &st) < 0) {
		r = path_error(imp, NULL, path, cas_negerrno(), NULL);
		goto out;
	}
	if (S_ISDIR(st.st_mode)) {
		int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) < 0) {
			r = path_error(imp, NULL, path, cas_negerrno(), NULL);
			if (fd >= 0)
				close(fd);
			goto out;
		}
		(void)note_losses(imp, fd, &st, false);
		unsigned threads = opts && opts->threads ? opts->threads : 0;
		if (!threads) {
			long n = sysconf(_SC_NPROCESSORS_ONLN);
			threads = n > 0 ? (unsigned)n : 1;
		}
		r = import_tree(imp, fd, &st, threads);
		if (r < 0)
			goto out;
		node = imp->root;
	} else if (S_ISREG(st.st_mode)) {
		_cleanup_close_ int fd = open(
			path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
		if (fd < 0 || fstat(fd, &st) < 0) {
			r = path_error(imp, NULL, path, cas_negerrno(), NULL);
			goto out;
		}
		if (!S_ISREG(st.st_mode)) {
			r = path_error(imp, NULL, path, -EINVAL,
				       type_name(st.st_mode));
			goto out;
		}
		(void)note_losses(imp, fd, &st, false);
		node.type = CAS_NODE_FILE;
		node.executable = (st.st_mode & 0111) != 0;
		r = import_fd(imp, fd, &st, imp->walker_buf, &node.digest,
			      &node.size, NULL, path);
		if (r < 0)
			goto out;
	} else {
		r = path_error(imp, NULL, path, -EINVAL, type_name(st.st_mode));
		goto out;
	}

	cas_imp_stage_flush(imp);
	if ((r = cas_imp_failed(imp)) < 0)
		goto out;
	double t_walk = elapsed(&t0);
	/* Ordered durability: every blob is on disk (also those another
	 * writer published and we only found) before anything refers to it. */
	if ((r = cas_ingest_sync(imp->in)) < 0)
		goto out;
	double t_sync = elapsed(&t0);
	r = imp->batch->ops->commit(imp->batch, name, name ? &node : NULL);
	imp->batch = NULL;
	if (r < 0)
		goto out;
	cas_log_debug("%s: walk and hash %.3f s, syncfs %.3f s, commit %.3f s",
		      path, t_walk, t_sync - t_walk, elapsed(&t0) - t_sync);
	progress(imp, true);
	if (ret_node && !(*ret_node = cas_node_dup(&node))) {
		r = -ENOMEM;
		goto out;
	}
out:
	if (ret_progress)
		*ret_progress = counts(imp);
	cas_import_excludes_release(&imp->excludes);
	cas_imp_stage_flush(imp); /* after a failure: removes what is staged */
	free(imp->staged);
	free(imp->smalls);
	cas_dmap_release(&imp->small_set, NULL);
	free(imp->arena);
	free(imp->spare_arena);
	cas_ingest_free(imp->in);
	if (imp->batch)
		imp->batch->ops->abort(imp->batch);
	free(imp->ready);
	free(imp->rel);
	free(imp->walker_buf);
	free(imp->dents);
	pthread_cond_destroy(&imp->small_cond);
	pthread_cond_destroy(&imp->stage_cond);
	pthread_mutex_destroy(&imp->stage_lock);
	pthread_cond_destroy(&imp->walker_cond);
	pthread_cond_destroy(&imp->job_cond);
	pthread_mutex_destroy(&imp->lock);
	free(imp);
	return r;
}
