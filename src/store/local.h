/* local.h - the local store: one folder holds a whole store.
 *
 *   DIR/data.mdb, DIR/lock.mdb  LMDB: named databases "directories"
 *                               (digest -> canonical bytes), "roots"
 *                               (name -> Node message without a name) and
 *                               "blobs" (digest -> bytes, for blobs of at
 *                               most CAS_LOCAL_INLINE_MAX bytes)
 *   DIR/blobs/ab/abcdef...      one file per larger blob, named by its hex
 *                               digest
 *   DIR/tmp/                    temporary files, same file system
 *
 * Small blobs live in LMDB because most files of real trees are small
 * (three in four of /usr/share are at most 4 KiB) and a file per blob
 * costs a create, a rename and an inode each: inline, an import writes
 * them in a few transactions and a cold read of many small files reads
 * one compact file instead of seeking to thousands. A blob is in one
 * place or the other by its size, except that a store opened with
 * no_inline (a cache, whose eviction works on files) writes every blob as
 * a file; readers look in both.
 *
 * Durability is ordered: a blob's name appears only once its bytes are on
 * disk, and a Directory or root is committed only once what it references
 * is. A single blob (writer, publish_*) is fdatasync'd before it is
 * linked; import instead stages its blob files as named files in tmp/
 * (written with O_DIRECT where the file system allows, so that the bytes
 * go to the disk without filling the page cache), makes a whole group
 * durable with one syncfs, then renames each into place, and syncs once
 * more before its LMDB commits; small blobs go to LMDB in groups, each one
 * transaction, before the Directories that name them. LMDB commits are
 * durable. Several processes may read and write one store at
 * once (LMDB's lock file; blob files published with linkat() or
 * renameat2(RENAME_NOREPLACE), never overwritten). A crash at any moment,
 * power loss included, leaves a store that cas_local_verify accepts;
 * leftovers in tmp/ are ignored by verify and removed by the next writer
 * that opens the store once they are an hour old.
 *
 * Contract: a store returned here is a cas_store (store.h) and shares its
 * thread-safety and ownership rules.
 */
#ifndef CAS_STORE_LOCAL_H
#define CAS_STORE_LOCAL_H

#include "store/store.h"

struct cas_local_options {
	bool create;   /* create DIR and the store if missing */
	bool readonly; /* open without writing (no create, no tmp cleanup) */
	bool no_inline; /* write every blob as a file (see above) */
};

/* Blobs of at most this many bytes are kept in LMDB. */
#define CAS_LOCAL_INLINE_MAX 4096

int cas_local_open(const char *dir, const struct cas_local_options *opts,
		   cas_store **ret);

/* True if s was made by cas_local_open. */
bool cas_store_is_local(const cas_store *s);

/* Makes every blob written so far durable (syncfs on the blob folder). */
int cas_local_sync(cas_store *s);

/* Path of a blob's file (for tools that want to map or splice it); a
 * small blob has none (it is in LMDB), so callers must be ready for the
 * path not to exist. */
int cas_local_blob_path(cas_store *s, const cas_digest *d, char *buf,
			size_t size);

/* Publishes the contents of src_fd (regular file of known size whose
 * digest the caller has computed) as a blob, copying with
 * copy_file_range (or into LMDB when small). Returns 1 when the blob was added, 0 when it was
 * already there (nothing copied). The caller vouches for the digest. */
int cas_local_blob_publish_fd(cas_store *s, int src_fd, uint64_t size,
			      const cas_digest *d);
/* Same for bytes in memory (small files read in one piece). */
int cas_local_blob_publish_buffer(cas_store *s, const void *buf, size_t len,
				  const cas_digest *d);

/* Every problem found, one line each naming the object: blobs whose bytes
 * do not hash to their name ("blob <hex>: content hashes to <hex>"),
 * Directories that do not decode or whose bytes do not hash to their key,
 * child Directories that are absent ("directory <hex>: child directory
 * <hex> (name 'x') is missing"), blobs of files that are absent or of the
 * wrong size ("directory <hex>: blob <hex> of file 'x' is missing"), and
 * roots that do not resolve ("root 'foo': directory <hex> is missing").
 * A root registered for absent content (`roots add`) is legal to store
 * but is reported here: verify checks that the store can serve every root.
 * Names are printed with unprintable bytes as \xNN. */
typedef void (*cas_verify_cb)(void *userdata, const char *problem);
/* Returns the number of problems (>= 0), or -errno if the walk failed. */
int cas_local_verify(cas_store *s, cas_verify_cb cb, void *userdata);

#endif
