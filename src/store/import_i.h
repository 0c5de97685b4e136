/* import_i.h - the importer's state, shared by import.c (the walk, the
 * workers, the files) and import_stage.c (the staged blobs and the
 * small-blob group, and their publisher thread). The threads and the
 * lifetime of a folder are told in import.c's opening comment.
 *
 * Contract: private to src/store; every field says which lock or thread
 * it belongs to.
 */
#ifndef CAS_STORE_IMPORT_I_H
#define CAS_STORE_IMPORT_I_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>
#include <time.h>

#include "core/dmap.h"
#include "store/import.h"
#include "store/import_exclude_i.h"
#include "store/local_i.h"

#define SMALL_FILE   (1u << 20) /* read whole; also the hashing read size */
#define QUEUE_CAP    256
#define GETDENTS_BUF (64u << 10)
/* Folders the walker keeps open above where it is: deeper than this, going
 * back up reopens "..". */
#define WALKER_FDS 16
/* Folder fds held for queued files: at most this, or a quarter of
 * RLIMIT_NOFILE when that is less (the rest stays for the store). */
#define DIR_FDS_MAX 256
#define PROGRESS_NS 100000000ll

struct imp_entry {
	uint32_t name_off; /* into imp_dir.names, NUL-terminated */
	uint32_t name_len;
	uint32_t target_off;
	uint32_t target_len;
	uint8_t type;
	bool executable;
	bool skip; /* private, with skip_private: left out of the Directory */
	cas_digest digest;
	uint64_t size;
};

struct imp_dir {
	struct imp_dir *parent; /* NULL for PATH itself */
	size_t parent_index;	/* its entry there, which has its name */
	struct imp_dir *live_prev, *live_next; /* walker only */
	/* Valid while fd_refs > 0: set by the walker when fd_refs is 0
	 * (nobody else looks then), closed by whoever drops the last. */
	int fd;
	_Atomic size_t fd_refs; /* queued files + 1 while walker_ref */
	bool walker_ref;	/* walker only */
	size_t next;		/* walker only: next entry to descend into */
	dev_t dev;		/* to know it again through ".." */
	ino_t ino;
	struct imp_entry *entries;
	size_t n_entries, cap_entries;
	char *names;
	size_t names_len, cap_names;
	_Atomic size_t pending;
};

struct imp_job {
	struct imp_dir *dir;
	size_t index;
};

struct importer {
	cas_store *store;
	struct cas_ingest *in; /* the store's one write path (ingest.h) */
	const struct cas_import_options *opts;

	pthread_mutex_t lock;
	pthread_cond_t job_cond;	 /* workers: a job or stop */
	pthread_cond_t walker_cond;	 /* walker: a ready folder */
	struct imp_job queue[QUEUE_CAP]; /* protected by lock */
	size_t q_head, q_len;		 /* protected by lock */
	bool stop;			 /* protected by lock */
	struct imp_dir **ready;		 /* protected by lock */
	size_t n_ready, cap_ready;	 /* protected by lock */

	/* Staged blobs waiting for one syncfs before they are renamed into
	 * place; the publisher thread flushes them in groups. */
	pthread_mutex_t stage_lock;
	pthread_cond_t stage_cond;
	struct cas_ingest_file *staged; /* protected by stage_lock */
	size_t n_staged, cap_staged;	/* protected by stage_lock */
	uint64_t staged_bytes;		/* protected by stage_lock */
	bool stage_want, stage_stop;	/* protected by stage_lock */
	struct cas_local_small *smalls; /* protected by stage_lock */
	size_t n_smalls, cap_smalls;	/* protected by stage_lock */
	/* The digests in smalls: the same bytes twice in one group
	 * (licence texts, empty files) go in once. */
	struct cas_dmap small_set; /* protected by stage_lock */
	uint8_t *arena;		   /* protected by stage_lock, ARENA_SIZE */
	uint8_t *spare_arena;	   /* protected by stage_lock */
	size_t arena_len;	   /* protected by stage_lock */
	pthread_cond_t small_cond; /* a full small group was taken */

	_Atomic int error; /* first failure; workers skip jobs after it */
	_Atomic uint64_t files, bytes, blobs_added;
	uint64_t directories, symlinks; /* walker only */
	/* What castore v1 cannot keep (cas_import_progress). */
	_Atomic uint64_t setid, private_kept, private_skipped, owners, xattrs,
		hardlinks;
	uint64_t excluded, special; /* walker only */

	struct cas_import_excludes excludes; /* walker only */
	const char *root_path;		     /* PATH, without trailing '/' */
	size_t root_len;
	/* Walker only: the current folder's path relative to PATH ("" for
	 * PATH itself), grown and shrunk with the walk. */
	char *rel;
	size_t rel_len, rel_cap;
	_Atomic size_t open_fds; /* of folders (imp_dir.fd) */
	size_t fd_limit;	 /* for folders with queued files */

	/* Walker only. */
	cas_dir_batch *batch;
	struct imp_dir *live; /* every imp_dir not yet freed */
	uint8_t *walker_buf;
	uint8_t *dents;
	struct timespec last_progress;
	bool root_done;
	cas_node root; /* name empty; digest/size of the finished root */
};

static inline void cas_imp_set_error(struct importer *imp, int r)
{
	int zero = 0;
	atomic_compare_exchange_strong(&imp->error, &zero, r);
}

static inline int cas_imp_failed(struct importer *imp)
{
	return atomic_load_explicit(&imp->error, memory_order_relaxed);
}

/* import_stage.c. A staged blob file (and its outboard's, or NULL), to
 * be named after the group's syncfs; a small blob copied into the group
 * for the import's pack; the publisher thread (arg: the importer), and
 * a last flush (or, after a failure, the removal of what is staged). */
int cas_imp_stage_add(struct importer *imp, const char *name,
		      const char *outboard, const cas_digest *d, uint64_t size);
int cas_imp_small_add(struct importer *imp, const uint8_t *buf, size_t len,
		      const cas_digest *d);
void cas_imp_stage_flush(struct importer *imp);
void *cas_imp_publisher_main(void *arg);

#endif
