/* nbdvault - minimal assertions for the C unit tests: a failure prints where and exits 1. */
#ifndef NBDV_TEST_CHECK_H
#define NBDV_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int checks_run;

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		checks_run++;                                                                      \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
			exit(1);                                                                   \
		}                                                                                  \
	} while (0)

#define CHECK_MSG(cond, ...)                                                                       \
	do {                                                                                       \
		checks_run++;                                                                      \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);   \
			fprintf(stderr, __VA_ARGS__);                                              \
			fprintf(stderr, "\n");                                                     \
			exit(1);                                                                   \
		}                                                                                  \
	} while (0)

#define CHECKS_DONE(name)                                                                          \
	do {                                                                                       \
		printf("%s: %d checks passed\n", name, checks_run);                                \
		return checks_run > 0 ? 0 : 1;                                                     \
	} while (0)

#endif
