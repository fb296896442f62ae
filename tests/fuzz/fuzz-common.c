/* nbdvault - embedded server and in-memory transport for the fuzz harnesses. */
#include "build-config.h"

#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz-common.h"
#include "nbdvault/config.h"
#include "nbdvault/conn.h"
#include "nbdvault/executor.h"
#include "nbdvault/export.h"
#include "nbdvault/log.h"
#include "nbdvault/server.h"
#include "nbdvault/transport.h"

struct memtp {
	struct nbdv_transport base; /* must be first */
	const uint8_t *data;	    /* what the client sends */
	size_t size, pos;
	bool eof; /* end of stream reported */
};

static ssize_t mem_recv(struct nbdv_transport *t, void *buf, size_t len)
{
	struct memtp *m = (struct memtp *)t;
	size_t n = m->size - m->pos;

	if (n == 0) {
		m->eof = true;
		return 0;
	}
	if (n > len)
		n = len;
	memcpy(buf, m->data + m->pos, n);
	m->pos += n;
	return (ssize_t)n;
}

static ssize_t mem_sendv(struct nbdv_transport *t, const struct iovec *iov, int iovcnt)
{
	size_t n = 0;

	for (int i = 0; i < iovcnt; i++)
		n += iov[i].iov_len;
	return (ssize_t)n;
}

static bool mem_pending(struct nbdv_transport *t)
{
	return !((struct memtp *)t)->eof;
}

static void mem_shutdown(struct nbdv_transport *t)
{
}

static void mem_free(struct nbdv_transport *t)
{
	free(t);
}

static const struct nbdv_transport_ops mem_ops = {
    .name = "memory",
    .recv = mem_recv,
    .sendv = mem_sendv,
    .pending = mem_pending,
    .shutdown = mem_shutdown,
    .free = mem_free,
};

static struct nbdv_server srv;

void fuzz_server_init(void)
{
	static const char yaml[] = "default-export: mem\n"
				   "limits:\n  max-request: 64K\n"
				   "exports:\n"
				   "  - name: mem\n    description: fuzz\n    driver: memory\n"
				   "    size: 1M\n"
				   "  - name: ro\n    driver: memory\n    size: 64K\n"
				   "    readonly: true\n";
	char path[] = "/tmp/nbdvault-fuzz-XXXXXX", err[512];
	struct nbdv_config *cfg;
	int fd = mkstemp(path);

	if (fd < 0 || write(fd, yaml, sizeof(yaml) - 1) != (ssize_t)(sizeof(yaml) - 1))
		abort();
	close(fd);
	if (config_load(path, &cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		abort();
	}
	unlink(path);
	log_set_level(LOG_LVL_ERR);
	srv.cfg = cfg;
	srv.loop = ev_loop_new(EVFLAG_AUTO);
	srv.exports = exports_new(cfg, &srv.n_exports);
	srv.exec = executor_new(srv.loop, 1);
	if (!srv.loop || !srv.exports || !srv.exec)
		abort();
}

void fuzz_serve(const uint8_t *data, size_t size)
{
	struct memtp *m = calloc(1, sizeof(*m));
	struct nbdv_conn *c;

	if (!m)
		abort();
	m->base.ops = &mem_ops;
	m->base.fd = -1;
	m->data = data;
	m->size = size;
	c = conn_new_transport(&srv, &m->base, -1, false, "fuzz");
	if (c)
		(void)conn_pump(c);
	/* Requests handed to the worker pool complete through the loop's ev_async. */
	while (srv.conns && srv.conns->inflight)
		ev_run(srv.loop, EVRUN_ONCE);
	server_flush_dirty(&srv);
	/* The stream ended: every connection must be gone or go now, leaving nothing. */
	while (srv.conns) {
		struct nbdv_conn *x = srv.conns;
		conn_abort(x);
		server_flush_dirty(&srv);
		if (srv.conns == x && !conn_release(x))
			abort(); /* a connection that can never be freed */
	}
}
