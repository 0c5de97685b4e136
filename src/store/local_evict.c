/* local_evict.c - eviction of blob files and packs, for a bounded cache
 * (--cache-max; ingest.h).
 *
 * Blob files and whole packs are evicted (Directories are small and a
 * Directory's presence promises its children, not its blobs, in a
 * cache). Oldest first, both in one order: a blob file by its access
 * time (the cache marks a blob used, cas_local_blob_mark_used, whenever
 * it hands it out, which sets its access time and takes a shared flock
 * on the fd; flock locks live as long as the open file, so a blob whose
 * exclusive flock cannot be taken is in use, by this process or another,
 * and is kept); a pack by its last append. A pack is dropped whole, not
 * rewritten: its blobs were fetched together (a Directory's small files,
 * a prefetch batch) and age together, and a drop costs one index pass
 * instead of a copy. One whose flock cannot be taken has a live writer
 * (the cache's current pack, which the writer closes at a fraction of
 * the bound, cas_ingest_set_pack_max) and is kept. Dropping: its index
 * entries are deleted in one transaction, then its name; a reader that
 * holds it open reads on, one that looked a blob up just before looks
 * again and finds it absent (fetched again).
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
	char name[3 + CAS_DIGEST_HEX_LEN + 1]; /* "ab/<hex>", or a pack's */
	struct timespec atime;		       /* a pack's: its mtime */
	uint64_t size;
	bool pack;
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

/* Adds DIR/packs/<id>.pack (not empty: a pack its writer just made and
 * is about to lock is empty). */
static int list_packs(struct cas_local *ls, struct blob_list *l, bool keep_list)
{
	if (ls->packs_fd < 0)
		return 0;
	int pfd = openat(ls->packs_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pfd < 0)
		return cas_negerrno();
	DIR *d = fdopendir(pfd);
	if (!d) {
		close(pfd);
		return cas_negerrno();
	}
	struct dirent *de;
	int r = 0;
	while (r >= 0 && (de = readdir(d))) {
		uint64_t id;
		struct stat st;
		if (cas_local_pack_id_parse(de->d_name, &id) < 0 ||
		    fstatat(pfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		    !S_ISREG(st.st_mode) || st.st_size == 0)
			continue;
		l->total += (uint64_t)st.st_size;
		if (!keep_list)
			continue;
		if ((r = cas_array_grow(&l->v, &l->cap, l->n + 1, sizeof(*l->v),
					1024)) < 0)
			break;
		struct blob_file *b = &l->v[l->n++];
		cas_local_pack_name(id, b->name); /* the name it parsed from */
		b->atime = st.st_mtim;
		b->size = (uint64_t)st.st_size;
		b->pack = true;
	}
	closedir(d);
	return r;
}

/* Lists DIR/blobs/xx/<hex> and the packs; keep_list false: only sums the
 * sizes. */
static int list_packs(struct cas_local *ls, struct blob_list *l,
		      bool keep_list);

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
			b->pack = false;
		}
		closedir(sub);
	}
	closedir(top);
	return r < 0 ? r : list_packs(ls, l, keep_list);
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

/* Packs chosen for eviction, each held by its flock (fd). */
struct drop {
	struct drop_pack {
		uint64_t id, size;
		int fd;
		char name[CAS_PACK_NAME_LEN];
	} * v;
	size_t n, cap;
};

static int drop_add(struct drop *d, const struct blob_file *b, int fd)
{
	uint64_t id;
	int r = cas_local_pack_id_parse(b->name, &id);
	if (r == 0)
		r = cas_array_grow(&d->v, &d->cap, d->n + 1, sizeof(*d->v), 8);
	if (r < 0)
		return r;
	struct drop_pack *p = &d->v[d->n++];
	p->id = id;
	p->size = b->size;
	p->fd = fd;
	cas_local_pack_name(id, p->name);
	return 0;
}

static void drop_release(struct drop *d)
{
	for (size_t i = 0; i < d->n; i++)
		close(d->v[i].fd);
	free(d->v);
}

static bool dropping(const struct drop *d, uint64_t id)
{
	for (size_t i = 0; i < d->n; i++)
		if (d->v[i].id == id)
			return true;
	return false;
}

static int drop_entry(void *userdata, MDB_cursor *cur, const MDB_val *key,
		      const MDB_val *val)
{
	(void)key;
	uint64_t id, off;
	uint32_t len;
	if (val->mv_size != CAS_PACK_REF_LEN)
		return 0;
	cas_local_pack_ref_decode(val->mv_data, &id, &off, &len);
	if (!dropping(userdata, id))
		return 0;
	return cas_local_mdb_errno(mdb_cursor_del(cur, 0));
}

/* Deletes the index entries of the chosen packs in one transaction, then
 * their names. */
static int drop_packs(struct cas_local *ls, struct drop *d)
{
	if (!ls->has_blobs_db)
		return 0;
	MDB_txn *txn;
	int r = cas_local_mdb_errno(mdb_txn_begin(ls->env, NULL, 0, &txn));
	if (r < 0)
		return r;
	r = cas_local_each_record(txn, ls->dbi_blobs, drop_entry, d);
	if (r < 0) {
		mdb_txn_abort(txn);
		return r;
	}
	if ((r = cas_local_mdb_errno(mdb_txn_commit(txn))) < 0)
		return r;
	for (size_t i = 0; i < d->n; i++)
		(void)unlinkat(ls->packs_fd, d->v[i].name, 0);
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
	struct drop drops = {0};
	for (size_t i = 0; i < l.n && l.total > target; i++) {
		int dfd = l.v[i].pack ? ls->packs_fd : ls->blobs_fd;
		int fd = openat(dfd, l.v[i].name,
				O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (fd < 0)
			continue;
		if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
			close(fd); /* open somewhere, or written: in use */
			continue;
		}
		if (l.v[i].pack) {
			/* Dropped below, in one pass over the index. */
			if (drop_add(&drops, &l.v[i], fd) < 0) {
				close(fd);
				continue;
			}
		} else {
			bool gone = unlinkat(dfd, l.v[i].name, 0) == 0;
			close(fd);
			if (!gone)
				continue;
			cas_local_outboard_remove(ls, l.v[i].name);
		}
		l.total -= l.v[i].size;
		evicted++;
	}
	if (drops.n) {
		int d = drop_packs(ls, &drops);
		if (d < 0)
			cas_log_errno(d, "cache %s: evict packs: %m", ls->dir);
		if (d < 0)
			for (size_t i = 0; i < drops.n; i++)
				l.total += drops.v[i].size; /* kept */
	}
	drop_release(&drops);
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
