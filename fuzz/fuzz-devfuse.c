/* Fuzz target: the /dev/fuse reader's framing and reply path
 * (transport/devfuse.c) and the FUSE over io_uring entries' (uring.c),
 * between what the kernel hands over and the engine, over a small fake
 * filesystem (fuzz_fs.h) whose READs may come from a file shorter than
 * the reply promised.
 *
 * Input: one control byte, then records, each a 16-bit little-endian
 * length and that many bytes (cut to what is left).
 * - Bit 0 clear: each record is what one read() of /dev/fuse returned (a
 *   request, or less of one than its header says, or more), answered by
 *   cas_devfuse_answer on a pipe standing for /dev/fuse. Bit 1: no splice
 *   pipe; bit 2: a splice pipe too small for large READs. Checked: what
 *   the pipe received is nothing or one reply whose header counts
 *   exactly the bytes sent.
 * - Bit 0 set: each record is a ring entry as the kernel filled it: its
 *   first 288 bytes the header buffer, the rest the start of a payload
 *   buffer of 4 KiB, 64 KiB or 128 KiB (bits 1-2), answered by
 *   cas_uring_answer. Checked: the committed header and payload_sz agree
 *   and fit the buffer. The commit of an odd unique is refused, as the
 *   kernel refuses one for an interrupted request.
 * Bit 3 clear: an INIT comes first (through /dev/fuse, as the kernel
 * sends it). Each input gets a fresh session. */
#include <fcntl.h>
#include <stddef.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"
#include "fuse/fuse_dev.h"
#include "fuzz_fs.h"
#include "transport/transport_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define PAGE	  4096u
#define MAX_PAGES 32u

static struct cas_fuse_config fuse_cfg = {
	.readonly = true,
	.max_write = 64 << 10,
	.max_pages = MAX_PAGES,
};

/* The pipe standing for /dev/fuse: room for any reply, never blocking. */
static int dev[2] = {-1, -1};
static uint8_t *sent;
static uint8_t scratch_drain[PAGE];
static size_t sent_size;

static void setup(void)
{
	if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
		cas_log_set_level(CAS_LOG_NONE);
	fuzz_fs_setup();
	sent_size = cas_fuse_reply_bufsize(&fuse_cfg) + (MAX_PAGES + 2) * PAGE;
	sent = malloc(sent_size);
	if (!sent || pipe2(dev, O_CLOEXEC | O_NONBLOCK) < 0 ||
	    fcntl(dev[1], F_SETPIPE_SZ, (int)(1u << 20)) < (int)sent_size)
		abort();
}

/* What one answer put in the pipe: nothing or exactly one reply. */
static void check_pipe(void)
{
	size_t got = 0;
	for (;;) {
		ssize_t n = read(dev[0], sent + got, sent_size - got);
		if (n <= 0)
			break;
		got += (size_t)n;
		if (got == sent_size)
			__builtin_trap(); /* more than any reply */
	}
	if (got > 0)
		fuzz_fs_check_sent(sent, got);
}

/* The splice pipes, one per size (k 1: too small for large READs), made
 * once per run (a pipe and its resize per input were most of the time)
 * and emptied before each use, so no input sees what another left. */
static int splice_pipe(int k, int ret[2])
{
	static int pipes[2][2] = {{-1, -1}, {-1, -1}};
	int size = (int)((k ? 8 : MAX_PAGES + 2) * PAGE);
	if (pipes[k][0] < 0 && (pipe2(pipes[k], O_CLOEXEC | O_NONBLOCK) < 0 ||
				fcntl(pipes[k][1], F_SETPIPE_SZ, size) < size))
		abort();
	while (read(pipes[k][0], scratch_drain, sizeof(scratch_drain)) > 0)
		;
	ret[0] = pipes[k][0];
	ret[1] = pipes[k][1];
	return size;
}

static void answer(struct cas_fuse_session *s, struct cas_devfuse_io *io,
		   const uint8_t *req, size_t n)
{
	/* An exact-size copy: ASan sees a read past what read() returned. */
	uint8_t *copy = malloc(n ? n : 1);
	if (!copy)
		abort();
	memcpy(copy, req, n);
	bool init;
	(void)cas_devfuse_answer(s, io, copy, n, &init);
	free(copy);
	check_pipe();
}

static void entry(struct cas_fuse_session *s, const uint8_t *rec, size_t n,
		  size_t payload_size, uint8_t *reply, size_t reply_size)
{
	/* Exact sizes (ASan sees a byte past them), kept for the run: a
	 * payload buffer mapped and faulted in per record was most of the
	 * time. */
	static struct cas_fuse_uring_req_header *hdr;
	static uint8_t *payloads[3];
	int k = payload_size == 4096 ? 0 : payload_size == 64 << 10 ? 1 : 2;
	if (!hdr && !(hdr = malloc(sizeof(*hdr))))
		abort();
	if (!payloads[k] && !(payloads[k] = malloc(payload_size)))
		abort();
	uint8_t *payload = payloads[k];
	size_t h = CAS_MIN(n, sizeof(*hdr));
	memset(hdr, 0, sizeof(*hdr));
	memcpy(hdr, rec, h);
	memset(payload, 0, payload_size);
	memcpy(payload, rec + h, CAS_MIN(n - h, payload_size));

	struct cas_uring_open open;
	(void)cas_uring_answer(s, hdr, payload, payload_size, reply, reply_size,
			       &open);
	fuzz_fs_check_commit(hdr, payload_size);
	/* The kernel refuses the commit of an odd unique (the request was
	 * interrupted meanwhile): what it handed out is released, as
	 * commit_done does. */
	uint64_t unique;
	memcpy(&unique, hdr->in_out + offsetof(struct fuse_out_header, unique),
	       sizeof(unique));
	if (open.kind && unique % 2) {
		struct cas_fuse_reply lost = {.fd = -1,
					      .lost = true,
					      .open_kind = open.kind,
					      .open_ino = open.ino,
					      .open_fh = open.fh};
		cas_fuse_reply_done(s, &lost);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t *reply, *scratch;
	static size_t reply_size;
	if (!sent) {
		setup();
		reply_size = cas_fuse_reply_bufsize(&fuse_cfg);
		reply = malloc(reply_size);
		scratch = malloc(MAX_PAGES * PAGE);
		if (!reply || !scratch)
			abort();
	}
	if (size < 1)
		return 0;
	uint8_t c0 = data[0];
	data++;
	size--;

	struct cas_devfuse_io io = {
		.fd = dev[1],
		.pipe = {-1, -1},
		.scratch = scratch,
		.scratch_size = MAX_PAGES * PAGE,
		.reply = reply,
		.reply_size = reply_size,
	};
	if (!(c0 & 2)) {
		int k = c0 & 4 ? 1 : 0;
		io.pipe_size = splice_pipe(k, io.pipe);
	}
	struct cas_fuse_session *s;
	if (cas_fuse_session_new(&fuzz_fs_ops, NULL, &fuse_cfg, &s) < 0)
		abort();
	if (!(c0 & 8)) {
		struct fuzz_init_req init = fuzz_init_request(45, 1 << 20, 0);
		answer(s, &io, (const uint8_t *)&init, sizeof(init));
	}
	static const size_t payload_sizes[4] = {4096, 64 << 10, 128 << 10,
						128 << 10};
	size_t payload_size = payload_sizes[c0 >> 1 & 3];
	while (size >= 2) {
		size_t n = data[0] | (size_t)data[1] << 8;
		data += 2;
		size -= 2;
		n = CAS_MIN(n, size);
		if (c0 & 1)
			entry(s, data, n, payload_size, reply, reply_size);
		else
			answer(s, &io, data, n);
		data += n;
		size -= n;
	}
	cas_fuse_session_free(s);
	return 0;
}
