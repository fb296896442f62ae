/*
 * nbdvault - the audit log: one JSON object per line for each event that answers "who
 * touched this disk, from which certificate": connection accepted, TLS established or
 * failed, export opened, option refused by policy, connection closed.
 *
 * Lines are built in a stack buffer and written with one write(2) on an O_APPEND
 * descriptor, so lines from several reactors never interleave.  SIGHUP reopens the
 * file (logrotate renames it, then signals).  Every string from a client or a
 * certificate is JSON-escaped and cut; a client cannot fill the disk through it:
 * refusals are logged at most AUDIT_REFUSALS times per connection.
 */
#include "build-config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "log.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* fd and path */
static int audit_fd = -1;
static char *audit_path; /* NULL: stderr or off */

static int open_file(const char *path)
{
	return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

int audit_open(const char *where)
{
	if (!where)
		return 0;
	if (strcmp(where, "stderr") == 0) {
		audit_fd = STDERR_FILENO;
		return 0;
	}
	audit_fd = open_file(where);
	if (audit_fd < 0) {
		log_err("audit-log: %s: %s", where, strerror(errno));
		return -1;
	}
	audit_path = strdup(where);
	return audit_path ? 0 : -1;
}

void audit_reopen(void)
{
	int fd;

	pthread_mutex_lock(&lock);
	if (audit_path) {
		fd = open_file(audit_path);
		if (fd < 0) {
			log_err("audit-log: cannot reopen %s: %s (writing on to the old file)",
				audit_path, strerror(errno));
		} else {
			close(audit_fd);
			audit_fd = fd;
		}
	}
	pthread_mutex_unlock(&lock);
}

void audit_close(void)
{
	pthread_mutex_lock(&lock);
	if (audit_fd > STDERR_FILENO)
		close(audit_fd);
	audit_fd = -1;
	free(audit_path);
	audit_path = NULL;
	pthread_mutex_unlock(&lock);
}

bool audit_enabled(void)
{
	return audit_fd >= 0;
}

/* Append @s as a JSON string (quoted, escaped, at most 256 bytes of it). */
static size_t put_str(char *out, size_t cap, size_t o, const char *s)
{
	size_t n = 0;

	if (o + 2 >= cap)
		return o;
	out[o++] = '"';
	for (; s && *s && n < 256 && o + 8 < cap; s++, n++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\') {
			out[o++] = '\\';
			out[o++] = (char)ch;
		} else if (ch < 0x20 || ch == 0x7f) {
			o += (size_t)snprintf(out + o, cap - o, "\\u%04x", ch);
		} else {
			out[o++] = (char)ch; /* UTF-8 bytes pass as they are */
		}
	}
	out[o++] = '"';
	return o;
}

void audit_event(const char *event, unsigned conn, const char *fmt, ...)
{
	char line[2048];
	size_t o;
	struct timespec ts;
	struct tm tm;
	va_list ap;

	if (audit_fd < 0)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	o = (size_t)snprintf(line, sizeof(line),
			     "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"event\":\"%s\"",
			     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			     tm.tm_sec, ts.tv_nsec / 1000000, event);
	if (conn)
		o += (size_t)snprintf(line + o, sizeof(line) - o, ",\"conn\":\"c%u\"", conn);
	/* fmt: pairs of key and a one-letter type (s string, u unsigned long long,
	 * b bool, d double), e.g. "ss" for two strings. */
	va_start(ap, fmt);
	for (const char *t = fmt; *t && o < sizeof(line) - 64; t++) {
		const char *key = va_arg(ap, const char *);
		o += (size_t)snprintf(line + o, sizeof(line) - o, ",\"%s\":", key);
		switch (*t) {
		case 's':
			o = put_str(line, sizeof(line) - 4, o, va_arg(ap, const char *));
			break;
		case 'u':
			o += (size_t)snprintf(line + o, sizeof(line) - o, "%llu",
					      va_arg(ap, unsigned long long));
			break;
		case 'b':
			o += (size_t)snprintf(line + o, sizeof(line) - o, "%s",
					      va_arg(ap, int) ? "true" : "false");
			break;
		case 'd':
			o += (size_t)snprintf(line + o, sizeof(line) - o, "%.3f",
					      va_arg(ap, double));
			break;
		}
	}
	va_end(ap);
	if (o > sizeof(line) - 3)
		o = sizeof(line) - 3;
	line[o++] = '}';
	line[o++] = '\n';
	pthread_mutex_lock(&lock);
	if (write(audit_fd, line, o) < 0)
		log_debug("audit-log: write: %s", strerror(errno));
	pthread_mutex_unlock(&lock);
}
