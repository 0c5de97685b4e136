/* lmdb_check.c - is data.mdb whole, before LMDB maps it?
 *
 * LMDB maps data.mdb and trusts it: a file cut short (a copy that
 * stopped, a full disk, a bad restore) makes the first read past its end
 * a SIGBUS, in every command, verify included. LMDB's two meta pages (at
 * page 0 and page 1) say how many pages the last committed transaction
 * uses; a file shorter than that is corrupt, and so is a file whose meta
 * pages are not LMDB's. This reads the meta pages with pread and
 * compares; it knows LMDB's on-disk format of data version 1 (LMDB 0.9),
 * 64-bit: a 16-byte page header, then the meta (magic, version, address,
 * map size, two 48-byte database records of which the first holds the
 * page size in its pad field, last page number, transaction id).
 *
 * An empty data.mdb is also what a writer killed while creating the
 * store leaves (LMDB creates the file, then writes its meta pages): when
 * the store holds no blob and no pack either, nothing is lost, and an
 * opener that may create the store starts it afresh while any other
 * finds no store yet.
 *
 * Contract: no state; the caller logs nothing more (one line is logged
 * here, naming the store and the reason).
 */
#include "store/local_i.h"

#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"
#include "core/util.h"

#define META_OFF     16 /* the page header */
#define META_MAGIC   0xBEEFC0DEu
#define META_VERSION 1u
#define META_LEN     136

struct meta {
	uint32_t psize;
	uint64_t last_pg, txnid;
};

static uint64_t le64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static uint32_t le32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

/* false if the bytes at page `off` are no LMDB meta page. */
static bool read_meta(int fd, uint64_t off, struct meta *m)
{
	uint8_t b[META_OFF + META_LEN];
	if (cas_pread_all(fd, b, sizeof(b), off) < 0)
		return false;
	const uint8_t *p = b + META_OFF;
	if (le32(p) != META_MAGIC || le32(p + 4) != META_VERSION)
		return false;
	m->psize = le32(p + 24);
	m->last_pg = le64(p + 120);
	m->txnid = le64(p + 128);
	return m->psize >= 512 && m->psize <= (1u << 16) &&
	       !(m->psize & (m->psize - 1));
}

/* true if folder `name` of the store is missing or holds nothing (the
 * blobs/ fan-out folders are made as blobs are, never ahead). */
static bool folder_empty(int dir_fd, const char *name)
{
	int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return false;
	}
	bool empty = true;
	struct dirent *de;
	while (empty && (de = readdir(d)))
		empty = !strcmp(de->d_name, ".") || !strcmp(de->d_name, "..");
	closedir(d);
	return empty;
}

int cas_lmdb_check(int dir_fd, const char *dir, bool may_create)
{
	_cleanup_close_ int fd =
		openat(dir_fd, "data.mdb", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 && errno == ENOENT)
		return 0; /* a new store: LMDB creates it */
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "store %s: data.mdb: %m",
				     dir);
	struct stat st;
	if (fstat(fd, &st) < 0)
		return cas_log_errno(cas_negerrno(), "store %s: data.mdb: %m",
				     dir);
	if (!S_ISREG(st.st_mode))
		return cas_log_errno(-EBADMSG,
				     "store %s: data.mdb is corrupt (not a "
				     "regular file)",
				     dir);
	if (st.st_size == 0 && folder_empty(dir_fd, "blobs") &&
	    folder_empty(dir_fd, "packs")) {
		if (!may_create)
			return cas_log_errno(-ENOENT,
					     "store %s: no store here yet "
					     "(data.mdb is empty: its creation "
					     "was cut short)",
					     dir);
		if (unlinkat(dir_fd, "data.mdb", 0) < 0)
			return cas_log_errno(cas_negerrno(),
					     "store %s: data.mdb: %m", dir);
		return 0;
	}
	struct meta a, b;
	bool ok_a = read_meta(fd, 0, &a);
	bool ok_b = ok_a && read_meta(fd, a.psize, &b) && b.psize == a.psize;
	if (!ok_a)
		return cas_log_errno(
			-EBADMSG, "store %s: data.mdb is corrupt (%s)", dir,
			st.st_size == 0 ? "empty" : "no LMDB meta page");
	const struct meta *m = ok_b && b.txnid > a.txnid ? &b : &a;
	uint64_t need;
	if (__builtin_mul_overflow(m->last_pg + 1, (uint64_t)m->psize, &need) ||
	    (uint64_t)st.st_size < need)
		return cas_log_errno(-EBADMSG,
				     "store %s: data.mdb is corrupt (%llu "
				     "bytes, its last transaction needs %llu)",
				     dir, (unsigned long long)st.st_size,
				     (unsigned long long)need);
	return 0;
}
