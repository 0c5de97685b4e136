/* castore roots list [--json] | add NAME ... | rm NAME */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/json.h"
#include "core/directory.h"
#include "core/log.h"
#include "core/util.h"

static const char roots_help[] =
	"Usage: castore roots list [--json]\n"
	"       castore roots add NAME --directory DIGEST --size N\n"
	"       castore roots add NAME --file DIGEST --size N [--executable]\n"
	"       castore roots add NAME --symlink TARGET\n"
	"       castore roots rm NAME\n"
	"\n"
	"list prints one root per line: NAME TYPE DIGEST SIZE [executable], "
	"or\n"
	"NAME symlink TARGET. add registers (or replaces) a root; its content\n"
	"need not be in the store. A directory's SIZE is its entry count plus\n"
	"the sizes of its child directories (castore v1).\n";

struct list_state {
	bool json;
	size_t n;
};

static int list_one(void *userdata, const char *name, const cas_node *node)
{
	struct list_state *ls = userdata;

	if (ls->json) {
		cas_node named = *node;
		named.name = (const uint8_t *)name;
		named.name_len = strlen(name);
		fputs(ls->n ? ",\n  " : "\n  ", stdout);
		cas_json_node(stdout, &named, true);
	} else {
		cas_cli_print_root(name, node);
	}
	ls->n++;
	return 0;
}

static int roots_list(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, 'j'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	struct list_state ls = {};
	int c;

	while ((c = cas_cli_getopt("roots list", argc, argv, "h", opts)) !=
	       -1) {
		switch (c) {
		case 'j':
			ls.json = true;
			break;
		case 'h':
			fputs(roots_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 0)
		return cas_cli_usage("roots list", "no operands expected");
	if (cas_cli_open_store(cli, false, &s) < 0)
		return CAS_EXIT_FAILURE;
	if (ls.json)
		fputc('[', stdout);
	unsigned long mark = cas_log_error_count();
	int r = s->ops->roots_foreach(s, list_one, &ls);
	if (r < 0)
		return cas_cli_store_fail(mark, "roots list", "%s: %s",
					  cli->store_spec, strerror(-r));
	if (ls.json)
		fputs(ls.n ? "\n]\n" : "]\n", stdout);
	return CAS_EXIT_OK;
}

/* --size against the content when a local store has it (the edge check of
 * directory.h, for a root): 0 when it agrees or the content is absent,
 * 1 after one error line naming both sizes, or -errno. */
static int root_size_check(cas_store *s, const char *name, const cas_node *node)
{
	char hex[CAS_DIGEST_HEX_LEN + 1];
	uint64_t size = 0;
	int r;
	if (node->type == CAS_NODE_DIRECTORY) {
		if ((r = s->ops->directory_has(s, &node->digest)) <= 0)
			return r;
		_cleanup_(cas_directory_freep) cas_directory *d = NULL;
		if ((r = cas_store_directory_get(s, &node->digest, &d)) < 0)
			return r;
		if ((r = cas_directory_size(d, &size)) < 0)
			return r;
	} else {
		r = s->ops->blob_stat(s, &node->digest, &size);
		if (r == -ENOENT)
			return 0;
		if (r < 0)
			return r;
	}
	if (size == node->size)
		return 0;
	cas_digest_to_hex(&node->digest, hex);
	cas_cli_fail("roots add", "%s: --size %llu, but %s %s has size %llu",
		     name, (unsigned long long)node->size,
		     node->type == CAS_NODE_DIRECTORY ? "Directory" : "blob",
		     hex, (unsigned long long)size);
	return 1;
}

static int roots_add(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"directory", required_argument, NULL, 'd'},
		{"file", required_argument, NULL, 'f'},
		{"symlink", required_argument, NULL, 'l'},
		{"size", required_argument, NULL, 's'},
		{"executable", no_argument, NULL, 'x'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	cas_node node = {};
	const char *digest = NULL, *size = NULL;
	int kinds = 0, c, r;

	while ((c = cas_cli_getopt("roots add", argc, argv, "h", opts)) != -1) {
		switch (c) {
		case 'd':
			node.type = CAS_NODE_DIRECTORY;
			digest = optarg;
			kinds++;
			break;
		case 'f':
			node.type = CAS_NODE_FILE;
			digest = optarg;
			kinds++;
			break;
		case 'l':
			node.type = CAS_NODE_SYMLINK;
			node.target = (const uint8_t *)optarg;
			node.target_len = strlen(optarg);
			kinds++;
			break;
		case 's':
			size = optarg;
			break;
		case 'x':
			node.executable = true;
			break;
		case 'h':
			fputs(roots_help, stdout);
			return CAS_EXIT_OK;
		default:
			return CAS_EXIT_USAGE;
		}
	}
	if (argc - optind != 1)
		return cas_cli_usage("roots add", "one NAME expected");
	const char *name = argv[optind];
	if (!cas_root_name_valid(name))
		return cas_cli_usage("roots add", "'%s': invalid root name",
				     name);
	if (kinds != 1)
		return cas_cli_usage("roots add",
				     "%s: exactly one of --directory, --file, "
				     "--symlink expected",
				     name);
	if (node.type == CAS_NODE_SYMLINK) {
		if (size || node.executable)
			return cas_cli_usage("roots add",
					     "%s: --size and --executable do "
					     "not apply to a symlink",
					     name);
		if (!node.target_len)
			return cas_cli_usage("roots add",
					     "%s: empty symlink target", name);
	} else {
		if (node.type == CAS_NODE_DIRECTORY && node.executable)
			return cas_cli_usage(
				"roots add",
				"%s: --executable applies to a file", name);
		r = cas_cli_parse_digest("roots add", digest, &node.digest);
		if (r)
			return r;
		if (!size)
			return cas_cli_usage("roots add", "%s: --size N needed",
					     name);
		if (cas_cli_parse_size(size, false, &node.size) < 0)
			return cas_cli_usage("roots add",
					     "--size %s: not a size", size);
	}
	const char *why = cas_node_check(&node, true);
	if (why)
		return cas_cli_usage("roots add", "%s: %s", name, why);
	if (cas_cli_open_store(cli, true, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	/* A remote store's roots add fetches nothing (docs/remote.md). */
	if (!cas_cli_store_is_remote(cli) &&
	    (r = root_size_check(s, name, &node)) != 0)
		return r < 0 ? cas_cli_store_fail(mark, "roots add", "%s: %s",
						  name, strerror(-r))
			     : CAS_EXIT_FAILURE;
	r = s->ops->root_set(s, name, &node);
	if (r < 0)
		return cas_cli_store_fail(mark, "roots add", "%s: %s", name,
					  strerror(-r));
	return CAS_EXIT_OK;
}

static int roots_rm(struct cas_cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"help", no_argument, NULL, 'h'},
		{},
	};
	_cleanup_(cas_store_freep) cas_store *s = NULL;
	int c;

	while ((c = cas_cli_getopt("roots rm", argc, argv, "h", opts)) != -1) {
		if (c == 'h') {
			fputs(roots_help, stdout);
			return CAS_EXIT_OK;
		}
		return CAS_EXIT_USAGE;
	}
	if (argc - optind != 1)
		return cas_cli_usage("roots rm", "one NAME expected");
	const char *name = argv[optind];
	if (!cas_root_name_valid(name))
		return cas_cli_usage("roots rm", "'%s': invalid root name",
				     name);
	/* Not created: removing from a store that is not there fails. */
	if (cas_cli_open_store_mode(cli, CAS_CLI_STORE_WRITE, &s) < 0)
		return CAS_EXIT_FAILURE;
	unsigned long mark = cas_log_error_count();
	int r = s->ops->root_remove(s, name);
	if (r == -ENOENT)
		return cas_cli_store_fail(mark, "roots rm", "%s: no such root",
					  name);
	if (r < 0)
		return cas_cli_store_fail(mark, "roots rm", "%s: %s", name,
					  strerror(-r));
	return CAS_EXIT_OK;
}

int cmd_roots(struct cas_cli *cli, int argc, char **argv)
{
	if (argc < 2)
		return cas_cli_usage("roots", "list, add or rm expected");
	const char *sub = argv[1];
	if (!strcmp(sub, "--help") || !strcmp(sub, "-h")) {
		fputs(roots_help, stdout);
		return CAS_EXIT_OK;
	}
	optind = 0;
	if (!strcmp(sub, "list")) {
		cas_cli_set_verb("roots list");
		return roots_list(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "add")) {
		cas_cli_set_verb("roots add");
		return roots_add(cli, argc - 1, argv + 1);
	}
	if (!strcmp(sub, "rm")) {
		cas_cli_set_verb("roots rm");
		return roots_rm(cli, argc - 1, argv + 1);
	}
	return cas_cli_usage("roots", "%s: unknown sub-verb (list, add, rm)",
			     sub);
}
