/* import_stage.c - where an import's blobs wait (import_i.h): staged
 * files until one syncfs per group names them, and small blobs in an
 * in-memory group that the publisher thread appends to the import's pack
 * and indexes in one transaction. Both groups are bounded: a worker that
 * finds the small-blob group at its limit waits for the publisher. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"
#include "store/import_i.h"

#define STAGE_FILES	  8192
#define STAGE_BYTES	  (256ull << 20)
#define SMALL_GROUP_BYTES (16u << 20)
#define SMALL_GROUP_MAX	  (2 * SMALL_GROUP_BYTES) /* workers wait beyond */
/* Fixed, so it stays aligned: room for the last blob and the padding. */
#define ARENA_SIZE (SMALL_GROUP_MAX + CAS_LOCAL_PACK_MAX + CAS_INGEST_ALIGN)

static void want_flush_locked(struct importer *imp)
{
	if (!imp->stage_want) {
		imp->stage_want = true;
		pthread_cond_signal(&imp->stage_cond);
	}
}

/* A staged blob (and its staged outboard, or NULL) for the next group. */
int cas_imp_stage_add(struct importer *imp, const char *name,
		      const char *outboard, const cas_digest *d, uint64_t size)
{
	pthread_mutex_lock(&imp->stage_lock);
	if (cas_array_grow(&imp->staged, &imp->cap_staged, imp->n_staged + 1,
			   sizeof(*imp->staged), 1024) < 0) {
		pthread_mutex_unlock(&imp->stage_lock);
		cas_ingest_stage_discard(imp->in, name);
		if (outboard)
			cas_ingest_stage_discard(imp->in, outboard);
		return -ENOMEM;
	}
	struct cas_ingest_file *st = &imp->staged[imp->n_staged++];
	snprintf(st->name, sizeof(st->name), "%s", name);
	snprintf(st->outboard, sizeof(st->outboard), "%s",
		 outboard ? outboard : "");
	st->digest = *d;
	st->size = size;
	imp->staged_bytes += size;
	if (imp->n_staged >= STAGE_FILES || imp->staged_bytes >= STAGE_BYTES)
		want_flush_locked(imp);
	pthread_mutex_unlock(&imp->stage_lock);
	return 0;
}

int cas_imp_small_add(struct importer *imp, const uint8_t *buf, size_t len,
		      const cas_digest *d)
{
	int r = cas_ingest_has(imp->in, d, true);
	if (r != 0)
		return r < 0 ? r : 0;
	pthread_mutex_lock(&imp->stage_lock);
	while (imp->arena_len >= SMALL_GROUP_MAX && !imp->stage_stop &&
	       !cas_imp_failed(imp))
		pthread_cond_wait(&imp->small_cond, &imp->stage_lock);
	if (imp->small_set.n && cas_dmap_find(&imp->small_set, d))
		goto out; /* already in this group */
	if ((r = cas_array_grow(&imp->smalls, &imp->cap_smalls,
				imp->n_smalls + 1, sizeof(*imp->smalls),
				1024)) < 0 ||
	    (r = cas_dmap_put(&imp->small_set, d, NULL)) < 0)
		goto out;
	r = 0;
	if (!imp->arena)
		imp->arena = TAKE_PTR(imp->spare_arena);
	if (!imp->arena) {
		/* Only touched as it fills. */
		imp->arena = aligned_alloc(CAS_INGEST_ALIGN, ARENA_SIZE);
		if (!imp->arena) {
			r = -ENOMEM;
			goto out;
		}
	}
	memcpy(imp->arena + imp->arena_len, buf, len);
	imp->smalls[imp->n_smalls++] =
		(struct cas_local_small){*d, imp->arena_len, len};
	imp->arena_len += len;
	if (imp->arena_len >= SMALL_GROUP_BYTES)
		want_flush_locked(imp);
out:
	pthread_mutex_unlock(&imp->stage_lock);
	return r;
}

static int small_cmp(const void *a, const void *b)
{
	const struct cas_local_small *x = a, *y = b;
	return memcmp(x->digest.bytes, y->digest.bytes, CAS_DIGEST_LEN);
}

/* The group goes through the store's write path (ingest.h): the small
 * blobs to the pack (indexed in key order: LMDB then touches each page
 * once); one syncfs for every file staged so far, then the renames.
 * After a failure the staged files are only removed. */
void cas_imp_stage_flush(struct importer *imp)
{
	pthread_mutex_lock(&imp->stage_lock);
	struct cas_ingest_file *v = TAKE_PTR(imp->staged);
	size_t n = imp->n_staged;
	imp->n_staged = imp->cap_staged = 0;
	imp->staged_bytes = 0;
	struct cas_local_small *sv = TAKE_PTR(imp->smalls);
	uint8_t *arena = TAKE_PTR(imp->arena);
	size_t n_small = imp->n_smalls, cap_small = imp->cap_smalls;
	size_t arena_len = imp->arena_len;
	imp->n_smalls = imp->cap_smalls = imp->arena_len = 0;
	cas_dmap_clear(&imp->small_set);
	pthread_cond_broadcast(&imp->small_cond);
	pthread_mutex_unlock(&imp->stage_lock);
	if (n_small > 1)
		qsort(sv, n_small, sizeof(*sv), small_cmp);
	struct cas_ingest_group g = {
		.files = v,
		.n_files = n,
		.small_buf = arena,
		.small_len = arena_len,
		.smalls = sv,
		.n_smalls = n_small,
	};
	int r = cas_imp_failed(imp);
	struct cas_ingest_result res = {0};
	if (r == 0 && (r = cas_ingest_commit(imp->in, &g, &res)) < 0)
		cas_imp_set_error(imp, r);
	atomic_fetch_add_explicit(&imp->blobs_added, res.added,
				  memory_order_relaxed);
	if (r < 0)
		cas_ingest_discard(imp->in, &g); /* what was not named */
	/* Two arenas take turns: one fills while the other is written.
	 * Allocating a fresh one per group faulted in every page of it
	 * again, which showed in profiles. */
	pthread_mutex_lock(&imp->stage_lock);
	if (!imp->spare_arena)
		imp->spare_arena = TAKE_PTR(arena);
	if (!imp->smalls) {
		imp->smalls = TAKE_PTR(sv);
		imp->cap_smalls = cap_small;
	}
	pthread_mutex_unlock(&imp->stage_lock);
	free(arena);
	free(sv);
	free(v);
}

void *cas_imp_publisher_main(void *arg)
{
	struct importer *imp = arg;
	pthread_mutex_lock(&imp->stage_lock);
	for (;;) {
		while (!imp->stage_want && !imp->stage_stop)
			pthread_cond_wait(&imp->stage_cond, &imp->stage_lock);
		if (imp->stage_stop)
			break; /* the rest is flushed by cas_import */
		imp->stage_want = false;
		pthread_mutex_unlock(&imp->stage_lock);
		cas_imp_stage_flush(imp);
		pthread_mutex_lock(&imp->stage_lock);
	}
	pthread_mutex_unlock(&imp->stage_lock);
	return NULL;
}
