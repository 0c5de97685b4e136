/* castore gc: what no root reaches in a local store. Only the survey
 * (--dry-run) is built; the sweep waits for the writer pins
 * (docs/design.md, "Writers and gc"). */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "store/local.h"

static const char gc_help[] =
	"Usage: castore gc --dry-run [--json]\n"
	"\n"
	"Marks every object the roots reach and reports what a gc would "
	"remove:\n"
	"blob files, packed or inline small blobs and Directories that no "
	"root\n"
	"reaches, and leftover files in tmp/. Changes nothing. The removal "
	"itself\n"
	"is not built yet, so --dry-run is required.\n"
	"\n"
	"  --dry-run  report only (required for now)\n"
	"  --json     one JSON object instead of the summary line\n";

int cmd_gc(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"dry-run", no_argument, NULL, 'n'},
		{"json", no_argument, NULL, 'j'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	bool dry_run = false, json = false;
	int c;

	while ((c = cas_cli_getopt("gc", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'n':
			dry_run = true;
			break;
		case 'j':
			json = true;
			break;
		case 'h':
			fputs(gc_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 0)
		return cas_cli_usage("gc", "no operands expected");
	if (!dry_run)
		return cas_cli_usage("gc", "removal is not built yet; "
					   "--dry-run reports what would go");
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	if (!cas_store_is_local(s))
		return cas_cli_fail("gc", "%s: gc needs a local store",
				    cli->store_spec);
	unsigned long mark = cas_log_error_count();
	struct cas_gc_stats st;
	int r = cas_local_gc_survey(s, &st);
	if (r < 0)
		return cas_cli_store_fail(mark, "gc", "%s: %s",
					  cli->store_spec, strerror(-r));
	unsigned long long objects =
		st.blob_files + st.small_blobs + st.directories;
	unsigned long long bytes =
		st.blob_file_bytes + st.small_blob_bytes + st.directory_bytes;
	if (json) {
		printf("{\"dry_run\":true,\"reachable\":%llu,"
		       "\"objects\":%llu,\"bytes\":%llu,"
		       "\"blob_files\":%llu,\"blob_file_bytes\":%llu,"
		       "\"small_blobs\":%llu,\"small_blob_bytes\":%llu,"
		       "\"directories\":%llu,\"directory_bytes\":%llu,"
		       "\"tmp_files\":%llu,\"tmp_bytes\":%llu}\n",
		       (unsigned long long)st.reachable, objects, bytes,
		       (unsigned long long)st.blob_files,
		       (unsigned long long)st.blob_file_bytes,
		       (unsigned long long)st.small_blobs,
		       (unsigned long long)st.small_blob_bytes,
		       (unsigned long long)st.directories,
		       (unsigned long long)st.directory_bytes,
		       (unsigned long long)st.tmp_files,
		       (unsigned long long)st.tmp_bytes);
		return CAS_EXIT_OK;
	}
	printf("%s: would remove %llu objects (%llu bytes: %llu blob files, "
	       "%llu small blobs, %llu directories) and %llu tmp files "
	       "(%llu bytes)\n",
	       cli->store_spec, objects, bytes,
	       (unsigned long long)st.blob_files,
	       (unsigned long long)st.small_blobs,
	       (unsigned long long)st.directories,
	       (unsigned long long)st.tmp_files,
	       (unsigned long long)st.tmp_bytes);
	return CAS_EXIT_OK;
}
