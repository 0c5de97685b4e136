/* local.h - the local store: one folder holds a whole store.
 *
 *   DIR/data.mdb, DIR/lock.mdb  LMDB: named databases "directories"
 *                               (digest -> canonical bytes), "roots"
 *                               (name -> Node message without a name) and
 *                               "blobs" (digest -> where in a pack)
 *   DIR/blobs/ab/abcdef...      one file per blob, named by its hex digest
 *   DIR/packs/<16 hex>.pack     small blobs that an import found, back to
 *                               back in the order it read them
 *   DIR/tmp/                    temporary files, same file system, and
 *                               the pin files of live writers (gc)
 *   DIR/live/<pid>              flock'ed by each process that has the
 *                               store open for writing (gc_seam.c)
 *   DIR/gc.lock, gc.turn, gc.run  gc's locks (docs/design.md)
 *
 * Packs: most files of real trees are small (97% of /usr/share are at
 * most CAS_LOCAL_PACK_MAX bytes, three in four at most 4 KiB) and a file
 * per blob costs a create, a rename and an inode each, which made
 * importing twice as slow as hashing, and reading a tree cold a seek per
 * file. Each import appends the small blobs it lacks to a pack of
 * its own, in groups; an index entry (pack, offset, length) per blob goes
 * to LMDB. A cold read of a tree then reads its small files from a few
 * contiguous runs instead of seeking to thousands of inodes. Values in
 * LMDB stay 20 bytes, so its copy-on-write pages stay few (blob bytes in
 * LMDB itself would be rewritten with every leaf page a later group
 * touches). Blobs put one at a time (writers, publish_*) are files, and
 * so is every blob that import writes to a store opened no_inline. The
 * remote cache packs the small blobs it fetches through the same write
 * path (ingest.h). Readers look in both; a pack is never rewritten in
 * place (gc copies the live blobs of a mostly dead one to a new pack).
 *
 * Durability is ordered: a blob is named (linked, or indexed) only once
 * its bytes are on disk, and a Directory or root is committed only once
 * what it references is. A single blob is fdatasync'd before it is
 * linked. Import stages its blob files as named files in tmp/ (large ones
 * written with O_DIRECT where the file system allows, so the bytes go to
 * the disk without filling the page cache), makes a whole group durable
 * with one syncfs, then renames each into place; a group of small blobs
 * is written to the pack (O_DIRECT, padded to a block), fdatasync'd, then
 * indexed in one transaction; one more sync precedes the commit of the
 * Directories and root. LMDB commits are durable. Several processes may
 * read and write one store at once (LMDB's lock file; blob files
 * published with linkat() or renameat2(RENAME_NOREPLACE), never
 * overwritten; each import its own pack, created O_EXCL). A crash at any
 * moment, power loss included, leaves a store that cas_local_verify
 * accepts (at worst unindexed bytes at the end of a pack); leftovers in
 * tmp/ are ignored by verify and removed by the next writer that opens
 * the store (or by gc) once the process that wrote them is gone.
 *
 * Contract: a store returned here is a cas_store (store.h) and shares its
 * thread-safety and ownership rules.
 */
#ifndef CAS_STORE_LOCAL_H
#define CAS_STORE_LOCAL_H

#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

struct cas_local_options {
	bool create;	/* create DIR and the store if missing */
	bool readonly;	/* open without writing (no create, no tmp cleanup) */
	bool no_inline; /* import writes every blob as a file (no packs) */
	/* The store is a remote store's cache: marked so (DIR/castore-cache)
	 * for later opens, so that verify does not count what a cache never
	 * fetched (docs/remote.md). */
	bool cache;
};

/* Import packs blobs of at most this many bytes. Above it a blob file
 * pays for itself: FUSE passthrough serves it without the daemon. */
#define CAS_LOCAL_PACK_MAX (64u << 10)

int cas_local_open(const char *dir, const struct cas_local_options *opts,
		   cas_store **ret);

/* True if s was made by cas_local_open. */
bool cas_store_is_local(const cas_store *s);
/* True if the local store s is marked as a remote store's cache. */
bool cas_local_is_cache(cas_store *s);

/* Makes every blob written so far durable (syncfs on the blob folder). */
int cas_local_sync(cas_store *s);

/* Path of a blob's file (for tools that want to map or splice it); a
 * packed blob has none, so callers must be ready for the path not to
 * exist. */
int cas_local_blob_path(cas_store *s, const cas_digest *d, char *buf,
			size_t size);

/* Publishes the contents of src_fd (regular file of known size whose
 * digest the caller has computed) as a blob, copying with
 * copy_file_range. Returns 1 when the blob was added, 0 when it was
 * already there (nothing copied). The caller vouches for the digest. */
int cas_local_blob_publish_fd(cas_store *s, int src_fd, uint64_t size,
			      const cas_digest *d);
/* Same for bytes in memory (small files read in one piece). */
int cas_local_blob_publish_buffer(cas_store *s, const void *buf, size_t len,
				  const cas_digest *d);

/* Small blobs of a group bound for a pack (ingest.h): v[i] is at v[i].off
 * of the group's buffer, len bytes. */
#define CAS_LOCAL_PACK_ALIGN 4096
struct cas_local_small {
	cas_digest digest;
	size_t off, len;
};

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

/* Collects the store (docs/design.md, "Writers and gc"): removes every
 * blob file, packed blob and Directory that no root reaches, unless it
 * was written less than grace_s seconds ago or a live writer pinned it;
 * rewrites packs whose live bytes fall below CAS_GC_PACK_LIVE_PERCENT
 * of their size (and by at least CAS_GC_PACK_MIN_DEAD bytes), truncates the unindexed tails of packs no live writer
 * appends to and removes packs that hold nothing; removes the tmp/
 * leftovers of writers that are gone. Runs beside writers and readers,
 * in this process or others; one gc at a time per store (DIR/gc.run; a
 * second waits). A dry run counts the same and changes nothing. A SIGKILL
 * at any moment leaves a store cas_local_verify accepts. */
#define CAS_GC_PACK_LIVE_PERCENT 50
#define CAS_GC_PACK_MIN_DEAD	 (256u << 10)
struct cas_gc_options {
	uint64_t grace_s;
	bool dry_run;
};
struct cas_gc_stats {
	uint64_t reachable; /* distinct digests kept: reached, pinned, young */
	uint64_t blob_files, blob_file_bytes;
	uint64_t partial_blobs, partial_bytes;	/* large blobs held in part */
	uint64_t small_blobs, small_blob_bytes; /* packed */
	uint64_t directories, directory_bytes;
	uint64_t kept_young; /* unreachable but within the grace */
	uint64_t tmp_files, tmp_bytes;
	uint64_t packs_rewritten, packs_removed, packs_truncated;
	uint64_t pack_bytes; /* pack bytes given back (or to give back) */
	double seconds;
};
int cas_local_gc(cas_store *s, const struct cas_gc_options *opts,
		 struct cas_gc_stats *ret);

#endif
