/*
 * Fuzz the transmission phase: a fixed, valid handshake chosen by the first input byte
 * (structured replies on/off, base:allocation on/off, export mem/ro, extended headers
 * on/off), then the rest of the input as request headers and payloads.
 */
#include "build-config.h"

#include <endian.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"
#include "protocol.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	fuzz_server_init();
	return 0;
}

static size_t put_opt(uint8_t *p, uint32_t opt, const void *d, uint32_t len)
{
	struct nbd_option o = {htobe64(NBD_IHAVEOPT), htobe32(opt), htobe32(len)};

	memcpy(p, &o, sizeof(o));
	if (len)
		memcpy(p + sizeof(o), d, len); /* d may be NULL when len is 0 */
	return sizeof(o) + len;
}

static size_t put_be32(uint8_t *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, 4);
	return 4;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t *buf, tmp[128];
	const char *name;
	size_t n = 0, t;
	uint8_t mode;

	if (size < 1)
		return 0;
	mode = data[0];
	name = (mode & 4) ? "ro" : "mem";
	buf = malloc(512 + size);
	if (!buf)
		abort();
	n += put_be32(buf, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	if (mode & 8) /* extended headers: 32-byte requests; they imply structured replies */
		n += put_opt(buf + n, NBD_OPT_EXTENDED_HEADERS, NULL, 0);
	else if (mode & 1)
		n += put_opt(buf + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	if ((mode & 3) == 3 || (mode & 10) == 10) {
		t = put_be32(tmp, (uint32_t)strlen(name));
		memcpy(tmp + t, name, strlen(name));
		t += strlen(name);
		t += put_be32(tmp + t, 1);
		t += put_be32(tmp + t, 15);
		memcpy(tmp + t, "base:allocation", 15);
		t += 15;
		n += put_opt(buf + n, NBD_OPT_SET_META_CONTEXT, tmp, (uint32_t)t);
	}
	t = put_be32(tmp, (uint32_t)strlen(name));
	memcpy(tmp + t, name, strlen(name));
	t += strlen(name);
	tmp[t++] = 0;
	tmp[t++] = 0; /* no info requests */
	n += put_opt(buf + n, NBD_OPT_GO, tmp, (uint32_t)t);
	memcpy(buf + n, data + 1, size - 1);
	fuzz_serve(buf, n + size - 1);
	free(buf);
	return 0;
}
