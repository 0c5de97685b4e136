/* Fuzz target: the Directory and Node decoders (untrusted bytes from
 * `dir put`, remote stores and the local store itself).
 *
 * Beyond "no crash, no sanitizer report", it checks the codec's own
 * invariants on whatever it accepts: re-encoding gives back exactly the
 * input (so accepted means canonical), the decoded directory passes its
 * own check, its size is computable, and every entry is found by name as
 * itself. A refusal must be -EBADMSG with a reason (or -ENOMEM). These
 * aborts test our code, not the peer: any input that trips one is a bug. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/digest.h"
#include "core/directory.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                \
	do {                                                           \
		if (!(cond)) {                                         \
			fprintf(stderr, "fuzz-directory: %s:%d: %s\n", \
				__FILE__, __LINE__, #cond);            \
			abort();                                       \
		}                                                      \
	} while (0)

static void check_refusal(int r, const char *why)
{
	INVARIANT(r == -EBADMSG || r == -ENOMEM);
	INVARIANT(r != -EBADMSG || (why && *why));
}

static void fuzz_directory(const uint8_t *data, size_t size)
{
	cas_directory *d = NULL;
	const char *why = NULL;
	int r = cas_directory_decode(data, size, &d, &why);
	if (r < 0) {
		check_refusal(r, why);
		INVARIANT(d == NULL);
		return;
	}
	INVARIANT(d);
	INVARIANT(cas_directory_check(d) == NULL);

	uint8_t *again = NULL;
	size_t again_len = 0;
	r = cas_directory_encode(d, &again, &again_len, &why);
	INVARIANT(r == 0 || r == -ENOMEM);
	if (r == 0) {
		INVARIANT(again_len == size);
		INVARIANT(size == 0 || memcmp(again, data, size) == 0);
		free(again);
	}

	uint64_t dsize;
	INVARIANT(cas_directory_size(d, &dsize) == 0);
	INVARIANT(dsize >= cas_directory_count(d));

	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++) {
			const cas_node *n = &lists[l][i];
			INVARIANT(n->type == (enum cas_node_type)(l + 1));
			INVARIANT(cas_name_valid(n->name, n->name_len));
			INVARIANT(cas_directory_find(d, n->name, n->name_len) ==
				  n);
			/* The name with one more byte is another name. */
			if (n->name_len < 255) {
				uint8_t longer[256];
				memcpy(longer, n->name, n->name_len);
				longer[n->name_len] = 0;
				INVARIANT(!cas_directory_find(d, longer,
							      n->name_len + 1));
			}
		}

	cas_digest digest;
	cas_directory_digest(data, size, &digest);
	if (size == 0)
		INVARIANT(cas_digest_eq(&digest, &CAS_DIGEST_EMPTY_DIRECTORY));
	cas_directory_free(d);
}

static void fuzz_node(const uint8_t *data, size_t size)
{
	cas_node n;
	const char *why = NULL;
	int r = cas_node_decode(data, size, &n, &why);
	if (r < 0) {
		check_refusal(r, why);
		return;
	}
	INVARIANT(cas_node_check(&n, true) == NULL);
	uint8_t *again = NULL;
	size_t again_len = 0;
	r = cas_node_encode(&n, &again, &again_len, &why);
	INVARIANT(r == 0 || r == -ENOMEM);
	if (r == 0) {
		INVARIANT(again_len == size && memcmp(again, data, size) == 0);
		free(again);
	}
	cas_node *copy = cas_node_dup(&n);
	if (copy) {
		INVARIANT(copy->type == n.type && copy->name_len == n.name_len);
		INVARIANT(cas_name_cmp(copy->name, copy->name_len, n.name,
				       n.name_len) == 0);
		INVARIANT(copy->target_len == n.target_len);
		free(copy);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_directory(data, size);
	fuzz_node(data, size);
	return 0;
}
