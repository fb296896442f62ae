/*
 * nbdvault - logging.  One line per message to stderr, with a level prefix; messages
 * about one connection start with its id ("c17: ...").  All functions preserve errno.
 */
#ifndef NBDV_LOG_H
#define NBDV_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "compiler.h"

enum nbdv_log_level {
	LOG_LVL_ERR,
	LOG_LVL_WARN,
	LOG_LVL_INFO,
	LOG_LVL_DEBUG,
};

/* Messages above this level are dropped.  Default LOG_LVL_INFO; --verbose sets DEBUG. */
void log_set_level(enum nbdv_log_level lvl);
bool log_enabled(enum nbdv_log_level lvl);

void log_msg(enum nbdv_log_level lvl, const char *fmt, ...) NBDV_PRINTF(2, 3);

#define log_err(...)  log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
	do {                                                                                       \
		if (log_enabled(LOG_LVL_DEBUG))                                                    \
			log_msg(LOG_LVL_DEBUG, __VA_ARGS__);                                       \
	} while (0)

/*
 * Copy a client-supplied string into @out (size @outlen) for logging: non-printable
 * bytes become \xNN and the result is cut with "..." when too long.  Returns @out.
 */
const char *log_printable(const char *s, size_t len, char *out, size_t outlen);

#endif /* NBDV_LOG_H */
