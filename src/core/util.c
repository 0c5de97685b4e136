#include "core/util.h"

#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int cas_write_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* pread or pwrite of exactly len bytes at off, retrying EINTR and short
 * transfers. */
static int rw_all(int fd, void *buf, size_t len, uint64_t off, bool write)
{
	uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = write ? pwrite(fd, p, len, (off_t)off)
				  : pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (n == 0)
			return write ? -EIO : -EBADMSG;
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

int cas_pread_all(int fd, void *buf, size_t len, uint64_t off)
{
	return rw_all(fd, buf, len, off, false);
}

int cas_read_file_at(int dirfd, const char *name, char **ret_buf,
		     size_t *ret_len)
{
	int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;
	if (fd < 0)
		return cas_negerrno();
	if (fstat(fd, &st) < 0) {
		int r = cas_negerrno();
		close(fd);
		return r;
	}
	char *buf = malloc((size_t)st.st_size + 1);
	int r = buf ? cas_pread_all(fd, buf, (size_t)st.st_size, 0) : -ENOMEM;
	close(fd);
	if (r < 0) {
		free(buf);
		return r;
	}
	buf[st.st_size] = 0;
	*ret_buf = buf;
	*ret_len = (size_t)st.st_size;
	return 0;
}

int cas_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	return rw_all(fd, (void *)buf, len, off, true);
}

int cas_memfd_sealed(const void *buf, size_t len, int *ret_fd)
{
	int fd = memfd_create("castore-blob", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return cas_negerrno();
	int r = cas_pwrite_all(fd, buf, len, 0);
	if (r == 0 &&
	    fcntl(fd, F_ADD_SEALS,
		  F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)
		r = cas_negerrno();
	if (r < 0) {
		close(fd);
		return r;
	}
	*ret_fd = fd;
	return 0;
}

/* Bounce buffer of the plain copy; a large one keeps syscalls few. */
#define COPY_CHUNK (1u << 20)

int cas_copy_fd(int src, int dst, uint64_t size)
{
	_cleanup_free_ uint8_t *buf = NULL;
	bool plain = false;
	loff_t in = 0;

	while ((uint64_t)in < size) {
		size_t want = (size_t)CAS_MIN(size - (uint64_t)in, 1ull << 30);
		ssize_t n;
		if (!plain) {
			n = copy_file_range(src, &in, dst, NULL, want, 0);
			/* Not these files (another file system, a special
			 * file, an old kernel): copy by hand. */
			if (n < 0 && (errno == EXDEV || errno == EINVAL ||
				      errno == ENOSYS || errno == EOPNOTSUPP ||
				      errno == EBADF)) {
				plain = true;
				continue;
			}
		} else {
			if (!buf && !(buf = malloc(COPY_CHUNK)))
				return -ENOMEM;
			n = pread(src, buf, CAS_MIN(want, COPY_CHUNK), in);
			if (n > 0) {
				int r = cas_write_all(dst, buf, (size_t)n);
				if (r < 0)
					return r;
				in += n;
			}
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return cas_negerrno();
		}
		if (n == 0)
			return -EBADMSG; /* src shrank */
	}
	return 0;
}

void cas_hex_encode(const void *buf, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";
	const uint8_t *p = buf;
	for (size_t i = 0; i < len; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 15];
	}
	out[2 * len] = 0;
}

static int unhex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int cas_hex_decode(const char *hex, size_t len, void *out)
{
	uint8_t *p = out;
	for (size_t i = 0; i < len; i++) {
		int hi = unhex(hex[2 * i]), lo = unhex(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -EINVAL;
		p[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

void cas_remove_stale_files(int dir_fd, long max_age_s)
{
	int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return;
	}
	time_t now = time(NULL);
	struct dirent *de;
	while ((de = readdir(d))) {
		struct stat st;
		if (de->d_name[0] == '.')
			continue;
		if (fstatat(dir_fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) ==
			    0 &&
		    S_ISREG(st.st_mode) && st.st_mtime + max_age_s < now)
			(void)unlinkat(dir_fd, de->d_name, 0);
	}
	closedir(d);
}

int cas_array_grow(void *pv, size_t *cap, size_t n, size_t elem, size_t first)
{
	void **v = pv;
	if (n <= *cap)
		return 0;
	size_t c = *cap ? *cap : first;
	while (c < n)
		c *= 2;
	if (c > SIZE_MAX / elem)
		return -ENOMEM;
	void *nv = realloc(*v, c * elem);
	if (!nv)
		return -ENOMEM;
	*v = nv;
	*cap = c;
	return 0;
}

int cas_mkdir_parents(const char *path)
{
	_cleanup_free_ char *p = strdup(path);
	if (!p)
		return -ENOMEM;
	for (char *q = p + 1; (q = strchr(q, '/')); q++) {
		*q = 0;
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return cas_negerrno();
		*q = '/';
	}
	return 0;
}

int cas_unix_socket_clear(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : cas_negerrno();
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	strcpy(sa.sun_path, path);
	_cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return cas_negerrno();
	/* A listening socket accepts (or queues) the connection at once; one
	 * whose server is gone refuses it. A full backlog (EAGAIN) is a live
	 * server too. */
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 ||
	    errno == EAGAIN)
		return -EADDRINUSE;
	if (errno != ECONNREFUSED)
		return cas_negerrno();
	return unlink(path) < 0 && errno != ENOENT ? cas_negerrno() : 0;
}
