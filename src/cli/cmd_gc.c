/* castore gc: collect a local store or a remote store's cache
 * (store/local.h, cas_local_gc), or a published layout (--published;
 * remote/publish_gc.c). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"
#include "store/local.h"
#ifdef CAS_HAVE_REMOTE
#include "remote/remote.h"
#endif

static const char gc_help[] =
	"Usage: castore gc [--grace DURATION] [--dry-run] [--json]\n"
	"       castore gc --published DIR [--grace DURATION] [--dry-run] "
	"[--json]\n"
	"\n"
	"Removes every blob file, packed blob and Directory that no root "
	"reaches\n"
	"and that was written more than DURATION ago (default 1h; 0 "
	"collects\n"
	"everything unreachable), rewrites packs that are mostly dead, and "
	"removes\n"
	"what crashed writers left in tmp/ and packs/. Safe beside imports, "
	"mounts,\n"
	"serve and publish. With a remote --store, collects its cache "
	"(--cache).\n"
	"With --published, collects a layout written by `castore publish`: "
	"objects\n"
	"no published root has reached for DURATION.\n"
	"\n"
	"  --grace DURATION  keep what is younger: N[s|m|h|d] (default 1h)\n"
	"  --dry-run         report what would go, change nothing\n"
	"  --json            one JSON object instead of the summary line\n";

/* "90", "90s", "15m", "1h", "2d" -> seconds. */
static int parse_duration(const char *s, uint64_t *ret)
{
	char *end;
	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	unsigned long long n = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	uint64_t mul = 1;
	if (*end == 's')
		end++;
	else if (*end == 'm')
		mul = 60, end++;
	else if (*end == 'h')
		mul = 3600, end++;
	else if (*end == 'd')
		mul = 86400, end++;
	if (*end || n > UINT64_MAX / mul / 2)
		return -EINVAL;
	*ret = n * mul;
	return 0;
}

static void print_stats(const char *what, const struct cas_gc_stats *st,
			bool dry_run, bool json)
{
	unsigned long long objects = st->blob_files + st->partial_blobs +
				     st->small_blobs + st->directories;
	unsigned long long bytes = st->blob_file_bytes + st->partial_bytes +
				   st->small_blob_bytes + st->directory_bytes;
	if (json) {
		printf("{\"dry_run\":%s,\"reachable\":%llu,"
		       "\"objects\":%llu,\"bytes\":%llu,"
		       "\"blob_files\":%llu,\"blob_file_bytes\":%llu,"
		       "\"partial_blobs\":%llu,\"partial_bytes\":%llu,"
		       "\"small_blobs\":%llu,\"small_blob_bytes\":%llu,"
		       "\"directories\":%llu,\"directory_bytes\":%llu,"
		       "\"kept_young\":%llu,"
		       "\"tmp_files\":%llu,\"tmp_bytes\":%llu,"
		       "\"packs_rewritten\":%llu,\"packs_removed\":%llu,"
		       "\"packs_truncated\":%llu,\"pack_bytes\":%llu,"
		       "\"seconds\":%.3f}\n",
		       dry_run ? "true" : "false",
		       (unsigned long long)st->reachable, objects, bytes,
		       (unsigned long long)st->blob_files,
		       (unsigned long long)st->blob_file_bytes,
		       (unsigned long long)st->partial_blobs,
		       (unsigned long long)st->partial_bytes,
		       (unsigned long long)st->small_blobs,
		       (unsigned long long)st->small_blob_bytes,
		       (unsigned long long)st->directories,
		       (unsigned long long)st->directory_bytes,
		       (unsigned long long)st->kept_young,
		       (unsigned long long)st->tmp_files,
		       (unsigned long long)st->tmp_bytes,
		       (unsigned long long)st->packs_rewritten,
		       (unsigned long long)st->packs_removed,
		       (unsigned long long)st->packs_truncated,
		       (unsigned long long)st->pack_bytes, st->seconds);
		return;
	}
	printf("%s: %s %llu objects (%llu bytes: %llu blob files, %llu partial "
	       "blobs, %llu packed blobs, %llu directories), %llu tmp files "
	       "(%llu bytes); "
	       "packs: %llu rewritten, %llu removed, %llu truncated (%llu "
	       "bytes); %.2f s\n",
	       what, dry_run ? "would remove" : "removed", objects, bytes,
	       (unsigned long long)st->blob_files,
	       (unsigned long long)st->partial_blobs,
	       (unsigned long long)st->small_blobs,
	       (unsigned long long)st->directories,
	       (unsigned long long)st->tmp_files,
	       (unsigned long long)st->tmp_bytes,
	       (unsigned long long)st->packs_rewritten,
	       (unsigned long long)st->packs_removed,
	       (unsigned long long)st->packs_truncated,
	       (unsigned long long)st->pack_bytes, st->seconds);
}

int cmd_gc(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"grace", required_argument, NULL, 'g'},
		{"dry-run", no_argument, NULL, 'n'},
		{"json", no_argument, NULL, 'j'},
		{"published", required_argument, NULL, 'p'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	struct cas_gc_options o = {.grace_s = 3600};
	bool json = false;
	const char *published = NULL;
	int c;

	while ((c = cas_cli_getopt("gc", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'g':
			if (parse_duration(optarg, &o.grace_s) < 0)
				return cas_cli_usage(
					"gc",
					"--grace %s: not a duration "
					"(N, Ns, Nm, Nh or Nd)",
					optarg);
			break;
		case 'n':
			o.dry_run = true;
			break;
		case 'j':
			json = true;
			break;
		case 'p':
			published = optarg;
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
	unsigned long mark = cas_log_error_count();
	struct cas_gc_stats st;
	int r;
	if (published) {
#ifdef CAS_HAVE_REMOTE
		r = cas_remote_publish_gc(published, &o, &st);
		if (r < 0)
			return cas_cli_store_fail(mark, "gc", "%s: %s",
						  published, strerror(-r));
		print_stats(published, &st, o.dry_run, json);
		return CAS_EXIT_OK;
#else
		return cas_cli_fail("gc", "%s: remote stores not built in",
				    published);
#endif
	}
	/* A remote store's cache is an ordinary local store: collected as
	 * one (docs/remote.md, "Caches and gc"). */
	struct cas_cli local = *cli;
#ifdef CAS_HAVE_REMOTE
	if (cli->store_spec && cas_remote_is_url(cli->store_spec))
		local.store_spec = cli->cache_dir;
#endif
	if (cas_cli_open_store_mode(&local,
				    o.dry_run ? CAS_CLI_STORE_READ
					      : CAS_CLI_STORE_WRITE,
				    &s) < 0)
		return CAS_EXIT_FAILURE;
	if (!cas_store_is_local(s))
		return cas_cli_fail("gc", "%s: gc needs a local store",
				    local.store_spec);
	r = cas_local_gc(s, &o, &st);
	if (r < 0)
		return cas_cli_store_fail(mark, "gc", "%s: %s",
					  local.store_spec, strerror(-r));
	print_stats(local.store_spec, &st, o.dry_run, json);
	return CAS_EXIT_OK;
}
