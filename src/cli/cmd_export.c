/* castore export NAME[/PATH] DEST */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "store/import.h"

static const char export_help[] =
	"Usage: castore export NAME[/PATH] DEST\n"
	"\n"
	"Writes root NAME (or the entry PATH below it) to DEST, which must "
	"not\n"
	"exist. Files get mode 0755 when executable, else 0644; directories\n"
	"0755. Export is not atomic: after a failure, what was written "
	"stays.\n";

int cmd_export(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ cas_node *node = NULL;
	struct stat st;
	int c, r;

	while ((c = cas_cli_getopt("export", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'h':
			fputs(export_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 2)
		return cas_cli_usage("export", "NAME and DEST expected");
	const char *spec = argv[optind], *dest = argv[optind + 1];
	if (!*dest)
		return cas_cli_usage("export", "empty DEST");
	r = cas_cli_check_spec("export", spec);
	if (r)
		return r;
	if (lstat(dest, &st) == 0)
		return cas_cli_fail("export", "%s: already exists", dest);

	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	r = cas_cli_resolve("export", s, spec, &node);
	if (r)
		return r;
	unsigned long mark = cas_log_error_count();
	r = cas_export(s, node, dest);
	if (r < 0)
		return cas_cli_store_fail(mark, "export", "%s: %s", dest,
					  strerror(-r));
	return CAS_EXIT_OK;
}
