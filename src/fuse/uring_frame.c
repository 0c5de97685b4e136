/* uring_frame.c - FUSE over io_uring framing (engine.h): a ring entry's
 * header and payload as one request for the engine, and its reply back
 * into the entry; out of engine.c, since it needs nothing of the session
 * but cas_fuse_session_process. */
#include <errno.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <string.h>

#include "core/log.h"
#include "fuse/engine.h"
#include "fuse/fuse_kernel_ext.h"

#define OUT_HDR sizeof(struct fuse_out_header)

int cas_fuse_session_process_uring(struct cas_fuse_session *s, void *headers,
				   const uint8_t *payload, size_t payload_size,
				   struct cas_fuse_reply *reply)
{
	/* Copied once: every length below is checked on this copy. */
	struct cas_fuse_uring_req_header hdr;
	memcpy(&hdr, headers, sizeof(hdr));
	struct fuse_in_header h;
	memcpy(&h, hdr.in_out, sizeof(h));
	size_t payload_sz = hdr.ring_ent_in_out.payload_sz;

	/* The kernel puts the first argument in op_in and the rest in the
	 * payload, and h.len counts all of them: what is left for op_in
	 * must fit it. Anything else is a broken entry. */
	struct iovec in[3] = {
		{&h, sizeof(h)},
		{hdr.op_in, 0},
		{(void *)payload, payload_sz},
	};
	if (h.len < sizeof(h) || payload_sz > payload_size ||
	    payload_sz > h.len - sizeof(h) ||
	    h.len - sizeof(h) - payload_sz > sizeof(hdr.op_in)) {
		cas_log_debug("fuse: io_uring entry of %u bytes with %zu of "
			      "payload does not add up",
			      h.len, payload_sz);
		cas_fuse_request_fail(in, 1, reply, -EINVAL);
		return 0;
	}
	in[1].iov_len = h.len - sizeof(h) - payload_sz;
	return cas_fuse_session_process(s, in, 3, reply);
}

uint64_t cas_fuse_uring_commit(void *headers, uint8_t *payload,
			       size_t payload_size,
			       const struct cas_fuse_reply *reply)
{
	struct cas_fuse_uring_req_header *hdr = headers;
	struct cas_fuse_uring_ent_in_out io;
	memcpy(&io, &hdr->ring_ent_in_out, sizeof(io));

	struct fuse_out_header oh = {0};
	size_t body = 0;
	if (reply->send && reply->len >= OUT_HDR) {
		memcpy(&oh, reply->buf, sizeof(oh));
		body = reply->len - OUT_HDR;
		size_t data = reply->fd >= 0 ? reply->fd_len : 0;
		if (body + data > payload_size) {
			/* Cannot happen with a payload buffer of the
			 * connection's size; say so rather than overrun. */
			oh.error = -EIO;
			body = 0;
		} else if (oh.error == 0) {
			memcpy(payload, reply->buf + OUT_HDR, body);
			body += data;
		} else {
			body = 0;
		}
	} else {
		/* A request that takes no reply never comes by ring, but
		 * the entry must go back to the kernel all the same. */
		oh.error = -EIO;
	}
	/* The kernel matches the reply to its request by unique. */
	uint64_t unique;
	memcpy(&unique, hdr->in_out + offsetof(struct fuse_in_header, unique),
	       sizeof(unique));
	oh.unique = unique;
	oh.len = (uint32_t)(OUT_HDR + body);
	memset(hdr->in_out, 0, sizeof(hdr->in_out));
	memcpy(hdr->in_out, &oh, sizeof(oh));
	io.payload_sz = (uint32_t)body;
	memcpy(&hdr->ring_ent_in_out, &io, sizeof(io));
	return io.commit_id;
}
