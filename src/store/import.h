/* import.h - filesystem -> store, and store -> filesystem.
 *
 * Import walks a tree (directories, regular files, symlinks; a file is
 * executable when any x bit is set), hashes every file once with both
 * cores, publishes the blobs the store lacks, syncs them, then commits all
 * Directories and the root in one batch. A fifo, socket, device, unreadable
 * entry or vanished path fails the whole import (error naming the path,
 * nothing registered); the store stays consistent. Memory stays bounded
 * for trees of millions of files (Directories are encoded as soon as their
 * subtree is done, one folder level at a time).
 *
 * Contract: the store must be local (cas_store_is_local). Not thread-safe
 * for one call, but any number of imports may run at once, also from
 * several processes.
 */
#ifndef CAS_STORE_IMPORT_H
#define CAS_STORE_IMPORT_H

#include "store/store.h"

struct cas_import_progress {
	uint64_t files;
	uint64_t directories;
	uint64_t symlinks;
	uint64_t bytes;	      /* bytes of file content read */
	uint64_t blobs_added; /* blobs the store did not have */
};

struct cas_import_options {
	unsigned threads; /* 0: number of CPUs */
	/* Called now and then from the importing thread (may be NULL). */
	void (*progress)(void *userdata, const struct cas_import_progress *p);
	void *userdata;
};

/* Imports PATH and registers it as root `name` (NULL: register nothing).
 * ret_node (may be NULL) gets the root node; its name is empty and must be
 * freed with free(). ret_progress (may be NULL) gets the final counts. */
int cas_import(cas_store *s, const char *path, const char *name,
	       const struct cas_import_options *opts, cas_node **ret_node,
	       struct cas_import_progress *ret_progress);

/* Writes node (a directory, file or symlink) to dest, which must not exist.
 * Files get 0755 when executable, else 0644; directories 0755. A missing or
 * corrupt object is an error naming its digest; what was written so far
 * stays (export is not atomic). */
int cas_export(cas_store *s, const cas_node *node, const char *dest);

#endif
