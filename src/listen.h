/*
 * nbdvault - listeners (src/listen.c), for the server's other files.
 */
#ifndef NBDV_LISTEN_H
#define NBDV_LISTEN_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>

#include "server.h"

/* Restart the listeners paused when descriptors ran out (the resume timer). */
void listeners_resume_cb(struct ev_loop *loop, ev_timer *w, int revents);
/* Serve the listening socket @fd (a `listen:` entry's address and port, or unix path,
 * or neither for a socket systemd passed). */
int listeners_add(struct nbdv_server *srv, int fd, bool is_tcp, const char *unix_path,
		  const char *address, uint16_t port);
/* Bind one `listen:` entry and serve it; -1 on failure (logged). */
int listeners_bind_entry(struct nbdv_server *srv, const struct nbdv_listen_cfg *l);
/* Stop and close every listener (unix sockets removed): the drain at shutdown. */
void listeners_stop(struct nbdv_server *srv);

#endif /* NBDV_LISTEN_H */
