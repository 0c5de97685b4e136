/* import.h - filesystem -> store, and store -> filesystem.
 *
 * Import walks a tree (directories, regular files, symlinks; a file is
 * executable when any x bit is set), hashes every file once with both
 * cores, publishes the blobs the store lacks, syncs them, then commits all
 * Directories and the root in one batch. A fifo, socket or device (unless
 * skip_special), an unreadable entry or a vanished path fails the whole
 * import (error naming the path, nothing registered); the store stays
 * consistent. Entries matching an exclude pattern are left out (a folder
 * is not walked). What castore v1 cannot hold (modes beyond the x bit,
 * owners, xattrs, hard links) is counted in the progress's losses, so the
 * caller can say what was not kept. Memory stays bounded
 * for trees of millions of files (Directories are encoded as soon as their
 * subtree is done, one folder level at a time) and linear in the depth;
 * the walk is iterative and holds a bounded number of fds whatever the
 * depth (folders: at most 256 or a quarter of RLIMIT_NOFILE, plus one
 * per thread; see import.c).
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
	uint64_t excluded;    /* entries an exclude pattern left out */
	/* What castore v1 could not keep (files and folders; symlinks have
	 * no mode to lose, and their owners and xattrs are not looked at). */
	uint64_t special;	  /* fifos, sockets, devices skipped */
	uint64_t setid;		  /* setuid, setgid or sticky bit dropped */
	uint64_t private_kept;	  /* not readable by everyone, now are */
	uint64_t private_skipped; /* not readable by everyone, left out */
	uint64_t owners;	  /* owner or group other than root */
	uint64_t xattrs;	  /* with extended attributes (ACLs, caps) */
	uint64_t hardlinks;	  /* files with several links, stored apart */
};

struct cas_import_options {
	unsigned threads; /* 0: number of CPUs */
	/* Fifos, sockets and device nodes are skipped, not an error. */
	bool skip_special;
	/* Files and folders not readable by everyone (others lack r, or x
	 * for a folder) are left out instead of becoming readable. */
	bool skip_private;
	/* Glob patterns (fnmatch, FNM_PATHNAME): one without a '/' matches
	 * an entry's name at any depth; one with a '/' matches the path
	 * relative to PATH from its start (a leading '/' only anchors); a trailing
	 * '/' matches folders only. Borrowed for the call. */
	const char *const *excludes;
	size_t n_excludes;
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
