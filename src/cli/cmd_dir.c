/* castore dir put | dir get DIGEST [--json] */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/json.h"
#include "core/log.h"
#include "core/util.h"

static const char dir_help[] =
	"Usage: castore dir put               store one Directory (canonical\n"
	"                                     castore v1 protobuf bytes on\n"
	"                                     stdin), print its digest\n"
	"       castore dir get DIGEST [--json]\n"
	"                                     write a Directory's canonical\n"
	"                                     bytes to stdout, or as JSON\n"
	"\n"
	"dir put refuses bytes that are not the canonical encoding, and a\n"
	"Directory whose child Directories are not in the store.\n";

/* Upper bound on what dir put reads: far above any real Directory, low
 * enough that a mistaken pipe does not eat the memory. */
#define DIR_PUT_MAX (256u << 20)

static int read_stdin(uint8_t **ret_buf, size_t *ret_len)
{
	_cleanup_free_ uint8_t *buf = NULL;
	size_t len = 0, cap = 0;

	for (;;) {
		if (len == cap) {
			if (cap >= DIR_PUT_MAX)
				return -EFBIG;
			int r = cas_array_grow(&buf, &cap, len + 1, 1, 65536);
			if (r < 0)
				return r;
		}
		ssize_t n = read(STDIN_FILENO, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return cas_negerrno();
		if (n == 0)
			break;
		len += (size_t)n;
	}
	*ret_buf = TAKE_PTR(buf);
	*ret_len = len;
	return 0;
}

static int dir_put(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	const char *why = NULL;
	cas_digest digest;
	size_t len = 0;
	int c, r;

	while ((c = cas_cli_getopt("dir put", argc, argv, "h", opts)) != -1) {
		if (c == 'h') {
			fputs(dir_help, stdout);
			return CAS_EXIT_OK;
		}
		return CAS_EXIT_USAGE;
	}
	if (argc - optind != 0)
		return cas_cli_usage("dir put",
				     "no operands expected (bytes on stdin)");
	r = read_stdin(&buf, &len);
	if (r < 0)
		return cas_cli_fail("dir put", "stdin: %s", strerror(-r));
	/* Decode here first, so a refusal prints the decoder's own reason. */
	r = cas_directory_decode(buf, len, &d, &why);
	if (r < 0)
		return cas_cli_fail("dir put", "stdin: refused: %s",
				    why ? why : strerror(-r));
	cas_directory_digest(buf, len, &digest);
	cas_digest_to_hex(&digest, hex);

	if (cas_cli_open_store(cli, true, &s) < 0)
		return CAS_EXIT_FAILURE;
	for (size_t i = 0; i < d->n_directories; i++) {
		char child[CAS_DIGEST_HEX_LEN + 1];
		_cleanup_free_ uint8_t *cbuf = NULL;
		size_t clen;
		/* get_raw rather than has: its -ENOENT is unambiguous. */
		unsigned long mark = cas_log_error_count();
		r = s->ops->directory_get_raw(s, &d->directories[i].digest,
					      &cbuf, &clen);
		if (r >= 0)
			continue;
		cas_digest_to_hex(&d->directories[i].digest, child);
		return cas_cli_store_fail(
			mark, "dir put",
			"directory %s: refused: child %s (%.*s) %s", hex, child,
			(int)d->directories[i].name_len,
			(const char *)d->directories[i].name,
			r == -ENOENT ? "is not in the store" : strerror(-r));
	}
	unsigned long mark = cas_log_error_count();
	r = cas_store_directory_put(s, buf, len, &digest);
	if (r < 0)
		return cas_cli_store_fail(mark, "dir put", "directory %s: %s",
					  hex, strerror(-r));
	cas_digest_to_hex(&digest, hex);
	printf("%s\n", hex);
	return CAS_EXIT_OK;
}

static void json_list(const char *key, const cas_node *nodes, size_t n,
		      bool last)
{
	printf("  \"%s\": [", key);
	for (size_t i = 0; i < n; i++) {
		fputs(i ? ",\n    " : "\n    ", stdout);
		cas_json_node(stdout, &nodes[i], true);
	}
	printf("%s]%s\n", n ? "\n  " : "", last ? "" : ",");
}

static int dir_get(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, 'j'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	const char *why = NULL;
	cas_digest digest;
	size_t len = 0;
	bool json = false;
	int c, r;

	while ((c = cas_cli_getopt("dir get", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'j':
			json = true;
			break;
		case 'h':
			fputs(dir_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 1)
		return cas_cli_usage("dir get", "one DIGEST expected");
	r = cas_cli_parse_digest("dir get", argv[optind], &digest);
	if (r)
		return r;
	cas_digest_to_hex(&digest, hex);
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	r = s->ops->directory_get_raw(s, &digest, &buf, &len);
	if (r == -ENOENT)
		return cas_cli_store_fail(
			mark, "dir get", "directory %s: not in the store", hex);
	if (r < 0)
		return cas_cli_store_fail(mark, "dir get", "directory %s: %s",
					  hex, strerror(-r));
	if (!json) {
		r = cas_write_all(STDOUT_FILENO, buf, len);
		if (r < 0)
			return cas_cli_fail("dir get", "stdout: %s",
					    strerror(-r));
		return CAS_EXIT_OK;
	}
	r = cas_directory_decode(buf, len, &d, &why);
	if (r < 0)
		return cas_cli_fail("dir get", "directory %s: %s", hex,
				    why ? why : strerror(-r));
	fputs("{\n", stdout);
	json_list("directories", d->directories, d->n_directories, false);
	json_list("files", d->files, d->n_files, false);
	json_list("symlinks", d->symlinks, d->n_symlinks, true);
	fputs("}\n", stdout);
	return CAS_EXIT_OK;
}

int cmd_dir(struct cas_cli *cli, int argc, char **argv)
{
	if (argc < 2)
		return cas_cli_usage("dir", "put or get expected");
	const char *sub = argv[1];
	if (!strcmp(sub, "--help") || !strcmp(sub, "-h")) {
		fputs(dir_help, stdout);
		return CAS_EXIT_OK;
	}
	optind = 0;
	if (!strcmp(sub, "put")) {
		cas_cli_set_verb("dir put");
		return dir_put(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "get")) {
		cas_cli_set_verb("dir get");
		return dir_get(cli, argc - 1, argv + 1);
	}
	return cas_cli_usage("dir", "%s: unknown sub-verb (put, get)", sub);
}
