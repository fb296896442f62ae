/*
 * stream - the ceiling a server could reach on this machine: one process sends BYTES
 * over a loopback TCP connection to another, plain or through a GnuTLS session (same
 * default priority as nbdvault: TLS 1.3 here), in 256 KiB writes.
 *
 *   stream tcp|tls BYTES PKI_DIR [SPAN]
 *
 * By default both sides use one 256 KiB buffer, which stays in the CPU's caches: no
 * memory traffic but the socket's.  With SPAN (bytes) the sender sends from, and the
 * receiver receives into, a buffer of SPAN bytes of its own, touched before the clock
 * starts and walked through in order, as a server reading an export and a client
 * filling its buffers do: with a SPAN larger than the caches, every byte comes from and
 * goes to RAM once.
 *
 * Prints: MiB/s sender_cpu_s receiver_cpu_s cipher
 */
#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_self(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
	       ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what, int r)
{
	fprintf(stderr, "stream: %s: %s\n", what, r < 0 ? gnutls_strerror(r) : "failed");
	exit(1);
}

int main(int argc, char **argv)
{
	int tls, lfd, fd, one = 1, pipefd[2];
	unsigned long long bytes, done = 0;
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t slen = sizeof(sa);
	size_t span = CHUNK, pos = 0;
	char *buf, path[4096], cipher[64] = "none";
	double t0, rx_cpu = 0;
	pid_t pid;

	if (argc != 4 && argc != 5)
		return fprintf(stderr, "usage: stream tcp|tls BYTES PKI_DIR [SPAN]\n"), 2;
	tls = strcmp(argv[1], "tls") == 0;
	bytes = strtoull(argv[2], NULL, 10);
	if (argc == 5)
		span = strtoull(argv[4], NULL, 10) / CHUNK * CHUNK;
	if (span < CHUNK)
		span = CHUNK;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &slen) < 0 || pipe(pipefd) < 0)
		die("socket", 0);
	pid = fork();
	if (pid == 0) { /* receiver: the client */
		gnutls_session_t s = NULL;
		gnutls_certificate_credentials_t cred;
		double c0;
		close(lfd);
		/* Its own buffer, touched now: not the sender's pages, shared copy-on-write. */
		buf = malloc(span);
		if (!buf)
			die("malloc", 0);
		memset(buf, 0x11, span);
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			die("connect", 0);
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (tls) {
			gnutls_certificate_allocate_credentials(&cred);
			snprintf(path, sizeof(path), "%s/ca-cert.pem", argv[3]);
			gnutls_certificate_set_x509_trust_file(cred, path, GNUTLS_X509_FMT_PEM);
			gnutls_init(&s, GNUTLS_CLIENT);
			gnutls_set_default_priority(s);
			gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred);
			gnutls_transport_set_int(s, fd);
			if (gnutls_handshake(s) < 0)
				die("client handshake", -1);
		}
		c0 = cpu_self();
		for (;;) {
			ssize_t n = tls ? gnutls_record_recv(s, buf + pos, CHUNK)
					: recv(fd, buf + pos, CHUNK, 0);
			if (n <= 0)
				break;
			pos += (size_t)n;
			if (pos + CHUNK > span)
				pos = 0;
		}
		rx_cpu = cpu_self() - c0;
		if (write(pipefd[1], &rx_cpu, sizeof(rx_cpu)) != sizeof(rx_cpu))
			_exit(1);
		_exit(0);
	}
	buf = malloc(span);
	if (!buf)
		die("malloc", 0);
	memset(buf, 0x5a, span);
	fd = accept(lfd, NULL, NULL);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	{
		gnutls_session_t s = NULL;
		gnutls_certificate_credentials_t cred;
		double c0;
		int r;
		if (tls) {
			char cert[4096], key[4096];
			gnutls_certificate_allocate_credentials(&cred);
			snprintf(cert, sizeof(cert), "%s/server-cert.pem", argv[3]);
			snprintf(key, sizeof(key), "%s/server-key.pem", argv[3]);
			r = gnutls_certificate_set_x509_key_file(cred, cert, key,
								 GNUTLS_X509_FMT_PEM);
			if (r < 0)
				die("server key", r);
			gnutls_init(&s, GNUTLS_SERVER);
			gnutls_priority_set_direct(s, "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1", NULL);
			gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred);
			gnutls_transport_set_int(s, fd);
			r = gnutls_handshake(s);
			if (r < 0)
				die("server handshake", r);
			snprintf(cipher, sizeof(cipher), "%s",
				 gnutls_cipher_get_name(gnutls_cipher_get(s)));
		}
		c0 = cpu_self();
		t0 = now();
		while (done < bytes) {
			size_t n = bytes - done < CHUNK ? bytes - done : CHUNK;
			ssize_t w;

			if (pos + n > span)
				pos = 0;
			w = tls ? gnutls_record_send(s, buf + pos, n) : send(fd, buf + pos, n, 0);
			if (w <= 0)
				die("send", (int)w);
			done += (unsigned long long)w;
			pos += (size_t)w;
		}
		if (tls)
			gnutls_bye(s, GNUTLS_SHUT_WR);
		shutdown(fd, SHUT_WR);
		if (read(pipefd[0], &rx_cpu, sizeof(rx_cpu)) != sizeof(rx_cpu))
			die("receiver", 0);
		waitpid(pid, NULL, 0);
		printf("%.1f %.3f %.3f %s\n", bytes / (now() - t0) / 1048576.0, cpu_self() - c0,
		       rx_cpu, cipher);
	}
	return 0;
}
