/* castore serve --listen HOST:PORT|unix:PATH [--read-only] [limits] */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "remote/remote.h"

static const char serve_help[] =
	"Usage: castore serve --listen HOST:PORT|unix:PATH [--read-only]\n"
	"                     [--reserve SIZE] [--max-connections N]\n"
	"                     [--idle-timeout SECONDS] [--threads N]\n"
	"\n"
	"Serves the store as castore gRPC (BlobService and DirectoryService,\n"
	"under both snix.castore.v1 and tvix.castore.v1) over HTTP/2 "
	"cleartext,\n"
	"until SIGINT or SIGTERM. Clients reach it as grpc+http://HOST:PORT "
	"or\n"
	"grpc+unix:///PATH. Port 0 picks a free port; the address is printed "
	"as\n"
	"\"listening on ADDR\".\n"
	"\n"
	"There is no TLS and no authentication: whoever can connect can read\n"
	"everything and, unless --read-only, write (Put) to the store. "
	"Listen on\n"
	"127.0.0.1 or a unix socket, and put a TLS proxy with client "
	"certificates\n"
	"in front when others need it (docs/remote.md, \"Exposing serve\"). "
	"An\n"
	"address of every interface (:PORT, 0.0.0.0, [::]) is said on "
	"stderr.\n"
	"\n"
	"  --read-only          refuse every Put (PERMISSION_DENIED)\n"
	"  --reserve SIZE       refuse Put (RESOURCE_EXHAUSTED) while the "
	"store's\n"
	"                       file system has less free (K, M, G, T; "
	"default 1G,\n"
	"                       or 5% of the file system if less; 0: no "
	"check)\n"
	"  --max-connections N  at once (default 256); a new one takes the "
	"place\n"
	"                       of the one idle the longest\n"
	"  --idle-timeout S     close a connection silent both ways for S "
	"seconds\n"
	"                       (default 120)\n"
	"  --threads N          event loops carrying the connections "
	"(default 4)\n";

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

static int parse_count(const char *opt, const char *arg, unsigned max,
		       unsigned *ret)
{
	uint64_t v;
	if (cas_cli_parse_size(arg, false, &v) < 0 || v == 0 || v > max)
		return cas_cli_usage("serve",
				     "--%s %s: not a number from 1 to %u", opt,
				     arg, max);
	*ret = (unsigned)v;
	return 0;
}

int cmd_serve(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"listen", required_argument, NULL, 'l'},
		{"read-only", no_argument, NULL, 'r'},
		{"reserve", required_argument, NULL, 'R'},
		{"max-connections", required_argument, NULL, 'c'},
		{"idle-timeout", required_argument, NULL, 'i'},
		{"threads", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	struct cas_grpc_serve_options so = {
		.reserve = CAS_GRPC_SERVE_RESERVE_DEFAULT};
	const char *listen = NULL;
	int c;

	while ((c = cas_cli_getopt("serve", argc, argv, "l:h", opts)) != -1) {
		switch (c) {
		case 'l':
			listen = optarg;
			break;
		case 'r':
			so.read_only = true;
			break;
		case 'R':
			if (cas_cli_parse_size(optarg, true, &so.reserve) < 0 ||
			    so.reserve == CAS_GRPC_SERVE_RESERVE_DEFAULT)
				return cas_cli_usage("serve",
						     "--reserve %s: not a size",
						     optarg);
			break;
		case 'c':
			if (parse_count("max-connections", optarg, 1000000,
					&so.max_connections))
				return CAS_EXIT_USAGE;
			break;
		case 'i':
			if (parse_count("idle-timeout", optarg, 1000000,
					&so.idle_timeout))
				return CAS_EXIT_USAGE;
			break;
		case 't':
			if (parse_count("threads", optarg, 1024, &so.threads))
				return CAS_EXIT_USAGE;
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
	/* A read-only server needs no write access to the store. */
	if (cas_cli_open_store_mode(cli,
				    so.read_only ? CAS_CLI_STORE_READ
						 : CAS_CLI_STORE_CREATE,
				    &s) < 0)
		return CAS_EXIT_FAILURE;
	/* Puts land in the store's folder, or in the cache of a remote
	 * store. */
	so.reserve_dir = cas_remote_is_url(cli->store_spec) ? cli->cache_dir
							    : cli->store_spec;

	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	unsigned long mark = cas_log_error_count();
	if (cas_grpc_serve(s, listen, &so, &serve_stop, on_ready, NULL) < 0)
		return cas_cli_store_fail(mark, "serve", "%s: cannot serve",
					  listen);
	return CAS_EXIT_OK;
}
