/*
 * nbdvault - the storage driver ABI.
 *
 * This is the one interface between the protocol code and storage, and the only
 * header an out-of-tree driver includes.  A driver is a `const struct nbdv_driver`:
 * built in (src/drivers/), or built as a shared object that exports it under the
 * symbol NBDV_DRIVER_SYMBOL ("nbdvault_driver") and is loaded when an export names it.
 * Each export gets one instance from create().  An instance is a
 * `struct nbdv_drv_instance` followed by the driver's private fields (put the struct
 * first and cast, SQLite-VFS style).  docs/drivers.md is the guide.
 *
 * Contract (every driver must keep it; tests/unit/test-driver-conformance.c checks it):
 *  - All calls return 0 on success or a negative errno.  Transmission maps errno to
 *    the NBD error set (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP).
 *  - I/O is all-or-error: pread fills the whole buffer or fails; there are no short
 *    reads or writes.  Reading a hole or a trimmed range returns zeroes.
 *  - Inputs are trusted: the server has already checked that offset+length lies
 *    inside the export, that the export is writable for writes, and that flags are
 *    ones this driver's capabilities allow.  Lengths fit in 64 bits so that extended
 *    headers need no new calls.  Config values were checked against `keys`.
 *  - Threading, one of three modes chosen by caps():
 *      inline (neither bit): calls run on a reactor thread and must never block;
 *      NBDV_CAP_BLOCKING: calls run on the executor's I/O threads and may block;
 *      NBDV_CAP_ASYNC: submit() starts an operation and returns at once; the driver
 *        later calls nbdv_io_complete() exactly once, from any thread.
 *    In every mode one instance sees concurrent calls and must be thread-safe.
 *  - probe() (optional) must not change anything: INFO is answered from it.
 *  - destroy() is only called on an instance create() returned; create() must undo
 *    its own partial work before it fails.
 *  - flush() must make every write that has completed before it was called durable.
 *    A write with NBDV_F_FUA is durable when it returns (or completes).
 */
#ifndef NBDV_DRIVER_H
#define NBDV_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * The ABI version.  The first member of struct nbdv_driver is always api_version, so
 * that a server can read it from a driver of any version; a loaded driver whose version
 * differs from the server's is refused with both numbers.
 */
#define NBDV_DRIVER_API_VERSION 2

/* The symbol a loadable driver exports: `const struct nbdv_driver nbdvault_driver`. */
#define NBDV_DRIVER_SYMBOL "nbdvault_driver"

/* Capability bits returned by caps(). */
#define NBDV_CAP_WRITE	    (1U << 0)  /* pwrite works (not a read-only medium) */
#define NBDV_CAP_FLUSH	    (1U << 1)  /* flush() makes data durable */
#define NBDV_CAP_FUA	    (1U << 2)  /* native FUA; otherwise the wrapper flushes after */
#define NBDV_CAP_TRIM	    (1U << 3)  /* trim() implemented */
#define NBDV_CAP_ZERO	    (1U << 4)  /* zero() implemented; otherwise the wrapper writes zeroes */
#define NBDV_CAP_FAST_ZERO  (1U << 5)  /* zero() honours NBDV_F_FAST by failing with -ENOTSUP */
#define NBDV_CAP_EXTENTS    (1U << 6)  /* block_status() implemented */
#define NBDV_CAP_CACHE	    (1U << 7)  /* cache() implemented */
#define NBDV_CAP_MULTI_CONN (1U << 8)  /* flush is visible across connections */
#define NBDV_CAP_BLOCKING   (1U << 9)  /* calls may block: run them on the I/O thread pool */
#define NBDV_CAP_ASYNC	    (1U << 10) /* submit() + nbdv_io_complete(), see below */

/* What a driver needs from the sandbox beyond its PATH keys (struct nbdv_driver.needs). */
#define NBDV_NEEDS_SIZE	   (1U << 0) /* `size:` is required in the export */
#define NBDV_NEEDS_NETWORK (1U << 1) /* opens TCP sockets after start (network storage) */

/* Extent flags for nbdv_extents_add() (the NBD protocol's base:allocation bits). */
#define NBDV_STATE_HOLE (1U << 0) /* not allocated */
#define NBDV_STATE_ZERO (1U << 1) /* reads as zeroes */

/* Call flags. */
#define NBDV_F_FUA	(1U << 0) /* pwrite/trim/zero: durable on return */
#define NBDV_F_MAY_TRIM (1U << 1) /* zero: may deallocate (no NBD_CMD_FLAG_NO_HOLE) */
#define NBDV_F_FAST	(1U << 2) /* zero: fail with -ENOTSUP rather than write zeroes slowly */
#define NBDV_F_REQ_ONE	(1U << 3) /* block_status: one extent is enough */

/*
 * A configuration key a driver accepts in its exports, beside the keys every export
 * has (name, driver, size, readonly, ...).  The server validates each export against
 * the driver's table (unknown key, wrong type, missing required key: file:line:col
 * errors) and hands create() one typed value per key.
 */
enum nbdv_key_type {
	NBDV_KEY_STRING = 1, /* any string */
	NBDV_KEY_PATH,	     /* the export's storage file: the sandbox allows its directory,
			      * read-write (read-only for a read-only export) */
	NBDV_KEY_BOOL,	     /* true/false (yes/no, on/off) */
	NBDV_KEY_UINT,	     /* decimal integer */
	NBDV_KEY_SIZE,	     /* byte count, with optional K/M/G/T/P suffix (binary) */
	NBDV_KEY_FILE,	     /* a file the driver only reads (configuration, key): the
			      * sandbox allows reading its directory */
};

struct nbdv_key {
	const char *name;	   /* NULL ends the table */
	int type;		   /* enum nbdv_key_type */
	int required;		   /* nonzero: an export must give it */
	const char *default_value; /* as it would be written in YAML, or NULL */
	const char *help;	   /* one line, for `nbdvault --driver-help NAME` */
};

/* The value of one key for one export; values[i] belongs to keys[i]. */
struct nbdv_value {
	bool set;	 /* given in the config, or defaulted */
	bool given;	 /* given in the config */
	const char *str; /* the text (STRING and PATH: the value); NULL when !set */
	uint64_t num;	 /* UINT and SIZE */
	bool flag;	 /* BOOL */
};

/* Per-export settings handed to create().  Strings live as long as the config snapshot. */
struct nbdv_export_params {
	const char *name;		 /* export name */
	const struct nbdv_value *values; /* one per entry of the driver's keys, in order */
	uint64_t size;			 /* requested size (0: not given) */
	bool size_given;		 /* whether size was in the config */
	bool readonly;			 /* open read-only */
	bool resizable;			 /* `resizable:`: resize() may be called */
};

/* Collects extents for block_status().  Opaque; see nbdv_extents_add(). */
struct nbdv_extents;

/*
 * Append one extent of @length bytes with NBDV_STATE_* @flags, following the previous
 * one.  Adjacent extents with equal flags are merged.  Returns 0 to go on, 1 when the
 * collector is full (stop: what was given is enough), or -ENOMEM.
 */
int nbdv_extents_add(struct nbdv_extents *ext, uint64_t length, uint32_t flags)
    __attribute__((warn_unused_result));

/* Operations of submit(). */
enum nbdv_op {
	NBDV_OP_READ = 1,     /* fill buf */
	NBDV_OP_WRITE,	      /* write buf (NBDV_F_FUA) */
	NBDV_OP_FLUSH,	      /* flush */
	NBDV_OP_TRIM,	      /* trim (NBDV_F_FUA) */
	NBDV_OP_ZERO,	      /* zero (NBDV_F_FUA, NBDV_F_MAY_TRIM, NBDV_F_FAST) */
	NBDV_OP_BLOCK_STATUS, /* fill extents (NBDV_F_REQ_ONE) */
	NBDV_OP_CACHE,	      /* prefetch */
};

/*
 * One asynchronous operation.  The server owns it; the driver reads it and may use
 * it until it calls nbdv_io_complete().  Inputs are checked as for the other modes.
 */
struct nbdv_io {
	int op;			      /* enum nbdv_op */
	uint32_t flags;		      /* NBDV_F_* */
	uint64_t offset;	      /* bytes */
	uint64_t length;	      /* bytes (0 for FLUSH) */
	void *buf;		      /* READ: to fill; WRITE: the data; else NULL */
	struct nbdv_extents *extents; /* BLOCK_STATUS: where nbdv_extents_add() goes */
	void *driver_data;	      /* free for the driver's use */
};

/*
 * Finish @io with @result (0 or -errno).  Thread-safe; call it exactly once per
 * submit() that returned 0, from any thread (a storage library's callback thread,
 * say), possibly before submit() has returned.  @io must not be touched afterwards.
 */
void nbdv_io_complete(struct nbdv_io *io, int result);

/* Log one line through the server's log (stderr, or the journal's priorities). */
#define NBDV_LOG_ERR   3
#define NBDV_LOG_WARN  4
#define NBDV_LOG_INFO  6
#define NBDV_LOG_DEBUG 7
void nbdv_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

struct nbdv_driver;

/* Common head of every driver instance. */
struct nbdv_drv_instance {
	const struct nbdv_driver *drv; /* the table this instance belongs to */
};

struct nbdv_driver {
	int api_version;	     /* NBDV_DRIVER_API_VERSION; always the first member */
	const char *name;	     /* value of `driver:` in the config */
	const char *description;     /* one line for --help and logs */
	const struct nbdv_key *keys; /* its export keys, ended by {NULL}; NULL: none */
	uint32_t needs;		     /* NBDV_NEEDS_* */

	/* Open storage for one export; on success *out is owned by the caller. */
	int (*create)(const struct nbdv_export_params *p, struct nbdv_drv_instance **out);
	/* Close and free an instance; it is never used again. */
	void (*destroy)(struct nbdv_drv_instance *inst);
	/* NBDV_CAP_* bits; called once per instance and cached. */
	uint32_t (*caps)(struct nbdv_drv_instance *inst);
	/* Size in bytes (changed only through resize). */
	uint64_t (*get_size)(struct nbdv_drv_instance *inst);

	int (*pread)(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off,
		     uint32_t flags);
	int (*pwrite)(struct nbdv_drv_instance *inst, const void *buf, uint64_t len, uint64_t off,
		      uint32_t flags);
	int (*flush)(struct nbdv_drv_instance *inst, uint32_t flags);
	int (*trim)(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags);
	int (*zero)(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags);
	/* Describe [off, off+len) through nbdv_extents_add(), from @off onwards. */
	int (*block_status)(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off,
			    uint32_t flags, struct nbdv_extents *ext);
	int (*cache)(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags);
	/*
	 * Optional: the size and NBDV_CAP_* bits create() would give, without opening,
	 * creating or locking anything.  NBD_OPT_INFO is answered from it, so storage is
	 * first touched at GO/EXPORT_NAME.  NULL: the server opens the export instead.
	 */
	int (*probe)(const struct nbdv_export_params *p, uint64_t *size, uint32_t *caps);
	/*
	 * Optional, for blocking drivers: read only if it cannot block (data in the page
	 * cache), else return -EAGAIN having changed nothing.  Called on the reactor for
	 * small reads; -EAGAIN sends the read to the I/O threads.
	 */
	int (*pread_nowait)(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off);
	/*
	 * Optional, for blocking drivers: a write that is expected to be quick (it lands in
	 * a cache), called on the reactor for small writes without FUA.  Return -EAGAIN
	 * having changed nothing when it could not be quick; the write then goes to the
	 * I/O threads.  Any other result is the write's result.  The wrapper times these calls
	 * and stops making them for a while when they stall (see driver_pwrite_nowait()).
	 */
	int (*pwrite_nowait)(struct nbdv_drv_instance *inst, const void *buf, uint64_t len,
			     uint64_t off);
	/*
	 * Optional, for blocking drivers, must not block: a file descriptor whose bytes
	 * [off, off+len) are this range of the export and are all in the page cache (with
	 * @no_holes, also none of it a hole), else -EAGAIN.  The reactor then sends a
	 * READ reply's data from the page cache with sendfile(2) on plain connections.  The
	 * descriptor must stay open as long as the instance.
	 */
	int (*cached_fd)(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, bool no_holes);
	/*
	 * Optional: change the size to @size (NBD_CMD_RESIZE), growing with zeroes or
	 * dropping what lies beyond.  For inline and blocking drivers no other call of this
	 * instance runs meanwhile; an asynchronous driver may have operations in flight
	 * and must order them itself.  Called from an I/O thread, it may block.  0, or
	 * -EPERM (cannot, e.g. a block device), -ENOSPC (no room), another -errno.
	 */
	int (*resize)(struct nbdv_drv_instance *inst, uint64_t size);
	/*
	 * NBDV_CAP_ASYNC drivers: start @io and return 0 (nbdv_io_complete() follows,
	 * exactly once), or return -errno having started nothing.  Never blocks.  An
	 * asynchronous driver with NBDV_CAP_WRITE also has NBDV_CAP_FUA and NBDV_CAP_ZERO
	 * (the server emulates neither for it); without NBDV_CAP_TRIM, _EXTENTS or _CACHE
	 * those operations are answered without calling it.  pread etc. may be NULL.
	 */
	int (*submit)(struct nbdv_drv_instance *inst, struct nbdv_io *io);
};

#endif /* NBDV_DRIVER_H */
