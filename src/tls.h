/*
 * nbdvault - TLS: credentials and the GnuTLS transport.
 *
 * tls.c is the only file that sees GnuTLS.  A struct nbdv_tls is one immutable,
 * reference-counted snapshot of the server's credentials (x509 and/or PSK, the
 * priority cache, the client-verification policy); SIGHUP builds a new one and the
 * old one lives on until the last session made from it ends.
 */
#ifndef NBDV_TLS_H
#define NBDV_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include "compiler.h"

struct nbdv_tls;
struct nbdv_tls_cfg;
struct nbdv_transport;

/* What the TLS session established, for logs and allow-lists. */
struct nbdv_tls_peer {
	char protocol[32]; /* "TLS1.3" */
	char cipher[64];   /* "AES-256-GCM" */
	char *psk_user;	   /* PSK identity, or NULL */
	char *cn;	   /* verified client certificate's common name, or NULL */
	char *dn;	   /* its subject DN, RFC 4514 ("CN=vm7,O=Example"), or NULL */
	bool resumed;	   /* the session was resumed from a ticket */
};

/* Initialise GnuTLS once at start-up (0 or -1). */
int tls_global_init(void) NBDV_WUR;
void tls_global_deinit(void);

/*
 * Load every file @cfg names and check it (key matches certificate, PSK file parses,
 * priority string is valid).  Returns 0 and *out with one reference, or -1 with one
 * line in @err naming the file and the reason.  Warnings (private key readable by
 * others) are logged.
 */
/* Whether @t checks a certificate revocation list (ca-crl.pem was loaded). */
bool tls_has_crl(const struct nbdv_tls *t);
int tls_load(const struct nbdv_tls_cfg *cfg, struct nbdv_tls **out, char *err,
	     size_t errlen) NBDV_WUR;
struct nbdv_tls *tls_ref(struct nbdv_tls *t);
void tls_unref(struct nbdv_tls *t);

/* A server-side TLS transport on @fd; holds a reference to @creds.  NULL on failure. */
struct nbdv_transport *tls_transport_new(struct nbdv_tls *creds, int fd) NBDV_WUR;
/*
 * Advance the handshake: 0 when done, -EAGAIN to be called again when the socket is
 * ready in the direction tls_wants_write() gives, or another -errno with *why set to
 * a static or transport-owned reason.
 */
int tls_handshake(struct nbdv_transport *t, const char **why) NBDV_WUR;
bool tls_wants_write(struct nbdv_transport *t);
/* After the handshake: fill @peer (strings malloc'd; free with tls_peer_clear). */
void tls_peer_info(struct nbdv_transport *t, struct nbdv_tls_peer *peer);
void tls_peer_clear(struct nbdv_tls_peer *peer);
/* Does @peer have identity @id ("cn:NAME", "dn:DN" or "psk:USER")? */
bool tls_peer_matches(const struct nbdv_tls_peer *peer, const char *id);
/* The identity as allow-lists name it ("psk:alice", "dn:CN=..."), or "anonymous". */
const char *tls_peer_identity(const struct nbdv_tls_peer *peer, char *buf, size_t len);

#endif /* NBDV_TLS_H */
