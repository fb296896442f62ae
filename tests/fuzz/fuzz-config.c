/* Fuzz the YAML configuration loader: any bytes must give a config or one error line. */
#include "build-config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "driver_registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char path[64];
	struct nbdv_config *cfg = NULL;
	char err[1024];
	FILE *f;

	if (!path[0]) {
		snprintf(path, sizeof(path), "/tmp/nbdvault-fuzz-config-%d.yaml", (int)getpid());
		/* Never dlopen what an input names: driver lookups past the built-ins fail. */
		driver_loading_close();
	}
	f = fopen(path, "wb");
	if (!f || fwrite(data, 1, size, f) != size)
		abort();
	fclose(f);
	if (config_load(path, &cfg, err, sizeof(err)) == 0) {
		if (!cfg || cfg->n_listen == 0)
			abort();
		config_free(cfg);
	} else if (cfg || strncmp(err, path, strlen(path)) != 0 || strchr(err, '\n')) {
		abort(); /* every error names the file, on one line */
	}
	return 0;
}
