/* castore ls NAME[/PATH], castore cat NAME/PATH: reading through the
 * store, as a mount would show it. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/util.h"

static const char ls_help[] =
	"Usage: castore ls NAME[/PATH]\n"
	"\n"
	"Lists the directory NAME/PATH (or shows the one entry when it is a\n"
	"file or symlink), one entry per line, fields separated by a tab:\n"
	"  TYPE  DIGEST|TARGET  SIZE  X  NAME\n"
	"TYPE is directory, file or symlink; X is x for an executable file,\n"
	"else -; a symlink's SIZE is its target length. Names and targets are\n"
	"printed as their raw bytes.\n";

static const char cat_help[] =
	"Usage: castore cat NAME/PATH\n"
	"\n"
	"Writes the content of the file NAME/PATH to stdout. Symlinks are not\n"
	"followed: a symlink or a directory is an error.\n";

static void print_entry(const cas_node *n, const uint8_t *name, size_t len)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];

	switch (n->type) {
	case CAS_NODE_DIRECTORY:
		cas_digest_to_hex(&n->digest, hex);
		printf("directory\t%s\t%" PRIu64 "\t-\t", hex, n->size);
		break;
	case CAS_NODE_FILE:
		cas_digest_to_hex(&n->digest, hex);
		printf("file\t%s\t%" PRIu64 "\t%c\t", hex, n->size,
		       n->executable ? 'x' : '-');
		break;
	case CAS_NODE_SYMLINK:
		fputs("symlink\t", stdout);
		fwrite(n->target, 1, n->target_len, stdout);
		printf("\t%zu\t-\t", n->target_len);
		break;
	}
	fwrite(name, 1, len, stdout);
	fputc('\n', stdout);
}

static void print_list(const cas_node *nodes, size_t n)
{
	for (size_t i = 0; i < n; i++)
		print_entry(&nodes[i], nodes[i].name, nodes[i].name_len);
}

static int one_arg(const char *verb, const char *help, int argc, char **argv,
		   const char **ret)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	int c;

	while ((c = cas_cli_getopt(verb, argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'h':
			fputs(help, stdout);
			return -1;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 1)
		return cas_cli_usage(verb, argc - optind
						   ? "one NAME/PATH expected"
						   : "missing NAME/PATH");
	*ret = argv[optind];
	return 0;
}

int cmd_ls(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ cas_node *node = NULL;
	_cleanup_(cas_directory_freep) cas_directory *d = NULL;
	const char *spec = NULL;
	char hex[CAS_DIGEST_HEX_LEN + 1];

	int r = one_arg("ls", ls_help, argc, argv, &spec);
	if (r)
		return r < 0 ? CAS_EXIT_OK : r;
	r = cas_cli_check_spec("ls", spec);
	if (r)
		return r;
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	r = cas_cli_resolve("ls", s, spec, &node);
	if (r)
		return r;
	if (node->type != CAS_NODE_DIRECTORY) {
		/* Like ls(1) on a file: the entry itself, under the name given. */
		const char *base = strrchr(spec, '/');
		base = base ? base + 1 : spec;
		print_entry(node, (const uint8_t *)base, strlen(base));
		return CAS_EXIT_OK;
	}
	unsigned long mark = cas_log_error_count();
	r = cas_store_directory_get(s, &node->digest, &d);
	if (r < 0) {
		cas_digest_to_hex(&node->digest, hex);
		return cas_cli_store_fail(
			mark, "ls", "%s: directory %s: %s", spec, hex,
			r == -ENOENT ? "not in the store" : strerror(-r));
	}
	/* Directories, files and symlinks are each sorted; one listing in
	 * name order reads better than three. */
	size_t i = 0, j = 0, k = 0;
	while (i < d->n_directories || j < d->n_files || k < d->n_symlinks) {
		const cas_node *best = NULL;
		size_t *which = NULL;
		if (i < d->n_directories) {
			best = &d->directories[i];
			which = &i;
		}
		if (j < d->n_files &&
		    (!best ||
		     cas_name_cmp(d->files[j].name, d->files[j].name_len,
				  best->name, best->name_len) < 0)) {
			best = &d->files[j];
			which = &j;
		}
		if (k < d->n_symlinks &&
		    (!best ||
		     cas_name_cmp(d->symlinks[k].name, d->symlinks[k].name_len,
				  best->name, best->name_len) < 0)) {
			best = &d->symlinks[k];
			which = &k;
		}
		print_list(best, 1);
		(*which)++;
	}
	return CAS_EXIT_OK;
}

int cmd_cat(struct cas_cli *cli, int argc, char **argv)
{
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	_cleanup_free_ cas_node *node = NULL;
	const char *spec = NULL;

	int r = one_arg("cat", cat_help, argc, argv, &spec);
	if (r)
		return r < 0 ? CAS_EXIT_OK : r;
	r = cas_cli_check_spec("cat", spec);
	if (r)
		return r;
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	r = cas_cli_resolve("cat", s, spec, &node);
	if (r)
		return r;
	if (node->type == CAS_NODE_DIRECTORY)
		return cas_cli_fail("cat", "%s: is a directory", spec);
	if (node->type == CAS_NODE_SYMLINK)
		return cas_cli_fail(
			"cat", "%s: is a symlink (cat follows nothing)", spec);
	return cas_cli_blob_copy("cat", s, &node->digest, STDOUT_FILENO);
}
