/*
 * nbdvault - the audit log (`audit-log:`): JSON lines, one per event; see src/audit.c
 * and docs/operations.md for the schema.
 */
#ifndef NBDV_AUDIT_H
#define NBDV_AUDIT_H

#include <stdbool.h>

/* Most refusals logged per connection (a client must not be able to fill the disk). */
#define AUDIT_REFUSALS 16

/* Open the log: a path, "stderr", or NULL (off).  -1 (logged) on failure. */
int audit_open(const char *where);
/* Reopen the same path (SIGHUP, after logrotate renamed it). */
void audit_reopen(void);
void audit_close(void);
bool audit_enabled(void);
/*
 * One event line.  @conn is the connection id (0: none).  @types gives one letter per
 * field that follows as a (key, value) pair: 's' const char * (NULL is ""), 'u'
 * unsigned long long, 'b' int used as a boolean, 'd' double.
 */
void audit_event(const char *event, unsigned conn, const char *types, ...);

#endif /* NBDV_AUDIT_H */
