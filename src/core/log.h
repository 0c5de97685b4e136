/* log.h - one-line diagnostics on stderr.
 *
 * Contract: thread-safe (each message is written with one write()). Library
 * code logs only through these; only the CLI writes to stdout. Functions
 * that take an error `r` (a -errno) return it unchanged, so a failure path
 * is one line:
 *     return cas_log_errno(r, "open blob %s: %m", hex);
 * Inside the format, %m prints strerror(-r).
 */
#ifndef CAS_CORE_LOG_H
#define CAS_CORE_LOG_H

#include "core/util.h"

enum cas_log_level {
	CAS_LOG_ERROR = 0,
	CAS_LOG_WARNING = 1,
	CAS_LOG_INFO = 2,
	CAS_LOG_DEBUG = 3,
};

/* Messages above this level are dropped. Default CAS_LOG_WARNING;
 * $CASTORE_LOG=debug|info|warning|error overrides at first use. */
void cas_log_set_level(enum cas_log_level level);
enum cas_log_level cas_log_get_level(void);
/* Prefix for every line ("castore: " by default). */
void cas_log_set_prefix(const char *prefix);

int cas_log_internal(enum cas_log_level level, int r, const char *fmt, ...)
	_printf_(3, 4);

/* Number of error-level lines written so far, by any thread. A caller
 * that reports failures itself (the CLI) compares it before and after a
 * call, and prints its own line only when the library has not already
 * named the failure: one failure, one line. */
unsigned long cas_log_error_count(void);

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
