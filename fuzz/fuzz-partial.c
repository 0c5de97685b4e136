/* Fuzz target: the range record of a partial blob (store/partial.h),
 * read back from the disk of a cache that may have been cut by a crash
 * or damaged. Beyond "no crash, no sanitizer report": what it accepts
 * has exactly the length its size gives, no bit past the last group,
 * and a bitmap inside the input; a refusal is -EBADMSG. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/bao.h"
#include "store/partial.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define INVARIANT(cond)                                                        \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "fuzz-partial: %s:%d: %s\n", __FILE__, \
				__LINE__, #cond);                              \
			abort();                                               \
		}                                                              \
	} while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	cas_digest d;
	uint64_t blob_size = 0;
	const uint8_t *bits = NULL;
	int r = cas_partial_record_decode(data, size, &d, &blob_size, &bits);
	if (r < 0) {
		INVARIANT(r == -EBADMSG);
		return 0;
	}
	INVARIANT(r == 0);
	uint64_t groups = cas_bao_groups(blob_size);
	INVARIANT(size == cas_partial_record_len(blob_size));
	INVARIANT(bits == data + CAS_PARTIAL_HEADER_LEN);
	INVARIANT(size - CAS_PARTIAL_HEADER_LEN == (groups + 7) / 8);
	if (groups % 8)
		INVARIANT((bits[groups / 8] >> (groups % 8)) == 0);
	INVARIANT(memcmp(d.bytes, data + 8, CAS_DIGEST_LEN) == 0);
	return 0;
}
