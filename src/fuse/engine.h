/* engine.h - the FUSE protocol engine: one request in, one reply out.
 *
 * The engine decodes a FUSE request (the bytes the kernel writes to
 * /dev/fuse, or a virtio-fs request chain), calls the filesystem through
 * struct cas_fuse_ops, and encodes the reply. It never reads or writes a
 * file descriptor: transports (src/transport) move the bytes. It knows
 * nothing of castore.
 *
 * Requests are untrusted: every length and offset is checked through a
 * bounds-checked cursor before use; a truncated, oversized or inconsistent
 * request, an unknown opcode, or an unknown inode or handle gets an error
 * reply (or none, for opcodes that take none) and never crashes.
 *
 * Contract:
 * - A cas_fuse_session is shared by all worker threads of one mount or one
 *   device; cas_fuse_session_process is thread-safe. The operations are
 *   called concurrently and must be thread-safe themselves.
 * - Operations return 0 or -errno and fill plain structs; the engine
 *   negates errors into the reply header and encodes everything else.
 * - Reply memory is the caller's (struct cas_fuse_reply.buf); the engine
 *   only writes into it.
 */
#ifndef CAS_FUSE_ENGINE_H
#define CAS_FUSE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define CAS_FUSE_ROOT_ID 1

/* Bytes of the header that opens every reply (fuse_out_header): what a
 * transport that splits header and payload (io_uring) splits at. */
#define CAS_FUSE_REPLY_HEADER_SIZE 16

/* Attributes of one inode, as the filesystem reports them. Times are
 * seconds + nanoseconds. */
struct cas_fuse_attr {
	uint64_t ino;
	uint64_t size;
	uint64_t blocks; /* 512-byte units */
	uint64_t atime, mtime, ctime;
	uint32_t atimensec, mtimensec, ctimensec;
	uint32_t mode; /* S_IFxxx | permission bits */
	uint32_t nlink;
	uint32_t uid, gid;
	uint32_t rdev;
	uint32_t blksize;
};

/* Timeouts in seconds; UINT64_MAX (with nsec 0) means forever. */
struct cas_fuse_entry {
	uint64_t generation;
	uint64_t entry_valid, attr_valid;
	uint32_t entry_valid_nsec, attr_valid_nsec;
	struct cas_fuse_attr attr; /* attr.ino is the node id */
};

/* FOPEN_* flags the filesystem wants on an open/opendir reply. */
#define CAS_FOPEN_KEEP_CACHE  (1u << 1)
#define CAS_FOPEN_CACHE_DIR   (1u << 3)
#define CAS_FOPEN_NOFLUSH     (1u << 5)
#define CAS_FOPEN_PASSTHROUGH (1u << 7)

/* When an open goes passthrough the engine keeps only the flags the kernel
 * accepts with it (NOFLUSH; KEEP_CACHE and CACHE_DIR make it fail the
 * open): the page cache is then the backing file's own. */
struct cas_fuse_open {
	uint64_t fh;
	uint32_t open_flags; /* CAS_FOPEN_* */
	/* For passthrough: an fd of the backing file (-1: none). The engine
	 * asks the transport (cas_fuse_config.backing_open) for a backing id;
	 * the fd stays the filesystem's. */
	int backing_fd;
};

/* Where READ data comes from: a buffer the filesystem filled (the engine's
 * reply buffer, passed in), or a range of a file descriptor that the
 * transport copies or splices without passing through the engine. */
struct cas_fuse_read {
	/* in: buf/size where the fs may copy data; out: len bytes copied */
	uint8_t *buf;
	size_t len;
	/* The read op returns 0 or -errno, never a length: on entry len is the
	 * capacity of buf (equal to the op's `size`), on return the number of
	 * bytes placed in buf (or, with fd >= 0, the number of bytes of fd).
	 * Fewer than size bytes means end of file. */
	/* or: fd >= 0 and fd_offset/len: data is bytes [off, off+len) of fd.
	 * The fd must stay open until the reply is sent (the fs keeps it in
	 * its handle; release comes only after). */
	int fd;
	uint64_t fd_offset;
	/* in: the request's file handle; out: the handle read_done gets. A
	 * READ without one (fh 0, after zero-message open) may hold a handle
	 * the fs found or made itself, and says which here. */
	uint64_t fh;
};

/* Adds one directory entry while filling a READDIR(PLUS) reply. Returns 1
 * if it fit, 0 if the buffer is full (stop; the entry is not consumed).
 * `next_off` is the offset the kernel passes back to continue after this
 * entry. For READDIRPLUS `entry` must be filled (counts as a lookup);
 * for READDIR it may be NULL. For "." and ".." in READDIRPLUS pass NULL:
 * the kernel takes no lookup reference for them, so the engine encodes node
 * id 0 ("no attributes") and the fs must not count a lookup. */
struct cas_fuse_dirbuf;
int cas_fuse_dirbuf_add(struct cas_fuse_dirbuf *db, const uint8_t *name,
			size_t namelen, uint64_t ino, uint32_t mode,
			uint64_t next_off, const struct cas_fuse_entry *entry);
bool cas_fuse_dirbuf_plus(const struct cas_fuse_dirbuf *db);

struct cas_fuse_statfs {
	uint64_t blocks, bfree, bavail, files, ffree;
	uint32_t bsize, namelen, frsize;
};

/* What INIT negotiated, shown to the filesystem's init(). The fs may
 * clear `want_*` flags it does not support. */
struct cas_fuse_conn {
	uint32_t proto_major, proto_minor; /* the kernel's */
	uint32_t max_readahead;
	uint32_t max_write;
	uint32_t max_pages;
	bool can_passthrough;  /* kernel offered it and transport supports it */
	bool want_passthrough; /* fs wants it (default: can_passthrough) */
	bool can_readdirplus;
	bool want_readdirplus;
	/* FUSE over io_uring: the kernel offered it and the transport asked
	 * for it (cas_fuse_config.io_uring); the fs has no say. */
	bool io_uring;
	/* Zero-message opendir (FUSE_NO_OPENDIR_SUPPORT): when the fs wants
	 * it, the engine answers OPENDIR with ENOSYS and the kernel then opens
	 * every folder itself, for the rest of the connection, as if the fs
	 * had said KEEP_CACHE | CACHE_DIR; READDIR then comes with fh 0 and
	 * no RELEASEDIR follows. Only for a fs whose folders never change and
	 * whose readdir needs no handle. Default: off. */
	bool can_no_opendir;
	bool want_no_opendir;
	/* Zero-message open (FUSE_NO_OPEN_SUPPORT), the same for files: OPEN
	 * is answered ENOSYS, the kernel then opens every file itself with
	 * KEEP_CACHE, no RELEASE follows, and READ comes with fh 0 (the fs
	 * finds the content from the node id). It ends FUSE passthrough for
	 * the connection (passthrough is chosen in an open reply), so the
	 * engine refuses it while want_passthrough is set. Default: off. */
	bool can_no_open;
	bool want_no_open;
};

struct cas_fuse_ops {
	int (*init)(void *fs, struct cas_fuse_conn *conn);
	void (*destroy)(void *fs);
	/* name is NUL-terminated; namelen excludes the NUL. Returning 0 with
	 * ret->attr.ino == 0 is a negative entry: ENOENT that the kernel caches
	 * for ret->entry_valid. */
	int (*lookup)(void *fs, uint64_t parent, const char *name,
		      size_t namelen, struct cas_fuse_entry *ret);
	void (*forget)(void *fs, uint64_t ino, uint64_t nlookup);
	int (*getattr)(void *fs, uint64_t ino, struct cas_fuse_attr *ret,
		       uint64_t *ret_attr_valid);
	/* Copies up to size bytes of the target into buf; returns the length. */
	int (*readlink)(void *fs, uint64_t ino, char *buf, size_t size);
	int (*open)(void *fs, uint64_t ino, uint32_t flags,
		    struct cas_fuse_open *ret);
	int (*read)(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
		    uint32_t size, struct cas_fuse_read *ret);
	/* A read that returned an fd range holds that fd until the transport
	 * has sent the data: then the engine calls read_done (may be NULL),
	 * with the handle the read named in cas_fuse_read.fh. */
	void (*read_done)(void *fs, uint64_t ino, uint64_t fh);
	int (*release)(void *fs, uint64_t ino, uint64_t fh);
	int (*opendir)(void *fs, uint64_t ino, uint32_t flags,
		       struct cas_fuse_open *ret);
	/* Fill db starting after offset `off` (0: from the start). */
	int (*readdir)(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
		       struct cas_fuse_dirbuf *db);
	int (*releasedir)(void *fs, uint64_t ino, uint64_t fh);
	int (*statfs)(void *fs, uint64_t ino, struct cas_fuse_statfs *ret);
	/* size 0: return the value's length; else copy into buf and return
	 * the length, -ERANGE if it does not fit. -ENODATA if absent. A NULL
	 * getxattr/listxattr makes the engine answer ENOSYS (the kernel then
	 * stops asking for the rest of the mount). */
	int (*getxattr)(void *fs, uint64_t ino, const char *name, char *buf,
			size_t size);
	int (*listxattr)(void *fs, uint64_t ino, char *buf, size_t size);
	int (*access)(void *fs, uint64_t ino, uint32_t mask);
	/* Every other opcode that modifies gets -EROFS without reaching the
	 * filesystem when `readonly` is set in the config; others ENOSYS. */
};

struct cas_fuse_config {
	bool readonly;
	uint32_t max_write; /* largest request payload we accept */
	/* Pages per READ offered to the kernel (0: 32). Reply buffers hold
	 * at least 32 pages whatever this says: a kernel without
	 * FUSE_MAX_PAGES reads that much, and a short READ means EOF. */
	uint32_t max_pages;
	uint32_t max_readahead; /* 0: the kernel's */
	/* Transport hooks for FUSE passthrough (NULL: not available). The
	 * engine calls them itself, from the thread processing an OPEN
	 * (backing_open, once per node while any open of it uses the id) or
	 * the RELEASE of the node's last such open (backing_close); both may
	 * run concurrently with other requests, never for the same id. */
	int (*backing_open)(void *transport, int fd); /* -> id or -errno */
	int (*backing_close)(void *transport, int backing_id);
	void *transport;
	/* Offer FUSE over io_uring in INIT (the transport will register
	 * rings once INIT is answered). */
	bool io_uring;
};

/* The request buffer a transport that reads whole requests (/dev/fuse)
 * must offer: the largest request this config accepts, and never less
 * than the kernel's minimum read. */
size_t cas_fuse_request_bufsize(const struct cas_fuse_config *cfg);

/* Size the reply buffer must have: header + the largest reply. */
size_t cas_fuse_reply_bufsize(const struct cas_fuse_config *cfg);

/* A reply: buf[0..len) first (header included; its length field counts
 * the fd part too), then, when fd >= 0, fd_len bytes of fd at fd_offset.
 * The transport sends both as one message. `send` is false when the
 * request takes no reply (FORGET, BATCH_FORGET, INTERRUPT). After a
 * successful DESTROY, `destroyed` is set. */
struct cas_fuse_reply {
	uint8_t *buf; /* caller's, cas_fuse_reply_bufsize() bytes */
	size_t buf_size;
	size_t len;
	int fd;
	uint64_t fd_offset;
	size_t fd_len;
	bool send;
	bool destroyed;
	uint64_t unique; /* of the request, for logging */
	/* Which open the fd part belongs to (for cas_fuse_reply_done). */
	uint64_t fd_ino, fd_fh;
	/* Set by the transport when the reply could not be delivered: the
	 * kernel refused it (ENOENT) because the request was interrupted. */
	bool lost;
	/* A handle this reply hands out (an OPEN or OPENDIR answered): when
	 * the reply is lost nobody will ever RELEASE it, so
	 * cas_fuse_reply_done does. 0: none, 1: a file, 2: a folder. */
	uint8_t open_kind;
	uint64_t open_ino, open_fh;
	/* This reply answers INIT successfully: once it is delivered the
	 * connection is set up (a transport may then register io_uring
	 * queues; conn says what was negotiated). */
	bool init;
};

struct cas_fuse_session;

int cas_fuse_session_new(const struct cas_fuse_ops *ops, void *fs,
			 const struct cas_fuse_config *cfg,
			 struct cas_fuse_session **ret);
void cas_fuse_session_free(struct cas_fuse_session *s);

/* Processes one request made of `in_cnt` buffers (concatenated, they are
 * the bytes of the request). Always returns 0 with a reply to send (or
 * reply->send == false); never fails because of request contents. */
int cas_fuse_session_process(struct cas_fuse_session *s, const struct iovec *in,
			     int in_cnt, struct cas_fuse_reply *reply);

/* Ends the life of a reply: every transport calls it once per processed
 * request, after the reply's bytes have been sent (or dropped). When the
 * reply has an fd part, the filesystem's read_done releases its hold on
 * that fd: until then a RELEASE of the handle (which a guest may send on
 * another queue while the data is still being copied) cannot close it.
 * A lost reply that opened a handle releases it. */
void cas_fuse_reply_done(struct cas_fuse_session *s,
			 struct cas_fuse_reply *reply);

/* What a transport may do to a reply it could not deliver as encoded;
 * the engine rewrites the header, the transport only moves bytes.
 * - shorten: only `fd_sent` bytes of the fd part could be read (a file
 *   shorter than it was); the reply then carries just those. A reply that
 *   promised data and got none becomes -EIO instead.
 * - fail: the reply becomes a bare error (`error` < 0) for the same
 *   request, with no data. The fd part, if any, is still released by
 *   cas_fuse_reply_done. */
void cas_fuse_reply_shorten(struct cas_fuse_reply *reply, size_t fd_sent);
void cas_fuse_reply_fail(struct cas_fuse_reply *reply, int error);

/* Answers the request in `in` with a bare error without processing it
 * (no session to give it to): reply->send is false when the request has
 * no header or takes no reply. reply->buf and buf_size must be set. */
void cas_fuse_request_fail(const struct iovec *in, int in_cnt,
			   struct cas_fuse_reply *reply, int error);

/* Whether the request in `in` is an INIT (a guest starting a new session
 * on a device whose old one saw INIT already). */
bool cas_fuse_request_is_init(const struct iovec *in, int in_cnt);

/* FUSE over io_uring framing. A ring entry hands over a request as a
 * header buffer (fuse_dev.h: struct cas_fuse_uring_req_header, which the
 * kernel wrote and, for a guest-free transport, only the kernel can
 * change) and `payload_sz` bytes of a payload buffer of `payload_size`.
 * The engine checks the lengths (a header whose length does not match
 * what the entry holds gets -EINVAL, never a read out of bounds),
 * processes it like any request and leaves the reply in reply->buf as
 * usual. cas_fuse_uring_commit then moves the reply into the entry: its
 * header into the header buffer, its payload (which a transport may have
 * let the engine write in place: reply->buf may be `payload` minus
 * CAS_FUSE_REPLY_HEADER_SIZE) to the payload buffer, followed by the
 * `fd_sent` bytes the transport read there from the fd part; it sets
 * payload_sz. Returns the commit id to echo. */
int cas_fuse_session_process_uring(struct cas_fuse_session *s, void *headers,
				   const uint8_t *payload, size_t payload_size,
				   struct cas_fuse_reply *reply);
uint64_t cas_fuse_uring_commit(void *headers, uint8_t *payload,
			       size_t payload_size,
			       const struct cas_fuse_reply *reply);

/* Requests seen per opcode since the session began, for tuning: logged at
 * `level` (enum cas_log_level) as one line per opcode that came, most
 * frequent first, then the total ("TITLE: N in all"), under `title`. Thread-safe; counting costs one relaxed
 * atomic add per request. */
void cas_fuse_session_log_counts(struct cas_fuse_session *s, int level,
				 const char *title);
/* The count of one opcode (numbers past STATX share one count). */
uint64_t cas_fuse_session_count(struct cas_fuse_session *s, uint32_t opcode);

/* Negotiated state (after INIT). */
bool cas_fuse_session_initialized(const struct cas_fuse_session *s);
const struct cas_fuse_conn *
cas_fuse_session_conn(const struct cas_fuse_session *s);

#endif
