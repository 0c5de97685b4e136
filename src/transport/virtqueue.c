#include "transport/virtqueue.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "core/log.h"

/* A full barrier between our ring stores and our ring loads: the other
 * side is the guest, not a thread of ours. ThreadSanitizer cannot model
 * fences (gcc refuses them under -fsanitize=thread); there a locked
 * read-modify-write, a full barrier on the CPUs we run on, stands in. */
#if defined(__SANITIZE_THREAD__)
static void vq_full_barrier(void)
{
	static int dummy;
	__atomic_fetch_add(&dummy, 0, __ATOMIC_SEQ_CST);
}
#else
static void vq_full_barrier(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}
#endif

int cas_vu_mem_check(const struct cas_vu_mem *mem)
{
	if (mem->nregions > CAS_VU_MAX_REGIONS)
		return -EINVAL;
	for (unsigned i = 0; i < mem->nregions; i++) {
		const struct cas_vu_region *r = &mem->regions[i];
		if (r->size == 0 || r->gpa > UINT64_MAX - r->size ||
		    r->uva > UINT64_MAX - r->size ||
		    r->mmap_offset > UINT64_MAX - r->size ||
		    r->mmap_offset + r->size > (uint64_t)SIZE_MAX)
			return -EINVAL;
		/* Overlaps would make a translation ambiguous. */
		for (unsigned j = 0; j < i; j++) {
			const struct cas_vu_region *o = &mem->regions[j];
			if (r->gpa < o->gpa + o->size &&
			    o->gpa < r->gpa + r->size)
				return -EINVAL;
			if (r->uva < o->uva + o->size &&
			    o->uva < r->uva + r->size)
				return -EINVAL;
		}
	}
	return 0;
}

int cas_vu_mem_map_region(struct cas_vu_mem *mem, unsigned i, int fd)
{
	struct stat st;

	if (i >= mem->nregions)
		return -EINVAL;
	struct cas_vu_region *r = &mem->regions[i];
	if (fstat(fd, &st) < 0)
		return cas_negerrno();
	/* Touching a page past the end of a shared file raises SIGBUS:
	 * refuse a region its file does not cover. */
	if (!S_ISREG(st.st_mode) || st.st_size < 0 ||
	    (uint64_t)st.st_size < r->mmap_offset + r->size)
		return -EINVAL;
	size_t len = (size_t)(r->mmap_offset + r->size);
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_NORESERVE, fd, 0);
	if (p == MAP_FAILED)
		return cas_negerrno();
	r->map = p;
	r->map_len = len;
	r->host = (uint8_t *)p + r->mmap_offset;
	return 0;
}

void cas_vu_mem_release(struct cas_vu_mem *mem)
{
	for (unsigned i = 0; i < mem->nregions && i < CAS_VU_MAX_REGIONS; i++) {
		struct cas_vu_region *r = &mem->regions[i];
		if (r->map)
			munmap(r->map, r->map_len);
	}
	memset(mem, 0, sizeof(*mem));
}

static const struct cas_vu_region *find_gpa(const struct cas_vu_mem *mem,
					    uint64_t gpa)
{
	for (unsigned i = 0; i < mem->nregions; i++) {
		const struct cas_vu_region *r = &mem->regions[i];
		if (r->host && gpa >= r->gpa && gpa - r->gpa < r->size)
			return r;
	}
	return NULL;
}

int cas_vu_mem_gpa_iov(const struct cas_vu_mem *mem, uint64_t gpa, uint64_t len,
		       struct iovec *iov, int iov_max, int *iov_cnt)
{
	int n = *iov_cnt;

	if (len > 0 && gpa > UINT64_MAX - len)
		return -EFAULT;
	while (len > 0) {
		/* The next piece must start in some region exactly where the
		 * previous one ended: contiguous in guest physical space. */
		const struct cas_vu_region *r = find_gpa(mem, gpa);
		if (!r)
			return -EFAULT;
		uint64_t off = gpa - r->gpa;
		uint64_t piece = CAS_MIN(len, r->size - off);
		if (n >= iov_max)
			return -E2BIG;
		iov[n].iov_base = r->host + off;
		iov[n].iov_len = (size_t)piece;
		n++;
		gpa += piece;
		len -= piece;
	}
	*iov_cnt = n;
	return 0;
}

void *cas_vu_mem_gpa(const struct cas_vu_mem *mem, uint64_t gpa, uint64_t len)
{
	const struct cas_vu_region *r = find_gpa(mem, gpa);
	if (!r || len > r->size - (gpa - r->gpa))
		return NULL;
	return r->host + (gpa - r->gpa);
}

void *cas_vu_mem_uva(const struct cas_vu_mem *mem, uint64_t uva, uint64_t len)
{
	for (unsigned i = 0; i < mem->nregions; i++) {
		const struct cas_vu_region *r = &mem->regions[i];
		if (!r->host || uva < r->uva || uva - r->uva >= r->size)
			continue;
		if (len > r->size - (uva - r->uva))
			return NULL;
		return r->host + (uva - r->uva);
	}
	return NULL;
}

void cas_vq_reset(struct cas_vq *vq)
{
	vq->last_avail_idx = 0;
	vq->used_idx = 0;
	vq->signalled_used = 0;
	vq->signalled_used_valid = false;
	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
}

int cas_vq_map(struct cas_vq *vq, const struct cas_vu_mem *mem)
{
	uint64_t extra = vq->event_idx ? 2 : 0;

	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	if (vq->num == 0)
		return -EINVAL;
	/* Alignments of 2.7: descriptor table 16, available 2, used 4. */
	if (vq->desc_uva % 16 || vq->avail_uva % 2 || vq->used_uva % 4)
		return -EFAULT;
	void *d = cas_vu_mem_uva(mem, vq->desc_uva, 16ull * vq->num);
	void *a =
		cas_vu_mem_uva(mem, vq->avail_uva, 4 + 2ull * vq->num + extra);
	void *u = cas_vu_mem_uva(mem, vq->used_uva, 4 + 8ull * vq->num + extra);
	if (!d || !a || !u)
		return -EFAULT;
	vq->desc = d;
	vq->avail = a;
	vq->used = u;
	return 0;
}

void cas_vq_sync_used(struct cas_vq *vq)
{
	vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	vq->signalled_used_valid = false;
}

/* The guest may rewrite a descriptor while we read it: take one copy and
 * use only that. */
static void desc_copy(struct cas_vring_desc *d,
		      const volatile struct cas_vring_desc *src)
{
	memcpy(d, (const void *)src, sizeof(*d));
}

static int vq_walk(struct cas_vq *vq, const struct cas_vu_mem *mem,
		   struct cas_vq_elem *elem)
{
	const volatile struct cas_vring_desc *table = vq->desc;
	uint32_t table_size = vq->num;
	uint32_t budget = vq->num; /* 2.7.5.3.1: a chain is at most num long */
	uint32_t i = elem->head;
	bool in_indirect = false;
	int cnt = 0;

	for (;;) {
		struct cas_vring_desc d;

		if (budget-- == 0)
			return -EBADMSG; /* too long, or a loop */
		desc_copy(&d, &table[i]);

		if (d.flags & CAS_VRING_DESC_F_INDIRECT) {
			if (in_indirect || !vq->indirect ||
			    (d.flags & CAS_VRING_DESC_F_NEXT) || d.len == 0 ||
			    d.len % sizeof(struct cas_vring_desc) || d.addr % 8)
				return -EBADMSG;
			const volatile struct cas_vring_desc *t =
				cas_vu_mem_gpa(mem, d.addr, d.len);
			if (!t)
				return -EBADMSG;
			table = t;
			table_size = d.len / sizeof(struct cas_vring_desc);
			budget = CAS_MIN(table_size, (uint32_t)vq->num);
			in_indirect = true;
			i = 0;
			continue;
		}

		bool writable = d.flags & CAS_VRING_DESC_F_WRITE;
		/* 2.7.4.2: readable descriptors come before writable ones. */
		if (!writable && elem->write_cnt > 0)
			return -EBADMSG;
		int before = cnt;
		if (cas_vu_mem_gpa_iov(mem, d.addr, d.len, elem->iov,
				       elem->iov_max, &cnt) < 0)
			return -EBADMSG;
		if (writable) {
			elem->write_cnt += cnt - before;
			elem->write_len += d.len;
		} else {
			elem->read_cnt += cnt - before;
			elem->read_len += d.len;
		}

		if (!(d.flags & CAS_VRING_DESC_F_NEXT))
			return 0;
		if (d.next >= table_size)
			return -EBADMSG;
		i = d.next;
	}
}

int cas_vq_pop(struct cas_vq *vq, const struct cas_vu_mem *mem,
	       struct cas_vq_elem *elem)
{
	/* Acquire: the ring entry and the descriptors it names were written
	 * before the index (the driver's write barrier). */
	uint16_t avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
	uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);

	elem->read_cnt = elem->write_cnt = 0;
	elem->read_len = elem->write_len = 0;
	if (pending == 0)
		return 0;
	if (pending > vq->num)
		return -EPROTO;
	elem->head = vq->avail->ring[vq->last_avail_idx % vq->num];
	vq->last_avail_idx++;
	if (elem->head >= vq->num)
		return -EBADMSG;
	int r = vq_walk(vq, mem, elem);
	if (r < 0) {
		elem->read_cnt = elem->write_cnt = 0;
		elem->read_len = elem->write_len = 0;
		return r;
	}
	return 1;
}

void cas_vq_push(struct cas_vq *vq, uint16_t head, uint32_t len)
{
	volatile struct cas_vring_used_elem *e =
		&vq->used->ring[vq->used_idx % vq->num];
	e->id = head;
	e->len = len;
	vq->used_idx++;
	/* Release: the element is visible before the index that covers it. */
	__atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

static volatile uint16_t *used_event(struct cas_vq *vq)
{
	return &vq->avail->ring[vq->num];
}

static volatile uint16_t *avail_event(struct cas_vq *vq)
{
	return (volatile uint16_t *)&vq->used->ring[vq->num];
}

bool cas_vq_should_notify(struct cas_vq *vq)
{
	/* Our used->idx store must be visible before we read what the
	 * driver asked for, or both sides may wait for each other. */
	vq_full_barrier();
	if (!vq->event_idx)
		return !(vq->avail->flags & CAS_VRING_AVAIL_F_NO_INTERRUPT);

	uint16_t old = vq->signalled_used, now = vq->used_idx;
	bool valid = vq->signalled_used_valid;
	vq->signalled_used = now;
	vq->signalled_used_valid = true;
	if (!valid)
		return true;
	uint16_t event = *used_event(vq);
	/* vring_need_event: did used->idx step past used_event? */
	return (uint16_t)(now - event - 1) < (uint16_t)(now - old);
}

bool cas_vq_prepare_sleep(struct cas_vq *vq)
{
	if (vq->event_idx) {
		*avail_event(vq) = vq->last_avail_idx;
		vq_full_barrier();
	}
	return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE) !=
	       vq->last_avail_idx;
}

size_t cas_iov_copy_to(const struct iovec *iov, int cnt, size_t off,
		       const void *src, size_t len)
{
	const uint8_t *s = src;
	size_t done = 0;

	for (int i = 0; i < cnt && done < len; i++) {
		if (off >= iov[i].iov_len) {
			off -= iov[i].iov_len;
			continue;
		}
		size_t n = CAS_MIN(iov[i].iov_len - off, len - done);
		memcpy((uint8_t *)iov[i].iov_base + off, s + done, n);
		done += n;
		off = 0;
	}
	return done;
}

size_t cas_iov_copy_from(const struct iovec *iov, int cnt, size_t off,
			 void *dst, size_t len)
{
	uint8_t *d = dst;
	size_t done = 0;

	for (int i = 0; i < cnt && done < len; i++) {
		if (off >= iov[i].iov_len) {
			off -= iov[i].iov_len;
			continue;
		}
		size_t n = CAS_MIN(iov[i].iov_len - off, len - done);
		memcpy(d + done, (const uint8_t *)iov[i].iov_base + off, n);
		done += n;
		off = 0;
	}
	return done;
}
