/* castore-bao-tool - core/bao and core/chunker on files, for the tests
 * that check them from outside (tests/integration/test_bao.py: b3sum and
 * a second implementation of the tree in Python) and for bench/bao.sh.
 *
 *   hash FILE [OUTBOARD]        stdout: the digest; writes the outboard
 *   proof FILE OFF LEN PROOF    writes the range's proof (from the
 *                               outboard computed here)
 *   verify-outboard HEX SIZE OUTBOARD
 *   verify-groups HEX SIZE OUTBOARD FIRST DATA
 *   verify-range HEX SIZE OFF LEN PROOF DATA
 *                               exit 0 "ok", or 1 "bad group N" (or
 *                               "refused: REASON" for a bad outboard or
 *                               a range that is not one)
 *   chunks FILE [MIN AVG MAX]   stdout: "HEX SIZE" per chunk
 *   bench FILE... | bench -     stdout: seconds of plain BLAKE3 and of
 *                               BLAKE3 + outboard over the same files
 *                               (or the NUL-separated paths on stdin),
 *                               each read once into memory beforehand
 *                               (CPU seconds of the thread, best of 11)
 *
 * Misuse or an I/O error exits 2. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/bao.h"
#include "core/chunker.h"
#include "core/digest.h"
#include "core/util.h"

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "castore-bao-tool: %s: %s\n", arg, what);
	exit(2);
}

static uint8_t *slurp(const char *path, size_t *ret_len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(strerror(errno), path);
	size_t len = (size_t)st.st_size;
	uint8_t *buf = malloc(len ? len : 1);
	if (!buf || cas_pread_all(fd, buf, len, 0) < 0)
		die("cannot read", path);
	close(fd);
	*ret_len = len;
	return buf;
}

static void spill(const char *path, const uint8_t *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || cas_write_all(fd, buf, len) < 0 || close(fd) < 0)
		die("cannot write", path);
}

static uint64_t num(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || !*s)
		die("not a number", s);
	return v;
}

static cas_digest digest_arg(const char *hex)
{
	cas_digest d;
	if (cas_digest_from_hex(hex, &d) < 0)
		die("not a digest", hex);
	return d;
}

static int verdict(int r, uint64_t bad)
{
	if (r == 0) {
		puts("ok");
		return 0;
	}
	if (r == -EBADMSG && bad != UINT64_MAX)
		printf("bad group %" PRIu64 "\n", bad);
	else
		printf("refused: %s\n", strerror(-r));
	return 1;
}

/* CPU time of this thread: the machine is shared, and wall time would
 * count the other processes' turns on the CPU as ours. */
static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Plain hashing against hashing plus outboard over the same bytes, in
 * memory (no I/O in either), alternating so both see the same machine:
 * best of BENCH_ROUNDS of each, in CPU seconds. */
#define BENCH_ROUNDS 11
static int bench(int argc, char **argv)
{
	if (argc == 1 && !strcmp(argv[0], "-")) {
		/* Paths on stdin, NUL-separated (find -print0). */
		size_t cap = 1024;
		char **paths = malloc(cap * sizeof(*paths));
		char *line = NULL;
		size_t line_cap = 0;
		argc = 0;
		while (paths && getdelim(&line, &line_cap, 0, stdin) > 0) {
			if ((size_t)argc == cap)
				paths = realloc(paths,
						(cap *= 2) * sizeof(*paths));
			if (paths)
				paths[argc++] = strdup(line);
		}
		if (!paths)
			die("out of memory", "bench");
		argv = paths;
	}
	size_t n = (size_t)argc;
	uint8_t **bufs = calloc(n, sizeof(*bufs));
	size_t *lens = calloc(n, sizeof(*lens));
	uint8_t *ob = NULL;
	size_t ob_cap = 0;
	if (!bufs || !lens)
		die("out of memory", "bench");
	uint64_t total = 0;
	for (size_t i = 0; i < n; i++) {
		bufs[i] = slurp(argv[i], &lens[i]);
		total += lens[i];
		ob_cap = CAS_MAX(ob_cap, cas_bao_outboard_size(lens[i]));
	}
	ob = malloc(ob_cap + 1);
	double best_plain = 1e9, best_bao = 1e9;
	uint8_t sink = 0;
	for (int round = 0; round < BENCH_ROUNDS; round++) {
		double t = now();
		for (size_t i = 0; i < n; i++) {
			cas_digest d;
			cas_hash_buffer(bufs[i], lens[i], &d);
			sink ^= d.bytes[0];
		}
		best_plain = CAS_MIN(best_plain, now() - t);
		t = now();
		for (size_t i = 0; i < n; i++) {
			cas_digest d;
			/* What import would do: an outboard above the
			 * threshold, plain hashing below it. */
			if (cas_bao_wants_outboard(lens[i]))
				cas_bao_hash_buffer(bufs[i], lens[i], &d, ob);
			else
				cas_hash_buffer(bufs[i], lens[i], &d);
			sink ^= d.bytes[0];
		}
		best_bao = CAS_MIN(best_bao, now() - t);
	}
	printf("files %zu bytes %" PRIu64 " plain %.4f bao %.4f ratio %.3f "
	       "(%u)\n",
	       n, total, best_plain, best_bao, best_bao / best_plain, sink & 1);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		die("usage: see the file's head", "castore-bao-tool");
	const char *cmd = argv[1];
	size_t len;
	uint64_t bad = UINT64_MAX;

	if (!strcmp(cmd, "hash")) {
		uint8_t *data = slurp(argv[2], &len);
		uint8_t *ob = malloc(cas_bao_outboard_size(len) + 1);
		cas_digest d;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		if (!ob || cas_bao_hash_buffer(data, len, &d, ob) < 0)
			die("cannot hash", argv[2]);
		cas_digest_to_hex(&d, hex);
		puts(hex);
		if (argc > 3)
			spill(argv[3], ob, cas_bao_outboard_size(len));
		return 0;
	}
	if (!strcmp(cmd, "proof") && argc == 6) {
		uint8_t *data = slurp(argv[2], &len);
		uint8_t *ob = malloc(cas_bao_outboard_size(len) + 1);
		cas_digest d;
		size_t plen;
		if (!ob || cas_bao_hash_buffer(data, len, &d, ob) < 0)
			die("cannot hash", argv[2]);
		int r = cas_bao_proof_size(len, num(argv[3]), num(argv[4]),
					   &plen);
		if (r < 0)
			return verdict(r, bad);
		uint8_t *proof = malloc(plen + 1);
		if (!proof || cas_bao_proof_extract(
				      len, ob, cas_bao_outboard_size(len),
				      num(argv[3]), num(argv[4]), proof) < 0)
			die("cannot extract", argv[2]);
		spill(argv[5], proof, plen);
		return 0;
	}
	if (!strcmp(cmd, "verify-outboard") && argc == 5) {
		cas_digest d = digest_arg(argv[2]);
		uint8_t *ob = slurp(argv[4], &len);
		return verdict(
			cas_bao_outboard_verify(&d, num(argv[3]), ob, len),
			bad);
	}
	if (!strcmp(cmd, "verify-groups") && argc == 7) {
		cas_digest d = digest_arg(argv[2]);
		size_t ob_len;
		uint8_t *ob = slurp(argv[4], &ob_len);
		uint8_t *data = slurp(argv[6], &len);
		int r = cas_bao_verify_groups(&d, num(argv[3]), ob, ob_len,
					      num(argv[5]), data, len, &bad);
		return verdict(r, bad);
	}
	if (!strcmp(cmd, "verify-range") && argc == 8) {
		cas_digest d = digest_arg(argv[2]);
		size_t plen;
		uint8_t *proof = slurp(argv[6], &plen);
		uint8_t *data = slurp(argv[7], &len);
		uint64_t off = num(argv[4]), rlen = num(argv[5]);
		if (rlen != len)
			return verdict(-EINVAL, bad);
		int r = cas_bao_proof_verify(&d, num(argv[3]), off, rlen, proof,
					     plen, data, &bad);
		return verdict(r, bad);
	}
	if (!strcmp(cmd, "chunks") && (argc == 3 || argc == 6)) {
		int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die(strerror(errno), argv[2]);
		uint64_t min = CAS_CHUNK_MIN, avg = CAS_CHUNK_AVG,
			 max = CAS_CHUNK_MAX;
		if (argc == 6) {
			min = num(argv[3]);
			avg = num(argv[4]);
			max = num(argv[5]);
		}
		cas_chunk *chunks;
		size_t n;
		if (cas_chunklist_from_fd(fd, min, avg, max, &chunks, &n) < 0)
			die("cannot chunk", argv[2]);
		for (size_t i = 0; i < n; i++) {
			char hex[CAS_DIGEST_HEX_LEN + 1];
			cas_digest_to_hex(&chunks[i].digest, hex);
			printf("%s %" PRIu64 "\n", hex, chunks[i].size);
		}
		return 0;
	}
	if (!strcmp(cmd, "bench"))
		return bench(argc - 2, argv + 2);
	die("unknown command or wrong arguments", cmd);
}
