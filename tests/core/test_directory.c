/* Unit tests of core/directory: the castore v1 codec, its validation (one
 * test per refusal, with its reason), size and lookup.
 *
 * Inputs are written byte by byte with the small protobuf writer below,
 * not with the codec under test, so a bug in the encoder cannot hide the
 * same bug in the decoder. Every decode gets an exact-size heap copy of
 * its input, so the address sanitizer sees any read past the end. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "core/digest.h"
#include "core/directory.h"
#include "core/util.h"

/* --- an independent protobuf writer ----------------------------------- */

struct wb {
	uint8_t b[4096];
	size_t n;
};

static void w_raw(struct wb *w, const void *p, size_t len)
{
	REQUIRE(w->n + len <= sizeof(w->b));
	memcpy(w->b + w->n, p, len);
	w->n += len;
}

static void w_byte(struct wb *w, uint8_t v)
{
	w_raw(w, &v, 1);
}

static void w_varint(struct wb *w, uint64_t v)
{
	do {
		uint8_t b = v & 0x7f;
		v >>= 7;
		w_byte(w, (uint8_t)(b | (v ? 0x80 : 0)));
	} while (v);
}

static void w_tag(struct wb *w, uint64_t field, unsigned wt)
{
	w_varint(w, field << 3 | wt);
}

static void w_bytes(struct wb *w, uint64_t field, const void *p, size_t len)
{
	w_tag(w, field, 2);
	w_varint(w, len);
	w_raw(w, p, len);
}

static void w_str(struct wb *w, uint64_t field, const char *s)
{
	w_bytes(w, field, s, strlen(s));
}

static void w_uint(struct wb *w, uint64_t field, uint64_t v)
{
	w_tag(w, field, 0);
	w_varint(w, v);
}

static void w_sub(struct wb *w, uint64_t field, const struct wb *sub)
{
	w_bytes(w, field, sub->b, sub->n);
}

static void w_digest(struct wb *w, uint8_t fill, size_t len)
{
	uint8_t d[64];
	memset(d, fill, sizeof(d));
	w_bytes(w, 2, d, len);
}

/* Canonical node bodies. */
static struct wb dir_body(const char *name, uint8_t fill, uint64_t size)
{
	struct wb w = {.n = 0};
	w_str(&w, 1, name);
	w_digest(&w, fill, 32);
	if (size)
		w_uint(&w, 3, size);
	return w;
}

static struct wb file_body(const char *name, uint8_t fill, uint64_t size,
			   bool executable)
{
	struct wb w = dir_body(name, fill, size);
	if (executable)
		w_uint(&w, 4, 1);
	return w;
}

static struct wb symlink_body(const char *name, const char *target)
{
	struct wb w = {.n = 0};
	w_str(&w, 1, name);
	w_str(&w, 2, target);
	return w;
}

/* --- decoding helpers --------------------------------------------------- */

static int decode_copy(const void *p, size_t len, cas_directory **ret,
		       const char **why)
{
	uint8_t *copy = len ? malloc(len) : NULL;
	if (len) {
		REQUIRE(copy);
		memcpy(copy, p, len);
	}
	int r = cas_directory_decode(copy, len, ret, why);
	free(copy);
	return r;
}

/* Each refusal: -EBADMSG, the given reason, *ret untouched. */
#define REFUSED(w, want_why) refused((w)->b, (w)->n, want_why, __LINE__)
static void refused(const void *p, size_t len, const char *want_why, int line)
{
	cas_directory *sentinel = (cas_directory *)&check_count;
	cas_directory *d = sentinel;
	const char *why = NULL;
	int r = decode_copy(p, len, &d, &why);
	check_count++;
	if (r != -EBADMSG || !why || strcmp(why, want_why) || d != sentinel) {
		fprintf(stderr, "line %d: decode gave %d \"%s\", want \"%s\"\n",
			line, r, why ? why : "(null)", want_why);
		check_failures++;
		if (r == 0 && d != sentinel)
			cas_directory_free(d);
	}
	/* Without a place for the reason it is refused the same way. */
	d = sentinel;
	CHECK(decode_copy(p, len, &d, NULL) == -EBADMSG && d == sentinel);
}

/* Decodes canonical bytes; re-encoding must give them back. */
static cas_directory *accepted(const void *p, size_t len)
{
	cas_directory *d = NULL;
	const char *why = NULL;
	int r = decode_copy(p, len, &d, &why);
	if (r < 0)
		fprintf(stderr, "decode refused: %d %s\n", r, why ? why : "");
	REQUIRE(r == 0 && d);
	_cleanup_free_ uint8_t *again = NULL;
	size_t again_len = 99;
	REQUIRE(cas_directory_encode(d, &again, &again_len, &why) == 0);
	CHECK(again_len == len);
	CHECK(len == 0 || !memcmp(again, p, len));
	return d;
}

static bool node_name_is(const cas_node *n, const void *name, size_t len)
{
	return n->name_len == len && (len == 0 || !memcmp(n->name, name, len));
}

static cas_node mk(enum cas_node_type type, const void *name, size_t name_len,
		   uint8_t fill, uint64_t size, bool executable,
		   const char *target)
{
	cas_node n = {.type = type,
		      .name = name,
		      .name_len = name_len,
		      .size = size,
		      .executable = executable};
	memset(n.digest.bytes, fill, CAS_DIGEST_LEN);
	if (target) {
		n.target = (const uint8_t *)target;
		n.target_len = strlen(target);
	}
	return n;
}

static cas_node D(const char *name, uint8_t fill, uint64_t size)
{
	return mk(CAS_NODE_DIRECTORY, name, strlen(name), fill, size, false,
		  NULL);
}

static cas_node F(const char *name, uint8_t fill, uint64_t size, bool x)
{
	return mk(CAS_NODE_FILE, name, strlen(name), fill, size, x, NULL);
}

static cas_node S(const char *name, const char *target)
{
	return mk(CAS_NODE_SYMLINK, name, strlen(name), 0, 0, false, target);
}

/* --- tests ------------------------------------------------------------- */

static void test_empty(void)
{
	static const char *hex = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc11"
				 "2b7cc9a93cae41f3262";
	cas_directory empty = {0};
	uint8_t *buf = (uint8_t *)&empty;
	size_t len = 99;
	CHECK(cas_directory_encode(&empty, &buf, &len, NULL) == 0);
	CHECK(buf == NULL && len == 0);

	cas_digest d, want;
	char out[CAS_DIGEST_HEX_LEN + 1];
	cas_directory_digest(buf, len, &d);
	cas_digest_to_hex(&d, out);
	CHECK_STREQ(out, hex);
	REQUIRE(cas_digest_from_hex(hex, &want) == 0);
	CHECK(cas_digest_eq(&want, &CAS_DIGEST_EMPTY_DIRECTORY));

	/* Zero bytes decode to the empty directory, from NULL or not. */
	cas_directory *dir = NULL;
	CHECK(cas_directory_decode(NULL, 0, &dir, NULL) == 0 && dir);
	if (dir) {
		CHECK(cas_directory_count(dir) == 0);
		uint64_t size = 7;
		CHECK(cas_directory_size(dir, &size) == 0 && size == 0);
		CHECK(cas_directory_find(dir, (const uint8_t *)"a", 1) == NULL);
		CHECK(cas_directory_find(dir, NULL, 0) == NULL);
	}
	cas_directory_free(dir);
	dir = NULL;
	CHECK(cas_directory_decode("x", 0, &dir, NULL) == 0 && dir);
	cas_directory_free(dir);
	cas_directory_free(NULL);
}

/* The exact bytes of a small directory, written out by hand. */
static void test_exact_bytes(void)
{
	cas_node files[] = {F("a", 0x11, 5, true)};
	cas_directory d = {.files = files, .n_files = 1};
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	REQUIRE(cas_directory_encode(&d, &buf, &len, NULL) == 0);
	uint8_t want[2 + 41];
	size_t n = 0;
	want[n++] = 0x12; /* field 2 (files), length-delimited */
	want[n++] = 41;
	want[n++] = 0x0a; /* name */
	want[n++] = 1;
	want[n++] = 'a';
	want[n++] = 0x12; /* digest */
	want[n++] = 32;
	memset(want + n, 0x11, 32);
	n += 32;
	want[n++] = 0x18; /* size */
	want[n++] = 5;
	want[n++] = 0x20; /* executable */
	want[n++] = 1;
	REQUIRE(n == sizeof(want));
	CHECK(len == sizeof(want) && !memcmp(buf, want, len));

	/* Size 0 and executable false are omitted. */
	files[0] = F("a", 0x11, 0, false);
	_cleanup_free_ uint8_t *buf2 = NULL;
	REQUIRE(cas_directory_encode(&d, &buf2, &len, NULL) == 0);
	CHECK(len == 2 + 37 && buf2[1] == 37);
	CHECK(len == 39 && !memcmp(buf2 + 2, want + 2, 37));

	/* A symlink, then a directory of size 300 (two-byte varint). */
	cas_node dirs[] = {D("d", 0x22, 300)};
	cas_node links[] = {S("l", "t")};
	cas_directory e = {.directories = dirs,
			   .n_directories = 1,
			   .symlinks = links,
			   .n_symlinks = 1};
	_cleanup_free_ uint8_t *buf3 = NULL;
	REQUIRE(cas_directory_encode(&e, &buf3, &len, NULL) == 0);
	struct wb w = {.n = 0};
	struct wb sub = dir_body("d", 0x22, 300);
	w_sub(&w, 1, &sub);
	sub = symlink_body("l", "t");
	w_sub(&w, 3, &sub);
	CHECK(len == w.n && !memcmp(buf3, w.b, len));
	CHECK(buf3[0] == 0x0a && buf3[2 + 3 + 34] == 0x18 &&
	      buf3[2 + 3 + 34 + 1] == 0xac && buf3[2 + 3 + 34 + 2] == 0x02);
}

static void test_round_trip(void)
{
	static const uint8_t nl[] = {'a', '\n', 'b'};
	static const uint8_t high[] = {0xff, 0xfe, 0x80};
	static const uint8_t ctl[] = {0x01, 0x7f, '\\', '"'};
	static const uint8_t utf8[] = {0xc3, 0xa9, 't', 0xc3, 0xa9};
	uint8_t longname[300];
	memset(longname, 'L', sizeof(longname));

	/* Sorted bytewise: 0x01 < 'L' < 'a' < 'z' < 0xc3 < 0xff. */
	cas_node dirs[] = {
		mk(CAS_NODE_DIRECTORY, ctl, sizeof(ctl), 0x01, 0, false, NULL),
		mk(CAS_NODE_DIRECTORY, nl, sizeof(nl), 0x02, 1, false, NULL),
		D("z", 0x03, UINT64_MAX / 2 - 10),
	};
	cas_node files[] = {
		mk(CAS_NODE_FILE, longname, sizeof(longname), 0xaa, 1, false,
		   NULL),
		F("a", 0x04, 0, false),
		F("a\t", 0x05, 127, true),
		F("aa", 0x06, 128, false),
		F("big", 0x07, UINT64_MAX, true),
		mk(CAS_NODE_FILE, utf8, sizeof(utf8), 0x08, 1ull << 40, true,
		   NULL),
	};
	cas_node links[] = {
		S("b", "../some/where"),
		S("c", "\xff\x01 target with spaces\n"),
		mk(CAS_NODE_SYMLINK, high, sizeof(high), 0, 0, false, "/"),
	};
	cas_directory d = {dirs,  CAS_ARRAY_SIZE(dirs),
			   files, CAS_ARRAY_SIZE(files),
			   links, CAS_ARRAY_SIZE(links)};
	const char *why = "unset";
	CHECK(cas_directory_check(&d) == NULL);
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	REQUIRE(cas_directory_encode(&d, &buf, &len, &why) == 0);

	cas_directory *got = accepted(buf, len);
	CHECK(got->n_directories == 3 && got->n_files == 6 &&
	      got->n_symlinks == 3);
	const cas_node *lists[3] = {dirs, files, links};
	const cas_node *glists[3] = {got->directories, got->files,
				     got->symlinks};
	size_t counts[3] = {3, 6, 3};
	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++) {
			const cas_node *a = &lists[l][i], *b = &glists[l][i];
			CHECK(a->type == b->type);
			CHECK(node_name_is(b, a->name, a->name_len));
			if (a->type == CAS_NODE_SYMLINK) {
				CHECK(b->target_len == a->target_len &&
				      !memcmp(b->target, a->target,
					      a->target_len));
				continue;
			}
			CHECK(cas_digest_eq(&a->digest, &b->digest));
			CHECK(a->size == b->size);
			CHECK(a->executable == b->executable);
			/* Every entry is found, in its own list. */
			const cas_node *f =
				cas_directory_find(got, a->name, a->name_len);
			CHECK(f == b);
		}
	for (size_t i = 0; i < 3; i++)
		CHECK(cas_directory_find(got, links[i].name,
					 links[i].name_len) ==
		      &got->symlinks[i]);

	uint64_t size;
	CHECK(cas_directory_size(got, &size) == 0);
	CHECK(size == 12 + 0 + 1 + (UINT64_MAX / 2 - 10));

	/* The decoded directory owns its bytes: the input may go away. */
	memset(buf, 0, len);
	CHECK(node_name_is(&got->files[4], "big", 3));
	cas_directory_free(got);

	/* Encoding is deterministic. */
	_cleanup_free_ uint8_t *buf2 = NULL;
	size_t len2;
	REQUIRE(cas_directory_encode(&d, &buf2, &len2, NULL) == 0);
	_cleanup_free_ uint8_t *buf3 = NULL;
	size_t len3;
	REQUIRE(cas_directory_encode(&d, &buf3, &len3, NULL) == 0);
	CHECK(len2 == len3 && !memcmp(buf2, buf3, len2));

	/* A name of 200 KiB: multi-byte lengths on both levels. */
	size_t huge_len = 200 * 1024;
	_cleanup_free_ uint8_t *huge = malloc(huge_len);
	REQUIRE(huge);
	for (size_t i = 0; i < huge_len; i++)
		huge[i] = (uint8_t)(i % 251 + 1) == '/'
				  ? 'x'
				  : (uint8_t)(i % 251 + 1);
	cas_node one = mk(CAS_NODE_SYMLINK, huge, huge_len, 0, 0, false, "t");
	cas_directory hd = {.symlinks = &one, .n_symlinks = 1};
	_cleanup_free_ uint8_t *hbuf = NULL;
	size_t hlen;
	REQUIRE(cas_directory_encode(&hd, &hbuf, &hlen, NULL) == 0);
	cas_directory *hgot = accepted(hbuf, hlen);
	CHECK(hgot->n_symlinks == 1 &&
	      node_name_is(&hgot->symlinks[0], huge, huge_len));
	cas_directory_free(hgot);
}

static void test_truncated(void)
{
	struct wb w = {.n = 0};
	/* A lone byte with the continuation bit: cut inside the tag. */
	w_byte(&w, 0x8a);
	REFUSED(&w, "truncated input");
	/* Tag, then a length cut after its first byte. */
	w.n = 0;
	w_byte(&w, 0x0a);
	w_byte(&w, 0x80);
	REFUSED(&w, "truncated input");
	/* Tag with no length at all. */
	w.n = 1;
	REFUSED(&w, "truncated input");
	/* A length longer than what follows. */
	w.n = 0;
	w_byte(&w, 0x0a);
	w_byte(&w, 5);
	w_raw(&w, "\x0a\x01", 2);
	REFUSED(&w, "truncated input");
	/* A length of 2^63 (ten bytes, the last 1). */
	w.n = 0;
	w_byte(&w, 0x0a);
	w_varint(&w, 1ull << 63);
	REFUSED(&w, "truncated input");

	/* A one-entry directory cut anywhere: truncated, whatever level. */
	struct wb body = file_body("name", 0x33, 1000000, true);
	struct wb full = {.n = 0};
	w_sub(&full, 2, &body);
	cas_directory *d = accepted(full.b, full.n);
	cas_directory_free(d);
	for (size_t cut = 1; cut < full.n; cut++)
		refused(full.b, cut, "truncated input", __LINE__);

	/* Inside a node whose own framing is complete: the node body ends
	 * in the middle of a field. */
	struct wb nb = {.n = 0};
	w_str(&nb, 1, "n");
	w_digest(&nb, 1, 32);
	w_byte(&nb, 0x18); /* size tag, no value */
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "truncated input");
	nb.n -= 1;
	w_byte(&nb, 0x18);
	w_byte(&nb, 0x80); /* size value cut */
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "truncated input");
	nb.n = 0;
	w_str(&nb, 1, "n");
	w_byte(&nb, 0x92); /* digest tag cut inside the node */
	w.n = 0;
	w_sub(&w, 1, &nb);
	REFUSED(&w, "truncated input");
	nb.n = 0;
	w_str(&nb, 1, "n");
	w_byte(&nb, 0x12);
	w_byte(&nb, 32); /* digest says 32, has 3 */
	w_raw(&nb, "abc", 3);
	w.n = 0;
	w_sub(&w, 1, &nb);
	REFUSED(&w, "truncated input");
}

static void test_wire_types(void)
{
	struct wb w = {.n = 0}, nb;
	/* Top level: each list as a varint, a fixed64, a fixed32, groups. */
	const unsigned bad_wt[] = {0, 1, 3, 4, 5, 6, 7};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(bad_wt); i++)
		for (uint64_t f = 1; f <= 3; f++) {
			w.n = 0;
			w_tag(&w, f, bad_wt[i]);
			w_raw(&w, "\x01\x01\x01\x01\x01\x01\x01\x01\x01", 9);
			REFUSED(&w, "bad wire type");
		}
	/* Wire types 6 and 7 do not exist, even on an unknown field. */
	w.n = 0;
	w_tag(&w, 9, 6);
	REFUSED(&w, "bad wire type");
	w.n = 0;
	w_tag(&w, 4, 7);
	REFUSED(&w, "bad wire type");

	/* Inside a node: the name as a varint, the size as bytes. */
	nb = (struct wb){.n = 0};
	w_uint(&nb, 1, 5);
	w_digest(&nb, 1, 32);
	w.n = 0;
	w_sub(&w, 1, &nb);
	REFUSED(&w, "bad wire type");
	nb.n = 0;
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_str(&nb, 3, "x");
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "bad wire type");
	nb.n = 0;
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_tag(&nb, 4, 5);
	w_raw(&nb, "\x01\0\0\0", 4);
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "bad wire type");
	/* A symlink target as a fixed64. */
	nb.n = 0;
	w_str(&nb, 1, "a");
	w_tag(&nb, 2, 1);
	w_raw(&nb, "12345678", 8);
	w.n = 0;
	w_sub(&w, 3, &nb);
	REFUSED(&w, "bad wire type");
}

static void test_unknown_fields(void)
{
	struct wb w = {.n = 0}, nb;
	/* Top level, before and after valid entries, each wire type. */
	w_bytes(&w, 4, "", 0);
	REFUSED(&w, "unknown field");
	w.n = 0;
	w_uint(&w, 5, 0);
	REFUSED(&w, "unknown field");
	w.n = 0;
	nb = file_body("f", 1, 1, false);
	w_sub(&w, 2, &nb);
	w_tag(&w, 15, 1);
	w_raw(&w, "12345678", 8);
	REFUSED(&w, "unknown field");
	w.n = 0;
	w_tag(&w, 16, 5);
	w_raw(&w, "1234", 4);
	REFUSED(&w, "unknown field");
	w.n = 0;
	w_uint(&w, (1u << 29) - 1, 1);
	REFUSED(&w, "unknown field");

	/* Inside each kind of node. */
	nb = dir_body("d", 1, 1);
	w_uint(&nb, 4, 1); /* executable is not a DirectoryNode field */
	w.n = 0;
	w_sub(&w, 1, &nb);
	REFUSED(&w, "unknown field");
	nb = file_body("f", 1, 1, true);
	w_bytes(&nb, 5, "?", 1);
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "unknown field");
	nb = symlink_body("s", "t");
	w_uint(&nb, 3, 7); /* size is not a SymlinkNode field */
	w.n = 0;
	w_sub(&w, 3, &nb);
	REFUSED(&w, "unknown field");
	nb = symlink_body("s", "t");
	w_bytes(&nb, 1000, "", 0);
	w.n = 0;
	w_sub(&w, 3, &nb);
	REFUSED(&w, "unknown field");
}

static void test_varints(void)
{
	struct wb w = {.n = 0}, nb;
	/* 11 bytes: the 10th still has the continuation bit. */
	w_byte(&w, 0x0a);
	for (int i = 0; i < 10; i++)
		w_byte(&w, 0xff);
	w_byte(&w, 0x01);
	REFUSED(&w, "varint overflow");
	/* 10 bytes whose last is 2: more than 64 bits. */
	w.n = 0;
	w_byte(&w, 0x0a);
	for (int i = 0; i < 9; i++)
		w_byte(&w, 0x80);
	w_byte(&w, 0x02);
	REFUSED(&w, "varint overflow");
	/* The same in a tag. */
	w.n = 0;
	for (int i = 0; i < 9; i++)
		w_byte(&w, 0x8a);
	w_byte(&w, 0x7f);
	REFUSED(&w, "varint overflow");
	/* And in a node's size. */
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_byte(&nb, 0x18);
	for (int i = 0; i < 9; i++)
		w_byte(&nb, 0xff);
	w_byte(&nb, 0x03);
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "varint overflow");

	/* The largest size, 2^64 - 1 (ten bytes, last 1), is fine. */
	nb = file_body("a", 1, UINT64_MAX, false);
	CHECK(nb.n == 3 + 34 + 11);
	w.n = 0;
	w_sub(&w, 2, &nb);
	cas_directory *d = accepted(w.b, w.n);
	CHECK(d->files[0].size == UINT64_MAX);
	cas_directory_free(d);
}

static void test_field_numbers(void)
{
	struct wb w = {.n = 0}, nb;
	w_byte(&w, 0x02); /* field 0, length-delimited */
	w_byte(&w, 0);
	REFUSED(&w, "invalid field number");
	w.n = 0;
	w_byte(&w, 0x00);
	w_byte(&w, 0x00);
	REFUSED(&w, "invalid field number");
	/* Above the largest field number, 2^29 - 1. */
	w.n = 0;
	w_tag(&w, 1u << 29, 2);
	w_byte(&w, 0);
	REFUSED(&w, "invalid field number");
	w.n = 0;
	w_tag(&w, 1ull << 60, 2);
	REFUSED(&w, "invalid field number");
	/* Field 0 inside a node. */
	nb = file_body("a", 1, 1, false);
	w_byte(&nb, 0x00);
	w_byte(&nb, 0x00);
	w.n = 0;
	w_sub(&w, 2, &nb);
	REFUSED(&w, "invalid field number");
}

static void one_entry(struct wb *w, uint64_t list, const struct wb *body)
{
	w->n = 0;
	w_sub(w, list, body);
}

static void test_names(void)
{
	struct wb w, nb;
	struct {
		const char *name;
		size_t len;
		const char *why;
	} bad[] = {
		{"", 0, "empty name"},
		{".", 1, "name is \".\""},
		{"..", 2, "name is \"..\""},
		{"/", 1, "name contains '/'"},
		{"a/b", 3, "name contains '/'"},
		{"a/", 2, "name contains '/'"},
		{"\0", 1, "name contains NUL"},
		{"a\0b", 3, "name contains NUL"},
		{"ab\0", 3, "name contains NUL"},
	};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(bad); i++)
		for (uint64_t list = 1; list <= 3; list++) {
			nb = (struct wb){.n = 0};
			w_bytes(&nb, 1, bad[i].name, bad[i].len);
			if (list == 3)
				w_str(&nb, 2, "target");
			else
				w_digest(&nb, 1, 32);
			one_entry(&w, list, &nb);
			refused(w.b, w.n, bad[i].why, __LINE__);
			CHECK(!cas_name_valid((const uint8_t *)bad[i].name,
					      bad[i].len));
		}
	/* No name field at all. */
	nb = (struct wb){.n = 0};
	w_digest(&nb, 1, 32);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "empty name");

	/* Names that look odd but are valid. */
	const char *good[] = {"...",  ".a", "a.", " ",	 "\\",	 "\n",
			      "\xff", "-",  "~",  ". .", ".\xff"};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(good); i++) {
		CHECK(cas_name_valid((const uint8_t *)good[i],
				     strlen(good[i])));
		nb = file_body(good[i], 1, 1, false);
		one_entry(&w, 2, &nb);
		cas_directory_free(accepted(w.b, w.n));
	}
	CHECK(!cas_name_valid(NULL, 0));
}

static void test_order(void)
{
	struct wb w = {.n = 0}, nb;
	/* Unsorted within each list. */
	for (uint64_t list = 1; list <= 3; list++) {
		w.n = 0;
		const char *names[] = {"a", "c", "b"};
		for (int i = 0; i < 3; i++) {
			nb = list == 3 ? symlink_body(names[i], "t")
				       : file_body(names[i], 1, 0, false);
			w_sub(&w, list, &nb);
		}
		REFUSED(&w, "names not sorted");
	}
	/* Bytewise: 'B' (0x42) sorts before 'a' (0x61); 0x80 after 'z'. */
	w.n = 0;
	nb = file_body("a", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("B", 1, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "names not sorted");
	w.n = 0;
	nb = file_body("\x80", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("z", 1, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "names not sorted");
	/* A prefix sorts first. */
	w.n = 0;
	nb = file_body("ab", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("a", 1, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "names not sorted");
	w.n = 0;
	nb = file_body("a", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("ab", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("b", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("\x80", 1, 0, false);
	w_sub(&w, 2, &nb);
	cas_directory_free(accepted(w.b, w.n));

	/* Duplicates within a list. */
	for (uint64_t list = 1; list <= 3; list++) {
		w.n = 0;
		const char *names[] = {"a", "b", "b"};
		for (int i = 0; i < 3; i++) {
			nb = list == 3 ? symlink_body(names[i], "t")
				       : dir_body(names[i], (uint8_t)i, 0);
			w_sub(&w, list, &nb);
		}
		REFUSED(&w, "duplicate name");
	}
	/* Across lists: every pair of lists, between other names. */
	for (uint64_t l1 = 1; l1 <= 3; l1++)
		for (uint64_t l2 = l1 + 1; l2 <= 3; l2++) {
			w.n = 0;
			const char *n1[] = {"a", "m", "z"};
			const char *n2[] = {"b", "m", "y"};
			for (int i = 0; i < 3; i++) {
				nb = l1 == 3 ? symlink_body(n1[i], "t")
					     : dir_body(n1[i], 1, 0);
				w_sub(&w, l1, &nb);
			}
			for (int i = 0; i < 3; i++) {
				nb = l2 == 3 ? symlink_body(n2[i], "t")
					     : dir_body(n2[i], 1, 0);
				w_sub(&w, l2, &nb);
			}
			REFUSED(&w, "duplicate name");
		}
	/* The case the brief names: directory "a" and file "a". */
	w.n = 0;
	nb = dir_body("a", 1, 0);
	w_sub(&w, 1, &nb);
	nb = file_body("a", 2, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "duplicate name");
	/* Interleaved across three lists without a clash is fine. */
	w.n = 0;
	nb = dir_body("b", 1, 0);
	w_sub(&w, 1, &nb);
	nb = dir_body("e", 1, 0);
	w_sub(&w, 1, &nb);
	nb = file_body("a", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = file_body("d", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = symlink_body("c", "t");
	w_sub(&w, 3, &nb);
	nb = symlink_body("f", "t");
	w_sub(&w, 3, &nb);
	cas_directory_free(accepted(w.b, w.n));
}

static void test_digests_and_targets(void)
{
	struct wb w, nb;
	const size_t lens[] = {0, 1, 31, 33, 64};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(lens); i++)
		for (uint64_t list = 1; list <= 2; list++) {
			nb = (struct wb){.n = 0};
			w_str(&nb, 1, "x");
			w_digest(&nb, 1, lens[i]);
			one_entry(&w, list, &nb);
			REFUSED(&w, "digest is not 32 bytes");
		}
	/* Missing digest. */
	for (uint64_t list = 1; list <= 2; list++) {
		nb = (struct wb){.n = 0};
		w_str(&nb, 1, "x");
		w_uint(&nb, 3, 5);
		one_entry(&w, list, &nb);
		REFUSED(&w, "digest is not 32 bytes");
	}

	/* Symlink targets: missing, empty, with NUL. */
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "l");
	one_entry(&w, 3, &nb);
	REFUSED(&w, "empty symlink target");
	w_bytes(&nb, 2, "", 0);
	one_entry(&w, 3, &nb);
	REFUSED(&w, "empty symlink target");
	nb.n = 0;
	w_str(&nb, 1, "l");
	w_bytes(&nb, 2, "a\0b", 3);
	one_entry(&w, 3, &nb);
	REFUSED(&w, "symlink target contains NUL");
	nb.n = 0;
	w_str(&nb, 1, "l");
	w_bytes(&nb, 2, "\0", 1);
	one_entry(&w, 3, &nb);
	REFUSED(&w, "symlink target contains NUL");
	/* A target may hold any other byte, '/' and ".." included. */
	nb = symlink_body("l", "/../\xff\n");
	one_entry(&w, 3, &nb);
	cas_directory_free(accepted(w.b, w.n));
}

static void test_size_overflow(void)
{
	struct wb w = {.n = 0}, nb;
	/* Two children of 2^63: 2 + 2^64. */
	nb = dir_body("a", 1, 1ull << 63);
	w_sub(&w, 1, &nb);
	nb = dir_body("b", 1, 1ull << 63);
	w_sub(&w, 1, &nb);
	REFUSED(&w, "size overflow");
	/* Exactly at the limit: 2 entries + (2^64 - 3) + 1 = 2^64 overflows,
	 * one less fits. */
	w.n = 0;
	nb = dir_body("a", 1, UINT64_MAX - 2);
	w_sub(&w, 1, &nb);
	nb = dir_body("b", 1, 1);
	w_sub(&w, 1, &nb);
	REFUSED(&w, "size overflow");
	w.n = 0;
	nb = dir_body("a", 1, UINT64_MAX - 3);
	w_sub(&w, 1, &nb);
	nb = dir_body("b", 1, 1);
	w_sub(&w, 1, &nb);
	cas_directory *d = accepted(w.b, w.n);
	uint64_t size = 0;
	CHECK(cas_directory_size(d, &size) == 0 && size == UINT64_MAX);
	cas_directory_free(d);
	/* A file's size is its length, not added to the directory's. */
	w.n = 0;
	nb = dir_body("a", 1, UINT64_MAX - 2);
	w_sub(&w, 1, &nb);
	nb = file_body("b", 1, UINT64_MAX, false);
	w_sub(&w, 2, &nb);
	d = accepted(w.b, w.n);
	CHECK(cas_directory_size(d, &size) == 0 && size == UINT64_MAX);
	cas_directory_free(d);
	w.n = 0;
	nb = dir_body("a", 1, UINT64_MAX - 1);
	w_sub(&w, 1, &nb);
	d = accepted(w.b, w.n);
	CHECK(cas_directory_size(d, &size) == 0 && size == UINT64_MAX);
	cas_directory_free(d);
	w.n = 0;
	nb = dir_body("a", 1, UINT64_MAX - 1);
	w_sub(&w, 1, &nb);
	nb = symlink_body("b", "t");
	w_sub(&w, 3, &nb);
	REFUSED(&w, "size overflow");
}

static void test_non_canonical(void)
{
	struct wb w, nb;
	/* Default values written out. */
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_uint(&nb, 3, 0);
	one_entry(&w, 1, &nb);
	REFUSED(&w, "not canonical encoding");
	nb.n = 0;
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_uint(&nb, 3, 0);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	nb = file_body("a", 1, 9, false);
	w_uint(&nb, 4, 0);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	/* true spelled as 2, or as a two-byte 1. */
	nb = file_body("a", 1, 9, false);
	w_uint(&nb, 4, 2);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	nb = file_body("a", 1, 9, false);
	w_byte(&nb, 0x20);
	w_byte(&nb, 0x81);
	w_byte(&nb, 0x00);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");

	/* Fields out of order inside a node. */
	nb = (struct wb){.n = 0};
	w_digest(&nb, 1, 32);
	w_str(&nb, 1, "a");
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	nb.n = 0;
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_uint(&nb, 4, 1);
	w_uint(&nb, 3, 7);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	nb.n = 0;
	w_str(&nb, 2, "target");
	w_str(&nb, 1, "l");
	one_entry(&w, 3, &nb);
	REFUSED(&w, "not canonical encoding");
	/* A field repeated (the last would win in protobuf). */
	nb = file_body("a", 1, 9, false);
	w_str(&nb, 1, "b");
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	nb = file_body("a", 1, 9, false);
	w_uint(&nb, 3, 9);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");

	/* Lists out of field order: a file before a directory, a symlink
	 * before a file. */
	w = (struct wb){.n = 0};
	nb = file_body("b", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = dir_body("a", 1, 0);
	w_sub(&w, 1, &nb);
	REFUSED(&w, "not canonical encoding");
	w.n = 0;
	nb = symlink_body("a", "t");
	w_sub(&w, 3, &nb);
	nb = file_body("b", 1, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	/* Entries of one list split by another. */
	w.n = 0;
	nb = file_body("a", 1, 0, false);
	w_sub(&w, 2, &nb);
	nb = symlink_body("b", "t");
	w_sub(&w, 3, &nb);
	nb = file_body("c", 1, 0, false);
	w_sub(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");

	/* Non-minimal varints: in a tag, a length, a size. */
	nb = file_body("a", 1, 5, false);
	w.n = 0;
	w_byte(&w, 0x92);
	w_byte(&w, 0x00);
	w_varint(&w, nb.n);
	w_raw(&w, nb.b, nb.n);
	REFUSED(&w, "not canonical encoding");
	w.n = 0;
	w_byte(&w, 0x12);
	w_byte(&w, (uint8_t)(0x80 | nb.n));
	w_byte(&w, 0x00);
	w_raw(&w, nb.b, nb.n);
	REFUSED(&w, "not canonical encoding");
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 32);
	w_byte(&nb, 0x18);
	w_byte(&nb, 0x85);
	w_byte(&nb, 0x80);
	w_byte(&nb, 0x00);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
	/* A name length with a redundant byte. */
	nb.n = 0;
	w_byte(&nb, 0x0a);
	w_byte(&nb, 0x81);
	w_byte(&nb, 0x00);
	w_byte(&nb, 'a');
	w_digest(&nb, 1, 32);
	one_entry(&w, 2, &nb);
	REFUSED(&w, "not canonical encoding");
}

static void test_encode_refusals(void)
{
	const char *why;
	uint8_t *buf = (uint8_t *)&why;
	size_t len = 42;
	cas_node nodes[3];
	cas_directory d;

#define ENC_REFUSED(want)                                                      \
	do {                                                                   \
		why = NULL;                                                    \
		CHECK(cas_directory_encode(&d, &buf, &len, &why) == -EBADMSG); \
		CHECK_STREQ(why, want);                                        \
		CHECK(cas_directory_check(&d) != NULL);                        \
		CHECK(buf == (uint8_t *)&why && len == 42);                    \
	} while (0)

	nodes[0] = F("b", 1, 0, false);
	nodes[1] = F("a", 1, 0, false);
	d = (cas_directory){.files = nodes, .n_files = 2};
	ENC_REFUSED("names not sorted");
	nodes[1] = F("b", 1, 0, false);
	ENC_REFUSED("duplicate name");
	nodes[0] = D("a", 1, 0);
	nodes[1] = F("a", 1, 0, false);
	d = (cas_directory){.directories = nodes,
			    .n_directories = 1,
			    .files = nodes + 1,
			    .n_files = 1};
	ENC_REFUSED("duplicate name");
	/* A node of the wrong type in a list. */
	nodes[0] = F("a", 1, 0, false);
	nodes[1] = F("b", 1, 0, false);
	ENC_REFUSED("node in the wrong list");
	nodes[0] = D(".", 1, 0);
	d = (cas_directory){.directories = nodes, .n_directories = 1};
	ENC_REFUSED("name is \".\"");
	nodes[0] = mk(CAS_NODE_DIRECTORY, NULL, 0, 1, 0, false, NULL);
	ENC_REFUSED("empty name");
	nodes[0] = mk(CAS_NODE_DIRECTORY, "a\0", 2, 1, 0, false, NULL);
	ENC_REFUSED("name contains NUL");
	nodes[0] = D("a/b", 1, 0);
	ENC_REFUSED("name contains '/'");
	nodes[0] = S("s", "");
	d = (cas_directory){.symlinks = nodes, .n_symlinks = 1};
	ENC_REFUSED("empty symlink target");
	nodes[0] = mk(CAS_NODE_SYMLINK, "s", 1, 0, 0, false, NULL);
	nodes[0].target = (const uint8_t *)"x\0y";
	nodes[0].target_len = 3;
	ENC_REFUSED("symlink target contains NUL");
	nodes[0] = D("a", 1, UINT64_MAX);
	d = (cas_directory){.directories = nodes, .n_directories = 1};
	ENC_REFUSED("size overflow");
	nodes[0].type = (enum cas_node_type)7;
	ENC_REFUSED("node in the wrong list");
#undef ENC_REFUSED

	/* No place for the reason: still refused. */
	CHECK(cas_directory_encode(&d, &buf, &len, NULL) == -EBADMSG);
}

static void test_sort_and_cmp(void)
{
	const uint8_t *a = (const uint8_t *)"a", *ab = (const uint8_t *)"ab",
		      *b = (const uint8_t *)"b", *hi = (const uint8_t *)"\xff";
	CHECK(cas_name_cmp(a, 1, a, 1) == 0);
	CHECK(cas_name_cmp(a, 1, ab, 2) < 0);
	CHECK(cas_name_cmp(ab, 2, a, 1) > 0);
	CHECK(cas_name_cmp(ab, 2, b, 1) < 0);
	CHECK(cas_name_cmp(hi, 1, a, 1) > 0); /* unsigned bytes */
	CHECK(cas_name_cmp(NULL, 0, a, 1) < 0);
	CHECK(cas_name_cmp(a, 1, NULL, 0) > 0);
	CHECK(cas_name_cmp(NULL, 0, NULL, 0) == 0);

	cas_node files[] = {F("zz", 1, 0, false), F("\xff", 1, 0, false),
			    F("a", 1, 0, false), F("Z", 1, 0, false),
			    F("aa", 1, 0, false)};
	cas_node links[] = {S("m", "t"), S("c", "t")};
	cas_directory d = {.files = files,
			   .n_files = 5,
			   .symlinks = links,
			   .n_symlinks = 2};
	CHECK_STREQ(cas_directory_check(&d), "names not sorted");
	cas_directory_sort(&d);
	CHECK(cas_directory_check(&d) == NULL);
	const char *want[] = {"Z", "a", "aa", "zz", "\xff"};
	for (int i = 0; i < 5; i++)
		CHECK(node_name_is(&files[i], want[i], strlen(want[i])));
	CHECK(node_name_is(&links[0], "c", 1));
	cas_directory empty = {0};
	cas_directory_sort(&empty);
	CHECK(cas_directory_check(&empty) == NULL);
}

static void test_size(void)
{
	cas_node dirs[] = {D("a", 1, 10), D("b", 1, 0), D("c", 1, 100)};
	cas_node files[] = {F("f", 1, 1000, false)};
	cas_directory d = {dirs, 3, files, 1, NULL, 0};
	uint64_t size = 0;
	CHECK(cas_directory_size(&d, &size) == 0 && size == 4 + 110);
	CHECK(cas_directory_count(&d) == 4);
	dirs[1].size = UINT64_MAX - 114;
	CHECK(cas_directory_size(&d, &size) == 0 && size == UINT64_MAX);
	dirs[1].size++;
	size = 5;
	CHECK(cas_directory_size(&d, &size) == -EOVERFLOW && size == 5);
	dirs[0].size = UINT64_MAX;
	dirs[1].size = UINT64_MAX;
	CHECK(cas_directory_size(&d, &size) == -EOVERFLOW);
}

/* 100,000 entries spread over the three lists; every one is found with
 * its own node, no absent name is. */
static void test_find_large(void)
{
	enum { N = 100000 };
	char(*names)[16] = calloc(N, sizeof(*names));
	cas_node *nodes = calloc(N, sizeof(cas_node));
	REQUIRE(names && nodes);
	size_t counts[3] = {0, 0, 0};
	/* Entry i goes to list i % 3 (and i % 7 == 0 to files), so the lists
	 * interleave; names are 7 digits, sorted as numbers are. */
	for (int pass = 0; pass < 3; pass++)
		for (unsigned i = 0; i < N; i++) {
			int l = i % 7 == 0 ? 1 : (int)(i % 3);
			if (l != pass)
				continue;
			snprintf(names[i], sizeof(names[i]), "%07u", i * 2);
			size_t k = counts[0] + counts[1] + counts[2];
			nodes[k] = mk((enum cas_node_type)(l + 1), names[i],
				      strlen(names[i]), (uint8_t)i, i, i & 1,
				      l == 2 ? "target" : NULL);
			counts[l]++;
		}
	cas_directory d = {nodes,
			   counts[0],
			   nodes + counts[0],
			   counts[1],
			   nodes + counts[0] + counts[1],
			   counts[2]};
	CHECK(cas_directory_count(&d) == N);
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	const char *why = NULL;
	REQUIRE(cas_directory_encode(&d, &buf, &len, &why) == 0);
	cas_directory *got = accepted(buf, len);
	CHECK(got->n_directories == counts[0] && got->n_files == counts[1] &&
	      got->n_symlinks == counts[2]);

	size_t found = 0;
	for (unsigned i = 0; i < N; i++) {
		const cas_node *n = cas_directory_find(
			got, (const uint8_t *)names[i], strlen(names[i]));
		int l = i % 7 == 0 ? 1 : (int)(i % 3);
		if (n && node_name_is(n, names[i], strlen(names[i])) &&
		    n->type == (enum cas_node_type)(l + 1) &&
		    (l == 2 ||
		     (n->size == i && n->digest.bytes[0] == (uint8_t)i)))
			found++;
		/* The odd numbers between are absent, and so are prefixes
		 * and extensions of present names. */
		char absent[24];
		snprintf(absent, sizeof(absent), "%07u", i * 2 + 1);
		CHECK(!cas_directory_find(got, (const uint8_t *)absent, 7) ||
		      (fprintf(stderr, "found %s\n", absent), 0));
		if (i % 1000 == 0) {
			CHECK(!cas_directory_find(
				got, (const uint8_t *)names[i], 6));
			snprintf(absent, sizeof(absent), "%sx", names[i]);
			CHECK(!cas_directory_find(got, (const uint8_t *)absent,
						  8));
		}
	}
	CHECK(found == N);
	CHECK(!cas_directory_find(got, (const uint8_t *)"", 0));
	CHECK(!cas_directory_find(got, NULL, 0));
	CHECK(!cas_directory_find(got, (const uint8_t *)"9999999", 7));
	CHECK(!cas_directory_find(got, (const uint8_t *)"\xff", 1));
	CHECK(!cas_directory_find(got, (const uint8_t *)"\x01", 1));

	uint64_t size;
	CHECK(cas_directory_size(got, &size) == 0);
	uint64_t want = N;
	for (size_t i = 0; i < got->n_directories; i++)
		want += got->directories[i].size;
	CHECK(size == want);
	cas_directory_free(got);
	free(nodes);
	free(names);
}

/* --- Node -------------------------------------------------------------- */

static void node_refused(const struct wb *w, const char *want_why, int line)
{
	uint8_t *copy = malloc(w->n ? w->n : 1);
	REQUIRE(copy);
	memcpy(copy, w->b, w->n);
	cas_node n;
	memset(&n, 0x77, sizeof(n));
	const char *why = NULL;
	int r = cas_node_decode(copy, w->n, &n, &why);
	check_count++;
	if (r != -EBADMSG || !why || strcmp(why, want_why) ||
	    n.name_len != 0x7777777777777777ull) {
		fprintf(stderr,
			"line %d: node decode gave %d \"%s\", want \"%s\"\n",
			line, r, why ? why : "(null)", want_why);
		check_failures++;
	}
	CHECK(cas_node_decode(copy, w->n, &n, NULL) == -EBADMSG);
	free(copy);
}
#define NODE_REFUSED(w, want) node_refused(w, want, __LINE__)

static void test_node(void)
{
	cas_node in[] = {
		D("dir", 0x10, 77),
		F("file", 0x20, 0, false),
		F("exe", 0x30, 1ull << 50, true),
		S("link", "../x"),
		/* A root node need not carry a name. */
		mk(CAS_NODE_DIRECTORY, NULL, 0, 0x40, 3, false, NULL),
		mk(CAS_NODE_FILE, NULL, 0, 0x50, 0, true, NULL),
		mk(CAS_NODE_SYMLINK, NULL, 0, 0, 0, false, "/t"),
		mk(CAS_NODE_FILE, "\xff\n", 2, 0x60, 1, false, NULL),
	};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(in); i++) {
		_cleanup_free_ uint8_t *buf = NULL;
		size_t len;
		const char *why = NULL;
		REQUIRE(cas_node_encode(&in[i], &buf, &len, &why) == 0);
		/* Independently written: the oneof field, then the body. */
		struct wb body = {.n = 0}, w = {.n = 0};
		if (in[i].name_len)
			w_bytes(&body, 1, in[i].name, in[i].name_len);
		if (in[i].type == CAS_NODE_SYMLINK) {
			w_bytes(&body, 2, in[i].target, in[i].target_len);
		} else {
			w_bytes(&body, 2, in[i].digest.bytes, 32);
			if (in[i].size)
				w_uint(&body, 3, in[i].size);
			if (in[i].executable)
				w_uint(&body, 4, 1);
		}
		w_sub(&w, in[i].type, &body);
		CHECK(len == w.n && !memcmp(buf, w.b, len));

		cas_node out;
		CHECK(cas_node_decode(buf, len, &out, &why) == 0);
		CHECK(out.type == in[i].type);
		CHECK(node_name_is(&out, in[i].name, in[i].name_len));
		if (in[i].type == CAS_NODE_SYMLINK) {
			CHECK(out.target_len == in[i].target_len &&
			      !memcmp(out.target, in[i].target,
				      out.target_len));
		} else {
			CHECK(cas_digest_eq(&out.digest, &in[i].digest));
			CHECK(out.size == in[i].size);
			CHECK(out.executable == in[i].executable);
		}
		/* Decoded names point into the input. */
		if (out.name_len)
			CHECK(out.name >= buf && out.name < buf + len);
	}

	struct wb w = {.n = 0}, nb;
	NODE_REFUSED(&w, "empty node");
	nb = file_body("a", 1, 1, false);
	w_sub(&w, 2, &nb);
	w_sub(&w, 2, &nb);
	NODE_REFUSED(&w, "more than one node");
	w.n = 0;
	w_sub(&w, 4, &nb);
	NODE_REFUSED(&w, "unknown field");
	w.n = 0;
	w_sub(&w, 0, &nb);
	NODE_REFUSED(&w, "invalid field number");
	w.n = 0;
	w_uint(&w, 2, 1);
	NODE_REFUSED(&w, "bad wire type");
	w.n = 0;
	w_sub(&w, 2, &nb);
	for (size_t cut = 1; cut < w.n; cut += 5) {
		struct wb t = w;
		t.n = cut;
		NODE_REFUSED(&t, "truncated input");
	}
	nb = file_body(".", 1, 1, false);
	one_entry(&w, 2, &nb);
	NODE_REFUSED(&w, "name is \".\"");
	nb = file_body("a/b", 1, 1, false);
	one_entry(&w, 2, &nb);
	NODE_REFUSED(&w, "name contains '/'");
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "a");
	w_digest(&nb, 1, 31);
	one_entry(&w, 1, &nb);
	NODE_REFUSED(&w, "digest is not 32 bytes");
	nb = symlink_body("a", "x");
	nb.n -= 3; /* drop the target field */
	one_entry(&w, 3, &nb);
	NODE_REFUSED(&w, "empty symlink target");
	nb = (struct wb){.n = 0};
	w_str(&nb, 1, "a");
	w_bytes(&nb, 2, "\0", 1);
	one_entry(&w, 3, &nb);
	NODE_REFUSED(&w, "symlink target contains NUL");
	/* An empty name written out, a zero size written out. */
	nb = (struct wb){.n = 0};
	w_bytes(&nb, 1, "", 0);
	w_digest(&nb, 1, 32);
	one_entry(&w, 2, &nb);
	NODE_REFUSED(&w, "not canonical encoding");
	nb = file_body("a", 1, 0, false);
	w_uint(&nb, 3, 0);
	one_entry(&w, 2, &nb);
	NODE_REFUSED(&w, "not canonical encoding");
	nb = file_body("a", 1, 0, false);
	w.n = 0;
	w_byte(&w, 0x12);
	w_byte(&w, (uint8_t)(0x80 | nb.n));
	w_byte(&w, 0);
	w_raw(&w, nb.b, nb.n);
	NODE_REFUSED(&w, "not canonical encoding");

	/* Encode refusals. */
	const char *why = NULL;
	uint8_t *buf = NULL;
	size_t len;
	cas_node bad = S("s", "");
	CHECK(cas_node_encode(&bad, &buf, &len, &why) == -EBADMSG);
	CHECK_STREQ(why, "empty symlink target");
	bad = F("..", 1, 0, false);
	CHECK(cas_node_encode(&bad, &buf, &len, &why) == -EBADMSG);
	CHECK_STREQ(why, "name is \"..\"");
	bad = F("a", 1, 0, false);
	bad.type = (enum cas_node_type)0;
	CHECK(cas_node_encode(&bad, &buf, &len, &why) == -EBADMSG);
	CHECK_STREQ(why, "unknown node type");
	CHECK(buf == NULL);
}

static void test_node_dup(void)
{
	char name[] = "name\xff";
	char target[] = "../target";
	cas_node s = mk(CAS_NODE_SYMLINK, name, 5, 0, 0, false, target);
	cas_node *c = cas_node_dup(&s);
	REQUIRE(c);
	memset(name, 'x', sizeof(name) - 1);
	memset(target, 'y', sizeof(target) - 1);
	CHECK(c->type == CAS_NODE_SYMLINK);
	CHECK(node_name_is(c, "name\xff", 5) && c->name[5] == 0);
	CHECK(c->target_len == 9 && !memcmp(c->target, "../target", 10));
	free(c);

	cas_node f = F("file", 0x42, 1234, true);
	/* Target fields of a non-symlink are not looked at. */
	f.target = (const uint8_t *)0x1;
	f.target_len = 1u << 30;
	c = cas_node_dup(&f);
	REQUIRE(c);
	CHECK(c->type == CAS_NODE_FILE && node_name_is(c, "file", 4));
	CHECK(c->size == 1234 && c->executable && c->digest.bytes[31] == 0x42);
	CHECK(c->target == NULL && c->target_len == 0);
	CHECK(c->name != f.name);
	free(c);

	cas_node anon = mk(CAS_NODE_DIRECTORY, NULL, 0, 1, 5, false, NULL);
	c = cas_node_dup(&anon);
	REQUIRE(c);
	CHECK(c->name_len == 0 && c->name && c->name[0] == 0);
	free(c);
}

int main(void)
{
	test_empty();
	test_exact_bytes();
	test_round_trip();
	test_truncated();
	test_wire_types();
	test_unknown_fields();
	test_varints();
	test_field_numbers();
	test_names();
	test_order();
	test_digests_and_targets();
	test_size_overflow();
	test_non_canonical();
	test_encode_refusals();
	test_sort_and_cmp();
	test_size();
	test_find_large();
	test_node();
	test_node_dup();
	return check_exit("test_directory");
}
