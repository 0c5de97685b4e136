/* ingest.c - every write of blob bytes into the local store: temporary
 * files in DIR/tmp, single blobs made durable and linked under their name
 * (writers, publish_*), and the staging that import and the remote cache
 * use: named files in tmp/ made durable together by one syncfs, then
 * renamed into blobs/ (never replacing).
 *
 * Blob publish: the bytes go to an unnamed O_TMPFILE in DIR/tmp (nothing
 * is left behind by a crash), which is then linked under its final name
 * with linkat(); link never replaces an existing name, so EEXIST means
 * another writer published the same bytes first. File systems without
 * O_TMPFILE get named temporary files (O_EXCL) that are linked then
 * unlinked; the next writer removes such leftovers once they are older
 * than an hour (a live writer may still be filling a younger one).
 */
#include "store/local_i.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"

enum {
	TMP_UNKNOWN = 0,
	TMP_EMPTY_PATH = 1,
	TMP_PROC = 2,
	TMP_NAMED = 3,
};

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

/* A single blob put that finds its blob present renews its write time:
 * gc's grace counts from it, so a remote writer that puts blobs now and
 * the Directories naming them later keeps them (docs/design.md). */
static void blob_touch(struct cas_local *ls, const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	(void)utimensat(ls->blobs_fd, rel, NULL, AT_SYMLINK_NOFOLLOW);
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
	if (r == 0)
		blob_touch(ls, d);
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

int cas_local_blob_publish_buffer(cas_store *s, const void *buf, size_t len,
				  const cas_digest *d)
{
	struct cas_local *ls = to_local(s);
	int r = cas_local_blob_exists(ls, d);
	if (r > 0)
		blob_touch(ls, d);
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
	if (r > 0)
		blob_touch(ls, d);
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
	return cas_log_errno(r, "blob %s: source is shorter than %llu bytes",
			     hex, (unsigned long long)size);
}

/* Staging (import and the remote cache): blobs are written to named files
 * in tmp/ without any sync; after one syncfs has made a whole group
 * durable, each is renamed into place (unstage, never replacing). A crash
 * leaves only tmp/ files, which later writers remove. stage_fd checks
 * that the source still matches st (size, mtime, ctime) after the copy,
 * else -EBADMSG (the file changed while it was imported). unstage returns
 * 1 when the blob was added, 0 when it was already there; the staged file
 * is gone either way.
 *
 * Files of at least CAS_INGEST_DIRECT_MIN bytes are written with O_DIRECT
 * (all but the last partial block), from the caller's buffer, which must
 * then be aligned to CAS_INGEST_ALIGN (else the page cache is used):
 * stage_buffer writes buf itself, stage_fd reads the source through
 * `scratch` (scratch_size bytes, a multiple of CAS_INGEST_ALIGN).
 * Buffered writes of a whole tree cost more CPU than hashing it, here
 * measured at twice the system time; the direct ones leave that to the
 * disk. */
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

int cas_local_stage_open_named(struct cas_local *ls, int *ret_fd,
			       char ret_name[CAS_INGEST_NAME_LEN])
{
	struct tmpfile t;
	int r = stage_open(ls, &t, false);
	if (r < 0)
		return r;
	snprintf(ret_name, CAS_INGEST_NAME_LEN, "%s", t.name);
	*ret_fd = t.fd;
	return 0;
}

static int stage_finish(struct cas_local *ls, struct tmpfile *t, int r,
			char ret_name[CAS_INGEST_NAME_LEN])
{
	if (r < 0) {
		tmp_discard(ls, t);
		return r;
	}
	close(t->fd);
	t->fd = -1;
	snprintf(ret_name, CAS_INGEST_NAME_LEN, "%s", t->name);
	return 0;
}

static bool aligned(const void *p, size_t n)
{
	return ((uintptr_t)p | n) % CAS_INGEST_ALIGN == 0;
}

/* Writes buf at off of a staged file. While the file is O_DIRECT, whole
 * blocks go directly; a tail of less than a block (the end of the blob)
 * is written through the page cache, which needs O_DIRECT off: the block
 * is new, so the page cache has nothing to read back. A file system that
 * refuses a direct write (EINVAL) gets buffered writes from then on. */
int cas_local_stage_write(struct cas_local *ls, int fd, bool *direct,
			  const uint8_t *buf, size_t len, uint64_t off)
{
	if (*direct) {
		size_t head = len - len % CAS_INGEST_ALIGN;
		int r = aligned(buf, head) && off % CAS_INGEST_ALIGN == 0
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
	int r = stage_open(ls, t, size >= CAS_INGEST_DIRECT_MIN);
	if (r < 0)
		return r;
	int fl = fcntl(t->fd, F_GETFL);
	*direct = fl >= 0 && (fl & O_DIRECT);
	return 0;
}

static int stage_buffer(struct cas_local *ls, const void *buf, size_t len,
			char ret_name[CAS_INGEST_NAME_LEN])
{
	struct tmpfile t;
	bool direct;
	int r = stage_open_for(ls, &t, len, &direct);
	if (r < 0)
		return r;
	r = cas_local_stage_write(ls, t.fd, &direct, buf, len, 0);
	if (r < 0)
		cas_log_errno(r, "store %s: write temporary file: %m", ls->dir);
	return stage_finish(ls, &t, r, ret_name);
}

static int stage_fd(struct cas_local *ls, int src_fd, uint64_t size,
		    const struct stat *st, uint8_t *scratch,
		    size_t scratch_size, char ret_name[CAS_INGEST_NAME_LEN])
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
		else if ((r = cas_local_stage_write(ls, t.fd, &direct, scratch,
						    (size_t)n, off)) == 0)
			off += (uint64_t)n; /* after a tail, buffered */
	}
	if (r == 0)
		r = source_unchanged(src_fd, st);
	if (r < 0 && r != -EBADMSG)
		cas_log_errno(r, "store %s: write temporary file: %m", ls->dir);
	return stage_finish(ls, &t, r, ret_name);
}

int cas_local_blob_rename_in(struct cas_local *ls, int dir_fd, const char *name,
			     const cas_digest *d)
{
	char rel[CAS_BLOB_REL_LEN];
	cas_local_blob_rel(d, rel);
	int r = fanout_ensure(ls, d);
	if (r < 0) {
		unlinkat(dir_fd, name, 0);
		return r;
	}
	if (renameat2(dir_fd, name, ls->blobs_fd, rel, RENAME_NOREPLACE) == 0)
		return 1;
	if (errno == EINVAL || errno == ENOSYS) {
		/* No RENAME_NOREPLACE here: link never replaces either. */
		r = linkat(dir_fd, name, ls->blobs_fd, rel, 0) == 0 ? 1 : 0;
		if (r == 0 && errno != EEXIST)
			r = cas_negerrno();
	} else {
		r = errno == EEXIST ? 0 : cas_negerrno();
	}
	unlinkat(dir_fd, name, 0);
	if (r < 0)
		return cas_log_errno(r, "store %s: publish blob %s: %m",
				     ls->dir, rel + 3);
	return r;
}

static int unstage(struct cas_local *ls, const char *name, const cas_digest *d)
{
	return cas_local_blob_rename_in(ls, ls->tmp_fd, name, d);
}

int cas_local_sync(cas_store *s)
{
	struct cas_local *ls = to_local(s);
	if (syncfs(ls->blobs_fd) < 0)
		return cas_log_errno(cas_negerrno(), "store %s: syncfs: %m",
				     ls->dir);
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
	/* One pass: the digest and the outboard (kept for a large blob). */
	cas_bao_encoder *enc;
	struct cas_ingest_outboard outboard;
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
	if ((r = cas_bao_encoder_update(lw->enc, buf, len)) < 0)
		return r;
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
	cas_bao_encoder_free(lw->enc);
	cas_ingest_outboard_release(&lw->outboard);
	free(lw);
}

static int writer_commit(cas_blob_writer *w, const cas_digest *expected,
			 cas_digest *ret_digest, uint64_t *ret_size)
{
	struct local_writer *lw = (struct local_writer *)w;
	cas_digest d;
	int r = cas_bao_encoder_final(lw->enc, &d);
	if (r < 0) {
		writer_abort(w);
		return r;
	}
	if (expected && !cas_digest_eq(expected, &d)) {
		char want[CAS_DIGEST_HEX_LEN + 1], got[CAS_DIGEST_HEX_LEN + 1];
		cas_digest_to_hex(expected, want);
		cas_digest_to_hex(&d, got);
		writer_abort(w);
		return cas_log_errno(-EBADMSG, "blob %s: content hashes to %s",
				     want, got);
	}
	uint64_t size = lw->size;
	if (lw->tmp.fd < 0) {
		r = cas_local_blob_publish_buffer(&lw->ls->base, lw->small,
						  (size_t)size, &d);
	} else if ((r = tmp_datasync(lw->ls, &lw->tmp)) == 0) {
		/* Its outboard named first (durable, like the blob). */
		char ob[CAS_INGEST_NAME_LEN];
		if (cas_bao_wants_outboard(size) &&
		    cas_ingest_outboard_stage(&lw->outboard, true, ob) == 0)
			(void)cas_local_outboard_unstage(lw->ls, ob, &d);
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

int cas_local_blob_writer_new(cas_store *s, cas_blob_writer **ret)
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
	cas_local_outboard_init(ls, &lw->outboard);
	int r = cas_bao_encoder_new(cas_ingest_outboard_emit, &lw->outboard,
				    &lw->enc);
	if (r < 0) {
		free(lw);
		return r;
	}
	*ret = &lw->base;
	return 0;
}

/* The writer's API (ingest.h) ------------------------------------------ */

struct cas_ingest {
	struct cas_local *ls;
	struct cas_local_pack *pack; /* made on the first small group */
	uint64_t pack_max;	     /* 0: one pack for the writer's life */
	/* What this writer found present or committed, until it is freed
	 * (after it committed what refers to them): gc keeps them. */
	pthread_mutex_t pins_lock;
	struct cas_local_pins pins; /* protected by pins_lock */
};

int cas_ingest_new(cas_store *s, struct cas_ingest **ret)
{
	if (!cas_store_is_local(s))
		return -EINVAL;
	struct cas_local *ls = to_local(s);
	if (ls->readonly)
		return -EROFS;
	struct cas_ingest *in = calloc(1, sizeof(*in));
	if (!in)
		return -ENOMEM;
	in->ls = ls;
	in->pins = (struct cas_local_pins)CAS_LOCAL_PINS_INIT;
	pthread_mutex_init(&in->pins_lock, NULL);
	*ret = in;
	return 0;
}

void cas_ingest_free(struct cas_ingest *in)
{
	if (!in)
		return;
	cas_local_pack_close(in->pack);
	cas_local_pins_release(in->ls, &in->pins);
	pthread_mutex_destroy(&in->pins_lock);
	free(in);
}

/* Inside cas_local_gc_enter/leave. */
static int pin(struct cas_ingest *in, const cas_digest *d, size_t n)
{
	pthread_mutex_lock(&in->pins_lock);
	int r = cas_local_pins_add(in->ls, &in->pins, d, n);
	pthread_mutex_unlock(&in->pins_lock);
	return r;
}

void cas_ingest_set_pack_max(struct cas_ingest *in, uint64_t bytes)
{
	in->pack_max = bytes;
}

bool cas_ingest_packs(const struct cas_ingest *in, uint64_t size)
{
	return cas_local_is_packed(in->ls, size);
}

/* The classic race of gc: a writer that finds a blob present skips it
 * and names it later. The check and the pin are one step under gc.lock
 * (shared), so a gc sweep either ran before the check (the blob is gone
 * and written again) or sees the pin. */
int cas_ingest_has(struct cas_ingest *in, const cas_digest *d, bool packed)
{
	int r = cas_local_gc_enter(in->ls);
	if (r < 0)
		return r;
	r = packed ? cas_local_small_exists(in->ls, d)
		   : cas_local_blob_exists(in->ls, d);
	if (r > 0) {
		int p = pin(in, d, 1);
		if (p < 0)
			r = p;
	}
	cas_local_gc_leave(in->ls);
	return r;
}

int cas_ingest_stage_buffer(struct cas_ingest *in, const void *buf, size_t len,
			    char ret_name[CAS_INGEST_NAME_LEN])
{
	return stage_buffer(in->ls, buf, len, ret_name);
}

int cas_ingest_stage_fd(struct cas_ingest *in, int src_fd, uint64_t size,
			const struct stat *st, uint8_t *scratch,
			size_t scratch_size, char ret_name[CAS_INGEST_NAME_LEN])
{
	return stage_fd(in->ls, src_fd, size, st, scratch, scratch_size,
			ret_name);
}

int cas_ingest_stage_create(struct cas_ingest *in, int *ret_fd,
			    char ret_name[CAS_INGEST_NAME_LEN])
{
	struct tmpfile t;
	int r = stage_open(in->ls, &t, false);
	if (r < 0)
		return r;
	snprintf(ret_name, CAS_INGEST_NAME_LEN, "%s", t.name);
	*ret_fd = t.fd;
	return 0;
}

int cas_ingest_stage_open(struct cas_ingest *in, const char *name, int *ret_fd)
{
	int fd = openat(in->ls->tmp_fd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return cas_negerrno();
	*ret_fd = fd;
	return 0;
}

void cas_ingest_stage_discard(struct cas_ingest *in, const char *name)
{
	(void)unlinkat(in->ls->tmp_fd, name, 0);
}

void cas_ingest_discard(struct cas_ingest *in, const struct cas_ingest_group *g)
{
	for (size_t i = 0; i < g->n_files; i++) {
		cas_ingest_stage_discard(in, g->files[i].name);
		if (g->files[i].outboard[0])
			cas_ingest_stage_discard(in, g->files[i].outboard);
	}
}

void cas_ingest_outboard_init(struct cas_ingest *in,
			      struct cas_ingest_outboard *o)
{
	cas_local_outboard_init(in->ls, o);
}

/* The small blobs to the pack, padded to a whole block (O_DIRECT). */
static int commit_smalls(struct cas_ingest *in,
			 const struct cas_ingest_group *g, size_t *ret_added)
{
	*ret_added = 0;
	if (g->n_smalls == 0)
		return 0;
	size_t padded = (g->small_len + CAS_INGEST_ALIGN - 1) /
			CAS_INGEST_ALIGN * CAS_INGEST_ALIGN;
	memset(g->small_buf + g->small_len, 0, padded - g->small_len);
	int r = 0;
	if (in->pack && in->pack_max &&
	    cas_local_pack_bytes(in->pack) >= in->pack_max) {
		/* Closed, so its flock goes: eviction may drop it whole. */
		cas_local_pack_close(in->pack);
		in->pack = NULL;
	}
	if (!in->pack)
		r = cas_local_pack_new(&in->ls->base, &in->pack);
	if (r == 0)
		r = cas_local_pack_append(in->pack, g->small_buf, padded,
					  g->smalls, g->n_smalls, ret_added);
	return r;
}

/* Pins every blob of the group, one write. */
static int pin_group(struct cas_ingest *in, const struct cas_ingest_group *g)
{
	size_t n = g->n_files + g->n_smalls;
	if (n == 0)
		return 0;
	_cleanup_free_ cas_digest *v = malloc(n * sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < g->n_files; i++)
		v[i] = g->files[i].digest;
	for (size_t i = 0; i < g->n_smalls; i++)
		v[g->n_files + i] = g->smalls[i].digest;
	return pin(in, v, n);
}

int cas_ingest_commit(struct cas_ingest *in, const struct cas_ingest_group *g,
		      struct cas_ingest_result *ret)
{
	struct cas_ingest_result res = {0};
	/* One step for gc: the group's blobs are pinned before a sweep can
	 * see them unreferenced, and a pack is created and locked by its
	 * writer before gc can see it without a lock. */
	int e = cas_local_gc_enter(in->ls);
	if (e < 0) {
		res.pack_r = e;
		if (ret)
			*ret = res;
		return e;
	}
	res.pack_r = commit_smalls(in, g, &res.added);
	if (g->n_files > 0) {
		/* Every byte of the group was written before this. */
		res.sync_r = cas_local_sync(&in->ls->base);
		for (size_t i = 0; res.sync_r == 0 && i < g->n_files; i++) {
			/* The outboard first: a named blob may lack its
			 * outboard (computed when asked), never the other
			 * way round for long. Its failure is not the
			 * blob's. */
			if (g->files[i].outboard[0])
				(void)cas_local_outboard_unstage(
					in->ls, g->files[i].outboard,
					&g->files[i].digest);
			int u = unstage(in->ls, g->files[i].name,
					&g->files[i].digest);
			if (u > 0)
				res.added++;
			else if (u < 0 && res.name_r == 0)
				res.name_r = u;
		}
	}
	int p = pin_group(in, g);
	cas_local_gc_leave(in->ls);
	if (p < 0 && res.name_r == 0)
		res.name_r = p;
	if (ret)
		*ret = res;
	return res.pack_r < 0	? res.pack_r
	       : res.sync_r < 0 ? res.sync_r
				: res.name_r;
}

int cas_ingest_sync(struct cas_ingest *in)
{
	return cas_local_sync(&in->ls->base);
}
