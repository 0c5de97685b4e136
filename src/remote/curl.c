/* curl.c - libcurl setup and the pool of easy handles (remote_i.h).
 * A pooled handle keeps its connection, so consecutive requests of one
 * thread or of several reuse it instead of connecting again. */
#include <errno.h>
#include <stdlib.h>

#include "core/log.h"
#include "remote/remote_i.h"

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result;

static void curl_init_once(void)
{
	curl_init_result = curl_global_init(CURL_GLOBAL_ALL);
}

int cas_curl_init(void)
{
	pthread_once(&curl_once, curl_init_once);
	if (curl_init_result != CURLE_OK)
		return cas_log_errno(-EIO, "libcurl: %s",
				     curl_easy_strerror(curl_init_result));
	return 0;
}

void cas_curl_pool_init(struct cas_curl_pool *p)
{
	pthread_mutex_init(&p->lock, NULL);
	p->n_free = 0;
}

void cas_curl_pool_release(struct cas_curl_pool *p)
{
	for (size_t i = 0; i < p->n_free; i++)
		curl_easy_cleanup(p->free_handles[i]);
	p->n_free = 0;
	pthread_mutex_destroy(&p->lock);
}

CURL *cas_curl_pool_get(struct cas_curl_pool *p)
{
	CURL *h = NULL;

	pthread_mutex_lock(&p->lock);
	if (p->n_free > 0)
		h = p->free_handles[--p->n_free];
	pthread_mutex_unlock(&p->lock);
	if (h)
		curl_easy_reset(h);
	else
		h = curl_easy_init();
	return h;
}

void cas_curl_pool_put(struct cas_curl_pool *p, CURL *h)
{
	if (!h)
		return;
	pthread_mutex_lock(&p->lock);
	if (p->n_free < CAS_ARRAY_SIZE(p->free_handles)) {
		p->free_handles[p->n_free++] = h;
		h = NULL;
	}
	pthread_mutex_unlock(&p->lock);
	if (h)
		curl_easy_cleanup(h);
}

unsigned cas_fetch_stall_s(void)
{
	/* For tests of a stalled remote, which should not wait a minute. */
	const char *e = getenv("CASTORE_STALL_TIMEOUT");
	char *end;
	unsigned long v = e ? strtoul(e, &end, 10) : 0;
	if (!e || !*e || *end || v < 1 || v > 3600)
		return CAS_FETCH_STALL_S;
	return (unsigned)v;
}
