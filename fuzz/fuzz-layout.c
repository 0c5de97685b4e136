/* Fuzz target: the files of a published HTTP layout that a reader parses
 * (docs/remote.md), untrusted bytes from any web server: the roots file
 * and a tree file (split into Directories, each then decoded as the cache
 * does).
 *
 * Beyond "no crash, no sanitizer report": every root the parser hands out
 * has a valid name and a Node that encodes; the tree file splitter hands
 * out only slices of its input, in order, and refuses with -EBADMSG. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/directory.h"
#include "remote/remote_i.h"
#include "store/store.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                       \
	do {                                                                  \
		if (!(cond)) {                                                \
			fprintf(stderr, "fuzz-layout: %s:%d: %s\n", __FILE__, \
				__LINE__, #cond);                             \
			abort();                                              \
		}                                                             \
	} while (0)

static int root_cb(void *userdata, const char *name, const cas_node *node)
{
	(void)userdata;
	INVARIANT(cas_root_name_valid(name));
	uint8_t *buf = NULL;
	size_t len = 0;
	cas_node n = *node;
	n.name = NULL;
	n.name_len = 0;
	int r = cas_node_encode(&n, &buf, &len, NULL);
	INVARIANT(r == 0 || r == -ENOMEM);
	free(buf);
	return 0;
}

struct split {
	const uint8_t *data, *next;
	size_t size;
};

static int dir_cb(void *userdata, const cas_digest *want, const uint8_t *buf,
		  size_t len)
{
	struct split *s = userdata;
	INVARIANT(!want);
	INVARIANT(buf >= s->next && buf + len <= s->data + s->size);
	s->next = buf + len;
	cas_directory *d = NULL;
	if (cas_directory_decode(buf, len, &d, NULL) == 0)
		cas_directory_free(d);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int r = cas_roots_file_parse((const char *)data, size, root_cb, NULL);
	INVARIANT(r == 0 || r == -EBADMSG || r == -ENOMEM);
	struct split s = {data, data, size};
	r = cas_tree_file_split(data, size, dir_cb, &s);
	INVARIANT(r == 0 || r == -EBADMSG);
	return 0;
}
