/* partial.c - large blobs held in part (partial.h): a sparse file and a
 * range record in DIR/partial/, the verified outboard in outboards/,
 * named as an ordinary blob once whole.
 *
 * The record is rewritten whole (it is small: one bit per 16 KiB, 8 KiB
 * for a 1 GiB blob) after an fdatasync of the data file, once
 * RECORD_EVERY bytes were written since the last one and when the blob
 * is closed; it is never fsynced itself: whatever of it reaches the disk
 * (old bits, new bits, a torn mix of both) names only groups whose bytes
 * were durable before it was written.
 */
#include "store/partial.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/log.h"
#include "store/local_i.h"

/* A record per 256 MiB written: a crash costs at most that much
 * refetch, and the syncs (writeback forced while a reader reads from
 * the same disk) stay few. */
#define RECORD_EVERY (256ull << 20)

struct cas_partial {
	struct cas_local *ls;
	cas_digest d;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	uint64_t size, groups;
	uint8_t *outboard; /* verified; NULL when the blob was whole */
	size_t outboard_len;

	pthread_mutex_t lock;
	int fd;		   /* O_RDWR data file; fixed after open */
	int rec_fd;	   /* the record, -1 when complete */
	uint8_t *bits;	   /* protected by lock */
	uint64_t count;	   /* groups present; protected by lock */
	uint64_t unsynced; /* bytes since the last record; lock */
	bool sync_due;	   /* a write said so, no sync since; lock */
	bool complete;	   /* protected by lock */
};

size_t cas_partial_record_len(uint64_t size)
{
	uint64_t groups = cas_bao_groups(size);
	uint64_t n = CAS_PARTIAL_HEADER_LEN + (groups + 7) / 8;
	return n > SIZE_MAX / 2 ? 0 : (size_t)n;
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

int cas_partial_record_decode(const uint8_t *buf, size_t len,
			      cas_digest *ret_digest, uint64_t *ret_size,
			      const uint8_t **ret_bits)
{
	if (len < CAS_PARTIAL_HEADER_LEN ||
	    memcmp(buf, CAS_PARTIAL_MAGIC, 8) != 0)
		return -EBADMSG;
	uint64_t size = get_le64(buf + 8 + CAS_DIGEST_LEN);
	/* A blob of up to 2^62 bytes: its groups' bits fit a size_t. */
	if (size >> 62)
		return -EBADMSG;
	size_t want = cas_partial_record_len(size);
	if (want == 0 || len != want)
		return -EBADMSG;
	uint64_t groups = cas_bao_groups(size);
	const uint8_t *bits = buf + CAS_PARTIAL_HEADER_LEN;
	/* Bits past the last group must be zero: one encoding per state. */
	if (groups % 8 && (bits[groups / 8] >> (groups % 8)))
		return -EBADMSG;
	memcpy(ret_digest->bytes, buf + 8, CAS_DIGEST_LEN);
	*ret_size = size;
	*ret_bits = bits;
	return 0;
}

static bool bit_get(const uint8_t *bits, uint64_t g)
{
	return (bits[g / 8] >> (g % 8)) & 1;
}

static uint64_t bits_count(const uint8_t *bits, uint64_t groups)
{
	uint64_t n = 0;
	for (uint64_t i = 0; i < (groups + 7) / 8; i++)
		n += (uint64_t)__builtin_popcount(bits[i]);
	return n;
}

/* partial/<hex> or partial/<hex>.ranges */
static void rel_name(const struct cas_partial *p, bool record, char *buf,
		     size_t size)
{
	snprintf(buf, size, "partial/%s%s", p->hex, record ? ".ranges" : "");
}

/* Writes the record of `bits` (a copy the caller owns) after a sync of
 * the data file. */
static int record_write(struct cas_partial *p, const uint8_t *bits)
{
	size_t len = cas_partial_record_len(p->size);
	_cleanup_free_ uint8_t *buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, CAS_PARTIAL_MAGIC, 8);
	memcpy(buf + 8, p->d.bytes, CAS_DIGEST_LEN);
	put_le64(buf + 8 + CAS_DIGEST_LEN, p->size);
	memcpy(buf + CAS_PARTIAL_HEADER_LEN, bits,
	       len - CAS_PARTIAL_HEADER_LEN);
	if (fdatasync(p->fd) < 0)
		return cas_log_errno(cas_negerrno(),
				     "store %s: partial blob %s: fdatasync: %m",
				     p->ls->dir, p->hex);
	int r = cas_pwrite_all(p->rec_fd, buf, len, 0);
	if (r < 0)
		return cas_log_errno(r, "store %s: partial blob %s: record: %m",
				     p->ls->dir, p->hex);
	return 0;
}

/* Loads the record, or starts one (an absent, foreign or bad record:
 * the groups it would name are fetched again). */
static int record_load(struct cas_partial *p)
{
	size_t len = cas_partial_record_len(p->size);
	struct stat st;
	if (fstat(p->rec_fd, &st) == 0 && (uint64_t)st.st_size == len) {
		_cleanup_free_ uint8_t *buf = malloc(len);
		cas_digest d;
		uint64_t size;
		const uint8_t *bits;
		if (buf && cas_pread_all(p->rec_fd, buf, len, 0) == 0 &&
		    cas_partial_record_decode(buf, len, &d, &size, &bits) ==
			    0 &&
		    cas_digest_eq(&d, &p->d) && size == p->size) {
			memcpy(p->bits, bits, len - CAS_PARTIAL_HEADER_LEN);
			p->count = bits_count(p->bits, p->groups);
			return 0;
		}
	}
	if (ftruncate(p->rec_fd, 0) < 0)
		return cas_negerrno();
	return 0;
}

static int outboard_take(struct cas_partial *p, const uint8_t *outboard,
			 size_t outboard_len)
{
	struct cas_local *ls = p->ls;
	uint8_t *ob = NULL;
	size_t len = outboard_len;
	if (!outboard) {
		_cleanup_close_ int fd = -1;
		uint64_t flen;
		int r = cas_local_outboard_file_open(ls, &p->d, &fd, &flen);
		if (r < 0)
			return r;
		if (flen != cas_bao_outboard_size(p->size))
			return -EBADMSG;
		len = (size_t)flen;
		if (!(ob = malloc(len ? len : 1)))
			return -ENOMEM;
		if ((r = cas_pread_all(fd, ob, len, 0)) < 0) {
			free(ob);
			return r == -EBADMSG ? -EIO : r;
		}
	} else {
		if (!(ob = malloc(len ? len : 1)))
			return -ENOMEM;
		memcpy(ob, outboard, len);
	}
	p->outboard = ob;
	p->outboard_len = len;
	if (cas_bao_outboard_verify(&p->d, p->size, ob, len) < 0)
		return cas_log_errno(-EBADMSG,
				     "blob %s: outboard does not match its "
				     "digest",
				     p->hex);
	if (outboard) /* verified: kept beside the blob to come */
		(void)cas_local_outboard_publish_buffer(ls, &p->d, ob, len);
	return 0;
}

int cas_partial_open(cas_store *s, const cas_digest *d, uint64_t size,
		     const uint8_t *outboard, size_t outboard_len,
		     struct cas_partial **ret)
{
	if (!cas_store_is_local(s))
		return -EINVAL;
	struct cas_local *ls = to_local(s);
	if (ls->readonly)
		return -EROFS;
	if (size >> 62)
		return -EINVAL;
	struct cas_partial *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->ls = ls;
	p->d = *d;
	cas_digest_to_hex(d, p->hex);
	p->size = size;
	p->groups = cas_bao_groups(size);
	p->fd = p->rec_fd = -1;
	pthread_mutex_init(&p->lock, NULL);
	char rel[CAS_BLOB_REL_LEN], name[128];
	int r;

	/* Already whole: the blob file itself. */
	cas_local_blob_rel(d, rel);
	p->fd = openat(ls->blobs_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (p->fd >= 0) {
		struct stat st;
		if (fstat(p->fd, &st) == 0 && (uint64_t)st.st_size == size) {
			p->complete = true;
			p->count = p->groups;
			*ret = p;
			return 0;
		}
		r = -EBADMSG; /* the Node's size is not the blob's */
		goto fail;
	}
	if ((r = outboard_take(p, outboard, outboard_len)) < 0)
		goto fail;
	if (mkdirat(ls->dir_fd, "partial", 0755) < 0 && errno != EEXIST) {
		r = cas_log_errno(cas_negerrno(), "store %s: mkdir partial: %m",
				  ls->dir);
		goto fail;
	}
	rel_name(p, false, name, sizeof(name));
	p->fd = openat(ls->dir_fd, name, O_RDWR | O_CREAT | O_CLOEXEC, 0444);
	rel_name(p, true, name, sizeof(name));
	if (p->fd >= 0)
		p->rec_fd = openat(ls->dir_fd, name,
				   O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	struct stat st;
	if (p->fd < 0 || p->rec_fd < 0 || fstat(p->fd, &st) < 0) {
		r = cas_log_errno(cas_negerrno(),
				  "store %s: partial blob %s: %m", ls->dir,
				  p->hex);
		goto fail;
	}
	if (!(p->bits = calloc(1, (size_t)(p->groups + 7) / 8))) {
		r = -ENOMEM;
		goto fail;
	}
	if ((uint64_t)st.st_size == size)
		r = record_load(p);
	else if ((r = ftruncate(p->rec_fd, 0)) == 0) /* a stranger's file */
		r = ftruncate(p->fd, 0) == 0 &&
				    ftruncate(p->fd, (off_t)size) == 0
			    ? 0
			    : cas_negerrno();
	if (r < 0) {
		r = cas_log_errno(r, "store %s: partial blob %s: %m", ls->dir,
				  p->hex);
		goto fail;
	}
	*ret = p;
	return 0;
fail:
	cas_partial_close(p);
	return r;
}

void cas_partial_close(struct cas_partial *p)
{
	if (!p)
		return;
	if (p->rec_fd >= 0 && p->fd >= 0 && !p->complete &&
	    (p->unsynced || p->count == p->groups))
		(void)cas_partial_sync(p);
	if (p->fd >= 0)
		close(p->fd);
	if (p->rec_fd >= 0)
		close(p->rec_fd);
	pthread_mutex_destroy(&p->lock);
	free(p->outboard);
	free(p->bits);
	free(p);
}

const uint8_t *cas_partial_outboard(const struct cas_partial *p,
				    size_t *ret_len)
{
	*ret_len = p->outboard_len;
	return p->outboard;
}

uint64_t cas_partial_size(const struct cas_partial *p)
{
	return p->size;
}

int cas_partial_open_fd(struct cas_partial *p, int *ret_fd)
{
	/* A new open file of the same inode: O_RDONLY, its own offset. */
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", p->fd);
	int fd = open(proc, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return cas_negerrno();
	*ret_fd = fd;
	return 0;
}

bool cas_partial_has(struct cas_partial *p, uint64_t first, uint64_t n)
{
	bool all = true;
	pthread_mutex_lock(&p->lock);
	if (!p->complete)
		for (uint64_t g = first; all && g < first + n; g++)
			all = g < p->groups && bit_get(p->bits, g);
	pthread_mutex_unlock(&p->lock);
	return all;
}

uint64_t cas_partial_count(struct cas_partial *p)
{
	pthread_mutex_lock(&p->lock);
	uint64_t n = p->count;
	pthread_mutex_unlock(&p->lock);
	return n;
}

bool cas_partial_complete(struct cas_partial *p)
{
	pthread_mutex_lock(&p->lock);
	bool c = p->complete;
	pthread_mutex_unlock(&p->lock);
	return c;
}

/* The blob is whole: durable, then named; its record goes. */
static int finish(struct cas_partial *p)
{
	struct cas_local *ls = p->ls;
	char name[128];
	if (fdatasync(p->fd) < 0)
		return cas_log_errno(cas_negerrno(),
				     "store %s: partial blob %s: fdatasync: %m",
				     ls->dir, p->hex);
	rel_name(p, false, name, sizeof(name));
	int r = cas_local_blob_rename_in(ls, ls->dir_fd, name, &p->d);
	rel_name(p, true, name, sizeof(name));
	(void)unlinkat(ls->dir_fd, name, 0);
	return r < 0 ? r : 1;
}

int cas_partial_write(struct cas_partial *p, uint64_t first,
		      const uint8_t *data, size_t data_len)
{
	uint64_t off = first * CAS_BAO_GROUP_SIZE;
	if (first >= p->groups || off + data_len > p->size ||
	    (data_len % CAS_BAO_GROUP_SIZE && off + data_len != p->size))
		return -EINVAL;
	uint64_t n = (data_len + CAS_BAO_GROUP_SIZE - 1) / CAS_BAO_GROUP_SIZE;
	pthread_mutex_lock(&p->lock);
	bool complete = p->complete;
	pthread_mutex_unlock(&p->lock);
	if (complete)
		return 0;
	int r = cas_pwrite_all(p->fd, data, data_len, off);
	if (r < 0)
		return cas_log_errno(r, "store %s: partial blob %s: write: %m",
				     p->ls->dir, p->hex);
	bool due;
	pthread_mutex_lock(&p->lock);
	for (uint64_t g = first; g < first + n; g++) {
		if (!bit_get(p->bits, g)) {
			p->bits[g / 8] |= (uint8_t)(1u << (g % 8));
			p->count++;
		}
	}
	p->unsynced += data_len;
	due = !p->sync_due &&
	      (p->count == p->groups || p->unsynced >= RECORD_EVERY);
	p->sync_due |= due;
	pthread_mutex_unlock(&p->lock);
	return due ? 1 : 0;
}

int cas_partial_sync(struct cas_partial *p)
{
	_cleanup_free_ uint8_t *snapshot = NULL;
	size_t blen = (size_t)(p->groups + 7) / 8;
	bool whole = false;
	pthread_mutex_lock(&p->lock);
	p->sync_due = false;
	if (p->count == p->groups && !p->complete) {
		p->complete = whole = true;
	} else if (!p->complete && p->unsynced > 0 &&
		   (snapshot = malloc(blen))) {
		memcpy(snapshot, p->bits, blen);
		p->unsynced = 0;
	}
	pthread_mutex_unlock(&p->lock);
	if (whole)
		return finish(p);
	return snapshot ? record_write(p, snapshot) : 0;
}

/* Verify ----------------------------------------------------------------- */

struct pverify {
	struct cas_local *ls;
	cas_verify_cb cb;
	void *userdata;
	int problems;
};

static void _printf_(2, 3) pproblem(struct pverify *v, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	cas_local_vproblem(v->cb, v->userdata, &v->problems, fmt, ap);
	va_end(ap);
}

/* Every group the record names is checked against the outboard, which is
 * checked against the digest first; groups it does not name are not
 * problems (never fetched). */
static void verify_one(struct pverify *v, int pdir, const char *name)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	size_t nlen = strlen(name);
	if (nlen != CAS_DIGEST_HEX_LEN + 7)
		return;
	memcpy(hex, name, CAS_DIGEST_HEX_LEN);
	hex[CAS_DIGEST_HEX_LEN] = 0;
	cas_digest d;
	if (cas_digest_from_hex(hex, &d) < 0)
		return;
	_cleanup_close_ int rfd = openat(pdir, name, O_RDONLY | O_CLOEXEC);
	_cleanup_close_ int dfd = openat(pdir, hex, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (rfd < 0 || fstat(rfd, &st) < 0 || st.st_size > (1ll << 40))
		return;
	if (dfd < 0) {
		pproblem(v, "blob %s: partial blob without its data file", hex);
		return;
	}
	size_t len = (size_t)st.st_size;
	_cleanup_free_ uint8_t *rec = malloc(len ? len : 1);
	cas_digest rd;
	uint64_t size;
	const uint8_t *bits;
	if (!rec || cas_pread_all(rfd, rec, len, 0) < 0 ||
	    cas_partial_record_decode(rec, len, &rd, &size, &bits) < 0 ||
	    !cas_digest_eq(&rd, &d)) {
		/* A record cut by a crash before its first write is empty:
		 * nothing is trusted from it, so nothing is a problem. */
		if (len > 0)
			pproblem(v,
				 "blob %s: partial blob's range record "
				 "does not decode",
				 hex);
		return;
	}
	uint64_t groups = cas_bao_groups(size), present = 0;
	for (uint64_t g = 0; g < groups; g++)
		present += bit_get(bits, g);
	if (present == 0)
		return;
	_cleanup_close_ int ofd = -1;
	uint64_t olen;
	_cleanup_free_ uint8_t *ob = NULL;
	if (cas_local_outboard_file_open(v->ls, &d, &ofd, &olen) < 0 ||
	    olen != cas_bao_outboard_size(size) ||
	    !(ob = malloc(olen ? (size_t)olen : 1)) ||
	    cas_pread_all(ofd, ob, (size_t)olen, 0) < 0 ||
	    cas_bao_outboard_verify(&d, size, ob, (size_t)olen) < 0) {
		pproblem(v,
			 "blob %s: partial blob's outboard is missing or "
			 "does not match its digest",
			 hex);
		return;
	}
	_cleanup_free_ uint8_t *buf = malloc(64 * CAS_BAO_GROUP_SIZE);
	if (!buf)
		return;
	for (uint64_t g = 0; g < groups;) {
		if (!bit_get(bits, g)) {
			g++;
			continue;
		}
		uint64_t n = 1;
		while (g + n < groups && n < 64 && bit_get(bits, g + n))
			n++;
		uint64_t off = g * CAS_BAO_GROUP_SIZE;
		size_t blen =
			(size_t)CAS_MIN(n * CAS_BAO_GROUP_SIZE, size - off);
		uint64_t bad = g;
		if (cas_pread_all(dfd, buf, blen, off) < 0 ||
		    cas_bao_verify_groups(&d, size, ob, (size_t)olen, g, buf,
					  blen, &bad) < 0)
			pproblem(v,
				 "blob %s: partial blob's group %llu "
				 "(bytes %llu-%llu) does not match its "
				 "outboard",
				 hex, (unsigned long long)bad,
				 (unsigned long long)(bad * CAS_BAO_GROUP_SIZE),
				 (unsigned long long)CAS_MIN(
					 (bad + 1) * CAS_BAO_GROUP_SIZE, size) -
					 1);
		g += n;
	}
}

int cas_local_verify_partials(struct cas_local *ls, cas_verify_cb cb,
			      void *userdata)
{
	struct pverify v = {ls, cb, userdata, 0};
	int pdir = openat(ls->dir_fd, "partial",
			  O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pdir < 0)
		return errno == ENOENT ? 0 : cas_negerrno();
	DIR *dir = fdopendir(pdir);
	if (!dir) {
		close(pdir);
		return -ENOMEM;
	}
	struct dirent *de;
	while ((de = readdir(dir))) {
		size_t n = strlen(de->d_name);
		if (n > 7 && !strcmp(de->d_name + n - 7, ".ranges"))
			verify_one(&v, dirfd(dir), de->d_name);
	}
	closedir(dir);
	return v.problems;
}
