/* nbdvault - compiler helpers shared by every module. */
#ifndef NBDV_COMPILER_H
#define NBDV_COMPILER_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Recover the enclosing struct from a pointer to one of its members (ev.pod "composite watchers").
 */
#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

#define NBDV_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define NBDV_WUR	       __attribute__((warn_unused_result))
#define NBDV_NONNULL(...)      __attribute__((nonnull(__VA_ARGS__)))

#define NBDV_MIN(a, b) ((a) < (b) ? (a) : (b))
#define NBDV_MAX(a, b) ((a) > (b) ? (a) : (b))

/* CLOCK_MONOTONIC in nanoseconds (vDSO: no system call). */
static inline uint64_t nbdv_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

#endif /* NBDV_COMPILER_H */
