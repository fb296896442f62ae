/* nbdvault - plain socket transport. */
#include "build-config.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include "transport.h"

/* A failed call's result for the transport ops: -EAGAIN or -errno. */
static ssize_t failed(void)
{
	return errno == EWOULDBLOCK ? -EAGAIN : -errno;
}

static ssize_t plain_recv(struct nbdv_transport *t, void *buf, size_t len)
{
	for (;;) {
		ssize_t n = recv(t->fd, buf, len, 0);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		return failed();
	}
}

static ssize_t plain_sendv(struct nbdv_transport *t, const struct iovec *iov, int iovcnt, bool more)
{
	struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};

	for (;;) {
		/* MSG_NOSIGNAL: a peer that went away is an error, not a SIGPIPE.  MSG_MORE
		 * keeps a reply header in the socket until its sendfile() data joins it. */
		ssize_t n = sendmsg(t->fd, &mh, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		return failed();
	}
}

/*
 * Pages go from the page cache to the socket by reference: no copy in user space.
 * sendfile() has no MSG_NOSIGNAL; the server ignores SIGPIPE (server.c).  A file that
 * shrank under the export ends the range early: the reply header already promised the
 * bytes, so that is an error that closes the connection.
 */
static ssize_t plain_sendfile(struct nbdv_transport *t, int fd, uint64_t off, size_t len)
{
	off_t pos = (off_t)off;

	for (;;) {
		ssize_t n = sendfile(t->fd, fd, &pos, len);
		if (n > 0)
			return n;
		if (n == 0)
			return -EIO; /* the file ended before the range did */
		if (errno == EINTR)
			continue;
		return failed();
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
    .sendfile = plain_sendfile,
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
