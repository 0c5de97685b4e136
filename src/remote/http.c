/* http.c - the fetcher for a published HTTP layout (docs/remote.md):
 *   URL/blobs/ab/<hex>  URL/directories/ab/<hex>  URL/roots
 *   URL/packs/ab/<hex>  (ranges of a Directory's small files)
 *   URL/trees/ab/<hex>  (a root's Directories in one file)
 * Plain GETs with libcurl, so any web server, CDN or bucket serves it.
 * Blobs stream to the caller's sink; Directories (one tree level per
 * round) and batches of small blobs are fetched many at a time into
 * memory with a curl multi handle. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"
#include "remote/remote_i.h"

#define HTTP_PARALLEL	 16
#define HTTP_BLOB_BUFFER (512L << 10)
/* libcurl allocates its receive buffer per transfer and frees it at the
 * end; one of 512 KiB per 4 MiB range, freed at the top of the heap, went
 * back to the kernel and was faulted in again by the next range (the
 * mount fixes glibc's mmap threshold, which leaves its trim threshold at
 * 128 KiB). 64 KiB stays under it: in an interleaved A/B of cold 1 GiB
 * reads, 2.2-2.4 s of the mount's CPU with 512 KiB, 1.2-1.9 s with this. */
#define HTTP_RANGE_BUFFER (64L << 10)
/* No Directory a sane store makes comes near this; a server sending more
 * is refused before it fills memory. */
#define HTTP_MAX_DIRECTORY (64u << 20)
#define HTTP_MAX_ROOTS	   (256u << 20)

struct dir_multi {
	CURLM *multi;
	CURL *easy[HTTP_PARALLEL];
};

struct http_fetcher {
	cas_fetcher base;
	char *url; /* without a trailing '/' */
	struct cas_curl_pool pool;
	pthread_mutex_t lock;
	struct dir_multi *multis[8]; /* protected by lock */
	size_t n_multis;	     /* protected by lock */
};

static struct http_fetcher *to_http(cas_fetcher *f)
{
	return (struct http_fetcher *)f;
}

static void object_url(struct http_fetcher *h, const char *kind,
		       const cas_digest *d, char *buf, size_t size)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest_to_hex(d, hex);
	snprintf(buf, size, "%s/%s/%.2s/%s", h->url, kind, hex, hex);
}

/* Called by libcurl about once a second, even when nothing comes: a
 * cache that closes ends its transfers. */
static int xfer_info(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
		     curl_off_t ultotal, curl_off_t ulnow)
{
	return cas_fetcher_cancelled(clientp) ? 1 : 0;
}

static void setup_easy(struct http_fetcher *h, CURL *e, const char *url)
{
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, 10L);
	/* A stalled server is a failure, not a hang. */
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (long)cas_fetch_stall_s());
	curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, xfer_info);
	curl_easy_setopt(e, CURLOPT_XFERINFODATA, &h->base);
	curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(e, CURLOPT_USERAGENT,
			 "castore/"
			 "0.1");
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
}

/* Maps a finished transfer to 0, -ENOENT, -ETIMEDOUT (stalled),
 * -ECANCELED or -EIO; log: an -EIO is logged (the others are the
 * caller's to report, naming the object). */
static int transfer_errno(CURL *e, CURLcode c, const char *url, bool log)
{
	long code = 0;

	if (c == CURLE_OPERATION_TIMEDOUT)
		return -ETIMEDOUT;
	if (c == CURLE_ABORTED_BY_CALLBACK)
		return -ECANCELED;
	if (c != CURLE_OK)
		return log ? cas_log_errno(-EIO, "%s: %s", url,
					   curl_easy_strerror(c))
			   : -EIO;
	curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
	if (code == 200 || code == 206)
		return 0;
	if (code == 404 || code == 410)
		return -ENOENT;
	return log ? cas_log_errno(-EIO, "%s: HTTP status %ld", url, code)
		   : -EIO;
}

static int transfer_result(CURL *e, CURLcode c, const char *url, int sink_r)
{
	return sink_r < 0 ? sink_r : transfer_errno(e, c, url, true);
}

struct blob_get {
	CURL *easy;
	cas_fetch_sink sink;
	void *userdata;
	int r;
	int ok;		   /* -1 unknown, 0 no (error body, dropped), 1 yes */
	uint64_t max, got; /* the bound (remote_i.h), bytes passed on */
};

static size_t blob_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct blob_get *g = userdata;
	size_t len = size * nmemb;

	if (g->ok < 0) {
		long code = 0;
		curl_easy_getinfo(g->easy, CURLINFO_RESPONSE_CODE, &code);
		g->ok = code == 200;
		/* A blob no FileNode sized: at most what the server says it
		 * sends (libcurl holds it to that), else the maximum. A
		 * sized one that the server says is longer is refused
		 * before its first byte. */
		curl_off_t cl = -1;
		curl_easy_getinfo(g->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T,
				  &cl);
		if (g->max == CAS_FETCH_UNSIZED)
			g->max = cl >= 0 ? (uint64_t)cl : CAS_FETCH_UNSIZED_MAX;
		else if (g->ok && cl >= 0 && (uint64_t)cl > g->max)
			g->r = -EFBIG;
	}
	if (!g->ok)
		return len;
	if (g->r >= 0 && len > g->max - g->got)
		g->r = -EFBIG;
	if (g->r < 0)
		return 0;
	g->got += len;
	g->r = g->sink(g->userdata, ptr, len);
	return g->r < 0 ? 0 : len;
}

static int http_blob_fetch(cas_fetcher *f, const cas_digest *d, uint64_t max,
			   cas_fetch_sink sink, void *userdata)
{
	struct http_fetcher *h = to_http(f);
	char url[4096];
	CURL *e = cas_curl_pool_get(&h->pool);
	if (!e)
		return -ENOMEM;
	object_url(h, "blobs", d, url, sizeof(url));
	struct blob_get g = {e, sink, userdata, 0, -1, max, 0};
	setup_easy(h, e, url);
	/* libcurl's default 16 KiB means a callback (a write and a hash
	 * update) per 16 KiB of a large blob. */
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, HTTP_BLOB_BUFFER);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, blob_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, &g);
	CURLcode c = curl_easy_perform(e);
	int r = transfer_result(e, c, url, g.r);
	cas_curl_pool_put(&h->pool, e);
	return r;
}

struct membuf {
	uint8_t *buf;
	size_t len, cap, max;
	bool too_big;
	/* When set, the body of an answer other than 200 (a 404 page) is
	 * dropped rather than kept (and counted against max). */
	CURL *easy;
	int ok; /* -1 unknown, 0 no, 1 yes */
	/* A Range request: 206 is the range; 200 (a server that ignores
	 * Range) the whole file, of which skip bytes are dropped and the
	 * transfer is cut, on purpose (full), once max bytes are kept. */
	bool range, full;
	uint64_t skip;
};

static size_t mem_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct membuf *m = userdata;
	size_t len = size * nmemb;

	if (m->easy && m->ok < 0) {
		long code = 0;
		curl_easy_getinfo(m->easy, CURLINFO_RESPONSE_CODE, &code);
		m->ok = code == 200 || (m->range && code == 206);
		if (code != 200)
			m->skip = 0;
	}
	if (m->easy && !m->ok)
		return len;
	if (m->skip) {
		size_t drop = m->skip < len ? (size_t)m->skip : len;
		m->skip -= drop;
		ptr += drop;
		len -= drop;
	}
	if (m->range && len > m->max - m->len) {
		len = m->max - m->len;
		m->full = true;
	} else if (len > m->max - m->len) {
		m->too_big = true;
		return 0;
	}
	if (m->len + len > m->cap) {
		size_t cap = m->cap ? m->cap : 4096;
		while (cap < m->len + len)
			cap *= 2;
		uint8_t *n = realloc(m->buf, cap);
		if (!n)
			return 0;
		m->buf = n;
		m->cap = cap;
	}
	if (len)
		memcpy(m->buf + m->len, ptr, len);
	m->len += len;
	return m->full ? 0 : size * nmemb;
}

static struct dir_multi *multi_get(struct http_fetcher *h)
{
	struct dir_multi *m = NULL;

	pthread_mutex_lock(&h->lock);
	if (h->n_multis > 0)
		m = h->multis[--h->n_multis];
	pthread_mutex_unlock(&h->lock);
	if (m)
		return m;
	m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	m->multi = curl_multi_init();
	if (!m->multi) {
		free(m);
		return NULL;
	}
	return m;
}

static void multi_free(struct dir_multi *m)
{
	for (size_t i = 0; i < HTTP_PARALLEL; i++)
		if (m->easy[i])
			curl_easy_cleanup(m->easy[i]);
	curl_multi_cleanup(m->multi);
	free(m);
}

static void multi_put(struct http_fetcher *h, struct dir_multi *m)
{
	pthread_mutex_lock(&h->lock);
	if (h->n_multis < CAS_ARRAY_SIZE(h->multis)) {
		h->multis[h->n_multis++] = m;
		m = NULL;
	}
	pthread_mutex_unlock(&h->lock);
	if (m)
		multi_free(m);
}

struct slot {
	size_t index; /* into ds; SIZE_MAX when idle */
	struct membuf body;
	char url[4096];
};

/* A batch of GETs into memory, HTTP_PARALLEL at a time on one multi. */
struct multi_job {
	const char *kind; /* "blobs", "directories" or "packs" */
	const cas_digest *ds;
	const struct cas_fetch_range *ranges; /* packs: instead of ds */
	size_t n, max;
	/* Blobs: a failure is that blob's result, never logged here, and a
	 * broken multi fails every blob not done rather than the batch. */
	bool per_item;
	/* Called once per finished transfer with 0, -ENOENT, -EFBIG or
	 * -EIO; < 0 stops the batch and is returned. */
	int (*done)(struct multi_job *j, size_t i, int r, const uint8_t *buf,
		    size_t len);
	cas_fetch_dir_cb dir_cb;
	cas_fetch_blob_cb blob_cb;
	void *userdata;
};

static int multi_fetch(struct http_fetcher *h, struct multi_job *j)
{
	struct slot slots[HTTP_PARALLEL];
	size_t next = 0, running = 0;
	bool finished_any = false, answered = false;
	int r = 0;

	struct dir_multi *m = multi_get(h);
	if (!m)
		r = -ENOMEM;
	for (size_t i = 0; i < HTTP_PARALLEL; i++) {
		slots[i].index = SIZE_MAX;
		slots[i].body = (struct membuf){.max = j->max};
	}

	while (r == 0 && (next < j->n || running > 0)) {
		/* Fill idle slots. */
		for (size_t i = 0; i < HTTP_PARALLEL && next < j->n; i++) {
			struct slot *s = &slots[i];
			if (s->index != SIZE_MAX)
				continue;
			if (!m->easy[i] && !(m->easy[i] = curl_easy_init())) {
				r = -ENOMEM;
				break;
			}
			CURL *e = m->easy[i];
			curl_easy_reset(e);
			s->index = next++;
			s->body.len = 0;
			s->body.too_big = false;
			s->body.easy = e;
			s->body.ok = -1;
			s->body.range = s->body.full = false;
			s->body.skip = 0;
			const struct cas_fetch_range *rg =
				j->ranges ? &j->ranges[s->index] : NULL;
			object_url(h, j->kind,
				   rg ? &rg->pack : &j->ds[s->index], s->url,
				   sizeof(s->url));
			setup_easy(h, e, s->url);
			if (rg) {
				char range[64];
				snprintf(range, sizeof(range),
					 "%" PRIu64 "-%" PRIu64, rg->off,
					 rg->off + rg->len - 1);
				curl_easy_setopt(e, CURLOPT_RANGE, range);
				s->body.range = true;
				s->body.skip = rg->off;
				s->body.max = rg->len;
			}
			curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, mem_write);
			curl_easy_setopt(e, CURLOPT_WRITEDATA, &s->body);
			curl_easy_setopt(e, CURLOPT_PRIVATE, s);
			curl_multi_add_handle(m->multi, e);
			running++;
		}
		if (r < 0 || running == 0)
			break;
		int still;
		CURLMcode mc = curl_multi_perform(m->multi, &still);
		if (mc != CURLM_OK) {
			if (j->per_item)
				cas_log_debug("%s: %s", h->url,
					      curl_multi_strerror(mc));
			r = j->per_item
				    ? -EIO
				    : cas_log_errno(-EIO, "%s: %s", h->url,
						    curl_multi_strerror(mc));
			break;
		}
		CURLMsg *msg;
		int left;
		bool progressed = false;
		while ((msg = curl_multi_info_read(m->multi, &left))) {
			if (msg->msg != CURLMSG_DONE)
				continue;
			CURL *e = msg->easy_handle;
			CURLcode c = msg->data.result;
			struct slot *s = NULL;
			curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&s);
			curl_multi_remove_handle(m->multi, e);
			running--;
			progressed = true;
			finished_any = true;
			size_t idx = s->index;
			s->index = SIZE_MAX;
			if (r < 0)
				continue;
			long code = 0;
			curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
			answered |= code != 0;
			int tr;
			if (s->body.full)
				tr = 0;
			else if (s->body.too_big)
				tr = j->per_item
					     ? -EFBIG
					     : cas_log_errno(-EIO,
							     "%s: larger than "
							     "%zu bytes",
							     s->url, j->max);
			else
				tr = transfer_errno(e, c, s->url, !j->per_item);
			tr = j->done(j, idx, tr, s->body.buf, s->body.len);
			if (tr < 0)
				r = tr;
		}
		if (r == 0 && !progressed && running > 0)
			curl_multi_poll(m->multi, NULL, 0, 1000, NULL);
	}
	/* Stopped early: drop the transfers still running; per item, each
	 * blob not done gets the failure. */
	for (size_t i = 0; i < HTTP_PARALLEL; i++) {
		if (slots[i].index == SIZE_MAX)
			continue;
		curl_multi_remove_handle(m->multi, m->easy[i]);
		if (j->per_item)
			(void)j->done(j, slots[i].index, -EIO, NULL, 0);
		slots[i].index = SIZE_MAX;
	}
	if (r < 0 && j->per_item) {
		for (; next < j->n; next++)
			(void)j->done(j, next,
				      r == -ENOMEM && !finished_any ? -ENOMEM
								    : -EIO,
				      NULL, 0);
		/* Could it even start? Else each blob has its result. */
		if (finished_any)
			r = 0;
	}
	/* Per item, a server that answered nothing is the call's failure
	 * too (each blob has had its -EIO). */
	if (r == 0 && j->per_item && j->n > 0 && !answered)
		r = -EIO;
	for (size_t i = 0; i < HTTP_PARALLEL; i++)
		free(slots[i].body.buf);
	if (m)
		multi_put(h, m);
	return r;
}

static int directory_done(struct multi_job *j, size_t i, int r,
			  const uint8_t *buf, size_t len)
{
	return r < 0 ? r : j->dir_cb(j->userdata, &j->ds[i], buf, len);
}

static int http_directories_fetch(cas_fetcher *f, const cas_digest *ds,
				  size_t n, cas_fetch_dir_cb cb, void *userdata)
{
	struct multi_job j = {.kind = "directories",
			      .ds = ds,
			      .n = n,
			      .max = HTTP_MAX_DIRECTORY,
			      .done = directory_done,
			      .dir_cb = cb,
			      .userdata = userdata};
	return multi_fetch(to_http(f), &j);
}

static int blob_done(struct multi_job *j, size_t i, int r, const uint8_t *buf,
		     size_t len)
{
	j->blob_cb(j->userdata, i, r, r == 0 ? buf : NULL, r == 0 ? len : 0);
	return 0;
}

static int http_blobs_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
			    size_t max, cas_fetch_blob_cb cb, void *userdata)
{
	struct multi_job j = {.kind = "blobs",
			      .ds = ds,
			      .n = n,
			      .max = max,
			      .per_item = true,
			      .done = blob_done,
			      .blob_cb = cb,
			      .userdata = userdata};
	return multi_fetch(to_http(f), &j);
}

static int http_ranges_fetch(cas_fetcher *f, const struct cas_fetch_range *v,
			     size_t n, cas_fetch_blob_cb cb, void *userdata)
{
	struct multi_job j = {.kind = "packs",
			      .ranges = v,
			      .n = n,
			      .per_item = true,
			      .done = blob_done,
			      .blob_cb = cb,
			      .userdata = userdata};
	return multi_fetch(to_http(f), &j);
}

/* GETs url whole into *body (at most max bytes; an error page is
 * dropped): 0, -ENOENT, or -EIO (logged when log). */
static int get_whole(struct http_fetcher *h, const char *url, size_t max,
		     bool log, struct membuf *body)
{
	*body = (struct membuf){.max = max, .ok = -1};
	CURL *e = cas_curl_pool_get(&h->pool);
	if (!e)
		return -ENOMEM;
	body->easy = e;
	setup_easy(h, e, url);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, mem_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, body);
	CURLcode c = curl_easy_perform(e);
	int r = body->too_big ? (log ? cas_log_errno(-EIO,
						     "%s: larger than %zu "
						     "bytes",
						     url, max)
				     : -EIO)
			      : transfer_errno(e, c, url, log);
	cas_curl_pool_put(&h->pool, e);
	body->easy = NULL;
	if (r < 0) {
		free(body->buf);
		body->buf = NULL;
		body->len = 0;
	}
	return r;
}

static int http_roots_fetch(cas_fetcher *f, char **ret_buf, size_t *ret_len)
{
	struct http_fetcher *h = to_http(f);
	char url[4096];
	struct membuf body;
	snprintf(url, sizeof(url), "%s/roots", h->url);
	int r = get_whole(h, url, HTTP_MAX_ROOTS, true, &body);
	if (r == -ENOENT)
		r = 0; /* a layout with no roots published yet */
	if (r < 0)
		return r;
	*ret_buf = (char *)body.buf;
	*ret_len = body.len;
	return 0;
}

/* The tree file of a published root (remote_i.h), split into its
 * Directories. Quiet: the caller falls back to the Directory files. */
static int http_directory_fetch_tree(cas_fetcher *f, const cas_digest *d,
				     cas_fetch_dir_cb cb, void *userdata)
{
	struct http_fetcher *h = to_http(f);
	char url[4096];
	struct membuf body;
	object_url(h, "trees", d, url, sizeof(url));
	int r = get_whole(h, url, CAS_LAYOUT_TREE_MAX, false, &body);
	if (r >= 0)
		r = cas_tree_file_split(body.buf, body.len, cb, userdata);
	free(body.buf);
	return r < 0 ? r : 0;
}

/* The outboard published beside a large blob (publish.c). Quiet: a
 * layout without one is read whole, as before. */
static int http_outboard_fetch(cas_fetcher *f, const cas_digest *d, size_t max,
			       uint8_t **ret_buf, size_t *ret_len)
{
	struct http_fetcher *h = to_http(f);
	char url[4096];
	struct membuf body;
	object_url(h, "outboards", d, url, sizeof(url));
	int r = get_whole(h, url, max, false, &body);
	if (r < 0)
		return r;
	*ret_buf = body.buf;
	*ret_len = body.len;
	return 0;
}

/* A Range GET of a blob file: 206 gives the range; a server that
 * ignores Range (200) sends the whole file, of which the bytes before
 * off are dropped and the transfer is cut once len are kept. */
static int http_blob_range_fetch(cas_fetcher *f, const cas_digest *d,
				 uint64_t off, size_t len, uint8_t *buf,
				 size_t *ret_len)
{
	struct http_fetcher *h = to_http(f);
	char url[4096], range[64];
	if (len == 0) {
		*ret_len = 0;
		return 0;
	}
	object_url(h, "blobs", d, url, sizeof(url));
	CURL *e = cas_curl_pool_get(&h->pool);
	if (!e)
		return -ENOMEM;
	/* Into the caller's buffer: membuf grows only if it must, and a
	 * buffer of exactly len never must. */
	struct membuf body = {.buf = buf,
			      .cap = len,
			      .max = len,
			      .easy = e,
			      .ok = -1,
			      .range = true,
			      .skip = off};
	setup_easy(h, e, url);
	snprintf(range, sizeof(range), "%" PRIu64 "-%" PRIu64, off,
		 off + len - 1);
	curl_easy_setopt(e, CURLOPT_RANGE, range);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, HTTP_RANGE_BUFFER);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, mem_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, &body);
	CURLcode c = curl_easy_perform(e);
	int r = body.full && c == CURLE_WRITE_ERROR
			? 0 /* cut on purpose: a 200 with all of it */
			: transfer_errno(e, c, url, false);
	cas_curl_pool_put(&h->pool, e);
	if (body.buf != buf) { /* cannot happen: max is the buffer's */
		free(body.buf);
		return -EIO;
	}
	if (r < 0)
		return r;
	*ret_len = body.len;
	return 0;
}

static void http_free(cas_fetcher *f)
{
	struct http_fetcher *h = to_http(f);
	for (size_t i = 0; i < h->n_multis; i++)
		multi_free(h->multis[i]);
	pthread_mutex_destroy(&h->lock);
	cas_curl_pool_release(&h->pool);
	free(h->url);
	free(h);
}

static const struct cas_fetcher_ops http_ops = {
	.blob_fetch = http_blob_fetch,
	.directories_fetch = http_directories_fetch,
	.roots_fetch = http_roots_fetch,
	.blobs_fetch = http_blobs_fetch,
	.ranges_fetch = http_ranges_fetch,
	.directory_fetch_tree = http_directory_fetch_tree,
	.tree_optional = true,
	.outboard_fetch = http_outboard_fetch,
	.blob_range_fetch = http_blob_range_fetch,
	.free = http_free,
};

int cas_http_fetcher_new(const char *url, cas_fetcher **ret)
{
	int r = cas_curl_init();
	if (r < 0)
		return r;
	struct http_fetcher *h = calloc(1, sizeof(*h));
	if (!h || !(h->url = strdup(url))) {
		free(h);
		return -ENOMEM;
	}
	size_t len = strlen(h->url);
	while (len > 0 && h->url[len - 1] == '/')
		h->url[--len] = 0;
	h->base.ops = &http_ops;
	cas_curl_pool_init(&h->pool);
	pthread_mutex_init(&h->lock, NULL);
	*ret = &h->base;
	return 0;
}
