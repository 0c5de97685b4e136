/* Fuzz target: the virtio-fs glue (transport/virtiofs.c) between a
 * virtqueue chain and the engine: FUSE requests in descriptor chains
 * split anywhere into readable buffers, writable parts of any shape and
 * size (too small for the reply, the header alone, the data spread over
 * many buffers), lengths in headers that disagree with the chain, READs
 * answered from a file shorter than the reply says, INIT again (a new
 * session), requests on the hiprio queue.
 *
 * Input: one control byte (bit 0: no INIT first), then chains, each:
 *   byte    queue (bit 0: the hiprio queue 0, else request queue 1),
 *           readable buffers - 1 (bits 1-2), writable buffers (bits 3-5)
 *   2 bytes the request's length L (little-endian, cut to what is left)
 *   1 byte per readable buffer but the last: where it ends (of 256ths)
 *   2 bytes per writable buffer: its size
 *   L bytes the request
 * Every buffer is its own allocation of its exact size (ASan sees any
 * byte written or read past it). Checked: the used length is at most the
 * writable part, and what was written is one well-formed reply whose
 * header counts exactly the used length. */
#include <linux/fuse.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "fuzz_fs.h"
#include "transport/virtiofs_i.h"
#include "transport/virtqueue.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_IOV 12

static struct cas_fuse_config fuse_cfg;

static int session_open(void *userdata, struct cas_fuse_session **ret)
{
	return cas_fuse_session_new(&fuzz_fs_ops, NULL, &fuse_cfg, ret);
}

static void session_close(void *userdata, struct cas_fuse_session *s)
{
	cas_fuse_session_free(s);
}

static void run_chain(struct cas_virtiofs *v, void *qctx, unsigned qidx,
		      const uint8_t *req, size_t len, const size_t *cuts,
		      int read_cnt, const size_t *wsizes, int write_cnt)
{
	struct iovec iov[MAX_IOV];
	struct cas_vq_elem elem = {.iov = iov, .iov_max = MAX_IOV};
	size_t at = 0;
	for (int i = 0; i < read_cnt; i++) {
		size_t end = i == read_cnt - 1 ? len : cuts[i];
		size_t n = end - at;
		iov[i].iov_base = malloc(n ? n : 1);
		iov[i].iov_len = n;
		memcpy(iov[i].iov_base, req + at, n);
		at = end;
	}
	size_t wlen = 0;
	for (int i = 0; i < write_cnt; i++) {
		iov[read_cnt + i].iov_base = malloc(wsizes[i] ? wsizes[i] : 1);
		iov[read_cnt + i].iov_len = wsizes[i];
		memset(iov[read_cnt + i].iov_base, 0xa5, wsizes[i]);
		wlen += wsizes[i];
	}
	elem.read_cnt = read_cnt;
	elem.write_cnt = write_cnt;
	elem.read_len = len;
	elem.write_len = wlen;

	uint32_t used = cas_virtiofs_queue_ops()->process(v, qctx, qidx, &elem);
	if (used > wlen)
		__builtin_trap();
	if (used > 0) {
		uint8_t *out = malloc(used);
		size_t k = 0;
		for (int i = 0; i < write_cnt && k < used; i++) {
			size_t n = CAS_MIN(wsizes[i], used - k);
			memcpy(out + k, iov[read_cnt + i].iov_base, n);
			k += n;
		}
		fuzz_fs_check_sent(out, used);
		free(out);
	}
	for (int i = 0; i < read_cnt + write_cnt; i++)
		free(iov[i].iov_base);
}

static int cmp_size(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	return x < y ? -1 : x > y;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct cas_virtiofs *v;
	static void *qctx[2];
	const struct cas_vu_ops *ops = cas_virtiofs_queue_ops();
	if (!v) {
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
		fuzz_fs_setup();
		fuse_cfg.readonly = true;
		cas_virtiofs_configure(&fuse_cfg);
		/* One device and its queues for the whole run (their reply
		 * buffers are most of a device's cost); each input gets a
		 * fresh session, as a frontend that connects again does, so
		 * that no input depends on the opens and lookups of another. */
		struct cas_virtiofs_config cfg = {
			.reply_bufsize = cas_fuse_reply_bufsize(&fuse_cfg),
			.session_open = session_open,
			.session_close = session_close,
		};
		if (cas_virtiofs_new_connected(&cfg, &v) < 0)
			abort();
		for (unsigned q = 0; q < 2; q++)
			if (ops->queue_start(v, q, &qctx[q]) < 0)
				abort();
	}
	if (size < 1)
		return 0;
	cas_virtiofs_session_reset(v);

	bool init = !(data[0] & 1);
	data++;
	size--;
	if (init) {
		struct fuzz_init_req req = fuzz_init_request(38, 1 << 20, 0);
		size_t w = 4096;
		run_chain(v, qctx[1], 1, (const uint8_t *)&req, sizeof(req),
			  NULL, 1, &w, 1);
	}

	while (size >= 3) {
		unsigned qidx = data[0] & 1 ? 0 : 1;
		int read_cnt = 1 + (data[0] >> 1 & 3);
		int write_cnt = data[0] >> 3 & 7;
		size_t len = data[1] | (size_t)data[2] << 8;
		data += 3;
		size -= 3;
		size_t cuts[4], wsizes[8];
		if (size < (size_t)(read_cnt - 1) + 2u * (size_t)write_cnt)
			break;
		for (int i = 0; i < read_cnt - 1; i++)
			cuts[i] = data[i];
		data += read_cnt - 1;
		size -= (size_t)(read_cnt - 1);
		for (int i = 0; i < write_cnt; i++)
			wsizes[i] = data[2 * i] | (size_t)data[2 * i + 1] << 8;
		data += 2 * write_cnt;
		size -= 2u * (size_t)write_cnt;
		len = CAS_MIN(len, size);
		for (int i = 0; i < read_cnt - 1; i++)
			cuts[i] = cuts[i] * len / 256;
		qsort(cuts, (size_t)(read_cnt - 1), sizeof(cuts[0]), cmp_size);
		run_chain(v, qctx[qidx], qidx, data, len, cuts, read_cnt,
			  wsizes, write_cnt);
		data += len;
		size -= len;
	}

	return 0;
}
