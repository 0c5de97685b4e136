/* castore import PATH [--name NAME] [--threads N] */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "store/import.h"
#include "store/local.h"

static const char import_help[] =
	"Usage: castore import PATH [--name NAME] [--threads N]\n"
	"\n"
	"Ingests the tree at PATH (directories, regular files, symlinks) and\n"
	"registers it as root NAME (default: the last component of PATH).\n"
	"Prints the root node: NAME TYPE DIGEST SIZE (see docs/cli.md).\n"
	"\n"
	"  --name NAME    root name to register\n"
	"  --threads N    hashing threads (default: number of CPUs)\n";

struct progress_state {
	struct timespec start;
	struct timespec last;
	bool shown;
};

static double seconds_since(const struct timespec *a, const struct timespec *b)
{
	return (double)(b->tv_sec - a->tv_sec) +
	       (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

static void human_bytes(double v, char *buf, size_t size)
{
	static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
	size_t u = 0;
	while (v >= 1024 && u + 1 < CAS_ARRAY_SIZE(units)) {
		v /= 1024;
		u++;
	}
	snprintf(buf, size, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void show_progress(void *userdata, const struct cas_import_progress *p)
{
	struct progress_state *ps = userdata;
	struct timespec now;
	char bytes[32], rate[32], line[160];

	clock_gettime(CLOCK_MONOTONIC, &now);
	/* At most ten updates a second: a terminal is slow to redraw. */
	if (ps->shown && seconds_since(&ps->last, &now) < 0.1)
		return;
	ps->last = now;
	ps->shown = true;
	double secs = seconds_since(&ps->start, &now);
	human_bytes((double)p->bytes, bytes, sizeof(bytes));
	human_bytes(secs > 0 ? (double)p->bytes / secs : 0, rate, sizeof(rate));
	int n = snprintf(line, sizeof(line),
			 "\r%" PRIu64 " files, %s, %s/s\033[K", p->files, bytes,
			 rate);
	if (n > 0)
		(void)!write(STDERR_FILENO, line,
			     CAS_MIN((size_t)n, sizeof(line) - 1));
}

/* The last component of path, trailing slashes stripped (malloc'd). */
static char *last_component(const char *path)
{
	size_t len = strlen(path);
	while (len > 1 && path[len - 1] == '/')
		len--;
	const char *start = path + len;
	while (start > path && start[-1] != '/')
		start--;
	return strndup(start, (size_t)(path + len - start));
}

/* The default root name: the last component of PATH, or for "." and ".."
 * that of the folder they stand for. */
static char *default_name(const char *path)
{
	char *name = last_component(path);
	if (name && (!strcmp(name, ".") || !strcmp(name, ".."))) {
		_cleanup_free_ char *real = realpath(path, NULL);
		if (real) {
			free(name);
			name = last_component(real);
		}
	}
	return name;
}

int cmd_import(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"name", required_argument, NULL, 'n'},
		{"threads", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ cas_node *node = NULL;
	_cleanup_free_ char *def = NULL;
	const char *name = NULL;
	uint64_t threads = 0;
	struct progress_state ps = {};
	struct stat st;
	int c, r;

	while ((c = cas_cli_getopt("import", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 't':
			if (cas_cli_parse_size(optarg, false, &threads) < 0 ||
			    threads > 1024)
				return cas_cli_usage(
					"import",
					"--threads %s: not a thread count",
					optarg);
			break;
		case 'h':
			fputs(import_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 1)
		return cas_cli_usage("import", argc - optind
						       ? "one PATH expected"
						       : "missing PATH");
	const char *path = argv[optind];
	if (!*path)
		return cas_cli_usage("import", "empty PATH");
	if (!name) {
		name = def = default_name(path);
		if (!def)
			return cas_cli_fail("import", "%s: %s", path,
					    strerror(ENOMEM));
		if (!cas_root_name_valid(name))
			return cas_cli_usage(
				"import",
				"%s: no root name in this path, give --name",
				path);
	}
	if (!cas_root_name_valid(name))
		return cas_cli_usage("import", "%s: invalid root name", name);
	/* A missing PATH is named here, before a store is created for it. */
	if (lstat(path, &st) < 0)
		return cas_cli_fail("import", "%s: %m", path);

	if (cas_cli_open_store(cli, true, &s) < 0)
		return CAS_EXIT_FAILURE;
	if (!cas_store_is_local(s))
		return cas_cli_fail("import", "%s: import needs a local store",
				    cli->store_spec);

	struct cas_import_options io = {
		.threads = (unsigned)threads,
	};
	if (cli->progress) {
		clock_gettime(CLOCK_MONOTONIC, &ps.start);
		io.progress = show_progress;
		io.userdata = &ps;
	}
	unsigned long mark = cas_log_error_count();
	r = cas_import(s, path, name, &io, &node, NULL);
	if (ps.shown)
		(void)!write(STDERR_FILENO, "\r\033[K", 4);
	if (r < 0)
		return cas_cli_store_fail(mark, "import", "%s: %s", path,
					  strerror(-r));
	cas_cli_print_root(name, node);
	return CAS_EXIT_OK;
}
