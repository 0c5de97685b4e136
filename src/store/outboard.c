/* outboard.c - the BLAKE3 outboards of the local store's large blobs
 * (core/bao.h), kept beside them in DIR/outboards/ab/<hex>: one file
 * per blob over CAS_BAO_THRESHOLD, exactly cas_bao_outboard_size(size)
 * bytes, mode 0444, named like the blob (docs/design.md, "Store layout").
 *
 * Writers compute an outboard in the pass that hashes the blob
 * (cas_bao_encoder with the sink below) and stage it beside the blob;
 * the group commit (ingest.c) names the outboard first, then the blob,
 * after the same syncfs. So a named outboard never points at bytes a
 * crash could lose, and a blob named without one (a crash between the
 * two renames, a store written before outboards) is no problem: the
 * outboard is computed from the blob the first time it is asked for
 * (blob_outboard_open) and kept then. An outboard without its blob is
 * what a cache keeps for a blob it holds in part (partial.c), or what an
 * eviction or gc left; it is never used as the blob's.
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"

/* The sink ------------------------------------------------------------- */

void cas_local_outboard_init(struct cas_local *ls,
			     struct cas_ingest_outboard *o)
{
	*o = (struct cas_ingest_outboard){.ls = ls, .fd = -1};
}

static int outboard_spill(struct cas_ingest_outboard *o)
{
	if (o->len == 0)
		return 0;
	if (o->fd < 0) {
		int r = cas_local_stage_open_named(o->ls, &o->fd, o->name);
		if (r < 0)
			return r;
	}
	int r = cas_pwrite_all(o->fd, o->buf, o->len, o->spilled);
	if (r < 0)
		return cas_log_errno(r, "store %s: write outboard: %m",
				     o->ls->dir);
	o->spilled += o->len;
	o->len = 0;
	return 0;
}

int cas_ingest_outboard_emit(void *ctx, const uint8_t *bytes, size_t len)
{
	struct cas_ingest_outboard *o = ctx;
	if (o->error)
		return o->error;
	/* Grown as needed: most writers' blobs are small. */
	size_t want = CAS_MIN(o->len + len, (size_t)CAS_INGEST_OUTBOARD_MEM);
	if (want > o->cap) {
		int r = cas_array_grow(&o->buf, &o->cap, want, 1, 4096);
		if (r < 0)
			return o->error = r;
	}
	while (len > 0) {
		size_t n = CAS_MIN(len, CAS_INGEST_OUTBOARD_MEM - o->len);
		memcpy(o->buf + o->len, bytes, n);
		o->len += n;
		bytes += n;
		len -= n;
		if (o->len == CAS_INGEST_OUTBOARD_MEM) {
			int r = outboard_spill(o);
			if (r < 0)
				return o->error = r;
		}
	}
	return 0;
}

int cas_ingest_outboard_stage(struct cas_ingest_outboard *o, bool sync,
			      char ret_name[CAS_INGEST_NAME_LEN])
{
	if (o->error)
		return o->error;
	int r = outboard_spill(o);
	if (r == 0 && o->fd < 0) /* an empty outboard: a file all the same */
		r = cas_local_stage_open_named(o->ls, &o->fd, o->name);
	if (r == 0 && sync && fdatasync(o->fd) < 0)
		r = cas_log_errno(cas_negerrno(), "store %s: fdatasync: %m",
				  o->ls->dir);
	if (r < 0)
		return o->error = r;
	close(o->fd);
	o->fd = -1;
	snprintf(ret_name, CAS_INGEST_NAME_LEN, "%s", o->name);
	o->name[0] = 0; /* the caller's now */
	return 0;
}

void cas_ingest_outboard_release(struct cas_ingest_outboard *o)
{
	if (o->fd >= 0)
		close(o->fd);
	o->fd = -1;
	if (o->name[0])
		(void)unlinkat(o->ls->tmp_fd, o->name, 0);
	o->name[0] = 0;
	free(o->buf);
	o->buf = NULL;
	o->len = o->cap = 0;
}

/* Files ---------------------------------------------------------------- */

int cas_local_outboard_unstage(struct cas_local *ls, const char *name,
			       const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int r = 0;
	for (int tries = 0; tries < 2; tries++) {
		if (renameat2(ls->tmp_fd, name, ls->outboards_fd, rel,
			      RENAME_NOREPLACE) == 0) {
			r = 1;
			break;
		}
		r = errno == EEXIST ? 0 : cas_negerrno();
		if (r != -ENOENT || tries > 0)
			break;
		/* Its fan-out folder, on first use. */
		char fan[3] = {rel[0], rel[1], 0};
		if (mkdirat(ls->outboards_fd, fan, 0755) < 0 &&
		    errno != EEXIST) {
			r = cas_negerrno();
			break;
		}
	}
	if (r <= 0)
		(void)unlinkat(ls->tmp_fd, name, 0);
	if (r < 0)
		return cas_log_errno(r, "store %s: name outboard %s: %m",
				     ls->dir, rel + 3);
	return r;
}

int cas_local_outboard_publish_buffer(struct cas_local *ls, const cas_digest *d,
				      const uint8_t *buf, size_t len)
{
	if (ls->readonly || ls->outboards_fd < 0)
		return -EROFS;
	struct cas_ingest_outboard o;
	cas_local_outboard_init(ls, &o);
	char name[CAS_INGEST_NAME_LEN];
	int r = cas_ingest_outboard_emit(&o, buf, len);
	if (r == 0)
		r = cas_ingest_outboard_stage(&o, true, name);
	cas_ingest_outboard_release(&o);
	if (r == 0)
		r = cas_local_outboard_unstage(ls, name, d);
	return r < 0 ? r : 0;
}

void cas_local_outboard_remove(struct cas_local *ls, const char *rel)
{
	if (ls->outboards_fd >= 0)
		(void)unlinkat(ls->outboards_fd, rel, 0);
}

int cas_local_outboard_file_open(struct cas_local *ls, const cas_digest *d,
				 int *ret_fd, uint64_t *ret_len)
{
	if (ls->outboards_fd < 0)
		return -ENOENT;
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	_cleanup_close_ int fd = openat(ls->outboards_fd, rel,
					O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;
	if (fd < 0)
		return errno == ENOENT
			       ? -ENOENT
			       : cas_log_errno(cas_negerrno(),
					       "open outboard %s: %m", rel + 3);
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return cas_log_errno(-EIO, "outboard %s: not a regular file",
				     rel + 3);
	*ret_len = (uint64_t)st.st_size;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

/* The store operation -------------------------------------------------- */

static int bad_blob(const cas_digest *d, const cas_digest *got)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], ghex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	cas_digest_to_hex(got, ghex);
	return cas_log_errno(-EBADMSG, "blob %s: content hashes to %s", hex,
			     ghex);
}

/* A small blob's outboard, computed from its bytes (at most 64 nodes). */
static int small_outboard(cas_store *s, const cas_digest *d, int *ret_fd,
			  uint64_t *ret_len)
{
	_cleanup_free_ uint8_t *buf = NULL, *ob = NULL;
	uint64_t size;
	int r = cas_store_blob_read(s, d, CAS_BAO_THRESHOLD, &buf, &size);
	if (r < 0)
		return r;
	uint64_t len = cas_bao_outboard_size(size);
	if (!(ob = malloc(len ? (size_t)len : 1)))
		return -ENOMEM;
	cas_digest got;
	if ((r = cas_bao_hash_buffer(buf, (size_t)size, &got, ob)) < 0)
		return r;
	if (!cas_digest_eq(&got, d))
		return bad_blob(d, &got);
	if ((r = cas_memfd_sealed(ob, (size_t)len, ret_fd)) < 0)
		return r;
	*ret_len = len;
	return 0;
}

/* A large blob without an outboard (written before outboards were kept,
 * or a crash between the two renames): computed now in one pass over
 * the blob, and kept unless the store is read-only. */
static int compute_outboard(struct cas_local *ls, const cas_digest *d,
			    int *ret_fd, uint64_t *ret_len)
{
	_cleanup_close_ int fd = -1;
	uint64_t size;
	int r = cas_local_blob_open(&ls->base, d, &fd, &size);
	if (r < 0)
		return r;
	_cleanup_free_ uint8_t *ob = NULL;
	size_t len;
	uint64_t got_size;
	cas_digest got;
	if ((r = cas_bao_hash_fd(fd, &got, &got_size, &ob, &len)) < 0) {
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(r, "blob %s: outboard: %m", hex);
	}
	if (!cas_digest_eq(&got, d))
		return bad_blob(d, &got);
	if (!ls->readonly &&
	    cas_local_outboard_publish_buffer(ls, d, ob, len) == 0 &&
	    cas_local_outboard_file_open(ls, d, ret_fd, ret_len) == 0)
		return 0;
	if ((r = cas_memfd_sealed(ob, len, ret_fd)) < 0)
		return r;
	*ret_len = len;
	return 0;
}

int cas_local_blob_outboard_open(cas_store *s, const cas_digest *d, int *ret_fd,
				 uint64_t *ret_len)
{
	struct cas_local *ls = to_local(s);
	uint64_t size;
	int r = cas_local_blob_stat(s, d, &size);
	if (r < 0)
		return r;
	if (!cas_bao_wants_outboard(size))
		return small_outboard(s, d, ret_fd, ret_len);
	uint64_t len;
	int fd;
	r = cas_local_outboard_file_open(ls, d, &fd, &len);
	if (r == -ENOENT)
		return compute_outboard(ls, d, ret_fd, ret_len);
	if (r < 0)
		return r;
	if (len != cas_bao_outboard_size(size)) {
		close(fd);
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(d, hex);
		return cas_log_errno(
			-EBADMSG,
			"blob %s: outboard has %llu bytes, not "
			"%llu",
			hex, (unsigned long long)len,
			(unsigned long long)cas_bao_outboard_size(size));
	}
	*ret_fd = fd;
	*ret_len = len;
	return 0;
}
