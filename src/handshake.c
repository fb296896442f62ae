/*
 * nbdvault - fixed-newstyle handshake and option haggling (NBD spec, "Handshake").
 *
 * Each option arrives whole, already bounded by NBDV_MAX_OPTION; every length inside
 * it is checked against what is left before it is used.  Replies never echo more than
 * a short, escaped part of a client string (CVE-2020-10761 class).
 */
#include "build-config.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "audit.h"
#include "config.h"
#include "conn.h"
#include "export.h"
#include "handshake.h"
#include "log.h"
#include "protonames.h"
#include "protocol.h"
#include "server.h"

#define META_BASE_ALLOCATION	"base:allocation"
#define META_BASE_ALLOCATION_ID 1

/* Queue one option reply whose data is the @n pieces of @v (at most 3), copied. */
static int opt_replyv(struct nbdv_conn *c, uint32_t opt, uint32_t type, const struct iovec *v,
		      int n)
{
	struct nbd_fixed_new_option_reply h = {
	    .magic = htobe64(NBD_REP_MAGIC),
	    .option = htobe32(opt),
	    .reply = htobe32(type),
	};
	struct nbdv_outmsg *m;
	size_t len = 0;

	for (int i = 0; i < n; i++)
		len += v[i].iov_len;
	h.replylen = htobe32((uint32_t)len);
	m = outmsg_new(sizeof(h) + len);
	if (!m || outmsg_add_copy(m, &h, sizeof(h)) < 0)
		goto err;
	for (int i = 0; i < n; i++) {
		if (outmsg_add_copy(m, v[i].iov_base, v[i].iov_len) < 0)
			goto err;
	}
	conn_queue(c, m);
	return 0;
err:
	outmsg_free(m);
	return -ENOMEM;
}

/* Queue one option reply made of up to two pieces of data. */
static int opt_reply2(struct nbdv_conn *c, uint32_t opt, uint32_t type, const void *a, size_t alen,
		      const void *b, size_t blen)
{
	struct iovec v[] = {{(void *)a, alen}, {(void *)b, blen}};

	return opt_replyv(c, opt, type, v, 2);
}

static int opt_reply(struct nbdv_conn *c, uint32_t opt, uint32_t type, const void *data, size_t len)
{
	return opt_reply2(c, opt, type, data, len, NULL, 0);
}

/* Error reply with a short human-readable message; returns HS_CONTINUE or HS_CLOSE. */
NBDV_PRINTF(4, 5)
static enum hs_result opt_error(struct nbdv_conn *c, uint32_t opt, uint32_t type, const char *fmt,
				...)
{
	char msg[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	log_debug("c%u: %s: %s: %s", c->id, nbd_opt_name(opt), nbd_rep_name(type), msg);
	if (opt_reply(c, opt, type, msg, NBDV_MIN((size_t)n, sizeof(msg) - 1)) < 0)
		return HS_CLOSE;
	return HS_CONTINUE;
}

static uint32_t get_be32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return be32toh(v);
}

static uint16_t get_be16(const uint8_t *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return be16toh(v);
}

int handshake_greeting(struct nbdv_conn *c)
{
	struct nbd_new_handshake g = {
	    .nbdmagic = htobe64(NBD_MAGIC),
	    .version = htobe64(NBD_IHAVEOPT),
	    .gflags = htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
	};
	struct nbdv_outmsg *m = outmsg_new(sizeof(g));

	if (!m || outmsg_add_copy(m, &g, sizeof(g)) < 0) {
		outmsg_free(m);
		return -ENOMEM;
	}
	conn_queue(c, m);
	return 0;
}

static enum hs_result handshake_client_flags(struct nbdv_conn *c, uint32_t flags)
{
	if (flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		/* Spec: the server MUST drop the connection on unknown client flags. */
		log_info("c%u: unknown client flags 0x%x, closing", c->id, flags);
		return HS_CLOSE;
	}
	c->sess.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
	return HS_CONTINUE;
}

static void handshake_option_too_big(struct nbdv_conn *c, uint32_t opt, uint32_t len)
{
	log_info("c%u: %s with %u bytes of data (limit %u), closing", c->id, nbd_opt_name(opt), len,
		 NBDV_MAX_OPTION);
	(void)opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "option data too long (limit %u bytes)",
			NBDV_MAX_OPTION);
}

/* A wire string is valid if it has no NUL byte (spec "Conventions"). */
static bool valid_string(const uint8_t *s, uint32_t len)
{
	return memchr(s, '\0', len) == NULL;
}

static struct nbdv_export *find_export(struct nbdv_conn *c, const uint8_t *name, uint32_t len)
{
	struct nbdv_server *srv = c->srv;
	return exports_find(srv->exports, srv->n_exports, srv->live, (const char *)name, len);
}

/* Has the TLS requirement for @e been met on this connection? */
static bool tls_satisfied(const struct nbdv_conn *c, const struct nbdv_export *e)
{
	switch (c->srv->cfg->tls.mode) {
	case TLS_OFF:
		return true;
	case TLS_OPTIONAL:
		return c->tls_up || !e->cfg->tls_required;
	case TLS_REQUIRE:
	default:
		return c->tls_up;
	}
}

/* Is the client's TLS identity on @e's allow-list (or has @e none)? */
static bool identity_allowed(const struct nbdv_conn *c, const struct nbdv_export *e)
{
	if (!e->cfg->n_allow)
		return true;
	if (!c->tls_up)
		return false;
	for (size_t i = 0; i < e->cfg->n_allow; i++) {
		if (tls_peer_matches(&c->sess.peer, e->cfg->allow[i]))
			return true;
	}
	return false;
}

/*
 * Refuse @opt on @e unless TLS and the allow-list permit it; returns true when a
 * refusal was queued (*res says how to go on).  Runs before the driver is opened.
 */
static bool refuse_export(struct nbdv_conn *c, uint32_t opt, const struct nbdv_export *e,
			  enum hs_result *res)
{
	if (!tls_satisfied(c, e)) {
		conn_audit_refusal(c, nbd_opt_name(opt), e->cfg->name, "the export requires TLS");
		*res = opt_error(c, opt, NBD_REP_ERR_TLS_REQD, "this export requires TLS");
		return true;
	}
	if (!identity_allowed(c, e)) {
		log_info("c%u: %s: client identity not allowed for export %s", c->id,
			 nbd_opt_name(opt), e->cfg->name);
		conn_audit_refusal(c, nbd_opt_name(opt), e->cfg->name,
				   "identity not in the export's allow list");
		*res =
		    opt_error(c, opt, NBD_REP_ERR_POLICY, "access to this export is not allowed");
		return true;
	}
	return false;
}

static enum hs_result opt_list(struct nbdv_conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
	struct nbdv_server *srv = c->srv;

	if (len != 0)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "LIST takes no data");
	for (size_t i = 0; i < srv->n_exports; i++) {
		const struct nbdv_export_cfg *e = srv->exports[i].cfg;

		if (srv->exports[i].removed)
			continue;
		size_t nlen = strlen(e->name);
		size_t dlen = e->description ? strlen(e->description) : 0;
		uint32_t be = htobe32((uint32_t)nlen);
		/* What follows the name is shown to people: the export's description. */
		struct iovec v[] = {{&be, 4}, {e->name, nlen}, {e->description, dlen}};
		int r;

		/* Exports this client may not open are not even named (spec: MAY omit). */
		if (!tls_satisfied(c, &srv->exports[i]) || !identity_allowed(c, &srv->exports[i]))
			continue;
		r = opt_replyv(c, opt, NBD_REP_SERVER, v, 3);
		if (r < 0)
			return HS_CLOSE;
	}
	return opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0 ? HS_CLOSE : HS_CONTINUE;
}

static int send_info(struct nbdv_conn *c, uint32_t opt, uint16_t type, const void *data, size_t len)
{
	uint16_t be = htobe16(type);
	return opt_reply2(c, opt, NBD_REP_INFO, &be, 2, data, len);
}

/* NBD_OPT_INFO and NBD_OPT_GO: name, then a list of requested NBD_INFO_* types. */
bool handshake_export_allowed(const struct nbdv_conn *c, const struct nbdv_export *e)
{
	return tls_satisfied(c, e) && identity_allowed(c, e);
}

/* The audit log's record of an export opened for transmission. */
static void audit_open_export(const struct nbdv_conn *c, const struct nbdv_export *e)
{
	char id[320];

	if (audit_enabled())
		audit_event("export-open", c->id, "ssb", "export", e->cfg->name, "identity",
			    c->tls_up ? tls_peer_identity(&c->sess.peer, id, sizeof(id))
				      : "none (no TLS)",
			    "readonly", (c->sess.tflags & NBD_FLAG_READ_ONLY) != 0);
}

/* Transmission flags for @e on @c: the export's, plus RESIZE where it is allowed. */
static uint16_t tflags_for(const struct nbdv_conn *c, const struct nbdv_export *e, uint32_t caps)
{
	uint16_t f = export_tflags(caps, c->sess.structured, c->sess.extended);

	if (e->cfg->resizable && e->cfg->drv->resize)
		f |= NBD_FLAG_SEND_RESIZE;
	return f;
}

static enum hs_result opt_info_go(struct nbdv_conn *c, uint32_t opt, const uint8_t *data,
				  uint32_t len)
{
	struct nbdv_export *e;
	uint32_t namelen;
	uint16_t nreq;
	bool want_name = false, want_desc = false;
	const struct nbdv_dev *dev = NULL;
	enum hs_result res;
	uint64_t size;
	uint32_t caps;
	char shown[80];
	int r;

	if (len < 6)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "option data too short");
	namelen = get_be32(data);
	if (namelen > len - 6)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "name length exceeds option length");
	if (namelen > NBD_MAX_STRING)
		return opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "export name longer than %d bytes",
				 NBD_MAX_STRING);
	nreq = get_be16(data + 4 + namelen);
	if (len != 6 + namelen + 2U * nreq)
		return opt_error(c, opt, NBD_REP_ERR_INVALID,
				 "information request count does not match option length");
	if (!valid_string(data + 4, namelen))
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "export name contains NUL");
	for (uint16_t i = 0; i < nreq; i++) {
		uint16_t t = get_be16(data + 6 + namelen + 2U * i);
		want_name |= t == NBD_INFO_NAME;
		want_desc |= t == NBD_INFO_DESCRIPTION;
	}
	log_printable((const char *)data + 4, namelen, shown, sizeof(shown));
	e = find_export(c, data + 4, namelen);
	if (!e)
		return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found", shown);
	if (refuse_export(c, opt, e, &res))
		return res;
	/* INFO describes without opening; only GO opens the export's storage. */
	if (opt == NBD_OPT_GO) {
		r = export_open(e, &dev);
		size = r == 0 ? dev->size : 0;
		caps = r == 0 ? dev->caps : 0;
	} else {
		r = export_describe(e, &size, &caps);
	}
	if (r < 0)
		return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' is not available: %s",
				 shown, strerror(-r));

	{
		struct nbd_info_export ie = {
		    .info = htobe16(NBD_INFO_EXPORT),
		    .exportsize = htobe64(size),
		    .eflags = htobe16(tflags_for(c, e, caps)),
		};
		if (opt_reply(c, opt, NBD_REP_INFO, &ie, sizeof(ie)) < 0)
			return HS_CLOSE;
	}
	if (want_name && send_info(c, opt, NBD_INFO_NAME, e->cfg->name, strlen(e->cfg->name)) < 0)
		return HS_CLOSE;
	if (want_desc && e->cfg->description &&
	    send_info(c, opt, NBD_INFO_DESCRIPTION, e->cfg->description,
		      strlen(e->cfg->description)) < 0)
		return HS_CLOSE;
	{
		struct nbd_info_block_size bs = {
		    .info = htobe16(NBD_INFO_BLOCK_SIZE),
		    .minimum = htobe32(e->cfg->min_block),
		    .preferred = htobe32(NBDV_MAX(4096U, e->cfg->min_block)),
		    .maximum = htobe32(c->lim->max_request),
		};
		if (opt_reply(c, opt, NBD_REP_INFO, &bs, sizeof(bs)) < 0)
			return HS_CLOSE;
	}
	if (opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0)
		return HS_CLOSE;
	if (opt == NBD_OPT_INFO)
		return HS_CONTINUE;

	/* GO: contexts chosen for another export do not carry over. */
	if (c->sess.meta_export != e)
		c->sess.meta_alloc = false;
	c->sess.exp = e;
	c->sess.dev = dev;
	c->sess.told_size = dev->size;
	__atomic_add_fetch(&e->sessions, 1, __ATOMIC_RELAXED);
	c->sess.tflags = tflags_for(c, e, dev->caps);
	audit_open_export(c, e);
	log_info("c%u: serving export %s (%s%s)", c->id, e->cfg->name,
		 c->sess.extended     ? "extended headers"
		 : c->sess.structured ? "structured replies"
				      : "simple replies",
		 c->sess.meta_alloc ? ", base:allocation" : "");
	return HS_TRANSMISSION;
}

static enum hs_result opt_export_name(struct nbdv_conn *c, const uint8_t *data, uint32_t len)
{
	static const uint8_t zeroes[124];
	struct nbd_export_name_reply r;
	const struct nbdv_dev *dev;
	struct nbdv_export *e;
	char shown[80];
	struct nbdv_outmsg *m;

	/* This option cannot fail politely: every refusal is a disconnect (spec). */
	log_printable((const char *)data, NBDV_MIN(len, 200U), shown, sizeof(shown));
	if (len > NBD_MAX_STRING || !valid_string(data, len)) {
		log_info("c%u: EXPORT_NAME with an invalid name, closing", c->id);
		return HS_CLOSE;
	}
	e = find_export(c, data, len);
	if (e && (!tls_satisfied(c, e) || !identity_allowed(c, e))) {
		log_info("c%u: EXPORT_NAME '%s': refused by TLS policy, closing", c->id, shown);
		conn_audit_refusal(c, "EXPORT_NAME", e->cfg->name, "refused by TLS policy");
		return HS_CLOSE;
	}
	if (!e || export_open(e, &dev) < 0) {
		log_info("c%u: EXPORT_NAME '%s': no such export, closing", c->id, shown);
		return HS_CLOSE;
	}
	c->sess.structured = false; /* EXPORT_NAME clients get simple replies only */
	c->sess.meta_alloc = false;
	c->sess.exp = e;
	c->sess.dev = dev;
	c->sess.told_size = dev->size;
	__atomic_add_fetch(&e->sessions, 1, __ATOMIC_RELAXED);
	c->sess.tflags = tflags_for(c, e, dev->caps);
	r.exportsize = htobe64(dev->size);
	r.eflags = htobe16(c->sess.tflags);
	audit_open_export(c, e);
	m = outmsg_new(sizeof(r) + sizeof(zeroes));
	if (!m || outmsg_add_copy(m, &r, sizeof(r)) < 0 ||
	    (!c->sess.no_zeroes && outmsg_add_copy(m, zeroes, sizeof(zeroes)) < 0)) {
		outmsg_free(m);
		return HS_CLOSE;
	}
	conn_queue(c, m);
	log_info("c%u: serving export %s (EXPORT_NAME, simple replies)", c->id, e->cfg->name);
	return HS_TRANSMISSION;
}

/* Does @q (length @qlen) select base:allocation?  For LIST, "base:" lists the namespace. */
static bool meta_query_matches(const uint8_t *q, uint32_t qlen, bool list)
{
	static const char full[] = META_BASE_ALLOCATION;

	if (qlen == sizeof(full) - 1 && memcmp(q, full, qlen) == 0)
		return true;
	return list && qlen == 5 && memcmp(q, "base:", 5) == 0;
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: name, count, then queries. */
static enum hs_result opt_meta_context(struct nbdv_conn *c, uint32_t opt, const uint8_t *data,
				       uint32_t len)
{
	bool list = opt == NBD_OPT_LIST_META_CONTEXT;
	const uint8_t *p = data, *end = data + len;
	struct nbdv_export *e;
	uint32_t namelen, nq;
	enum hs_result res;
	bool match = false;

	if (!c->sess.structured)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "negotiate structured replies first");
	if (len < 8)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "option data too short");
	namelen = get_be32(p);
	p += 4;
	if (namelen > (uint32_t)(end - p) - 4)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "name length exceeds option length");
	if (namelen > NBD_MAX_STRING)
		return opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "export name longer than %d bytes",
				 NBD_MAX_STRING);
	if (!valid_string(p, namelen))
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "export name contains NUL");
	e = find_export(c, p, namelen);
	p += namelen;
	nq = get_be32(p);
	p += 4;
	if (nq > (uint32_t)(end - p) / 4)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "query count exceeds option length");
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t qlen;
		if (end - p < 4)
			return opt_error(c, opt, NBD_REP_ERR_INVALID, "truncated query");
		qlen = get_be32(p);
		p += 4;
		if (qlen > (uint32_t)(end - p))
			return opt_error(c, opt, NBD_REP_ERR_INVALID,
					 "query length exceeds option length");
		if (qlen > NBD_MAX_STRING)
			return opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "query longer than %d bytes",
					 NBD_MAX_STRING);
		if (!valid_string(p, qlen))
			return opt_error(c, opt, NBD_REP_ERR_INVALID, "query contains NUL");
		match |= meta_query_matches(p, qlen, list);
		p += qlen;
	}
	if (p != end)
		return opt_error(c, opt, NBD_REP_ERR_INVALID, "trailing bytes after the queries");
	if (!e)
		return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export not found");
	if (refuse_export(c, opt, e, &res))
		return res;
	if (list && nq == 0)
		match = true; /* an empty query lists every context */
	if (match) {
		uint32_t id = htobe32(list ? 0 : META_BASE_ALLOCATION_ID);
		if (opt_reply2(c, opt, NBD_REP_META_CONTEXT, &id, 4, META_BASE_ALLOCATION,
			       strlen(META_BASE_ALLOCATION)) < 0)
			return HS_CLOSE;
	}
	if (!list) {
		/* SET replaces the previous selection, even with an empty one. */
		c->sess.meta_alloc = match;
		c->sess.meta_export = e;
	}
	return opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0 ? HS_CLOSE : HS_CONTINUE;
}

enum hs_result handshake_option(struct nbdv_conn *c, uint32_t opt, const uint8_t *data,
				uint32_t len)
{
	log_debug("c%u: option %s, %u bytes", c->id, nbd_opt_name(opt), len);
	if (c->draining && opt != NBD_OPT_ABORT) {
		/* Shutting down: the spec's answer to any option, then close. */
		(void)opt_error(c, opt, NBD_REP_ERR_SHUTDOWN, "the server is shutting down");
		return HS_CLOSE;
	}
	if (c->srv->cfg->tls.mode == TLS_REQUIRE && !c->tls_up && opt != NBD_OPT_STARTTLS &&
	    opt != NBD_OPT_ABORT) {
		/* FORCEDTLS: nothing is processed in plaintext (CVE-2019-14850 class). */
		conn_audit_refusal(c, nbd_opt_name(opt), NULL, "TLS is required: no STARTTLS yet");
		if (opt == NBD_OPT_EXPORT_NAME) {
			log_info("c%u: EXPORT_NAME before STARTTLS, closing", c->id);
			return HS_CLOSE;
		}
		return opt_error(c, opt, NBD_REP_ERR_TLS_REQD, "TLS is required: send STARTTLS");
	}
	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
		if (c->sess.extended) {
			/* It cannot answer in extended headers: the spec forbids it after them. */
			log_info("c%u: EXPORT_NAME after extended headers, closing", c->id);
			return HS_CLOSE;
		}
		return opt_export_name(c, data, len);
	case NBD_OPT_ABORT:
		(void)opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
		return HS_CLOSE;
	case NBD_OPT_LIST:
		return opt_list(c, opt, data, len);
	case NBD_OPT_STARTTLS:
		if (len != 0)
			return opt_error(c, opt, NBD_REP_ERR_INVALID, "STARTTLS takes no data");
		if (c->srv->cfg->tls.mode == TLS_OFF)
			return opt_error(c, opt, NBD_REP_ERR_POLICY,
					 "TLS is not enabled on this server");
		if (c->tls_started)
			return opt_error(c, opt, NBD_REP_ERR_INVALID, "TLS is already active");
		if (opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0)
			return HS_CLOSE;
		/* Nothing negotiated in plaintext survives into TLS (CVE-2021-3716 class). */
		c->sess.extended = false;
		c->sess.structured = false;
		c->sess.meta_alloc = false;
		c->sess.meta_export = NULL;
		return HS_STARTTLS;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		return opt_info_go(c, opt, data, len);
	case NBD_OPT_STRUCTURED_REPLY:
		if (len != 0)
			return opt_error(c, opt, NBD_REP_ERR_INVALID,
					 "STRUCTURED_REPLY takes no data");
		if (c->sess.extended)
			return opt_error(c, opt, NBD_REP_ERR_EXT_HEADER_REQD,
					 "extended headers are already on");
		c->sess.structured = true;
		return opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0 ? HS_CLOSE : HS_CONTINUE;
	case NBD_OPT_EXTENDED_HEADERS:
		if (len != 0)
			return opt_error(c, opt, NBD_REP_ERR_INVALID,
					 "EXTENDED_HEADERS takes no data");
		if (c->sess.extended)
			return opt_error(c, opt, NBD_REP_ERR_INVALID,
					 "extended headers are already on");
		/* They take precedence over structured replies and imply them. */
		c->sess.extended = true;
		c->sess.structured = true;
		return opt_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0 ? HS_CLOSE : HS_CONTINUE;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return opt_meta_context(c, opt, data, len);
	default:
		return opt_error(c, opt, NBD_REP_ERR_UNSUP, "option %u is not supported", opt);
	}
}

/*
 * Hand one option to handshake_option() in a buffer of exactly its size, so that a
 * parser reading past the option's end is caught by AddressSanitizer (tests, fuzzing)
 * instead of silently reading the next bytes of the input buffer.  Options are rare;
 * the copy costs nothing that matters.
 */
static enum hs_result option_in_own_buffer(struct nbdv_conn *c, const uint8_t *p)
{
	uint8_t *copy = malloc(c->optlen ? c->optlen : 1);
	enum hs_result r;

	if (!copy)
		return HS_CLOSE;
	memcpy(copy, p, c->optlen);
	r = handshake_option(c, c->opt, copy, c->optlen);
	free(copy);
	return r;
}

enum hs_result handshake_input(struct nbdv_conn *c, const uint8_t *p, size_t len, size_t *used)
{
	enum hs_result r;

	*used = 0;
	switch (c->rx) {
	case RX_CLIENT_FLAGS: {
		uint32_t flags;

		if (len < 4)
			return HS_NEED_MORE;
		memcpy(&flags, p, 4);
		*used = 4;
		if (handshake_client_flags(c, be32toh(flags)) == HS_CLOSE)
			return HS_ABORT;
		c->rx = RX_OPT_HEADER;
		return HS_CONTINUE;
	}
	case RX_OPT_HEADER: {
		struct nbd_option o;

		if (len < sizeof(o))
			return HS_NEED_MORE;
		memcpy(&o, p, sizeof(o));
		*used = sizeof(o);
		if (be64toh(o.version) != NBD_IHAVEOPT) {
			log_info("c%u: bad option magic, closing", c->id);
			return HS_ABORT;
		}
		c->opt = be32toh(o.option);
		c->optlen = be32toh(o.optlen);
		if (c->optlen > NBDV_MAX_OPTION) {
			/* Bounded before anything is allocated or skipped. */
			handshake_option_too_big(c, c->opt, c->optlen);
			return HS_CLOSE;
		}
		c->rx = RX_OPT_DATA;
		return HS_CONTINUE;
	}
	case RX_OPT_DATA:
		if (len < c->optlen)
			return HS_NEED_MORE;
		*used = c->optlen;
		c->rx = RX_OPT_HEADER;
		r = option_in_own_buffer(c, p);
		if (r == HS_CLOSE)
			conn_reason(c, "option phase ended (ABORT or refusal)");
		return r;
	default:
		return HS_ABORT; /* (not an option-phase state: cannot happen) */
	}
}
