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

#include <pthread.h>
#include <stdint.h>

#include "compiler.h"
#include "nbdvault/driver.h"

/* The built-in driver named @name, or NULL. */
const struct nbdv_driver *driver_lookup(const char *name);
/*
 * The driver an export's `driver: NAME` means: a built-in one, else NAME.so in @dir
 * (NULL: the default driver directory), or the file NAME when it contains a '/'.  A
 * shared object is loaded once (dlopen) and kept; its symbol, ABI version and table are
 * checked.  NULL with one line in @err when there is no such driver or it is refused.
 */
const struct nbdv_driver *driver_find(const char *name, const char *dir, char *err, size_t errlen);
/* From now on driver_find() loads nothing new (called once serving: the sandbox is
 * closing, and a reload must not run new code); drivers already loaded stay usable. */
void driver_loading_close(void);
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

/*
 * Whether writes may be tried on the reactor (driver_pwrite_nowait).  Shared by every
 * reactor; relaxed atomics, since a race only costs one more or one fewer inline try.
 */
struct nbdv_stall_gate {
	_Atomic uint64_t closed_until;	/* CLOCK_MONOTONIC ns: no inline writes before this */
	_Atomic uint64_t last_stall;	/* when the last slow inline write ended */
	_Atomic uint64_t backoff;	/* how long the gate closed for last time */
	_Atomic uint64_t reopen_after;	/* quick I/O-thread writes may reopen it from then on */
	_Atomic uint32_t fast_writes;	/* quick I/O-thread writes in a row while closed */
	_Atomic uint64_t stalls;	/* stalls that closed it (for /metrics) */
	_Atomic uint64_t early_reopens; /* times quick I/O-thread writes reopened it */
};

/* What /metrics shows of a gate (all uint64_t: metrics.c picks a field by offset). */
struct nbdv_gate_stats {
	uint64_t open;	 /* 1: writes are tried inline now */
	uint64_t stalls; /* as in struct nbdv_stall_gate */
	uint64_t early_reopens;
};

/*
 * An inline write of @len bytes stalls when it takes longer than NBDV_STALL_NS plus
 * NBDV_STALL_NS_PER_KIB for each KiB: 215 us for 4 KiB, 1.2 ms for 256 KiB, i.e. it
 * went slower than 256 MiB/s once the fixed cost is paid.  The page cache takes a
 * write at several GiB/s; one that lands on a busy inode lock or fresh block
 * allocation may take a few times longer, and only waiting on the disk (dirty
 * throttling, a stuck device) is slower than this.  A flat 200 us limit treated
 * 256 KiB writes that took 0.3-1 ms while the file's blocks were being allocated as
 * stalls and sent a whole nbdcopy write to the I/O threads (10% slower, 20% more CPU).
 * Only a write that waited counts: its thread gave up the CPU at least once (a
 * voluntary context switch: throttling, the disk, a lock).  One that was slow because
 * its thread was preempted (the host's CPUs busy; the storage was not slow) does not:
 * on two busy cores half the stalls of a 4-connection TLS nbdcopy write to a file were
 * such (16 -> 8 per 3 GiB), and plain 4 KiB random writes at depth 32 gained 7%.
 *
 * A stall closes the gate for 10 ms; each further stall soon after the gate reopens
 * (within 4 x the last backoff + 1 s) closes it 4 times longer, up to 30 s.  Storage
 * that always stalls thus costs 6 stalls in the first 3.4 s, then one every 30 s; a
 * stall after a calm period starts again at 10 ms.  A write stuck for longer than
 * NBDV_STALL_STUCK_NS keeps the gate closed at least as long as it took: the next write
 * of a device stuck for seconds does not come back to the reactor 10 ms later.  Dirty-
 * page throttling pauses a writer at most 200 ms (the kernel's MAX_PAUSE), so a longer
 * stall is the device; shorter ones keep the plain backoff, which suits a bulk write
 * through throttling (closing for every stall's length made a 1-connection nbdcopy file
 * write 13-19% slower in two A/Bs, ranges overlapping).  Inline writes caught by the same stall
 * (one per reactor) count once.
 *
 * The I/O threads' writes tell when the storage is quick again: NBDV_REOPEN_WRITES plain
 * writes in a row within the limit reopen the gate early, once it has been closed
 * NBDV_REOPEN_FACTOR times as long as the stall took.  Storage whose stalls come back
 * as soon as it is quick again thus blocks a reactor at most 1/(1 + factor) (2%) of the
 * time, and transient stalls (dirty-page throttling in a burst of writes) no longer
 * keep small writes off the reactor for up to 30 s after the burst.
 */
#define NBDV_STALL_NS	      (200 * 1000ULL)
#define NBDV_STALL_NS_PER_KIB (3815ULL) /* 1 KiB at 256 MiB/s */
#define NBDV_REOPEN_WRITES    64
#define NBDV_REOPEN_FACTOR    50
#define NBDV_STALL_BACKOFF_NS (10 * 1000 * 1000ULL)
#define NBDV_STALL_MAX_NS     (30 * 1000 * 1000 * 1000ULL)
#define NBDV_STALL_STUCK_NS   (250 * 1000 * 1000ULL)

struct nbdv_dev;

/* One asynchronous driver operation: the driver sees io, the server done(). */
struct nbdv_aio {
	struct nbdv_io io;			      /* first: nbdv_io_complete() casts */
	void (*done)(struct nbdv_aio *a, int result); /* any thread, exactly once */
};

/*
 * Start @a on an NBDV_CAP_ASYNC device; a->done() always follows (possibly before
 * this returns, on this thread): the driver's result, or the wrapper's for a request
 * outside the export, a write to a read-only export, or an operation the driver does
 * not implement (advisory ones succeed; block status reports data).
 */
void driver_submit(const struct nbdv_dev *d, struct nbdv_aio *a);

/* An export's driver instance with its cached capabilities and size. */
struct nbdv_dev {
	struct nbdv_drv_instance *inst; /* owned */
	uint32_t caps;			/* NBDV_CAP_*, cached once */
	_Atomic uint64_t size;		/* bytes: one live value, changed only by RESIZE */
	struct nbdv_stall_gate *gate;	/* owned; NULL without drv->pwrite_nowait */
	bool resizable;			/* RESIZE allowed: calls hold resize_lock */
	pthread_rwlock_t resize_lock;	/* shared by calls, exclusive for a resize */
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
/*
 * Resizable exports: every driver call of a request runs between driver_hold() and
 * driver_release() (no-ops for other exports), and driver_resize() waits for the calls
 * in progress, changes the size through the driver and publishes it.  -ENOTSUP when the
 * driver cannot resize.
 */
void driver_hold(const struct nbdv_dev *d);
void driver_release(const struct nbdv_dev *d);
int driver_resize(struct nbdv_dev *d, uint64_t size) NBDV_WUR;

int driver_pread(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off) NBDV_WUR;
/* Read without blocking if the driver can; -EAGAIN when it cannot or would block. */
int driver_pread_nowait(const struct nbdv_dev *d, void *buf, uint64_t len, uint64_t off) NBDV_WUR;
/* Whether the driver can offer descriptors to send READ data from (cached_fd). */
bool driver_sends_from_cache(const struct nbdv_dev *d);
/* A descriptor to sendfile() [off, off+len) from without blocking, or -EAGAIN (see the
 * driver table's cached_fd). */
int driver_cached_fd(const struct nbdv_dev *d, uint64_t len, uint64_t off, bool no_holes) NBDV_WUR;
int driver_pwrite(const struct nbdv_dev *d, const void *buf, uint64_t len, uint64_t off,
		  uint32_t flags) NBDV_WUR;
/*
 * A write (no FUA) on the calling thread if the driver expects it to be quick; -EAGAIN
 * when it cannot or when recent such writes stalled (over driver_stall_limit(): the
 * gate then stays closed for a backoff), else the write's result.
 */
int driver_pwrite_nowait(const struct nbdv_dev *d, const void *buf, uint64_t len,
			 uint64_t off) NBDV_WUR;
/* How long an inline write of @len bytes may take before it counts as a stall (ns). */
uint64_t driver_stall_limit(uint64_t len);
/* The state of @d's stall gate; false when it has none (no inline writes). */
bool driver_gate_stats(const struct nbdv_dev *d, struct nbdv_gate_stats *out);
int driver_flush(const struct nbdv_dev *d) NBDV_WUR;
int driver_trim(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags) NBDV_WUR;
int driver_zero(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags) NBDV_WUR;
int driver_block_status(const struct nbdv_dev *d, uint64_t len, uint64_t off, uint32_t flags,
			struct nbdv_extents *ext) NBDV_WUR;
int driver_cache(const struct nbdv_dev *d, uint64_t len, uint64_t off) NBDV_WUR;

#endif /* NBDV_DRIVER_REGISTRY_H */
