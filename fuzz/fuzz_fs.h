/* fuzz_fs.h - a small fake filesystem for the transport fuzz targets
 * (fuzz-virtiofs.c, fuzz-devfuse.c): inodes made up from their numbers
 * (1 mod 3 a folder, 2 a file, 0 a symlink). A READ of an odd inode is
 * answered with a range of a file that holds FUZZ_FS_FILE bytes although
 * the attributes promise more, so the transport meets a file shorter
 * than the reply says; an even inode's READ has its bytes in the reply.
 * OPEN of an inode 4 mod 5 fails. fuzz-fuse.c takes the callbacks it
 * shares from here (hence FUZZ_FS_SHARED: a target need not use them
 * all). Also the INIT a kernel sends first, and the checks of what a
 * transport sent. Each target includes this once. */
#ifndef CAS_FUZZ_FS_H
#define CAS_FUZZ_FS_H

#include <errno.h>
#include <linux/fuse.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/util.h"
#include "fuse/engine.h"
#include "fuse/fuse_dev.h"

#define FUZZ_FS_SHARED static __attribute__((unused))

#define FUZZ_FS_FILE (64u << 10)

FUZZ_FS_SHARED int fuzz_fs_fd = -1;

/* The file behind odd inodes' READs, made once per process. */
FUZZ_FS_SHARED void fuzz_fs_setup(void)
{
	static uint8_t bytes[FUZZ_FS_FILE];
	if (fuzz_fs_fd >= 0)
		return;
	for (size_t i = 0; i < sizeof(bytes); i++)
		bytes[i] = (uint8_t)(i * 7 + 1);
	if (cas_memfd_sealed(bytes, sizeof(bytes), &fuzz_fs_fd) < 0)
		abort();
}

FUZZ_FS_SHARED void fuzz_fs_attr(uint64_t ino, struct cas_fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->nlink = 1;
	a->mode = ino % 3 == 1	 ? S_IFDIR | 0555
		  : ino % 3 == 2 ? S_IFREG | 0444
				 : S_IFLNK | 0777;
	a->size = ino * 1000;
}

FUZZ_FS_SHARED int ff_init(void *fs, struct cas_fuse_conn *conn)
{
	return 0;
}

FUZZ_FS_SHARED int ff_lookup(void *fs, uint64_t parent, const char *name,
			     size_t namelen, struct cas_fuse_entry *ret)
{
	if (strlen(name) != namelen || namelen == 0)
		abort(); /* the engine promised a NUL-terminated name */
	if (name[0] == 'n')
		return -ENOENT;
	fuzz_fs_attr(parent * 7 + namelen, &ret->attr);
	/* Half the entries never expire: the engine's and the kernel's
	 * arithmetic on valid times must not overflow. */
	ret->entry_valid = namelen % 2 ? UINT64_MAX : 1;
	return 0;
}

FUZZ_FS_SHARED void ff_forget(void *fs, uint64_t ino, uint64_t nlookup)
{
}

FUZZ_FS_SHARED int ff_getattr(void *fs, uint64_t ino, struct cas_fuse_attr *ret,
			      uint64_t *ret_attr_valid)
{
	if (ino > 100000)
		return -ESTALE;
	fuzz_fs_attr(ino, ret);
	*ret_attr_valid = 1;
	return 0;
}

FUZZ_FS_SHARED int ff_readlink(void *fs, uint64_t ino, char *buf, size_t size)
{
	size_t n = ino % 300 + 1;
	if (n > size)
		return -ERANGE;
	memset(buf, 'l', n);
	return (int)n;
}

FUZZ_FS_SHARED int ff_open(void *fs, uint64_t ino, uint32_t flags,
			   struct cas_fuse_open *ret)
{
	ret->fh = ino ^ 0x55;
	ret->backing_fd = -1;
	return ino % 5 == 4 ? -EACCES : 0;
}

FUZZ_FS_SHARED int ff_read(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
			   uint32_t size, struct cas_fuse_read *ret)
{
	if (ret->len != size)
		abort(); /* the engine offers room for what was asked */
	uint64_t n = off > 300000 ? 0 : CAS_MIN((uint64_t)size, 300000 - off);
	if (ino % 2) {
		ret->fd = fuzz_fs_fd;
		ret->fd_offset = off;
		ret->len = n;
		return 0;
	}
	memset(ret->buf, 'r', n);
	ret->len = n;
	return 0;
}

FUZZ_FS_SHARED int ff_release(void *fs, uint64_t ino, uint64_t fh)
{
	return 0;
}

FUZZ_FS_SHARED int ff_readdir(void *fs, uint64_t ino, uint64_t fh, uint64_t off,
			      struct cas_fuse_dirbuf *db)
{
	static const char *names[] = {".", "..",  "a", "bb", "a-longer-name",
				      "x", "y\nz"};
	for (uint64_t i = off; i < 7 + ino % 50; i++) {
		const char *name = names[i % 7];
		struct cas_fuse_entry e = {0};
		fuzz_fs_attr(i + 2, &e.attr);
		int r = cas_fuse_dirbuf_add(
			db, (const uint8_t *)name, strlen(name), i + 2,
			e.attr.mode, i + 1,
			cas_fuse_dirbuf_plus(db) && i % 7 > 1 ? &e : NULL);
		if (r <= 0)
			return r;
	}
	return ino == 3 ? -EIO : 0;
}

FUZZ_FS_SHARED int ff_statfs(void *fs, uint64_t ino,
			     struct cas_fuse_statfs *ret)
{
	ret->namelen = 255;
	return 0;
}

FUZZ_FS_SHARED int ff_getxattr(void *fs, uint64_t ino, const char *name,
			       char *buf, size_t size)
{
	size_t n = strlen(name);
	if (size == 0)
		return (int)n;
	if (size < n)
		return -ERANGE;
	memcpy(buf, name, n);
	return (int)n;
}

FUZZ_FS_SHARED int ff_listxattr(void *fs, uint64_t ino, char *buf, size_t size)
{
	if (size == 0)
		return 6;
	if (size < 6)
		return -ERANGE;
	memcpy(buf, "user.\0", 6);
	return 6;
}

FUZZ_FS_SHARED int ff_access(void *fs, uint64_t ino, uint32_t mask)
{
	return 0;
}

FUZZ_FS_SHARED const struct cas_fuse_ops fuzz_fs_ops = {
	.init = ff_init,
	.lookup = ff_lookup,
	.forget = ff_forget,
	.getattr = ff_getattr,
	.readlink = ff_readlink,
	.open = ff_open,
	.read = ff_read,
	.release = ff_release,
	.opendir = ff_open,
	.readdir = ff_readdir,
	.releasedir = ff_release,
	.statfs = ff_statfs,
	.getxattr = ff_getxattr,
	.listxattr = ff_listxattr,
	.access = ff_access,
};

/* The INIT a kernel sends first (unique 1): protocol 7.minor, the flags
 * every target wants, flags2 as given. */
struct fuzz_init_req {
	struct fuse_in_header h;
	struct fuse_init_in in;
};

FUZZ_FS_SHARED struct fuzz_init_req
fuzz_init_request(uint32_t minor, uint32_t max_readahead, uint32_t flags2)
{
	return (struct fuzz_init_req){
		.h = {.len = sizeof(struct fuzz_init_req),
		      .opcode = FUSE_INIT,
		      .unique = 1},
		.in = {.major = 7,
		       .minor = minor,
		       .max_readahead = max_readahead,
		       .flags = FUSE_ASYNC_READ | FUSE_DO_READDIRPLUS |
				FUSE_MAX_PAGES | FUSE_INIT_EXT,
		       .flags2 = flags2},
	};
}

/* A reply as the transport sent it (header and all): well formed, and
 * its header counts exactly the bytes sent. */
FUZZ_FS_SHARED void fuzz_fs_check_sent(const uint8_t *msg, size_t len)
{
	struct fuse_out_header oh;
	if (len < sizeof(oh))
		__builtin_trap();
	memcpy(&oh, msg, sizeof(oh));
	if (oh.len != len || oh.error > 0 || oh.error < -4095 ||
	    (oh.error != 0 && len != sizeof(oh)))
		__builtin_trap();
}

/* A ring entry after its commit was written (hdr, payload_size bytes of
 * payload buffer): the header counts exactly payload_sz, which fits the
 * buffer, and an error carries no payload. */
FUZZ_FS_SHARED void
fuzz_fs_check_commit(const struct cas_fuse_uring_req_header *hdr,
		     size_t payload_size)
{
	struct fuse_out_header oh;
	struct cas_fuse_uring_ent_in_out io;
	memcpy(&oh, hdr->in_out, sizeof(oh));
	memcpy(&io, &hdr->ring_ent_in_out, sizeof(io));
	if (io.payload_sz > payload_size ||
	    oh.len != sizeof(oh) + io.payload_sz || oh.error > 0 ||
	    oh.error < -4095 || (oh.error && io.payload_sz))
		__builtin_trap();
}

#endif
