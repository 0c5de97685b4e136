/* Unit tests of transport/virtqueue and transport/vhost_user.
 *
 * Guest memory is a memfd mapped through the memory table code itself;
 * the test plays the driver: it writes descriptor tables and rings into
 * that memory and checks what the device side extracts or refuses. The
 * vhost-user part feeds messages (good, and with bad sizes, bad fds, bad
 * indexes) to the message handler, then runs a ring for real: a queue
 * thread woken by a kick eventfd, answering through the call eventfd. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../core/check.h"
#include "core/util.h"
#include "transport/vhost_user.h"
#include "transport/virtqueue.h"

#define REGION_SIZE (1u << 20)
#define GPA0	    0x100000ull		 /* region 0 */
#define GPA1	    (GPA0 + REGION_SIZE) /* region 1: contiguous after region 0 */
#define GPA2	    0x800000ull		 /* region 2: after a hole */
#define UVA0	    0x7f0000000000ull
#define UVA1	    0x7f1000000000ull
#define UVA2	    0x7f2000000000ull
#define NUM	    8

/* Layout in region 0: descriptors, avail, used, indirect tables, data. */
#define DESC_OFF  0x0
#define AVAIL_OFF 0x1000
#define USED_OFF  0x2000
#define TABLE_OFF 0x3000
#define DATA_OFF  0x10000

static int new_memfd(size_t size)
{
	int fd = memfd_create("guest", MFD_CLOEXEC);
	REQUIRE(fd >= 0);
	REQUIRE(ftruncate(fd, (off_t)size) == 0);
	return fd;
}

struct guest {
	struct cas_vu_mem mem;
	uint8_t *r0; /* host view of region 0 */
	struct cas_vq vq;
	struct iovec iov[64];
	struct cas_vq_elem elem;
	uint16_t avail_idx;
};

static void guest_init(struct guest *g, bool event_idx, bool indirect)
{
	memset(g, 0, sizeof(*g));
	g->mem.nregions = 3;
	g->mem.regions[0] = (struct cas_vu_region){
		.gpa = GPA0, .size = REGION_SIZE, .uva = UVA0};
	g->mem.regions[1] = (struct cas_vu_region){.gpa = GPA1,
						   .size = REGION_SIZE,
						   .uva = UVA1,
						   .mmap_offset = 4096};
	g->mem.regions[2] = (struct cas_vu_region){
		.gpa = GPA2, .size = REGION_SIZE, .uva = UVA2};
	REQUIRE(cas_vu_mem_check(&g->mem) == 0);
	for (unsigned i = 0; i < 3; i++) {
		_cleanup_close_ int fd = new_memfd(REGION_SIZE + 4096);
		REQUIRE(cas_vu_mem_map_region(&g->mem, i, fd) == 0);
	}
	g->r0 = g->mem.regions[0].host;
	g->vq.num = NUM;
	g->vq.desc_uva = UVA0 + DESC_OFF;
	g->vq.avail_uva = UVA0 + AVAIL_OFF;
	g->vq.used_uva = UVA0 + USED_OFF;
	g->vq.event_idx = event_idx;
	g->vq.indirect = indirect;
	REQUIRE(cas_vq_map(&g->vq, &g->mem) == 0);
	g->elem.iov = g->iov;
	g->elem.iov_max = 64;
}

static void guest_fini(struct guest *g)
{
	cas_vu_mem_release(&g->mem);
}

static struct cas_vring_desc *desc_at(struct guest *g, size_t off)
{
	return (struct cas_vring_desc *)(g->r0 + off);
}

static void set_desc(struct cas_vring_desc *d, uint64_t gpa, uint32_t len,
		     uint16_t flags, uint16_t next)
{
	d->addr = gpa;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/* Makes chain `head` available. */
static void post(struct guest *g, uint16_t head)
{
	struct cas_vring_avail *a = (void *)(g->r0 + AVAIL_OFF);
	a->ring[g->avail_idx % NUM] = head;
	g->avail_idx++;
	__atomic_store_n(&a->idx, g->avail_idx, __ATOMIC_RELEASE);
}

static void test_direct_chain(void)
{
	struct guest g;
	guest_init(&g, false, false);

	set_desc(desc_at(&g, DESC_OFF) + 3, GPA0 + DATA_OFF, 40,
		 CAS_VRING_DESC_F_NEXT, 5);
	set_desc(desc_at(&g, DESC_OFF) + 5, GPA0 + DATA_OFF + 100, 60,
		 CAS_VRING_DESC_F_NEXT, 1);
	set_desc(desc_at(&g, DESC_OFF) + 1, GPA0 + DATA_OFF + 4096, 4096,
		 CAS_VRING_DESC_F_WRITE, 0);
	memcpy(g.r0 + DATA_OFF, "request", 7);
	post(&g, 3);

	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	CHECK(g.elem.head == 3);
	CHECK(g.elem.read_cnt == 2 && g.elem.write_cnt == 1);
	CHECK(g.elem.read_len == 100 && g.elem.write_len == 4096);
	CHECK(g.iov[0].iov_base == g.r0 + DATA_OFF && g.iov[0].iov_len == 40);
	CHECK(g.iov[1].iov_base == g.r0 + DATA_OFF + 100);
	CHECK(g.iov[2].iov_base == g.r0 + DATA_OFF + 4096);
	CHECK(memcmp(g.iov[0].iov_base, "request", 7) == 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 0);

	/* Used ring: element and index. */
	cas_vq_push(&g.vq, 3, 77);
	struct cas_vring_used *u = (void *)(g.r0 + USED_OFF);
	CHECK(u->idx == 1 && u->ring[0].id == 3 && u->ring[0].len == 77);
	/* Without EVENT_IDX the guest's NO_INTERRUPT decides. */
	CHECK(cas_vq_should_notify(&g.vq));
	((struct cas_vring_avail *)(g.r0 + AVAIL_OFF))->flags =
		CAS_VRING_AVAIL_F_NO_INTERRUPT;
	CHECK(!cas_vq_should_notify(&g.vq));
	guest_fini(&g);
}

static void test_indirect(void)
{
	struct guest g;
	guest_init(&g, false, true);

	struct cas_vring_desc *t = desc_at(&g, TABLE_OFF);
	set_desc(&t[0], GPA0 + DATA_OFF, 48, CAS_VRING_DESC_F_NEXT, 2);
	set_desc(&t[2], GPA0 + DATA_OFF + 512, 16,
		 CAS_VRING_DESC_F_WRITE | CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&t[1], GPA0 + DATA_OFF + 1024, 4000, CAS_VRING_DESC_F_WRITE,
		 0);
	set_desc(desc_at(&g, DESC_OFF), GPA0 + TABLE_OFF, 3 * 16,
		 CAS_VRING_DESC_F_INDIRECT, 0);
	post(&g, 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	CHECK(g.elem.read_cnt == 1 && g.elem.write_cnt == 2);
	CHECK(g.elem.read_len == 48 && g.elem.write_len == 4016);

	/* Zero-length descriptors add no iovec. */
	set_desc(&t[0], GPA0 + DATA_OFF, 0, CAS_VRING_DESC_F_NEXT, 2);
	post(&g, 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	CHECK(g.elem.read_cnt == 0 && g.elem.write_cnt == 2);
	guest_fini(&g);
}

/* Posts head `h` and expects the chain to be refused with its head
 * reported and the ring moved past it. */
static void expect_bad(struct guest *g, uint16_t h, int line)
{
	uint16_t before = g->vq.last_avail_idx;
	post(g, h);
	int r = cas_vq_pop(&g->vq, &g->mem, &g->elem);
	if (r != -EBADMSG || g->elem.head != h ||
	    g->vq.last_avail_idx != (uint16_t)(before + 1)) {
		fprintf(stderr, "line %d: pop gave %d head %u\n", line, r,
			g->elem.head);
		check_failures++;
	}
	check_count++;
}

static void test_malformed(void)
{
	struct guest g;
	struct cas_vring_desc *d, *t;

	guest_init(&g, false, true);
	d = desc_at(&g, DESC_OFF);
	t = desc_at(&g, TABLE_OFF);

	/* Address outside every region, and a length running off the end. */
	set_desc(&d[0], 0x10, 16, 0, 0);
	expect_bad(&g, 0, __LINE__);
	set_desc(&d[0], GPA2 + REGION_SIZE - 8, 16, 0, 0);
	expect_bad(&g, 0, __LINE__);
	set_desc(&d[0], UINT64_MAX - 4, 16, 0, 0);
	expect_bad(&g, 0, __LINE__);
	/* A loop, and a chain longer than the queue. */
	set_desc(&d[0], GPA0 + DATA_OFF, 16, CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&d[1], GPA0 + DATA_OFF, 16, CAS_VRING_DESC_F_NEXT, 0);
	expect_bad(&g, 0, __LINE__);
	for (int i = 0; i < 16; i++)
		set_desc(&t[i], GPA0 + DATA_OFF, 16, CAS_VRING_DESC_F_NEXT,
			 (uint16_t)(i + 1));
	t[15].flags = 0;
	set_desc(&d[0], GPA0 + TABLE_OFF, 16 * 16, CAS_VRING_DESC_F_INDIRECT,
		 0);
	expect_bad(&g, 0, __LINE__);
	/* next beyond the table. */
	set_desc(&d[0], GPA0 + DATA_OFF, 16, CAS_VRING_DESC_F_NEXT, NUM);
	expect_bad(&g, 0, __LINE__);
	/* Head beyond the table. */
	expect_bad(&g, NUM, __LINE__);
	/* Readable after writable. */
	set_desc(&d[0], GPA0 + DATA_OFF, 16,
		 CAS_VRING_DESC_F_WRITE | CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&d[1], GPA0 + DATA_OFF, 16, 0, 0);
	expect_bad(&g, 0, __LINE__);
	/* Indirect inside indirect. */
	set_desc(&t[0], GPA0 + TABLE_OFF + 256, 32, CAS_VRING_DESC_F_INDIRECT,
		 0);
	set_desc(&d[0], GPA0 + TABLE_OFF, 16, CAS_VRING_DESC_F_INDIRECT, 0);
	expect_bad(&g, 0, __LINE__);
	/* Indirect table lengths: not a multiple of 16, zero. */
	set_desc(&t[0], GPA0 + DATA_OFF, 16, 0, 0);
	set_desc(&d[0], GPA0 + TABLE_OFF, 24, CAS_VRING_DESC_F_INDIRECT, 0);
	expect_bad(&g, 0, __LINE__);
	set_desc(&d[0], GPA0 + TABLE_OFF, 0, CAS_VRING_DESC_F_INDIRECT, 0);
	expect_bad(&g, 0, __LINE__);
	/* Indirect together with NEXT; indirect table outside memory. */
	set_desc(&d[0], GPA0 + TABLE_OFF, 16,
		 CAS_VRING_DESC_F_INDIRECT | CAS_VRING_DESC_F_NEXT, 1);
	expect_bad(&g, 0, __LINE__);
	set_desc(&d[0], 0x1000, 16, CAS_VRING_DESC_F_INDIRECT, 0);
	expect_bad(&g, 0, __LINE__);
	/* The good indirect chain still works afterwards. */
	set_desc(&d[0], GPA0 + TABLE_OFF, 16, CAS_VRING_DESC_F_INDIRECT, 0);
	post(&g, 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	guest_fini(&g);

	/* Indirect descriptors when the feature was not negotiated. */
	guest_init(&g, false, false);
	t = desc_at(&g, TABLE_OFF);
	set_desc(&t[0], GPA0 + DATA_OFF, 16, 0, 0);
	set_desc(desc_at(&g, DESC_OFF), GPA0 + TABLE_OFF, 16,
		 CAS_VRING_DESC_F_INDIRECT, 0);
	expect_bad(&g, 0, __LINE__);

	/* An avail index further than the ring holds breaks the ring. */
	struct cas_vring_avail *a = (void *)(g.r0 + AVAIL_OFF);
	a->idx = (uint16_t)(g.vq.last_avail_idx + NUM + 1);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == -EPROTO);
	guest_fini(&g);
}

static void test_regions(void)
{
	struct guest g;
	guest_init(&g, false, false);
	struct cas_vring_desc *d = desc_at(&g, DESC_OFF);

	/* Crossing from region 0 into the contiguous region 1: two iovecs,
	 * the second at region 1's mmap_offset. */
	set_desc(&d[0], GPA1 - 100, 300, 0, 0);
	post(&g, 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	CHECK(g.elem.read_cnt == 2 && g.elem.read_len == 300);
	CHECK(g.iov[0].iov_len == 100 && g.iov[1].iov_len == 200);
	CHECK(g.iov[1].iov_base == g.mem.regions[1].host);
	CHECK(g.mem.regions[1].host == (uint8_t *)g.mem.regions[1].map + 4096);
	/* Crossing from region 1 into the hole after it. */
	set_desc(&d[0], GPA1 + REGION_SIZE - 10, 20, 0, 0);
	expect_bad(&g, 0, __LINE__);

	/* Rings: translated through the user addresses, whole in a region. */
	struct cas_vq vq = g.vq;
	vq.used_uva = UVA0 + REGION_SIZE - 8;
	CHECK(cas_vq_map(&vq, &g.mem) == -EFAULT);
	vq = g.vq;
	vq.desc_uva = UVA0 + 8; /* misaligned */
	CHECK(cas_vq_map(&vq, &g.mem) == -EFAULT);
	vq = g.vq;
	vq.avail_uva = GPA0 + AVAIL_OFF; /* a guest address is not a user one */
	CHECK(cas_vq_map(&vq, &g.mem) == -EFAULT);
	vq.num = 0;
	CHECK(cas_vq_map(&vq, &g.mem) == -EINVAL);

	CHECK(cas_vu_mem_gpa(&g.mem, GPA0, REGION_SIZE) == g.r0);
	CHECK(cas_vu_mem_gpa(&g.mem, GPA0, REGION_SIZE + 1) == NULL);
	CHECK(cas_vu_mem_uva(&g.mem, UVA2 + REGION_SIZE - 1, 1) != NULL);
	CHECK(cas_vu_mem_uva(&g.mem, UVA2 + REGION_SIZE - 1, 2) == NULL);

	/* iovec limit. */
	struct iovec one[1];
	int cnt = 0;
	CHECK(cas_vu_mem_gpa_iov(&g.mem, GPA1 - 1, 2, one, 1, &cnt) == -E2BIG);
	guest_fini(&g);

	/* Table checks: overlap, overflow, zero size. */
	struct cas_vu_mem m = {.nregions = 2};
	m.regions[0] = (struct cas_vu_region){.gpa = 0, .size = 4096, .uva = 0};
	m.regions[1] =
		(struct cas_vu_region){.gpa = 4095, .size = 4096, .uva = 8192};
	CHECK(cas_vu_mem_check(&m) == -EINVAL);
	m.regions[1].gpa = 4096;
	CHECK(cas_vu_mem_check(&m) == 0);
	m.regions[1].uva = 100;
	CHECK(cas_vu_mem_check(&m) == -EINVAL);
	m.regions[1].uva = UINT64_MAX - 10;
	CHECK(cas_vu_mem_check(&m) == -EINVAL);
	m.regions[1].uva = 8192;
	m.regions[1].size = 0;
	CHECK(cas_vu_mem_check(&m) == -EINVAL);
	m.regions[1].size = 4096;
	m.regions[1].mmap_offset = UINT64_MAX - 100;
	CHECK(cas_vu_mem_check(&m) == -EINVAL);

	/* A file smaller than offset + size is refused (SIGBUS otherwise). */
	m.nregions = 1;
	m.regions[0] = (struct cas_vu_region){
		.gpa = 0, .size = 8192, .mmap_offset = 4096};
	_cleanup_close_ int fd = new_memfd(8192);
	CHECK(cas_vu_mem_map_region(&m, 0, fd) == -EINVAL);
	m.regions[0].mmap_offset = 0;
	CHECK(cas_vu_mem_map_region(&m, 0, fd) == 0);
	cas_vu_mem_release(&m);
	CHECK(m.nregions == 0);
}

static void test_event_idx(void)
{
	struct guest g;
	guest_init(&g, true, false);
	struct cas_vring_avail *a = (void *)(g.r0 + AVAIL_OFF);
	struct cas_vring_used *u = (void *)(g.r0 + USED_OFF);
	uint16_t *used_event = &a->ring[NUM];
	uint16_t *avail_event = (uint16_t *)&u->ring[NUM];

	set_desc(desc_at(&g, DESC_OFF), GPA0 + DATA_OFF, 16, 0, 0);
	cas_vq_sync_used(&g.vq);
	/* The first push always interrupts. */
	post(&g, 0);
	CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
	cas_vq_push(&g.vq, 0, 0);
	CHECK(cas_vq_should_notify(&g.vq));
	/* The guest wants an interrupt once used idx passes 3. */
	*used_event = 3;
	for (int i = 2; i <= 5; i++) {
		post(&g, 0);
		CHECK(cas_vq_pop(&g.vq, &g.mem, &g.elem) == 1);
		cas_vq_push(&g.vq, 0, 0);
		bool n = cas_vq_should_notify(&g.vq);
		/* used idx is i now: notify exactly when it moves past 3. */
		CHECK(n == (i == 4));
	}
	/* Going to sleep publishes avail_event = next avail entry. */
	CHECK(!cas_vq_prepare_sleep(&g.vq));
	CHECK(*avail_event == g.vq.last_avail_idx);
	post(&g, 0);
	CHECK(cas_vq_prepare_sleep(&g.vq));
	guest_fini(&g);
}

static void test_iov_copy(void)
{
	char a[3], b[5], out[8];
	struct iovec iov[2] = {{a, sizeof(a)}, {b, sizeof(b)}};
	CHECK(cas_iov_copy_to(iov, 2, 2, "xyzw", 4) == 4);
	CHECK(a[2] == 'x' && memcmp(b, "yzw", 3) == 0);
	CHECK(cas_iov_copy_to(iov, 2, 6, "12345", 5) == 2);
	CHECK(cas_iov_copy_from(iov, 2, 2, out, 8) == 6);
	CHECK(memcmp(out, "xyzw12", 6) == 0);
	CHECK(cas_iov_copy_from(iov, 2, 9, out, 8) == 0);
}

/* ---- vhost-user messages ---- */

static int processed;

static uint32_t test_process(void *opaque, void *ctx, unsigned qidx,
			     struct cas_vq_elem *elem)
{
	__atomic_add_fetch(&processed, 1, __ATOMIC_SEQ_CST);
	return (uint32_t)cas_iov_copy_to(elem->iov + elem->read_cnt,
					 elem->write_cnt, 0, "answer", 6);
}

static const struct cas_vu_ops test_ops = {.process = test_process};

struct msg_result {
	int r;
	int reply_size;
	struct cas_vu_hdr rh;
	uint64_t reply[CAS_VU_MAX_PAYLOAD / 8];
};

static struct msg_result send_msg(struct cas_vu_dev *dev, uint32_t req,
				  uint32_t flags, const void *p, uint32_t size,
				  int *fds, size_t nfds)
{
	struct msg_result m = {0};
	struct cas_vu_hdr h = {.request = req, .flags = flags, .size = size};
	int fdcopy[CAS_VU_MAX_FDS];
	for (size_t i = 0; i < nfds; i++)
		fdcopy[i] = fds[i];
	m.r = cas_vu_dev_handle(dev, &h, p, fdcopy, nfds, &m.rh, m.reply,
				&m.reply_size);
	return m;
}

#define V1  CAS_VU_VERSION
#define ACK (CAS_VU_VERSION | CAS_VU_FLAG_NEED_REPLY)

static bool fd_is_open(int fd)
{
	return fcntl(fd, F_GETFD) >= 0;
}

/* Expects an ack of `status` (0: success, 1: failure). */
#define CHECK_ACK(m, status)                                                   \
	CHECK((m).r == 0 && (m).reply_size == 8 && (m).reply[0] == (status) && \
	      (m).rh.flags == (CAS_VU_VERSION | CAS_VU_FLAG_REPLY))

/* A one-region memory table over mfd, accepted. */
static void mem_table(struct cas_vu_dev *dev, int mfd)
{
	uint8_t buf[8 + 32];
	uint32_t hdr[2] = {1, 0};
	uint64_t reg[4] = {GPA0, REGION_SIZE, UVA0, 0};
	memcpy(buf, hdr, 8);
	memcpy(buf + 8, reg, 32);
	int fd = dup(mfd);
	struct msg_result m = send_msg(dev, CAS_VU_SET_MEM_TABLE, ACK, buf,
				       sizeof(buf), &fd, 1);
	CHECK_ACK(m, 0);
	CHECK(!fd_is_open(fd)); /* mapped, not kept */
}

struct vring_addr {
	uint32_t index, flags;
	uint64_t desc, used, avail, log;
};

/* Ring 1 in region 0 at the layout's offsets, from avail index 0; the
 * kick fd last, which starts it. */
static void ring_up(struct cas_vu_dev *dev, int kick, int call)
{
	struct {
		uint32_t index, num;
	} st = {1, NUM};
	struct msg_result m;
	m = send_msg(dev, CAS_VU_SET_VRING_NUM, ACK, &st, sizeof(st), NULL, 0);
	CHECK_ACK(m, 0);
	st.num = 0;
	m = send_msg(dev, CAS_VU_SET_VRING_BASE, ACK, &st, sizeof(st), NULL, 0);
	CHECK_ACK(m, 0);
	struct vring_addr addr = {
		1, 0, UVA0 + DESC_OFF, UVA0 + USED_OFF, UVA0 + AVAIL_OFF, 0};
	m = send_msg(dev, CAS_VU_SET_VRING_ADDR, ACK, &addr, sizeof(addr), NULL,
		     0);
	CHECK_ACK(m, 0);
	uint64_t v = 1;
	int call_dup = dup(call), kick_dup = dup(kick);
	m = send_msg(dev, CAS_VU_SET_VRING_CALL, ACK, &v, 8, &call_dup, 1);
	CHECK_ACK(m, 0);
	m = send_msg(dev, CAS_VU_SET_VRING_KICK, ACK, &v, 8, &kick_dup, 1);
	CHECK_ACK(m, 0);
	CHECK(cas_vu_dev_started(dev, 1));
}

static bool wait_int(const int *p, int want)
{
	for (int i = 0; i < 6000; i++) {
		if (__atomic_load_n(p, __ATOMIC_SEQ_CST) == want)
			return true;
		usleep(10000);
	}
	return false;
}

static void test_messages(void)
{
	struct cas_vu_config cfg = {.queues = 2, .ops = &test_ops};
	struct cas_vu_dev *dev;
	struct msg_result m;
	uint64_t v;
	uint8_t buf[512] = {0};

	REQUIRE(cas_vu_dev_new(&cfg, &dev) == 0);

	m = send_msg(dev, CAS_VU_GET_FEATURES, V1, NULL, 0, NULL, 0);
	CHECK(m.r == 0 && m.reply_size == 8 &&
	      m.rh.request == CAS_VU_GET_FEATURES);
	uint64_t features = m.reply[0];
	CHECK(features & (1ull << CAS_VIRTIO_F_VERSION_1));
	CHECK(features & (1ull << CAS_VIRTIO_RING_F_EVENT_IDX));
	CHECK(features & (1ull << CAS_VIRTIO_RING_F_INDIRECT_DESC));
	CHECK(features & (1ull << CAS_VU_F_PROTOCOL_FEATURES));
	/* A payload where none belongs, on a request that must be answered:
	 * the connection is given up. */
	m = send_msg(dev, CAS_VU_GET_FEATURES, V1, buf, 4, NULL, 0);
	CHECK(m.r < 0);
	/* Wrong version bits. */
	m = send_msg(dev, CAS_VU_SET_OWNER, 2, NULL, 0, NULL, 0);
	CHECK(m.r < 0);
	m = send_msg(dev, CAS_VU_SET_OWNER, V1, NULL, CAS_VU_MAX_PAYLOAD + 1,
		     NULL, 0);
	CHECK(m.r < 0);

	m = send_msg(dev, CAS_VU_GET_PROTOCOL_FEATURES, V1, NULL, 0, NULL, 0);
	CHECK(m.r == 0 && (m.reply[0] & (1ull << CAS_VU_PROTOCOL_F_REPLY_ACK)));
	v = m.reply[0];
	m = send_msg(dev, CAS_VU_SET_PROTOCOL_FEATURES, ACK, &v, 8, NULL, 0);
	CHECK_ACK(m, 0);
	v = 1ull << 62;
	m = send_msg(dev, CAS_VU_SET_PROTOCOL_FEATURES, ACK, &v, 8, NULL, 0);
	CHECK_ACK(m, 1);
	m = send_msg(dev, CAS_VU_SET_FEATURES, ACK, &features, 4, NULL, 0);
	CHECK_ACK(m, 1);
	v = features | (1ull << 60);
	m = send_msg(dev, CAS_VU_SET_FEATURES, ACK, &v, 8, NULL, 0);
	CHECK_ACK(m, 1);
	m = send_msg(dev, CAS_VU_SET_FEATURES, ACK, &features, 8, NULL, 0);
	CHECK_ACK(m, 0);
	CHECK(cas_vu_dev_features(dev) == features);
	/* Without need_reply, no reply. */
	m = send_msg(dev, CAS_VU_SET_OWNER, V1, NULL, 0, NULL, 0);
	CHECK(m.r == 0 && m.reply_size == -1);
	m = send_msg(dev, CAS_VU_GET_QUEUE_NUM, V1, NULL, 0, NULL, 0);
	CHECK(m.r == 0 && m.reply[0] == 2);

	/* Unknown requests: NACK when asked, else nothing; fds closed. */
	int efd = eventfd(0, EFD_CLOEXEC);
	m = send_msg(dev, 999, ACK, buf, 16, &efd, 1);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(efd));
	m = send_msg(dev, 999, V1, NULL, 0, NULL, 0);
	CHECK(m.r == 0 && m.reply_size == -1);
	m = send_msg(dev, CAS_VU_SET_LOG_BASE, ACK, &v, 8, NULL, 0);
	CHECK_ACK(m, 1);

	/* Vring state: bad sizes, indexes, values. */
	struct {
		uint32_t index, num;
	} st = {0, 100};
	m = send_msg(dev, CAS_VU_SET_VRING_NUM, ACK, &st, sizeof(st), NULL, 0);
	CHECK_ACK(m, 1); /* not a power of two */
	st.num = 65536;
	m = send_msg(dev, CAS_VU_SET_VRING_NUM, ACK, &st, sizeof(st), NULL, 0);
	CHECK_ACK(m, 1);
	st.num = NUM;
	m = send_msg(dev, CAS_VU_SET_VRING_NUM, ACK, &st, 4, NULL, 0);
	CHECK_ACK(m, 1);
	st.index = 2;
	m = send_msg(dev, CAS_VU_SET_VRING_NUM, ACK, &st, sizeof(st), NULL, 0);
	CHECK_ACK(m, 1);
	m = send_msg(dev, CAS_VU_GET_VRING_BASE, V1, &st, sizeof(st), NULL, 0);
	CHECK(m.r < 0); /* an answer is due and there is none to give */
	st.index = 0;
	st.num = 2;
	m = send_msg(dev, CAS_VU_SET_VRING_ENABLE, ACK, &st, sizeof(st), NULL,
		     0);
	CHECK_ACK(m, 1);

	/* Kick/call fds: count must match the NOFD bit; a bad message closes
	 * what came with it. */
	int e1 = eventfd(0, EFD_CLOEXEC), e2 = eventfd(0, EFD_CLOEXEC);
	int two[2] = {e1, e2};
	v = 0;
	m = send_msg(dev, CAS_VU_SET_VRING_CALL, ACK, &v, 8, two, 2);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(e1) && !fd_is_open(e2));
	v = CAS_VU_VRING_NOFD_MASK;
	e1 = eventfd(0, EFD_CLOEXEC);
	m = send_msg(dev, CAS_VU_SET_VRING_CALL, ACK, &v, 8, &e1, 1);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(e1));
	v = 5;
	e1 = eventfd(0, EFD_CLOEXEC);
	m = send_msg(dev, CAS_VU_SET_VRING_ERR, ACK, &v, 8, &e1, 1);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(e1));
	v = CAS_VU_VRING_NOFD_MASK;
	m = send_msg(dev, CAS_VU_SET_VRING_KICK, ACK, &v, 8, NULL, 0);
	CHECK_ACK(m, 1); /* polling is not supported */
	CHECK(!cas_vu_dev_started(dev, 0));

	/* Memory table: region count, sizes, fd count. */
	uint32_t hdr[2] = {9, 0};
	memcpy(buf, hdr, 8);
	m = send_msg(dev, CAS_VU_SET_MEM_TABLE, ACK, buf, 8 + 9 * 32, NULL, 0);
	CHECK_ACK(m, 1);
	int mfd = new_memfd(REGION_SIZE);
	uint64_t reg[4] = {GPA0, REGION_SIZE, UVA0, 0};
	hdr[0] = 1;
	memcpy(buf, hdr, 8);
	memcpy(buf + 8, reg, 32);
	m = send_msg(dev, CAS_VU_SET_MEM_TABLE, ACK, buf, 8 + 32, NULL, 0);
	CHECK_ACK(m, 1); /* no fd */
	int dup1 = dup(mfd);
	m = send_msg(dev, CAS_VU_SET_MEM_TABLE, ACK, buf, 8 + 31, &dup1, 1);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(dup1));
	reg[1] = 2 * REGION_SIZE; /* more than the file has */
	memcpy(buf + 8, reg, 32);
	dup1 = dup(mfd);
	m = send_msg(dev, CAS_VU_SET_MEM_TABLE, ACK, buf, 8 + 32, &dup1, 1);
	CHECK_ACK(m, 1);
	CHECK(!fd_is_open(dup1));
	mem_table(dev, mfd);

	/* A ring for real: the test is the driver. */
	uint8_t *r0 = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE,
			   MAP_SHARED, mfd, 0);
	REQUIRE(r0 != MAP_FAILED);
	struct vring_addr addr = {
		1, 0, UVA0 + DESC_OFF, UVA0 + USED_OFF, UVA0 + AVAIL_OFF, 0};
	m = send_msg(dev, CAS_VU_SET_VRING_ADDR, ACK, &addr, sizeof(addr) - 8,
		     NULL, 0);
	CHECK_ACK(m, 1);
	int kick = eventfd(0, EFD_CLOEXEC),
	    call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	ring_up(dev, kick, call);

	/* Two chains: a good one and one pointing outside memory. */
	struct cas_vring_desc *d = (void *)(r0 + DESC_OFF);
	set_desc(&d[0], GPA0 + DATA_OFF, 40, CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&d[1], GPA0 + DATA_OFF + 64, 64, CAS_VRING_DESC_F_WRITE, 0);
	set_desc(&d[2], 0xdead0000, 40, 0, 0);
	struct cas_vring_avail *a = (void *)(r0 + AVAIL_OFF);
	struct cas_vring_used *u = (void *)(r0 + USED_OFF);
	a->ring[0] = 2;
	a->ring[1] = 0;
	__atomic_store_n(&a->idx, 2, __ATOMIC_RELEASE);
	uint64_t one = 1;
	CHECK(write(kick, &one, 8) == 8);
	struct pollfd p = {.fd = call, .events = POLLIN};
	CHECK(poll(&p, 1, 60000) == 1);
	for (int i = 0;
	     i < 6000 && __atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) != 2; i++)
		usleep(10000);
	CHECK(u->idx == 2);
	CHECK(u->ring[0].id == 2 && u->ring[0].len == 0);
	CHECK(u->ring[1].id == 0 && u->ring[1].len == 6);
	CHECK(memcmp(r0 + DATA_OFF + 64, "answer", 6) == 0);
	CHECK(__atomic_load_n(&processed, __ATOMIC_SEQ_CST) == 1);

	/* GET_VRING_BASE stops the ring and reports the next avail entry. */
	st.index = 1;
	m = send_msg(dev, CAS_VU_GET_VRING_BASE, V1, &st, sizeof(st), NULL, 0);
	CHECK(m.r == 0 && m.reply_size == 8);
	uint32_t base[2];
	memcpy(base, m.reply, 8);
	CHECK(base[0] == 1 && base[1] == 2);
	CHECK(!cas_vu_dev_started(dev, 1));
	/* A chain posted while stopped is served after a restart. */
	a->ring[2] = 0;
	__atomic_store_n(&a->idx, 3, __ATOMIC_RELEASE);
	int kick_dup = dup(kick), call_dup = dup(call);
	v = 1;
	m = send_msg(dev, CAS_VU_SET_VRING_CALL, ACK, &v, 8, &call_dup, 1);
	m = send_msg(dev, CAS_VU_SET_VRING_KICK, ACK, &v, 8, &kick_dup, 1);
	CHECK_ACK(m, 0);
	for (int i = 0;
	     i < 6000 && __atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) != 3; i++)
		usleep(10000);
	CHECK(u->idx == 3);

	/* A new memory table while the ring runs. */
	mem_table(dev, mfd);
	a->ring[3] = 0;
	__atomic_store_n(&a->idx, 4, __ATOMIC_RELEASE);
	CHECK(write(kick, &one, 8) == 8);
	for (int i = 0;
	     i < 6000 && __atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) != 4; i++)
		usleep(10000);
	CHECK(u->idx == 4);

	cas_vu_dev_reset(dev);
	CHECK(!cas_vu_dev_started(dev, 1));
	CHECK(cas_vu_dev_features(dev) == 0);
	cas_vu_dev_free(dev);
	munmap(r0, REGION_SIZE);
	close(mfd);
	close(kick);
	close(call);
}

/* A queue whose backend cannot start (out of memory) is tried again at
 * each kick, rather than leaving the guest without replies for good. */
static int starts, stops, start_failures;
static void *stopped_ctx;

static int flaky_start(void *opaque, unsigned qidx, void **ret_ctx)
{
	if (__atomic_fetch_add(&starts, 1, __ATOMIC_SEQ_CST) < start_failures)
		return -ENOMEM;
	*ret_ctx = &starts;
	return 0;
}

static void flaky_stop(void *opaque, unsigned qidx, void *ctx)
{
	__atomic_store_n(&stopped_ctx, ctx, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&stops, 1, __ATOMIC_SEQ_CST);
}

static void test_start_retry(void)
{
	static const struct cas_vu_ops ops = {.queue_start = flaky_start,
					      .queue_stop = flaky_stop,
					      .process = test_process};
	struct cas_vu_config cfg = {.queues = 2, .ops = &ops};
	struct cas_vu_dev *dev;
	REQUIRE(cas_vu_dev_new(&cfg, &dev) == 0);
	int mfd = new_memfd(REGION_SIZE);
	uint8_t *r0 = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE,
			   MAP_SHARED, mfd, 0);
	REQUIRE(r0 != MAP_FAILED);
	mem_table(dev, mfd);

	/* A chain is waiting before the ring starts. */
	struct cas_vring_desc *d = (void *)(r0 + DESC_OFF);
	set_desc(&d[0], GPA0 + DATA_OFF, 40, CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&d[1], GPA0 + DATA_OFF + 64, 64, CAS_VRING_DESC_F_WRITE, 0);
	struct cas_vring_avail *a = (void *)(r0 + AVAIL_OFF);
	struct cas_vring_used *u = (void *)(r0 + USED_OFF);
	a->ring[0] = 0;
	__atomic_store_n(&a->idx, 1, __ATOMIC_RELEASE);

	int before = __atomic_load_n(&processed, __ATOMIC_SEQ_CST);
	start_failures = 2;
	int kick = eventfd(0, EFD_CLOEXEC),
	    call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	ring_up(dev, kick, call);
	CHECK(wait_int(&starts, 1));
	uint64_t one = 1;
	CHECK(write(kick, &one, 8) == 8);
	CHECK(wait_int(&starts, 2));
	CHECK(__atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) == 0);
	/* The third try succeeds and serves what waited. */
	CHECK(write(kick, &one, 8) == 8);
	CHECK(wait_int(&starts, 3));
	struct pollfd p = {.fd = call, .events = POLLIN};
	CHECK(poll(&p, 1, 60000) == 1);
	CHECK(__atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) == 1);
	CHECK(u->ring[0].id == 0 && u->ring[0].len == 6);
	CHECK(__atomic_load_n(&processed, __ATOMIC_SEQ_CST) == before + 1);
	CHECK(__atomic_load_n(&stops, __ATOMIC_SEQ_CST) == 0);

	/* Stopped, it ends its context once. */
	cas_vu_dev_reset(dev);
	CHECK(stops == 1 && stopped_ctx == &starts);
	CHECK(starts == 3);
	cas_vu_dev_free(dev);
	munmap(r0, REGION_SIZE);
	close(mfd);
	close(kick);
	close(call);
}

int main(void)
{
	test_direct_chain();
	test_indirect();
	test_malformed();
	test_regions();
	test_event_idx();
	test_iov_copy();
	test_messages();
	test_start_retry();
	return check_exit("test_virtqueue");
}
