/* nbdvault - plain socket transport. */
#include "build-config.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbdvault/transport.h"

static ssize_t plain_recv(struct nbdv_transport *t, void *buf, size_t len)
{
	for (;;) {
		ssize_t n = recv(t->fd, buf, len, 0);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	}
}

static ssize_t plain_sendv(struct nbdv_transport *t, const struct iovec *iov, int iovcnt)
{
	struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};

	for (;;) {
		/* MSG_NOSIGNAL: a peer that went away is an error, not a SIGPIPE. */
		ssize_t n = sendmsg(t->fd, &mh, MSG_NOSIGNAL);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	}
}

static bool plain_pending(struct nbdv_transport *t)
{
	return false;
}

static void plain_shutdown(struct nbdv_transport *t)
{
	shutdown(t->fd, SHUT_WR);
}

static void plain_free(struct nbdv_transport *t)
{
	free(t);
}

static const struct nbdv_transport_ops plain_ops = {
    .name = "plain",
    .recv = plain_recv,
    .sendv = plain_sendv,
    .pending = plain_pending,
    .shutdown = plain_shutdown,
    .free = plain_free,
};

struct nbdv_transport *transport_plain_new(int fd)
{
	struct nbdv_transport *t = malloc(sizeof(*t));

	if (t) {
		t->ops = &plain_ops;
		t->fd = fd;
	}
	return t;
}
