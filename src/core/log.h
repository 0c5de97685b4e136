/* log.h - one-line diagnostics on stderr.
 *
 * Contract: thread-safe (each message is written with one write()). Library
 * code logs only through these; only the CLI writes to stdout. Functions
 * that take an error `r` (a -errno) return it unchanged, so a failure path
 * is one line:
 *     return cas_log_errno(r, "open blob %s: %m", hex);
 * Inside the format, %m prints strerror(-r).
 *
 * The style of a line (docs/cli.md, "Exit status and errors"):
 *     castore VERB: OBJECT: reason
 * The CLI sets the prefix "castore VERB: " before it runs a verb, so a
 * message names only the object (a path, a digest, a root, "store DIR")
 * and the reason; it never repeats the verb. One failure is one line: the
 * lowest layer that knows the object logs it, and callers that only pass
 * the error up do not log again. A line never holds a newline (CR and LF
 * become '?') and is cut in the middle past 2 KiB, so both the object at
 * its start and the reason at its end stay.
 */
#ifndef CAS_CORE_LOG_H
#define CAS_CORE_LOG_H

#include <stdarg.h>
#include <stdbool.h>

#include "core/util.h"

enum cas_log_level {
	/* Nothing is written, errors are still counted: for fuzz targets,
	 * whose inputs are refused with an error line each. */
	CAS_LOG_NONE = -1,
	CAS_LOG_ERROR = 0,
	CAS_LOG_WARNING = 1,
	CAS_LOG_INFO = 2,
	CAS_LOG_DEBUG = 3,
};

/* Messages above this level are dropped. Default CAS_LOG_WARNING;
 * $CASTORE_LOG=debug|info|warning|error overrides at first use. */
void cas_log_set_level(enum cas_log_level level);
enum cas_log_level cas_log_get_level(void);
/* Prefix for every line ("castore: " by default); NULL for none. The
 * string is not copied: it must outlive its use. Set before threads
 * start. */
void cas_log_set_prefix(const char *prefix);
const char *cas_log_get_prefix(void);

/* For a command that ends at its first failure: once an error-level line
 * has been written after this call, later error-level lines are counted
 * but not written.
 * They are consequences of the first (callers on the way up that log
 * again, other threads of the same command that fail because the disk is
 * full), and the first one, written by the lowest layer that met the
 * failure, names it. Off by default (a server logs each failure). With
 * $CASTORE_LOG=debug they are written too. */
void cas_log_set_first_error_only(bool on);

/* Writes one line as cas_log_internal does, with `prefix` instead of the
 * one set (the CLI's own lines, "castore VERB: ..."). */
int cas_log_prefixed(enum cas_log_level level, const char *prefix, int r,
		     const char *fmt, va_list ap) _printf_(4, 0);

int cas_log_internal(enum cas_log_level level, int r, const char *fmt, ...)
	_printf_(3, 4);

/* Number of error-level lines written so far, by any thread. A caller
 * that reports failures itself (the CLI) compares it before and after a
 * call, and prints its own line only when the library has not already
 * named the failure: one failure, one line. */
unsigned long cas_log_error_count(void);

/* The same, by the calling thread only: a layer that calls down and may
 * log the failure itself compares it before and after the call, so that
 * it adds its own line only when the layer below has not named the
 * failure (cas_log_errno_if_silent). Other threads' lines do not count. */
unsigned long cas_log_thread_error_count(void);

/* cas_log_errno, unless the calling thread has logged an error since
 * `mark` (cas_log_thread_error_count() before the call that failed).
 * Returns r either way. */
int cas_log_errno_if_silent(unsigned long mark, int r, const char *fmt, ...)
	_printf_(3, 4);

#define cas_log_error(...)    cas_log_internal(CAS_LOG_ERROR, 0, __VA_ARGS__)
#define cas_log_warning(...)  cas_log_internal(CAS_LOG_WARNING, 0, __VA_ARGS__)
#define cas_log_info(...)     cas_log_internal(CAS_LOG_INFO, 0, __VA_ARGS__)
#define cas_log_debug(...)    cas_log_internal(CAS_LOG_DEBUG, 0, __VA_ARGS__)
#define cas_log_errno(r, ...) cas_log_internal(CAS_LOG_ERROR, (r), __VA_ARGS__)
#define cas_log_warning_errno(r, ...) \
	cas_log_internal(CAS_LOG_WARNING, (r), __VA_ARGS__)
#define cas_log_debug_errno(r, ...) \
	cas_log_internal(CAS_LOG_DEBUG, (r), __VA_ARGS__)

#endif
