/* castore push URL NAME... */
#include <getopt.h>
#include <stdio.h>
#include <time.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote.h"

static const char push_help[] =
	"Usage: castore push URL NAME...\n"
	"\n"
	"Copies the closures of the named roots to the castore gRPC store at "
	"URL\n"
	"(grpc+http://HOST:PORT, grpc+https://HOST[:PORT], grpc+unix:///PATH;\n"
	"snix or tvix): blobs first, then the Directories leaves first.\n"
	"Whatever the remote already has is not sent, so running it again\n"
	"after an interruption sends only the rest.\n"
	"gRPC stores have no roots: register the names where they are read.\n";

static void push_progress(void *userdata, const struct cas_remote_progress *p)
{
	static struct timespec last;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	if (now.tv_sec == last.tv_sec && now.tv_nsec - last.tv_nsec < 100000000)
		return;
	last = now;
	fprintf(stderr,
		"\rpush: %llu directories, %llu blobs checked, %llu objects "
		"(%llu MiB) sent",
		(unsigned long long)p->directories,
		(unsigned long long)p->blobs,
		(unsigned long long)p->sent_objects,
		(unsigned long long)(p->sent_bytes >> 20));
}

int cmd_push(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	struct cas_remote_progress stats;
	int c, r;

	while ((c = cas_cli_getopt("push", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'h':
			fputs(push_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind < 2)
		return cas_cli_usage("push", "URL and NAME... expected");
	const char *url = argv[optind];
	if (!cas_remote_is_url(url) || url[0] != 'g')
		return cas_cli_usage(
			"push",
			"%s: not grpc+http://HOST:PORT, grpc+https://HOST or "
			"grpc+unix:///PATH",
			url);
	for (int i = optind + 1; i < argc; i++)
		if (!cas_root_name_valid(argv[i]))
			return cas_cli_usage(
				"push", "%s: not a valid root name", argv[i]);
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	r = cas_remote_push(s, url, argv + optind + 1,
			    (size_t)(argc - optind - 1),
			    cli->progress ? push_progress : NULL, NULL, &stats);
	if (cli->progress)
		fprintf(stderr,
			"\rpush: %llu directories, %llu blobs checked, %llu "
			"objects (%llu MiB) sent\n",
			(unsigned long long)stats.directories,
			(unsigned long long)stats.blobs,
			(unsigned long long)stats.sent_objects,
			(unsigned long long)(stats.sent_bytes >> 20));
	if (r < 0)
		return cas_cli_store_fail(mark, "push", "%s: push failed", url);
	return CAS_EXIT_OK;
}
