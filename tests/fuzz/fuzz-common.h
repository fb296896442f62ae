/* nbdvault - shared set-up for the libFuzzer harnesses: a server with no listeners and
 * a connection over an in-memory transport (no sockets, no threads doing I/O). */
#ifndef NBDV_FUZZ_COMMON_H
#define NBDV_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Start the embedded server once (exports: "mem" 1 MiB default, "ro" read-only). */
void fuzz_server_init(void);
/* Serve one connection whose client sends exactly @data, then EOF; check cleanup. */
void fuzz_serve(const uint8_t *data, size_t size);

#endif
