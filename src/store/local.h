/* local.h - the local store: one folder holds a whole store.
 *
 *   DIR/data.mdb, DIR/lock.mdb  LMDB: named databases "directories"
 *                               (digest -> canonical bytes) and "roots"
 *                               (name -> Node message without a name)
 *   DIR/blobs/ab/abcdef...      one file per blob, named by its hex digest
 *   DIR/tmp/                    temporary files, same file system
 *
 * Durability is ordered, not per file: blobs are written without fsync and
 * cas_local_sync (one syncfs) makes them durable before a batch that
 * references them commits; the LMDB commit is durable. Several processes
 * may read and write one store at once (LMDB's lock file; blobs published
 * with link()/renameat2(RENAME_NOREPLACE), never overwritten). A crash at
 * any moment leaves a store that cas_local_verify accepts; leftovers in
 * tmp/ are removed by the next writer.
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
};

int cas_local_open(const char *dir, const struct cas_local_options *opts,
		   cas_store **ret);

/* True if s was made by cas_local_open. */
bool cas_store_is_local(const cas_store *s);

/* Makes every blob written so far durable (syncfs on the blob folder). */
int cas_local_sync(cas_store *s);

/* Path of a blob's file (for tools that want to map or splice it). */
int cas_local_blob_path(cas_store *s, const cas_digest *d, char *buf,
			size_t size);

/* Publishes the contents of src_fd (regular file of known size whose
 * digest the caller has computed) as a blob, copying with
 * copy_file_range; exists -> 0 without copying. Used by import. */
int cas_local_blob_publish_fd(cas_store *s, int src_fd, uint64_t size,
			      const cas_digest *d);
/* Same for bytes in memory (small files read in one piece). */
int cas_local_blob_publish_buffer(cas_store *s, const void *buf, size_t len,
				  const cas_digest *d);

/* Every problem found: blobs whose bytes do not hash to their name,
 * Directories that do not decode or whose bytes do not hash to their key,
 * child Directories that are absent, roots that do not resolve. */
typedef void (*cas_verify_cb)(void *userdata, const char *problem);
/* Returns the number of problems (>= 0), or -errno if the walk failed. */
int cas_local_verify(cas_store *s, cas_verify_cb cb, void *userdata);

#endif
