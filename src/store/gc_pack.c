/* gc_pack.c - the packs part of cas_local_gc (gc.c has the rest).
 *
 * After the sweep deleted the index entries of dead packed blobs, each
 * pack that no live writer appends to (its writer holds it flock'ed for
 * its life; gc took the flock under gc.lock, so no writer can start on
 * it) is, by what the sweep kept of it:
 *   - removed, when it holds no indexed blob (a dead writer's partial
 *     pack, or every blob dead);
 *   - rewritten, when its live bytes are below CAS_GC_PACK_LIVE_PERCENT
 *     of its size: the live blobs are copied, in pack order, into one new
 *     pack shared by every pack rewritten in this run, made durable, and
 *     their index entries switched in one LMDB transaction per group of
 *     REWRITE_GROUP bytes (each entry only if it still names the old
 *     pack); then the old pack's name is removed;
 *   - truncated after its last indexed blob, when a writer that is gone
 *     left unindexed bytes at its end (an interrupted or ENOSPC import).
 * Readers need no lock: a reader that holds an fd of the old pack (a
 * mount keeps one per pack) reads the same bytes from it until it closes
 * it, and the kernel frees the space then; a reader that looked the blob
 * up before the switch and opens the pack after its removal looks it up
 * again (local_pack.c, -ESTALE). A SIGKILL leaves a new pack partly
 * indexed or not at all, and old packs with fewer entries: the next gc
 * finishes. The new pack takes the newest time of the packs it replaces,
 * so the grace of their blobs does not start again.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"
#include "store/gc_i.h"

#define REWRITE_GROUP (8u << 20)

static int by_id(const void *a, const void *b)
{
	const struct gc_pack *x = a, *y = b;
	return x->id < y->id ? -1 : x->id > y->id;
}

static int list_pack(void *userdata, int packs_fd, const char *name)
{
	struct gc_packs *p = userdata;
	uint64_t id;
	struct stat st;
	if (cas_local_pack_id_parse(name, &id) < 0 ||
	    fstatat(packs_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
	    !S_ISREG(st.st_mode))
		return 0;
	int r = cas_array_grow(&p->v, &p->cap, p->n + 1, sizeof(*p->v), 16);
	if (r < 0)
		return r;
	p->v[p->n++] = (struct gc_pack){
		.id = id,
		.mtime = st.st_mtime,
		.size = (uint64_t)st.st_size,
		.fd = -1,
	};
	return 0;
}

int cas_gc_packs_list(struct cas_local *ls, struct gc_packs *p)
{
	if (ls->packs_fd < 0)
		return 0;
	int r = cas_gc_each_entry(ls->packs_fd, list_pack, p);
	if (p->n > 1)
		qsort(p->v, p->n, sizeof(*p->v), by_id);
	return r;
}

struct gc_pack *cas_gc_pack_find(struct gc_packs *p, uint64_t id)
{
	struct gc_pack key = {.id = id};
	return p->n ? bsearch(&key, p->v, p->n, sizeof(*p->v), by_id) : NULL;
}

void cas_gc_packs_lock(struct gc_packs *p, int packs_fd, bool dry_run)
{
	for (size_t i = 0; i < p->n; i++) {
		struct gc_pack *k = &p->v[i];
		char name[CAS_PACK_NAME_LEN];
		cas_local_pack_name(k->id, name);
		int fd = openat(packs_fd, name,
				(dry_run ? O_RDONLY : O_RDWR) | O_CLOEXEC |
					O_NOFOLLOW);
		if (fd < 0) {
			k->owned = true; /* gone: nothing to do */
			continue;
		}
		if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
			k->owned = true;
			close(fd);
			continue;
		}
		if (dry_run) {
			close(fd); /* only asked */
			continue;
		}
		k->fd = fd;
	}
}

void cas_gc_packs_release(struct gc_packs *p)
{
	for (size_t i = 0; i < p->n; i++)
		if (p->v[i].fd >= 0)
			close(p->v[i].fd);
	free(p->v);
	*p = (struct gc_packs){0};
}

/* Worth a rewrite: mostly dead, and by enough to matter (a pack of one
 * small group is a block or two whatever it holds). */
static bool below_threshold(const struct gc_pack *k)
{
	return k->live_bytes * 100 < k->size * CAS_GC_PACK_LIVE_PERCENT &&
	       k->size - k->live_bytes >= CAS_GC_PACK_MIN_DEAD;
}

static uint64_t block_up(uint64_t n)
{
	return (n + CAS_LOCAL_PACK_ALIGN - 1) / CAS_LOCAL_PACK_ALIGN *
	       CAS_LOCAL_PACK_ALIGN;
}

/* A live blob of a pack being rewritten. */
struct moving {
	cas_digest digest;
	uint64_t id, off;
	uint32_t len;
};

static int by_place(const void *a, const void *b)
{
	const struct moving *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return x->off < y->off ? -1 : x->off > y->off;
}

struct moving_list {
	struct gc_packs *p;
	struct moving *v;
	size_t n, cap;
};

static int add_moving(void *userdata, MDB_cursor *cur, const MDB_val *key,
		      const MDB_val *val)
{
	(void)cur;
	struct moving_list *l = userdata;
	struct moving m;
	if (key->mv_size != CAS_DIGEST_LEN || val->mv_size != CAS_PACK_REF_LEN)
		return 0;
	cas_local_pack_ref_decode(val->mv_data, &m.id, &m.off, &m.len);
	struct gc_pack *k = cas_gc_pack_find(l->p, m.id);
	if (!k || k->fd < 0 || !k->live_n || !below_threshold(k))
		return 0;
	int r = cas_array_grow(&l->v, &l->cap, l->n + 1, sizeof(*l->v), 256);
	if (r < 0)
		return r;
	memcpy(m.digest.bytes, key->mv_data, CAS_DIGEST_LEN);
	l->v[l->n++] = m;
	return 0;
}

/* The index entries that name a pack to rewrite, in pack order. */
static int list_moving(struct cas_local *ls, struct gc_packs *p,
		       struct moving **ret, size_t *ret_n)
{
	struct moving_list l = {.p = p};
	MDB_txn *txn;
	int r = cas_local_rtxn_get(ls, &txn);
	if (r < 0)
		return r;
	r = cas_local_each_record(txn, ls->dbi_blobs, add_moving, &l);
	cas_local_rtxn_put(ls, txn);
	if (r < 0) {
		free(l.v);
		return r;
	}
	if (l.n > 1)
		qsort(l.v, l.n, sizeof(*l.v), by_place);
	*ret = l.v;
	*ret_n = l.n;
	return 0;
}

struct rewrite {
	struct cas_local *ls;
	struct cas_local_pack *pack; /* the new one, made on first use */
	uint8_t *buf;		     /* REWRITE_GROUP + a block, aligned */
	struct cas_local_small *v;
	size_t n, cap, len;
	uint64_t from; /* the old pack of the group */
	int64_t mtime; /* the newest of the packs it replaces */
};

static int rewrite_flush(struct rewrite *w)
{
	if (w->n == 0)
		return 0;
	int r = 0;
	if (!w->pack)
		r = cas_local_pack_new(&w->ls->base, &w->pack);
	size_t padded = (size_t)block_up(w->len);
	memset(w->buf + w->len, 0, padded - w->len);
	if (r == 0)
		r = cas_local_pack_move(w->pack, w->buf, padded, w->v, w->n,
					w->from, NULL);
	w->n = w->len = 0;
	return r;
}

static int rewrite_add(struct rewrite *w, const struct gc_pack *k,
		       const struct moving *m)
{
	int r;
	if (w->n && (w->from != m->id || w->len + m->len > REWRITE_GROUP) &&
	    (r = rewrite_flush(w)) < 0)
		return r;
	w->from = m->id;
	if ((r = cas_array_grow(&w->v, &w->cap, w->n + 1, sizeof(*w->v), 256)) <
	    0)
		return r;
	if ((r = cas_pread_all(k->fd, w->buf + w->len, m->len, m->off)) < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(&m->digest, hex);
		/* Left where it is (verify names it); the pack stays. */
		cas_log_errno(r == -EBADMSG ? -EIO : r,
			      "store %s: blob %s: read from its pack: %m",
			      w->ls->dir, hex);
		return 0;
	}
	w->v[w->n++] = (struct cas_local_small){m->digest, w->len, m->len};
	w->len += m->len;
	return 0;
}

/* 1 when no index entry names pack id any more. */
static int pack_unindexed(struct cas_local *ls, const struct moving *v,
			  size_t n, uint64_t id)
{
	for (size_t i = 0; i < n; i++) {
		if (v[i].id != id)
			continue;
		uint8_t ref[CAS_PACK_REF_LEN];
		MDB_txn *txn;
		int r = cas_local_rtxn_get(ls, &txn);
		if (r < 0)
			return r;
		MDB_val key = {CAS_DIGEST_LEN, (void *)v[i].digest.bytes}, val;
		int rc = mdb_get(txn, ls->dbi_blobs, &key, &val);
		bool still = false;
		if (rc == MDB_SUCCESS && val.mv_size == CAS_PACK_REF_LEN) {
			uint64_t pid, off;
			uint32_t len;
			memcpy(ref, val.mv_data, sizeof(ref));
			cas_local_pack_ref_decode(ref, &pid, &off, &len);
			still = pid == id;
		}
		cas_local_rtxn_put(ls, txn);
		if (still)
			return 0;
	}
	return 1;
}

static int remove_pack(struct cas_local *ls, struct gc_pack *k,
		       struct cas_gc_stats *st)
{
	char name[CAS_PACK_NAME_LEN];
	cas_local_pack_name(k->id, name);
	if (unlinkat(ls->packs_fd, name, 0) < 0)
		return cas_log_errno(cas_negerrno(),
				     "store %s: remove packs/%s: %m", ls->dir,
				     name);
	st->pack_bytes += k->size;
	return 0;
}

static int rewrite_packs(struct cas_local *ls, struct gc_packs *p,
			 struct cas_gc_stats *st)
{
	struct moving *v = NULL;
	size_t n = 0;
	int r = list_moving(ls, p, &v, &n);
	if (r < 0 || n == 0) {
		free(v);
		return r;
	}
	struct rewrite w = {.ls = ls};
	w.buf = aligned_alloc(CAS_LOCAL_PACK_ALIGN,
			      REWRITE_GROUP + CAS_LOCAL_PACK_MAX +
				      CAS_LOCAL_PACK_ALIGN);
	if (!w.buf)
		r = -ENOMEM;
	for (size_t i = 0; r == 0 && i < n; i++) {
		struct gc_pack *k = cas_gc_pack_find(p, v[i].id);
		w.mtime = CAS_MAX(w.mtime, k->mtime);
		r = rewrite_add(&w, k, &v[i]);
	}
	if (r == 0)
		r = rewrite_flush(&w);
	uint64_t new_id = 0, new_size = 0, before = st->pack_bytes;
	int new_fd = w.pack ? cas_local_pack_fd(w.pack, &new_id) : -1;
	if (r == 0 && new_fd >= 0) {
		/* Its blobs keep the write time they had. */
		struct timespec ts[2] = {{0, UTIME_OMIT}, {w.mtime, 0}};
		(void)futimens(new_fd, ts);
		struct stat sb;
		if (fstat(new_fd, &sb) == 0)
			new_size = (uint64_t)sb.st_size;
	}
	/* Each old pack goes once nothing names it. */
	for (size_t i = 0; r == 0 && i < p->n; i++) {
		struct gc_pack *k = &p->v[i];
		if (k->fd < 0 || !k->live_n || !below_threshold(k))
			continue;
		int u = pack_unindexed(ls, v, n, k->id);
		if (u < 0)
			r = u;
		else if (u > 0 && (r = remove_pack(ls, k, st)) == 0)
			st->packs_rewritten++;
	}
	st->pack_bytes -= CAS_MIN(new_size, st->pack_bytes - before);
	cas_local_pack_close(w.pack);
	free(w.buf);
	free(w.v);
	free(v);
	return r;
}

int cas_gc_packs_collect(struct cas_local *ls, struct gc_packs *p, bool dry_run,
			 struct cas_gc_stats *st)
{
	int r = 0;
	for (size_t i = 0; i < p->n; i++) {
		struct gc_pack *k = &p->v[i];
		if (k->owned)
			continue;
		if (k->live_n == 0) {
			if (dry_run) {
				st->packs_removed++;
				st->pack_bytes += k->size;
			} else if (k->fd >= 0 &&
				   (r = remove_pack(ls, k, st)) == 0) {
				st->packs_removed++;
			}
		} else if (below_threshold(k)) {
			if (dry_run) {
				st->packs_rewritten++;
				st->pack_bytes += k->size - k->live_bytes;
			}
		} else if (block_up(k->end) < k->size) {
			/* Unindexed bytes a writer that is gone left. */
			uint64_t keep = block_up(k->end);
			if (dry_run) {
				st->packs_truncated++;
				st->pack_bytes += k->size - keep;
			} else if (k->fd >= 0 &&
				   ftruncate(k->fd, (off_t)keep) == 0) {
				st->packs_truncated++;
				st->pack_bytes += k->size - keep;
			}
		}
		if (r < 0)
			return r;
	}
	return dry_run ? 0 : rewrite_packs(ls, p, st);
}
