/* nbdvault - worker pool with completions posted back to the reactor. */
#include "build-config.h"

#include <ev.h>
#include <pthread.h>
#include <stdlib.h>

#include "nbdvault/executor.h"
#include "nbdvault/log.h"

struct nbdv_executor {
	struct ev_loop *loop;	   /* the reactor completions go to */
	ev_async wake;		   /* signalled when done_head is non-empty */
	pthread_mutex_t lock;	   /* protects everything below */
	pthread_cond_t cond;	   /* workers wait here for jobs */
	struct nbdv_job *job_head; /* pending jobs, FIFO */
	struct nbdv_job **job_tail;
	struct nbdv_job *done_head; /* finished jobs, FIFO */
	struct nbdv_job **done_tail;
	bool stopping; /* workers exit once the queue is empty */
	unsigned n_threads;
	pthread_t *threads;
};

static void *worker_main(void *arg)
{
	struct nbdv_executor *ex = arg;

	pthread_mutex_lock(&ex->lock);
	for (;;) {
		struct nbdv_job *job;
		bool was_empty;

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

		pthread_mutex_lock(&ex->lock);
		job->next = NULL;
		was_empty = !ex->done_head;
		*ex->done_tail = job;
		ex->done_tail = &job->next;
		/* One wake-up per batch: the reactor drains the whole list. */
		if (was_empty)
			ev_async_send(ex->loop, &ex->wake);
	}
	pthread_mutex_unlock(&ex->lock);
	return NULL;
}

static void deliver_completions(struct nbdv_executor *ex)
{
	struct nbdv_job *list;

	pthread_mutex_lock(&ex->lock);
	list = ex->done_head;
	ex->done_head = NULL;
	ex->done_tail = &ex->done_head;
	pthread_mutex_unlock(&ex->lock);
	while (list) {
		struct nbdv_job *next = list->next;
		list->done(list);
		list = next;
	}
}

static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	deliver_completions(container_of(w, struct nbdv_executor, wake));
}

struct nbdv_executor *executor_new(struct ev_loop *loop, unsigned threads)
{
	struct nbdv_executor *ex = calloc(1, sizeof(*ex));

	if (!ex)
		return NULL;
	ex->loop = loop;
	ex->job_tail = &ex->job_head;
	ex->done_tail = &ex->done_head;
	pthread_mutex_init(&ex->lock, NULL);
	pthread_cond_init(&ex->cond, NULL);
	ev_async_init(&ex->wake, wake_cb);
	ev_async_start(loop, &ex->wake);
	/* The wake-up watcher alone must not keep the loop alive. */
	ev_unref(loop);
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
	deliver_completions(ex);
	ev_ref(ex->loop);
	ev_async_stop(ex->loop, &ex->wake);
	pthread_cond_destroy(&ex->cond);
	pthread_mutex_destroy(&ex->lock);
	free(ex->threads);
	free(ex);
}

void executor_submit(struct nbdv_executor *ex, struct nbdv_job *job, bool blocking)
{
	if (!blocking) {
		job->run(job);
		job->done(job);
		return;
	}
	job->next = NULL;
	pthread_mutex_lock(&ex->lock);
	*ex->job_tail = job;
	ex->job_tail = &job->next;
	pthread_cond_signal(&ex->cond);
	pthread_mutex_unlock(&ex->lock);
}
