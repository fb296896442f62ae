/* nbdvault - output queue. */
#include "build-config.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

#define POOL_MIN_SHIFT 12		     /* smallest class: 4 KiB */
#define POOL_CLASSES   20		     /* up to 2 GiB */
#define POOL_MAX_IDLE  (64ULL * 1024 * 1024) /* idle bytes kept in all classes */
#define POOL_HDR       64		     /* header before the data, keeps 64-byte alignment */

/* Header in front of every pooled buffer. */
struct pool_hdr {
	struct pool_hdr *next; /* freelist link while idle */
	unsigned cls;	       /* size class: data is 1 << (cls + POOL_MIN_SHIFT) bytes */
};

static struct {
	pthread_mutex_t lock;		     /* protects everything here */
	struct pool_hdr *free[POOL_CLASSES]; /* idle buffers per class */
	uint64_t idle;			     /* idle bytes */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static size_t class_size(unsigned cls)
{
	return (size_t)1 << (cls + POOL_MIN_SHIFT);
}

static size_t mem_held; /* process-wide charged bytes (atomic) */

size_t nbdv_mem_charge(ptrdiff_t delta)
{
	return __atomic_add_fetch(&mem_held, (size_t)delta, __ATOMIC_RELAXED);
}

size_t nbdv_mem_held(void)
{
	return __atomic_load_n(&mem_held, __ATOMIC_RELAXED);
}

size_t nbdv_buf_charge(const void *p)
{
	const struct pool_hdr *h;

	if (!p)
		return 0;
	h = (const struct pool_hdr *)((const char *)p - POOL_HDR);
	return POOL_HDR + class_size(h->cls) + NBDV_MALLOC_OVERHEAD;
}

void *nbdv_buf_alloc(size_t len)
{
	unsigned cls = 0;
	struct pool_hdr *h;

	while (cls < POOL_CLASSES && class_size(cls) < len)
		cls++;
	if (cls == POOL_CLASSES)
		return NULL;
	pthread_mutex_lock(&pool.lock);
	h = pool.free[cls];
	if (h) {
		pool.free[cls] = h->next;
		pool.idle -= class_size(cls);
	}
	pthread_mutex_unlock(&pool.lock);
	if (!h) {
		h = malloc(POOL_HDR + class_size(cls));
		if (!h)
			return NULL;
		h->cls = cls;
	}
	return (char *)h + POOL_HDR;
}

void nbdv_buf_free(void *p)
{
	struct pool_hdr *h;

	if (!p)
		return;
	h = (struct pool_hdr *)((char *)p - POOL_HDR);
	pthread_mutex_lock(&pool.lock);
	if (pool.idle + class_size(h->cls) <= POOL_MAX_IDLE) {
		h->next = pool.free[h->cls];
		pool.free[h->cls] = h;
		pool.idle += class_size(h->cls);
		h = NULL;
	}
	pthread_mutex_unlock(&pool.lock);
	free(h);
}

void nbdv_buf_pool_drain(void)
{
	pthread_mutex_lock(&pool.lock);
	for (unsigned c = 0; c < POOL_CLASSES; c++) {
		while (pool.free[c]) {
			struct pool_hdr *h = pool.free[c];
			pool.free[c] = h->next;
			free(h);
		}
	}
	pool.idle = 0;
	pthread_mutex_unlock(&pool.lock);
}

void *nbdv_freelist_get(struct nbdv_freelist *fl)
{
	void *p = fl->head;

	if (p) {
		memcpy(&fl->head, p, sizeof(void *));
		fl->n--;
	}
	return p;
}

bool nbdv_freelist_put(struct nbdv_freelist *fl, void *p)
{
	if (fl->n >= fl->max)
		return false;
	memcpy(p, &fl->head, sizeof(void *));
	fl->head = p;
	fl->n++;
	return true;
}

void nbdv_freelist_drain(struct nbdv_freelist *fl)
{
	void *p;

	while ((p = nbdv_freelist_get(fl)))
		free(p);
}

/* Messages with up to OUTMSG_SMALL bytes of inline storage (every reply header, every
 * small option reply) are recycled per thread, so queuing a reply does not malloc. */
#define OUTMSG_SMALL 192
static __thread struct nbdv_freelist outmsg_cache = {.max = 1024};

struct nbdv_outmsg *outmsg_new(size_t inl_cap)
{
	bool small = inl_cap <= OUTMSG_SMALL;
	struct nbdv_outmsg *m = small ? nbdv_freelist_get(&outmsg_cache) : NULL;

	if (!m) {
		m = malloc(sizeof(*m) + (small ? OUTMSG_SMALL : inl_cap));
		if (!m)
			return NULL;
	}
	m->next = NULL;
	m->niov = 0;
	m->cur = 0;
	m->owned = NULL;
	m->file_fd = -1;
	m->file_off = 0;
	m->file_len = 0;
	m->used = 0;
	m->cap = small ? OUTMSG_SMALL : inl_cap;
	return m;
}

void nbdv_outmsg_cache_drain(void)
{
	nbdv_freelist_drain(&outmsg_cache);
}

int outmsg_add_copy(struct nbdv_outmsg *m, const void *p, size_t len)
{
	if (len == 0)
		return 0;
	if (len > m->cap - m->used || m->niov == NBDV_OUTMSG_IOV)
		return -ENOSPC;
	memcpy(m->inl + m->used, p, len);
	outmsg_add_ref(m, m->inl + m->used, len);
	m->used += len;
	return 0;
}

void outmsg_add_ref(struct nbdv_outmsg *m, const void *p, size_t len)
{
	if (len == 0)
		return;
	/* Callers size their messages; running out of pieces is a programming error. */
	if (m->niov == NBDV_OUTMSG_IOV)
		abort();
	m->iov[m->niov].iov_base = (void *)p;
	m->iov[m->niov].iov_len = len;
	m->niov++;
}

void outmsg_add_file(struct nbdv_outmsg *m, int fd, uint64_t off, size_t len)
{
	if (m->file_len)
		abort(); /* one range per message: a programming error otherwise */
	m->file_fd = fd;
	m->file_off = off;
	m->file_len = len;
}

void outmsg_free(struct nbdv_outmsg *m)
{
	if (!m)
		return;
	nbdv_buf_free(m->owned);
	if (m->cap != OUTMSG_SMALL || !nbdv_freelist_put(&outmsg_cache, m))
		free(m);
}

size_t outmsg_charge(const struct nbdv_outmsg *m)
{
	return sizeof(*m) + m->cap + NBDV_MALLOC_OVERHEAD + nbdv_buf_charge(m->owned);
}

/* The queue gives up @m: its charge leaves the queue's and the process's counts. */
static void outq_uncharge(struct nbdv_outq *q, const struct nbdv_outmsg *m)
{
	q->held -= m->charge;
	nbdv_mem_charge(-(ptrdiff_t)m->charge);
}

void outq_push(struct nbdv_outq *q, struct nbdv_outmsg *m)
{
	m->charge = outmsg_charge(m);
	q->held += m->charge;
	nbdv_mem_charge((ptrdiff_t)m->charge);
	for (int i = 0; i < m->niov; i++)
		q->bytes += m->iov[i].iov_len;
	q->bytes += m->file_len;
	m->next = NULL;
	if (q->tail)
		q->tail->next = m;
	else
		q->head = m;
	q->tail = m;
}

int outq_gather(const struct nbdv_outq *q, struct iovec *iov, int max, bool *file_next)
{
	int n = 0;

	*file_next = false;
	for (const struct nbdv_outmsg *m = q->head; m && n < max; m = m->next) {
		for (int i = m->cur; i < m->niov && n < max; i++)
			iov[n++] = m->iov[i];
		if (m->file_len) {
			*file_next = n > 0;
			break;
		}
	}
	return n;
}

static bool msg_done(const struct nbdv_outmsg *m)
{
	return m->cur == m->niov && m->file_len == 0;
}

/* Free complete messages at the head (including ones made only of empty pieces). */
static void pop_done(struct nbdv_outq *q)
{
	while (q->head && msg_done(q->head)) {
		struct nbdv_outmsg *m = q->head;
		q->head = m->next;
		if (!q->head)
			q->tail = NULL;
		outq_uncharge(q, m);
		outmsg_free(m);
	}
}

void outq_consume(struct nbdv_outq *q, size_t n)
{
	q->bytes -= n;
	while (n && q->head) {
		struct nbdv_outmsg *m = q->head;
		struct iovec *v = &m->iov[m->cur];

		if (n < v->iov_len) {
			v->iov_base = (char *)v->iov_base + n;
			v->iov_len -= n;
			return;
		}
		n -= v->iov_len;
		m->cur++;
		if (m->cur == m->niov) {
			if (m->file_len)
				return; /* gathering stopped here: n is 0 */
			pop_done(q);
		}
	}
	pop_done(q);
}

struct nbdv_outmsg *outq_file_due(const struct nbdv_outq *q)
{
	struct nbdv_outmsg *m = q->head;

	return m && m->cur == m->niov && m->file_len ? m : NULL;
}

void outq_consume_file(struct nbdv_outq *q, size_t n)
{
	struct nbdv_outmsg *m = q->head;

	q->bytes -= n;
	m->file_off += n;
	m->file_len -= n;
	pop_done(q);
}

void outq_clear(struct nbdv_outq *q)
{
	while (q->head) {
		struct nbdv_outmsg *m = q->head;
		q->head = m->next;
		outq_uncharge(q, m);
		outmsg_free(m);
	}
	q->tail = NULL;
	q->bytes = 0;
}
