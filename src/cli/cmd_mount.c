/* Temporary stub from the CLI helper (placeholder was empty); the owner of
 * this verb replaces it. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_mount(struct cas_cli *cli, int argc, char **argv)
{
	fprintf(stderr, "castore mount: not yet\n");
	return 1;
}
