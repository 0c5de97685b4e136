/* gc.c - cas_local_gc: mark what the roots reach, sweep the rest
 * (docs/design.md, "Writers and gc", states the guarantee).
 *
 * 1. Mark, without any lock: every digest the roots reach, in one read
 *    transaction, and in it the candidates: every Directory, pack index
 *    entry and blob file no root reaches. This is the long part, and
 *    writers run meanwhile.
 * 2. Sweep, under gc.lock held exclusively (gc.turn first, so that a
 *    stream of writer steps cannot starve it): read the live writers' pin
 *    files (a pin file gc can lock is a dead writer's and goes); then in
 *    one LMDB write transaction, which sees every root and Directory
 *    committed so far and holds other LMDB writers off, mark again from
 *    the pins, from the Directories younger than the grace and from the
 *    roots (incrementally: only what is new is read), and delete every
 *    candidate still unmarked (index entries only if older than the
 *    grace). Blob files go after that commit (a Directory never names a
 *    removed blob, even after a SIGKILL), unless marked or younger than
 *    the grace. The lock is held for the garbage's time, not the store's.
 *    Then the leftovers in tmp/ of processes that are gone, and a flock
 *    on each pack no live writer holds.
 * 3. Packs, after gc.lock is released (gc_pack.c).
 * What is kept because it is young or pinned keeps its closure too, so
 * no Directory that stays names a Directory or blob that goes.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/dmap.h"
#include "core/log.h"
#include "store/gc_i.h"

struct marker {
	struct cas_local *ls;
	MDB_txn *txn;
	struct cas_dmap marked;
	cas_digest *stack; /* Directories marked but not yet read */
	size_t n_stack, cap_stack;
};

static int mark_add(struct marker *k, const cas_digest *d)
{
	return cas_dmap_put(&k->marked, d, NULL);
}

static bool marked(const struct marker *k, const cas_digest *d)
{
	return k->marked.n && cas_dmap_find(&k->marked, d);
}

/* Marks d and queues it to be read as a Directory (if it is one). */
static int mark_directory(struct marker *k, const cas_digest *d)
{
	int r = mark_add(k, d);
	if (r <= 0)
		return r;
	if ((r = cas_array_grow(&k->stack, &k->cap_stack, k->n_stack + 1,
				sizeof(*k->stack), 256)) < 0)
		return r;
	k->stack[k->n_stack++] = *d;
	return 0;
}

/* Reads each queued Directory once and marks what it names; an absent or
 * undecodable one marks nothing more (verify reports it). */
static int mark_closure(struct marker *k)
{
	while (k->n_stack) {
		cas_digest d = k->stack[--k->n_stack];
		MDB_val key = {CAS_DIGEST_LEN, d.bytes}, val;
		int r = cas_local_mdb_errno(
			mdb_get(k->txn, k->ls->dbi_directories, &key, &val));
		if (r == -ENOENT)
			continue;
		if (r < 0)
			return r;
		_cleanup_(cas_directory_freep) cas_directory *dir = NULL;
		r = cas_directory_decode(val.mv_data, val.mv_size, &dir, NULL);
		if (r == -EBADMSG)
			continue;
		if (r < 0)
			return r;
		for (size_t i = 0; i < dir->n_directories; i++)
			if ((r = mark_directory(
				     k, &dir->directories[i].digest)) < 0)
				return r;
		for (size_t i = 0; i < dir->n_files; i++)
			if ((r = mark_add(k, &dir->files[i].digest)) < 0)
				return r;
	}
	return 0;
}

static int mark_root(void *userdata, MDB_cursor *cur, const MDB_val *key,
		     const MDB_val *val)
{
	(void)cur;
	(void)key;
	struct marker *k = userdata;
	cas_node node;
	int r = 0;
	if (cas_node_decode(val->mv_data, val->mv_size, &node, NULL) < 0)
		return 0; /* verify names it */
	if (node.type == CAS_NODE_DIRECTORY)
		r = mark_directory(k, &node.digest);
	else if (node.type == CAS_NODE_FILE)
		r = mark_add(k, &node.digest) < 0 ? -ENOMEM : 0;
	return r < 0 ? r : mark_closure(k);
}

static int mark_roots(struct marker *k)
{
	return cas_local_each_record(k->txn, k->ls->dbi_roots, mark_root, k);
}

static uint64_t time_decode(const MDB_val *v)
{
	uint64_t t = 0;
	if (v->mv_size != 8)
		return 0;
	for (int i = 0; i < 8; i++)
		t |= (uint64_t)((const uint8_t *)v->mv_data)[i] << (8 * i);
	return t;
}

/* Directories written within the grace are kept, with their closure. */
struct young {
	struct marker *k;
	int64_t cutoff;
};

static int mark_young_one(void *userdata, MDB_cursor *cur, const MDB_val *key,
			  const MDB_val *val)
{
	(void)cur;
	struct young *y = userdata;
	if (key->mv_size != CAS_DIGEST_LEN ||
	    (int64_t)time_decode(val) <= y->cutoff)
		return 0;
	cas_digest d;
	memcpy(d.bytes, key->mv_data, CAS_DIGEST_LEN);
	int r = mark_directory(y->k, &d);
	return r < 0 ? r : mark_closure(y->k);
}

static int mark_young(struct marker *k, int64_t cutoff)
{
	if (!k->ls->has_times_db)
		return 0;
	struct young y = {k, cutoff};
	return cas_local_each_record(k->txn, k->ls->dbi_times, mark_young_one,
				     &y);
}

int cas_gc_each_entry(int fd, int (*fn)(void *, int, const char *),
		      void *userdata)
{
	int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return cas_negerrno();
	DIR *dir = fdopendir(dfd);
	if (!dir) {
		close(dfd);
		return -ENOMEM;
	}
	struct dirent *de;
	int r = 0;
	while (r == 0 && (de = readdir(dir)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			r = fn(userdata, dirfd(dir), de->d_name);
	closedir(dir);
	return r;
}

/* The pins of live writers; dead writers' pin files are removed (not in
 * a dry run). Each pin may name a blob or a Directory. */
struct pin_read {
	struct marker *k;
	bool dry_run;
	int r;
};

static int read_pins(void *userdata, int tmp_fd, const char *name)
{
	struct pin_read *pr = userdata;
	if (strncmp(name, "pins.", 5))
		return 0;
	_cleanup_close_ int fd =
		openat(tmp_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return 0;
	if (flock(fd, LOCK_SH | LOCK_NB) == 0) {
		if (!pr->dry_run)
			unlinkat(tmp_fd, name, 0); /* its writer is gone */
		return 0;
	}
	cas_digest buf[256];
	uint64_t off = 0;
	for (;;) {
		ssize_t n = pread(fd, buf, sizeof(buf), (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (uint64_t)n;
		for (size_t i = 0; i < (size_t)n / sizeof(buf[0]); i++) {
			int r = mark_directory(pr->k, &buf[i]);
			if (r < 0)
				return r;
		}
		if ((size_t)n % sizeof(buf[0]))
			break; /* being written; the rest is not a pin yet */
	}
	return 0;
}

/* Liveness files of processes that are gone. */
static int remove_dead_live(void *userdata, int live_dir_fd, const char *name)
{
	(void)userdata;
	_cleanup_close_ int fd =
		openat(live_dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0)
		unlinkat(live_dir_fd, name, 0); /* an opener re-checks it */
	return 0;
}

/* What the unlocked pass found unreached: checked again under gc.lock,
 * where the sweep only looks at these, so the time writers wait is that
 * of the garbage, not of the store. */
struct candidate {
	cas_digest digest;
	uint64_t id;  /* index entries: the pack */
	uint64_t len; /* bytes */
};
struct candidates {
	struct candidate *v;
	size_t n, cap;
};

struct sweep {
	struct marker *k;
	struct gc_packs *packs;
	const struct cas_gc_options *o;
	struct cas_gc_stats *st;
	int64_t cutoff;	 /* written at or before this: old enough to go */
	int tmp_fd;	 /* the store's, or (read-only dry run) our own */
	int live_dir_fd; /* likewise, of DIR/live */
	struct candidates dirs, entries, files;
};

static int candidate_add(struct candidates *c, const cas_digest *d, uint64_t id,
			 uint64_t len)
{
	int r = cas_array_grow(&c->v, &c->cap, c->n + 1, sizeof(*c->v), 256);
	if (r < 0)
		return r;
	c->v[c->n++] = (struct candidate){*d, id, len};
	return 0;
}

static int find_directory(void *userdata, MDB_cursor *cur, const MDB_val *key,
			  const MDB_val *val)
{
	(void)cur;
	struct sweep *w = userdata;
	cas_digest d;
	if (key->mv_size != CAS_DIGEST_LEN)
		return 0; /* verify names it */
	memcpy(d.bytes, key->mv_data, CAS_DIGEST_LEN);
	return marked(w->k, &d) ? 0
				: candidate_add(&w->dirs, &d, 0, val->mv_size);
}

static int find_entry(void *userdata, MDB_cursor *cur, const MDB_val *key,
		      const MDB_val *val)
{
	(void)cur;
	struct sweep *w = userdata;
	cas_digest d;
	if (key->mv_size != CAS_DIGEST_LEN || val->mv_size != CAS_PACK_REF_LEN)
		return 0;
	memcpy(d.bytes, key->mv_data, CAS_DIGEST_LEN);
	uint64_t id, off;
	uint32_t len;
	cas_local_pack_ref_decode(val->mv_data, &id, &off, &len);
	return marked(w->k, &d) ? 0 : candidate_add(&w->entries, &d, id, len);
}

static int find_blob(void *userdata, int fan_fd, const char *name)
{
	(void)fan_fd;
	struct sweep *w = userdata;
	cas_digest d;
	if (cas_digest_from_hex(name, &d) < 0 || marked(w->k, &d))
		return 0;
	return candidate_add(&w->files, &d, 0, 0);
}

static int find_fan(void *userdata, int blobs_fd, const char *name)
{
	int fd = openat(blobs_fd, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return 0;
	int r = cas_gc_each_entry(fd, find_blob, userdata);
	close(fd);
	return r;
}

/* The unlocked pass: the candidates, in the mark's transaction. */
static int find_candidates(struct sweep *w)
{
	struct cas_local *ls = w->k->ls;
	int r = cas_local_each_record(w->k->txn, ls->dbi_directories,
				      find_directory, w);
	if (r == 0 && ls->has_blobs_db)
		r = cas_local_each_record(w->k->txn, ls->dbi_blobs, find_entry,
					  w);
	if (r == 0)
		r = cas_gc_each_entry(ls->blobs_fd, find_fan, w);
	return r;
}

/* In the deleting transaction: the candidates still unreached go. */
static int sweep_directories(struct sweep *w, MDB_txn *txn)
{
	struct cas_local *ls = w->k->ls;
	for (size_t i = 0; i < w->dirs.n; i++) {
		struct candidate *c = &w->dirs.v[i];
		if (marked(w->k, &c->digest))
			continue;
		MDB_val key = {CAS_DIGEST_LEN, c->digest.bytes};
		if (!w->o->dry_run) {
			int rc = mdb_del(txn, ls->dbi_directories, &key, NULL);
			if (rc == MDB_NOTFOUND)
				continue;
			if (rc != MDB_SUCCESS)
				return cas_local_mdb_errno(rc);
			if (ls->has_times_db)
				(void)mdb_del(txn, ls->dbi_times, &key, NULL);
		}
		w->st->directories++;
		w->st->directory_bytes += c->len;
	}
	return 0;
}

/* Pack index entries unreached and written before the cutoff go (a
 * pack gc did not list is newer than the sweep). */
static int sweep_index(struct sweep *w, MDB_txn *txn)
{
	struct cas_local *ls = w->k->ls;
	for (size_t i = 0; i < w->entries.n; i++) {
		struct candidate *c = &w->entries.v[i];
		if (marked(w->k, &c->digest))
			continue;
		struct gc_pack *p = cas_gc_pack_find(w->packs, c->id);
		if (!p || p->mtime > w->cutoff) {
			w->st->kept_young++;
			continue;
		}
		MDB_val key = {CAS_DIGEST_LEN, c->digest.bytes}, val;
		if (!w->o->dry_run) {
			/* Only as found: eviction may have dropped it and a
			 * writer indexed it again, elsewhere, since. */
			uint64_t id, off;
			uint32_t len;
			int rc = mdb_get(txn, ls->dbi_blobs, &key, &val);
			if (rc == MDB_NOTFOUND ||
			    val.mv_size != CAS_PACK_REF_LEN)
				continue;
			if (rc != MDB_SUCCESS)
				return cas_local_mdb_errno(rc);
			cas_local_pack_ref_decode(val.mv_data, &id, &off, &len);
			if (id != c->id)
				continue;
			rc = mdb_del(txn, ls->dbi_blobs, &key, NULL);
			if (rc != MDB_SUCCESS)
				return cas_local_mdb_errno(rc);
		}
		w->st->small_blobs++;
		w->st->small_blob_bytes += c->len;
	}
	return 0;
}

/* Blob files: after the commit (no Directory left names one that goes),
 * still under gc.lock (no writer finds one present meanwhile). */
static void sweep_files(struct sweep *w)
{
	struct cas_local *ls = w->k->ls;
	for (size_t i = 0; i < w->files.n; i++) {
		struct candidate *c = &w->files.v[i];
		if (marked(w->k, &c->digest))
			continue;
		char rel[CAS_BLOB_REL_LEN];
		struct stat st;
		cas_local_blob_rel(&c->digest, rel);
		if (fstatat(ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		    !S_ISREG(st.st_mode))
			continue; /* gone meanwhile, or not a blob */
		if (st.st_mtime > w->cutoff) {
			w->st->kept_young++;
			continue;
		}
		if (!w->o->dry_run) {
			if (unlinkat(ls->blobs_fd, rel, 0) < 0)
				continue;
			cas_local_outboard_remove(ls, rel);
		}
		w->st->blob_files++;
		w->st->blob_file_bytes += (uint64_t)st.st_size;
	}
}

/* Partial blobs (store/partial.h) no root reaches and untouched for the
 * grace: the data file, its range record and its outboard (unless a
 * whole blob file took the name meanwhile). A process still holding one
 * keeps its fds: it reads what it has and its record writes go to the
 * unlinked files; it can no longer name the blob (its rename fails), so
 * nothing it does later can make a record lie about a new file. */
static int sweep_partial(void *userdata, int pdir, const char *name)
{
	struct sweep *w = userdata;
	struct cas_local *ls = w->k->ls;
	size_t n = strlen(name);
	char hex[CAS_DIGEST_HEX_LEN + 1];
	if (n != CAS_DIGEST_HEX_LEN &&
	    !(n == CAS_DIGEST_HEX_LEN + 7 &&
	      !strcmp(name + CAS_DIGEST_HEX_LEN, ".ranges")))
		return 0;
	memcpy(hex, name, CAS_DIGEST_HEX_LEN);
	hex[CAS_DIGEST_HEX_LEN] = 0;
	cas_digest d;
	if (cas_digest_from_hex(hex, &d) < 0 || marked(w->k, &d))
		return 0;
	/* The pair goes together, judged by the newer of the two (a record
	 * is rewritten as groups arrive); the .ranges name finds it only
	 * when its data file is gone. */
	char rec[CAS_DIGEST_HEX_LEN + 8];
	snprintf(rec, sizeof(rec), "%s.ranges", hex);
	struct stat sd, sr;
	bool has_data = fstatat(pdir, hex, &sd, AT_SYMLINK_NOFOLLOW) == 0 &&
			S_ISREG(sd.st_mode);
	bool has_rec = fstatat(pdir, rec, &sr, AT_SYMLINK_NOFOLLOW) == 0 &&
		       S_ISREG(sr.st_mode);
	if (n != CAS_DIGEST_HEX_LEN && has_data)
		return 0;
	int64_t mtime = CAS_MAX(has_data ? (int64_t)sd.st_mtime : 0,
				has_rec ? (int64_t)sr.st_mtime : 0);
	if (!has_data && !has_rec)
		return 0;
	if (mtime > w->cutoff) {
		w->st->kept_young++;
		return 0;
	}
	if (!w->o->dry_run) {
		if (has_data && unlinkat(pdir, hex, 0) < 0)
			return 0;
		if (has_rec)
			(void)unlinkat(pdir, rec, 0);
		char rel[CAS_BLOB_REL_LEN];
		struct stat sb;
		cas_local_blob_rel(&d, rel);
		if (fstatat(ls->blobs_fd, rel, &sb, AT_SYMLINK_NOFOLLOW) < 0)
			cas_local_outboard_remove(ls, rel);
	}
	w->st->partial_blobs++;
	/* Sparse: what it held is what it gives back. */
	w->st->partial_bytes += (has_data ? (uint64_t)sd.st_blocks * 512 : 0) +
				(has_rec ? (uint64_t)sr.st_size : 0);
	return 0;
}

static int sweep_partials(struct sweep *w)
{
	int pdir = openat(w->k->ls->dir_fd, "partial",
			  O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (pdir < 0)
		return errno == ENOENT ? 0 : cas_negerrno();
	int r = cas_gc_each_entry(pdir, sweep_partial, w);
	close(pdir);
	return r;
}

/* What each pack still holds, after the sweep (gc_pack.c decides). */
static int count_live(void *userdata, MDB_cursor *cur, const MDB_val *key,
		      const MDB_val *val)
{
	(void)cur;
	(void)key;
	struct sweep *w = userdata;
	if (val->mv_size != CAS_PACK_REF_LEN)
		return 0;
	uint64_t id, off;
	uint32_t len;
	cas_local_pack_ref_decode(val->mv_data, &id, &off, &len);
	struct gc_pack *p = cas_gc_pack_find(w->packs, id);
	if (w->o->dry_run && p) {
		/* Nothing was deleted: leave out what would have been. */
		cas_digest d;
		if (key->mv_size != CAS_DIGEST_LEN)
			return 0;
		memcpy(d.bytes, key->mv_data, CAS_DIGEST_LEN);
		if (!marked(w->k, &d) && p->mtime <= w->cutoff)
			return 0;
	}
	if (p) {
		p->live_n++;
		p->live_bytes += len;
		p->end = CAS_MAX(p->end, off + len);
	}
	return 0;
}

static int count_packs(struct sweep *w)
{
	struct cas_local *ls = w->k->ls;
	if (!ls->has_blobs_db || w->packs->n == 0)
		return 0;
	MDB_txn *txn;
	int r = cas_local_rtxn_get(ls, &txn);
	if (r < 0)
		return r;
	r = cas_local_each_record(txn, ls->dbi_blobs, count_live, w);
	cas_local_rtxn_put(ls, txn);
	return r;
}

/* Counts the tmp/ leftovers a sweep would remove (dry run). */
static int count_tmp(void *userdata, int tmp_fd, const char *name)
{
	struct sweep *w = userdata;
	struct stat sb;
	if (!strncmp(name, "pins.", 5) ||
	    fstatat(tmp_fd, name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
		return 0;
	int alive = cas_local_tmp_owner_alive(w->live_dir_fd, name);
	if (alive > 0 || (alive < 0 && sb.st_mtime > w->cutoff))
		return 0;
	w->st->tmp_files++;
	w->st->tmp_bytes += (uint64_t)sb.st_size;
	return 0;
}

static int lock_wait(int fd, int op)
{
	while (flock(fd, op) < 0)
		if (errno != EINTR)
			return cas_negerrno();
	return 0;
}

/* The sweep proper, under gc.lock (exclusive unless a dry run). */
static int sweep_locked(struct sweep *w)
{
	struct marker *k = w->k;
	struct cas_local *ls = k->ls;
	struct pin_read pr = {k, w->o->dry_run, 0};
	int r = w->tmp_fd >= 0 ? cas_gc_each_entry(w->tmp_fd, read_pins, &pr)
			       : 0;
	if (r < 0)
		return r;
	if ((r = cas_gc_packs_list(ls, w->packs)) < 0)
		return r;
	MDB_txn *txn;
	r = cas_local_mdb_errno(mdb_txn_begin(
		ls->env, NULL, w->o->dry_run ? MDB_RDONLY : 0, &txn));
	if (r < 0)
		return r;
	k->txn = txn;
	r = mark_closure(k); /* the pins */
	if (r == 0)
		r = mark_young(k, w->cutoff);
	if (r == 0)
		r = mark_roots(k);
	if (r == 0)
		r = sweep_directories(w, txn);
	if (r == 0)
		r = sweep_index(w, txn);
	k->txn = NULL;
	if (r < 0 || w->o->dry_run)
		mdb_txn_abort(txn);
	else
		r = cas_local_mdb_errno(mdb_txn_commit(txn));
	if (r < 0)
		return r;
	sweep_files(w);
	if ((r = sweep_partials(w)) < 0)
		return r;
	if (w->o->dry_run) {
		r = w->tmp_fd >= 0 ? cas_gc_each_entry(w->tmp_fd, count_tmp, w)
				   : 0;
	} else {
		cas_local_tmp_sweep(ls, (long)w->o->grace_s, &w->st->tmp_files,
				    &w->st->tmp_bytes);
		r = cas_gc_each_entry(ls->live_dir_fd, remove_dead_live, NULL);
	}
	if (r == 0)
		cas_gc_packs_lock(w->packs, ls->packs_fd, w->o->dry_run);
	return r;
}

static double since(const struct timespec *t0)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) +
	       (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

int cas_local_gc(cas_store *s, const struct cas_gc_options *o,
		 struct cas_gc_stats *ret)
{
	if (!cas_store_is_local(s))
		return -EOPNOTSUPP;
	struct cas_local *ls = to_local(s);
	if (!o->dry_run && (ls->readonly || ls->gc_lock_fd < 0))
		return -EROFS;
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	struct marker k = {.ls = ls};
	struct gc_packs packs = {0};
	/* The open of this store removed the first leftovers already. */
	struct cas_gc_stats st = {.tmp_files = ls->open_tmp_files,
				  .tmp_bytes = ls->open_tmp_bytes};
	struct sweep w = {
		.k = &k,
		.packs = &packs,
		.o = o,
		.st = &st,
		.cutoff = (int64_t)time(NULL) - (int64_t)o->grace_s,
		.tmp_fd = ls->tmp_fd,
		.live_dir_fd = ls->live_dir_fd,
	};
	/* A dry run changes nothing, so it may run on a read-only open. */
	_cleanup_close_ int own_tmp = -1, own_live = -1, run_fd = -1;
	if (w.tmp_fd < 0) {
		own_tmp = openat(ls->dir_fd, "tmp",
				 O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		w.tmp_fd = own_tmp;
	}
	if (w.live_dir_fd < 0) {
		own_live = openat(ls->dir_fd, "live",
				  O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		w.live_dir_fd = own_live;
	}
	int r = 0;
	if (!o->dry_run) {
		run_fd = openat(ls->dir_fd, "gc.run",
				O_CREAT | O_RDWR | O_CLOEXEC, 0644);
		r = run_fd < 0 ? cas_negerrno() : lock_wait(run_fd, LOCK_EX);
		if (r < 0)
			return cas_log_errno(r, "store %s: gc.run: %m",
					     ls->dir);
	}

	/* 1. Mark, and find what no root reaches, beside the writers. */
	if ((r = cas_local_rtxn_get(ls, &k.txn)) < 0)
		goto out;
	r = mark_roots(&k);
	if (r == 0)
		r = find_candidates(&w);
	cas_local_rtxn_put(ls, k.txn);
	k.txn = NULL;
	if (r < 0)
		goto out;

	/* 2. Sweep: no writer step runs meanwhile. */
	bool locked = false;
	if (!o->dry_run) {
		r = lock_wait(ls->gc_turn_fd, LOCK_EX);
		if (r == 0) {
			r = lock_wait(ls->gc_lock_fd, LOCK_EX);
			(void)flock(ls->gc_turn_fd, LOCK_UN);
		}
		if (r < 0)
			goto out;
		locked = true;
	}
	r = sweep_locked(&w);
	if (locked)
		(void)flock(ls->gc_lock_fd, LOCK_UN);
	if (r < 0)
		goto out;

	/* 3. Packs, beside the writers again. */
	if ((r = count_packs(&w)) == 0)
		r = cas_gc_packs_collect(ls, &packs, o->dry_run, &st);
out:
	free(w.dirs.v);
	free(w.entries.v);
	free(w.files.v);
	st.reachable = k.marked.n;
	cas_dmap_release(&k.marked, NULL);
	free(k.stack);
	cas_gc_packs_release(&packs);
	if (r < 0)
		return cas_log_errno(r, "store %s: %m", ls->dir);
	st.seconds = since(&t0);
	*ret = st;
	return 0;
}
