/*
 * nbdvault - socket activation and readiness notification for systemd (src/systemd.c).
 */
#ifndef NBDV_SYSTEMD_H
#define NBDV_SYSTEMD_H

#include <stdbool.h>

#include "compiler.h"

/* The LISTEN_FDNAMES name that asks for the config's `listen:` entries as well. */
#define NBDV_FDNAME_WITH_CONFIG "with-config"

/* Listening sockets passed by socket activation (LISTEN_PID/LISTEN_FDS), up to @max,
 * made non-blocking and close-on-exec; returns how many (0 without activation).
 * *with_config is set when one of them is named NBDV_FDNAME_WITH_CONFIG. */
int systemd_listen_fds(int *fds, int max, bool *with_config);
/* Connect to NOTIFY_SOCKET, if set; call before the sandbox closes. */
int systemd_notify_open(void);
/* Send one state message ("READY=1\nSTATUS=..."); a no-op without NOTIFY_SOCKET. */
void systemd_notify(const char *fmt, ...) NBDV_PRINTF(1, 2);
void systemd_notify_close(void);

#endif /* NBDV_SYSTEMD_H */
