/*
 * nbdvault - command line, configuration, and the server's life from start to exit.
 */
#include "build-config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdvault/config.h"
#include "nbdvault/driver.h"
#include "nbdvault/log.h"
#include "nbdvault/server.h"
#include "nbdvault/tls.h"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: nbdvault [OPTION]...\n"
		"Serve block devices and files over the NBD protocol.\n"
		"\n"
		"  -c, --config FILE   configuration file (default %s)\n"
		"      --check-config  validate the configuration, list its exports, and exit\n"
		"  -v, --verbose       log debug messages\n"
		"  -V, --version       print the version and exit\n"
		"  -h, --help          print this help and exit\n"
		"\n"
		"SIGINT or SIGTERM stops accepting, finishes requests in flight, flushes every\n"
		"export and exits 0.  See nbdvault(8) and docs/configuration.md.\n",
		NBDV_DEFAULT_CONFIG);
}

static void print_exports(const struct nbdv_config *cfg)
{
	for (size_t i = 0; i < cfg->n_listen; i++) {
		const struct nbdv_listen_cfg *l = &cfg->listen[i];
		if (l->unix_path)
			printf("listen unix:%s\n", l->unix_path);
		else
			printf("listen %s port %u\n", l->address, l->port);
	}
	for (size_t i = 0; i < cfg->n_exports; i++) {
		const struct nbdv_export_cfg *e = &cfg->exports[i];
		printf("export %s: driver=%s", e->name, e->driver_name);
		if (e->path)
			printf(" path=%s", e->path);
		if (e->size_given)
			printf(" size=%llu", (unsigned long long)e->size);
		printf("%s%s", e->readonly ? " readonly" : "",
		       cfg->default_export && strcmp(cfg->default_export, e->name) == 0
			   ? " (default)"
			   : "");
		if (e->description)
			printf(" description=\"%s\"", e->description);
		printf("\n");
	}
}

int main(int argc, char **argv)
{
	enum { OPT_CHECK = 256 };
	static const struct option longopts[] = {
	    {"config", required_argument, NULL, 'c'},
	    {"check-config", no_argument, NULL, OPT_CHECK},
	    {"verbose", no_argument, NULL, 'v'},
	    {"version", no_argument, NULL, 'V'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	const char *config_path = NBDV_DEFAULT_CONFIG;
	bool check_only = false;
	struct nbdv_config *cfg;
	struct nbdv_server srv;
	char err[1024];
	int opt, status;

	while ((opt = getopt_long(argc, argv, "c:vVh", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			config_path = optarg;
			break;
		case OPT_CHECK:
			check_only = true;
			break;
		case 'v':
			log_set_level(LOG_LVL_DEBUG);
			break;
		case 'V':
			printf("nbdvault %s (driver API %d)\n", NBDV_VERSION,
			       NBDV_DRIVER_API_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "nbdvault: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (config_load(config_path, &cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "nbdvault: %s\n", err);
		return 1;
	}
	if (check_only) {
		/* Credential files are part of the configuration: check them too. */
		if (cfg->tls.mode != TLS_OFF) {
			struct nbdv_tls *tls;
			int r = tls_global_init();
			if (r == 0 && tls_load(&cfg->tls, &tls, err, sizeof(err)) < 0) {
				fprintf(stderr, "nbdvault: %s\n", err);
				r = -1;
			} else if (r == 0) {
				tls_unref(tls);
			}
			tls_global_deinit();
			if (r < 0) {
				config_free(cfg);
				return 1;
			}
		}
		printf("%s: OK\n", config_path);
		print_exports(cfg);
		config_free(cfg);
		return 0;
	}
	if (server_init(&srv, cfg) < 0) {
		server_fini(&srv);
		return 1;
	}
	log_info("nbdvault %s ready, %zu export(s)", NBDV_VERSION, cfg->n_exports);
	status = server_run(&srv);
	server_fini(&srv);
	return status;
}
