/* castore virtiofs --socket PATH [--list-root] [--show-xattr] [--trust-large]
 *
 * Wires the store to a vhost-user-fs device: store -> castorefs -> FUSE
 * engine -> virtio-fs transport. Each frontend that connects gets a fresh
 * castorefs and engine session (its inode table starts empty), so one
 * guest's leftover lookups never pile up in the next one's. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "castorefs/castorefs.h"
#include "cli/cli.h"
#include "core/log.h"
#include "transport/virtiofs.h"

struct virtiofs_wiring {
	cas_store *store;
	struct cas_fs_options fs_opts;
	struct cas_fuse_config fuse_cfg;
	struct cas_fs *fs; /* of the current session; one frontend at a time */
};

static struct cas_virtiofs *running;

static void on_signal(int sig)
{
	if (running)
		cas_virtiofs_stop(running);
}

static int session_open(void *userdata, struct cas_fuse_session **ret)
{
	struct virtiofs_wiring *w = userdata;
	struct cas_fs *fs;

	int r = cas_fs_new(w->store, &w->fs_opts, &fs);
	if (r < 0)
		return r;
	r = cas_fuse_session_new(cas_fs_ops(), fs, &w->fuse_cfg, ret);
	if (r < 0) {
		cas_fs_free(fs);
		return r;
	}
	w->fs = fs;
	return 0;
}

static void session_close(void *userdata, struct cas_fuse_session *s)
{
	struct virtiofs_wiring *w = userdata;

	cas_fuse_session_log_counts(s, CAS_LOG_INFO, "requests");
	cas_fuse_session_free(s);
	cas_fs_free(w->fs);
	w->fs = NULL;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: castore virtiofs --socket PATH [--list-root] "
		"[--show-xattr]\n"
		"                        [--trust-large]\n"
		"\n"
		"Serves the store's roots to virtual machines as a "
		"vhost-user-fs\n"
		"device on the UNIX socket PATH (QEMU: -chardev "
		"socket,path=PATH\n"
		"-device vhost-user-fs-pci,chardev=...,tag=TAG). Runs in the\n"
		"foreground; a guest that disconnects is followed by the next "
		"one;\n"
		"SIGINT or SIGTERM remove the socket at once and end it once "
		"the\n"
		"connected guest (if any) disconnects; a second signal ends it "
		"now.\n"
		"\n"
		"  --socket PATH   where to listen (a stale socket is "
		"replaced)\n"
		"  --list-root     allow listing the root directory (the "
		"roots)\n"
		"  --show-xattr    user.castore.*.digest extended "
		"attributes\n"
		"  --trust-large   serve blobs over 64 KiB without hashing "
		"them at\n"
		"                  their first open (castore mount --help)\n");
}

int cmd_virtiofs(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"socket", required_argument, NULL, 's'},
		{"list-root", no_argument, NULL, 'l'},
		{"show-xattr", no_argument, NULL, 'x'},
		{"trust-large", no_argument, NULL, 'L'},
		{"help", no_argument, NULL, 'h'},
		{0},
	};
	struct virtiofs_wiring w = {0};
	const char *socket_path = NULL;
	int c;

	while ((c = cas_cli_getopt("virtiofs", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 's':
			socket_path = optarg;
			break;
		case 'l':
			w.fs_opts.list_root = true;
			break;
		case 'x':
			w.fs_opts.show_xattr = true;
			break;
		case 'L':
			w.fs_opts.trust_large = true;
			break;
		case 'h':
			usage(stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (optind < argc)
		return cas_cli_usage("virtiofs", "unexpected argument %s",
				     argv[optind]);
	if (!socket_path)
		return cas_cli_usage("virtiofs", "--socket PATH is required");

	cas_cli_fuse_config(&w.fuse_cfg);
	cas_virtiofs_configure(&w.fuse_cfg);
	int r = cas_cli_open_store(cli, false, &w.store);
	if (r < 0)
		return CAS_EXIT_FAILURE;

	struct cas_virtiofs_config cfg = {
		.socket_path = socket_path,
		.reply_bufsize = cas_fuse_reply_bufsize(&w.fuse_cfg),
		.session_open = session_open,
		.session_close = session_close,
		.userdata = &w,
	};
	struct cas_virtiofs *v;
	unsigned long mark = cas_log_error_count();
	r = cas_virtiofs_new(&cfg, &v);
	if (r < 0) {
		cas_store_free(w.store);
		return cas_cli_store_fail(mark, "virtiofs", "%s: %s",
					  socket_path, strerror(-r));
	}

	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	running = v;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	r = cas_virtiofs_run(v);

	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	running = NULL;
	cas_virtiofs_free(v);
	cas_store_free(w.store);
	return r < 0 ? CAS_EXIT_FAILURE : CAS_EXIT_OK;
}
