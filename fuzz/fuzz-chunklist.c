/* Fuzz target: the chunk-list decoder of core/chunker (lists come from
 * remote peers' Stat answers and from disks). Beyond "no crash, no
 * sanitizer report": what it accepts re-encodes to exactly the input (so
 * accepted means canonical), every size is above 0 and the sizes add up;
 * a refusal is -EBADMSG with a reason (or -ENOMEM). The same bytes also
 * go through the chunker, whose pieces must cover them exactly. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                \
	do {                                                           \
		if (!(cond)) {                                         \
			fprintf(stderr, "fuzz-chunklist: %s:%d: %s\n", \
				__FILE__, __LINE__, #cond);            \
			abort();                                       \
		}                                                      \
	} while (0)

static void decode(const uint8_t *data, size_t size)
{
	cas_chunk *chunks = NULL;
	size_t n = 0;
	const char *why = NULL;
	int r = cas_chunklist_decode(data, size, UINT64_MAX, &chunks, &n, &why);
	if (r < 0) {
		INVARIANT(r == -ENOMEM || (r == -EBADMSG && why && *why));
		return;
	}
	uint64_t total = 0;
	for (size_t i = 0; i < n; i++) {
		INVARIANT(chunks[i].size > 0);
		total += chunks[i].size;
	}
	uint8_t *again;
	size_t again_len;
	r = cas_chunklist_encode(chunks, n, &again, &again_len);
	INVARIANT(r == 0 || r == -ENOMEM);
	if (r == 0) {
		INVARIANT(again_len == size);
		INVARIANT(size == 0 || memcmp(again, data, size) == 0);
		free(again);
	}
	/* The sizes as the blob's size are accepted, one more is not. */
	cas_chunk *again_chunks;
	size_t again_n;
	if (cas_chunklist_decode(data, size, total, &again_chunks, &again_n,
				 &why) == 0)
		free(again_chunks);
	if (total < UINT64_MAX - 1)
		INVARIANT(cas_chunklist_decode(data, size, total + 1,
					       &again_chunks, &again_n,
					       &why) == -EBADMSG);
	free(chunks);
}

static void cut(const uint8_t *data, size_t size)
{
	/* Small sizes so that short inputs cut too. */
	cas_chunker c;
	INVARIANT(cas_chunker_init(&c, 16, 64, 256) == 0);
	size_t off = 0, chunk = 0;
	while (off < size) {
		bool done;
		size_t n = cas_chunker_next(&c, data + off, size - off, &done);
		INVARIANT(n <= size - off);
		off += n;
		chunk += n;
		INVARIANT(chunk <= 256);
		if (done) {
			INVARIANT(chunk >= 16);
			chunk = 0;
		} else {
			INVARIANT(off == size);
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	decode(data, size);
	cut(data, size);
	return 0;
}
