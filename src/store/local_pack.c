/* local_pack.c - small blobs in packs: the pack index in LMDB (digest ->
 * pack, offset, length), reading packed blobs, the pack fds kept open for
 * the store's life, and appending a group to a writer's pack (local.h).
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

/* Small blobs in packs ----------------------------------------------- */

bool cas_local_is_packed(const struct cas_local *ls, uint64_t size)
{
	return ls->write_packs && size <= CAS_LOCAL_PACK_MAX;
}

/* An index entry, little-endian: pack id, offset, length. */
#define PACK_REF_LEN CAS_PACK_REF_LEN

void cas_local_pack_ref_encode(uint8_t out[PACK_REF_LEN], uint64_t id,
			       uint64_t off, uint32_t len)
{
	for (int i = 0; i < 8; i++) {
		out[i] = (uint8_t)(id >> (8 * i));
		out[8 + i] = (uint8_t)(off >> (8 * i));
	}
	for (int i = 0; i < 4; i++)
		out[16 + i] = (uint8_t)(len >> (8 * i));
}

void cas_local_pack_ref_decode(const uint8_t in[PACK_REF_LEN], uint64_t *id,
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

int cas_local_pack_id_parse(const char *name, uint64_t *ret_id)
{
	uint64_t id = 0;
	for (int i = 0; i < 16; i++) {
		char c = name[i];
		int v = c >= '0' && c <= '9'   ? c - '0'
			: c >= 'a' && c <= 'f' ? c - 'a' + 10
					       : -1;
		if (v < 0)
			return -EINVAL;
		id = id << 4 | (uint64_t)v;
	}
	if (strcmp(name + 16, ".pack"))
		return -EINVAL;
	*ret_id = id;
	return 0;
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
		/* -ESTALE: gc rewrote the pack after our index lookup (the
		 * caller looks again); else absent is damage, not ENOENT. */
		if (r == -ENOENT)
			return -ESTALE;
		return cas_log_errno(r, "store %s: open packs/%s: %m", ls->dir,
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
	int r = cas_local_db_lookup(ls, ls->dbi_blobs, d, copy_ref, ref);
	if (r < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "blob %s: pack index: %m", hex);
	}
	return r;
}

/* -ESTALE for a pack that was indexed but is gone becomes damage. */
static int stale_fail(struct cas_local *ls, uint64_t id, int r)
{
	if (r != -ESTALE)
		return r;
	char name[CAS_PACK_NAME_LEN];
	cas_local_pack_name(id, name);
	return cas_log_errno(-EIO, "store %s: open packs/%s: %s", ls->dir, name,
			     strerror(ENOENT));
}

int cas_local_blob_locate(cas_store *s, const cas_digest *d, int *ret_fd,
			  uint64_t *ret_off, uint64_t *ret_size)
{
	struct cas_local *ls = to_local(s);
	uint8_t ref[PACK_REF_LEN];
	uint64_t id, off;
	uint32_t len;
	int fd = -1, r;
	bool owned = false;
	/* Twice at most: a gc may move the blob to a new pack between the
	 * lookup and the open (the old pack's name is gone, -ESTALE). */
	for (int tries = 0;; tries++) {
		r = pack_ref_get(ls, d, ref);
		if (r <= 0)
			return r < 0 ? r : -ENOENT;
		cas_local_pack_ref_decode(ref, &id, &off, &len);
		r = pack_fd(ls, id, &fd, &owned);
		if (r != -ESTALE || tries == 1)
			break;
	}
	if (r < 0)
		return stale_fail(ls, id, r);
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

static int small_read(struct cas_local *ls, const void *ref, size_t ref_len,
		      uint8_t *buf, size_t size)
{
	uint64_t id, off;
	uint32_t len;
	if (ref_len != PACK_REF_LEN)
		return -EBADMSG;
	cas_local_pack_ref_decode(ref, &id, &off, &len);
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

int cas_local_small_read(struct cas_local *ls, const void *ref, size_t ref_len,
			 uint8_t *buf, size_t size)
{
	int r = small_read(ls, ref, ref_len, buf, size);
	if (r == -ESTALE) {
		uint64_t id, off;
		uint32_t len;
		cas_local_pack_ref_decode(ref, &id, &off, &len);
		r = stale_fail(ls, id, r);
	}
	return r;
}

uint64_t cas_local_small_size(const void *ref, size_t ref_len)
{
	uint64_t id, off;
	uint32_t len = 0;
	if (ref_len == PACK_REF_LEN)
		cas_local_pack_ref_decode(ref, &id, &off, &len);
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
		if (p->fd >= 0) {
			/* Held for the writer's life: gc never rewrites,
			 * truncates or removes a pack a live writer appends
			 * to (the lock goes with the process). */
			(void)flock(p->fd, LOCK_EX | LOCK_NB);
			return 0;
		}
		if (errno != EEXIST)
			break;
	}
	return cas_log_errno(cas_negerrno(), "store %s: create pack: %m",
			     ls->dir);
}

/* Appends and indexes; from_id non-zero: gc's move, where an entry is
 * switched only if it still names pack from_id. */
static int pack_write(struct cas_local_pack *p, const uint8_t *buf, size_t len,
		      const struct cas_local_small *v, size_t n,
		      uint64_t from_id, size_t *ret_added);

int cas_local_pack_append(struct cas_local_pack *p, const uint8_t *buf,
			  size_t len, const struct cas_local_small *v, size_t n,
			  size_t *ret_added)
{
	return pack_write(p, buf, len, v, n, 0, ret_added);
}

int cas_local_pack_move(struct cas_local_pack *p, const uint8_t *buf,
			size_t len, const struct cas_local_small *v, size_t n,
			uint64_t from_id, size_t *ret_moved)
{
	return pack_write(p, buf, len, v, n, from_id, ret_moved);
}

int cas_local_pack_fd(const struct cas_local_pack *p, uint64_t *ret_id)
{
	*ret_id = p->id;
	return p->fd;
}

uint64_t cas_local_pack_bytes(const struct cas_local_pack *p)
{
	return p->size;
}

static int pack_write(struct cas_local_pack *p, const uint8_t *buf, size_t len,
		      const struct cas_local_small *v, size_t n,
		      uint64_t from_id, size_t *ret_added)
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
	if ((r = cas_local_stage_write(ls, p->fd, &direct, buf, len, p->size)) <
		    0 ||
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
		cas_local_pack_ref_encode(ref, p->id, p->size + v[i].off,
					  (uint32_t)v[i].len);
		MDB_val key = {CAS_DIGEST_LEN, (void *)v[i].digest.bytes};
		MDB_val val = {PACK_REF_LEN, ref}, cur;
		unsigned flags = MDB_NOOVERWRITE;
		if (from_id) {
			/* Moved only from where gc found it: the entry may be
			 * gone (a later gc) but never points elsewhere. */
			uint64_t id, off;
			uint32_t l;
			int g = mdb_get(txn, ls->dbi_blobs, &key, &cur);
			if (g != MDB_SUCCESS || cur.mv_size != PACK_REF_LEN)
				continue;
			cas_local_pack_ref_decode(cur.mv_data, &id, &off, &l);
			if (id != from_id || l != v[i].len)
				continue;
			flags = 0;
		}
		int rc = mdb_put(txn, ls->dbi_blobs, &key, &val, flags);
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
	return ls->has_blobs_db ? cas_local_db_has(ls, ls->dbi_blobs, d) : 0;
}

/* 1 when the blob is in a pack (with *ret_size and, as asked, *ret_buf or
 * *ret_fd), 0 when it is not. */
int cas_local_packed_get(struct cas_local *ls, const cas_digest *d,
			 enum packed_want want, uint64_t *ret_size,
			 uint8_t **ret_buf, int *ret_fd)
{
	uint8_t ref[PACK_REF_LEN];
	uint64_t size = 0;
	_cleanup_free_ uint8_t *buf = NULL;
	int r;
	/* Looked up again once if gc moved the blob meanwhile (-ESTALE). */
	for (int tries = 0;; tries++) {
		r = pack_ref_get(ls, d, ref);
		if (r <= 0)
			return r;
		r = 0;
		size = cas_local_small_size(ref, PACK_REF_LEN);
		if (want == PACKED_SIZE)
			break;
		free(buf);
		if (!(buf = malloc(size ? size : 1)))
			r = -ENOMEM;
		else
			r = small_read(ls, ref, PACK_REF_LEN, buf, size);
		if (r != -ESTALE)
			break;
		if (tries == 1) {
			uint64_t id, off;
			uint32_t len;
			cas_local_pack_ref_decode(ref, &id, &off, &len);
			r = stale_fail(ls, id, r);
			break;
		}
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
