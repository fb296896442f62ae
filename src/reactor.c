/*
 * nbdvault - the reactor loop: one event loop per thread, its connections, their
 * output flushing, hand-over of accepted sockets, and its part of the orderly shutdown.
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

/* Seconds the drain at shutdown may take before remaining connections are cut. */
#define SHUTDOWN_GRACE 30.0

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

/*
 * Connections are served in rounds: each round takes the list as it stands, and those
 * that become dirty meanwhile (their own replies made room for their next READs) wait
 * for the next round.  After a round that ends past a turn's time (NBDV_TURN_NS) the
 * pass stops and the loop polls, without sleeping, before the next: a connection whose
 * socket takes every reply cannot keep the reactor from its other sockets, nor from
 * the I/O threads' completions.  (A client with a large receive buffer pipelining 300
 * TLS READs of 256 KiB held its reactor for 55-110 ms at a time, and nbdcopy's
 * BLOCK_STATUS, answered on an I/O thread, waited behind the 60 READs ahead of it.)
 * Every connection dirty at the start of a round is served in it.  Returns false when
 * connections are left dirty for the next pass.
 */
bool reactor_flush_dirty(struct nbdv_reactor *r)
{
	uint64_t end = nbdv_now_ns() + NBDV_TURN_NS;

	while (r->dirty) {
		struct nbdv_conn *round = r->dirty;

		r->dirty = NULL;
		while (round) {
			struct nbdv_conn *c = round;

			round = c->dirty_next;
			c->dirty = false; /* (until now it kept c from being freed) */
			conn_service(c);
			conn_release(c);
		}
		if (nbdv_now_ns() >= end)
			return !r->dirty;
	}
	return true;
}

/*
 * A connection whose turn ended with requests left waits here until the loop has polled
 * again, then goes on from the flusher.  (ev_feed_event() on its read watcher did not
 * wait: libev invokes an event fed from a callback in the same pass, before it polls,
 * so a connection with a deep queue took turn after turn while a request that had just
 * arrived on another connection waited for all of them.)
 */
void reactor_resume_later(struct nbdv_reactor *r, struct nbdv_conn *c)
{
	if (c->resuming)
		return;
	c->resuming = true;
	c->resume_next = NULL;
	*r->resume_end = c;
	r->resume_end = &c->resume_next;
	if (!ev_is_active(&r->resume_idle))
		ev_idle_start(r->loop, &r->resume_idle);
}

/* Go on with the connections that yielded before the last poll, in the order they did;
 * those that yield again wait for the next one. */
static void resume_yielded(struct nbdv_reactor *r)
{
	struct nbdv_conn *c = r->resume;

	r->resume = NULL;
	r->resume_end = &r->resume;
	while (c) {
		struct nbdv_conn *next = c->resume_next;

		c->resuming = false;
		(void)conn_pump(c);
		c = next;
	}
	if (!r->resume)
		ev_idle_stop(r->loop, &r->resume_idle);
}

/* Nothing to do: while active, the loop polls without sleeping. */
static void resume_idle_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
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

/* Before each poll: write what every dirty connection has queued, in one batch each,
 * then give each connection that yielded its next turn and write what that made. */
static void flusher_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, flusher);

	/* Replies are leaving and no job is out on the I/O threads: the client is probably
	 * about to send the next request.  Keep polling for a moment instead of sleeping
	 * (a wake-up from sleep costs tens of microseconds on virtual machines).  The
	 * moment starts once the replies are out: sending one wakes the client, which on
	 * a virtual machine can take half the moment by itself. */
	bool spin = r->dirty && r->srv->cfg->busy_poll > 0 && r->port.outstanding == 0;

	/* Replies made since the last poll leave before the yielded connections' turns. */
	reactor_flush_dirty(r);
	if (r->resume) {
		resume_yielded(r);
		reactor_flush_dirty(r);
	}
	/* What is left over waits for the next pass, after a poll that does not sleep. */
	if (r->dirty || r->resume) {
		if (!ev_is_active(&r->resume_idle))
			ev_idle_start(loop, &r->resume_idle);
	} else if (ev_is_active(&r->resume_idle)) {
		ev_idle_stop(loop, &r->resume_idle);
	}
	if (spin) {
		r->spin_until = ev_time() + r->srv->cfg->busy_poll;
		if (!ev_is_active(&r->spin_idle))
			ev_idle_start(loop, &r->spin_idle);
	}
}

static void spin_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
	struct nbdv_reactor *r = container_of(w, struct nbdv_reactor, spin_idle);

	if (ev_time() >= r->spin_until)
		ev_idle_stop(loop, w);
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
void reactor_begin_shutdown(struct nbdv_reactor *r)
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

/* Sockets the acceptor handed to this reactor, or a shutdown request. */
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

void reactor_setup(struct nbdv_server *srv, unsigned idx, struct ev_loop *loop)
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
	ev_idle_init(&r->resume_idle, resume_idle_cb);
	r->resume_end = &r->resume;
	ev_unref(loop);
	ev_async_init(&r->wake, reactor_wake_cb);
	ev_async_start(loop, &r->wake);
	if (idx == 0)
		ev_unref(loop); /* the main loop lives as long as listeners and signals do */
	ev_timer_init(&r->shutdown_timer, shutdown_timeout_cb, SHUTDOWN_GRACE, 0.);
	ev_timer_init(&r->memory_timer, memory_timer_cb, MEMORY_RETRY, 0.);
}

void reactor_teardown(struct nbdv_reactor *r)
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
		c->resuming = false;
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
	ev_idle_stop(r->loop, &r->resume_idle);
	if (r->idx == 0)
		ev_ref(r->loop);
	ev_async_stop(r->loop, &r->wake);
	pthread_mutex_destroy(&r->lock);
	if (r->idx != 0 || !ev_is_default_loop(r->loop))
		ev_loop_destroy(r->loop);
	r->loop = NULL;
}

/* Requests and replies freed on the calling thread are cached there: free them. */
void reactor_drain_thread_caches(void)
{
	transmission_req_cache_drain();
	nbdv_outmsg_cache_drain();
}

void *reactor_main(void *arg)
{
	struct nbdv_reactor *r = arg;

	ev_run(r->loop, 0);
	reactor_drain_thread_caches();
	return NULL;
}
