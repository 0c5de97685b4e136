/* check.h - the few assertions the core unit tests share.
 *
 * A failed check prints its place and expression and is counted; the test
 * goes on so that one run shows every failure, and check_exit() turns the
 * count into the exit status (0 pass, 1 fail). */
#ifndef CAS_TESTS_CHECK_H
#define CAS_TESTS_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned check_failures;
static unsigned check_count;

#define CHECK(cond)                                                            \
	do {                                                                   \
		check_count++;                                                 \
		if (!(cond)) {                                                 \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, \
				__LINE__, #cond);                              \
			check_failures++;                                      \
		}                                                              \
	} while (0)

/* Equal C strings; either may be NULL. */
#define CHECK_STREQ(a, b)                                                     \
	do {                                                                  \
		const char *a_ = (a), *b_ = (b);                              \
		check_count++;                                                \
		if (!(a_ == b_ || (a_ && b_ && !strcmp(a_, b_)))) {           \
			fprintf(stderr, "%s:%d: %s is \"%s\", want \"%s\"\n", \
				__FILE__, __LINE__, #a, a_ ? a_ : "(null)",   \
				b_ ? b_ : "(null)");                          \
			check_failures++;                                     \
		}                                                             \
	} while (0)

/* A check that the rest of a test cannot go on without. */
#define REQUIRE(cond)                                                      \
	do {                                                               \
		if (!(cond)) {                                             \
			fprintf(stderr, "%s:%d: required: %s\n", __FILE__, \
				__LINE__, #cond);                          \
			exit(1);                                           \
		}                                                          \
	} while (0)

/* len bytes of a pattern that has no short period (i mod 251), so a
 * byte out of place changes every digest; free() it. */
static inline uint8_t *check_pattern(size_t len)
{
	uint8_t *p = malloc(len ? len : 1);
	REQUIRE(p);
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(i % 251);
	return p;
}

static inline int check_exit(const char *name)
{
	if (check_failures) {
		fprintf(stderr, "%s: %u of %u checks failed\n", name,
			check_failures, check_count);
		return 1;
	}
	printf("%s: %u checks passed\n", name, check_count);
	return 0;
}

#endif
