/*
 * nbdvault - driver registry and the wrapper every driver call goes through.
 *
 * The wrapper emulates what a driver lacks (FUA by a flush after the write, zero by
 * writing zeroes, block status as "all data") and refuses calls outside the export,
 * so drivers can trust their inputs.  Protocol-level validation (flags, read-only,
 * NBD error codes) is in transmission.c, which calls these only with checked requests.
 */
#ifndef NBDV_DRIVER_REGISTRY_H
#define NBDV_DRIVER_REGISTRY_H

#include <stdint.h>

#include "nbdvault/compiler.h"
#include "nbdvault/driver.h"

/* The driver table registered under @name, or NULL. */
const struct nbdv_driver *driver_lookup(const char *name);
/* "file, memory": the registered names, for error messages. */
const char *driver_names(void);
/* Registered drivers, for the conformance test; *n receives the count. */
const struct nbdv_driver *const *driver_all(size_t *n);

/* One entry of a collected extent list. */
struct nbdv_extent {
	uint64_t length; /* bytes, nonzero */
	uint32_t flags;	 /* NBD_STATE_* */
};

/* Extent collector; fields are read by transmission.c after block_status(). */
struct nbdv_extents {
	uint64_t start;	       /* offset the query started at */
	uint64_t end;	       /* end of the queried range */
	uint64_t next;	       /* offset where the next added extent begins */
	uint32_t max;	       /* capacity of e[] */
	uint32_t n;	       /* entries used */
	struct nbdv_extent *e; /* entries, contiguous from start */
	bool owned;	       /* e came from the buffer pool (extents_init) */
};

/* Set up a collector for [off, off+len) holding at most @max extents.  Returns 0 or -ENOMEM. */
int extents_init(struct nbdv_extents *ext, uint64_t off, uint64_t len, uint32_t max) NBDV_WUR;
/* Same, with caller-owned storage for @max entries (extents_free then frees nothing). */
void extents_init_in(struct nbdv_extents *ext, uint64_t off, uint64_t len,
		     struct nbdv_extent *storage, uint32_t max);
void extents_free(struct nbdv_extents *ext);

/* An export's driver instance with its cached capabilities and size. */
struct nbdv_dev {
	struct nbdv_drv_instance *inst; /* owned */
	uint32_t caps;			/* NBDV_CAP_*, cached once */
	uint64_t size;			/* bytes, cached once */
};

/*
 * Create an instance of @drv for @p and fill @dev (caps and size cached; a read-only
 * export loses the write capabilities).  Returns 0 or the driver's -errno.
 */
int driver_open(const struct nbdv_driver *drv, const struct nbdv_export_params *p,
		struct nbdv_dev *dev) NBDV_WUR;
/* What driver_open() would give, from @drv's probe() without opening anything;
 * -ENOTSUP if the driver has none. */
int driver_probe(const struct nbdv_driver *drv, const struct nbdv_export_params *p, uint64_t *size,
		 uint32_t *caps) NBDV_WUR;
/* Destroy the instance in @dev. */
void driver_close(struct nbdv_dev *dev);

int driver_pread(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off) NBDV_WUR;
/* Read without blocking if the driver can; -EAGAIN when it cannot or would block. */
int driver_pread_nowait(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off) NBDV_WUR;
int driver_pwrite(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off,
		  uint32_t flags) NBDV_WUR;
int driver_flush(const struct nbdv_dev *d) NBDV_WUR;
int driver_trim(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags) NBDV_WUR;
int driver_zero(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags) NBDV_WUR;
int driver_block_status(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags,
			struct nbdv_extents *ext) NBDV_WUR;
int driver_cache(const struct nbdv_dev *d, uint64_t len, uint64_t off) NBDV_WUR;

#endif /* NBDV_DRIVER_REGISTRY_H */
