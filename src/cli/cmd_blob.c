/* castore blob put [FILE|-] | cat DIGEST | stat DIGEST | outboard DIGEST */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"

static const char blob_help[] =
	"Usage: castore blob put [FILE|-]   store a blob, print its digest\n"
	"       castore blob cat DIGEST     write a blob to stdout\n"
	"       castore blob stat DIGEST    print a blob's size in bytes\n"
	"       castore blob outboard DIGEST  write the blob's BLAKE3 "
	"outboard\n"
	"                                   (docs/remote.md) to stdout\n"
	"\n"
	"DIGEST is 64 hex characters (BLAKE3-256, as b3sum prints it).\n";

/* Scans --help only; returns 1 after printing help, CAS_EXIT_USAGE, or 0
 * with optind at the first operand. */
static int help_only(const char *verb, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	int c;

	while ((c = cas_cli_getopt(verb, argc, argv, "h", opts)) != -1) {
		if (c == 'h') {
			fputs(blob_help, stdout);
			return 1;
		}
		return CAS_EXIT_USAGE;
	}
	return 0;
}

static int blob_put(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_close_ int fd = -1;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest d;
	uint64_t size;
	int r;

	/* "-" is stdin, not an option. */
	r = help_only("blob put", argc, argv);
	if (r)
		return r == 1 ? CAS_EXIT_OK : r;
	if (argc - optind > 1)
		return cas_cli_usage("blob put", "at most one FILE expected");
	const char *path = argc - optind == 1 ? argv[optind] : "-";
	int in = STDIN_FILENO;
	if (strcmp(path, "-")) {
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return cas_cli_fail("blob put", "%s: %m", path);
		in = fd;
	}
	if (cas_cli_open_store(cli, true, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	r = cas_store_blob_put_fd(s, in, &d, &size);
	if (r < 0)
		return cas_cli_store_fail(mark, "blob put", "%s: %s",
					  strcmp(path, "-") ? path : "stdin",
					  strerror(-r));
	cas_digest_to_hex(&d, hex);
	printf("%s\n", hex);
	return CAS_EXIT_OK;
}

static int blob_digest_arg(const char *verb, int argc, char **argv,
			   cas_digest *ret)
{
	int r = help_only(verb, argc, argv);
	if (r)
		return r == 1 ? -1 : r;
	if (argc - optind != 1)
		return cas_cli_usage(verb, "one DIGEST expected");
	return cas_cli_parse_digest(verb, argv[optind], ret);
}

static int blob_cat(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	cas_digest d;

	int r = blob_digest_arg("blob cat", argc, argv, &d);
	if (r)
		return r < 0 ? CAS_EXIT_OK : r;
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	return cas_cli_blob_copy("blob cat", s, &d, STDOUT_FILENO);
}

static int blob_stat(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest d;
	uint64_t size;

	int r = blob_digest_arg("blob stat", argc, argv, &d);
	if (r)
		return r < 0 ? CAS_EXIT_OK : r;
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	r = s->ops->blob_stat(s, &d, &size);
	cas_digest_to_hex(&d, hex);
	if (r == -ENOENT)
		return cas_cli_store_fail(mark, "blob stat",
					  "blob %s: not in the store", hex);
	if (r < 0)
		return cas_cli_store_fail(mark, "blob stat", "blob %s: %s", hex,
					  strerror(-r));
	printf("%" PRIu64 "\n", size);
	return CAS_EXIT_OK;
}

static int blob_outboard(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];
	cas_digest d;

	int r = blob_digest_arg("blob outboard", argc, argv, &d);
	if (r)
		return r < 0 ? CAS_EXIT_OK : r;
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	cas_digest_to_hex(&d, hex);
	unsigned long mark = cas_log_error_count();
	_cleanup_close_ int fd = -1;
	uint64_t len;
	r = s->ops->blob_outboard_open
		    ? s->ops->blob_outboard_open(s, &d, &fd, &len)
		    : -ENOTSUP;
	if (r == -ENOENT)
		return cas_cli_store_fail(mark, "blob outboard",
					  "blob %s: not in the store", hex);
	if (r < 0)
		return cas_cli_store_fail(mark, "blob outboard", "blob %s: %s",
					  hex, strerror(-r));
	r = cas_copy_fd(fd, STDOUT_FILENO, len);
	if (r < 0)
		return cas_cli_fail("blob outboard", "blob %s: write: %s", hex,
				    strerror(-r));
	return CAS_EXIT_OK;
}

int cmd_blob(struct cas_cli *cli, int argc, char **argv)
{
	if (argc < 2)
		return cas_cli_usage("blob",
				     "put, cat, stat or outboard expected");
	const char *sub = argv[1];
	if (!strcmp(sub, "--help") || !strcmp(sub, "-h")) {
		fputs(blob_help, stdout);
		return CAS_EXIT_OK;
	}
	optind = 0;
	if (!strcmp(sub, "put")) {
		cas_cli_set_verb("blob put");
		return blob_put(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "cat")) {
		cas_cli_set_verb("blob cat");
		return blob_cat(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "stat")) {
		cas_cli_set_verb("blob stat");
		return blob_stat(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "outboard")) {
		cas_cli_set_verb("blob outboard");
		return blob_outboard(cli, argc - 1, argv + 1);
	}
	return cas_cli_usage(
		"blob", "%s: unknown sub-verb (put, cat, stat, outboard)", sub);
}
