/* virtiofs.h - a vhost-user-fs device (virtio 1.x, 5.11 "File System
 * Device") serving one FUSE engine session per connected frontend.
 *
 * Listens on a UNIX socket; one frontend (QEMU, cloud-hypervisor) at a
 * time, others are refused while one is connected. Queue 0 is the hiprio
 * queue (FORGET, INTERRUPT), queues 1..n the request queues; each request
 * chain goes to cas_fuse_session_process as it lies in guest memory and
 * the reply is written into the chain's writable buffers (file data read
 * with preadv straight into guest memory). When the frontend goes away
 * (guest shut down, QEMU ended) everything it set up is dropped, its
 * session closed, and the next frontend is accepted.
 *
 * Stopping is in two steps, as for a mount: the first cas_virtiofs_stop
 * closes and removes the socket (no new frontend), and a connected
 * frontend keeps its session until it disconnects; a second stop ends it
 * at once.
 *
 * Contract: cas_virtiofs_run runs on the caller's thread (it is the
 * vhost-user socket thread; queue threads come and go with the rings).
 * cas_virtiofs_stop may be called from a signal handler or any thread.
 */
#ifndef CAS_TRANSPORT_VIRTIOFS_H
#define CAS_TRANSPORT_VIRTIOFS_H

#include <stddef.h>

#include "fuse/engine.h"

struct cas_virtiofs_config {
	const char *socket_path;
	unsigned request_queues; /* offered (GET_QUEUE_NUM), 0: 1 */
	size_t reply_bufsize;	 /* cas_fuse_reply_bufsize() of the sessions */
	/* A fresh engine session for each frontend that connects, closed
	 * after it disconnected and every queue thread ended. A guest that
	 * sends FUSE_INIT again (it rebooted) gets a fresh one too. */
	int (*session_open)(void *userdata, struct cas_fuse_session **ret);
	void (*session_close)(void *userdata, struct cas_fuse_session *s);
	void *userdata;
};

struct cas_virtiofs;

/* Sets what a virtio-fs device decides of the engine's config (READ and
 * request sizes; no passthrough, no io_uring). The caller sets the rest
 * and makes each frontend's session from it. */
void cas_virtiofs_configure(struct cas_fuse_config *cfg);

/* Binds and listens on socket_path (a stale socket there is replaced;
 * anything else there is an error: -EEXIST). */
int cas_virtiofs_new(const struct cas_virtiofs_config *cfg,
		     struct cas_virtiofs **ret);
/* Serves frontends until cas_virtiofs_stop (with no frontend connected,
 * or once the connected one left), or a second stop. 0, or -errno if the
 * socket failed. */
int cas_virtiofs_run(struct cas_virtiofs *v);
/* Async-signal-safe. */
void cas_virtiofs_stop(struct cas_virtiofs *v);
/* Closes and removes the socket (and closes a session still open). */
void cas_virtiofs_free(struct cas_virtiofs *v);

#endif
