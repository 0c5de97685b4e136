/* castorefs.h - the read-only castore filesystem (DESIGN.md section 4).
 *
 * Implements struct cas_fuse_ops over a cas_store: the root directory holds
 * the named roots; below it, Directories, files and symlinks of the store,
 * read lazily. Transports serve it through the FUSE engine.
 *
 * Contract: thread-safe (the engine calls it from every worker). The store
 * stays the caller's and must outlive the filesystem.
 */
#ifndef CAS_CASTOREFS_CASTOREFS_H
#define CAS_CASTOREFS_CASTOREFS_H

#include <stdbool.h>
#include <stddef.h>

#include "fuse/engine.h"
#include "store/store.h"

struct cas_fs_options {
	bool list_root;	 /* readdir of the root allowed (else EPERM) */
	bool show_xattr; /* user.castore.*.digest xattrs (else ENOSYS) */
	/* Large blobs served unhashed (else hashed once per mount, at their
	 * first open: verified_i.h). */
	bool trust_large;
};

struct cas_fs;

int cas_fs_new(cas_store *store, const struct cas_fs_options *opts,
	       struct cas_fs **ret);
void cas_fs_free(struct cas_fs *fs);

/* The operations table; pass the cas_fs as the engine's `fs` pointer.
 * One table for every mount: without show_xattr, getxattr and listxattr
 * return -ENOSYS, which the kernel (and a guest's) remembers for the
 * mount just as if the ops were NULL. */
const struct cas_fuse_ops *cas_fs_ops(void);

/* Safe to call at any time from any thread; statfs's f_files is the same
 * live inode count. */
struct cas_fs_stats {
	size_t inodes;	     /* live inodes (the kernel still knows them) */
	size_t memory_bytes; /* heap held by the inode table and caches */
};
void cas_fs_get_stats(struct cas_fs *fs, struct cas_fs_stats *ret);

#endif
