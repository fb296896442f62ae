/*
 * nbdvault - listeners, accept, the reactor loop, signals and orderly shutdown.
 */
#include "build-config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbdvault/config.h"
#include "nbdvault/conn.h"
#include "nbdvault/executor.h"
#include "nbdvault/export.h"
#include "nbdvault/log.h"
#include "nbdvault/server.h"
#include "nbdvault/tls.h"
#include "nbdvault/transmission.h"
#include "nbdvault/buf.h"

/* Seconds the drain at shutdown may take before remaining connections are cut. */
#define SHUTDOWN_GRACE 30.0

static void peer_name(const struct sockaddr_storage *ss, socklen_t len, char *out, size_t outlen)
{
	char host[NI_MAXHOST], serv[NI_MAXSERV];

	if (ss->ss_family == AF_UNIX) {
		snprintf(out, outlen, "unix socket");
	} else if (getnameinfo((const struct sockaddr *)ss, len, host, sizeof(host), serv,
			       sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
		snprintf(out, outlen, ss->ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
	} else {
		snprintf(out, outlen, "unknown peer");
	}
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_server *srv = container_of(w, struct nbdv_server, resume_timer);

	for (size_t i = 0; i < srv->n_listeners; i++) {
		if (srv->listeners[i].fd >= 0)
			ev_io_start(loop, &srv->listeners[i].io);
	}
}

static void pause_listeners(struct nbdv_server *srv)
{
	for (size_t i = 0; i < srv->n_listeners; i++)
		ev_io_stop(srv->loop, &srv->listeners[i].io);
	ev_timer_stop(srv->loop, &srv->resume_timer);
	ev_timer_set(&srv->resume_timer, 1.0, 0.);
	ev_timer_start(srv->loop, &srv->resume_timer);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct nbdv_listener *l = container_of(w, struct nbdv_listener, io);
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char peer[128];
	int fd, one = 1;

	fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
			/* Out of descriptors: the pending connection would wake us again at
			 * once.  Pause every listener and retry in a second instead of spinning. */
			log_warn("accept: %s: pausing listeners for 1 s", strerror(errno));
			pause_listeners(l->srv);
		} else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
			log_warn("accept: %s", strerror(errno));
		}
		return;
	}
	if (l->srv->n_conns >= l->srv->cfg->max_connections) {
		/* Over limits.max-connections: close at once, and say so at most once a second. */
		if (ev_now(loop) - l->srv->last_cap_log >= 1.0) {
			log_warn("refusing connections: limits.max-connections (%u) reached",
				 l->srv->cfg->max_connections);
			l->srv->last_cap_log = ev_now(loop);
		}
		close(fd);
		return;
	}
	if (l->is_tcp && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		log_warn("TCP_NODELAY: %s", strerror(errno));
	peer_name(&ss, len, peer, sizeof(peer));
	(void)conn_new(l->srv, fd, l->is_tcp, peer);
}

/* Remove a stale unix socket left by a dead server; refuse to touch anything else. */
static int clear_stale_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	int fd, r;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode)) {
		log_err("listen: %s exists and is not a socket", path);
		return -EEXIST;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	memcpy(sa.sun_path, path, strlen(path));
	r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	close(fd);
	if (r == 0) {
		log_err("listen: another server is listening on %s", path);
		return -EADDRINUSE;
	}
	return unlink(path) < 0 ? -errno : 0;
}

static int add_listener(struct nbdv_server *srv, int fd, bool is_tcp, const char *unix_path)
{
	struct nbdv_listener *l = &srv->listeners[srv->n_listeners++];

	l->fd = fd;
	l->is_tcp = is_tcp;
	l->srv = srv;
	l->unix_path = unix_path ? strdup(unix_path) : NULL;
	ev_io_init(&l->io, accept_cb, fd, EV_READ);
	ev_io_start(srv->loop, &l->io);
	return 0;
}

static int listen_unix(struct nbdv_server *srv, const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		log_err("listen: unix socket path too long: %s", path);
		return -1;
	}
	if (clear_stale_unix(path) < 0)
		return -1;
	memcpy(sa.sun_path, path, strlen(path));
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, SOMAXCONN) < 0) {
		log_err("listen: unix socket %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	log_info("listening on unix socket %s", path);
	return add_listener(srv, fd, false, path);
}

static int listen_tcp(struct nbdv_server *srv, const char *address, uint16_t port)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res, *ai;
	char portstr[8];
	int r, n = 0;

	snprintf(portstr, sizeof(portstr), "%u", port);
	r = getaddrinfo(address, portstr, &hints, &res);
	if (r != 0) {
		log_err("listen: cannot resolve %s: %s", address, gai_strerror(r));
		return -1;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		int one = 1, zero = 0;
		char name[128];
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				ai->ai_protocol);

		if (fd < 0)
			continue;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		/* "::" serves IPv4 too, as the documented default promises. */
		if (ai->ai_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
		peer_name((struct sockaddr_storage *)ai->ai_addr, ai->ai_addrlen, name,
			  sizeof(name));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, SOMAXCONN) < 0) {
			log_err("listen: %s: %s", name, strerror(errno));
			close(fd);
			freeaddrinfo(res);
			return -1;
		}
		log_info("listening on %s", name);
		add_listener(srv, fd, true, NULL);
		n++;
		/* One socket per listen entry: a dual-stack "::" already covers IPv4. */
		break;
	}
	freeaddrinfo(res);
	if (n == 0) {
		log_err("listen: no usable address for %s", address);
		return -1;
	}
	return 0;
}

void server_conn_add(struct nbdv_server *srv, struct nbdv_conn *c)
{
	c->next = srv->conns;
	if (srv->conns)
		srv->conns->prev = c;
	srv->conns = c;
	srv->n_conns++;
}

void server_conn_remove(struct nbdv_server *srv, struct nbdv_conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	srv->n_conns--;
	if (srv->shutting_down && srv->n_conns == 0)
		ev_break(srv->loop, EVBREAK_ALL);
}

void server_mark_dirty(struct nbdv_server *srv, struct nbdv_conn *c)
{
	if (c->dirty)
		return;
	c->dirty = true;
	c->dirty_next = srv->dirty;
	srv->dirty = c;
}

void server_flush_dirty(struct nbdv_server *srv)
{
	while (srv->dirty) {
		struct nbdv_conn *c = srv->dirty;
		srv->dirty = c->dirty_next;
		c->dirty = false;
		conn_service(c);
		conn_release(c);
	}
}

/* Before each poll: write what every dirty connection has queued, in one batch each. */
static void flusher_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	server_flush_dirty(container_of(w, struct nbdv_server, flusher));
}

static void stop_listeners(struct nbdv_server *srv)
{
	ev_timer_stop(srv->loop, &srv->resume_timer);
	for (size_t i = 0; i < srv->n_listeners; i++) {
		struct nbdv_listener *l = &srv->listeners[i];
		if (l->fd < 0)
			continue;
		ev_io_stop(srv->loop, &l->io);
		close(l->fd);
		l->fd = -1;
		if (l->unix_path)
			unlink(l->unix_path);
	}
}

static void shutdown_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_server *srv = container_of(w, struct nbdv_server, shutdown_timer);

	log_warn("shutdown: %u connection(s) still busy after %.0f s, cutting them", srv->n_conns,
		 SHUTDOWN_GRACE);
	for (struct nbdv_conn *c = srv->conns; c; c = c->next)
		conn_abort(c);
	ev_break(loop, EVBREAK_ALL);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct nbdv_server *srv = w->signum == SIGINT
				      ? container_of(w, struct nbdv_server, sigint)
				      : container_of(w, struct nbdv_server, sigterm);

	if (srv->shutting_down)
		return;
	srv->shutting_down = true;
	log_info("shutting down (signal %d): finishing requests in flight", w->signum);
	stop_listeners(srv);
	for (struct nbdv_conn *c = srv->conns, *next; c; c = next) {
		next = c->next;
		conn_shutdown(c);
		conn_release(c);
	}
	ev_timer_init(&srv->shutdown_timer, shutdown_timeout_cb, SHUTDOWN_GRACE, 0.);
	ev_timer_start(loop, &srv->shutdown_timer);
	if (srv->n_conns == 0)
		ev_break(loop, EVBREAK_ALL);
}

/* SIGHUP: new handshakes use freshly loaded certificates, CRL and PSK keys; sessions
 * already up keep theirs.  Invalid files leave the current credentials in place. */
static void sighup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct nbdv_server *srv = container_of(w, struct nbdv_server, sighup);
	struct nbdv_tls *fresh;
	char err[1024];

	if (srv->cfg->tls.mode == TLS_OFF) {
		log_info("SIGHUP: TLS is off, nothing to reload");
		return;
	}
	if (tls_load(&srv->cfg->tls, &fresh, err, sizeof(err)) < 0) {
		log_err("SIGHUP: keeping the current TLS credentials: %s", err);
		return;
	}
	tls_unref(srv->tls);
	srv->tls = fresh;
	log_info("SIGHUP: TLS credentials reloaded for new connections");
}

int server_init(struct nbdv_server *srv, struct nbdv_config *cfg)
{
	memset(srv, 0, sizeof(*srv));
	srv->cfg = cfg;
	srv->loop = ev_default_loop(EVFLAG_AUTO);
	if (!srv->loop) {
		log_err("cannot initialise the event loop");
		return -1;
	}
	/* Signals first: once a socket is listening, a SIGTERM must mean an orderly stop,
	 * never the default action (which would leave the unix socket behind). */
	ev_signal_init(&srv->sigint, signal_cb, SIGINT);
	ev_signal_init(&srv->sigterm, signal_cb, SIGTERM);
	ev_signal_init(&srv->sighup, sighup_cb, SIGHUP);
	ev_signal_start(srv->loop, &srv->sigint);
	ev_signal_start(srv->loop, &srv->sigterm);
	ev_signal_start(srv->loop, &srv->sighup);
	signal(SIGPIPE, SIG_IGN);
	if (cfg->tls.mode != TLS_OFF) {
		char err[1024];
		if (tls_global_init() < 0)
			return -1;
		if (tls_load(&cfg->tls, &srv->tls, err, sizeof(err)) < 0) {
			log_err("%s", err);
			return -1;
		}
	}
	srv->exports = exports_new(cfg, &srv->n_exports);
	srv->listeners = calloc(cfg->n_listen, sizeof(*srv->listeners));
	srv->exec = executor_new(srv->loop, cfg->io_threads);
	if (!srv->exports || !srv->listeners || !srv->exec) {
		log_err("out of memory at start-up");
		return -1;
	}
	for (size_t i = 0; i < cfg->n_listen; i++) {
		const struct nbdv_listen_cfg *l = &cfg->listen[i];
		int r = l->unix_path ? listen_unix(srv, l->unix_path)
				     : listen_tcp(srv, l->address, l->port);
		if (r < 0)
			return -1;
	}
	ev_timer_init(&srv->resume_timer, resume_cb, 1.0, 0.);
	ev_prepare_init(&srv->flusher, flusher_cb);
	ev_prepare_start(srv->loop, &srv->flusher);
	ev_unref(srv->loop);

	return 0;
}

int server_run(struct nbdv_server *srv)
{
	int status = 0;

	ev_run(srv->loop, 0);
	/* Every connection is gone or cut: make what clients were told is written durable. */
	if (exports_flush(srv->exports, srv->n_exports) < 0)
		status = 1;
	log_info("stopped");
	return status;
}

void server_fini(struct nbdv_server *srv)
{
	stop_listeners(srv);
	executor_free(srv->exec);
	srv->exec = NULL;
	/* Connections cut at the deadline are dead; their jobs have now completed. */
	while (srv->conns) {
		struct nbdv_conn *c = srv->conns;
		conn_abort(c);
		c->dirty = false;
		c->depth = 0;
		if (!conn_release(c))
			break;
	}
	if (srv->loop) {
		ev_timer_stop(srv->loop, &srv->shutdown_timer);
		ev_ref(srv->loop);
		ev_prepare_stop(srv->loop, &srv->flusher);
		ev_signal_stop(srv->loop, &srv->sigint);
		ev_signal_stop(srv->loop, &srv->sigterm);
		ev_signal_stop(srv->loop, &srv->sighup);
	}
	exports_free(srv->exports, srv->n_exports);
	for (size_t i = 0; srv->listeners && i < srv->n_listeners; i++)
		free(srv->listeners[i].unix_path);
	free(srv->listeners);
	if (srv->tls) {
		tls_unref(srv->tls);
		srv->tls = NULL;
		tls_global_deinit();
	}
	config_free(srv->cfg);
	srv->cfg = NULL;
	transmission_req_cache_drain();
	nbdv_buf_pool_drain();
}
