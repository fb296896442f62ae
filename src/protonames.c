/* nbdvault - printable names of NBD protocol values. */
#include "build-config.h"

#include "compiler.h"
#include "protocol.h"
#include "protonames.h"

#define NAME(x) [x] = #x

const char *nbd_opt_name(uint32_t opt)
{
	static const char *const names[] = {
	    NAME(NBD_OPT_EXPORT_NAME),
	    NAME(NBD_OPT_ABORT),
	    NAME(NBD_OPT_LIST),
	    NAME(NBD_OPT_PEEK_EXPORT),
	    NAME(NBD_OPT_STARTTLS),
	    NAME(NBD_OPT_INFO),
	    NAME(NBD_OPT_GO),
	    NAME(NBD_OPT_STRUCTURED_REPLY),
	    NAME(NBD_OPT_LIST_META_CONTEXT),
	    NAME(NBD_OPT_SET_META_CONTEXT),
	    NAME(NBD_OPT_EXTENDED_HEADERS),
	};
	return opt < ARRAY_SIZE(names) && names[opt] ? names[opt] : "unknown option";
}

const char *nbd_rep_name(uint32_t rep)
{
	static const char *const ok[] = {NAME(NBD_REP_ACK), NAME(NBD_REP_SERVER),
					 NAME(NBD_REP_INFO), NAME(NBD_REP_META_CONTEXT)};
	static const char *const err[] = {
	    [1] = "NBD_REP_ERR_UNSUP",	  [2] = "NBD_REP_ERR_POLICY",
	    [3] = "NBD_REP_ERR_INVALID",  [4] = "NBD_REP_ERR_PLATFORM",
	    [5] = "NBD_REP_ERR_TLS_REQD", [6] = "NBD_REP_ERR_UNKNOWN",
	    [7] = "NBD_REP_ERR_SHUTDOWN", [8] = "NBD_REP_ERR_BLOCK_SIZE_REQD",
	    [9] = "NBD_REP_ERR_TOO_BIG",  [10] = "NBD_REP_ERR_EXT_HEADER_REQD",
	};
	uint32_t e = rep & ~NBD_REP_FLAG_ERROR;

	if (rep & NBD_REP_FLAG_ERROR)
		return e < ARRAY_SIZE(err) && err[e] ? err[e] : "unknown error reply";
	return rep < ARRAY_SIZE(ok) && ok[rep] ? ok[rep] : "unknown reply";
}

const char *nbd_cmd_name(uint16_t cmd)
{
	static const char *const names[] = {
	    NAME(NBD_CMD_READ),		NAME(NBD_CMD_WRITE),	    NAME(NBD_CMD_DISC),
	    NAME(NBD_CMD_FLUSH),	NAME(NBD_CMD_TRIM),	    NAME(NBD_CMD_CACHE),
	    NAME(NBD_CMD_WRITE_ZEROES), NAME(NBD_CMD_BLOCK_STATUS), NAME(NBD_CMD_RESIZE),
	};
	return cmd < ARRAY_SIZE(names) && names[cmd] ? names[cmd] : "unknown command";
}

const char *nbd_err_name(uint32_t err)
{
	switch (err) {
	case 0:
		return "success";
	case NBD_EPERM:
		return "EPERM";
	case NBD_EIO:
		return "EIO";
	case NBD_ENOMEM:
		return "ENOMEM";
	case NBD_EINVAL:
		return "EINVAL";
	case NBD_ENOSPC:
		return "ENOSPC";
	case NBD_EOVERFLOW:
		return "EOVERFLOW";
	case NBD_ENOTSUP:
		return "ENOTSUP";
	case NBD_ESHUTDOWN:
		return "ESHUTDOWN";
	default:
		return "unknown error";
	}
}
