/*
 * nbdvault - executor: where driver calls run.
 *
 * Blocking jobs go to a pool of worker threads; their completions are queued and
 * handed back to the reactor's loop through an ev_async, where done() runs.
 * Non-blocking jobs run inline: run() then done() immediately, on the reactor.
 *
 *   reactor ──submit──► jobs queue ──► worker: run() ──► done queue ──ev_async──► done()
 */
#ifndef NBDV_EXECUTOR_H
#define NBDV_EXECUTOR_H

#include <stdbool.h>

#include "nbdvault/compiler.h"

struct ev_loop;
struct nbdv_executor;

struct nbdv_job {
	struct nbdv_job *next;		    /* queue link, owned by the executor */
	void (*run)(struct nbdv_job *job);  /* the work; may block on a worker */
	void (*done)(struct nbdv_job *job); /* completion, always on the reactor */
};

/* Start @threads workers delivering completions to @loop.  NULL on failure. */
struct nbdv_executor *executor_new(struct ev_loop *loop, unsigned threads) NBDV_WUR;
/* Stop the workers after the queued jobs ran; pending completions are delivered first. */
void executor_free(struct nbdv_executor *ex);
/* Queue @job (blocking) or run it now (!blocking).  The job must stay valid until done(). */
void executor_submit(struct nbdv_executor *ex, struct nbdv_job *job, bool blocking);

#endif /* NBDV_EXECUTOR_H */
