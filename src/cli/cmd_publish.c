/* castore publish DIR [NAME...] */
#include <getopt.h>
#include <stdio.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote.h"

static const char publish_help[] =
	"Usage: castore publish DIR [NAME...]\n"
	"\n"
	"Writes the static HTTP layout of the named roots (no name: every "
	"root)\n"
	"into DIR, which any web server or bucket can serve as it is; read it\n"
	"with --store http://HOST/PATH. Only objects DIR lacks are written,\n"
	"leaves first; the roots file is replaced last, atomically, and keeps\n"
	"roots published before under other names (docs/remote.md).\n";

static void publish_progress(void *userdata,
			     const struct cas_remote_progress *p)
{
	fprintf(stderr,
		"\rpublish: %llu directories, %llu blobs walked, %llu objects "
		"(%llu MiB) written",
		(unsigned long long)p->directories,
		(unsigned long long)p->blobs,
		(unsigned long long)p->sent_objects,
		(unsigned long long)(p->sent_bytes >> 20));
}

int cmd_publish(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	struct cas_remote_progress stats;
	int c, r;

	while ((c = cas_cli_getopt("publish", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'h':
			fputs(publish_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind < 1)
		return cas_cli_usage("publish", "DIR expected");
	const char *dir = argv[optind];
	if (!*dir)
		return cas_cli_usage("publish", "empty DIR");
	for (int i = optind + 1; i < argc; i++)
		if (!cas_root_name_valid(argv[i]))
			return cas_cli_usage("publish",
					     "%s: not a valid root name",
					     argv[i]);
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	r = cas_remote_publish(
		s, dir, argv + optind + 1, (size_t)(argc - optind - 1),
		cli->progress ? publish_progress : NULL, NULL, &stats);
	if (cli->progress)
		fputc('\n', stderr);
	if (r < 0)
		return cas_cli_store_fail(mark, "publish", "%s: not published",
					  dir);
	return CAS_EXIT_OK;
}
