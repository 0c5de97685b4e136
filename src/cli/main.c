/* castore: global options, then one verb per file (cmd_*.c). */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/log.h"

#ifndef CAS_VERSION
#define CAS_VERSION "unknown"
#endif

/* `each`: the verb goes on after a failure and names each one (the
 * servers, verify, gc); the others end at their first failure, which is
 * then one line whoever logs it (cas_log_set_first_error_only). */
static const struct {
	const char *name;
	cas_cli_verb fn;
	const char *summary;
	bool each;
} verbs[] = {
	{"import", cmd_import,
	 "import PATH [--name NAME]  ingest a tree, register a root", false},
	{"export", cmd_export,
	 "export NAME[/PATH] DEST    write a root back to disk", false},
	{"ls", cmd_ls, "ls NAME[/PATH]             list through the store",
	 false},
	{"cat", cmd_cat,
	 "cat NAME/PATH              print a file through the store", false},
	{"mount", cmd_mount,
	 "mount MOUNTPOINT ...       serve the roots over FUSE", true},
	{"virtiofs", cmd_virtiofs,
	 "virtiofs --socket PATH ... serve the roots to a VM", true},
	{"verify", cmd_verify,
	 "verify                     check the whole store", true},
	{"gc", cmd_gc, "gc --dry-run [--json]      what no root reaches", true},
	{"blob", cmd_blob, "blob put|cat|stat ...      blobs by digest", false},
	{"dir", cmd_dir, "dir put|get ...            Directories by digest",
	 false},
	{"roots", cmd_roots, "roots list|add|rm ...      named roots", false},
#ifdef CAS_HAVE_REMOTE
	{"serve", cmd_serve,
	 "serve --listen ADDR        the store as tvix castore gRPC", true},
	{"push", cmd_push,
	 "push URL NAME...           copy roots to a gRPC store", false},
	{"publish", cmd_publish,
	 "publish DIR [NAME...]      write the static HTTP layout", false},
#endif
};

static void usage(FILE *f)
{
	fputs("Usage: castore [--store DIR|URL] [--cache DIR] [--cache-max "
	      "SIZE] VERB ...\n"
	      "\n"
	      "Verbs (VERB --help for each):\n",
	      f);
	for (size_t i = 0; i < CAS_ARRAY_SIZE(verbs); i++)
		fprintf(f, "  %s\n", verbs[i].summary);
	fputs("\n"
	      "  --store DIR|URL   the store (else $CASTORE_STORE, else\n"
	      "                    "
	      "${XDG_DATA_HOME:-$HOME/.local/share}/castore)\n"
	      "  --cache DIR       local cache of a remote store (else "
	      "$CASTORE_CACHE,\n"
	      "                    else "
	      "${XDG_CACHE_HOME:-$HOME/.cache}/castore)\n"
	      "  --cache-max SIZE  bound the cache (K, M, G, T suffixes)\n"
	      "  --help, --version\n"
	      "\n"
	      "Exit status: 0 success, 1 failure, 2 usage error.\n",
	      f);
}

/* $XDG_VAR/castore, else $HOME/FALLBACK/castore; NULL without either. */
static char *default_dir(const char *xdg_var, const char *fallback)
{
	const char *xdg = getenv(xdg_var);
	const char *home = getenv("HOME");
	char *ret = NULL;

	if (xdg && *xdg == '/') {
		if (asprintf(&ret, "%s/castore", xdg) < 0)
			return NULL;
	} else if (home && *home) {
		if (asprintf(&ret, "%s/%s/castore", home, fallback) < 0)
			return NULL;
	}
	return ret;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"store", required_argument, NULL, 's'},
		{"cache", required_argument, NULL, 'c'},
		{"cache-max", required_argument, NULL, 'm'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{},
	};
	struct cas_cli cli = {};
	_cleanup_free_ char *def_store = NULL, *def_cache = NULL;
	const char *cache_max = NULL;
	int c;

	cas_cli_set_verb("castore");
	/* '+': stop at the verb, whose options are its own. */
	while ((c = cas_cli_getopt("castore", argc, argv, "+h", opts)) != -1) {
		switch (c) {
		case 's':
			cli.store_spec = optarg;
			break;
		case 'c':
			cli.cache_dir = optarg;
			break;
		case 'm':
			cache_max = optarg;
			break;
		case 'h':
			usage(stdout);
			return cas_cli_finish(CAS_EXIT_OK);
		case 'V':
			printf("castore %s\n", CAS_VERSION);
			return cas_cli_finish(CAS_EXIT_OK);
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (optind >= argc)
		return cas_cli_usage(
			"castore", "no verb given (castore --help lists them)");

	if (cache_max &&
	    cas_cli_parse_size(cache_max, true, &cli.cache_max) < 0)
		return cas_cli_usage("castore", "--cache-max %s: not a size",
				     cache_max);
	if (!cli.store_spec || !*cli.store_spec)
		cli.store_spec = getenv("CASTORE_STORE");
	if (!cli.store_spec || !*cli.store_spec)
		cli.store_spec = def_store =
			default_dir("XDG_DATA_HOME", ".local/share");
	if (!cli.cache_dir || !*cli.cache_dir)
		cli.cache_dir = getenv("CASTORE_CACHE");
	if (!cli.cache_dir || !*cli.cache_dir)
		cli.cache_dir = def_cache =
			default_dir("XDG_CACHE_HOME", ".cache");
	cli.progress = isatty(STDERR_FILENO);

	const char *verb = argv[optind];
	for (size_t i = 0; i < CAS_ARRAY_SIZE(verbs); i++) {
		if (strcmp(verb, verbs[i].name))
			continue;
		int vargc = argc - optind;
		char **vargv = argv + optind;
		optind = 0; /* the verb scans its own options from scratch */
		cas_cli_set_verb(verbs[i].name);
		cas_log_set_first_error_only(!verbs[i].each);
		return cas_cli_finish(verbs[i].fn(&cli, vargc, vargv));
	}
	return cas_cli_usage("castore",
			     "%s: unknown verb (castore --help lists them)",
			     verb);
}
