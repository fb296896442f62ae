/*
 * nbdvault - exports at run time: a config entry plus its driver instance.
 *
 * The driver instance is opened on first use by a client that reached GO or
 * EXPORT_NAME for it (INFO uses the driver's probe(); LIST nothing), shared by every
 * connection to that export,
 * and closed at shutdown after a final flush.
 */
#ifndef NBDV_EXPORT_H
#define NBDV_EXPORT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "compiler.h"
#include "driver_registry.h"
#include "metrics.h"

struct nbdv_export_cfg;
struct nbdv_config;

/* A token bucket pair for bandwidth and IOPS caps (per identity, per export). */
struct nbdv_rate {
	double bw_tokens, iops_tokens;
	uint64_t refilled_ns; /* CLOCK_MONOTONIC when last topped up (0: never) */
};

/* Take one request of @bytes at @now from @r, refilled at @bw and @iops per second
 * (0: no cap) and holding 0.1 s of each; returns the ns to wait before the next
 * request, 0 for none.  The caller serialises calls on @r. */
uint64_t rate_take(struct nbdv_rate *r, double bw, double iops, uint64_t bytes, uint64_t now);

/* Exports a SIGHUP reload may add beyond those at start. */
#define NBDV_RELOAD_EXPORTS 64

struct nbdv_export {
	/* From the newest config snapshot that has it: a reload swaps it (allow lists,
	 * tls:, description), so every read is an atomic load. */
	const struct nbdv_export_cfg *_Atomic cfg;
	_Atomic bool removed;		    /* gone from the config: no new opens */
	struct nbdv_dev dev;		    /* valid when opened */
	bool opened;			    /* dev.inst is live */
	unsigned sessions;		    /* connections in transmission on it (atomic) */
	pthread_mutex_t rate_lock;	    /* protects rate */
	struct nbdv_rate rate;		    /* `bandwidth:` and `iops:` of the export */
	struct nbdv_export_metrics metrics; /* counters for /metrics */
};

/* Build the run-time exports of @cfg, with room for NBDV_RELOAD_EXPORTS more; NULL on
 * ENOMEM.  *n receives the count. */
struct nbdv_export *exports_new(const struct nbdv_config *cfg, size_t *n) NBDV_WUR;
/* Flush and close every opened export, then free the array. */
void exports_free(struct nbdv_export *v, size_t n);
/* Flush every opened export; returns 0 or the first -errno. */
int exports_flush(struct nbdv_export *v, size_t n);

/* Find by name among exports not removed; the empty name means @cfg's default-export.
 * NULL if none. */
struct nbdv_export *exports_find(struct nbdv_export *v, size_t n, const struct nbdv_config *cfg,
				 const char *name, size_t namelen);

/* Open the driver instance if needed; returns 0 and *dev, or -errno (logged). */
int export_open(struct nbdv_export *e, const struct nbdv_dev **dev) NBDV_WUR;

/*
 * Size and capabilities of @e for NBD_OPT_INFO: from the open device if there is one,
 * else from the driver's probe() (nothing is opened or created), else by opening.
 * Returns 0 or -errno.
 */
int export_describe(struct nbdv_export *e, uint64_t *size, uint32_t *caps) NBDV_WUR;

/* @e's stall gate for /metrics: false when @e is not open or writes never run inline. */
bool export_gate_stats(struct nbdv_export *e, struct nbdv_gate_stats *out);

/* Charge a request of @bytes to @e's caps (from its current config); the ns to wait
 * before reading another request from that connection, or 0. */
uint64_t export_charge(struct nbdv_export *e, uint64_t bytes);

/* Transmission flags for capabilities @caps, given whether structured replies and
 * extended headers are on. */
uint16_t export_tflags(uint32_t caps, bool structured, bool extended);

#endif /* NBDV_EXPORT_H */
