/*
 * nbdvault - the fixed-newstyle handshake and option phase.
 *
 * The handshake owns the option phase's framing (client flags, IHAVEOPT headers, option
 * data, bounded before use) and what it negotiates on the connection (structured
 * replies or extended headers, meta contexts, the export and its flags), which
 * transmission then reads.  It answers through conn_queue() and never touches sockets;
 * conn.c alone changes the connection's phase, on what handshake_input() returns.
 */
#ifndef NBDV_HANDSHAKE_H
#define NBDV_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>

#include "compiler.h"

struct nbdv_conn;

struct nbdv_export;

enum hs_result {
	HS_CONTINUE = 0,     /* a unit was consumed: go on */
	HS_TRANSMISSION = 1, /* export chosen: the connection enters transmission */
	HS_STARTTLS = 2,     /* ACK queued: discard buffered input, then start TLS */
	HS_NEED_MORE = 3,    /* the next unit is not all buffered yet */
	HS_CLOSE = -1,	     /* close the connection (after sending what is queued) */
	HS_ABORT = -2,	     /* close at once: the client broke the framing */
};

/*
 * Consume the next unit of the option phase from the @len bytes at @p: the client
 * flags, an option header, or an option's data (then handled).  *used receives the
 * bytes consumed (0 with HS_NEED_MORE).  An option longer than NBDV_MAX_OPTION is
 * refused from its header, before any of its data is read.
 */
enum hs_result handshake_input(struct nbdv_conn *c, const uint8_t *p, size_t len,
			       size_t *used) NBDV_WUR;

/* Queue the server greeting. */
int handshake_greeting(struct nbdv_conn *c) NBDV_WUR;
/* Handle one option; @data has exactly @len bytes (len <= NBDV_MAX_OPTION). */
enum hs_result handshake_option(struct nbdv_conn *c, uint32_t opt, const uint8_t *data,
				uint32_t len) NBDV_WUR;
/* Whether @c may use export @e under its current policy (TLS requirement and allow
 * list): what a reload re-checks for open sessions. */
bool handshake_export_allowed(const struct nbdv_conn *c, const struct nbdv_export *e);

#endif /* NBDV_HANDSHAKE_H */
