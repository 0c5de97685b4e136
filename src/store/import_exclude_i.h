/* import_exclude_i.h - the --exclude patterns of an import.
 *
 * A pattern is a glob as fnmatch(3) reads it. Without a '/' (trailing ones
 * aside) it matches an entry's name at any depth; with one it matches the
 * entry's path relative to the imported PATH, from its start (a leading
 * '/' only anchors); a trailing '/' restricts it to folders. docs/cli.md
 * states the rule for users.
 *
 * Contract: one owner; the patterns are copied at init. Not thread-safe
 * (the matcher keeps one path buffer).
 */
#ifndef CAS_STORE_IMPORT_EXCLUDE_I_H
#define CAS_STORE_IMPORT_EXCLUDE_I_H

#include <stdbool.h>
#include <stddef.h>

struct cas_import_exclude {
	char *pattern; /* without a leading or trailing '/' */
	bool anchored; /* had a '/': matched against the relative path */
	bool dir_only; /* had a trailing '/' */
};

struct cas_import_excludes {
	struct cas_import_exclude *list;
	size_t n;
	char *rel; /* the relative path being matched */
	size_t cap_rel;
};

/* Copies and normalizes n patterns (0 or -ENOMEM; release either way). */
int cas_import_excludes_init(struct cas_import_excludes *ex,
			     const char *const *patterns, size_t n);
void cas_import_excludes_release(struct cas_import_excludes *ex);

/* 1 when the entry `name` of the folder at relative path `dir_rel` of
 * dir_len bytes ("" for PATH itself, no leading '/') matches a pattern, 0
 * if not, -ENOMEM. */
int cas_import_excludes_match(struct cas_import_excludes *ex,
			      const char *dir_rel, size_t dir_len,
			      const char *name, bool is_dir);

#endif
