/*
 * nbdvault - least privilege once serving: `user:`/`group:`, then Landlock and seccomp
 * (`sandbox:`).  See src/sandbox.c for what each layer allows.
 */
#ifndef NBDV_SANDBOX_H
#define NBDV_SANDBOX_H

#include "compiler.h"

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct nbdv_config;

/* Who to become. */
struct nbdv_ids {
	bool wanted;	  /* `user:` was given */
	const char *name; /* as written (for log lines) */
	uid_t uid;
	gid_t gid;
};

/* Look up cfg->user and cfg->group before anything is bound, so that a typo stops the
 * server at once.  -1 (logged) when one does not exist or cannot be switched to. */
int sandbox_resolve_user(const struct nbdv_config *cfg, struct nbdv_ids *ids) NBDV_WUR;
/* Switch to @ids, verified; 0 when there is nothing to do.  -1 (logged) on failure:
 * the server must not go on. */
int sandbox_drop_user(const struct nbdv_ids *ids) NBDV_WUR;
/* The directory holding @path ("." for a bare name), written into @dir. */
char *sandbox_dir_of(const char *path, char *dir, size_t len);
/* Enter the sandbox if cfg->sandbox: call on the main thread before any other thread
 * is started.  A kernel without Landlock or seccomp is logged once and not an error;
 * -1 (logged) when a layer the kernel has cannot be entered. */
int sandbox_enter(const struct nbdv_config *cfg) NBDV_WUR;
#ifdef NBDV_TEST_HOOKS
/* Tests only: NBDVAULT_TEST_ESCAPE=open|exec tries to read /etc/passwd or run
 * /bin/true, and logs the outcome (or dies of SIGSYS). */
void sandbox_test_escape(void);
#endif

#endif /* NBDV_SANDBOX_H */
