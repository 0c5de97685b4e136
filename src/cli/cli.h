/* cli.h - what the verbs of the `castore` command share.
 *
 * Contract: single-threaded (the CLI's main thread). Each verb gets argv
 * starting at its own name and returns the exit status: 0 success,
 * 1 failure, 2 usage error. Errors go to stderr as one line naming the
 * object (path, digest or root) and the reason; only the CLI writes to
 * stdout.
 */
#ifndef CAS_CLI_CLI_H
#define CAS_CLI_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "store/store.h"

#define CAS_EXIT_OK 0
#define CAS_EXIT_FAILURE 1
#define CAS_EXIT_USAGE 2

struct cas_cli {
	/* --store, else $CASTORE_STORE, else the default (docs/cli.md). A
	 * folder, or a remote URL (grpc+http://, grpc+unix://, http(s)://). */
	const char *store_spec;
	/* --cache, else $CASTORE_CACHE, else the default (remote stores). */
	const char *cache_dir;
	uint64_t cache_max; /* --cache-max, 0: unbounded */
	bool progress;      /* stderr is a terminal */
};

/* Opens the store named by cli->store_spec: a local folder (created when
 * `create`) or a remote store behind its cache. Prints the error itself;
 * returns -errno. */
int cas_cli_open_store(struct cas_cli *cli, bool create, cas_store **ret);

/* Prints "castore VERB: <message>" and returns CAS_EXIT_USAGE. */
int cas_cli_usage(const char *verb, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

typedef int (*cas_cli_verb)(struct cas_cli *cli, int argc, char **argv);

int cmd_import(struct cas_cli *cli, int argc, char **argv);
int cmd_export(struct cas_cli *cli, int argc, char **argv);
int cmd_ls(struct cas_cli *cli, int argc, char **argv);
int cmd_cat(struct cas_cli *cli, int argc, char **argv);
int cmd_blob(struct cas_cli *cli, int argc, char **argv);
int cmd_dir(struct cas_cli *cli, int argc, char **argv);
int cmd_roots(struct cas_cli *cli, int argc, char **argv);
int cmd_verify(struct cas_cli *cli, int argc, char **argv);
int cmd_mount(struct cas_cli *cli, int argc, char **argv);
int cmd_virtiofs(struct cas_cli *cli, int argc, char **argv);
#ifdef CAS_HAVE_REMOTE
int cmd_serve(struct cas_cli *cli, int argc, char **argv);
int cmd_push(struct cas_cli *cli, int argc, char **argv);
int cmd_publish(struct cas_cli *cli, int argc, char **argv);
#endif

#endif
