/* local.c - the local store: open and free, the operations table, the
 * LMDB error mapping and the read-transaction pool (see local.h for the
 * layout and its durability rules). The operations live by concern in
 * local_db.c (Directories, roots), local_blob.c (blob files),
 * local_pack.c (packs) and ingest.c (every write of blob bytes).
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

#define MAP_SIZE     (1ull << 40) /* sparse: the file grows as it is used */
#define MAP_SIZE_MIN (1ull << 30)
#define MAX_READERS  1024
/* Leftovers in tmp/ whose name carries no writer's pid are removed once
 * they are this old; those that do, as soon as that writer is gone
 * (gc_seam.c). */
#define TMP_MAX_AGE_S 3600

static const struct cas_store_ops local_ops;

bool cas_store_is_local(const cas_store *s)
{
	return s && s->ops == &local_ops;
}

int cas_local_mdb_errno(int rc)
{
	switch (rc) {
	case MDB_SUCCESS:
		return 0;
	case MDB_NOTFOUND:
		return -ENOENT;
	case MDB_KEYEXIST:
		return -EEXIST;
	case MDB_MAP_FULL:
	case MDB_TXN_FULL:
	case MDB_DBS_FULL:
		return -ENOSPC;
	case MDB_READERS_FULL:
		return -EAGAIN;
	case MDB_BAD_VALSIZE:
		return -ENAMETOOLONG;
	case MDB_CORRUPTED:
	case MDB_PAGE_NOTFOUND:
	case MDB_INVALID:
	case MDB_VERSION_MISMATCH:
		return -EIO;
	default:
		/* LMDB passes system errors through as positive errno. */
		if (rc > 0 && rc < 4096)
			return -rc;
		return -EIO;
	}
}

int cas_local_each_record(MDB_txn *txn, MDB_dbi dbi, cas_local_record_fn fn,
			  void *userdata)
{
	MDB_cursor *cur;
	int r = cas_local_mdb_errno(mdb_cursor_open(txn, dbi, &cur));
	if (r < 0)
		return r;
	MDB_val key, val;
	int rc = mdb_cursor_get(cur, &key, &val, MDB_FIRST);
	while (r == 0 && rc == MDB_SUCCESS) {
		r = fn(userdata, cur, &key, &val);
		if (r == 0)
			rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
	}
	if (r == 0 && rc != MDB_NOTFOUND)
		r = cas_local_mdb_errno(rc);
	mdb_cursor_close(cur);
	return r;
}

void cas_local_blob_rel(const cas_digest *d, char ret[CAS_BLOB_REL_LEN])
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	ret[0] = hex[0];
	ret[1] = hex[1];
	ret[2] = '/';
	memcpy(ret + 3, hex, CAS_DIGEST_HEX_LEN + 1);
}

void cas_escape_name(const uint8_t *name, size_t len, char *out, size_t size)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;
	if (size == 0)
		return;
	for (size_t i = 0; i < len && o + 5 < size; i++) {
		uint8_t c = name[i];
		if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
			out[o++] = (char)c;
		} else {
			out[o++] = '\\';
			out[o++] = 'x';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o] = 0;
}

/* Read transactions ---------------------------------------------------- */

int cas_local_rtxn_get(struct cas_local *ls, MDB_txn **ret)
{
	MDB_txn *txn = NULL;
	pthread_mutex_lock(&ls->pool_lock);
	if (ls->n_pool > 0)
		txn = ls->pool[--ls->n_pool];
	pthread_mutex_unlock(&ls->pool_lock);
	int rc;
	if (txn) {
		rc = mdb_txn_renew(txn);
		if (rc == MDB_SUCCESS) {
			*ret = txn;
			return 0;
		}
		mdb_txn_abort(txn);
	}
	rc = mdb_txn_begin(ls->env, NULL, MDB_RDONLY, &txn);
	if (rc != MDB_SUCCESS)
		return cas_log_errno(cas_local_mdb_errno(rc),
				     "store %s: read transaction: %m", ls->dir);
	*ret = txn;
	return 0;
}

/* A writer's transaction T reuses only pages freed by transactions up to
 * T-2 (LMDB's freelist keeps what the oldest registered reader, or T-1,
 * may still see). Our snapshot S is not registered, and its pages are
 * freed at the earliest by S+1, so they are reused at the earliest by
 * S+3, which writes nothing before S+2 is committed. While the newest
 * committed transaction is at most S+1, everything read under S was
 * S's own bytes. */
int cas_local_rtxn_check(struct cas_local *ls, MDB_txn *txn)
{
	if (!ls->nolock)
		return 0;
	atomic_thread_fence(memory_order_seq_cst);
	MDB_envinfo info;
	if (mdb_env_info(ls->env, &info) != MDB_SUCCESS)
		return -EAGAIN;
	return info.me_last_txnid > mdb_txn_id(txn) + 1 ? -EAGAIN : 0;
}

void cas_local_rtxn_put(struct cas_local *ls, MDB_txn *txn)
{
	if (!txn)
		return;
	mdb_txn_reset(txn);
	pthread_mutex_lock(&ls->pool_lock);
	if (ls->n_pool < CAS_LOCAL_TXN_POOL) {
		ls->pool[ls->n_pool++] = txn;
		txn = NULL;
	}
	pthread_mutex_unlock(&ls->pool_lock);
	if (txn)
		mdb_txn_abort(txn);
}

/* Open / free ---------------------------------------------------------- */

static void local_free(cas_store *s)
{
	struct cas_local *ls = to_local(s);
	for (size_t i = 0; i < ls->n_pool; i++)
		mdb_txn_abort(ls->pool[i]);
	if (ls->env)
		mdb_env_close(ls->env);
	cas_local_gc_seam_close(ls);
	pthread_mutex_destroy(&ls->gc_mu);
	pthread_cond_destroy(&ls->gc_cond);
	if (ls->tmp_fd >= 0)
		close(ls->tmp_fd);
	if (ls->packs_fd >= 0)
		close(ls->packs_fd);
	if (ls->outboards_fd >= 0)
		close(ls->outboards_fd);
	for (size_t i = 0; i < ls->n_pack_fds; i++)
		close(ls->pack_fds[i].fd);
	pthread_mutex_destroy(&ls->pack_lock);
	if (ls->blobs_fd >= 0)
		close(ls->blobs_fd);
	if (ls->dir_fd >= 0)
		close(ls->dir_fd);
	pthread_mutex_destroy(&ls->pool_lock);
	free(ls->dir);
	free(ls);
}

static const struct cas_store_ops local_ops = {
	.blob_stat = cas_local_blob_stat,
	.blob_open = cas_local_blob_open,
	.blob_read = cas_local_blob_read,
	.blob_locate = cas_local_blob_locate,
	.blob_writer_new = cas_local_blob_writer_new,
	.blob_outboard_open = cas_local_blob_outboard_open,
	.directory_get_raw = cas_local_directory_get_raw,
	.directory_has = cas_local_directory_has,
	.dir_batch_new = cas_local_dir_batch_new,
	.root_get = cas_local_root_get,
	.roots_foreach = cas_local_roots_foreach,
	.root_set = cas_local_root_set,
	.root_remove = cas_local_root_remove,
	.free = local_free,
};

/* Named leftovers of crashed writers; O_TMPFILE leaves none. */
static void tmp_cleanup(struct cas_local *ls)
{
	cas_local_tmp_sweep(ls, TMP_MAX_AGE_S, &ls->open_tmp_files,
			    &ls->open_tmp_bytes);
}

static int open_subdir(struct cas_local *ls, const char *name, bool create,
		       int *ret_fd)
{
	if (create && mkdirat(ls->dir_fd, name, 0755) < 0 && errno != EEXIST)
		return cas_log_errno(cas_negerrno(), "store %s: mkdir %s: %m",
				     ls->dir, name);
	int fd = openat(ls->dir_fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: open %s: %m",
				     ls->dir, name);
	*ret_fd = fd;
	return 0;
}

/* LMDB opens lock.mdb for writing (creating it if need be). A user who
 * may read a store but not write it (a store root owns) cannot; such a
 * reader goes without the lock file (see cas_local_rtxn_check). Making
 * lock.mdb writable for readers instead would let any reader scribble
 * over the writers' mutex and reader table. */
static bool lock_file_writable(struct cas_local *ls)
{
	int fd =
		openat(ls->dir_fd, "lock.mdb", O_RDWR | O_CLOEXEC | O_NOFOLLOW);
	if (fd >= 0) {
		close(fd);
		return true;
	}
	if (errno == ENOENT)
		return faccessat(ls->dir_fd, ".", W_OK, AT_EACCESS) == 0;
	/* EROFS: LMDB itself goes without a lock file on a read-only
	 * file system, where no writer can be. */
	return errno != EACCES && errno != EPERM;
}

static int open_env(struct cas_local *ls, bool create)
{
	int rc;
	/* The map is only address space, but `ulimit -v` (or a sanitizer's
	 * smaller address range) can refuse 1 TiB: halve it until it fits.
	 * LMDB never maps less than the file holds. A failed open leaves
	 * an environment that can only be closed. */
	for (uint64_t map = MAP_SIZE;; map /= 2) {
		rc = mdb_env_create(&ls->env);
		if (rc == MDB_SUCCESS)
			rc = mdb_env_set_mapsize(ls->env, map);
		if (rc == MDB_SUCCESS)
			rc = mdb_env_set_maxdbs(ls->env, 8);
		if (rc == MDB_SUCCESS)
			rc = mdb_env_set_maxreaders(ls->env, MAX_READERS);
		if (rc == MDB_SUCCESS) {
			/* MDB_NOTLS: read transactions are not tied to
			 * threads (FUSE workers, the transaction pool). */
			unsigned flags = MDB_NOTLS |
					 (ls->readonly ? MDB_RDONLY : 0) |
					 (ls->nolock ? MDB_NOLOCK : 0);
			rc = mdb_env_open(ls->env, ls->dir, flags, 0644);
		}
		if (rc != ENOMEM || map <= MAP_SIZE_MIN)
			break;
		mdb_env_close(ls->env);
		ls->env = NULL;
	}
	if (rc != MDB_SUCCESS)
		return cas_log_errno(cas_local_mdb_errno(rc),
				     "store %s: open LMDB: %m", ls->dir);
	int dead = 0;
	mdb_reader_check(ls->env, &dead);

	MDB_txn *txn;
	rc = mdb_txn_begin(ls->env, NULL, ls->readonly ? MDB_RDONLY : 0, &txn);
	if (rc != MDB_SUCCESS)
		return cas_log_errno(cas_local_mdb_errno(rc),
				     "store %s: open LMDB: %m", ls->dir);
	unsigned dflags = ls->readonly ? 0 : MDB_CREATE;
	rc = mdb_dbi_open(txn, "directories", dflags, &ls->dbi_directories);
	if (rc == MDB_SUCCESS)
		rc = mdb_dbi_open(txn, "roots", dflags, &ls->dbi_roots);
	if (rc == MDB_SUCCESS) {
		rc = mdb_dbi_open(txn, "blobs", dflags, &ls->dbi_blobs);
		ls->has_blobs_db = rc == MDB_SUCCESS;
		if (rc == MDB_NOTFOUND && ls->readonly)
			rc = MDB_SUCCESS; /* a store written before there were small blobs */
	}
	if (rc == MDB_SUCCESS) {
		rc = mdb_dbi_open(txn, "times", dflags, &ls->dbi_times);
		ls->has_times_db = rc == MDB_SUCCESS;
		if (rc == MDB_NOTFOUND && ls->readonly)
			rc = MDB_SUCCESS; /* written before gc */
	}
	if (rc == MDB_SUCCESS)
		rc = mdb_txn_commit(txn);
	else
		mdb_txn_abort(txn);
	if (rc != MDB_SUCCESS)
		return cas_log_errno(cas_local_mdb_errno(rc),
				     "store %s: open databases: %m", ls->dir);
	(void)create;
	return 0;
}

/* A cache says so in a file of its own: a store opened later (verify)
 * knows what it is without being told. */
#define CACHE_MARK "castore-cache"
static int cache_mark(struct cas_local *ls, bool cache)
{
	ls->is_cache = faccessat(ls->dir_fd, CACHE_MARK, F_OK, 0) == 0;
	if (ls->is_cache || !cache || ls->readonly)
		return 0;
	static const char text[] =
		"A castore remote cache: blobs are fetched when read "
		"(docs/remote.md).\n";
	_cleanup_close_ int fd = openat(ls->dir_fd, CACHE_MARK,
					O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0 || cas_write_all(fd, text, sizeof(text) - 1) < 0)
		return cas_log_errno(cas_negerrno(), "store %s: %s: %m",
				     ls->dir, CACHE_MARK);
	ls->is_cache = true;
	return 0;
}

bool cas_local_is_cache(cas_store *s)
{
	return to_local(s)->is_cache;
}

int cas_local_open(const char *dir, const struct cas_local_options *opts,
		   cas_store **ret)
{
	struct cas_local_options o =
		opts ? *opts : (struct cas_local_options){0};
	if (o.readonly)
		o.create = false;
	struct cas_local *ls = calloc(1, sizeof(*ls));
	if (!ls)
		return -ENOMEM;
	ls->base.ops = &local_ops;
	ls->dir_fd = ls->blobs_fd = ls->tmp_fd = ls->packs_fd = -1;
	ls->gc_lock_fd = ls->gc_turn_fd = ls->live_fd = ls->live_dir_fd = -1;
	ls->outboards_fd = -1;
	pthread_mutex_init(&ls->pack_lock, NULL);
	pthread_mutex_init(&ls->gc_mu, NULL);
	pthread_cond_init(&ls->gc_cond, NULL);
	ls->readonly = o.readonly;
	ls->write_packs = !o.no_inline;
	ls->pid = (int)getpid();
	pthread_mutex_init(&ls->pool_lock, NULL);
	_cleanup_(cas_store_freep) cas_store *s = &ls->base;
	int r;

	ls->dir = strdup(dir);
	if (!ls->dir)
		return -ENOMEM;
	if (o.create && mkdir(dir, 0755) < 0 && errno != EEXIST)
		return cas_log_errno(cas_negerrno(), "store %s: mkdir: %m",
				     dir);
	ls->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ls->dir_fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: %m", dir);
	if (!o.create && faccessat(ls->dir_fd, "data.mdb", F_OK, 0) < 0)
		return cas_log_errno(cas_negerrno(),
				     "store %s: no store here (data.mdb: %m)",
				     dir);
	if ((r = open_subdir(ls, "blobs", !ls->readonly, &ls->blobs_fd)) < 0)
		return r;
	if (!ls->readonly &&
	    (r = open_subdir(ls, "tmp", true, &ls->tmp_fd)) < 0)
		return r;
	/* Read-only, a store without packs has no folder for them. */
	if ((r = open_subdir(ls, "packs", !ls->readonly, &ls->packs_fd)) < 0 &&
	    !ls->readonly)
		return r;
	if (ls->readonly)
		ls->nolock = !lock_file_writable(ls);
	/* Read-only, a store written before outboards has none (quietly). */
	if (ls->readonly)
		ls->outboards_fd = openat(ls->dir_fd, "outboards",
					  O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	else if ((r = open_subdir(ls, "outboards", true, &ls->outboards_fd)) <
		 0)
		return r;
	/* LMDB creates data.mdb empty, then writes its meta pages: another
	 * opener between the two would take the store for one whose
	 * creation was cut short (lmdb_check.c) and start it afresh. The
	 * check and LMDB's open are one step under a flock of the folder
	 * (shared for readers, who never create). */
	if (flock(ls->dir_fd, ls->readonly ? LOCK_SH : LOCK_EX) < 0)
		return cas_log_errno(cas_negerrno(), "store %s: flock: %m",
				     dir);
	r = cas_lmdb_check(ls->dir_fd, dir, o.create && !ls->readonly);
	if (r >= 0)
		r = open_env(ls, o.create);
	(void)flock(ls->dir_fd, LOCK_UN);
	if (r < 0)
		return r;
	if (!ls->readonly && (r = cas_local_gc_seam_open(ls)) < 0)
		return r;
	if (!ls->readonly)
		tmp_cleanup(ls);
	if ((r = cache_mark(ls, o.cache)) < 0)
		return r;
	*ret = TAKE_PTR(s);
	return 0;
}
