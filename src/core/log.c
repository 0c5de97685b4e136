#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Level and prefix are set once at start-up, before threads exist. */
static int log_level = -1;
static const char *log_prefix = "castore: ";

void cas_log_set_level(enum cas_log_level level)
{
	log_level = (int)level;
}

enum cas_log_level cas_log_get_level(void)
{
	if (log_level < 0) {
		const char *e = getenv("CASTORE_LOG");
		log_level = CAS_LOG_WARNING;
		if (e) {
			if (!strcasecmp(e, "debug"))
				log_level = CAS_LOG_DEBUG;
			else if (!strcasecmp(e, "info"))
				log_level = CAS_LOG_INFO;
			else if (!strcasecmp(e, "error"))
				log_level = CAS_LOG_ERROR;
		}
	}
	return (enum cas_log_level)log_level;
}

void cas_log_set_prefix(const char *prefix)
{
	log_prefix = prefix ? prefix : "";
}

static unsigned long log_errors;

unsigned long cas_log_error_count(void)
{
	return __atomic_load_n(&log_errors, __ATOMIC_RELAXED);
}

int cas_log_internal(enum cas_log_level level, int r, const char *fmt, ...)
{
	if ((int)level > (int)cas_log_get_level())
		return r;
	if (level == CAS_LOG_ERROR)
		__atomic_fetch_add(&log_errors, 1, __ATOMIC_RELAXED);

	char line[2048];
	int saved = errno;
	size_t n = (size_t)snprintf(line, sizeof(line), "%s", log_prefix);
	/* Room for at least the newline, whatever the prefix's length (the
	 * arithmetic below would wrap otherwise). */
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	errno = r < 0 ? -r : r;
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (m > 0)
		n += CAS_MIN((size_t)m, sizeof(line) - n - 2);
	line[n++] = '\n';
	/* One write per message: lines from several threads do not mix. */
	ssize_t w = write(STDERR_FILENO, line, n);
	(void)w;
	errno = saved;
	return r;
}
