/* uring.h - FUSE over io_uring: the ring queues of one /dev/fuse session.
 *
 * Kernel 6.14+ (fuse.enable_uring=Y) lets a daemon take requests through
 * io_uring instead of read() and write() on /dev/fuse: one queue per
 * possible CPU (a request goes to the queue of the CPU its caller runs
 * on), each queue a set of ring entries (fuse_dev.h), and no request
 * flows before every queue has one. Here `workers` threads (at most one
 * per queue) each own one SQE128 io_uring made with raw syscalls (no
 * liburing: the loop needs four calls of it) holding `depth` entries of
 * each of its queues: worker k serves queues k, k + workers, ..., and runs
 * on their CPUs. With one worker per queue (the default) each is pinned
 * to its queue's CPU. A completion hands over a request; the thread runs it through
 * the engine (cas_fuse_session_process_uring), reads file data for a READ
 * straight into the entry's payload buffer, and commits the reply with the
 * fetch of the next request in one COMMIT_AND_FETCH, submitted together
 * with the other entries' commits: one io_uring_enter per batch, no
 * read/write pair per request. /dev/fuse still carries INIT, FORGET and
 * INTERRUPT (the devfuse workers keep serving it).
 *
 * Contract: one owner calls new, then start once the INIT reply is
 * delivered (the kernel refuses registrations before: EAGAIN), then free;
 * the session must outlive free. Worker threads end
 * by themselves when the connection goes (their commands complete with
 * ENOTCONN); free also wakes them with `wake_sig` (a signal whose handler
 * does nothing and that they do not block) and joins them.
 */
#ifndef CAS_TRANSPORT_URING_H
#define CAS_TRANSPORT_URING_H

#include <stdbool.h>
#include <stddef.h>

#include "fuse/engine.h"

struct cas_uring;

/* Whether the kernel has FUSE over io_uring switched on
 * (/sys/module/fuse/parameters/enable_uring). */
bool cas_uring_enabled(void);

/* Makes the rings and buffers of every queue (one per possible CPU):
 * `workers` rings (0 or more than the queues: one per queue), `depth`
 * entries per queue, with payload buffers of `payload_size` bytes (at
 * least the connection's largest request or reply: max(8 KiB, max_write,
 * max_pages pages)) and a reply buffer of `reply_size`
 * (cas_fuse_reply_bufsize). Done before INIT, so that the mount offers
 * io_uring only when it has the rings. Logs and returns -errno. */
int cas_uring_new(size_t payload_size, size_t reply_size, unsigned depth,
		  unsigned workers, struct cas_uring **ret);

/* Once the INIT reply is delivered: starts the queue threads, which
 * register their entries on the session fd `fd` and serve `s`. On
 * failure (logged) the kernel is told to drop io_uring for the
 * connection, and /dev/fuse serves everything. */
int cas_uring_start(struct cas_uring *u, int fd, struct cas_fuse_session *s,
		    int wake_sig);

/* Number of the kernel's queues, and of workers (rings and threads) that
 * serve them (0 for NULL). */
unsigned cas_uring_queues(const struct cas_uring *u);
unsigned cas_uring_workers(const struct cas_uring *u);

/* Stops and joins every queue thread, releases the rings. NULL: no-op. */
void cas_uring_free(struct cas_uring *u);

#endif
