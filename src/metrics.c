/*
 * nbdvault - Prometheus text exposition at /metrics, through libmicrohttpd.
 *
 * The HTTP side is libmicrohttpd's (a well-kept parser, in Debian), on its own thread,
 * so a slow scraper never holds a reactor.  The listening socket is bound before the
 * sandbox closes and handed to the daemon, which starts after it (so its thread is
 * inside the sandbox too).
 */
#include "build-config.h"

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <microhttpd.h>

#include "buf.h"
#include "config.h"
#include "export.h"
#include "log.h"
#include "metrics.h"
#include "protocol.h"
#include "server.h"

bool nbdv_metrics_on;

static int listen_fd = -1;
static struct MHD_Daemon *daemon_;
static struct nbdv_server *server;

/* Upper bounds of the latency buckets, in seconds. */
static const double bucket_s[METRICS_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
						 0.01,	 0.025,	  0.05,	  0.1,	 0.25,	 1.0};
static const char *const cmd_names[METRICS_COMMANDS] = {
    "read",  "write",	     "disc",	     "flush",  "trim",
    "cache", "write_zeroes", "block_status", "resize", "other"};
static const struct {
	uint32_t nbd;
	const char *name;
} errnos[METRICS_ERRNOS] = {{NBD_EPERM, "EPERM"},
			    {NBD_EIO, "EIO"},
			    {NBD_ENOMEM, "ENOMEM"},
			    {NBD_EINVAL, "EINVAL"},
			    {NBD_ENOSPC, "ENOSPC"},
			    {NBD_EOVERFLOW, "EOVERFLOW"},
			    {NBD_ENOTSUP, "ENOTSUP"},
			    {NBD_ESHUTDOWN, "ESHUTDOWN"},
			    {0, "other"}};

static uint64_t accepted, hs_ok, hs_resumed, hs_failed;

/* Per identity: a small table; a server has few identities, and past the cap every
 * further one counts as "other" so that a client cannot grow it. */
#define MAX_IDENTITIES 256
struct ident {
	char name[200];
	uint64_t connections, refusals, bytes, throttled_ns;
};
static pthread_mutex_t ident_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ident idents[MAX_IDENTITIES + 1];
static unsigned n_idents;

static void add(uint64_t *p, uint64_t v)
{
	__atomic_add_fetch(p, v, __ATOMIC_RELAXED);
}

static uint64_t get(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

void metrics_request(struct nbdv_export_metrics *m, uint16_t type, uint32_t nbd_err,
		     uint64_t read_bytes, uint64_t written_bytes, uint64_t ns)
{
	unsigned b = 0;

	add(&m->requests[type < METRICS_COMMANDS - 1 ? type : METRICS_COMMANDS - 1], 1);
	if (nbd_err) {
		unsigned e = 0;
		while (e < METRICS_ERRNOS - 1 && errnos[e].nbd != nbd_err)
			e++;
		add(&m->errors[e], 1);
	}
	if (read_bytes)
		add(&m->bytes_read, read_bytes);
	if (written_bytes)
		add(&m->bytes_written, written_bytes);
	while (b < METRICS_BUCKETS && (double)ns / 1e9 > bucket_s[b])
		b++;
	add(&m->latency[b], 1);
	add(&m->latency_sum_ns, ns);
}

void metrics_accepted(void)
{
	add(&accepted, 1);
}

void metrics_handshake(const char *outcome)
{
	add(strcmp(outcome, "ok") == 0	      ? &hs_ok
	    : strcmp(outcome, "resumed") == 0 ? &hs_resumed
					      : &hs_failed,
	    1);
}

/* The identity's row (lock held). */
static struct ident *ident_row(const char *name)
{
	for (unsigned i = 0; i < n_idents; i++)
		if (strcmp(idents[i].name, name) == 0)
			return &idents[i];
	if (n_idents < MAX_IDENTITIES) {
		snprintf(idents[n_idents].name, sizeof(idents[n_idents].name), "%s", name);
		return &idents[n_idents++];
	}
	snprintf(idents[MAX_IDENTITIES].name, sizeof(idents[0].name), "other");
	return &idents[MAX_IDENTITIES];
}

/* Add @n to the counter at @field of @identity's row. */
static void ident_add(const char *identity, size_t field, uint64_t n)
{
	uint64_t *p;

	if (!nbdv_metrics_on)
		return;
	pthread_mutex_lock(&ident_lock);
	p = (uint64_t *)((char *)ident_row(identity) + field);
	*p += n;
	pthread_mutex_unlock(&ident_lock);
}

void metrics_identity_connected(const char *identity)
{
	ident_add(identity, offsetof(struct ident, connections), 1);
}

void metrics_identity_refused(const char *identity)
{
	ident_add(identity, offsetof(struct ident, refusals), 1);
}

void metrics_identity_bytes(const char *identity, uint64_t bytes)
{
	ident_add(identity, offsetof(struct ident, bytes), bytes);
}

void metrics_identity_throttled(const char *identity, uint64_t ns)
{
	ident_add(identity, offsetof(struct ident, throttled_ns), ns);
}

/* --- exposition --- */

struct text {
	char *p;
	size_t len, cap;
	bool failed;
};

static void emit(struct text *t, const char *fmt, ...) NBDV_PRINTF(2, 3);

static void emit(struct text *t, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (t->failed)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(t->p + t->len, t->cap - t->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			t->failed = true;
			return;
		}
		if ((size_t)n < t->cap - t->len) {
			t->len += (size_t)n;
			return;
		}
		char *q = realloc(t->p, t->cap * 2 + (size_t)n);
		if (!q) {
			t->failed = true;
			return;
		}
		t->p = q;
		t->cap = t->cap * 2 + (size_t)n;
	}
}

/* A label value with \, " and newlines escaped, as the text format asks. */
static const char *label(const char *s, char *buf, size_t len)
{
	size_t o = 0;

	for (; *s && o + 3 < len; s++) {
		if (*s == '\\' || *s == '"') {
			buf[o++] = '\\';
			buf[o++] = *s;
		} else if (*s == '\n') {
			buf[o++] = '\\';
			buf[o++] = 'n';
		} else {
			buf[o++] = *s;
		}
	}
	buf[o] = '\0';
	return buf;
}

static void head(struct text *t, const char *name, const char *type, const char *help)
{
	emit(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One per-identity counter family (ident_lock held); @field is the counter's offset. */
static void emit_idents(struct text *t, const char *name, const char *help, size_t field)
{
	char e[600];

	head(t, name, "counter", help);
	for (unsigned i = 0; i <= MAX_IDENTITIES; i++) {
		uint64_t v;
		if (!idents[i].name[0])
			continue;
		memcpy(&v, (const char *)&idents[i] + field, sizeof(v));
		emit(t, "%s{identity=\"%s\"} %llu\n", name, label(idents[i].name, e, sizeof(e)),
		     (unsigned long long)v);
	}
}

/*
 * One stall-gate family: @field is the offset of its value in struct nbdv_gate_stats.
 * Exports without a gate (not opened yet, read-only, a driver without pwrite_nowait)
 * have no series.
 */
static void emit_gates(struct text *t, const char *name, const char *type, const char *help,
		       size_t field)
{
	char e[600];

	head(t, name, type, help);
	for (size_t i = 0; i < server->n_exports; i++) {
		struct nbdv_gate_stats g;
		uint64_t v;
		if (!export_gate_stats(&server->exports[i], &g))
			continue;
		memcpy(&v, (const char *)&g + field, sizeof(v));
		emit(t, "%s{export=\"%s\"} %llu\n", name,
		     label(server->exports[i].cfg->name, e, sizeof(e)), (unsigned long long)v);
	}
}

static char *render(size_t *len)
{
	struct text t = {.cap = 16384};
	char e[600];

	t.p = malloc(t.cap);
	if (!t.p)
		return NULL;
	t.p[0] = '\0';
	head(&t, "nbdvault_connections_accepted_total", "counter", "Connections accepted.");
	emit(&t, "nbdvault_connections_accepted_total %llu\n", (unsigned long long)get(&accepted));
	head(&t, "nbdvault_connections_open", "gauge", "Connections open now, in every phase.");
	emit(&t, "nbdvault_connections_open %u\n",
	     __atomic_load_n(&server->n_conns, __ATOMIC_RELAXED));
	head(&t, "nbdvault_tls_handshakes_total", "counter", "TLS handshakes by outcome.");
	emit(&t, "nbdvault_tls_handshakes_total{outcome=\"ok\"} %llu\n",
	     (unsigned long long)get(&hs_ok));
	emit(&t, "nbdvault_tls_handshakes_total{outcome=\"resumed\"} %llu\n",
	     (unsigned long long)get(&hs_resumed));
	emit(&t, "nbdvault_tls_handshakes_total{outcome=\"failed\"} %llu\n",
	     (unsigned long long)get(&hs_failed));
	head(&t, "nbdvault_memory_held_bytes", "gauge",
	     "Memory requests and queued replies hold (limits.max-memory counts it).");
	emit(&t, "nbdvault_memory_held_bytes %zu\n", nbdv_mem_held());

	head(&t, "nbdvault_export_sessions", "gauge", "Connections in transmission, by export.");
	for (size_t i = 0; i < server->n_exports; i++)
		emit(&t, "nbdvault_export_sessions{export=\"%s\"} %u\n",
		     label(server->exports[i].cfg->name, e, sizeof(e)),
		     __atomic_load_n(&server->exports[i].sessions, __ATOMIC_RELAXED));
	head(&t, "nbdvault_export_requests_total", "counter", "Requests, by export and command.");
	for (size_t i = 0; i < server->n_exports; i++)
		for (unsigned c = 0; c < METRICS_COMMANDS; c++)
			emit(&t,
			     "nbdvault_export_requests_total{export=\"%s\",command=\"%s\"} %llu\n",
			     label(server->exports[i].cfg->name, e, sizeof(e)), cmd_names[c],
			     (unsigned long long)get(&server->exports[i].metrics.requests[c]));
	head(&t, "nbdvault_export_errors_total", "counter",
	     "Requests answered with an error, by export and NBD error.");
	for (size_t i = 0; i < server->n_exports; i++)
		for (unsigned k = 0; k < METRICS_ERRNOS; k++)
			emit(&t, "nbdvault_export_errors_total{export=\"%s\",errno=\"%s\"} %llu\n",
			     label(server->exports[i].cfg->name, e, sizeof(e)), errnos[k].name,
			     (unsigned long long)get(&server->exports[i].metrics.errors[k]));
	head(&t, "nbdvault_export_read_bytes_total", "counter", "READ data sent, by export.");
	for (size_t i = 0; i < server->n_exports; i++)
		emit(&t, "nbdvault_export_read_bytes_total{export=\"%s\"} %llu\n",
		     label(server->exports[i].cfg->name, e, sizeof(e)),
		     (unsigned long long)get(&server->exports[i].metrics.bytes_read));
	head(&t, "nbdvault_export_written_bytes_total", "counter",
	     "WRITE data received, by export.");
	for (size_t i = 0; i < server->n_exports; i++)
		emit(&t, "nbdvault_export_written_bytes_total{export=\"%s\"} %llu\n",
		     label(server->exports[i].cfg->name, e, sizeof(e)),
		     (unsigned long long)get(&server->exports[i].metrics.bytes_written));
	head(&t, "nbdvault_export_request_duration_seconds", "histogram",
	     "Time from a request's header to its reply being queued, by export.");
	for (size_t i = 0; i < server->n_exports; i++) {
		const struct nbdv_export_metrics *m = &server->exports[i].metrics;
		uint64_t cum = 0;
		label(server->exports[i].cfg->name, e, sizeof(e));
		for (unsigned b = 0; b <= METRICS_BUCKETS; b++) {
			cum += get(&m->latency[b]);
			if (b < METRICS_BUCKETS)
				emit(
				    &t,
				    "nbdvault_export_request_duration_seconds_bucket{export=\"%s\","
				    "le=\"%g\"} %llu\n",
				    e, bucket_s[b], (unsigned long long)cum);
			else
				emit(
				    &t,
				    "nbdvault_export_request_duration_seconds_bucket{export=\"%s\","
				    "le=\"+Inf\"} %llu\n",
				    e, (unsigned long long)cum);
		}
		emit(&t, "nbdvault_export_request_duration_seconds_sum{export=\"%s\"} %.9f\n", e,
		     (double)get(&m->latency_sum_ns) / 1e9);
		emit(&t, "nbdvault_export_request_duration_seconds_count{export=\"%s\"} %llu\n", e,
		     (unsigned long long)cum);
	}
	emit_gates(&t, "nbdvault_export_inline_writes", "gauge",
		   "1 while small writes run on the reactors, 0 while a recent stall sends "
		   "them to the I/O threads, by export.",
		   offsetof(struct nbdv_gate_stats, open));
	emit_gates(&t, "nbdvault_export_inline_write_stalls_total", "counter",
		   "Inline writes that stalled and sent writes to the I/O threads, by export.",
		   offsetof(struct nbdv_gate_stats, stalls));
	emit_gates(&t, "nbdvault_export_inline_write_resumes_total", "counter",
		   "Times quick writes on the I/O threads brought writes back to the reactors "
		   "before the backoff ended, by export.",
		   offsetof(struct nbdv_gate_stats, early_reopens));
	pthread_mutex_lock(&ident_lock);
	emit_idents(&t, "nbdvault_identity_connections_total",
		    "TLS connections established, by client identity.",
		    offsetof(struct ident, connections));
	emit_idents(&t, "nbdvault_identity_refusals_total",
		    "Options refused by policy, by client identity.",
		    offsetof(struct ident, refusals));
	emit_idents(&t, "nbdvault_identity_bytes_total",
		    "READ and WRITE data of closed connections, by client identity.",
		    offsetof(struct ident, bytes));
	head(&t, "nbdvault_identity_throttled_seconds_total", "counter",
	     "Time requests were held back by the identity's bandwidth or IOPS cap.");
	for (unsigned i = 0; i <= MAX_IDENTITIES; i++)
		if (idents[i].name[0])
			emit(&t,
			     "nbdvault_identity_throttled_seconds_total{identity=\"%s\"} %.6f\n",
			     label(idents[i].name, e, sizeof(e)),
			     (double)idents[i].throttled_ns / 1e9);
	pthread_mutex_unlock(&ident_lock);
	if (t.failed) {
		free(t.p);
		return NULL;
	}
	*len = t.len;
	return t.p;
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url,
			      const char *method, const char *version, const char *upload,
			      size_t *upload_size, void **state)
{
	struct MHD_Response *resp;
	enum MHD_Result r;
	size_t len = 0;
	char *body;
	unsigned status = MHD_HTTP_OK;

	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
		status = MHD_HTTP_METHOD_NOT_ALLOWED;
		body = strdup("GET /metrics\n");
		len = body ? strlen(body) : 0;
	} else if (strcmp(url, "/metrics") != 0) {
		status = MHD_HTTP_NOT_FOUND;
		body = strdup("not found: try /metrics\n");
		len = body ? strlen(body) : 0;
	} else {
		body = render(&len);
	}
	if (!body)
		return MHD_NO;
	resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	if (status == MHD_HTTP_OK)
		MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4");
	r = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return r;
}

int metrics_bind(struct nbdv_server *srv)
{
	const struct nbdv_listen_cfg *l = srv->cfg->metrics;
	int fd = -1, one = 1;

	if (!l)
		return 0;
	server = srv;
	if (l->unix_path) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", l->unix_path);
		unlink(l->unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			goto err;
	} else {
		struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
		struct addrinfo *ai = NULL;
		char port[8];
		snprintf(port, sizeof(port), "%u", l->port);
		if (getaddrinfo(l->address, port, &hints, &ai) != 0 || !ai) {
			log_err("metrics: cannot resolve %s", l->address);
			return -1;
		}
		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0)
			(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
			freeaddrinfo(ai);
			goto err;
		}
		freeaddrinfo(ai);
	}
	if (listen(fd, 16) < 0)
		goto err;
	listen_fd = fd;
	nbdv_metrics_on = true;
	return 0;
err:
	log_err("metrics: cannot listen on %s: %s", l->unix_path ? l->unix_path : l->address,
		strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

int metrics_start(struct nbdv_server *srv)
{
	if (listen_fd < 0)
		return 0;
	daemon_ =
	    MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL, 0, NULL, NULL, answer,
			     NULL, MHD_OPTION_LISTEN_SOCKET, listen_fd, MHD_OPTION_CONNECTION_LIMIT,
			     16U, MHD_OPTION_CONNECTION_TIMEOUT, 10U, MHD_OPTION_END);
	if (!daemon_) {
		log_err("metrics: cannot start the HTTP server");
		return -1;
	}
	log_info("metrics: serving /metrics on %s", srv->cfg->metrics->unix_path
							? srv->cfg->metrics->unix_path
							: srv->cfg->metrics->address);
	return 0;
}

void metrics_stop(void)
{
	if (daemon_)
		MHD_stop_daemon(daemon_); /* closes the listening socket too */
	else if (listen_fd >= 0)
		close(listen_fd);
	daemon_ = NULL;
	listen_fd = -1;
}
