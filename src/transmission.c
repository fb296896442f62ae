/*
 * nbdvault - transmission phase (NBD spec, "Transmission").
 *
 * A request header is checked (magic, command, flags, bounds, payload size) before
 * anything is allocated for it; a WRITE payload is read straight into the buffer the
 * driver will write from.  Valid requests become executor jobs; their completions
 * build replies that may leave out of order, each carrying its request's cookie.
 */
#include "build-config.h"

#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "conn.h"
#include "executor.h"
#include "export.h"
#include "log.h"
#include "metrics.h"
#include "protonames.h"
#include "protocol.h"
#include "server.h"
#include "transmission.h"
#include "transport.h"

/* The id nbdvault gives base:allocation, its only metadata context. */
#define META_CONTEXT_ID 1
/* Most descriptors in one BLOCK_STATUS reply (the spec lets a server send fewer). */
#define MAX_STATUS_EXTENTS 1024
/* Reads up to this size are tried inline from the page cache (RWF_NOWAIT) first. */
#define INLINE_READ_BYTES (64 * 1024)
/* Writes up to this size, without FUA, are offered to the driver inline first. */
#define INLINE_WRITE_BYTES (256 * 1024)
/* Reads larger than this whose data is all in the page cache are sent from it with
 * sendfile() on plain connections (smaller ones are copied: their replies then leave
 * together in one sendmsg). */
#define SENDFILE_MIN_BYTES INLINE_READ_BYTES
/* Where there is no sendfile() (TLS), such reads up to this size are copied from the
 * page cache on the reactor, which encrypts them next anyway: a trip to the I/O
 * threads and back cost TLS file reads ~20% more server CPU per GiB.  4 MiB covers
 * qemu-img convert's 2 MiB requests (1 MiB sent them to the I/O threads: 19% more
 * server CPU per GiB and 14% slower); the copy takes a fraction of the time the
 * reactor then spends encrypting the reply. */
#define CACHED_COPY_BYTES (4 * 1024 * 1024)
/* READs and WRITEs larger than this run on the I/O threads even for drivers that never
 * block (memory): a 32 MiB read into a fresh buffer faults in 8,192 pages and copies,
 * 25-30 ms that held every other connection of the reactor; the hand-off costs nothing
 * next to a copy this size. */
#define REACTOR_COPY_MAX CACHED_COPY_BYTES
/* A READ that fails is re-read in pieces of this size to find where (ERROR_OFFSET). */
#define READ_ERROR_GRAIN 4096
/* Most chunks a sparse READ reply is split into; the rest is sent as data. */
#define MAX_READ_CHUNKS 32

struct nbdv_req {
	struct nbdv_job job;	    /* executor link; must be first */
	struct nbdv_conn *conn;	    /* owner; may be dead when the job completes */
	const struct nbdv_dev *dev; /* export device */
	uint64_t cookie;	    /* echoed in the reply */
	uint64_t offset;	    /* request offset */
	uint64_t count;		    /* effect length (READ/WRITE: at most max-request) */
	uint32_t plen;		    /* payload bytes that follow the header */
	uint16_t type;		    /* NBD_CMD_* */
	uint16_t flags;		    /* NBD_CMD_FLAG_* */
	uint32_t got;		    /* payload bytes received */
	uint8_t *buf;		    /* READ/WRITE data (count bytes) or another payload */
	int err;		    /* 0 or -errno from the driver */
	bool sparse;		    /* READ: ext describes holes to send as OFFSET_HOLE */
	bool structured;	    /* the connection has structured replies */
	bool from_file;		    /* READ: data is sent from file_fd by the transport */
	int file_fd;		    /* (the export's file, open while the connection is) */
	struct nbdv_extents ext;    /* BLOCK_STATUS result, or READ layout */
	size_t charge;		    /* memory charged to conn (see req_charge()) */
	uint64_t t0;		    /* CLOCK_MONOTONIC ns at the header (metrics only) */
	bool err_at_known;	    /* READ: err happened at err_at, data before it is good */
	uint64_t err_at;	    /* (the first failing byte, block-aligned) */
	struct nbdv_aio aio;	    /* asynchronous drivers: the operation submitted */
	/* Not cleared when recycled: */
	struct nbdv_extent read_ext[MAX_READ_CHUNKS]; /* storage for a sparse READ's layout */
};

uint32_t transmission_nbd_errno(int err, bool fast_zero)
{
	switch (-err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
		return NBD_EPERM;
	case EIO:
		return NBD_EIO;
	case ENOMEM:
		return NBD_ENOMEM;
	case EINVAL:
		return NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return NBD_ENOSPC;
	case EOVERFLOW:
		return NBD_EOVERFLOW;
	case ENOTSUP:
		/* ENOTSUP is only meaningful to a client that asked for a fast zero. */
		return fast_zero ? NBD_ENOTSUP : NBD_EINVAL;
	case ESHUTDOWN:
		return NBD_ESHUTDOWN;
	default:
		return NBD_EIO;
	}
}

/*
 * What @r holds: the struct, its data buffer and, for BLOCK_STATUS, the descriptor
 * array an I/O thread will allocate.  Charged to its connection (limits.max-inflight-bytes)
 * and the process (limits.max-memory) from the moment it exists until it is freed; a
 * READ's buffer is then charged to the reply that took it over.
 */
static size_t req_holds(const struct nbdv_req *r)
{
	size_t n = sizeof(*r) + NBDV_MALLOC_OVERHEAD + nbdv_buf_charge(r->buf);

	if (r->type == NBD_CMD_BLOCK_STATUS)
		n += NBDV_MALLOC_OVERHEAD + 64 + MAX_STATUS_EXTENTS * sizeof(struct nbdv_extent);
	return n;
}

/* Bring @r's charge up to what it holds now. */
static void req_charge(struct nbdv_req *r)
{
	size_t n = req_holds(r);
	ptrdiff_t delta = (ptrdiff_t)n - (ptrdiff_t)r->charge;

	r->conn->req_held += (size_t)delta;
	nbdv_mem_charge(delta);
	r->charge = n;
}

/* Request structs are recycled per thread (each reactor allocates and frees its own),
 * so the steady-state request path does not call malloc. */
static __thread struct nbdv_freelist req_cache = {.max = 1024};

static struct nbdv_req *req_alloc(void)
{
	struct nbdv_req *r = nbdv_freelist_get(&req_cache);

	if (!r)
		return calloc(1, sizeof(*r));
	memset(r, 0, offsetof(struct nbdv_req, read_ext));
	return r;
}

void transmission_req_free(struct nbdv_req *r)
{
	if (!r)
		return;
	if (r->charge) {
		r->conn->req_held -= r->charge;
		nbdv_mem_charge(-(ptrdiff_t)r->charge);
	}
	extents_free(&r->ext);
	nbdv_buf_free(r->buf);
	r->buf = NULL;
	if (!nbdv_freelist_put(&req_cache, r))
		free(r);
}

void transmission_req_cache_drain(void)
{
	nbdv_freelist_drain(&req_cache);
}

/* --- replies --- */

/* A simple reply's header, for data (if any) to follow; NULL on ENOMEM. */
static struct nbdv_outmsg *simple_msg(uint64_t cookie, uint32_t error)
{
	struct nbd_simple_reply h = {
	    .magic = htobe32(NBD_SIMPLE_REPLY_MAGIC),
	    .error = htobe32(error),
	    .cookie = cookie,
	};
	struct nbdv_outmsg *m = outmsg_new(sizeof(h));

	if (m)
		(void)outmsg_add_copy(m, &h, sizeof(h));
	return m;
}

/*
 * A chunk's header and @head (copied), announcing @dlen bytes of data to follow; NULL
 * on ENOMEM.  Structured (20 bytes) or, with extended headers, extended (32 bytes,
 * echoing the request's offset).
 */
static struct nbdv_outmsg *chunk_msg(const struct nbdv_conn *c, const struct nbdv_req *r,
				     uint16_t flags, uint16_t type, const void *head, size_t hlen,
				     size_t dlen)
{
	struct nbd_structured_reply h = {
	    .magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC),
	    .flags = htobe16(flags),
	    .type = htobe16(type),
	    .cookie = r->cookie,
	    .length = htobe32((uint32_t)(hlen + dlen)),
	};
	struct nbd_extended_reply x = {
	    .magic = htobe32(NBD_EXTENDED_REPLY_MAGIC),
	    .flags = htobe16(flags),
	    .type = htobe16(type),
	    .cookie = r->cookie,
	    .offset = htobe64(r->offset),
	    .length = htobe64(hlen + dlen),
	};
	struct nbdv_outmsg *m = outmsg_new(sizeof(x) + hlen);

	if (m) {
		if (c->sess.extended)
			(void)outmsg_add_copy(m, &x, sizeof(x));
		else
			(void)outmsg_add_copy(m, &h, sizeof(h));
		(void)outmsg_add_copy(m, head, hlen);
	}
	return m;
}

static void queue_simple(struct nbdv_conn *c, const struct nbdv_req *r, uint32_t error, void *data,
			 uint32_t len)
{
	struct nbdv_outmsg *m = simple_msg(r->cookie, error);

	if (!m) {
		nbdv_buf_free(data);
		conn_abort(c);
		return;
	}
	if (data) {
		m->owned = data;
		outmsg_add_ref(m, data, len);
	}
	conn_queue(c, m);
}

/* One chunk: header, @head (copied), then @data; the chunk owns (and frees) pool buffer
 * @own, which may be NULL or hold @data. */
static int queue_chunk(struct nbdv_conn *c, const struct nbdv_req *r, uint16_t flags, uint16_t type,
		       const void *head, size_t hlen, const void *data, size_t dlen, void *own)
{
	struct nbdv_outmsg *m = chunk_msg(c, r, flags, type, head, hlen, dlen);

	if (!m) {
		nbdv_buf_free(own);
		conn_abort(c);
		return -ENOMEM;
	}
	outmsg_add_ref(m, data, dlen);
	m->owned = own;
	conn_queue(c, m);
	return 0;
}

/* Success without data: a simple reply, or (extended headers, where simple replies do
 * not exist) a NONE chunk with DONE. */
static void queue_ok(struct nbdv_conn *c, const struct nbdv_req *r)
{
	if (c->sess.extended)
		(void)queue_chunk(c, r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, NULL, 0, NULL, 0,
				  NULL);
	else
		queue_simple(c, r, 0, NULL, 0);
}

/* The structured ERROR chunk, or with @at (not NULL) ERROR_OFFSET naming that offset. */
static void queue_error_chunk(struct nbdv_conn *c, const struct nbdv_req *r, uint32_t error,
			      const char *msg, const uint64_t *at)
{
	struct nbd_chunk_error e;
	uint8_t head[sizeof(e) + 128 + 8];
	size_t mlen = NBDV_MIN(strlen(msg), (size_t)128);
	uint64_t be_at = at ? htobe64(*at) : 0;

	e.error = htobe32(error);
	e.len = htobe16((uint16_t)mlen);
	memcpy(head, &e, sizeof(e));
	memcpy(head + sizeof(e), msg, mlen);
	if (at)
		memcpy(head + sizeof(e) + mlen, &be_at, 8);
	(void)queue_chunk(c, r, NBD_REPLY_FLAG_DONE,
			  at ? NBD_REPLY_TYPE_ERROR_OFFSET : NBD_REPLY_TYPE_ERROR, head,
			  sizeof(e) + mlen + (at ? 8 : 0), NULL, 0, NULL);
}

/* Error reply: structured ERROR chunk with a message when negotiated, else simple. */
static void queue_error(struct nbdv_conn *c, const struct nbdv_req *r, uint32_t error,
			const char *msg)
{
	if (c->sess.structured)
		queue_error_chunk(c, r, error, msg, NULL);
	else
		queue_simple(c, r, error, NULL, 0);
}

/* A READ that failed part-way (structured replies): the good data before the failure,
 * then ERROR_OFFSET naming where it failed (spec: "the data chunks before it"). */
static void reply_read_partial(struct nbdv_conn *c, struct nbdv_req *r, uint32_t error)
{
	uint8_t *buf = r->buf;
	uint64_t be_off = htobe64(r->offset);

	r->buf = NULL; /* the data chunk owns it now (or it is freed here) */
	if (r->err_at > r->offset) {
		if (queue_chunk(c, r, 0, NBD_REPLY_TYPE_OFFSET_DATA, &be_off, 8, buf,
				r->err_at - r->offset, buf) < 0)
			return;
	} else {
		nbdv_buf_free(buf);
	}
	queue_error_chunk(c, r, error, strerror(-r->err), &r->err_at);
}

/* One simple reply or OFFSET_DATA chunk whose data the transport sends from the file. */
static void reply_read_file(struct nbdv_conn *c, struct nbdv_req *r)
{
	uint64_t be_off = htobe64(r->offset);
	struct nbdv_outmsg *m =
	    c->sess.structured ? chunk_msg(c, r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
					   &be_off, sizeof(be_off), r->count)
			       : simple_msg(r->cookie, 0);

	if (!m) {
		conn_abort(c);
		return;
	}
	outmsg_add_file(m, r->file_fd, r->offset, r->count);
	conn_queue(c, m);
}

static void reply_read(struct nbdv_conn *c, struct nbdv_req *r)
{
	uint64_t pos = r->offset, end = r->offset + r->count;
	uint8_t *buf = r->buf;

	r->buf = NULL; /* the reply owns the data now */
	if (r->from_file) {
		reply_read_file(c, r);
		return;
	}
	if (!c->sess.structured) {
		queue_simple(c, r, 0, buf, (uint32_t)r->count);
		return;
	}
	if (r->count == 0) {
		nbdv_buf_free(buf);
		(void)queue_chunk(c, r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, NULL, 0, NULL, 0,
				  NULL);
		return;
	}
	/* Walk the layout: zero extents become OFFSET_HOLE, the rest OFFSET_DATA.  The last
	 * chunk carries DONE and owns the buffer, so it is freed after every chunk left. */
	for (uint32_t i = 0; pos < end; i++) {
		bool hole = r->sparse && i < r->ext.n && (r->ext.e[i].flags & NBD_STATE_ZERO);
		uint64_t n = r->sparse && i < r->ext.n ? r->ext.e[i].length : end - pos;
		bool last = pos + n >= end;
		uint16_t flags = last ? NBD_REPLY_FLAG_DONE : 0;
		uint64_t be_off = htobe64(pos);

		if (hole) {
			struct nbd_chunk_offset_hole h = {be_off, htobe32((uint32_t)n)};
			if (queue_chunk(c, r, flags, NBD_REPLY_TYPE_OFFSET_HOLE, &h, sizeof(h),
					NULL, 0, last ? buf : NULL) < 0) {
				if (!last)
					nbdv_buf_free(buf);
				return;
			}
		} else {
			if (queue_chunk(c, r, flags, NBD_REPLY_TYPE_OFFSET_DATA, &be_off, 8,
					buf + (pos - r->offset), n, last ? buf : NULL) < 0) {
				if (!last)
					nbdv_buf_free(buf);
				return;
			}
		}
		pos += n;
	}
}

/* base:allocation descriptors: 32-bit (BLOCK_STATUS), or with extended headers 64-bit
 * with a descriptor count (BLOCK_STATUS_EXT). */
static void reply_block_status(struct nbdv_conn *c, struct nbdv_req *r)
{
	size_t dsize = c->sess.extended ? sizeof(struct nbd_block_descriptor_ext)
					: sizeof(struct nbd_block_descriptor);
	size_t head = c->sess.extended ? 8 : 4;
	size_t len = head + (size_t)r->ext.n * dsize;
	uint8_t *payload = nbdv_buf_alloc(len);
	uint32_t id = htobe32(META_CONTEXT_ID), count = htobe32(r->ext.n);

	if (!payload) {
		queue_error(c, r, NBD_ENOMEM, "out of memory");
		return;
	}
	memcpy(payload, &id, 4);
	if (c->sess.extended)
		memcpy(payload + 4, &count, 4);
	for (uint32_t i = 0; i < r->ext.n; i++) {
		struct nbd_block_descriptor d = {
		    .length = htobe32((uint32_t)r->ext.e[i].length),
		    .status_flags = htobe32(r->ext.e[i].flags),
		};
		struct nbd_block_descriptor_ext x = {
		    .length = htobe64(r->ext.e[i].length),
		    .status_flags = htobe64(r->ext.e[i].flags),
		};
		memcpy(payload + head + i * dsize, c->sess.extended ? (void *)&x : (void *)&d,
		       dsize);
	}
	(void)queue_chunk(c, r, NBD_REPLY_FLAG_DONE,
			  c->sess.extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT
					   : NBD_REPLY_TYPE_BLOCK_STATUS,
			  NULL, 0, payload, len, payload);
}

/* --- execution --- */

static void read_sparse(struct nbdv_req *r)
{
	uint64_t pos = r->offset;
	uint32_t i;

	/* Ask where the zeroes are; any part the answer does not cover is read as data. */
	extents_init_in(&r->ext, r->offset, r->count, r->read_ext, MAX_READ_CHUNKS - 1);
	r->err = driver_block_status(r->dev, r->count, r->offset, 0, &r->ext);
	if (r->err < 0) {
		/* Sparseness is an optimisation: fall back to one plain read. */
		r->ext.n = 0;
		r->sparse = false;
		r->err = driver_pread(r->dev, r->buf, r->count, r->offset);
		return;
	}
	for (i = 0; i < r->ext.n && r->err == 0; i++) {
		if (!(r->ext.e[i].flags & NBD_STATE_ZERO))
			r->err = driver_pread(r->dev, r->buf + (pos - r->offset),
					      r->ext.e[i].length, pos);
		pos += r->ext.e[i].length;
	}
	if (r->err == 0 && pos < r->offset + r->count)
		r->err = driver_pread(r->dev, r->buf + (pos - r->offset),
				      r->offset + r->count - pos, pos);
}

/*
 * A structured READ failed: find the first block that fails, reading block by block
 * (on the error path only), so that the reply can carry the good data before it and
 * ERROR_OFFSET.  If every block reads now, the READ succeeded after all.
 */
static void locate_read_error(struct nbdv_req *r)
{
	uint64_t pos = r->offset, end = r->offset + r->count;

	while (pos < end) {
		uint64_t n = NBDV_MIN(end - pos, READ_ERROR_GRAIN - (pos % READ_ERROR_GRAIN));
		int err = driver_pread(r->dev, r->buf + (pos - r->offset), (uint32_t)n, pos);

		if (err < 0) {
			r->err = err;
			r->err_at = pos;
			r->err_at_known = true;
			return;
		}
		pos += n;
	}
	r->err = 0;
	r->sparse = false; /* the buffer holds all of it, holes as zeroes */
	r->ext.n = 0;
}

static void req_run_calls(struct nbdv_req *r);

static void req_run(struct nbdv_job *job)
{
	struct nbdv_req *r = (struct nbdv_req *)job;

	if (r->type == NBD_CMD_RESIZE) {
		/* Waits for the export's calls in progress, then changes its size. */
		r->err = driver_resize((struct nbdv_dev *)r->dev, r->offset);
		return;
	}
	driver_hold(r->dev);
	req_run_calls(r);
	driver_release(r->dev);
}

static void req_run_calls(struct nbdv_req *r)
{
	uint32_t f = 0;

	if (r->flags & NBD_CMD_FLAG_FUA)
		f |= NBDV_F_FUA;
	switch (r->type) {
	case NBD_CMD_READ:
		if (r->sparse)
			read_sparse(r);
		else
			r->err = driver_pread(r->dev, r->buf, r->count, r->offset);
		if (r->err < 0 && r->structured && r->count > 0)
			locate_read_error(r);
		break;
	case NBD_CMD_WRITE:
		r->err = driver_pwrite(r->dev, r->buf, r->count, r->offset, f);
		break;
	case NBD_CMD_FLUSH:
		r->err = driver_flush(r->dev);
		break;
	case NBD_CMD_TRIM:
		r->err = driver_trim(r->dev, r->count, r->offset, f);
		break;
	case NBD_CMD_WRITE_ZEROES:
		if (!(r->flags & NBD_CMD_FLAG_NO_HOLE))
			f |= NBDV_F_MAY_TRIM;
		if (r->flags & NBD_CMD_FLAG_FAST_ZERO)
			f |= NBDV_F_FAST;
		r->err = driver_zero(r->dev, r->count, r->offset, f);
		break;
	case NBD_CMD_CACHE:
		r->err = driver_cache(r->dev, r->count, r->offset);
		break;
	case NBD_CMD_BLOCK_STATUS:
		r->err = extents_init(&r->ext, r->offset, r->count,
				      (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_STATUS_EXTENTS);
		if (r->err == 0)
			r->err = driver_block_status(
			    r->dev, r->count, r->offset,
			    (r->flags & NBD_CMD_FLAG_REQ_ONE) ? NBDV_F_REQ_ONE : 0, &r->ext);
		break;
	default:
		r->err = -EINVAL;
		break;
	}
}

/* The work was done before submission (an inline read or write). */
static void req_run_nothing(struct nbdv_job *job)
{
}

/* @r was served inline: its completion (the reply) goes through the reactor's port
 * like any other. */
static void submit_done_inline(struct nbdv_conn *c, struct nbdv_req *r)
{
	r->job.run = req_run_nothing;
	executor_submit(c->srv->exec, &c->r->port, NULL, &r->job, false, false);
}

/* Count a reply in the export's metrics. */
static void count(struct nbdv_conn *c, const struct nbdv_req *r, uint32_t nbd_err)
{
	if (!nbdv_metrics_on)
		return;
	metrics_request(&c->sess.exp->metrics, r->type, nbd_err,
			!nbd_err && r->type == NBD_CMD_READ ? r->count : 0,
			!nbd_err && r->type == NBD_CMD_WRITE ? r->count : 0, nbdv_now_ns() - r->t0);
}

static void req_done(struct nbdv_job *job)
{
	struct nbdv_req *r = (struct nbdv_req *)job;
	struct nbdv_conn *c = r->conn;

	if (c->phase != CONN_DEAD) {
		if (r->err < 0) {
			uint32_t e =
			    transmission_nbd_errno(r->err, r->type == NBD_CMD_WRITE_ZEROES &&
							       (r->flags & NBD_CMD_FLAG_FAST_ZERO));
			if (e != NBD_ENOTSUP)
				log_info("c%u: %s at %llu+%llu failed: %s", c->id,
					 nbd_cmd_name(r->type), (unsigned long long)r->offset,
					 (unsigned long long)r->count, strerror(-r->err));
			if (r->err_at_known)
				reply_read_partial(c, r, e);
			else
				queue_error(c, r, e, strerror(-r->err));
			count(c, r, e);
		} else if (r->type == NBD_CMD_READ) {
			c->read_bytes += r->count;
			count(c, r, 0);
			reply_read(c, r);
		} else if (r->type == NBD_CMD_BLOCK_STATUS) {
			count(c, r, 0);
			reply_block_status(c, r);
		} else if (r->type == NBD_CMD_RESIZE) {
			log_info("c%u: export %s resized to %llu bytes", c->id,
				 c->sess.exp->cfg->name, (unsigned long long)r->offset);
			if (r->offset > c->sess.told_size)
				c->sess.told_size = r->offset;
			count(c, r, 0);
			queue_ok(c, r);
		} else {
			if (r->type == NBD_CMD_WRITE)
				c->write_bytes += r->count;
			count(c, r, 0);
			queue_ok(c, r);
		}
	}
	transmission_req_free(r);
	conn_request_done(c);
	conn_release(c);
}

/* --- validation --- */

/* Flags each command may carry besides FUA (which is valid on every command). */
static uint16_t allowed_flags(const struct nbdv_conn *c, uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return c->sess.structured ? NBD_CMD_FLAG_DF : 0;
	case NBD_CMD_WRITE:
		return c->sess.extended ? NBD_CMD_FLAG_PAYLOAD_LEN : 0;
	case NBD_CMD_WRITE_ZEROES:
		return NBD_CMD_FLAG_NO_HOLE |
		       ((c->sess.tflags & NBD_FLAG_SEND_FAST_ZERO) ? NBD_CMD_FLAG_FAST_ZERO : 0);
	case NBD_CMD_BLOCK_STATUS:
		return NBD_CMD_FLAG_REQ_ONE |
		       ((c->sess.tflags & NBD_FLAG_BLOCK_STAT_PAYLOAD) ? NBD_CMD_FLAG_PAYLOAD_LEN
								       : 0);
	default:
		return 0;
	}
}

/* NBD_CMD_RESIZE: the new size travels in the offset field, the length is zero. */
static uint32_t validate_resize(struct nbdv_conn *c, const struct nbdv_req *r, const char **why)
{
	const struct nbdv_export_cfg *e = c->sess.exp->cfg;

	if (r->count) {
		*why = "resize length must be zero";
		return NBD_EINVAL;
	}
	if (c->sess.tflags & NBD_FLAG_READ_ONLY) {
		*why = "export is read-only";
		return NBD_EPERM;
	}
	if (r->offset % e->min_block) {
		*why = "not a multiple of the minimum block size";
		return NBD_EINVAL;
	}
	if (e->max_size && r->offset > e->max_size) {
		*why = "larger than the export's max-size";
		return NBD_ENOSPC;
	}
	/* Optional in the extension, done here: a shrink under another client's feet could
	 * cut away what it is writing. */
	if (r->offset < c->sess.dev->size &&
	    __atomic_load_n(&c->sess.exp->sessions, __ATOMIC_RELAXED) > 1) {
		*why = "other connections have the export open: not shrinking it";
		return NBD_EPERM;
	}
	return 0;
}

/* 0 if @r may run, else the NBD error to answer with and *why. */
static uint32_t validate(struct nbdv_conn *c, const struct nbdv_req *r, const char **why)
{
	const struct nbdv_dev *d = c->sess.dev;
	bool writes =
	    r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM || r->type == NBD_CMD_WRITE_ZEROES;
	bool in_range = r->offset <= d->size && r->count <= d->size - r->offset;

	switch (r->type) {
	case NBD_CMD_READ:
	case NBD_CMD_WRITE:
	case NBD_CMD_FLUSH:
	case NBD_CMD_TRIM:
	case NBD_CMD_CACHE:
	case NBD_CMD_WRITE_ZEROES:
	case NBD_CMD_BLOCK_STATUS:
		break;
	case NBD_CMD_RESIZE:
		if (c->sess.tflags & NBD_FLAG_SEND_RESIZE)
			break;
		/* not advertised, so not a command of this export */
		__attribute__((fallthrough));
	default:
		*why = "unknown command";
		return NBD_EINVAL;
	}
	if (r->flags & ~(NBD_CMD_FLAG_FUA | allowed_flags(c, r->type))) {
		*why = "flag not valid for this command";
		return NBD_EINVAL;
	}
	if (writes && (c->sess.tflags & NBD_FLAG_READ_ONLY)) {
		*why = "export is read-only";
		return NBD_EPERM;
	}
	if (r->type == NBD_CMD_RESIZE)
		return validate_resize(c, r, why);
	if (r->type == NBD_CMD_FLUSH) {
		if (r->offset || r->count) {
			*why = "flush offset and length must be zero";
			return NBD_EINVAL;
		}
		return 0;
	}
	if (!in_range) {
		/* Spec, "Error values": ENOSPC for a write beyond the end, EINVAL for a read
		 * or a trim (and the other commands, which write nothing).  After a shrink,
		 * anything beyond the new end but within a size this client was told is
		 * ENOSPC (extension-resize). */
		*why = "request extends beyond the end of the export";
		if (r->offset <= c->sess.told_size && r->count <= c->sess.told_size - r->offset)
			return NBD_ENOSPC;
		return r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC
										   : NBD_EINVAL;
	}
	if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) &&
	    r->count > c->lim->max_request) {
		*why = "request larger than the maximum block size";
		return NBD_EINVAL;
	}
	if (r->type == NBD_CMD_BLOCK_STATUS) {
		if (!c->sess.meta_alloc) {
			*why = "no metadata context was negotiated";
			return NBD_EINVAL;
		}
		if (r->count == 0) {
			*why = "block status length must not be zero";
			return NBD_EINVAL;
		}
	}
	return 0;
}

/* Whether holes in a READ's range should be sent as OFFSET_HOLE chunks. */
static bool wants_holes(const struct nbdv_conn *c, const struct nbdv_req *r)
{
	return c->sess.structured && !(r->flags & NBD_CMD_FLAG_DF) &&
	       (c->sess.dev->caps & NBDV_CAP_EXTENTS);
}

/*
 * BLOCK_STATUS with a payload (extended headers): a 64-bit effect length, then the ids
 * of the contexts wanted.  0, or EINVAL with *why for a payload of the wrong shape or
 * one naming a context that was not negotiated.  The payload is freed either way.
 */
static uint32_t block_status_payload(struct nbdv_req *r, const char **why)
{
	uint32_t e = 0;

	if (r->plen < 8 || (r->plen - 8) % 4 != 0) {
		*why = "block status payload is not a length and context ids";
		e = NBD_EINVAL;
	} else {
		uint64_t len;

		memcpy(&len, r->buf, 8);
		r->count = be64toh(len);
		for (uint32_t i = 8; i < r->plen && !e; i += 4) {
			uint32_t id;
			memcpy(&id, r->buf + i, 4);
			if (be32toh(id) != META_CONTEXT_ID) {
				*why = "block status payload names an unknown context";
				e = NBD_EINVAL;
			}
		}
	}
	nbdv_buf_free(r->buf);
	r->buf = NULL;
	req_charge(r);
	return e;
}

static int pread_inline(struct nbdv_conn *c, struct nbdv_req *r)
{
	int err;

	driver_hold(c->sess.dev);
	err = driver_pread_nowait(c->sess.dev, r->buf, r->count, r->offset);
	driver_release(c->sess.dev);
	return err;
}

/* An asynchronous driver finished @a (any thread): the reply is sent on the reactor. */
static void req_async_done(struct nbdv_aio *a, int result)
{
	struct nbdv_req *r = container_of(a, struct nbdv_req, aio);

	r->err = result;
	executor_post(&r->job);
}

/*
 * Start @r on an asynchronous driver: no I/O thread is involved, so queue depth is
 * bounded only by the connection's budgets (max-inflight-bytes), as for other drivers.
 * Reads are plain (no sparse layout) and a failed read has no ERROR_OFFSET.
 */
static void submit_async(struct nbdv_conn *c, struct nbdv_req *r)
{
	struct nbdv_io *io = &r->aio.io;
	uint32_t f = (r->flags & NBD_CMD_FLAG_FUA) ? NBDV_F_FUA : 0;

	memset(io, 0, sizeof(*io));
	r->sparse = false;
	io->offset = r->offset;
	io->length = r->count;
	switch (r->type) {
	case NBD_CMD_READ:
		io->op = NBDV_OP_READ;
		io->buf = r->buf;
		break;
	case NBD_CMD_WRITE:
		io->op = NBDV_OP_WRITE;
		io->buf = r->buf;
		io->flags = f;
		break;
	case NBD_CMD_FLUSH:
		io->op = NBDV_OP_FLUSH;
		io->length = 0;
		io->offset = 0;
		break;
	case NBD_CMD_TRIM:
		io->op = NBDV_OP_TRIM;
		io->flags = f;
		break;
	case NBD_CMD_WRITE_ZEROES:
		io->op = NBDV_OP_ZERO;
		io->flags = f | ((r->flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : NBDV_F_MAY_TRIM) |
			    ((r->flags & NBD_CMD_FLAG_FAST_ZERO) ? NBDV_F_FAST : 0);
		break;
	case NBD_CMD_CACHE:
		io->op = NBDV_OP_CACHE;
		break;
	case NBD_CMD_BLOCK_STATUS:
		io->op = NBDV_OP_BLOCK_STATUS;
		io->flags = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? NBDV_F_REQ_ONE : 0;
		io->extents = &r->ext;
		r->err = extents_init(&r->ext, r->offset, r->count,
				      (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_STATUS_EXTENTS);
		if (r->err < 0) {
			submit_done_inline(c, r);
			return;
		}
		break;
	default:
		r->err = -EINVAL;
		submit_done_inline(c, r);
		return;
	}
	r->job.done = req_done;
	r->aio.done = req_async_done;
	executor_begin(&c->r->port, &r->job);
	driver_submit(r->dev, &r->aio);
}

static void dispatch(struct nbdv_conn *c, struct nbdv_req *r)
{
	const char *why = NULL;
	uint32_t e = 0;
	bool cached = false;

	if (r->type == NBD_CMD_BLOCK_STATUS && (r->flags & NBD_CMD_FLAG_PAYLOAD_LEN) &&
	    (c->sess.tflags & NBD_FLAG_BLOCK_STAT_PAYLOAD)) {
		e = block_status_payload(r, &why);
	} else if (r->type != NBD_CMD_WRITE && r->buf) {
		/* A payload consumed for a command that takes none: refused below. */
		nbdv_buf_free(r->buf);
		r->buf = NULL;
		req_charge(r);
	}
	if (!e)
		e = validate(c, r, &why);

	if (!e && c->r->shutting_down) {
		why = "server is shutting down";
		e = NBD_ESHUTDOWN;
	}
	if (e) {
		log_debug("c%u: %s at %llu+%llu refused with %s: %s", c->id, nbd_cmd_name(r->type),
			  (unsigned long long)r->offset, (unsigned long long)r->count,
			  nbd_err_name(e), why);
		queue_error(c, r, e, why);
		count(c, r, e);
		transmission_req_free(r);
		return;
	}
	if (r->type == NBD_CMD_READ && r->count > SENDFILE_MIN_BYTES &&
	    (c->tp->ops->sendfile || r->count <= CACHED_COPY_BYTES) &&
	    (c->sess.dev->caps & NBDV_CAP_BLOCKING)) {
		/* Data wholly in the page cache (and no hole the client would rather get as
		 * OFFSET_HOLE) goes from there to the socket: no buffer, no copy here, no
		 * trip to the I/O threads.  Without sendfile() it is copied here (below). */
		int fd;

		driver_hold(c->sess.dev);
		fd = driver_cached_fd(c->sess.dev, r->count, r->offset, wants_holes(c, r));
		driver_release(c->sess.dev);
		if (fd >= 0 && c->tp->ops->sendfile) {
			r->from_file = true;
			r->file_fd = fd;
			req_charge(r);
			c->inflight++;
			submit_done_inline(c, r);
			return;
		}
		cached = fd >= 0;
	}
	if (r->type == NBD_CMD_READ && r->count) {
		r->buf = nbdv_buf_alloc(r->count);
		if (!r->buf) {
			queue_error(c, r, NBD_ENOMEM, "out of memory");
			transmission_req_free(r);
			return;
		}
		r->sparse = wants_holes(c, r);
	}
	req_charge(r);
	c->inflight++;
	/* A small read the page cache can satisfy is done here and now: a trip to the
	 * I/O threads and back costs more than the read.  (Sent as plain data: holes in a
	 * small cached read just read as zeroes.) */
	if (r->type == NBD_CMD_READ && r->count && (r->count <= INLINE_READ_BYTES || cached) &&
	    (c->sess.dev->caps & NBDV_CAP_BLOCKING) && pread_inline(c, r) == 0) {
		r->sparse = false; /* cached: the range has no hole the client wants */
		if (cached)
			c->cached_copy_bytes += r->count;
		submit_done_inline(c, r);
		return;
	}
	/* Likewise a small write the page cache takes at once: the hand-off to an I/O thread and
	 * back cost 38% of server time on 4 KiB random writes.  driver_pwrite_nowait() stops
	 * offering them here while they stall.  FUA writes wait for the disk: I/O threads. */
	if (r->type == NBD_CMD_WRITE && r->count <= INLINE_WRITE_BYTES &&
	    !(r->flags & NBD_CMD_FLAG_FUA) && (c->sess.dev->caps & NBDV_CAP_BLOCKING)) {
		int err;

		driver_hold(c->sess.dev);
		err = driver_pwrite_nowait(c->sess.dev, r->buf, r->count, r->offset);
		driver_release(c->sess.dev);

		if (err != -EAGAIN) {
			r->err = err;
			submit_done_inline(c, r);
			return;
		}
	}
	if ((c->sess.dev->caps & NBDV_CAP_ASYNC) && r->type != NBD_CMD_RESIZE) {
		submit_async(c, r);
		return;
	}
	/* Blocking drivers go to the I/O threads; the others run here, copies included.  (Large
	 * copies used to go to the I/O threads to overlap with socket I/O on a single reactor;
	 * with one reactor per core the two thread hand-offs cost more server CPU than the
	 * copy they moved: -20% per GiB for 4-connection nbdcopy writes, -10% for reads.) */
	/* A resize waits for the export's calls in progress: never on a reactor.  Block
	 * status runs solo: on a file it walks extents on a CPU, and a backlog of it on
	 * io-threads - 1 threads left another client's FLUSH waiting for a CPU. */
	executor_submit(c->srv->exec, &c->r->port, &c->jobs, &r->job,
			(c->sess.dev->caps & NBDV_CAP_BLOCKING) || r->type == NBD_CMD_RESIZE ||
			    ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) &&
			     r->count > REACTOR_COPY_MAX),
			r->type == NBD_CMD_BLOCK_STATUS);
}

/*
 * READs that arrive while NBDV_SEND_AHEAD_BYTES of replies wait to be sent do not start:
 * they wait, in order, in a ring on the connection (c->waiting is its last; the links
 * are the jobs' own, unused until dispatch), counted as in flight, and start as the
 * replies leave.  The requests behind them that are already in the input buffer are
 * still parsed while they are READs (they join the ring) or BLOCK_STATUS without a
 * payload, which is served at once; anything else stays in the buffer until the ring is
 * empty, in its order.  A client may ask for extents with many READs outstanding and
 * start no READ before the answer (nbdcopy does, every 128 MiB): queued behind those
 * READs, the answer let its pipeline drain each time.
 */
static bool reads_wait(const struct nbdv_conn *c)
{
	return c->waiting || conn_send_ahead_full(c);
}

static void wait_push(struct nbdv_conn *c, struct nbdv_req *r)
{
	if (c->waiting) {
		r->job.next = c->waiting->job.next;
		c->waiting->job.next = &r->job;
	} else {
		r->job.next = &r->job;
	}
	c->waiting = r;
	c->inflight++;
}

static struct nbdv_req *wait_pop(struct nbdv_conn *c)
{
	struct nbdv_req *first = (struct nbdv_req *)c->waiting->job.next;

	if (first == c->waiting)
		c->waiting = NULL;
	else
		c->waiting->job.next = first->job.next;
	first->job.next = NULL;
	c->inflight--;
	return first;
}

bool transmission_dispatch_waiting(struct nbdv_conn *c)
{
	while (c->waiting && !conn_send_ahead_full(c) && c->phase == CONN_TRANSMISSION)
		dispatch(c, wait_pop(c));
	return !c->waiting;
}

void transmission_drop_waiting(struct nbdv_conn *c)
{
	while (c->waiting)
		transmission_req_free(wait_pop(c));
}

/* Whether @hdr starts with the request magic of the headers this session negotiated
 * (compact or extended: the magic is the first field of both). */
static bool magic_ok(const struct nbdv_conn *c, const uint8_t *hdr, uint32_t *magic)
{
	memcpy(magic, hdr, sizeof(*magic));
	*magic = be32toh(*magic);
	return *magic == (c->sess.extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC);
}

bool transmission_may_go_ahead(const struct nbdv_conn *c, const uint8_t *hdr)
{
	uint32_t magic;
	uint16_t flags, type;

	if (!magic_ok(c, hdr, &magic))
		return false; /* refused in its turn */
	memcpy(&flags, hdr + 4, sizeof(flags));
	memcpy(&type, hdr + 6, sizeof(type));
	if (be16toh(flags) & NBD_CMD_FLAG_PAYLOAD_LEN)
		return false;
	type = be16toh(type);
	return type == NBD_CMD_READ || type == NBD_CMD_BLOCK_STATUS;
}

size_t transmission_header_size(const struct nbdv_conn *c)
{
	return c->sess.extended ? sizeof(struct nbd_extended_request) : sizeof(struct nbd_request);
}

/* Fill @r from a compact or (extended headers) extended request header; false when the
 * magic is wrong for what was negotiated. */
static bool parse_header(struct nbdv_conn *c, const uint8_t *hdr, struct nbdv_req *r)
{
	uint32_t magic;

	if (!magic_ok(c, hdr, &magic)) {
		log_info("c%u: bad %srequest magic 0x%08x, closing", c->id,
			 c->sess.extended ? "extended " : "", magic);
		return false;
	}
	if (c->sess.extended) {
		struct nbd_extended_request x;

		memcpy(&x, hdr, sizeof(x));
		r->cookie = x.cookie; /* opaque: kept in wire order */
		r->offset = be64toh(x.offset);
		r->count = be64toh(x.length);
		r->type = be16toh(x.type);
		r->flags = be16toh(x.flags);
	} else {
		struct nbd_request q;

		memcpy(&q, hdr, sizeof(q));
		r->cookie = q.cookie;
		r->offset = be64toh(q.offset);
		r->count = be32toh(q.count);
		r->type = be16toh(q.type);
		r->flags = be16toh(q.flags);
	}
	return true;
}

/* How many payload bytes follow @r's header: a WRITE's data, or with extended headers
 * whatever NBD_CMD_FLAG_PAYLOAD_LEN announces (spec: a server consumes it, even for a
 * command it then refuses). */
static uint64_t payload_length(const struct nbdv_conn *c, const struct nbdv_req *r)
{
	if (r->type == NBD_CMD_WRITE || (c->sess.extended && (r->flags & NBD_CMD_FLAG_PAYLOAD_LEN)))
		return r->count;
	return 0;
}

enum tx_result transmission_header(struct nbdv_conn *c, const uint8_t *hdr)
{
	struct nbdv_req *r = req_alloc();
	uint64_t plen;

	if (!r)
		return TX_CLOSE;
	r->conn = c;
	if (!parse_header(c, hdr, r)) {
		/* Framing is lost: nothing after this can be trusted (spec: hard disconnect). */
		transmission_req_free(r);
		return TX_CLOSE;
	}
	r->job.run = req_run;
	r->job.done = req_done;
	r->dev = c->sess.dev;
	r->structured = c->sess.structured;
	log_debug("c%u: %s flags 0x%x at %llu+%llu", c->id, nbd_cmd_name(r->type), r->flags,
		  (unsigned long long)r->offset, (unsigned long long)r->count);

	c->requests++;
	if (nbdv_metrics_on)
		r->t0 = nbdv_now_ns();
	if (r->type == NBD_CMD_DISC) {
		transmission_req_free(r);
		return TX_DISC;
	}
	plen = payload_length(c, r);
	{
		/* Caps of the identity and of the export: this request is let through; the
		 * connection's next one waits its turn. */
		uint64_t bytes =
		    r->type == NBD_CMD_READ ? NBDV_MIN(r->count, c->lim->max_request) : plen;
		uint64_t by_identity = conn_identity_charge(c, bytes);
		uint64_t by_export = export_charge(c->sess.exp, bytes);
		uint64_t wait = NBDV_MAX(by_identity, by_export); /* (a macro: no calls in it) */
		if (wait)
			conn_pause_reading(c, wait);
	}
	if (plen > c->lim->max_request) {
		/* The payload is never allocated; skipping it could take forever, so answer
		 * and hang up. */
		log_info("c%u: %s payload of %llu bytes exceeds the %u-byte limit, closing", c->id,
			 nbd_cmd_name(r->type), (unsigned long long)plen, c->lim->max_request);
		queue_error(c, r, NBD_EINVAL, "request larger than the maximum block size");
		transmission_req_free(r);
		return TX_CLOSE;
	}
	if (plen) {
		r->plen = (uint32_t)plen;
		r->buf = nbdv_buf_alloc(plen);
		if (!r->buf) {
			transmission_req_free(r);
			return TX_CLOSE;
		}
		req_charge(r);
		c->cur_req = r;
		return TX_NEED_PAYLOAD;
	}
	if (r->type == NBD_CMD_READ && reads_wait(c)) {
		req_charge(r);
		wait_push(c, r);
		return TX_OK;
	}
	dispatch(c, r);
	return TX_OK;
}

uint32_t transmission_payload_missing(const struct nbdv_req *r)
{
	return r->plen - r->got;
}

uint8_t *transmission_payload_ptr(struct nbdv_req *r, uint32_t *missing)
{
	*missing = transmission_payload_missing(r);
	return r->buf + r->got;
}

int transmission_payload_from(struct nbdv_conn *c, const uint8_t *p, size_t len, size_t *used)
{
	struct nbdv_req *r = c->cur_req;
	uint32_t n = (uint32_t)NBDV_MIN((size_t)transmission_payload_missing(r), len);

	memcpy(r->buf + r->got, p, n);
	*used = n;
	return transmission_payload_got(c, n);
}

int transmission_payload_got(struct nbdv_conn *c, uint32_t n)
{
	struct nbdv_req *r = c->cur_req;

	r->got += n;
	if (r->got < r->plen)
		return 0;
	c->cur_req = NULL;
	dispatch(c, r);
	return 1;
}
