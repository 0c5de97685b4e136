/* remote.h - remote stores behind the cas_store interface (DESIGN.md
 * section 7): castore gRPC, snix's or tvix's (grpc+http://HOST:PORT,
 * grpc+https://HOST[:PORT], grpc+unix:///PATH) and published HTTP layouts
 * (http://, https://),
 * always in front of a local cache that is an ordinary local store.
 * Also the three verbs that make remote stores: the gRPC server of
 * `castore serve`, `castore push` and `castore publish` (docs/remote.md).
 *
 * Contract: a store returned here is a cas_store (store/store.h) with its
 * thread-safety and ownership rules. Nothing fetched is used or cached
 * before its digest is checked: bytes that do not hash to their name are
 * -EIO with one log line naming the digest, and are not cached. An
 * unreachable remote is -EIO for that operation only; the next operation
 * tries again.
 */
#ifndef CAS_REMOTE_REMOTE_H
#define CAS_REMOTE_REMOTE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/local.h"
#include "store/store.h"

struct cas_remote_options {
	const char *cache_dir; /* required: the local cache store */
	uint64_t cache_max;    /* bytes; 0: unbounded */
};

/* True if spec names a remote store (by its scheme). */
bool cas_remote_is_url(const char *spec);

int cas_remote_open(const char *url, const struct cas_remote_options *opts,
		    cas_store **ret);

/* Progress of publish and push (called now and then from the calling
 * thread; may be NULL). */
struct cas_remote_progress {
	uint64_t directories;  /* Directories walked */
	uint64_t blobs;	       /* blobs walked */
	uint64_t sent_objects; /* objects written or sent (missing remotely) */
	uint64_t sent_bytes;
};
typedef void (*cas_remote_progress_cb)(void *userdata,
				       const struct cas_remote_progress *p);

/* Writes the static HTTP layout of the named roots (all roots when
 * n_names is 0) into dir (created if missing): objects that dir lacks,
 * leaves first, then syncfs, then the roots file replaced by rename. The
 * roots file keeps the roots published before under other names. */
int cas_remote_publish(cas_store *s, const char *dir, char *const *names,
		       size_t n_names, cas_remote_progress_cb progress,
		       void *userdata, struct cas_remote_progress *ret_stats);

/* `castore gc --published DIR`: removes the objects of the published
 * layout dir that no root of its roots file reaches, nor any root of a
 * roots file replaced less than o->grace_s ago, and that are older than
 * that (publish_gc.c). Waits for running publishes of dir, and they for
 * it. Counts into ret: blob_files, directories, packs_removed (Directory
 * packs and tree files), kept_young, reachable. */
int cas_remote_publish_gc(const char *dir, const struct cas_gc_options *o,
			  struct cas_gc_stats *ret);

/* Copies the closures of the named roots of s to the gRPC store at url,
 * sending only the blobs and Directories it lacks (blobs first, then the
 * Directories leaves first in one Put). */
int cas_remote_push(cas_store *s, const char *url, char *const *names,
		    size_t n_names, cas_remote_progress_cb progress,
		    void *userdata, struct cas_remote_progress *ret_stats);

/* Limits of `castore serve` (docs/remote.md, "Exposing serve"); a 0
 * field takes the default named beside it. */
#define CAS_GRPC_SERVE_THREADS	       4
#define CAS_GRPC_SERVE_CONNECTIONS     256
#define CAS_GRPC_SERVE_IDLE_TIMEOUT    120
#define CAS_GRPC_SERVE_RESERVE_DEFAULT UINT64_MAX
struct cas_grpc_serve_options {
	unsigned threads;	  /* event loops carrying the connections */
	unsigned max_connections; /* at once; idle ones make way */
	unsigned idle_timeout;	  /* seconds without a byte either way */
	bool read_only;		  /* refuse every Put (PERMISSION_DENIED) */
	/* Put is refused (RESOURCE_EXHAUSTED) while the file system of
	 * reserve_dir has fewer than reserve bytes free; NULL: no check.
	 * CAS_GRPC_SERVE_RESERVE_DEFAULT: 1 GiB, or 5 % of the file system
	 * when that is less. */
	const char *reserve_dir;
	uint64_t reserve;
};

/* Serves s as castore's BlobService and DirectoryService (gRPC over
 * HTTP/2 cleartext), under both snix.castore.v1 and tvix.castore.v1, on
 * listen ("HOST:PORT" or "unix:PATH"; port 0 picks a free port) until
 * *stop becomes non-zero (set it from a signal handler; the server
 * notices within 200 ms), then closes every connection, aborting
 * unfinished Puts. opts may be NULL (every default). A unix socket that
 * a live server answers on is refused (-EADDRINUSE). ready (may be
 * NULL) is called once listening, with the bound address. Returns 0
 * after a clean stop. */
int cas_grpc_serve(cas_store *s, const char *listen,
		   const struct cas_grpc_serve_options *opts,
		   volatile sig_atomic_t *stop,
		   void (*ready)(void *userdata, const char *address),
		   void *userdata);

#endif
