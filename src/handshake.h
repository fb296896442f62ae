/*
 * nbdvault - the fixed-newstyle handshake and option phase.
 *
 * These functions see complete, length-checked units (client flags, one option with
 * all its data) and answer through conn_queue(); they never touch sockets.
 */
#ifndef NBDV_HANDSHAKE_H
#define NBDV_HANDSHAKE_H

#include <stdint.h>

#include "compiler.h"

struct nbdv_conn;

struct nbdv_export;

enum hs_result {
	HS_CONTINUE = 0,     /* wait for the next option */
	HS_TRANSMISSION = 1, /* export chosen: the connection is in transmission */
	HS_STARTTLS = 2,     /* ACK queued: discard buffered input, then start TLS */
	HS_CLOSE = -1,	     /* close the connection (after sending what is queued) */
};

/* Queue the server greeting. */
int handshake_greeting(struct nbdv_conn *c) NBDV_WUR;
/* Check the client's 32-bit flags. */
enum hs_result handshake_client_flags(struct nbdv_conn *c, uint32_t flags) NBDV_WUR;
/* Handle one option; @data has exactly @len bytes (len <= NBDV_MAX_OPTION). */
enum hs_result handshake_option(struct nbdv_conn *c, uint32_t opt, const uint8_t *data,
				uint32_t len) NBDV_WUR;
/* Whether @c may use export @e under its current policy (TLS requirement and allow
 * list): what a reload re-checks for open sessions. */
bool handshake_export_allowed(const struct nbdv_conn *c, const struct nbdv_export *e);
/* Answer an option whose length is over the limit (the connection then closes). */
void handshake_option_too_big(struct nbdv_conn *c, uint32_t opt, uint32_t len);

#endif /* NBDV_HANDSHAKE_H */
