/* grpc_i.h - gRPC over HTTP/2 as castore speaks it (snix's and tvix's
 * package names): message framing, status codes, request decoding
 * (server and fuzz target) and the client on libnghttp2 with pooled
 * connections (grpc_client.c).
 *
 * Framing: each message is a 5-byte prefix (compressed flag, 32-bit
 * big-endian length) and the protobuf bytes. Compressed messages are
 * refused (we never ask for compression) and so is any message longer
 * than CAS_GRPC_MAX_MESSAGE, before it is buffered.
 *
 * Contract: the reader and decoders are plain functions on caller memory,
 * thread-safe for distinct objects; they treat every byte as untrusted.
 * A client is thread-safe: each call takes a pooled connection of its own.
 */
#ifndef CAS_REMOTE_GRPC_I_H
#define CAS_REMOTE_GRPC_I_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/chunker.h"
#include "core/digest.h"

#define CAS_GRPC_MAX_MESSAGE (16u << 20)
/* Bytes of blob per BlobChunk that we send. */
#define CAS_GRPC_CHUNK (256u << 10)

enum cas_grpc_status {
	CAS_GRPC_OK = 0,
	CAS_GRPC_CANCELLED = 1,
	CAS_GRPC_UNKNOWN = 2,
	CAS_GRPC_INVALID_ARGUMENT = 3,
	CAS_GRPC_NOT_FOUND = 5,
	CAS_GRPC_PERMISSION_DENIED = 7,
	CAS_GRPC_RESOURCE_EXHAUSTED = 8,
	CAS_GRPC_FAILED_PRECONDITION = 9,
	CAS_GRPC_UNIMPLEMENTED = 12,
	CAS_GRPC_INTERNAL = 13,
	CAS_GRPC_UNAVAILABLE = 14,
};

/* -ENOENT -> NOT_FOUND, -EINVAL/-EBADMSG -> INVALID_ARGUMENT, -EMSGSIZE
 * and -ENOSPC -> RESOURCE_EXHAUSTED, -EROFS -> PERMISSION_DENIED,
 * -EPROTONOSUPPORT -> UNIMPLEMENTED, else INTERNAL. */
enum cas_grpc_status cas_grpc_status_from_errno(int r);
/* NOT_FOUND -> -ENOENT, INVALID_ARGUMENT -> -EINVAL, else -EIO. */
int cas_grpc_errno_from_status(int status);

/* Writes the 5-byte prefix of a message of len bytes. */
void cas_grpc_frame_prefix(uint8_t out[5], size_t len);
/* Writes the prefix and the BlobChunk header (field 1, length) of a
 * message carrying data_len bytes; returns its length (<= 16). The data
 * follows it on the wire. */
size_t cas_grpc_blob_chunk_header(uint8_t out[16], size_t data_len);

typedef int (*cas_grpc_msg_cb)(void *userdata, const uint8_t *msg, size_t len);

/* Splits a byte stream into messages. With bytes_cb set (a Read's
 * BlobChunks), a message that arrives in pieces and is one `data` field
 * and nothing else (as castore and snix send them) is not gathered: its
 * data goes to bytes_cb piece by piece as it arrives (the userdata of
 * feed, as cas_grpc_read_sink takes it); any other goes to cb whole. */
struct cas_grpc_reader {
	uint8_t prefix[5];
	size_t prefix_len;
	uint8_t *msg; /* being filled, msg_len bytes */
	size_t msg_len, msg_got;
	size_t msg_cap; /* grows with what arrives, not with what is announced */
	bool in_msg;
	int (*bytes_cb)(void *userdata, const void *buf, size_t len);
	uint8_t head[11]; /* a piece-wise message's tag and length so far */
	size_t head_len;
	bool direct; /* the rest of this message goes to bytes_cb */
};
/* Calls cb for each complete message. -EPROTONOSUPPORT for a compressed
 * message, -EMSGSIZE for one too long, or cb's error. After an error the
 * reader must not be fed again. */
int cas_grpc_reader_feed(struct cas_grpc_reader *r, const uint8_t *buf,
			 size_t len, cas_grpc_msg_cb cb, void *userdata);
/* True between messages (a stream ending elsewhere is truncated). */
bool cas_grpc_reader_idle(const struct cas_grpc_reader *r);
void cas_grpc_reader_release(struct cas_grpc_reader *r);

enum cas_grpc_method {
	CAS_GRPC_UNKNOWN_METHOD = 0,
	CAS_GRPC_BLOB_STAT,
	CAS_GRPC_BLOB_READ,
	CAS_GRPC_BLOB_PUT,
	CAS_GRPC_DIRECTORY_GET,
	CAS_GRPC_DIRECTORY_PUT,
	/* snix's BlobStoreService (2026). ChunkStoreService's StatChunk,
	 * GetChunk and PutChunk are BLOB_STAT, BLOB_READ and BLOB_PUT: the
	 * same messages field for field. */
	CAS_GRPC_BS_STAT_BLOB,
	CAS_GRPC_BS_GET_BLOB,
	CAS_GRPC_BS_PUT_BLOB,
};
/* The two names of the same services and messages: snix renamed tvix's
 * package in March 2025 (docs/remote.md). */
enum cas_grpc_package {
	CAS_GRPC_SNIX,
	CAS_GRPC_TVIX,
};

/* The path of method m in package pkg ("/snix.castore.v1.BlobService/Read"),
 * written into buf (64 bytes are enough); returns buf. */
const char *cas_grpc_method_path(enum cas_grpc_method m,
				 enum cas_grpc_package pkg, char *buf,
				 size_t size);

/* The method a request path names, under either package. */
enum cas_grpc_method cas_grpc_method_from_path(const char *path, size_t len);

/* Request decoders: -EINVAL with *ret_why for a message that does not
 * decode or whose digest is not 32 bytes. */
int cas_grpc_decode_stat(const uint8_t *msg, size_t len, cas_digest *ret,
			 const char **ret_why);
int cas_grpc_decode_read(const uint8_t *msg, size_t len, cas_digest *ret,
			 const char **ret_why);
int cas_grpc_decode_get(const uint8_t *msg, size_t len, cas_digest *ret,
			bool *ret_recursive, const char **ret_why);
/* BlobChunk: *ret_data points into msg (no copy). */
int cas_grpc_decode_blob_chunk(const uint8_t *msg, size_t len,
			       const uint8_t **ret_data, size_t *ret_len,
			       const char **ret_why);
/* PutBlobResponse / PutDirectoryResponse: the digest. */
int cas_grpc_decode_digest_response(const uint8_t *msg, size_t len,
				    bool directory, cas_digest *ret);

/* Encoders of our requests and replies (malloc'd, framed). */
int cas_grpc_encode_digest_msg(int kind, const cas_digest *d, bool recursive,
			       uint8_t **ret, size_t *ret_len);
enum {
	CAS_GRPC_MSG_STAT_REQUEST,
	CAS_GRPC_MSG_READ_REQUEST,
	CAS_GRPC_MSG_GET_REQUEST,
	CAS_GRPC_MSG_PUT_BLOB_RESPONSE,
	CAS_GRPC_MSG_PUT_DIRECTORY_RESPONSE,
	CAS_GRPC_MSG_STAT_RESPONSE,
};

/* snix's chunk messages (grpc_chunks.c). StatBlobRequest with its flags;
 * -EINVAL with *ret_why for a request that does not decode. */
int cas_grpc_decode_stat_request(const uint8_t *msg, size_t len,
				 cas_digest *ret, bool *ret_chunks,
				 bool *ret_bao, const char **ret_why);
/* Framed StatBlobRequest. */
int cas_grpc_encode_stat_request(const cas_digest *d, bool chunks, bool bao,
				 uint8_t **ret, size_t *ret_len);
/* Framed StatBlobResponse with n chunks and the outboard (may be empty);
 * -EMSGSIZE past CAS_GRPC_MAX_MESSAGE. */
int cas_grpc_encode_stat_response(const cas_chunk *chunks, size_t n,
				  const uint8_t *bao, size_t bao_len,
				  uint8_t **ret, size_t *ret_len);
/* A StatBlobResponse from a peer: its chunks (malloc'd, NULL when none;
 * each digest 32 bytes and size above 0) and its bao (pointing into msg,
 * unverified). -EBADMSG for anything else. */
int cas_grpc_decode_stat_response(const uint8_t *msg, size_t len,
				  cas_chunk **ret_chunks, size_t *ret_n,
				  const uint8_t **ret_bao, size_t *ret_bao_len);

/* Percent-encodes a grpc-message value (gRPC's rule: bytes outside
 * 0x20-0x7e and '%'). */
void cas_grpc_percent_encode(const char *in, char *out, size_t size);

/* The client -------------------------------------------------------- */

/* TLS under the client for grpc+https:// (grpc_tls.c). A context is
 * shared by the client's connections (thread-safe); a connection's TLS
 * belongs to whoever holds the connection. Errors are logged naming url. */
struct cas_grpc_tls_ctx;
struct cas_grpc_tls;
int cas_grpc_tls_ctx_new(const char *url, struct cas_grpc_tls_ctx **ret);
void cas_grpc_tls_ctx_free(struct cas_grpc_tls_ctx *t);
/* Handshakes on connected socket fd (made non-blocking), checking the
 * server's certificate against host and requiring ALPN h2. fd stays the
 * caller's. */
int cas_grpc_tls_connect(struct cas_grpc_tls_ctx *ctx, int fd, const char *url,
			 const char *host, struct cas_grpc_tls **ret);
void cas_grpc_tls_free(struct cas_grpc_tls *t);
/* Non-blocking: bytes read, 0 at the end, -EAGAIN when nothing whole is
 * there yet, else -errno. */
ssize_t cas_grpc_tls_read(struct cas_grpc_tls *t, void *buf, size_t len);
/* True when decrypted bytes wait inside OpenSSL (poll cannot see them). */
bool cas_grpc_tls_pending(struct cas_grpc_tls *t);
/* Writes everything, waiting for the socket (at most 60 s of no progress). */
int cas_grpc_tls_write_all(struct cas_grpc_tls *t, const void *buf, size_t len);

typedef struct cas_grpc_client cas_grpc_client;

/* url: grpc+http://HOST:PORT, grpc+https://HOST[:PORT] (443), grpc+unix:///PATH
 * or grpc+unix:/PATH. */
int cas_grpc_client_new(const char *url, cas_grpc_client **ret);
void cas_grpc_client_free(cas_grpc_client *c);

/* A client whose connections are not sockets (the fuzz target's peer):
 * connect makes one, read is non-blocking (bytes, 0 at the end, -EAGAIN
 * or -errno), write takes everything or fails, close ends one. The
 * callbacks are copied; userdata must outlive the client. */
struct cas_grpc_transport {
	int (*connect)(void *userdata, void **ret_conn);
	ssize_t (*read)(void *conn, void *buf, size_t len);
	int (*write)(void *conn, const void *buf, size_t len);
	void (*close)(void *conn);
	void *userdata;
};
int cas_grpc_client_new_transport(const struct cas_grpc_transport *t,
				  cas_grpc_client **ret);
const char *cas_grpc_client_url(const cas_grpc_client *c);

/* The fetcher's cancel flag (remote_i.h): calls in flight end with
 * -ECANCELED within a second of it being set. Set once, before calls. */
void cas_grpc_client_set_cancel(cas_grpc_client *c,
				const atomic_bool *const *cancel);

/* A Read's BlobChunks to sink, at most max bytes in all: one byte more is
 * -EFBIG, and the stream is reset before any of it is passed on.
 * cas_grpc_read_msg is the call's on_msg (userdata: the struct);
 * cas_grpc_read_sink takes bytes already out of their messages. */
struct cas_grpc_read {
	int (*sink)(void *userdata, const void *buf, size_t len);
	void *userdata;
	uint64_t max, got;
};
int cas_grpc_read_msg(void *userdata, const uint8_t *msg, size_t len);
int cas_grpc_read_sink(void *userdata, const void *buf, size_t len);

/* Fills buf with up to size bytes of framed request stream; returns the
 * count, 0 at the end, or -errno. */
typedef ssize_t (*cas_grpc_produce)(void *userdata, uint8_t *buf, size_t size);

/* One call of method m, under the package the server answers to: snix's
 * names first; after an UNIMPLEMENTED, tvix's, and the first answer under
 * either name is remembered for the client's life. The request is either
 * one framed buffer (req, req_len) or a stream (produce). Every response message goes to
 * on_msg. Returns 0 for grpc-status OK, else the status as errno
 * (cas_grpc_errno_from_status) with *ret_status and ret_message (may be
 * NULL) set; a transport failure is -EIO, logged. */
int cas_grpc_call(cas_grpc_client *c, enum cas_grpc_method m,
		  const uint8_t *req, size_t req_len, cas_grpc_produce produce,
		  void *produce_ud, cas_grpc_msg_cb on_msg, void *msg_ud,
		  int *ret_status, char *ret_message, size_t message_size);

/* Reads of ds[0..n) at once, as streams of one connection (up to 64 at
 * a time), each whole into memory, at most max bytes: cb once per index
 * from the calling thread (remote_i.h's blobs_fetch). With dest (may be
 * NULL), an index whose dest[i].buf is set is read into that buffer
 * instead, at most dest[i].cap bytes (cb's buf is then dest[i].buf):
 * the chunks of a range go straight to their place in it. */
typedef void (*cas_grpc_blob_cb)(void *userdata, size_t i, int r,
				 const uint8_t *buf, size_t len);
struct cas_grpc_dest {
	uint8_t *buf;
	size_t cap;
};
int cas_grpc_blobs_fetch(cas_grpc_client *client, const cas_digest *ds,
			 size_t n, size_t max, const struct cas_grpc_dest *dest,
			 cas_grpc_blob_cb cb, void *userdata);

/* Large blobs by chunk (grpc_client_chunks.c). fetch is the client's
 * batch of Reads (the fetcher's blobs_fetch: cb once per index). Asks
 * Stat with send_chunks and send_bao; with a list of two chunks or more,
 * fetches them in order, each verified against its digest (and the
 * outboard, if sent) before sink gets its bytes: 1 when done so, 0 when
 * the server offers no list (read the blob whole), -ENOENT when it lacks
 * the blob, -EIO (logged) when a chunk is absent or wrong. */
typedef int (*cas_grpc_blobs_fn)(void *fetch_ud, const cas_digest *ds, size_t n,
				 size_t max, const struct cas_grpc_dest *dest,
				 cas_grpc_blob_cb cb, void *userdata);
int cas_grpc_fetch_chunked(cas_grpc_client *client, cas_grpc_blobs_fn fetch,
			   void *fetch_ud, const cas_digest *d,
			   int (*sink)(void *, const void *, size_t),
			   void *sink_ud);

/* Ranges of large blobs for the cache's partial blobs (remote_i.h's
 * outboard_fetch and blob_range_fetch). The lists of blobs whose
 * outboard was fetched are kept in a table of the fetcher (thread-safe,
 * bounded). outboard: -ENOENT unless the server gives both a list of two
 * chunks or more and an outboard (else the blob is read whole); range:
 * the chunks covering [off, off + len), cut to the range into buf
 * (*ret_len short where the blob ends), unverified: the cache checks the
 * range against the outboard; quiet. */
struct cas_grpc_lists;
int cas_grpc_lists_new(struct cas_grpc_lists **ret);
void cas_grpc_lists_free(struct cas_grpc_lists *l);
int cas_grpc_outboard_fetch(cas_grpc_client *client, struct cas_grpc_lists *l,
			    const cas_digest *d, size_t max, uint8_t **ret_buf,
			    size_t *ret_len);
int cas_grpc_range_fetch(cas_grpc_client *client, struct cas_grpc_lists *l,
			 cas_grpc_blobs_fn fetch, void *fetch_ud,
			 const cas_digest *d, uint64_t off, size_t len,
			 uint8_t *buf, size_t *ret_len);

#endif
