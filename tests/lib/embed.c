/* nbdvault - embedded server and in-memory transport for in-process tests. */
#include "build-config.h"

#include <errno.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "embed.h"
#include "config.h"
#include "conn.h"
#include "log.h"
#include "server.h"
#include "transport.h"

struct memtp {
	struct nbdv_transport base; /* must be first */
	struct embed_client *cl;    /* the client's side */
};

static ssize_t mem_recv(struct nbdv_transport *t, void *buf, size_t len)
{
	struct embed_client *cl = ((struct memtp *)t)->cl;
	size_t n = cl->in_len - cl->in_pos;

	if (n == 0)
		return cl->closed ? 0 : -EAGAIN;
	if (n > len)
		n = len;
	memcpy(buf, cl->in + cl->in_pos, n);
	cl->in_pos += n;
	return (ssize_t)n;
}

void (*embed_on_send)(void);

static ssize_t mem_sendv(struct nbdv_transport *t, const struct iovec *iov, int iovcnt, bool more)
{
	struct embed_client *cl = ((struct memtp *)t)->cl;
	size_t n = 0;

	for (int i = 0; i < iovcnt; i++) {
		if (cl->out) {
			if (iov[i].iov_len > cl->out_cap - cl->out_len) {
				fprintf(stderr, "embed: output buffer of %zu bytes is full\n",
					cl->out_cap);
				abort();
			}
			memcpy(cl->out + cl->out_len, iov[i].iov_base, iov[i].iov_len);
			cl->out_len += iov[i].iov_len;
		}
		n += iov[i].iov_len;
	}
	if (embed_on_send)
		embed_on_send();
	return (ssize_t)n;
}

static bool mem_pending(struct nbdv_transport *t)
{
	struct embed_client *cl = ((struct memtp *)t)->cl;

	return cl->in_pos < cl->in_len || cl->closed;
}

static void mem_shutdown(struct nbdv_transport *t)
{
}

static void mem_free(struct nbdv_transport *t)
{
	((struct memtp *)t)->cl->gone = true;
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

struct nbdv_server *embed_init(const char *yaml)
{
	char path[] = "/tmp/nbdvault-embed-XXXXXX", err[512];
	struct nbdv_config *cfg;
	int fd = mkstemp(path);
	size_t len = strlen(yaml);

	if (fd < 0 || write(fd, yaml, len) != (ssize_t)len)
		abort();
	close(fd);
	if (config_load(path, &cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		abort();
	}
	unlink(path);
	log_set_level(LOG_LVL_ERR);
	if (server_init_embedded(&srv, cfg) < 0)
		abort();
	return &srv;
}

void embed_fini(void)
{
	server_fini(&srv);
}

/* The flusher's work, to the end (one pass of it stops after a turn's time). */
static void flush_all(struct nbdv_reactor *r)
{
	while (!reactor_flush_dirty(r))
		;
}

struct embed_client *embed_open(size_t in_cap, size_t out_cap)
{
	struct embed_client *cl = embed_connect(in_cap, out_cap);

	flush_all(&srv.reactors[0]);
	return cl;
}

struct embed_client *embed_connect(size_t in_cap, size_t out_cap)
{
	struct embed_client *cl = calloc(1, sizeof(*cl));
	struct memtp *m = calloc(1, sizeof(*m));

	if (!cl || !m || !(cl->in = malloc(in_cap ? in_cap : 1)))
		abort();
	cl->in_cap = in_cap;
	if (out_cap && !(cl->out = malloc(out_cap)))
		abort();
	cl->out_cap = out_cap;
	m->base.ops = &mem_ops;
	m->base.fd = -1;
	m->cl = cl;
	if (!conn_new_transport(&srv.reactors[0], &m->base, -1, false, "embedded"))
		cl->gone = true;
	return cl;
}

/* Find the live connection of @cl (there are few). */
static struct nbdv_conn *conn_of(struct embed_client *cl)
{
	for (struct nbdv_conn *c = srv.reactors[0].conns; c; c = c->next) {
		if (((struct memtp *)c->tp)->cl == cl)
			return c;
	}
	return NULL;
}

/* Serve until the server has nothing left to do for @cl. */
static void settle(struct embed_client *cl)
{
	struct nbdv_reactor *r = &srv.reactors[0];
	struct nbdv_conn *c;

	for (;;) {
		c = conn_of(cl);
		if (!c)
			break;
		if (r->port.outstanding) {
			/* Jobs on the I/O threads complete through the reactor's ev_async.  (READs
			 * waiting for send-ahead room count as in flight too: the flush below
			 * starts them.) */
			ev_run(r->loop, EVRUN_ONCE);
			continue;
		}
		flush_all(r);
		c = conn_of(cl);
		if (!c || c->inflight || !c->tp->ops->pending(c->tp) || cl->closed ||
		    (c->phase != CONN_OPTIONS && c->phase != CONN_TRANSMISSION))
			break;
		if (!conn_pump(c))
			break;
	}
	flush_all(r);
}

void embed_feed(struct embed_client *cl, const void *data, size_t len)
{
	struct nbdv_conn *c;

	if (len > cl->in_cap - cl->in_len) {
		fprintf(stderr, "embed: input buffer of %zu bytes is full\n", cl->in_cap);
		abort();
	}
	memcpy(cl->in + cl->in_len, data, len);
	cl->in_len += len;
	c = conn_of(cl);
	if (c && conn_pump(c))
		settle(cl);
	else
		flush_all(&srv.reactors[0]);
}

void embed_close(struct embed_client *cl)
{
	struct nbdv_reactor *r = &srv.reactors[0];
	struct nbdv_conn *c;

	cl->closed = true;
	c = conn_of(cl);
	if (c && conn_pump(c)) {
		while ((c = conn_of(cl)) && c->inflight)
			ev_run(r->loop, EVRUN_ONCE);
	}
	flush_all(r);
	/* The stream ended: the connection must be gone or go now, leaving nothing. */
	while ((c = conn_of(cl))) {
		conn_abort(c);
		flush_all(r);
		if (conn_of(cl) == c && !conn_release(c))
			abort(); /* a connection that can never be freed */
	}
	free(cl->in);
	free(cl->out);
	free(cl);
}
