/* nbdvault - worker pool with completions posted back to the submitting reactor. */
#include "build-config.h"

#include <ev.h>
#include <pthread.h>
#include <stdlib.h>

#include "nbdvault/executor.h"
#include "nbdvault/log.h"

struct nbdv_executor {
	pthread_mutex_t lock;	   /* protects everything below */
	pthread_cond_t cond;	   /* workers wait here for jobs */
	struct nbdv_job *job_head; /* pending jobs, FIFO */
	struct nbdv_job **job_tail;
	bool stopping; /* workers exit once the queue is empty */
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

static void *worker_main(void *arg)
{
	struct nbdv_executor *ex = arg;

	pthread_mutex_lock(&ex->lock);
	for (;;) {
		struct nbdv_job *job;

		while (!ex->job_head && !ex->stopping)
			pthread_cond_wait(&ex->cond, &ex->lock);
		job = ex->job_head;
		if (!job)
			break;
		ex->job_head = job->next;
		if (!ex->job_head)
			ex->job_tail = &ex->job_head;
		pthread_mutex_unlock(&ex->lock);

		job->run(job);
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
	ex->job_tail = &ex->job_head;
	pthread_mutex_init(&ex->lock, NULL);
	pthread_cond_init(&ex->cond, NULL);
	ex->threads = calloc(threads, sizeof(*ex->threads));
	if (!ex->threads)
		goto err;
	for (; ex->n_threads < threads; ex->n_threads++) {
		if (pthread_create(&ex->threads[ex->n_threads], NULL, worker_main, ex) != 0) {
			log_err("cannot start executor thread %u", ex->n_threads);
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

void executor_submit(struct nbdv_executor *ex, struct nbdv_exec_port *port, struct nbdv_job *job,
		     bool blocking)
{
	job->port = port;
	if (!blocking) {
		job->run(job);
		job->done(job);
		return;
	}
	job->next = NULL;
	port->outstanding++;
	pthread_mutex_lock(&ex->lock);
	*ex->job_tail = job;
	ex->job_tail = &job->next;
	pthread_cond_signal(&ex->cond);
	pthread_mutex_unlock(&ex->lock);
}
