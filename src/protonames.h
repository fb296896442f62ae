/* nbdvault - printable names of NBD protocol values, for log lines. */
#ifndef NBDV_PROTONAMES_H
#define NBDV_PROTONAMES_H

#include <stdint.h>

/* Each returns a static string; unknown values give "unknown". */
const char *nbd_opt_name(uint32_t opt);
const char *nbd_rep_name(uint32_t rep);
const char *nbd_cmd_name(uint16_t cmd);
const char *nbd_err_name(uint32_t err);

#endif /* NBDV_PROTONAMES_H */
