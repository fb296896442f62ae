/*
 * The errno -> NBD error mapping of every reply (spec "Error values"): only the seven
 * values the protocol defines reach a client, EDQUOT and EFBIG become ENOSPC, a
 * read-only medium's EROFS is EPERM, anything unknown is EIO, and ENOTSUP only goes
 * to a client that asked for a fast zero.
 */
#include "build-config.h"

#include <errno.h>
#include <stdbool.h>

#include "check.h"
#include "protocol.h"
#include "transmission.h"

int main(void)
{
	static const int defined[] = {NBD_EPERM,  NBD_EIO,	 NBD_ENOMEM,	NBD_EINVAL,
				      NBD_ENOSPC, NBD_EOVERFLOW, NBD_ESHUTDOWN, NBD_ENOTSUP};

	CHECK(transmission_nbd_errno(0, false) == 0);
	CHECK(transmission_nbd_errno(-EPERM, false) == NBD_EPERM);
	CHECK(transmission_nbd_errno(-EROFS, false) == NBD_EPERM);
	CHECK(transmission_nbd_errno(-EIO, false) == NBD_EIO);
	CHECK(transmission_nbd_errno(-ENOMEM, false) == NBD_ENOMEM);
	CHECK(transmission_nbd_errno(-EINVAL, false) == NBD_EINVAL);
	CHECK(transmission_nbd_errno(-ENOSPC, false) == NBD_ENOSPC);
	CHECK(transmission_nbd_errno(-EDQUOT, false) == NBD_ENOSPC);
	CHECK(transmission_nbd_errno(-EFBIG, false) == NBD_ENOSPC);
	CHECK(transmission_nbd_errno(-EOVERFLOW, false) == NBD_EOVERFLOW);
	CHECK(transmission_nbd_errno(-ESHUTDOWN, false) == NBD_ESHUTDOWN);
	CHECK(transmission_nbd_errno(-ENOTSUP, true) == NBD_ENOTSUP);
	CHECK(transmission_nbd_errno(-ENOTSUP, false) == NBD_EINVAL);
	/* Whatever a driver returns, the client sees one of the defined values. */
	for (int e = 1; e < 200; e++) {
		unsigned v = transmission_nbd_errno(-e, e % 2), ok = 0;
		for (unsigned i = 0; i < sizeof(defined) / sizeof(defined[0]); i++)
			ok |= v == (unsigned)defined[i];
		CHECK_MSG(ok, "errno %d became %u", e, v);
	}
	CHECK(transmission_nbd_errno(-ETIMEDOUT, false) == NBD_EIO);
	CHECKS_DONE("test-errno");
}
