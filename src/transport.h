/*
 * nbdvault - transports: how a connection moves bytes.
 *
 * The connection never calls read(2)/write(2) itself; it calls these ops.  The plain
 * implementation wraps a socket; the TLS one (tls.c) wraps a GnuTLS session.  STARTTLS
 * swaps one for the other under a live connection.
 */
#ifndef NBDV_TRANSPORT_H
#define NBDV_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "compiler.h"

struct nbdv_transport;

struct nbdv_transport_ops {
	const char *name; /* "plain", "tls" */
	/* Read up to @len bytes: >0 bytes read, 0 at end of stream, -EAGAIN, or -errno. */
	ssize_t (*recv)(struct nbdv_transport *t, void *buf, size_t len);
	/* Write from @iov: bytes written (maybe fewer), -EAGAIN, or -errno.  After -EAGAIN
	 * the caller retries with the same leading bytes.  @more: the caller sends more at
	 * once (a file range), so the bytes may wait for it rather than leave alone. */
	ssize_t (*sendv)(struct nbdv_transport *t, const struct iovec *iov, int iovcnt, bool more);
	/* Optional: write @len bytes of file @fd from @off straight from the page cache,
	 * same results as sendv.  NULL where the bytes must pass through user space (TLS). */
	ssize_t (*sendfile)(struct nbdv_transport *t, int fd, uint64_t off, size_t len);
	/* Optional: at most how many payload bytes the transport holds or has begun to take
	 * from the socket (decrypted, read ahead, part of a record); NULL means none. */
	size_t (*held)(struct nbdv_transport *t);
	/* True when bytes are buffered inside the transport, so a readable fd is not needed. */
	bool (*pending)(struct nbdv_transport *t);
	/* Orderly end of the stream (TLS close_notify); best effort, never blocks. */
	void (*shutdown)(struct nbdv_transport *t);
	/* Free the transport; the fd itself belongs to the connection. */
	void (*free)(struct nbdv_transport *t);
};

struct nbdv_transport {
	const struct nbdv_transport_ops *ops; /* implementation */
	int fd;				      /* socket, owned by the connection */
	unsigned conn_id;		      /* its connection's id, for log lines */
};

/* Plain socket transport on @fd; NULL on ENOMEM. */
struct nbdv_transport *transport_plain_new(int fd) NBDV_WUR;

#endif /* NBDV_TRANSPORT_H */
