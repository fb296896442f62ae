/*
 * nbdvault - command line, configuration, and the server's life from start to exit.
 */
#include "build-config.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "driver_registry.h"
#include "nbdvault/driver.h"
#include "log.h"
#include "server.h"
#include "tls.h"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: nbdvault [OPTION]...\n"
		"Serve block devices and files over the NBD protocol.\n"
		"\n"
		"  -c, --config FILE   configuration file (default %s)\n"
		"      --check-config  validate the configuration, list its exports, and exit\n"
		"      --pidfile FILE  write the server's process id there (removed at exit)\n"
		"      --reload        send SIGHUP to the server named by --pidfile (default\n"
		"                      %s): it re-reads its configuration and credentials\n"
		"      --driver-help NAME  print the export keys of driver NAME (built in, or\n"
		"                      NAME.so in %s, or a path) and exit\n"
		"  -v, --verbose       log debug messages\n"
		"  -V, --version       print the version and exit\n"
		"  -h, --help          print this help and exit\n"
		"\n"
		"SIGINT or SIGTERM stops accepting, finishes requests in flight, flushes every\n"
		"export and exits 0.  See nbdvault(8) and docs/configuration.md.\n",
		NBDV_DEFAULT_CONFIG, NBDV_DEFAULT_PIDFILE, NBDV_DRIVER_DIR);
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
		for (size_t j = 0; j < e->n_values; j++)
			if (e->values[j].given)
				printf(" %s=%s", e->drv->keys[j].name, e->values[j].str);
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

/* --driver-help NAME: the driver's keys (built in, NAME.so in the default directory, or
 * a path). */
static int driver_help(const char *name)
{
	static const char *const types[] = {"",	       "string", "path", "boolean",
					    "integer", "size",	 "file"};
	const struct nbdv_driver *drv;
	char err[512];

	drv = driver_find(name, NULL, err, sizeof(err));
	if (!drv) {
		fprintf(stderr, "nbdvault: %s\n", err);
		return 1;
	}
	printf("driver %s: %s\n", drv->name, drv->description);
	printf("  size: %s\n", (drv->needs & NBDV_NEEDS_SIZE) ? "required" : "optional");
	if (!drv->keys || !drv->keys[0].name)
		printf("  (no keys of its own)\n");
	for (const struct nbdv_key *k = drv->keys; k && k->name; k++) {
		printf("  %s (%s, %s", k->name, types[k->type],
		       k->required ? "required" : "optional");
		if (k->default_value)
			printf(", default %s", k->default_value);
		printf("): %s\n", k->help);
	}
	return 0;
}

static int write_pidfile(const char *path)
{
	FILE *f = fopen(path, "w");

	if (!f || fprintf(f, "%ld\n", (long)getpid()) < 0 || fclose(f) != 0) {
		fprintf(stderr, "nbdvault: %s: %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* --reload: SIGHUP to the process the pidfile names. */
static int send_reload(const char *path)
{
	FILE *f = fopen(path, "r");
	long pid = 0;

	if (!f || fscanf(f, "%ld", &pid) != 1 || pid <= 1) {
		fprintf(stderr, "nbdvault: --reload: %s: %s\n", path,
			f ? "no process id in it" : strerror(errno));
		if (f)
			fclose(f);
		return 1;
	}
	fclose(f);
	if (kill((pid_t)pid, SIGHUP) < 0) {
		fprintf(stderr, "nbdvault: --reload: process %ld: %s\n", pid, strerror(errno));
		return 1;
	}
	printf("nbdvault: SIGHUP sent to %ld (see its log for the outcome)\n", pid);
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_CHECK = 256, OPT_PIDFILE, OPT_RELOAD, OPT_DRIVER_HELP };
	static const struct option longopts[] = {
	    {"config", required_argument, NULL, 'c'},
	    {"check-config", no_argument, NULL, OPT_CHECK},
	    {"pidfile", required_argument, NULL, OPT_PIDFILE},
	    {"reload", no_argument, NULL, OPT_RELOAD},
	    {"driver-help", required_argument, NULL, OPT_DRIVER_HELP},
	    {"verbose", no_argument, NULL, 'v'},
	    {"version", no_argument, NULL, 'V'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	const char *config_path = NBDV_DEFAULT_CONFIG;
	const char *pidfile = NULL;
	bool check_only = false, reload = false;
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
		case OPT_PIDFILE:
			pidfile = optarg;
			break;
		case OPT_RELOAD:
			reload = true;
			break;
		case OPT_DRIVER_HELP:
			return driver_help(optarg);
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
	if (reload)
		return send_reload(pidfile ? pidfile : NBDV_DEFAULT_PIDFILE);
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
	/* Before the sandbox closes; removed at exit (its directory stays writable). */
	if (pidfile && write_pidfile(pidfile) < 0) {
		config_free(cfg);
		return 1;
	}
	cfg->pidfile = pidfile;
	if (server_init(&srv, cfg) < 0) {
		server_fini(&srv);
		if (pidfile)
			unlink(pidfile);
		return 1;
	}
	log_info("nbdvault %s ready, %zu export(s)", NBDV_VERSION, cfg->n_exports);
	status = server_run(&srv);
	server_fini(&srv);
	if (pidfile && unlink(pidfile) < 0)
		log_warn("%s: cannot remove: %s", pidfile, strerror(errno));
	return status;
}
