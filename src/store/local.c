/* local.c - the local store: LMDB for Directories and roots, one file per
 * blob (see local.h for the layout and its durability rules).
 *
 * Blob publish: the bytes go to an unnamed O_TMPFILE in DIR/tmp (nothing
 * is left behind by a crash), which is then linked under its final name
 * with linkat(); link never replaces an existing name, so EEXIST means
 * another writer published the same bytes first. File systems without
 * O_TMPFILE get named temporary files (O_EXCL) that are linked then
 * unlinked; the next writer removes such leftovers once they are older
 * than a minute (a live writer may still be filling a younger one).
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

#define MAP_SIZE     (1ull << 40) /* sparse: the file grows as it is used */
#define MAP_SIZE_MIN (1ull << 30)
#define MAX_READERS  1024
/* Leftovers older than this cannot belong to a live writer: staged files
 * are renamed within seconds, and O_TMPFILE leaves no name at all. */
#define TMP_MAX_AGE_S 3600

enum {
	TMP_UNKNOWN = 0,
	TMP_EMPTY_PATH = 1,
	TMP_PROC = 2,
	TMP_NAMED = 3,
};

static const struct cas_store_ops local_ops;

static struct cas_local *to_local(cas_store *s)
{
	return (struct cas_local *)s;
}

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

/* Blob files ----------------------------------------------------------- */

static int fanout_ensure(struct cas_local *ls, const cas_digest *d)
{
	unsigned b = d->bytes[0];
	uint64_t bit = 1ull << (b & 63);
	if (atomic_load_explicit(&ls->fanout_ok[b >> 6], memory_order_relaxed) &
	    bit)
		return 0;
	char name[3];
	snprintf(name, sizeof(name), "%02x", b);
	if (mkdirat(ls->blobs_fd, name, 0755) < 0 && errno != EEXIST)
		return cas_log_errno(cas_negerrno(),
				     "store %s: mkdir blobs/%s: %m", ls->dir,
				     name);
	atomic_fetch_or(&ls->fanout_ok[b >> 6], bit);
	return 0;
}

struct tmpfile {
	int fd;
	char name[64]; /* empty for O_TMPFILE */
};

static void tmp_discard(struct cas_local *ls, struct tmpfile *t)
{
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
	if (t->name[0])
		unlinkat(ls->tmp_fd, t->name, 0);
	t->name[0] = 0;
}

static int tmp_open_named(struct cas_local *ls, struct tmpfile *t);

static int tmp_open(struct cas_local *ls, struct tmpfile *t)
{
	t->fd = -1;
	t->name[0] = 0;
	if (ls->readonly)
		return -EROFS;
	int mode = atomic_load_explicit(&ls->tmp_mode, memory_order_relaxed);
	if (mode != TMP_NAMED) {
		int fd = openat(ls->tmp_fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC,
				0444);
		if (fd >= 0) {
			t->fd = fd;
			return 0;
		}
		if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
			return cas_log_errno(cas_negerrno(),
					     "store %s: temporary file: %m",
					     ls->dir);
		atomic_store(&ls->tmp_mode, TMP_NAMED);
	}
	return tmp_open_named(ls, t);
}

static int tmp_open_flags(struct cas_local *ls, struct tmpfile *t, int flags)
{
	for (int tries = 0; tries < 100; tries++) {
		uint64_t n = atomic_fetch_add(&ls->tmp_counter, 1);
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		snprintf(t->name, sizeof(t->name), "%d.%llu.%lx", ls->pid,
			 (unsigned long long)n, (unsigned long)ts.tv_nsec);
		int fd = openat(ls->tmp_fd, t->name,
				O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | flags,
				0444);
		if (fd >= 0) {
			t->fd = fd;
			return 0;
		}
		if (errno != EEXIST)
			break;
	}
	int r = cas_negerrno();
	t->name[0] = 0;
	if (r == -EINVAL && flags)
		return r; /* O_DIRECT refused: the caller retries without */
	return cas_log_errno(r, "store %s: temporary file: %m", ls->dir);
}

static int tmp_open_named(struct cas_local *ls, struct tmpfile *t)
{
	return tmp_open_flags(ls, t, 0);
}

/* Links the temporary file under the blob's name. 1: published, 0: the
 * blob was already there. The temporary file is gone afterwards. */
static int tmp_publish(struct cas_local *ls, struct tmpfile *t,
		       const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int r = fanout_ensure(ls, d);
	if (r < 0)
		goto out;
	if (t->name[0]) {
		if (linkat(ls->tmp_fd, t->name, ls->blobs_fd, rel, 0) < 0 &&
		    errno != EEXIST)
			r = cas_negerrno();
		else
			r = errno == EEXIST ? 0 : 1;
		goto out;
	}
	int mode = atomic_load_explicit(&ls->tmp_mode, memory_order_relaxed);
	if (mode != TMP_PROC) {
		if (linkat(t->fd, "", ls->blobs_fd, rel, AT_EMPTY_PATH) == 0) {
			r = 1;
			goto out;
		}
		if (errno == EEXIST) {
			r = 0;
			goto out;
		}
		/* Without CAP_DAC_READ_SEARCH on older kernels. */
		if (errno != ENOENT && errno != EPERM) {
			r = cas_negerrno();
			goto out;
		}
		atomic_store(&ls->tmp_mode, TMP_PROC);
	}
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", t->fd);
	if (linkat(AT_FDCWD, proc, ls->blobs_fd, rel, AT_SYMLINK_FOLLOW) == 0)
		r = 1;
	else if (errno == EEXIST)
		r = 0;
	else
		r = cas_negerrno();
out:
	tmp_discard(ls, t);
	if (r < 0)
		return cas_log_errno(r, "store %s: publish blob %s: %m",
				     ls->dir, rel + 3);
	return r;
}

/* A blob is linked under its name only once its bytes are durable, so a
 * power loss cannot leave a name whose file is empty or short (ext4's
 * delayed allocation may commit the link before the data). Import avoids
 * the per-file cost by staging (below). */
static int tmp_datasync(struct cas_local *ls, struct tmpfile *t)
{
	if (fdatasync(t->fd) < 0) {
		int r = cas_negerrno();
		tmp_discard(ls, t);
		return cas_log_errno(r, "store %s: fdatasync: %m", ls->dir);
	}
	return 0;
}

int cas_local_blob_exists(struct cas_local *ls, const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	if (fstatat(ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0)
		return 1;
	if (errno == ENOENT)
		return 0;
	return cas_log_errno(cas_negerrno(), "stat blob %s: %m", rel + 3);
}

/* Small blobs in packs ----------------------------------------------- */

static int stage_write(struct cas_local *ls, int fd, bool *direct,
		       const uint8_t *buf, size_t len, uint64_t off);

bool cas_local_is_packed(const struct cas_local *ls, uint64_t size)
{
	return ls->write_packs && size <= CAS_LOCAL_PACK_MAX;
}

/* An index entry, little-endian: pack id, offset, length. */
#define PACK_REF_LEN 20

static void pack_ref_encode(uint8_t out[PACK_REF_LEN], uint64_t id,
			    uint64_t off, uint32_t len)
{
	for (int i = 0; i < 8; i++) {
		out[i] = (uint8_t)(id >> (8 * i));
		out[8 + i] = (uint8_t)(off >> (8 * i));
	}
	for (int i = 0; i < 4; i++)
		out[16 + i] = (uint8_t)(len >> (8 * i));
}

static void pack_ref_decode(const uint8_t in[PACK_REF_LEN], uint64_t *id,
			    uint64_t *off, uint32_t *len)
{
	*id = *off = 0;
	*len = 0;
	for (int i = 0; i < 8; i++) {
		*id |= (uint64_t)in[i] << (8 * i);
		*off |= (uint64_t)in[8 + i] << (8 * i);
	}
	for (int i = 0; i < 4; i++)
		*len |= (uint32_t)in[16 + i] << (8 * i);
}

void cas_local_pack_name(uint64_t id, char ret[CAS_PACK_NAME_LEN])
{
	snprintf(ret, CAS_PACK_NAME_LEN, "%016llx.pack",
		 (unsigned long long)id);
}

/* An fd of pack `id`. Packs are few (one per import that had small
 * files) and immutable where indexed, so their fds are kept open for the
 * store's life, up to PACK_FDS; beyond that each read opens its own
 * (*ret_owned set: the caller closes it). */
static int pack_fd(struct cas_local *ls, uint64_t id, int *ret_fd,
		   bool *ret_owned)
{
	pthread_mutex_lock(&ls->pack_lock);
	for (size_t i = 0; i < ls->n_pack_fds; i++) {
		if (ls->pack_fds[i].id == id) {
			*ret_fd = ls->pack_fds[i].fd;
			*ret_owned = false;
			pthread_mutex_unlock(&ls->pack_lock);
			return 0;
		}
	}
	char name[CAS_PACK_NAME_LEN];
	cas_local_pack_name(id, name);
	int fd = openat(ls->packs_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		int r = cas_negerrno();
		pthread_mutex_unlock(&ls->pack_lock);
		/* Indexed, so it must exist: absent is damage, not ENOENT. */
		return cas_log_errno(r == -ENOENT ? -EIO : r,
				     "store %s: open packs/%s: %m", ls->dir,
				     name);
	}
	*ret_owned = ls->n_pack_fds == CAS_LOCAL_PACK_FDS;
	if (!*ret_owned)
		ls->pack_fds[ls->n_pack_fds++] =
			(struct cas_local_pack_fd){id, fd};
	*ret_fd = fd;
	pthread_mutex_unlock(&ls->pack_lock);
	return 0;
}

/* Looks d up in dbi under a pooled read transaction: 1 when present
 * (after `use`, if given, took what it needs of the value; its error is
 * returned instead), 0 when absent. */
static int db_lookup(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d,
		     int (*use)(const MDB_val *val, void *ctx), void *ctx)
{
	MDB_txn *txn;
	int r = cas_local_rtxn_get(ls, &txn);
	if (r < 0)
		return r;
	MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
	r = cas_local_mdb_errno(mdb_get(txn, dbi, &key, &val));
	if (r == 0 && use)
		r = use(&val, ctx);
	cas_local_rtxn_put(ls, txn);
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

static int db_has(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d)
{
	return db_lookup(ls, dbi, d, NULL, NULL);
}

static int copy_ref(const MDB_val *val, void *ref)
{
	if (val->mv_size != PACK_REF_LEN)
		return -EIO;
	memcpy(ref, val->mv_data, PACK_REF_LEN);
	return 0;
}

/* A packed blob's index entry: 1 and ref, 0 when it has none. */
static int pack_ref_get(struct cas_local *ls, const cas_digest *d,
			uint8_t ref[PACK_REF_LEN])
{
	if (!ls->has_blobs_db)
		return 0;
	int r = db_lookup(ls, ls->dbi_blobs, d, copy_ref, ref);
	if (r < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "blob %s: pack index: %m", hex);
	}
	return r;
}

static int local_blob_locate(cas_store *s, const cas_digest *d, int *ret_fd,
			     uint64_t *ret_off, uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint8_t ref[PACK_REF_LEN];
	int r = pack_ref_get(ls, d, ref);
	if (r <= 0)
		return r < 0 ? r : -ENOENT;
	uint64_t id, off;
	uint32_t len;
	pack_ref_decode(ref, &id, &off, &len);
	int fd = -1;
	bool owned = false;
	if ((r = pack_fd(ls, id, &fd, &owned)) < 0)
		return r;
	if (owned) {
		/* Not one the store keeps open: the caller takes a copy. */
		close(fd);
		return -ENOENT;
	}
	*ret_fd = fd;
	*ret_off = off;
	*ret_size = len;
	return 0;
}

int cas_local_small_read(struct cas_local *ls, const void *ref, size_t ref_len,
			 uint8_t *buf, size_t size)
{
	uint64_t id, off;
	uint32_t len;
	if (ref_len != PACK_REF_LEN)
		return -EBADMSG;
	pack_ref_decode(ref, &id, &off, &len);
	if (len != size)
		return -EBADMSG;
	int fd = -1;
	bool owned = false;
	int r = pack_fd(ls, id, &fd, &owned);
	if (r < 0)
		return r;
	r = cas_pread_all(fd, buf, size, off);
	if (owned)
		close(fd);
	return r == -EBADMSG ? -EIO : r; /* a pack shorter than its index */
}

uint64_t cas_local_small_size(const void *ref, size_t ref_len)
{
	uint64_t id, off;
	uint32_t len = 0;
	if (ref_len == PACK_REF_LEN)
		pack_ref_decode(ref, &id, &off, &len);
	return len;
}

struct cas_local_pack {
	struct cas_local *ls;
	uint64_t id;
	int fd; /* -1 until the first append */
	uint64_t size;
};

int cas_local_pack_new(cas_store *s, struct cas_local_pack **ret)
{
	struct cas_local *ls = to_local(s);
	if (ls->readonly || !ls->has_blobs_db)
		return -EROFS;
	struct cas_local_pack *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->ls = ls;
	p->fd = -1;
	*ret = p;
	return 0;
}

/* A pack name no other writer uses: created with O_EXCL. */
static int pack_create(struct cas_local_pack *p)
{
	struct cas_local *ls = p->ls;
	for (int tries = 0; tries < 100; tries++) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		uint64_t n = atomic_fetch_add(&ls->tmp_counter, 1);
		p->id = (uint64_t)ts.tv_sec << 32 ^ (uint64_t)ts.tv_nsec << 8 ^
			(uint64_t)ls->pid << 40 ^ n;
		char name[CAS_PACK_NAME_LEN];
		cas_local_pack_name(p->id, name);
		int flags = O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC;
		if (!atomic_load(&ls->direct_off))
			flags |= O_DIRECT;
		p->fd = openat(ls->packs_fd, name, flags, 0444);
		if (p->fd < 0 && errno == EINVAL && (flags & O_DIRECT)) {
			atomic_store(&ls->direct_off, true);
			p->fd = openat(ls->packs_fd, name, flags & ~O_DIRECT,
				       0444);
		}
		if (p->fd >= 0)
			return 0;
		if (errno != EEXIST)
			break;
	}
	return cas_log_errno(cas_negerrno(), "store %s: create pack: %m",
			     ls->dir);
}

int cas_local_pack_append(struct cas_local_pack *p, const uint8_t *buf,
			  size_t len, const struct cas_local_small *v, size_t n,
			  size_t *ret_added)
{
	struct cas_local *ls = p->ls;
	size_t added = 0;
	int r;
	if (n == 0)
		goto done;
	if (p->fd < 0 && (r = pack_create(p)) < 0)
		return r;
	/* Durable before it is indexed: a crash leaves unindexed bytes at
	 * the end of a pack, never an index entry without its bytes. */
	int fl = fcntl(p->fd, F_GETFL);
	bool direct = fl >= 0 && (fl & O_DIRECT);
	if ((r = stage_write(ls, p->fd, &direct, buf, len, p->size)) < 0 ||
	    fdatasync(p->fd) < 0) {
		r = r < 0 ? r : cas_negerrno();
		return cas_log_errno(r, "store %s: write pack: %m", ls->dir);
	}
	if (!direct && fl >= 0 && (fl & O_DIRECT)) {
		/* The tail went through the page cache with O_DIRECT off;
		 * the next group starts on a block boundary again. */
		fcntl(p->fd, F_SETFL, fl);
	}
	MDB_txn *txn;
	r = cas_local_mdb_errno(mdb_txn_begin(ls->env, NULL, 0, &txn));
	if (r < 0)
		return cas_log_errno(r, "store %s: write transaction: %m",
				     ls->dir);
	for (size_t i = 0; i < n; i++) {
		uint8_t ref[PACK_REF_LEN];
		pack_ref_encode(ref, p->id, p->size + v[i].off,
				(uint32_t)v[i].len);
		MDB_val key = {CAS_DIGEST_LEN, (void *)v[i].digest.bytes};
		MDB_val val = {PACK_REF_LEN, ref};
		int rc = mdb_put(txn, ls->dbi_blobs, &key, &val,
				 MDB_NOOVERWRITE);
		if (rc == MDB_SUCCESS) {
			added++;
		} else if (rc != MDB_KEYEXIST) {
			mdb_txn_abort(txn);
			return cas_log_errno(cas_local_mdb_errno(rc),
					     "store %s: index blob: %m",
					     ls->dir);
		}
	}
	r = cas_local_mdb_errno(mdb_txn_commit(txn));
	if (r < 0)
		return cas_log_errno(r, "store %s: commit: %m", ls->dir);
	p->size += len;
done:
	if (ret_added)
		*ret_added = added;
	return 0;
}

void cas_local_pack_close(struct cas_local_pack *p)
{
	if (!p)
		return;
	if (p->fd >= 0)
		close(p->fd);
	free(p);
}

int cas_local_small_exists(struct cas_local *ls, const cas_digest *d)
{
	return ls->has_blobs_db ? db_has(ls, ls->dbi_blobs, d) : 0;
}

/* What a lookup of a packed blob does: copy it out, put it in a memfd, or
 * only take its size. */
enum packed_want { PACKED_SIZE, PACKED_COPY, PACKED_MEMFD };

/* 1 when the blob is in a pack (with *ret_size and, as asked, *ret_buf or
 * *ret_fd), 0 when it is not. */
static int packed_get(struct cas_local *ls, const cas_digest *d,
		      enum packed_want want, uint64_t *ret_size,
		      uint8_t **ret_buf, int *ret_fd)
{
	uint8_t ref[PACK_REF_LEN];
	int r = pack_ref_get(ls, d, ref);
	if (r <= 0)
		return r;
	r = 0;
	uint64_t size = cas_local_small_size(ref, PACK_REF_LEN);
	_cleanup_free_ uint8_t *buf = NULL;
	if (r == 0 && want != PACKED_SIZE) {
		if (!(buf = malloc(size ? size : 1)))
			r = -ENOMEM;
		else
			r = cas_local_small_read(ls, ref, PACK_REF_LEN, buf,
						 size);
	}
	if (r == 0 && want == PACKED_MEMFD) {
		/* An fd for callers that need one (splice, passthrough,
		 * copying). */
		r = cas_memfd_sealed(buf, size, ret_fd);
	}
	if (r < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r == -EBADMSG ? -EIO : r,
				     "get blob %s: %m", hex);
	}
	if (want == PACKED_COPY)
		*ret_buf = TAKE_PTR(buf);
	*ret_size = size;
	return 1;
}

int cas_local_blob_path(cas_store *s, const cas_digest *d, char *buf,
			size_t size)
{
	struct cas_local *ls = to_local(s);
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int n = snprintf(buf, size, "%s/blobs/%s", ls->dir, rel);
	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

int cas_local_blob_publish_buffer(cas_store *s, const void *buf, size_t len,
				  const cas_digest *d)
{
	struct cas_local *ls = to_local(s);
	int r = cas_local_blob_exists(ls, d);
	if (r != 0)
		return r < 0 ? r : 0;
	struct tmpfile t;
	r = tmp_open(ls, &t);
	if (r < 0)
		return r;
	r = cas_write_all(t.fd, buf, len);
	if (r < 0) {
		tmp_discard(ls, &t);
		return cas_log_errno(r, "store %s: write temporary file: %m",
				     ls->dir);
	}
	if ((r = tmp_datasync(ls, &t)) < 0)
		return r;
	return tmp_publish(ls, &t, d);
}

static int source_unchanged(int src_fd, const struct stat *st)
{
	struct stat now;
	if (fstat(src_fd, &now) < 0)
		return cas_negerrno();
	if (now.st_size != st->st_size ||
	    now.st_mtim.tv_sec != st->st_mtim.tv_sec ||
	    now.st_mtim.tv_nsec != st->st_mtim.tv_nsec ||
	    now.st_ctim.tv_sec != st->st_ctim.tv_sec ||
	    now.st_ctim.tv_nsec != st->st_ctim.tv_nsec)
		return -EBADMSG;
	return 0;
}

/* Copies size bytes of src_fd; when st is given, the source must still
 * match it afterwards (size, mtime, ctime), else -EBADMSG. */
static int fill_from_fd(int src_fd, int dst_fd, uint64_t size,
			const struct stat *st)
{
	int r = cas_copy_fd(src_fd, dst_fd, size);
	if (r == 0 && st)
		r = source_unchanged(src_fd, st);
	return r;
}

int cas_local_blob_publish_fd(cas_store *s, int src_fd, uint64_t size,
			      const cas_digest *d)
{
	struct cas_local *ls = to_local(s);
	char hex[CAS_DIGEST_HEX_LEN + 1];
	int r;
	r = cas_local_blob_exists(ls, d);
	if (r != 0)
		return r < 0 ? r : 0;
	struct tmpfile t;
	if ((r = tmp_open(ls, &t)) < 0)
		return r;
	r = fill_from_fd(src_fd, t.fd, size, NULL);
	if (r == 0 && (r = tmp_datasync(ls, &t)) == 0)
		return tmp_publish(ls, &t, d);
	tmp_discard(ls, &t);
	if (r != -EBADMSG)
		return r;
	cas_digest_to_hex(d, hex);
	return cas_log_errno(
		r, "publish blob %s: source is shorter than %llu bytes", hex,
		(unsigned long long)size);
}

/* Staging (import): named temporary files, made durable together by one
 * syncfs and only then renamed into place (cas_local_unstage). */
static int stage_open(struct cas_local *ls, struct tmpfile *t, bool direct)
{
	t->fd = -1;
	t->name[0] = 0;
	if (ls->readonly)
		return -EROFS;
	if (direct &&
	    !atomic_load_explicit(&ls->direct_off, memory_order_relaxed)) {
		int r = tmp_open_flags(ls, t, O_DIRECT);
		if (r != -EINVAL)
			return r;
		atomic_store(&ls->direct_off, true);
	}
	return tmp_open_named(ls, t);
}

static int stage_finish(struct cas_local *ls, struct tmpfile *t, int r,
			char ret_name[CAS_STAGE_NAME_LEN])
{
	if (r < 0) {
		tmp_discard(ls, t);
		return r;
	}
	close(t->fd);
	t->fd = -1;
	snprintf(ret_name, CAS_STAGE_NAME_LEN, "%s", t->name);
	return 0;
}

static bool aligned(const void *p, size_t n)
{
	return ((uintptr_t)p | n) % CAS_STAGE_ALIGN == 0;
}

/* Writes buf at off of a staged file. While the file is O_DIRECT, whole
 * blocks go directly; a tail of less than a block (the end of the blob)
 * is written through the page cache, which needs O_DIRECT off: the block
 * is new, so the page cache has nothing to read back. A file system that
 * refuses a direct write (EINVAL) gets buffered writes from then on. */
static int stage_write(struct cas_local *ls, int fd, bool *direct,
		       const uint8_t *buf, size_t len, uint64_t off)
{
	if (*direct) {
		size_t head = len - len % CAS_STAGE_ALIGN;
		int r = aligned(buf, head) && off % CAS_STAGE_ALIGN == 0
				? cas_pwrite_all(fd, buf, head, off)
				: -EINVAL;
		if (r == -EINVAL)
			atomic_store(&ls->direct_off, true);
		else if (r < 0)
			return r;
		else
			buf += head, off += head, len -= head;
		if (len > 0 || r == -EINVAL) {
			int fl = fcntl(fd, F_GETFL);
			if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_DIRECT) < 0)
				return cas_negerrno();
			*direct = false;
		}
	}
	return cas_pwrite_all(fd, buf, len, off);
}

static int stage_open_for(struct cas_local *ls, struct tmpfile *t,
			  uint64_t size, bool *direct)
{
	int r = stage_open(ls, t, size >= CAS_STAGE_DIRECT_MIN);
	if (r < 0)
		return r;
	int fl = fcntl(t->fd, F_GETFL);
	*direct = fl >= 0 && (fl & O_DIRECT);
	return 0;
}

int cas_local_stage_buffer(struct cas_local *ls, const void *buf, size_t len,
			   char ret_name[CAS_STAGE_NAME_LEN])
{
	struct tmpfile t;
	bool direct;
	int r = stage_open_for(ls, &t, len, &direct);
	if (r < 0)
		return r;
	r = stage_write(ls, t.fd, &direct, buf, len, 0);
	if (r < 0)
		cas_log_errno(r, "store %s: write temporary file: %m", ls->dir);
	return stage_finish(ls, &t, r, ret_name);
}

int cas_local_stage_fd(struct cas_local *ls, int src_fd, uint64_t size,
		       const struct stat *st, uint8_t *scratch,
		       size_t scratch_size, char ret_name[CAS_STAGE_NAME_LEN])
{
	struct tmpfile t;
	bool direct;
	int r = stage_open_for(ls, &t, size, &direct);
	if (r < 0)
		return r;
	if (!direct || !aligned(scratch, scratch_size)) {
		r = fill_from_fd(src_fd, t.fd, size, st);
		return stage_finish(ls, &t, r, ret_name);
	}
	uint64_t off = 0;
	while (r == 0 && off < size) {
		size_t want =
			(size_t)CAS_MIN((uint64_t)scratch_size, size - off);
		ssize_t n = pread(src_fd, scratch, want, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			r = cas_negerrno();
		else if (n == 0)
			r = -EBADMSG; /* shorter than it was */
		else if ((r = stage_write(ls, t.fd, &direct, scratch, (size_t)n,
					  off)) == 0)
			off += (uint64_t)n; /* after a tail, buffered */
	}
	if (r == 0)
		r = source_unchanged(src_fd, st);
	if (r < 0 && r != -EBADMSG)
		cas_log_errno(r, "store %s: write temporary file: %m", ls->dir);
	return stage_finish(ls, &t, r, ret_name);
}

int cas_local_unstage(struct cas_local *ls, const char *name,
		      const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int r = fanout_ensure(ls, d);
	if (r < 0) {
		unlinkat(ls->tmp_fd, name, 0);
		return r;
	}
	if (renameat2(ls->tmp_fd, name, ls->blobs_fd, rel, RENAME_NOREPLACE) ==
	    0)
		return 1;
	if (errno == EINVAL || errno == ENOSYS) {
		/* No RENAME_NOREPLACE here: link never replaces either. */
		r = linkat(ls->tmp_fd, name, ls->blobs_fd, rel, 0) == 0 ? 1 : 0;
		if (r == 0 && errno != EEXIST)
			r = cas_negerrno();
	} else {
		r = errno == EEXIST ? 0 : cas_negerrno();
	}
	unlinkat(ls->tmp_fd, name, 0);
	if (r < 0)
		return cas_log_errno(r, "store %s: publish blob %s: %m",
				     ls->dir, rel + 3);
	return r;
}

void cas_local_stage_discard(struct cas_local *ls, const char *name)
{
	unlinkat(ls->tmp_fd, name, 0);
}

int cas_local_sync(cas_store *s)
{
	struct cas_local *ls = to_local(s);
	if (syncfs(ls->blobs_fd) < 0)
		return cas_log_errno(cas_negerrno(), "store %s: syncfs: %m",
				     ls->dir);
	return 0;
}

static int local_blob_stat(cas_store *s, const cas_digest *d,
			   uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	int r = packed_get(ls, d, PACKED_SIZE, &size, NULL, NULL);
	if (r != 0) {
		if (r > 0 && ret_size)
			*ret_size = size;
		return r < 0 ? r : 0;
	}
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	if (fstatat(ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		if (errno == ENOENT)
			return -ENOENT;
		return cas_log_errno(cas_negerrno(), "stat blob %s: %m",
				     rel + 3);
	}
	if (!S_ISREG(st.st_mode))
		return cas_log_errno(-EIO, "blob %s: not a regular file",
				     rel + 3);
	if (ret_size)
		*ret_size = (uint64_t)st.st_size;
	return 0;
}

/* A blob file opened and checked to be a regular file. */
static int blob_file_open(struct cas_local *ls, const cas_digest *d,
			  int *ret_fd, uint64_t *ret_size)
{
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	_cleanup_close_ int fd =
		openat(ls->blobs_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		if (errno == ENOENT)
			return -ENOENT;
		return cas_log_errno(cas_negerrno(), "open blob %s: %m",
				     rel + 3);
	}
	if (fstat(fd, &st) < 0)
		return cas_log_errno(cas_negerrno(), "stat blob %s: %m",
				     rel + 3);
	if (!S_ISREG(st.st_mode))
		return cas_log_errno(-EIO, "blob %s: not a regular file",
				     rel + 3);
	*ret_size = (uint64_t)st.st_size;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

static int local_blob_open(cas_store *s, const cas_digest *d, int *ret_fd,
			   uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	int r = packed_get(ls, d, PACKED_MEMFD, &size, NULL, ret_fd);
	if (r == 0)
		r = blob_file_open(ls, d, ret_fd, &size);
	else if (r > 0)
		r = 0;
	if (r == 0 && ret_size)
		*ret_size = size;
	return r;
}

static int local_blob_read(cas_store *s, const cas_digest *d, size_t max,
			   uint8_t **ret_buf, uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint64_t size = 0;
	uint8_t *buf = NULL;
	int r = packed_get(ls, d, PACKED_COPY, &size, &buf, NULL);
	if (r > 0 && size > max) {
		free(buf);
		return -EFBIG;
	}
	if (r == 0) {
		_cleanup_close_ int fd = -1;
		if ((r = blob_file_open(ls, d, &fd, &size)) < 0)
			return r;
		if (size > max)
			return -EFBIG;
		if (!(buf = malloc(size ? size : 1)))
			return -ENOMEM;
		if ((r = cas_pread_all(fd, buf, size, 0)) < 0) {
			free(buf);
			char hex[CAS_DIGEST_HEX_LEN + 1];
			cas_digest_to_hex(d, hex);
			return cas_log_errno(r == -EBADMSG ? -EIO : r,
					     "read blob %s: %m", hex);
		}
	}
	if (r < 0)
		return r;
	*ret_buf = buf;
	*ret_size = size;
	return 0;
}

/* Blob writer ---------------------------------------------------------- */

/* The first WRITER_SMALL bytes stay in memory: a blob that ends
 * there is written in one piece by publish_buffer (no temporary file for
 * a blob that is already stored); a larger one spills them to a
 * temporary file first. */
#define WRITER_SMALL 4096

struct local_writer {
	cas_blob_writer base;
	struct cas_local *ls;
	struct tmpfile tmp; /* fd -1 while the bytes fit in small[] */
	cas_hasher hasher;
	uint64_t size;
	uint8_t small[WRITER_SMALL];
};

static int writer_write(cas_blob_writer *w, const void *buf, size_t len)
{
	struct local_writer *lw = (struct local_writer *)w;
	struct cas_local *ls = lw->ls;
	int r;
	if (lw->tmp.fd < 0 && lw->size + len <= sizeof(lw->small)) {
		memcpy(lw->small + lw->size, buf, len);
	} else {
		if (lw->tmp.fd < 0) {
			if ((r = tmp_open(ls, &lw->tmp)) < 0)
				return r;
			r = cas_write_all(lw->tmp.fd, lw->small,
					  (size_t)lw->size);
			if (r < 0)
				goto fail;
		}
		if ((r = cas_write_all(lw->tmp.fd, buf, len)) < 0)
			goto fail;
	}
	cas_hasher_update(&lw->hasher, buf, len);
	lw->size += len;
	return 0;
fail:
	return cas_log_errno(r, "store %s: write temporary file: %m", ls->dir);
}

static void writer_abort(cas_blob_writer *w)
{
	struct local_writer *lw = (struct local_writer *)w;
	if (!lw)
		return;
	tmp_discard(lw->ls, &lw->tmp);
	free(lw);
}

static int writer_commit(cas_blob_writer *w, const cas_digest *expected,
			 cas_digest *ret_digest, uint64_t *ret_size)
{
	struct local_writer *lw = (struct local_writer *)w;
	cas_digest d;
	cas_hasher_final(&lw->hasher, &d);
	if (expected && !cas_digest_eq(expected, &d)) {
		char want[CAS_DIGEST_HEX_LEN + 1], got[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(expected, want);
		cas_digest_to_hex(&d, got);
		writer_abort(w);
		return cas_log_errno(-EBADMSG, "blob %s: content hashes to %s",
				     want, got);
	}
	int r;
	uint64_t size = lw->size;
	if (lw->tmp.fd < 0) {
		r = cas_local_blob_publish_buffer(&lw->ls->base, lw->small,
						  (size_t)size, &d);
	} else if ((r = tmp_datasync(lw->ls, &lw->tmp)) == 0) {
		r = tmp_publish(lw->ls, &lw->tmp, &d);
	}
	writer_abort(w);
	if (r < 0)
		return r;
	if (ret_digest)
		*ret_digest = d;
	if (ret_size)
		*ret_size = size;
	return 0;
}

static const struct cas_blob_writer_ops writer_ops = {
	.write = writer_write,
	.commit = writer_commit,
	.abort = writer_abort,
};

static int local_blob_writer_new(cas_store *s, cas_blob_writer **ret)
{
	struct cas_local *ls = to_local(s);
	if (ls->readonly)
		return -EROFS;
	struct local_writer *lw = calloc(1, sizeof(*lw));
	if (!lw)
		return -ENOMEM;
	lw->base.ops = &writer_ops;
	lw->ls = ls;
	lw->tmp.fd = -1;
	cas_hasher_init(&lw->hasher);
	*ret = &lw->base;
	return 0;
}

/* Directories ---------------------------------------------------------- */

struct copy_out {
	uint8_t *buf;
	size_t len;
};

static int copy_alloc(const MDB_val *val, void *out_)
{
	struct copy_out *out = out_;
	if (!(out->buf = malloc(val->mv_size ? val->mv_size : 1)))
		return -ENOMEM;
	memcpy(out->buf, val->mv_data, val->mv_size);
	out->len = val->mv_size;
	return 0;
}

static int local_directory_get_raw(cas_store *s, const cas_digest *d,
				   uint8_t **ret_buf, size_t *ret_len)
{
	struct cas_local *ls = to_local(s);
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
		*ret_buf = NULL;
		*ret_len = 0;
		return 0;
	}
	struct copy_out out = {0};
	int r = db_lookup(ls, ls->dbi_directories, d, copy_alloc, &out);
	if (r < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "get directory %s: %m", hex);
	}
	if (r == 0)
		return -ENOENT;
	*ret_buf = out.buf;
	*ret_len = out.len;
	return 0;
}

static int local_directory_has(cas_store *s, const cas_digest *d)
{
	struct cas_local *ls = to_local(s);
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY))
		return 1;
	return db_has(ls, ls->dbi_directories, d);
}

/* A batch keeps its Directories in memory, indexed by digest with open
 * addressing, until one write transaction stores them all. */
struct batch_item {
	cas_digest digest;
	uint8_t *buf;
	size_t len;
};

struct local_batch {
	cas_dir_batch base;
	struct cas_local *ls;
	MDB_txn *rtxn; /* snapshot used for closure checks */
	struct batch_item *items;
	size_t n_items, cap_items;
	uint32_t *slots; /* index + 1 into items; 0 = free */
	size_t n_slots;	 /* power of two */
};

static size_t slot_hash(const cas_digest *d, size_t mask)
{
	uint64_t h;
	memcpy(&h, d->bytes, sizeof(h));
	return (size_t)h & mask;
}

static bool batch_contains(struct local_batch *b, const cas_digest *d)
{
	if (b->n_slots == 0)
		return false;
	size_t mask = b->n_slots - 1;
	for (size_t i = slot_hash(d, mask);; i = (i + 1) & mask) {
		uint32_t v = b->slots[i];
		if (v == 0)
			return false;
		if (cas_digest_eq(&b->items[v - 1].digest, d))
			return true;
	}
}

static int batch_index_grow(struct local_batch *b)
{
	size_t n = b->n_slots ? b->n_slots * 2 : 1024;
	uint32_t *slots = calloc(n, sizeof(*slots));
	if (!slots)
		return -ENOMEM;
	for (size_t k = 0; k < b->n_items; k++) {
		size_t i = slot_hash(&b->items[k].digest, n - 1);
		while (slots[i])
			i = (i + 1) & (n - 1);
		slots[i] = (uint32_t)(k + 1);
	}
	free(b->slots);
	b->slots = slots;
	b->n_slots = n;
	return 0;
}

static int batch_add(struct local_batch *b, const cas_digest *d,
		     const void *buf, size_t len)
{
	int r;
	if (b->n_items >= UINT32_MAX - 1)
		return -E2BIG;
	if ((b->n_items + 1) * 2 > b->n_slots && (r = batch_index_grow(b)) < 0)
		return r;
	if (b->n_items == b->cap_items) {
		size_t cap = b->cap_items ? b->cap_items * 2 : 256;
		struct batch_item *items =
			realloc(b->items, cap * sizeof(*items));
		if (!items)
			return -ENOMEM;
		b->items = items;
		b->cap_items = cap;
	}
	uint8_t *copy = malloc(len);
	if (!copy)
		return -ENOMEM;
	memcpy(copy, buf, len);
	size_t k = b->n_items++;
	b->items[k] =
		(struct batch_item){.digest = *d, .buf = copy, .len = len};
	size_t mask = b->n_slots - 1;
	size_t i = slot_hash(d, mask);
	while (b->slots[i])
		i = (i + 1) & mask;
	b->slots[i] = (uint32_t)(k + 1);
	return 0;
}

/* 1 when stored in LMDB (as seen by the batch's snapshot), 0 if not. */
static int batch_stored(struct local_batch *b, const cas_digest *d)
{
	int r;
	if (!b->rtxn && (r = cas_local_rtxn_get(b->ls, &b->rtxn)) < 0)
		return r;
	MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
	r = cas_local_mdb_errno(
		mdb_get(b->rtxn, b->ls->dbi_directories, &key, &val));
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

static int batch_put(cas_dir_batch *base, const void *buf, size_t len,
		     cas_digest *ret_digest)
{
	struct local_batch *b = (struct local_batch *)base;
	cas_digest d;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	const char *why = NULL;
	_cleanup_(cas_directory_freep) cas_directory *dir = NULL;

	cas_directory_digest(buf, len, &d);
	cas_digest_to_hex(&d, hex);
	int r = cas_directory_decode(buf, len, &dir, &why);
	if (r == -EBADMSG)
		return cas_log_errno(r, "directory %s: %s", hex,
				     why ? why : "invalid");
	if (r < 0)
		return r;
	if (ret_digest)
		*ret_digest = d;
	if (len == 0 || batch_contains(b, &d))
		return 0;
	r = batch_stored(b, &d);
	if (r != 0)
		return r < 0 ? r : 0;
	for (size_t i = 0; i < dir->n_directories; i++) {
		const cas_node *c = &dir->directories[i];
		if (cas_digest_eq(&c->digest, &CAS_DIGEST_EMPTY_DIRECTORY) ||
		    batch_contains(b, &c->digest))
			continue;
		r = batch_stored(b, &c->digest);
		if (r < 0)
			return r;
		if (r == 0) {
			char child[CAS_DIGEST_HEX_LEN + 1], name[256];
			cas_digest_to_hex(&c->digest, child);
			cas_escape_name(c->name, c->name_len, name,
					sizeof(name));
			return cas_log_errno(-ENOENT,
					     "directory %s: child directory %s "
					     "(name '%s') is not in the store",
					     hex, child, name);
		}
	}
	r = batch_add(b, &d, buf, len);
	if (r < 0)
		return cas_log_errno(r, "directory %s: %m", hex);
	return 0;
}

static void batch_free(struct local_batch *b)
{
	if (b->rtxn)
		cas_local_rtxn_put(b->ls, b->rtxn);
	for (size_t i = 0; i < b->n_items; i++)
		free(b->items[i].buf);
	free(b->items);
	free(b->slots);
	free(b);
}

static void batch_abort(cas_dir_batch *base)
{
	if (base)
		batch_free((struct local_batch *)base);
}

static int root_key(const char *name, MDB_val *key)
{
	if (!cas_root_name_valid(name))
		return cas_log_errno(-EINVAL, "invalid root name");
	key->mv_size = strlen(name);
	key->mv_data = (void *)name;
	return 0;
}

static int put_root(struct cas_local *ls, MDB_txn *txn, const char *name,
		    const cas_node *node)
{
	MDB_val key, val;
	int r = root_key(name, &key);
	if (r < 0)
		return r;
	cas_node n = *node;
	n.name = NULL;
	n.name_len = 0;
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len = 0;
	const char *why = NULL;
	r = cas_node_encode(&n, &buf, &len, &why);
	if (r < 0)
		return cas_log_errno(r, "root '%s': %s", name,
				     why ? why : "cannot encode");
	val.mv_size = len;
	val.mv_data = buf;
	r = cas_local_mdb_errno(mdb_put(txn, ls->dbi_roots, &key, &val, 0));
	if (r < 0)
		return cas_log_errno(r, "root '%s': %m", name);
	return 0;
}

static int batch_commit(cas_dir_batch *base, const char *root_name,
			const cas_node *root_node)
{
	struct local_batch *b = (struct local_batch *)base;
	struct cas_local *ls = b->ls;
	MDB_txn *txn = NULL;
	int r;

	if (b->rtxn) {
		cas_local_rtxn_put(ls, b->rtxn);
		b->rtxn = NULL;
	}
	if (ls->readonly) {
		r = -EROFS;
		goto out;
	}
	if (b->n_items == 0 && !root_name) {
		r = 0;
		goto out;
	}
	r = cas_local_mdb_errno(mdb_txn_begin(ls->env, NULL, 0, &txn));
	if (r < 0) {
		cas_log_errno(r, "store %s: write transaction: %m", ls->dir);
		goto out;
	}
	for (size_t i = 0; i < b->n_items; i++) {
		struct batch_item *it = &b->items[i];
		MDB_val key = {CAS_DIGEST_LEN, it->digest.bytes};
		MDB_val val = {it->len, it->buf};
		int rc = mdb_put(txn, ls->dbi_directories, &key, &val,
				 MDB_NOOVERWRITE);
		if (rc != MDB_SUCCESS && rc != MDB_KEYEXIST) {
			r = cas_log_errno(cas_local_mdb_errno(rc),
					  "store %s: put directory: %m",
					  ls->dir);
			goto out;
		}
	}
	if (root_name && root_node &&
	    (r = put_root(ls, txn, root_name, root_node)) < 0)
		goto out;
	r = cas_local_mdb_errno(mdb_txn_commit(txn));
	txn = NULL;
	if (r < 0)
		cas_log_errno(r, "store %s: commit: %m", ls->dir);
out:
	if (txn)
		mdb_txn_abort(txn);
	batch_free(b);
	return r;
}

static const struct cas_dir_batch_ops batch_ops = {
	.put = batch_put,
	.commit = batch_commit,
	.abort = batch_abort,
};

static int local_dir_batch_new(cas_store *s, cas_dir_batch **ret)
{
	struct local_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->base.ops = &batch_ops;
	b->ls = to_local(s);
	*ret = &b->base;
	return 0;
}

/* Roots ---------------------------------------------------------------- */

static int local_root_get(cas_store *s, const char *name, cas_node **ret)
{
	struct cas_local *ls = to_local(s);
	MDB_val key, val;
	int r = root_key(name, &key);
	if (r < 0)
		return r;
	MDB_txn *txn;
	if ((r = cas_local_rtxn_get(ls, &txn)) < 0)
		return r;
	r = cas_local_mdb_errno(mdb_get(txn, ls->dbi_roots, &key, &val));
	if (r == 0) {
		cas_node n;
		const char *why = NULL;
		r = cas_node_decode(val.mv_data, val.mv_size, &n, &why);
		if (r < 0) {
			cas_log_errno(r, "root '%s': %s", name,
				      why ? why : "cannot decode");
		} else {
			n.name = (const uint8_t *)name;
			n.name_len = strlen(name);
			*ret = cas_node_dup(&n);
			if (!*ret)
				r = -ENOMEM;
		}
	}
	cas_local_rtxn_put(ls, txn);
	return r;
}

struct root_entry {
	char *name;
	cas_node *node;
};

static int local_roots_foreach(cas_store *s, cas_root_cb cb, void *userdata)
{
	struct cas_local *ls = to_local(s);
	struct root_entry *list = NULL;
	size_t n = 0, cap = 0;
	MDB_txn *txn;
	MDB_cursor *cur = NULL;
	int r = cas_local_rtxn_get(ls, &txn);
	if (r < 0)
		return r;
	/* Copied out first, so that callbacks may use the store freely. */
	r = cas_local_mdb_errno(mdb_cursor_open(txn, ls->dbi_roots, &cur));
	MDB_val key, val;
	int rc = r == 0 ? mdb_cursor_get(cur, &key, &val, MDB_FIRST)
			: MDB_NOTFOUND;
	while (r == 0 && rc == MDB_SUCCESS) {
		cas_node node;
		const char *why = NULL;
		char *name = strndup(key.mv_data, key.mv_size);
		if (!name) {
			r = -ENOMEM;
			break;
		}
		if (memchr(key.mv_data, 0, key.mv_size) ||
		    cas_node_decode(val.mv_data, val.mv_size, &node, &why) <
			    0) {
			cas_log_warning(
				"root '%s': cannot decode (%s), skipped", name,
				why ? why : "bad name");
			free(name);
		} else {
			node.name = (const uint8_t *)name;
			node.name_len = strlen(name);
			if (n == cap) {
				cap = cap ? cap * 2 : 16;
				struct root_entry *l =
					realloc(list, cap * sizeof(*l));
				if (!l) {
					free(name);
					r = -ENOMEM;
					break;
				}
				list = l;
			}
			list[n].name = name;
			list[n].node = cas_node_dup(&node);
			n++;
			if (!list[n - 1].node) {
				r = -ENOMEM;
				break;
			}
		}
		rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
	}
	if (r == 0 && rc != MDB_NOTFOUND)
		r = cas_local_mdb_errno(rc);
	if (cur)
		mdb_cursor_close(cur);
	cas_local_rtxn_put(ls, txn);
	for (size_t i = 0; i < n; i++) {
		if (r == 0)
			r = cb(userdata, list[i].name, list[i].node);
		free(list[i].name);
		free(list[i].node);
	}
	free(list);
	return r;
}

static int local_write_txn(struct cas_local *ls, MDB_txn **ret)
{
	if (ls->readonly)
		return -EROFS;
	int r = cas_local_mdb_errno(mdb_txn_begin(ls->env, NULL, 0, ret));
	if (r < 0)
		return cas_log_errno(r, "store %s: write transaction: %m",
				     ls->dir);
	return 0;
}

static int local_root_set(cas_store *s, const char *name, const cas_node *node)
{
	struct cas_local *ls = to_local(s);
	MDB_txn *txn;
	int r = local_write_txn(ls, &txn);
	if (r < 0)
		return r;
	if ((r = put_root(ls, txn, name, node)) < 0) {
		mdb_txn_abort(txn);
		return r;
	}
	r = cas_local_mdb_errno(mdb_txn_commit(txn));
	if (r < 0)
		return cas_log_errno(r, "root '%s': commit: %m", name);
	return 0;
}

static int local_root_remove(cas_store *s, const char *name)
{
	struct cas_local *ls = to_local(s);
	MDB_val key;
	MDB_txn *txn;
	int r = root_key(name, &key);
	if (r < 0)
		return r;
	if ((r = local_write_txn(ls, &txn)) < 0)
		return r;
	r = cas_local_mdb_errno(mdb_del(txn, ls->dbi_roots, &key, NULL));
	if (r < 0) {
		mdb_txn_abort(txn);
		return r == -ENOENT ? r
				    : cas_log_errno(r, "root '%s': %m", name);
	}
	r = cas_local_mdb_errno(mdb_txn_commit(txn));
	if (r < 0)
		return cas_log_errno(r, "root '%s': commit: %m", name);
	return 0;
}

/* Open / free ---------------------------------------------------------- */

static void local_free(cas_store *s)
{
	struct cas_local *ls = to_local(s);
	for (size_t i = 0; i < ls->n_pool; i++)
		mdb_txn_abort(ls->pool[i]);
	if (ls->env)
		mdb_env_close(ls->env);
	if (ls->tmp_fd >= 0)
		close(ls->tmp_fd);
	if (ls->packs_fd >= 0)
		close(ls->packs_fd);
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
	.blob_stat = local_blob_stat,
	.blob_open = local_blob_open,
	.blob_read = local_blob_read,
	.blob_locate = local_blob_locate,
	.blob_writer_new = local_blob_writer_new,
	.directory_get_raw = local_directory_get_raw,
	.directory_has = local_directory_has,
	.dir_batch_new = local_dir_batch_new,
	.root_get = local_root_get,
	.roots_foreach = local_roots_foreach,
	.root_set = local_root_set,
	.root_remove = local_root_remove,
	.free = local_free,
};

/* Named leftovers of crashed writers; O_TMPFILE leaves none. */
static void tmp_cleanup(struct cas_local *ls)
{
	cas_remove_stale_files(ls->tmp_fd, TMP_MAX_AGE_S);
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
			rc = mdb_env_set_maxdbs(ls->env, 4);
		if (rc == MDB_SUCCESS)
			rc = mdb_env_set_maxreaders(ls->env, MAX_READERS);
		if (rc == MDB_SUCCESS) {
			/* MDB_NOTLS: read transactions are not tied to
			 * threads (FUSE workers, the transaction pool). */
			unsigned flags =
				MDB_NOTLS | (ls->readonly ? MDB_RDONLY : 0);
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
	pthread_mutex_init(&ls->pack_lock, NULL);
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
	if ((r = cas_lmdb_check(ls->dir_fd, dir, ls->readonly)) < 0)
		return r;
	if ((r = open_env(ls, o.create)) < 0)
		return r;
	if (!ls->readonly)
		tmp_cleanup(ls);
	*ret = TAKE_PTR(s);
	return 0;
}
