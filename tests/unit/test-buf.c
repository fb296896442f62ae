/* Output queue: gathering across messages, partial writes, freeing what completes. */
#include "build-config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "nbdvault/buf.h"

int main(void)
{
	struct nbdv_outq q = {0};
	struct iovec iov[8];
	char *owned = nbdv_buf_alloc(100);
	struct nbdv_outmsg *a = outmsg_new(16), *b = outmsg_new(4);
	char flat[200];
	size_t got = 0;

	CHECK(a && b && owned);
	memset(owned, 'x', 100);
	CHECK(outmsg_add_copy(a, "head", 4) == 0);
	{
		/* Past the message's inline capacity (at least what was asked for). */
		char big[4096] = {0};
		CHECK(a->cap >= 16 && a->cap < sizeof(big));
		CHECK(outmsg_add_copy(a, big, a->cap) == -ENOSPC);
	}
	CHECK(outmsg_add_copy(a, "", 0) == 0); /* empty: no piece */
	a->owned = owned;
	outmsg_add_ref(a, owned, 100);
	CHECK(outmsg_add_copy(b, "tail", 4) == 0);
	outq_push(&q, a);
	outq_push(&q, b);
	CHECK(q.bytes == 108);
	CHECK(outq_gather(&q, iov, 8) == 3);
	CHECK(outq_gather(&q, iov, 2) == 2);

	/* Consume in odd-sized steps, as a socket taking partial writes would. */
	while (q.head) {
		int n = outq_gather(&q, iov, 8);
		size_t step = 7;
		CHECK(n > 0);
		for (int i = 0; i < n && step; i++) {
			size_t k = iov[i].iov_len < step ? iov[i].iov_len : step;
			memcpy(flat + got, iov[i].iov_base, k);
			got += k;
			step -= k;
		}
		outq_consume(&q, 7 - step);
	}
	CHECK(got == 108 && q.bytes == 0 && q.tail == NULL);
	CHECK(memcmp(flat, "head", 4) == 0 && flat[4] == 'x' && flat[103] == 'x');
	CHECK(memcmp(flat + 104, "tail", 4) == 0);

	/* Clearing frees queued messages and their owned buffers (ASan checks leaks). */
	a = outmsg_new(8);
	a->owned = nbdv_buf_alloc(10);
	outmsg_add_ref(a, a->owned, 10);
	outq_push(&q, a);
	outq_clear(&q);
	CHECK(q.head == NULL && q.bytes == 0);

	/* The pool hands back buffers of at least the size asked, reusing freed ones. */
	{
		char *x = nbdv_buf_alloc(5000), *y;
		CHECK(x != NULL);
		memset(x, 1, 5000);
		nbdv_buf_free(x);
		y = nbdv_buf_alloc(8192);
		CHECK(y == x); /* same 8 KiB class, reused */
		nbdv_buf_free(y);
		CHECK(nbdv_buf_alloc((size_t)1 << 40) == NULL);
		nbdv_buf_free(NULL);
		nbdv_buf_pool_drain();
	}
	/* A freelist keeps up to max objects, hands back the newest first, frees the rest. */
	{
		struct nbdv_freelist fl = {.max = 2};
		void *a1 = malloc(32), *a2 = malloc(32), *a3 = malloc(32);

		CHECK(a1 && a2 && a3);
		CHECK(nbdv_freelist_get(&fl) == NULL);
		CHECK(nbdv_freelist_put(&fl, a1) && nbdv_freelist_put(&fl, a2));
		CHECK(!nbdv_freelist_put(&fl, a3)); /* full: the caller frees it */
		free(a3);
		CHECK(fl.n == 2 && nbdv_freelist_get(&fl) == a2 && fl.n == 1);
		CHECK(nbdv_freelist_put(&fl, a2));
		nbdv_freelist_drain(&fl); /* ASan checks that both were freed */
		CHECK(fl.n == 0 && fl.head == NULL);
	}
	CHECKS_DONE("test-buf");
}
