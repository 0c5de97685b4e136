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
 * With FUSE over io_uring (transport auto when the kernel has it on, or
 * io-uring) the requests come through ring queues instead (uring.h);
 * /dev/fuse then carries only INIT, FORGET and INTERRUPT.
 *
 * Contract: cas_devfuse_mount, cas_devfuse_configure and cas_devfuse_serve
 * are called by one thread, in that order. mount blocks SIGINT, SIGTERM,
 * SIGUSR1 and SIGUSR2 in the calling thread (workers inherit it; serve
 * restores the mask when it returns); serve waits for them and wakes
 * workers with SIGRTMIN. The first SIGINT or SIGTERM detaches the mount
 * (MNT_DETACH: the path is free, nothing new opens) and serve goes on
 * while files opened before stay open; it returns 0 once the kernel ends
 * the connection (the last one closed) or at a second signal. SIGUSR1
 * logs the request counts per opcode. An unmount from outside also
 * returns 0. The session (and its filesystem) must outlive serve; serve
 * returns only after every worker has stopped, so the caller may free
 * them right after.
 */
#ifndef CAS_TRANSPORT_DEVFUSE_H
#define CAS_TRANSPORT_DEVFUSE_H

#include <stdbool.h>

#include "fuse/engine.h"

enum cas_devfuse_transport {
	CAS_DEVFUSE_AUTO = 0, /* io_uring when the kernel has it on */
	CAS_DEVFUSE_IO_URING, /* io_uring or fail the mount */
	CAS_DEVFUSE_DEVFUSE,  /* read/write on /dev/fuse only */
};

struct cas_devfuse_options {
	enum cas_devfuse_transport transport;
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

/* Sets what this mount decides of the engine's config: request and READ
 * sizes (what the splice pipes can carry), the passthrough hooks (when
 * privileged and not refused), and io_uring. The caller sets the rest
 * (readonly) and makes the session from it. */
void cas_devfuse_configure(struct cas_devfuse *d, struct cas_fuse_config *cfg);

/* Serves the session until unmounted or signalled; unmounts when
 * signalled. Returns 0 on a clean end, -errno when serving failed, after
 * logging the reason. */
int cas_devfuse_serve(struct cas_devfuse *d, struct cas_fuse_session *session);

/* Unmounts if still mounted, closes and frees. */
void cas_devfuse_free(struct cas_devfuse *d);
static inline void cas_devfuse_freep(struct cas_devfuse **d)
{
	cas_devfuse_free(*d);
}

#endif
