/*
 * nbdvault - output queue of reply messages.
 *
 * A reply is one struct nbdv_outmsg: up to NBDV_OUTMSG_IOV pieces, each either inside
 * the message's own inline storage (headers) or in a buffer the message owns (READ
 * data, block status descriptors).  The queue owns every message until all of its
 * bytes are written, so a transport that must retry a send (GnuTLS after
 * GNUTLS_E_AGAIN) always finds the same bytes at the same address.  A message may end
 * in a range of a file (a READ reply sent with sendfile(2) on a plain socket): the
 * queue then stops gathering at that message until the range is sent.
 *
 *   outq.head ──► outmsg ──► outmsg ──► NULL      (outq.tail points at the last)
 *                  iov[0..niov), cur = first iov not fully written
 */
#ifndef NBDV_BUF_H
#define NBDV_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "compiler.h"

#define NBDV_OUTMSG_IOV 4

struct nbdv_outmsg {
	struct nbdv_outmsg *next;	   /* queue link */
	int niov;			   /* pieces in iov */
	int cur;			   /* first piece not fully written */
	struct iovec iov[NBDV_OUTMSG_IOV]; /* what to send, in order */
	void *owned;			   /* freed with the message (may be NULL) */
	int file_fd;			   /* after the pieces: file_len bytes of this file */
	uint64_t file_off;		   /* from this offset (advances as they are sent) */
	size_t file_len;		   /* 0: no file range */
	size_t used;			   /* bytes of inl used */
	size_t cap;			   /* bytes of inl available */
	size_t charge;			   /* memory it holds, charged while queued */
	unsigned char inl[];		   /* inline storage for headers */
};

struct nbdv_outq {
	struct nbdv_outmsg *head; /* next to send */
	struct nbdv_outmsg *tail; /* last queued */
	size_t bytes;		  /* bytes not yet written */
	size_t held;		  /* memory the queued messages hold (see nbdv_mem_*) */
};

/* New message with @inl_cap bytes of inline storage; NULL on ENOMEM. */
struct nbdv_outmsg *outmsg_new(size_t inl_cap) NBDV_WUR;
/* Copy @len bytes into inline storage and append them as a piece.  Returns 0 or -ENOSPC. */
int outmsg_add_copy(struct nbdv_outmsg *m, const void *p, size_t len);
/* Append a piece that points at memory the caller keeps alive (e.g. m->owned). */
void outmsg_add_ref(struct nbdv_outmsg *m, const void *p, size_t len);
/* End the message with @len bytes of @fd from @off, sent after every piece; @fd must
 * stay open until the message is freed.  At most one per message. */
void outmsg_add_file(struct nbdv_outmsg *m, int fd, uint64_t off, size_t len);
void outmsg_free(struct nbdv_outmsg *m);
/* Free this thread's recycled messages (at thread or process exit). */
void nbdv_outmsg_cache_drain(void);

/*
 * Memory accounting.  What a connection holds is counted by its real allocations
 * (struct, inline storage, pooled buffer with its header, malloc's own overhead), not
 * by the bytes it will put on the wire: a 16-byte reply holds ~250 bytes.  Every
 * charge also goes to one process-wide counter, which limits.max-memory caps.
 */
#define NBDV_MALLOC_OVERHEAD 16 /* glibc's chunk header, rounded up */
/* What a pooled buffer from nbdv_buf_alloc() really holds (0 for NULL). */
size_t nbdv_buf_charge(const void *p);
/* What @m holds in all: the message and the buffer it owns. */
size_t outmsg_charge(const struct nbdv_outmsg *m);
/* Add @delta (may be negative) to the process-wide count; returns the new total. */
size_t nbdv_mem_charge(ptrdiff_t delta);
/* Bytes charged process-wide now. */
size_t nbdv_mem_held(void);

/*
 * Data buffers for requests and replies come from a pool of power-of-two size classes
 * (4 KiB and up), so the steady-state request path neither mallocs nor faults in fresh
 * pages.  Up to 64 MiB of idle buffers are kept.  Thread-safe.  nbdv_buf_free(NULL) is
 * a no-op; every pointer from nbdv_buf_alloc must go back through nbdv_buf_free (an
 * outmsg's `owned` buffer does, in outmsg_free).
 */
void *nbdv_buf_alloc(size_t len) NBDV_WUR;
void nbdv_buf_free(void *p);
/* Release every idle pooled buffer (at exit, so leak checkers see a clean heap). */
void nbdv_buf_pool_drain(void);

/*
 * A cache of freed objects of one kind, for one thread (declare it __thread, with .max
 * set): the steady-state request path recycles request structs and reply messages
 * through these instead of calling malloc.  While cached, an object's first pointer's
 * worth of bytes holds the link, so its first member must be one that is rewritten on
 * reuse (a queue link).  Objects come from malloc and go back to free.
 */
struct nbdv_freelist {
	void *head;   /* most recently cached object */
	unsigned n;   /* objects cached */
	unsigned max; /* most kept */
};

/* A cached object, or NULL when there is none. */
void *nbdv_freelist_get(struct nbdv_freelist *fl);
/* Cache @p; false when the list is full (the caller frees it). */
bool nbdv_freelist_put(struct nbdv_freelist *fl, void *p);
/* Free every cached object (at thread or process exit). */
void nbdv_freelist_drain(struct nbdv_freelist *fl);

void outq_push(struct nbdv_outq *q, struct nbdv_outmsg *m);
/*
 * Gather up to @max pieces of unsent data into @iov; returns how many.  Gathering stops
 * after the pieces of a message that ends in a file range: *file_next is then true (the
 * range follows them on the wire, so they may be held back for it).
 */
int outq_gather(const struct nbdv_outq *q, struct iovec *iov, int max, bool *file_next);
/* Mark @n bytes of gathered pieces as written, freeing messages that are complete. */
void outq_consume(struct nbdv_outq *q, size_t n);
/* The head message's file range when its pieces are all written, else NULL. */
struct nbdv_outmsg *outq_file_due(const struct nbdv_outq *q);
/* Mark @n bytes of the head message's file range as sent (see outq_file_due()). */
void outq_consume_file(struct nbdv_outq *q, size_t n);
void outq_clear(struct nbdv_outq *q);

#endif /* NBDV_BUF_H */
