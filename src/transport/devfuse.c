/* The /dev/fuse transport: mount, worker threads, and the reply path.
 *
 * READ replies whose data is a range of a file go through a per-thread
 * pipe: vmsplice the header, splice the file range, splice the pipe into
 * /dev/fuse. The pipe must hold a whole reply (header + the largest READ,
 * plus one page when the range is not page-aligned), or the kernel would
 * have nothing to take in one piece; so the pipe and max_pages are sized
 * together at mount time: max_pages is what the largest pipe we may have
 * can carry. Every pipe operation is non-blocking: a pipe that turns out
 * too small, or a splice that fails, falls back to pread + writev for that
 * reply. Small READs go that way anyway (two syscalls instead of three).
 */
#include "transport/devfuse.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/log.h"
#include "core/util.h"
#include "fuse/fuse_dev.h"
#include "transport/transport_i.h"
#include "transport/uring.h"

#define PAGE		 4096u
#define MAX_PAGES_WANTED 256u /* 1 MiB READs */
/* Ring entries per io_uring queue: a queue's thread serves one request at
 * a time, the others wait in the kernel's queue or in filled entries. */
#define URING_DEPTH 8
/* Below this, copying costs less than three splice calls. */
#define SPLICE_MIN (16u * 1024)
/* Request payloads we accept: a read-only mount gets no WRITE data, but
 * SETXATTR values (<= 64 KiB) must arrive whole to be refused properly. */
#define MAX_WRITE (64u * 1024)

struct worker {
	struct cas_devfuse *d;
	pthread_t thread;
	bool started;
	struct cas_devfuse_io io; /* fd: the session fd or a clone of it */
	bool own_fd;		  /* a clone, closed with the worker */
	uint8_t *req;
	size_t req_size;
	int result;
	bool unmounted; /* saw ENODEV: the kernel ended the connection */
};

struct cas_devfuse {
	char *mountpoint;
	char *fsname, *subtype;
	bool allow_other;
	bool no_passthrough;
	unsigned threads;
	unsigned threads_asked; /* --threads; 0: the default */
	int fd;
	bool mounted;
	bool via_fusermount;
	uint32_t max_pages;
	int pipe_size;			      /* 0: no splice */
	enum cas_devfuse_transport transport; /* as asked */
	/* The rings, made at mount when io_uring is to be offered; started
	 * by the worker that answers INIT. */
	struct cas_uring *uring;
	atomic_bool uring_started;
	pthread_mutex_t uring_lock; /* start vs. the end of serve */
	bool serving_done;	    /* protected by uring_lock */

	unsigned conn_id;  /* the connection's number (fusectl), 0: unknown */
	sigset_t old_mask; /* before mount blocked the stop signals */
	atomic_bool stop;
	pthread_t main_thread;
	struct cas_fuse_config cfg; /* as cas_devfuse_configure left it */
	struct cas_fuse_session *session;
	struct worker *workers;
};

/* Mounting ------------------------------------------------------------ */

static int check_mountpoint(const char *mp)
{
	struct statx stx;
	if (statx(AT_FDCWD, mp, 0, STATX_TYPE, &stx) < 0) {
		int r = cas_negerrno();
		if (r == -ENOTCONN)
			return cas_log_errno(
				-EBUSY,
				"mountpoint %s: a dead FUSE mount is there "
				"(unmount it first)",
				mp);
		return cas_log_errno(r, "mountpoint %s: %m", mp);
	}
	if (!S_ISDIR(stx.stx_mode))
		return cas_log_errno(-ENOTDIR, "mountpoint %s: %m", mp);
	if ((stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
	    (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT))
		return cas_log_errno(
			-EBUSY, "mountpoint %s: already a mount point", mp);
	return 0;
}

/* Runs fusermount3 with args; when `commfd` >= 0 it is passed as
 * _FUSE_COMMFD. Returns the exit status as 0 / -EPERM. */
static int run_fusermount(char *const argv[], int commfd)
{
	pid_t pid = fork();
	if (pid < 0)
		return cas_log_errno(cas_negerrno(), "fork: %m");
	if (pid == 0) {
		if (commfd >= 0) {
			char num[16];
			snprintf(num, sizeof(num), "%d", commfd);
			fcntl(commfd, F_SETFD, 0);
			setenv("_FUSE_COMMFD", num, 1);
		}
		execvp("fusermount3", argv);
		_exit(127);
	}
	int status;
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return cas_log_errno(cas_negerrno(), "waitpid: %m");
	if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		return cas_log_errno(-ENOENT,
				     "fusermount3: not found (package fuse3)");
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EPERM;
}

static int receive_fd(int sock)
{
	char byte;
	struct iovec iov = {&byte, 1};
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = ctl.buf,
		.msg_controllen = sizeof(ctl.buf),
	};
	ssize_t n;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		return n < 0 ? cas_negerrno() : -EPERM;
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
	    c->cmsg_len != CMSG_LEN(sizeof(int)))
		return -EPERM;
	int fd;
	memcpy(&fd, CMSG_DATA(c), sizeof(fd));
	return fd;
}

static int mount_fusermount(struct cas_devfuse *d)
{
	char opts[512];
	snprintf(opts, sizeof(opts),
		 "ro,nosuid,nodev,default_permissions,fsname=%s,subtype=%s%s",
		 d->fsname, d->subtype, d->allow_other ? ",allow_other" : "");
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return cas_log_errno(cas_negerrno(), "socketpair: %m");
	char *argv[] = {"fusermount3", "-o", opts, "--", d->mountpoint, NULL};
	int r = run_fusermount(argv, sv[1]);
	close(sv[1]);
	int fd = r < 0 ? r : receive_fd(sv[0]);
	close(sv[0]);
	if (fd < 0)
		return cas_log_errno(fd, "%s: fusermount3: %m", d->mountpoint);
	d->fd = fd;
	d->via_fusermount = true;
	d->mounted = true;
	return 0;
}

static int mount_kernel(struct cas_devfuse *d)
{
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return cas_log_errno(cas_negerrno(), "open /dev/fuse: %m");
	char opts[256], type[128];
	snprintf(opts, sizeof(opts),
		 "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_"
		 "permissions%s",
		 fd, (unsigned)getuid(), (unsigned)getgid(),
		 d->allow_other ? ",allow_other" : "");
	snprintf(type, sizeof(type), "fuse.%s", d->subtype);
	if (mount(d->fsname, d->mountpoint, type,
		  MS_RDONLY | MS_NOSUID | MS_NODEV, opts) < 0) {
		int r = cas_negerrno();
		close(fd);
		return r;
	}
	d->fd = fd;
	d->mounted = true;
	return 0;
}

static void do_unmount(struct cas_devfuse *d)
{
	if (!d->mounted)
		return;
	d->mounted = false;
	if (d->via_fusermount) {
		char *argv[] = {"fusermount3", "-u",	      "-z",
				"--",	       d->mountpoint, NULL};
		if (run_fusermount(argv, -1) < 0)
			cas_log_error("%s: unmount with fusermount3 failed",
				      d->mountpoint);
		return;
	}
	/* Detached: open files keep being served until closed (or until
	 * the process ends). */
	if (umount2(d->mountpoint, MNT_DETACH) < 0 && errno != EINVAL)
		cas_log_errno(cas_negerrno(), "%s: unmount: %m", d->mountpoint);
}

/* The largest READ a pipe we are allowed can carry whole: one slot for
 * the header, one for a range that is not page-aligned. */
static void size_pipes(struct cas_devfuse *d)
{
	int p[2];
	d->max_pages = 32; /* without splice: 128 KiB copies */
	d->pipe_size = 0;
	if (pipe2(p, O_CLOEXEC) < 0)
		return;
	int want = (int)((MAX_PAGES_WANTED + 2) * PAGE);
	int got = fcntl(p[1], F_SETPIPE_SZ, want);
	if (got < want) {
		/* Unprivileged: fs.pipe-max-size is the ceiling. */
		FILE *f = fopen("/proc/sys/fs/pipe-max-size", "re");
		unsigned max = 0;
		if (f) {
			if (fscanf(f, "%u", &max) != 1)
				max = 0;
			fclose(f);
		}
		got = max ? fcntl(p[1], F_SETPIPE_SZ, (int)max) : -1;
		if (got < 0)
			got = fcntl(p[1], F_GETPIPE_SZ);
	}
	close(p[0]);
	close(p[1]);
	if (got < (int)(8 * PAGE))
		return;
	d->pipe_size = got;
	d->max_pages = CAS_MIN(MAX_PAGES_WANTED, (uint32_t)got / PAGE - 2);
}

/* What the main thread waits for: SIGINT and SIGTERM (unmount), SIGUSR1
 * (log the request counts), SIGUSR2 (a worker ended). */
static void stop_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGUSR1);
	sigaddset(set, SIGUSR2);
}

/* Wakes a worker or a ring thread out of a blocking call. */
#define WAKE_SIGNAL SIGRTMIN

/* The largest request or reply of the connection: what the kernel wants
 * each ring entry's payload buffer to hold. */
static size_t uring_payload_size(const struct cas_devfuse *d)
{
	size_t n = CAS_MAX((size_t)CAS_FUSE_MIN_READ_BUFFER, (size_t)MAX_WRITE);
	return CAS_MAX(n, (size_t)d->max_pages * PAGE);
}

/* auto: io_uring when the kernel has it on and the rings can be made;
 * io-uring: that or fail; devfuse: never. */
static int choose_transport(struct cas_devfuse *d)
{
	if (d->transport == CAS_DEVFUSE_DEVFUSE)
		return 0;
	if (!cas_uring_enabled()) {
		if (d->transport == CAS_DEVFUSE_IO_URING)
			return cas_log_errno(
				-EOPNOTSUPP,
				"%s: io_uring transport: the kernel has "
				"it off (/sys/module/fuse/parameters/"
				"enable_uring)",
				d->mountpoint);
		return 0;
	}
	struct cas_fuse_config cfg = {.max_pages = d->max_pages,
				      .max_write = MAX_WRITE};
	int r = cas_uring_new(uring_payload_size(d),
			      cas_fuse_reply_bufsize(&cfg), URING_DEPTH,
			      d->threads_asked, &d->uring);
	if (r < 0 && d->transport == CAS_DEVFUSE_IO_URING)
		return cas_log_errno(r, "%s: io_uring transport: %m",
				     d->mountpoint);
	return 0;
}

int cas_devfuse_mount(const struct cas_devfuse_options *opts,
		      struct cas_devfuse **ret)
{
	int r = check_mountpoint(opts->mountpoint);
	if (r < 0)
		return r;
	struct cas_devfuse *d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->fd = -1;
	d->mountpoint = strdup(opts->mountpoint);
	d->fsname = strdup(opts->fsname ? opts->fsname : "castore");
	d->subtype = strdup(opts->subtype ? opts->subtype : "castore");
	d->allow_other = opts->allow_other;
	d->no_passthrough = opts->no_passthrough;
	d->threads = opts->threads;
	d->threads_asked = opts->threads;
	if (!d->threads) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		d->threads = n > 0 ? (unsigned)n : 1;
	}
	if (!d->mountpoint || !d->fsname || !d->subtype) {
		cas_devfuse_free(d);
		return -ENOMEM;
	}
	size_pipes(d);
	pthread_mutex_init(&d->uring_lock, NULL);
	atomic_init(&d->uring_started, false);
	d->transport = opts->transport;
	r = choose_transport(d);
	if (r < 0) {
		cas_devfuse_free(d);
		return r;
	}

	/* From the moment the mount exists, SIGINT and SIGTERM must unmount:
	 * hold them until serve waits for them. */
	sigset_t set;
	stop_signals(&set);
	pthread_sigmask(SIG_BLOCK, &set, &d->old_mask);
	r = mount_kernel(d);
	if (r == -EPERM || r == -EACCES)
		r = mount_fusermount(d);
	else if (r < 0)
		cas_log_errno(r, "%s: %m", d->mountpoint);
	if (r < 0) {
		pthread_sigmask(SIG_SETMASK, &d->old_mask, NULL);
		cas_devfuse_free(d);
		return r;
	}
	*ret = d;
	return 0;
}

/* Serving -------------------------------------------------------------- */

static int backing_open(void *transport, int fd)
{
	struct cas_devfuse *d = transport;
	struct cas_fuse_backing_map map = {.fd = fd, .flags = 0};
	int id = ioctl(d->fd, CAS_FUSE_DEV_IOC_BACKING_OPEN, &map);
	return id < 0 ? cas_negerrno() : id;
}

static int backing_close(void *transport, int backing_id)
{
	struct cas_devfuse *d = transport;
	uint32_t id = (uint32_t)backing_id;
	return ioctl(d->fd, CAS_FUSE_DEV_IOC_BACKING_CLOSE, &id) < 0
		       ? cas_negerrno()
		       : 0;
}

static void write_reply(struct cas_devfuse_io *io, struct cas_fuse_reply *reply,
			const struct iovec *iov, int cnt)
{
	ssize_t n;
	do
		n = writev(io->fd, iov, cnt);
	while (n < 0 && errno == EINTR);
	/* ENOENT: the request was interrupted meanwhile; the engine
	 * releases a handle the reply would have handed out. */
	if (n < 0 && errno == ENOENT)
		reply->lost = true;
	else if (n < 0 && errno != ENODEV)
		cas_log_warning_errno(cas_negerrno(), "write reply: %m");
}

/* Empties the pipe after a splice that did not go through. */
static void drain_pipe(struct cas_devfuse_io *io)
{
	for (;;) {
		ssize_t n = read(io->pipe[0], io->scratch, io->scratch_size);
		if (n <= 0 && !(n < 0 && errno == EINTR))
			break;
	}
}

/* 1 if sent (or the request is gone), 0 to fall back to copying. */
static int send_splice(struct cas_devfuse_io *io, struct cas_fuse_reply *reply)
{
	size_t total = reply->len + reply->fd_len;
	if (total + PAGE > (size_t)io->pipe_size)
		return 0;
	struct iovec h = {reply->buf, reply->len};
	ssize_t n = vmsplice(io->pipe[1], &h, 1, SPLICE_F_NONBLOCK);
	if (n != (ssize_t)reply->len) {
		if (n > 0)
			drain_pipe(io);
		return 0;
	}
	loff_t off = (loff_t)reply->fd_offset;
	size_t moved = 0;
	while (moved < reply->fd_len) {
		n = splice(reply->fd, &off, io->pipe[1], NULL,
			   reply->fd_len - moved,
			   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			drain_pipe(io);
			return 0;
		}
		moved += (size_t)n;
	}
	do
		n = splice(io->pipe[0], NULL, io->fd, NULL, total,
			   SPLICE_F_MOVE);
	while (n < 0 && errno == EINTR);
	if (n == (ssize_t)total)
		return 1;
	int e = errno;
	drain_pipe(io);
	reply->lost = n < 0 && e == ENOENT;
	if (n < 0 && (e == ENOENT || e == ENODEV))
		return 1;
	return 0;
}

static void send_copy(struct cas_devfuse_io *io, struct cas_fuse_reply *reply)
{
	size_t want = CAS_MIN(reply->fd_len, io->scratch_size);
	size_t got = 0;
	while (got < want) {
		ssize_t n = pread(reply->fd, io->scratch + got, want - got,
				  (off_t)(reply->fd_offset + got));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	/* A short file: the engine makes the header count what is sent. */
	cas_fuse_reply_shorten(reply, got);
	got = reply->fd_len;
	struct iovec iov[2] = {{reply->buf, reply->len}, {io->scratch, got}};
	write_reply(io, reply, iov, got ? 2 : 1);
}

static void send_reply(struct cas_devfuse_io *io, struct cas_fuse_reply *reply)
{
	if (reply->fd < 0 || reply->fd_len == 0) {
		struct iovec iov = {reply->buf, reply->len};
		write_reply(io, reply, &iov, 1);
		return;
	}
	if (io->pipe[0] >= 0 && reply->fd_len >= SPLICE_MIN &&
	    send_splice(io, reply))
		return;
	send_copy(io, reply);
}

/* INIT is answered: the kernel now knows what we agreed on. */
static void connection_ready(struct cas_devfuse *d)
{
	const struct cas_fuse_conn *conn = cas_fuse_session_conn(d->session);
	if (!d->uring || !conn->io_uring) {
		cas_log_info("%s: transport /dev/fuse, %u threads%s",
			     d->mountpoint, d->threads,
			     d->transport == CAS_DEVFUSE_AUTO
				     ? " (io_uring is off in the kernel)"
				     : "");
		return;
	}
	pthread_mutex_lock(&d->uring_lock);
	if (!d->serving_done && !atomic_load(&d->uring_started)) {
		int r = cas_uring_start(d->uring, d->fd, d->session,
					WAKE_SIGNAL);
		atomic_store(&d->uring_started, true);
		if (r == 0)
			cas_log_info("%s: transport FUSE over io_uring, "
				     "%u queues of %u entries, %u threads",
				     d->mountpoint, cas_uring_queues(d->uring),
				     URING_DEPTH, cas_uring_workers(d->uring));
		else
			cas_log_warning("%s: io_uring failed, transport "
					"/dev/fuse",
					d->mountpoint);
	}
	pthread_mutex_unlock(&d->uring_lock);
}

bool cas_devfuse_answer(struct cas_fuse_session *s, struct cas_devfuse_io *io,
			const uint8_t *req, size_t n, bool *ret_init)
{
	struct iovec in = {(void *)req, n};
	struct cas_fuse_reply reply = {
		.buf = io->reply,
		.buf_size = io->reply_size,
		.fd = -1,
	};
	cas_fuse_session_process(s, &in, 1, &reply);
	if (reply.send)
		send_reply(io, &reply);
	*ret_init = reply.init && !reply.lost;
	cas_fuse_reply_done(s, &reply);
	return reply.destroyed;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct cas_devfuse *d = w->d;
	while (!atomic_load(&d->stop)) {
		ssize_t n = read(w->io.fd, w->req, w->req_size);
		if (n < 0) {
			int e = errno;
			if (e == EINTR || e == EAGAIN || e == ENOENT)
				continue;
			if (e == ENODEV) {
				w->unmounted = true;
				break;
			}
			w->result = cas_log_errno(-e, "read /dev/fuse: %m");
			break;
		}
		bool init, destroyed;
		destroyed = cas_devfuse_answer(d->session, &w->io, w->req,
					       (size_t)n, &init);
		if (init)
			connection_ready(d);
		if (destroyed) {
			w->unmounted = true;
			break;
		}
	}
	/* Tell the main thread (waiting in sigwaitinfo) that we ended. */
	if (!atomic_load(&d->stop))
		pthread_kill(d->main_thread, SIGUSR2);
	return NULL;
}

static void wake_handler(int sig)
{
	(void)sig;
}

static int clone_fd(int session_fd)
{
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return cas_negerrno();
	uint32_t s = (uint32_t)session_fd;
	if (ioctl(fd, CAS_FUSE_DEV_IOC_CLONE, &s) < 0) {
		int r = cas_negerrno();
		close(fd);
		return r;
	}
	return fd;
}

static int worker_init(struct cas_devfuse *d, struct worker *w, unsigned i,
		       size_t req_size, size_t reply_size)
{
	w->d = d;
	w->io.pipe[0] = w->io.pipe[1] = -1;
	w->io.pipe_size = d->pipe_size;
	w->io.fd = d->fd;
	if (i > 0) {
		int fd = clone_fd(d->fd);
		if (fd >= 0) {
			w->io.fd = fd;
			w->own_fd = true;
		} else {
			cas_log_debug_errno(
				fd, "clone /dev/fuse: %m (sharing one fd)");
		}
	}
	w->req_size = req_size;
	w->io.reply_size = reply_size;
	w->io.scratch_size = (size_t)d->max_pages * PAGE;
	w->req = aligned_alloc(PAGE, (w->req_size + PAGE - 1) / PAGE * PAGE);
	w->io.reply =
		aligned_alloc(PAGE, (reply_size + PAGE - 1) / PAGE * PAGE);
	w->io.scratch = aligned_alloc(PAGE, w->io.scratch_size);
	if (!w->req || !w->io.reply || !w->io.scratch)
		return -ENOMEM;
	if (d->pipe_size > 0 &&
	    pipe2(w->io.pipe, O_CLOEXEC | O_NONBLOCK) == 0 &&
	    fcntl(w->io.pipe[1], F_SETPIPE_SZ, d->pipe_size) < d->pipe_size) {
		close(w->io.pipe[0]);
		close(w->io.pipe[1]);
		w->io.pipe[0] = w->io.pipe[1] = -1;
	}
	return 0;
}

static void worker_release(struct worker *w)
{
	if (w->own_fd)
		close(w->io.fd);
	if (w->io.pipe[0] >= 0) {
		close(w->io.pipe[0]);
		close(w->io.pipe[1]);
	}
	free(w->req);
	free(w->io.reply);
	free(w->io.scratch);
}

/* The default readahead (128 KiB) caps READs whatever max_pages says;
 * root may raise it for this mount's bdi. */
static void raise_readahead(struct cas_devfuse *d)
{
	struct stat st;
	if (stat(d->mountpoint, &st) < 0)
		return;
	/* The same number names the connection in fusectl. */
	if (major(st.st_dev) == 0)
		d->conn_id = minor(st.st_dev);
	char path[128];
	snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb",
		 major(st.st_dev), minor(st.st_dev));
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	char val[32];
	int n = snprintf(val, sizeof(val), "%u\n",
			 d->max_pages * (PAGE / 1024));
	if (write(fd, val, (size_t)n) < 0)
		cas_log_debug_errno(cas_negerrno(), "%s: %m", path);
	close(fd);
}

void cas_transport_knock_join(pthread_t thread, int sig)
{
	for (;;) {
		pthread_kill(thread, sig);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 20 * 1000 * 1000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		if (pthread_timedjoin_np(thread, NULL, &ts) == 0)
			return;
	}
}

/* Ends the connection now (fusectl's abort), for a stop while io_uring
 * serves. The rings' commands hold /dev/fuse open until io_uring's own
 * teardown, which runs after the process is gone: until then the kernel
 * would queue new requests for rings nobody serves and end them as
 * aborted or cancelled (ECONNABORTED, ECANCELED). Aborted now, they fail
 * with ENOTCONN, as with /dev/fuse alone, and the rings' commands end.
 * fusectl is mounted in a child's private mount namespace (this process
 * has threads, so it cannot unshare itself); without privilege nothing
 * happens and the old behaviour stays. */
static void abort_connection(struct cas_devfuse *d)
{
	if (d->conn_id == 0)
		return;
	char path[96];
	snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort",
		 d->conn_id);
	pid_t pid = fork();
	if (pid < 0) {
		cas_log_debug_errno(cas_negerrno(), "fork: %m");
		return;
	}
	if (pid == 0) {
		if (unshare(CLONE_NEWNS) < 0 ||
		    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
			_exit(1);
		(void)mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0,
			    NULL); /* EBUSY: mounted already */
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "1", 1) != 1)
			_exit(2);
		_exit(0);
	}
	int status = 0;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		cas_log_debug("%s: could not abort connection %u "
			      "(status %#x)",
			      d->mountpoint, d->conn_id, (unsigned)status);
}

static void stop_workers(struct cas_devfuse *d)
{
	atomic_store(&d->stop, true);
	pthread_mutex_lock(&d->uring_lock);
	d->serving_done = true;
	pthread_mutex_unlock(&d->uring_lock);
	for (unsigned i = 0; i < d->threads; i++) {
		struct worker *w = &d->workers[i];
		if (!w->started)
			continue;
		cas_transport_knock_join(w->thread, WAKE_SIGNAL);
		w->started = false;
	}
	/* The rings go with the session they serve. */
	cas_uring_free(d->uring);
	d->uring = NULL;
}

void cas_devfuse_configure(struct cas_devfuse *d, struct cas_fuse_config *cfg)
{
	cfg->max_write = MAX_WRITE;
	cfg->max_pages = d->max_pages;
	cfg->max_readahead = d->max_pages * PAGE;
	/* Registering backing files needs CAP_SYS_ADMIN. */
	if (geteuid() == 0 && !d->no_passthrough) {
		cfg->backing_open = backing_open;
		cfg->backing_close = backing_close;
		cfg->transport = d;
	} else {
		cfg->backing_open = NULL;
		cfg->backing_close = NULL;
		cfg->transport = NULL;
	}
	cfg->io_uring = d->uring != NULL;
	d->cfg = *cfg;
}

int cas_devfuse_serve(struct cas_devfuse *d, struct cas_fuse_session *session)
{
	int r;
	d->session = session;
	sigset_t set;
	stop_signals(&set);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	struct sigaction sa = {.sa_handler = wake_handler};
	sigemptyset(&sa.sa_mask);
	sigaction(WAKE_SIGNAL, &sa, NULL); /* no SA_RESTART: read() returns */
	d->main_thread = pthread_self();

	d->workers = calloc(d->threads, sizeof(*d->workers));
	if (!d->workers) {
		r = cas_log_errno(-ENOMEM, "%s: %m", d->mountpoint);
		goto out;
	}
	size_t req_size = cas_fuse_request_bufsize(&d->cfg);
	size_t reply_size = cas_fuse_reply_bufsize(&d->cfg);
	for (unsigned i = 0; i < d->threads; i++) {
		struct worker *w = &d->workers[i];
		r = worker_init(d, w, i, req_size, reply_size);
		if (r < 0) {
			cas_log_errno(r, "worker: %m");
			goto out;
		}
		r = -pthread_create(&w->thread, NULL, worker_main, w);
		if (r < 0) {
			cas_log_errno(r, "start worker: %m");
			goto out;
		}
		w->started = true;
	}
	raise_readahead(d);

	/* The first SIGINT or SIGTERM detaches the mount: the path is free
	 * at once and nothing new can be opened, but files already open
	 * keep being served until the last one closes and the kernel ends
	 * the connection (a worker then sees ENODEV). A second signal ends
	 * everything at once. */
	bool detached = false;
	for (;;) {
		int sig = sigwaitinfo(&set, NULL);
		if (sig < 0)
			continue; /* EINTR */
		if (sig == SIGUSR1) {
			cas_fuse_session_log_counts(d->session, CAS_LOG_WARNING,
						    "requests");
			continue;
		}
		if (sig == SIGUSR2)
			break; /* a worker ended: the connection is gone */
		if (detached) {
			if (atomic_load(&d->uring_started))
				abort_connection(d);
			break;
		}
		detached = true;
		do_unmount(d);
		cas_log_info("%s: detached; files still open are served "
			     "until closed (signal again to end now)",
			     d->mountpoint);
	}
	r = 0;
out:
	stop_workers(d);
	if (d->workers) {
		for (unsigned i = 0; i < d->threads; i++) {
			struct worker *w = &d->workers[i];
			if (w->unmounted)
				d->mounted =
					false; /* never unmount a stranger */
			if (w->result < 0 && r == 0)
				r = w->result;
			worker_release(w);
		}
		free(d->workers);
		d->workers = NULL;
	}
	d->session = NULL;
	/* A signal that arrived while stopping must not kill us later. */
	struct timespec zero = {0, 0};
	while (sigtimedwait(&set, NULL, &zero) > 0)
		;
	pthread_sigmask(SIG_SETMASK, &d->old_mask, NULL);
	return r;
}

void cas_devfuse_free(struct cas_devfuse *d)
{
	if (!d)
		return;
	do_unmount(d);
	cas_uring_free(d->uring);
	if (d->fd >= 0)
		close(d->fd);
	pthread_mutex_destroy(&d->uring_lock);
	free(d->mountpoint);
	free(d->fsname);
	free(d->subtype);
	free(d);
}
