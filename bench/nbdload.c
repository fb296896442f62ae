/*
 * nbdload - a small libnbd load generator for bench/run: random or sequential reads or
 * writes at a fixed queue depth for a fixed time, over any NBD URI (TLS included: local
 * certificate and PSK files are allowed, which fio's nbd engine refuses).
 *
 *   nbdload URI randread|randwrite|seqread BLOCKSIZE QUEUEDEPTH SECONDS [RANGE]
 *
 * RANGE (bytes, default the whole export) keeps every request inside [0, RANGE): the
 * bench writes its data there, and reads past it would be of holes, which a server may
 * answer with a hole chunk and no payload (fio's --size does the same for plain runs).
 *
 * Prints one line: ops bytes seconds mean_latency_us p99_latency_us
 */
#include <errno.h>
#include <inttypes.h>
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct slot {
	double start;	/* when the request was issued */
	int64_t cookie; /* libnbd cookie, or -1 when free */
	char *buf;	/* data buffer */
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	struct nbd_handle *h;
	struct slot *slots;
	double *lat, t0, t_end, sum = 0;
	size_t nlat = 0, cap = 1 << 20;
	uint64_t size, seq = 0, ops = 0, x = 88172645463325252ULL;
	int bs, qd, write_mode, seq_mode;

	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: nbdload URI randread|randwrite|seqread BS QD SECONDS "
				"[RANGE]\n");
		return 2;
	}
	write_mode = strcmp(argv[2], "randwrite") == 0;
	seq_mode = strcmp(argv[2], "seqread") == 0;
	bs = atoi(argv[3]);
	qd = atoi(argv[4]);
	h = nbd_create();
	if (!h || nbd_set_uri_allow_local_file(h, true) < 0 || nbd_connect_uri(h, argv[1]) < 0) {
		fprintf(stderr, "nbdload: %s\n", nbd_get_error());
		return 1;
	}
	size = (uint64_t)nbd_get_size(h);
	if (argc == 7) {
		uint64_t range = strtoull(argv[6], NULL, 10);
		if (range < size)
			size = range;
	}
	if (size < (uint64_t)bs) {
		fprintf(stderr, "nbdload: range below one block\n");
		return 1;
	}
	slots = calloc((size_t)qd, sizeof(*slots));
	lat = malloc(cap * sizeof(*lat));
	for (int i = 0; i < qd; i++) {
		slots[i].cookie = -1;
		slots[i].buf = malloc((size_t)bs);
		memset(slots[i].buf, 0x5a, (size_t)bs);
	}
	t0 = now();
	t_end = t0 + atof(argv[5]);
	for (;;) {
		double t = now();
		bool running = false;

		for (int i = 0; i < qd; i++) {
			struct slot *s = &slots[i];
			if (s->cookie >= 0) {
				int r = nbd_aio_command_completed(h, (uint64_t)s->cookie);
				if (r == 0) {
					running = true;
					continue;
				}
				if (r < 0) {
					fprintf(stderr, "nbdload: %s\n", nbd_get_error());
					return 1;
				}
				if (nlat < cap)
					lat[nlat++] = t - s->start;
				sum += t - s->start;
				ops++;
				s->cookie = -1;
			}
			if (t < t_end) {
				uint64_t off;
				if (seq_mode) {
					off = seq;
					seq += (uint64_t)bs;
					if (seq + (uint64_t)bs > size)
						seq = 0;
				} else {
					x ^= x << 13, x ^= x >> 7, x ^= x << 17;
					off = (x % (size / (uint64_t)bs)) * (uint64_t)bs;
				}
				s->start = t;
				s->cookie = write_mode ? nbd_aio_pwrite(h, s->buf, (size_t)bs, off,
									NBD_NULL_COMPLETION, 0)
						       : nbd_aio_pread(h, s->buf, (size_t)bs, off,
								       NBD_NULL_COMPLETION, 0);
				if (s->cookie < 0) {
					fprintf(stderr, "nbdload: %s\n", nbd_get_error());
					return 1;
				}
				running = true;
			}
		}
		if (!running)
			break;
		if (nbd_poll(h, -1) < 0) {
			fprintf(stderr, "nbdload: %s\n", nbd_get_error());
			return 1;
		}
	}
	qsort(lat, nlat, sizeof(*lat), cmp_double);
	printf("%" PRIu64 " %" PRIu64 " %.6f %.2f %.2f\n", ops, ops * (uint64_t)bs, now() - t0,
	       ops ? sum / (double)ops * 1e6 : 0, nlat ? lat[(size_t)(nlat * 0.99)] * 1e6 : 0);
	nbd_shutdown(h, 0);
	nbd_close(h);
	return 0;
}
