/* directory.h - the castore v1 data model and its canonical codec.
 *
 *   message Directory     { repeated DirectoryNode directories = 1;
 *                           repeated FileNode files = 2;
 *                           repeated SymlinkNode symlinks = 3; }
 *   message DirectoryNode { bytes name = 1; bytes digest = 2; uint64 size = 3; }
 *   message FileNode      { bytes name = 1; bytes digest = 2; uint64 size = 3;
 *                           bool executable = 4; }
 *   message SymlinkNode   { bytes name = 1; bytes target = 2; }
 *   message Node          { oneof node { DirectoryNode directory = 1;
 *                                        FileNode file = 2;
 *                                        SymlinkNode symlink = 3; } }
 *
 * Canonical encoding (what is hashed and stored): proto3 with default
 * values omitted, fields in field-number order, each list sorted bytewise
 * by name, names unique across the three lists, no unknown fields. The
 * decoder accepts exactly the canonical encoding and nothing else: it
 * decodes, checks every rule, re-encodes and compares the bytes.
 *
 * Contract: no global state, thread-safe. Errors are -EBADMSG with a
 * static, human-readable reason in *ret_why ("truncated input",
 * "unknown field", ...), or -ENOMEM. A cas_directory from
 * cas_directory_decode is one heap block that owns its nodes and the
 * bytes their names point into; free it with cas_directory_free. Nodes
 * built by callers (import) point at the caller's memory.
 */
#ifndef CAS_CORE_DIRECTORY_H
#define CAS_CORE_DIRECTORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/digest.h"

enum cas_node_type {
	CAS_NODE_DIRECTORY = 1,
	CAS_NODE_FILE = 2,
	CAS_NODE_SYMLINK = 3,
};

typedef struct cas_node {
	enum cas_node_type type;
	const uint8_t *name; /* not NUL-terminated */
	size_t name_len;
	cas_digest digest; /* directory, file */
	uint64_t size;	   /* directory: its size (see below); file: bytes */
	bool executable;   /* file */
	const uint8_t *target; /* symlink; not NUL-terminated */
	size_t target_len;
} cas_node;

typedef struct cas_directory {
	cas_node *directories; /* each list sorted bytewise by name */
	size_t n_directories;
	cas_node *files;
	size_t n_files;
	cas_node *symlinks;
	size_t n_symlinks;
} cas_directory;

/* Non-empty, not "." or "..", no '/', no NUL. castore v1 sets no length
 * limit; a filesystem refuses names longer than it can serve when asked
 * for them (ENAMETOOLONG), not when the Directory is stored. */
bool cas_name_valid(const uint8_t *name, size_t len);

/* NULL if the node is well formed (valid name unless allow_empty_name,
 * symlink target non-empty without NUL), else the reason. */
const char *cas_node_check(const cas_node *node, bool allow_empty_name);

/* Bytewise order of names, shorter first on a common prefix (memcmp). */
int cas_name_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen);

/* Sorts each of the three lists by name (for builders such as import). */
void cas_directory_sort(cas_directory *d);

/* Checks every rule of the canonical form on a decoded or built
 * directory: nodes valid, lists sorted, names unique across lists, size
 * computable. NULL if fine, else the reason. */
const char *cas_directory_check(const cas_directory *d);

/* Number of entries plus the size of every child DirectoryNode.
 * -EOVERFLOW when it does not fit 64 bits. */
int cas_directory_size(const cas_directory *d, uint64_t *ret_size);
/* The same for canonical bytes (decoded here): -EBADMSG with *ret_why
 * when they do not decode, -EOVERFLOW, -ENOMEM.
 *
 * This is the edge check tvix and snix make on every Directory they
 * accept (directory_graph.rs, "has wrong size"): a DirectoryNode's size
 * must equal the cas_directory_size of the Directory it names. Every
 * Directory that enters a store is checked against its children this
 * way (the local store's batch put, which dir put, gRPC Put, import and
 * the remote cache all go through), and verify checks stored ones. */
int cas_directory_raw_size(const void *buf, size_t len, uint64_t *ret_size,
			   const char **ret_why);

/* Canonical bytes of a directory that passes cas_directory_check (checked
 * here too: -EBADMSG with *ret_why). *ret_buf is malloc'd (NULL with
 * length 0 for the empty directory). */
int cas_directory_encode(const cas_directory *d, uint8_t **ret_buf,
			 size_t *ret_len, const char **ret_why);

/* Decodes and validates canonical bytes. */
int cas_directory_decode(const void *buf, size_t len, cas_directory **ret,
			 const char **ret_why);
void cas_directory_free(cas_directory *d);
static inline void cas_directory_freep(cas_directory **d)
{
	cas_directory_free(*d);
}

/* Finds an entry by exact name in any of the three lists (binary search:
 * O(log n)). NULL if absent. */
const cas_node *cas_directory_find(const cas_directory *d, const uint8_t *name,
				   size_t len);
static inline size_t cas_directory_count(const cas_directory *d)
{
	return d->n_directories + d->n_files + d->n_symlinks;
}

/* Digest of canonical bytes (BLAKE3 of them). */
static inline void cas_directory_digest(const void *buf, size_t len,
					cas_digest *ret)
{
	cas_hash_buffer(buf, len, ret);
}

/* The Node message (a oneof of the three). The name may be empty (a root
 * node need not carry one). Encode: malloc'd bytes. Decode: canonical
 * only; ret_node's name and target point into buf. */
int cas_node_encode(const cas_node *node, uint8_t **ret_buf, size_t *ret_len,
		    const char **ret_why);
int cas_node_decode(const void *buf, size_t len, cas_node *ret_node,
		    const char **ret_why);
/* A copy in one heap block that owns its name and target. */
cas_node *cas_node_dup(const cas_node *node);

#endif
