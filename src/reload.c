/*
 * nbdvault - SIGHUP: re-read the configuration and apply what can change live.
 *
 * The whole file is loaded and validated first; an invalid file changes nothing.  What
 * cannot change under running connections (threads, user, sandbox, TLS settings, audit
 * log, metrics, an export's storage; a new listener while the sandbox is on) makes the
 * reload fail with a line naming it: "needs a restart", never half applied.  Otherwise:
 *
 *   - listeners: entries removed stop listening, entries added are bound (before
 *     anything else is applied: a bind that fails refuses the reload);
 *   - limits apply to connections accepted from then on (each connection keeps the
 *     snapshot it was accepted under);
 *   - exports added appear at once (in the room exports_new() left);
 *   - exports removed refuse new opens; their sessions finish, or with on-remove: close
 *     are closed after their requests in flight are answered;
 *   - changed allow lists, tls: and descriptions apply to new opens at once, and every
 *     reactor re-checks its sessions: one whose identity is no longer allowed is closed;
 *   - unchanged exports keep their driver instance and sessions untouched.
 *
 * Snapshots are never freed while serving: a session may still read its export's old
 * entry.  They go at exit (a reload costs one config's memory until then).
 */
#include "build-config.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "export.h"
#include "log.h"
#include "sandbox.h"
#include "server.h"

static bool same_str(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool same_listen(const struct nbdv_listen_cfg *a, const struct nbdv_listen_cfg *b)
{
	if (!a || !b)
		return a == b;
	return same_str(a->address, b->address) && a->port == b->port &&
	       same_str(a->unix_path, b->unix_path);
}

/* The first setting that differs and can only change with a restart, or NULL. */
static const char *restart_only(const struct nbdv_config *a, const struct nbdv_config *b)
{
	/* listen: entries added and removed live (server_listeners_prepare). */
	if (a->workers != b->workers)
		return "workers";
	if (a->io_threads != b->io_threads)
		return "io-threads";
	if (a->busy_poll != b->busy_poll)
		return "busy-poll";
	if (!same_str(a->user, b->user) || !same_str(a->group, b->group))
		return "user/group";
	if (a->sandbox != b->sandbox || a->n_sandbox_paths != b->n_sandbox_paths)
		return "sandbox";
	for (size_t i = 0; i < a->n_sandbox_paths; i++)
		if (!same_str(a->sandbox_paths[i], b->sandbox_paths[i]))
			return "sandbox-paths";
	if (!same_str(a->audit_log, b->audit_log))
		return "audit-log";
	if (!same_listen(a->metrics, b->metrics))
		return "metrics";
	if (a->tls.mode != b->tls.mode || a->tls.verify_clients != b->tls.verify_clients ||
	    a->tls.session_tickets != b->tls.session_tickets ||
	    !same_str(a->tls.certificates, b->tls.certificates) ||
	    !same_str(a->tls.psk_file, b->tls.psk_file) ||
	    !same_str(a->tls.priority, b->tls.priority))
		return "tls";
	/* limits: apply to connections accepted from now on (each keeps the snapshot it
	 * was accepted under: conn.lim). */
	return NULL;
}

/* Whether export @b keeps @a's storage (so its driver instance can stay). */
static bool same_storage(const struct nbdv_export_cfg *a, const struct nbdv_export_cfg *b)
{
	return config_same_driver_values(a, b) && a->size == b->size &&
	       a->size_given == b->size_given && a->readonly == b->readonly &&
	       a->resizable == b->resizable && a->max_size == b->max_size &&
	       a->min_block == b->min_block;
}

/* Driver key types naming files the sandbox had to allow at start. */
static const int path_types[] = {NBDV_KEY_PATH, NBDV_KEY_FILE};

/* Whether @dir (real path) is @base or lies beneath it. */
static bool beneath(const char *dir, const char *base)
{
	size_t n = strlen(base);

	return strncmp(dir, base, n) == 0 &&
	       (dir[n] == '\0' || dir[n] == '/' || base[n - 1] == '/');
}

/* The real path of the directory holding @path, in @out; false if it does not exist. */
static bool dir_of(const char *path, char *out)
{
	char tmp[PATH_MAX];

	return realpath(sandbox_dir_of(path, tmp, sizeof(tmp)), out) != NULL;
}

/* With the sandbox on, a new export path must lie where Landlock allowed at start: the
 * directories of the exports then, or sandbox-paths. */
static bool sandbox_allows(const struct nbdv_config *start, const char *path)
{
	char want[PATH_MAX], have[PATH_MAX];

	if (!start->sandbox)
		return true;
	if (!dir_of(path, want))
		return false;
	for (size_t i = 0; i < start->n_exports; i++) {
		const char *p;
		for (size_t t = 0; t < ARRAY_SIZE(path_types); t++)
			for (size_t j = 0;
			     (p = config_export_path(&start->exports[i], path_types[t], j)); j++)
				if (dir_of(p, have) && strcmp(want, have) == 0)
					return true;
	}
	for (size_t i = 0; i < start->n_sandbox_paths; i++)
		if (realpath(start->sandbox_paths[i], have) && beneath(want, have))
			return true;
	return false;
}

/* The run-time export named @name, removed or not; NULL if none. */
static struct nbdv_export *by_name(struct nbdv_server *srv, const char *name)
{
	for (size_t i = 0; i < srv->n_exports; i++)
		if (strcmp(srv->exports[i].cfg->name, name) == 0)
			return &srv->exports[i];
	return NULL;
}

/* Can @next's exports be applied?  NULL, or why not (into @buf). */
static const char *check_exports(struct nbdv_server *srv, const struct nbdv_config *next, char *buf,
				 size_t len)
{
	size_t added = 0;

	for (size_t i = 0; i < next->n_exports; i++) {
		const struct nbdv_export_cfg *ne = &next->exports[i];
		struct nbdv_export *e = by_name(srv, ne->name);

		if (e && !same_storage(e->cfg, ne)) {
			snprintf(buf, len, "export %.100s's driver, its keys, size or mode",
				 ne->name);
			return buf;
		}
		if (!e) {
			const char *path;

			added++;
			if ((ne->drv->needs & NBDV_NEEDS_NETWORK) && srv->cfg->sandbox &&
			    !config_needs_network(srv->cfg)) {
				snprintf(
				    buf, len,
				    "export %.100s's driver %s needs network access, which the "
				    "sandbox did not allow at start",
				    ne->name, ne->drv->name);
				return buf;
			}
			for (size_t t = 0; t < ARRAY_SIZE(path_types); t++) {
				for (size_t j = 0;
				     (path = config_export_path(ne, path_types[t], j)); j++) {
					if (sandbox_allows(srv->cfg, path))
						continue;
					snprintf(buf, len,
						 "export %.100s's path %.200s is outside what the "
						 "sandbox allowed at start (add its directory to "
						 "sandbox-paths)",
						 ne->name, path);
					return buf;
				}
			}
		}
	}
	if (srv->n_exports + added > srv->cfg->n_exports + NBDV_RELOAD_EXPORTS) {
		snprintf(buf, len, "more than %d exports added since start", NBDV_RELOAD_EXPORTS);
		return buf;
	}
	return NULL;
}

int server_reload(struct nbdv_server *srv)
{
	struct nbdv_config *next, **retired;
	unsigned added = 0, removed = 0, kept = 0;
	char err[1024];
	const char *why;

	if (config_load(srv->cfg->file, &next, err, sizeof(err)) < 0) {
		log_err("SIGHUP: configuration not reloaded: %s", err);
		return -1;
	}
	why = restart_only(srv->cfg, next);
	if (!why)
		why = check_exports(srv, next, err, sizeof(err));
	if (why) {
		log_err("SIGHUP: %s changed, which needs a restart: configuration not reloaded",
			why);
		config_free(next);
		return -1;
	}
	retired = realloc(srv->retired, (srv->n_retired + 1) * sizeof(*retired));
	if (!retired) {
		log_err("SIGHUP: out of memory: configuration not reloaded");
		config_free(next);
		return -1;
	}
	srv->retired = retired;
	why = server_listeners_prepare(srv, next, err, sizeof(err));
	if (why) {
		log_err("SIGHUP: %s, which needs a restart: configuration not reloaded", why);
		config_free(next);
		return -1;
	}
	/* Exports in the new file: keep (with the new policy), revive or add. */
	for (size_t i = 0; i < next->n_exports; i++) {
		struct nbdv_export *e = by_name(srv, next->exports[i].name);

		if (e) {
			e->cfg = &next->exports[i];
			if (e->removed)
				added++;
			else
				kept++;
			e->removed = false;
		} else {
			size_t n = srv->n_exports;
			srv->exports[n].cfg = &next->exports[i];
			srv->n_exports = n + 1; /* published once the entry is whole */
			added++;
		}
	}
	/* Exports gone from the file. */
	for (size_t i = 0; i < srv->n_exports; i++) {
		struct nbdv_export *e = &srv->exports[i];
		bool present = false;
		for (size_t k = 0; k < next->n_exports && !present; k++)
			present = e->cfg == &next->exports[k];
		if (!present && !e->removed) {
			e->removed = true;
			removed++;
		}
	}
	if (srv->live != srv->cfg)
		srv->retired[srv->n_retired++] = srv->live;
	server_listeners_commit(srv, next);
	srv->live = next;
	log_info("SIGHUP: configuration reloaded: %u export(s) added, %u removed, %u kept", added,
		 removed, kept);
	server_recheck_sessions(srv);
	return 0;
}
