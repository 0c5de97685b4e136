/* local_db.c - the LMDB side of the local store: lookups under pooled
 * read transactions, Directories (get, has, batches committed leaves
 * first in one write transaction) and named roots.
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/dmap.h"
#include "core/log.h"

/* Looks d up in dbi under a pooled read transaction: 1 when present
 * (after `use`, if given, took what it needs of the value; its error is
 * returned instead), 0 when absent. */
int cas_local_db_lookup(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d,
			int (*use)(const MDB_val *val, void *ctx), void *ctx)
{
	int r = -EAGAIN;
	for (int tries = 0; r == -EAGAIN && tries < CAS_LOCAL_RTXN_TRIES;
	     tries++) {
		MDB_txn *txn;
		if ((r = cas_local_rtxn_get(ls, &txn)) < 0)
			return r;
		MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
		r = cas_local_mdb_errno(mdb_get(txn, dbi, &key, &val));
		if (r == 0 && use)
			r = use(&val, ctx); /* may run again after -EAGAIN */
		if (cas_local_rtxn_check(ls, txn) < 0)
			r = -EAGAIN;
		cas_local_rtxn_put(ls, txn);
	}
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

int cas_local_db_has(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d)
{
	return cas_local_db_lookup(ls, dbi, d, NULL, NULL);
}

/* Directories ---------------------------------------------------------- */

struct copy_out {
	uint8_t *buf;
	size_t len;
};

static int copy_alloc(const MDB_val *val, void *out_)
{
	struct copy_out *out = out_;
	free(out->buf); /* a retry's */
	if (!(out->buf = malloc(val->mv_size ? val->mv_size : 1)))
		return -ENOMEM;
	memcpy(out->buf, val->mv_data, val->mv_size);
	out->len = val->mv_size;
	return 0;
}

int cas_local_directory_get_raw(cas_store *s, const cas_digest *d,
				uint8_t **ret_buf, size_t *ret_len)
{
	struct cas_local *ls = to_local(s);
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
		*ret_buf = NULL;
		*ret_len = 0;
		return 0;
	}
	struct copy_out out = {0};
	int r = cas_local_db_lookup(ls, ls->dbi_directories, d, copy_alloc,
				    &out);
	if (r < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		free(out.buf);
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "get directory %s: %m", hex);
	}
	if (r == 0)
		return -ENOENT;
	*ret_buf = out.buf;
	*ret_len = out.len;
	return 0;
}

int cas_local_directory_size(struct cas_local *ls, MDB_txn *txn,
			     const cas_digest *d, uint64_t *ret_size,
			     const char **ret_why)
{
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY)) {
		*ret_size = 0;
		return 1;
	}
	MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
	int r = cas_local_mdb_errno(
		mdb_get(txn, ls->dbi_directories, &key, &val));
	if (r == -ENOENT)
		return 0;
	if (r == 0)
		r = cas_directory_raw_size(val.mv_data, val.mv_size, ret_size,
					   ret_why);
	return r < 0 ? r : 1;
}

int cas_local_directory_has(cas_store *s, const cas_digest *d)
{
	struct cas_local *ls = to_local(s);
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY))
		return 1;
	return cas_local_db_has(ls, ls->dbi_directories, d);
}

/* A batch keeps its Directories in memory, indexed by digest with open
 * addressing, until one write transaction stores them all. */
struct batch_item {
	cas_digest digest;
	uint8_t *buf;
	size_t len;
	uint64_t size; /* cas_directory_size of it */
};

struct local_batch {
	cas_dir_batch base;
	struct cas_local *ls;
	MDB_txn *rtxn; /* snapshot used for closure checks */
	struct batch_item *items;
	size_t n_items, cap_items;
	struct cas_dmap index; /* the digests of items */
	/* Directories found stored, which the batch's Directories or root
	 * will name: pinned for gc until the batch ends, and their write
	 * time renewed at commit (gc's grace). */
	struct cas_local_pins pins;
	cas_digest *present;
	size_t n_present, cap_present;
};

/* The item of digest d, or NULL. The index maps a digest to its
 * position in items, plus one. */
static struct batch_item *batch_find(struct local_batch *b, const cas_digest *d)
{
	struct cas_dmap_entry *e =
		b->index.n ? cas_dmap_find(&b->index, d) : NULL;
	return e ? &b->items[(uintptr_t)e->value - 1] : NULL;
}

static int batch_add(struct local_batch *b, const cas_digest *d,
		     const void *buf, size_t len, uint64_t size)
{
	int r;
	if (b->n_items >= UINT32_MAX - 1)
		return -E2BIG;
	if ((r = cas_array_grow(&b->items, &b->cap_items, b->n_items + 1,
				sizeof(*b->items), 256)) < 0)
		return r;
	uint8_t *copy = malloc(len);
	if (!copy)
		return -ENOMEM;
	memcpy(copy, buf, len);
	size_t k = b->n_items;
	if ((r = cas_dmap_put(&b->index, d, (void *)(uintptr_t)(k + 1))) < 0) {
		free(copy);
		return r;
	}
	b->n_items++;
	b->items[k] = (struct batch_item){
		.digest = *d, .buf = copy, .len = len, .size = size};
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
	if (r < 0)
		return r;
	/* Present in the snapshot; gc may have collected it since. Checked
	 * again with a fresh transaction and pinned in one gc step
	 * (docs/design.md, "Writers and gc"). */
	if ((r = cas_local_gc_enter(b->ls)) < 0)
		return r;
	r = cas_local_db_has(b->ls, b->ls->dbi_directories, d);
	if (r > 0 &&
	    (r = cas_array_grow(&b->present, &b->cap_present, b->n_present + 1,
				sizeof(*b->present), 64)) == 0) {
		b->present[b->n_present++] = *d;
		r = cas_local_pins_add(b->ls, &b->pins, d, 1);
		r = r < 0 ? r : 1;
	}
	cas_local_gc_leave(b->ls);
	return r;
}

/* Child c of Directory `hex` is earlier in the batch or stored (the
 * closure), and c->size is the size of that Directory (the edge check,
 * directory.h): else -ENOENT or -EBADMSG, one line naming both. */
static int batch_check_child(struct local_batch *b, const char *hex,
			     const cas_node *c)
{
	char child[CAS_DIGEST_HEX_LEN + 1], name[256];
	const char *why = NULL;
	uint64_t size = 0;
	int r;
	struct batch_item *it = batch_find(b, &c->digest);
	if (it) {
		size = it->size;
		r = 0;
	} else {
		if (!b->rtxn && (r = cas_local_rtxn_get(b->ls, &b->rtxn)) < 0)
			return r;
		r = cas_local_directory_size(b->ls, b->rtxn, &c->digest, &size,
					     &why);
		if (r == 1)
			r = 0;
		else if (r == 0)
			r = -ENOENT;
	}
	if (r == 0 && size == c->size)
		return 0;
	cas_digest_to_hex(&c->digest, child);
	cas_escape_name(c->name, c->name_len, name, sizeof(name));
	if (r == -ENOENT)
		return cas_log_errno(r,
				     "directory %s: child directory %s (name "
				     "'%s') is not in the store",
				     hex, child, name);
	if (r == -EBADMSG)
		return cas_log_errno(r,
				     "directory %s: child directory %s (name "
				     "'%s') is stored corrupt: %s",
				     hex, child, name, why ? why : "?");
	if (r < 0)
		return cas_log_errno(r, "directory %s: child directory %s: %m",
				     hex, child);
	return cas_log_errno(-EBADMSG,
			     "directory %s: child directory %s (name '%s') "
			     "has size %llu, but its Directory's size is %llu",
			     hex, child, name, (unsigned long long)c->size,
			     (unsigned long long)size);
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
	if (len == 0 || batch_find(b, &d))
		return 0;
	r = batch_stored(b, &d);
	if (r != 0)
		return r < 0 ? r : 0;
	for (size_t i = 0; i < dir->n_directories; i++) {
		const cas_node *c = &dir->directories[i];
		if ((r = batch_check_child(b, hex, c)) < 0)
			return r;
	}
	uint64_t size;
	if ((r = cas_directory_size(dir, &size)) < 0)
		return cas_log_errno(-EBADMSG, "directory %s: size overflow",
				     hex);
	r = batch_add(b, &d, buf, len, size);
	if (r < 0)
		return cas_log_errno(r, "directory %s: %m", hex);
	return 0;
}

static void batch_free(struct local_batch *b)
{
	cas_local_pins_release(b->ls, &b->pins);
	free(b->present);
	if (b->rtxn)
		cas_local_rtxn_put(b->ls, b->rtxn);
	for (size_t i = 0; i < b->n_items; i++)
		free(b->items[i].buf);
	free(b->items);
	cas_dmap_release(&b->index, NULL);
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

/* The write time of a Directory, for gc's grace: 8 bytes, little-endian
 * seconds since the epoch. */
static int put_time(struct cas_local *ls, MDB_txn *txn, const cas_digest *d,
		    uint64_t now)
{
	if (!ls->has_times_db)
		return 0;
	uint8_t t[8];
	for (int i = 0; i < 8; i++)
		t[i] = (uint8_t)(now >> (8 * i));
	MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val = {8, t};
	return cas_local_mdb_errno(mdb_put(txn, ls->dbi_times, &key, &val, 0));
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
	uint64_t now = (uint64_t)time(NULL);
	for (size_t i = 0; r == 0 && i < b->n_items + b->n_present; i++)
		r = put_time(ls, txn,
			     i < b->n_items ? &b->items[i].digest
					    : &b->present[i - b->n_items],
			     now);
	if (r < 0) {
		cas_log_errno(r, "store %s: put directory time: %m", ls->dir);
		goto out;
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

int cas_local_dir_batch_new(cas_store *s, cas_dir_batch **ret)
{
	struct local_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->base.ops = &batch_ops;
	b->ls = to_local(s);
	b->pins = (struct cas_local_pins)CAS_LOCAL_PINS_INIT;
	*ret = &b->base;
	return 0;
}

/* Roots ---------------------------------------------------------------- */

int cas_local_root_get(cas_store *s, const char *name, cas_node **ret)
{
	struct cas_local *ls = to_local(s);
	MDB_val key, val;
	int r = root_key(name, &key);
	if (r < 0)
		return r;
	const char *why = NULL;
	bool bad = false;
	r = -EAGAIN;
	for (int tries = 0; r == -EAGAIN && tries < CAS_LOCAL_RTXN_TRIES;
	     tries++) {
		MDB_txn *txn;
		if ((r = cas_local_rtxn_get(ls, &txn)) < 0)
			return r;
		r = cas_local_mdb_errno(
			mdb_get(txn, ls->dbi_roots, &key, &val));
		cas_node n;
		bad = false;
		if (r == 0)
			bad = (r = cas_node_decode(val.mv_data, val.mv_size, &n,
						   &why)) < 0;
		if (r == 0) {
			n.name = (const uint8_t *)name;
			n.name_len = strlen(name);
			*ret = cas_node_dup(&n);
			if (!*ret)
				r = -ENOMEM;
		}
		if (cas_local_rtxn_check(ls, txn) < 0) {
			if (r == 0)
				free(TAKE_PTR(*ret));
			r = -EAGAIN;
		}
		cas_local_rtxn_put(ls, txn);
	}
	if (bad && r != -EAGAIN)
		cas_log_errno(r, "root '%s': %s", name,
			      why ? why : "cannot decode");
	return r;
}

struct root_entry {
	char *name;
	cas_node *node;
};

int cas_local_roots_foreach(cas_store *s, cas_root_cb cb, void *userdata)
{
	struct cas_local *ls = to_local(s);
	struct root_entry *list = NULL;
	size_t n = 0, cap = 0;
	MDB_txn *txn;
	MDB_cursor *cur = NULL;
	int tries = 0;
retry:
	cur = NULL;
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
	if (cas_local_rtxn_check(ls, txn) < 0) {
		cas_local_rtxn_put(ls, txn);
		for (size_t i = 0; i < n; i++) {
			free(list[i].name);
			free(list[i].node);
		}
		n = 0;
		if (++tries < CAS_LOCAL_RTXN_TRIES)
			goto retry;
		free(list);
		return -EAGAIN;
	}
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

int cas_local_root_set(cas_store *s, const char *name, const cas_node *node)
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

int cas_local_root_remove(cas_store *s, const char *name)
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
