/* castore serve --listen HOST:PORT|unix:PATH */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/util.h"
#include "remote/remote.h"

static const char serve_help[] =
	"Usage: castore serve --listen HOST:PORT|unix:PATH\n"
	"\n"
	"Serves the store as tvix castore gRPC (tvix.castore.v1 BlobService "
	"and\n"
	"DirectoryService) over HTTP/2 cleartext, until SIGINT or SIGTERM.\n"
	"Clients reach it as grpc+http://HOST:PORT or grpc+unix:///PATH. Port "
	"0\n"
	"picks a free port; the address is printed as \"listening on ADDR\".\n";

static volatile sig_atomic_t serve_stop;

static void on_signal(int sig)
{
	serve_stop = 1;
}

static void on_ready(void *userdata, const char *address)
{
	printf("listening on %s\n", address);
	fflush(stdout);
}

int cmd_serve(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"listen", required_argument, NULL, 'l'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	const char *listen = NULL;
	int c;

	while ((c = cas_cli_getopt("serve", argc, argv, "l:h", opts)) != -1) {
		switch (c) {
		case 'l':
			listen = optarg;
			break;
		case 'h':
			fputs(serve_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (optind != argc)
		return cas_cli_usage("serve", "unexpected argument %s",
				     argv[optind]);
	if (!listen || !*listen)
		return cas_cli_usage(
			"serve", "--listen HOST:PORT or unix:PATH expected");
	if (strncmp(listen, "unix:", 5) != 0 && !strchr(listen, ':'))
		return cas_cli_usage(
			"serve", "%s: HOST:PORT or unix:PATH expected", listen);
	if (cas_cli_open_store_mode(cli, CAS_CLI_STORE_CREATE, &s) < 0)
		return CAS_EXIT_FAILURE;

	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (cas_grpc_serve(s, listen, &serve_stop, on_ready, NULL) < 0)
		return cas_cli_fail("serve", "%s: cannot serve", listen);
	return CAS_EXIT_OK;
}
