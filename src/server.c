/*
 * nbdvault - the server's life cycle: start-up (listeners, reactors, privilege drop,
 * sandbox), signals (SIGTERM drain, SIGHUP reload) and teardown.  Listeners and accept
 * are in listen.c, the reactor loop in reactor.c, sizing in sizing.c.
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
#include "sizing.h"
#include "systemd.h"
#include "tls.h"
#include "transmission.h"
#include "buf.h"

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
	listeners_stop(srv);
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
	unsigned n_workers = cfg->workers ? cfg->workers : sizing_default_workers();
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
			listeners_add(srv, passed[i], tcp, NULL, NULL, 0);
			log_info("listening on %s socket %d passed by systemd%s",
				 tcp ? "a TCP" : "a unix", passed[i],
				 srv->listen_from_config ? "" : " (listen: not used)");
		}
	}
	for (size_t i = 0; srv->listen_from_config && i < cfg->n_listen; i++) {
		/* (Beside passed sockets only what the file names, not the default.) */
		if (n_passed && cfg->listen_default)
			break;
		r = listeners_bind_entry(srv, &cfg->listen[i]);
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
	ev_timer_init(&srv->resume_timer, listeners_resume_cb, 1.0, 0.);
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

/*
 * Operations of asynchronous drivers still in flight (their connection was cut at the
 * shutdown deadline) complete into the reactors' ports: wait for them before the ports
 * and the exports go.  False when some never completed within a minute (a storage
 * cluster that stopped answering with no timeout set).
 */
static bool await_storage(struct nbdv_server *srv)
{
	for (unsigned waited = 0;; waited++) {
		unsigned left = 0;

		for (unsigned i = 0; srv->reactors && i < srv->n_reactors; i++) {
			if (!srv->reactors[i].loop)
				continue;
			executor_port_deliver(&srv->reactors[i].port);
			left += srv->reactors[i].port.outstanding;
		}
		if (!left)
			return true;
		if (waited == 0)
			log_info("shutdown: waiting for %u storage operation(s) in flight", left);
		if (waited == 600) {
			log_err("shutdown: %u storage operation(s) still in flight after 60 s: "
				"exiting without closing the exports",
				left);
			return false;
		}
		usleep(100 * 1000);
	}
}

void server_fini(struct nbdv_server *srv)
{
	listeners_stop(srv);
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
	if (!await_storage(srv))
		return; /* (their completions would find freed ports: leave everything) */
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
	reactor_drain_thread_caches();
	nbdv_buf_pool_drain();
}
