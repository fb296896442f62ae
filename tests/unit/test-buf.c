/* Output queue: gathering across messages, partial writes, freeing what completes. */
#include "build-config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "buf.h"

int main(void)
{
	struct nbdv_outq q = {0};
	struct iovec iov[8];
	bool file_next;
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
	CHECK(outq_gather(&q, iov, 8, &file_next) == 3 && !file_next);
	CHECK(outq_gather(&q, iov, 2, &file_next) == 2);
	CHECK(outq_file_due(&q) == NULL);

	/* Consume in odd-sized steps, as a socket taking partial writes would. */
	while (q.head) {
		int n = outq_gather(&q, iov, 8, &file_next);
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

	/* A message ending in a file range: gathering stops after its pieces (flagged, so
	 * the transport holds them for the range), the range is due once they are sent,
	 * and the next message follows only after the whole range. */
	{
		char path[] = "/tmp/nbdvault-test-buf-XXXXXX", data[64], wire[128];
		int fd = mkstemp(path);
		struct nbdv_outmsg *h = outmsg_new(8), *t = outmsg_new(8), *f;
		size_t w = 0;

		CHECK(fd >= 0 && h && t);
		unlink(path);
		for (int i = 0; i < 64; i++)
			data[i] = (char)('a' + i % 26);
		CHECK(pwrite(fd, data, 64, 0) == 64);
		CHECK(outmsg_add_copy(h, "HDR", 3) == 0);
		outmsg_add_file(h, fd, 10, 40);
		CHECK(outmsg_add_copy(t, "NEXT", 4) == 0);
		outq_push(&q, h);
		outq_push(&q, t);
		CHECK(q.bytes == 47);
		CHECK(outq_gather(&q, iov, 8, &file_next) == 1 && file_next);
		memcpy(wire, iov[0].iov_base, 2);
		outq_consume(&q, 2); /* a partial write of the header */
		CHECK(outq_file_due(&q) == NULL && q.head == h);
		CHECK(outq_gather(&q, iov, 8, &file_next) == 1 && file_next && iov[0].iov_len == 1);
		memcpy(wire + 2, iov[0].iov_base, 1);
		outq_consume(&q, 1);
		w = 3;
		/* The range goes out in pieces, as a non-blocking sendfile() would send it. */
		while ((f = outq_file_due(&q)) != NULL) {
			size_t k = f->file_len < 15 ? f->file_len : 15;
			CHECK(f == h && f->file_fd == fd);
			CHECK(pread(fd, wire + w, k, (off_t)f->file_off) == (ssize_t)k);
			w += k;
			outq_consume_file(&q, k);
		}
		CHECK(w == 43 && q.head == t && q.bytes == 4);
		CHECK(outq_gather(&q, iov, 8, &file_next) == 1 && !file_next);
		memcpy(wire + w, iov[0].iov_base, 4);
		outq_consume(&q, 4);
		w += 4;
		CHECK(q.head == NULL && q.tail == NULL && q.bytes == 0);
		CHECK(memcmp(wire, "HDR", 3) == 0 && memcmp(wire + 3, data + 10, 40) == 0 &&
		      memcmp(wire + 43, "NEXT", 4) == 0);
		close(fd);
	}

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
