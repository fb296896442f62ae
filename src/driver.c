/*
 * nbdvault - driver registry, extent collector and the validating/emulating wrapper.
 */
#include "build-config.h"

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

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
		if (strcmp(drivers[i]->name, name) == 0)
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

/* Drivers loaded from shared objects; never unloaded (instances and reloads use them). */
struct loaded_driver {
	char *file;		       /* the path it was loaded from */
	const struct nbdv_driver *drv; /* its table */
	struct loaded_driver *next;
};

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static struct loaded_driver *loaded;
static bool loading_closed;

void driver_loading_close(void)
{
	pthread_mutex_lock(&load_lock);
	loading_closed = true;
	pthread_mutex_unlock(&load_lock);
}

/* A table that would crash the server is refused like a bad version. */
static const char *table_problem(const struct nbdv_driver *drv)
{
	if (!drv->name || !drv->name[0] || !drv->description)
		return "no name or description";
	if (!drv->create || !drv->destroy || !drv->caps || !drv->get_size)
		return "create, destroy, caps and get_size are required";
	for (const struct nbdv_key *k = drv->keys; k && k->name; k++) {
		if (k->type < NBDV_KEY_STRING || k->type > NBDV_KEY_FILE)
			return "a key has an unknown type";
		if (!k->help)
			return "a key has no help line";
	}
	return NULL;
}

static bool plain_name(const char *name)
{
	if (!name[0] || name[0] == '.')
		return false;
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("-_.", *p))
			return false;
	return true;
}

const struct nbdv_driver *driver_find(const char *name, const char *dir, char *err, size_t errlen)
{
	const struct nbdv_driver *drv = driver_lookup(name), *found = NULL;
	struct loaded_driver *l;
	char file[4096];
	const char *why;
	void *h;

	if (drv)
		return drv;
	if (strchr(name, '/')) {
		snprintf(file, sizeof(file), "%s", name);
	} else if (!plain_name(name)) {
		snprintf(err, errlen, "unknown driver '%.64s' (built in: %s)", name,
			 driver_names());
		return NULL;
	} else {
		snprintf(file, sizeof(file), "%s/%s.so", dir ? dir : NBDV_DRIVER_DIR, name);
	}
	pthread_mutex_lock(&load_lock);
	for (l = loaded; l; l = l->next)
		if (strcmp(l->file, file) == 0)
			break;
	if (l) {
		found = l->drv;
		goto out;
	}
	if (loading_closed) {
		snprintf(err, errlen, "driver %s was not loaded at start: needs a restart", file);
		goto out;
	}
	if (access(file, F_OK) != 0 && strchr(name, '/')) {
		snprintf(err, errlen, "cannot load driver %s: %s", file, strerror(errno));
		goto out;
	}
	if (access(file, F_OK) != 0) {
		snprintf(err, errlen, "no driver '%.64s': not built in (%s), and %s: %s", name,
			 driver_names(), file, strerror(errno));
		goto out;
	}
	h = dlopen(file, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(err, errlen, "cannot load driver %s: %s", file, dlerror());
		goto out;
	}
	drv = dlsym(h, NBDV_DRIVER_SYMBOL);
	if (!drv) {
		snprintf(err, errlen, "driver %s has no symbol %s: not an nbdvault driver", file,
			 NBDV_DRIVER_SYMBOL);
	} else if (drv->api_version != NBDV_DRIVER_API_VERSION) {
		snprintf(err, errlen,
			 "driver %s has ABI version %d, this nbdvault needs version %d: rebuild "
			 "it against this nbdvault's driver.h",
			 file, drv->api_version, NBDV_DRIVER_API_VERSION);
	} else if ((why = table_problem(drv))) {
		snprintf(err, errlen, "driver %s: invalid table: %s", file, why);
	} else if ((l = calloc(1, sizeof(*l))) && (l->file = strdup(file))) {
		l->drv = drv;
		l->next = loaded;
		loaded = l;
		found = drv;
		log_debug("driver %s loaded from %s (%s)", drv->name, file, drv->description);
		goto out;
	} else {
		free(l);
		snprintf(err, errlen, "driver %s: out of memory", file);
	}
	dlclose(h);
out:
	pthread_mutex_unlock(&load_lock);
	return found;
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
	if ((dev->caps & NBDV_CAP_ASYNC) &&
	    (!drv->submit || (dev->caps & NBDV_CAP_BLOCKING) ||
	     ((dev->caps & NBDV_CAP_WRITE) &&
	      (dev->caps & (NBDV_CAP_FUA | NBDV_CAP_ZERO)) != (NBDV_CAP_FUA | NBDV_CAP_ZERO)))) {
		/* The contract in driver.h: nothing is emulated for asynchronous drivers. */
		log_err("driver %s: an asynchronous driver needs submit(), is not also blocking, "
			"and when writable has native FUA and zero",
			drv->name);
		drv->destroy(dev->inst);
		dev->inst = NULL;
		return -EINVAL;
	}
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

void nbdv_io_complete(struct nbdv_io *io, int result)
{
	struct nbdv_aio *a = (struct nbdv_aio *)io;

	/* A driver must describe at least the first byte; guard against one that does not. */
	if (result == 0 && io->op == NBDV_OP_BLOCK_STATUS && io->extents->n == 0 &&
	    nbdv_extents_add(io->extents, io->length, 0) < 0)
		result = -ENOMEM;
	a->done(a, result);
}

void driver_submit(const struct nbdv_dev *d, struct nbdv_aio *a)
{
	struct nbdv_io *io = &a->io;
	uint32_t need = 0;
	int r;

	if (io->op != NBDV_OP_FLUSH && !in_range(d, io->length, io->offset)) {
		a->done(a, -EINVAL);
		return;
	}
	switch (io->op) {
	case NBDV_OP_WRITE:
	case NBDV_OP_ZERO:
		if (!(d->caps & NBDV_CAP_WRITE)) {
			a->done(a, -EINVAL);
			return;
		}
		break;
	case NBDV_OP_TRIM:
		if (!(d->caps & NBDV_CAP_WRITE)) {
			a->done(a, -EINVAL);
			return;
		}
		need = NBDV_CAP_TRIM;
		break;
	case NBDV_OP_FLUSH:
		need = NBDV_CAP_FLUSH;
		break;
	case NBDV_OP_CACHE:
		need = NBDV_CAP_CACHE;
		break;
	case NBDV_OP_BLOCK_STATUS:
		need = NBDV_CAP_EXTENTS;
		break;
	}
	if (need && !(d->caps & need)) {
		/* Advisory or describable without the driver: answered here. */
		r = 0;
		if (io->op == NBDV_OP_BLOCK_STATUS &&
		    nbdv_extents_add(io->extents, io->length, 0) < 0)
			r = -ENOMEM;
		a->done(a, r);
		return;
	}
	r = d->inst->drv->submit(d->inst, io);
	if (r < 0)
		a->done(a, r);
}

/* One asynchronous operation waited for: the blocking wrappers below on async drivers. */
struct sync_call {
	struct nbdv_aio aio;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool finished;
	int result;
};

static void sync_done(struct nbdv_aio *a, int result)
{
	struct sync_call *sc = (struct sync_call *)a;

	pthread_mutex_lock(&sc->lock);
	sc->result = result;
	sc->finished = true;
	pthread_cond_signal(&sc->cond);
	pthread_mutex_unlock(&sc->lock);
}

static int call_async(const struct nbdv_dev *d, int op, void *buf, uint64_t len, uint64_t off,
		      uint32_t flags, struct nbdv_extents *ext)
{
	struct sync_call sc = {
	    .aio = {.io = {.op = op,
			   .flags = flags,
			   .offset = off,
			   .length = len,
			   .buf = buf,
			   .extents = ext},
		    .done = sync_done},
	};
	int r;

	pthread_mutex_init(&sc.lock, NULL);
	pthread_cond_init(&sc.cond, NULL);
	driver_submit(d, &sc.aio);
	pthread_mutex_lock(&sc.lock);
	while (!sc.finished)
		pthread_cond_wait(&sc.cond, &sc.lock);
	r = sc.result;
	pthread_mutex_unlock(&sc.lock);
	pthread_cond_destroy(&sc.cond);
	pthread_mutex_destroy(&sc.lock);
	return r;
}

#define ASYNC(d) ((d)->caps & NBDV_CAP_ASYNC)

static int drv_pread(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off)
{
	if (ASYNC(d))
		return call_async(d, NBDV_OP_READ, buf, len, off, 0, NULL);
	return d->inst->drv->pread(d->inst, buf, len, off, 0);
}

static int drv_pwrite(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off,
		      uint32_t flags)
{
	if (ASYNC(d))
		return call_async(d, NBDV_OP_WRITE, (void *)buf, len, off, flags, NULL);
	return d->inst->drv->pwrite(d->inst, buf, len, off, flags);
}

int driver_pread(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off)
{
	if (!in_range(d, len, off))
		return -EINVAL;
	return drv_pread(d, buf, len, off);
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

/* How often the calling thread has given up its CPU to wait (voluntary context
 * switches), or -1 where getrusage() cannot say. */
static long thread_waits(void)
{
	struct rusage ru;

	return getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nvcsw : -1;
}

/* Whether a write that began when thread_waits() said @before had to wait: a slow
 * write that never did was preempted, which says nothing about the storage. */
static bool waited_since(long before)
{
	return before < 0 || thread_waits() != before;
}

/*
 * A write on the I/O threads while the gate is closed: one that was quick (and started
 * after the last stall ended) is evidence that inline writes would be quick again.
 * NBDV_REOPEN_WRITES of them in a row reopen the gate, but never before the closed
 * period has lasted NBDV_REOPEN_FACTOR times the stall that closed it.
 */
static void gate_evidence(struct nbdv_stall_gate *g, uint64_t t0, uint64_t t1, uint64_t len,
			  long waits)
{
	if ((t1 - t0 > driver_stall_limit(len) && waited_since(waits)) ||
	    t0 < atomic_load_explicit(&g->last_stall, RELAXED)) {
		atomic_store_explicit(&g->fast_writes, 0, RELAXED);
		return;
	}
	if (atomic_fetch_add_explicit(&g->fast_writes, 1, RELAXED) + 1 < NBDV_REOPEN_WRITES ||
	    t1 < atomic_load_explicit(&g->reopen_after, RELAXED))
		return;
	if (t1 < atomic_exchange_explicit(&g->closed_until, 0, RELAXED)) {
		atomic_fetch_add_explicit(&g->early_reopens, 1, RELAXED);
		log_debug("%u writes on the I/O threads were quick: writes run inline again",
			  NBDV_REOPEN_WRITES);
	}
	atomic_store_explicit(&g->fast_writes, 0, RELAXED);
}

int driver_pwrite(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off,
		  uint32_t flags)
{
	struct nbdv_stall_gate *g = d->gate;
	uint64_t t0 = 0;
	long waits = -1;
	int r;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	/* Only plain writes say how quick an inline one would be (FUA waits for the disk). */
	if (g && !flags) {
		t0 = nbdv_now_ns();
		if (t0 >= atomic_load_explicit(&g->closed_until, RELAXED))
			t0 = 0; /* gate open: nothing to learn */
		else
			waits = thread_waits();
	}
	r = emulate_fua(d, drv_pwrite(d, buf, len, off, native_flags(d, flags)), flags);
	if (t0 && r == 0)
		gate_evidence(g, t0, nbdv_now_ns(), len, waits);
	return r;
}

/*
 * An inline write that started at @t0 took until @now: close the gate for a while; after
 * a stuck write (over NBDV_STALL_STUCK_NS) never for less than it took, so that the
 * reactor spends at most half its time stuck even before the backoff has grown.  Writes
 * that overlapped the last stall (two reactors caught by the same stall) count once:
 * they extend the minimum closed time but do not grow the backoff.
 */
static void gate_stall(struct nbdv_stall_gate *g, uint64_t t0, uint64_t now)
{
	uint64_t last = atomic_load_explicit(&g->last_stall, RELAXED);
	uint64_t b = atomic_load_explicit(&g->backoff, RELAXED);
	uint64_t took = now - t0, reopen = now + NBDV_REOPEN_FACTOR * took, closed;

	atomic_store_explicit(&g->fast_writes, 0, RELAXED);
	if (b && t0 < last) {
		if (reopen > atomic_load_explicit(&g->reopen_after, RELAXED))
			atomic_store_explicit(&g->reopen_after, reopen, RELAXED);
		if (took > NBDV_STALL_STUCK_NS &&
		    now + took > atomic_load_explicit(&g->closed_until, RELAXED))
			atomic_store_explicit(&g->closed_until, now + took, RELAXED);
		return;
	}
	if (!b || now - last > 4 * b + 1000000000ULL)
		b = NBDV_STALL_BACKOFF_NS;
	else if ((b *= 4) > NBDV_STALL_MAX_NS)
		b = NBDV_STALL_MAX_NS;
	closed = took > NBDV_STALL_STUCK_NS ? NBDV_MAX(b, took) : b;
	atomic_store_explicit(&g->backoff, b, RELAXED);
	atomic_store_explicit(&g->last_stall, now, RELAXED);
	atomic_store_explicit(&g->reopen_after, reopen, RELAXED);
	atomic_store_explicit(&g->closed_until, now + closed, RELAXED);
	atomic_fetch_add_explicit(&g->stalls, 1, RELAXED);
	log_debug("an inline write took %llu us: writes go to the I/O threads for up to %llu ms",
		  (unsigned long long)(took / 1000), (unsigned long long)(closed / 1000000));
}

bool driver_gate_stats(const struct nbdv_dev *d, struct nbdv_gate_stats *out)
{
	const struct nbdv_stall_gate *g = d->gate;

	if (!g)
		return false;
	out->open = nbdv_now_ns() >= atomic_load_explicit(&g->closed_until, RELAXED);
	out->stalls = atomic_load_explicit(&g->stalls, RELAXED);
	out->early_reopens = atomic_load_explicit(&g->early_reopens, RELAXED);
	return true;
}

int driver_pwrite_nowait(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off)
{
	struct nbdv_stall_gate *g = d->gate;
	uint64_t t0, t1;
	long waits;
	int r;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	if (!g)
		return -EAGAIN;
	t0 = nbdv_now_ns();
	if (t0 < atomic_load_explicit(&g->closed_until, RELAXED))
		return -EAGAIN;
	waits = thread_waits();
	r = d->inst->drv->pwrite_nowait(d->inst, buf, len, off);
	t1 = nbdv_now_ns();
	if (t1 - t0 > driver_stall_limit(len) && waited_since(waits))
		gate_stall(g, t0, t1);
	return r;
}

int driver_flush(const struct nbdv_dev *d)
{
	if (!(d->caps & NBDV_CAP_FLUSH))
		return 0;
	if (ASYNC(d))
		return call_async(d, NBDV_OP_FLUSH, NULL, 0, 0, 0, NULL);
	return d->inst->drv->flush(d->inst, 0);
}

int driver_trim(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags)
{
	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	/* Trim is advisory: without driver support it is a successful no-op. */
	if (!(d->caps & NBDV_CAP_TRIM))
		return emulate_fua(d, 0, flags);
	if (ASYNC(d))
		return call_async(d, NBDV_OP_TRIM, NULL, len, off, flags, NULL);
	return emulate_fua(d, d->inst->drv->trim(d->inst, len, off, native_flags(d, flags)), flags);
}

static const char zero_block[64 * 1024];

int driver_zero(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags)
{
	int r = 0;

	if (!in_range(d, len, off) || !(d->caps & NBDV_CAP_WRITE))
		return -EINVAL;
	if (ASYNC(d))
		return call_async(d, NBDV_OP_ZERO, NULL, len, off, flags, NULL);
	if (d->caps & NBDV_CAP_ZERO)
		return emulate_fua(d, d->inst->drv->zero(d->inst, len, off, native_flags(d, flags)),
				   flags);
	if (flags & NBDV_F_FAST)
		return -ENOTSUP;
	while (len && r == 0) {
		uint64_t n = NBDV_MIN(len, (uint64_t)sizeof(zero_block));
		r = drv_pwrite(d, zero_block, n, off, 0);
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
	if (ASYNC(d))
		return call_async(d, NBDV_OP_BLOCK_STATUS, NULL, len, off, flags, ext);
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
	if (ASYNC(d))
		return call_async(d, NBDV_OP_CACHE, NULL, len, off, 0, NULL);
	return d->inst->drv->cache(d->inst, len, off, 0);
}
