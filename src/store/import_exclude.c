/* import_exclude.c - the --exclude patterns of an import (see the header). */
#include "store/import_exclude_i.h"

#include <errno.h>
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

int cas_import_excludes_init(struct cas_import_excludes *ex,
			     const char *const *patterns, size_t n)
{
	*ex = (struct cas_import_excludes){0};
	if (!n)
		return 0;
	if (!(ex->list = calloc(n, sizeof(*ex->list))))
		return -ENOMEM;
	for (; ex->n < n; ex->n++) {
		const char *p = patterns[ex->n];
		struct cas_import_exclude *x = &ex->list[ex->n];
		size_t len = strlen(p);
		while (len > 0 && p[len - 1] == '/') {
			x->dir_only = true;
			len--;
		}
		while (len > 0 && p[0] == '/') {
			x->anchored = true;
			p++;
			len--;
		}
		if (!(x->pattern = strndup(p, len)))
			return -ENOMEM;
		x->anchored |= memchr(x->pattern, '/', len) != NULL;
	}
	return 0;
}

void cas_import_excludes_release(struct cas_import_excludes *ex)
{
	for (size_t i = 0; i < ex->n; i++)
		free(ex->list[i].pattern);
	free(ex->list);
	free(ex->rel);
	*ex = (struct cas_import_excludes){0};
}

int cas_import_excludes_match(struct cas_import_excludes *ex,
			      const char *dir_rel, size_t dir_len,
			      const char *name, bool is_dir)
{
	bool have_rel = false;
	for (size_t i = 0; i < ex->n; i++) {
		const struct cas_import_exclude *x = &ex->list[i];
		if (x->dir_only && !is_dir)
			continue;
		if (!x->anchored) {
			/* No '/' in a name: FNM_PATHNAME would change
			 * nothing. No FNM_PERIOD: '*' matches dot files,
			 * as rsync's does. */
			if (fnmatch(x->pattern, name, 0) == 0)
				return 1;
			continue;
		}
		if (!have_rel) {
			size_t dl = dir_len, nl = strlen(name);
			int r = cas_array_grow(&ex->rel, &ex->cap_rel,
					       dl + nl + 2, 1, 256);
			if (r < 0)
				return r;
			memcpy(ex->rel, dir_rel, dl);
			ex->rel[dl] = '/';
			memcpy(ex->rel + (dl ? dl + 1 : 0), name, nl + 1);
			have_rel = true;
		}
		if (fnmatch(x->pattern, ex->rel, FNM_PATHNAME) == 0)
			return 1;
	}
	return 0;
}
