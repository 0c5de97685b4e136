/* grpc_server.c - `castore serve` (remote.h): listening, a fixed pool of
 * event loops carrying the connections' sessions (grpc_session.c), and
 * the limits that let a server face a network (docs/remote.md,
 * "Exposing serve").
 *
 * Threads: the caller's thread accepts; `threads` workers each own a set
 * of connections and run one poll loop over them (a store call such as a
 * Directory commit holds up that worker's other connections for its
 * length, never the others). Connections never get a thread of their
 * own, so the thread count is fixed whatever clients do.
 *
 * Limits: at most max_connections at once. A new connection over the
 * limit takes the place of the connection idle the longest (no open
 * stream), which is closed; when every connection has a call in flight
 * the new one is closed instead. A connection on which nothing was
 * received or sent for idle_timeout seconds is closed (GOAWAY). When
 * accept runs out of file descriptors, the idle connection of longest
 * standing is closed, or with none, accepting pauses for
 * EMFILE_BACKOFF_MS: the loop never spins on EMFILE.
 *
 * The registry of connections (srv->conns) is protected by srv->lock: the
 * accepting thread reads it to choose whom to close, workers add to it
 * and remove from it. A connection's session, socket and buffers belong
 * to its worker alone.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_server_i.h"
#include "remote/remote.h"

#define POLL_MS	  200
#define OUT_CAP	  (256u << 10)
#define RECV_SIZE (64u << 10)
/* Bytes one connection may send in a row before the worker turns to the
 * others (a large Read must not starve them). */
#define SEND_TURN	  (1u << 20)
#define EMFILE_BACKOFF_MS 100

struct worker;

struct conn {
	struct worker *w;
	int fd;
	struct cas_grpc_session *session;
	uint8_t *out; /* bytes taken from the session, not yet sent */
	size_t out_len, out_pos;
	/* Written by the worker, read by the accepting thread. */
	atomic_int_least64_t last_active_ms; /* a byte either way */
	atomic_bool idle;		     /* no stream open */
	atomic_bool evict;		     /* set under srv->lock */
	size_t slot;	       /* in srv->conns, under srv->lock */
	struct conn *next_new; /* in w->incoming */
};

struct worker {
	struct server *srv;
	pthread_t thread;
	bool started;
	int wake_fd;	       /* eventfd: new connections, an eviction, stop */
	struct conn *incoming; /* protected by srv->lock */
	unsigned n_conns;      /* protected by srv->lock */
	struct conn **conns;   /* the worker's own */
	size_t n, cap;	       /* of conns */
	struct pollfd *pfds;   /* n + 1 */
	uint8_t in[RECV_SIZE];
};

struct server {
	struct cas_grpc_session_env env;
	atomic_uint_least64_t buffered;
	unsigned max_conns;
	int64_t idle_ms;
	atomic_bool stopping;
	struct worker *workers;
	unsigned n_workers;
	pthread_mutex_t lock;
	pthread_cond_t cond;		       /* a connection was closed */
	struct conn **conns;		       /* protected by lock */
	size_t n_conns, cap_conns, n_evicting; /* protected by lock */
};

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wake(struct worker *w)
{
	uint64_t one = 1;
	ssize_t n = write(w->wake_fd, &one, sizeof(one));
	(void)n; /* a full counter wakes the worker as well */
}

/* Connections ------------------------------------------------------------ */

/* Takes the session's output into c->out and sends what the socket
 * takes, at most SEND_TURN bytes. Returns 0, or -errno when the
 * connection is dead. */
static int conn_flush(struct conn *c)
{
	size_t sent = 0;
	while (sent < SEND_TURN) {
		while (c->out_len < OUT_CAP / 2) {
			const uint8_t *data;
			ssize_t n = cas_grpc_session_send(c->session, &data);
			if (n < 0)
				return (int)n;
			if (n == 0)
				break;
			if ((size_t)n > OUT_CAP - c->out_len) {
				/* Bigger than the room left: keep it whole. */
				uint8_t *nb =
					realloc(c->out, c->out_len + (size_t)n);
				if (!nb)
					return -ENOMEM;
				c->out = nb;
			}
			memcpy(c->out + c->out_len, data, (size_t)n);
			c->out_len += (size_t)n;
		}
		if (c->out_pos == c->out_len) {
			c->out_pos = c->out_len = 0;
			return 0;
		}
		ssize_t w = send(c->fd, c->out + c->out_pos,
				 c->out_len - c->out_pos,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		atomic_store(&c->last_active_ms, now_ms());
		sent += (size_t)w;
		c->out_pos += (size_t)w;
		if (c->out_pos == c->out_len)
			c->out_pos = c->out_len = 0;
		else
			return 0; /* the socket is full */
	}
	return 0;
}

/* Bytes wait for the socket, buffered or still in the session (a turn
 * cut short by SEND_TURN). */
static bool conn_wants_write(struct conn *c)
{
	return c->out_len > c->out_pos ||
	       cas_grpc_session_want_write(c->session);
}

/* Removes c from the registry and frees it (its worker's thread). */
static void conn_close(struct server *srv, struct conn *c)
{
	pthread_mutex_lock(&srv->lock);
	size_t last = --srv->n_conns;
	srv->conns[c->slot] = srv->conns[last];
	srv->conns[c->slot]->slot = c->slot;
	if (atomic_load(&c->evict))
		srv->n_evicting--;
	c->w->n_conns--;
	pthread_cond_broadcast(&srv->cond);
	pthread_mutex_unlock(&srv->lock);
	cas_grpc_session_free(c->session); /* aborts unfinished Puts */
	close(c->fd);
	free(c->out);
	free(c);
}

/* Says goodbye (GOAWAY, sent if the socket takes it now) and closes. */
static void conn_end(struct server *srv, struct conn *c)
{
	cas_grpc_session_goaway(c->session);
	(void)conn_flush(c);
	conn_close(srv, c);
}

/* Handles poll's news for c. < 0: the connection is over. */
static int conn_step(struct worker *w, struct conn *c, short revents)
{
	if (revents & (POLLIN | POLLHUP | POLLERR)) {
		ssize_t n = recv(c->fd, w->in, sizeof(w->in), MSG_DONTWAIT);
		if (n == 0)
			return -EPIPE; /* peer gone */
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return cas_negerrno();
		if (n > 0) {
			atomic_store(&c->last_active_ms, now_ms());
			if (cas_grpc_session_recv(c->session, w->in,
						  (size_t)n) < 0) {
				(void)conn_flush(c); /* a GOAWAY, if queued */
				return -EPROTO;
			}
		}
	}
	int r = conn_flush(c);
	if (r < 0)
		return r;
	atomic_store(&c->idle, cas_grpc_session_streams(c->session) == 0);
	if (!cas_grpc_session_alive(c->session) && c->out_len == c->out_pos)
		return -EPIPE;
	return 0;
}

/* Workers ---------------------------------------------------------------- */

static int worker_adopt(struct worker *w)
{
	struct server *srv = w->srv;
	pthread_mutex_lock(&srv->lock);
	struct conn *list = w->incoming;
	w->incoming = NULL;
	pthread_mutex_unlock(&srv->lock);
	while (list) {
		struct conn *c = list;
		list = c->next_new;
		if (w->n == w->cap) {
			size_t cap = w->cap ? w->cap * 2 : 16;
			struct conn **nc = realloc(w->conns, cap * sizeof(*nc));
			struct pollfd *np =
				realloc(w->pfds, (cap + 1) * sizeof(*np));
			if (nc)
				w->conns = nc;
			if (np)
				w->pfds = np;
			if (!nc || !np) {
				conn_close(srv, c);
				continue;
			}
			w->cap = cap;
		}
		w->conns[w->n++] = c;
		/* The server speaks first (SETTINGS). */
		if (conn_flush(c) < 0)
			conn_close(srv, w->conns[--w->n]);
	}
	return 0;
}

static void worker_drop(struct worker *w, size_t i)
{
	conn_close(w->srv, w->conns[i]);
	w->conns[i] = w->conns[--w->n];
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct server *srv = w->srv;

	for (;;) {
		worker_adopt(w);
		if (atomic_load(&srv->stopping)) {
			/* GOAWAY; the streams still open are closed with
			 * the sessions, aborting their Puts. */
			while (w->n > 0) {
				conn_end(srv, w->conns[w->n - 1]);
				w->n--;
			}
			break;
		}
		int64_t now = now_ms(), next = now + 1000;
		for (size_t i = 0; i < w->n;) {
			struct conn *c = w->conns[i];
			int64_t last = atomic_load(&c->last_active_ms);
			if (atomic_load(&c->evict) ||
			    now - last >= srv->idle_ms) {
				conn_end(srv, c);
				w->conns[i] = w->conns[--w->n];
				continue;
			}
			next = CAS_MIN(next, last + srv->idle_ms);
			w->pfds[i + 1] = (struct pollfd){
				c->fd,
				(short)(POLLIN |
					(conn_wants_write(c) ? POLLOUT : 0)),
				0};
			i++;
		}
		w->pfds[0] = (struct pollfd){w->wake_fd, POLLIN, 0};
		int timeout = (int)CAS_MAX(next - now, (int64_t)1);
		int pr = poll(w->pfds, w->n + 1, timeout);
		if (pr < 0 && errno != EINTR)
			break;
		if (pr <= 0)
			continue;
		if (w->pfds[0].revents) {
			uint64_t v;
			ssize_t n = read(w->wake_fd, &v, sizeof(v));
			(void)n;
		}
		/* Back to front: a dropped connection's place is taken by
		 * the last one, which is already done. */
		for (size_t i = w->n; i-- > 0;) {
			short rev = w->pfds[i + 1].revents;
			if (rev && conn_step(w, w->conns[i], rev) < 0)
				worker_drop(w, i);
		}
	}
	while (w->n > 0)
		worker_drop(w, w->n - 1);
	return NULL;
}

/* Accepting -------------------------------------------------------------- */

/* Marks the connection idle the longest for closing; false when none is
 * idle. Called with srv->lock held. */
static bool evict_idle(struct server *srv)
{
	struct conn *best = NULL;
	int64_t best_t = INT64_MAX;
	for (size_t i = 0; i < srv->n_conns; i++) {
		struct conn *c = srv->conns[i];
		int64_t t = atomic_load(&c->last_active_ms);
		if (atomic_load(&c->idle) && !atomic_load(&c->evict) &&
		    t < best_t) {
			best = c;
			best_t = t;
		}
	}
	if (!best)
		return false;
	atomic_store(&best->evict, true);
	srv->n_evicting++;
	wake(best->w);
	return true;
}

/* Registers fd as a connection on the least loaded worker; closes fd
 * when the server is full of busy connections. */
static void admit(struct server *srv, int fd)
{
	struct conn *c = calloc(1, sizeof(*c));
	if (c)
		c->out = malloc(OUT_CAP);
	if (c && c->out && cas_grpc_session_new(&srv->env, &c->session) < 0) {
		free(c->out);
		c->out = NULL;
	}
	if (!c || !c->out) {
		free(c);
		close(fd);
		return;
	}
	c->fd = fd;
	atomic_init(&c->last_active_ms, now_ms());
	atomic_init(&c->idle, true);
	atomic_init(&c->evict, false);

	pthread_mutex_lock(&srv->lock);
	bool room = srv->n_conns - srv->n_evicting < srv->max_conns ||
		    evict_idle(srv);
	if (room && srv->n_conns == srv->cap_conns) {
		size_t cap = srv->cap_conns ? srv->cap_conns * 2 : 64;
		struct conn **n = realloc(srv->conns, cap * sizeof(*n));
		if (n) {
			srv->conns = n;
			srv->cap_conns = cap;
		} else {
			room = false;
		}
	}
	if (!room) {
		pthread_mutex_unlock(&srv->lock);
		cas_log_debug("every connection is busy: one refused");
		cas_grpc_session_free(c->session);
		free(c->out);
		free(c);
		close(fd);
		return;
	}
	struct worker *w = &srv->workers[0];
	for (unsigned i = 1; i < srv->n_workers; i++)
		if (srv->workers[i].n_conns < w->n_conns)
			w = &srv->workers[i];
	c->w = w;
	c->slot = srv->n_conns;
	srv->conns[srv->n_conns++] = c;
	w->n_conns++;
	c->next_new = w->incoming;
	w->incoming = c;
	pthread_mutex_unlock(&srv->lock);
	wake(w);
}

/* accept failed for want of file descriptors (or memory): make room by
 * closing an idle connection and wait for it, or pause. Never spins. */
static void accept_starved(struct server *srv, int err, bool *warned)
{
	if (!*warned)
		cas_log_warning("accept: %s: closing idle connections, "
				"pausing new ones while none is idle",
				strerror(err));
	*warned = true;
	pthread_mutex_lock(&srv->lock);
	size_t before = srv->n_conns;
	(void)evict_idle(srv);
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_nsec += EMFILE_BACKOFF_MS * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	/* A connection closing (the evicted one, or any) gives an fd back;
	 * else time passes. */
	while (srv->n_conns >= before)
		if (pthread_cond_timedwait(&srv->cond, &srv->lock, &until) ==
		    ETIMEDOUT)
			break;
	pthread_mutex_unlock(&srv->lock);
}

/* Listening -------------------------------------------------------------- */

static int listen_unix(const char *path, int *ret_fd)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	/* A socket left by a server that died is replaced; one a live
	 * server answers on is not. */
	int r = cas_unix_socket_clear(path);
	if (r < 0)
		return r;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return cas_negerrno();
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, 128) < 0) {
		r = cas_negerrno();
		close(fd);
		return r;
	}
	*ret_fd = fd;
	return 0;
}

static bool is_wildcard(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ((const struct sockaddr_in *)ss)->sin_addr.s_addr ==
		       htonl(INADDR_ANY);
	if (ss->ss_family == AF_INET6)
		return IN6_IS_ADDR_UNSPECIFIED(
			&((const struct sockaddr_in6 *)ss)->sin6_addr);
	return false;
}

static int listen_tcp(const char *spec, int *ret_fd, char *bound, size_t size,
		      bool *ret_wildcard)
{
	_cleanup_free_ char *host = strdup(spec);
	if (!host)
		return -ENOMEM;
	char *colon = strrchr(host, ':');
	if (!colon)
		return -EINVAL;
	*colon = 0;
	const char *port = colon + 1, *h = host;
	size_t hl = strlen(host);
	if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
		host[hl - 1] = 0;
		h = host + 1;
	}
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
			*res = NULL;
	int gr = getaddrinfo(*h ? h : NULL, port, &hints, &res);
	if (gr != 0) {
		cas_log_error("listen %s: %s", spec, gai_strerror(gr));
		return -EINVAL;
	}
	int r = -EADDRNOTAVAIL;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
				0);
		if (fd < 0) {
			r = cas_negerrno();
			continue;
		}
		int one = 1;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
		    listen(fd, 128) < 0) {
			r = cas_negerrno();
			close(fd);
			continue;
		}
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		char hbuf[NI_MAXHOST], pbuf[NI_MAXSERV];
		if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
			*ret_wildcard = is_wildcard(&ss);
			if (getnameinfo((struct sockaddr *)&ss, sl, hbuf,
					sizeof(hbuf), pbuf, sizeof(pbuf),
					NI_NUMERICHOST | NI_NUMERICSERV) == 0)
				snprintf(bound, size,
					 ss.ss_family == AF_INET6 ? "[%s]:%s"
								  : "%s:%s",
					 hbuf, pbuf);
		}
		*ret_fd = fd;
		r = 0;
		break;
	}
	freeaddrinfo(res);
	return r;
}

/* 1 GiB, or 5 % of the file system when that is less. */
static uint64_t default_reserve(const char *dir)
{
	struct statvfs v;
	uint64_t r = 1ull << 30;
	if (dir && statvfs(dir, &v) == 0)
		r = CAS_MIN(r, (uint64_t)v.f_blocks * v.f_frsize / 20);
	return r;
}

static void server_release(struct server *srv)
{
	for (unsigned i = 0; i < srv->n_workers; i++) {
		struct worker *w = &srv->workers[i];
		if (w->started)
			pthread_join(w->thread, NULL);
		if (w->wake_fd >= 0)
			close(w->wake_fd);
		free(w->conns);
		free(w->pfds);
	}
	free(srv->workers);
	free(srv->conns);
	cas_chunk_index_free(srv->env.chunks);
	pthread_cond_destroy(&srv->cond);
	pthread_mutex_destroy(&srv->lock);
}

static void server_stop(struct server *srv)
{
	atomic_store(&srv->stopping, true);
	for (unsigned i = 0; i < srv->n_workers; i++)
		if (srv->workers[i].wake_fd >= 0)
			wake(&srv->workers[i]);
}

static int start_workers(struct server *srv, unsigned n)
{
	srv->workers = calloc(n, sizeof(*srv->workers));
	if (!srv->workers)
		return -ENOMEM;
	srv->n_workers = n;
	for (unsigned i = 0; i < n; i++)
		srv->workers[i].wake_fd = -1;
	/* Signals are for the accepting thread, which watches stop. */
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	int r = 0;
	for (unsigned i = 0; i < n && r == 0; i++) {
		struct worker *w = &srv->workers[i];
		w->srv = srv;
		w->pfds = malloc(sizeof(*w->pfds));
		w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (!w->pfds || w->wake_fd < 0)
			r = w->pfds ? cas_negerrno() : -ENOMEM;
		else if ((r = -pthread_create(&w->thread, NULL, worker_main,
					      w)) == 0)
			w->started = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r;
}

int cas_grpc_serve(cas_store *s, const char *listen_spec,
		   const struct cas_grpc_serve_options *opts,
		   volatile sig_atomic_t *stop,
		   void (*ready)(void *userdata, const char *address),
		   void *userdata)
{
	static const struct cas_grpc_serve_options defaults = {0};
	struct server srv = {0};
	char bound[512];
	int lfd = -1, r;
	bool is_unix = strncmp(listen_spec, "unix:", 5) == 0, wildcard = false;

	if (!opts)
		opts = &defaults;
	srv.env = (struct cas_grpc_session_env){
		.store = s,
		.read_only = opts->read_only,
		.reserve_dir = opts->reserve_dir,
		.reserve = opts->reserve == CAS_GRPC_SERVE_RESERVE_DEFAULT
				   ? default_reserve(opts->reserve_dir)
				   : opts->reserve,
		.buffered = &srv.buffered,
	};
	atomic_init(&srv.buffered, 0);
	atomic_init(&srv.stopping, false);
	srv.max_conns = opts->max_connections ? opts->max_connections
					      : CAS_GRPC_SERVE_CONNECTIONS;
	srv.idle_ms = 1000 * (int64_t)(opts->idle_timeout
					       ? opts->idle_timeout
					       : CAS_GRPC_SERVE_IDLE_TIMEOUT);
	unsigned threads =
		opts->threads ? opts->threads : CAS_GRPC_SERVE_THREADS;

	size_t spec_len = CAS_MIN(strlen(listen_spec), sizeof(bound) - 1);
	memcpy(bound, listen_spec, spec_len);
	bound[spec_len] = 0;
	/* What listen_* names itself (an address that does not resolve) is
	 * not named again. */
	unsigned long mark = cas_log_thread_error_count();
	if (is_unix)
		r = listen_unix(listen_spec + 5, &lfd);
	else
		r = listen_tcp(listen_spec, &lfd, bound, sizeof(bound),
			       &wildcard);
	if (r == -EADDRINUSE && is_unix)
		return cas_log_errno(
			r, "listen %s: a live server answers on this socket",
			listen_spec);
	if (r == -EEXIST && is_unix)
		return cas_log_errno(r, "listen %s: exists and is not a socket",
				     listen_spec);
	if (r < 0)
		return cas_log_errno_if_silent(mark, r, "listen %s: %m",
					       listen_spec);
	r = cas_chunk_index_new(s, &srv.env.chunks);
	if (r < 0) {
		close(lfd);
		return cas_log_errno(r, "chunk index: %m");
	}
	if (wildcard)
		cas_log_warning(
			"%s: listens on every network interface%s", bound,
			opts->read_only
				? " (read-only)"
				: ", read-write: anyone who can connect can "
				  "write to the store (--read-only, or see "
				  "\"Exposing serve\" in docs/remote.md)");
	pthread_mutex_init(&srv.lock, NULL);
	pthread_cond_init(&srv.cond, NULL);
	r = start_workers(&srv, threads);
	if (r < 0) {
		server_stop(&srv);
		server_release(&srv);
		close(lfd);
		return cas_log_errno(r, "start %u threads: %m", threads);
	}
	if (ready)
		ready(userdata, bound);

	bool warned = false;
	/* Set by a signal handler, or by another thread (tests). */
	while (!__atomic_load_n(stop, __ATOMIC_RELAXED)) {
		struct pollfd p = {lfd, POLLIN, 0};
		int pr = poll(&p, 1, POLL_MS);
		if (pr <= 0)
			continue;
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM)
				accept_starved(&srv, errno, &warned);
			continue; /* a client gone: keep serving */
		}
		int one = 1;
		if (!is_unix)
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
				   sizeof(one));
		admit(&srv, fd);
	}
	server_stop(&srv);
	close(lfd);
	if (is_unix)
		(void)unlink(listen_spec + 5);
	server_release(&srv); /* joins the workers, which close everything */
	return 0;
}
