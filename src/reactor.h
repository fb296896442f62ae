/*
 * nbdvault - the reactor loop (src/reactor.c), for the server's other files.
 */
#ifndef NBDV_REACTOR_H
#define NBDV_REACTOR_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>

#include "server.h"

/* On reactor @r: option-phase connections close, the others drain; the loop ends when
 * its last connection is gone or the grace period is over. */
void reactor_begin_shutdown(struct nbdv_reactor *r);
/* Reactor @idx of @srv on @loop: its watchers, port and hand-over queue. */
void reactor_setup(struct nbdv_server *srv, unsigned idx, struct ev_loop *loop);
/* Free what reactor_setup() made, once its loop has stopped. */
void reactor_teardown(struct nbdv_reactor *r);
/* Return this thread's cached buffers before it exits. */
void reactor_drain_thread_caches(void);
/* Thread body of reactors other than the main one. */
void *reactor_main(void *arg);

#endif /* NBDV_REACTOR_H */
