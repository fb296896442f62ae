/*
 * bench/resume: NBD connections per second over TLS, with full handshakes or with TLS
 * session resumption (libnbd 1.14 cannot resume, so this is a small GnuTLS client).
 *
 *   resume HOST PORT EXPORT[,REFUSED] SECONDS CERTDIR|psk:USER:KEYFILE full|resume
 *
 * Each connection: greeting, STARTTLS, TLS handshake (x509: CERTDIR holds ca-cert.pem,
 * client-cert.pem, client-key.pem; or PSK: USER's key from a psktool KEYFILE),
 * NBD_OPT_GO, NBD_CMD_DISC, close.  In "resume" mode every connection offers the
 * session (ticket) saved from the previous one.  With ",REFUSED" every connection
 * first asks for that export and requires the server to refuse it (the tests use this
 * to check that a resumed session keeps its identity for allow-lists).
 * Prints: connections-per-second resumed-connections connections seconds
 * RESUME_PRIORITY in the environment replaces the client's GnuTLS priority string (the
 * tests use it to offer only legacy suites, which the server must refuse).
 */
#include <arpa/inet.h>
#include <endian.h>
#include <gnutls/gnutls.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PSK_PRIORITY "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"

#define IHAVEOPT  0x49484156454F5054ULL
#define REP_MAGIC 0x0003e889045565a9ULL

static void die(const char *what, const char *why)
{
	fprintf(stderr, "resume: %s: %s\n", what, why);
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Plain or TLS I/O of exactly @len bytes. */
static void io_all(int fd, gnutls_session_t s, void *buf, size_t len, int writing)
{
	char *p = buf;

	while (len) {
		ssize_t n;
		if (s)
			n = writing ? gnutls_record_send(s, p, len) : gnutls_record_recv(s, p, len);
		else
			n = writing ? write(fd, p, len) : read(fd, p, len);
		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n <= 0)
			die(writing ? "send" : "receive",
			    s && n < 0 ? gnutls_strerror((int)n) : "EOF");
		p += n;
		len -= (size_t)n;
	}
}

static void send_opt(int fd, gnutls_session_t s, uint32_t opt, const void *data, uint32_t len)
{
	unsigned char h[16 + 64];
	uint64_t magic = htobe64(IHAVEOPT);
	uint32_t o = htobe32(opt), l = htobe32(len);

	memcpy(h, &magic, 8);
	memcpy(h + 8, &o, 4);
	memcpy(h + 12, &l, 4);
	memcpy(h + 16, data, len);
	io_all(fd, s, h, 16 + len, 1);
}

/* Read option replies until a final one; returns its type. */
static uint32_t read_final(int fd, gnutls_session_t s)
{
	for (;;) {
		unsigned char h[20], skip[512];
		uint32_t type, len;

		io_all(fd, s, h, 20, 0);
		memcpy(&type, h + 12, 4);
		memcpy(&len, h + 16, 4);
		type = be32toh(type);
		len = be32toh(len);
		while (len) {
			uint32_t k = len < sizeof(skip) ? len : sizeof(skip);
			io_all(fd, s, skip, k, 0);
			len -= k;
		}
		if (type != 3 /* NBD_REP_INFO */)
			return type;
	}
}

static int dial(const char *host, const char *port)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
	int fd, one = 1;

	if (getaddrinfo(host, port, &hints, &ai) != 0)
		die("getaddrinfo", host);
	fd = socket(ai->ai_family, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) < 0)
		die("connect", host);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	freeaddrinfo(ai);
	return fd;
}

/* NBD_OPT_GO for @name; returns the final reply type. */
static uint32_t go(int fd, gnutls_session_t s, const char *name)
{
	unsigned char data[4 + 256 + 2] = {0};
	uint32_t nl = htobe32((uint32_t)strlen(name));

	if (strlen(name) > 256)
		die("export", "name too long");
	memcpy(data, &nl, 4);
	memcpy(data + 4, name, strlen(name));
	send_opt(fd, s, 7 /* GO */, data, (uint32_t)(4 + strlen(name) + 2));
	return read_final(fd, s);
}

/* PSK credentials for @user from a psktool file ("user:hexkey" lines). */
static gnutls_psk_client_credentials_t load_psk(const char *user, const char *file)
{
	gnutls_psk_client_credentials_t psk;
	char line[1024];
	FILE *f = fopen(file, "r");

	if (!f)
		die(file, "cannot open");
	while (fgets(line, sizeof(line), f)) {
		char *colon = strchr(line, ':');
		if (!colon || (size_t)(colon - line) != strlen(user) ||
		    strncmp(line, user, strlen(user)) != 0)
			continue;
		line[strcspn(line, "\r\n")] = '\0';
		gnutls_datum_t key = {(unsigned char *)colon + 1, (unsigned)strlen(colon + 1)};
		gnutls_psk_allocate_client_credentials(&psk);
		if (gnutls_psk_set_client_credentials(psk, user, &key, GNUTLS_PSK_KEY_HEX) < 0)
			die(file, "bad key");
		fclose(f);
		return psk;
	}
	die(user, "no such PSK user");
	return NULL;
}

int main(int argc, char **argv)
{
	gnutls_certificate_credentials_t cred = NULL;
	gnutls_psk_client_credentials_t psk = NULL;
	gnutls_datum_t saved = {NULL, 0};
	char ca[4096], cert[4096], key[4096], export[512], *refused;
	double secs, t0, end;
	long conns = 0, resumed = 0;
	int resume;

	if (argc != 7) {
		fprintf(stderr, "usage: resume HOST PORT EXPORT[,REFUSED] SECONDS "
				"CERTDIR|psk:USER:KEYFILE full|resume\n");
		return 2;
	}
	snprintf(export, sizeof(export), "%s", argv[3]);
	refused = strchr(export, ',');
	if (refused)
		*refused++ = '\0';
	secs = atof(argv[4]);
	resume = strcmp(argv[6], "resume") == 0;
	gnutls_global_init();
	if (strncmp(argv[5], "psk:", 4) == 0) {
		char user[256], *file;
		snprintf(user, sizeof(user), "%s", argv[5] + 4);
		file = strchr(user, ':');
		if (!file)
			die(argv[5], "expected psk:USER:KEYFILE");
		*file++ = '\0';
		psk = load_psk(user, file);
	} else {
		snprintf(ca, sizeof(ca), "%s/ca-cert.pem", argv[5]);
		snprintf(cert, sizeof(cert), "%s/client-cert.pem", argv[5]);
		snprintf(key, sizeof(key), "%s/client-key.pem", argv[5]);
		gnutls_certificate_allocate_credentials(&cred);
		if (gnutls_certificate_set_x509_trust_file(cred, ca, GNUTLS_X509_FMT_PEM) <= 0)
			die(ca, "no CA certificate");
		if (gnutls_certificate_set_x509_key_file(cred, cert, key, GNUTLS_X509_FMT_PEM) < 0)
			die(cert, "cannot load the client certificate");
	}

	t0 = now();
	end = t0 + secs;
	while (now() < end) {
		int fd = dial(argv[1], argv[2]);
		gnutls_session_t s;
		unsigned char greet[18], disc[28] = {0};
		uint32_t flags = htobe32(3);
		uint32_t magic = htobe32(0x25609513);
		uint16_t cmd = htobe16(2);
		int r;

		io_all(fd, NULL, greet, sizeof(greet), 0);
		io_all(fd, NULL, &flags, 4, 1);
		send_opt(fd, NULL, 5 /* STARTTLS */, NULL, 0);
		if (read_final(fd, NULL) != 1)
			die("STARTTLS", "refused");
		gnutls_init(&s, GNUTLS_CLIENT);
		if (psk) {
			gnutls_priority_set_direct(s, PSK_PRIORITY, NULL);
			gnutls_credentials_set(s, GNUTLS_CRD_PSK, psk);
		} else {
			gnutls_set_default_priority(s);
			gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred);
		}
		if (getenv("RESUME_PRIORITY") &&
		    gnutls_priority_set_direct(s, getenv("RESUME_PRIORITY"), NULL) < 0)
			die("RESUME_PRIORITY", "not a valid priority string");
		gnutls_server_name_set(s, GNUTLS_NAME_DNS, "localhost", 9);
		if (resume && saved.data)
			gnutls_session_set_data(s, saved.data, saved.size);
		gnutls_transport_set_int(s, fd);
		do
			r = gnutls_handshake(s);
		while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
		if (r < 0)
			die("handshake", gnutls_strerror(r));
		if (gnutls_session_is_resumed(s))
			resumed++;
		if (refused && go(fd, s, refused) == 1)
			die(refused, gnutls_session_is_resumed(s) ? "accepted on a resumed session"
								  : "accepted");
		if (go(fd, s, export) != 1)
			die(export, gnutls_session_is_resumed(s) ? "refused on a resumed session"
								 : "refused");
		/* TLS 1.3 tickets arrive after the handshake; they have been read by now.
		 * (Without one, gnutls_session_get_data2 would wait for it.) */
		if (resume && (gnutls_session_get_flags(s) & GNUTLS_SFLAGS_SESSION_TICKET)) {
			gnutls_free(saved.data);
			saved.data = NULL;
			if (gnutls_session_get_data2(s, &saved) < 0)
				saved.data = NULL;
		}
		memcpy(disc, &magic, 4);
		memcpy(disc + 6, &cmd, 2);
		io_all(fd, s, disc, sizeof(disc), 1);
		gnutls_bye(s, GNUTLS_SHUT_WR);
		gnutls_deinit(s);
		close(fd);
		conns++;
	}
	secs = now() - t0;
	printf("%.1f %ld %ld %.3f\n", conns / secs, resumed, conns, secs);
	gnutls_free(saved.data);
	if (cred)
		gnutls_certificate_free_credentials(cred);
	if (psk)
		gnutls_psk_free_client_credentials(psk);
	gnutls_global_deinit();
	return 0;
}
