/*
 * nbdvault - one client connection.
 *
 * State diagram (rx is what the connection waits for next):
 *
 *   accept ─► greeting sent ─► RX_CLIENT_FLAGS ─► RX_OPT_HEADER ◄──► RX_OPT_DATA
 *                                   STARTTLS ACK flushed ─► CONN_TLS_HANDSHAKE ─┘ (then options
 * again) │  GO / EXPORT_NAME ▼ RX_REQ_HEADER ◄──► RX_REQ_PAYLOAD (WRITE data) any phase ─►
 * CONN_CLOSING (no more input; drain in-flight and output) ─► CONN_DEAD protocol violation or
 * socket error ─► CONN_DEAD at once (in-flight jobs still finish)
 *
 * The struct is freed only when it is dead, has no job in flight and no callback of
 * its own on the stack (depth == 0): see conn_release().
 */
#ifndef NBDV_CONN_H
#define NBDV_CONN_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>

#include "buf.h"
#include "compiler.h"
#include "executor.h"
#include "tls.h"

/* Longest option payload accepted; longer ones get NBD_REP_ERR_TOO_BIG and a close. */
#define NBDV_MAX_OPTION (64 * 1024)
/* Input buffer: one whole maximal option plus its header fits. */
#define NBDV_IBUF_SIZE (NBDV_MAX_OPTION + 4096)
/* WRITEs at least this large switch header reads to header size (no payload copy). */
#define NBDV_BIG_WRITE (64 * 1024)
/* SO_RCVLOWAT while a large WRITE payload arrives: wake for this much, at most. */
#define NBDV_LOWAT_MIN (64 * 1024)
#define NBDV_LOWAT_MAX (256 * 1024)
/* Back-pressure: stop reading past this many requests (or limits.max-inflight-bytes). */
#define NBDV_MAX_INFLIGHT_REQS 512
/* Nor start new READs while this much reply data waits to be sent (they wait, in order,
 * and a BLOCK_STATUS behind them goes ahead: transmission_header()).  Reading ahead of
 * a socket that cannot take more only fills memory: by the time a reply's turn came,
 * its data (copied from storage into the buffer) was out of the CPU caches, and
 * encrypting or copying it again into the socket read it back from RAM.  Replies that
 * leave soon after they are filled: TLS nbdcopy reads -20% server CPU per GiB, plain
 * memory-export reads -45% (bench/results/analysis.md).  512 KiB beat 256 KiB and 1 MiB. */
#define NBDV_SEND_AHEAD_BYTES (512 * 1024)
/* One turn of a connection on its reactor: at most this many requests, or this long,
 * before the loop polls the other connections again (requests that run inline, such as
 * memory-export BLOCK_STATUS, would otherwise hold the reactor as long as the client
 * keeps the input buffer full).  Sending replies takes turns of the same length: a
 * client that reads as fast as the reactor encrypts never fills its socket, and a whole
 * 32 MiB TLS reply (~25 ms of encryption) used to go out before any other connection's
 * turn (test_fairness: test_sending_large_tls_replies_takes_turns). */
#define NBDV_TURN_REQUESTS 128
#define NBDV_TURN_NS	   (500 * 1000)
/* Memory a connection may hold before it has chosen an export (and, in tls: require
 * mode, before TLS): option replies queued for a client that does not read them. */
#define NBDV_PREAUTH_BUDGET (64 * 1024)
/* Seconds a connection in the option phase has at shutdown to send the option that
 * gets NBD_REP_ERR_SHUTDOWN before it is closed. */
#define NBDV_SHUTDOWN_OPTION_GRACE 1.0

struct nbdv_server;
struct nbdv_reactor;
struct nbdv_transport;
struct nbdv_export;
struct nbdv_dev;
struct nbdv_req;

enum conn_phase {
	CONN_OPTIONS,	    /* handshake and option haggling */
	CONN_TLS_HANDSHAKE, /* STARTTLS acknowledged: flush the ACK, then the TLS handshake */
	CONN_TRANSMISSION,  /* requests */
	CONN_CLOSING,	    /* orderly close: finish in-flight work, drain output */
	CONN_DEAD,	    /* fd closed; waiting for in-flight jobs before free */
};

enum conn_rx {
	RX_CLIENT_FLAGS, /* 4 bytes of client flags */
	RX_OPT_HEADER,	 /* 16-byte option header */
	RX_OPT_DATA,	 /* optlen bytes of option data */
	RX_REQ_HEADER,	 /* 28-byte request header */
	RX_REQ_PAYLOAD,	 /* WRITE payload into cur_req */
};

/*
 * What the handshake negotiated, and the only part of it that transmission reads:
 * written by handshake.c (reset by STARTTLS), read-only once in transmission (except
 * told_size, which a RESIZE raises).
 */
struct nbdv_session {
	bool no_zeroes;			       /* client set NBD_FLAG_C_NO_ZEROES */
	struct nbdv_tls_peer peer;	       /* identity from the TLS session */
	bool structured;		       /* structured replies (or implied by extended) */
	bool extended;			       /* extended headers: 32-byte requests, replies */
	bool meta_alloc;		       /* base:allocation selected */
	const struct nbdv_export *meta_export; /* export the meta context was set for */
	struct nbdv_export *exp;	       /* chosen export (GO / EXPORT_NAME) */
	const struct nbdv_dev *dev;	       /* its open driver instance */
	uint16_t tflags;		       /* transmission flags sent to the client */
	uint64_t told_size;		       /* largest size this client was told (RESIZE) */
};

struct nbdv_conn {
	struct nbdv_server *srv;       /* server (config, exports, credentials) */
	const struct nbdv_config *lim; /* limits: the live config when it was accepted */
	uint64_t throttled_ns;	       /* reading held back by bandwidth/IOPS caps, in all */
	struct nbdv_reactor *r;	       /* the reactor it lives on, for its whole life */
	struct nbdv_conn *prev, *next; /* reactor's list of connections */
	struct nbdv_conn *dirty_next;  /* reactor's list of connections with output to send */
	struct nbdv_conn *resume_next; /* reactor's list of connections whose turn ended */
	bool dirty;		       /* on the dirty list */
	bool resuming;		       /* on the resume list */
	unsigned id;		       /* for log lines: "c17" */
	int fd;			       /* socket; -1 once closed */
	bool is_tcp;		       /* TCP (vs unix) socket */
	struct nbdv_req *waiting;      /* READs waiting for send-ahead room: the last of a
					* ring (see transmission_header()), or NULL */
	struct nbdv_transport *tp;     /* plain or TLS */
	ev_io rio;		       /* readable */
	ev_io wio;		       /* writable, started only while output is blocked */
	ev_timer timer;		       /* handshake deadline, then idle timeout */
	enum conn_phase phase;
	enum conn_rx rx;
	unsigned depth; /* nesting of our own callbacks */
	uint32_t lowat; /* SO_RCVLOWAT set on the socket; 0: the default */

	uint8_t *ibuf;	       /* input buffer, NBDV_IBUF_SIZE bytes */
	size_t istart, iend;   /* unread bytes are ibuf[istart, iend) */
	struct nbdv_outq outq; /* replies not yet written */

	/* Option phase (framing owned by the handshake). */
	uint32_t opt;	  /* option being read */
	uint32_t optlen;  /* its payload length */
	bool tls_started; /* TLS transport installed (handshake running or done) */
	bool tls_up;	  /* TLS handshake completed */

	struct nbdv_session sess; /* what the handshake negotiated */

	/* Transmission phase. */
	struct nbdv_req *cur_req;	   /* WRITE whose payload is being received */
	bool header_reads;		   /* last request was a big WRITE: read headers alone */
	bool draining;			   /* server shutting down: close when idle (options:
					    * after NBD_REP_ERR_SHUTDOWN) */
	bool yielded;			   /* its turn ended with requests left in the buffer */
	bool rate_paused;		   /* not reading requests until rate_timer fires */
	unsigned turn_left;		   /* requests it may still take this turn */
	uint64_t turn_end;		   /* CLOCK_MONOTONIC ns when this turn ends */
	unsigned inflight;		   /* requests submitted and not yet replied */
	struct nbdv_exec_queue jobs;	   /* its requests waiting for an I/O thread */
	size_t req_held;		   /* memory requests hold (charged until freed) */
	size_t peak_held;		   /* most it held with its queued replies (outq.held) */
	uint64_t sendfile_bytes;	   /* READ data the transport sent from the file (logged) */
	uint64_t read_bytes;		   /* data sent to the client in READ replies (audit) */
	uint64_t write_bytes;		   /* data the client wrote (audit) */
	uint64_t requests;		   /* requests received (audit) */
	uint64_t started_ns;		   /* CLOCK_MONOTONIC at accept (audit: duration) */
	const char *close_reason;	   /* why it closed, first cause wins (audit) */
	unsigned audit_refusals;	   /* refusals already written to the audit log */
	struct identity_row *identity_row; /* counted against its identity's cap, or NULL */
	ev_timer rate_timer;		   /* ends a pause for a bandwidth or IOPS cap */
	uint64_t cached_copy_bytes; /* large READs copied from the page cache inline (logged) */
};

/* NBDV_SEND_AHEAD_BYTES of @c's replies wait for the socket: no READ starts (and the
 * socket is not read) until some leave. */
static inline bool conn_send_ahead_full(const struct nbdv_conn *c)
{
	return c->outq.held >= NBDV_SEND_AHEAD_BYTES;
}

/* Take over accepted socket @fd; sends the greeting.  Returns NULL (fd closed) on failure. */
struct nbdv_conn *conn_new(struct nbdv_reactor *r, int fd, bool is_tcp, const char *peer);

/*
 * Same over an existing transport; @fd may be -1 for an in-memory transport, in which
 * case no watcher or timer is ever started and conn_pump() drives the connection.
 * Takes ownership of @tp (and @fd).
 */
struct nbdv_conn *conn_new_transport(struct nbdv_reactor *r, struct nbdv_transport *tp, int fd,
				     bool is_tcp, const char *peer);
/*
 * Read and process what the transport has (as on a readable event); returns false if
 * the connection was freed.
 */
bool conn_pump(struct nbdv_conn *c);

/* Per-identity bandwidth/IOPS caps: charge a request of @bytes to @c's identity;
 * returns the ns to wait before reading another request (0: none). */
uint64_t conn_identity_charge(struct nbdv_conn *c, uint64_t bytes);
/* Stop reading requests for @ns (a rate cap), then go on. */
void conn_pause_reading(struct nbdv_conn *c, uint64_t ns);
/* After a reload: close the session if its export was removed with on-remove: close,
 * or its identity or transport is no longer allowed. */
void conn_recheck(struct nbdv_conn *c);
/* Record why the connection is closing, unless a reason is already recorded. */
void conn_reason(struct nbdv_conn *c, const char *why);
/* Audit an option refused by policy (at most AUDIT_REFUSALS per connection). */
void conn_audit_refusal(struct nbdv_conn *c, const char *option, const char *export,
			const char *why);

/* Queue a reply and schedule a write. */
void conn_queue(struct nbdv_conn *c, struct nbdv_outmsg *m);
/* Orderly close: stop reading, finish in-flight requests, send queued output, close. */
void conn_close_graceful(struct nbdv_conn *c);
/* Immediate close after a protocol violation or I/O error. */
void conn_abort(struct nbdv_conn *c);
/* A request finished and its reply is queued: update accounting, maybe resume reading. */
void conn_request_done(struct nbdv_conn *c);
/* Write queued output and resume buffered input once back-pressure lifts (the server's
 * flusher calls this for every dirty connection before the loop polls). */
void conn_service(struct nbdv_conn *c);
/* Free @c if nothing refers to it any more; returns true if it was freed. */
bool conn_release(struct nbdv_conn *c);
/* Server shutdown: close in the option phase; in transmission answer new requests with
 * ESHUTDOWN and close once idle. */
void conn_shutdown(struct nbdv_conn *c);

#endif /* NBDV_CONN_H */
