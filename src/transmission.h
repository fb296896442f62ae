/*
 * nbdvault - the transmission phase: request parsing, validation, dispatch to the
 * executor and reply building (simple and structured).
 */
#ifndef NBDV_TRANSMISSION_H
#define NBDV_TRANSMISSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "compiler.h"

struct nbdv_conn;
struct nbdv_req;

#define NBDV_REQ_HEADER_SIZE	 28 /* compact request header */
#define NBDV_EXT_REQ_HEADER_SIZE 32 /* extended request header */

enum tx_result {
	TX_OK = 0,	     /* request dispatched or answered */
	TX_NEED_PAYLOAD = 1, /* WRITE: its payload follows (transmission_payload_from/_got) */
	TX_DISC = 2,	     /* NBD_CMD_DISC: close once in-flight requests are done */
	TX_CLOSE = -1,	     /* protocol violation: close now */
};

/* Bytes of a request header on @c: compact, or extended once negotiated. */
size_t transmission_header_size(const struct nbdv_conn *c);
/* Parse one request header (transmission_header_size() bytes). */
enum tx_result transmission_header(struct nbdv_conn *c, const uint8_t *hdr) NBDV_WUR;
/* Where the payload of c->cur_req goes, and how much is still missing. */
uint8_t *transmission_payload_ptr(struct nbdv_req *r, uint32_t *missing);
/* How much of @r's payload is still missing. */
uint32_t transmission_payload_missing(const struct nbdv_req *r);
/* @n more payload bytes arrived; dispatches the request when complete (returns 1). */
int transmission_payload_got(struct nbdv_conn *c, uint32_t n);
/* Take what is missing of c->cur_req's payload from the @len buffered bytes at @p;
 * *used receives how many.  Dispatches the request when complete (returns 1). */
int transmission_payload_from(struct nbdv_conn *c, const uint8_t *p, size_t len, size_t *used);
/* Start the READs waiting for send-ahead room, in order, while there is room; true
 * when none is left waiting. */
bool transmission_dispatch_waiting(struct nbdv_conn *c);
/* Free the READs still waiting (connection closing: they are not answered). */
void transmission_drop_waiting(struct nbdv_conn *c);
/* Whether the request whose header is at @hdr may be parsed while READs wait: a READ
 * (it waits behind them) or a BLOCK_STATUS without payload (answered at once). */
bool transmission_may_go_ahead(const struct nbdv_conn *c, const uint8_t *hdr);
/* Free a request that will never be dispatched (connection closing). */
void transmission_req_free(struct nbdv_req *r);
/* Free the calling thread's cache of request structs (at exit). */
void transmission_req_cache_drain(void);

/* NBD wire error value for a negative errno (EDQUOT -> ENOSPC, unknown -> EIO, ...). */
uint32_t transmission_nbd_errno(int err, bool fast_zero);

#endif /* NBDV_TRANSMISSION_H */
