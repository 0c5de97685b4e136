/* Fuzzes the FUSE engine with one untrusted request.
 *
 * Input: two control bytes, then the request bytes. The harness makes a
 * session over a small fake filesystem, sends it a valid INIT (unless bit 7
 * of the first control byte asks to test the uninitialised session), then
 * feeds the request once whole and once split into two or three buffers at
 * positions taken from the control bytes, each buffer its own allocation so
 * that ASan catches a read past any of them. Both ways must give the same
 * reply, and every reply must be well formed.
 *
 * With bit 5 of the first control byte the request comes as a FUSE over
 * io_uring ring entry instead: the first 288 bytes are the entry's header
 * buffer (in_header, op_in, ring_ent_in_out with its payload_sz), the rest
 * the payload buffer, allocated to its exact size. Whatever the lengths
 * claim, the engine must answer with a well-formed commit. */
#include <errno.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/log.h"
#include "fuse/engine.h"
#include "fuse/fuse_dev.h"
#include "fuzz_fs.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int f_open(void *fs, uint64_t ino, uint32_t flags,
		  struct cas_fuse_open *ret)
{
	ret->fh = ino ^ 0x55;
	ret->open_flags = (uint32_t)ino & 0xff;
	/* fds 1 and 2 stand for files the transport cannot register, for a
	 * passing reason and for good. */
	ret->backing_fd = ino % 4 == 1	 ? 0
			  : ino % 4 == 3 ? 1
			  : ino % 8 == 2 ? 2
					 : -1;
	return ino % 5 == 4 ? -EACCES : 0;
}

/* fuzz_fs.h's filesystem, but OPEN hands out backing fds. */
static struct cas_fuse_ops ops;

static int next_id;

static int t_backing_open(void *transport, int fd)
{
	return fd == 1 ? -EMFILE : fd == 2 ? -EPERM : ++next_id;
}

static int t_backing_close(void *transport, int id)
{
	return 0;
}

static void check_reply(const struct cas_fuse_reply *reply)
{
	if (!reply->send)
		return;
	if (reply->len < sizeof(struct fuse_out_header) ||
	    reply->len > reply->buf_size)
		abort();
	struct fuse_out_header oh;
	memcpy(&oh, reply->buf, sizeof(oh));
	size_t total = reply->len + (reply->fd >= 0 ? reply->fd_len : 0);
	if (oh.len != total || oh.unique != reply->unique)
		abort();
	if (oh.error > 0 || oh.error < -4095)
		abort();
	/* An error carries no data; a reply failed by the transport keeps
	 * its fd (with no bytes of it) until cas_fuse_reply_done. */
	if (oh.error != 0 && (reply->len != sizeof(oh) ||
			      (reply->fd >= 0 && reply->fd_len != 0)))
		abort();
}

static void process(struct cas_fuse_session *s, const struct iovec *iov,
		    int cnt, uint8_t *buf, size_t bufsize,
		    struct cas_fuse_reply *reply)
{
	*reply = (struct cas_fuse_reply){.buf = buf, .buf_size = bufsize};
	if (cas_fuse_session_process(s, iov, cnt, reply) != 0)
		abort();
	check_reply(reply);
}

static void fuzz_uring(struct cas_fuse_session *s, const uint8_t *data,
		       size_t size, uint8_t c1, uint8_t *buf, size_t bufsize)
{
	struct cas_fuse_uring_req_header *hdr = malloc(sizeof(*hdr));
	if (!hdr)
		abort();
	memset(hdr, 0, sizeof(*hdr));
	size_t h = CAS_MIN(size, sizeof(*hdr));
	memcpy(hdr, data, h);
	size_t n = size - h;
	uint8_t *payload = malloc(n ? n : 1);
	if (!payload)
		abort();
	memcpy(payload, data + h, n);

	struct cas_fuse_reply reply = {.buf = buf, .buf_size = bufsize};
	if (cas_fuse_session_process_uring(s, hdr, payload, n, &reply) != 0)
		abort();
	check_reply(&reply);
	/* The transport may have read less of the fd part than promised. */
	if (reply.fd >= 0 && (c1 & 2))
		cas_fuse_reply_shorten(&reply, reply.fd_len * (c1 >> 4) / 16);
	check_reply(&reply);
	cas_fuse_uring_commit(hdr, payload, n, &reply);
	fuzz_fs_check_commit(hdr, n);
	cas_fuse_reply_done(s, &reply);
	free(payload);
	free(hdr);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	static bool ready;
	if (!ready) {
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
		fuzz_fs_setup();
		ops = fuzz_fs_ops;
		ops.open = ops.opendir = f_open;
		ready = true;
	}
	uint8_t c0 = data[0], c1 = data[1];
	data += 2;
	size -= 2;

	struct cas_fuse_config cfg = {
		.readonly = true,
		.max_write = 1 << 20,
		.max_pages = (c0 & 0x40) ? 1 : 64,
		.backing_open = t_backing_open,
		.backing_close = t_backing_close,
	};
	struct cas_fuse_session *s;
	if (cas_fuse_session_new(&ops, NULL, &cfg, &s) < 0)
		return 0;
	/* Reply buffers are reused: fresh ones per input cost more than the
	 * engine itself. */
	static uint8_t *buf1, *buf2;
	static size_t bufsize;
	if (!buf1) {
		bufsize = cas_fuse_reply_bufsize(
			&(struct cas_fuse_config){.max_pages = 64});
		buf1 = malloc(bufsize);
		buf2 = malloc(bufsize);
		if (!buf1 || !buf2)
			abort();
	}
	struct cas_fuse_reply r1, r2;

	if (!(c0 & 0x80)) {
		struct fuzz_init_req init =
			fuzz_init_request(45, 65536, 1u << 5 /* passthrough */);
		struct iovec iov = {&init, sizeof(init)};
		process(s, &iov, 1, buf1, bufsize, &r1);
	}

	if (c0 & 0x20) {
		fuzz_uring(s, data, size, c1, buf1, bufsize);
		cas_fuse_session_free(s);
		return 0;
	}

	/* Whole. */
	uint8_t *whole = malloc(size ? size : 1);
	memcpy(whole, data, size);
	struct iovec iov1 = {whole, size};
	process(s, &iov1, 1, buf1, bufsize, &r1);

	/* Split into two or three buffers. DESTROY changes the session, so
	 * the second run of it legitimately differs. */
	size_t a = size ? c0 % (size + 1) : 0;
	size_t b = size ? c1 % (size + 1) : 0;
	if (b < a) {
		size_t t = a;
		a = b;
		b = t;
	}
	size_t cut[4] = {0, a, b, size};
	int cnt = (c1 & 1) ? 3 : 2;
	if (cnt == 2)
		cut[2] = size;
	struct iovec iov[3];
	uint8_t *piece[3] = {NULL, NULL, NULL};
	for (int k = 0; k < cnt; k++) {
		size_t n = cut[k + 1] - cut[k];
		piece[k] = malloc(n ? n : 1);
		memcpy(piece[k], data + cut[k], n);
		iov[k] = (struct iovec){piece[k], n};
	}
	process(s, iov, cnt, buf2, bufsize, &r2);
	if (!r1.destroyed && r1.send &&
	    !(r2.send && r1.len == r2.len && r1.fd == r2.fd &&
	      r1.fd_len == r2.fd_len && memcmp(buf1, buf2, r1.len) == 0)) {
		/* An opcode whose reply depends on earlier requests (a second
		 * INIT) may differ; everything else must not. */
		struct fuse_in_header h;
		if (size >= sizeof(h)) {
			memcpy(&h, data, sizeof(h));
			if (h.opcode != FUSE_INIT)
				abort();
		}
	}

	cas_fuse_reply_done(s, &r1);
	cas_fuse_reply_done(s, &r2);
	for (int k = 0; k < cnt; k++)
		free(piece[k]);
	free(whole);
	cas_fuse_session_free(s);
	return 0;
}
