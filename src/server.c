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
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "config.h"
#include "conn.h"
#include "driver_registry.h"
#include "executor.h"
#include "export.h"
#include "log.h"
#include "metrics.h"
#include "sandbox.h"
#include "server.h"
#include "systemd.h"
#include "tls.h"
#include "transmission.h"
#include "buf.h"

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

/* An accepted socket on its way to another reactor. */
struct nbdv_handoff {
	struct nbdv_handoff *next;
	int fd;
	bool is_tcp;
	char peer[128];
};

static unsigned load_u(const unsigned *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_server *srv = container_of(w, struct nbdv_server, resume_timer);

	for (size_t i = 0; i < srv->n_listeners; i++) {
		if (srv->listeners[i].fd >= 0)
			ev_io_start(loop, &srv->listeners[i].io);
	}
}

static struct ev_loop *main_loop(const struct nbdv_server *srv)
{
	return srv->reactors[0].loop;
}

static void pause_listeners(struct nbdv_server *srv)
{
	for (size_t i = 0; i < srv->n_listeners; i++)
		ev_io_stop(main_loop(srv), &srv->listeners[i].io);
	ev_timer_stop(main_loop(srv), &srv->resume_timer);
	ev_timer_set(&srv->resume_timer, 1.0, 0.);
	ev_timer_start(main_loop(srv), &srv->resume_timer);
}

/* Connections everywhere, counting sockets still on their way to a reactor. */
static unsigned total_conns(const struct nbdv_server *srv)
{
	unsigned n = load_u(&srv->n_conns);

	for (unsigned i = 0; i < srv->n_reactors; i++)
		n += load_u(&srv->reactors[i].pending);
	return n;
}

/* The reactor with the fewest connections (ties go to the lowest index). */
static struct nbdv_reactor *pick_reactor(struct nbdv_server *srv)
{
	struct nbdv_reactor *best = &srv->reactors[0];
	unsigned best_load = ~0u;

	for (unsigned i = 0; i < srv->n_reactors; i++) {
		struct nbdv_reactor *r = &srv->reactors[i];
		unsigned load = load_u(&r->n_conns) + load_u(&r->pending);
		if (load < best_load) {
			best = r;
			best_load = load;
		}
	}
	return best;
}

static void hand_over(struct nbdv_reactor *r, int fd, bool is_tcp, const char *peer)
{
	struct nbdv_handoff *h = malloc(sizeof(*h));

	if (!h) {
		log_err("out of memory accepting a connection from %s", peer);
		close(fd);
		return;
	}
	h->fd = fd;
	h->is_tcp = is_tcp;
	snprintf(h->peer, sizeof(h->peer), "%s", peer);
	__atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
	pthread_mutex_lock(&r->lock);
	h->next = r->handoffs;
	r->handoffs = h;
	pthread_mutex_unlock(&r->lock);
	ev_async_send(r->loop, &r->wake);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct nbdv_listener *l = container_of(w, struct nbdv_listener, io);
	struct nbdv_server *srv = l->srv;
	struct nbdv_reactor *r;
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
			pause_listeners(srv);
		} else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
			log_warn("accept: %s", strerror(errno));
		}
		return;
	}
	if (total_conns(srv) >= srv->live->max_connections) {
		/* Over limits.max-connections: close at once, and say so at most once a second. */
		if (ev_now(loop) - srv->last_cap_log >= 1.0) {
			log_warn("refusing connections: limits.max-connections (%u) reached",
				 srv->live->max_connections);
			srv->last_cap_log = ev_now(loop);
		}
		close(fd);
		return;
	}
	if (l->is_tcp && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		log_warn("TCP_NODELAY: %s", strerror(errno));
	peer_name(&ss, len, peer, sizeof(peer));
	r = pick_reactor(srv);
	if (r->idx == 0)
		(void)conn_new(r, fd, l->is_tcp, peer);
	else
		hand_over(r, fd, l->is_tcp, peer);
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

static int add_listener(struct nbdv_server *srv, int fd, bool is_tcp, const char *unix_path,
			const char *address, uint16_t port)
{
	struct nbdv_listener *l = &srv->listeners[srv->n_listeners++];

	l->fd = fd;
	l->is_tcp = is_tcp;
	l->srv = srv;
	l->unix_path = unix_path ? strdup(unix_path) : NULL;
	l->address = address ? strdup(address) : NULL;
	l->port = port;
	ev_io_init(&l->io, accept_cb, fd, EV_READ);
	ev_io_start(main_loop(srv), &l->io);
	return 0;
}

/* A listening unix socket at @path, or -1 (logged). */
static int bind_unix(const char *path)
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
	return fd;
}

/* A listening TCP socket for @address and @port (one per entry: a dual-stack "::"
 * covers IPv4 too), or -1 (logged). */
static int bind_tcp(const char *address, uint16_t port)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res, *ai;
	char portstr[8];
	int r, fd = -1;

	snprintf(portstr, sizeof(portstr), "%u", port);
	r = getaddrinfo(address, portstr, &hints, &res);
	if (r != 0) {
		log_err("listen: cannot resolve %s: %s", address, gai_strerror(r));
		return -1;
	}
	for (ai = res; ai && fd < 0; ai = ai->ai_next) {
		int one = 1, zero = 0;
		char name[128];

		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
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
	}
	freeaddrinfo(res);
	if (fd < 0)
		log_err("listen: no usable address for %s", address);
	return fd;
}

/* Bind one `listen:` entry; -1 on failure (logged). */
static int bind_entry(const struct nbdv_listen_cfg *l)
{
	return l->unix_path ? bind_unix(l->unix_path) : bind_tcp(l->address, l->port);
}

static int listen_entry(struct nbdv_server *srv, const struct nbdv_listen_cfg *l)
{
	int fd = bind_entry(l);

	if (fd < 0)
		return -1;
	return add_listener(srv, fd, !l->unix_path, l->unix_path, l->address, l->port);
}

static bool serves_entry(const struct nbdv_listener *l, const struct nbdv_listen_cfg *e)
{
	if (l->fd < 0)
		return false;
	if (e->unix_path)
		return l->unix_path && strcmp(l->unix_path, e->unix_path) == 0;
	return l->address && strcmp(l->address, e->address) == 0 && l->port == e->port;
}

static bool in_config(const struct nbdv_config *cfg, const struct nbdv_listener *l)
{
	for (size_t i = 0; i < cfg->n_listen; i++)
		if (serves_entry(l, &cfg->listen[i]))
			return true;
	return false;
}

/* Sockets server_listeners_prepare() bound for entries of the next config. */
static struct {
	int fd;
	const struct nbdv_listen_cfg *entry;
} prepared[NBDV_RELOAD_LISTENERS];
static size_t n_prepared;

const char *server_listeners_prepare(struct nbdv_server *srv, const struct nbdv_config *next,
				     char *buf, size_t len)
{
	size_t add = 0;

	n_prepared = 0;
	if (!srv->listen_from_config) {
		if (next->n_listen != srv->live->n_listen)
			log_info(
			    "SIGHUP: listen: not used (the sockets systemd passed are served)");
		return NULL;
	}
	for (size_t i = 0; i < next->n_listen; i++) {
		bool have = false;
		for (size_t k = 0; k < srv->n_listeners && !have; k++)
			have = serves_entry(&srv->listeners[k], &next->listen[i]);
		add += !have && !next->listen_default;
	}
	if (add && srv->cfg->sandbox) {
		snprintf(buf, len,
			 "listen (a new listener needs socket() and bind(), which the sandbox "
			 "forbids once serving; removing listeners works live)");
		return buf;
	}
	if (srv->n_listeners + add > srv->max_listeners) {
		snprintf(buf, len, "listen (more than %d listeners added since start)",
			 NBDV_RELOAD_LISTENERS);
		return buf;
	}
	for (size_t i = 0; i < next->n_listen && !next->listen_default; i++) {
		bool have = false;
		int fd;

		for (size_t k = 0; k < srv->n_listeners && !have; k++)
			have = serves_entry(&srv->listeners[k], &next->listen[i]);
		if (have)
			continue;
		fd = bind_entry(&next->listen[i]);
		if (fd < 0) {
			server_listeners_abort(srv);
			snprintf(buf, len, "listen (a new entry could not be bound: see above)");
			return buf;
		}
		prepared[n_prepared].fd = fd;
		prepared[n_prepared++].entry = &next->listen[i];
	}
	return NULL;
}

void server_listeners_abort(struct nbdv_server *srv)
{
	(void)srv;
	for (size_t i = 0; i < n_prepared; i++) {
		close(prepared[i].fd);
		if (prepared[i].entry->unix_path)
			unlink(prepared[i].entry->unix_path);
	}
	n_prepared = 0;
}

void server_listeners_commit(struct nbdv_server *srv, const struct nbdv_config *next)
{
	if (!srv->listen_from_config)
		return;
	for (size_t i = 0; i < srv->n_listeners; i++) {
		struct nbdv_listener *l = &srv->listeners[i];

		if (l->fd < 0 || (!l->address && !l->unix_path) || in_config(next, l))
			continue;
		ev_io_stop(main_loop(srv), &l->io);
		close(l->fd);
		l->fd = -1;
		if (l->unix_path)
			unlink(l->unix_path);
		log_info("SIGHUP: stopped listening on %s%s%s", l->unix_path ? "unix socket " : "",
			 l->unix_path ? l->unix_path : l->address, l->unix_path ? "" : " (TCP)");
	}
	for (size_t i = 0; i < n_prepared; i++) {
		const struct nbdv_listen_cfg *e = prepared[i].entry;
		add_listener(srv, prepared[i].fd, !e->unix_path, e->unix_path, e->address, e->port);
	}
	n_prepared = 0;
}

void reactor_conn_add(struct nbdv_reactor *r, struct nbdv_conn *c)
{
	c->next = r->conns;
	if (r->conns)
		r->conns->prev = c;
	r->conns = c;
	__atomic_add_fetch(&r->n_conns, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&r->srv->n_conns, 1, __ATOMIC_RELAXED);
}

void reactor_conn_remove(struct nbdv_reactor *r, struct nbdv_conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		r->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	__atomic_sub_fetch(&r->srv->n_conns, 1, __ATOMIC_RELAXED);
	if (__atomic_sub_fetch(&r->n_conns, 1, __ATOMIC_RELAXED) == 0 && r->shutting_down)
		ev_break(r->loop, EVBREAK_ALL);
}

void reactor_mark_dirty(struct nbdv_reactor *r, struct nbdv_conn *c)
{
	if (c->dirty)
		return;
	c->dirty = true;
	c->dirty_next = r->dirty;
	r->dirty = c;
}

void reactor_flush_dirty(struct nbdv_reactor *r)
{
	while (r->dirty) {
		struct nbdv_conn *c = r->dirty;
		r->dirty = c->dirty_next;
		c->dirty = false;
		conn_service(c);
		conn_release(c);
	}
}

/* How soon connections paused by limits.max-memory look again. */
#define MEMORY_RETRY 0.005

void reactor_memory_wait(struct nbdv_reactor *r)
{
	if (!ev_is_active(&r->memory_timer))
		ev_timer_start(r->loop, &r->memory_timer);
}

static void memory_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, memory_timer);

	/* Each one takes what it can now, or asks for this timer again. */
	for (struct nbdv_conn *c = r->conns; c; c = c->next)
		reactor_mark_dirty(r, c);
}

/* Before each poll: write what every dirty connection has queued, in one batch each. */
static void flusher_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, flusher);

	/* Replies are leaving and no job is out on the I/O threads: the client is probably
	 * about to send the next request.  Keep polling for a moment instead of sleeping
	 * (a wake-up from sleep costs tens of microseconds on virtual machines). */
	if (r->dirty && r->srv->cfg->busy_poll > 0 && r->port.outstanding == 0) {
		r->spin_until = ev_time() + r->srv->cfg->busy_poll;
		if (!ev_is_active(&r->spin_idle))
			ev_idle_start(loop, &r->spin_idle);
	}
	reactor_flush_dirty(r);
}

static void spin_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, spin_idle);

	if (ev_time() >= r->spin_until)
		ev_idle_stop(loop, w);
}

static void stop_listeners(struct nbdv_server *srv)
{
	if (!srv->reactors || !main_loop(srv))
		return;
	ev_timer_stop(main_loop(srv), &srv->resume_timer);
	for (size_t i = 0; i < srv->n_listeners; i++) {
		struct nbdv_listener *l = &srv->listeners[i];
		if (l->fd < 0)
			continue;
		ev_io_stop(main_loop(srv), &l->io);
		close(l->fd);
		l->fd = -1;
		if (l->unix_path)
			unlink(l->unix_path);
	}
}

static void shutdown_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, shutdown_timer);

	log_warn("shutdown: %u connection(s) still busy after %.0f s, cutting them",
		 load_u(&r->n_conns), SHUTDOWN_GRACE);
	for (struct nbdv_conn *c = r->conns; c; c = c->next)
		conn_abort(c);
	ev_break(loop, EVBREAK_ALL);
}

/* On reactor @r: option-phase connections close, the others drain; the loop ends when
 * its last connection is gone or the grace period is over. */
static void reactor_begin_shutdown(struct nbdv_reactor *r)
{
	if (r->shutting_down)
		return;
	r->shutting_down = true;
	for (struct nbdv_conn *c = r->conns, *next; c; c = next) {
		next = c->next;
		conn_shutdown(c);
		conn_release(c);
	}
	ev_timer_start(r->loop, &r->shutdown_timer);
	if (load_u(&r->n_conns) == 0)
		ev_break(r->loop, EVBREAK_ALL);
}

/* Sockets the acceptor handed to this reactor, or a shutdown request. */
/* After a reload: sessions on exports that were removed (with on-remove: close) or
 * whose identity or transport the new policy no longer allows are closed. */
static void reactor_recheck(struct nbdv_reactor *r)
{
	for (struct nbdv_conn *c = r->conns; c; c = c->next) {
		c->depth++;
		conn_recheck(c);
		c->depth--;
		reactor_mark_dirty(r, c); /* conn_release() there, if it is done */
	}
}

void server_recheck_sessions(struct nbdv_server *srv)
{
	for (unsigned i = 0; i < srv->n_reactors; i++) {
		struct nbdv_reactor *r = &srv->reactors[i];
		pthread_mutex_lock(&r->lock);
		r->recheck = true;
		pthread_mutex_unlock(&r->lock);
		ev_async_send(r->loop, &r->wake);
	}
}

static void reactor_wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, wake);
	struct nbdv_handoff *list, *fifo = NULL;
	bool stop, recheck;

	pthread_mutex_lock(&r->lock);
	list = r->handoffs;
	r->handoffs = NULL;
	stop = r->stop_asked;
	recheck = r->recheck;
	r->recheck = false;
	pthread_mutex_unlock(&r->lock);
	if (recheck)
		reactor_recheck(r);
	while (list) { /* queued newest first: restore arrival order */
		struct nbdv_handoff *next = list->next;
		list->next = fifo;
		fifo = list;
		list = next;
	}
	while (fifo) {
		struct nbdv_handoff *h = fifo;
		fifo = h->next;
		if (stop || r->shutting_down)
			close(h->fd);
		else
			(void)conn_new(r, h->fd, h->is_tcp, h->peer);
		__atomic_sub_fetch(&r->pending, 1, __ATOMIC_RELAXED);
		free(h);
	}
	if (stop)
		reactor_begin_shutdown(r);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct nbdv_server *srv = w->signum == SIGINT
				      ? container_of(w, struct nbdv_server, sigint)
				      : container_of(w, struct nbdv_server, sigterm);

	if (srv->shutting_down)
		return;
	srv->shutting_down = true;
	systemd_notify("STOPPING=1\nSTATUS=stopping: finishing requests in flight");
	log_info("shutting down (signal %d): finishing requests in flight", w->signum);
	stop_listeners(srv);
	for (unsigned i = 1; i < srv->n_reactors; i++) {
		struct nbdv_reactor *r = &srv->reactors[i];
		pthread_mutex_lock(&r->lock);
		r->stop_asked = true;
		pthread_mutex_unlock(&r->lock);
		ev_async_send(r->loop, &r->wake);
	}
	reactor_begin_shutdown(&srv->reactors[0]);
}

/* SIGHUP: new handshakes use freshly loaded certificates, CRL and PSK keys; sessions
 * already up keep theirs.  Invalid files leave the current credentials in place. */
static void reload_tls(struct nbdv_server *srv)
{
	struct nbdv_tls *fresh, *old;
	char err[1024];

	if (srv->cfg->tls.mode == TLS_OFF) {
		log_info("SIGHUP: TLS is off, nothing to reload");
		return;
	}
	if (tls_load(&srv->cfg->tls, &fresh, err, sizeof(err)) < 0) {
		log_err("SIGHUP: keeping the current TLS credentials: %s", err);
		return;
	}
	pthread_mutex_lock(&srv->tls_lock);
	old = srv->tls;
	/* A revocation list that vanished must not quietly readmit revoked clients. */
	if (tls_has_crl(old) && !tls_has_crl(fresh)) {
		pthread_mutex_unlock(&srv->tls_lock);
		tls_unref(fresh);
		log_err("SIGHUP: keeping the current TLS credentials: %s/ca-crl.pem was in use "
			"and is missing now (revocation is never switched off by a reload; "
			"restart to run without a CRL)",
			srv->cfg->tls.certificates);
		return;
	}
	srv->tls = fresh;
	pthread_mutex_unlock(&srv->tls_lock);
	tls_unref(old);
	log_info("SIGHUP: TLS credentials reloaded for new connections");
}

static void sighup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct nbdv_server *srv = container_of(w, struct nbdv_server, sighup);
	systemd_notify("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
		       (unsigned long long)(nbdv_now_ns() / 1000));
	reload_tls(srv);
	audit_reopen(); /* logrotate renamed it */
	(void)server_reload(srv);
	systemd_notify("READY=1\nSTATUS=serving %zu export(s) on %zu listener(s)", srv->n_exports,
		       srv->n_listeners);
}

struct nbdv_tls *server_tls_get(struct nbdv_server *srv)
{
	struct nbdv_tls *t;

	pthread_mutex_lock(&srv->tls_lock);
	t = srv->tls ? tls_ref(srv->tls) : NULL;
	pthread_mutex_unlock(&srv->tls_lock);
	return t;
}

static void reactor_setup(struct nbdv_server *srv, unsigned idx, struct ev_loop *loop)
{
	struct nbdv_reactor *r = &srv->reactors[idx];

	r->srv = srv;
	r->idx = idx;
	r->loop = loop;
	pthread_mutex_init(&r->lock, NULL);
	executor_port_init(&r->port, loop);
	ev_prepare_init(&r->flusher, flusher_cb);
	ev_prepare_start(loop, &r->flusher);
	ev_idle_init(&r->spin_idle, spin_cb);
	ev_unref(loop);
	ev_async_init(&r->wake, reactor_wake_cb);
	ev_async_start(loop, &r->wake);
	if (idx == 0)
		ev_unref(loop); /* the main loop lives as long as listeners and signals do */
	ev_timer_init(&r->shutdown_timer, shutdown_timeout_cb, SHUTDOWN_GRACE, 0.);
	ev_timer_init(&r->memory_timer, memory_timer_cb, MEMORY_RETRY, 0.);
}

static void reactor_teardown(struct nbdv_reactor *r)
{
	struct nbdv_handoff *h;

	if (!r->loop)
		return;
	executor_port_fini(&r->port);
	/* Connections cut at the deadline are dead; their jobs have now completed. */
	while (r->conns) {
		struct nbdv_conn *c = r->conns;
		conn_abort(c);
		c->dirty = false;
		c->depth = 0;
		if (!conn_release(c))
			break;
	}
	while ((h = r->handoffs)) {
		r->handoffs = h->next;
		close(h->fd);
		free(h);
	}
	ev_timer_stop(r->loop, &r->shutdown_timer);
	ev_timer_stop(r->loop, &r->memory_timer);
	ev_ref(r->loop);
	ev_prepare_stop(r->loop, &r->flusher);
	ev_idle_stop(r->loop, &r->spin_idle);
	if (r->idx == 0)
		ev_ref(r->loop);
	ev_async_stop(r->loop, &r->wake);
	pthread_mutex_destroy(&r->lock);
	if (r->idx != 0 || !ev_is_default_loop(r->loop))
		ev_loop_destroy(r->loop);
	r->loop = NULL;
}

/* The first line of @path into @buf; false if it cannot be read. */
static bool read_first_line(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");
	bool ok;

	if (!f)
		return false;
	ok = fgets(buf, (int)len, f) != NULL;
	fclose(f);
	return ok;
}

/* Whether the comma-separated controller list @list (it ends at ':') names "cpu". */
static bool has_cpu_controller(const char *list)
{
	while (*list && *list != ':') {
		size_t n = strcspn(list, ",:");

		if (n == 3 && strncmp(list, "cpu", 3) == 0)
			return true;
		list += n;
		if (*list == ',')
			list++;
	}
	return false;
}

/*
 * CPUs the cgroup's quota allows, rounded up (0: no quota): cgroup v2 cpu.max
 * ("QUOTA PERIOD"; "max PERIOD" is no quota), else v1 cpu.cfs_quota_us (-1: none)
 * over cpu.cfs_period_us.
 */
static long cgroup_cpu_limit(void)
{
	char line[512], path[640], val[128];
	long long quota = 0, period = 0;
	FILE *f = fopen("/proc/self/cgroup", "r");

	if (!f)
		return 0;
	while (quota <= 0 && fgets(line, sizeof(line), f)) {
		char *controllers = strchr(line, ':'), *rel = strrchr(line, ':');

		if (!controllers || rel == controllers)
			continue;
		rel[strcspn(rel, "\n")] = '\0';
		quota = period = 0;
		if (strncmp(line, "0::", 3) == 0) {
			snprintf(path, sizeof(path), "/sys/fs/cgroup%s/cpu.max", rel + 1);
			if (!read_first_line(path, val, sizeof(val)) ||
			    sscanf(val, "%lld %lld", &quota, &period) != 2)
				quota = 0;
		} else if (has_cpu_controller(controllers + 1)) {
			snprintf(path, sizeof(path), "/sys/fs/cgroup/cpu%s/cpu.cfs_quota_us",
				 rel + 1);
			if (!read_first_line(path, val, sizeof(val)) ||
			    sscanf(val, "%lld", &quota) != 1)
				quota = 0;
			snprintf(path, sizeof(path), "/sys/fs/cgroup/cpu%s/cpu.cfs_period_us",
				 rel + 1);
			if (quota > 0 && (!read_first_line(path, val, sizeof(val)) ||
					  sscanf(val, "%lld", &period) != 1))
				quota = 0;
		}
	}
	fclose(f);
	return quota > 0 && period > 0 ? (long)((quota + period - 1) / period) : 0;
}

/* One worker per CPU this process may run on: its affinity mask (taskset, cpusets)
 * and its cgroup's CPU quota (containers), not just the CPUs online. */
static unsigned default_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN), quota = cgroup_cpu_limit();
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		n = CPU_COUNT(&set);
	if (quota > 0 && quota < n)
		n = quota;
	return n < 1 ? 1 : n > NBDV_MAX_WORKERS ? NBDV_MAX_WORKERS : (unsigned)n;
}

/* Threads started from here (I/O threads, reactors) leave the server's signals to the
 * main thread. */
static void block_signals(sigset_t *old)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, old);
}

static int alloc_reactors(struct nbdv_server *srv, unsigned n)
{
	srv->reactors = calloc(n, sizeof(*srv->reactors));
	if (!srv->reactors)
		return -1;
	srv->n_reactors = n;
	return 0;
}

int server_init(struct nbdv_server *srv, struct nbdv_config *cfg)
{
	struct ev_loop *loop;
	unsigned n_workers = cfg->workers ? cfg->workers : default_workers();
	struct nbdv_ids ids;
	int passed[64], n_passed, r;
	bool with_config;
	size_t n_exp;
	sigset_t old;

	memset(srv, 0, sizeof(*srv));
	srv->cfg = cfg;
	pthread_mutex_init(&srv->tls_lock, NULL);
	loop = ev_default_loop(EVFLAG_AUTO);
	if (!loop || alloc_reactors(srv, n_workers) < 0) {
		log_err("cannot initialise the event loop");
		return -1;
	}
	reactor_setup(srv, 0, loop);
	/* Signals first: once a socket is listening, a SIGTERM must mean an orderly stop,
	 * never the default action (which would leave the unix socket behind). */
	ev_signal_init(&srv->sigint, signal_cb, SIGINT);
	ev_signal_init(&srv->sigterm, signal_cb, SIGTERM);
	ev_signal_init(&srv->sighup, sighup_cb, SIGHUP);
	ev_signal_start(loop, &srv->sigint);
	ev_signal_start(loop, &srv->sigterm);
	ev_signal_start(loop, &srv->sighup);
	signal(SIGPIPE, SIG_IGN);
	for (unsigned i = 1; i < n_workers; i++) {
		struct ev_loop *l = ev_loop_new(EVFLAG_AUTO);
		if (!l) {
			log_err("cannot initialise the event loop of worker %u", i);
			return -1;
		}
		reactor_setup(srv, i, l);
	}
	if (cfg->tls.mode != TLS_OFF) {
		char err[1024];
		if (tls_global_init() < 0)
			return -1;
		if (tls_load(&cfg->tls, &srv->tls, err, sizeof(err)) < 0) {
			log_err("%s", err);
			return -1;
		}
	}
	if (sandbox_resolve_user(cfg, &ids) < 0)
		return -1;
	n_passed = systemd_listen_fds(passed, (int)ARRAY_SIZE(passed), &with_config);
	/* Socket activation replaces `listen:`, unless a socket is named with-config. */
	srv->listen_from_config = !n_passed || with_config;
	srv->live = cfg;
	srv->exports = exports_new(cfg, &n_exp);
	srv->n_exports = n_exp;
	srv->max_listeners = (size_t)n_passed + cfg->n_listen + NBDV_RELOAD_LISTENERS;
	srv->listeners = calloc(srv->max_listeners, sizeof(*srv->listeners));
	if (!srv->exports || !srv->listeners) {
		log_err("out of memory at start-up");
		return -1;
	}
	if (n_passed) {
		for (int i = 0; i < n_passed; i++) {
			struct sockaddr_storage ss;
			socklen_t sl = sizeof(ss);
			bool tcp = getsockname(passed[i], (struct sockaddr *)&ss, &sl) == 0 &&
				   ss.ss_family != AF_UNIX;
			add_listener(srv, passed[i], tcp, NULL, NULL, 0);
			log_info("listening on %s socket %d passed by systemd%s",
				 tcp ? "a TCP" : "a unix", passed[i],
				 srv->listen_from_config ? "" : " (listen: not used)");
		}
	}
	for (size_t i = 0; srv->listen_from_config && i < cfg->n_listen; i++) {
		/* (Beside passed sockets only what the file names, not the default.) */
		if (n_passed && cfg->listen_default)
			break;
		r = listen_entry(srv, &cfg->listen[i]);
		if (r < 0)
			return -1;
	}
	(void)systemd_notify_open(); /* before the sandbox: no socket() after it */
	if (audit_open(cfg->audit_log) < 0 || metrics_bind(srv) < 0)
		return -1;
	/* Bound and keys read: give up root, then close the sandbox, while this is still
	 * the only thread (Landlock binds the calling thread and its future children). */
	/* Drivers are loaded while reading the config, before this: none after it. */
	driver_loading_close();
	if (sandbox_drop_user(&ids) < 0 || sandbox_enter(cfg) < 0)
		return -1;
	/* Network storage connects now, inside the sandbox (its library's threads inherit
	 * it), so that no reactor ever waits for a cluster at GO. */
	for (size_t i = 0; i < srv->n_exports; i++) {
		const struct nbdv_dev *dev;

		if ((srv->exports[i].cfg->drv->needs & NBDV_NEEDS_NETWORK) &&
		    export_open(&srv->exports[i], &dev) < 0)
			return -1;
	}
	block_signals(&old);
	srv->exec = executor_new(cfg->io_threads);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!srv->exec) {
		log_err("out of memory at start-up");
		return -1;
	}
	/* Its thread starts inside the sandbox, with the server's signals blocked. */
	block_signals(&old);
	r = metrics_start(srv);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r < 0)
		return -1;
	ev_timer_init(&srv->resume_timer, resume_cb, 1.0, 0.);
	log_info("%u worker(s), %u I/O thread(s), busy-poll %.0f us", n_workers, cfg->io_threads,
		 cfg->busy_poll * 1e6);
	return 0;
}

int server_init_embedded(struct nbdv_server *srv, struct nbdv_config *cfg)
{
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	size_t n;

	memset(srv, 0, sizeof(*srv));
	srv->cfg = cfg;
	pthread_mutex_init(&srv->tls_lock, NULL);
	if (!loop || alloc_reactors(srv, 1) < 0)
		return -1;
	reactor_setup(srv, 0, loop);
	srv->live = cfg;
	srv->exports = exports_new(cfg, &n);
	srv->n_exports = n;
	srv->exec = executor_new(cfg->io_threads);
	return srv->exports && srv->exec ? 0 : -1;
}

/* Requests and replies freed on the calling thread are cached there: free them. */
static void drain_thread_caches(void)
{
	transmission_req_cache_drain();
	nbdv_outmsg_cache_drain();
}

static void *reactor_main(void *arg)
{
	struct nbdv_reactor *r = arg;

	ev_run(r->loop, 0);
	drain_thread_caches();
	return NULL;
}

int server_run(struct nbdv_server *srv)
{
	int status = 0;
	sigset_t old;

	block_signals(&old);
	for (unsigned i = 1; i < srv->n_reactors; i++) {
		struct nbdv_reactor *r = &srv->reactors[i];
		if (pthread_create(&r->thread, NULL, reactor_main, r) != 0) {
			log_err("cannot start worker %u; serving with %u", i, i);
			/* The acceptor never picks the rest; they hold no connection yet. */
			for (unsigned k = i; k < srv->n_reactors; k++)
				reactor_teardown(&srv->reactors[k]);
			srv->n_reactors = i;
			break;
		}
		r->threaded = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
#ifdef NBDV_TEST_HOOKS
	sandbox_test_escape();
#endif
	systemd_notify("READY=1\nSTATUS=serving %zu export(s) on %zu listener(s)\nMAINPID=%ld",
		       srv->n_exports, srv->n_listeners, (long)getpid());
	ev_run(main_loop(srv), 0);
	for (unsigned i = 1; i < srv->n_reactors; i++) {
		if (srv->reactors[i].threaded)
			pthread_join(srv->reactors[i].thread, NULL);
		srv->reactors[i].threaded = false;
	}
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
	if (srv->reactors && srv->reactors[0].loop && ev_is_default_loop(srv->reactors[0].loop)) {
		sigset_t old;

		/* Stopping the watchers restores the default actions; a second SIGTERM while
		 * the exports are being closed must not kill the process with status -15.
		 * Blocked meanwhile, then ignored (a pending one is discarded). */
		block_signals(&old);
		ev_signal_stop(main_loop(srv), &srv->sigint);
		ev_signal_stop(main_loop(srv), &srv->sigterm);
		ev_signal_stop(main_loop(srv), &srv->sighup);
		signal(SIGINT, SIG_IGN);
		signal(SIGTERM, SIG_IGN);
		signal(SIGHUP, SIG_IGN);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	}
	for (unsigned i = 0; srv->reactors && i < srv->n_reactors; i++)
		reactor_teardown(&srv->reactors[i]);
	free(srv->reactors);
	srv->reactors = NULL;
	metrics_stop(); /* reads the exports: before they go */
	exports_free(srv->exports, srv->n_exports);
	for (size_t i = 0; srv->listeners && i < srv->n_listeners; i++) {
		free(srv->listeners[i].unix_path);
		free(srv->listeners[i].address);
	}
	free(srv->listeners);
	if (srv->tls) {
		tls_unref(srv->tls);
		srv->tls = NULL;
		tls_global_deinit();
	}
	pthread_mutex_destroy(&srv->tls_lock);
	systemd_notify_close();
	audit_close();
	if (srv->live != srv->cfg)
		config_free(srv->live); /* the newest reloaded snapshot */
	srv->live = NULL;
	config_free(srv->cfg);
	srv->cfg = NULL;
	for (size_t i = 0; i < srv->n_retired; i++)
		config_free(srv->retired[i]);
	free(srv->retired);
	srv->retired = NULL;
	srv->n_retired = 0;
	drain_thread_caches();
	nbdv_buf_pool_drain();
}
