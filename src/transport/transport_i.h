/* transport_i.h - what the transports' own files share.
 *
 * Contract: functions only, thread-safe.
 */
#ifndef CAS_TRANSPORT_TRANSPORT_I_H
#define CAS_TRANSPORT_TRANSPORT_I_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fuse/engine.h"
#include "fuse/fuse_dev.h"

/* Joins a thread that may be blocked in a system call: sends it `sig`
 * (whose handler does nothing and which it does not block, so the call
 * returns EINTR) until it has ended. A signal may land just before the
 * thread blocks, hence the knocking. The caller has told it to stop. */
void cas_transport_knock_join(pthread_t thread, int sig);

/* What a /dev/fuse worker (devfuse.c) answers with: fd is /dev/fuse (a
 * pipe for the fuzz target), pipe the splice pipe of pipe_size bytes
 * ({-1, -1}: none), scratch the buffer of READ data when copying, reply
 * the engine's reply buffer. */
struct cas_devfuse_io {
	int fd;
	int pipe[2];
	int pipe_size;
	uint8_t *scratch;
	size_t scratch_size;
	uint8_t *reply;
	size_t reply_size;
};

/* Answers one request as read() on /dev/fuse returned it (n bytes of
 * req, whatever its header says): processes it, sends the reply on
 * io->fd (by splice or by copy; a file shorter than the reply promised
 * is sent as far as it goes, the header saying so) and ends it. Sets
 * *ret_init when the reply delivered answers INIT; returns true when the
 * request destroyed the session. */
bool cas_devfuse_answer(struct cas_fuse_session *s, struct cas_devfuse_io *io,
			const uint8_t *req, size_t n, bool *ret_init);

/* The handle a reply hands out (kind 0: none), released when the commit
 * that carries it fails (uring.c). */
struct cas_uring_open {
	uint8_t kind;
	uint64_t ino, fh;
};

/* Runs the request a FUSE over io_uring entry holds (hdr, and payload of
 * payload_size bytes, as the kernel filled them) and writes the reply
 * into them as COMMIT_AND_FETCH wants, file data read straight into the
 * payload; returns the commit id. */
uint64_t cas_uring_answer(struct cas_fuse_session *s,
			  struct cas_fuse_uring_req_header *hdr,
			  uint8_t *payload, size_t payload_size, uint8_t *reply,
			  size_t reply_size, struct cas_uring_open *ret_open);

#endif
