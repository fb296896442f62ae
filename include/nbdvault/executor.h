/*
 * nbdvault - executor: where driver calls run.
 *
 * Blocking jobs go to one pool of worker threads shared by every reactor.  A job
 * carries the completion port of the reactor that submitted it; the worker queues the
 * finished job on that port and wakes its loop through an ev_async, where done() runs.
 * Non-blocking jobs run inline: run() then done() immediately, on the reactor.
 *
 *   reactor ──submit──► jobs queue ──► worker: run() ──► port's done queue ──ev_async──► done()
 */
#ifndef NBDV_EXECUTOR_H
#define NBDV_EXECUTOR_H

#include <ev.h>
#include <pthread.h>
#include <stdbool.h>

#include "nbdvault/compiler.h"

struct nbdv_executor;
struct nbdv_exec_port;

struct nbdv_job {
	struct nbdv_job *next;		    /* queue link, owned by the executor */
	struct nbdv_exec_port *port;	    /* where done() runs; set by executor_submit */
	void (*run)(struct nbdv_job *job);  /* the work; may block on a worker */
	void (*done)(struct nbdv_job *job); /* completion, always on the submitting reactor */
};

/* Completions for one reactor's loop. */
struct nbdv_exec_port {
	struct ev_loop *loop;	    /* the reactor done() runs on */
	ev_async wake;		    /* signalled when done_head becomes non-empty */
	pthread_mutex_t lock;	    /* protects the done queue */
	struct nbdv_job *done_head; /* finished jobs, FIFO */
	struct nbdv_job **done_tail;
	unsigned outstanding; /* jobs submitted to workers, done() not yet run (reactor only) */
};

/* Start @threads workers.  NULL on failure. */
struct nbdv_executor *executor_new(unsigned threads) NBDV_WUR;
/* Stop the workers after the queued jobs ran (their completions wait on their ports). */
void executor_free(struct nbdv_executor *ex);
/* Attach a completion port to @loop (its watcher does not keep the loop alive). */
void executor_port_init(struct nbdv_exec_port *p, struct ev_loop *loop);
/* Run completions already queued on @p now (on the calling thread). */
void executor_port_deliver(struct nbdv_exec_port *p);
/* Deliver what is left and detach; the workers must be stopped first. */
void executor_port_fini(struct nbdv_exec_port *p);
/* Queue @job (blocking) or run it now (!blocking); done() runs through @port.  The job
 * must stay valid until done(). */
void executor_submit(struct nbdv_executor *ex, struct nbdv_exec_port *port, struct nbdv_job *job,
		     bool blocking);

#endif /* NBDV_EXECUTOR_H */
