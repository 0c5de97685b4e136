/* remote.c - opening a remote store by its URL (remote.h). */
#include <errno.h>
#include <string.h>

#include "core/log.h"
#include "remote/remote.h"
#include "remote/remote_i.h"

static bool has_prefix(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

bool cas_remote_is_url(const char *spec)
{
	return spec &&
	       (has_prefix(spec, "grpc+http://") ||
		has_prefix(spec, "grpc+https://") ||
		has_prefix(spec, "grpc+unix:/") ||
		has_prefix(spec, "http://") || has_prefix(spec, "https://"));
}

int cas_remote_open(const char *url, const struct cas_remote_options *opts,
		    cas_store **ret)
{
	cas_fetcher *f = NULL;
	int r;

	if (has_prefix(url, "grpc+"))
		r = cas_grpc_fetcher_new(url, &f);
	else if (has_prefix(url, "http://") || has_prefix(url, "https://"))
		r = cas_http_fetcher_new(url, &f);
	else
		return cas_log_errno(-EINVAL, "%s: not a remote store URL",
				     url);
	if (r < 0)
		return r;
	return cas_cache_store_new(f, url, opts, ret);
}
