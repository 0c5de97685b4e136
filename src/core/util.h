/* util.h - small helpers shared by every layer.
 *
 * Contract: no state, thread-safe. The cleanup attributes run
 * when a local goes out of scope (as in casync and systemd): a function
 * that returns early never leaks what it owns. TAKE_PTR/TAKE_FD hand
 * ownership to the caller and leave the local empty.
 */
#ifndef CAS_CORE_UTIL_H
#define CAS_CORE_UTIL_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f)	__attribute__((cleanup(f)))
#define _cleanup_free_	_cleanup_(cas_freep)
#define _cleanup_close_ _cleanup_(cas_closep)
#define _unused_	__attribute__((unused))
#define _printf_(a, b)	__attribute__((format(printf, a, b)))
#define _likely_(x)	__builtin_expect(!!(x), 1)
#define _unlikely_(x)	__builtin_expect(!!(x), 0)

#define CAS_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define CAS_MIN(a, b)	  ((a) < (b) ? (a) : (b))
#define CAS_MAX(a, b)	  ((a) > (b) ? (a) : (b))

#define TAKE_PTR(p)                         \
	({                                  \
		__typeof__(p) _take_ = (p); \
		(p) = NULL;                 \
		_take_;                     \
	})
#define TAKE_FD(fd)                   \
	({                            \
		int _take_fd_ = (fd); \
		(fd) = -1;            \
		_take_fd_;            \
	})

static inline void cas_freep(void *p)
{
	free(*(void **)p);
}

static inline void cas_closep(int *fd)
{
	if (*fd >= 0) {
		int saved = errno;
		close(*fd);
		errno = saved;
	}
}

/* -errno of the last failed libc call, never 0 (a failure must stay one). */
static inline int cas_negerrno(void)
{
	return errno > 0 ? -errno : -EIO;
}

/* Write all of buf or fail with -errno; retries EINTR and short writes. */
int cas_write_all(int fd, const void *buf, size_t len);
/* Read exactly len bytes at off; -EBADMSG when the file is shorter. */
int cas_pread_all(int fd, void *buf, size_t len, uint64_t off);
/* The whole of file name in dirfd (not following a final symlink), in a
 * malloc'd buffer with a NUL after its len bytes. */
int cas_read_file_at(int dirfd, const char *name, char **ret_buf,
		     size_t *ret_len);
/* Write all of buf at off; retries EINTR and short writes. */
int cas_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
/* Copies the first size bytes of src (from offset 0, whatever its file
 * position) to dst at dst's file position: copy_file_range, or pread and
 * write where the kernel refuses it for these files. -EBADMSG when src
 * is shorter than size. */
int cas_copy_fd(int src, int dst, uint64_t size);
/* A memfd holding a copy of buf, sealed against any change (an fd for
 * bytes that live in memory, to splice or hand over as a file). */
int cas_memfd_sealed(const void *buf, size_t len, int *ret_fd);

/* Lowercase hex of len bytes: 2 * len characters and a NUL into out. */
void cas_hex_encode(const void *buf, size_t len, char *out);
/* Parses 2 * len hex characters (either case) into len bytes of out;
 * -EINVAL at the first character that is not hex (out is then partly
 * written). */
int cas_hex_decode(const char *hex, size_t len, void *out);

/* Removes the regular files directly in dir_fd (a folder of temporary
 * files) last modified more than max_age_s seconds ago: leftovers of
 * writers that crashed. Best effort: errors are ignored. */
void cas_remove_stale_files(int dir_fd, long max_age_s);

/* Makes room for n elements of elem bytes in the array *pv of *cap
 * elements, doubling it (first: the room of a new array): 0, or -ENOMEM
 * with the array unchanged. The one array-growth helper. */
int cas_array_grow(void *pv, size_t *cap, size_t n, size_t elem, size_t first);

/* mkdir -p of the folders above path (not path itself): 0 or -errno. */
int cas_mkdir_parents(const char *path);

/* Makes way for a unix socket to be bound at path: nothing there is fine,
 * a socket nobody answers on (its server died) is removed. -EADDRINUSE
 * when a live server accepts connections on it, -EEXIST when path is not
 * a socket, else -errno. (A server binding at the same moment can still
 * race in; bind then fails with EADDRINUSE.) */
int cas_unix_socket_clear(const char *path);

#endif
