/*
 * nbdvault - `memory` driver: a sparse RAM disk.
 *
 * Storage is a two-level table of 4 KiB chunks; only chunks that have been written
 * hold memory, and trim or zeroing of a whole chunk gives it back.  Small chunks keep a
 * first small write from zeroing a large chunk (64 KiB chunks cost half the random
 * 4 KiB write rate) and give block status 4 KiB resolution.
 *
 *   l1[i] ──► l2 table (CHUNKS_PER_L2 pointers) ──► chunk (CHUNK_SIZE bytes) or NULL
 *
 * Calls never block, so reactors run them inline.  A read-write lock keeps the table
 * consistent when several reactors share an export:
 * reads run concurrently; writes, trims and zeroing take it exclusively.
 *
 * A write of STREAM_MIN bytes or more (a bulk copy's 256 KiB requests) is stored around
 * the CPU cache: the chunks it lands in are seldom in cache, and ordinary stores would
 * first read every line of them from memory and then push the server's own hot data
 * (input buffer, TLS state) out of the cache.  Smaller writes, likely to be read back
 * soon, keep ordinary stores.
 */
#include "build-config.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compiler.h"
#include "nbdvault/driver.h"
#include "protocol.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define CHUNK_SHIFT   12
#define CHUNK_SIZE    (1ULL << CHUNK_SHIFT)
#define L2_SHIFT      18 /* chunks per L2 table: 262144, i.e. 1 GiB */
#define CHUNKS_PER_L2 (1ULL << L2_SHIFT)
#define STREAM_MIN    (64 * 1024) /* writes from this size bypass the cache */

struct mem {
	struct nbdv_drv_instance head; /* must be first */
	uint64_t size;		       /* export size */
	uint64_t n_l1;		       /* entries in l1 */
	uint8_t ***l1;		       /* lazily allocated L2 tables */
	pthread_rwlock_t lock;	       /* protects l1 and every chunk */
};

static struct mem *to_mem(struct nbdv_drv_instance *inst)
{
	return (struct mem *)inst;
}

static int mem_create(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{
	struct mem *m = calloc(1, sizeof(*m));
	uint64_t chunks;

	if (!m)
		return -ENOMEM;
	m->size = p->size;
	chunks = (p->size + CHUNK_SIZE - 1) >> CHUNK_SHIFT;
	m->n_l1 = (chunks + CHUNKS_PER_L2 - 1) >> L2_SHIFT;
	m->l1 = calloc(m->n_l1 ? m->n_l1 : 1, sizeof(*m->l1));
	if (!m->l1) {
		free(m);
		return -ENOMEM;
	}
	pthread_rwlock_init(&m->lock, NULL);
	*out = &m->head;
	return 0;
}

static void mem_destroy(struct nbdv_drv_instance *inst)
{
	struct mem *m = to_mem(inst);

	for (uint64_t i = 0; i < m->n_l1; i++) {
		if (!m->l1[i])
			continue;
		for (uint64_t j = 0; j < CHUNKS_PER_L2; j++)
			free(m->l1[i][j]);
		free(m->l1[i]);
	}
	free(m->l1);
	pthread_rwlock_destroy(&m->lock);
	free(m);
}

static uint32_t mem_caps(struct nbdv_drv_instance *inst)
{
	return NBDV_CAP_WRITE | NBDV_CAP_FLUSH | NBDV_CAP_FUA | NBDV_CAP_TRIM | NBDV_CAP_ZERO |
	       NBDV_CAP_FAST_ZERO | NBDV_CAP_EXTENTS | NBDV_CAP_CACHE | NBDV_CAP_MULTI_CONN;
}

static uint64_t mem_get_size(struct nbdv_drv_instance *inst)
{
	return to_mem(inst)->size;
}

/* The chunk holding byte @off, or NULL; with @alloc, create it (zeroed).  Lock held. */
static uint8_t *chunk_at(struct mem *m, uint64_t off, bool alloc)
{
	uint64_t c = off >> CHUNK_SHIFT;
	uint8_t ***l2 = &m->l1[c >> L2_SHIFT];
	uint8_t **slot;

	if (!*l2) {
		if (!alloc)
			return NULL;
		*l2 = calloc(CHUNKS_PER_L2, sizeof(**l2));
		if (!*l2)
			return NULL;
	}
	slot = &(*l2)[c & (CHUNKS_PER_L2 - 1)];
	if (!*slot && alloc)
		*slot = calloc(1, CHUNK_SIZE);
	return *slot;
}

static void chunk_free(struct mem *m, uint64_t off)
{
	uint64_t c = off >> CHUNK_SHIFT;
	uint8_t **l2 = m->l1[c >> L2_SHIFT];

	if (l2) {
		free(l2[c & (CHUNKS_PER_L2 - 1)]);
		l2[c & (CHUNKS_PER_L2 - 1)] = NULL;
	}
}

static int mem_pread(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off,
		     uint32_t flags)
{
	struct mem *m = to_mem(inst);
	uint8_t *dst = buf;

	pthread_rwlock_rdlock(&m->lock);
	while (len) {
		uint64_t in = off & (CHUNK_SIZE - 1);
		uint64_t n = NBDV_MIN(len, CHUNK_SIZE - in);
		uint8_t *c = chunk_at(m, off, false);

		if (c)
			memcpy(dst, c + in, n);
		else
			memset(dst, 0, n);
		dst += n;
		off += n;
		len -= n;
	}
	pthread_rwlock_unlock(&m->lock);
	return 0;
}

/*
 * memcpy() with non-temporal stores: the bytes go to memory without the destination's
 * lines being read into the cache first.  The caller issues store_fence() before
 * another thread may read them (before the lock is released).
 */
static void copy_around_cache(uint8_t *dst, const uint8_t *src, size_t n)
{
#ifdef __SSE2__
	size_t head = NBDV_MIN(n, (size_t)(-(uintptr_t)dst & 15));

	memcpy(dst, src, head); /* up to the first 16-byte aligned destination */
	dst += head;
	src += head;
	n -= head;
	for (; n >= 64; n -= 64, dst += 64, src += 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)src);
		__m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
		__m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
		__m128i d = _mm_loadu_si128((const __m128i *)(src + 48));

		_mm_stream_si128((__m128i *)dst, a);
		_mm_stream_si128((__m128i *)(dst + 16), b);
		_mm_stream_si128((__m128i *)(dst + 32), c);
		_mm_stream_si128((__m128i *)(dst + 48), d);
	}
#endif
	memcpy(dst, src, n);
}

/* Non-temporal stores are weakly ordered: make them visible before the unlock. */
static void store_fence(void)
{
#ifdef __SSE2__
	_mm_sfence();
#endif
}

static int mem_pwrite(struct nbdv_drv_instance *inst, const void *buf, uint64_t len, uint64_t off,
		      uint32_t flags)
{
	struct mem *m = to_mem(inst);
	const uint8_t *src = buf;
	bool around_cache = len >= STREAM_MIN;
	int r = 0;

	pthread_rwlock_wrlock(&m->lock);
	while (len) {
		uint64_t in = off & (CHUNK_SIZE - 1);
		uint64_t n = NBDV_MIN(len, CHUNK_SIZE - in);
		uint8_t *c = chunk_at(m, off, true);

		if (!c) {
			r = -ENOMEM;
			break;
		}
		if (around_cache)
			copy_around_cache(c + in, src, n);
		else
			memcpy(c + in, src, n);
		src += n;
		off += n;
		len -= n;
	}
	if (around_cache)
		store_fence();
	pthread_rwlock_unlock(&m->lock);
	return r;
}

static int mem_flush(struct nbdv_drv_instance *inst, uint32_t flags)
{
	return 0;
}

/*
 * Zero [off, off+len): whole chunks are released when @may_free (they read as zero),
 * partial chunks are cleared in place.  With !may_free a whole chunk is kept (or
 * created) so that the range stays allocated, as NBD_CMD_FLAG_NO_HOLE asks.
 */
static int mem_clear(struct mem *m, uint64_t len, uint64_t off, bool may_free)
{
	int r = 0;

	pthread_rwlock_wrlock(&m->lock);
	while (len) {
		uint64_t in = off & (CHUNK_SIZE - 1);
		uint64_t n = NBDV_MIN(len, CHUNK_SIZE - in);
		bool whole = in == 0 && (n == CHUNK_SIZE || off + n == m->size);

		if (whole && may_free) {
			chunk_free(m, off);
		} else {
			uint8_t *c = chunk_at(m, off, !may_free);
			if (c)
				memset(c + in, 0, n);
			else if (!may_free)
				r = -ENOMEM;
		}
		if (r)
			break;
		off += n;
		len -= n;
	}
	pthread_rwlock_unlock(&m->lock);
	return r;
}

static int mem_trim(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return mem_clear(to_mem(inst), len, off, true);
}

static int mem_zero(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return mem_clear(to_mem(inst), len, off, flags & NBDV_F_MAY_TRIM);
}

/*
 * Chunks one block status call looks at, at most (64 MiB of populated table).  Calls
 * run on the reactor: a 4 GiB request over a populated table walked a million chunks
 * there, 4-16 ms during which no other connection of that reactor was served.  The
 * reply then covers less than was asked, as the spec allows; the client asks again
 * from where it ends.
 */
#define MAX_SCAN_CHUNKS 16384

static int mem_block_status(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off,
			    uint32_t flags, struct nbdv_extents *ext)
{
	struct mem *m = to_mem(inst);
	uint64_t end = off + len;
	unsigned scanned = 0;
	int r = 0;

	pthread_rwlock_rdlock(&m->lock);
	while (off < end && r == 0 && scanned++ < MAX_SCAN_CHUNKS) {
		uint64_t c = off >> CHUNK_SHIFT;
		uint64_t n;
		uint32_t st;

		if (!m->l1[c >> L2_SHIFT]) {
			/* A missing L2 table is a 1 GiB hole: skip it in one step. */
			n = (((c >> L2_SHIFT) + 1) << (L2_SHIFT + CHUNK_SHIFT)) - off;
			st = NBD_STATE_HOLE | NBD_STATE_ZERO;
		} else {
			n = CHUNK_SIZE - (off & (CHUNK_SIZE - 1));
			st = chunk_at(m, off, false) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;
		}
		n = NBDV_MIN(n, end - off);
		r = nbdv_extents_add(ext, n, st);
		off += n;
	}
	pthread_rwlock_unlock(&m->lock);
	return r < 0 ? r : 0;
}

/*
 * Grow or shrink.  Shrinking frees every chunk and table beyond the new end and clears
 * the tail of the last partial chunk, so that a later grow reads zeroes there.
 */
static int mem_resize(struct nbdv_drv_instance *inst, uint64_t size)
{
	struct mem *m = to_mem(inst);
	uint64_t chunks = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT;
	uint64_t n_l1 = (chunks + CHUNKS_PER_L2 - 1) >> L2_SHIFT;
	int r = 0;

	if (n_l1 > SIZE_MAX / sizeof(*m->l1))
		return -ENOSPC;
	pthread_rwlock_wrlock(&m->lock);
	if (size < m->size) {
		uint64_t tail = size & (CHUNK_SIZE - 1);
		uint8_t *c = tail ? chunk_at(m, size, false) : NULL;

		if (c)
			memset(c + tail, 0, CHUNK_SIZE - tail);
		for (uint64_t i = chunks; i < ((m->size + CHUNK_SIZE - 1) >> CHUNK_SHIFT); i++) {
			if (!m->l1[i >> L2_SHIFT]) { /* a missing table: skip to the next */
				i = (((i >> L2_SHIFT) + 1) << L2_SHIFT) - 1;
				continue;
			}
			chunk_free(m, i << CHUNK_SHIFT);
		}
		for (uint64_t i = n_l1; i < m->n_l1; i++) {
			free(m->l1[i]);
			m->l1[i] = NULL;
		}
	}
	if (n_l1 != m->n_l1) {
		uint8_t ***l1 = realloc(m->l1, (n_l1 ? n_l1 : 1) * sizeof(*l1));

		if (!l1) {
			r = size > m->size ? -ENOSPC : 0; /* a shrink keeps the larger array */
		} else {
			for (uint64_t i = m->n_l1; i < n_l1; i++)
				l1[i] = NULL;
			m->l1 = l1;
			m->n_l1 = n_l1;
		}
	}
	if (r == 0)
		m->size = size;
	pthread_rwlock_unlock(&m->lock);
	return r;
}

static int mem_cache(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return 0;
}

static int mem_probe(const struct nbdv_export_params *p, uint64_t *size, uint32_t *caps)
{
	*size = p->size;
	*caps = mem_caps(NULL);
	return 0;
}

const struct nbdv_driver nbdv_driver_memory = {
    .api_version = NBDV_DRIVER_API_VERSION,
    .name = "memory",
    .description = "sparse RAM disk; contents are lost when the server stops",
    .needs = NBDV_NEEDS_SIZE,
    .create = mem_create,
    .destroy = mem_destroy,
    .caps = mem_caps,
    .get_size = mem_get_size,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .trim = mem_trim,
    .zero = mem_zero,
    .block_status = mem_block_status,
    .cache = mem_cache,
    .probe = mem_probe,
    .resize = mem_resize,
};
