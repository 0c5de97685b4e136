/* fuse_kernel_ext.h - FUSE kernel ABI newer than the installed <linux/fuse.h>.
 *
 * Debian's <linux/fuse.h> stops at protocol 7.38; the kernels we run on
 * speak 7.40 and later. This header adds, under our own CAS_ names (so it
 * never collides with a newer system header), what we use of 7.39..7.40:
 * the STATX opcode, FUSE passthrough (init flag, open flag, the backing id
 * in the open reply, max_stack_depth in the init reply, the /dev/fuse
 * backing ioctls, in fuse_dev.h). Layouts follow the kernel's include/uapi/linux/fuse.h
 * and Documentation/filesystems/fuse-passthrough.rst; the static asserts
 * pin them to the older structs they extend.
 *
 * Contract: definitions only; include after <linux/fuse.h>.
 */
#ifndef CAS_FUSE_KERNEL_EXT_H
#define CAS_FUSE_KERNEL_EXT_H

#include <linux/fuse.h>
#include <stdint.h>

#include "fuse/fuse_dev.h"

/* Opcodes newer than 7.38. */
#define CAS_FUSE_STATX 52 /* 7.39: answered ENOSYS, the kernel falls back */

/* INIT flags above bit 31 travel in flags2 (bit n in flags2 is bit n+32 of
 * the 64-bit flag word) and only when both sides set FUSE_INIT_EXT. */
#define CAS_FUSE_CREATE_SUPP_GROUP    (1ULL << 34)
#define CAS_FUSE_DIRECT_IO_ALLOW_MMAP (1ULL << 36) /* 7.39 */
#define CAS_FUSE_PASSTHROUGH	      (1ULL << 37) /* 7.40 */
#define CAS_FUSE_NO_EXPORT_SUPPORT    (1ULL << 38) /* 7.40 */
#define CAS_FUSE_HAS_RESEND	      (1ULL << 39) /* 7.40 */
#define CAS_FUSE_OVER_IO_URING	      (1ULL << 41) /* 7.42 */

/* Open reply flag (7.40): reads and writes go to the backing file. */
#define CAS_FOPEN_PASSTHROUGH_BIT (1u << 7)

/* Protocol minor where each feature appeared. */
#define CAS_FUSE_MINOR_STATX	   39
#define CAS_FUSE_MINOR_PASSTHROUGH 40

/* fuse_init_out as of 7.40: max_stack_depth took the first unused word.
 * A later kernel's request_timeout (7.43) lives in what is unused here and
 * only counts when its init flag is set, which we never set. */
struct cas_fuse_init_out {
	uint32_t major;
	uint32_t minor;
	uint32_t max_readahead;
	uint32_t flags;
	uint16_t max_background;
	uint16_t congestion_threshold;
	uint32_t max_write;
	uint32_t time_gran;
	uint16_t max_pages;
	uint16_t map_alignment;
	uint32_t flags2;
	uint32_t max_stack_depth;
	uint32_t unused[6];
};
_Static_assert(sizeof(struct cas_fuse_init_out) == sizeof(struct fuse_init_out),
	       "fuse_init_out layout");

/* fuse_open_out as of 7.40: the old padding word is the backing id. */
struct cas_fuse_open_out {
	uint64_t fh;
	uint32_t open_flags;
	int32_t backing_id;
};
_Static_assert(sizeof(struct cas_fuse_open_out) == sizeof(struct fuse_open_out),
	       "fuse_open_out layout");

/* Largest name the kernel sends in a LOOKUP (its name_max is at most
 * PATH_MAX - 1); xattr names are shorter (XATTR_NAME_MAX). */
#define CAS_FUSE_NAME_MAX 4095
/* Largest xattr value or list the kernel asks for (XATTR_SIZE_MAX). */
#define CAS_FUSE_XATTR_SIZE_MAX 65536

#endif
