/*
 * nbdvault - running under systemd: sockets passed by socket activation, and the
 * readiness protocol (sd_notify).
 *
 * Both protocols are a few lines of environment and one datagram, so they are spoken
 * here rather than through libsystemd: sd_notify() opens a socket for every message,
 * which the sandbox's system-call filter forbids once serving.  The notify socket is
 * opened and connected at start, before the sandbox closes, and each message is then
 * one send() on it.  Without NOTIFY_SOCKET or LISTEN_FDS everything here is a no-op.
 */
#include "build-config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "systemd.h"

#define SD_LISTEN_FDS_START 3

static int notify_fd = -1;

int systemd_listen_fds(int *fds, int max, bool *with_config)
{
	const char *pid = getenv("LISTEN_PID"), *n = getenv("LISTEN_FDS");
	const char *names = getenv("LISTEN_FDNAMES");
	size_t len = strlen(NBDV_FDNAME_WITH_CONFIG);
	char *end;
	long count;
	int got = 0;

	*with_config = false;
	for (const char *p = names; p && *p; p = strchr(p, ':') ? strchr(p, ':') + 1 : "")
		if (strncmp(p, NBDV_FDNAME_WITH_CONFIG, len) == 0 && (p[len] == ':' || !p[len]))
			*with_config = true;
	if (!pid || !n || strtol(pid, &end, 10) != (long)getpid() || *end)
		return 0;
	errno = 0;
	count = strtol(n, &end, 10);
	if (errno || *end || count < 0)
		return 0;
	for (long i = 0; i < count && got < max; i++) {
		int fd = SD_LISTEN_FDS_START + (int)i;
		if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 ||
		    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
			continue;
		fds[got++] = fd;
	}
	/* Not for anything this process might start. */
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	return got;
}

int systemd_notify_open(void)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	socklen_t len;
	size_t plen;

	if (!path || !path[0])
		return 0;
	plen = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || plen >= sizeof(sa.sun_path)) {
		log_warn("NOTIFY_SOCKET '%s' is not a unix socket path: not notifying", path);
		return 0;
	}
	memcpy(sa.sun_path, path, plen);
	if (path[0] == '@')
		sa.sun_path[0] = '\0'; /* abstract namespace */
	len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
	notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (notify_fd < 0 || connect(notify_fd, (struct sockaddr *)&sa, len) < 0) {
		log_warn("NOTIFY_SOCKET %s: %s: not notifying", path, strerror(errno));
		if (notify_fd >= 0)
			close(notify_fd);
		notify_fd = -1;
		return -1;
	}
	unsetenv("NOTIFY_SOCKET");
	return 0;
}

void systemd_notify(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int n;

	if (notify_fd < 0)
		return;
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n > 0 && send(notify_fd, msg, NBDV_MIN((size_t)n, sizeof(msg) - 1), MSG_NOSIGNAL) < 0)
		log_debug("sd_notify: %s", strerror(errno));
}

void systemd_notify_close(void)
{
	if (notify_fd >= 0)
		close(notify_fd);
	notify_fd = -1;
}
