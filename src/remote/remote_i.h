/* remote_i.h - inside src/remote: the fetcher seam between the verified
 * cache (cache.c) and the transports (http.c, grpc_client.c), the
 * published roots file (layout.c), and the libcurl handle pool.
 *
 * A fetcher only moves bytes: it never checks a digest and never writes
 * the cache. cache.c checks every byte it gets from one before use.
 * Fetchers are thread-safe: any thread may call any op at any time.
 */
#ifndef CAS_REMOTE_REMOTE_I_H
#define CAS_REMOTE_REMOTE_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <curl/curl.h>

#include "core/dmap.h"
#include "remote/remote.h"
#include "store/store.h"

typedef struct cas_fetcher cas_fetcher;

/* Receives fetched bytes; < 0 stops the transfer and is returned. */
typedef int (*cas_fetch_sink)(void *userdata, const void *buf, size_t len);
/* Receives one Directory's bytes (unverified). want is the digest asked
 * for, or NULL when the transport streams a subtree (the receiver finds
 * out which Directory it is by hashing). < 0 stops and is returned. */
typedef int (*cas_fetch_dir_cb)(void *userdata, const cas_digest *want,
				const uint8_t *buf, size_t len);
/* Receives one blob of a blobs_fetch batch, i its index in ds: r == 0
 * with its bytes (unverified; valid only during the call), or r < 0:
 * -ENOENT when the remote says it is absent, -EFBIG when it has more
 * than max bytes, -EIO when the transfer failed. */
typedef void (*cas_fetch_blob_cb)(void *userdata, size_t i, int r,
				  const uint8_t *buf, size_t len);

/* Bytes [off, off + len) of the pack of Directory `pack` (below). */
struct cas_fetch_range {
	cas_digest pack;
	uint64_t off, len;
};

/* Bounds of what a fetch accepts (docs/remote.md, "What the client
 * accepts"). A blob whose size no FileNode declared (cat DIGEST, a
 * blob stat) is bounded by what the transport says of it (HTTP
 * Content-Length), else by CAS_FETCH_UNSIZED_MAX. A transfer that moves
 * no byte of its answer for the stall timeout ($CASTORE_STALL_TIMEOUT
 * seconds, default 60) fails with -ETIMEDOUT. */
#define CAS_FETCH_UNSIZED     UINT64_MAX
#define CAS_FETCH_UNSIZED_MAX (64ull << 30)
#define CAS_FETCH_STALL_S     60
/* The stall timeout in seconds ($CASTORE_STALL_TIMEOUT, 1..3600). */
unsigned cas_fetch_stall_s(void);

struct cas_fetcher_ops {
	/* Streams the blob's bytes to sink, at most max of them (the size
	 * its FileNode declares, or CAS_FETCH_UNSIZED): one byte more stops
	 * the transfer, -EFBIG. -ENOENT when the remote says it is absent,
	 * -ETIMEDOUT when it stalls, -ECANCELED when *cancel was set, -EIO
	 * when the remote cannot be reached or fails. Quiet: the caller
	 * reports, naming the blob. */
	int (*blob_fetch)(cas_fetcher *f, const cas_digest *d, uint64_t max,
			  cas_fetch_sink sink, void *userdata);
	/* Fetches each of the n Directories (concurrently if the transport
	 * can), calling cb once per Directory. An absent one is -ENOENT. */
	int (*directories_fetch)(cas_fetcher *f, const cas_digest *ds, size_t n,
				 cas_fetch_dir_cb cb, void *userdata);
	/* Optional (NULL): d and every Directory below it in one request,
	 * each sent after one that names it. */
	int (*directory_fetch_tree)(cas_fetcher *f, const cas_digest *d,
				    cas_fetch_dir_cb cb, void *userdata);
	/* directory_fetch_tree may fail where directories_fetch works (an
	 * HTTP layout has tree files for its roots only): any failure of it
	 * is then quiet, and the Directories are fetched level by level. */
	bool tree_optional;
	/* Optional (NULL): the roots file the remote publishes (malloc'd;
	 * NULL/0 when it publishes none yet). */
	int (*roots_fetch)(cas_fetcher *f, char **ret_buf, size_t *ret_len);
	/* Optional (NULL): fetches ds[0..n) concurrently (gRPC: streams of
	 * one HTTP/2 connection; HTTP: parallel transfers of one curl multi),
	 * each whole into memory. cb is called exactly once per index, from
	 * the calling thread, in any order; nothing is logged per blob.
	 * Returns 0, or -ENOMEM/-EIO when it could not even start (then cb
	 * was called with that error for every index). */
	int (*blobs_fetch)(cas_fetcher *f, const cas_digest *ds, size_t n,
			   size_t max, cas_fetch_blob_cb cb, void *userdata);
	/* Optional (NULL): the ranges v[0..n) of Directory packs, as
	 * blobs_fetch fetches blobs (cb once per index; -ENOENT when the
	 * remote has no such pack, -EIO when the transfer failed). A
	 * range's bytes may be short: the caller checks what it slices. */
	int (*ranges_fetch)(cas_fetcher *f, const struct cas_fetch_range *v,
			    size_t n, cas_fetch_blob_cb cb, void *userdata);
	/* Optional (NULL): the blob's outboard (core/bao.h) as the remote
	 * keeps it (unverified), malloc'd, at most max bytes (else -EIO):
	 * -ENOENT when it has none (a small blob, an older layout). */
	int (*outboard_fetch)(cas_fetcher *f, const cas_digest *d, size_t max,
			      uint8_t **ret_buf, size_t *ret_len);
	/* Optional (NULL): bytes [off, off + len) of the blob into buf
	 * (unverified); *ret_len is how many came (fewer when the blob ends
	 * first). -ENOENT, -EIO; quiet (the caller reports). */
	int (*blob_range_fetch)(cas_fetcher *f, const cas_digest *d,
				uint64_t off, size_t len, uint8_t *buf,
				size_t *ret_len);
	void (*free)(cas_fetcher *f);
};

struct cas_fetcher {
	const struct cas_fetcher_ops *ops;
	/* Set by the fetcher's owner (the cache, when it closes): transfers
	 * in flight end with -ECANCELED within a second, even one that
	 * receives nothing. NULL: never. */
	const atomic_bool *cancel;
};

static inline bool cas_fetcher_cancelled(const cas_fetcher *f)
{
	return f->cancel &&
	       atomic_load_explicit(f->cancel, memory_order_relaxed);
}

int cas_http_fetcher_new(const char *url, cas_fetcher **ret);
int cas_grpc_fetcher_new(const char *url, cas_fetcher **ret);
/* The same over a client made already (grpc_i.h), taken (also on error). */
struct cas_grpc_client;
int cas_grpc_fetcher_new_client(struct cas_grpc_client *client,
				cas_fetcher **ret);

/* The verified cache in front of a fetcher (takes it, also on error). */
int cas_cache_store_new(cas_fetcher *f, const char *what,
			const struct cas_remote_options *opts, cas_store **ret);

/* Waits until every blob the cache has fetched so far is synced and
 * named in its blobs/ folder (the publisher does that within moments;
 * for tests and callers that look at the files). */
void cas_cache_flush(cas_store *s);
/* The cache's own local store (borrowed: it lives as long as s), for
 * store operations on what the cache holds (eviction, ingest.h). */
cas_store *cas_cache_local_store(cas_store *s);

/* libcurl ------------------------------------------------------------ */

/* curl_global_init once per process. */
int cas_curl_init(void);

/* Easy handles kept with their connections between requests. */
struct cas_curl_pool {
	pthread_mutex_t lock;
	CURL *free_handles[16]; /* protected by lock */
	size_t n_free;		/* protected by lock */
};
void cas_curl_pool_init(struct cas_curl_pool *p);
void cas_curl_pool_release(struct cas_curl_pool *p);
/* A reset handle (connections kept); NULL on allocation failure. */
CURL *cas_curl_pool_get(struct cas_curl_pool *p);
void cas_curl_pool_put(struct cas_curl_pool *p, CURL *h);

/* The published roots file (docs/remote.md): one line per root,
 *   <name, percent-encoded> TAB <Node message without name, hex> LF
 * with '#' lines ignored. Names are bytes: every byte <= 0x20, >= 0x7f
 * and '%' is written as %XX, so a line never holds a TAB, LF or space
 * that is part of a name. */
int cas_roots_file_write_line(FILE *f, const char *name, const cas_node *node);
/* Calls cb for each root of the file's bytes; -EBADMSG on a bad line. */
int cas_roots_file_parse(const char *buf, size_t len, cas_root_cb cb,
			 void *userdata);

/* Opens (making it if missing) the work folder of published layout dir
 * (dirfd): DIR/../.castore-publish.<dev>.<ino of DIR>, or
 * DIR/.castore-publish when DIR is the root of its file system. It holds
 * publishers' temporary files, gc.lock (shared by publish, exclusive for
 * gc --published) and roots.history. */
int cas_publish_work_open(int dirfd, const char *dir, int *ret_workfd);

/* The pack of a Directory in the published layout (docs/remote.md):
 * packs/ab/<hex of the Directory> holds the bytes of its files of 1 to
 * CAS_LAYOUT_PACK_MAX bytes back to back, in the Directory's order (a
 * blob named twice is there twice); only a Directory with at least
 * CAS_LAYOUT_PACK_MIN such files has one. Its content follows from the
 * Directory, so it needs no index, and a reader fetches any run of its
 * files with one Range GET. Format constants: never change them. */
#define CAS_LAYOUT_PACK_MAX (64u << 10)
#define CAS_LAYOUT_PACK_MIN 2
/* Sets off[i] for each of dir->n_files (UINT64_MAX: not in the pack)
 * and *ret_len to the pack's size; returns how many files the pack
 * holds, 0 when the Directory has no pack (then off is not set). */
size_t cas_layout_pack_offsets(const cas_directory *dir, uint64_t *off,
			       uint64_t *ret_len);

/* The tree of a published root (docs/remote.md): trees/ab/<hex of a root
 * Directory> holds every Directory of its closure, each as its length (a
 * varint) and its canonical bytes, the root first and each after one that
 * names it, each once. Only an accelerator: the Directory files are the
 * layout; a reader that finds no usable tree file fetches those. */
#define CAS_LAYOUT_TREE_MAX (1u << 30)
/* Calls cb(userdata, NULL, bytes, len) for each Directory of a tree
 * file's bytes (unverified); -EBADMSG when they are not a sequence of
 * varint-framed messages; a cb result < 0 stops and is returned. */
int cas_tree_file_split(const uint8_t *buf, size_t len, cas_fetch_dir_cb cb,
			void *userdata);

#endif
