/* Fuzz target: the verified cache (src/remote/cache*.c) as a hostile
 * remote answers it, through the fetcher seam (remote_i.h): Directories
 * one by one and as a tree stream, blobs whole and in batches, ranges of
 * Directory packs, a large blob's outboard and its ranges; each answer
 * may be right, flipped, cut short, another object's bytes or absent.
 *
 * Input: byte 0 picks the optional fetcher ops (bit 0: a tree stream,
 * bit 1: batches, bit 2: pack ranges, bit 3: the large blob's outboard
 * and ranges), byte 1 how answers lie (two bits per call, in turn: 0
 * true, 1 one byte flipped, 2 cut to half, 3 a junk record instead),
 * then records: a tag byte, a 16-bit little-endian length, that many
 * bytes.
 *   'f' a file's content      -> a FileNode of the root
 *   'x' an executable's       -> the same, executable
 *   'd' any bytes             -> a DirectoryNode of the root naming them
 *   'j' junk, what a lying remote answers instead of the truth
 *   'L' 4 bytes: a large blob's size past 1 MiB (mod 1 MiB) and seed;
 *       then bytes of (offset, length) pairs, 4 + 2 bytes each, read
 *       through blob_open_ranged/blob_ensure
 * A child's digest is the true one; the first byte of a 'f'/'x'/'d'
 * record, when odd, bends the size its node declares. The root's bytes
 * are canonical, made here.
 *
 * Checked beyond "no crash": every Directory the cache hands out hashes
 * to the digest asked for and decodes; every blob it hands out is the
 * true content; every range of the large blob it says is present reads
 * as the true bytes. */
#include <errno.h>
#include <ftw.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                      \
	do {                                                                 \
		if (!(cond)) {                                               \
			fprintf(stderr, "fuzz-cache: %s:%d: %s\n", __FILE__, \
				__LINE__, #cond);                            \
			abort();                                             \
		}                                                            \
	} while (0)

#define MAX_OBJS   64
#define MAX_RANGES 8

struct obj {
	cas_digest d;
	const uint8_t *buf;
	size_t len;
	char kind; /* 'f', 'x', 'd', 'r' (the root), 'L' */
};

struct fake {
	cas_fetcher base;
	struct obj objs[MAX_OBJS];
	size_t n;
	const uint8_t *junk[MAX_OBJS];
	size_t junk_len[MAX_OBJS], n_junk;
	uint8_t lies;
	_Atomic unsigned calls;
	uint8_t *outboard;
	size_t outboard_len;
};

static const struct obj *find(const struct fake *k, const cas_digest *d)
{
	for (size_t i = 0; i < k->n; i++)
		if (cas_digest_eq(&k->objs[i].d, d))
			return &k->objs[i];
	return NULL;
}

/* What the remote answers for bytes buf/len: a malloc'd copy, maybe a
 * lie. NULL (-ENOENT) when it pretends not to have them. */
static uint8_t *answer(struct fake *k, const uint8_t *buf, size_t len,
		       size_t *ret_len)
{
	unsigned n = atomic_fetch_add(&k->calls, 1);
	unsigned how = (k->lies >> (2 * (n % 4))) & 3;
	if (how == 3) {
		if (!k->n_junk)
			return NULL;
		size_t j = n % k->n_junk;
		buf = k->junk[j];
		len = k->junk_len[j];
	}
	uint8_t *out = malloc(len ? len : 1);
	if (!out)
		return NULL;
	if (len)
		memcpy(out, buf, len);
	if (how == 1 && len)
		out[n % len] ^= 0x20;
	if (how == 2)
		len /= 2;
	*ret_len = len;
	return out;
}

static uint8_t *answer_obj(struct fake *k, const cas_digest *d, size_t *ret_len)
{
	const struct obj *o = find(k, d);
	return o ? answer(k, o->buf, o->len, ret_len) : NULL;
}

static int f_blob_fetch(cas_fetcher *f, const cas_digest *d, uint64_t max,
			cas_fetch_sink sink, void *userdata)
{
	size_t len;
	_cleanup_free_ uint8_t *buf = answer_obj((struct fake *)f, d, &len);
	if (!buf)
		return -ENOENT;
	size_t give = (size_t)CAS_MIN((uint64_t)len, max);
	int r = sink(userdata, buf, give / 2);
	if (r >= 0)
		r = sink(userdata, buf + give / 2, give - give / 2);
	return r < 0 ? r : len > max ? -EFBIG : 0;
}

static int f_directories_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
			       cas_fetch_dir_cb cb, void *userdata)
{
	for (size_t i = 0; i < n; i++) {
		size_t len;
		_cleanup_free_ uint8_t *buf =
			answer_obj((struct fake *)f, &ds[i], &len);
		if (!buf)
			return -ENOENT;
		int r = cb(userdata, &ds[i], buf, len);
		if (r < 0)
			return r;
	}
	return 0;
}

/* The root, then every 'd' record (whatever was asked). */
static int f_fetch_tree(cas_fetcher *f, const cas_digest *d,
			cas_fetch_dir_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	(void)d;
	for (size_t i = 0; i < k->n; i++) {
		if (k->objs[i].kind != 'r' && k->objs[i].kind != 'd')
			continue;
		size_t len;
		_cleanup_free_ uint8_t *buf =
			answer(k, k->objs[i].buf, k->objs[i].len, &len);
		if (!buf)
			return -ENOENT;
		int r = cb(userdata, NULL, buf, len);
		if (r < 0)
			return r;
	}
	return 0;
}

static int f_blobs_fetch(cas_fetcher *f, const cas_digest *ds, size_t n,
			 size_t max, cas_fetch_blob_cb cb, void *userdata)
{
	for (size_t i = 0; i < n; i++) {
		size_t len;
		_cleanup_free_ uint8_t *buf =
			answer_obj((struct fake *)f, &ds[i], &len);
		if (!buf)
			cb(userdata, i, -ENOENT, NULL, 0);
		else if (len > max)
			cb(userdata, i, -EFBIG, NULL, 0);
		else
			cb(userdata, i, 0, buf, len);
	}
	return 0;
}

/* The pack of a Directory as the layout makes it (remote_i.h), from the
 * files this remote has (zeros for others); malloc'd, NULL if none. */
static uint8_t *make_pack(struct fake *k, const cas_digest *d, size_t *ret_len)
{
	const struct obj *o = find(k, d);
	cas_directory *dir = NULL;
	if (!o || cas_directory_decode(o->buf, o->len, &dir, NULL) < 0)
		return NULL;
	uint8_t *pack = NULL;
	uint64_t *off = calloc(dir->n_files ? dir->n_files : 1, sizeof(*off));
	uint64_t plen = 0;
	if (off && cas_layout_pack_offsets(dir, off, &plen) > 0 &&
	    plen <= (1u << 22) && (pack = calloc(1, plen ? plen : 1))) {
		for (size_t i = 0; i < dir->n_files; i++) {
			const struct obj *b = find(k, &dir->files[i].digest);
			if (off[i] != UINT64_MAX && b &&
			    off[i] + b->len <= plen)
				memcpy(pack + off[i], b->buf, b->len);
		}
		*ret_len = (size_t)plen;
	}
	free(off);
	cas_directory_free(dir);
	return pack;
}

static int f_ranges_fetch(cas_fetcher *f, const struct cas_fetch_range *v,
			  size_t n, cas_fetch_blob_cb cb, void *userdata)
{
	struct fake *k = (struct fake *)f;
	for (size_t i = 0; i < n; i++) {
		size_t plen = 0, len = 0;
		_cleanup_free_ uint8_t *pack = make_pack(k, &v[i].pack, &plen);
		uint64_t from = CAS_MIN(v[i].off, (uint64_t)plen);
		uint64_t to = CAS_MIN(from + CAS_MIN(v[i].len, (uint64_t)plen),
				      (uint64_t)plen);
		_cleanup_free_ uint8_t *buf =
			pack ? answer(k, pack + from, (size_t)(to - from), &len)
			     : NULL;
		if (!buf)
			cb(userdata, i, -ENOENT, NULL, 0);
		else
			cb(userdata, i, 0, buf, len);
	}
	return 0;
}

static int f_outboard_fetch(cas_fetcher *f, const cas_digest *d, size_t max,
			    uint8_t **ret_buf, size_t *ret_len)
{
	struct fake *k = (struct fake *)f;
	const struct obj *o = find(k, d);
	if (!o || o->kind != 'L' || !k->outboard)
		return -ENOENT;
	uint8_t *buf = answer(k, k->outboard, k->outboard_len, ret_len);
	if (!buf)
		return -ENOENT;
	if (*ret_len > max) {
		free(buf);
		return -EIO;
	}
	*ret_buf = buf;
	return 0;
}

static int f_blob_range_fetch(cas_fetcher *f, const cas_digest *d, uint64_t off,
			      size_t len, uint8_t *out, size_t *ret_len)
{
	struct fake *k = (struct fake *)f;
	const struct obj *o = find(k, d);
	if (!o)
		return -ENOENT;
	uint64_t from = CAS_MIN(off, (uint64_t)o->len);
	size_t want = (size_t)CAS_MIN((uint64_t)len, o->len - from);
	size_t got;
	_cleanup_free_ uint8_t *buf = answer(k, o->buf + from, want, &got);
	if (!buf)
		return -EIO;
	memcpy(out, buf, CAS_MIN(got, len));
	*ret_len = CAS_MIN(got, len);
	return 0;
}

static void f_free(cas_fetcher *f)
{
	(void)f; /* the harness's */
}

static int rm_one(const char *path, const struct stat *st, int flag,
		  struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static uint32_t le(const uint8_t *p, size_t n)
{
	uint32_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}

/* The large blob of seed v (1 MiB + 1 up to 2 MiB) and its outboard,
 * made once per process and again only when v changes: made per input,
 * they were most of each run's time. Blocks of 4 KiB stamped with their
 * index, so no two groups are equal. */
static uint8_t *large_buf, *large_outboard;
static size_t large_outboard_len;
static uint32_t large_seed;
static struct obj large_obj;

static int make_large(uint32_t v, struct obj *ret)
{
	size_t size = (1u << 20) + 1 + (v & 0xfffff);
	if (!large_buf) {
		large_buf = malloc(2u << 20);
		large_outboard = malloc(cas_bao_outboard_size(2u << 20));
		if (!large_buf || !large_outboard)
			return -ENOMEM;
	} else if (large_seed == v && large_obj.len == size) {
		*ret = large_obj;
		return 0;
	}
	uint8_t block[4096];
	for (size_t i = 0; i < sizeof(block); i++)
		block[i] = (uint8_t)(i * 131 + (v >> 20));
	for (size_t off = 0; off < size; off += sizeof(block)) {
		memcpy(block, &off, sizeof(off));
		memcpy(large_buf + off, block,
		       CAS_MIN(sizeof(block), size - off));
	}
	large_obj = (struct obj){.buf = large_buf, .len = size, .kind = 'L'};
	large_outboard_len = (size_t)cas_bao_outboard_size(size);
	if (cas_bao_hash_buffer(large_buf, size, &large_obj.d, large_outboard) <
	    0)
		return -EINVAL;
	large_seed = v;
	*ret = large_obj;
	return 0;
}

/* Reads the root and its children through the cache s, checking what it
 * hands out against the truth in k. */
static void drive(cas_store *s, struct fake *k, const cas_directory *root,
		  const uint8_t *ranges, size_t n_ranges)
{
	uint8_t *buf = NULL;
	size_t len = 0;
	const struct obj *r = &k->objs[0];
	if (s->ops->directory_get_raw(s, &r->d, &buf, &len) == 0) {
		cas_digest got;
		cas_directory_digest(buf, len, &got);
		INVARIANT(cas_digest_eq(&got, &r->d));
	}
	free(buf);
	for (size_t i = 0; i < root->n_directories; i++) {
		const cas_digest *d = &root->directories[i].digest;
		buf = NULL;
		if (s->ops->directory_get_raw(s, d, &buf, &len) == 0) {
			cas_digest got;
			cas_directory_digest(buf, len, &got);
			INVARIANT(cas_digest_eq(&got, d));
			cas_directory *dir = NULL;
			INVARIANT(cas_directory_decode(buf, len, &dir, NULL) ==
				  0);
			cas_directory_free(dir);
		}
		free(buf);
	}
	for (size_t i = 0; i < root->n_files; i++) {
		const cas_node *n = &root->files[i];
		const struct obj *o = find(k, &n->digest);
		INVARIANT(o);
		if (o->kind == 'L') {
			int fd = -1;
			int q = s->ops->blob_open_ranged
					? s->ops->blob_open_ranged(
						  s, &n->digest, n->size, &fd)
					: -ENOTSUP;
			if (q < 0)
				continue;
			for (size_t j = 0; j < n_ranges; j++) {
				const uint8_t *p = ranges + 6 * j;
				uint64_t off = le(p, 4) % o->len;
				size_t want =
					CAS_MIN(le(p + 4, 2) + 1, o->len - off);
				uint8_t got[65536];
				if (q == 0 &&
				    s->ops->blob_ensure(s, &n->digest, off,
							want) < 0)
					continue;
				INVARIANT(cas_pread_all(fd, got, want, off) ==
					  0);
				INVARIANT(!memcmp(got, o->buf + off, want));
			}
			close(fd);
			continue;
		}
		uint64_t size = 0;
		buf = NULL;
		if (cas_store_blob_read(s, &n->digest, 1u << 20, &buf, &size) ==
		    0) {
			INVARIANT(size == o->len);
			INVARIANT(!size || !memcmp(buf, o->buf, o->len));
		}
		free(buf);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool once;
	if (!once) {
		once = true;
		if (!getenv("CASTORE_LOG")) /* CASTORE_LOG=error to see why */
			cas_log_set_level(CAS_LOG_NONE);
	}
	if (size < 2)
		return 0;
	static const struct cas_fetcher_ops base_ops = {
		.blob_fetch = f_blob_fetch,
		.directories_fetch = f_directories_fetch,
		.free = f_free,
	};
	struct cas_fetcher_ops ops = base_ops;
	if (data[0] & 1)
		ops.directory_fetch_tree = f_fetch_tree;
	if (data[0] & 2)
		ops.blobs_fetch = f_blobs_fetch;
	if (data[0] & 4)
		ops.ranges_fetch = f_ranges_fetch;
	if (data[0] & 8) {
		ops.outboard_fetch = f_outboard_fetch;
		ops.blob_range_fetch = f_blob_range_fetch;
	}
	static struct fake k;
	memset(&k, 0, sizeof(k));
	k.base.ops = &ops;
	k.lies = data[1];
	k.n = 1; /* objs[0]: the root, made below */

	cas_node nodes[MAX_OBJS];
	char names[MAX_OBJS][8];
	cas_directory root = {0};
	size_t n_nodes = 0, n_ranges = 0;
	const uint8_t *ranges = NULL;
	const uint8_t *large = NULL;
	size_t pos = 2;
	while (pos + 3 <= size && k.n < MAX_OBJS - 1) {
		uint8_t tag = data[pos];
		size_t len = le(data + pos + 1, 2);
		pos += 3;
		len = CAS_MIN(len, size - pos);
		const uint8_t *p = data + pos;
		pos += len;
		if (tag == 'j' && k.n_junk < MAX_OBJS) {
			k.junk[k.n_junk] = p;
			k.junk_len[k.n_junk++] = len;
			continue;
		}
		if (tag == 'L' && !large && len >= 4) {
			struct obj *o = &k.objs[k.n++];
			if (make_large(le(p, 4), o) < 0)
				break;
			large = o->buf;
			k.outboard = large_outboard;
			k.outboard_len = large_outboard_len;
			ranges = p + 4;
			n_ranges = CAS_MIN((len - 4) / 6, MAX_RANGES);
			cas_node *n = &nodes[n_nodes++];
			*n = (cas_node){.type = CAS_NODE_FILE,
					.name = (const uint8_t *)"large",
					.name_len = 5,
					.digest = o->d,
					.size = o->len};
			continue;
		}
		if (tag != 'f' && tag != 'x' && tag != 'd')
			continue;
		struct obj *o = &k.objs[k.n++];
		*o = (struct obj){.buf = p, .len = len, .kind = (char)tag};
		cas_hash_buffer(p, len, &o->d);
		cas_node *n = &nodes[n_nodes];
		snprintf(names[n_nodes], sizeof(names[0]), "%c%02zu", tag,
			 n_nodes);
		*n = (cas_node){.type = tag == 'd' ? CAS_NODE_DIRECTORY
						   : CAS_NODE_FILE,
				.name = (const uint8_t *)names[n_nodes],
				.name_len = strlen(names[n_nodes]),
				.digest = o->d,
				.size = len,
				.executable = tag == 'x'};
		if (tag == 'd' &&
		    cas_directory_raw_size(p, len, &n->size, NULL) < 0)
			n->size = len;
		if (len && (p[0] & 1))
			n->size += p[0] >> 1;
		n_nodes++;
	}
	/* Directories first, files after: the root's two lists. */
	cas_node dirs[MAX_OBJS], files[MAX_OBJS];
	for (size_t i = 0; i < n_nodes; i++) {
		if (nodes[i].type == CAS_NODE_DIRECTORY)
			dirs[root.n_directories++] = nodes[i];
		else
			files[root.n_files++] = nodes[i];
	}
	root.directories = dirs;
	root.files = files;
	cas_directory_sort(&root);
	uint8_t *rbuf = NULL;
	size_t rlen = 0;
	char dir[64];
	snprintf(dir, sizeof(dir), "/dev/shm/fuzz-cache-%d", (int)getpid());
	cas_store *s = NULL;
	if (cas_directory_check(&root) ||
	    cas_directory_encode(&root, &rbuf, &rlen, NULL) < 0)
		goto out;
	k.objs[0] = (struct obj){.buf = rbuf, .len = rlen, .kind = 'r'};
	cas_directory_digest(rbuf, rlen, &k.objs[0].d);

	struct cas_remote_options o = {.cache_dir = dir};
	if (cas_cache_store_new(&k.base, "fuzz://", &o, &s) == 0) {
		drive(s, &k, &root, ranges, n_ranges);
		cas_store_free(s);
	}
out:
	(void)nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	free(rbuf);
	return 0;
}
