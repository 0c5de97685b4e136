#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Level and prefix are set once at start-up, before threads exist. */
#define LOG_UNSET (-2)
static int log_level = LOG_UNSET;

/* One line per message, written with one write(2). */
#define LOG_LINE_MAX 2048
static const char *log_prefix = "castore: ";

void cas_log_set_level(enum cas_log_level level)
{
	log_level = (int)level;
}

enum cas_log_level cas_log_get_level(void)
{
	if (log_level == LOG_UNSET) {
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

const char *cas_log_get_prefix(void)
{
	return log_prefix;
}

static unsigned long log_errors;
/* Error lines before this count are not the verb's: the gate counts from
 * when it was set. */
static bool first_error_only;
static unsigned long first_error_mark;

void cas_log_set_first_error_only(bool on)
{
	first_error_only = on;
	first_error_mark = cas_log_error_count();
}

static _Thread_local unsigned long thread_errors;

unsigned long cas_log_error_count(void)
{
	return __atomic_load_n(&log_errors, __ATOMIC_RELAXED);
}

unsigned long cas_log_thread_error_count(void)
{
	return thread_errors;
}

int cas_log_prefixed(enum cas_log_level level, const char *prefix, int r,
		     const char *fmt, va_list ap)
{
	if ((int)level > (int)cas_log_get_level()) {
		if (level == CAS_LOG_ERROR) { /* CAS_LOG_NONE: still counted */
			thread_errors++;
			__atomic_fetch_add(&log_errors, 1, __ATOMIC_RELAXED);
		}
		return r;
	}
	/* At debug level the later ones are written too: they show the way
	 * a failure went up. */
	if (level == CAS_LOG_ERROR)
		thread_errors++;
	if (level == CAS_LOG_ERROR &&
	    __atomic_fetch_add(&log_errors, 1, __ATOMIC_RELAXED) >
		    first_error_mark &&
	    first_error_only && cas_log_get_level() < CAS_LOG_DEBUG)
		return r;

	char line[LOG_LINE_MAX];
	int saved = errno;
	size_t n = (size_t)snprintf(line, sizeof(line), "%s", prefix);
	/* Room for the message and its newline, whatever the prefix. */
	if (n > sizeof(line) / 4)
		n = sizeof(line) / 4;
	size_t room = sizeof(line) - n - 1; /* for the message, no newline */
	errno = r < 0 ? -r : r;
	va_list again;
	va_copy(again, ap);
	int m = vsnprintf(line + n, room + 1, fmt, ap);
	if (m > 0 && (size_t)m > room) {
		/* Too long: the reason is at the end of the line and the path
		 * in the middle, so keep both ends and cut the middle. */
		char *whole = malloc((size_t)m + 1);
		if (whole) {
			errno = r < 0 ? -r : r;
			vsnprintf(whole, (size_t)m + 1, fmt, again);
			static const char cut[] = " ... ";
			size_t tail = room / 2,
			       head = room - tail - strlen(cut);
			memcpy(line + n, whole, head);
			memcpy(line + n + head, cut, strlen(cut));
			memcpy(line + n + head + strlen(cut),
			       whole + (size_t)m - tail, tail);
			free(whole);
		}
		m = (int)room;
	}
	va_end(again);
	if (m > 0)
		n += (size_t)m;
	/* One line whatever a name holds: a newline inside would make a
	 * failure look like two, or forge a line of its own. */
	for (size_t i = 0; i < n; i++)
		if (line[i] == '\n' || line[i] == '\r')
			line[i] = '?';
	line[n++] = '\n';
	/* One write per message: lines from several threads do not mix. */
	ssize_t w = write(STDERR_FILENO, line, n);
	(void)w;
	errno = saved;
	return r;
}

int cas_log_internal(enum cas_log_level level, int r, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	r = cas_log_prefixed(level, log_prefix, r, fmt, ap);
	va_end(ap);
	return r;
}

int cas_log_errno_if_silent(unsigned long mark, int r, const char *fmt, ...)
{
	if (thread_errors != mark)
		return r;
	va_list ap;
	va_start(ap, fmt);
	r = cas_log_prefixed(CAS_LOG_ERROR, log_prefix, r, fmt, ap);
	va_end(ap);
	return r;
}
