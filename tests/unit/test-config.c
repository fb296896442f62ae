/*
 * Config loader: sizes, every key of a full valid file, and one fixture per error
 * class whose first line says where the error must be reported ("# expect: L:C text").
 */
#include "build-config.h"

#include <dirent.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "config.h"

static void test_sizes(void)
{
	static const struct {
		const char *s;
		uint64_t v;
		int r;
	} cases[] = {
	    {"0", 0, 0},
	    {"512", 512, 0},
	    {"64K", 65536, 0},
	    {"64k", 65536, 0},
	    {"10G", 10ULL << 30, 0},
	    {"1TiB", 1ULL << 40, 0},
	    {"2MB", 2ULL << 20, 0},
	    {"1P", 1ULL << 50, 0},
	    {"", 0, -1},
	    {"G", 0, -1},
	    {"10Q", 0, -1},
	    {"1.5G", 0, -1},
	    {"-1", 0, -1},
	    {"10 G", 0, -1},
	    {"16384P", 0, -1},
	    {"18446744073709551616", 0, -1},
	    {"18446744073709551615", UINT64_MAX, 0},
	    {"1Gx", 0, -1},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v = 0;
		int r = config_parse_size(cases[i].s, &v);
		CHECK_MSG((r == 0) == (cases[i].r == 0), "'%s' -> %d", cases[i].s, r);
		if (r == 0)
			CHECK_MSG(v == cases[i].v, "'%s' -> %llu", cases[i].s,
				  (unsigned long long)v);
	}
}

static void test_durations(void)
{
	static const struct {
		const char *s;
		double v;
		int ok;
	} cases[] = {
	    {"0", 0, 1},     {"10", 10, 1},    {"10s", 10, 1},	{"500ms", 0.5, 1},  {"2m", 120, 1},
	    {"1h", 3600, 1}, {"1.5s", 1.5, 1}, {"", 0, 0},	{"s", 0, 0},	    {"10 s", 0, 0},
	    {"-1s", 0, 0},   {"10x", 0, 0},    {"1000h", 0, 0}, {"50us", 50e-6, 1},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		double v = -1;
		int r = config_parse_duration(cases[i].s, &v);
		CHECK_MSG((r == 0) == cases[i].ok, "'%s' -> %d", cases[i].s, r);
		if (r == 0)
			CHECK_MSG(v == cases[i].v, "'%s' -> %g", cases[i].s, v);
	}
}

static void test_full(const char *dir)
{
	char path[4096], err[1024];
	struct nbdv_config *cfg;

	snprintf(path, sizeof(path), "%s/valid/full.yaml", dir);
	CHECK_MSG(config_load(path, &cfg, err, sizeof(err)) == 0, "%s", err);
	CHECK(cfg->n_listen == 3);
	CHECK(strcmp(cfg->listen[0].address, "127.0.0.1") == 0 && cfg->listen[0].port == 10810);
	CHECK(strcmp(cfg->listen[1].address, "::1") == 0 && cfg->listen[1].port == 10809);
	CHECK(strcmp(cfg->listen[2].unix_path, "/tmp/nbdvault-valid.sock") == 0);
	CHECK(strcmp(cfg->default_export, "disk0") == 0);
	CHECK(cfg->io_threads == 8);
	CHECK(cfg->workers == 3);
	CHECK(cfg->busy_poll == 20e-6);
	CHECK(cfg->max_request == 1024 * 1024);
	CHECK(cfg->max_connections == 50 && cfg->handshake_timeout == 2.5);
	CHECK(cfg->idle_timeout == 600 && cfg->max_inflight_bytes == 8ULL << 20);
	CHECK(cfg->max_memory == 1ULL << 30);
	CHECK(cfg->max_conns_per_identity == 3);
	CHECK(cfg->identity_default.bandwidth == 100ULL << 20 && cfg->n_identities == 1);
	CHECK(strcmp(cfg->identities[0].identity, "psk:alice") == 0);
	CHECK(cfg->identities[0].bandwidth == 1 << 20 && cfg->identities[0].iops == 50 &&
	      cfg->identities[0].max_connections == 2);
	CHECK(strcmp(cfg->user, "nobody") == 0 && strcmp(cfg->group, "nogroup") == 0);
	CHECK(!cfg->sandbox && cfg->n_sandbox_paths == 2);
	CHECK(strcmp(cfg->sandbox_paths[1], "/var/lib/nbdvault") == 0);
	CHECK(cfg->n_exports == 2);
	CHECK(strcmp(cfg->exports[0].name, "disk0") == 0);
	CHECK(strcmp(cfg->exports[0].description, "Scratch disk") == 0);
	CHECK(cfg->exports[0].n_values == 2 && cfg->exports[0].values[0].given);
	/* file's writeback-after: not given, its default. */
	CHECK(cfg->exports[0].values[1].set && !cfg->exports[0].values[1].given &&
	      cfg->exports[0].values[1].num == 8 << 20);
	CHECK(strcmp(config_export_path(&cfg->exports[0], NBDV_KEY_PATH, 0),
		     "/var/tmp/disk0.img") == 0);
	CHECK(cfg->exports[0].size == 10ULL << 30 && cfg->exports[0].size_given);
	CHECK(!cfg->exports[0].readonly);
	CHECK(cfg->exports[0].resizable && cfg->exports[0].max_size == 1ULL << 40);
	CHECK(cfg->exports[0].bandwidth == 500ULL << 20 && cfg->exports[0].iops == 10000);
	CHECK(cfg->exports[1].bandwidth == 0 && cfg->exports[1].iops == 0);
	CHECK(!cfg->exports[1].resizable && cfg->exports[1].max_size == 0);
	CHECK(!cfg->exports[0].on_remove_close && cfg->exports[1].on_remove_close);
	CHECK(cfg->exports[1].readonly && cfg->exports[1].size == 512 * 1024);
	CHECK(cfg->exports[1].description == NULL);
	CHECK(cfg->tls.mode == TLS_OPTIONAL && cfg->tls.verify_clients);
	CHECK(!cfg->tls.session_tickets);
	CHECK(strcmp(cfg->tls.certificates, "/etc/nbdvault/pki") == 0);
	CHECK(strcmp(cfg->tls.psk_file, "/etc/nbdvault/keys.psk") == 0);
	CHECK(strcmp(cfg->tls.priority, "NORMAL:-VERS-ALL:+VERS-TLS1.3") == 0);
	CHECK(!cfg->exports[0].tls_required && cfg->exports[0].n_allow == 0);
	CHECK(cfg->exports[1].tls_required && cfg->exports[1].n_allow == 3);
	CHECK(strcmp(cfg->exports[1].allow[1], "dn:CN=vm7,O=Example") == 0);
	CHECK(config_find_export(cfg, "", 0) == &cfg->exports[0]);
	CHECK(config_find_export(cfg, "scratch", 7) == &cfg->exports[1]);
	CHECK(config_find_export(cfg, "scratc", 6) == NULL);
	config_free(cfg);

	snprintf(path, sizeof(path), "%s/valid/minimal.yaml", dir);
	CHECK_MSG(config_load(path, &cfg, err, sizeof(err)) == 0, "%s", err);
	CHECK(cfg->n_listen == 1 && strcmp(cfg->listen[0].address, "::") == 0);
	CHECK(cfg->listen[0].port == 10809);
	CHECK(cfg->max_request == 32 * 1024 * 1024);
	CHECK(cfg->max_connections == 1024 && cfg->handshake_timeout == 10.0);
	CHECK(cfg->idle_timeout == 0 && cfg->max_inflight_bytes == 96ULL << 20);
	CHECK(cfg->max_memory >= 16ULL << 20);		  /* a quarter of RAM or of the cgroup */
	CHECK(cfg->workers == 0 && cfg->io_threads == 4); /* 0: one reactor per CPU */
	CHECK(cfg->busy_poll == 50e-6);
	CHECK(cfg->default_export == NULL && config_find_export(cfg, "", 0) == NULL);
	CHECK(cfg->tls.mode == TLS_OFF && strcmp(cfg->tls.priority, NBDV_TLS_PRIORITY) == 0);
	CHECK(cfg->tls.session_tickets);
	config_free(cfg);
}

static void test_invalid(const char *dir)
{
	char dpath[4096];
	struct dirent *de;
	DIR *d;
	int n = 0;

	snprintf(dpath, sizeof(dpath), "%s/invalid", dir);
	d = opendir(dpath);
	CHECK(d != NULL);
	while ((de = readdir(d))) {
		char path[8192], first[512], want_pos[64], err[1024];
		const char *want_text;
		struct nbdv_config *cfg = NULL;
		unsigned line, col;
		FILE *f;

		if (!strstr(de->d_name, ".yaml"))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dpath, de->d_name);
		f = fopen(path, "r");
		CHECK(f && fgets(first, sizeof(first), f));
		fclose(f);
		first[strcspn(first, "\n")] = '\0';
		CHECK_MSG(sscanf(first, "# expect: %u:%u", &line, &col) == 2, "%s: no expect line",
			  path);
		want_text = strchr(first + 10, ' ') + 1;
		CHECK_MSG(config_load(path, &cfg, err, sizeof(err)) < 0, "%s loaded", path);
		CHECK(cfg == NULL);
		snprintf(want_pos, sizeof(want_pos), ":%u:%u: ", line, col);
		CHECK_MSG(strncmp(err, path, strlen(path)) == 0, "%s: '%s'", path, err);
		CHECK_MSG(strncmp(err + strlen(path), want_pos, strlen(want_pos)) == 0,
			  "%s: want %s in '%s'", de->d_name, want_pos, err);
		CHECK_MSG(strstr(err, want_text) != NULL, "%s: want '%s' in '%s'", de->d_name,
			  want_text, err);
		n++;
	}
	closedir(d);
	CHECK(n >= 20);
}

int main(int argc, char **argv)
{
	char err[256];
	struct nbdv_config *cfg;

	CHECK(argc == 2);
	test_sizes();
	test_durations();
	test_full(argv[1]);
	test_invalid(argv[1]);
	CHECK(config_load("/nonexistent/nbdvault.yaml", &cfg, err, sizeof(err)) < 0);
	CHECK(strstr(err, "/nonexistent/nbdvault.yaml:1:1: cannot open") == err);
	CHECKS_DONE("test-config");
}
