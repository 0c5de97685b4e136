/* gc.c - cas_local_gc_survey: what a gc of a local store would remove.
 *
 * The mark half of gc (docs/design.md, "Writers and gc"): every object a
 * root reaches is marked, in one read transaction; then every blob file,
 * indexed small blob and Directory that no root reaches is counted, and
 * so are the leftovers in tmp/. Nothing is changed: the sweep, which must
 * coordinate with live writers through gc.lock and their pin files, is
 * not built yet, so this is what `castore gc --dry-run` reports.
 */
#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/log.h"
#include "store/local_i.h"

/* The marked digests: open addressing on the digest's first bytes (which
 * are uniformly distributed); all-zero slots are empty. */
struct mark_set {
	cas_digest *slots;
	size_t cap, n;
};

static bool digest_zero(const cas_digest *d)
{
	static const cas_digest zero;
	return cas_digest_eq(d, &zero);
}

static size_t mark_slot(const struct mark_set *m, const cas_digest *d)
{
	uint64_t h;
	memcpy(&h, d->bytes, sizeof(h));
	size_t i = (size_t)h & (m->cap - 1);
	while (!digest_zero(&m->slots[i]) && !cas_digest_eq(&m->slots[i], d))
		i = (i + 1) & (m->cap - 1);
	return i;
}

static bool mark_has(const struct mark_set *m, const cas_digest *d)
{
	return m->cap && !digest_zero(&m->slots[mark_slot(m, d)]);
}

/* 1 newly marked, 0 already marked, -ENOMEM. */
static int mark_add(struct mark_set *m, const cas_digest *d)
{
	if (digest_zero(d))
		return 0;
	if ((m->n + 1) * 2 > m->cap) {
		size_t cap = m->cap ? m->cap * 2 : 1024;
		cas_digest *slots = calloc(cap, sizeof(*slots));
		if (!slots)
			return -ENOMEM;
		struct mark_set grown = {slots, cap, m->n};
		for (size_t i = 0; i < m->cap; i++)
			if (!digest_zero(&m->slots[i]))
				slots[mark_slot(&grown, &m->slots[i])] =
					m->slots[i];
		free(m->slots);
		*m = grown;
	}
	size_t i = mark_slot(m, d);
	if (!digest_zero(&m->slots[i]))
		return 0;
	m->slots[i] = *d;
	m->n++;
	return 1;
}

struct marker {
	struct cas_local *ls;
	MDB_txn *txn;
	struct mark_set marked;
	cas_digest *stack; /* Directories marked but not yet read */
	size_t n_stack, cap_stack;
};

static int mark_directory(struct marker *k, const cas_digest *d)
{
	int r = mark_add(&k->marked, d);
	if (r <= 0)
		return r;
	if (k->n_stack == k->cap_stack) {
		size_t cap = k->cap_stack ? k->cap_stack * 2 : 256;
		cas_digest *st = realloc(k->stack, cap * sizeof(*st));
		if (!st)
			return -ENOMEM;
		k->stack = st;
		k->cap_stack = cap;
	}
	k->stack[k->n_stack++] = *d;
	return 0;
}

/* Reads each marked Directory once and marks what it names; an absent or
 * undecodable Directory marks nothing more (verify reports it). */
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
			if ((r = mark_directory(k, &dir->directories[i].digest)) <
			    0)
				return r;
		for (size_t i = 0; i < dir->n_files; i++)
			if ((r = mark_add(&k->marked, &dir->files[i].digest)) <
			    0)
				return r;
	}
	return 0;
}

static int mark_roots(struct marker *k)
{
	MDB_cursor *cur;
	int r = cas_local_mdb_errno(
		mdb_cursor_open(k->txn, k->ls->dbi_roots, &cur));
	if (r < 0)
		return r;
	MDB_val key, val;
	int rc = mdb_cursor_get(cur, &key, &val, MDB_FIRST);
	while (r == 0 && rc == MDB_SUCCESS) {
		cas_node node;
		if (cas_node_decode(val.mv_data, val.mv_size, &node, NULL) ==
		    0) {
			if (node.type == CAS_NODE_DIRECTORY)
				r = mark_directory(k, &node.digest);
			else if (node.type == CAS_NODE_FILE)
				r = mark_add(&k->marked, &node.digest);
			if (r == 0)
				r = mark_closure(k);
		}
		if (r == 0)
			rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
	}
	if (r == 0 && rc != MDB_NOTFOUND)
		r = cas_local_mdb_errno(rc);
	mdb_cursor_close(cur);
	return r;
}

/* Counts the unmarked entries of one LMDB table; sizes from size_of. */
static int survey_db(struct marker *k, MDB_dbi dbi, bool small_blobs,
		     uint64_t *ret_n, uint64_t *ret_bytes)
{
	MDB_cursor *cur;
	int r = cas_local_mdb_errno(mdb_cursor_open(k->txn, dbi, &cur));
	if (r < 0)
		return r;
	MDB_val key, val;
	int rc = mdb_cursor_get(cur, &key, &val, MDB_FIRST);
	while (rc == MDB_SUCCESS) {
		cas_digest d;
		if (key.mv_size == CAS_DIGEST_LEN) {
			memcpy(d.bytes, key.mv_data, CAS_DIGEST_LEN);
			if (!mark_has(&k->marked, &d)) {
				(*ret_n)++;
				*ret_bytes += small_blobs
						      ? cas_local_small_size(
								val.mv_data,
								val.mv_size)
						      : val.mv_size;
			}
		}
		rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
	}
	if (rc != MDB_NOTFOUND)
		r = cas_local_mdb_errno(rc);
	mdb_cursor_close(cur);
	return r;
}

/* Calls fn for each entry of folder fd (not . or ..); fd stays open. */
static int each_entry(int fd, int (*fn)(void *, int, const char *),
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

struct blob_survey {
	struct marker *k;
	struct cas_gc_stats *st;
};

static int survey_blob(void *userdata, int fan_fd, const char *name)
{
	struct blob_survey *b = userdata;
	cas_digest d;
	struct stat st;
	if (cas_digest_from_hex(name, &d) < 0 || mark_has(&b->k->marked, &d))
		return 0;
	if (fstatat(fan_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return 0; /* gone meanwhile */
	b->st->blob_files++;
	b->st->blob_file_bytes += (uint64_t)st.st_size;
	return 0;
}

static int survey_fan(void *userdata, int blobs_fd, const char *name)
{
	int fd = openat(blobs_fd, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return 0; /* not a fan-out folder: verify names it */
	int r = each_entry(fd, survey_blob, userdata);
	close(fd);
	return r;
}

static int survey_tmp(void *userdata, int tmp_fd, const char *name)
{
	struct cas_gc_stats *st = userdata;
	struct stat sb;
	if (fstatat(tmp_fd, name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
		return 0;
	st->tmp_files++;
	st->tmp_bytes += (uint64_t)sb.st_size;
	return 0;
}

int cas_local_gc_survey(cas_store *s, struct cas_gc_stats *ret)
{
	if (!cas_store_is_local(s))
		return -EOPNOTSUPP;
	struct marker k = {.ls = (struct cas_local *)s};
	struct cas_gc_stats st = {0};
	int r = cas_local_rtxn_get(k.ls, &k.txn);
	if (r < 0)
		return r;
	r = mark_roots(&k);
	if (r == 0)
		r = survey_db(&k, k.ls->dbi_directories, false,
			      &st.directories, &st.directory_bytes);
	if (r == 0 && k.ls->has_blobs_db)
		r = survey_db(&k, k.ls->dbi_blobs, true, &st.small_blobs,
			      &st.small_blob_bytes);
	cas_local_rtxn_put(k.ls, k.txn);
	if (r == 0) {
		struct blob_survey b = {&k, &st};
		r = each_entry(k.ls->blobs_fd, survey_fan, &b);
	}
	if (r == 0) {
		/* A read-only open keeps no fd on tmp/. */
		int tfd = openat(k.ls->dir_fd, "tmp",
				 O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (tfd >= 0) {
			r = each_entry(tfd, survey_tmp, &st);
			close(tfd);
		} else if (errno != ENOENT) {
			r = cas_negerrno();
		}
	}
	st.reachable = k.marked.n;
	free(k.marked.slots);
	free(k.stack);
	if (r < 0)
		return cas_log_errno(r, "gc %s: %m", k.ls->dir);
	*ret = st;
	return 0;
}
