#include "transport/virtiofs.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "core/log.h"
#include "transport/vhost_user.h"
#include "transport/virtiofs_i.h"

#define VIRTIOFS_DEFAULT_REQUEST_QUEUES 16

struct cas_virtiofs {
	struct cas_virtiofs_config cfg;
	char *socket_path;
	int listen_fd;
	int stop_fd;
	unsigned stops; /* stop requests seen; only the run thread touches */
	struct cas_vu_dev *dev;

	/* The session of the connected frontend. Queue threads hold the
	 * read lock while a request is in the engine; replacing it (a new
	 * INIT, a disconnect) takes the write lock. */
	pthread_rwlock_t session_lock;
	struct cas_fuse_session *session; /* protected by session_lock */
};

/* Per queue thread: the engine's reply buffer and room to describe the
 * file-data part of a reply in guest memory. */
struct vfs_queue {
	uint8_t *buf;
	size_t buf_size;
	struct iovec *data_iov;
	int data_iov_max;
};

static int vfs_queue_start(void *opaque, unsigned qidx, void **ret_ctx)
{
	struct cas_virtiofs *v = opaque;
	struct vfs_queue *q = calloc(1, sizeof(*q));

	if (!q)
		return -ENOMEM;
	q->buf_size = v->cfg.reply_bufsize;
	q->buf = malloc(q->buf_size);
	if (!q->buf) {
		free(q);
		return -ENOMEM;
	}
	*ret_ctx = q;
	return 0;
}

static void vfs_queue_stop(void *opaque, unsigned qidx, void *ctx)
{
	struct vfs_queue *q = ctx;

	free(q->buf);
	free(q->data_iov);
	free(q);
}

/* Copies the engine's reply (header and payload) into the chain's
 * writable buffers; returns the bytes written. */
static uint32_t put_reply(struct cas_vq_elem *elem,
			  const struct cas_fuse_reply *rep)
{
	if (!rep->send || rep->len > elem->write_len)
		return 0;
	return (uint32_t)cas_iov_copy_to(elem->iov + elem->read_cnt,
					 elem->write_cnt, 0, rep->buf,
					 rep->len);
}

/* Reads fd_len bytes of the reply's file straight into the guest's
 * buffers, from byte `off` of the writable part on. */
static int read_file_data(struct vfs_queue *q, struct cas_vq_elem *elem,
			  size_t off, const struct cas_fuse_reply *rep)
{
	const struct iovec *w = elem->iov + elem->read_cnt;
	size_t left = rep->fd_len;
	int n = 0;

	if (q->data_iov_max < elem->write_cnt) {
		struct iovec *p = realloc(q->data_iov,
					  (size_t)elem->write_cnt * sizeof(*p));
		if (!p)
			return -ENOMEM;
		q->data_iov = p;
		q->data_iov_max = elem->write_cnt;
	}
	for (int i = 0; i < elem->write_cnt && left > 0; i++) {
		if (off >= w[i].iov_len) {
			off -= w[i].iov_len;
			continue;
		}
		size_t k = CAS_MIN(w[i].iov_len - off, left);
		q->data_iov[n].iov_base = (uint8_t *)w[i].iov_base + off;
		q->data_iov[n].iov_len = k;
		n++;
		left -= k;
		off = 0;
	}
	if (left > 0)
		return -ENOBUFS;

	struct iovec *iov = q->data_iov;
	uint64_t pos = rep->fd_offset;
	left = rep->fd_len;
	while (left > 0) {
		ssize_t got =
			preadv(rep->fd, iov, CAS_MIN(n, IOV_MAX), (off_t)pos);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (got == 0)
			return -EIO; /* the blob is shorter than promised */
		pos += (uint64_t)got;
		left -= (size_t)got;
		while (got > 0) {
			size_t k = CAS_MIN((size_t)got, iov->iov_len);
			iov->iov_base = (uint8_t *)iov->iov_base + k;
			iov->iov_len -= k;
			got -= (ssize_t)k;
			if (iov->iov_len == 0) {
				iov++;
				n--;
			}
		}
	}
	return 0;
}

/* Puts a fresh session in place of the current one: a new INIT (the
 * guest rebooted or remounted) when the session saw INIT already, or
 * always (`force`). */
static void session_replace(struct cas_virtiofs *v, bool force)
{
	pthread_rwlock_wrlock(&v->session_lock);
	if (force || (v->session && cas_fuse_session_initialized(v->session))) {
		if (!force)
			cas_log_info("FUSE_INIT again: new session");
		if (v->session)
			v->cfg.session_close(v->cfg.userdata, v->session);
		v->session = NULL;
		int r = v->cfg.session_open(v->cfg.userdata, &v->session);
		if (r < 0) {
			cas_log_errno(r, "new session: %m");
			v->session = NULL;
		}
	}
	pthread_rwlock_unlock(&v->session_lock);
}

void cas_virtiofs_session_reset(struct cas_virtiofs *v)
{
	session_replace(v, true);
}

static uint32_t vfs_process(void *opaque, void *ctx, unsigned qidx,
			    struct cas_vq_elem *elem)
{
	struct cas_virtiofs *v = opaque;
	struct vfs_queue *q = ctx;
	struct cas_fuse_reply rep = {
		.buf = q->buf,
		.buf_size = q->buf_size,
		.fd = -1,
	};
	uint32_t written;

	/* A guest that starts over (INIT again) gets a fresh session; only
	 * request queues carry INIT. */
	if (qidx > 0 && cas_fuse_request_is_init(elem->iov, elem->read_cnt))
		session_replace(v, false);

	pthread_rwlock_rdlock(&v->session_lock);
	if (!v->session) {
		pthread_rwlock_unlock(&v->session_lock);
		cas_fuse_request_fail(elem->iov, elem->read_cnt, &rep, -EIO);
		return put_reply(elem, &rep);
	}
	cas_fuse_session_process(v->session, elem->iov, elem->read_cnt, &rep);
	if (!rep.send) {
		written = 0;
		goto done;
	}
	size_t data_len = rep.fd >= 0 ? rep.fd_len : 0;
	if (rep.len > rep.buf_size || data_len > UINT32_MAX ||
	    rep.len + data_len > elem->write_len ||
	    rep.len + data_len > UINT32_MAX) {
		cas_log_debug("reply of %zu bytes does not fit %zu",
			      rep.len + data_len, elem->write_len);
		cas_fuse_reply_fail(&rep, -EIO);
		written = put_reply(elem, &rep);
		goto done;
	}
	if (data_len > 0) {
		int r = read_file_data(q, elem, rep.len, &rep);
		if (r < 0) {
			cas_log_warning_errno(r, "read of reply data: %m");
			cas_fuse_reply_fail(&rep, -EIO);
			data_len = 0;
		}
	}
	written = put_reply(elem, &rep) + (uint32_t)data_len;
done:
	cas_fuse_reply_done(v->session, &rep);
	pthread_rwlock_unlock(&v->session_lock);
	return written;
}

static const struct cas_vu_ops vfs_ops = {
	.queue_start = vfs_queue_start,
	.queue_stop = vfs_queue_stop,
	.process = vfs_process,
};

void cas_virtiofs_configure(struct cas_fuse_config *cfg)
{
	cfg->max_write = 128 * 1024;
	cfg->max_pages = 256;
	/* No FUSE passthrough or io_uring over virtio. */
	cfg->backing_open = NULL;
	cfg->backing_close = NULL;
	cfg->transport = NULL;
	cfg->io_uring = false;
}

const struct cas_vu_ops *cas_virtiofs_queue_ops(void)
{
	return &vfs_ops;
}

int cas_virtiofs_new_connected(const struct cas_virtiofs_config *cfg,
			       struct cas_virtiofs **ret)
{
	if (!cfg->session_open || !cfg->session_close ||
	    cfg->reply_bufsize < CAS_FUSE_REPLY_HEADER_SIZE)
		return -EINVAL;
	struct cas_virtiofs *v = calloc(1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	v->cfg = *cfg;
	v->cfg.socket_path = NULL;
	v->listen_fd = v->stop_fd = -1;
	pthread_rwlock_init(&v->session_lock, NULL);
	int r = cfg->session_open(cfg->userdata, &v->session);
	if (r < 0) {
		pthread_rwlock_destroy(&v->session_lock);
		free(v);
		return r;
	}
	*ret = v;
	return 0;
}

int cas_virtiofs_new(const struct cas_virtiofs_config *cfg,
		     struct cas_virtiofs **ret)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int r;

	if (!cfg->socket_path || !cfg->session_open || !cfg->session_close ||
	    cfg->reply_bufsize < CAS_FUSE_REPLY_HEADER_SIZE)
		return -EINVAL;
	if (strlen(cfg->socket_path) >= sizeof(sa.sun_path))
		return cas_log_errno(-ENAMETOOLONG, "socket %s: %m",
				     cfg->socket_path);
	strcpy(sa.sun_path, cfg->socket_path);

	r = cas_unix_socket_clear(cfg->socket_path);
	if (r == -EADDRINUSE)
		return cas_log_errno(
			r, "socket %s: a live server answers on this socket",
			cfg->socket_path);
	if (r == -EEXIST)
		return cas_log_errno(r, "socket %s: exists and is not a socket",
				     cfg->socket_path);
	if (r < 0)
		return cas_log_errno(r, "socket %s: remove the stale one: %m",
				     cfg->socket_path);

	struct cas_virtiofs *v = calloc(1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	v->cfg = *cfg;
	v->listen_fd = v->stop_fd = -1;
	pthread_rwlock_init(&v->session_lock, NULL);
	v->socket_path = strdup(cfg->socket_path);
	if (!v->socket_path) {
		r = -ENOMEM;
		goto fail;
	}
	v->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (v->stop_fd < 0) {
		r = cas_log_errno(cas_negerrno(), "eventfd: %m");
		goto fail;
	}

	unsigned rq = cfg->request_queues ? cfg->request_queues
					  : VIRTIOFS_DEFAULT_REQUEST_QUEUES;
	struct cas_vu_config vc = {
		.device_features = 0,
		.queues = CAS_MIN(1 + rq, (unsigned)CAS_VU_MAX_QUEUES),
		.ops = &vfs_ops,
		.opaque = v,
	};
	r = cas_vu_dev_new(&vc, &v->dev);
	if (r < 0)
		goto fail;

	v->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (v->listen_fd < 0) {
		r = cas_log_errno(cas_negerrno(), "socket: %m");
		goto fail;
	}
	/* Bound under a name of its own and renamed once listening: whoever
	 * waits for the socket to appear (QEMU's user, a supervisor) never
	 * finds one that refuses connections. A path too long for the
	 * suffix is bound in place. */
	struct sockaddr_un tmp = sa;
	int n = snprintf(tmp.sun_path, sizeof(tmp.sun_path), "%s.%d~",
			 cfg->socket_path, (int)getpid());
	bool renamed = n > 0 && (size_t)n < sizeof(tmp.sun_path);
	if (!renamed)
		tmp = sa;
	else
		unlink(tmp.sun_path);
	if (bind(v->listen_fd, (struct sockaddr *)&tmp, sizeof(tmp)) < 0) {
		r = cas_log_errno(cas_negerrno(), "socket %s: bind: %m",
				  cfg->socket_path);
		goto fail;
	}
	if (listen(v->listen_fd, 4) < 0 ||
	    (renamed && rename(tmp.sun_path, sa.sun_path) < 0)) {
		r = cas_log_errno(cas_negerrno(), "socket %s: listen: %m",
				  cfg->socket_path);
		unlink(tmp.sun_path);
		goto fail;
	}
	*ret = v;
	return 0;
fail:
	if (v->listen_fd >= 0)
		close(v->listen_fd);
	if (v->stop_fd >= 0)
		close(v->stop_fd);
	cas_vu_dev_free(v->dev);
	pthread_rwlock_destroy(&v->session_lock);
	free(v->socket_path);
	free(v);
	return r;
}

void cas_virtiofs_stop(struct cas_virtiofs *v)
{
	uint64_t one = 1;
	int saved = errno;
	ssize_t w = write(v->stop_fd, &one, sizeof(one));
	(void)w;
	errno = saved;
}

/* Counts the stop requests that came (cas_virtiofs_stop). The first
 * closes and removes the socket: no new frontend can come, the one that
 * is connected keeps its session. The second ends everything. */
static void take_stops(struct cas_virtiofs *v)
{
	uint64_t n;
	if (read(v->stop_fd, &n, sizeof(n)) != sizeof(n))
		return;
	v->stops += n > 2 ? 2 : (unsigned)n;
	if (v->listen_fd >= 0) {
		close(v->listen_fd);
		v->listen_fd = -1;
		if (unlink(v->socket_path) < 0 && errno != ENOENT)
			cas_log_warning_errno(cas_negerrno(),
					      "socket %s: remove: %m",
					      v->socket_path);
	}
}

/* Serves one frontend until it goes away or we are stopped. */
static void serve(struct cas_virtiofs *v, int conn)
{
	int r = v->cfg.session_open(v->cfg.userdata, &v->session);
	if (r < 0) {
		cas_log_errno(r, "session: %m");
		v->session = NULL;
		return;
	}
	cas_log_info("frontend connected");

	for (;;) {
		struct pollfd p[3] = {
			{.fd = v->stop_fd, .events = POLLIN},
			{.fd = conn, .events = POLLIN},
			{.fd = v->listen_fd, .events = POLLIN}, /* -1: none */
		};
		if (poll(p, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			cas_log_errno(cas_negerrno(), "poll: %m");
			break;
		}
		if (p[0].revents) {
			take_stops(v);
			if (v->stops >= 2)
				break;
			cas_log_info("socket %s: removed; serving the "
				     "connected guest until it disconnects "
				     "(signal again to end now)",
				     v->socket_path);
			continue;
		}
		if (p[2].revents & POLLIN) {
			int other =
				accept4(v->listen_fd, NULL, NULL, SOCK_CLOEXEC);
			if (other >= 0) {
				cas_log_warning("a frontend is already "
						"connected; refusing another");
				close(other);
			}
		}
		if (p[1].revents) {
			r = cas_vu_dev_dispatch(v->dev, conn);
			if (r == -ECONNRESET) {
				cas_log_info("frontend disconnected");
				break;
			}
			if (r < 0) {
				cas_log_errno(r, "closing the connection: %m");
				break;
			}
		}
	}

	/* Queue threads end before the session they use goes. */
	cas_vu_dev_reset(v->dev);
	pthread_rwlock_wrlock(&v->session_lock);
	if (v->session)
		v->cfg.session_close(v->cfg.userdata, v->session);
	v->session = NULL;
	pthread_rwlock_unlock(&v->session_lock);
}

int cas_virtiofs_run(struct cas_virtiofs *v)
{
	for (;;) {
		struct pollfd p[2] = {
			{.fd = v->stop_fd, .events = POLLIN},
			{.fd = v->listen_fd, .events = POLLIN},
		};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return cas_log_errno(cas_negerrno(), "poll: %m");
		}
		if (p[0].revents) {
			take_stops(v);
			return 0;
		}
		if (!(p[1].revents & POLLIN))
			continue;
		int conn = accept4(v->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED ||
			    errno == EAGAIN)
				continue;
			return cas_log_errno(cas_negerrno(), "accept: %m");
		}
		serve(v, conn);
		close(conn);
		if (v->stops > 0)
			return 0;
	}
}

void cas_virtiofs_free(struct cas_virtiofs *v)
{
	if (!v)
		return;
	cas_vu_dev_free(v->dev);
	if (v->listen_fd >= 0) {
		close(v->listen_fd);
		unlink(v->socket_path);
	}
	if (v->stop_fd >= 0)
		close(v->stop_fd);
	if (v->session)
		v->cfg.session_close(v->cfg.userdata, v->session);
	pthread_rwlock_destroy(&v->session_lock);
	free(v->socket_path);
	free(v);
}
