/*
 * ramdisk - an example nbdvault driver, built out of tree against the installed ABI
 * (pkg-config nbdvault-driver) and loaded with `driver: ramdisk` (or a path).
 *
 * A RAM disk tracked in 64 KiB blocks, so that trimmed and never-written blocks are
 * reported as holes.  Its one key, `mode`, picks how the server calls it, so that one
 * small driver shows (and the conformance suite checks) all three modes:
 *
 *   inline    calls run on the server's reactor threads: nothing here may block
 *   blocking  calls run on the server's I/O threads
 *   async     submit() queues the operation for this driver's own thread, which does it
 *             and calls nbdv_io_complete(), the way a storage library's callback would
 *
 * Example export:
 *
 *   - name: scratch
 *     driver: ramdisk
 *     size: 64M
 *     mode: async
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t */

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <nbdvault/driver.h>

#define BLOCK	 65536ULL
#define MAX_SIZE (1ULL << 32) /* an example: keep it to 4 GiB of RAM */

enum { KEY_MODE }; /* index into keys[] and into params->values[] */

static const struct nbdv_key keys[] = {
    [KEY_MODE] = {"mode", NBDV_KEY_STRING, 0, "inline",
		  "how the server calls the driver: inline, blocking or async"},
    {NULL, 0, 0, NULL, NULL},
};

struct ramdisk {
	struct nbdv_drv_instance head; /* first: the server casts */
	uint32_t mode_cap;	       /* 0, NBDV_CAP_BLOCKING or NBDV_CAP_ASYNC */
	uint64_t size;
	unsigned char *data;
	unsigned char *used; /* one byte per block: written since the last trim */
	pthread_rwlock_t lock;

	/* async mode: operations waiting for the completion thread */
	pthread_t thread;
	pthread_mutex_t qlock;
	pthread_cond_t qcond;
	struct nbdv_io *head_io, *tail_io;
	bool stopping;
};

static struct ramdisk *rd(struct nbdv_drv_instance *inst)
{
	return (struct ramdisk *)inst;
}

/* Mark the blocks under [off, off+len) as holding data. */
static void mark_used(struct ramdisk *r, uint64_t len, uint64_t off)
{
	if (len)
		memset(r->used + off / BLOCK, 1, (off + len - 1) / BLOCK - off / BLOCK + 1);
}

static int do_read(struct ramdisk *r, void *buf, uint64_t len, uint64_t off)
{
	pthread_rwlock_rdlock(&r->lock);
	memcpy(buf, r->data + off, len);
	pthread_rwlock_unlock(&r->lock);
	return 0;
}

static int do_write(struct ramdisk *r, const void *buf, uint64_t len, uint64_t off)
{
	pthread_rwlock_wrlock(&r->lock);
	memcpy(r->data + off, buf, len);
	mark_used(r, len, off);
	pthread_rwlock_unlock(&r->lock);
	return 0;
}

/* Zero the range; whole blocks inside it become holes again when @dealloc. */
static int do_zero(struct ramdisk *r, uint64_t len, uint64_t off, bool dealloc)
{
	pthread_rwlock_wrlock(&r->lock);
	memset(r->data + off, 0, len);
	if (dealloc) {
		uint64_t first = (off + BLOCK - 1) / BLOCK, end = (off + len) / BLOCK;
		if ((off + len) == r->size)
			end = (r->size + BLOCK - 1) / BLOCK;
		for (uint64_t b = first; b < end; b++)
			r->used[b] = 0;
	}
	pthread_rwlock_unlock(&r->lock);
	return 0;
}

static int do_extents(struct ramdisk *r, uint64_t len, uint64_t off, struct nbdv_extents *ext)
{
	uint64_t pos = off, end = off + len;
	int ret = 0;

	pthread_rwlock_rdlock(&r->lock);
	while (pos < end && ret == 0) {
		uint64_t b = pos / BLOCK, next = (b + 1) * BLOCK;
		uint32_t flags = r->used[b] ? 0 : NBDV_STATE_HOLE | NBDV_STATE_ZERO;

		ret = nbdv_extents_add(ext, (next < end ? next : end) - pos, flags);
		pos = next;
	}
	pthread_rwlock_unlock(&r->lock);
	return ret < 0 ? ret : 0;
}

/* Inline and blocking modes: the table's synchronous calls. */

static int rd_pread(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off,
		    uint32_t flags)
{
	return do_read(rd(inst), buf, len, off);
}

static int rd_pwrite(struct nbdv_drv_instance *inst, const void *buf, uint64_t len, uint64_t off,
		     uint32_t flags)
{
	return do_write(rd(inst), buf, len, off);
}

static int rd_flush(struct nbdv_drv_instance *inst, uint32_t flags)
{
	return 0; /* RAM: as durable as it gets */
}

static int rd_trim(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return do_zero(rd(inst), len, off, true);
}

static int rd_zero(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return do_zero(rd(inst), len, off, flags & NBDV_F_MAY_TRIM);
}

static int rd_block_status(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off,
			   uint32_t flags, struct nbdv_extents *ext)
{
	return do_extents(rd(inst), len, off, ext);
}

static int rd_cache(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	return 0;
}

/* Async mode: one thread does the queued operations in order and completes them. */

static int run_io(struct ramdisk *r, struct nbdv_io *io)
{
	switch (io->op) {
	case NBDV_OP_READ:
		return do_read(r, io->buf, io->length, io->offset);
	case NBDV_OP_WRITE:
		return do_write(r, io->buf, io->length, io->offset);
	case NBDV_OP_FLUSH:
	case NBDV_OP_CACHE:
		return 0;
	case NBDV_OP_TRIM:
		return do_zero(r, io->length, io->offset, true);
	case NBDV_OP_ZERO:
		return do_zero(r, io->length, io->offset, io->flags & NBDV_F_MAY_TRIM);
	case NBDV_OP_BLOCK_STATUS:
		return do_extents(r, io->length, io->offset, io->extents);
	}
	return -EINVAL;
}

static void *completion_thread(void *arg)
{
	struct ramdisk *r = arg;

	pthread_mutex_lock(&r->qlock);
	for (;;) {
		struct nbdv_io *io = r->head_io;

		if (!io) {
			if (r->stopping)
				break;
			pthread_cond_wait(&r->qcond, &r->qlock);
			continue;
		}
		r->head_io = io->driver_data;
		if (!r->head_io)
			r->tail_io = NULL;
		pthread_mutex_unlock(&r->qlock);
		nbdv_io_complete(io, run_io(r, io));
		pthread_mutex_lock(&r->qlock);
	}
	pthread_mutex_unlock(&r->qlock);
	return NULL;
}

static int rd_submit(struct nbdv_drv_instance *inst, struct nbdv_io *io)
{
	struct ramdisk *r = rd(inst);

	io->driver_data = NULL;
	pthread_mutex_lock(&r->qlock);
	if (r->tail_io)
		r->tail_io->driver_data = io;
	else
		r->head_io = io;
	r->tail_io = io;
	pthread_cond_signal(&r->qcond);
	pthread_mutex_unlock(&r->qlock);
	return 0;
}

/* Life cycle. */

static int mode_cap(const struct nbdv_export_params *p, uint32_t *cap)
{
	const char *m = p->values[KEY_MODE].str;

	if (strcmp(m, "inline") == 0)
		*cap = 0;
	else if (strcmp(m, "blocking") == 0)
		*cap = NBDV_CAP_BLOCKING;
	else if (strcmp(m, "async") == 0)
		*cap = NBDV_CAP_ASYNC;
	else
		return -EINVAL;
	return 0;
}

#define CAPS                                                                                       \
	(NBDV_CAP_WRITE | NBDV_CAP_FLUSH | NBDV_CAP_FUA | NBDV_CAP_TRIM | NBDV_CAP_ZERO |          \
	 NBDV_CAP_FAST_ZERO | NBDV_CAP_EXTENTS | NBDV_CAP_CACHE | NBDV_CAP_MULTI_CONN)

static int rd_probe(const struct nbdv_export_params *p, uint64_t *size, uint32_t *caps)
{
	uint32_t cap;

	if (mode_cap(p, &cap) < 0 || p->size > MAX_SIZE)
		return -EINVAL;
	*size = p->size;
	*caps = CAPS | cap;
	return 0;
}

static int rd_create(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{
	struct ramdisk *r;
	uint32_t cap;

	if (mode_cap(p, &cap) < 0 || p->size > MAX_SIZE)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->mode_cap = cap;
	r->size = p->size;
	r->data = calloc(1, p->size ? p->size : 1);
	r->used = calloc(1, (p->size + BLOCK - 1) / BLOCK + 1);
	if (!r->data || !r->used)
		goto fail;
	pthread_rwlock_init(&r->lock, NULL);
	pthread_mutex_init(&r->qlock, NULL);
	pthread_cond_init(&r->qcond, NULL);
	if (cap == NBDV_CAP_ASYNC && pthread_create(&r->thread, NULL, completion_thread, r) != 0) {
		pthread_rwlock_destroy(&r->lock);
		pthread_mutex_destroy(&r->qlock);
		pthread_cond_destroy(&r->qcond);
		goto fail;
	}
	*out = &r->head;
	return 0;
fail:
	free(r->data);
	free(r->used);
	free(r);
	return -ENOMEM;
}

static void rd_destroy(struct nbdv_drv_instance *inst)
{
	struct ramdisk *r = rd(inst);

	if (r->mode_cap == NBDV_CAP_ASYNC) {
		pthread_mutex_lock(&r->qlock);
		r->stopping = true;
		pthread_cond_signal(&r->qcond);
		pthread_mutex_unlock(&r->qlock);
		pthread_join(r->thread, NULL);
	}
	pthread_rwlock_destroy(&r->lock);
	pthread_mutex_destroy(&r->qlock);
	pthread_cond_destroy(&r->qcond);
	free(r->data);
	free(r->used);
	free(r);
}

static uint32_t rd_caps(struct nbdv_drv_instance *inst)
{
	return CAPS | rd(inst)->mode_cap;
}

static uint64_t rd_get_size(struct nbdv_drv_instance *inst)
{
	return rd(inst)->size;
}

/* The one symbol the server looks for. */
const struct nbdv_driver nbdvault_driver = {
    .api_version = NBDV_DRIVER_API_VERSION,
    .name = "ramdisk",
    .description = "example out-of-tree RAM disk (inline, blocking or async mode)",
    .keys = keys,
    .needs = NBDV_NEEDS_SIZE,
    .create = rd_create,
    .destroy = rd_destroy,
    .caps = rd_caps,
    .get_size = rd_get_size,
    .pread = rd_pread,
    .pwrite = rd_pwrite,
    .flush = rd_flush,
    .trim = rd_trim,
    .zero = rd_zero,
    .block_status = rd_block_status,
    .cache = rd_cache,
    .probe = rd_probe,
    .submit = rd_submit,
};
