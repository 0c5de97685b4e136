#include "transport/vhost_user.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include "core/log.h"

/* Payloads (vhost-user.rst, "Payload"). Copied out of the message buffer
 * with memcpy: the buffer carries no alignment promise. */
struct vu_state {
	uint32_t index;
	uint32_t num;
};

struct vu_addr {
	uint32_t index;
	uint32_t flags;
	uint64_t desc_uva;
	uint64_t used_uva;
	uint64_t avail_uva;
	uint64_t log_gpa;
};

struct vu_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t uva;
	uint64_t mmap_offset;
};

struct cas_vu_vring {
	struct cas_vu_dev *dev;
	unsigned index;
	/* Owned by the queue thread while started, else by the socket
	 * thread; pthread_create/join order the hand-overs. */
	struct cas_vq vq;
	bool need_sync;
	bool broken;
	uint64_t mapped_gen;

	/* socket thread only; the queue thread reads kick_fd while started,
	 * and it changes only while stopped */
	int kick_fd;
	int err_fd;
	bool started;
	pthread_t thread;
	int stop_fd;
	bool stopping; /* atomic */
	bool enabled;  /* atomic; recorded, see vring_start */

	pthread_mutex_t call_lock;
	int call_fd; /* protected by call_lock */
};

struct cas_vu_dev {
	struct cas_vu_config cfg;
	uint64_t features;	    /* acked by SET_FEATURES */
	uint64_t protocol_features; /* acked by SET_PROTOCOL_FEATURES */
	bool owner;

	pthread_rwlock_t mem_lock;
	struct cas_vu_mem *mem; /* protected by mem_lock */
	uint64_t mem_gen;	/* protected by mem_lock; 0: no table yet */

	struct cas_vu_vring *vrings; /* cfg.queues */
};

static uint64_t offered_features(const struct cas_vu_dev *dev)
{
	return dev->cfg.device_features | (1ull << CAS_VIRTIO_F_VERSION_1) |
	       (1ull << CAS_VIRTIO_RING_F_INDIRECT_DESC) |
	       (1ull << CAS_VIRTIO_RING_F_EVENT_IDX) |
	       (1ull << CAS_VU_F_PROTOCOL_FEATURES);
}

static const uint64_t offered_protocol_features =
	(1ull << CAS_VU_PROTOCOL_F_MQ) | (1ull << CAS_VU_PROTOCOL_F_REPLY_ACK) |
	(1ull << CAS_VU_PROTOCOL_F_RESET_DEVICE);

static const char *request_name(uint32_t r)
{
	static const char *const names[] = {
		[CAS_VU_GET_FEATURES] = "GET_FEATURES",
		[CAS_VU_SET_FEATURES] = "SET_FEATURES",
		[CAS_VU_SET_OWNER] = "SET_OWNER",
		[CAS_VU_RESET_OWNER] = "RESET_OWNER",
		[CAS_VU_SET_MEM_TABLE] = "SET_MEM_TABLE",
		[CAS_VU_SET_LOG_BASE] = "SET_LOG_BASE",
		[CAS_VU_SET_LOG_FD] = "SET_LOG_FD",
		[CAS_VU_SET_VRING_NUM] = "SET_VRING_NUM",
		[CAS_VU_SET_VRING_ADDR] = "SET_VRING_ADDR",
		[CAS_VU_SET_VRING_BASE] = "SET_VRING_BASE",
		[CAS_VU_GET_VRING_BASE] = "GET_VRING_BASE",
		[CAS_VU_SET_VRING_KICK] = "SET_VRING_KICK",
		[CAS_VU_SET_VRING_CALL] = "SET_VRING_CALL",
		[CAS_VU_SET_VRING_ERR] = "SET_VRING_ERR",
		[CAS_VU_GET_PROTOCOL_FEATURES] = "GET_PROTOCOL_FEATURES",
		[CAS_VU_SET_PROTOCOL_FEATURES] = "SET_PROTOCOL_FEATURES",
		[CAS_VU_GET_QUEUE_NUM] = "GET_QUEUE_NUM",
		[CAS_VU_SET_VRING_ENABLE] = "SET_VRING_ENABLE",
		[CAS_VU_RESET_DEVICE] = "RESET_DEVICE",
	};
	if (r < CAS_ARRAY_SIZE(names) && names[r])
		return names[r];
	return "unknown request";
}

/* ---- queue threads ---- */

static void vring_notify(struct cas_vu_vring *vr)
{
	uint64_t one = 1;

	pthread_mutex_lock(&vr->call_lock);
	if (vr->call_fd >= 0) {
		/* An eventfd write fails only when the counter would
		 * overflow, and then the guest has an interrupt pending. */
		ssize_t w = write(vr->call_fd, &one, sizeof(one));
		(void)w;
	}
	pthread_mutex_unlock(&vr->call_lock);
}

/* Pops and serves chains until the ring is empty (or we are told to
 * stop). The memory lock is held per chain, so that a new memory table
 * never waits for more than one request. */
static void vring_drain(struct cas_vu_vring *vr, void *ctx, struct iovec *iov,
			int iov_max)
{
	struct cas_vu_dev *dev = vr->dev;
	struct cas_vq_elem elem = {.iov = iov, .iov_max = iov_max};

	while (!vr->broken &&
	       !__atomic_load_n(&vr->stopping, __ATOMIC_ACQUIRE)) {
		pthread_rwlock_rdlock(&dev->mem_lock);
		if (vr->mapped_gen != dev->mem_gen || vr->mapped_gen == 0) {
			int r = dev->mem ? cas_vq_map(&vr->vq, dev->mem)
					 : -EFAULT;
			if (r < 0) {
				pthread_rwlock_unlock(&dev->mem_lock);
				cas_log_warning_errno(r,
						      "vhost-user: ring %u is "
						      "not in guest memory: %m",
						      vr->index);
				vr->mapped_gen = 0;
				return;
			}
			vr->mapped_gen = dev->mem_gen;
			if (vr->need_sync) {
				cas_vq_sync_used(&vr->vq);
				vr->need_sync = false;
			}
		}

		int r = cas_vq_pop(&vr->vq, dev->mem, &elem);
		if (r == 0) {
			bool more = cas_vq_prepare_sleep(&vr->vq);
			pthread_rwlock_unlock(&dev->mem_lock);
			if (!more)
				return;
			continue;
		}
		if (r == -EPROTO) {
			pthread_rwlock_unlock(&dev->mem_lock);
			cas_log_error(
				"vhost-user: ring %u: available index beyond "
				"the ring; ring stopped until reset",
				vr->index);
			vr->broken = true;
			return;
		}
		uint32_t len = 0;
		if (r > 0)
			len = dev->cfg.ops->process(dev->cfg.opaque, ctx,
						    vr->index, &elem);
		else
			cas_log_debug(
				"vhost-user: ring %u: malformed chain at %u",
				vr->index, elem.head);
		cas_vq_push(&vr->vq, elem.head, len);
		bool notify = cas_vq_should_notify(&vr->vq);
		pthread_rwlock_unlock(&dev->mem_lock);
		if (notify)
			vring_notify(vr);
	}
}

/* The queue's scratch space and the backend's context. Out of memory is
 * not the guest's fault and may pass: the ring thread tries again at each
 * kick rather than leave the guest waiting for a reply that never comes. */
static bool vring_setup(struct cas_vu_vring *vr, struct iovec **iov,
			int iov_max, void **ctx, bool *logged)
{
	struct cas_vu_dev *dev = vr->dev;

	if (!*iov)
		*iov = calloc((size_t)iov_max, sizeof(**iov));
	if (*iov &&
	    (!dev->cfg.ops->queue_start ||
	     dev->cfg.ops->queue_start(dev->cfg.opaque, vr->index, ctx) >= 0))
		return true;
	*ctx = NULL;
	if (!*logged)
		cas_log_error("vhost-user: ring %u cannot start: out of "
			      "memory; trying again at each kick",
			      vr->index);
	*logged = true;
	return false;
}

static void *vring_thread(void *arg)
{
	struct cas_vu_vring *vr = arg;
	struct cas_vu_dev *dev = vr->dev;
	sigset_t all;
	void *ctx = NULL;
	bool logged = false;

	/* Signals are the main thread's business. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);

	int iov_max = 2 * (int)vr->vq.num + 16;
	_cleanup_free_ struct iovec *iov = NULL;
	bool ok = vring_setup(vr, &iov, iov_max, &ctx, &logged);

	/* Entries may be waiting since before we started. */
	if (ok)
		vring_drain(vr, ctx, iov, iov_max);
	for (;;) {
		struct pollfd p[2] = {
			{.fd = vr->stop_fd, .events = POLLIN},
			{.fd = vr->kick_fd, .events = POLLIN},
		};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			cas_log_errno(cas_negerrno(),
				      "vhost-user: ring %u: poll: %m",
				      vr->index);
			break;
		}
		if (p[0].revents ||
		    __atomic_load_n(&vr->stopping, __ATOMIC_ACQUIRE))
			break;
		if (p[1].revents & (POLLERR | POLLNVAL)) {
			cas_log_error("vhost-user: ring %u: kick fd failed",
				      vr->index);
			break;
		}
		if (p[1].revents & POLLIN) {
			uint64_t v;
			ssize_t n = read(vr->kick_fd, &v, sizeof(v));
			(void)n;
		}
		if (!ok)
			ok = vring_setup(vr, &iov, iov_max, &ctx, &logged);
		if (ok)
			vring_drain(vr, ctx, iov, iov_max);
	}
	if (ctx && dev->cfg.ops->queue_stop)
		dev->cfg.ops->queue_stop(dev->cfg.opaque, vr->index, ctx);
	return NULL;
}

/* A ring starts when it has a kick fd. Whether it is enabled does not
 * matter to us: a disabled ring must still be processed (vhost-user.rst,
 * "Ring states"), and a read-only filesystem has no side effect to hold
 * back. */
static int vring_start(struct cas_vu_dev *dev, struct cas_vu_vring *vr)
{
	if (vr->started || vr->kick_fd < 0)
		return 0;
	vr->vq.event_idx =
		dev->features & (1ull << CAS_VIRTIO_RING_F_EVENT_IDX);
	vr->vq.indirect =
		dev->features & (1ull << CAS_VIRTIO_RING_F_INDIRECT_DESC);
	vr->vq.desc = NULL;
	vr->vq.avail = NULL;
	vr->vq.used = NULL;
	vr->need_sync = true;
	vr->broken = false;
	vr->mapped_gen = 0;
	vr->stopping = false;
	vr->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (vr->stop_fd < 0)
		return cas_log_errno(cas_negerrno(), "vhost-user: eventfd: %m");
	int r = -pthread_create(&vr->thread, NULL, vring_thread, vr);
	if (r < 0) {
		close(vr->stop_fd);
		vr->stop_fd = -1;
		return cas_log_errno(r, "vhost-user: ring %u: thread: %m",
				     vr->index);
	}
	vr->started = true;
	return 0;
}

static void vring_stop(struct cas_vu_vring *vr)
{
	uint64_t one = 1;

	if (!vr->started)
		return;
	__atomic_store_n(&vr->stopping, true, __ATOMIC_RELEASE);
	ssize_t w = write(vr->stop_fd, &one, sizeof(one));
	(void)w;
	pthread_join(vr->thread, NULL);
	close(vr->stop_fd);
	vr->stop_fd = -1;
	vr->started = false;
}

static void fd_replace(int *slot, int fd)
{
	if (*slot >= 0)
		close(*slot);
	*slot = fd;
}

static void vring_set_call(struct cas_vu_vring *vr, int fd)
{
	pthread_mutex_lock(&vr->call_lock);
	fd_replace(&vr->call_fd, fd);
	pthread_mutex_unlock(&vr->call_lock);
}

/* Stops the ring and forgets everything about it. */
static void vring_reset(struct cas_vu_vring *vr)
{
	vring_stop(vr);
	fd_replace(&vr->kick_fd, -1);
	fd_replace(&vr->err_fd, -1);
	vring_set_call(vr, -1);
	memset(&vr->vq, 0, sizeof(vr->vq));
	vr->enabled = false;
	vr->broken = false;
}

/* ---- device ---- */

int cas_vu_dev_new(const struct cas_vu_config *cfg, struct cas_vu_dev **ret)
{
	if (!cfg->ops || !cfg->ops->process || cfg->queues == 0 ||
	    cfg->queues > CAS_VU_MAX_QUEUES)
		return -EINVAL;

	struct cas_vu_dev *dev = calloc(1, sizeof(*dev));
	if (!dev)
		return -ENOMEM;
	dev->cfg = *cfg;
	dev->vrings = calloc(cfg->queues, sizeof(*dev->vrings));
	if (!dev->vrings) {
		free(dev);
		return -ENOMEM;
	}
	/* A new memory table must not wait behind a queue that keeps
	 * taking the read lock. */
	pthread_rwlockattr_t attr;
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(
		&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&dev->mem_lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	for (unsigned i = 0; i < cfg->queues; i++) {
		struct cas_vu_vring *vr = &dev->vrings[i];
		vr->dev = dev;
		vr->index = i;
		vr->kick_fd = vr->err_fd = vr->call_fd = vr->stop_fd = -1;
		pthread_mutex_init(&vr->call_lock, NULL);
	}
	*ret = dev;
	return 0;
}

static void mem_swap(struct cas_vu_dev *dev, struct cas_vu_mem *mem)
{
	pthread_rwlock_wrlock(&dev->mem_lock);
	struct cas_vu_mem *old = dev->mem;
	dev->mem = mem;
	dev->mem_gen++;
	pthread_rwlock_unlock(&dev->mem_lock);
	/* No queue thread holds the old table past the write lock. */
	if (old) {
		cas_vu_mem_release(old);
		free(old);
	}
}

void cas_vu_dev_reset(struct cas_vu_dev *dev)
{
	for (unsigned i = 0; i < dev->cfg.queues; i++)
		vring_reset(&dev->vrings[i]);
	mem_swap(dev, NULL);
	dev->features = 0;
	dev->protocol_features = 0;
	dev->owner = false;
}

void cas_vu_dev_free(struct cas_vu_dev *dev)
{
	if (!dev)
		return;
	cas_vu_dev_reset(dev);
	for (unsigned i = 0; i < dev->cfg.queues; i++)
		pthread_mutex_destroy(&dev->vrings[i].call_lock);
	pthread_rwlock_destroy(&dev->mem_lock);
	free(dev->vrings);
	free(dev);
}

const struct cas_vq *cas_vu_dev_vq(const struct cas_vu_dev *dev, unsigned qidx)
{
	return qidx < dev->cfg.queues ? &dev->vrings[qidx].vq : NULL;
}

uint64_t cas_vu_dev_features(const struct cas_vu_dev *dev)
{
	return dev->features;
}

bool cas_vu_dev_started(const struct cas_vu_dev *dev, unsigned qidx)
{
	return qidx < dev->cfg.queues && dev->vrings[qidx].started;
}

/* ---- messages ---- */

static int get_u64(const struct cas_vu_hdr *h, const void *p, uint64_t *ret)
{
	if (h->size != sizeof(uint64_t))
		return -EINVAL;
	memcpy(ret, p, sizeof(*ret));
	return 0;
}

static int get_vring(struct cas_vu_dev *dev, const struct cas_vu_hdr *h,
		     const void *p, struct vu_state *st,
		     struct cas_vu_vring **ret)
{
	if (h->size != sizeof(*st))
		return -EINVAL;
	memcpy(st, p, sizeof(*st));
	if (st->index >= dev->cfg.queues)
		return -ERANGE;
	*ret = &dev->vrings[st->index];
	return 0;
}

static int handle_mem_table(struct cas_vu_dev *dev, const struct cas_vu_hdr *h,
			    const uint8_t *p, int *fds, size_t nfds)
{
	uint32_t n;

	if (h->size < 8)
		return -EINVAL;
	memcpy(&n, p, sizeof(n));
	if (n > CAS_VU_MAX_REGIONS ||
	    h->size != 8 + n * sizeof(struct vu_region) || nfds != n)
		return -EINVAL;

	_cleanup_free_ struct cas_vu_mem *mem = calloc(1, sizeof(*mem));
	if (!mem)
		return -ENOMEM;
	mem->nregions = n;
	for (uint32_t i = 0; i < n; i++) {
		struct vu_region reg;
		memcpy(&reg, p + 8 + i * sizeof(reg), sizeof(reg));
		mem->regions[i] = (struct cas_vu_region){
			.gpa = reg.gpa,
			.size = reg.size,
			.uva = reg.uva,
			.mmap_offset = reg.mmap_offset,
		};
	}
	int r = cas_vu_mem_check(mem);
	if (r < 0)
		return cas_log_errno(r,
				     "vhost-user: SET_MEM_TABLE: bad regions");
	for (uint32_t i = 0; i < n; i++) {
		r = cas_vu_mem_map_region(mem, i, fds[i]);
		if (r < 0) {
			cas_vu_mem_release(mem);
			return cas_log_errno(
				r, "vhost-user: SET_MEM_TABLE: region %u: %m",
				i);
		}
	}
	/* The fds are not kept: the mappings hold the memory. */
	mem_swap(dev, TAKE_PTR(mem));
	return 0;
}

/* SET_VRING_KICK/CALL/ERR: the u64 names the ring and whether an fd came. */
static int handle_vring_fd(struct cas_vu_dev *dev, const struct cas_vu_hdr *h,
			   const void *p, int *fds, size_t nfds)
{
	uint64_t v;
	int r = get_u64(h, p, &v);
	if (r < 0)
		return r;
	bool nofd = v & CAS_VU_VRING_NOFD_MASK;
	unsigned idx = v & CAS_VU_VRING_IDX_MASK;
	if (idx >= dev->cfg.queues ||
	    (v & ~(uint64_t)(CAS_VU_VRING_IDX_MASK | CAS_VU_VRING_NOFD_MASK)))
		return -ERANGE;
	if (nfds != (nofd ? 0 : 1))
		return -EINVAL;
	struct cas_vu_vring *vr = &dev->vrings[idx];
	int fd = nofd ? -1 : TAKE_FD(fds[0]);

	switch (h->request) {
	case CAS_VU_SET_VRING_KICK:
		vring_stop(vr);
		fd_replace(&vr->kick_fd, fd);
		if (fd < 0) {
			cas_log_warning("vhost-user: ring %u: polling (no kick "
					"fd) is not supported",
					idx);
			return -EOPNOTSUPP;
		}
		return vring_start(dev, vr);
	case CAS_VU_SET_VRING_CALL:
		vring_set_call(vr, fd);
		return 0;
	default:
		fd_replace(&vr->err_fd, fd);
		return 0;
	}
}

/* Runs `apply` with the ring stopped, then restarts it if it ran. */
#define WITH_RING_STOPPED(dev, vr, apply)            \
	({                                           \
		bool _was = (vr)->started;           \
		vring_stop(vr);                      \
		apply;                               \
		_was ? vring_start((dev), (vr)) : 0; \
	})

static int handle_request(struct cas_vu_dev *dev, const struct cas_vu_hdr *h,
			  const uint8_t *p, int *fds, size_t nfds,
			  uint8_t *reply, int *reply_size)
{
	struct cas_vu_vring *vr;
	struct vu_state st;
	uint64_t v;
	int r;

	switch (h->request) {
	case CAS_VU_GET_FEATURES:
	case CAS_VU_GET_PROTOCOL_FEATURES:
	case CAS_VU_GET_QUEUE_NUM:
		if (h->size != 0)
			return -EINVAL;
		if (h->request == CAS_VU_GET_FEATURES)
			v = offered_features(dev);
		else if (h->request == CAS_VU_GET_PROTOCOL_FEATURES)
			v = offered_protocol_features;
		else
			v = dev->cfg.queues;
		memcpy(reply, &v, sizeof(v));
		*reply_size = sizeof(v);
		return 0;

	case CAS_VU_SET_FEATURES:
		r = get_u64(h, p, &v);
		if (r < 0)
			return r;
		if (v & ~offered_features(dev))
			return -EINVAL;
		dev->features = v;
		return 0;

	case CAS_VU_SET_PROTOCOL_FEATURES:
		r = get_u64(h, p, &v);
		if (r < 0)
			return r;
		if (v & ~offered_protocol_features)
			return -EINVAL;
		dev->protocol_features = v;
		return 0;

	case CAS_VU_SET_OWNER:
		if (h->size != 0)
			return -EINVAL;
		dev->owner = true;
		return 0;

	case CAS_VU_RESET_OWNER:
	case CAS_VU_RESET_DEVICE:
		if (h->size != 0)
			return -EINVAL;
		/* Deprecated RESET_OWNER: disable every ring (the advice of
		 * vhost-user.rst); RESET_DEVICE: back to the initial state,
		 * memory table and protocol features kept. */
		for (unsigned i = 0; i < dev->cfg.queues; i++)
			vring_reset(&dev->vrings[i]);
		if (h->request == CAS_VU_RESET_DEVICE)
			dev->features = 0;
		return 0;

	case CAS_VU_SET_MEM_TABLE:
		return handle_mem_table(dev, h, p, fds, nfds);

	case CAS_VU_SET_VRING_NUM:
		r = get_vring(dev, h, p, &st, &vr);
		if (r < 0)
			return r;
		/* Split rings have power-of-two sizes (2.7). */
		if (st.num == 0 || st.num > CAS_VQ_MAX_SIZE ||
		    (st.num & (st.num - 1)))
			return -EINVAL;
		return WITH_RING_STOPPED(dev, vr,
					 vr->vq.num = (uint16_t)st.num);

	case CAS_VU_SET_VRING_ADDR: {
		struct vu_addr a;
		if (h->size != sizeof(a))
			return -EINVAL;
		memcpy(&a, p, sizeof(a));
		if (a.index >= dev->cfg.queues)
			return -ERANGE;
		vr = &dev->vrings[a.index];
		/* The log address is unused: we offer no dirty logging. */
		return WITH_RING_STOPPED(dev, vr, ({
						 vr->vq.desc_uva = a.desc_uva;
						 vr->vq.used_uva = a.used_uva;
						 vr->vq.avail_uva = a.avail_uva;
					 }));
	}

	case CAS_VU_SET_VRING_BASE:
		r = get_vring(dev, h, p, &st, &vr);
		if (r < 0)
			return r;
		if (st.num > UINT16_MAX)
			return -EINVAL;
		return WITH_RING_STOPPED(
			dev, vr, vr->vq.last_avail_idx = (uint16_t)st.num);

	case CAS_VU_GET_VRING_BASE:
		r = get_vring(dev, h, p, &st, &vr);
		if (r < 0)
			return r;
		/* Stops the ring: every chain taken so far has been used. */
		vring_stop(vr);
		fd_replace(&vr->kick_fd, -1);
		vring_set_call(vr, -1);
		st.num = vr->vq.last_avail_idx;
		memcpy(reply, &st, sizeof(st));
		*reply_size = sizeof(st);
		return 0;

	case CAS_VU_SET_VRING_KICK:
	case CAS_VU_SET_VRING_CALL:
	case CAS_VU_SET_VRING_ERR:
		return handle_vring_fd(dev, h, p, fds, nfds);

	case CAS_VU_SET_VRING_ENABLE:
		r = get_vring(dev, h, p, &st, &vr);
		if (r < 0)
			return r;
		if (st.num > 1)
			return -EINVAL;
		__atomic_store_n(&vr->enabled, st.num == 1, __ATOMIC_RELAXED);
		return 0;

	case CAS_VU_SET_LOG_BASE:
	case CAS_VU_SET_LOG_FD:
		/* No dirty logging (VHOST_F_LOG_ALL is not offered). */
		return -EOPNOTSUPP;

	default:
		return -EOPNOTSUPP;
	}
}

/* Requests whose reply carries a payload of their own (vhost-user.rst,
 * "Communication"); REPLY_ACK adds nothing to them. */
static bool has_reply(uint32_t request)
{
	return request == CAS_VU_GET_FEATURES ||
	       request == CAS_VU_GET_PROTOCOL_FEATURES ||
	       request == CAS_VU_GET_VRING_BASE ||
	       request == CAS_VU_GET_QUEUE_NUM;
}

static void close_fds(int *fds, size_t nfds)
{
	for (size_t i = 0; i < nfds; i++)
		fd_replace(&fds[i], -1);
}

int cas_vu_dev_handle(struct cas_vu_dev *dev, const struct cas_vu_hdr *hdr,
		      const void *payload, int *fds, size_t nfds,
		      struct cas_vu_hdr *reply_hdr, void *reply,
		      int *ret_reply_size)
{
	struct cas_vu_hdr h = *hdr;
	int reply_size = -1;
	int r;

	*ret_reply_size = -1;
	if ((h.flags & CAS_VU_FLAG_VERSION_MASK) != CAS_VU_VERSION ||
	    h.size > CAS_VU_MAX_PAYLOAD) {
		close_fds(fds, nfds);
		return cas_log_errno(
			-EPROTO,
			"vhost-user: bad message header (flags %#x, size %u)",
			h.flags, h.size);
	}

	r = handle_request(dev, &h, payload, fds, nfds, reply, &reply_size);
	close_fds(fds, nfds);

	if (has_reply(h.request)) {
		if (r < 0)
			/* The frontend waits for an answer we cannot give. */
			return cas_log_errno(r, "vhost-user: %s: %m",
					     request_name(h.request));
	} else {
		if (r < 0)
			cas_log_warning_errno(r, "vhost-user: %s (%u): %m",
					      request_name(h.request),
					      h.request);
		if (h.flags & CAS_VU_FLAG_NEED_REPLY) {
			uint64_t status = r < 0 ? 1 : 0;
			memcpy(reply, &status, sizeof(status));
			reply_size = sizeof(status);
		}
	}
	if (reply_size >= 0) {
		reply_hdr->request = h.request;
		reply_hdr->flags = CAS_VU_VERSION | CAS_VU_FLAG_REPLY;
		reply_hdr->size = (uint32_t)reply_size;
	}
	*ret_reply_size = reply_size;
	return 0;
}

/* ---- socket ---- */

static int recv_all(int sock, void *buf, size_t len)
{
	uint8_t *b = buf;

	while (len > 0) {
		ssize_t n = recv(sock, b, len, MSG_WAITALL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (n == 0)
			return -ECONNRESET;
		b += n;
		len -= (size_t)n;
	}
	return 0;
}

static int send_reply(int sock, const struct cas_vu_hdr *h, const void *payload)
{
	struct iovec iov[2] = {
		{.iov_base = (void *)h, .iov_len = sizeof(*h)},
		{.iov_base = (void *)payload, .iov_len = h->size},
	};
	struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
	size_t left = sizeof(*h) + h->size;

	while (left > 0) {
		ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		left -= (size_t)n;
		/* Short send: move the iovecs past what went out. */
		while (n > 0 && msg.msg_iovlen > 0) {
			size_t k = CAS_MIN((size_t)n, msg.msg_iov[0].iov_len);
			msg.msg_iov[0].iov_base =
				(uint8_t *)msg.msg_iov[0].iov_base + k;
			msg.msg_iov[0].iov_len -= k;
			n -= (ssize_t)k;
			if (msg.msg_iov[0].iov_len == 0) {
				msg.msg_iov++;
				msg.msg_iovlen--;
			}
		}
	}
	return 0;
}

int cas_vu_dev_dispatch(struct cas_vu_dev *dev, int sock)
{
	struct cas_vu_hdr h;
	union {
		char buf[CMSG_SPACE(CAS_VU_MAX_FDS * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = {.iov_base = &h, .iov_len = sizeof(h)};
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	int fds[CAS_VU_MAX_FDS];
	size_t nfds = 0;
	ssize_t n;
	int r;

	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return cas_negerrno();
	if (n == 0)
		return -ECONNRESET;

	/* Take every fd that came, whatever else is wrong, so that each one
	 * is closed. */
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c;
	     c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int),
			       sizeof(int));
			if (nfds < CAS_VU_MAX_FDS)
				fds[nfds++] = fd;
			else
				close(fd);
		}
	}
	r = 0;
	if (msg.msg_flags & MSG_CTRUNC)
		r = cas_log_errno(-EPROTO,
				  "vhost-user: too many fds in one message");
	if (r == 0 && (size_t)n < sizeof(h))
		r = recv_all(sock, (uint8_t *)&h + n, sizeof(h) - (size_t)n);
	if (r == 0 && h.size > CAS_VU_MAX_PAYLOAD)
		r = cas_log_errno(-EPROTO, "vhost-user: message of %u bytes",
				  h.size);

	_Alignas(8) uint8_t payload[CAS_VU_MAX_PAYLOAD];
	if (r == 0 && h.size > 0)
		r = recv_all(sock, payload, h.size);
	if (r < 0) {
		close_fds(fds, nfds);
		return r;
	}

	struct cas_vu_hdr rh;
	_Alignas(8) uint8_t reply[CAS_VU_MAX_PAYLOAD];
	int reply_size;
	cas_log_debug("vhost-user: %s (%u), %u bytes, %zu fds",
		      request_name(h.request), h.request, h.size, nfds);
	r = cas_vu_dev_handle(dev, &h, payload, fds, nfds, &rh, reply,
			      &reply_size);
	if (r < 0)
		return r;
	if (reply_size >= 0)
		return send_reply(sock, &rh, reply);
	return 0;
}
