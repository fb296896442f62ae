/*
 * nbdvault - Prometheus metrics (`metrics:`), served by libmicrohttpd on its own thread.
 *
 * Counters are relaxed atomics updated where the events happen (one request's
 * completion adds to its export's counters); the HTTP thread only reads them.  Per
 * identity counters live in a small table under a mutex, touched only at handshakes,
 * refusals and closes.  See docs/operations.md for the list.
 */
#ifndef NBDV_METRICS_H
#define NBDV_METRICS_H

#include <stdbool.h>
#include <stdint.h>

#include "compiler.h"

struct nbdv_server;

#define METRICS_COMMANDS 10 /* NBD_CMD_READ .. NBD_CMD_RESIZE, then "other" */
#define METRICS_ERRNOS	 9  /* EPERM EIO ENOMEM EINVAL ENOSPC EOVERFLOW ENOTSUP ESHUTDOWN other */
#define METRICS_BUCKETS	 12 /* latency histogram buckets (plus +Inf) */

/* Per export, embedded in struct nbdv_export. */
struct nbdv_export_metrics {
	uint64_t requests[METRICS_COMMANDS];
	uint64_t errors[METRICS_ERRNOS];
	uint64_t bytes_read, bytes_written;
	uint64_t latency[METRICS_BUCKETS + 1]; /* per bucket, not cumulative */
	uint64_t latency_sum_ns;
};

/* Whether metrics are collected (a `metrics:` listener exists). */
extern bool nbdv_metrics_on;

/* Bind the metrics listener (before the sandbox closes); -1 (logged) on failure. */
int metrics_bind(struct nbdv_server *srv) NBDV_WUR;
/* Start serving on the bound listener (after the sandbox: its thread inherits it). */
int metrics_start(struct nbdv_server *srv) NBDV_WUR;
void metrics_stop(void);

/* A request finished: @nbd_err is 0 or the NBD error sent, @bytes its data. */
void metrics_request(struct nbdv_export_metrics *m, uint16_t type, uint32_t nbd_err,
		     uint64_t read_bytes, uint64_t written_bytes, uint64_t ns);
void metrics_accepted(void);
/* A TLS handshake ended: "ok", "resumed" or "failed". */
void metrics_handshake(const char *outcome);
/* Per identity ("psk:alice", "dn:...", "none (no TLS)"). */
void metrics_identity_connected(const char *identity);
void metrics_identity_refused(const char *identity);
void metrics_identity_bytes(const char *identity, uint64_t bytes);
/* Time an identity's connections were held back by its bandwidth or IOPS cap. */
void metrics_identity_throttled(const char *identity, uint64_t ns);

#endif /* NBDV_METRICS_H */
