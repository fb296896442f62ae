/*
 * nbdvault - `faulty` driver: a memory disk that fails or stalls on demand, for
 * testing how errors and slow storage reach clients (like nbdkit's error filter).
 *
 * `path` names a control file read before every call.  While it is absent or empty
 * the driver behaves as `memory`.  Its one line says what to do:
 *
 *     EIO | ENOSPC | EPERM | ENOMEM | EINVAL [OFFSET LENGTH]   fail calls touching the range
 *     delay SECONDS [OFFSET LENGTH]                            sleep, then do the call
 *     spin SECONDS [OFFSET LENGTH]                             keep the CPU busy that long
 *                                                              (slow without ever waiting,
 *                                                              like a thread preempted on a
 *                                                              busy host), then do the call
 *
 * Without a range every call is affected (flush too).  The driver says it blocks, so
 * its calls run on the executor's workers: a delayed call stalls only itself.  Writes
 * are first offered inline (pwrite_nowait), like the file driver's: a delayed one then
 * stalls its reactor once and closes the wrapper's stall gate.
 */
#include "build-config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compiler.h"
#include "nbdvault/driver.h"

extern const struct nbdv_driver nbdv_driver_memory;

struct faulty {
	struct nbdv_drv_instance head; /* must be first */
	struct nbdv_drv_instance *mem; /* the storage: a memory instance */
	char *control;		       /* control file path, or NULL */
};

static struct faulty *to_faulty(struct nbdv_drv_instance *inst)
{
	return (struct faulty *)inst;
}

/* Read the control file; returns the -errno to fail with (0: go on) after any delay. */
static int fault(struct faulty *f, uint64_t len, uint64_t off, bool ranged)
{
	static const struct {
		const char *name;
		int err;
	} errs[] = {{"EIO", EIO},
		    {"ENOSPC", ENOSPC},
		    {"EPERM", EPERM},
		    {"ENOMEM", ENOMEM},
		    {"EINVAL", EINVAL}};
	char word[16], line[128];
	unsigned long long roff = 0, rlen = UINT64_MAX;
	double secs = 0;
	bool spin = false;
	FILE *fp;
	int n;

	if (!f->control || !(fp = fopen(f->control, "r")))
		return 0;
	n = fgets(line, sizeof(line), fp) ? 1 : 0;
	fclose(fp);
	if (!n)
		return 0;
	if (sscanf(line, "delay %lf %llu %llu", &secs, &roff, &rlen) >= 1) {
		word[0] = '\0';
	} else if (sscanf(line, "spin %lf %llu %llu", &secs, &roff, &rlen) >= 1) {
		word[0] = '\0';
		spin = true;
	} else if (sscanf(line, "%15s %llu %llu", word, &roff, &rlen) < 1) {
		return 0;
	}
	if (ranged && (off + len <= roff || off >= roff + rlen))
		return 0;
	if (!ranged && rlen != UINT64_MAX)
		return 0; /* a ranged fault does not hit flush */
	if (secs > 0 && spin) {
		struct timespec t0, t;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		do
			clock_gettime(CLOCK_MONOTONIC, &t);
		while ((double)(t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
		return 0;
	}
	if (secs > 0) {
		struct timespec ts = {(time_t)secs, (long)((secs - (time_t)secs) * 1e9)};
		nanosleep(&ts, NULL);
		return 0;
	}
	for (size_t i = 0; i < ARRAY_SIZE(errs); i++) {
		if (strcmp(word, errs[i].name) == 0)
			return -errs[i].err;
	}
	return 0;
}

static int faulty_create(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{
	struct faulty *f = calloc(1, sizeof(*f));
	int r;

	if (!f)
		return -ENOMEM;
	r = nbdv_driver_memory.create(p, &f->mem);
	if (r < 0) {
		free(f);
		return r;
	}
	f->mem->drv = &nbdv_driver_memory;
	if (p->values[0].str && !(f->control = strdup(p->values[0].str))) {
		nbdv_driver_memory.destroy(f->mem);
		free(f);
		return -ENOMEM;
	}
	*out = &f->head;
	return 0;
}

static void faulty_destroy(struct nbdv_drv_instance *inst)
{
	struct faulty *f = to_faulty(inst);

	nbdv_driver_memory.destroy(f->mem);
	free(f->control);
	free(f);
}

static uint32_t faulty_caps(struct nbdv_drv_instance *inst)
{
	return nbdv_driver_memory.caps(to_faulty(inst)->mem) | NBDV_CAP_BLOCKING;
}

static uint64_t faulty_get_size(struct nbdv_drv_instance *inst)
{
	return nbdv_driver_memory.get_size(to_faulty(inst)->mem);
}

static int faulty_resize(struct nbdv_drv_instance *inst, uint64_t size)
{
	return nbdv_driver_memory.resize(to_faulty(inst)->mem, size);
}

#define FAULT_OR(f, len, off, ranged, call)                                                        \
	do {                                                                                       \
		int fr_ = fault(f, len, off, ranged);                                              \
		return fr_ ? fr_ : (call);                                                         \
	} while (0)

static int faulty_pread(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off,
			uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.pread(f->mem, buf, len, off, flags));
}

static int faulty_pwrite(struct nbdv_drv_instance *inst, const void *buf, uint64_t len,
			 uint64_t off, uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.pwrite(f->mem, buf, len, off, flags));
}

/* Quick unless the control file says otherwise: a delay here stalls the caller, which
 * is how tests make inline writes stall. */
static int faulty_pwrite_nowait(struct nbdv_drv_instance *inst, const void *buf, uint64_t len,
				uint64_t off)
{
	return faulty_pwrite(inst, buf, len, off, 0);
}

static int faulty_flush(struct nbdv_drv_instance *inst, uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, 0, 0, false, nbdv_driver_memory.flush(f->mem, flags));
}

static int faulty_trim(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.trim(f->mem, len, off, flags));
}

static int faulty_zero(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.zero(f->mem, len, off, flags));
}

static int faulty_block_status(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off,
			       uint32_t flags, struct nbdv_extents *ext)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.block_status(f->mem, len, off, flags, ext));
}

static int faulty_cache(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	struct faulty *f = to_faulty(inst);
	FAULT_OR(f, len, off, true, nbdv_driver_memory.cache(f->mem, len, off, flags));
}

static int faulty_probe(const struct nbdv_export_params *p, uint64_t *size, uint32_t *caps)
{
	int r = nbdv_driver_memory.probe(p, size, caps);

	*caps |= NBDV_CAP_BLOCKING;
	return r;
}

static const struct nbdv_key faulty_keys[] = {
    {"path", NBDV_KEY_PATH, 0, NULL,
     "control file read before every call: 'EIO [OFFSET LENGTH]' or 'delay SECONDS'"},
    {NULL, 0, 0, NULL, NULL},
};

const struct nbdv_driver nbdv_driver_faulty = {
    .api_version = NBDV_DRIVER_API_VERSION,
    .name = "faulty",
    .description = "memory disk that fails or stalls on demand (testing)",
    .keys = faulty_keys,
    .needs = NBDV_NEEDS_SIZE,
    .create = faulty_create,
    .destroy = faulty_destroy,
    .caps = faulty_caps,
    .get_size = faulty_get_size,
    .pread = faulty_pread,
    .pwrite = faulty_pwrite,
    .flush = faulty_flush,
    .trim = faulty_trim,
    .zero = faulty_zero,
    .block_status = faulty_block_status,
    .cache = faulty_cache,
    .probe = faulty_probe,
    .pwrite_nowait = faulty_pwrite_nowait,
    .resize = faulty_resize,
};
