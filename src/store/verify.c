/* verify.c - cas_local_verify: check every object of a local store.
 *
 * Checked, each failure one problem line naming the object:
 * - every file under blobs/ is named by 64 hex digits in the right fan-out
 *   folder and its bytes hash to that name; every packed small blob's index
 *   entry has a 32-byte key and its bytes in the pack hash to it;
 * - every Directory's key is 32 bytes, its bytes hash to the key and decode
 *   as canonical; every child Directory is stored (closure); every file it
 *   names has its blob, of the size the node says;
 * - every root decodes and resolves: a directory root's Directory and a
 *   file root's blob are present. Roots may be registered for absent
 *   content (`roots add`), but a store that cannot serve one of its roots
 *   is not whole, so verify reports it.
 * - every outboard beside a large blob (outboard.c) is the blob's tree,
 *   byte for byte, computed in the pass that hashes the blob; a large blob
 *   without one is not a problem (it is computed when first asked for);
 * - every group a partial blob's record names (partial.c) matches the
 *   outboard, which matches the digest;
 * A remote's cache (local.h, DIR/castore-cache) fetches blobs and roots'
 * content only when read: what it never fetched is not a problem there.
 * Leftovers in tmp/ are not objects and are ignored.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"
#include "store/local_i.h"

#define VERIFY_READ (1u << 20)

struct verifier {
	struct cas_local *ls;
	uint8_t *buf; /* VERIFY_READ bytes, reused for every blob */
	cas_verify_cb cb;
	void *userdata;
	int problems;
};

void cas_local_vproblem(cas_verify_cb cb, void *userdata, int *count,
			const char *fmt, va_list ap)
{
	char line[1024];
	vsnprintf(line, sizeof(line), fmt, ap);
	(*count)++;
	if (cb)
		cb(userdata, line);
}

static void _printf_(2, 3) problem(struct verifier *v, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	cas_local_vproblem(v->cb, v->userdata, &v->problems, fmt, ap);
	va_end(ap);
}

/* Compares the nodes the encoder emits with the outboard file. */
struct outboard_check {
	int fd;
	uint64_t len; /* of the file */
	uint64_t off; /* nodes emitted so far */
	bool bad;
	uint64_t bad_off; /* of the first node that differs */
	uint8_t buf[64 * CAS_BAO_NODE_SIZE];
};

static int outboard_compare(void *ctx, const uint8_t *bytes, size_t len)
{
	struct outboard_check *oc = ctx;
	while (len > 0) {
		size_t n = CAS_MIN(len, sizeof(oc->buf));
		if (!oc->bad &&
		    (oc->off + n > oc->len ||
		     cas_pread_all(oc->fd, oc->buf, n, oc->off) < 0 ||
		     memcmp(oc->buf, bytes, n) != 0)) {
			size_t i = 0;
			while (oc->off + i < oc->len && i < n &&
			       oc->buf[i] == bytes[i])
				i++;
			oc->bad = true;
			oc->bad_off = oc->off + i;
		}
		oc->off += n;
		bytes += n;
		len -= n;
	}
	return 0;
}

static int verify_blob(struct verifier *v, int fan_fd, const char *fan,
		       const char *name)
{
	cas_digest want, got;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	if (cas_digest_from_hex(name, &want) < 0) {
		problem(v, "blobs/%s/%s: not a blob name", fan, name);
		return 0;
	}
	cas_digest_to_hex(&want, hex);
	if (strcmp(hex, name) != 0 || memcmp(hex, fan, 2) != 0 || fan[2]) {
		problem(v, "blobs/%s/%s: not a blob name", fan, name);
		return 0;
	}
	_cleanup_close_ int fd =
		openat(fan_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		problem(v, "blob %s: cannot open: %s", hex, strerror(errno));
		return 0;
	}
	if (!S_ISREG(st.st_mode)) {
		problem(v, "blob %s: not a regular file", hex);
		return 0;
	}
	/* A large blob's outboard is checked in the same pass: the tree's
	 * nodes as the bytes give them, against the file beside it. */
	struct outboard_check oc = {.fd = -1};
	if (cas_bao_wants_outboard((uint64_t)st.st_size) &&
	    cas_local_outboard_file_open(v->ls, &want, &oc.fd, &oc.len) < 0)
		oc.fd = -1; /* none yet: computed when first asked for */
	cas_bao_encoder *enc = NULL;
	int r = cas_bao_encoder_new(oc.fd >= 0 ? outboard_compare : NULL, &oc,
				    &enc);
	if (r < 0) {
		if (oc.fd >= 0)
			close(oc.fd);
		return r;
	}
	for (;;) {
		ssize_t n = read(fd, v->buf, VERIFY_READ);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			problem(v, "blob %s: cannot read: %s", hex,
				strerror(errno));
			break;
		}
		if (n == 0)
			break;
		(void)cas_bao_encoder_update(enc, v->buf, (size_t)n);
	}
	(void)cas_bao_encoder_final(enc, &got);
	cas_bao_encoder_free(enc);
	if (!cas_digest_eq(&want, &got)) {
		char ghex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(&got, ghex);
		problem(v, "blob %s: content hashes to %s", hex, ghex);
	} else if (oc.fd >= 0 && oc.len != oc.off) {
		problem(v, "blob %s: outboard has %llu bytes, not %llu", hex,
			(unsigned long long)oc.len, (unsigned long long)oc.off);
	} else if (oc.fd >= 0 && oc.bad) {
		problem(v,
			"blob %s: outboard differs from the blob's tree "
			"at node %llu",
			hex,
			(unsigned long long)(oc.bad_off / CAS_BAO_NODE_SIZE));
	}
	if (oc.fd >= 0)
		close(oc.fd);
	return 0;
}

static int verify_inline_blob(struct verifier *v, MDB_txn *txn,
			      const MDB_val *key, const MDB_val *val)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], ghex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest want, got;
	if (key->mv_size != CAS_DIGEST_LEN) {
		problem(v, "packed blob with a key of %zu bytes", key->mv_size);
		return 0;
	}
	memcpy(want.bytes, key->mv_data, CAS_DIGEST_LEN);
	cas_digest_to_hex(&want, hex);
	uint64_t size = cas_local_small_size(val->mv_data, val->mv_size);
	if (size > VERIFY_READ) {
		problem(v, "blob %s: bad pack index entry", hex);
		return 0;
	}
	int r = cas_local_small_read(v->ls, val->mv_data, val->mv_size, v->buf,
				     (size_t)size);
	if (r == -EBADMSG) {
		problem(v, "blob %s: bad pack index entry", hex);
		return 0;
	}
	if (r < 0) {
		problem(v, "blob %s: cannot read from its pack: %s", hex,
			strerror(-r));
		return 0;
	}
	cas_hash_buffer(v->buf, (size_t)size, &got);
	if (!cas_digest_eq(&want, &got)) {
		cas_digest_to_hex(&got, ghex);
		problem(v, "blob %s: content hashes to %s", hex, ghex);
	}
	return 0;
}

static int verify_blobs(struct verifier *v)
{
	int fd = openat(v->ls->blobs_fd, ".",
			O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: open blobs: %m",
				     v->ls->dir);
	DIR *top = fdopendir(fd);
	if (!top) {
		close(fd);
		return -ENOMEM;
	}
	struct dirent *de;
	int r = 0;
	while (r == 0 && (de = readdir(top))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		int ffd =
			openat(v->ls->blobs_fd, de->d_name,
			       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (ffd < 0) {
			problem(v, "blobs/%s: not a fan-out folder",
				de->d_name);
			continue;
		}
		DIR *fan = fdopendir(ffd);
		if (!fan) {
			close(ffd);
			r = -ENOMEM;
			break;
		}
		struct dirent *fe;
		while (r == 0 && (fe = readdir(fan))) {
			if (!strcmp(fe->d_name, ".") ||
			    !strcmp(fe->d_name, ".."))
				continue;
			r = verify_blob(v, ffd, de->d_name, fe->d_name);
		}
		closedir(fan);
	}
	closedir(top);
	return r;
}

/* 1 present, 0 absent; with its size. */
static int blob_present(struct verifier *v, MDB_txn *txn, const cas_digest *d,
			uint64_t *ret_size)
{
	if (v->ls->has_blobs_db) {
		MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
		int r = cas_local_mdb_errno(
			mdb_get(txn, v->ls->dbi_blobs, &key, &val));
		if (r == 0) {
			*ret_size =
				cas_local_small_size(val.mv_data, val.mv_size);
			return 1;
		}
		if (r != -ENOENT)
			return r;
	}
	char rel[CAS_BLOB_REL_LEN];
	struct stat st;
	cas_local_blob_rel(d, rel);
	if (fstatat(v->ls->blobs_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : cas_negerrno();
	*ret_size = (uint64_t)st.st_size;
	return 1;
}

static int dir_present(struct verifier *v, MDB_txn *txn, const cas_digest *d)
{
	if (cas_digest_eq(d, &CAS_DIGEST_EMPTY_DIRECTORY))
		return 1;
	MDB_val key = {CAS_DIGEST_LEN, (void *)d->bytes}, val;
	int r = cas_local_mdb_errno(
		mdb_get(txn, v->ls->dbi_directories, &key, &val));
	if (r == -ENOENT)
		return 0;
	return r < 0 ? r : 1;
}

static int verify_directory(struct verifier *v, MDB_txn *txn,
			    const MDB_val *key, const MDB_val *val)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], chex[CAS_DIGEST_HEX_LEN + 1];
	char name[512];
	cas_digest want, got;
	if (key->mv_size != CAS_DIGEST_LEN) {
		problem(v, "directory with a key of %zu bytes", key->mv_size);
		return 0;
	}
	memcpy(want.bytes, key->mv_data, CAS_DIGEST_LEN);
	cas_digest_to_hex(&want, hex);
	cas_directory_digest(val->mv_data, val->mv_size, &got);
	if (!cas_digest_eq(&want, &got)) {
		cas_digest_to_hex(&got, chex);
		problem(v, "directory %s: content hashes to %s", hex, chex);
		return 0;
	}
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	const char *why = NULL;
	int r = cas_directory_decode(val->mv_data, val->mv_size, &d, &why);
	if (r == -EBADMSG) {
		problem(v, "directory %s: %s", hex,
			why ? why : "cannot decode");
		return 0;
	}
	if (r < 0)
		return r;
	for (size_t i = 0; i < d->n_directories; i++) {
		const cas_node *c = &d->directories[i];
		uint64_t size = 0;
		r = cas_local_directory_size(v->ls, txn, &c->digest, &size,
					     &why);
		if (r == -EBADMSG)
			continue; /* a problem of its own, found there */
		if (r < 0)
			return r;
		if (r == 1 && size == c->size)
			continue;
		cas_digest_to_hex(&c->digest, chex);
		cas_escape_name(c->name, c->name_len, name, sizeof(name));
		if (r == 0)
			problem(v,
				"directory %s: child directory %s (name '%s') "
				"is missing",
				hex, chex, name);
		else
			problem(v,
				"directory %s: child directory %s (name '%s') "
				"has size %llu, but its Directory's size is "
				"%llu",
				hex, chex, name, (unsigned long long)c->size,
				(unsigned long long)size);
	}
	for (size_t i = 0; i < d->n_files; i++) {
		const cas_node *c = &d->files[i];
		uint64_t size = 0;
		if ((r = blob_present(v, txn, &c->digest, &size)) < 0)
			return r;
		if (r == 1 && size == c->size)
			continue;
		if (r == 0 && v->ls->is_cache)
			continue; /* a cache fetches blobs when read */
		cas_digest_to_hex(&c->digest, chex);
		cas_escape_name(c->name, c->name_len, name, sizeof(name));
		if (r == 0)
			problem(v,
				"directory %s: blob %s of file '%s' is missing",
				hex, chex, name);
		else
			problem(v,
				"directory %s: blob %s of file '%s' has %llu "
				"bytes, expected %llu",
				hex, chex, name, (unsigned long long)size,
				(unsigned long long)c->size);
	}
	return 0;
}

static int verify_root(struct verifier *v, MDB_txn *txn, const MDB_val *key,
		       const MDB_val *val)
{
	char name[512], hex[CAS_DIGEST_HEX_LEN + 1];
	cas_escape_name(key->mv_data, key->mv_size, name, sizeof(name));
	if (!cas_name_valid(key->mv_data, key->mv_size)) {
		problem(v, "root '%s': invalid name", name);
		return 0;
	}
	cas_node node;
	const char *why = NULL;
	int r = cas_node_decode(val->mv_data, val->mv_size, &node, &why);
	if (r < 0) {
		problem(v, "root '%s': %s", name, why ? why : "cannot decode");
		return 0;
	}
	cas_digest_to_hex(&node.digest, hex);
	if (node.type == CAS_NODE_DIRECTORY) {
		if ((r = dir_present(v, txn, &node.digest)) < 0)
			return r;
		if (r == 0 && !v->ls->is_cache)
			problem(v, "root '%s': directory %s is missing", name,
				hex);
	} else if (node.type == CAS_NODE_FILE) {
		uint64_t size = 0;
		if ((r = blob_present(v, txn, &node.digest, &size)) < 0)
			return r;
		if (r == 0 && !v->ls->is_cache)
			problem(v, "root '%s': blob %s is missing", name, hex);
		else if (size != node.size)
			problem(v,
				"root '%s': blob %s has %llu bytes, expected "
				"%llu",
				name, hex, (unsigned long long)size,
				(unsigned long long)node.size);
	}
	return 0;
}

static int verify_db(struct verifier *v, MDB_txn *txn, MDB_dbi dbi,
		     int (*check)(struct verifier *, MDB_txn *, const MDB_val *,
				  const MDB_val *))
{
	MDB_cursor *cur;
	int r = cas_local_mdb_errno(mdb_cursor_open(txn, dbi, &cur));
	if (r < 0)
		return r;
	MDB_val key, val;
	int rc = mdb_cursor_get(cur, &key, &val, MDB_FIRST);
	while (rc == MDB_SUCCESS) {
		if ((r = check(v, txn, &key, &val)) < 0)
			break;
		rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
	}
	if (r == 0 && rc != MDB_NOTFOUND)
		r = cas_local_mdb_errno(rc);
	mdb_cursor_close(cur);
	return r;
}

int cas_local_verify(cas_store *s, cas_verify_cb cb, void *userdata)
{
	if (!cas_store_is_local(s))
		return -EOPNOTSUPP;
	struct verifier v = {
		.ls = (struct cas_local *)s, .cb = cb, .userdata = userdata};
	_cleanup_free_ uint8_t *buf = v.buf = malloc(VERIFY_READ);
	if (!buf)
		return -ENOMEM;
	int r = verify_blobs(&v);
	if (r < 0)
		return r;
	if ((r = cas_local_verify_partials(v.ls, cb, userdata)) < 0)
		return cas_log_errno(r, "store %s: partial blobs: %m",
				     v.ls->dir);
	v.problems += r;
	MDB_txn *txn;
	if ((r = cas_local_rtxn_get(v.ls, &txn)) < 0)
		return r;
	if (v.ls->has_blobs_db)
		r = verify_db(&v, txn, v.ls->dbi_blobs, verify_inline_blob);
	if (r == 0)
		r = verify_db(&v, txn, v.ls->dbi_directories, verify_directory);
	if (r == 0)
		r = verify_db(&v, txn, v.ls->dbi_roots, verify_root);
	/* Without the lock file, a writer may have reused what we read. */
	if (r == 0 && cas_local_rtxn_check(v.ls, txn) < 0) {
		cas_local_rtxn_put(v.ls, txn);
		return cas_log_errno(-EAGAIN,
				     "store %s: a writer changed the store "
				     "under this reader without its lock "
				     "file; run verify again",
				     v.ls->dir);
	}
	cas_local_rtxn_put(v.ls, txn);
	if (r < 0)
		return cas_log_errno(r, "store %s: %m", v.ls->dir);
	return v.problems;
}
