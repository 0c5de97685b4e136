/* grpc_server_i.h - one HTTP/2 connection of `castore serve` as a
 * session that takes bytes in and gives bytes out (grpc_session.c), so
 * that the server's event loops (grpc_server.c) and the fuzz target drive
 * the same code with no socket in it.
 *
 * A session answers castore's BlobService and DirectoryService under both
 * package names (snix.castore.v1 and tvix.castore.v1): the same messages
 * on two paths.
 *
 * Contract: a session belongs to one thread at a time. The limits it
 * shares with other sessions (the byte budget) are atomics, the store is
 * thread-safe (store.h); nothing else is shared. Bytes returned by
 * cas_grpc_session_send belong to the session and are valid until its
 * next call.
 */
#ifndef CAS_REMOTE_GRPC_SERVER_I_H
#define CAS_REMOTE_GRPC_SERVER_I_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "store/chunk_index.h"
#include "store/store.h"

/* HTTP/2 streams a client may have open on one connection at once. */
#define CAS_GRPC_SERVE_STREAMS 128
/* Bytes a client may send on one stream before the server has taken
 * them (the stream's HTTP/2 flow-control window), and on one connection. */
#define CAS_GRPC_SERVE_STREAM_WINDOW (1u << 20)
#define CAS_GRPC_SERVE_CONN_WINDOW   (16u << 20)
/* Bytes of all sessions together held in memory for requests: messages
 * received in part and Directories of a Put not yet committed. A message
 * that would take more fails its call with RESOURCE_EXHAUSTED; a
 * Directory Put commits what it holds instead. */
#define CAS_GRPC_SERVE_BUFFERED_MAX (256ull << 20)
/* A Directory Put commits what it has received every this many bytes of
 * Directories (docs/remote.md: what stays stored when a later one fails). */
#define CAS_GRPC_SERVE_DIR_STEP (16u << 20)
/* Bytes of a blob Put between two checks of the disk reserve. */
#define CAS_GRPC_SERVE_RESERVE_CHECK (8u << 20)

struct cas_grpc_session_env {
	cas_store *store;
	bool read_only; /* every Put is refused with PERMISSION_DENIED */
	/* Put is refused with RESOURCE_EXHAUSTED while the file system of
	 * reserve_dir has fewer than reserve bytes free (no check when
	 * reserve_dir is NULL). */
	const char *reserve_dir;
	uint64_t reserve;
	/* Bytes held for requests by every session (the budget above). */
	atomic_uint_least64_t *buffered;
	/* Chunk lists of large blobs (send_chunks, GetBlob, Read of a
	 * chunk); NULL: none are offered. */
	cas_chunk_index *chunks;
};

/* Answers of snix's chunk calls (grpc_chunks.c): each decodes its
 * request, asks the store and gives the framed reply (malloc'd), or
 * -errno with *ret_why (NULL: the errno says it). Stat with send_chunks
 * and send_bao (a chunk's digest is a blob with no finer list); StatBlob,
 * GetBlob (a small blob is its own one chunk), PutBlob (the blob is
 * assembled from its stored chunks and must hash to its digest). */
int cas_grpc_serve_stat(const struct cas_grpc_session_env *env,
			const uint8_t *req, size_t len, uint8_t **ret,
			size_t *ret_len, const char **ret_why);
int cas_grpc_serve_stat_blob(const struct cas_grpc_session_env *env,
			     const uint8_t *req, size_t len, uint8_t **ret,
			     size_t *ret_len, const char **ret_why);
int cas_grpc_serve_get_blob(const struct cas_grpc_session_env *env,
			    const uint8_t *req, size_t len, uint8_t **ret,
			    size_t *ret_len, const char **ret_why);
int cas_grpc_serve_put_blob(const struct cas_grpc_session_env *env,
			    const uint8_t *req, size_t len, uint8_t **ret,
			    size_t *ret_len, const char **ret_why);
/* Where chunk d's bytes are: an fd of the blob holding it (the caller's)
 * and the range. -ENOENT when no known list has it. */
int cas_grpc_serve_locate_chunk(const struct cas_grpc_session_env *env,
				const cas_digest *d, int *ret_fd,
				uint64_t *ret_base, uint64_t *ret_size,
				bool *ret_borrowed);

struct cas_grpc_session;

/* A server session; env must outlive it. */
int cas_grpc_session_new(const struct cas_grpc_session_env *env,
			 struct cas_grpc_session **ret);
/* Aborts every open stream (an unfinished Put leaves nothing). */
void cas_grpc_session_free(struct cas_grpc_session *s);

/* Takes bytes from the client. -EPROTO when they break HTTP/2: the
 * connection is to be closed once what cas_grpc_session_send still gives
 * (a GOAWAY) is sent. */
int cas_grpc_session_recv(struct cas_grpc_session *s, const uint8_t *buf,
			  size_t len);
/* The next bytes for the client: their count (0 when there are none for
 * now), *ret pointing at them; -EPROTO on a session failure. */
ssize_t cas_grpc_session_send(struct cas_grpc_session *s, const uint8_t **ret);
/* False once the session has ended (GOAWAY both ways, or a failure). */
bool cas_grpc_session_alive(struct cas_grpc_session *s);
/* True when bytes for the client wait in the session. */
bool cas_grpc_session_want_write(struct cas_grpc_session *s);
/* Streams open now: a session with none is idle. */
unsigned cas_grpc_session_streams(const struct cas_grpc_session *s);
/* Ends the session politely: GOAWAY; open streams are aborted when it
 * is freed. */
void cas_grpc_session_goaway(struct cas_grpc_session *s);

#endif
