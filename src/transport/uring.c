/* FUSE over io_uring: worker threads, each with one io_uring holding the
 * entries of one or more kernel queues.
 *
 * The rings and buffers are made before the mount's INIT (cas_uring_new),
 * so that offering io_uring in INIT is a promise we can keep: once the
 * kernel accepted it, every new request waits until each queue has an
 * entry registered, and a daemon that then failed to register would hang
 * the mount. What can still fail after INIT (starting a thread) is handed
 * back to the kernel as a registration it refuses, which turns io_uring off
 * for the connection and lets requests flow over /dev/fuse again.
 *
 * An entry has exactly one command in flight at any time (its REGISTER,
 * then a COMMIT_AND_FETCH per request), so a submission ring of `depth`
 * slots never overflows and a completion ring of twice that never drops.
 */
#include "transport/uring.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "core/log.h"
#include "core/util.h"
#include "fuse/fuse_dev.h"
#include "transport/transport_i.h"

#define SQE_SIZE 128 /* IORING_SETUP_SQE128: room for the FUSE command */

struct entry {
	uint16_t qid; /* the kernel queue it is registered with */
	struct cas_fuse_uring_req_header *hdr;
	uint8_t *payload;
	struct iovec iov[2]; /* what REGISTER points the kernel at */
	bool registering;    /* its command in flight is a REGISTER */
	/* The handle the reply in flight hands out (an OPEN answered): the
	 * commit's completion says whether the kernel took it; if not,
	 * nobody will RELEASE it and we do (cas_fuse_reply_done, lost). */
	uint8_t open_kind;
	uint64_t open_ino, open_fh;
};

/* One worker: a thread and its io_uring, serving the kernel queues k,
 * k + nw, k + 2 nw, ... (nw workers), `depth` entries each. */
struct queue {
	struct cas_uring *u;
	unsigned qid; /* the worker's number k: its first queue */
	unsigned nents;
	pthread_t thread;
	bool started;

	int ring_fd;
	void *sq_map, *cq_map, *sqes;
	size_t sq_map_len, cq_map_len, sqes_len;
	_Atomic uint32_t *sq_head, *sq_tail, *cq_head, *cq_tail;
	uint32_t sq_mask, cq_mask;
	uint32_t *sq_array;
	struct io_uring_cqe *cqes;
	uint32_t tail; /* our copy of sq_tail */

	struct entry *ents;
	uint8_t *reply; /* the engine's reply buffer, one request at a time */
	size_t reply_size;
};

struct cas_uring {
	int fd; /* the session's /dev/fuse fd */
	struct cas_fuse_session *session;
	size_t payload_size;
	unsigned depth;
	unsigned nq; /* the kernel's queues */
	unsigned nw; /* workers, at most nq */
	int wake_sig;
	atomic_bool stop;
	struct queue *q;
};

bool cas_uring_enabled(void)
{
	FILE *f = fopen("/sys/module/fuse/parameters/enable_uring", "re");
	if (!f)
		return false;
	int c = fgetc(f);
	fclose(f);
	return c == 'Y' || c == '1';
}

/* The kernel makes one queue per possible CPU. */
static unsigned possible_cpus(void)
{
	FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
	unsigned n = 0;
	if (f) {
		unsigned a, b;
		char sep;
		for (;;) {
			if (fscanf(f, "%u", &a) != 1)
				break;
			b = a;
			int c = fgetc(f);
			if (c == '-') {
				if (fscanf(f, "%u", &b) != 1)
					break;
				c = fgetc(f);
			}
			if (b >= a)
				n += b - a + 1;
			sep = (char)c;
			if (sep != ',')
				break;
		}
		fclose(f);
	}
	if (n == 0) {
		long k = sysconf(_SC_NPROCESSORS_CONF);
		n = k > 0 ? (unsigned)k : 1;
	}
	return n;
}

static int ring_setup(struct queue *q, unsigned entries)
{
	struct io_uring_params p = {.flags = IORING_SETUP_SQE128 |
					     IORING_SETUP_CQSIZE,
				    .cq_entries = 2 * entries};
	int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (fd < 0)
		return cas_negerrno();
	q->ring_fd = fd;
	q->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
	q->cq_map_len =
		p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	q->sq_map = mmap(NULL, q->sq_map_len, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
	if (q->sq_map == MAP_FAILED) {
		q->sq_map = NULL;
		return cas_negerrno();
	}
	q->cq_map = mmap(NULL, q->cq_map_len, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
	if (q->cq_map == MAP_FAILED) {
		q->cq_map = NULL;
		return cas_negerrno();
	}
	q->sqes_len = (size_t)p.sq_entries * SQE_SIZE;
	q->sqes = mmap(NULL, q->sqes_len, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
	if (q->sqes == MAP_FAILED) {
		q->sqes = NULL;
		return cas_negerrno();
	}
	uint8_t *sq = q->sq_map, *cq = q->cq_map;
	q->sq_head = (_Atomic uint32_t *)(sq + p.sq_off.head);
	q->sq_tail = (_Atomic uint32_t *)(sq + p.sq_off.tail);
	q->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
	q->sq_array = (uint32_t *)(sq + p.sq_off.array);
	q->cq_head = (_Atomic uint32_t *)(cq + p.cq_off.head);
	q->cq_tail = (_Atomic uint32_t *)(cq + p.cq_off.tail);
	q->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
	q->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	q->tail = atomic_load_explicit(q->sq_tail, memory_order_relaxed);
	return 0;
}

static void queue_release(struct queue *q)
{
	if (q->sqes)
		munmap(q->sqes, q->sqes_len);
	if (q->cq_map)
		munmap(q->cq_map, q->cq_map_len);
	if (q->sq_map)
		munmap(q->sq_map, q->sq_map_len);
	if (q->ring_fd >= 0)
		close(q->ring_fd);
	if (q->ents) {
		for (unsigned i = 0; i < q->nents; i++) {
			free(q->ents[i].hdr);
			free(q->ents[i].payload);
		}
		free(q->ents);
	}
	free(q->reply);
}

/* Queues one FUSE command for entry i (REGISTER, or COMMIT_AND_FETCH of
 * the request `commit_id` it holds). */
static void prep_cmd(struct queue *q, unsigned i, uint32_t op,
		     uint64_t commit_id)
{
	uint32_t idx = q->tail & q->sq_mask;
	struct io_uring_sqe *sqe =
		(struct io_uring_sqe *)((uint8_t *)q->sqes + idx * SQE_SIZE);
	memset(sqe, 0, SQE_SIZE);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = q->u->fd;
	sqe->cmd_op = op;
	sqe->user_data = i;
	q->ents[i].registering = op == CAS_FUSE_URING_CMD_REGISTER;
	if (op == CAS_FUSE_URING_CMD_REGISTER) {
		sqe->addr = (uint64_t)(uintptr_t)q->ents[i].iov;
		sqe->len = 2;
	}
	struct cas_fuse_uring_cmd_req cmd = {
		.commit_id = commit_id,
		.qid = q->ents[i].qid,
	};
	memcpy(sqe->cmd, &cmd, sizeof(cmd));
	q->sq_array[idx] = idx;
	q->tail++;
	atomic_store_explicit(q->sq_tail, q->tail, memory_order_release);
}

/* Submits what is queued and waits for at least one completion. */
static int submit_wait(struct queue *q)
{
	uint32_t pending = q->tail - atomic_load_explicit(q->sq_head,
							  memory_order_acquire);
	long r = syscall(__NR_io_uring_enter, q->ring_fd, pending, 1,
			 IORING_ENTER_GETEVENTS, NULL, 0);
	return r < 0 ? cas_negerrno() : 0;
}

/* The commit of entry i completed with `res`: 0 means the kernel took
 * the reply (and gave the entry its next request); anything else means
 * the reply reached nobody, so a handle it handed out is released. */
static void commit_done(struct queue *q, unsigned i, int res)
{
	struct entry *e = &q->ents[i];
	if (e->open_kind && res != 0 && !e->registering) {
		struct cas_fuse_reply lost = {
			.fd = -1,
			.lost = true,
			.open_kind = e->open_kind,
			.open_ino = e->open_ino,
			.open_fh = e->open_fh,
		};
		cas_fuse_reply_done(q->u->session, &lost);
	}
	e->open_kind = 0;
}

uint64_t cas_uring_answer(struct cas_fuse_session *s,
			  struct cas_fuse_uring_req_header *hdr,
			  uint8_t *payload, size_t payload_size, uint8_t *reply,
			  size_t reply_size, struct cas_uring_open *ret_open)
{
	struct cas_fuse_reply rep = {
		.buf = reply,
		.buf_size = reply_size,
		.fd = -1,
	};
	cas_fuse_session_process_uring(s, hdr, payload, payload_size, &rep);
	if (rep.send && rep.fd >= 0 && rep.fd_len > 0) {
		/* File data goes straight behind the reply's own payload. */
		size_t at = rep.len - CAS_FUSE_REPLY_HEADER_SIZE;
		size_t want = rep.fd_len, got = 0;
		if (at > payload_size || want > payload_size - at)
			want = 0;
		while (got < want) {
			ssize_t n =
				pread(rep.fd, payload + at + got, want - got,
				      (off_t)(rep.fd_offset + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			got += (size_t)n;
		}
		cas_fuse_reply_shorten(&rep, got);
	}
	uint64_t commit_id =
		cas_fuse_uring_commit(hdr, payload, payload_size, &rep);
	*ret_open = (struct cas_uring_open){
		.kind = rep.send ? rep.open_kind : 0,
		.ino = rep.open_ino,
		.fh = rep.open_fh,
	};
	rep.open_kind = 0; /* not lost yet: decided at the completion */
	cas_fuse_reply_done(s, &rep);
	return commit_id;
}

/* Runs the request entry i holds and queues its commit. */
static void serve_entry(struct queue *q, unsigned i)
{
	struct cas_uring *u = q->u;
	struct entry *e = &q->ents[i];
	struct cas_uring_open open;
	uint64_t commit_id = cas_uring_answer(u->session, e->hdr, e->payload,
					      u->payload_size, q->reply,
					      q->reply_size, &open);
	e->open_kind = open.kind;
	e->open_ino = open.ino;
	e->open_fh = open.fh;
	prep_cmd(q, i, CAS_FUSE_URING_CMD_COMMIT_AND_FETCH, commit_id);
}

/* The kernel hands a request to the queue of the CPU its caller runs on:
 * a worker runs on the CPUs of its queues. */
static void pin_to_queues(const struct queue *q)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	for (unsigned c = q->qid; c < q->u->nq && c < CPU_SETSIZE;
	     c += q->u->nw)
		CPU_SET(c, &set);
	(void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *queue_main(void *arg)
{
	struct queue *q = arg;
	struct cas_uring *u = q->u;
	pin_to_queues(q);
	for (unsigned i = 0; i < q->nents; i++)
		prep_cmd(q, i, CAS_FUSE_URING_CMD_REGISTER, 0);
	unsigned live = q->nents;
	while (live > 0 && !atomic_load(&u->stop)) {
		int r = submit_wait(q);
		if (r == -EINTR || r == -EAGAIN || r == -EBUSY)
			continue;
		if (r < 0) {
			cas_log_errno(r, "io_uring worker %u: %m", q->qid);
			break;
		}
		uint32_t head =
			atomic_load_explicit(q->cq_head, memory_order_relaxed);
		uint32_t tail =
			atomic_load_explicit(q->cq_tail, memory_order_acquire);
		for (; head != tail; head++) {
			struct io_uring_cqe cqe = q->cqes[head & q->cq_mask];
			unsigned i = (unsigned)cqe.user_data;
			if (i >= q->nents)
				continue;
			commit_done(q, i, cqe.res);
			if (cqe.res == 0) {
				serve_entry(q, i);
			} else if (cqe.res == -ENOTCONN ||
				   cqe.res == -ECONNABORTED ||
				   cqe.res == -ECANCELED ||
				   cqe.res == -ENODEV) {
				live--; /* the connection is going */
			} else if (q->ents[i].registering) {
				/* Refused outright: this entry stays out (the
				 * kernel then gives up io_uring itself). */
				cas_log_warning_errno(cqe.res,
						      "io_uring worker %u: "
						      "register: %m",
						      q->qid);
				live--;
			} else {
				/* The kernel lost track of the entry (a
				 * commit it could not match): hand the
				 * buffers over again as a new one. */
				cas_log_debug_errno(cqe.res,
						    "io_uring worker %u entry "
						    "%u: %m, registering again",
						    q->qid, i);
				prep_cmd(q, i, CAS_FUSE_URING_CMD_REGISTER, 0);
			}
		}
		atomic_store_explicit(q->cq_head, head, memory_order_release);
	}
	return NULL;
}

int cas_uring_new(size_t payload_size, size_t reply_size, unsigned depth,
		  unsigned workers, struct cas_uring **ret)
{
	struct cas_uring *u = calloc(1, sizeof(*u));
	if (!u)
		return -ENOMEM;
	u->fd = -1;
	u->payload_size = payload_size;
	u->depth = depth ? depth : 1;
	u->nq = CAS_MIN(possible_cpus(), (unsigned)UINT16_MAX);
	/* More workers than queues would only share queues. */
	u->nw = workers && workers < u->nq ? workers : u->nq;
	atomic_init(&u->stop, false);
	u->q = calloc(u->nw, sizeof(*u->q));
	int r = u->q ? 0 : -ENOMEM;
	for (unsigned k = 0; r == 0 && k < u->nw; k++) {
		struct queue *q = &u->q[k];
		q->u = u;
		q->qid = k;
		q->ring_fd = -1;
		q->nents = (u->nq - k + u->nw - 1) / u->nw * u->depth;
		r = ring_setup(q, q->nents);
		if (r < 0)
			break;
		q->reply_size = reply_size;
		q->reply = malloc(reply_size);
		q->ents = calloc(q->nents, sizeof(*q->ents));
		if (!q->reply || !q->ents) {
			r = -ENOMEM;
			break;
		}
		for (unsigned i = 0; i < q->nents; i++) {
			struct entry *e = &q->ents[i];
			e->qid = (uint16_t)(k + i / u->depth * u->nw);
			e->hdr = malloc(sizeof(*e->hdr));
			/* Touched only as far as requests and replies use
			 * it: most of a 1 MiB buffer never is. */
			e->payload = malloc(payload_size);
			if (!e->hdr || !e->payload) {
				r = -ENOMEM;
				break;
			}
			memset(e->hdr, 0, sizeof(*e->hdr));
			e->iov[0] = (struct iovec){e->hdr, sizeof(*e->hdr)};
			e->iov[1] = (struct iovec){e->payload, payload_size};
		}
	}
	if (r < 0) {
		cas_log_errno(r, "io_uring: %m");
		cas_uring_free(u);
		return r;
	}
	*ret = u;
	return 0;
}

unsigned cas_uring_queues(const struct cas_uring *u)
{
	return u ? u->nq : 0;
}

unsigned cas_uring_workers(const struct cas_uring *u)
{
	return u ? u->nw : 0;
}

/* A registration the kernel refuses (no such queue) makes it give up
 * io_uring for the connection, so requests blocked waiting for our rings
 * go over /dev/fuse instead. Sent on the ring of queue k, whose thread
 * never started (no other thread touches that ring). */
static void give_up(struct cas_uring *u, unsigned k)
{
	struct queue *q = &u->q[k];
	uint32_t idx = q->tail & q->sq_mask;
	struct io_uring_sqe *sqe =
		(struct io_uring_sqe *)((uint8_t *)q->sqes + idx * SQE_SIZE);
	memset(sqe, 0, SQE_SIZE);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = u->fd;
	sqe->cmd_op = CAS_FUSE_URING_CMD_REGISTER;
	sqe->addr = (uint64_t)(uintptr_t)q->ents[0].iov;
	sqe->len = 2;
	sqe->user_data = UINT64_MAX;
	struct cas_fuse_uring_cmd_req cmd = {.qid = UINT16_MAX};
	memcpy(sqe->cmd, &cmd, sizeof(cmd));
	q->sq_array[idx] = idx;
	q->tail++;
	atomic_store_explicit(q->sq_tail, q->tail, memory_order_release);
	(void)submit_wait(q);
}

int cas_uring_start(struct cas_uring *u, int fd, struct cas_fuse_session *s,
		    int wake_sig)
{
	u->fd = fd;
	u->session = s;
	u->wake_sig = wake_sig;
	for (unsigned k = 0; k < u->nw; k++) {
		struct queue *q = &u->q[k];
		int r = -pthread_create(&q->thread, NULL, queue_main, q);
		if (r < 0) {
			/* Queues already running stay, but the ring is
			 * never complete: give it up, /dev/fuse serves. */
			cas_log_errno(r, "io_uring: start worker %u: %m", k);
			give_up(u, k);
			return r;
		}
		q->started = true;
	}
	return 0;
}

void cas_uring_free(struct cas_uring *u)
{
	if (!u)
		return;
	atomic_store(&u->stop, true);
	for (unsigned k = 0; u->q && k < u->nw; k++) {
		struct queue *q = &u->q[k];
		if (q->started)
			cas_transport_knock_join(q->thread, u->wake_sig);
		q->started = false;
	}
	for (unsigned k = 0; u->q && k < u->nw; k++)
		if (u->q[k].u)
			queue_release(&u->q[k]);
	free(u->q);
	free(u);
}
