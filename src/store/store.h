/* store.h - the two services (blobs, Directories) and the named roots,
 * behind one interface that every backend implements: the local store
 * (local.h), and the remote stores of src/remote with their cache.
 *
 * Contract:
 * - Every operation returns >= 0 or -errno: -ENOENT when the object is
 *   absent, -EBADMSG when it is corrupt or fails validation (with a log
 *   line naming it), -EIO for a store fault. Nothing is ever used before
 *   its digest is known to be right: a backend that fetches bytes checks
 *   them first.
 * - A cas_store is thread-safe: any thread may call any operation at any
 *   time. Writers and batches belong to the thread that made them.
 * - Ownership: what a get returns is the caller's (free with the named
 *   function); fds returned are the caller's to close.
 * - Blobs are immutable once published; publishing a blob that exists is a
 *   success that writes nothing.
 */
#ifndef CAS_STORE_STORE_H
#define CAS_STORE_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "core/digest.h"
#include "core/directory.h"

typedef struct cas_store cas_store;
typedef struct cas_blob_writer cas_blob_writer;
typedef struct cas_dir_batch cas_dir_batch;

/* Called once per root by roots_foreach; name is NUL-terminated and valid
 * only during the call, as is node. Returning < 0 stops the walk and is
 * returned by roots_foreach. */
typedef int (*cas_root_cb)(void *userdata, const char *name,
			   const cas_node *node);

struct cas_store_ops {
	/* Blobs ----------------------------------------------------------- */
	int (*blob_stat)(cas_store *s, const cas_digest *d, uint64_t *ret_size);
	/* An O_RDONLY fd holding exactly the blob's (verified) bytes, read
	 * with pread; the fd can be spliced and used as a FUSE passthrough
	 * backing file. */
	int (*blob_open)(cas_store *s, const cas_digest *d, int *ret_fd,
			 uint64_t *ret_size);
	/* The whole (verified) blob in memory, malloc'd, if it has at most
	 * max bytes; -EFBIG if it has more. For small files, where a copy
	 * costs less than an fd. May be NULL: use cas_store_blob_read. */
	int (*blob_read)(cas_store *s, const cas_digest *d, size_t max,
			 uint8_t **ret_buf, uint64_t *ret_size);
	/* Where a blob's (verified) bytes lie inside a file the store keeps
	 * open as long as it lives: bytes [*ret_off, *ret_off + *ret_size)
	 * of *ret_fd, to pread or splice, never to close. -ENOENT when the
	 * blob is in no such file (it may have one of its own: blob_open).
	 * May be NULL. */
	int (*blob_locate)(cas_store *s, const cas_digest *d, int *ret_fd,
			   uint64_t *ret_off, uint64_t *ret_size);
	int (*blob_writer_new)(cas_store *s, cas_blob_writer **ret);
	/* The blob's BLAKE3 outboard (core/bao.h: the tree's parent nodes
	 * above 16 KiB groups, post-order; cas_bao_outboard_size(size)
	 * bytes, none for a blob of one group), as an O_RDONLY fd to read
	 * with pread (the caller's to close) of *ret_len bytes. The store
	 * keeps it beside every blob over CAS_BAO_THRESHOLD and computes it
	 * for smaller ones (or for a large blob written before outboards
	 * were kept, storing it then). -ENOENT when the blob is absent.
	 * What it gives agrees with the blob's digest as far as the store
	 * knows; a peer that receives it still verifies it
	 * (cas_bao_outboard_verify). May be NULL. */
	int (*blob_outboard_open)(cas_store *s, const cas_digest *d,
				  int *ret_fd, uint64_t *ret_len);
	/* Optional (NULL), for a store that fetches large blobs by range
	 * (a remote cache): opens blob d of `size` bytes (what its Node
	 * says; the blob's tree checks it before any byte is used) without
	 * fetching it. 1: the blob is whole, *ret_fd is blob_open's. 0: it
	 * is held in part, *ret_fd reads its bytes where blob_ensure said
	 * they are present (and only there). -ENOTSUP: not for this blob
	 * (use blob_open). The fd is the caller's. */
	int (*blob_open_ranged)(cas_store *s, const cas_digest *d,
				uint64_t size, int *ret_fd);
	/* Makes bytes [off, off + len) of a blob opened with
	 * blob_open_ranged present and verified, waiting only for them
	 * (a sequential reader also gets the bytes ahead fetched in the
	 * background): 0, or -EIO when a group of the range could not be
	 * fetched or failed verification (for this call alone: other
	 * ranges still read, and the next call tries again). */
	int (*blob_ensure)(cas_store *s, const cas_digest *d, uint64_t off,
			   uint64_t len);

	/* Directories ----------------------------------------------------- */
	/* The canonical bytes of a Directory (malloc'd; NULL/0 for the empty
	 * Directory, which every store has). */
	int (*directory_get_raw)(cas_store *s, const cas_digest *d,
				 uint8_t **ret_buf, size_t *ret_len);
	/* 1 if present (always for the empty Directory), 0 if not. */
	int (*directory_has)(cas_store *s, const cas_digest *d);
	int (*dir_batch_new)(cas_store *s, cas_dir_batch **ret);

	/* Named roots ----------------------------------------------------- */
	/* ret is a cas_node_dup (free()) whose name is the root name. */
	int (*root_get)(cas_store *s, const char *name, cas_node **ret);
	int (*roots_foreach)(cas_store *s, cas_root_cb cb, void *userdata);
	/* Registers or replaces a root. The content need not be present. */
	int (*root_set)(cas_store *s, const char *name, const cas_node *node);
	/* -ENOENT if there is no such root. */
	int (*root_remove)(cas_store *s, const char *name);

	void (*free)(cas_store *s);
};

struct cas_store {
	const struct cas_store_ops *ops;
};

struct cas_blob_writer_ops {
	int (*write)(cas_blob_writer *w, const void *buf, size_t len);
	/* Hashes what was written, publishes it under its digest (atomic, no
	 * overwrite) and frees the writer whatever the result. When
	 * `expected` is non-NULL and differs: -EBADMSG, nothing published. */
	int (*commit)(cas_blob_writer *w, const cas_digest *expected,
		      cas_digest *ret_digest, uint64_t *ret_size);
	/* Drops everything written and frees the writer. */
	void (*abort)(cas_blob_writer *w);
};

struct cas_blob_writer {
	const struct cas_blob_writer_ops *ops;
};

/* A set of Directories committed together, leaves first: each put is
 * validated (canonical, closure: every child Directory is earlier in the
 * batch or already stored). commit makes all of them, and optionally a
 * root, durable at once; on any error nothing is committed. commit and
 * abort free the batch. */
struct cas_dir_batch_ops {
	int (*put)(cas_dir_batch *b, const void *buf, size_t len,
		   cas_digest *ret_digest);
	int (*commit)(cas_dir_batch *b, const char *root_name,
		      const cas_node *root_node);
	void (*abort)(cas_dir_batch *b);
};

struct cas_dir_batch {
	const struct cas_dir_batch_ops *ops;
};

/* Convenience wrappers (store.c). ------------------------------------ */
static inline void cas_store_free(cas_store *s)
{
	if (s)
		s->ops->free(s);
}
static inline void cas_store_freep(cas_store **s)
{
	cas_store_free(*s);
}

/* directory_get_raw + cas_directory_decode; a decode failure is -EBADMSG
 * logged with the digest. */
int cas_store_directory_get(cas_store *s, const cas_digest *d,
			    cas_directory **ret);
/* Puts one Directory (a batch of one); returns its digest. */
int cas_store_directory_put(cas_store *s, const void *buf, size_t len,
			    cas_digest *ret_digest);
/* blob_read, or blob_open and a read where the store has no blob_read. */
int cas_store_blob_read(cas_store *s, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size);
/* The whole blob d of `size` bytes from an fd blob_open gave (for
 * backends that build blob_read on their own fds). */
int cas_store_blob_read_fd(const cas_digest *d, int fd, uint64_t size,
			   size_t max, uint8_t **ret_buf, uint64_t *ret_size);
/* blob_outboard_open and a read of the whole outboard (malloc'd; NULL/0
 * when empty): -EFBIG when it has more than max bytes, -ENOTSUP when the
 * store keeps none. */
int cas_store_blob_outboard_read(cas_store *s, const cas_digest *d, size_t max,
				 uint8_t **ret_buf, size_t *ret_len);
/* An fd of the whole blob d whose Node says `size` bytes: blob_open, or
 * for a large blob of a store that fetches by range, blob_open_ranged
 * and one blob_ensure of every byte (fetched in parallel ranges). */
int cas_store_blob_open_whole(cas_store *s, const cas_digest *d, uint64_t size,
			      int *ret_fd, uint64_t *ret_size);
/* Reads a whole fd (or the rest of a stream) into a new blob. */
int cas_store_blob_put_fd(cas_store *s, int fd, cas_digest *ret_digest,
			  uint64_t *ret_size);
/* A root name is a valid entry name (cas_name_valid) given as a C string. */
bool cas_root_name_valid(const char *name);

#endif
