/* Unit tests of the local store: blobs, Directory batches, roots, import,
 * export and verify, on stores in a fresh temporary folder.
 *
 * Test data is generated from BLAKE3's byte pattern (i % 251, shifted per
 * file) so runs are deterministic. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lmdb.h>
#include <signal.h>
#include <time.h>

#include "../core/check.h"
#include "core/log.h"
#include "store/import.h"
#include "store/local.h"
#include "store/local_i.h"
#include "store/partial.h"
#include "core/bao.h"

static char base[256];

static uint8_t *pattern(size_t len, unsigned shift)
{
	uint8_t *p = malloc(len ? len : 1);
	REQUIRE(p);
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)((i + shift) % 251);
	return p;
}

static void write_file(const char *path, const void *buf, size_t len,
		       mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	REQUIRE(fd >= 0);
	REQUIRE(cas_write_all(fd, buf, len) == 0);
	REQUIRE(fchmod(fd, mode) == 0);
	close(fd);
}

static cas_store *open_store(const char *name)
{
	char dir[512];
	snprintf(dir, sizeof(dir), "%s/%s", base, name);
	struct cas_local_options o = {.create = true};
	cas_store *s = NULL;
	REQUIRE(cas_local_open(dir, &o, &s) == 0);
	return s;
}

static bool blob_file_exists(cas_store *s, const cas_digest *d)
{
	char path[512];
	struct stat st;
	REQUIRE(cas_local_blob_path(s, d, path, sizeof(path)) == 0);
	return stat(path, &st) == 0;
}

static int put_blob(cas_store *s, const void *buf, size_t len,
		    const cas_digest *expected, cas_digest *ret)
{
	cas_blob_writer *w;
	REQUIRE(s->ops->blob_writer_new(s, &w) == 0);
	/* In two pieces, to exercise incremental hashing. */
	size_t half = len / 2;
	REQUIRE(w->ops->write(w, buf, half) == 0);
	REQUIRE(w->ops->write(w, (const uint8_t *)buf + half, len - half) == 0);
	uint64_t size = 0;
	int r = w->ops->commit(w, expected, ret, &size);
	if (r == 0)
		CHECK(size == len);
	return r;
}

static void test_blobs(void)
{
	cas_store *s = open_store("blobs");
	size_t len = 300000;
	_cleanup_free_ uint8_t *data = pattern(len, 0);
	cas_digest d, want, d2;
	cas_hash_buffer(data, len, &want);

	CHECK(s->ops->blob_stat(s, &want, NULL) == -ENOENT);
	CHECK(put_blob(s, data, len, NULL, &d) == 0);
	CHECK(cas_digest_eq(&d, &want));
	uint64_t size = 0;
	CHECK(s->ops->blob_stat(s, &d, &size) == 0 && size == len);

	int fd = -1;
	REQUIRE(s->ops->blob_open(s, &d, &fd, &size) == 0);
	CHECK(size == len);
	_cleanup_free_ uint8_t *back = malloc(len);
	CHECK(cas_pread_all(fd, back, len, 0) == 0 && !memcmp(back, data, len));
	close(fd);

	/* Published read-only and never overwritten. */
	char path[512];
	struct stat st1, st2;
	REQUIRE(cas_local_blob_path(s, &d, path, sizeof(path)) == 0);
	REQUIRE(stat(path, &st1) == 0);
	CHECK((st1.st_mode & 0222) == 0);
	CHECK(put_blob(s, data, len, &want, &d2) == 0);
	CHECK(cas_local_blob_publish_buffer(s, data, len, &want) == 0);
	REQUIRE(stat(path, &st2) == 0);
	CHECK(st1.st_ino == st2.st_ino);

	/* An expected digest that does not match publishes nothing. */
	cas_digest other;
	_cleanup_free_ uint8_t *data2 = pattern(1000, 7);
	cas_hash_buffer(data2, 1000, &other);
	CHECK(put_blob(s, data2, 1000, &want, &d2) == -EBADMSG);
	CHECK(s->ops->blob_stat(s, &other, NULL) == -ENOENT);

	/* publish_buffer, publish_fd: 1 when added, 0 when present. */
	CHECK(cas_local_blob_publish_buffer(s, data2, 1000, &other) == 1);
	CHECK(s->ops->blob_stat(s, &other, &size) == 0 && size == 1000);
	char tmpf[512];
	snprintf(tmpf, sizeof(tmpf), "%s/src-file", base);
	_cleanup_free_ uint8_t *data3 = pattern(2 << 20, 3);
	write_file(tmpf, data3, 2 << 20, 0644);
	cas_digest d3;
	cas_hash_buffer(data3, 2 << 20, &d3);
	fd = open(tmpf, O_RDONLY | O_CLOEXEC);
	REQUIRE(fd >= 0);
	CHECK(cas_local_blob_publish_fd(s, fd, 2 << 20, &d3) == 1);
	CHECK(cas_local_blob_publish_fd(s, fd, 2 << 20, &d3) == 0);
	close(fd);
	REQUIRE(s->ops->blob_open(s, &d3, &fd, &size) == 0);
	CHECK(size == 2 << 20);
	cas_digest check;
	CHECK(cas_hash_fd(fd, &check, &size) == 0 &&
	      cas_digest_eq(&check, &d3));
	close(fd);

	/* put_fd from a pipe, and the empty blob. */
	int p[2];
	REQUIRE(pipe(p) == 0);
	pid_t pid = fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		close(p[0]);
		_exit(cas_write_all(p[1], data, len) == 0 ? 0 : 1);
	}
	close(p[1]);
	CHECK(cas_store_blob_put_fd(s, p[0], &d2, &size) == 0);
	CHECK(cas_digest_eq(&d2, &want) && size == len);
	close(p[0]);
	waitpid(pid, NULL, 0);
	CHECK(put_blob(s, "", 0, NULL, &d2) == 0);
	CHECK(s->ops->blob_stat(s, &d2, &size) == 0 && size == 0);

	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	cas_store_free(s);
}

/* Encodes a Directory of the given nodes (sorted here). */
static void encode(cas_node *nodes, size_t n, uint8_t **buf, size_t *len)
{
	cas_directory d = {0};
	cas_node dirs[8], files[8], links[8];
	for (size_t i = 0; i < n; i++) {
		if (nodes[i].type == CAS_NODE_DIRECTORY)
			dirs[d.n_directories++] = nodes[i];
		else if (nodes[i].type == CAS_NODE_FILE)
			files[d.n_files++] = nodes[i];
		else
			links[d.n_symlinks++] = nodes[i];
	}
	d.directories = dirs;
	d.files = files;
	d.symlinks = links;
	cas_directory_sort(&d);
	const char *why = NULL;
	REQUIRE(cas_directory_encode(&d, buf, len, &why) == 0);
}

static void test_directories(void)
{
	cas_store *s = open_store("dirs");
	uint8_t *raw = (uint8_t *)"x";
	size_t len;

	/* The empty Directory is always there. */
	CHECK(s->ops->directory_has(s, &CAS_DIGEST_EMPTY_DIRECTORY) == 1);
	CHECK(s->ops->directory_get_raw(s, &CAS_DIGEST_EMPTY_DIRECTORY, &raw,
					&len) == 0);
	CHECK(raw == NULL && len == 0);

	/* leaf: one file; parent: the leaf and an empty folder. */
	cas_node lf = {.type = CAS_NODE_FILE,
		       .name = (const uint8_t *)"f",
		       .name_len = 1,
		       .size = 3};
	cas_hash_buffer("abc", 3, &lf.digest);
	_cleanup_free_ uint8_t *leaf = NULL, *parent = NULL, *orphan = NULL;
	size_t leaf_len, parent_len, orphan_len;
	encode(&lf, 1, &leaf, &leaf_len);
	cas_digest leaf_d, parent_d, d;
	cas_directory_digest(leaf, leaf_len, &leaf_d);
	cas_node pn[2] = {
		{.type = CAS_NODE_DIRECTORY,
		 .name = (const uint8_t *)"sub",
		 .name_len = 3,
		 .digest = leaf_d,
		 .size = 1},
		{.type = CAS_NODE_DIRECTORY,
		 .name = (const uint8_t *)"empty",
		 .name_len = 5,
		 .digest = CAS_DIGEST_EMPTY_DIRECTORY},
	};
	encode(pn, 2, &parent, &parent_len);
	cas_directory_digest(parent, parent_len, &parent_d);

	/* Closure: a parent before its child is refused. */
	CHECK(cas_store_directory_put(s, parent, parent_len, &d) == -ENOENT);
	CHECK(s->ops->directory_has(s, &parent_d) == 0);
	/* Bytes that are not canonical are refused. */
	uint8_t bad[] = {0x12, 0x01, 0x0a};
	CHECK(cas_store_directory_put(s, bad, sizeof(bad), &d) == -EBADMSG);

	/* Abort leaves nothing. */
	cas_dir_batch *b;
	REQUIRE(s->ops->dir_batch_new(s, &b) == 0);
	CHECK(b->ops->put(b, leaf, leaf_len, &d) == 0 &&
	      cas_digest_eq(&d, &leaf_d));
	CHECK(b->ops->put(b, parent, parent_len, &d) == 0 &&
	      cas_digest_eq(&d, &parent_d));
	b->ops->abort(b);
	CHECK(s->ops->directory_has(s, &leaf_d) == 0);
	CHECK(s->ops->directory_has(s, &parent_d) == 0);

	/* A failed put inside a batch does not poison what came before;
	 * commit stores all of them and the root at once. */
	REQUIRE(s->ops->dir_batch_new(s, &b) == 0);
	CHECK(b->ops->put(b, leaf, leaf_len, &d) == 0);
	cas_node orphan_node = pn[0];
	orphan_node.digest = lf.digest; /* no Directory has this digest */
	encode(&orphan_node, 1, &orphan, &orphan_len);
	CHECK(b->ops->put(b, orphan, orphan_len, &d) == -ENOENT);
	CHECK(b->ops->put(b, parent, parent_len, &d) == 0);
	cas_node root = {
		.type = CAS_NODE_DIRECTORY, .digest = parent_d, .size = 3};
	CHECK(b->ops->commit(b, "tree", &root) == 0);
	CHECK(s->ops->directory_has(s, &leaf_d) == 1);
	CHECK(s->ops->directory_has(s, &parent_d) == 1);

	_cleanup_free_ uint8_t *got = NULL;
	REQUIRE(s->ops->directory_get_raw(s, &parent_d, &got, &len) == 0);
	CHECK(len == parent_len && !memcmp(got, parent, len));
	_cleanup_(cas_directory_freep) cas_directory *dir = NULL;
	REQUIRE(cas_store_directory_get(s, &parent_d, &dir) == 0);
	CHECK(dir->n_directories == 2);
	CHECK(s->ops->directory_get_raw(s, &lf.digest, &raw, &len) == -ENOENT);
	/* Putting one that is stored again is a success. */
	CHECK(cas_store_directory_put(s, leaf, leaf_len, &d) == 0);

	/* The blob "abc" is absent: verify names it. */
	CHECK(cas_local_verify(s, NULL, NULL) == 1);
	cas_store_free(s);
}

struct root_list {
	char names[8][32];
	int n;
};

static int collect_root(void *userdata, const char *name, const cas_node *node)
{
	struct root_list *l = userdata;
	if (l->n < 8)
		snprintf(l->names[l->n++], 32, "%s", name);
	return 0;
}

static void test_roots(void)
{
	cas_store *s = open_store("roots");
	cas_node file = {.type = CAS_NODE_FILE, .size = 5, .executable = true};
	cas_hash_buffer("hello", 5, &file.digest);
	cas_node link = {.type = CAS_NODE_SYMLINK,
			 .target = (const uint8_t *)"../x",
			 .target_len = 4};
	cas_node *got = NULL;

	CHECK(s->ops->root_get(s, "a", &got) == -ENOENT);
	CHECK(s->ops->root_set(s, "b", &file) == 0);
	CHECK(s->ops->root_set(s, "a", &link) == 0);
	CHECK(s->ops->root_set(s, "bad/name", &link) == -EINVAL);
	CHECK(s->ops->root_set(s, "..", &link) == -EINVAL);
	REQUIRE(s->ops->root_get(s, "b", &got) == 0);
	CHECK(got->type == CAS_NODE_FILE && got->size == 5 && got->executable &&
	      cas_digest_eq(&got->digest, &file.digest));
	CHECK(got->name_len == 1 && got->name[0] == 'b');
	free(got);
	REQUIRE(s->ops->root_get(s, "a", &got) == 0);
	CHECK(got->type == CAS_NODE_SYMLINK && got->target_len == 4 &&
	      !memcmp(got->target, "../x", 4));
	free(got);
	/* Replace. */
	CHECK(s->ops->root_set(s, "a", &file) == 0);
	REQUIRE(s->ops->root_get(s, "a", &got) == 0);
	CHECK(got->type == CAS_NODE_FILE);
	free(got);

	struct root_list l = {0};
	CHECK(s->ops->roots_foreach(s, collect_root, &l) == 0);
	CHECK(l.n == 2 && !strcmp(l.names[0], "a") && !strcmp(l.names[1], "b"));

	CHECK(s->ops->root_remove(s, "a") == 0);
	CHECK(s->ops->root_remove(s, "a") == -ENOENT);
	CHECK(s->ops->root_get(s, "a", &got) == -ENOENT);
	l.n = 0;
	CHECK(s->ops->roots_foreach(s, collect_root, &l) == 0 && l.n == 1);

	/* A root whose content is absent is legal, and verify reports it. */
	CHECK(cas_local_verify(s, NULL, NULL) == 1);
	CHECK(s->ops->root_remove(s, "b") == 0);
	CHECK(cas_local_verify(s, NULL, NULL) == 0);

	/* A second handle, read-only, sees the same roots. */
	CHECK(s->ops->root_set(s, "c", &link) == 0);
	cas_store_free(s);
	char dir[512];
	snprintf(dir, sizeof(dir), "%s/roots", base);
	struct cas_local_options ro = {.readonly = true};
	REQUIRE(cas_local_open(dir, &ro, &s) == 0);
	REQUIRE(s->ops->root_get(s, "c", &got) == 0);
	free(got);
	CHECK(s->ops->root_set(s, "d", &link) == -EROFS);
	cas_store_free(s);
	snprintf(dir, sizeof(dir), "%s/nothing-here", base);
	CHECK(cas_local_open(dir, &ro, &s) == -ENOENT);
}

/* Tree comparison ------------------------------------------------------ */

static int compare_trees(const char *a, const char *b)
{
	struct stat sa, sb;
	if (lstat(a, &sa) < 0 || lstat(b, &sb) < 0) {
		fprintf(stderr, "compare: %s or %s missing\n", a, b);
		return 1;
	}
	if ((sa.st_mode & S_IFMT) != (sb.st_mode & S_IFMT)) {
		fprintf(stderr, "compare: %s: type differs\n", b);
		return 1;
	}
	if (S_ISLNK(sa.st_mode)) {
		char ta[4096], tb[4096];
		ssize_t na = readlink(a, ta, sizeof(ta)),
			nb = readlink(b, tb, sizeof(tb));
		if (na != nb || memcmp(ta, tb, (size_t)na)) {
			fprintf(stderr, "compare: %s: target differs\n", b);
			return 1;
		}
		return 0;
	}
	if (S_ISREG(sa.st_mode)) {
		if (sa.st_size != sb.st_size ||
		    ((sa.st_mode & 0111) != 0) != ((sb.st_mode & 0111) != 0)) {
			fprintf(stderr, "compare: %s: size or x bit differs\n",
				b);
			return 1;
		}
		int fa = open(a, O_RDONLY), fb = open(b, O_RDONLY);
		cas_digest da, db;
		uint64_t n;
		int r = fa >= 0 && fb >= 0 && cas_hash_fd(fa, &da, &n) == 0 &&
					cas_hash_fd(fb, &db, &n) == 0 &&
					cas_digest_eq(&da, &db)
				? 0
				: 1;
		close(fa);
		close(fb);
		if (r)
			fprintf(stderr, "compare: %s: content differs\n", b);
		return r;
	}
	/* Directories: same names, recursively. */
	int fails = 0, count_a = 0, count_b = 0;
	DIR *d = opendir(a);
	REQUIRE(d);
	struct dirent *de;
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		count_a++;
		char pa[4096], pb[4096];
		snprintf(pa, sizeof(pa), "%s/%s", a, de->d_name);
		snprintf(pb, sizeof(pb), "%s/%s", b, de->d_name);
		fails += compare_trees(pa, pb);
	}
	closedir(d);
	d = opendir(b);
	REQUIRE(d);
	while ((de = readdir(d)))
		count_b += strcmp(de->d_name, ".") && strcmp(de->d_name, "..");
	closedir(d);
	if (count_a != count_b) {
		fprintf(stderr, "compare: %s: %d entries, want %d\n", b,
			count_b, count_a);
		fails++;
	}
	return fails;
}

static void make_tree(const char *root)
{
	char p[1024];
	REQUIRE(mkdir(root, 0755) == 0);
	const char *dirs[] = {"a",	"a/b",		"a/b/c", "empty",
			      "nested", "nested/empty", "many"};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(dirs); i++) {
		snprintf(p, sizeof(p), "%s/%s", root, dirs[i]);
		REQUIRE(mkdir(p, 0755) == 0);
	}
	_cleanup_free_ uint8_t *big = pattern(3 << 20, 11);
	snprintf(p, sizeof(p), "%s/a/big", root);
	write_file(p, big, 3 << 20, 0644);
	/* Exactly the small-file limit and one byte either side. */
	snprintf(p, sizeof(p), "%s/a/b/edge-1", root);
	write_file(p, big, (1 << 20) - 1, 0644);
	snprintf(p, sizeof(p), "%s/a/b/edge", root);
	write_file(p, big, 1 << 20, 0644);
	snprintf(p, sizeof(p), "%s/a/b/edge+1", root);
	write_file(p, big + 1, (1 << 20) + 1, 0644);
	snprintf(p, sizeof(p), "%s/a/b/c/run.sh", root);
	write_file(p, "#!/bin/sh\necho hi\n", 18, 0755);
	snprintf(p, sizeof(p), "%s/a/b/c/only-group-x", root);
	write_file(p, "x", 1, 0614);
	snprintf(p, sizeof(p), "%s/empty-file", root);
	write_file(p, "", 0, 0644);
	snprintf(p, sizeof(p), "%s/same-as-small", root);
	write_file(p, "#!/bin/sh\necho hi\n", 18, 0644);
	snprintf(p, sizeof(p), "%s/new\nline \xff\xfe", root);
	write_file(p, "odd name", 8, 0644);
	for (int i = 0; i < 300; i++) {
		_cleanup_free_ uint8_t *data =
			pattern((size_t)i * 37, (unsigned)i);
		snprintf(p, sizeof(p), "%s/many/f%03d", root, i);
		write_file(p, data, (size_t)i * 37, 0644);
	}
	snprintf(p, sizeof(p), "%s/link-up", root);
	REQUIRE(symlink("a/b/../big", p) == 0);
	snprintf(p, sizeof(p), "%s/a/dangling", root);
	REQUIRE(symlink("/does/not/exist", p) == 0);
	snprintf(p, sizeof(p), "%s/a/dirlink", root);
	REQUIRE(symlink("b", p) == 0);
}

static int count_entries(const char *path)
{
	DIR *d = opendir(path);
	REQUIRE(d);
	int n = 0;
	struct dirent *de;
	while ((de = readdir(d)))
		n += strcmp(de->d_name, ".") && strcmp(de->d_name, "..");
	closedir(d);
	return n;
}

static uint64_t progress_calls;
static void on_progress(void *userdata, const struct cas_import_progress *p)
{
	progress_calls++;
}

static void test_import_export(void)
{
	cas_store *s = open_store("imp");
	char src[512], dst[512], p[1024];
	snprintf(src, sizeof(src), "%s/tree", base);
	make_tree(src);

	struct cas_import_options o = {.progress = on_progress};
	cas_node *node = NULL;
	struct cas_import_progress pr;
	REQUIRE(cas_import(s, src, "tree", &o, &node, &pr) == 0);
	CHECK(node->type == CAS_NODE_DIRECTORY && node->name_len == 0);
	CHECK(pr.files == 309 && pr.symlinks == 3 && pr.directories == 8);
	CHECK(pr.blobs_added == 307); /* 2 duplicates: empty files, run.sh */
	CHECK(progress_calls >= 1);
	/* Small blobs went to LMDB, large ones (written with O_DIRECT, with
	 * and without a partial last block) to files. */
	cas_digest dx;
	cas_hash_buffer("x", 1, &dx);
	CHECK(s->ops->blob_stat(s, &dx, NULL) == 0 &&
	      !blob_file_exists(s, &dx));
	_cleanup_free_ uint8_t *big = pattern(3 << 20, 11);
	const size_t big_sizes[] = {3 << 20, (1 << 20) - 1, 1 << 20};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(big_sizes); i++) {
		cas_digest db;
		cas_hash_buffer(big, big_sizes[i], &db);
		CHECK(blob_file_exists(s, &db));
	}

	cas_node *root = NULL;
	REQUIRE(s->ops->root_get(s, "tree", &root) == 0);
	CHECK(cas_digest_eq(&root->digest, &node->digest) &&
	      root->size == node->size);
	free(root);

	/* Executable bits: any x bit counts. */
	_cleanup_(cas_directory_freep) cas_directory *top = NULL;
	REQUIRE(cas_store_directory_get(s, &node->digest, &top) == 0);
	CHECK(top->n_directories == 4 && top->n_files == 3 &&
	      top->n_symlinks == 1);
	const cas_node *nested =
		cas_directory_find(top, (const uint8_t *)"nested", 6);
	REQUIRE(nested);
	CHECK(nested->size == 1);
	const cas_node *odd = cas_directory_find(
		top, (const uint8_t *)"new\nline \xff\xfe", 11);
	CHECK(odd && odd->type == CAS_NODE_FILE && odd->size == 8);

	/* Export reproduces it. */
	snprintf(dst, sizeof(dst), "%s/out", base);
	CHECK(cas_export(s, node, dst) == 0);
	CHECK(compare_trees(src, dst) == 0);
	snprintf(p, sizeof(p), "%s/a/b/c/only-group-x", dst);
	struct stat st;
	CHECK(stat(p, &st) == 0 && (st.st_mode & 07777) == 0755);
	snprintf(p, sizeof(p), "%s/many/f001", dst);
	CHECK(stat(p, &st) == 0 && (st.st_mode & 07777) == 0644);
	CHECK(cas_export(s, node, dst) == -EEXIST);

	/* Re-import: same root, nothing added. */
	cas_node *again = NULL;
	REQUIRE(cas_import(s, src, NULL, NULL, &again, &pr) == 0);
	CHECK(cas_digest_eq(&again->digest, &node->digest));
	CHECK(pr.blobs_added == 0 && pr.files == 309);
	free(again);
	/* One thread only: same result. */
	struct cas_import_options one = {.threads = 1};
	REQUIRE(cas_import(s, src, NULL, &one, &again, NULL) == 0);
	CHECK(cas_digest_eq(&again->digest, &node->digest));
	free(again);

	/* A single file. */
	snprintf(p, sizeof(p), "%s/a/b/c/run.sh", src);
	REQUIRE(cas_import(s, p, "script", NULL, &again, NULL) == 0);
	CHECK(again->type == CAS_NODE_FILE && again->executable &&
	      again->size == 18);
	snprintf(dst, sizeof(dst), "%s/script-out", base);
	CHECK(cas_export(s, again, dst) == 0);
	CHECK(compare_trees(p, dst) == 0);
	free(again);

	/* An empty folder is the empty Directory. */
	snprintf(p, sizeof(p), "%s/empty", src);
	REQUIRE(cas_import(s, p, NULL, NULL, &again, NULL) == 0);
	CHECK(cas_digest_eq(&again->digest, &CAS_DIGEST_EMPTY_DIRECTORY) &&
	      again->size == 0);
	free(again);

	/* Missing objects are errors naming the digest. */
	cas_node missing = *node;
	missing.digest.bytes[0] ^= 1;
	snprintf(dst, sizeof(dst), "%s/out-missing", base);
	CHECK(cas_export(s, &missing, dst) == -ENOENT);

	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	free(node);
	cas_store_free(s);

	/* Nothing is left in tmp/; an hour-old leftover of a crashed writer
	 * is removed by the next writer, a young one is not. */
	snprintf(p, sizeof(p), "%s/imp/tmp", base);
	CHECK(count_entries(p) == 0);
	snprintf(p, sizeof(p), "%s/imp/tmp/old", base);
	write_file(p, "x", 1, 0444);
	struct timespec old[2] = {{.tv_sec = 1000}, {.tv_sec = 1000}};
	REQUIRE(utimensat(AT_FDCWD, p, old, 0) == 0);
	snprintf(p, sizeof(p), "%s/imp/tmp/young", base);
	write_file(p, "x", 1, 0444);
	s = open_store("imp");
	snprintf(p, sizeof(p), "%s/imp/tmp", base);
	CHECK(count_entries(p) == 1);
	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	cas_store_free(s);
}

static void test_import_refused(void)
{
	cas_store *s = open_store("refuse");
	char src[512], p[1024];
	snprintf(src, sizeof(src), "%s/fifo-tree", base);
	make_tree(src);
	snprintf(p, sizeof(p), "%s/a/b/pipe", src);
	REQUIRE(mkfifo(p, 0644) == 0);
	cas_node *node = NULL, *root = NULL;
	CHECK(cas_import(s, src, "bad", NULL, &node, NULL) == -EINVAL);
	CHECK(node == NULL);
	CHECK(s->ops->root_get(s, "bad", &root) == -ENOENT);
	/* The fifo as PATH itself. */
	CHECK(cas_import(s, p, "bad", NULL, &node, NULL) == -EINVAL);
	snprintf(p, sizeof(p), "%s/does-not-exist", base);
	CHECK(cas_import(s, p, "bad", NULL, &node, NULL) == -ENOENT);
	CHECK(s->ops->root_get(s, "bad", &root) == -ENOENT);
	/* Whatever blobs were published, the store is consistent. */
	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	cas_store_free(s);
}

struct problems {
	int n;
	char first[1024];
};

static void on_problem(void *userdata, const char *problem)
{
	struct problems *p = userdata;
	if (p->n++ == 0)
		snprintf(p->first, sizeof(p->first), "%s", problem);
	fprintf(stderr, "  (verify, expected) %s\n", problem);
}

static char match_want[512];
static int match_found;

static void on_problem_match(void *userdata, const char *problem)
{
	struct problems *p = userdata;
	p->n++;
	fprintf(stderr, "  (verify, expected) %s\n", problem);
	if (!strncmp(problem, match_want, strlen(match_want)))
		match_found++;
}

/* Small blobs that an import finds live in a pack, indexed in LMDB;
 * every reader finds them; blobs put one at a time, and every blob of a
 * no_inline store, are files. */
static void test_packs(void)
{
	char src[512], p[1024], dir[512];
	snprintf(src, sizeof(src), "%s/small-tree", base);
	REQUIRE(mkdir(src, 0755) == 0);
	const size_t sizes[] = {
		0, 1, 100, CAS_LOCAL_PACK_MAX, CAS_LOCAL_PACK_MAX + 1, 70000};
	uint8_t *datas[CAS_ARRAY_SIZE(sizes)];
	cas_digest ds[CAS_ARRAY_SIZE(sizes)];
	for (size_t i = 0; i < CAS_ARRAY_SIZE(sizes); i++) {
		datas[i] = pattern(sizes[i], (unsigned)i + 40);
		cas_hash_buffer(datas[i], sizes[i], &ds[i]);
		snprintf(p, sizeof(p), "%s/f%zu", src, i);
		write_file(p, datas[i], sizes[i], 0644);
	}
	/* The same bytes twice in one import go into the pack once. */
	snprintf(p, sizeof(p), "%s/f3-again", src);
	write_file(p, datas[3], sizes[3], 0644);
	cas_store *s = open_store("packs");
	struct cas_import_options o = {0};
	struct cas_import_progress pr;
	REQUIRE(cas_import(s, src, "small", &o, NULL, &pr) == 0);
	CHECK(pr.blobs_added == CAS_ARRAY_SIZE(sizes));
	for (size_t i = 0; i < CAS_ARRAY_SIZE(sizes); i++) {
		size_t len = sizes[i];
		const cas_digest *d = &ds[i];
		CHECK(blob_file_exists(s, d) == (len > CAS_LOCAL_PACK_MAX));
		uint64_t size = 1;
		CHECK(s->ops->blob_stat(s, d, &size) == 0 && size == len);
		int fd = -1;
		REQUIRE(s->ops->blob_open(s, d, &fd, &size) == 0);
		_cleanup_free_ uint8_t *back = malloc(len + 1);
		CHECK(size == len && cas_pread_all(fd, back, len, 0) == 0 &&
		      !memcmp(back, datas[i], len));
		/* An fd of a packed blob cannot change it. */
		CHECK(pwrite(fd, "x", 1, 0) < 0);
		close(fd);
		/* Packed blobs are located inside the pack, the others not. */
		uint64_t off = 0;
		int r = s->ops->blob_locate(s, d, &fd, &off, &size);
		CHECK(r == (len > CAS_LOCAL_PACK_MAX ? -ENOENT : 0));
		if (r == 0)
			CHECK(size == len &&
			      cas_pread_all(fd, back, len, off) == 0 &&
			      !memcmp(back, datas[i], len));
		uint8_t *buf = NULL;
		size = 0;
		REQUIRE(cas_store_blob_read(s, d, 1u << 20, &buf, &size) == 0);
		CHECK(size == len && !memcmp(buf, datas[i], len));
		free(buf);
		if (len > 0)
			CHECK(cas_store_blob_read(s, d, len - 1, &buf, &size) ==
			      -EFBIG);
	}
	struct problems vp = {0};
	CHECK(cas_local_verify(s, on_problem, &vp) == 0 && vp.n == 0);

	/* Importing again adds nothing, not even a pack. */
	REQUIRE(cas_import(s, src, "small", &o, NULL, &pr) == 0);
	CHECK(pr.blobs_added == 0);
	char pack[1536] = "";
	int n_packs = 0;
	snprintf(p, sizeof(p), "%s/packs/packs", base);
	DIR *dd = opendir(p);
	REQUIRE(dd);
	struct dirent *de;
	while ((de = readdir(dd))) {
		if (de->d_name[0] == '.')
			continue;
		n_packs++;
		snprintf(pack, sizeof(pack), "%s/%s", p, de->d_name);
	}
	closedir(dd);
	CHECK(n_packs == 1);
	struct stat pst;
	size_t packed = 0;
	for (size_t i = 0; i < CAS_ARRAY_SIZE(sizes); i++)
		packed += sizes[i] <= CAS_LOCAL_PACK_MAX ? sizes[i] : 0;
	REQUIRE(stat(pack, &pst) == 0);
	CHECK((uint64_t)pst.st_size == (packed + 4095) / 4096 * 4096);

	/* A flipped byte in the pack: verify names the blob. */
	REQUIRE(chmod(pack, 0644) == 0);
	int fd = open(pack, O_RDWR);
	REQUIRE(fd >= 0);
	uint8_t b;
	REQUIRE(pread(fd, &b, 1, 0) == 1);
	b ^= 0x20;
	REQUIRE(pwrite(fd, &b, 1, 0) == 1);
	close(fd);
	vp = (struct problems){0};
	CHECK(cas_local_verify(s, on_problem, &vp) == 1 && vp.n == 1);
	CHECK(!strncmp(vp.first, "blob ", 5) &&
	      strstr(vp.first, ": content hashes to "));
	cas_store_free(s);

	/* One at a time, small blobs are files. */
	s = open_store("packs-single");
	cas_digest d;
	REQUIRE(put_blob(s, datas[2], sizes[2], NULL, &d) == 0);
	CHECK(blob_file_exists(s, &d));
	cas_store_free(s);

	/* A store that keeps every blob as a file (a cache). */
	snprintf(dir, sizeof(dir), "%s/no-inline", base);
	struct cas_local_options lo = {.create = true, .no_inline = true};
	REQUIRE(cas_local_open(dir, &lo, &s) == 0);
	REQUIRE(cas_import(s, src, "small", &o, NULL, &pr) == 0);
	for (size_t i = 0; i < CAS_ARRAY_SIZE(sizes); i++)
		CHECK(blob_file_exists(s, &ds[i]));
	cas_store_free(s);
	for (size_t i = 0; i < CAS_ARRAY_SIZE(sizes); i++)
		free(datas[i]);
}

static void test_verify(void)
{
	cas_store *s = open_store("verify");
	_cleanup_free_ uint8_t *data = pattern(5000, 1);
	cas_digest d;
	REQUIRE(put_blob(s, data, 5000, NULL, &d) == 0);
	struct problems pr = {0};
	CHECK(cas_local_verify(s, on_problem, &pr) == 0 && pr.n == 0);

	char path[512], hex[65], want[200];
	REQUIRE(cas_local_blob_path(s, &d, path, sizeof(path)) == 0);
	int fd = open(path, O_WRONLY);
	if (fd < 0) {
		REQUIRE(chmod(path, 0644) == 0);
		fd = open(path, O_WRONLY);
	}
	REQUIRE(fd >= 0);
	uint8_t flipped = data[1234] ^ 0x20;
	REQUIRE(pwrite(fd, &flipped, 1, 1234) == 1);
	close(fd);
	cas_digest_to_hex(&d, hex);
	snprintf(want, sizeof(want), "blob %s: content hashes to ", hex);
	CHECK(cas_local_verify(s, on_problem, &pr) == 1 && pr.n == 1);
	CHECK(!strncmp(pr.first, want, strlen(want)));

	/* A directory root whose Directory is absent. */
	cas_node n = {.type = CAS_NODE_DIRECTORY, .digest = d, .size = 1};
	REQUIRE(s->ops->root_set(s, "foo", &n) == 0);
	pr.n = 0;
	CHECK(cas_local_verify(s, on_problem, &pr) == 2);
	cas_store_free(s);
}

/* Writes raw entries into the "directories" database behind the store's
 * back (the store must be closed: LMDB allows one env per process). */
static void raw_put_directory(const char *dir, const cas_digest *key,
			      const void *val, size_t len)
{
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;
	REQUIRE(mdb_env_create(&env) == 0);
	REQUIRE(mdb_env_set_maxdbs(env, 4) == 0);
	REQUIRE(mdb_env_set_mapsize(env, 1ull << 40) == 0);
	REQUIRE(mdb_env_open(env, dir, MDB_NOTLS, 0644) == 0);
	REQUIRE(mdb_txn_begin(env, NULL, 0, &txn) == 0);
	REQUIRE(mdb_dbi_open(txn, "directories", 0, &dbi) == 0);
	MDB_val k = {CAS_DIGEST_LEN, (void *)key->bytes},
		v = {len, (void *)val};
	REQUIRE(mdb_put(txn, dbi, &k, &v, 0) == 0);
	REQUIRE(mdb_txn_commit(txn) == 0);
	mdb_env_close(env);
}

static int has_problem(const char *dir, const char *want)
{
	struct cas_local_options o = {0};
	cas_store *s = NULL;
	REQUIRE(cas_local_open(dir, &o, &s) == 0);
	struct problems pr = {0};
	int n = cas_local_verify(s, on_problem_match, &pr);
	cas_store_free(s);
	(void)want;
	return n == pr.n ? n : -1;
}

static void test_verify_directories(void)
{
	char dir[512];
	snprintf(dir, sizeof(dir), "%s/verify-dirs", base);
	cas_store_free(open_store("verify-dirs"));

	/* A Directory whose child is absent (bypassing closure). */
	cas_node child = {.type = CAS_NODE_DIRECTORY,
			  .name = (const uint8_t *)"x",
			  .name_len = 1,
			  .size = 1};
	cas_hash_buffer("not a directory", 15, &child.digest);
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	encode(&child, 1, &buf, &len);
	cas_digest d;
	cas_directory_digest(buf, len, &d);
	raw_put_directory(dir, &d, buf, len);
	char hex[65], chex[65];
	cas_digest_to_hex(&d, hex);
	cas_digest_to_hex(&child.digest, chex);
	snprintf(match_want, sizeof(match_want),
		 "directory %s: child directory %s (name 'x') is missing", hex,
		 chex);
	match_found = 0;
	CHECK(has_problem(dir, match_want) == 1 && match_found == 1);

	/* Bytes that do not hash to their key. */
	cas_digest wrong = d;
	wrong.bytes[5] ^= 1;
	raw_put_directory(dir, &wrong, buf, len);
	cas_digest_to_hex(&wrong, hex);
	snprintf(match_want, sizeof(match_want),
		 "directory %s: content hashes to ", hex);
	match_found = 0;
	CHECK(has_problem(dir, match_want) == 2 && match_found == 1);
}

/* An import killed at any moment leaves a store that verify accepts, and
 * a re-run completes. */
static void test_kill_import(void)
{
	char src[512], dir[512];
	snprintf(src, sizeof(src), "%s/tree", base);
	snprintf(dir, sizeof(dir), "%s/killed", base);
	for (int i = 0; i < 8; i++) {
		pid_t pid = fork();
		REQUIRE(pid >= 0);
		if (pid == 0) {
			cas_log_set_level(CAS_LOG_ERROR);
			cas_store *s = NULL;
			struct cas_local_options o = {.create = true};
			int r = cas_local_open(dir, &o, &s);
			if (r == 0)
				r = cas_import(s, src, "t", NULL, NULL, NULL);
			_exit(r == 0 ? 0 : 1);
		}
		struct timespec ts = {0, (long)i * 7000000};
		nanosleep(&ts, NULL);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		struct stat st;
		char mdb[600];
		snprintf(mdb, sizeof(mdb), "%s/data.mdb", dir);
		if (stat(mdb, &st) < 0)
			continue; /* killed before the store existed */
		cas_store *s = NULL;
		struct cas_local_options o = {0};
		if (st.st_size == 0) {
			/* Killed between LMDB's create and its first
			 * write: no store yet, for a reader. */
			CHECK(cas_local_open(dir, &o, &s) == -ENOENT);
			continue;
		}
		REQUIRE(cas_local_open(dir, &o, &s) == 0);
		CHECK(cas_local_verify(s, NULL, NULL) == 0);
		cas_store_free(s);
	}
	cas_store *s = open_store("killed");
	CHECK(cas_import(s, src, "t", NULL, NULL, NULL) == 0);
	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	cas_store_free(s);
}

/* Several processes import into one store at once. */
static void test_concurrent(void)
{
	char src[512], dir[512];
	snprintf(src, sizeof(src), "%s/tree", base);
	snprintf(dir, sizeof(dir), "%s/conc", base);
	pid_t pids[3];
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		REQUIRE(pids[i] >= 0);
		if (pids[i] == 0) {
			cas_store *s = NULL;
			struct cas_local_options o = {.create = true};
			char name[16];
			snprintf(name, sizeof(name), "t%d", i);
			int r = cas_local_open(dir, &o, &s);
			if (r == 0)
				r = cas_import(s, src, name, NULL, NULL, NULL);
			cas_store_free(s);
			_exit(r == 0 ? 0 : 1);
		}
	}
	for (int i = 0; i < 3; i++) {
		int status = 0;
		REQUIRE(waitpid(pids[i], &status, 0) == pids[i]);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	}
	cas_store *s = open_store("conc");
	struct root_list l = {0};
	CHECK(s->ops->roots_foreach(s, collect_root, &l) == 0 && l.n == 3);
	CHECK(cas_local_verify(s, NULL, NULL) == 0);
	cas_store_free(s);
}

/* Partial blobs (store/partial.h): verified groups written, recorded on
 * close, read back by a later open; a wrong outboard refused; the blob
 * named once whole; verify checks what a record names. */
static void count_problem(void *userdata, const char *problem)
{
	(void)problem;
	(*(int *)userdata)++;
}

static void test_partial(void)
{
	cas_store *s = open_store("partial");
	const size_t size = (2u << 20) + 5 * CAS_BAO_GROUP_SIZE + 7;
	uint8_t *data = pattern(size, 3);
	uint64_t groups = cas_bao_groups(size);
	size_t olen = (size_t)cas_bao_outboard_size(size);
	uint8_t *ob = malloc(olen);
	cas_digest d;
	REQUIRE(ob && cas_bao_hash_buffer(data, size, &d, ob) == 0);

	struct cas_partial *p = NULL;
	/* A flipped node: refused, nothing made. */
	ob[100] ^= 1;
	CHECK(cas_partial_open(s, &d, size, ob, olen, &p) == -EBADMSG);
	ob[100] ^= 1;
	/* The wrong size: the tree disagrees. */
	CHECK(cas_partial_open(s, &d, size + CAS_BAO_GROUP_SIZE, ob, olen,
			       &p) == -EBADMSG);
	REQUIRE(cas_partial_open(s, &d, size, ob, olen, &p) == 0);
	CHECK(!cas_partial_has(p, 0, 1) && cas_partial_count(p) == 0);
	const size_t G = CAS_BAO_GROUP_SIZE;
	CHECK(cas_partial_write(p, 2, data + 2 * G, 3 * G) == 0);
	CHECK(cas_partial_write(p, 2, data + 2 * G, G + 1) == -EINVAL);
	CHECK(cas_partial_has(p, 2, 3) && !cas_partial_has(p, 1, 2));
	int fd = -1;
	uint8_t buf[64];
	REQUIRE(cas_partial_open_fd(p, &fd) == 0);
	CHECK(cas_pread_all(fd, buf, sizeof(buf), 3 * G + 9) == 0 &&
	      memcmp(buf, data + 3 * G + 9, sizeof(buf)) == 0);
	close(fd);
	cas_partial_close(p);

	/* Reopened with the outboard the store kept: the record holds. */
	REQUIRE(cas_partial_open(s, &d, size, NULL, 0, &p) == 0);
	CHECK(cas_partial_count(p) == 3 && cas_partial_has(p, 2, 3));
	cas_partial_close(p);
	int problems = 0;
	CHECK(cas_local_verify(s, count_problem, &problems) == 0);

	/* A flipped byte in a recorded group: verify names it. */
	char hex[CAS_DIGEST_HEX_LEN + 1], path[512];
	cas_digest_to_hex(&d, hex);
	snprintf(path, sizeof(path), "%s/partial/partial/%s", base, hex);
	int wfd = open(path, O_RDWR);
	REQUIRE(wfd >= 0);
	uint8_t x = data[4 * G + 1] ^ 1;
	REQUIRE(cas_pwrite_all(wfd, &x, 1, 4 * G + 1) == 0);
	problems = 0;
	CHECK(cas_local_verify(s, count_problem, &problems) == 1);
	x ^= 1;
	REQUIRE(cas_pwrite_all(wfd, &x, 1, 4 * G + 1) == 0);
	close(wfd);

	/* A record that does not decode: the blob starts again empty. */
	snprintf(path, sizeof(path), "%s/partial/partial/%s.ranges", base, hex);
	wfd = open(path, O_RDWR);
	REQUIRE(wfd >= 0);
	REQUIRE(cas_pwrite_all(wfd, "X", 1, 0) == 0);
	close(wfd);
	REQUIRE(cas_partial_open(s, &d, size, NULL, 0, &p) == 0);
	CHECK(cas_partial_count(p) == 0);

	/* Whole: named as a blob, readable, and verify is content. */
	int named = 0;
	for (uint64_t g = 0; g < groups; g += 16) {
		size_t len = (size_t)CAS_MIN(16 * G, size - g * G);
		int r = cas_partial_write(p, g, data + g * G, len);
		CHECK(r >= 0);
		if (r == 1)
			named += cas_partial_sync(p);
	}
	CHECK(named == 1 && cas_partial_complete(p));
	cas_partial_close(p);
	CHECK(blob_file_exists(s, &d));
	uint64_t bsize = 0;
	CHECK(s->ops->blob_stat(s, &d, &bsize) == 0 && bsize == size);
	problems = 0;
	CHECK(cas_local_verify(s, count_problem, &problems) == 0);
	/* Opening a whole blob: complete from the start. */
	REQUIRE(cas_partial_open(s, &d, size, NULL, 0, &p) == 0);
	CHECK(cas_partial_complete(p) && cas_partial_has(p, 0, groups));
	cas_partial_close(p);
	free(ob);
	free(data);
	cas_store_free(s);
}

int main(void)
{
	const char *tmp = getenv("TMPDIR");
	snprintf(base, sizeof(base), "%s/test-store-XXXXXX",
		 tmp ? tmp : "/tmp");
	REQUIRE(mkdtemp(base));
	umask(022);

	test_blobs();
	test_directories();
	test_roots();
	test_import_export();
	test_import_refused();
	test_packs();
	test_verify();
	test_verify_directories();
	test_concurrent();
	test_kill_import();
	test_partial();

	int r = check_exit("store");
	if (r == 0) {
		char cmd[600];
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
		if (system(cmd) != 0)
			fprintf(stderr, "could not remove %s\n", base);
	} else {
		fprintf(stderr, "store: test data kept in %s\n", base);
	}
	return r;
}
