/* Unit tests of core/log: levels, prefix, %m, the returned error, and one
 * line per message whatever the lengths. stderr goes to a temporary file
 * while a message is written. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/log.h"
#include "core/util.h"

static int saved_stderr = -1, capture_fd = -1;

static void capture_start(void)
{
	char path[] = "/tmp/cas-test-log-XXXXXX";
	capture_fd = mkstemp(path);
	REQUIRE(capture_fd >= 0);
	unlink(path);
	saved_stderr = dup(STDERR_FILENO);
	REQUIRE(saved_stderr >= 0);
	REQUIRE(dup2(capture_fd, STDERR_FILENO) == STDERR_FILENO);
}

/* What was written since capture_start (malloc'd, NUL-terminated). */
static char *capture_end(size_t *ret_len)
{
	REQUIRE(dup2(saved_stderr, STDERR_FILENO) == STDERR_FILENO);
	close(saved_stderr);
	off_t len = lseek(capture_fd, 0, SEEK_END);
	REQUIRE(len >= 0);
	char *buf = malloc((size_t)len + 1);
	REQUIRE(buf);
	REQUIRE(cas_pread_all(capture_fd, buf, (size_t)len, 0) == 0);
	buf[len] = 0;
	close(capture_fd);
	if (ret_len)
		*ret_len = (size_t)len;
	return buf;
}

int main(void)
{
	unsetenv("CASTORE_LOG");
	CHECK(cas_log_get_level() == CAS_LOG_WARNING);

	capture_start();
	CHECK(cas_log_errno(-ENOENT, "open blob %s: %m", "abc") == -ENOENT);
	CHECK(cas_log_warning("careful %d", 3) == 0);
	CHECK(cas_log_info("not shown") == 0);
	CHECK(cas_log_debug_errno(-EIO, "not shown either") == -EIO);
	errno = EPERM;
	CHECK(cas_log_error("plain") == 0);
	CHECK(errno == EPERM); /* logging leaves errno alone */
	char *out = capture_end(NULL);
	CHECK_STREQ(out, "castore: open blob abc: No such file or directory\n"
			 "castore: careful 3\n"
			 "castore: plain\n");
	free(out);

	cas_log_set_level(CAS_LOG_DEBUG);
	cas_log_set_prefix("t: ");
	capture_start();
	cas_log_debug("d");
	cas_log_info("i");
	cas_log_set_level(CAS_LOG_ERROR);
	cas_log_warning("w");
	cas_log_error("e");
	cas_log_set_prefix(NULL);
	cas_log_error("no prefix");
	out = capture_end(NULL);
	CHECK_STREQ(out, "t: d\nt: i\nt: e\nno prefix\n");
	free(out);

	/* Too long for one line: cut, still one line ending in a newline,
	 * also with a prefix longer than the line itself. */
	size_t big = 10000;
	char *msg = malloc(big + 1);
	REQUIRE(msg);
	memset(msg, 'm', big);
	msg[big] = 0;
	const size_t prefixes[] = {0, 2045, 2046, 2047, 2048, 5000};
	for (size_t i = 0; i < CAS_ARRAY_SIZE(prefixes); i++) {
		char *prefix = malloc(prefixes[i] + 1);
		REQUIRE(prefix);
		memset(prefix, 'p', prefixes[i]);
		prefix[prefixes[i]] = 0;
		cas_log_set_prefix(prefix);
		capture_start();
		CHECK(cas_log_errno(-EINVAL, "%s", msg) == -EINVAL);
		size_t len;
		out = capture_end(&len);
		CHECK(len >= 1 && len <= 2048);
		CHECK(out[len - 1] == '\n' &&
		      strchr(out, '\n') == out + len - 1);
		free(out);
		cas_log_set_prefix(NULL);
		free(prefix);
	}
	free(msg);

	/* A long path is cut in the middle: the object's start and the
	 * reason at the end stay. */
	cas_log_set_level(CAS_LOG_WARNING);
	cas_log_set_prefix("castore export: ");
	char *path = malloc(5001);
	REQUIRE(path);
	for (size_t i = 0; i < 5000; i++)
		path[i] = i % 100 == 0 ? '/' : (char)('a' + i % 26);
	path[5000] = 0;
	capture_start();
	cas_log_errno(-ENOSPC, "%s: mkdir: %m", path);
	size_t len;
	out = capture_end(&len);
	CHECK(len <= 2048 && out[len - 1] == '\n');
	CHECK(!strncmp(out, "castore export: /bcdefghij", 26));
	CHECK(strstr(out, " ... ") != NULL);
	/* The path's last 10 bytes, then the reason, end the line. */
	char tail[64];
	snprintf(tail, sizeof(tail), "%s: mkdir: No space left on device\n",
		 path + 4990);
	CHECK(len > strlen(tail) && !strcmp(out + len - strlen(tail), tail));
	free(out);
	free(path);

	/* CR and LF inside a message never start a line of their own. */
	capture_start();
	cas_log_error("a\nb\rc");
	out = capture_end(NULL);
	CHECK_STREQ(out, "castore export: a?b?c\n");
	free(out);

	/* First error only: later error lines are counted, not written;
	 * warnings still are; debug level writes them all. */
	cas_log_set_first_error_only(true);
	unsigned long before = cas_log_error_count();
	capture_start();
	CHECK(cas_log_errno(-ENOSPC, "store s: write: %m") == -ENOSPC);
	CHECK(cas_log_errno(-ENOSPC, "/x: %m") == -ENOSPC);
	cas_log_warning("w");
	cas_log_error("again");
	out = capture_end(NULL);
	CHECK_STREQ(out, "castore export: store s: write: No space left on "
			 "device\n"
			 "castore export: w\n");
	free(out);
	CHECK(cas_log_error_count() == before + 3);
	cas_log_set_level(CAS_LOG_DEBUG);
	capture_start();
	cas_log_error("shown at debug");
	out = capture_end(NULL);
	CHECK_STREQ(out, "castore export: shown at debug\n");
	free(out);
	cas_log_set_first_error_only(false);
	cas_log_set_level(CAS_LOG_WARNING);
	cas_log_set_prefix(NULL);
	return check_exit("test_log");
}
