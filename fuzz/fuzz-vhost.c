/* libFuzzer target: vhost-user messages and split virtqueue chains.
 *
 * The first byte picks the mode (its low bit):
 *
 * 0: the rest is a sequence of vhost-user messages, each a 12-byte header
 *    (request, flags, size) and then up to `size` payload bytes, handed to
 *    cas_vu_dev_handle without fds - except SET_MEM_TABLE, which gets as
 *    many small memfds as it claims regions, so that mapping is reached.
 *    No kick fd is ever given: no queue thread starts, the run is
 *    deterministic.
 *
 * 1: the rest is guest memory: two regions, contiguous in guest physical
 *    space but not on the host, filled from the input; the first bytes of
 *    region 0 configure a ring inside it (size, ring offsets, features).
 *    Every chain popped is read and written in full (ASan sees any iovec
 *    that leaves the regions), pushed, and notification is decided.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/log.h"
#include "transport/vhost_user.h"
#include "transport/virtqueue.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REGION 32768

static volatile uint8_t sink;
#define GPA 0x10000ull

static uint32_t null_process(void *opaque, void *ctx, unsigned qidx,
			     struct cas_vq_elem *elem)
{
	return 0;
}

static const struct cas_vu_ops ops = {.process = null_process};

static void fuzz_messages(const uint8_t *data, size_t size)
{
	struct cas_vu_config cfg = {.queues = 4, .ops = &ops};
	struct cas_vu_dev *dev;
	static _Alignas(8) uint8_t payload[CAS_VU_MAX_PAYLOAD];
	static _Alignas(8) uint8_t reply[CAS_VU_MAX_PAYLOAD];

	if (cas_vu_dev_new(&cfg, &dev) < 0)
		return;
	while (size >= sizeof(struct cas_vu_hdr)) {
		struct cas_vu_hdr h, rh;
		memcpy(&h, data, sizeof(h));
		data += sizeof(h);
		size -= sizeof(h);
		size_t n = h.size < size ? h.size : size;
		if (n > sizeof(payload))
			n = sizeof(payload);
		memset(payload, 0, sizeof(payload));
		memcpy(payload, data, n);
		data += n;
		size -= n;

		int fds[CAS_VU_MAX_FDS];
		size_t nfds = 0;
		if (h.request == CAS_VU_SET_MEM_TABLE && h.size >= 4) {
			uint32_t want;
			memcpy(&want, payload, sizeof(want));
			for (; nfds < want && nfds < CAS_VU_MAX_FDS; nfds++) {
				fds[nfds] = memfd_create("fuzz", MFD_CLOEXEC);
				if (fds[nfds] < 0 ||
				    ftruncate(fds[nfds], 65536) < 0)
					break;
			}
		}
		int reply_size;
		if (cas_vu_dev_handle(dev, &h, payload, fds, nfds, &rh, reply,
				      &reply_size) < 0)
			break; /* the connection would be closed */
	}
	cas_vu_dev_free(dev);
}

static void fuzz_ring(const uint8_t *data, size_t size)
{
	static uint8_t r0[REGION], r1[REGION];
	struct cas_vu_mem mem = {.nregions = 2};
	struct cas_vq vq = {0};
	struct iovec iov[96];
	struct cas_vq_elem elem = {.iov = iov, .iov_max = 96};
	uint16_t cfg[6] = {0};

	memset(r0, 0, sizeof(r0));
	memset(r1, 0, sizeof(r1));
	memcpy(r0, data, size < REGION ? size : REGION);
	if (size > REGION)
		memcpy(r1, data + REGION,
		       size - REGION < REGION ? size - REGION : REGION);
	memcpy(cfg, r0, sizeof(cfg));

	mem.regions[0] = (struct cas_vu_region){
		.gpa = GPA, .size = REGION, .uva = 0x7000000, .host = r0};
	mem.regions[1] = (struct cas_vu_region){.gpa = GPA + REGION,
						.size = REGION,
						.uva = 0x9000000,
						.host = r1};

	vq.num = (uint16_t)(1u << (cfg[0] % 9)); /* 1..256 */
	vq.event_idx = cfg[1] & 1;
	vq.indirect = cfg[1] & 2;
	vq.desc_uva = 0x7000000 + (cfg[2] % REGION & ~15u);
	vq.avail_uva = 0x7000000 + (cfg[3] % REGION & ~1u);
	vq.used_uva = 0x7000000 + (cfg[4] % REGION & ~3u);
	vq.last_avail_idx = cfg[5];
	if (cas_vq_map(&vq, &mem) < 0)
		return;
	cas_vq_sync_used(&vq);

	for (int round = 0; round < 64; round++) {
		int r = cas_vq_pop(&vq, &mem, &elem);
		if (r == 0 && !cas_vq_prepare_sleep(&vq))
			break;
		if (r == -EPROTO)
			break;
		uint32_t len = 0;
		if (r > 0) {
			uint8_t sum = 0;
			for (int i = 0; i < elem.read_cnt; i++)
				for (size_t k = 0; k < iov[i].iov_len; k++)
					sum += ((uint8_t *)iov[i].iov_base)[k];
			sink += sum;
			for (int i = 0; i < elem.write_cnt; i++)
				memset(iov[elem.read_cnt + i].iov_base, 0xa5,
				       iov[elem.read_cnt + i].iov_len);
			len = (uint32_t)elem.write_len;
		}
		cas_vq_push(&vq, elem.head, len);
		cas_vq_should_notify(&vq);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int quiet;
	if (!quiet) {
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
		quiet = 1;
	}
	if (size < 1)
		return 0;
	if (data[0] & 1)
		fuzz_ring(data + 1, size - 1);
	else
		fuzz_messages(data + 1, size - 1);
	return 0;
}
