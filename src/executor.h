/*
 * nbdvault - executor: where driver calls run.
 *
 * Blocking jobs go to one pool of I/O threads shared by every reactor.  Each submitter
 * (a connection) has its own queue of jobs; the queues that hold jobs wait in a ring,
 * and an I/O thread takes one job from the queue at the head of the ring and puts that
 * queue back at the tail: connections are served round-robin, so one with hundreds of
 * expensive jobs queued delays another's next job by at most one job per thread, not by
 * its whole backlog.  One queue never holds every thread (io-threads - 1 at most), so
 * another connection's next job starts at once.  Jobs submitted as `solo` (block status:
 * CPU work that gains nothing from running side by side for one client) wait in a second
 * list of the queue and run one at a time, ahead of its other jobs when none is running.
 * A job carries the completion port of the reactor that submitted it; the I/O thread
 * queues the finished job on that port and wakes its loop through an ev_async, where
 * done() runs.  Non-blocking jobs run inline: run() then done() immediately, on the
 * reactor.
 *
 *   reactor ──submit──► its queue ──► ring of queues ──► I/O thread: run() ──► port ──ev_async──►
 * done()
 */
#ifndef NBDV_EXECUTOR_H
#define NBDV_EXECUTOR_H

#include <ev.h>
#include <pthread.h>
#include <stdbool.h>

#include "compiler.h"

struct nbdv_executor;
struct nbdv_exec_port;

struct nbdv_job {
	struct nbdv_job *next;		    /* queue link, owned by the executor */
	struct nbdv_exec_port *port;	    /* where done() runs; set by executor_submit */
	struct nbdv_exec_queue *queue;	    /* the queue it waits in; set by executor_submit */
	void (*run)(struct nbdv_job *job);  /* the work; may block on an I/O thread */
	void (*done)(struct nbdv_job *job); /* completion, always on the submitting reactor */
	bool solo; /* runs one at a time in its queue; set by executor_submit */
};

/* One submitter's jobs waiting for an I/O thread (protected by the executor's lock). */
struct nbdv_exec_queue {
	struct nbdv_job *head;	      /* oldest job */
	struct nbdv_job **tail;	      /* where the next one goes */
	struct nbdv_job *solo_head;   /* oldest solo job */
	struct nbdv_job **solo_tail;  /* where the next solo job goes */
	struct nbdv_exec_queue *next; /* ring link while it holds jobs */
	bool in_ring;		      /* holds jobs and may start one: in the ring */
	bool solo_running;	      /* one of its solo jobs is on an I/O thread */
	unsigned running;	      /* its jobs on I/O threads now, solo included */
};

/* Completions for one reactor's loop. */
struct nbdv_exec_port {
	struct ev_loop *loop;	    /* the reactor done() runs on */
	ev_async wake;		    /* signalled when done_head becomes non-empty */
	pthread_mutex_t lock;	    /* protects the done queue */
	struct nbdv_job *done_head; /* finished jobs, FIFO */
	struct nbdv_job **done_tail;
	unsigned outstanding; /* jobs submitted to I/O threads, done() not yet run (reactor only) */
};

/* An empty queue; it must outlive every job submitted through it. */
void executor_queue_init(struct nbdv_exec_queue *q);
/* Start @threads I/O threads.  NULL on failure. */
struct nbdv_executor *executor_new(unsigned threads) NBDV_WUR;
/* Stop the I/O threads after the queued jobs ran (their completions wait on their ports). */
void executor_free(struct nbdv_executor *ex);
/* Attach a completion port to @loop (its watcher does not keep the loop alive). */
void executor_port_init(struct nbdv_exec_port *p, struct ev_loop *loop);
/* Run completions already queued on @p now (on the calling thread). */
void executor_port_deliver(struct nbdv_exec_port *p);
/* Deliver what is left and detach; the I/O threads must be stopped first. */
void executor_port_fini(struct nbdv_exec_port *p);
/* Queue @job on @q (blocking) or run it now (!blocking); done() runs through @port.  The
 * job must stay valid until done().  @q may be NULL: the executor's own queue.  A @solo
 * job runs when no other solo job of @q does. */
void executor_submit(struct nbdv_executor *ex, struct nbdv_exec_port *port,
		     struct nbdv_exec_queue *q, struct nbdv_job *job, bool blocking, bool solo);
/*
 * A job whose work another thread does (an asynchronous driver's): executor_begin()
 * on the reactor counts it as outstanding on @port; executor_post(), from any thread,
 * later queues its done() there like an I/O thread's completion.
 */
void executor_begin(struct nbdv_exec_port *port, struct nbdv_job *job);
void executor_post(struct nbdv_job *job);

#endif /* NBDV_EXECUTOR_H */
