/*
 * The steady-state request path does not call malloc: after a warm-up round, a second
 * identical round of requests (reads, sparse reads, writes with and without FUA,
 * flush, trim, write-zeroes, block status, cache) on a memory export (served inline)
 * and on a file export (served by the worker pool) allocates nothing in nbdvault's
 * code.  malloc/calloc/realloc are wrapped at link time (-Wl,--wrap), so the count
 * covers every call made by the server's own objects, on any thread.
 *
 * Every reply of the measured round is checked too (cookie, no error, data read back),
 * so a round that failed early and allocated nothing cannot pass.
 */
#include "build-config.h"

#include <endian.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "compiler.h"
#include "embed.h"
#include "protocol.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t m);
void *__wrap_realloc(void *p, size_t n);

static int counting;
static unsigned long allocs;

static void count(void)
{
	if (__atomic_load_n(&counting, __ATOMIC_RELAXED))
		__atomic_add_fetch(&allocs, 1, __ATOMIC_RELAXED);
}

void *__wrap_malloc(size_t n)
{
	count();
	return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t m)
{
	count();
	return __real_calloc(n, m);
}

void *__wrap_realloc(void *p, size_t n)
{
	count();
	return __real_realloc(p, n);
}

#define ROUND_REQS 64 /* requests of each kind per round */
#define BLK	   4096

static uint8_t stream[4 << 20];
static size_t slen;

static void put(const void *p, size_t n)
{
	CHECK(slen + n <= sizeof(stream));
	memcpy(stream + slen, p, n);
	slen += n;
}

static void put_be32(uint32_t v)
{
	v = htobe32(v);
	put(&v, 4);
}

static void put_opt(uint32_t opt, const void *data, uint32_t len)
{
	struct nbd_option o = {htobe64(NBD_IHAVEOPT), htobe32(opt), htobe32(len)};

	put(&o, sizeof(o));
	put(data, len);
}

static void handshake(const char *name)
{
	uint8_t d[128];
	size_t n = 0, nl = strlen(name);
	uint32_t v;

	put_be32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	put_opt(NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	v = htobe32((uint32_t)nl);
	memcpy(d, &v, 4);
	memcpy(d + 4, name, nl);
	n = 4 + nl;
	v = htobe32(1);
	memcpy(d + n, &v, 4);
	v = htobe32(15);
	memcpy(d + n + 4, &v, 4);
	memcpy(d + n + 8, "base:allocation", 15);
	put_opt(NBD_OPT_SET_META_CONTEXT, d, (uint32_t)(n + 23));
	memset(d + n, 0, 2); /* GO: name, no info requests */
	put_opt(NBD_OPT_GO, d, (uint32_t)(n + 2));
}

static void put_req(uint16_t type, uint16_t flags, uint64_t cookie, uint64_t off, uint32_t len,
		    const void *payload)
{
	struct nbd_request q = {htobe32(NBD_REQUEST_MAGIC),
				htobe16(flags),
				htobe16(type),
				cookie,
				htobe64(off),
				htobe32(len)};

	put(&q, sizeof(q));
	if (payload)
		put(payload, len);
}

/* One round: ROUND_REQS of each command; cookies are (kind << 16 | i). */
static void build_round(void)
{
	static uint8_t data[BLK];

	for (uint64_t i = 0; i < ROUND_REQS; i++) {
		uint64_t off = i * BLK;
		memset(data, (int)(i + 1), sizeof(data));
		put_req(NBD_CMD_WRITE, (i & 1) ? NBD_CMD_FLAG_FUA : 0, 1 << 16 | i, off, BLK, data);
		put_req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2 << 16 | i, off, BLK, NULL);
		put_req(NBD_CMD_READ, 0, 3 << 16 | i, (ROUND_REQS + 2 * i) * BLK, 2 * BLK, NULL);
		put_req(NBD_CMD_BLOCK_STATUS, (i & 1) ? NBD_CMD_FLAG_REQ_ONE : 0, 4 << 16 | i, 0,
			1 << 20, NULL);
		put_req(NBD_CMD_TRIM, 0, 5 << 16 | i, (4 * ROUND_REQS + i) * BLK, BLK, NULL);
		put_req(NBD_CMD_WRITE_ZEROES, 0, 6 << 16 | i, (5 * ROUND_REQS + i) * BLK, BLK,
			NULL);
		put_req(NBD_CMD_CACHE, 0, 7 << 16 | i, off, BLK, NULL);
	}
	put_req(NBD_CMD_FLUSH, 0, 8 << 16, 0, 0, NULL);
}

/* Check the replies of one round in out[from, to): every request answered once
 * without error; with @check_data, reads return the fill byte of their block.  (Every
 * round writes the same bytes; a read may overtake the write of its own round, since
 * NBD does not order requests in flight, so only later rounds can check data.) */
static void check_round(const uint8_t *out, size_t from, size_t to, bool check_data)
{
	static uint8_t done[9][ROUND_REQS];
	size_t p = from;

	memset(done, 0, sizeof(done));
	while (p < to) {
		struct nbd_structured_reply h;
		uint64_t cookie;
		unsigned kind, i;

		CHECK(to - p >= sizeof(struct nbd_simple_reply));
		memcpy(&h, out + p, NBDV_MIN(sizeof(h), to - p));
		if (be32toh(h.magic) == NBD_SIMPLE_REPLY_MAGIC) {
			/* Allowed for every command but READ once structured replies are on. */
			struct nbd_simple_reply sr;
			memcpy(&sr, out + p, sizeof(sr));
			kind = (unsigned)(sr.cookie >> 16);
			i = (unsigned)(sr.cookie & 0xffff);
			CHECK(kind != 2 && kind != 3 && kind >= 1 && kind <= 8 && i < ROUND_REQS);
			CHECK_MSG(sr.error == 0, "error reply to kind %u #%u", kind, i);
			CHECK(!done[kind][i]);
			done[kind][i] = 1;
			p += sizeof(sr);
			continue;
		}
		CHECK(to - p >= sizeof(h));
		CHECK(be32toh(h.magic) == NBD_STRUCTURED_REPLY_MAGIC);
		cookie = h.cookie;
		kind = (unsigned)(cookie >> 16);
		i = (unsigned)(cookie & 0xffff);
		CHECK(kind >= 1 && kind <= 8 && i < ROUND_REQS);
		CHECK_MSG(!(be16toh(h.type) & 0x8000), "error reply to kind %u #%u", kind, i);
		if (kind == 2) {
			uint8_t want[BLK];
			CHECK(be16toh(h.type) == NBD_REPLY_TYPE_OFFSET_DATA);
			CHECK(be32toh(h.length) == 8 + BLK);
			memset(want, (int)(i + 1), sizeof(want));
			CHECK_MSG(!check_data || memcmp(out + p + sizeof(h) + 8, want, BLK) == 0,
				  "block %u reads back 0x%02x, wrote 0x%02x", i,
				  out[p + sizeof(h) + 8], i + 1);
		}
		if (kind == 4)
			CHECK(be16toh(h.type) == NBD_REPLY_TYPE_BLOCK_STATUS);
		p += sizeof(h) + be32toh(h.length);
		if (be16toh(h.flags) & NBD_REPLY_FLAG_DONE) {
			CHECK(!done[kind][i]);
			done[kind][i] = 1;
		}
	}
	CHECK(p == to);
	for (unsigned k = 1; k <= 7; k++)
		for (unsigned i = 0; i < ROUND_REQS; i++)
			CHECK_MSG(done[k][i], "no reply to kind %u #%u", k, i);
	CHECK(done[8][0]);
}

/*
 * Caches grow to the round's peak concurrency (requests in flight, replies waiting for
 * the flusher), which on the worker pool depends on thread timing: a round that reaches
 * a new peak allocates a few dozen structs once.  A round that allocates nothing at
 * all, with every command in it, shows that none of those paths allocates per request,
 * so after two warm-up rounds one of up to MAX_ROUNDS rounds must be clean.  (A
 * per-request malloc can never give a clean round.)  The total is reported and must
 * stay far below one allocation per request.
 */
#define MAX_ROUNDS 12

static void run(const char *export_name)
{
	struct embed_client *cl = embed_open(sizeof(stream), 64 << 20);
	unsigned long n, total = 0;
	unsigned reqs = 0;
	bool clean_round = false;

	slen = 0;
	handshake(export_name);
	embed_feed(cl, stream, slen);
	CHECK(!cl->gone && cl->out_len > 0);

	for (int round = 0; round < MAX_ROUNDS && !clean_round; round++) {
		size_t mark = cl->out_len;

		slen = 0;
		build_round();
		__atomic_store_n(&allocs, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&counting, round > 1, __ATOMIC_RELAXED);
		embed_feed(cl, stream, slen);
		__atomic_store_n(&counting, 0, __ATOMIC_RELAXED);
		n = __atomic_load_n(&allocs, __ATOMIC_RELAXED);
		check_round(cl->out, mark, cl->out_len, round > 0);
		if (round > 1) {
			total += n;
			reqs += 7 * ROUND_REQS + 1;
			clean_round = n == 0;
		}
		/* Empty the capture buffer between rounds (it never reallocates). */
		cl->out_len = 0;
	}
	printf("%s: %lu allocation(s) in %u requests after warm-up\n", export_name, total, reqs);
	CHECK_MSG(clean_round, "%s: every round allocated", export_name);
	CHECK_MSG(total * 4 < reqs, "%s: %lu allocations for %u requests", export_name, total,
		  reqs);
	embed_close(cl);
}

int main(void)
{
	char dir[] = "/tmp/nbdvault-steady-XXXXXX", yaml[1024];

	CHECK(mkdtemp(dir) != NULL);
	snprintf(yaml, sizeof(yaml),
		 "io-threads: 2\n"
		 "exports:\n"
		 "  - name: mem\n    driver: memory\n    size: 8M\n"
		 "  - name: disk\n    driver: file\n    path: %s/disk.img\n    size: 8M\n",
		 dir);
	(void)embed_init(yaml);
	run("mem");
	run("disk");
	embed_fini();
	snprintf(yaml, sizeof(yaml), "%s/disk.img", dir);
	unlink(yaml);
	rmdir(dir);
	CHECKS_DONE("test-steady-state");
}
