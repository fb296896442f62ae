/* nbdvault - output queue. */
#include "build-config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbdvault/buf.h"

struct nbdv_outmsg *outmsg_new(size_t inl_cap)
{
	struct nbdv_outmsg *m = malloc(sizeof(*m) + inl_cap);

	if (!m)
		return NULL;
	m->next = NULL;
	m->niov = 0;
	m->cur = 0;
	m->owned = NULL;
	m->used = 0;
	m->cap = inl_cap;
	return m;
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

void outmsg_free(struct nbdv_outmsg *m)
{
	if (m) {
		free(m->owned);
		free(m);
	}
}

void outq_push(struct nbdv_outq *q, struct nbdv_outmsg *m)
{
	for (int i = 0; i < m->niov; i++)
		q->bytes += m->iov[i].iov_len;
	m->next = NULL;
	if (q->tail)
		q->tail->next = m;
	else
		q->head = m;
	q->tail = m;
}

int outq_gather(const struct nbdv_outq *q, struct iovec *iov, int max)
{
	int n = 0;

	for (const struct nbdv_outmsg *m = q->head; m && n < max; m = m->next) {
		for (int i = m->cur; i < m->niov && n < max; i++)
			iov[n++] = m->iov[i];
	}
	return n;
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
			q->head = m->next;
			if (!q->head)
				q->tail = NULL;
			outmsg_free(m);
		}
	}
	/* Messages made only of empty pieces are complete too. */
	while (q->head && q->head->cur == q->head->niov) {
		struct nbdv_outmsg *m = q->head;
		q->head = m->next;
		if (!q->head)
			q->tail = NULL;
		outmsg_free(m);
	}
}

void outq_clear(struct nbdv_outq *q)
{
	while (q->head) {
		struct nbdv_outmsg *m = q->head;
		q->head = m->next;
		outmsg_free(m);
	}
	q->tail = NULL;
	q->bytes = 0;
}
