/* castore mount MOUNTPOINT [--list-root] [--show-xattr] [--threads N]
 *                          [--allow-other] [--no-passthrough] [--trust-large]
 *                          [--transport auto|io-uring|devfuse] */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "castorefs/castorefs.h"
#include "cli/cli.h"
#include "core/log.h"
#include "transport/devfuse.h"

static const char mount_help[] =
	"Usage: castore mount MOUNTPOINT [--list-root] [--show-xattr]\n"
	"                     [--threads N] [--allow-other] [--trust-large]\n"
	"                     [--transport auto|io-uring|devfuse]\n"
	"\n"
	"Serves the store's named roots as a read-only filesystem at "
	"MOUNTPOINT\n"
	"(one folder entry per root), in the foreground, until an unmount "
	"from\n"
	"outside or SIGINT/SIGTERM: the first detaches the mount (the path "
	"is\n"
	"free at once, files already open keep reading until closed, then it "
	"ends),\n"
	"a second ends it at once. Both end with status 0. SIGUSR1 logs the\n"
	"requests served per opcode. No byte is served before its blob has "
	"hashed\n"
	"right: small blobs at their first read, larger ones (over 64 KiB) "
	"whole\n"
	"at their first open in the mount.\n"
	"\n"
	"  --list-root    allow listing the root folder (else EPERM; looking "
	"up\n"
	"                 a root by name works either way)\n"
	"  --show-xattr   files carry user.castore.blob.digest, folders\n"
	"                 user.castore.directory.digest (hex)\n"
	"  --threads N    worker threads (default: number of CPUs); with\n"
	"                 io_uring also its rings, at most one per CPU\n"
	"  --allow-other  let other users access the mount\n"
	"  --no-passthrough  serve every READ from the daemon (splice) even\n"
	"                 where the kernel could read local blobs directly;\n"
	"                 files then open without asking the daemon\n"
	"  --trust-large  serve blobs over 64 KiB without hashing them first\n"
	"                 (`castore verify` still checks them)\n"
	"  --transport T  auto (default): FUSE over io_uring when the kernel "
	"has\n"
	"                 it on (/sys/module/fuse/parameters/enable_uring), "
	"else\n"
	"                 /dev/fuse; io-uring: that or fail; devfuse: "
	"/dev/fuse\n";

int cmd_mount(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"list-root", no_argument, NULL, 'l'},
		{"show-xattr", no_argument, NULL, 'x'},
		{"threads", required_argument, NULL, 't'},
		{"allow-other", no_argument, NULL, 'o'},
		{"no-passthrough", no_argument, NULL, 'P'},
		{"trust-large", no_argument, NULL, 'L'},
		{"transport", required_argument, NULL, 'T'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	struct cas_fs_options fo = {};
	struct cas_devfuse_options dopts = {
		.fsname = "castore",
		.subtype = "castore",
	};
	int c;

	while ((c = cas_cli_getopt("mount", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'l':
			fo.list_root = true;
			break;
		case 'x':
			fo.show_xattr = true;
			break;
		case 't': {
			uint64_t n;
			if (cas_cli_parse_size(optarg, false, &n) < 0 ||
			    n < 1 || n > 1024)
				return cas_cli_usage(
					"mount",
					"--threads %s: not a number "
					"from 1 to 1024",
					optarg);
			dopts.threads = (unsigned)n;
			break;
		}
		case 'o':
			dopts.allow_other = true;
			break;
		case 'P':
			dopts.no_passthrough = true;
			break;
		case 'L':
			fo.trust_large = true;
			break;
		case 'T':
			if (!strcmp(optarg, "auto"))
				dopts.transport = CAS_DEVFUSE_AUTO;
			else if (!strcmp(optarg, "io-uring"))
				dopts.transport = CAS_DEVFUSE_IO_URING;
			else if (!strcmp(optarg, "devfuse"))
				dopts.transport = CAS_DEVFUSE_DEVFUSE;
			else
				return cas_cli_usage(
					"mount",
					"--transport %s: not auto, io-uring "
					"or devfuse",
					optarg);
			break;
		case 'h':
			fputs(mount_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (optind >= argc)
		return cas_cli_usage("mount", "no MOUNTPOINT given");
	if (optind + 1 < argc)
		return cas_cli_usage("mount", "%s: unexpected argument",
				     argv[optind + 1]);
	dopts.mountpoint = argv[optind];

	/* One fd per open file: let as many be open as the system allows. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}

	_cleanup_(cas_store_freep) cas_store *store = NULL;
	if (cas_cli_open_store(cli, false, &store) < 0)
		return CAS_EXIT_FAILURE;

	struct cas_fs *fs = NULL;
	unsigned long mark = cas_log_error_count();
	int r = cas_fs_new(store, &fo, &fs);
	if (r < 0)
		return cas_cli_store_fail(mark, "mount", "store %s: %s",
					  cli->store_spec, strerror(-r));

	struct cas_devfuse *dev = NULL;
	r = cas_devfuse_mount(&dopts, &dev);
	if (r < 0) {
		/* Already said, naming the mountpoint and the reason. */
		cas_fs_free(fs);
		return CAS_EXIT_FAILURE;
	}
	struct cas_fuse_config cfg;
	cas_cli_fuse_config(&cfg);
	cas_devfuse_configure(dev, &cfg);
	struct cas_fuse_session *session = NULL;
	r = cas_fuse_session_new(cas_fs_ops(), fs, &cfg, &session);
	if (r < 0) {
		cas_devfuse_free(dev);
		cas_fs_free(fs);
		return cas_cli_fail("mount", "%s: FUSE session: %s",
				    dopts.mountpoint, strerror(-r));
	}
	r = cas_devfuse_serve(dev, session);
	cas_devfuse_free(dev);
	cas_fuse_session_log_counts(session, CAS_LOG_INFO, "requests");
	cas_fuse_session_free(session);
	if (cas_log_get_level() >= CAS_LOG_INFO) {
		struct cas_fs_stats st;
		cas_fs_get_stats(fs, &st);
		cas_log_info("%zu inodes, %zu bytes at unmount", st.inodes,
			     st.memory_bytes);
	}
	cas_fs_free(fs);
	/* A failure of the transport is said where it happened, naming the
	 * mountpoint or the worker and the reason. */
	if (r < 0)
		return CAS_EXIT_FAILURE;
	return CAS_EXIT_OK;
}
