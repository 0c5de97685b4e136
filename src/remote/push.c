/* push.c - `castore push URL NAME...`: copies the closures of roots to a
 * tvix castore gRPC store, sending only what it lacks (remote.h).
 *
 * Per root: the Directories are walked top-down; each is asked for with
 * a non-recursive Get, and one the remote has is taken with its whole
 * subtree (a castore server stores a Directory only with its closure), so
 * nothing below it is asked for. Files of the missing Directories are
 * Stat-ed and the missing blobs Put, one stream each, by PUSH_THREADS
 * threads at once. Last, the missing
 * Directories go in one Put stream, leaves first, the root last. A server
 * that insists on receiving the whole closure in the stream (refusing
 * children it already has) gets it on a second try.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/grpc_i.h"
#include "remote/remote.h"
#include "remote/remote_i.h"

struct pushed_dir {
	cas_digest digest;
	uint8_t *raw;
	size_t len;
	bool remote_has;
};

struct pusher {
	cas_store *s;
	cas_grpc_client *client;
	struct cas_dmap dirs_seen;
	struct cas_dmap blobs_seen;
	/* Post-order (leaves first) list of the Directories of one root. */
	struct pushed_dir *order;
	size_t n_order, cap_order;
	struct cas_remote_progress p; /* protected by lock while blobs go */
	cas_remote_progress_cb progress;
	void *userdata;
	pthread_mutex_t lock;
	/* Blobs of the current root that the remote may lack, each once. */
	cas_digest *blobs;
	size_t n_blobs, cap_blobs;
	size_t next_blob; /* protected by lock */
	int blobs_r;	  /* first failure; protected by lock */
};

/* Blobs are checked and sent by this many threads at once (each call is
 * a round trip; the remote serves them in parallel). */
#define PUSH_THREADS 8

/* From the calling thread only. */
static void tick(struct pusher *ps)
{
	if (!ps->progress)
		return;
	pthread_mutex_lock(&ps->lock);
	struct cas_remote_progress p = ps->p;
	pthread_mutex_unlock(&ps->lock);
	ps->progress(ps->userdata, &p);
}

/* 1 if the remote has the object, 0 if not: a Directory is asked for
 * with a non-recursive Get (the protocol has no Stat for Directories),
 * a blob with Stat. */
static int remote_has(struct pusher *ps, const cas_digest *d, bool directory)
{
	_cleanup_free_ uint8_t *req = NULL;
	size_t len;
	char msg[256];
	int status;
	int kind = directory ? CAS_GRPC_MSG_GET_REQUEST
			     : CAS_GRPC_MSG_STAT_REQUEST;
	enum cas_grpc_method m =
		directory ? CAS_GRPC_DIRECTORY_GET : CAS_GRPC_BLOB_STAT;
	int r = cas_grpc_encode_digest_msg(kind, d, false, &req, &len);
	if (r < 0)
		return r;
	r = cas_grpc_call(ps->client, m, req, len, NULL, NULL, NULL, NULL,
			  &status, msg, sizeof(msg));
	if (r == -ENOENT)
		return 0;
	if (r < 0 && status >= 0)
		return cas_log_errno(-EIO, "%s: %s: grpc-status %d: %s",
				     cas_grpc_client_url(ps->client),
				     directory ? "Get" : "Stat", status, msg);
	return r < 0 ? r : 1;
}

struct blob_stream {
	int fd;
	uint64_t size, off;
	uint8_t hdr[16];
	size_t hdr_len, hdr_pos;
	size_t chunk_left; /* data bytes of the current message left */
	bool started, done;
	uint64_t sent;
};

static ssize_t blob_produce(void *userdata, uint8_t *buf, size_t size)
{
	struct blob_stream *b = userdata;
	size_t n = 0;
	while (n < size) {
		if (b->hdr_pos < b->hdr_len) {
			size_t t = CAS_MIN(size - n, b->hdr_len - b->hdr_pos);
			memcpy(buf + n, b->hdr + b->hdr_pos, t);
			b->hdr_pos += t;
			n += t;
			continue;
		}
		if (b->chunk_left > 0) {
			size_t t = CAS_MIN(size - n, b->chunk_left);
			ssize_t got = pread(b->fd, buf + n, t, (off_t)b->off);
			if (got < 0)
				return cas_negerrno();
			if (got == 0)
				return -EBADMSG; /* the blob shrank */
			b->off += (uint64_t)got;
			b->chunk_left -= (size_t)got;
			b->sent += (uint64_t)got;
			n += (size_t)got;
			continue;
		}
		if (b->off >= b->size && b->started)
			break;
		/* Next message (one empty message for an empty blob:
		 * a Put stream of no message is a blob too, but explicit
		 * is clearer to servers). */
		size_t want = (size_t)CAS_MIN(b->size - b->off,
					      (uint64_t)CAS_GRPC_CHUNK);
		b->hdr_len = cas_grpc_blob_chunk_header(b->hdr, want);
		b->hdr_pos = 0;
		b->chunk_left = want;
		b->started = true;
	}
	return (ssize_t)n;
}

static int digest_msg(void *userdata, const uint8_t *msg, size_t len)
{
	return cas_grpc_decode_digest_response(msg, len, false, userdata);
}

static int dir_digest_msg(void *userdata, const uint8_t *msg, size_t len)
{
	return cas_grpc_decode_digest_response(msg, len, true, userdata);
}

/* Notes a blob to check and send (each digest once). */
static int want_blob(struct pusher *ps, const cas_digest *d)
{
	int r = cas_dmap_put(&ps->blobs_seen, d, NULL);
	if (r <= 0)
		return r;
	if (ps->n_blobs == ps->cap_blobs) {
		size_t cap = ps->cap_blobs ? ps->cap_blobs * 2 : 256;
		cas_digest *n = realloc(ps->blobs, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		ps->blobs = n;
		ps->cap_blobs = cap;
	}
	ps->blobs[ps->n_blobs++] = *d;
	return 0;
}

/* Stat, and Put if missing. Any thread. */
static int push_blob(struct pusher *ps, const cas_digest *d)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], got_hex[CAS_DIGEST_HEX_LEN + 1];
	char msg[256];
	int status;
	int r = remote_has(ps, d, false);
	pthread_mutex_lock(&ps->lock);
	ps->p.blobs++;
	pthread_mutex_unlock(&ps->lock);
	if (r != 0)
		return r < 0 ? r : 0;
	cas_digest_to_hex(d, hex);
	struct blob_stream b = {.fd = -1};
	r = ps->s->ops->blob_open(ps->s, d, &b.fd, &b.size);
	if (r < 0)
		return cas_log_errno(r, "blob %s: %m", hex);
	cas_digest got = {{0}};
	r = cas_grpc_call(ps->client, CAS_GRPC_BLOB_PUT, NULL, 0, blob_produce,
			  &b, digest_msg, &got, &status, msg, sizeof(msg));
	close(b.fd);
	if (r < 0)
		return cas_log_errno(-EIO, "blob %s: Put to %s failed%s%s", hex,
				     cas_grpc_client_url(ps->client),
				     msg[0] ? ": " : "", msg);
	if (!cas_digest_eq(&got, d)) {
		cas_digest_to_hex(&got, got_hex);
		return cas_log_errno(-EIO, "blob %s: %s stored it as %s", hex,
				     cas_grpc_client_url(ps->client), got_hex);
	}
	pthread_mutex_lock(&ps->lock);
	ps->p.sent_objects++;
	ps->p.sent_bytes += b.sent;
	pthread_mutex_unlock(&ps->lock);
	return 0;
}

/* Takes blobs off the list until it is empty or one failed. Only the
 * calling thread of push_blobs reports progress. */
static void blob_loop(struct pusher *ps, bool report)
{
	pthread_mutex_lock(&ps->lock);
	while (ps->blobs_r == 0 && ps->next_blob < ps->n_blobs) {
		cas_digest d = ps->blobs[ps->next_blob++];
		pthread_mutex_unlock(&ps->lock);
		int r = push_blob(ps, &d);
		if (report)
			tick(ps);
		pthread_mutex_lock(&ps->lock);
		if (r < 0 && ps->blobs_r == 0)
			ps->blobs_r = r;
	}
	pthread_mutex_unlock(&ps->lock);
}

static void *blob_worker(void *arg)
{
	blob_loop(arg, false);
	return NULL;
}

/* Checks and sends the noted blobs with PUSH_THREADS threads (the
 * calling one among them, which also reports progress). */
static int push_blobs(struct pusher *ps)
{
	pthread_t t[PUSH_THREADS - 1];
	size_t n_threads = 0;
	ps->next_blob = 0;
	ps->blobs_r = 0;
	for (size_t i = 0; i + 1 < PUSH_THREADS && i + 1 < ps->n_blobs; i++) {
		if (pthread_create(&t[n_threads], NULL, blob_worker, ps) != 0)
			break;
		n_threads++;
	}
	blob_loop(ps, true);
	for (size_t i = 0; i < n_threads; i++)
		pthread_join(t[i], NULL);
	ps->n_blobs = 0;
	tick(ps);
	return ps->blobs_r;
}

static int order_add(struct pusher *ps, const cas_digest *d, uint8_t *raw,
		     size_t len, bool remote_has)
{
	if (ps->n_order == ps->cap_order) {
		size_t cap = ps->cap_order ? ps->cap_order * 2 : 64;
		struct pushed_dir *n = realloc(ps->order, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		ps->order = n;
		ps->cap_order = cap;
	}
	ps->order[ps->n_order++] =
		(struct pushed_dir){*d, raw, len, remote_has};
	return 0;
}

/* Walks the Directory d: post-order into ps->order; blobs of Directories
 * the remote lacks are pushed on the way. Explicit stack: the depth comes
 * from the data. */
static int walk_tree(struct pusher *ps, const cas_digest *root)
{
	struct frame {
		cas_digest d;
		uint8_t *raw;
		size_t len;
		cas_directory *dir;
		size_t next;
		bool remote_has;
	};
	struct frame *stack = NULL;
	size_t depth = 0, cap = 0;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	const char *why = NULL;
	int r = 0;

	const cas_digest *todo = root;
	bool parent_has = false;
	for (;;) {
		if (todo) {
			r = cas_dmap_put(&ps->dirs_seen, todo, NULL);
			if (r < 0)
				break;
			if (r == 0) {
				todo = NULL; /* walked under another parent */
				continue;
			}
			ps->p.directories++;
			if ((r = cas_array_grow(&stack, &cap, depth + 1,
						sizeof(*stack), 16)) < 0)
				break;
			struct frame *f = &stack[depth];
			*f = (struct frame){.d = *todo};
			cas_digest_to_hex(todo, hex);
			r = ps->s->ops->directory_get_raw(ps->s, todo, &f->raw,
							  &f->len);
			if (r < 0) {
				r = cas_log_errno(r, "directory %s: %m", hex);
				break;
			}
			r = cas_directory_decode(f->raw, f->len, &f->dir, &why);
			if (r < 0) {
				free(f->raw);
				r = cas_log_errno(r, "directory %s: %s", hex,
						  why ? why : "?");
				break;
			}
			f->remote_has = parent_has;
			if (!parent_has) {
				r = remote_has(ps, todo, true);
				if (r < 0) {
					free(f->raw);
					cas_directory_free(f->dir);
					break;
				}
				f->remote_has = r > 0;
			}
			depth++;
			todo = NULL;
			if (!f->remote_has)
				for (size_t i = 0;
				     i < f->dir->n_files && r >= 0; i++)
					r = want_blob(ps,
						      &f->dir->files[i].digest);
			if (r < 0)
				break;
			tick(ps);
			continue;
		}
		if (depth == 0)
			break;
		struct frame *f = &stack[depth - 1];
		if (f->next < f->dir->n_directories) {
			todo = &f->dir->directories[f->next++].digest;
			parent_has = f->remote_has;
			continue;
		}
		cas_directory_free(f->dir);
		r = order_add(ps, &f->d, f->raw, f->len, f->remote_has);
		if (r < 0) {
			free(f->raw);
			break;
		}
		depth--;
	}
	while (depth > 0) {
		depth--;
		free(stack[depth].raw);
		cas_directory_free(stack[depth].dir);
	}
	free(stack);
	return r < 0 ? r : 0;
}

struct dir_stream {
	struct pusher *ps;
	bool all; /* also those the remote has */
	size_t next;
	uint8_t hdr[5];
	size_t hdr_pos;
	size_t body_pos;
	bool in_msg;
};

static ssize_t dir_produce(void *userdata, uint8_t *buf, size_t size)
{
	struct dir_stream *ds = userdata;
	struct pusher *ps = ds->ps;
	size_t n = 0;
	while (n < size) {
		if (!ds->in_msg) {
			while (ds->next < ps->n_order && !ds->all &&
			       ps->order[ds->next].remote_has)
				ds->next++;
			if (ds->next >= ps->n_order)
				break;
			cas_grpc_frame_prefix(ds->hdr, ps->order[ds->next].len);
			ds->hdr_pos = ds->body_pos = 0;
			ds->in_msg = true;
		}
		struct pushed_dir *d = &ps->order[ds->next];
		if (ds->hdr_pos < 5) {
			size_t t = CAS_MIN(size - n, 5 - ds->hdr_pos);
			memcpy(buf + n, ds->hdr + ds->hdr_pos, t);
			ds->hdr_pos += t;
			n += t;
			continue;
		}
		size_t t = CAS_MIN(size - n, d->len - ds->body_pos);
		if (t)
			memcpy(buf + n, d->raw + ds->body_pos, t);
		ds->body_pos += t;
		n += t;
		if (ds->body_pos == d->len) {
			ds->in_msg = false;
			ds->next++;
			ps->p.sent_objects++;
			ps->p.sent_bytes += d->len;
		}
	}
	return (ssize_t)n;
}

static int put_dirs(struct pusher *ps, const cas_digest *root, bool all)
{
	char hex[CAS_DIGEST_HEX_LEN + 1], got_hex[CAS_DIGEST_HEX_LEN + 1];
	char msg[256];
	int status;
	struct dir_stream ds = {.ps = ps, .all = all};
	cas_digest got = {{0}};
	cas_digest_to_hex(root, hex);
	int r = cas_grpc_call(ps->client, CAS_GRPC_DIRECTORY_PUT, NULL, 0,
			      dir_produce, &ds, dir_digest_msg, &got, &status,
			      msg, sizeof(msg));
	if (r == -EINVAL && !all)
		return -EAGAIN;
	if (r < 0)
		return cas_log_errno(-EIO, "directory %s: Put to %s failed%s%s",
				     hex, cas_grpc_client_url(ps->client),
				     msg[0] ? ": " : "", msg);
	if (!cas_digest_eq(&got, root)) {
		cas_digest_to_hex(&got, got_hex);
		return cas_log_errno(
			-EIO, "directory %s: %s stored the closure as %s", hex,
			cas_grpc_client_url(ps->client), got_hex);
	}
	return 0;
}

static void order_clear(struct pusher *ps)
{
	for (size_t i = 0; i < ps->n_order; i++)
		free(ps->order[i].raw);
	ps->n_order = 0;
}

static int push_root(struct pusher *ps, const char *name, const cas_node *node)
{
	int r;
	switch (node->type) {
	case CAS_NODE_FILE:
		r = want_blob(ps, &node->digest);
		return r < 0 ? r : push_blobs(ps);
	case CAS_NODE_SYMLINK:
		return 0;
	case CAS_NODE_DIRECTORY:
		break;
	}
	if (cas_digest_eq(&node->digest, &CAS_DIGEST_EMPTY_DIRECTORY))
		return 0;
	order_clear(ps);
	r = walk_tree(ps, &node->digest);
	if (r < 0)
		return r;
	r = push_blobs(ps);
	if (r < 0)
		return r;
	bool missing = false;
	for (size_t i = 0; i < ps->n_order; i++)
		missing |= !ps->order[i].remote_has;
	/* The root itself may have been seen under an earlier root. */
	if (!missing)
		return 0;
	r = put_dirs(ps, &node->digest, false);
	if (r == -EAGAIN) {
		cas_log_debug("root %s: the remote wants the whole closure; "
			      "sending it",
			      name);
		r = put_dirs(ps, &node->digest, true);
	}
	tick(ps);
	return r;
}

int cas_remote_push(cas_store *s, const char *url, char *const *names,
		    size_t n_names, cas_remote_progress_cb progress,
		    void *userdata, struct cas_remote_progress *ret_stats)
{
	struct pusher ps = {.s = s, .progress = progress, .userdata = userdata};
	int r = cas_grpc_client_new(url, &ps.client);
	if (r < 0)
		return r;
	pthread_mutex_init(&ps.lock, NULL);
	for (size_t i = 0; i < n_names && r >= 0; i++) {
		cas_node *node = NULL;
		r = s->ops->root_get(s, names[i], &node);
		if (r < 0) {
			r = cas_log_errno(r, "root %s: %m", names[i]);
			break;
		}
		/* Any thread's line names the failure (the remote, the
		 * object); this one only when none did. */
		unsigned long mark = cas_log_error_count();
		r = push_root(&ps, names[i], node);
		free(node);
		if (r < 0 && cas_log_error_count() == mark)
			cas_log_errno(r, "root %s: not pushed to %s: %m",
				      names[i], url);
	}
	if (ret_stats)
		*ret_stats = ps.p;
	order_clear(&ps);
	free(ps.order);
	cas_dmap_release(&ps.dirs_seen, NULL);
	cas_dmap_release(&ps.blobs_seen, NULL);
	cas_grpc_client_free(ps.client);
	free(ps.blobs);
	pthread_mutex_destroy(&ps.lock);
	return r < 0 ? r : 0;
}
