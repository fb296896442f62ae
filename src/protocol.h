/*
 * nbdvault - NBD wire format, as defined by NetworkBlockDevice/nbd doc/proto.md.
 *
 * Only what the specification defines lives here: magic numbers, flags, option and
 * command codes, reply types, error values and the packed wire structs.  No server
 * logic.  Every multi-byte field on the wire is big-endian; the structs below are
 * laid out exactly as they are sent and must be converted with htobe*()/be*toh().
 */
#ifndef NBDV_PROTOCOL_H
#define NBDV_PROTOCOL_H

#include <stdint.h>

/* Handshake magics. */
#define NBD_MAGIC     0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_IHAVEOPT  0x49484156454f5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ULL /* option reply magic */

/* Handshake flags (server, 16 bits) and client flags (32 bits). */
#define NBD_FLAG_FIXED_NEWSTYLE	  (1U << 0)
#define NBD_FLAG_NO_ZEROES	  (1U << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1U << 0)
#define NBD_FLAG_C_NO_ZEROES	  (1U << 1)

/* Option codes. */
#define NBD_OPT_EXPORT_NAME	  1
#define NBD_OPT_ABORT		  2
#define NBD_OPT_LIST		  3
#define NBD_OPT_PEEK_EXPORT	  4
#define NBD_OPT_STARTTLS	  5
#define NBD_OPT_INFO		  6
#define NBD_OPT_GO		  7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10
#define NBD_OPT_EXTENDED_HEADERS  11

/* Option reply types; errors have bit 31 set. */
#define NBD_REP_ACK		    1
#define NBD_REP_SERVER		    2
#define NBD_REP_INFO		    3
#define NBD_REP_META_CONTEXT	    4
#define NBD_REP_FLAG_ERROR	    (1U << 31)
#define NBD_REP_ERR_UNSUP	    (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY	    (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID	    (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_PLATFORM	    (NBD_REP_FLAG_ERROR | 4)
#define NBD_REP_ERR_TLS_REQD	    (NBD_REP_FLAG_ERROR | 5)
#define NBD_REP_ERR_UNKNOWN	    (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_SHUTDOWN	    (NBD_REP_FLAG_ERROR | 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR | 8)
#define NBD_REP_ERR_TOO_BIG	    (NBD_REP_FLAG_ERROR | 9)
#define NBD_REP_ERR_EXT_HEADER_REQD (NBD_REP_FLAG_ERROR | 10)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT	     0
#define NBD_INFO_NAME	     1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE  3

/* Transmission flags (16 bits). */
#define NBD_FLAG_HAS_FLAGS	    (1U << 0)
#define NBD_FLAG_READ_ONLY	    (1U << 1)
#define NBD_FLAG_SEND_FLUSH	    (1U << 2)
#define NBD_FLAG_SEND_FUA	    (1U << 3)
#define NBD_FLAG_ROTATIONAL	    (1U << 4)
#define NBD_FLAG_SEND_TRIM	    (1U << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1U << 6)
#define NBD_FLAG_SEND_DF	    (1U << 7)
#define NBD_FLAG_CAN_MULTI_CONN	    (1U << 8)
#define NBD_FLAG_SEND_RESIZE	    (1U << 9)
#define NBD_FLAG_SEND_CACHE	    (1U << 10)
#define NBD_FLAG_SEND_FAST_ZERO	    (1U << 11)
#define NBD_FLAG_BLOCK_STAT_PAYLOAD (1U << 12)

/* Request and reply magics. */
#define NBD_REQUEST_MAGIC	   0x25609513U
#define NBD_EXTENDED_REQUEST_MAGIC 0x21e41c71U
#define NBD_SIMPLE_REPLY_MAGIC	   0x67446698U
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efU
#define NBD_EXTENDED_REPLY_MAGIC   0x6e8a278cU

/* Commands. */
#define NBD_CMD_READ	     0
#define NBD_CMD_WRITE	     1
#define NBD_CMD_DISC	     2
#define NBD_CMD_FLUSH	     3
#define NBD_CMD_TRIM	     4
#define NBD_CMD_CACHE	     5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7
#define NBD_CMD_RESIZE	     8

/* Command flags. */
#define NBD_CMD_FLAG_FUA	 (1U << 0)
#define NBD_CMD_FLAG_NO_HOLE	 (1U << 1)
#define NBD_CMD_FLAG_DF		 (1U << 2)
#define NBD_CMD_FLAG_REQ_ONE	 (1U << 3)
#define NBD_CMD_FLAG_FAST_ZERO	 (1U << 4)
#define NBD_CMD_FLAG_PAYLOAD_LEN (1U << 5)

/* Structured reply flags and chunk types; error chunk types have bit 15 set. */
#define NBD_REPLY_FLAG_DONE		(1U << 0)
#define NBD_REPLY_TYPE_NONE		0
#define NBD_REPLY_TYPE_OFFSET_DATA	1
#define NBD_REPLY_TYPE_OFFSET_HOLE	2
#define NBD_REPLY_TYPE_BLOCK_STATUS	5
#define NBD_REPLY_TYPE_BLOCK_STATUS_EXT 6
#define NBD_REPLY_TYPE_ERROR		((1U << 15) | 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET	((1U << 15) | 2)

/* base:allocation status flags. */
#define NBD_STATE_HOLE (1U << 0)
#define NBD_STATE_ZERO (1U << 1)

/* Error values on the wire (NBD's own numbering, which happens to match Linux). */
#define NBD_EPERM     1
#define NBD_EIO	      5
#define NBD_ENOMEM    12
#define NBD_EINVAL    22
#define NBD_ENOSPC    28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP   95
#define NBD_ESHUTDOWN 108

/* Spec limit on strings (export names, error messages, descriptions). */
#define NBD_MAX_STRING 4096

/* --- Wire structs (packed, big-endian fields) --- */

/* Server greeting of the newstyle handshake. */
struct nbd_new_handshake {
	uint64_t nbdmagic; /* NBD_MAGIC */
	uint64_t version;  /* NBD_IHAVEOPT */
	uint16_t gflags;   /* handshake flags */
} __attribute__((packed));

/* Client option header; followed by optlen bytes of data. */
struct nbd_option {
	uint64_t version; /* NBD_IHAVEOPT */
	uint32_t option;  /* NBD_OPT_* */
	uint32_t optlen;  /* length of the data that follows */
} __attribute__((packed));

/* Server option reply header; followed by replylen bytes of data. */
struct nbd_fixed_new_option_reply {
	uint64_t magic;	   /* NBD_REP_MAGIC */
	uint32_t option;   /* the option being answered */
	uint32_t reply;	   /* NBD_REP_* */
	uint32_t replylen; /* length of the data that follows */
} __attribute__((packed));

/* Reply to NBD_OPT_EXPORT_NAME (then 124 zero bytes unless NO_ZEROES). */
struct nbd_export_name_reply {
	uint64_t exportsize; /* size in bytes */
	uint16_t eflags;     /* transmission flags */
} __attribute__((packed));

/* NBD_REP_INFO payload for NBD_INFO_EXPORT. */
struct nbd_info_export {
	uint16_t info;	     /* NBD_INFO_EXPORT */
	uint64_t exportsize; /* size in bytes */
	uint16_t eflags;     /* transmission flags */
} __attribute__((packed));

/* NBD_REP_INFO payload for NBD_INFO_BLOCK_SIZE. */
struct nbd_info_block_size {
	uint16_t info;	    /* NBD_INFO_BLOCK_SIZE */
	uint32_t minimum;   /* minimum block size */
	uint32_t preferred; /* preferred block size */
	uint32_t maximum;   /* maximum payload size */
} __attribute__((packed));

/* Compact request header (28 bytes); WRITE is followed by count bytes of data. */
struct nbd_request {
	uint32_t magic;	 /* NBD_REQUEST_MAGIC */
	uint16_t flags;	 /* NBD_CMD_FLAG_* */
	uint16_t type;	 /* NBD_CMD_* */
	uint64_t cookie; /* opaque, echoed in the reply */
	uint64_t offset; /* byte offset */
	uint32_t count;	 /* byte length */
} __attribute__((packed));

/* Extended request header (32 bytes), after NBD_OPT_EXTENDED_HEADERS; a WRITE, or a
 * command with NBD_CMD_FLAG_PAYLOAD_LEN, is followed by length bytes of payload. */
struct nbd_extended_request {
	uint32_t magic;	 /* NBD_EXTENDED_REQUEST_MAGIC */
	uint16_t flags;	 /* NBD_CMD_FLAG_* */
	uint16_t type;	 /* NBD_CMD_* */
	uint64_t cookie; /* opaque, echoed in the reply */
	uint64_t offset; /* byte offset */
	uint64_t length; /* effect length, or payload length with PAYLOAD_LEN */
} __attribute__((packed));

/* Simple reply (16 bytes); a successful READ is followed by its data. */
struct nbd_simple_reply {
	uint32_t magic;	 /* NBD_SIMPLE_REPLY_MAGIC */
	uint32_t error;	 /* NBD_E* or 0 */
	uint64_t cookie; /* from the request */
} __attribute__((packed));

/* Structured reply chunk header (20 bytes); followed by length bytes. */
struct nbd_structured_reply {
	uint32_t magic;	 /* NBD_STRUCTURED_REPLY_MAGIC */
	uint16_t flags;	 /* NBD_REPLY_FLAG_* */
	uint16_t type;	 /* NBD_REPLY_TYPE_* */
	uint64_t cookie; /* from the request */
	uint32_t length; /* payload length */
} __attribute__((packed));

/* Extended reply header (32 bytes): every reply once extended headers are on. */
struct nbd_extended_reply {
	uint32_t magic;	 /* NBD_EXTENDED_REPLY_MAGIC */
	uint16_t flags;	 /* NBD_REPLY_FLAG_* */
	uint16_t type;	 /* NBD_REPLY_TYPE_* */
	uint64_t cookie; /* from the request */
	uint64_t offset; /* the request's offset, echoed */
	uint64_t length; /* payload length */
} __attribute__((packed));

/* Payload head of OFFSET_HOLE. */
struct nbd_chunk_offset_hole {
	uint64_t offset; /* start of the hole */
	uint32_t length; /* bytes of zeroes, nonzero */
} __attribute__((packed));

/* One base:allocation descriptor in a BLOCK_STATUS chunk. */
struct nbd_block_descriptor {
	uint32_t length;       /* nonzero */
	uint32_t status_flags; /* NBD_STATE_* */
} __attribute__((packed));

/* One descriptor in a BLOCK_STATUS_EXT chunk (extended headers). */
struct nbd_block_descriptor_ext {
	uint64_t length;       /* nonzero */
	uint64_t status_flags; /* NBD_STATE_* */
} __attribute__((packed));

/* Payload head of ERROR and ERROR_OFFSET; message follows, then (ERROR_OFFSET) a u64 offset. */
struct nbd_chunk_error {
	uint32_t error; /* NBD_E*, nonzero */
	uint16_t len;	/* message length */
} __attribute__((packed));

#endif /* NBDV_PROTOCOL_H */
