/* remote.h - remote stores behind the cas_store interface (DESIGN.md
 * section 7): tvix castore gRPC (grpc+http://HOST:PORT,
 * grpc+unix:///PATH) and published HTTP layouts (http://, https://),
 * always in front of a local cache that is an ordinary local store.
 *
 * Contract: a store returned here is a cas_store (store/store.h) with its
 * thread-safety and ownership rules. Nothing fetched is used or cached
 * before its digest is checked.
 */
#ifndef CAS_REMOTE_REMOTE_H
#define CAS_REMOTE_REMOTE_H

#include <stdbool.h>
#include <stdint.h>

#include "store/store.h"

struct cas_remote_options {
	const char *cache_dir; /* required: the local cache store */
	uint64_t cache_max;    /* bytes; 0: unbounded */
};

/* True if spec names a remote store (by its scheme). */
bool cas_remote_is_url(const char *spec);

int cas_remote_open(const char *url, const struct cas_remote_options *opts,
		    cas_store **ret);

#endif
