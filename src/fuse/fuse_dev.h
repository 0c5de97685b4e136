/* fuse_dev.h - the /dev/fuse device ABI a transport needs, without any
 * FUSE message layout.
 *
 * Transports move request and reply bytes; the engine (engine.h) owns every
 * FUSE header. What a transport does need of the kernel's ABI is here,
 * under our own CAS_ names so it never collides with a system header:
 * the /dev/fuse ioctls (clone a session fd, register a passthrough backing
 * file) and FUSE over io_uring (kernel 6.14+, protocol 7.42): the two ring
 * commands, the command area of an SQE, and the layout of a ring entry's
 * header buffer. Debian's <linux/fuse.h> predates io_uring; the layouts
 * follow the kernel's documented include/uapi/linux/fuse.h and
 * Documentation/filesystems/fuse-io-uring.rst, and the static asserts pin
 * their sizes.
 *
 * FUSE over io_uring, in short: after INIT (over /dev/fuse, which also
 * keeps carrying FORGET and INTERRUPT), the daemon registers ring entries
 * on the session fd with IORING_OP_URING_CMD on an SQE128 ring, for every
 * queue (one per possible CPU; the kernel uses the ring only once each
 * queue has an entry). Each entry is two buffers: a header buffer (struct
 * cas_fuse_uring_req_header) and a payload buffer of at least the
 * connection's largest request or reply. A completion means a request sits
 * in the entry; COMMIT_AND_FETCH with the entry's commit id hands the
 * reply back and waits for the next request in one step.
 *
 * Contract: definitions only.
 */
#ifndef CAS_FUSE_DEV_H
#define CAS_FUSE_DEV_H

#include <stdint.h>
#include <sys/ioctl.h>

#define CAS_FUSE_DEV_IOC_MAGIC 229
/* Attaches a fresh /dev/fuse fd to the session of the fd passed. */
#define CAS_FUSE_DEV_IOC_CLONE _IOR(CAS_FUSE_DEV_IOC_MAGIC, 0, uint32_t)

/* Argument of CAS_FUSE_DEV_IOC_BACKING_OPEN: registers fd as a backing file
 * and returns its id (> 0); the id is dropped with
 * CAS_FUSE_DEV_IOC_BACKING_CLOSE. Needs CAP_SYS_ADMIN in the initial user
 * namespace. */
struct cas_fuse_backing_map {
	int32_t fd;
	uint32_t flags; /* must be 0 */
	uint64_t padding;
};

#define CAS_FUSE_DEV_IOC_BACKING_OPEN \
	_IOW(CAS_FUSE_DEV_IOC_MAGIC, 1, struct cas_fuse_backing_map)
#define CAS_FUSE_DEV_IOC_BACKING_CLOSE _IOW(CAS_FUSE_DEV_IOC_MAGIC, 2, uint32_t)

/* The kernel refuses reads of /dev/fuse into smaller buffers. */
#define CAS_FUSE_MIN_READ_BUFFER 8192

/* ---- FUSE over io_uring ---- */

#define CAS_FUSE_URING_CMD_REGISTER	    1
#define CAS_FUSE_URING_CMD_COMMIT_AND_FETCH 2

/* Sizes of the two fixed areas at the start of a ring entry's header. */
#define CAS_FUSE_URING_IN_OUT_HEADER_SZ 128
#define CAS_FUSE_URING_OP_IN_OUT_SZ	128

/* Written by the kernel with each request; read back with each commit. */
struct cas_fuse_uring_ent_in_out {
	uint64_t flags;
	uint64_t commit_id;  /* echo in the COMMIT_AND_FETCH command */
	uint32_t payload_sz; /* bytes used in the payload buffer */
	uint32_t padding;
	uint64_t reserved;
};

/* iov[0] of a registration: the request's fuse_in_header (on fetch) or the
 * reply's fuse_out_header (on commit) in `in_out`, the request's first
 * argument (its per-opcode struct, if any) in `op_in`; the other arguments
 * and every reply argument travel in the payload buffer (iov[1]). */
struct cas_fuse_uring_req_header {
	uint8_t in_out[CAS_FUSE_URING_IN_OUT_HEADER_SZ];
	uint8_t op_in[CAS_FUSE_URING_OP_IN_OUT_SZ];
	struct cas_fuse_uring_ent_in_out ring_ent_in_out;
};
_Static_assert(sizeof(struct cas_fuse_uring_req_header) == 288,
	       "fuse_uring_req_header layout");

/* The command area of a 128-byte SQE (its `cmd` bytes, 80 available). For
 * REGISTER the SQE's addr points to two iovecs (header, payload) and its
 * len is 2; for COMMIT_AND_FETCH commit_id names the entry's request. */
struct cas_fuse_uring_cmd_req {
	uint64_t flags;
	uint64_t commit_id;
	uint16_t qid;
	uint8_t padding[6];
};
_Static_assert(sizeof(struct cas_fuse_uring_cmd_req) == 24,
	       "fuse_uring_cmd_req layout");

#endif
