/* nbdvault - shared set-up for the libFuzzer harnesses, on the embedded test server. */
#include "build-config.h"

#include "embed.h"
#include "fuzz-common.h"

void fuzz_server_init(void)
{
	static const char yaml[] = "default-export: mem\n"
				   "io-threads: 1\n"
				   "limits:\n  max-request: 64K\n"
				   "exports:\n"
				   "  - name: mem\n    description: fuzz\n    driver: memory\n"
				   "    size: 1M\n"
				   "  - name: ro\n    driver: memory\n    size: 64K\n"
				   "    readonly: true\n";

	(void)embed_init(yaml);
}

void fuzz_serve(const uint8_t *data, size_t size)
{
	struct embed_client *cl = embed_open(size, 0);

	embed_feed(cl, data, size);
	embed_close(cl);
}
