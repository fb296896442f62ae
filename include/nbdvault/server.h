/*
 * nbdvault - the server: listeners, the reactor (one libev loop), signals, shutdown.
 *
 * A connection lives on one reactor for its whole life.  Output is batched: code that
 * queues a reply marks the connection dirty, and an ev_prepare watcher writes every
 * dirty connection's queue just before the loop waits for events again, so replies
 * completed together leave in one writev.
 */
#ifndef NBDV_SERVER_H
#define NBDV_SERVER_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "nbdvault/compiler.h"

struct nbdv_config;
struct nbdv_conn;
struct nbdv_export;
struct nbdv_executor;
struct nbdv_tls;

struct nbdv_listener {
	ev_io io;		 /* readable = a connection to accept */
	int fd;			 /* listening socket */
	bool is_tcp;		 /* TCP (set TCP_NODELAY on accepted sockets) */
	char *unix_path;	 /* unix socket path to remove at exit, or NULL */
	struct nbdv_server *srv; /* owner */
};

struct nbdv_server {
	struct ev_loop *loop;	     /* the reactor */
	struct nbdv_config *cfg;     /* config snapshot, owned */
	struct nbdv_export *exports; /* run-time exports, owned */
	size_t n_exports;
	struct nbdv_executor *exec;	 /* worker pool for blocking drivers */
	struct nbdv_listener *listeners; /* owned */
	size_t n_listeners;
	struct nbdv_conn *conns; /* all live connections */
	unsigned n_conns;
	struct nbdv_conn *dirty;   /* connections with output to write */
	ev_prepare flusher;	   /* writes dirty connections before each poll */
	ev_signal sigint, sigterm; /* orderly shutdown */
	ev_signal sighup;	   /* reload TLS credentials */
	struct nbdv_tls *tls;	   /* current TLS credentials, or NULL when TLS is off */
	ev_timer shutdown_timer;   /* upper bound on the drain at shutdown */
	ev_timer resume_timer;	   /* restarts listeners paused on EMFILE */
	ev_tstamp last_cap_log;	   /* when max-connections was last logged */
	bool shutting_down;
	unsigned next_id; /* next connection id */
};

/* Bind every listener and set up the loop.  Takes ownership of @cfg.  Returns 0 or -1 (logged). */
int server_init(struct nbdv_server *srv, struct nbdv_config *cfg) NBDV_WUR;
/* Serve until SIGINT/SIGTERM and the drain that follows.  Returns the exit status. */
int server_run(struct nbdv_server *srv);
void server_fini(struct nbdv_server *srv);

/* Connection bookkeeping, called by conn.c. */
void server_conn_add(struct nbdv_server *srv, struct nbdv_conn *c);
void server_conn_remove(struct nbdv_server *srv, struct nbdv_conn *c);
void server_mark_dirty(struct nbdv_server *srv, struct nbdv_conn *c);
/* Write every dirty connection's output now (the flusher's work; also for harnesses). */
void server_flush_dirty(struct nbdv_server *srv);

#endif /* NBDV_SERVER_H */
