/*
 * nbdvault - sizing (src/sizing.c).
 */
#ifndef NBDV_SIZING_H
#define NBDV_SIZING_H

/* Reactors to run by default: the CPUs this process may use, capped by its cgroup's
 * CPU quota (rounded up). */
unsigned sizing_default_workers(void);

#endif /* NBDV_SIZING_H */
