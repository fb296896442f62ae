/* nbdvault - I/O thread pool: per-submitter queues served round-robin, completions
 * posted back to the submitting reactor. */
#include "build-config.h"

#include <ev.h>
#include <pthread.h>
#include <stdlib.h>

#include "executor.h"
#include "log.h"

struct nbdv_executor {
	pthread_mutex_t lock;		   /* protects everything below and every queue */
	pthread_cond_t cond;		   /* I/O threads wait here for jobs */
	struct nbdv_exec_queue *ring_head; /* queues holding jobs, next to serve first */
	struct nbdv_exec_queue *ring_tail; /* last in the ring */
	struct nbdv_exec_queue own;	   /* for submitters without a queue */
	unsigned per_queue;		   /* most threads one queue may hold at once */
	bool stopping;			   /* I/O threads exit once no queue holds a job */
	unsigned n_threads;
	pthread_t *threads;
};

static void post_done(struct nbdv_job *job)
{
	struct nbdv_exec_port *p = job->port;
	bool was_empty;

	job->next = NULL;
	pthread_mutex_lock(&p->lock);
	was_empty = !p->done_head;
	*p->done_tail = job;
	p->done_tail = &job->next;
	pthread_mutex_unlock(&p->lock);
	/* One wake-up per batch: the reactor drains the whole list. */
	if (was_empty)
		ev_async_send(p->loop, &p->wake);
}

void executor_queue_init(struct nbdv_exec_queue *q)
{
	q->head = NULL;
	q->tail = &q->head;
	q->solo_head = NULL;
	q->solo_tail = &q->solo_head;
	q->next = NULL;
	q->in_ring = false;
	q->solo_running = false;
	q->running = 0;
}

/* Append @q to the ring (lock held). */
static void ring_push(struct nbdv_executor *ex, struct nbdv_exec_queue *q)
{
	q->next = NULL;
	q->in_ring = true;
	if (ex->ring_tail)
		ex->ring_tail->next = q;
	else
		ex->ring_head = q;
	ex->ring_tail = q;
}

/* Whether @q holds a job it may start now (lock held). */
static bool startable(const struct nbdv_executor *ex, const struct nbdv_exec_queue *q)
{
	return q->running < ex->per_queue && (q->head || (q->solo_head && !q->solo_running));
}

/* Put @q in the ring if it has a job it may start (lock held). */
static void maybe_ready(struct nbdv_executor *ex, struct nbdv_exec_queue *q)
{
	if (!q->in_ring && startable(ex, q)) {
		ring_push(ex, q); /* behind every other queue */
		pthread_cond_signal(&ex->cond);
	}
}

/* The next job, round-robin over the queues (lock held); NULL when there is none. */
static struct nbdv_job *next_job(struct nbdv_executor *ex)
{
	struct nbdv_exec_queue *q = ex->ring_head;
	struct nbdv_job *job;

	if (!q)
		return NULL;
	ex->ring_head = q->next;
	if (!ex->ring_head)
		ex->ring_tail = NULL;
	q->in_ring = false;
	if (q->solo_head && !q->solo_running) {
		job = q->solo_head;
		q->solo_head = job->next;
		if (!q->solo_head)
			q->solo_tail = &q->solo_head;
		q->solo_running = true;
	} else {
		job = q->head;
		q->head = job->next;
		if (!q->head)
			q->tail = &q->head;
	}
	q->running++;
	maybe_ready(ex, q);
	return job;
}

static void *io_thread_main(void *arg)
{
	struct nbdv_executor *ex = arg;

	pthread_mutex_lock(&ex->lock);
	for (;;) {
		struct nbdv_job *job;

		while (!ex->ring_head && !ex->stopping)
			pthread_cond_wait(&ex->cond, &ex->lock);
		job = next_job(ex);
		if (!job)
			break;
		pthread_mutex_unlock(&ex->lock);

		job->run(job);
		pthread_mutex_lock(&ex->lock);
		/* Before post_done(): once done() has run, the queue's owner may be gone. */
		job->queue->running--;
		if (job->solo)
			job->queue->solo_running = false;
		maybe_ready(ex, job->queue);
		pthread_mutex_unlock(&ex->lock);
		post_done(job);

		pthread_mutex_lock(&ex->lock);
	}
	pthread_mutex_unlock(&ex->lock);
	return NULL;
}

void executor_port_deliver(struct nbdv_exec_port *p)
{
	struct nbdv_job *list;

	pthread_mutex_lock(&p->lock);
	list = p->done_head;
	p->done_head = NULL;
	p->done_tail = &p->done_head;
	pthread_mutex_unlock(&p->lock);
	while (list) {
		struct nbdv_job *next = list->next;
		p->outstanding--;
		list->done(list);
		list = next;
	}
}

static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	executor_port_deliver(container_of(w, struct nbdv_exec_port, wake));
}

void executor_port_init(struct nbdv_exec_port *p, struct ev_loop *loop)
{
	p->loop = loop;
	p->done_head = NULL;
	p->done_tail = &p->done_head;
	p->outstanding = 0;
	pthread_mutex_init(&p->lock, NULL);
	ev_async_init(&p->wake, wake_cb);
	ev_async_start(loop, &p->wake);
	/* The wake-up watcher alone must not keep the loop alive. */
	ev_unref(loop);
}

void executor_port_fini(struct nbdv_exec_port *p)
{
	if (!p->loop)
		return;
	executor_port_deliver(p);
	ev_ref(p->loop);
	ev_async_stop(p->loop, &p->wake);
	pthread_mutex_destroy(&p->lock);
	p->loop = NULL;
}

struct nbdv_executor *executor_new(unsigned threads)
{
	struct nbdv_executor *ex = calloc(1, sizeof(*ex));

	if (!ex)
		return NULL;
	executor_queue_init(&ex->own);
	/* One thread always stays free for the other connections: a connection with a
	 * backlog of slow jobs never holds them all. */
	ex->per_queue = threads > 1 ? threads - 1 : 1;
	pthread_mutex_init(&ex->lock, NULL);
	pthread_cond_init(&ex->cond, NULL);
	ex->threads = calloc(threads, sizeof(*ex->threads));
	if (!ex->threads)
		goto err;
	for (; ex->n_threads < threads; ex->n_threads++) {
		if (pthread_create(&ex->threads[ex->n_threads], NULL, io_thread_main, ex) != 0) {
			log_err("cannot start I/O thread %u", ex->n_threads);
			goto err;
		}
	}
	return ex;
err:
	executor_free(ex);
	return NULL;
}

void executor_free(struct nbdv_executor *ex)
{
	if (!ex)
		return;
	pthread_mutex_lock(&ex->lock);
	ex->stopping = true;
	pthread_cond_broadcast(&ex->cond);
	pthread_mutex_unlock(&ex->lock);
	for (unsigned i = 0; i < ex->n_threads; i++)
		pthread_join(ex->threads[i], NULL);
	pthread_cond_destroy(&ex->cond);
	pthread_mutex_destroy(&ex->lock);
	free(ex->threads);
	free(ex);
}

void executor_begin(struct nbdv_exec_port *port, struct nbdv_job *job)
{
	job->port = port;
	port->outstanding++;
}

void executor_post(struct nbdv_job *job)
{
	post_done(job);
}

void executor_submit(struct nbdv_executor *ex, struct nbdv_exec_port *port,
		     struct nbdv_exec_queue *q, struct nbdv_job *job, bool blocking, bool solo)
{
	job->port = port;
	job->solo = solo;
	if (!blocking) {
		job->run(job);
		job->done(job);
		return;
	}
	job->next = NULL;
	port->outstanding++;
	if (!q)
		q = &ex->own;
	job->queue = q;
	pthread_mutex_lock(&ex->lock);
	if (solo) {
		*q->solo_tail = job;
		q->solo_tail = &job->next;
	} else {
		*q->tail = job;
		q->tail = &job->next;
	}
	maybe_ready(ex, q);
	pthread_mutex_unlock(&ex->lock);
}
