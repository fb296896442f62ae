/*
 * nbdvault - the server: listeners, reactors (one libev loop per thread), signals,
 * shutdown.
 *
 * Reactor 0 runs on the main thread's default loop, next to the listeners and signal
 * watchers; reactors 1..n-1 each run a loop on their own thread.  The acceptor hands a
 * new socket to the least loaded reactor and the connection stays there for its whole
 * life: its watchers, timers, completions and output all live on that loop, so nothing
 * in conn.c, handshake.c or transmission.c takes a lock.
 *
 * Output is batched per reactor: code that queues a reply marks the connection dirty,
 * and an ev_prepare watcher writes every dirty connection's queue just before the loop
 * waits for events again, so replies completed together leave in one writev.
 *
 *   listener (reactor 0) ──accept──► least loaded reactor: handoff queue ──ev_async──► conn_new
 */
#ifndef NBDV_SERVER_H
#define NBDV_SERVER_H

#include <ev.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#include "compiler.h"
#include "executor.h"

struct nbdv_config;
struct nbdv_conn;
struct nbdv_export;
struct nbdv_tls;
struct nbdv_handoff;

/* Listeners a reload may add beyond those bound at start. */
#define NBDV_RELOAD_LISTENERS 16

struct nbdv_listener {
	ev_io io;		 /* readable = a connection to accept */
	int fd;			 /* listening socket */
	bool is_tcp;		 /* TCP (set TCP_NODELAY on accepted sockets) */
	char *unix_path;	 /* unix socket path to remove at exit, or NULL */
	char *address;		 /* the `listen:` entry it serves (address, port), or NULL */
	uint16_t port;		 /*  (passed by systemd, or unix: NULL address) */
	struct nbdv_server *srv; /* owner */
};

struct nbdv_reactor {
	struct nbdv_server *srv;       /* owner */
	unsigned idx;		       /* 0 = the main thread's loop */
	struct ev_loop *loop;	       /* this reactor's loop */
	struct nbdv_exec_port port;    /* completions of jobs its connections submitted */
	struct nbdv_conn *conns;       /* its live connections */
	unsigned n_conns;	       /* how many (atomic: the acceptor reads it) */
	unsigned pending;	       /* sockets handed over, not yet taken (atomic) */
	struct nbdv_conn *dirty;       /* connections with output to write */
	struct nbdv_conn *resume;      /* connections whose turn ended with work left */
	struct nbdv_conn **resume_end; /* where the next one goes (they keep their order) */
	ev_idle resume_idle;	       /* keeps the poll from sleeping while any wait */
	ev_prepare flusher;	       /* writes dirty connections before each poll */
	ev_idle spin_idle;	       /* polls without sleeping for a moment after replies */
	ev_tstamp spin_until;	       /* when to stop */
	ev_async wake;		       /* handoffs queued or shutdown asked */
	ev_timer shutdown_timer;       /* upper bound on the drain at shutdown */
	ev_timer memory_timer;	       /* re-checks connections paused by limits.max-memory */
	bool shutting_down;	       /* this loop has begun its drain */
	pthread_mutex_t lock;	       /* protects the two fields below */
	struct nbdv_handoff *handoffs; /* accepted sockets waiting for this reactor */
	bool stop_asked;	       /* the server is shutting down */
	bool recheck;		       /* a reload changed exports: re-check sessions */
	bool threaded;		       /* runs on its own thread */
	pthread_t thread;
};

struct nbdv_server {
	struct nbdv_config *cfg;	  /* config snapshot at start, owned: all but exports */
	struct nbdv_config *_Atomic live; /* newest snapshot (exports); == cfg until a reload */
	struct nbdv_config **retired;	  /* earlier reloaded snapshots, freed at exit */
	size_t n_retired;
	struct nbdv_export *exports; /* run-time exports, owned (room for reloads) */
	_Atomic size_t n_exports;
	struct nbdv_executor *exec;	 /* I/O thread pool for blocking drivers */
	struct nbdv_listener *listeners; /* owned; room for NBDV_RELOAD_LISTENERS more */
	size_t n_listeners;		 /* used slots (a removed listener keeps its slot, fd -1) */
	size_t max_listeners;
	bool listen_from_config;       /* `listen:` is served (not replaced by systemd's) */
	struct nbdv_reactor *reactors; /* n_reactors, [0] is the main loop */
	unsigned n_reactors;
	unsigned n_conns;	   /* live connections on every reactor (atomic) */
	ev_signal sigint, sigterm; /* orderly shutdown */
	ev_signal sighup;	   /* reload TLS credentials */
	pthread_mutex_t tls_lock;  /* protects tls (SIGHUP swaps it while reactors read) */
	struct nbdv_tls *tls;	   /* current TLS credentials, or NULL when TLS is off */
	ev_timer resume_timer;	   /* restarts listeners paused on EMFILE */
	ev_tstamp last_cap_log;	   /* when max-connections was last logged */
	bool shutting_down;	   /* main thread only */
	unsigned next_id;	   /* last connection id given (atomic) */
};

/* Bind every listener and set up the reactors.  Takes ownership of @cfg.  Returns 0 or
 * -1 (logged). */
int server_init(struct nbdv_server *srv, struct nbdv_config *cfg) NBDV_WUR;
/* Serve until SIGINT/SIGTERM and the drain that follows.  Returns the exit status. */
int server_run(struct nbdv_server *srv);
void server_fini(struct nbdv_server *srv);

/*
 * For embedding (fuzzing, unit tests): a server without listeners or signals, with one
 * reactor on a private loop that the caller drives, and @io_threads I/O threads.  Takes
 * ownership of @cfg.  Undo with server_fini().
 */
int server_init_embedded(struct nbdv_server *srv, struct nbdv_config *cfg) NBDV_WUR;

/*
 * The listeners of a reload to @next (src/server.c): bind the entries it adds (refused
 * with the sandbox on: no socket() once serving), then, once the reload is certain,
 * server_listeners_commit() starts them and closes the entries it dropped.  Returns
 * NULL, or why the reload must be refused (nothing changed; the message is in @buf).
 */
const char *server_listeners_prepare(struct nbdv_server *srv, const struct nbdv_config *next,
				     char *buf, size_t len);
void server_listeners_commit(struct nbdv_server *srv, const struct nbdv_config *next);
void server_listeners_abort(struct nbdv_server *srv);

/* SIGHUP: re-read the config file and apply what can change live (src/reload.c).
 * Returns 0, or -1 when the file is invalid or needs a restart (nothing changed). */
int server_reload(struct nbdv_server *srv);
/* Ask every reactor to re-check its sessions against the exports (after a reload). */
void server_recheck_sessions(struct nbdv_server *srv);

/* The credentials new TLS sessions use, with a reference the caller drops. */
struct nbdv_tls *server_tls_get(struct nbdv_server *srv);

/* Connection bookkeeping, called by conn.c on the connection's reactor. */
void reactor_conn_add(struct nbdv_reactor *r, struct nbdv_conn *c);
void reactor_conn_remove(struct nbdv_reactor *r, struct nbdv_conn *c);
void reactor_mark_dirty(struct nbdv_reactor *r, struct nbdv_conn *c);
/* @c's turn ended with requests left: go on with it after the loop has polled again. */
void reactor_resume_later(struct nbdv_reactor *r, struct nbdv_conn *c);
/* A connection stopped reading because the process holds limits.max-memory: look at
 * every connection again shortly (memory freed on other reactors raises no event). */
void reactor_memory_wait(struct nbdv_reactor *r);
/* Write every dirty connection's output now (the flusher's work; also for harnesses); false
 * when a turn's time ran out first and some are left dirty. */
bool reactor_flush_dirty(struct nbdv_reactor *r);

/* --- shared by the server's own files (server.c, listen.c, reactor.c) --- */

/* An accepted socket on its way to another reactor. */
struct nbdv_handoff {
	struct nbdv_handoff *next;
	int fd;
	bool is_tcp;
	char peer[128];
};

static inline unsigned load_u(const unsigned *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline struct ev_loop *main_loop(const struct nbdv_server *srv)
{
	return srv->reactors[0].loop;
}

#endif /* NBDV_SERVER_H */
