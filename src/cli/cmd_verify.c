/* castore verify: the whole local store, every problem named. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "store/local.h"

static const char verify_help[] =
	"Usage: castore verify\n"
	"\n"
	"Re-hashes every blob, re-decodes every Directory, checks that every\n"
	"child Directory is present and that every root resolves. Each "
	"problem\n"
	"is one line on stderr; the exit status is 1 if there is any. With no\n"
	"problem, prints one summary line on stdout and exits 0.\n";

static void print_problem(void *userdata, const char *problem)
{
	size_t *n = userdata;
	(*n)++;
	cas_cli_fail("verify", "%s", problem);
}

int cmd_verify(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	size_t printed = 0;
	int c;

	while ((c = cas_cli_getopt("verify", argc, argv, "h", opts)) != -1) {
		if (c == 'h') {
			fputs(verify_help, stdout);
			return CAS_EXIT_OK;
		}
		return CAS_EXIT_USAGE;
	}
	if (argc - optind != 0)
		return cas_cli_usage("verify", "no operands expected");
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	if (!cas_store_is_local(s))
		return cas_cli_fail("verify", "%s: verify needs a local store",
				    cli->store_spec);
	unsigned long mark = cas_log_error_count();
	int r = cas_local_verify(s, print_problem, &printed);
	if (r < 0)
		return cas_cli_store_fail(mark, "verify", "%s: %s",
					  cli->store_spec, strerror(-r));
	if (r > 0 || printed > 0)
		return cas_cli_fail(
			"verify", "%s: %zu problem%s found", cli->store_spec,
			CAS_MAX((size_t)r, printed),
			CAS_MAX((size_t)r, printed) == 1 ? "" : "s");
	printf("%s: no problems found\n", cli->store_spec);
	return CAS_EXIT_OK;
}
