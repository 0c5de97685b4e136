/* Unit test of transport/virtiofs: the whole device over its real socket,
 * without QEMU.
 *
 * The test is the frontend (vhost-user messages with fds over the UNIX
 * socket: a memfd as guest memory, eventfds for kick and call) and the
 * guest driver (FUSE requests as descriptor chains in that memory). The
 * filesystem is a stub behind the real engine: one file whose READs are
 * answered from an fd, so file data goes from preadv straight into the
 * guest's buffers. Checks: replies in place, data split over descriptors
 * and an indirect table, a reply too large for its buffers, a second
 * FUSE_INIT (fresh session), disconnect (session closed), the next
 * frontend, a concurrent one refused, and stop. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "../core/check.h"
#include "core/util.h"
#include "transport/vhost_user.h"
#include "transport/virtiofs.h"
#include "transport/virtqueue.h"

#define MEM_SIZE  (1u << 20)
#define GPA	  0x40000000ull
#define UVA	  0x7e0000000000ull
#define NUM	  16
#define DESC_OFF  0x0
#define AVAIL_OFF 0x1000
#define USED_OFF  0x2000
#define TABLE_OFF 0x3000
#define REQ_OFF	  0x10000
#define REPLY_OFF 0x20000
#define FILE_SIZE 100000

static int data_fd = -1;
static int sessions_opened, sessions_closed; /* atomic */

/* ---- the stub filesystem ---- */

static int fs_init(void *fs, struct cas_fuse_conn *conn)
{
	return 0;
}

static int fs_lookup(void *fs, uint64_t parent, const char *name,
		     size_t namelen, struct cas_fuse_entry *ret)
{
	if (parent != CAS_FUSE_ROOT_ID || strcmp(name, "file"))
		return -ENOENT;
	memset(ret, 0, sizeof(*ret));
	ret->attr.ino = 2;
	ret->attr.mode = S_IFREG | 0444;
	ret->attr.size = FILE_SIZE;
	ret->attr.nlink = 1;
	return 0;
}

static int fs_getattr(void *fs, uint64_t ino, struct cas_fuse_attr *ret,
		      uint64_t *ret_attr_valid)
{
	memset(ret, 0, sizeof(*ret));
	ret->ino = ino;
	ret->mode = ino == 1 ? S_IFDIR | 0555 : S_IFREG | 0444;
	ret->nlink = 1;
	return 0;
}

static int fs_open(void *fs, uint64_t ino, uint32_t flags,
		   struct cas_fuse_open *ret)
{
	ret->fh = 7;
	ret->open_flags = 0;
	ret->backing_fd = -1;
	return ino == 2 ? 0 : -EISDIR;
}

static int fs_read(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
		   uint32_t size, struct cas_fuse_read *ret)
{
	ret->fd = data_fd;
	ret->fd_offset = off;
	ret->len = off >= FILE_SIZE ? 0 : CAS_MIN(size, FILE_SIZE - off);
	return 0;
}

static int fs_release(void *fs, uint64_t ino, uint64_t fh)
{
	return 0;
}

static const struct cas_fuse_ops stub_ops = {
	.init = fs_init,
	.lookup = fs_lookup,
	.getattr = fs_getattr,
	.open = fs_open,
	.read = fs_read,
	.release = fs_release,
};

static const struct cas_fuse_config fuse_cfg = {
	.readonly = true,
	.max_write = 4096,
	.max_pages = 32,
};

static int session_open(void *userdata, struct cas_fuse_session **ret)
{
	__atomic_add_fetch(&sessions_opened, 1, __ATOMIC_SEQ_CST);
	return cas_fuse_session_new(&stub_ops, NULL, &fuse_cfg, ret);
}

static void session_close(void *userdata, struct cas_fuse_session *s)
{
	cas_fuse_session_free(s);
	__atomic_add_fetch(&sessions_closed, 1, __ATOMIC_SEQ_CST);
}

/* ---- the frontend ---- */

struct frontend {
	int sock;
	int mem_fd;
	uint8_t *mem;
	int kick, call;
	uint16_t avail_idx;
	uint64_t unique;
	int calls; /* interrupts seen */
};

static void send_msg(struct frontend *f, uint32_t req, uint32_t flags,
		     const void *payload, uint32_t size, const int *fds,
		     size_t nfds)
{
	struct cas_vu_hdr h = {.request = req, .flags = flags, .size = size};
	struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)payload, size}};
	union {
		char buf[CMSG_SPACE(8 * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = {.msg_iov = iov, .msg_iovlen = size ? 2 : 1};

	if (nfds) {
		msg.msg_control = control.buf;
		msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	}
	REQUIRE(sendmsg(f->sock, &msg, MSG_NOSIGNAL) ==
		(ssize_t)(sizeof(h) + size));
}

/* Receives a reply; returns its payload size (-1 at end of stream). */
static int recv_reply(struct frontend *f, uint32_t req, void *payload)
{
	struct cas_vu_hdr h;
	ssize_t n = recv(f->sock, &h, sizeof(h), MSG_WAITALL);
	if (n != sizeof(h))
		return -1;
	CHECK(h.request == req);
	CHECK(h.flags == (CAS_VU_VERSION | CAS_VU_FLAG_REPLY));
	REQUIRE(h.size <= 64);
	if (h.size)
		REQUIRE(recv(f->sock, payload, h.size, MSG_WAITALL) == h.size);
	return (int)h.size;
}

static uint64_t get_u64(struct frontend *f, uint32_t req)
{
	uint64_t v = 0;
	send_msg(f, req, CAS_VU_VERSION, NULL, 0, NULL, 0);
	CHECK(recv_reply(f, req, &v) == 8);
	return v;
}

/* A request with REPLY_ACK; returns the status (0 ok). */
static uint64_t acked(struct frontend *f, uint32_t req, const void *p,
		      uint32_t size, const int *fds, size_t nfds)
{
	uint64_t status = 99;
	send_msg(f, req, CAS_VU_VERSION | CAS_VU_FLAG_NEED_REPLY, p, size, fds,
		 nfds);
	CHECK(recv_reply(f, req, &status) == 8);
	return status;
}

static int connect_to(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	REQUIRE(s >= 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	REQUIRE(connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	return s;
}

static void frontend_start(struct frontend *f, const char *path)
{
	memset(f, 0, sizeof(*f));
	f->sock = connect_to(path);
	f->mem_fd = memfd_create("guest", MFD_CLOEXEC);
	REQUIRE(f->mem_fd >= 0 && ftruncate(f->mem_fd, MEM_SIZE) == 0);
	f->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
		      f->mem_fd, 0);
	REQUIRE(f->mem != MAP_FAILED);
	f->kick = eventfd(0, EFD_CLOEXEC);
	f->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

	uint64_t features = get_u64(f, CAS_VU_GET_FEATURES);
	CHECK(features & (1ull << CAS_VIRTIO_F_VERSION_1));
	uint64_t pf = get_u64(f, CAS_VU_GET_PROTOCOL_FEATURES);
	CHECK(pf & (1ull << CAS_VU_PROTOCOL_F_REPLY_ACK));
	pf = 1ull << CAS_VU_PROTOCOL_F_REPLY_ACK;
	send_msg(f, CAS_VU_SET_PROTOCOL_FEATURES, CAS_VU_VERSION, &pf, 8, NULL,
		 0);
	CHECK(get_u64(f, CAS_VU_GET_QUEUE_NUM) >= 2);
	send_msg(f, CAS_VU_SET_OWNER, CAS_VU_VERSION, NULL, 0, NULL, 0);
	CHECK(acked(f, CAS_VU_SET_FEATURES, &features, 8, NULL, 0) == 0);

	struct {
		uint32_t n, pad;
		uint64_t gpa, size, uva, off;
	} table = {1, 0, GPA, MEM_SIZE, UVA, 0};
	CHECK(acked(f, CAS_VU_SET_MEM_TABLE, &table, sizeof(table), &f->mem_fd,
		    1) == 0);

	struct {
		uint32_t index, num;
	} st = {1, NUM};
	CHECK(acked(f, CAS_VU_SET_VRING_NUM, &st, sizeof(st), NULL, 0) == 0);
	st.num = 0;
	CHECK(acked(f, CAS_VU_SET_VRING_BASE, &st, sizeof(st), NULL, 0) == 0);
	struct {
		uint32_t index, flags;
		uint64_t desc, used, avail, log;
	} addr = {1, 0, UVA + DESC_OFF, UVA + USED_OFF, UVA + AVAIL_OFF, 0};
	CHECK(acked(f, CAS_VU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0) ==
	      0);
	uint64_t idx = 1;
	CHECK(acked(f, CAS_VU_SET_VRING_CALL, &idx, 8, &f->call, 1) == 0);
	CHECK(acked(f, CAS_VU_SET_VRING_KICK, &idx, 8, &f->kick, 1) == 0);
	st.num = 1;
	CHECK(acked(f, CAS_VU_SET_VRING_ENABLE, &st, sizeof(st), NULL, 0) == 0);
}

static void frontend_stop(struct frontend *f)
{
	close(f->sock);
	munmap(f->mem, MEM_SIZE);
	close(f->mem_fd);
	close(f->kick);
	close(f->call);
}

static struct cas_vring_desc *desc(struct frontend *f, size_t off)
{
	return (struct cas_vring_desc *)(f->mem + off);
}

static void set_desc(struct cas_vring_desc *d, uint64_t off, uint32_t len,
		     uint16_t flags, uint16_t next)
{
	d->addr = GPA + off;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/* Posts chain 0, kicks, waits for it to be used; returns the used len. */
static uint32_t submit(struct frontend *f)
{
	struct cas_vring_avail *a = (void *)(f->mem + AVAIL_OFF);
	struct cas_vring_used *u = (void *)(f->mem + USED_OFF);
	uint16_t want = (uint16_t)(f->avail_idx + 1);

	a->ring[f->avail_idx % NUM] = 0;
	f->avail_idx = want;
	__atomic_store_n(&a->idx, want, __ATOMIC_RELEASE);
	uint64_t one = 1;
	REQUIRE(write(f->kick, &one, 8) == 8);
	for (int i = 0; i < 6000; i++) {
		if (__atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) == want)
			break;
		struct pollfd p = {.fd = f->call, .events = POLLIN};
		if (poll(&p, 1, 10) > 0) {
			uint64_t v;
			REQUIRE(read(f->call, &v, 8) == 8);
			f->calls++;
		}
	}
	REQUIRE(__atomic_load_n(&u->idx, __ATOMIC_ACQUIRE) == want);
	struct cas_vring_used_elem e = u->ring[(want - 1) % NUM];
	CHECK(e.id == 0);
	return e.len;
}

/* Writes a request (header + body) at REQ_OFF; returns its length. */
static size_t put_request(struct frontend *f, uint32_t opcode, uint64_t node,
			  const void *body, size_t len)
{
	struct fuse_in_header h = {
		.len = (uint32_t)(sizeof(h) + len),
		.opcode = opcode,
		.unique = ++f->unique,
		.nodeid = node,
	};
	memcpy(f->mem + REQ_OFF, &h, sizeof(h));
	memcpy(f->mem + REQ_OFF + sizeof(h), body, len);
	return sizeof(h) + len;
}

/* One readable and one writable descriptor. */
static uint32_t simple(struct frontend *f, size_t req_len, uint32_t room)
{
	set_desc(desc(f, DESC_OFF), REQ_OFF, (uint32_t)req_len,
		 CAS_VRING_DESC_F_NEXT, 1);
	set_desc(desc(f, DESC_OFF) + 1, REPLY_OFF, room, CAS_VRING_DESC_F_WRITE,
		 0);
	memset(f->mem + REPLY_OFF, 0xee, room);
	return submit(f);
}

static struct fuse_out_header *reply_hdr(struct frontend *f)
{
	return (struct fuse_out_header *)(f->mem + REPLY_OFF);
}

static void do_init(struct frontend *f)
{
	struct fuse_init_in in = {
		.major = 7, .minor = 31, .max_readahead = 65536};
	size_t n = put_request(f, FUSE_INIT, 0, &in, sizeof(in));
	uint32_t len = simple(f, n, 4096);
	CHECK(len >= sizeof(struct fuse_out_header) + 24);
	CHECK(reply_hdr(f)->error == 0 && reply_hdr(f)->unique == f->unique);
	CHECK(reply_hdr(f)->len == len);
}

static void exercise(struct frontend *f)
{
	do_init(f);

	/* LOOKUP */
	size_t n = put_request(f, FUSE_LOOKUP, 1, "file", 5);
	uint32_t len = simple(f, n, 4096);
	CHECK(len ==
	      sizeof(struct fuse_out_header) + sizeof(struct fuse_entry_out));
	struct fuse_entry_out eo;
	memcpy(&eo, f->mem + REPLY_OFF + sizeof(struct fuse_out_header),
	       sizeof(eo));
	CHECK(reply_hdr(f)->error == 0 && eo.nodeid == 2 &&
	      eo.attr.size == FILE_SIZE);
	n = put_request(f, FUSE_LOOKUP, 1, "nope", 5);
	CHECK(simple(f, n, 4096) == sizeof(struct fuse_out_header));
	CHECK(reply_hdr(f)->error == -ENOENT);

	/* OPEN */
	struct fuse_open_in oi = {.flags = O_RDONLY};
	n = put_request(f, FUSE_OPEN, 2, &oi, sizeof(oi));
	CHECK(simple(f, n, 4096) ==
	      sizeof(struct fuse_out_header) + sizeof(struct fuse_open_out));
	CHECK(reply_hdr(f)->error == 0);

	/* READ of 10000 bytes at 1000: the header in a descriptor of its
	 * own, the data over three writable descriptors of an indirect
	 * table, each page-sized piece somewhere else. */
	struct fuse_read_in ri = {.fh = 7, .offset = 1000, .size = 10000};
	n = put_request(f, FUSE_READ, 2, &ri, sizeof(ri));
	struct cas_vring_desc *t = desc(f, TABLE_OFF);
	set_desc(&t[0], REQ_OFF, (uint32_t)n, CAS_VRING_DESC_F_NEXT, 1);
	set_desc(&t[1], REPLY_OFF, 16,
		 CAS_VRING_DESC_F_WRITE | CAS_VRING_DESC_F_NEXT, 2);
	set_desc(&t[2], REPLY_OFF + 0x8000, 4096,
		 CAS_VRING_DESC_F_WRITE | CAS_VRING_DESC_F_NEXT, 3);
	set_desc(&t[3], REPLY_OFF + 0x4000, 4096,
		 CAS_VRING_DESC_F_WRITE | CAS_VRING_DESC_F_NEXT, 4);
	set_desc(&t[4], REPLY_OFF + 0xc000, 4096, CAS_VRING_DESC_F_WRITE, 0);
	set_desc(desc(f, DESC_OFF), TABLE_OFF, 5 * 16,
		 CAS_VRING_DESC_F_INDIRECT, 0);
	len = submit(f);
	CHECK(len == 16 + 10000);
	CHECK(reply_hdr(f)->error == 0 && reply_hdr(f)->len == 16 + 10000);
	uint8_t got[10000];
	memcpy(got, f->mem + REPLY_OFF + 0x8000, 4096);
	memcpy(got + 4096, f->mem + REPLY_OFF + 0x4000, 4096);
	memcpy(got + 8192, f->mem + REPLY_OFF + 0xc000, 10000 - 8192);
	bool same = true;
	for (size_t i = 0; i < sizeof(got); i++)
		same &= got[i] == (uint8_t)((1000 + i) % 251);
	CHECK(same);

	/* The same READ with room for 100 bytes only: an EIO reply. */
	n = put_request(f, FUSE_READ, 2, &ri, sizeof(ri));
	CHECK(simple(f, n, 100) == sizeof(struct fuse_out_header));
	CHECK(reply_hdr(f)->error == -EIO && reply_hdr(f)->unique == f->unique);

	/* Writes are refused by the engine (read-only). */
	n = put_request(f, FUSE_MKDIR, 1, "\0\0\0\0\0\0\0\0new", 12);
	CHECK(simple(f, n, 4096) == sizeof(struct fuse_out_header));
	CHECK(reply_hdr(f)->error == -EROFS);

	/* The device signals after it marks a chain used, so a fast device
	 * may finish each one before submit() first polls: wait here. */
	if (f->calls == 0) {
		struct pollfd p = {.fd = f->call, .events = POLLIN};
		uint64_t v;
		if (poll(&p, 1, 60000) > 0 && read(f->call, &v, 8) == 8)
			f->calls++;
	}
	CHECK(f->calls > 0);

	/* A second INIT: a fresh session answers it. */
	int before = __atomic_load_n(&sessions_opened, __ATOMIC_SEQ_CST);
	do_init(f);
	CHECK(__atomic_load_n(&sessions_opened, __ATOMIC_SEQ_CST) ==
	      before + 1);
}

static void *run_thread(void *arg)
{
	static int r;
	r = cas_virtiofs_run(arg);
	return &r;
}

static void wait_closed(int want)
{
	for (int i = 0; i < 6000; i++) {
		if (__atomic_load_n(&sessions_closed, __ATOMIC_SEQ_CST) >= want)
			return;
		usleep(10000);
	}
}

int main(void)
{
	char dir[] = "/tmp/test-virtiofs-XXXXXX";
	char path[128];
	REQUIRE(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/sock", dir);

	data_fd = memfd_create("data", MFD_CLOEXEC);
	uint8_t *pat = malloc(FILE_SIZE);
	REQUIRE(data_fd >= 0 && pat);
	for (size_t i = 0; i < FILE_SIZE; i++)
		pat[i] = (uint8_t)(i % 251);
	REQUIRE(write(data_fd, pat, FILE_SIZE) == FILE_SIZE);
	free(pat);

	/* Something that is not a socket is never replaced. */
	int reg = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	REQUIRE(reg >= 0);
	close(reg);
	struct cas_virtiofs_config cfg = {
		.socket_path = path,
		.request_queues = 1,
		.reply_bufsize = cas_fuse_reply_bufsize(&fuse_cfg),
		.session_open = session_open,
		.session_close = session_close,
	};
	struct cas_virtiofs *v;
	CHECK(cas_virtiofs_new(&cfg, &v) == -EEXIST);
	unlink(path);

	REQUIRE(cas_virtiofs_new(&cfg, &v) == 0);
	pthread_t th;
	REQUIRE(pthread_create(&th, NULL, run_thread, v) == 0);

	struct frontend f;
	frontend_start(&f, path);
	CHECK(__atomic_load_n(&sessions_opened, __ATOMIC_SEQ_CST) == 1);
	/* A second frontend while one is connected: closed at once. */
	int other = connect_to(path);
	char c;
	CHECK(recv(other, &c, 1, 0) <= 0);
	close(other);
	exercise(&f);
	frontend_stop(&f);
	wait_closed(2);
	CHECK(__atomic_load_n(&sessions_closed, __ATOMIC_SEQ_CST) == 2);

	/* The next frontend gets a fresh session and the same service. */
	frontend_start(&f, path);
	exercise(&f);
	/* GET_VRING_BASE stops the ring at the next available entry. */
	struct {
		uint32_t index, num;
	} st = {1, 0};
	send_msg(&f, CAS_VU_GET_VRING_BASE, CAS_VU_VERSION, &st, sizeof(st),
		 NULL, 0);
	CHECK(recv_reply(&f, CAS_VU_GET_VRING_BASE, &st) == 8);
	CHECK(st.index == 1 && st.num == f.avail_idx);

	/* A first stop while a frontend is connected removes the socket and
	 * keeps serving it; a second stop drops it cleanly. */
	cas_virtiofs_stop(v);
	for (int i = 0; i < 500 && access(path, F_OK) == 0; i++)
		usleep(10 * 1000);
	CHECK(access(path, F_OK) < 0);
	CHECK(get_u64(&f, CAS_VU_GET_QUEUE_NUM) >= 2);
	cas_virtiofs_stop(v);
	int *r;
	pthread_join(th, (void **)&r);
	CHECK(*r == 0);
	char c2;
	CHECK(recv(f.sock, &c2, 1, 0) <= 0);
	frontend_stop(&f);
	CHECK(__atomic_load_n(&sessions_closed, __ATOMIC_SEQ_CST) ==
	      __atomic_load_n(&sessions_opened, __ATOMIC_SEQ_CST));
	cas_virtiofs_free(v);
	CHECK(access(path, F_OK) < 0);
	rmdir(dir);
	close(data_fd);
	return check_exit("test_virtiofs");
}
