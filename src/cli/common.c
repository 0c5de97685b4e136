/* What the verbs share: opening the store, argument parsing, resolving
 * NAME/PATH through the Directories, copying blobs out. */
#include "cli/cli.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/log.h"
#include "core/util.h"
#include "fuse/engine.h"
#include "store/local.h"
#ifdef CAS_HAVE_REMOTE
#include "remote/remote.h"
#endif

/* "castore VERB: " for the verb running (cas_cli_set_verb). */
static char verb_prefix[64] = "castore: ";

void cas_cli_set_verb(const char *verb)
{
	if (!verb || !strcmp(verb, "castore"))
		snprintf(verb_prefix, sizeof(verb_prefix), "castore: ");
	else
		snprintf(verb_prefix, sizeof(verb_prefix),
			 "castore %s: ", verb);
	cas_log_set_prefix(verb_prefix);
}

static void vprint_line(const char *verb, const char *fmt, va_list ap)
	__attribute__((format(printf, 2, 0)));
static void vprint_line(const char *verb, const char *fmt, va_list ap)
{
	/* %m in fmt names errno as the caller left it. */
	int r = -errno;
	char prefix[64];
	/* "castore: ..." for the command itself, "castore VERB: ..." else,
	 * and NULL for the verb running. */
	if (!verb)
		snprintf(prefix, sizeof(prefix), "%s", verb_prefix);
	else if (strcmp(verb, "castore"))
		snprintf(prefix, sizeof(prefix), "castore %s: ", verb);
	else
		snprintf(prefix, sizeof(prefix), "castore: ");
	/* What the verb printed on stdout comes first. */
	fflush(stdout);
	cas_log_prefixed(CAS_LOG_ERROR, prefix, r, fmt, ap);
	errno = -r;
}

int cas_cli_usage(const char *verb, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint_line(verb, fmt, ap);
	va_end(ap);
	return CAS_EXIT_USAGE;
}

int cas_cli_fail(const char *verb, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint_line(verb, fmt, ap);
	va_end(ap);
	return CAS_EXIT_FAILURE;
}

int cas_cli_store_fail(unsigned long mark, const char *verb, const char *fmt,
		       ...)
{
	if (cas_log_error_count() != mark)
		return CAS_EXIT_FAILURE;
	va_list ap;
	va_start(ap, fmt);
	vprint_line(verb, fmt, ap);
	va_end(ap);
	return CAS_EXIT_FAILURE;
}

bool cas_cli_store_is_remote(const struct cas_cli *cli)
{
#ifdef CAS_HAVE_REMOTE
	return cli->store_spec && cas_remote_is_url(cli->store_spec);
#else
	return false;
#endif
}

int cas_cli_open_store(struct cas_cli *cli, bool create, cas_store **ret)
{
	return cas_cli_open_store_mode(
		cli, create ? CAS_CLI_STORE_CREATE : CAS_CLI_STORE_READ, ret);
}

int cas_cli_open_store_mode(struct cas_cli *cli, enum cas_cli_store_mode mode,
			    cas_store **ret)
{
	const char *spec = cli->store_spec;
	int r;

	if (!spec || !*spec) {
		cas_cli_fail(NULL, "no store given");
		return -EINVAL;
	}
#ifdef CAS_HAVE_REMOTE
	if (cas_remote_is_url(spec)) {
		struct cas_remote_options ro = {
			.cache_dir = cli->cache_dir,
			.cache_max = cli->cache_max,
		};
		/* The cache is a local store; the default one lives in
		 * ~/.cache, which may not exist yet. */
		if (cli->cache_dir &&
		    (r = cas_mkdir_parents(cli->cache_dir)) < 0) {
			cas_cli_fail(NULL, "cache %s: %s", cli->cache_dir,
				     strerror(-r));
			return r;
		}
		unsigned long mark = cas_log_error_count();
		r = cas_remote_open(spec, &ro, ret);
		if (r < 0)
			cas_cli_store_fail(mark, NULL, "store %s: %s", spec,
					   strerror(-r));
		return r;
	}
#endif
	/* A URL of a scheme we do not know (grpc://, s3://) is not a folder
	 * to open and say "No such file or directory" about. */
	if (strstr(spec, "://")) {
#ifdef CAS_HAVE_REMOTE
		cas_cli_fail(NULL,
			     "store %s: not a store URL (grpc+http://, "
			     "grpc+https://, grpc+unix:, http://, https://)",
			     spec);
#else
		cas_cli_fail(NULL, "store %s: remote stores not built in",
			     spec);
#endif
		return -EPROTONOSUPPORT;
	}
	struct cas_local_options lo = {
		.create = mode == CAS_CLI_STORE_CREATE,
		.readonly = mode == CAS_CLI_STORE_READ,
	};
	if (mode == CAS_CLI_STORE_CREATE) {
		/* The default store lives in ~/.local/share, which may not
		 * exist yet. */
		r = cas_mkdir_parents(spec);
		if (r < 0) {
			cas_cli_fail(NULL, "store %s: %s", spec, strerror(-r));
			return r;
		}
	}
	unsigned long mark = cas_log_error_count();
	r = cas_local_open(spec, &lo, ret);
	if (r < 0)
		cas_cli_store_fail(mark, NULL, "store %s: %s", spec,
				   strerror(-r));
	return r;
}

int cas_cli_parse_digest(const char *verb, const char *hex, cas_digest *ret)
{
	if (cas_digest_from_hex(hex, ret) < 0)
		return cas_cli_usage(
			verb, "%s: not a digest (64 hex characters)", hex);
	return 0;
}

int cas_cli_parse_size(const char *s, bool suffixes, uint64_t *ret)
{
	uint64_t v = 0;
	const char *p = s;

	if (*p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned dgt = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - dgt) / 10)
			return -ERANGE;
		v = v * 10 + dgt;
	}
	if (*p && suffixes) {
		unsigned shift;
		switch (*p) {
		case 'k':
		case 'K':
			shift = 10;
			break;
		case 'm':
		case 'M':
			shift = 20;
			break;
		case 'g':
		case 'G':
			shift = 30;
			break;
		case 't':
		case 'T':
			shift = 40;
			break;
		default:
			return -EINVAL;
		}
		p++;
		if (*p == 'i' && p[1] == 'B')
			p += 2;
		else if (*p == 'B')
			p++;
		if (v > (UINT64_MAX >> shift))
			return -ERANGE;
		v <<= shift;
	}
	if (*p)
		return -EINVAL;
	*ret = v;
	return 0;
}

int cas_cli_getopt(const char *verb, int argc, char **argv,
		   const char *shortopts, const struct option *longopts)
{
	char spec[64];
	int longindex = -1;

	/* A leading ':' (after '+', if any) reports a missing argument as
	 * ':' instead of '?'. */
	if (shortopts[0] == '+')
		snprintf(spec, sizeof(spec), "+:%s", shortopts + 1);
	else
		snprintf(spec, sizeof(spec), ":%s", shortopts);
	opterr = 0;
	int c = getopt_long(argc, argv, spec, longopts, &longindex);
	if (c == ':') {
		cas_cli_usage(verb, "option %s needs an argument",
			      argv[optind - 1]);
		return '?';
	}
	if (c == '?') {
		if (optopt && optopt != '?')
			cas_cli_usage(verb, "unknown option -%c", optopt);
		else
			cas_cli_usage(verb, "unknown option %s",
				      argv[optind - 1]);
		return '?';
	}
	return c;
}

static int walk_step(const char *verb, cas_store *s, const char *spec,
		     cas_node **node, const uint8_t *name, size_t len)
{
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];

	if ((*node)->type != CAS_NODE_DIRECTORY)
		return cas_cli_fail(verb, "%s: %s", spec,
				    (*node)->type == CAS_NODE_FILE
					    ? "not a directory"
					    : "a symlink on the way (symlinks "
					      "are not followed)");
	unsigned long mark = cas_log_error_count();
	int r = cas_store_directory_get(s, &(*node)->digest, &d);
	if (r < 0) {
		cas_digest_to_hex(&(*node)->digest, hex);
		return cas_cli_store_fail(
			mark, verb, "%s: directory %s: %s", spec, hex,
			r == -ENOENT ? "not in the store" : strerror(-r));
	}
	const cas_node *child = cas_directory_find(d, name, len);
	if (!child)
		return cas_cli_fail(verb, "%s: no such entry", spec);
	cas_node *copy = cas_node_dup(child);
	if (!copy)
		return cas_cli_fail(verb, "%s: %s", spec, strerror(ENOMEM));
	free(*node);
	*node = copy;
	return 0;
}

int cas_cli_check_spec(const char *verb, const char *spec)
{
	size_t len = strcspn(spec, "/");
	if (!cas_name_valid((const uint8_t *)spec, len))
		return cas_cli_usage(verb, "%s: invalid root name", spec);
	return 0;
}

int cas_cli_resolve(const char *verb, cas_store *s, const char *spec,
		    cas_node **ret)
{
	_cleanup_free_ char *root = NULL;
	_cleanup_free_ cas_node *node = NULL;
	const char *slash = strchr(spec, '/');
	const char *rest = slash ? slash + 1 : "";

	root = slash ? strndup(spec, (size_t)(slash - spec)) : strdup(spec);
	if (!root)
		return cas_cli_fail(verb, "%s: %s", spec, strerror(ENOMEM));
	if (!cas_root_name_valid(root))
		return cas_cli_usage(verb, "%s: invalid root name", spec);
	unsigned long mark = cas_log_error_count();
	int r = s->ops->root_get(s, root, &node);
	if (r == -ENOENT)
		return cas_cli_store_fail(mark, verb, "%s: no such root", root);
	if (r < 0)
		return cas_cli_store_fail(mark, verb, "%s: %s", root,
					  strerror(-r));

	/* Empty components (a//b, a trailing /) are skipped as a shell
	 * user expects; "." and ".." are not names and so are not found. */
	while (*rest) {
		const char *end = strchrnul(rest, '/');
		if (end > rest) {
			r = walk_step(verb, s, spec, &node,
				      (const uint8_t *)rest,
				      (size_t)(end - rest));
			if (r)
				return r;
		}
		rest = *end ? end + 1 : end;
	}
	*ret = TAKE_PTR(node);
	return 0;
}

int cas_cli_blob_copy(const char *verb, cas_store *s, const cas_digest *d,
		      int fd)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	_cleanup_close_ int bfd = -1;
	_cleanup_free_ uint8_t *buf = NULL;
	uint64_t size, off = 0;
	const size_t bufsize = 1 << 20;

	cas_digest_to_hex(d, hex);
	unsigned long mark = cas_log_error_count();
	int r = s->ops->blob_open(s, d, &bfd, &size);
	if (r == -ENOENT)
		return cas_cli_store_fail(mark, verb,
					  "blob %s: not in the store", hex);
	if (r < 0)
		return cas_cli_store_fail(mark, verb, "blob %s: %s", hex,
					  strerror(-r));
	buf = malloc(bufsize);
	if (!buf)
		return cas_cli_fail(verb, "blob %s: %s", hex, strerror(ENOMEM));
	fflush(stdout);
	/* What goes out is hashed on its way. A blob that fits the buffer is
	 * checked before its first byte is written; a larger one is checked
	 * at its end, and what it wrote is cut off again where the output
	 * is a regular file (a pipe cannot take bytes back). */
	struct stat st;
	off_t start = fstat(fd, &st) == 0 && S_ISREG(st.st_mode)
			      ? lseek(fd, 0, SEEK_CUR)
			      : -1;
	cas_hasher h;
	cas_hasher_init(&h);
	cas_digest got;
	bool whole = size <= bufsize;
	size_t held = 0;
	while (off < size) {
		size_t want =
			(size_t)CAS_MIN((uint64_t)bufsize - held, size - off);
		ssize_t n = pread(bfd, buf + held, want, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return cas_cli_fail(verb, "blob %s: read: %m", hex);
		if (n == 0)
			return cas_cli_fail(
				verb, "blob %s: shorter than its size", hex);
		cas_hasher_update(&h, buf + held, (size_t)n);
		off += (uint64_t)n;
		if (whole) {
			held += (size_t)n;
			continue;
		}
		r = cas_write_all(fd, buf, (size_t)n);
		if (r < 0)
			return cas_cli_fail(verb, "write: %s", strerror(-r));
	}
	cas_hasher_final(&h, &got);
	if (!cas_digest_eq(&got, d)) {
		if (!whole && start >= 0 && ftruncate(fd, start) == 0)
			(void)lseek(fd, start, SEEK_SET);
		return cas_cli_fail(
			verb, "blob %s: content does not match its digest",
			hex);
	}
	if (whole && held) {
		r = cas_write_all(fd, buf, held);
		if (r < 0)
			return cas_cli_fail(verb, "write: %s", strerror(-r));
	}
	return 0;
}

int cas_cli_finish(int status)
{
	if (fflush(stdout) != 0 || ferror(stdout))
		return cas_cli_fail(NULL, "stdout: write: %m");
	return status;
}

void cas_cli_print_root(const char *name, const cas_node *node)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];

	fputs(name, stdout);
	switch (node->type) {
	case CAS_NODE_DIRECTORY:
		cas_digest_to_hex(&node->digest, hex);
		printf(" directory %s %" PRIu64 "\n", hex, node->size);
		break;
	case CAS_NODE_FILE:
		cas_digest_to_hex(&node->digest, hex);
		printf(" file %s %" PRIu64 "%s\n", hex, node->size,
		       node->executable ? " executable" : "");
		break;
	case CAS_NODE_SYMLINK:
		fputs(" symlink ", stdout);
		fwrite(node->target, 1, node->target_len, stdout);
		fputc('\n', stdout);
		break;
	}
}

void cas_cli_fuse_config(struct cas_fuse_config *cfg)
{
	*cfg = (struct cas_fuse_config){.readonly = true};
}
