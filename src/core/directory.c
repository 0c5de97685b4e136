/* The castore v1 codec. Decoding is strict in two steps: a structural
 * parse that names the first thing wrong (truncation, wire type, unknown
 * field, varint overflow, digest length, names, order, size), then a
 * re-encode compared byte for byte, which refuses whatever is left that is
 * not canonical (default values present, fields repeated or out of order,
 * varints longer than needed). So what is accepted is exactly what we
 * would have written. */
#include "core/directory.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "core/varint.h"

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

int cas_name_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	/* memcmp with a NULL pointer is undefined even for 0 bytes, and an
	 * empty name may well be (NULL, 0). */
	size_t common = CAS_MIN(alen, blen);
	int c = common ? memcmp(a, b, common) : 0;
	if (c)
		return c;
	return alen < blen ? -1 : alen > blen;
}

/* Why a name is not valid (NULL if it is): one reason per rule, so that a
 * refusal says which rule was broken. */
static const char *name_why(const uint8_t *name, size_t len)
{
	if (len == 0)
		return "empty name";
	if (len == 1 && name[0] == '.')
		return "name is \".\"";
	if (len == 2 && name[0] == '.' && name[1] == '.')
		return "name is \"..\"";
	if (memchr(name, '/', len))
		return "name contains '/'";
	if (memchr(name, 0, len))
		return "name contains NUL";
	return NULL;
}

const char *cas_node_check(const cas_node *n, bool allow_empty_name)
{
	if (!(allow_empty_name && n->name_len == 0)) {
		const char *why = name_why(n->name, n->name_len);
		if (why)
			return why;
	}
	switch (n->type) {
	case CAS_NODE_DIRECTORY:
	case CAS_NODE_FILE:
		return NULL;
	case CAS_NODE_SYMLINK:
		if (n->target_len == 0)
			return "empty symlink target";
		if (memchr(n->target, 0, n->target_len))
			return "symlink target contains NUL";
		return NULL;
	}
	return "unknown node type";
}

bool cas_name_valid(const uint8_t *name, size_t len)
{
	return name_why(name, len) == NULL;
}

/* --- bounds-checked cursor over untrusted bytes ------------------------ */

struct cursor {
	const uint8_t *p, *end;
};

static int cur_varint(struct cursor *c, uint64_t *ret, const char **why)
{
	int r = cas_varint_get(&c->p, c->end, ret);
	if (r < 0) {
		*why = r == -EOVERFLOW ? "varint overflow" : "truncated input";
		return -EBADMSG;
	}
	return 0;
}

static int cur_tag(struct cursor *c, uint32_t *ret_field, unsigned *ret_wt,
		   const char **why)
{
	uint64_t tag;
	int r = cur_varint(c, &tag, why);
	if (r < 0)
		return r;
	if ((tag >> 3) == 0 || (tag >> 3) > 0x1fffffff) {
		*why = "invalid field number";
		return -EBADMSG;
	}
	*ret_field = (uint32_t)(tag >> 3);
	*ret_wt = (unsigned)(tag & 7);
	return 0;
}

static int cur_bytes(struct cursor *c, const uint8_t **ret, size_t *ret_len,
		     const char **why)
{
	uint64_t len;
	int r = cur_varint(c, &len, why);
	if (r < 0)
		return r;
	if (len > (uint64_t)(c->end - c->p)) {
		*why = "truncated input";
		return -EBADMSG;
	}
	*ret = c->p;
	*ret_len = (size_t)len;
	c->p += len;
	return 0;
}

/* Wire type expected for field `f` of a node message of `type`, or -1 for
 * a field the message does not have. */
static int node_field_wt(enum cas_node_type type, uint32_t f)
{
	switch (f) {
	case 1:
		return WT_LEN;
	case 2:
		return WT_LEN;
	case 3:
		return type == CAS_NODE_SYMLINK ? -1 : WT_VARINT;
	case 4:
		return type == CAS_NODE_FILE ? WT_VARINT : -1;
	}
	return -1;
}

static int field_check(int want_wt, unsigned wt, const char **why)
{
	if (want_wt < 0) {
		/* Wire types 6 and 7 do not exist: say so before "unknown". */
		*why = wt == 6 || wt == 7 ? "bad wire type" : "unknown field";
		return -EBADMSG;
	}
	if ((unsigned)want_wt != wt) {
		*why = "bad wire type";
		return -EBADMSG;
	}
	return 0;
}

static int parse_node(const uint8_t *buf, size_t len, enum cas_node_type type,
		      cas_node *n, const char **why)
{
	struct cursor c = {buf, buf + len};
	const uint8_t *digest = NULL;
	size_t digest_len = 0;

	memset(n, 0, sizeof(*n));
	n->type = type;
	while (c.p < c.end) {
		uint32_t f;
		unsigned wt;
		int r = cur_tag(&c, &f, &wt, why);
		if (r < 0)
			return r;
		r = field_check(node_field_wt(type, f), wt, why);
		if (r < 0)
			return r;
		uint64_t v;
		switch (f) {
		case 1:
			r = cur_bytes(&c, &n->name, &n->name_len, why);
			break;
		case 2:
			if (type == CAS_NODE_SYMLINK)
				r = cur_bytes(&c, &n->target, &n->target_len,
					      why);
			else
				r = cur_bytes(&c, &digest, &digest_len, why);
			break;
		case 3:
			r = cur_varint(&c, &n->size, why);
			break;
		case 4:
			r = cur_varint(&c, &v, why);
			if (r == 0)
				n->executable = v != 0;
			break;
		}
		if (r < 0)
			return r;
	}
	if (type != CAS_NODE_SYMLINK) {
		if (digest_len != CAS_DIGEST_LEN) {
			*why = "digest is not 32 bytes";
			return -EBADMSG;
		}
		memcpy(n->digest.bytes, digest, CAS_DIGEST_LEN);
	}
	return 0;
}

/* --- encoding ---------------------------------------------------------- */

static uint8_t *put_bytes(uint8_t *p, uint32_t field, const void *b, size_t len)
{
	p = cas_varint_put(p, (uint64_t)field << 3 | WT_LEN);
	p = cas_varint_put(p, len);
	memcpy(p, b, len);
	return p + len;
}

static size_t bytes_field_len(size_t len)
{
	return 1 + cas_varint_len(len) + len;
}

/* Length of the node message body (without its own tag and length). */
static size_t node_body_len(const cas_node *n)
{
	size_t len = n->name_len ? bytes_field_len(n->name_len) : 0;
	if (n->type == CAS_NODE_SYMLINK)
		return len +
		       (n->target_len ? bytes_field_len(n->target_len) : 0);
	len += bytes_field_len(CAS_DIGEST_LEN);
	if (n->size)
		len += 1 + cas_varint_len(n->size);
	if (n->type == CAS_NODE_FILE && n->executable)
		len += 2;
	return len;
}

static uint8_t *put_node_body(uint8_t *p, const cas_node *n)
{
	if (n->name_len)
		p = put_bytes(p, 1, n->name, n->name_len);
	if (n->type == CAS_NODE_SYMLINK) {
		if (n->target_len)
			p = put_bytes(p, 2, n->target, n->target_len);
		return p;
	}
	p = put_bytes(p, 2, n->digest.bytes, CAS_DIGEST_LEN);
	if (n->size) {
		p = cas_varint_put(p, 3 << 3 | WT_VARINT);
		p = cas_varint_put(p, n->size);
	}
	if (n->type == CAS_NODE_FILE && n->executable) {
		*p++ = 4 << 3 | WT_VARINT;
		*p++ = 1;
	}
	return p;
}

static size_t directory_encoded_len(const cas_directory *d)
{
	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	size_t len = 0;
	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++)
			len += bytes_field_len(node_body_len(&lists[l][i]));
	return len;
}

static uint8_t *put_directory(uint8_t *p, const cas_directory *d)
{
	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++) {
			const cas_node *n = &lists[l][i];
			p = cas_varint_put(p, (uint64_t)(l + 1) << 3 | WT_LEN);
			p = cas_varint_put(p, node_body_len(n));
			p = put_node_body(p, n);
		}
	return p;
}

/* --- validation -------------------------------------------------------- */

static int node_cmp(const void *a, const void *b)
{
	const cas_node *x = a, *y = b;
	return cas_name_cmp(x->name, x->name_len, y->name, y->name_len);
}

/* An empty list may be (NULL, 0), and qsort's pointer must not be NULL. */
static void sort_list(cas_node *list, size_t count)
{
	if (count > 1)
		qsort(list, count, sizeof(cas_node), node_cmp);
}

void cas_directory_sort(cas_directory *d)
{
	sort_list(d->directories, d->n_directories);
	sort_list(d->files, d->n_files);
	sort_list(d->symlinks, d->n_symlinks);
}

int cas_directory_size(const cas_directory *d, uint64_t *ret_size)
{
	uint64_t size = (uint64_t)cas_directory_count(d);
	for (size_t i = 0; i < d->n_directories; i++)
		if (__builtin_add_overflow(size, d->directories[i].size, &size))
			return -EOVERFLOW;
	*ret_size = size;
	return 0;
}

int cas_directory_raw_size(const void *buf, size_t len, uint64_t *ret_size,
			   const char **ret_why)
{
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	int r = cas_directory_decode(buf, len, &d, ret_why);
	if (r < 0)
		return r;
	return cas_directory_size(d, ret_size);
}

const char *cas_directory_check(const cas_directory *d)
{
	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	const enum cas_node_type types[3] = {CAS_NODE_DIRECTORY, CAS_NODE_FILE,
					     CAS_NODE_SYMLINK};

	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++) {
			const cas_node *n = &lists[l][i];
			if (n->type != types[l])
				return "node in the wrong list";
			const char *why = cas_node_check(n, false);
			if (why)
				return why;
			if (i > 0) {
				int c = node_cmp(&lists[l][i - 1], n);
				if (c == 0)
					return "duplicate name";
				if (c > 0)
					return "names not sorted";
			}
		}

	/* Unique across the lists: merge the three sorted lists. */
	size_t pos[3] = {0, 0, 0};
	const cas_node *prev = NULL;
	for (;;) {
		int best = -1;
		for (int l = 0; l < 3; l++)
			if (pos[l] < counts[l] &&
			    (best < 0 || node_cmp(&lists[l][pos[l]],
						  &lists[best][pos[best]]) < 0))
				best = l;
		if (best < 0)
			break;
		const cas_node *n = &lists[best][pos[best]++];
		if (prev && node_cmp(prev, n) == 0)
			return "duplicate name";
		prev = n;
	}

	uint64_t size;
	if (cas_directory_size(d, &size) < 0)
		return "size overflow";
	return NULL;
}

int cas_directory_encode(const cas_directory *d, uint8_t **ret_buf,
			 size_t *ret_len, const char **ret_why)
{
	const char *why = cas_directory_check(d);
	if (why) {
		if (ret_why)
			*ret_why = why;
		return -EBADMSG;
	}
	size_t len = directory_encoded_len(d);
	uint8_t *buf = NULL;
	if (len) {
		buf = malloc(len);
		if (!buf)
			return -ENOMEM;
		put_directory(buf, d);
	}
	*ret_buf = buf;
	*ret_len = len;
	return 0;
}

/* --- decoding ---------------------------------------------------------- */

/* Stands in for a NULL buffer of length 0: arithmetic on NULL is undefined
 * even with offset 0. */
static const uint8_t no_bytes[1];

int cas_directory_decode(const void *buf, size_t len, cas_directory **ret,
			 const char **ret_why)
{
	const char *why_local, **why = ret_why ? ret_why : &why_local;
	if (len == 0)
		buf = no_bytes;
	size_t counts[3] = {0, 0, 0};
	struct cursor c = {buf, (const uint8_t *)buf + len};
	int r;

	/* Pass 1: framing, field numbers and wire types; count entries. */
	while (c.p < c.end) {
		uint32_t f;
		unsigned wt;
		const uint8_t *sub;
		size_t sublen;
		if ((r = cur_tag(&c, &f, &wt, why)) < 0)
			return r;
		if ((r = field_check(f >= 1 && f <= 3 ? WT_LEN : -1, wt, why)) <
		    0)
			return r;
		if ((r = cur_bytes(&c, &sub, &sublen, why)) < 0)
			return r;
		counts[f - 1]++;
	}

	/* One block: the struct, the nodes, and a copy of the bytes the
	 * names point into. */
	size_t n = counts[0] + counts[1] + counts[2];
	size_t head = sizeof(cas_directory) + n * sizeof(cas_node);
	cas_directory *d = malloc(head + len + 1);
	if (!d)
		return -ENOMEM;
	uint8_t *copy = (uint8_t *)d + head;
	if (len)
		memcpy(copy, buf, len);
	cas_node *nodes = (cas_node *)(d + 1);
	d->directories = nodes;
	d->n_directories = 0;
	d->files = nodes + counts[0];
	d->n_files = 0;
	d->symlinks = nodes + counts[0] + counts[1];
	d->n_symlinks = 0;

	/* Pass 2: the nodes. Entries of a list that come after another list
	 * started are out of field order; the re-encode refuses them, but
	 * they must still land in their own list here. */
	c = (struct cursor){copy, copy + len};
	while (c.p < c.end) {
		uint32_t f = 0;
		unsigned wt = 0;
		const uint8_t *sub = NULL;
		size_t sublen = 0;
		/* Cannot fail: pass 1 walked these same bytes. */
		cur_tag(&c, &f, &wt, why);
		cur_bytes(&c, &sub, &sublen, why);
		cas_node *node;
		if (f == 1)
			node = &d->directories[d->n_directories++];
		else if (f == 2)
			node = &d->files[d->n_files++];
		else
			node = &d->symlinks[d->n_symlinks++];
		r = parse_node(sub, sublen, (enum cas_node_type)f, node, why);
		if (r < 0)
			goto fail;
	}

	const char *bad = cas_directory_check(d);
	if (bad) {
		*why = bad;
		r = -EBADMSG;
		goto fail;
	}

	/* Canonical: re-encoding gives back exactly the input. */
	if (directory_encoded_len(d) != len) {
		*why = "not canonical encoding";
		r = -EBADMSG;
		goto fail;
	}
	if (len) {
		_cleanup_free_ uint8_t *again = malloc(len);
		if (!again) {
			r = -ENOMEM;
			goto fail;
		}
		put_directory(again, d);
		if (memcmp(again, copy, len) != 0) {
			*why = "not canonical encoding";
			r = -EBADMSG;
			goto fail;
		}
	}
	*ret = d;
	return 0;
fail:
	free(d);
	return r;
}

void cas_directory_free(cas_directory *d)
{
	free(d);
}

static const cas_node *find_in(const cas_node *list, size_t count,
			       const uint8_t *name, size_t len)
{
	size_t lo = 0, hi = count;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = cas_name_cmp(list[mid].name, list[mid].name_len, name,
				     len);
		if (c == 0)
			return &list[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

const cas_node *cas_directory_find(const cas_directory *d, const uint8_t *name,
				   size_t len)
{
	const cas_node *n =
		find_in(d->directories, d->n_directories, name, len);
	if (!n)
		n = find_in(d->files, d->n_files, name, len);
	if (!n)
		n = find_in(d->symlinks, d->n_symlinks, name, len);
	return n;
}

/* --- Node -------------------------------------------------------------- */

int cas_node_encode(const cas_node *node, uint8_t **ret_buf, size_t *ret_len,
		    const char **ret_why)
{
	const char *why = cas_node_check(node, true);
	if (why) {
		if (ret_why)
			*ret_why = why;
		return -EBADMSG;
	}
	size_t body = node_body_len(node);
	size_t len = bytes_field_len(body);
	uint8_t *buf = malloc(len), *p = buf;
	if (!buf)
		return -ENOMEM;
	p = cas_varint_put(p, (uint64_t)node->type << 3 | WT_LEN);
	p = cas_varint_put(p, body);
	put_node_body(p, node);
	*ret_buf = buf;
	*ret_len = len;
	return 0;
}

int cas_node_decode(const void *buf, size_t len, cas_node *ret_node,
		    const char **ret_why)
{
	const char *why_local, **why = ret_why ? ret_why : &why_local;
	/* Before the cursor: NULL + 0 is undefined. */
	if (len == 0) {
		*why = "empty node";
		return -EBADMSG;
	}
	struct cursor c = {buf, (const uint8_t *)buf + len};
	uint32_t f;
	unsigned wt;
	const uint8_t *sub;
	size_t sublen;
	int r;

	if ((r = cur_tag(&c, &f, &wt, why)) < 0)
		return r;
	if ((r = field_check(f >= 1 && f <= 3 ? WT_LEN : -1, wt, why)) < 0)
		return r;
	if ((r = cur_bytes(&c, &sub, &sublen, why)) < 0)
		return r;
	if (c.p != c.end) {
		*why = "more than one node";
		return -EBADMSG;
	}
	cas_node n;
	if ((r = parse_node(sub, sublen, (enum cas_node_type)f, &n, why)) < 0)
		return r;
	const char *bad = cas_node_check(&n, true);
	if (bad) {
		*why = bad;
		return -EBADMSG;
	}
	if (bytes_field_len(node_body_len(&n)) != len) {
		*why = "not canonical encoding";
		return -EBADMSG;
	}
	_cleanup_free_ uint8_t *again = malloc(len);
	if (!again)
		return -ENOMEM;
	uint8_t *p = cas_varint_put(again, (uint64_t)f << 3 | WT_LEN);
	p = cas_varint_put(p, node_body_len(&n));
	put_node_body(p, &n);
	if (memcmp(again, buf, len) != 0) {
		*why = "not canonical encoding";
		return -EBADMSG;
	}
	*ret_node = n;
	return 0;
}

cas_node *cas_node_dup(const cas_node *node)
{
	/* Only a symlink has a target; another node's target fields may be
	 * left uninitialised by its builder. */
	size_t target_len =
		node->type == CAS_NODE_SYMLINK ? node->target_len : 0;
	cas_node *n = malloc(sizeof(*n) + node->name_len + target_len + 2);
	if (!n)
		return NULL;
	*n = *node;
	uint8_t *p = (uint8_t *)(n + 1);
	if (node->name_len)
		memcpy(p, node->name, node->name_len);
	p[node->name_len] = 0;
	n->name = p;
	p += node->name_len + 1;
	if (target_len)
		memcpy(p, node->target, target_len);
	p[target_len] = 0;
	n->target = node->type == CAS_NODE_SYMLINK ? p : NULL;
	n->target_len = target_len;
	return n;
}
