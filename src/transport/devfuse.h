/* devfuse.h - serving a FUSE filesystem through /dev/fuse.
 *
 * Mounts a FUSE file system (mount(2) when privileged, else fusermount3
 * with the descriptor passed back over a socket), then serves it with
 * worker threads, each reading requests from its own clone of the session
 * descriptor and writing replies: plain writev, or for READ data that
 * lives in a file, vmsplice + splice through a per-thread pipe, so the
 * bytes never pass through a userspace buffer. When the process may
 * (CAP_SYS_ADMIN), FUSE passthrough is offered: the engine registers the
 * blob's fd as a backing file and the kernel reads it directly.
 *
 * Contract: cas_devfuse_mount and cas_devfuse_serve are called by one
 * thread, in that order. mount blocks SIGINT, SIGTERM and SIGUSR2 in the
 * calling thread (workers inherit it; serve restores the mask when it
 * returns) and serve uses SIGUSR1 to wake workers;
 * SIGINT or SIGTERM unmounts and returns 0; an unmount from outside also
 * returns 0. The ops and fs must outlive serve; serve returns only after
 * every worker has stopped, so the caller may free fs right after.
 */
#ifndef CAS_TRANSPORT_DEVFUSE_H
#define CAS_TRANSPORT_DEVFUSE_H

#include <stdbool.h>

#include "fuse/engine.h"

struct cas_devfuse_options {
	const char *mountpoint;
	unsigned threads;    /* 0: number of online CPUs */
	bool allow_other;    /* other users may access the mount */
	bool no_passthrough; /* never offer FUSE passthrough (benchmarks) */
	const char *fsname;  /* mount source shown in mountinfo ("castore") */
	const char *subtype; /* type shows as fuse.SUBTYPE ("castore") */
};

struct cas_devfuse;

/* Checks the mountpoint (missing: -ENOENT, not a folder: -ENOTDIR,
 * already a mount point: -EBUSY), opens /dev/fuse and mounts. Logs the
 * reason on failure. */
int cas_devfuse_mount(const struct cas_devfuse_options *opts,
		      struct cas_devfuse **ret);

/* Serves until unmounted or signalled; unmounts when signalled. Returns 0
 * on a clean end, -errno when serving failed. */
int cas_devfuse_serve(struct cas_devfuse *d, const struct cas_fuse_ops *ops,
		      void *fs);

/* Unmounts if still mounted, closes and frees. */
void cas_devfuse_free(struct cas_devfuse *d);
static inline void cas_devfuse_freep(struct cas_devfuse **d)
{
	cas_devfuse_free(*d);
}

#endif
