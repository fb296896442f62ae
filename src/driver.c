/*
 * nbdvault - driver registry, extent collector and the validating/emulating wrapper.
 */
#include "build-config.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "driver_registry.h"
#include "log.h"
#include "protocol.h"

extern const struct nbdv_driver nbdv_driver_file;
extern const struct nbdv_driver nbdv_driver_memory;
extern const struct nbdv_driver nbdv_driver_faulty;

/* Every driver, in one greppable place. */
static const struct nbdv_driver *const drivers[] = {
    &nbdv_driver_file,
    &nbdv_driver_memory,
    &nbdv_driver_faulty,
};

const struct nbdv_driver *driver_lookup(const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(drivers); i++) {
		if (drivers[i]->api_version == NBDV_DRIVER_API_VERSION &&
		    strcmp(drivers[i]->name, name) == 0)
			return drivers[i];
	}
	return NULL;
}

const char *driver_names(void)
{
	static char names[128];

	/* Built from drivers[] so the list in error messages cannot drift from it. */
	if (!names[0]) {
		for (size_t i = 0; i < ARRAY_SIZE(drivers); i++)
			snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s",
				 i ? ", " : "", drivers[i]->name);
	}
	return names;
}

const struct nbdv_driver *const *driver_all(size_t *n)
{
	*n = ARRAY_SIZE(drivers);
	return drivers;
}

int extents_init(struct nbdv_extents *ext, uint64_t off, uint64_t len, uint32_t max)
{
	ext->start = off;
	ext->next = off;
	ext->end = off + len;
	ext->max = max ? max : 1;
	ext->n = 0;
	ext->e = nbdv_buf_alloc(ext->max * sizeof(*ext->e)); /* pooled: no malloc per request */
	ext->owned = true;
	return ext->e ? 0 : -ENOMEM;
}

void extents_init_in(struct nbdv_extents *ext, uint64_t off, uint64_t len,
		     struct nbdv_extent *storage, uint32_t max)
{
	ext->start = off;
	ext->next = off;
	ext->end = off + len;
	ext->max = max;
	ext->n = 0;
	ext->e = storage;
	ext->owned = false;
}

void extents_free(struct nbdv_extents *ext)
{
	if (ext->owned)
		nbdv_buf_free(ext->e);
	ext->e = NULL;
	ext->owned = false;
}

int nbdv_extents_add(struct nbdv_extents *ext, uint64_t length, uint32_t flags)
{
	if (ext->next >= ext->end)
		return 1;
	if (length > ext->end - ext->next)
		length = ext->end - ext->next;
	if (length == 0)
		return 0;
	if (ext->n && ext->e[ext->n - 1].flags == flags) {
		ext->e[ext->n - 1].length += length;
	} else {
		if (ext->n == ext->max)
			return 1;
		ext->e[ext->n].length = length;
		ext->e[ext->n].flags = flags;
		ext->n++;
	}
	ext->next += length;
	return ext->next >= ext->end ? 1 : 0;
}

/* Capabilities a read-only export never has. */
#define WRITE_CAPS (NBDV_CAP_WRITE | NBDV_CAP_TRIM | NBDV_CAP_ZERO | NBDV_CAP_FAST_ZERO)

int driver_probe(const struct nbdv_driver *drv, const struct nbdv_export_params *p, uint64_t *size,
		 uint32_t *caps)
{
	int r;

	if (!drv->probe)
		return -ENOTSUP;
	r = drv->probe(p, size, caps);
	if (r == 0 && p->readonly)
		*caps &= ~WRITE_CAPS;
	return r;
}

int driver_open(const struct nbdv_driver *drv, const struct nbdv_export_params *p,
		struct nbdv_dev *dev)
{
	int r = drv->create(p, &dev->inst);

	if (r < 0)
		return r;
	dev->inst->drv = drv;
	dev->caps = drv->caps(dev->inst);
	if (p->readonly)
		dev->caps &= ~WRITE_CAPS;
	dev->size = drv->get_size(dev->inst);
	dev->gate = NULL;
	/* Writers first: a resize waiting for calls in progress holds back new ones. */
	dev->resizable = p->resizable && drv->resize && !p->readonly;
	if (dev->resizable) {
		pthread_rwlockattr_t a;
		pthread_rwlockattr_init(&a);
		pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&dev->resize_lock, &a);
		pthread_rwlockattr_destroy(&a);
	}
	if (drv->pwrite_nowait && (dev->caps & NBDV_CAP_WRITE)) {
		dev->gate = calloc(1, sizeof(*dev->gate));
		if (!dev->gate) {
			drv->destroy(dev->inst);
			dev->inst = NULL;
			return -ENOMEM;
		}
	}
	return 0;
}

void driver_hold(const struct nbdv_dev *d)
{
	if (d->resizable)
		pthread_rwlock_rdlock((pthread_rwlock_t *)&d->resize_lock);
}

void driver_release(const struct nbdv_dev *d)
{
	if (d->resizable)
		pthread_rwlock_unlock((pthread_rwlock_t *)&d->resize_lock);
}

int driver_resize(struct nbdv_dev *d, uint64_t size)
{
	int r;

	if (!d->resizable || !d->inst->drv->resize)
		return -ENOTSUP;
	pthread_rwlock_wrlock(&d->resize_lock);
	r = d->inst->drv->resize(d->inst, size);
	if (r == 0)
		d->size = d->inst->drv->get_size(d->inst);
	pthread_rwlock_unlock(&d->resize_lock);
	return r;
}

void driver_close(struct nbdv_dev *dev)
{
	if (dev->resizable)
		pthread_rwlock_destroy(&dev->resize_lock);
	dev->inst->drv->destroy(dev->inst);
	dev->inst = NULL;
	free(dev->gate);
	dev->gate = NULL;
}

static bool in_range(const struct nbdv_dev *d, uint64_t len, uint64_t off)
{
	return off <= d->size && len <= d->size - off;
}

int driver_pread(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off)
{
	if (!in_range(d, len, off))
		return -EINVAL;
	return d->inst->drv->pread(d->inst, buf, len, off, 0);
}

int driver_pread_nowait(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off)
{
	if (!in_range(d, len, off))
		return -EINVAL;
	if (!d->inst->drv->pread_nowait)
		return -EAGAIN;
	return d->inst->drv->pread_nowait(d->inst, buf, len, off);
}

bool driver_sends_from_cache(const struct nbdv_dev *d)
{
	return d->inst->drv->cached_fd != NULL;
}

int driver_cached_fd(const struct nbdv_dev *d, uint64_t len, uint64_t off, bool no_holes)
{
	if (!in_range(d, len, off))
		return -EINVAL;
	if (!d->inst->drv->cached_fd)
		return -EAGAIN;
	return d->inst->drv->cached_fd(d->inst, len, off, no_holes);
}

/* FUA for drivers without native support: the write, then a flush. */
static int emulate_fua(const struct nbdv_dev *d, int r, uint32_t flags)
{
	if (r == 0 && (flags & NBDV_F_FUA) && !(d->caps & NBDV_CAP_FUA))
		r = driver_flush(d);
	return r;
}

static uint32_t native_flags(const struct nbdv_dev *d, uint32_t flags)
{
	return (d->caps & NBDV_CAP_FUA) ? flags : flags & ~NBDV_F_FUA;
}

uint64_t driver_stall_limit(uint64_t len)
{
	return NBDV_STALL_NS + (len >> 10) * NBDV_STALL_NS_PER_KIB;
}

#define RELAXED memory_order_relaxed

/*
 * A write on the I/O threads while the gate is closed: one that was quick (and started
 * after the last stall ended) is evidence that inline writes would be quick again.
 * NBDV_REOPEN_WRITES of them in a row reopen the gate, but never before the closed
 * period has lasted NBDV_REOPEN_FACTOR times the stall that closed it.
 */
static void gate_evidence(struct nbdv_stall_gate *g, uint64_t t0, uint64_t t1, uint64_t len)
{
	if (t1 - t0 > driver_stall_limit(len) ||
	    t0 < atomic_load_explicit(&g->last_stall, RELAXED)) {
		atomic_store_explicit(&g->fast_writes, 0, RELAXED);
		return;
	}
	if (atomic_fetch_add_explicit(&g->fast_writes, 1, RELAXED) + 1 < NBDV_REOPEN_WRITES ||
	    t1 < atomic_load_explicit(&g->reopen_after, RELAXED))
		return;
	if (t1 < atomic_exchange_explicit(&g->closed_until, 0, RELAXED))
		log_debug("%u writes on the I/O threads were quick: writes run inline again",
			  NBDV_REOPEN_WRITES);
	atomic_store_explicit(&g->fast_writes, 0, RELAXED);
}

int driver_pwrite(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off,
		  uint32_t flags)
{
	struct nbdv_stall_gate *g = d->gate;
	uint64_t t0 = 0;
	int r;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	/* Only plain writes say how quick an inline one would be (FUA waits for the disk). */
	if (g && !flags) {
		t0 = nbdv_now_ns();
		if (t0 >= atomic_load_explicit(&g->closed_until, RELAXED))
			t0 = 0; /* gate open: nothing to learn */
	}
	r = emulate_fua(d, d->inst->drv->pwrite(d->inst, buf, len, off, native_flags(d, flags)),
			flags);
	if (t0 && r == 0)
		gate_evidence(g, t0, nbdv_now_ns(), len);
	return r;
}

/*
 * An inline write that started at @t0 took until @now: close the gate for a while.
 * Writes that overlapped the last stall (two reactors caught by the same stall) count
 * once: they extend the minimum closed time but do not grow the backoff.
 */
static void gate_stall(struct nbdv_stall_gate *g, uint64_t t0, uint64_t now)
{
	uint64_t last = atomic_load_explicit(&g->last_stall, RELAXED);
	uint64_t b = atomic_load_explicit(&g->backoff, RELAXED);
	uint64_t took = now - t0, reopen = now + NBDV_REOPEN_FACTOR * took;

	atomic_store_explicit(&g->fast_writes, 0, RELAXED);
	if (b && t0 < last) {
		if (reopen > atomic_load_explicit(&g->reopen_after, RELAXED))
			atomic_store_explicit(&g->reopen_after, reopen, RELAXED);
		return;
	}
	if (!b || now - last > 4 * b + 1000000000ULL)
		b = NBDV_STALL_BACKOFF_NS;
	else if ((b *= 4) > NBDV_STALL_MAX_NS)
		b = NBDV_STALL_MAX_NS;
	atomic_store_explicit(&g->backoff, b, RELAXED);
	atomic_store_explicit(&g->last_stall, now, RELAXED);
	atomic_store_explicit(&g->reopen_after, reopen, RELAXED);
	atomic_store_explicit(&g->closed_until, now + b, RELAXED);
	log_debug("an inline write took %llu us: writes go to the I/O threads for up to %llu ms",
		  (unsigned long long)(took / 1000), (unsigned long long)(b / 1000000));
}

int driver_pwrite_nowait(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off)
{
	struct nbdv_stall_gate *g = d->gate;
	uint64_t t0, t1;
	int r;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	if (!g)
		return -EAGAIN;
	t0 = nbdv_now_ns();
	if (t0 < atomic_load_explicit(&g->closed_until, RELAXED))
		return -EAGAIN;
	r = d->inst->drv->pwrite_nowait(d->inst, buf, len, off);
	t1 = nbdv_now_ns();
	if (t1 - t0 > driver_stall_limit(len))
		gate_stall(g, t0, t1);
	return r;
}

int driver_flush(const struct nbdv_dev *d)
{
	if (!(d->caps & NBDV_CAP_FLUSH))
		return 0;
	return d->inst->drv->flush(d->inst, 0);
}

int driver_trim(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags)
{
	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	/* Trim is advisory: without driver support it is a successful no-op. */
	if (!(d->caps & NBDV_CAP_TRIM))
		return emulate_fua(d, 0, flags);
	return emulate_fua(d, d->inst->drv->trim(d->inst, len, off, native_flags(d, flags)), flags);
}

static const char zero_block[64 * 1024];

int driver_zero(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags)
{
	int r = 0;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	if (d->caps & NBDV_CAP_ZERO)
		return emulate_fua(d, d->inst->drv->zero(d->inst, len, off, native_flags(d, flags)),
				   flags);
	if (flags & NBDV_F_FAST)
		return -ENOTSUP;
	while (len && r == 0) {
		uint64_t n = NBDV_MIN(len, (uint64_t)sizeof(zero_block));
		r = d->inst->drv->pwrite(d->inst, zero_block, n, off, 0);
		off += n;
		len -= n;
	}
	return emulate_fua(d, r, flags);
}

int driver_block_status(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags,
			struct nbdv_extents *ext)
{
	int r;

	if (!in_range(d, len, off))
		return -EINVAL;
	if (!(d->caps & NBDV_CAP_EXTENTS))
		return nbdv_extents_add(ext, len, 0) < 0 ? -ENOMEM : 0;
	r = d->inst->drv->block_status(d->inst, len, off, flags, ext);
	if (r < 0)
		return r;
	/* A driver must describe at least the first byte; guard against one that does not. */
	if (ext->n == 0)
		return nbdv_extents_add(ext, len, 0) < 0 ? -ENOMEM : 0;
	return 0;
}

int driver_cache(const struct nbdv_dev *d, uint64_t len, uint64_t off)
{
	if (!in_range(d, len, off))
		return -EINVAL;
	if (!(d->caps & NBDV_CAP_CACHE))
		return 0;
	return d->inst->drv->cache(d->inst, len, off, 0);
}
