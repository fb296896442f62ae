/* nbdvault - logging to stderr. */
#include "build-config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "nbdvault/driver.h"

static enum nbdv_log_level max_level = LOG_LVL_INFO;

/*
 * When journald reads stderr (JOURNAL_STREAM names stderr's device and inode), each
 * line starts with its syslog priority, "<3>" for errors ... "<7>" for debug, which
 * journald turns into the entry's priority.  Decided once, at the first line.
 */
static bool to_journal(void)
{
	static int decided = -1;

	if (decided < 0) {
		const char *js = getenv("JOURNAL_STREAM");
		unsigned long long dev, ino;
		struct stat st;

		decided = js && sscanf(js, "%llu:%llu", &dev, &ino) == 2 &&
			  fstat(STDERR_FILENO, &st) == 0 && (unsigned long long)st.st_dev == dev &&
			  (unsigned long long)st.st_ino == ino;
	}
	return decided;
}

void log_set_level(enum nbdv_log_level lvl)
{
	max_level = lvl;
}

bool log_enabled(enum nbdv_log_level lvl)
{
	return lvl <= max_level;
}

static void log_va(enum nbdv_log_level lvl, const char *fmt, va_list ap)
{
	static const char *const names[] = {"error", "warning", "info", "debug"};
	static const int prio[] = {3, 4, 6, 7}; /* LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG */
	char line[1024];
	int saved = errno;

	if (!log_enabled(lvl))
		goto out;
	vsnprintf(line, sizeof(line), fmt, ap);
	/* One write per line so that lines from threads do not interleave. */
	if (to_journal())
		fprintf(stderr, "<%d>%s: %s\n", prio[lvl], names[lvl], line);
	else
		fprintf(stderr, "nbdvault: %s: %s\n", names[lvl], line);
out:
	errno = saved;
}

void log_msg(enum nbdv_log_level lvl, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_va(lvl, fmt, ap);
	va_end(ap);
}

/* The ABI's logging call, for loadable drivers (levels as syslog's). */
void nbdv_log(int level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_va(level <= NBDV_LOG_ERR	? LOG_LVL_ERR
	       : level <= NBDV_LOG_WARN ? LOG_LVL_WARN
	       : level <= NBDV_LOG_INFO ? LOG_LVL_INFO
					: LOG_LVL_DEBUG,
	       fmt, ap);
	va_end(ap);
}

const char *log_printable(const char *s, size_t len, char *out, size_t outlen)
{
	size_t o = 0;

	if (outlen < 8) {
		if (outlen)
			out[0] = '\0';
		return out;
	}
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (o + 8 >= outlen) {
			memcpy(out + o, "...", 3);
			o += 3;
			break;
		}
		if (c >= 0x20 && c < 0x7f && c != '\\') {
			out[o++] = (char)c;
		} else {
			o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
		}
	}
	out[o] = '\0';
	return out;
}
