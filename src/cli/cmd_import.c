/* castore import PATH [--name NAME] [--threads N] [--skip-special]
 *                [--skip-private] [--exclude PATTERN]... [--json] */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/json.h"
#include "core/log.h"
#include "core/util.h"
#include "store/import.h"
#include "store/local.h"

static const char import_help[] =
	"Usage: castore import PATH [--name NAME] [--threads N] "
	"[--skip-special]\n"
	"                      [--skip-private] [--exclude PATTERN]... "
	"[--json]\n"
	"\n"
	"Ingests the tree at PATH (directories, regular files, symlinks) and\n"
	"registers it as root NAME (default: the last component of PATH).\n"
	"Prints the root node: NAME TYPE DIGEST SIZE (see docs/cli.md). What\n"
	"castore v1 cannot keep (special files, setuid/setgid/sticky bits,\n"
	"private modes, owners, xattrs, hard links) is counted in one line on\n"
	"stderr.\n"
	"\n"
	"  --name NAME        root name to register\n"
	"  --threads N        hashing threads (default: number of CPUs)\n"
	"  --skip-special     skip fifos, sockets and device nodes (default: "
	"error)\n"
	"  --skip-private     leave out files and folders not readable by "
	"everyone\n"
	"                     (default: import them, readable by everyone)\n"
	"  --exclude PATTERN  leave out what matches (repeatable): without a "
	"'/',\n"
	"                     a glob on the name at any depth ('*.pyc'); with "
	"one,\n"
	"                     on the path relative to PATH ('proc/*', "
	"'/dev');\n"
	"                     a trailing '/' matches folders only\n"
	"  --json             print the root and the counts as one JSON "
	"object\n";

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

/* "N what" to the report, when N is not 0. */
static void loss(char *buf, size_t size, size_t *len, uint64_t n,
		 const char *one, const char *many)
{
	if (!n || *len >= size)
		return;
	int k = snprintf(buf + *len, size - *len, "%s%" PRIu64 " %s",
			 *len ? ", " : "", n, n == 1 ? one : many);
	if (k > 0)
		*len += (size_t)k;
}

/* One line on stderr of what castore v1 did not keep; none when nothing
 * was lost. docs/cli.md says why each cannot be kept. */
static void report_losses(const char *path, const struct cas_import_progress *p)
{
	char buf[1024];
	size_t len = 0;
	loss(buf, sizeof(buf), &len, p->special, "special file skipped",
	     "special files skipped");
	loss(buf, sizeof(buf), &len, p->setid,
	     "setuid/setgid/sticky mode dropped",
	     "setuid/setgid/sticky modes dropped");
	loss(buf, sizeof(buf), &len, p->private_kept,
	     "private file or folder now readable by everyone",
	     "private files and folders now readable by everyone");
	loss(buf, sizeof(buf), &len, p->private_skipped,
	     "private file or folder skipped",
	     "private files and folders skipped");
	loss(buf, sizeof(buf), &len, p->owners, "owner other than root dropped",
	     "owners other than root dropped");
	loss(buf, sizeof(buf), &len, p->xattrs,
	     "file or folder with xattrs (dropped)",
	     "files and folders with xattrs (dropped)");
	loss(buf, sizeof(buf), &len, p->hardlinks,
	     "hard-linked file stored as a file of its own",
	     "hard-linked files stored as files of their own");
	if (len)
		cas_log_warning("%s: not kept (castore v1 cannot hold "
				"it, see docs/cli.md): %s",
				path, buf);
}

static void print_json(const char *name, const cas_node *node,
		       const struct cas_import_progress *p)
{
	cas_node named = *node;
	named.name = (const uint8_t *)name;
	named.name_len = strlen(name);
	fputs("{\"root\":", stdout);
	cas_json_node(stdout, &named, true);
	printf(",\"files\":%" PRIu64 ",\"directories\":%" PRIu64
	       ",\"symlinks\":%" PRIu64 ",\"bytes\":%" PRIu64
	       ",\"blobs_added\":%" PRIu64 ",\"excluded\":%" PRIu64
	       ",\"not_kept\":{\"special_skipped\":%" PRIu64
	       ",\"setid_dropped\":%" PRIu64 ",\"private_kept\":%" PRIu64
	       ",\"private_skipped\":%" PRIu64 ",\"owners_dropped\":%" PRIu64
	       ",\"xattrs_dropped\":%" PRIu64 ",\"hardlinks_split\":%" PRIu64
	       "}}\n",
	       p->files, p->directories, p->symlinks, p->bytes, p->blobs_added,
	       p->excluded, p->special, p->setid, p->private_kept,
	       p->private_skipped, p->owners, p->xattrs, p->hardlinks);
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
		{"skip-special", no_argument, NULL, 's'},
		{"skip-private", no_argument, NULL, 'p'},
		{"exclude", required_argument, NULL, 'x'},
		{"json", no_argument, NULL, 'j'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ cas_node *node = NULL;
	_cleanup_free_ char *def = NULL;
	_cleanup_free_ const char **excludes = NULL;
	size_t n_excludes = 0, cap_excludes = 0;
	bool skip_special = false, skip_private = false, json = false;
	struct cas_import_progress counts = {0};
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
		case 's':
			skip_special = true;
			break;
		case 'p':
			skip_private = true;
			break;
		case 'j':
			json = true;
			break;
		case 'x':
			if (!optarg[strspn(optarg, "/")])
				return cas_cli_usage(
					"import",
					"--exclude '%s': empty pattern",
					optarg);
			if (cas_array_grow(&excludes, &cap_excludes,
					   n_excludes + 1, sizeof(*excludes),
					   8) < 0)
				return cas_cli_fail("import", "--exclude: %s",
						    strerror(ENOMEM));
			excludes[n_excludes++] = optarg;
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
		.skip_special = skip_special,
		.skip_private = skip_private,
		.excludes = excludes,
		.n_excludes = n_excludes,
	};
	if (cli->progress) {
		clock_gettime(CLOCK_MONOTONIC, &ps.start);
		io.progress = show_progress;
		io.userdata = &ps;
	}
	unsigned long mark = cas_log_error_count();
	r = cas_import(s, path, name, &io, &node, &counts);
	if (ps.shown)
		(void)!write(STDERR_FILENO, "\r\033[K", 4);
	if (r < 0)
		return cas_cli_store_fail(mark, "import", "%s: %s", path,
					  strerror(-r));
	report_losses(path, &counts);
	if (json)
		print_json(name, node, &counts);
	else
		cas_cli_print_root(name, node);
	return CAS_EXIT_OK;
}
