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

#define CAS_EXIT_OK	 0
#define CAS_EXIT_FAILURE 1
#define CAS_EXIT_USAGE	 2

struct cas_cli {
	/* --store, else $CASTORE_STORE, else the default (docs/cli.md). A
	 * folder, or a remote URL (grpc+http://, grpc+unix://, http(s)://). */
	const char *store_spec;
	/* --cache, else $CASTORE_CACHE, else the default (remote stores). */
	const char *cache_dir;
	uint64_t cache_max; /* --cache-max, 0: unbounded */
	bool progress;	    /* stderr is a terminal */
};

/* Opens the store named by cli->store_spec: a local folder (created when
 * `create`) or a remote store behind its cache. Prints the error itself;
 * returns -errno. Without `create` a local store is opened read-only. */
int cas_cli_open_store(struct cas_cli *cli, bool create, cas_store **ret);
/* The store named is a remote URL (whose reads may fetch). */
bool cas_cli_store_is_remote(const struct cas_cli *cli);

enum cas_cli_store_mode {
	CAS_CLI_STORE_READ,   /* local: read-only, must exist */
	CAS_CLI_STORE_WRITE,  /* local: writable, must exist */
	CAS_CLI_STORE_CREATE, /* local: writable, created when missing */
};
int cas_cli_open_store_mode(struct cas_cli *cli, enum cas_cli_store_mode mode,
			    cas_store **ret);

/* Names the verb running: every line logged from now on, by any layer,
 * reads "castore VERB: OBJECT: reason" (docs/cli.md). main calls it with
 * the verb, a verb with sub-verbs again with "blob cat" and the like.
 * "castore" (before a verb is known) gives "castore: ". */
void cas_cli_set_verb(const char *verb);

/* Prints "castore VERB: <message>" and returns CAS_EXIT_USAGE. Like every
 * error line it goes through core/log (cut in the middle past 2 KiB, CR
 * and LF shown as '?'), and it is not written when the verb ends at its
 * first failure and a line has been written already. A NULL verb is the
 * verb running (cas_cli_set_verb). */
int cas_cli_usage(const char *verb, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Prints "castore VERB: <message>" and returns CAS_EXIT_FAILURE. */
int cas_cli_fail(const char *verb, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* The same after a library call that began when cas_log_error_count()
 * was `mark`: prints nothing if the library has logged the failure itself
 * (it names the object), so a failure stays one line. */
int cas_cli_store_fail(unsigned long mark, const char *verb, const char *fmt,
		       ...) __attribute__((format(printf, 3, 4)));

/* Parses a digest given as 64 hex characters; prints a usage error and
 * returns CAS_EXIT_USAGE otherwise, 0 on success. */
int cas_cli_parse_digest(const char *verb, const char *hex, cas_digest *ret);

/* Parses a non-negative decimal integer, with a K/M/G/T suffix (powers of
 * 1024) when `suffixes`. -EINVAL or -ERANGE on anything else. */
int cas_cli_parse_size(const char *s, bool suffixes, uint64_t *ret);

/* Resolves NAME[/PATH] (a root, then entries through its Directories with
 * cas_directory_find) to a node that the caller frees with free(). Prints
 * the error (naming `spec`) and returns CAS_EXIT_FAILURE, or
 * CAS_EXIT_USAGE for an invalid root name; 0 on success. */
int cas_cli_resolve(const char *verb, cas_store *s, const char *spec,
		    cas_node **ret);

/* Checks the root name of NAME[/PATH] before a store is opened: prints a
 * usage error and returns CAS_EXIT_USAGE, else 0. */
int cas_cli_check_spec(const char *verb, const char *spec);

/* Copies a blob's bytes to fd; prints the error naming the digest. */
int cas_cli_blob_copy(const char *verb, cas_store *s, const cas_digest *d,
		      int fd);

/* Prints a root as one line of `roots list` (and of what import prints):
 * NAME directory DIGEST SIZE | NAME file DIGEST SIZE [executable] |
 * NAME symlink TARGET. */
void cas_cli_print_root(const char *name, const cas_node *node);

/* Flushes stdout; prints an error and returns CAS_EXIT_FAILURE if writing
 * it failed, else `status`. */
int cas_cli_finish(int status);

/* Scans the options of a verb: getopt_long with the verb's own messages
 * (unknown option, missing argument) as usage errors. Returns the option
 * character, -1 at the end, or '?' after printing a usage error. */
struct option;
int cas_cli_getopt(const char *verb, int argc, char **argv,
		   const char *shortopts, const struct option *longopts);

/* The FUSE engine config both serving verbs start from (read-only, the
 * engine's defaults); each transport then sets its own part
 * (cas_devfuse_configure, cas_virtiofs_configure) before the session is
 * made, so mount and virtiofs are configured the same way. */
struct cas_fuse_config;
void cas_cli_fuse_config(struct cas_fuse_config *cfg);

typedef int (*cas_cli_verb)(struct cas_cli *cli, int argc, char **argv);

int cmd_import(struct cas_cli *cli, int argc, char **argv);
int cmd_export(struct cas_cli *cli, int argc, char **argv);
int cmd_ls(struct cas_cli *cli, int argc, char **argv);
int cmd_cat(struct cas_cli *cli, int argc, char **argv);
int cmd_blob(struct cas_cli *cli, int argc, char **argv);
int cmd_dir(struct cas_cli *cli, int argc, char **argv);
int cmd_roots(struct cas_cli *cli, int argc, char **argv);
int cmd_verify(struct cas_cli *cli, int argc, char **argv);
int cmd_gc(struct cas_cli *cli, int argc, char **argv);
int cmd_mount(struct cas_cli *cli, int argc, char **argv);
int cmd_virtiofs(struct cas_cli *cli, int argc, char **argv);
#ifdef CAS_HAVE_REMOTE
int cmd_serve(struct cas_cli *cli, int argc, char **argv);
int cmd_push(struct cas_cli *cli, int argc, char **argv);
int cmd_publish(struct cas_cli *cli, int argc, char **argv);
#endif

#endif
