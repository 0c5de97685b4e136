/* ingest.h - the one write path of blob bytes into a local store, for
 * every writer that writes many blobs: `castore import` (import.c) and
 * the remote cache's fills (src/remote/cache_fetch.c). Single blobs
 * (`blob put`, gRPC Put, publish_*) go through the store's blob writer,
 * which lives beside this code in ingest.c and names its blobs the same
 * way.
 *
 * The path, in the order local.h's durability rules need:
 *   1. stage: a blob's bytes go to a file of its own in the store's tmp/
 *      (cas_ingest_stage_*), without any sync; or, for a small blob that
 *      the writer packs, into a group in the writer's memory;
 *   2. commit a group (cas_ingest_commit): the small blobs are appended
 *      to the writer's pack, made durable and indexed in one LMDB
 *      transaction; one syncfs makes every staged file of the group
 *      durable; then each is renamed to its name in blobs/ (never over
 *      an existing name, which holds the same bytes);
 *   3. before the writer commits what refers to its blobs (Directories,
 *      a root): cas_ingest_sync, one more syncfs, so that blobs it found
 *      already present (written by another process, maybe not synced)
 *      are durable too.
 * A writer asks cas_ingest_has before it stages a blob, and skips the
 * blob when the store has it. That check is the seam for `castore gc`
 * (docs/design.md, "Writers and gc"): it is where a writer will pin what
 * it found, as it will pin what it commits.
 *
 * Callers never name the store's folders: staged files are known by the
 * name cas_ingest_stage_* gave, opened and removed through this API.
 *
 * Threads: stage_*, has and sync may be called from any thread at once;
 * commit by one thread at a time (it appends to the writer's pack).
 * Ownership: a cas_ingest belongs to its creator, who frees it after its
 * last commit; it does not own the store, which must outlive it.
 */
#ifndef CAS_STORE_INGEST_H
#define CAS_STORE_INGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "store/local.h"

/* A staged file's name inside the store (NUL-terminated). */
#define CAS_INGEST_NAME_LEN 64
/* Buffers written with O_DIRECT: a group of small blobs, and the scratch
 * of cas_ingest_stage_fd. */
#define CAS_INGEST_ALIGN CAS_LOCAL_PACK_ALIGN
/* Files of at least this many bytes are staged with O_DIRECT (all but a
 * partial last block) when the buffer is aligned: buffered writes of a
 * whole tree cost more CPU than hashing it. */
#define CAS_INGEST_DIRECT_MIN (64u << 10)

/* A staged blob, waiting for its group's commit; outboard is the staged
 * file of its outboard (cas_ingest_outboard_stage), or empty. The
 * commit names the outboard before the blob (docs/design.md, "Store
 * layout"). */
struct cas_ingest_file {
	char name[CAS_INGEST_NAME_LEN];
	char outboard[CAS_INGEST_NAME_LEN];
	cas_digest digest;
	uint64_t size;
};

/* A blob's outboard (core/bao.h) gathered while the writer hashes it in
 * one pass: give cas_ingest_outboard_emit and the sink to
 * cas_bao_encoder_new. The first CAS_INGEST_OUTBOARD_MEM bytes stay in
 * memory (a blob of up to 256 MiB), the rest spills to a staged file,
 * so a writer of a 100 GiB file never holds its 400 MiB outboard.
 * stage gives the staged file's name (for cas_ingest_file.outboard),
 * with sync its bytes made durable first (a writer that names one blob
 * at a time); release frees the sink and removes a staged file it did
 * not give away. One sink per blob, one thread at a time. */
#define CAS_INGEST_OUTBOARD_MEM (1u << 20)
struct cas_local;
struct cas_ingest_outboard {
	struct cas_local *ls;
	uint8_t *buf; /* up to CAS_INGEST_OUTBOARD_MEM bytes, grown */
	size_t len, cap;
	int fd; /* the spill file, -1 until needed */
	uint64_t spilled;
	int error;
	char name[CAS_INGEST_NAME_LEN];
};

/* A group to commit: staged files, and small blobs for the pack (bytes
 * back to back in small_buf, aligned to CAS_INGEST_ALIGN, with room after
 * small_len to pad it to a whole block; smalls[i] says where each lies).
 * Index entries go in smalls' order: sorted by digest, LMDB touches each
 * page once. */
struct cas_ingest_group {
	const struct cas_ingest_file *files;
	size_t n_files;
	uint8_t *small_buf;
	size_t small_len;
	const struct cas_local_small *smalls;
	size_t n_smalls;
};

/* What a commit did. Each step is tried whatever the others gave: the
 * pack is independent of the files; the files are named only when the
 * syncfs succeeded. */
struct cas_ingest_result {
	size_t added; /* blobs new to the store (named or indexed) */
	int pack_r;   /* the pack append: 0 or -errno (logged) */
	int sync_r;   /* the syncfs: 0 or -errno (logged) */
	int name_r;   /* the first naming failure: 0 or -errno (logged) */
};

struct cas_ingest;

/* A writer on the local store s (-EINVAL for another backend, -EROFS for
 * a read-only one). Its pack is created on its first small group. */
int cas_ingest_new(cas_store *s, struct cas_ingest **ret);
void cas_ingest_free(struct cas_ingest *in);
static inline void cas_ingest_freep(struct cas_ingest **in)
{
	cas_ingest_free(*in);
}

/* Starts a new pack once the writer's reaches `bytes` (0, the default:
 * one pack for the writer's life). A bounded cache evicts packs whole,
 * so it keeps them a fraction of its bound. */
void cas_ingest_set_pack_max(struct cas_ingest *in, uint64_t bytes);

/* True when the store keeps a blob of `size` bytes written by import in
 * a pack (not for a store opened no_inline). */
bool cas_ingest_packs(const struct cas_ingest *in, uint64_t size);

/* 1 when the store holds blob d where a writer of `packed` would put it
 * (the pack index, else blobs/), 0 when not. The writer then skips it. */
int cas_ingest_has(struct cas_ingest *in, const cas_digest *d, bool packed);

/* Stages bytes in memory, or a copy of size bytes of src_fd whose size,
 * mtime and ctime must still match st afterwards (else -EBADMSG: the
 * file changed while it was read), through `scratch` (scratch_size
 * bytes; aligned to CAS_INGEST_ALIGN for O_DIRECT). */
int cas_ingest_stage_buffer(struct cas_ingest *in, const void *buf, size_t len,
			    char ret_name[CAS_INGEST_NAME_LEN]);
int cas_ingest_stage_fd(struct cas_ingest *in, int src_fd, uint64_t size,
			const struct stat *st, uint8_t *scratch,
			size_t scratch_size,
			char ret_name[CAS_INGEST_NAME_LEN]);
/* A staged file to write into as the bytes come (a download): *ret_fd is
 * O_WRONLY and the caller's to close. */
int cas_ingest_stage_create(struct cas_ingest *in, int *ret_fd,
			    char ret_name[CAS_INGEST_NAME_LEN]);
/* Opens a staged file for reading (its bytes are readable before they are
 * named): -ENOENT once its group was committed or it was discarded. */
int cas_ingest_stage_open(struct cas_ingest *in, const char *name, int *ret_fd);
/* Removes a staged file (fds open on it keep its bytes). */
void cas_ingest_stage_discard(struct cas_ingest *in, const char *name);

void cas_ingest_outboard_init(struct cas_ingest *in,
			      struct cas_ingest_outboard *o);
int cas_ingest_outboard_emit(void *o, const uint8_t *bytes, size_t len);
int cas_ingest_outboard_stage(struct cas_ingest_outboard *o, bool sync,
			      char ret_name[CAS_INGEST_NAME_LEN]);
void cas_ingest_outboard_release(struct cas_ingest_outboard *o);

/* Commits a group (see the top). Returns 0 when every step succeeded,
 * else the first failure; *ret (may be NULL) says which. When the sync
 * failed, the group's files are neither named nor removed: the caller
 * discards them (a cache's readers may still open them by name). */
int cas_ingest_commit(struct cas_ingest *in, const struct cas_ingest_group *g,
		      struct cas_ingest_result *ret);
/* Removes a group's staged files (a writer that failed). */
void cas_ingest_discard(struct cas_ingest *in,
			const struct cas_ingest_group *g);

/* Makes every blob of the store durable (syncfs), before the writer
 * commits Directories or a root that refer to them. */
int cas_ingest_sync(struct cas_ingest *in);

/* Eviction, for bounded caches (local_evict.c): removes least recently
 * used blob files that no one holds open, and whole packs that no writer
 * appends to, oldest first, until blob files and packs total at most
 * target bytes; returns the bytes they then total (>= 0) or -errno.
 * "Holds open": a shared flock on the fd (cas_local_blob_mark_used); a
 * blob file's access time orders it, a pack's last append. */
int64_t cas_local_evict(cas_store *s, uint64_t target);
/* The total size of the store's blob files and packs. */
int64_t cas_local_blob_bytes(cas_store *s);
/* Marks an fd of one of the store's blobs as in use (a shared flock, as
 * long as the open file lives) and recently used (its access time). */
void cas_local_blob_mark_used(int fd);

#endif
