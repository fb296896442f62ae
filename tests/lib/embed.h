/*
 * nbdvault - an embedded server for in-process tests and fuzzing: real connection,
 * handshake and transmission code over an in-memory transport (no sockets).
 *
 *   embed_init(yaml) ─► embed_open() ─► embed_feed(bytes)... ─► embed_close()
 *
 * embed_feed() appends client bytes, lets the connection process them, waits for jobs
 * on the worker pool and writes the replies, which are kept in the client's `out`
 * buffer when it has one (capacity fixed at open: the buffers never grow, so the
 * harness itself does not allocate while a test counts allocations).
 */
#ifndef NBDV_TEST_EMBED_H
#define NBDV_TEST_EMBED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct nbdv_server;

struct embed_client {
	uint8_t *in;	/* what the client sent */
	size_t in_len;	/* bytes in `in` */
	size_t in_cap;	/* capacity of `in` */
	size_t in_pos;	/* bytes the server has read */
	bool closed;	/* the client hung up: reads return end of stream after in_len */
	uint8_t *out;	/* what the server sent, or NULL to discard it */
	size_t out_len; /* bytes in `out` */
	size_t out_cap; /* capacity of `out` */
	bool gone;	/* the server freed the connection */
};

/* Start the embedded server from a YAML config text (aborts on error). */
struct nbdv_server *embed_init(const char *yaml);
/* Stop it and free everything (leak checkers see a clean heap). */
void embed_fini(void);
/* A new connection; the greeting is written.  @out_cap 0 discards output. */
struct embed_client *embed_open(size_t in_cap, size_t out_cap);
/* The same, but the greeting stays queued until the reactor's own flusher writes it
 * (a turn of its loop: ev_run()). */
struct embed_client *embed_connect(size_t in_cap, size_t out_cap);
/* When set, called after every write of the in-memory transport (a test's slow send). */
extern void (*embed_on_send)(void);
/* Append @len bytes from the client and serve them until the server is idle. */
void embed_feed(struct embed_client *cl, const void *data, size_t len);
/* End of stream from the client; checks that the connection can be freed, frees @cl. */
void embed_close(struct embed_client *cl);

#endif
