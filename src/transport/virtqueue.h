/* virtqueue.h - guest memory and split virtqueues (virtio 1.x, 2.7).
 *
 * The memory table maps the regions a vhost-user frontend shares (one fd
 * per region) and translates guest physical addresses (descriptor buffers)
 * and frontend virtual addresses (ring locations) into host pointers, with
 * every range checked against the regions: a range must lie in one region,
 * or in regions that are contiguous in the address space it is expressed
 * in. A split virtqueue pops descriptor chains (direct or through one
 * indirect table) as lists of host iovecs and pushes used elements.
 *
 * Everything a guest wrote is untrusted: descriptors are copied out before
 * they are checked, chains are capped at the queue size (no loops), an
 * indirect table must be a whole number of descriptors and may not nest,
 * device-writable descriptors must follow the readable ones. A malformed
 * chain is reported as such (-EBADMSG with its head, so that the caller
 * can return it to the guest with length 0) and never crashes.
 *
 * Contract: a struct cas_vq belongs to one thread at a time (its queue
 * thread, or the vhost-user thread while that thread is stopped). The
 * memory table is immutable once built; callers swap whole tables under
 * their own lock. Host pointers returned stay valid while that table does.
 */
#ifndef CAS_TRANSPORT_VIRTQUEUE_H
#define CAS_TRANSPORT_VIRTQUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define CAS_VU_MAX_REGIONS 8
#define CAS_VQ_MAX_SIZE	   32768

/* Feature bits the rings know about (virtio 1.x, 6). */
#define CAS_VIRTIO_RING_F_INDIRECT_DESC 28
#define CAS_VIRTIO_RING_F_EVENT_IDX	29
#define CAS_VIRTIO_F_VERSION_1		32

/* Split ring layout (virtio 1.x, 2.7). Little endian, which is also this
 * host's order (x86-64, aarch64): VERSION_1 devices are little endian. */
#define CAS_VRING_DESC_F_NEXT	       1
#define CAS_VRING_DESC_F_WRITE	       2
#define CAS_VRING_DESC_F_INDIRECT      4
#define CAS_VRING_AVAIL_F_NO_INTERRUPT 1

struct cas_vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct cas_vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[]; /* num entries, then used_event (EVENT_IDX) */
};

struct cas_vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct cas_vring_used {
	uint16_t flags;
	uint16_t idx;
	struct cas_vring_used_elem ring[]; /* num, then avail_event */
};

/* One region as SET_MEM_TABLE describes it, plus our mapping of it. */
struct cas_vu_region {
	uint64_t gpa; /* guest physical address of the first byte */
	uint64_t size;
	uint64_t uva;	      /* the frontend's virtual address of it */
	uint64_t mmap_offset; /* where the region starts in its fd */
	uint8_t *host;	      /* our address of the first byte */
	void *map;	      /* what to munmap (NULL: not ours) */
	size_t map_len;
};

struct cas_vu_mem {
	unsigned nregions;
	struct cas_vu_region regions[CAS_VU_MAX_REGIONS];
};

/* Checks a region list (sizes non-zero, no 64-bit overflow of any end,
 * no two regions overlapping in guest physical space). 0 or -EINVAL. */
int cas_vu_mem_check(const struct cas_vu_mem *mem);

/* Maps region `i` from fd (mmap of mmap_offset + size bytes, shared,
 * read-write), refusing an fd smaller than that. The fd stays the
 * caller's. */
int cas_vu_mem_map_region(struct cas_vu_mem *mem, unsigned i, int fd);

/* Unmaps every region we mapped and empties the table. */
void cas_vu_mem_release(struct cas_vu_mem *mem);

/* Translates [gpa, gpa+len) into at most iov_max host iovecs appended at
 * iov[*iov_cnt]; a range crossing regions is allowed only where they are
 * contiguous in guest physical space. len 0 adds nothing. -EFAULT when a
 * byte is not covered, -E2BIG when iov_max is exceeded. */
int cas_vu_mem_gpa_iov(const struct cas_vu_mem *mem, uint64_t gpa, uint64_t len,
		       struct iovec *iov, int iov_max, int *iov_cnt);

/* Host pointer of [gpa, gpa+len) when it lies in one region, else NULL. */
void *cas_vu_mem_gpa(const struct cas_vu_mem *mem, uint64_t gpa, uint64_t len);
/* Host pointer of the frontend virtual range [uva, uva+len) when it lies
 * in one region, else NULL. */
void *cas_vu_mem_uva(const struct cas_vu_mem *mem, uint64_t uva, uint64_t len);

/* A split virtqueue's state as the device sees it. */
struct cas_vq {
	/* configuration (SET_VRING_NUM/ADDR/BASE, features) */
	uint16_t num; /* 0: not configured */
	uint64_t desc_uva, avail_uva, used_uva;
	bool event_idx;
	bool indirect;

	/* progress */
	uint16_t last_avail_idx; /* next avail entry to take */
	uint16_t used_idx;	 /* our copy of used->idx */
	uint16_t signalled_used; /* used->idx at the last interrupt */
	bool signalled_used_valid;

	/* host pointers, valid for one memory table (cas_vq_map) */
	volatile struct cas_vring_desc *desc;
	volatile struct cas_vring_avail *avail;
	volatile struct cas_vring_used *used;
};

/* One popped chain: iov[0..read_cnt) are device-readable (the request),
 * iov[read_cnt..read_cnt+write_cnt) device-writable (for the reply). */
struct cas_vq_elem {
	uint16_t head;
	int read_cnt, write_cnt;
	size_t read_len, write_len;
	struct iovec *iov; /* caller's array of iov_max entries */
	int iov_max;
};

/* Resets progress and mapping (configuration is kept). */
void cas_vq_reset(struct cas_vq *vq);

/* Translates the ring addresses through `mem` (sizes from num and
 * event_idx, alignment as the spec requires). 0, -EINVAL if the queue is
 * not configured, -EFAULT if a ring is not inside one region. */
int cas_vq_map(struct cas_vq *vq, const struct cas_vu_mem *mem);

/* Reads used->idx from guest memory into vq->used_idx (ring start). */
void cas_vq_sync_used(struct cas_vq *vq);

/* Takes the next available chain. Returns 1 with *elem filled, 0 when
 * the ring is empty, -EBADMSG when the chain is malformed (elem->head is
 * set and last_avail_idx advanced: push it with length 0), -EPROTO when
 * the avail index is beyond what the ring can hold (the ring is broken;
 * stop processing it). The ring must be mapped. */
int cas_vq_pop(struct cas_vq *vq, const struct cas_vu_mem *mem,
	       struct cas_vq_elem *elem);

/* Returns chain `head` to the guest with `len` bytes written. */
void cas_vq_push(struct cas_vq *vq, uint16_t head, uint32_t len);

/* Whether the guest wants an interrupt for what was pushed since the last
 * one (EVENT_IDX's used_event, else NO_INTERRUPT). Records it as sent. */
bool cas_vq_should_notify(struct cas_vq *vq);

/* With EVENT_IDX: publishes avail_event so that the guest kicks for the
 * next entry, then reports whether entries arrived meanwhile (true: pop
 * again before sleeping). Without EVENT_IDX: whether entries are there. */
bool cas_vq_prepare_sleep(struct cas_vq *vq);

/* Copies len bytes of src into the iovecs starting at byte `off` of their
 * concatenation; returns the bytes copied (less when they end). */
size_t cas_iov_copy_to(const struct iovec *iov, int cnt, size_t off,
		       const void *src, size_t len);
/* Copies up to len bytes from the iovecs (from byte off) into dst. */
size_t cas_iov_copy_from(const struct iovec *iov, int cnt, size_t off,
			 void *dst, size_t len);

#endif
