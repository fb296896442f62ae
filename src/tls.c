/*
 * nbdvault - GnuTLS credentials, sessions and the TLS transport.
 *
 * Sessions are non-blocking: every GnuTLS call that would block returns
 * GNUTLS_E_AGAIN and the connection's libev watchers wait for the direction
 * gnutls_record_get_direction() reports.  GnuTLS wants a send that returned AGAIN to
 * be repeated with the same data; the connection's output queue keeps its head in
 * place until it is written, and pend_ptr/pend_len below remember what was offered.
 */
#include "build-config.h"

#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"
#include "config.h"
#include "log.h"
#include "tls.h"
#include "transport.h"

#define REC_MAX	     16384		    /* plaintext bytes per TLS record */
#define SEND_BUDGET  (1024 * 1024)	    /* bytes one sendv call may write */
#define RECV_BUDGET  (256 * 1024)	    /* bytes one recv call may read */
#define TLS_HEADER   5			    /* bytes of a TLS record header */
#define PULL_STAGE   (64 * 1024)	    /* ciphertext read ahead when records are small */
#define PULL_SMALL   (4096 + 256)	    /* record bodies up to this size count as small */
#define PSK_PRIORITY ":+ECDHE-PSK:+DHE-PSK" /* forward secrecy: no plain PSK */

struct psk_entry {
	char *user;	    /* identity */
	gnutls_datum_t key; /* binary key */
};

struct nbdv_tls {
	int refs;			       /* owners: the server + each session */
	gnutls_certificate_credentials_t x509; /* NULL without certificates */
	gnutls_psk_server_credentials_t psk;   /* NULL without a PSK file */
	gnutls_priority_t prio;		       /* compiled priority string */
	bool verify_clients;		       /* require a verified client cert */
	bool has_crl;			       /* ca-crl.pem was loaded */
	struct psk_entry *psk_table;	       /* identities from the PSK file */
	size_t n_psk;
	gnutls_datum_t ticket_key; /* session ticket master key, or empty */
};

struct tls_transport {
	struct nbdv_transport base; /* must be first */
	gnutls_session_t s;	    /* the session */
	struct nbdv_tls *creds;	    /* referenced for the session's life */
	const void *pend_ptr;	    /* data offered to a send that returned AGAIN */
	size_t pend_len;	    /* its length; 0 when nothing is pending */
	unsigned char *rstage;	    /* ciphertext read ahead of GnuTLS (pool buffer), or NULL */
	size_t rpos, rlen;	    /* bytes of rstage consumed and filled */
	bool rbulk;		    /* the last record body GnuTLS asked for was large */
	uint64_t pulled; /* bytes handed to GnuTLS so far (progress, for tls_handshake) */
	bool done;	 /* handshake finished */
	char why[256];	 /* last failure reason */
};

static struct tls_transport *to_tt(struct nbdv_transport *t)
{
	return (struct tls_transport *)t;
}

int tls_global_init(void)
{
	int r = gnutls_global_init();

	if (r < 0) {
		log_err("cannot initialise GnuTLS: %s", gnutls_strerror(r));
		return -1;
	}
	return 0;
}

void tls_global_deinit(void)
{
	gnutls_global_deinit();
}

/* --- credentials --- */

static void tls_free(struct nbdv_tls *t)
{
	if (t->x509)
		gnutls_certificate_free_credentials(t->x509);
	if (t->psk)
		gnutls_psk_free_server_credentials(t->psk);
	if (t->prio)
		gnutls_priority_deinit(t->prio);
	for (size_t i = 0; i < t->n_psk; i++) {
		free(t->psk_table[i].user);
		gnutls_memset(t->psk_table[i].key.data, 0, t->psk_table[i].key.size);
		gnutls_free(t->psk_table[i].key.data);
	}
	free(t->psk_table);
	if (t->ticket_key.data) {
		gnutls_memset(t->ticket_key.data, 0, t->ticket_key.size);
		gnutls_free(t->ticket_key.data);
	}
	free(t);
}

bool tls_has_crl(const struct nbdv_tls *t)
{
	return t && t->has_crl;
}

struct nbdv_tls *tls_ref(struct nbdv_tls *t)
{
	__atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
	return t;
}

void tls_unref(struct nbdv_tls *t)
{
	if (t && __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) == 0)
		tls_free(t);
}

/* A readable file, or an error naming it. */
static int check_file(const char *path, bool secret, char *err, size_t errlen)
{
	struct stat st;
	FILE *f = fopen(path, "r");

	if (!f) {
		snprintf(err, errlen, "tls: %s: cannot read: %s", path, strerror(errno));
		return -1;
	}
	if (secret && fstat(fileno(f), &st) == 0 && (st.st_mode & 0077))
		log_warn("tls: %s is readable by other users (mode %03o): chmod 600 it", path,
			 st.st_mode & 0777);
	fclose(f);
	return 0;
}

static bool file_exists(const char *path)
{
	return access(path, F_OK) == 0;
}

/*
 * A verified chain is not yet a client identity: the end-entity certificate must not
 * be a CA, and when it names purposes (extended key usage), TLS client authentication
 * must be one of them.  Otherwise any server certificate of the same CA, or a code
 * signing one, would open allow-listed exports.  0 or a reason.
 */
static const char *client_cert_unfit(gnutls_session_t s)
{
	unsigned n = 0, critical = 0, ca = 0;
	int pathlen = 0;
	const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
	gnutls_x509_crt_t crt;
	const char *why = NULL;
	bool any_purpose = false, client = false;

	if (!certs || n == 0)
		return "no client certificate";
	if (gnutls_x509_crt_init(&crt) < 0)
		return "out of memory";
	if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) < 0) {
		gnutls_x509_crt_deinit(crt);
		return "client certificate cannot be parsed";
	}
	if (gnutls_x509_crt_get_basic_constraints(crt, &critical, &ca, &pathlen) >= 0 && ca)
		why = "client certificate is a CA certificate (CA:TRUE), not an end entity";
	for (unsigned i = 0; !why; i++) {
		char oid[128];
		size_t size = sizeof(oid);
		int r = gnutls_x509_crt_get_key_purpose_oid(crt, i, oid, &size, &critical);

		if (r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
			break;
		if (r < 0) {
			why = "client certificate's extended key usage cannot be read";
			break;
		}
		any_purpose = true;
		if (strcmp(oid, GNUTLS_KP_TLS_WWW_CLIENT) == 0)
			client = true;
	}
	if (!why && any_purpose && !client)
		why = "client certificate's extended key usage does not include TLS client "
		      "authentication";
	gnutls_x509_crt_deinit(crt);
	return why;
}

/* Verify the client's certificate chain (and CRL) during the handshake. */
static int verify_cb(gnutls_session_t s)
{
	struct tls_transport *tt = gnutls_session_get_ptr(s);
	unsigned status = 0;
	gnutls_datum_t out = {NULL, 0};
	const char *unfit;
	int r = gnutls_certificate_verify_peers2(s, &status);

	if (r < 0) {
		snprintf(tt->why, sizeof(tt->why), "client certificate: %s", gnutls_strerror(r));
		return GNUTLS_E_CERTIFICATE_ERROR;
	}
	if (status) {
		if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out,
								 0) == 0) {
			snprintf(tt->why, sizeof(tt->why), "client certificate rejected: %s",
				 (const char *)out.data);
			gnutls_free(out.data);
		} else {
			snprintf(tt->why, sizeof(tt->why), "client certificate rejected");
		}
		return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
	}
	unfit = client_cert_unfit(s);
	if (unfit) {
		snprintf(tt->why, sizeof(tt->why), "%s", unfit);
		return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
	}
	return 0;
}

static int load_x509(struct nbdv_tls *t, const struct nbdv_tls_cfg *cfg, char *err, size_t errlen)
{
	char ca[4096], cert[4096], key[4096], crl[4096];
	int r;

	snprintf(ca, sizeof(ca), "%s/ca-cert.pem", cfg->certificates);
	snprintf(cert, sizeof(cert), "%s/server-cert.pem", cfg->certificates);
	snprintf(key, sizeof(key), "%s/server-key.pem", cfg->certificates);
	snprintf(crl, sizeof(crl), "%s/ca-crl.pem", cfg->certificates);
	if (check_file(cert, false, err, errlen) < 0 || check_file(key, true, err, errlen) < 0)
		return -1;
	if ((cfg->verify_clients || file_exists(ca)) && check_file(ca, false, err, errlen) < 0)
		return -1;
	r = gnutls_certificate_allocate_credentials(&t->x509);
	if (r < 0)
		goto gnutls_err;
	r = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (r < 0) {
		snprintf(err, errlen, "tls: %s with %s: %s", cert, key, gnutls_strerror(r));
		return -1;
	}
	if (file_exists(ca)) {
		r = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
		if (r <= 0) {
			snprintf(err, errlen, "tls: %s: %s", ca,
				 r == 0 ? "no certificate in the file" : gnutls_strerror(r));
			return -1;
		}
	}
	if (file_exists(crl)) {
		if (check_file(crl, false, err, errlen) < 0)
			return -1;
		r = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
		if (r <= 0) {
			snprintf(err, errlen, "tls: %s: %s", crl,
				 r == 0 ? "no CRL in the file" : gnutls_strerror(r));
			return -1;
		}
		t->has_crl = true;
	}
	gnutls_certificate_set_known_dh_params(t->x509, GNUTLS_SEC_PARAM_MEDIUM);
	if (cfg->verify_clients)
		gnutls_certificate_set_verify_function(t->x509, verify_cb);
	return 0;
gnutls_err:
	snprintf(err, errlen, "tls: %s", gnutls_strerror(r));
	return -1;
}

/* Server-side PSK lookup: the key for @username from the loaded table. */
static int psk_cb(gnutls_session_t s, const gnutls_datum_t *username, gnutls_datum_t *key)
{
	struct tls_transport *tt = gnutls_session_get_ptr(s);
	struct nbdv_tls *t = tt->creds;

	for (size_t i = 0; i < t->n_psk; i++) {
		const struct psk_entry *e = &t->psk_table[i];
		if (strlen(e->user) == username->size &&
		    memcmp(e->user, username->data, username->size) == 0) {
			key->data = gnutls_malloc(e->key.size);
			if (!key->data)
				return -1;
			memcpy(key->data, e->key.data, e->key.size);
			key->size = e->key.size;
			return 0;
		}
	}
	snprintf(tt->why, sizeof(tt->why), "unknown PSK identity");
	return -1;
}

/* Parse a psktool file: "identity:hexkey" per line. */
static int load_psk(struct nbdv_tls *t, const char *path, char *err, size_t errlen)
{
	char line[1024];
	unsigned lineno = 0;
	FILE *f;
	int r;

	if (check_file(path, true, err, errlen) < 0)
		return -1;
	f = fopen(path, "r");
	if (!f) {
		snprintf(err, errlen, "tls: %s: cannot read: %s", path, strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		char *colon, *hex;
		gnutls_datum_t hexd;
		struct psk_entry *grown;

		lineno++;
		line[strcspn(line, "\r\n")] = '\0';
		if (line[0] == '\0' || line[0] == '#')
			continue;
		colon = strchr(line, ':');
		if (!colon || colon == line || colon[1] == '\0') {
			snprintf(err, errlen, "tls: %s:%u: expected IDENTITY:HEXKEY", path, lineno);
			goto err_close;
		}
		*colon = '\0';
		hex = colon + 1;
		grown = realloc(t->psk_table, (t->n_psk + 1) * sizeof(*grown));
		if (!grown) {
			snprintf(err, errlen, "tls: %s: out of memory", path);
			goto err_close;
		}
		t->psk_table = grown;
		hexd.data = (unsigned char *)hex;
		hexd.size = (unsigned)strlen(hex);
		r = gnutls_hex_decode2(&hexd, &t->psk_table[t->n_psk].key);
		if (r < 0) {
			snprintf(err, errlen, "tls: %s:%u: key is not hexadecimal: %s", path,
				 lineno, gnutls_strerror(r));
			goto err_close;
		}
		t->psk_table[t->n_psk].user = strdup(line);
		t->n_psk++;
		if (!t->psk_table[t->n_psk - 1].user) {
			snprintf(err, errlen, "tls: %s: out of memory", path);
			goto err_close;
		}
	}
	fclose(f);
	if (t->n_psk == 0) {
		snprintf(err, errlen, "tls: %s: no keys in the file", path);
		return -1;
	}
	r = gnutls_psk_allocate_server_credentials(&t->psk);
	if (r < 0) {
		snprintf(err, errlen, "tls: %s", gnutls_strerror(r));
		return -1;
	}
	gnutls_psk_set_server_credentials_function2(t->psk, psk_cb);
	gnutls_psk_set_server_known_dh_params(t->psk, GNUTLS_SEC_PARAM_MEDIUM);
	return 0;
err_close:
	fclose(f);
	return -1;
}

int tls_load(const struct nbdv_tls_cfg *cfg, struct nbdv_tls **out, char *err, size_t errlen)
{
	struct nbdv_tls *t = calloc(1, sizeof(*t));
	const char *errpos = NULL;
	char *prio;
	int r;

	*out = NULL;
	if (!t) {
		snprintf(err, errlen, "tls: out of memory");
		return -1;
	}
	t->refs = 1;
	t->verify_clients = cfg->verify_clients;
	if (cfg->certificates && load_x509(t, cfg, err, errlen) < 0)
		goto err;
	if (cfg->psk_file && load_psk(t, cfg->psk_file, err, errlen) < 0)
		goto err;
	/* PSK key exchange must be enabled explicitly; do it so that PSK clients (qemu's
	 * tls-creds-psk) work under the default priority.  Only the (EC)DHE kinds: a plain
	 * PSK exchange has no forward secrecy (a priority with +PSK turns it on). */
	prio = malloc(strlen(cfg->priority) + sizeof(PSK_PRIORITY));
	if (!prio) {
		snprintf(err, errlen, "tls: out of memory");
		goto err;
	}
	strcpy(prio, cfg->priority);
	if (cfg->psk_file)
		strcat(prio, PSK_PRIORITY);
	r = gnutls_priority_init(&t->prio, prio, &errpos);
	if (r < 0) {
		snprintf(err, errlen, "tls.priority: '%s' is invalid near '%.32s': %s",
			 cfg->priority, errpos ? errpos : "", gnutls_strerror(r));
		free(prio);
		goto err;
	}
	free(prio);
	/* Session tickets let a client resume (TLS 1.3: a PSK from the ticket with a fresh
	 * ECDHE exchange, no certificate work).  The key lives in memory only and is new
	 * with every credential snapshot, so SIGHUP also ends every earlier ticket. */
	if (cfg->session_tickets) {
		r = gnutls_session_ticket_key_generate(&t->ticket_key);
		if (r < 0) {
			snprintf(err, errlen, "tls: session ticket key: %s", gnutls_strerror(r));
			goto err;
		}
	}
	*out = t;
	return 0;
err:
	tls_free(t);
	return -1;
}

/* --- transport --- */

static ssize_t recv_record(struct tls_transport *tt, void *buf, size_t len)
{
	for (;;) {
		ssize_t n = gnutls_record_recv(tt->s, buf, len);
		if (n >= 0)
			return n;
		switch (n) {
		case GNUTLS_E_INTERRUPTED:
			continue;
		case GNUTLS_E_AGAIN:
			return -EAGAIN;
		case GNUTLS_E_PREMATURE_TERMINATION:
			return -ECONNRESET;
		default:
			snprintf(tt->why, sizeof(tt->why), "%s", gnutls_strerror((int)n));
			log_info("c%u: TLS receive failed: %s", tt->base.conn_id, tt->why);
			return -EPROTO;
		}
	}
}

/*
 * One call returns at most RECV_BUDGET bytes.  GnuTLS hands over one record per
 * gnutls_record_recv(); after a full-sized record the client is probably streaming (a
 * large WRITE), so read on instead of returning to the loop for one epoll_wait per
 * record.  A short record (a request header) ends the call without a probing read.
 */
static ssize_t tls_recv(struct nbdv_transport *t, void *buf, size_t len)
{
	struct tls_transport *tt = to_tt(t);
	size_t got = 0;

	while (got < len && got < RECV_BUDGET) {
		ssize_t n = recv_record(tt, (char *)buf + got, len - got);
		if (n <= 0)
			return got ? (ssize_t)got : n; /* the error or EOF repeats next call */
		got += (size_t)n;
		if (n < REC_MAX && tt->rpos == tt->rlen)
			break; /* (records already read ahead cost no syscall: go on) */
	}
	return (ssize_t)got;
}

/* Advance (*i, *off) through @iov by @n bytes. */
static void iov_advance(const struct iovec *iov, int *i, size_t *off, size_t n)
{
	while (n) {
		size_t k = NBDV_MIN(n, iov[*i].iov_len - *off);
		*off += k;
		n -= k;
		if (*off == iov[*i].iov_len) {
			(*i)++;
			*off = 0;
		}
	}
}

/*
 * GnuTLS's push: one send() per record, pushed at once.  Records of a multi-record
 * reply used to go out with MSG_MORE, leaving in 64 KiB segments: 5% faster for a
 * 1-connection read on one kind of VM host, but on another 12-22% more server CPU per
 * GiB and 10-28% slower at one connection, the client being fed in bursts it then
 * slept between (bench/results/analysis.md, "Third cost").
 */
static ssize_t tls_push(gnutls_transport_ptr_t ptr, const void *buf, size_t len)
{
	struct tls_transport *tt = ptr;

	return send(tt->base.fd, buf, len, MSG_NOSIGNAL);
}

static void rstage_release(struct tls_transport *tt)
{
	nbdv_buf_free(tt->rstage);
	tt->rstage = NULL;
	tt->rpos = tt->rlen = 0;
}

/*
 * GnuTLS's pull.  GnuTLS asks for exactly what it lacks: a record's 5-byte header,
 * then its body, so a stream of small records (request headers, 4 KiB WRITEs) costs
 * two recv() per record.  While records are small, one recv() reads up to 64 KiB
 * ahead into a pool buffer and the asks are served from it; bodies of large records,
 * and the headers between them, go straight into GnuTLS's buffer as before, so bulk
 * transfers gain no copy.  The buffer goes back to the pool as soon as it is drained:
 * an idle connection holds none.
 */
static ssize_t tls_pull(gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
	struct tls_transport *tt = ptr;
	size_t n;

	if (len > TLS_HEADER)
		tt->rbulk = len > PULL_SMALL;
	if (tt->rpos == tt->rlen) {
		ssize_t got;
		int e;

		if (tt->rbulk || (!tt->rstage && !(tt->rstage = nbdv_buf_alloc(PULL_STAGE)))) {
			got = recv(tt->base.fd, buf, len, 0);
			if (got > 0)
				tt->pulled += (uint64_t)got;
			return got;
		}
		got = recv(tt->base.fd, tt->rstage, PULL_STAGE, 0);
		if (got <= 0) {
			e = errno;
			rstage_release(tt);
			errno = e; /* GnuTLS reads EAGAIN from errno */
			return got;
		}
		tt->rpos = 0;
		tt->rlen = (size_t)got;
	}
	n = NBDV_MIN(len, tt->rlen - tt->rpos);
	memcpy(buf, tt->rstage + tt->rpos, n);
	tt->rpos += n;
	tt->pulled += n;
	if (tt->rpos == tt->rlen)
		rstage_release(tt);
	return (ssize_t)n;
}

/* Only for GnuTLS's own waits (none on a non-blocking session): poll the socket. */
static int tls_pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
	struct tls_transport *tt = ptr;
	struct pollfd p = {.fd = tt->base.fd, .events = POLLIN};

	if (tt->rpos < tt->rlen)
		return 1;
	return poll(&p, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
}

/*
 * Small pieces (reply headers and short payloads) are gathered here into one record.
 * One buffer per thread, not per connection: an idle TLS connection holds no page of
 * it (16 KiB of RSS each when it was per connection).  Sharing it between the
 * connections of a reactor is safe because GnuTLS never reads the data again once
 * it has encrypted it: after GNUTLS_E_AGAIN the record waits in GnuTLS's own buffer,
 * and the repeated call (same pointer and length, as the manual asks) only flushes it.
 * tls_sendv() does not use @more: every record is pushed at once (tls_push).
 */
static __thread unsigned char gather[REC_MAX];

static ssize_t tls_sendv(struct nbdv_transport *t, const struct iovec *iov, int iovcnt, bool more)
{
	struct tls_transport *tt = to_tt(t);
	size_t total = 0, off = 0;
	int i = 0;

	while (total < SEND_BUDGET) {
		const void *p;
		size_t n;
		ssize_t r;

		while (i < iovcnt && off == iov[i].iov_len) {
			i++;
			off = 0;
		}
		if (tt->pend_len) {
			/* Repeat exactly what GnuTLS was offered: it is the head of @iov. */
			p = tt->pend_ptr;
			n = tt->pend_len;
		} else if (i == iovcnt) {
			break;
		} else if (iov[i].iov_len - off >= REC_MAX || i == iovcnt - 1) {
			p = (const char *)iov[i].iov_base + off;
			n = NBDV_MIN(iov[i].iov_len - off, (size_t)REC_MAX);
		} else {
			/* Several small pieces (reply headers): one record, not one each. */
			int j = i;
			size_t o = off;

			n = 0;
			while (j < iovcnt && n < REC_MAX) {
				size_t k = NBDV_MIN(iov[j].iov_len - o, (size_t)REC_MAX - n);
				memcpy(gather + n, (const char *)iov[j].iov_base + o, k);
				n += k;
				o += k;
				if (o == iov[j].iov_len) {
					j++;
					o = 0;
				}
			}
			p = gather;
		}
		r = gnutls_record_send(tt->s, p, n);
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
			tt->pend_ptr = p;
			tt->pend_len = n;
			return total ? (ssize_t)total : -EAGAIN;
		}
		if (r < 0) {
			snprintf(tt->why, sizeof(tt->why), "%s", gnutls_strerror((int)r));
			return -EPIPE;
		}
		tt->pend_len = 0;
		total += (size_t)r;
		iov_advance(iov, &i, &off, (size_t)r);
	}
	return (ssize_t)total;
}

/* Plaintext GnuTLS holds, or ciphertext read ahead: either way no epoll event will
 * announce it. */
static bool tls_pending(struct nbdv_transport *t)
{
	struct tls_transport *tt = to_tt(t);

	return gnutls_record_check_pending(tt->s) > 0 || tt->rpos < tt->rlen;
}

/* A record begun in GnuTLS's buffer may hold up to REC_MAX of what is still missing. */
static size_t tls_held(struct nbdv_transport *t)
{
	struct tls_transport *tt = to_tt(t);

	return gnutls_record_check_pending(tt->s) + (tt->rlen - tt->rpos) + REC_MAX;
}

static void tls_shutdown(struct nbdv_transport *t)
{
	struct tls_transport *tt = to_tt(t);

	/* close_notify, best effort: the socket is non-blocking and about to close. */
	if (tt->done)
		(void)gnutls_bye(tt->s, GNUTLS_SHUT_WR);
	shutdown(t->fd, SHUT_WR);
}

static void tls_free_transport(struct nbdv_transport *t)
{
	struct tls_transport *tt = to_tt(t);

	gnutls_deinit(tt->s);
	tls_unref(tt->creds);
	rstage_release(tt);
	free(tt);
}

static const struct nbdv_transport_ops tls_ops = {
    .name = "tls",
    .recv = tls_recv,
    .sendv = tls_sendv,
    .held = tls_held,
    .pending = tls_pending,
    .shutdown = tls_shutdown,
    .free = tls_free_transport,
};

struct nbdv_transport *tls_transport_new(struct nbdv_tls *creds, int fd)
{
	struct tls_transport *tt = calloc(1, sizeof(*tt));
	int r;

	if (!tt)
		return NULL;
	r = gnutls_init(&tt->s, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
	if (r < 0) {
		log_err("gnutls_init: %s", gnutls_strerror(r));
		free(tt);
		return NULL;
	}
	tt->base.ops = &tls_ops;
	tt->base.fd = fd;
	tt->creds = tls_ref(creds);
	gnutls_session_set_ptr(tt->s, tt);
	r = gnutls_priority_set(tt->s, creds->prio);
	if (r == 0 && creds->x509) {
		r = gnutls_credentials_set(tt->s, GNUTLS_CRD_CERTIFICATE, creds->x509);
		gnutls_certificate_server_set_request(
		    tt->s, creds->verify_clients ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_IGNORE);
	}
	if (r == 0 && creds->psk)
		r = gnutls_credentials_set(tt->s, GNUTLS_CRD_PSK, creds->psk);
	if (r == 0 && creds->ticket_key.data)
		r = gnutls_session_ticket_enable_server(tt->s, &creds->ticket_key);
	if (r < 0) {
		log_err("TLS session set-up: %s", gnutls_strerror(r));
		tls_free_transport(&tt->base);
		return NULL;
	}
	gnutls_transport_set_ptr(tt->s, tt);
	gnutls_transport_set_push_function(tt->s, tls_push);
	gnutls_transport_set_pull_function(tt->s, tls_pull);
	gnutls_transport_set_pull_timeout_function(tt->s, tls_pull_timeout);
	return &tt->base;
}

int tls_handshake(struct nbdv_transport *t, const char **why)
{
	struct tls_transport *tt = to_tt(t);
	int r;

	/*
	 * GnuTLS returns GNUTLS_E_AGAIN after a record that held only part of a handshake
	 * message, even when the next records are already here: read ahead into rstage,
	 * where no socket event will ever announce them.  A ClientHello cut into small
	 * records (a 24 KiB client certificate is several records too) then stalled until
	 * the handshake deadline.  So go on while GnuTLS wants to read, ciphertext is
	 * staged, and each call consumes some of it.  (Progress is counted in bytes pulled:
	 * the stage's address and offset could repeat, as the pool hands the same buffer
	 * back, and then a call that did consume looked as if it had not; TLS 1.2
	 * handshakes cut into tiny records stalled that way.)
	 */
	for (;;) {
		uint64_t pulled = tt->pulled;

		r = gnutls_handshake(tt->s);
		if ((r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED) ||
		    gnutls_record_get_direction(tt->s) != 0 || tt->rpos >= tt->rlen ||
		    tt->pulled == pulled)
			break;
	}
	if (r == 0) {
		tt->done = true;
		return 0;
	}
	if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
		return -EAGAIN;
	if (!tt->why[0] || r != GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
		snprintf(tt->why + strlen(tt->why), sizeof(tt->why) - strlen(tt->why), "%s%s",
			 tt->why[0] ? ": " : "", gnutls_strerror(r));
	*why = tt->why;
	return -EPROTO;
}

bool tls_wants_write(struct nbdv_transport *t)
{
	return gnutls_record_get_direction(to_tt(t)->s) == 1;
}

static char *peer_dn_field(gnutls_x509_crt_t crt)
{
	char buf[512];
	size_t size = sizeof(buf);

	if (gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, buf, &size) < 0)
		return NULL;
	return strdup(buf);
}

void tls_peer_info(struct nbdv_transport *t, struct nbdv_tls_peer *peer)
{
	struct tls_transport *tt = to_tt(t);
	const char *s;

	memset(peer, 0, sizeof(*peer));
	s = gnutls_protocol_get_name(gnutls_protocol_get_version(tt->s));
	snprintf(peer->protocol, sizeof(peer->protocol), "%s", s ? s : "unknown");
	s = gnutls_cipher_get_name(gnutls_cipher_get(tt->s));
	snprintf(peer->cipher, sizeof(peer->cipher), "%s", s ? s : "unknown");
	peer->resumed = gnutls_session_is_resumed(tt->s) != 0;
	if (gnutls_auth_get_type(tt->s) == GNUTLS_CRD_PSK) {
		s = gnutls_psk_server_get_username(tt->s);
		peer->psk_user = s ? strdup(s) : NULL;
		return;
	}
	if (tt->creds->verify_clients) {
		unsigned n = 0;
		const gnutls_datum_t *certs = gnutls_certificate_get_peers(tt->s, &n);
		gnutls_x509_crt_t crt;
		gnutls_datum_t dn;

		if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0)
			return;
		if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0) {
			peer->cn = peer_dn_field(crt);
			if (gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0) {
				peer->dn = strdup((const char *)dn.data);
				gnutls_free(dn.data);
			}
		}
		gnutls_x509_crt_deinit(crt);
	}
}

void tls_peer_clear(struct nbdv_tls_peer *peer)
{
	free(peer->psk_user);
	free(peer->cn);
	free(peer->dn);
	memset(peer, 0, sizeof(*peer));
}

const char *tls_peer_identity(const struct nbdv_tls_peer *peer, char *buf, size_t len)
{
	if (peer->psk_user)
		snprintf(buf, len, "psk:%s", peer->psk_user);
	else if (peer->dn)
		snprintf(buf, len, "dn:%s", peer->dn);
	else
		snprintf(buf, len, "anonymous");
	return buf;
}

bool tls_peer_matches(const struct nbdv_tls_peer *peer, const char *id)
{
	if (strncmp(id, "cn:", 3) == 0)
		return peer->cn && strcmp(peer->cn, id + 3) == 0;
	if (strncmp(id, "dn:", 3) == 0)
		return peer->dn && strcmp(peer->dn, id + 3) == 0;
	if (strncmp(id, "psk:", 4) == 0)
		return peer->psk_user && strcmp(peer->psk_user, id + 4) == 0;
	return false;
}
