/* local_i.h - what the local store's files (local.c, local_db.c,
 * local_blob.c, local_pack.c, ingest.c) share with each other and with
 * import.c and verify.c.
 *
 * Contract: the struct is private to src/store. Its fds and LMDB handles
 * are set once by cas_local_open and read-only afterwards, so any thread
 * may use them; the read-transaction pool has its own lock.
 */
#ifndef CAS_STORE_LOCAL_I_H
#define CAS_STORE_LOCAL_I_H

#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "core/util.h"
#include "store/ingest.h"
#include "store/local.h"

/* "ab/abcdef..." (fan-out folder, slash, 64 hex, NUL). */
#define CAS_BLOB_REL_LEN (3 + CAS_DIGEST_HEX_LEN + 1)

#define CAS_LOCAL_TXN_POOL 16
#define CAS_LOCAL_PACK_FDS 256

struct cas_local_pack_fd {
	uint64_t id;
	int fd;
};

struct cas_local {
	cas_store base;
	char *dir;
	int dir_fd;
	int blobs_fd;
	int tmp_fd;
	int packs_fd;	  /* -1: read-only store without packs */
	int outboards_fd; /* -1: read-only store without outboards */
	bool readonly;
	/* Read-only without write access to lock.mdb: LMDB runs without
	 * its reader table (MDB_NOLOCK), so writers do not see our
	 * snapshots; every read checks afterwards that none of its pages
	 * can have been reused (cas_local_rtxn_check). */
	bool nolock;
	bool is_cache; /* DIR/castore-cache: a remote's cache */
	MDB_env *env;
	MDB_dbi dbi_directories;
	MDB_dbi dbi_roots;
	MDB_dbi dbi_blobs;
	MDB_dbi dbi_times; /* digest -> last put of a Directory (gc's grace) */
	bool has_blobs_db; /* false: a read-only open of a store without it */
	bool has_times_db; /* likewise */
	bool write_packs;  /* import packs small blobs (not no_inline) */
	int pid;	   /* in temporary file names */

	/* Fan-out folders known to exist (one bit each). */
	_Atomic uint64_t fanout_ok[4];
	/* 0 unknown, 1 O_TMPFILE + linkat(AT_EMPTY_PATH), 2 O_TMPFILE +
	 * linkat of /proc/self/fd/N, 3 named temporary files. */
	_Atomic int tmp_mode;
	_Atomic uint64_t tmp_counter;
	/* Staged files are written with O_DIRECT until the file system
	 * refuses it once. */
	_Atomic bool direct_off;

	pthread_mutex_t pack_lock;
	struct cas_local_pack_fd pack_fds[CAS_LOCAL_PACK_FDS]; /* pack_lock */
	size_t n_pack_fds;				       /* pack_lock */

	/* The writer side of gc (gc_seam.c): fds of DIR/gc.lock, DIR/gc.turn
	 * and DIR/live/<pid>, and of DIR/live (-1 on a read-only store);
	 * gc_holders counts
	 * the writer steps that hold gc.lock shared through gc_lock_fd. */
	int gc_lock_fd, gc_turn_fd, live_fd, live_dir_fd;
	pthread_mutex_t gc_mu;
	pthread_cond_t gc_cond; /* gc_holders dropped to 0 */
	unsigned gc_holders;	/* protected by gc_mu */
	_Atomic uint64_t pin_counter;
	/* What the cleanup at open removed from tmp/ (gc counts it). */
	uint64_t open_tmp_files, open_tmp_bytes;

	pthread_mutex_t pool_lock;
	MDB_txn *pool[CAS_LOCAL_TXN_POOL]; /* protected by pool_lock */
	size_t n_pool;			   /* protected by pool_lock */
};

static inline struct cas_local *to_local(cas_store *s)
{
	return (struct cas_local *)s;
}

/* The one place MDB_* codes become -errno. */
int cas_local_mdb_errno(int rc);

/* Calls fn for every record of dbi in txn, in key order, until it
 * returns < 0 (returned). fn may delete the record under the cursor
 * (mdb_cursor_del(cur, 0)) in a write transaction; the walk goes on with
 * the next one. */
typedef int (*cas_local_record_fn)(void *userdata, MDB_cursor *cur,
				   const MDB_val *key, const MDB_val *val);
int cas_local_each_record(MDB_txn *txn, MDB_dbi dbi, cas_local_record_fn fn,
			  void *userdata);

/* A read transaction from the pool (any thread; give it back with
 * cas_local_rtxn_put from the same or another thread). */
int cas_local_rtxn_get(struct cas_local *ls, MDB_txn **ret);
void cas_local_rtxn_put(struct cas_local *ls, MDB_txn *txn);
/* After the last read of txn's memory and before its results are used:
 * -EAGAIN when a writer may have reused pages of txn's snapshot (only on
 * a store opened without its lock file, see nolock), else 0. The caller
 * drops what it read and tries again with a fresh transaction. */
int cas_local_rtxn_check(struct cas_local *ls, MDB_txn *txn);
#define CAS_LOCAL_RTXN_TRIES 1000

void cas_local_blob_rel(const cas_digest *d, char ret[CAS_BLOB_REL_LEN]);

/* Looks d up in dbi under a pooled read transaction: 1 when present
 * (after `use`, if given, took what it needs of the value; its error is
 * returned instead), 0 when absent (local_db.c). */
int cas_local_db_lookup(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d,
			int (*use)(const MDB_val *val, void *ctx), void *ctx);
int cas_local_db_has(struct cas_local *ls, MDB_dbi dbi, const cas_digest *d);
/* The size of stored Directory d (cas_directory_raw_size, read under
 * txn): 1 with *ret_size, 0 when absent; -EBADMSG (*ret_why) when its
 * bytes do not decode. The empty Directory is present, of size 0. */
int cas_local_directory_size(struct cas_local *ls, MDB_txn *txn,
			     const cas_digest *d, uint64_t *ret_size,
			     const char **ret_why);

/* The store operations, by file (local.c puts them in its table). */
int cas_local_blob_stat(cas_store *s, const cas_digest *d, uint64_t *ret_size);
int cas_local_blob_open(cas_store *s, const cas_digest *d, int *ret_fd,
			uint64_t *ret_size);
int cas_local_blob_read(cas_store *s, const cas_digest *d, size_t max,
			uint8_t **ret_buf, uint64_t *ret_size);
int cas_local_blob_locate(cas_store *s, const cas_digest *d, int *ret_fd,
			  uint64_t *ret_off, uint64_t *ret_size);
int cas_local_blob_writer_new(cas_store *s, cas_blob_writer **ret);
int cas_local_directory_get_raw(cas_store *s, const cas_digest *d,
				uint8_t **ret_buf, size_t *ret_len);
int cas_local_directory_has(cas_store *s, const cas_digest *d);
int cas_local_dir_batch_new(cas_store *s, cas_dir_batch **ret);
int cas_local_root_get(cas_store *s, const char *name, cas_node **ret);
int cas_local_roots_foreach(cas_store *s, cas_root_cb cb, void *userdata);
int cas_local_root_set(cas_store *s, const char *name, const cas_node *node);
int cas_local_root_remove(cas_store *s, const char *name);

/* What a lookup of a packed blob does: copy it out, put it in a memfd, or
 * only take its size. 1 when the blob is in a pack (with *ret_size and,
 * as asked, *ret_buf or *ret_fd), 0 when it is not (local_pack.c). */
enum packed_want { PACKED_SIZE, PACKED_COPY, PACKED_MEMFD };
int cas_local_packed_get(struct cas_local *ls, const cas_digest *d,
			 enum packed_want want, uint64_t *ret_size,
			 uint8_t **ret_buf, int *ret_fd);

/* Writes buf at off of a staged file or pack, O_DIRECT while *direct and
 * the buffer allows, the tail through the page cache (ingest.c). */
int cas_local_stage_write(struct cas_local *ls, int fd, bool *direct,
			  const uint8_t *buf, size_t len, uint64_t off);

/* Renames dir_fd/name to the blob's name in blobs/ (never replacing):
 * 1 named, 0 it was there (name removed either way), or -errno. */
int cas_local_blob_rename_in(struct cas_local *ls, int dir_fd, const char *name,
			     const cas_digest *d);
/* One problem line of verify (verify.c): formatted, counted, passed on. */
void cas_local_vproblem(cas_verify_cb cb, void *userdata, int *count,
			const char *fmt, va_list ap) _printf_(4, 0);
/* Partial blobs for verify (partial.c): problems found, one line each. */
int cas_local_verify_partials(struct cas_local *ls, cas_verify_cb cb,
			      void *userdata);

/* A named file in tmp/ for staging (buffered writes), ingest.c. */
int cas_local_stage_open_named(struct cas_local *ls, int *ret_fd,
			       char ret_name[CAS_INGEST_NAME_LEN]);

/* Outboards (outboard.c): DIR/outboards/ab/<hex>, one file per blob over
 * CAS_BAO_THRESHOLD, cas_bao_outboard_size(size) bytes, mode 0444.
 * unstage renames a staged outboard to its name (never replacing: 1
 * named, 0 it was there); publish_buffer writes, syncs and names one
 * (bytes the caller vouches for: it computed or verified them). */
int cas_local_outboard_unstage(struct cas_local *ls, const char *name,
			       const cas_digest *d);
int cas_local_outboard_publish_buffer(struct cas_local *ls, const cas_digest *d,
				      const uint8_t *buf, size_t len);
/* Removes the outboard of the blob whose file is blobs/<rel>, if any:
 * whoever removes a blob file (gc, eviction) calls it right after. */
void cas_local_outboard_remove(struct cas_local *ls, const char *rel);
/* The outboard file of d: 0 with an fd and its length, -ENOENT. */
int cas_local_outboard_file_open(struct cas_local *ls, const cas_digest *d,
				 int *ret_fd, uint64_t *ret_len);
void cas_local_outboard_init(struct cas_local *ls,
			     struct cas_ingest_outboard *o);
int cas_local_blob_outboard_open(cas_store *s, const cas_digest *d, int *ret_fd,
				 uint64_t *ret_len);

/* 1 if the blob's file exists, 0 if not (small blobs in LMDB are not
 * looked at: import puts those without asking, see below). */
int cas_local_blob_exists(struct cas_local *ls, const cas_digest *d);

/* True when import puts a blob of `size` bytes into a pack. */
bool cas_local_is_packed(const struct cas_local *ls, uint64_t size);

/* 1 if a packed blob of this digest is indexed, 0 if not. */
int cas_local_small_exists(struct cas_local *ls, const cas_digest *d);

/* For verify: an index entry's size, and its bytes (exactly size). */
#define CAS_PACK_NAME_LEN 32
void cas_local_pack_name(uint64_t id, char ret[CAS_PACK_NAME_LEN]);
uint64_t cas_local_small_size(const void *ref, size_t ref_len);
int cas_local_small_read(struct cas_local *ls, const void *ref, size_t ref_len,
			 uint8_t *buf, size_t size);

/* Packs, written through ingest.h only (import, and the remote cache for
 * the small blobs it fetches): a pack of the writer's own, created on its
 * first group. append writes one group (buf: v[i] is at v[i].off, len bytes;
 * buf aligned to CAS_LOCAL_PACK_ALIGN and len a multiple of it, for
 * O_DIRECT), makes it durable, then indexes v[0..n) in one LMDB
 * transaction, never replacing an entry. The caller vouches for each
 * digest (it hashed the bytes). ret_added (may be NULL) counts new
 * entries. A pack belongs to one thread at a time. */
struct cas_local_pack;
int cas_local_pack_new(cas_store *s, struct cas_local_pack **ret);
int cas_local_pack_append(struct cas_local_pack *p, const uint8_t *buf,
			  size_t len, const struct cas_local_small *v, size_t n,
			  size_t *ret_added);
void cas_local_pack_close(struct cas_local_pack *p);
/* gc's rewrite: like append, but each entry is switched to this pack in
 * the one transaction only if it still names pack from_id (ret_moved:
 * how many were). */
int cas_local_pack_move(struct cas_local_pack *p, const uint8_t *buf,
			size_t len, const struct cas_local_small *v, size_t n,
			uint64_t from_id, size_t *ret_moved);
/* The pack's fd (-1 before its first append) and id; its size. */
int cas_local_pack_fd(const struct cas_local_pack *p, uint64_t *ret_id);
uint64_t cas_local_pack_bytes(const struct cas_local_pack *p);

/* The pack index entry (20 bytes, little-endian: pack id, offset,
 * length), for gc's pack rewriting. */
#define CAS_PACK_REF_LEN 20
void cas_local_pack_ref_encode(uint8_t out[CAS_PACK_REF_LEN], uint64_t id,
			       uint64_t off, uint32_t len);
void cas_local_pack_ref_decode(const uint8_t in[CAS_PACK_REF_LEN], uint64_t *id,
			       uint64_t *off, uint32_t *len);
/* Parses "<16 hex>.pack": 0 and the id, -EINVAL for another name. */
int cas_local_pack_id_parse(const char *name, uint64_t *ret_id);

/* The writer side of gc (gc_seam.c; docs/design.md, "Writers and gc").
 * A writer step that checks presence or commits holds gc.lock shared
 * (enter/leave, any thread, nested freely); what it found or committed
 * goes to its pin file, inside the step, so that a gc sweep (which holds
 * gc.lock exclusively) either ran before the check or sees the pin. A
 * pin set is one writer session's (an ingest, a Directory batch): its
 * file tmp/pins.<pid>.<n> is made on the first pin and removed by
 * release, once what the session committed is reachable or abandoned. */
int cas_local_gc_enter(struct cas_local *ls);
void cas_local_gc_leave(struct cas_local *ls);
struct cas_local_pins {
	int fd; /* -1 until the first pin */
	char name[CAS_INGEST_NAME_LEN];
};
#define CAS_LOCAL_PINS_INIT \
	{                   \
		.fd = -1    \
	}
/* Inside enter/leave only. */
int cas_local_pins_add(struct cas_local *ls, struct cas_local_pins *p,
		       const cas_digest *d, size_t n);
void cas_local_pins_release(struct cas_local *ls, struct cas_local_pins *p);
/* At open (writable): takes the process's liveness lock DIR/live/<pid>
 * and opens gc.lock and gc.turn; at free, closes them. */
int cas_local_gc_seam_open(struct cas_local *ls);
void cas_local_gc_seam_close(struct cas_local *ls);
/* 1 when the process that named a tmp/ file "<pid>.<rest>" may still be
 * alive (its liveness lock is held), 0 when it is not, -EINVAL when the
 * name carries no pid. */
int cas_local_tmp_owner_alive(int live_dir_fd, const char *name);
/* Removes the files in tmp/ of processes that are gone (staged files,
 * named temporary files) and unknown files older than max_age_s; pin
 * files are left to gc. Counts what went (may be NULL). */
void cas_local_tmp_sweep(struct cas_local *ls, long max_age_s,
			 uint64_t *ret_files, uint64_t *ret_bytes);

/* Escapes a name for a one-line message (non-printable bytes as \xNN).
 * out must hold 4 * len + 1 bytes; truncated to `size`. */
void cas_escape_name(const uint8_t *name, size_t len, char *out, size_t size);

/* Checks data.mdb against its own meta pages before LMDB maps it (a
 * short file would be a SIGBUS later): 0, or -EBADMSG after one line
 * "store DIR: data.mdb is corrupt (...)". A missing file is fine; an
 * empty one in a store holding nothing else is removed for an opener
 * that may create the store (LMDB starts afresh) and -ENOENT for any
 * other. The caller keeps other openers out meanwhile (local.c). */
int cas_lmdb_check(int dir_fd, const char *dir, bool may_create);

#endif
