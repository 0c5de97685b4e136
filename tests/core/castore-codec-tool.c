/* castore-codec-tool - the core codec on stdin/stdout, for tests that
 * check it against an independent encoder (tests/integration/test_codec.py).
 *
 *   decode       stdin: one Directory's bytes. stdout: "digest HEX",
 *                "size N", "encoded HEX" (the re-encoding), then one line
 *                per entry in list order (format below).
 *   encode       stdin: entry lines in any order; sorted, encoded.
 *                stdout: "digest HEX", "encoded HEX".
 *   batch        stdin: one Directory per line as hex (an empty line is
 *                the empty Directory). stdout per input: "ok DIGEST HEX"
 *                or "refused REASON".
 *   node-decode  stdin: one Node's bytes. stdout: its entry line.
 *   node-encode  stdin: one entry line. stdout: "encoded HEX".
 *
 * Entry lines: "d NAME DIGEST SIZE", "f NAME DIGEST SIZE EXEC",
 * "s NAME TARGET"; NAME and TARGET in hex ("-" when empty), EXEC 0 or 1.
 * A refusal prints "refused REASON" and exits 1; misuse exits 2. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/digest.h"
#include "core/directory.h"
#include "core/util.h"

static void die(const char *what)
{
	fprintf(stderr, "castore-codec-tool: %s\n", what);
	exit(2);
}

static uint8_t *read_all(FILE *f, size_t *ret_len)
{
	size_t len = 0, cap = 4096;
	uint8_t *buf = malloc(cap);
	if (!buf)
		die("out of memory");
	for (;;) {
		if (len == cap) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("out of memory");
		}
		size_t n = fread(buf + len, 1, cap - len, f);
		if (n == 0)
			break;
		len += n;
	}
	if (ferror(f))
		die("read error");
	*ret_len = len;
	return buf;
}

static void put_hex(const uint8_t *p, size_t len)
{
	if (len == 0) {
		fputc('-', stdout);
		return;
	}
	char *hex = malloc(2 * len + 1);
	if (!hex)
		die("out of memory");
	cas_hex_encode(p, len, hex);
	fputs(hex, stdout);
	free(hex);
}

/* Hex (or "-" for empty) into a new buffer. */
static uint8_t *parse_hex(const char *s, size_t *ret_len)
{
	if (!strcmp(s, "-")) {
		*ret_len = 0;
		return malloc(1);
	}
	size_t n = strlen(s);
	if (n % 2)
		die("odd hex length");
	uint8_t *p = malloc(n / 2 + 1);
	if (!p)
		die("out of memory");
	if (cas_hex_decode(s, n / 2, p) < 0)
		die("bad hex");
	*ret_len = n / 2;
	return p;
}

static void put_entry(const cas_node *n)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	switch (n->type) {
	case CAS_NODE_DIRECTORY:
	case CAS_NODE_FILE:
		fputs(n->type == CAS_NODE_DIRECTORY ? "d " : "f ", stdout);
		put_hex(n->name, n->name_len);
		cas_digest_to_hex(&n->digest, hex);
		printf(" %s %" PRIu64, hex, n->size);
		if (n->type == CAS_NODE_FILE)
			printf(" %d", n->executable ? 1 : 0);
		break;
	case CAS_NODE_SYMLINK:
		fputs("s ", stdout);
		put_hex(n->name, n->name_len);
		fputc(' ', stdout);
		put_hex(n->target, n->target_len);
		break;
	}
	fputc('\n', stdout);
}

/* Parses one entry line (modified in place); name and target are
 * malloc'd, freed by free_entry(). */
static void parse_entry(char *line, cas_node *n)
{
	char *f[6];
	int nf = 0;
	for (char *tok = strtok(line, " \t\n"); tok && nf < 6;
	     tok = strtok(NULL, " \t\n"))
		f[nf++] = tok;
	memset(n, 0, sizeof(*n));
	if (nf < 3)
		die("short entry line");
	size_t len;
	n->name = parse_hex(f[1], &n->name_len);
	if (!strcmp(f[0], "s") && nf == 3) {
		n->type = CAS_NODE_SYMLINK;
		n->target = parse_hex(f[2], &n->target_len);
		return;
	}
	if (!strcmp(f[0], "d") && nf == 4)
		n->type = CAS_NODE_DIRECTORY;
	else if (!strcmp(f[0], "f") && nf == 5)
		n->type = CAS_NODE_FILE;
	else
		die("bad entry line");
	uint8_t *d = parse_hex(f[2], &len);
	if (len != CAS_DIGEST_LEN)
		die("digest is not 32 bytes");
	memcpy(n->digest.bytes, d, CAS_DIGEST_LEN);
	free(d);
	n->size = strtoull(f[3], NULL, 10);
	if (n->type == CAS_NODE_FILE)
		n->executable = atoi(f[4]) != 0;
}

static void free_entry(cas_node *n)
{
	free((void *)n->name);
	free((void *)n->target);
}

static int refused(const char *why)
{
	printf("refused %s\n", why ? why : "(no reason)");
	return 1;
}

static int cmd_decode(void)
{
	size_t len;
	_cleanup_free_ uint8_t *buf = read_all(stdin, &len);
	cas_directory *d = NULL;
	const char *why = NULL;
	int r = cas_directory_decode(buf, len, &d, &why);
	if (r == -EBADMSG)
		return refused(why);
	if (r < 0)
		die("decode failed");
	cas_digest digest;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_directory_digest(buf, len, &digest);
	cas_digest_to_hex(&digest, hex);
	uint64_t size;
	if (cas_directory_size(d, &size) < 0)
		die("size of an accepted directory overflows");
	_cleanup_free_ uint8_t *again = NULL;
	size_t again_len;
	if (cas_directory_encode(d, &again, &again_len, &why) < 0)
		die("re-encoding an accepted directory failed");
	printf("digest %s\nsize %" PRIu64 "\nencoded ", hex, size);
	put_hex(again, again_len);
	fputc('\n', stdout);
	const cas_node *lists[3] = {d->directories, d->files, d->symlinks};
	size_t counts[3] = {d->n_directories, d->n_files, d->n_symlinks};
	for (int l = 0; l < 3; l++)
		for (size_t i = 0; i < counts[l]; i++)
			put_entry(&lists[l][i]);
	cas_directory_free(d);
	return 0;
}

static int cmd_encode(void)
{
	size_t cap = 16, n = 0;
	cas_node *nodes = malloc(cap * sizeof(*nodes));
	char *line = NULL;
	size_t line_cap = 0;
	if (!nodes)
		die("out of memory");
	while (getline(&line, &line_cap, stdin) > 0) {
		if (line[0] == '\n')
			continue;
		if (n == cap) {
			cap *= 2;
			nodes = realloc(nodes, cap * sizeof(*nodes));
			if (!nodes)
				die("out of memory");
		}
		parse_entry(line, &nodes[n++]);
	}
	free(line);
	/* Group by type, keeping the order given; sort each list. */
	cas_node *grouped = malloc((n ? n : 1) * sizeof(*grouped));
	if (!grouped)
		die("out of memory");
	size_t counts[3] = {0, 0, 0}, k = 0;
	for (int t = CAS_NODE_DIRECTORY; t <= CAS_NODE_SYMLINK; t++)
		for (size_t i = 0; i < n; i++)
			if ((int)nodes[i].type == t) {
				grouped[k++] = nodes[i];
				counts[t - 1]++;
			}
	cas_directory d = {grouped,
			   counts[0],
			   grouped + counts[0],
			   counts[1],
			   grouped + counts[0] + counts[1],
			   counts[2]};
	cas_directory_sort(&d);
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	const char *why = NULL;
	int r = cas_directory_encode(&d, &buf, &len, &why);
	for (size_t i = 0; i < n; i++)
		free_entry(&nodes[i]);
	free(grouped);
	free(nodes);
	if (r == -EBADMSG)
		return refused(why);
	if (r < 0)
		die("encode failed");
	cas_digest digest;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_directory_digest(buf, len, &digest);
	cas_digest_to_hex(&digest, hex);
	printf("digest %s\nencoded ", hex);
	put_hex(buf, len);
	fputc('\n', stdout);
	return 0;
}

static int cmd_batch(void)
{
	char *line = NULL;
	size_t line_cap = 0;
	ssize_t got;
	while ((got = getline(&line, &line_cap, stdin)) > 0) {
		if (line[got - 1] == '\n')
			line[--got] = 0;
		size_t len;
		_cleanup_free_ uint8_t *buf =
			got == 0 ? malloc(1) : parse_hex(line, &len);
		if (got == 0)
			len = 0;
		cas_directory *d = NULL;
		const char *why = NULL;
		int r = cas_directory_decode(buf, len, &d, &why);
		if (r == -EBADMSG) {
			printf("refused %s\n", why);
			continue;
		}
		if (r < 0)
			die("decode failed");
		_cleanup_free_ uint8_t *again = NULL;
		size_t again_len;
		if (cas_directory_encode(d, &again, &again_len, &why) < 0)
			die("re-encoding an accepted directory failed");
		cas_digest digest;
		char hex[CAS_DIGEST_HEX_LEN + 1];
		cas_directory_digest(again, again_len, &digest);
		cas_digest_to_hex(&digest, hex);
		printf("ok %s ", hex);
		put_hex(again, again_len);
		fputc('\n', stdout);
		cas_directory_free(d);
	}
	free(line);
	return 0;
}

static int cmd_node_decode(void)
{
	size_t len;
	_cleanup_free_ uint8_t *buf = read_all(stdin, &len);
	cas_node n;
	const char *why = NULL;
	int r = cas_node_decode(buf, len, &n, &why);
	if (r == -EBADMSG)
		return refused(why);
	if (r < 0)
		die("decode failed");
	put_entry(&n);
	return 0;
}

static int cmd_node_encode(void)
{
	char *line = NULL;
	size_t line_cap = 0;
	if (getline(&line, &line_cap, stdin) <= 0)
		die("no entry line");
	cas_node n;
	parse_entry(line, &n);
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len;
	const char *why = NULL;
	int r = cas_node_encode(&n, &buf, &len, &why);
	free_entry(&n);
	free(line);
	if (r == -EBADMSG)
		return refused(why);
	if (r < 0)
		die("encode failed");
	fputs("encoded ", stdout);
	put_hex(buf, len);
	fputc('\n', stdout);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "decode";
	if (!strcmp(cmd, "decode"))
		return cmd_decode();
	if (!strcmp(cmd, "encode"))
		return cmd_encode();
	if (!strcmp(cmd, "batch"))
		return cmd_batch();
	if (!strcmp(cmd, "node-decode"))
		return cmd_node_decode();
	if (!strcmp(cmd, "node-encode"))
		return cmd_node_encode();
	die("usage: castore-codec-tool "
	    "decode|encode|batch|node-decode|node-encode");
	return 2;
}
