/*
 * nbdvault - configuration: YAML file -> validated, immutable struct nbdv_config.
 *
 * config_load() parses with libyaml, then validates in a separate pass.  Every error
 * names FILE:LINE:COLUMN and the key path.  The snapshot is never changed after it
 * is returned; config_free() releases it and every string in it.
 */
#ifndef NBDV_CONFIG_H
#define NBDV_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "nbdvault/driver.h"

#include "compiler.h"

#define NBDV_DEFAULT_CONFIG		"/etc/nbdvault/nbdvault.yaml"
#define NBDV_DEFAULT_PIDFILE		"/run/nbdvault/nbdvault.pid"
#define NBDV_DEFAULT_PORT		10809
#define NBDV_DEFAULT_MAX_REQUEST	(32U * 1024 * 1024)
#define NBDV_DEFAULT_IO_THREADS		4
#define NBDV_MAX_WORKERS		64    /* reactors */
#define NBDV_DEFAULT_BUSY_POLL		50e-6 /* seconds */
#define NBDV_MAX_BUSY_POLL		0.01
#define NBDV_DEFAULT_MAX_INFLIGHT_BYTES (96ULL * 1024 * 1024)
#define NBDV_DEFAULT_MAX_CONNECTIONS	1024
#define NBDV_DEFAULT_HANDSHAKE_TIMEOUT	10.0

struct nbdv_driver;

/* One `listen:` entry: TCP (address+port) or a unix socket path. */
struct nbdv_listen_cfg {
	char *address;	 /* TCP host or literal; NULL for unix */
	uint16_t port;	 /* TCP port */
	char *unix_path; /* unix socket path; NULL for TCP */
};

/* `tls.mode` (and the server's behaviour without a `tls` block: TLS_OFF). */
enum nbdv_tls_mode {
	TLS_OFF,      /* STARTTLS answered NBD_REP_ERR_POLICY */
	TLS_OPTIONAL, /* clients choose; exports with `tls: require` need it */
	TLS_REQUIRE,  /* nothing but STARTTLS and ABORT before TLS */
};

/* The `tls:` block. */
struct nbdv_tls_cfg {
	enum nbdv_tls_mode mode; /* TLS_OFF when there is no block */
	char *certificates;	 /* directory with ca-cert.pem, server-*.pem, or NULL */
	bool verify_clients;	 /* demand a client certificate from ca-cert.pem's CA */
	char *psk_file;		 /* psktool file, or NULL */
	char *priority;		 /* GnuTLS priority string (default NBDV_TLS_PRIORITY) */
	bool session_tickets;	 /* issue session tickets (resumption); default true */
};

/* Caps for one client identity (limits.identities), or the default for all. */
struct nbdv_identity_limits {
	char *identity;		  /* "psk:alice", "dn:...", "cn:..."; NULL for the default */
	uint64_t bandwidth;	  /* bytes/s of READ and WRITE data (0: no cap) */
	uint64_t iops;		  /* requests/s (0: no cap) */
	unsigned max_connections; /* 0: limits.max-connections-per-identity */
};

/* One `exports:` entry. */
struct nbdv_export_cfg {
	char *name;		       /* unique, 1..4096 bytes */
	char *description;	       /* optional, NULL if absent */
	char *driver_name;	       /* `driver:` as written */
	const struct nbdv_driver *drv; /* resolved driver table */
	struct nbdv_value *values;     /* the driver's keys, values[i] for drv->keys[i] */
	size_t n_values;
	uint64_t size;	      /* `size:` in bytes (0 if absent) */
	bool size_given;      /* whether `size:` was present */
	bool readonly;	      /* `readonly:` */
	bool resizable;	      /* `resizable:` NBD_CMD_RESIZE allowed */
	bool on_remove_close; /* `on-remove: close`: a reload removing it closes
			       * its sessions (default finish) */
	uint64_t max_size;    /* `max-size:` largest RESIZE (0: no limit) */
	uint32_t min_block;   /* `minimum-block-size:` advertised minimum, a power of
			       * two 1..64 KiB (default 1); RESIZE sizes are multiples */
	uint64_t bandwidth;   /* `bandwidth:` bytes/s for all its sessions (0: none) */
	uint64_t iops;	      /* `iops:` requests/s for all its sessions (0: none) */
	bool tls_required;    /* `tls: require` (matters in optional mode) */
	char **allow;	      /* `allow:` identities ("cn:", "dn:", "psk:"), or NULL */
	size_t n_allow;	      /* entries in allow */
};

struct nbdv_config {
	char *file;			/* path the snapshot was read from */
	struct nbdv_listen_cfg *listen; /* listeners, at least one */
	size_t n_listen;
	bool listen_default;		 /* no `listen:` in the file: the default entry */
	char *default_export;		 /* served for the empty name, or NULL */
	struct nbdv_export_cfg *exports; /* exports in file order */
	size_t n_exports;
	uint32_t max_request;		 /* limits.max-request: maximum payload, bytes */
	uint64_t max_inflight_bytes;	 /* limits.max-inflight-bytes, per connection */
	uint64_t max_memory;		 /* limits.max-memory, whole process (default RAM / 4) */
	unsigned max_connections;	 /* limits.max-connections */
	unsigned max_conns_per_identity; /* limits.max-connections-per-identity (0: none) */
	struct nbdv_identity_limits identity_default; /* limits.identity-bandwidth, -iops */
	struct nbdv_identity_limits *identities;      /* limits.identities overrides */
	size_t n_identities;
	double handshake_timeout; /* limits.handshake-timeout, seconds (0: off) */
	double idle_timeout;	  /* limits.idle-timeout, seconds (0: off) */
	unsigned io_threads;	  /* io-threads: I/O threads of the executor */
	unsigned workers;	  /* workers: reactors; 0 = one per online CPU */
	double busy_poll;	  /* busy-poll: seconds a reactor polls after replies; 0 = off */
	struct nbdv_tls_cfg tls;  /* `tls:` */
	struct nbdv_listen_cfg *metrics; /* `metrics:` listener, or NULL (off) */
	char *audit_log;		 /* `audit-log:` path, "stderr", or NULL (off) */
	char *driver_dir;		 /* `driver-dir:` where NAME.so drivers are, or NULL */
	const char *pidfile;		 /* --pidfile (not from the file): removed at exit */
	char *user;			 /* `user:` to run as once listening, or NULL */
	char *group;			 /* `group:` (default: the user's group), or NULL */
	bool sandbox;			 /* `sandbox:` Landlock + seccomp once serving */
	char **sandbox_paths;		 /* `sandbox-paths:` more paths a reload may use */
	size_t n_sandbox_paths;
};

/*
 * Load and validate @path.  On success returns 0 and *out owns the snapshot (free it
 * with config_free).  On failure returns -1 and writes one line "FILE:LINE:COL: ..."
 * into @err.
 */
int config_load(const char *path, struct nbdv_config **out, char *err, size_t errlen) NBDV_WUR
    NBDV_NONNULL(1, 2, 3);

void config_free(struct nbdv_config *cfg);

/* Find an export by name (the empty name maps to default-export); NULL if none. */
const struct nbdv_export_cfg *config_find_export(const struct nbdv_config *cfg, const char *name,
						 size_t namelen);

/* The @n-th (from 0) path among @e's driver values of key type @type (NBDV_KEY_PATH:
 * storage, NBDV_KEY_FILE: read-only files), or NULL. */
const char *config_export_path(const struct nbdv_export_cfg *e, int type, size_t n);
/* Whether an export of @cfg has a driver that talks to the network after start
 * (NBDV_NEEDS_NETWORK): the sandbox then allows a network client's system calls. */
bool config_needs_network(const struct nbdv_config *cfg);
/* Whether @a and @b name the same driver with the same values for its keys. */
bool config_same_driver_values(const struct nbdv_export_cfg *a, const struct nbdv_export_cfg *b);

/*
 * Parse a size such as "512", "64K", "10G" or "1TiB" (K/M/G/T/P binary).  Returns 0 and
 * sets *out, or -EINVAL.  Exposed for the unit tests.
 */
int config_parse_size(const char *s, uint64_t *out) NBDV_WUR;
/* Parse a duration such as "10s", "500ms", "2m", "1h" or "30" (seconds).  0 or -EINVAL. */
int config_parse_duration(const char *s, double *out) NBDV_WUR;

#endif /* NBDV_CONFIG_H */
