/*
 * nbdvault - listeners and accept: binding the `listen:` entries (and a reload's
 * changes to them), accepting, and handing each connection to the least loaded reactor.
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
#include "listen.h"
#include "reactor.h"
#include "systemd.h"
#include "tls.h"
#include "transmission.h"
#include "buf.h"

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

void listeners_resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
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

int listeners_add(struct nbdv_server *srv, int fd, bool is_tcp, const char *unix_path,
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

int listeners_bind_entry(struct nbdv_server *srv, const struct nbdv_listen_cfg *l)
{
	int fd = bind_entry(l);

	if (fd < 0)
		return -1;
	return listeners_add(srv, fd, !l->unix_path, l->unix_path, l->address, l->port);
}

static bool serves_entry(const struct nbdv_listener *l, const struct nbdv_listen_cfg *e)
{
	if (l->fd < 0)
		return false;
	if (e->unix_path)
		return l->unix_path && strcmp(l->unix_path, e->unix_path) == 0;
	return l->address && strcmp(l->address, e->address) == 0 && l->port == e->port;
}

/* Whether a live listener already serves entry @e. */
static bool entry_served(const struct nbdv_server *srv, const struct nbdv_listen_cfg *e)
{
	for (size_t k = 0; k < srv->n_listeners; k++)
		if (serves_entry(&srv->listeners[k], e))
			return true;
	return false;
}

/* Stop listener @l and close its socket (a unix socket's file is removed). */
static void listener_close(struct nbdv_server *srv, struct nbdv_listener *l)
{
	ev_io_stop(main_loop(srv), &l->io);
	close(l->fd);
	l->fd = -1;
	if (l->unix_path)
		unlink(l->unix_path);
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
	for (size_t i = 0; i < next->n_listen; i++)
		add += !entry_served(srv, &next->listen[i]) && !next->listen_default;
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
		int fd;

		if (entry_served(srv, &next->listen[i]))
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
		/* Logged once done: a unix socket's file is gone when the line appears. */
		listener_close(srv, l);
		log_info("SIGHUP: stopped listening on %s%s%s", l->unix_path ? "unix socket " : "",
			 l->unix_path ? l->unix_path : l->address, l->unix_path ? "" : " (TCP)");
	}
	for (size_t i = 0; i < n_prepared; i++) {
		const struct nbdv_listen_cfg *e = prepared[i].entry;
		listeners_add(srv, prepared[i].fd, !e->unix_path, e->unix_path, e->address,
			      e->port);
	}
	n_prepared = 0;
}

void listeners_stop(struct nbdv_server *srv)
{
	if (!srv->reactors || !main_loop(srv))
		return;
	ev_timer_stop(main_loop(srv), &srv->resume_timer);
	for (size_t i = 0; i < srv->n_listeners; i++) {
		if (srv->listeners[i].fd >= 0)
			listener_close(srv, &srv->listeners[i]);
	}
}
