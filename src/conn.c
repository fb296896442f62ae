/*
 * nbdvault - connection state machine: input parsing into handshake/transmission
 * units, output queue, back-pressure and lifetime.
 */
#include "build-config.h"

#include <endian.h>
#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "config.h"
#include "conn.h"
#include "driver_registry.h"
#include "export.h"
#include "handshake.h"
#include "log.h"
#include "metrics.h"
#include "protocol.h"
#include "server.h"
#include "transmission.h"
#include "transport.h"

/* A connection that held at least this much gives free heap back when it is freed. */
#define NBDV_TRIM_AFTER (4 * 1024 * 1024)

static void read_cb(struct ev_loop *loop, ev_io *w, int revents);
static void process_input(struct nbdv_conn *c);
static size_t avail(const struct nbdv_conn *c);
static void write_cb(struct ev_loop *loop, ev_io *w, int revents);
static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* Start @w unless the connection has no fd (in-memory transports, fuzzing). */
static void watch(struct nbdv_conn *c, ev_io *w)
{
	if (c->fd >= 0)
		ev_io_start(c->r->loop, w);
}

/*
 * The input buffer is its own anonymous mapping: only the pages a connection actually
 * fills are resident, and nothing of the heap's used memory is handed to it.  An idle
 * TLS connection costs ~31 KiB instead of ~57 KiB with malloc (500 idle
 * connections).  Under AddressSanitizer it comes from malloc, to keep the redzones.
 */
#if defined(__SANITIZE_ADDRESS__)
#define IBUF_FROM_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define IBUF_FROM_MALLOC 1
#endif
#endif

static uint8_t *ibuf_alloc(void)
{
#ifdef IBUF_FROM_MALLOC
	return malloc(NBDV_IBUF_SIZE);
#else
	void *p =
	    mmap(NULL, NBDV_IBUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
#endif
}

/* An empty input buffer gives its pages back: a connection that has just finished its
 * handshake and waits for its first request then holds none (4 KiB less per idle
 * connection).  The next read faults a page in again. */
static void ibuf_release_pages(struct nbdv_conn *c)
{
	if (c->istart != c->iend)
		return;
	c->istart = c->iend = 0;
#ifndef IBUF_FROM_MALLOC
	(void)madvise(c->ibuf, NBDV_IBUF_SIZE, MADV_DONTNEED);
#endif
}

static void ibuf_free(uint8_t *p)
{
#ifdef IBUF_FROM_MALLOC
	free(p);
#else
	if (p)
		munmap(p, NBDV_IBUF_SIZE);
#endif
}

/* The listening address a connection came in on, for the audit log. */
static const char *local_name(int fd, char *buf, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[INET6_ADDRSTRLEN];

	if (fd < 0 || getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
		return "";
	if (ss.ss_family == AF_UNIX) {
		snprintf(buf, len, "unix:%.100s", ((struct sockaddr_un *)&ss)->sun_path);
	} else if (ss.ss_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		snprintf(buf, len, "%s:%u", host, ntohs(in->sin_port));
	} else {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
		inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		snprintf(buf, len, "[%s]:%u", host, ntohs(in6->sin6_port));
	}
	return buf;
}

/*
 * limits.max-connections-per-identity: open TLS connections per client identity (PSK
 * identity or certificate DN).  One table for the process; its rows are never freed, and
 * past MAX_IDENTITY_ROWS further identities are refused rather than let grow it.
 */
#define MAX_IDENTITY_ROWS 4096
struct identity_row {
	char name[320];
	unsigned conns;
	unsigned max_conns;	   /* 0: no cap */
	double bw_rate, iops_rate; /* per second; 0: no cap */
	struct nbdv_rate rate;	   /* their buckets */
	uint64_t throttled_ns;	   /* time its connections were held back (metrics) */
};
static pthread_mutex_t identity_lock = PTHREAD_MUTEX_INITIALIZER;
static struct identity_row *identity_rows;
static unsigned n_identity_rows;

/* Whether any per-identity limit is configured. */
static bool identity_limited(const struct nbdv_config *cfg)
{
	return cfg->max_conns_per_identity || cfg->identity_default.bandwidth ||
	       cfg->identity_default.iops || cfg->n_identities;
}

/* A new row's caps: the identity's own entry, else the defaults. */
static void identity_caps(const struct nbdv_config *cfg, struct identity_row *row)
{
	const struct nbdv_identity_limits *l = &cfg->identity_default;

	for (size_t i = 0; i < cfg->n_identities; i++)
		if (strcmp(cfg->identities[i].identity, row->name) == 0)
			l = &cfg->identities[i];
	row->max_conns = l->max_connections ? l->max_connections : cfg->max_conns_per_identity;
	row->bw_rate = (double)(l->bandwidth ? l->bandwidth : cfg->identity_default.bandwidth);
	row->iops_rate = (double)(l->iops ? l->iops : cfg->identity_default.iops);
}

/* Count @c against its identity's caps; false when the connection cap (or the table)
 * is full. */
static bool identity_acquire(struct nbdv_conn *c, const char *id)
{
	struct identity_row *row = NULL;
	bool ok = false;

	pthread_mutex_lock(&identity_lock);
	for (unsigned i = 0; i < n_identity_rows && !row; i++)
		if (strcmp(identity_rows[i].name, id) == 0)
			row = &identity_rows[i];
	if (!row && n_identity_rows < MAX_IDENTITY_ROWS) {
		if (!identity_rows)
			identity_rows = calloc(MAX_IDENTITY_ROWS, sizeof(*identity_rows));
		if (identity_rows) {
			row = &identity_rows[n_identity_rows++];
			snprintf(row->name, sizeof(row->name), "%s", id);
		}
	}
	if (row)
		identity_caps(c->lim, row); /* (the newest limits the identity connected under) */
	if (row && (!row->max_conns || row->conns < row->max_conns)) {
		row->conns++;
		c->identity_row = row;
		ok = true;
	}
	pthread_mutex_unlock(&identity_lock);
	return ok;
}

/* Tokens a bucket may hold: a tenth of a second at its rate. */
/* Take one request of @bytes from the identity's buckets; returns how long (ns) the
 * connection must wait before reading another request, 0 when it need not. */
uint64_t conn_identity_charge(struct nbdv_conn *c, uint64_t bytes)
{
	struct identity_row *row = c->identity_row;
	uint64_t wait;

	if (!row)
		return 0;
	/* The caps are read under the lock: another reactor's identity_acquire() rewrites
	 * them when the same identity connects again (ThreadSanitizer saw the race). */
	pthread_mutex_lock(&identity_lock);
	if (!row->bw_rate && !row->iops_rate) {
		pthread_mutex_unlock(&identity_lock);
		return 0;
	}
	wait = rate_take(&row->rate, row->bw_rate, row->iops_rate, bytes, nbdv_now_ns());
	row->throttled_ns += wait;
	pthread_mutex_unlock(&identity_lock);
	if (wait)
		metrics_identity_throttled(row->name, wait);
	return wait;
}

static void rate_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_conn *c = container_of(w, struct nbdv_conn, rate_timer);

	c->rate_paused = false;
	reactor_mark_dirty(c->r, c); /* conn_service() takes the buffered requests, reads on */
}

void conn_pause_reading(struct nbdv_conn *c, uint64_t ns)
{
	if (c->fd < 0)
		return; /* harness-driven connections have no timers */
	c->rate_paused = true;
	c->throttled_ns += ns;
	ev_timer_stop(c->r->loop, &c->rate_timer);
	ev_timer_set(&c->rate_timer, (double)ns / 1e9, 0.);
	ev_timer_start(c->r->loop, &c->rate_timer);
}

static void identity_release(struct nbdv_conn *c)
{
	struct identity_row *row = c->identity_row;

	if (!row)
		return;
	pthread_mutex_lock(&identity_lock);
	row->conns--;
	pthread_mutex_unlock(&identity_lock);
	c->identity_row = NULL;
}

void conn_recheck(struct nbdv_conn *c)
{
	const struct nbdv_export *e = c->sess.exp;
	char id[320];

	if (c->phase != CONN_TRANSMISSION || !e)
		return;
	if (e->removed) {
		if (!e->cfg->on_remove_close)
			return; /* finishes on its own terms */
		log_info("c%u: export %s was removed by a reload (on-remove: close), closing",
			 c->id, e->cfg->name);
		conn_reason(c, "export removed by a reload");
		conn_close_graceful(c);
		return;
	}
	if (handshake_export_allowed(c, e))
		return;
	tls_peer_identity(&c->sess.peer, id, sizeof(id));
	log_info("c%u: %s is no longer allowed on export %s after a reload, closing", c->id,
		 c->tls_up ? id : "a plaintext client", e->cfg->name);
	conn_audit_refusal(c, "reload", e->cfg->name, "no longer allowed after a reload");
	conn_reason(c, "no longer allowed after a reload");
	conn_close_graceful(c);
}

void conn_reason(struct nbdv_conn *c, const char *why)
{
	if (!c->close_reason)
		c->close_reason = why;
}

void conn_audit_refusal(struct nbdv_conn *c, const char *option, const char *export,
			const char *why)
{
	char id[320];
	const char *who =
	    c->tls_up ? tls_peer_identity(&c->sess.peer, id, sizeof(id)) : "none (no TLS)";

	metrics_identity_refused(who);
	if (!audit_enabled() || c->audit_refusals > AUDIT_REFUSALS)
		return;
	if (c->audit_refusals++ == AUDIT_REFUSALS) {
		audit_event("refused", c->id, "s", "reason",
			    "further refusals on this connection are not logged");
		return;
	}
	audit_event("refused", c->id, "ssss", "option", option, "export", export ? export : "",
		    "reason", why, "identity", who);
}

struct nbdv_conn *conn_new_transport(struct nbdv_reactor *r, struct nbdv_transport *tp, int fd,
				     bool is_tcp, const char *peer)
{
	struct nbdv_server *srv = r->srv;
	struct nbdv_conn *c = calloc(1, sizeof(*c));

	if (!c || !(c->ibuf = ibuf_alloc())) {
		log_err("out of memory accepting a connection from %s", peer);
		free(c);
		tp->ops->free(tp);
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	c->tp = tp;
	c->srv = srv;
	c->lim = srv->live; /* a reload's new limits apply from the next connection on */
	c->r = r;
	c->fd = fd;
	c->is_tcp = is_tcp;
	c->id = __atomic_add_fetch(&srv->next_id, 1, __ATOMIC_RELAXED);
	tp->conn_id = c->id;
	c->phase = CONN_OPTIONS;
	c->rx = RX_CLIENT_FLAGS;
	executor_queue_init(&c->jobs);
	ev_timer_init(&c->rate_timer, rate_timer_cb, 0., 0.);
	ev_io_init(&c->rio, read_cb, fd, EV_READ);
	ev_io_init(&c->wio, write_cb, fd, EV_WRITE);
	/* Until it reaches transmission, a client has limits.handshake-timeout in all
	 * (slow-loris, half-open TLS); the timer becomes the idle timer after GO. */
	ev_timer_init(&c->timer, timer_cb, c->lim->handshake_timeout, 0.);
	if (c->lim->handshake_timeout > 0 && fd >= 0)
		ev_timer_start(r->loop, &c->timer);
	reactor_conn_add(r, c);
	log_info("c%u: connection from %s (worker %u)", c->id, peer, r->idx);
	c->started_ns = nbdv_now_ns();
	metrics_accepted();
	if (audit_enabled()) {
		char local[128];
		audit_event("accept", c->id, "ss", "peer", peer, "listener",
			    local_name(fd, local, sizeof(local)));
	}
	if (handshake_greeting(c) < 0) {
		conn_abort(c);
		conn_release(c);
		return NULL;
	}
	watch(c, &c->rio);
	return c;
}

struct nbdv_conn *conn_new(struct nbdv_reactor *r, int fd, bool is_tcp, const char *peer)
{
	struct nbdv_transport *tp = transport_plain_new(fd);

	if (!tp) {
		log_err("out of memory accepting a connection from %s", peer);
		close(fd);
		return NULL;
	}
	return conn_new_transport(r, tp, fd, is_tcp, peer);
}

static bool reading_phase(const struct nbdv_conn *c)
{
	return c->phase == CONN_OPTIONS || c->phase == CONN_TRANSMISSION;
}

/* What the connection holds now: its requests and its queued replies. */
static size_t held(const struct nbdv_conn *c)
{
	return c->req_held + c->outq.held;
}

void conn_queue(struct nbdv_conn *c, struct nbdv_outmsg *m)
{
	if (c->phase == CONN_DEAD) {
		outmsg_free(m);
		return;
	}
	outq_push(&c->outq, m);
	if (held(c) > c->peak_held)
		c->peak_held = held(c);
	reactor_mark_dirty(c->r, c);
}

/* The process holds limits.max-memory: no connection reads new work until it drops. */
static bool memory_full(const struct nbdv_conn *c)
{
	return nbdv_mem_held() >= c->lim->max_memory;
}

/*
 * Limits on what a client in transmission holds: requests in flight, their memory and
 * the process's, and its rate caps.
 */
static bool over_limits(const struct nbdv_conn *c)
{
	return c->inflight >= NBDV_MAX_INFLIGHT_REQS || held(c) >= c->lim->max_inflight_bytes ||
	       memory_full(c) || c->rate_paused;
}

/*
 * Back-pressure: stop reading the socket.  Before an export is chosen a client has only
 * a small budget (it may be anyone); after, limits.max-inflight-bytes of real memory,
 * and no more than NBDV_SEND_AHEAD_BYTES of replies waiting for the socket (nor any
 * READ waiting for room there).
 */
static bool throttled(const struct nbdv_conn *c)
{
	if (c->phase == CONN_OPTIONS)
		return held(c) >= NBDV_PREAUTH_BUDGET || memory_full(c);
	return over_limits(c) || conn_send_ahead_full(c) || c->waiting;
}

/* Throttled by the send-ahead alone, a request already in the input buffer is still
 * taken if it may go ahead of the READs that wait (transmission_may_go_ahead()). */
static bool takes_ahead(const struct nbdv_conn *c)
{
	return !over_limits(c) && avail(c) >= transmission_header_size(c) &&
	       transmission_may_go_ahead(c, c->ibuf + c->istart);
}

/* Start or stop the read watcher to match what the connection can take now. */
static void update_reading(struct nbdv_conn *c)
{
	if (c->phase == CONN_TLS_HANDSHAKE)
		return; /* tls_step() owns the watchers */
	bool want = reading_phase(c) && !throttled(c);

	if (want && !ev_is_active(&c->rio))
		watch(c, &c->rio);
	else if (!want && ev_is_active(&c->rio))
		ev_io_stop(c->r->loop, &c->rio);
	/* Nothing of this connection's own will lift a process-wide limit: ask the reactor
	 * to look again once memory is freed elsewhere. */
	if (!want && reading_phase(c) && memory_full(c))
		reactor_memory_wait(c->r);
}

static void close_fd(struct nbdv_conn *c)
{
	ev_io_stop(c->r->loop, &c->rio);
	ev_io_stop(c->r->loop, &c->wio);
	ev_timer_stop(c->r->loop, &c->timer);
	ev_timer_stop(c->r->loop, &c->rate_timer);
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
	c->phase = CONN_DEAD;
	transmission_drop_waiting(c);
	outq_clear(&c->outq);
	if (c->cur_req) {
		transmission_req_free(c->cur_req);
		c->cur_req = NULL;
	}
}

void conn_abort(struct nbdv_conn *c)
{
	if (c->phase == CONN_DEAD)
		return;
	log_debug("c%u: closing", c->id);
	close_fd(c);
}

/* Closing connection with nothing left to do: end the stream politely, then close. */
static void maybe_finish_close(struct nbdv_conn *c)
{
	if (c->phase != CONN_CLOSING || c->inflight || c->outq.head)
		return;
	c->tp->ops->shutdown(c->tp);
	close_fd(c);
}

void conn_close_graceful(struct nbdv_conn *c)
{
	if (c->phase == CONN_DEAD || c->phase == CONN_CLOSING)
		return;
	c->phase = CONN_CLOSING;
	transmission_drop_waiting(c); /* as unread requests: never answered */
	update_reading(c);
	if (c->cur_req) {
		transmission_req_free(c->cur_req);
		c->cur_req = NULL;
	}
	reactor_mark_dirty(c->r, c);
}

/* Nothing in flight, queued, half-read or waiting in the socket. */
static bool is_idle(const struct nbdv_conn *c)
{
	int unread = 0;

	if (c->inflight || c->outq.head || c->rx != RX_REQ_HEADER || c->iend != c->istart ||
	    c->tp->ops->pending(c->tp))
		return false;
	return ioctl(c->fd, FIONREAD, &unread) == 0 && unread == 0;
}

/* A draining connection closes as soon as it is idle: no request is cut short. */
static void maybe_close_drained(struct nbdv_conn *c)
{
	if (c->draining && c->phase == CONN_TRANSMISSION && is_idle(c))
		conn_close_graceful(c);
}

void conn_shutdown(struct nbdv_conn *c)
{
	conn_reason(c, "server shutdown");
	if (c->phase == CONN_TLS_HANDSHAKE || (c->phase == CONN_OPTIONS && c->fd < 0)) {
		conn_abort(c);
		return;
	}
	if (c->phase == CONN_OPTIONS) {
		/* The spec's NBD_REP_ERR_SHUTDOWN: the next option gets it (handshake_option),
		 * then the connection closes; one that sends none soon is closed. */
		c->draining = true;
		ev_timer_stop(c->r->loop, &c->timer);
		ev_timer_set(&c->timer, NBDV_SHUTDOWN_OPTION_GRACE, 0.);
		ev_timer_start(c->r->loop, &c->timer);
		return;
	}
	/* Keep reading so that requests already sent get an answer (ESHUTDOWN for new
	 * ones, spec "Terminating the transmission phase") instead of a reset. */
	c->draining = true;
	maybe_close_drained(c);
}

void conn_request_done(struct nbdv_conn *c)
{
	c->inflight--;
	if (c->phase == CONN_DEAD)
		return;
	reactor_mark_dirty(c->r, c);
}

/* Drive the TLS handshake; on success the option phase resumes inside TLS. */
static void tls_step(struct nbdv_conn *c)
{
	const char *why = "";
	int r = tls_handshake(c->tp, &why);

	if (r == -EAGAIN) {
		bool w = tls_wants_write(c->tp);
		if (w) {
			ev_io_stop(c->r->loop, &c->rio);
			watch(c, &c->wio);
		} else {
			ev_io_stop(c->r->loop, &c->wio);
			watch(c, &c->rio);
		}
		return;
	}
	if (r < 0) {
		log_info("c%u: TLS handshake failed: %s", c->id, why);
		audit_event("tls-failed", c->id, "s", "reason", why);
		metrics_handshake("failed");
		conn_reason(c, "TLS handshake failed");
		conn_abort(c);
		return;
	}
	c->tls_up = true;
	tls_peer_info(c->tp, &c->sess.peer);
	metrics_handshake(c->sess.peer.resumed ? "resumed" : "ok");
	if (identity_limited(c->lim) && (c->sess.peer.psk_user || c->sess.peer.dn)) {
		char id[320];
		tls_peer_identity(&c->sess.peer, id, sizeof(id));
		if (!identity_acquire(c, id)) {
			log_info("c%u: %s is at its connection cap "
				 "(limits.max-connections-per-identity), closing",
				 c->id, id);
			conn_audit_refusal(c, "STARTTLS", NULL,
					   "limits.max-connections-per-identity reached");
			conn_reason(c, "limits.max-connections-per-identity reached");
			conn_abort(c);
			return;
		}
	}
	if (audit_enabled() || nbdv_metrics_on) {
		char id[320];
		metrics_identity_connected(tls_peer_identity(&c->sess.peer, id, sizeof(id)));
		audit_event("tls", c->id, "sssssb", "identity",
			    tls_peer_identity(&c->sess.peer, id, sizeof(id)), "cn",
			    c->sess.peer.cn ? c->sess.peer.cn : "", "auth",
			    c->sess.peer.psk_user ? "psk" : "x509", "version",
			    c->sess.peer.protocol, "cipher", c->sess.peer.cipher, "resumed",
			    c->sess.peer.resumed);
	}
	log_info("c%u: TLS up%s: %s, %s, client %s%s%s%s", c->id,
		 c->sess.peer.resumed ? " (resumed)" : "", c->sess.peer.protocol,
		 c->sess.peer.cipher,
		 c->sess.peer.psk_user ? "psk:"
		 : c->sess.peer.dn     ? "dn:"
				       : "anonymous",
		 c->sess.peer.psk_user ? c->sess.peer.psk_user
		 : c->sess.peer.dn     ? c->sess.peer.dn
				       : "",
		 c->sess.peer.cn ? " cn:" : "", c->sess.peer.cn ? c->sess.peer.cn : "");
	c->phase = CONN_OPTIONS;
	ev_io_stop(c->r->loop, &c->wio);
	update_reading(c);
	/* The client's first option may have been read ahead together with its Finished
	 * (or be held by GnuTLS); no epoll event will announce it, so make one.  The
	 * handshake can end in any caller of tls_step(), start_tls() included. */
	if (c->tp->ops->pending(c->tp))
		ev_feed_event(c->r->loop, &c->rio, EV_READ);
}

static void start_tls(struct nbdv_conn *c)
{
	struct nbdv_tls *creds = server_tls_get(c->srv);
	struct nbdv_transport *t = creds ? tls_transport_new(creds, c->fd) : NULL;

	tls_unref(creds); /* the session holds its own reference */

	if (!t) {
		conn_abort(c);
		return;
	}
	c->tp->ops->free(c->tp);
	c->tp = t;
	t->conn_id = c->id;
	c->tls_started = true;
	tls_step(c);
}

/* Sends what is queued until the socket is full, the queue is empty or the turn
 * (NBDV_TURN_NS) is over; then the write watcher brings the connection back after the
 * loop has polled the others. */
static void conn_flush(struct nbdv_conn *c)
{
	struct iovec iov[64];
	uint64_t turn_end = nbdv_now_ns() + NBDV_TURN_NS;

	if (c->phase == CONN_DEAD)
		return;
	while (c->outq.head) {
		struct nbdv_outmsg *f = outq_file_due(&c->outq);
		bool file_next = false;
		int n = f ? 0 : outq_gather(&c->outq, iov, (int)ARRAY_SIZE(iov), &file_next);
		ssize_t w = f ? c->tp->ops->sendfile(c->tp, f->file_fd, f->file_off, f->file_len)
			      : c->tp->ops->sendv(c->tp, iov, n, file_next);

		if (w == -EAGAIN) {
			watch(c, &c->wio);
			update_reading(c);
			return;
		}
		if (w < 0) {
			/* A client that hung up is routine; anything else is worth a line. */
			if (w == -EPIPE || w == -ECONNRESET)
				log_debug("c%u: client went away: %s", c->id, strerror((int)-w));
			else
				log_info("c%u: write failed: %s", c->id, strerror((int)-w));
			conn_abort(c);
			return;
		}
		if (f) {
			c->sendfile_bytes += (uint64_t)w;
			outq_consume_file(&c->outq, (size_t)w);
		} else {
			outq_consume(&c->outq, (size_t)w);
		}
		if (c->outq.head && c->fd >= 0 && nbdv_now_ns() >= turn_end) {
			watch(c, &c->wio);
			update_reading(c);
			return;
		}
	}
	if (c->phase == CONN_TLS_HANDSHAKE) {
		if (!c->tls_started)
			start_tls(c);
		return;
	}
	ev_io_stop(c->r->loop, &c->wio);
	maybe_finish_close(c);
	if (c->phase != CONN_DEAD)
		update_reading(c);
}

bool conn_release(struct nbdv_conn *c)
{
	if (c->phase != CONN_DEAD || c->inflight || c->depth || c->dirty || c->resuming)
		return false;
	reactor_conn_remove(c->r, c);
	identity_release(c);
	if (c->tls_up && nbdv_metrics_on) {
		char id[320];
		metrics_identity_bytes(tls_peer_identity(&c->sess.peer, id, sizeof(id)),
				       c->read_bytes + c->write_bytes);
	}
	if (audit_enabled())
		audit_event("close", c->id, "uuudds", "bytes_read",
			    (unsigned long long)c->read_bytes, "bytes_written",
			    (unsigned long long)c->write_bytes, "requests",
			    (unsigned long long)c->requests, "duration_s",
			    (double)(nbdv_now_ns() - c->started_ns) / 1e9, "throttled_s",
			    (double)c->throttled_ns / 1e9, "reason",
			    c->close_reason ? c->close_reason : "closed");
	if (c->sess.exp)
		__atomic_sub_fetch(&c->sess.exp->sessions, 1, __ATOMIC_RELAXED);
	if (c->sendfile_bytes)
		log_info("c%u: closed (%llu bytes of READ data sent from the page cache)", c->id,
			 (unsigned long long)c->sendfile_bytes);
	else if (c->cached_copy_bytes)
		log_info("c%u: closed (%llu bytes of large READs copied from the page cache)",
			 c->id, (unsigned long long)c->cached_copy_bytes);
	else
		log_info("c%u: closed", c->id);
	c->tp->ops->free(c->tp);
	tls_peer_clear(&c->sess.peer);
	ibuf_free(c->ibuf);
	/* A connection that held much (a flood of small replies) leaves free chunks all
	 * over the heap; hand them back to the system rather than keep them resident. */
	if (c->peak_held >= NBDV_TRIM_AFTER)
		malloc_trim(0);
	free(c);
	return true;
}

static size_t avail(const struct nbdv_conn *c)
{
	return c->iend - c->istart;
}

/* The handshake is over: replace its deadline with the idle timeout, if any. */
static void start_idle_timer(struct nbdv_conn *c)
{
	ev_timer_stop(c->r->loop, &c->timer);
	if (c->lim->idle_timeout > 0) {
		ev_timer_set(&c->timer, 0., c->lim->idle_timeout);
		ev_timer_again(c->r->loop, &c->timer);
	}
}

/*
 * READ data sent with sendfile() leaves the server faster than a client on the same
 * machine takes it in.  Unsent bytes then wait in the socket and are pushed out by the
 * client's own ACKs, on the client's CPU: nbdcopy with 4 connections read 30% slower
 * and used twice the CPU.  Keeping little unsent in the socket (readable again below
 * 32 KiB) leaves that work to the server, where the data is queued: 4-connection
 * nbdcopy reads +70%, 1-connection +13%.  Only where sendfile() will be used: replies
 * copied through sendmsg() lose 30% with it (fio 1 MiB reads).
 */
static void limit_unsent(struct nbdv_conn *c)
{
	int lowat = 32 * 1024;

	if (c->is_tcp && c->tp->ops->sendfile && driver_sends_from_cache(c->sess.dev) &&
	    setsockopt(c->fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat)) < 0)
		log_debug("c%u: TCP_NOTSENT_LOWAT: %s", c->id, strerror(errno));
}

/* Start the READs that wait for send-ahead room, as far as there is room; once none is
 * left, reading may resume.  Room is made only where replies are sent (conn_flush()),
 * and conn_service() calls this right after: everywhere else READs wait only while the
 * send-ahead is full. */
static void resume_waiting(struct nbdv_conn *c)
{
	if (c->waiting && transmission_dispatch_waiting(c))
		update_reading(c);
}

/* Start a turn: this connection may now take NBDV_TURN_REQUESTS or NBDV_TURN_NS. */
static void turn_begin(struct nbdv_conn *c)
{
	c->turn_left = NBDV_TURN_REQUESTS;
	c->turn_end = c->fd >= 0 ? nbdv_now_ns() + NBDV_TURN_NS : UINT64_MAX;
}

/* Count one request or option against the turn; false, and the connection yields, when
 * the turn is used up (an in-memory connection, driven by its harness, is never cut
 * short). */
static bool turn_take(struct nbdv_conn *c)
{
	if (c->fd >= 0 && (c->turn_left == 0 || nbdv_now_ns() >= c->turn_end)) {
		c->yielded = true;
		return false;
	}
	c->turn_left--;
	return true;
}

/* A turn ended with work left: come back after the loop has polled everyone else. */
static void turn_yield(struct nbdv_conn *c)
{
	if (c->yielded && reading_phase(c) && !throttled(c))
		reactor_resume_later(c->r, c);
	c->yielded = false;
}

/*
 * Consume whole units from the input buffer.  Stops when a unit is incomplete, the
 * connection leaves the reading phases, or back-pressure applies.
 */
static void process_input(struct nbdv_conn *c)
{
	for (;;) {
		const uint8_t *p = c->ibuf + c->istart;
		int r;

		if (c->phase != CONN_OPTIONS && c->phase != CONN_TRANSMISSION)
			return;
		if (c->phase == CONN_OPTIONS) {
			size_t used;

			if (c->rx == RX_OPT_HEADER && throttled(c)) {
				update_reading(c);
				return;
			}
			/* Options take turns like requests: a client (authenticated or
			 * not) pipelining cheap options while it reads the replies kept
			 * the reactor on a whole input buffer of them (~4,000) at a time. */
			if (c->rx == RX_OPT_HEADER && avail(c) >= sizeof(struct nbd_option) &&
			    !turn_take(c))
				return;
			r = handshake_input(c, p, avail(c), &used);
			c->istart += used;
			switch (r) {
			case HS_NEED_MORE:
				return;
			case HS_CONTINUE:
				continue;
			case HS_ABORT:
				conn_abort(c);
				return;
			case HS_CLOSE:
				conn_close_graceful(c);
				return;
			case HS_STARTTLS:
				/* Whatever the client sent after STARTTLS, before it could have
				 * seen the ACK, is never parsed (spec "TLS support"). */
				c->istart = c->iend = 0;
				c->phase = CONN_TLS_HANDSHAKE;
				ev_io_stop(c->r->loop, &c->rio);
				return;
			case HS_TRANSMISSION:
				c->phase = CONN_TRANSMISSION;
				c->rx = RX_REQ_HEADER;
				start_idle_timer(c);
				ibuf_release_pages(c);
				limit_unsent(c);
				continue;
			}
		}
		switch (c->rx) {
		case RX_CLIENT_FLAGS:
		case RX_OPT_HEADER:
		case RX_OPT_DATA:
			return; /* (option-phase framing: handshake_input above) */
		case RX_REQ_HEADER:
			if (throttled(c) && !takes_ahead(c)) {
				update_reading(c);
				return;
			}
			if (avail(c) < transmission_header_size(c))
				return;
			if (!turn_take(c))
				return;
			c->istart += transmission_header_size(c);
			switch (transmission_header(c, p)) {
			case TX_OK:
				c->header_reads = false;
				break;
			case TX_NEED_PAYLOAD:
				/* In a stream of large WRITEs, read headers alone so that no
				 * payload lands in ibuf and has to be copied again. */
				c->header_reads =
				    transmission_payload_missing(c->cur_req) >= NBDV_BIG_WRITE;
				c->rx = RX_REQ_PAYLOAD;
				break;
			case TX_DISC:
				conn_reason(c, "client disconnect (NBD_CMD_DISC)");
				conn_close_graceful(c);
				return;
			case TX_CLOSE:
				conn_reason(c, "protocol error");
				conn_close_graceful(c);
				return;
			}
			break;
		case RX_REQ_PAYLOAD: {
			size_t used;

			r = transmission_payload_from(c, p, avail(c), &used);
			c->istart += used;
			if (r == 0)
				return;
			c->rx = RX_REQ_HEADER;
			break;
		}
		}
	}
}

/* Activity in transmission pushes the idle deadline back (ev.pod's ev_timer_again). */
static void touch_idle_timer(struct nbdv_conn *c)
{
	if (c->phase == CONN_TRANSMISSION && c->lim->idle_timeout > 0)
		ev_timer_again(c->r->loop, &c->timer);
}

/* Set SO_RCVLOWAT to @v (0: the kernel's default of 1) unless it is already. */
static void set_lowat(struct nbdv_conn *c, uint32_t v)
{
	int bytes = v ? (int)v : 1;

	if (c->lowat == v)
		return;
	if (setsockopt(c->fd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof(bytes)) == 0)
		c->lowat = v;
}

/*
 * While the rest of a large WRITE payload is on its way, the socket need not wake the
 * reactor for every segment that arrives: ask the kernel to wait for NBDV_LOWAT_MAX
 * bytes, or for all that must still come when that is less.  @missing payload bytes
 * are owed; the transport may already hold some of them.  Ciphertext is never shorter
 * than its plaintext (GnuTLS has had no record compression since 3.6), so at least the
 * difference will arrive.  The kernel still wakes the reactor at end of stream, on
 * error, and when its receive window is nearly shut; the idle timer asks the socket
 * itself (payload_trickles).  A 1-connection TLS nbdcopy write: 17k -> 2.3k reactor
 * wake-ups and -20% server CPU per GiB.  Unix sockets wake on any data whatever the
 * threshold, so only TCP connections take one.
 */
static void payload_lowat(struct nbdv_conn *c, uint32_t missing)
{
	size_t held, owed;

	if (!c->is_tcp)
		return;
	held = c->tp->ops->held ? c->tp->ops->held(c->tp) : 0;
	owed = missing > held ? missing - held : 0;
	set_lowat(c, owed >= NBDV_LOWAT_MIN ? (uint32_t)NBDV_MIN(owed, (size_t)NBDV_LOWAT_MAX) : 0);
}

/* One read from the transport; returns false when the connection stopped reading. */
static bool read_once(struct nbdv_conn *c)
{
	ssize_t n;

	if (c->rx == RX_REQ_PAYLOAD && avail(c) == 0) {
		/* Large WRITE payloads go straight into the request's buffer. */
		uint32_t missing;
		uint8_t *dst = transmission_payload_ptr(c->cur_req, &missing);

		n = c->tp->ops->recv(c->tp, dst, missing);
		if (n > 0) {
			touch_idle_timer(c);
			if (transmission_payload_got(c, (uint32_t)n)) {
				c->rx = RX_REQ_HEADER;
				set_lowat(c, 0);
			} else {
				payload_lowat(c, missing - (uint32_t)n);
			}
			return true;
		}
		if (n == -EAGAIN)
			payload_lowat(c, missing);
	} else {
		set_lowat(c, 0);
		if (c->istart == c->iend) {
			c->istart = c->iend = 0;
		} else if (c->istart > 0 && NBDV_IBUF_SIZE - c->iend < NBDV_MAX_OPTION) {
			memmove(c->ibuf, c->ibuf + c->istart, avail(c));
			c->iend -= c->istart;
			c->istart = 0;
		}
		size_t want = NBDV_IBUF_SIZE - c->iend;

		if (want == 0)
			return false; /* full (back-pressure): a 0-byte read is not EOF */
		if (c->header_reads && c->rx == RX_REQ_HEADER &&
		    avail(c) < transmission_header_size(c))
			want = transmission_header_size(c) - avail(c);
		n = c->tp->ops->recv(c->tp, c->ibuf + c->iend, want);
		if (n > 0) {
			c->iend += (size_t)n;
			touch_idle_timer(c);
			return true;
		}
	}
	if (n == -EAGAIN)
		return false;
	if (n == 0) {
		if (c->phase == CONN_TRANSMISSION && (avail(c) || c->rx == RX_REQ_PAYLOAD))
			log_info("c%u: client closed the connection mid-request", c->id);
		else
			log_debug("c%u: client closed the connection", c->id);
		conn_reason(c, "client closed the connection");
	} else {
		log_info("c%u: read failed: %s", c->id, strerror((int)-n));
		conn_reason(c, "read error");
	}
	/* Nothing more will come: replies still owed could not be read by anyone. */
	conn_abort(c);
	return false;
}

bool conn_pump(struct nbdv_conn *c)
{
	c->depth++;
	if (c->phase == CONN_TLS_HANDSHAKE) {
		tls_step(c); /* data read with the client's Finished comes as an event */
	} else {
		turn_begin(c);
		if (avail(c))
			process_input(c); /* what a turn that ended left in the buffer */
		while (reading_phase(c) && !throttled(c) && !c->yielded) {
			if (!read_once(c))
				break;
			process_input(c);
			if (!c->tp->ops->pending(c->tp))
				break;
		}
		turn_yield(c);
	}
	c->depth--;
	return !conn_release(c);
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct nbdv_conn *c = container_of(w, struct nbdv_conn, rio);

	if (c->resuming)
		return; /* its next turn comes from the resume list, after everyone else's */
	(void)conn_pump(c);
}

/*
 * While READs wait for send-ahead room the socket is not watched (a request that would
 * only join them is no reason to wake up), but each time replies leave, what the client
 * sent since is read and parsed: a BLOCK_STATUS behind the waiting READs is found and
 * answered before them (transmission_may_go_ahead()).
 */
static void look_ahead(struct nbdv_conn *c)
{
	while (c->waiting && c->phase == CONN_TRANSMISSION && c->rx == RX_REQ_HEADER &&
	       !over_limits(c) && !c->yielded && avail(c) < transmission_header_size(c) &&
	       read_once(c))
		process_input(c);
}

void conn_service(struct nbdv_conn *c)
{
	c->depth++;
	conn_flush(c);
	resume_waiting(c); /* the replies that left made room for them */
	/* A connection waiting on the resume list takes its next turn from there: taking
	 * it here, where its own replies bring it back, would serve it turn after turn. */
	if (c->resuming)
		goto out;
	/* Completions or drained output may have lifted back-pressure while whole requests
	 * (or options) wait in the input buffer; the socket may never become readable for
	 * them. */
	turn_begin(c);
	look_ahead(c);
	if (reading_phase(c) && !throttled(c) && avail(c))
		process_input(c);
	/* The same for what the TLS layer holds (decrypted or read ahead). */
	while (reading_phase(c) && !throttled(c) && !c->yielded && c->tp->ops->pending(c->tp) &&
	       read_once(c))
		process_input(c);
	turn_yield(c);
out:
	maybe_close_drained(c);
	c->depth--;
}

/* A payload arriving below SO_RCVLOWAT reads nothing, yet the client is not idle. */
static bool payload_trickles(struct nbdv_conn *c)
{
	int queued = 0;

	return c->lowat && ioctl(c->fd, FIONREAD, &queued) == 0 && queued > 0;
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct nbdv_conn *c = container_of(w, struct nbdv_conn, timer);

	c->depth++;
	if (c->phase == CONN_OPTIONS && c->draining) {
		log_info("c%u: no option within %g s of the shutdown, closing", c->id,
			 NBDV_SHUTDOWN_OPTION_GRACE);
		conn_abort(c);
	} else if (c->phase == CONN_OPTIONS || c->phase == CONN_TLS_HANDSHAKE) {
		log_info("c%u: handshake not finished within %g s, closing", c->id,
			 c->lim->handshake_timeout);
		conn_reason(c, "handshake timeout");
		conn_abort(c);
	} else if (c->phase == CONN_TRANSMISSION) {
		if (c->inflight || c->outq.head || payload_trickles(c)) {
			ev_timer_again(loop, &c->timer); /* busy, not idle */
		} else {
			log_info("c%u: idle for %g s, closing", c->id, c->lim->idle_timeout);
			conn_reason(c, "idle timeout");
			conn_close_graceful(c);
		}
	}
	c->depth--;
	conn_release(c);
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct nbdv_conn *c = container_of(w, struct nbdv_conn, wio);

	if (c->phase == CONN_TLS_HANDSHAKE && c->tls_started) {
		c->depth++;
		tls_step(c);
		c->depth--;
		conn_release(c);
		return;
	}
	conn_service(c);
	conn_release(c);
}
