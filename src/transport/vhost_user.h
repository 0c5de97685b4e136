/* vhost_user.h - the backend side of the vhost-user protocol (QEMU's
 * docs/interop/vhost-user.rst): one connected frontend, its memory table
 * and its split virtqueues, each served by a thread of its own.
 *
 * The frontend's messages are handled on the caller's thread (the socket
 * thread). A ring starts when its kick fd arrives and stops with
 * GET_VRING_BASE; while started, its thread waits on the kick eventfd,
 * pops every available chain and passes the well-formed ones to
 * ops->process; malformed chains go back to the guest with length 0.
 * Interrupts go through the call eventfd, as EVENT_IDX or NO_INTERRUPT
 * allow.
 *
 * Messages are untrusted: the header is copied out and checked, every
 * payload size is checked per request, every fd received is closed on
 * every path that does not keep it. A protocol error that leaves no way to
 * answer (a bad header, a request that needs a reply and cannot have one)
 * makes cas_vu_dev_dispatch fail: the caller closes the connection and
 * calls cas_vu_dev_reset.
 *
 * Contract: cas_vu_dev_dispatch/handle/reset/free are called from one
 * thread. ops->process runs on the queue threads, concurrently for
 * different queues, never for one queue at once.
 */
#ifndef CAS_TRANSPORT_VHOST_USER_H
#define CAS_TRANSPORT_VHOST_USER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/virtqueue.h"

/* Requests (vhost-user.rst, "Front-end message types"). */
enum {
	CAS_VU_GET_FEATURES = 1,
	CAS_VU_SET_FEATURES = 2,
	CAS_VU_SET_OWNER = 3,
	CAS_VU_RESET_OWNER = 4,
	CAS_VU_SET_MEM_TABLE = 5,
	CAS_VU_SET_LOG_BASE = 6,
	CAS_VU_SET_LOG_FD = 7,
	CAS_VU_SET_VRING_NUM = 8,
	CAS_VU_SET_VRING_ADDR = 9,
	CAS_VU_SET_VRING_BASE = 10,
	CAS_VU_GET_VRING_BASE = 11,
	CAS_VU_SET_VRING_KICK = 12,
	CAS_VU_SET_VRING_CALL = 13,
	CAS_VU_SET_VRING_ERR = 14,
	CAS_VU_GET_PROTOCOL_FEATURES = 15,
	CAS_VU_SET_PROTOCOL_FEATURES = 16,
	CAS_VU_GET_QUEUE_NUM = 17,
	CAS_VU_SET_VRING_ENABLE = 18,
	CAS_VU_RESET_DEVICE = 34,
};

#define CAS_VU_VERSION		 0x1u
#define CAS_VU_FLAG_VERSION_MASK 0x3u
#define CAS_VU_FLAG_REPLY	 (1u << 2)
#define CAS_VU_FLAG_NEED_REPLY	 (1u << 3)
#define CAS_VU_VRING_IDX_MASK	 0xffu
#define CAS_VU_VRING_NOFD_MASK	 (1u << 8)

#define CAS_VU_F_PROTOCOL_FEATURES     30
#define CAS_VU_PROTOCOL_F_MQ	       0
#define CAS_VU_PROTOCOL_F_REPLY_ACK    3
#define CAS_VU_PROTOCOL_F_RESET_DEVICE 13

#define CAS_VU_MAX_FDS	   8
#define CAS_VU_MAX_PAYLOAD 4096
#define CAS_VU_MAX_QUEUES  64

/* The 12-byte header that precedes every payload. */
struct cas_vu_hdr {
	uint32_t request;
	uint32_t flags;
	uint32_t size;
};

struct cas_vu_ops {
	/* A queue thread starts / ends: its private context (scratch
	 * buffers). May be NULL. */
	int (*queue_start)(void *opaque, unsigned qidx, void **ret_ctx);
	void (*queue_stop)(void *opaque, unsigned qidx, void *ctx);
	/* One well-formed chain; returns the bytes written into its
	 * writable part (the used length). */
	uint32_t (*process)(void *opaque, void *ctx, unsigned qidx,
			    struct cas_vq_elem *elem);
};

struct cas_vu_config {
	uint64_t device_features; /* beyond VERSION_1, ring features */
	unsigned queues;	  /* how many the device has, <= MAX_QUEUES */
	const struct cas_vu_ops *ops;
	void *opaque;
};

struct cas_vu_dev;

int cas_vu_dev_new(const struct cas_vu_config *cfg, struct cas_vu_dev **ret);
/* Stops every ring; frees everything. */
void cas_vu_dev_free(struct cas_vu_dev *dev);

/* Back to the state of a fresh connection: rings stopped, fds closed,
 * memory unmapped, features forgotten. */
void cas_vu_dev_reset(struct cas_vu_dev *dev);

/* Reads one message from `sock` (a connected SOCK_STREAM socket) and
 * handles it, replying on `sock`. 0; -ECONNRESET at end of stream; other
 * -errno: the connection is unusable (the caller closes it). */
int cas_vu_dev_dispatch(struct cas_vu_dev *dev, int sock);

/* Handles one message already read. Takes ownership of fds[0..nfds)
 * (each is kept or closed). When *ret_reply_size >= 0 on return, a reply
 * of that payload size is in reply (the header is filled too). Returns 0,
 * or -errno when the connection must be closed. */
int cas_vu_dev_handle(struct cas_vu_dev *dev, const struct cas_vu_hdr *hdr,
		      const void *payload, int *fds, size_t nfds,
		      struct cas_vu_hdr *reply_hdr, void *reply,
		      int *ret_reply_size);

/* For tests: the ring's state (NULL if qidx is out of range). */
const struct cas_vq *cas_vu_dev_vq(const struct cas_vu_dev *dev, unsigned qidx);
uint64_t cas_vu_dev_features(const struct cas_vu_dev *dev);
bool cas_vu_dev_started(const struct cas_vu_dev *dev, unsigned qidx);

#endif
