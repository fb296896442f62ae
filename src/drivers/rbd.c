/*
 * nbdvault - `rbd` driver: a Ceph RBD image, through librbd's asynchronous API.
 *
 * Built as a loadable driver (rbd.so) so that the server itself never links librbd.
 * One cluster connection and one image handle per export, shared by every connection
 * (multi-conn is true: a flush covers every write the image handle has completed).
 * Every data operation is an rbd_aio_* call whose completion callback, on a librbd
 * thread, calls nbdv_io_complete(): no server thread waits on the cluster.  Block
 * status comes from rbd_diff_iterate2(), which is synchronous, so it runs on this
 * driver's own small thread.
 *
 * The cache is off (rbd_cache=false): a completed write is on the OSDs, so another
 * nbdvault serving the same image reads it once it was acknowledged, and FLUSH only
 * orders.  Writers on several hosts hand the exclusive lock back and forth (slow but
 * safe).  Operation timeouts (the `timeout` key) turn a cluster that stopped
 * answering into EIO replies instead of requests that never end.
 */
#include "build-config.h"

#include <errno.h>
#include <pthread.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nbdvault/driver.h"

enum { K_POOL, K_IMAGE, K_NAMESPACE, K_SNAPSHOT, K_CONF, K_USER, K_KEYRING, K_TIMEOUT };

static const struct nbdv_key rbd_keys[] = {
    [K_POOL] = {"pool", NBDV_KEY_STRING, 1, NULL, "RADOS pool of the image"},
    [K_IMAGE] = {"image", NBDV_KEY_STRING, 1, NULL,
		 "image name (created with `size:` when it does not exist)"},
    [K_NAMESPACE] = {"namespace", NBDV_KEY_STRING, 0, NULL, "RBD namespace within the pool"},
    [K_SNAPSHOT] = {"snapshot", NBDV_KEY_STRING, 0, NULL,
		    "export this snapshot of the image (read-only)"},
    [K_CONF] = {"ceph-conf", NBDV_KEY_FILE, 0, "/etc/ceph/ceph.conf", "Ceph configuration file"},
    [K_USER] = {"ceph-user", NBDV_KEY_STRING, 0, "admin", "Ceph client id (client.ID)"},
    [K_KEYRING] = {"keyring", NBDV_KEY_FILE, 0, NULL,
		   "keyring file (default: the one ceph-conf names)"},
    [K_TIMEOUT] = {"timeout", NBDV_KEY_UINT, 0, "30",
		   "seconds before a cluster operation fails with EIO (0: never)"},
    {NULL, 0, 0, NULL, NULL},
};

/* One queued block-status request for the diff thread. */
struct bs_req {
	struct nbdv_io *io;
	struct bs_req *next;
};

struct rbd {
	struct nbdv_drv_instance head; /* first: the server casts */
	char *label;		       /* "pool/image[@snap]" for messages */
	rados_t cluster;
	rados_ioctx_t ioctx;
	rbd_image_t image;
	uint64_t size;
	bool readonly;
	bool whole_object; /* fast-diff valid: diff by object map */

	pthread_t diff_thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct bs_req *bs_head, **bs_tail;
	bool stopping;
	unsigned errors_logged; /* cluster errors logged (rate-limited) */
	time_t last_error_log;
};

static int set(rados_t c, const char *opt, const char *val)
{
	int r = rados_conf_set(c, opt, val);

	if (r < 0)
		nbdv_log(NBDV_LOG_ERR, "rbd: cannot set %s=%s: %s", opt, val, strerror(-r));
	return r;
}

/* Cluster errors become EIO (or what NBD has a name for), logged at most once a second. */
static int map_error(struct rbd *d, const char *what, int r)
{
	time_t now = time(NULL);

	if (r >= 0)
		return 0;
	pthread_mutex_lock(&d->lock);
	if (now != d->last_error_log) {
		d->last_error_log = now;
		nbdv_log(NBDV_LOG_ERR, "rbd %s: %s failed: %s", d->label, what, strerror(-r));
	}
	pthread_mutex_unlock(&d->lock);
	switch (-r) {
	case ENOSPC:
	case EDQUOT:
		return -ENOSPC;
	case EROFS:
	case EPERM:
		return -EPERM;
	case ENOMEM:
		return -ENOMEM;
	case EINVAL:
		return -EINVAL;
	default:
		return -EIO; /* ETIMEDOUT, ESHUTDOWN (blocklisted), ENOTCONN, ... */
	}
}

/* --- asynchronous data operations --- */

struct op {
	struct rbd *d;
	struct nbdv_io *io;
	bool then_flush; /* FUA: flush once the write is done */
};

static const char *op_name(int op)
{
	static const char *const names[] = {"",	    "read", "write",	    "flush",
					    "trim", "zero", "block status", "cache"};
	return op > 0 && op <= NBDV_OP_CACHE ? names[op] : "?";
}

static void op_done(rbd_completion_t c, void *arg);

static int start_flush(struct op *o)
{
	rbd_completion_t c;
	int r = rbd_aio_create_completion(o, op_done, &c);

	if (r < 0)
		return r;
	r = rbd_aio_flush(o->d->image, c);
	if (r < 0)
		rbd_aio_release(c);
	return r;
}

static void op_done(rbd_completion_t c, void *arg)
{
	struct op *o = arg;
	ssize_t r = rbd_aio_get_return_value(c);
	struct nbdv_io *io = o->io;

	rbd_aio_release(c);
	if (r >= 0 && o->then_flush) {
		o->then_flush = false;
		r = start_flush(o);
		if (r >= 0)
			return; /* completes through op_done again */
	}
	r = map_error(o->d, op_name(io->op), (int)r);
	free(o);
	nbdv_io_complete(io, (int)r);
}

static void *diff_main(void *arg);

static int rbd_submit(struct nbdv_drv_instance *inst, struct nbdv_io *io)
{
	struct rbd *d = (struct rbd *)inst;
	struct op *o;
	rbd_completion_t c;
	int r;

	if (io->op == NBDV_OP_BLOCK_STATUS) {
		struct bs_req *b = malloc(sizeof(*b));
		if (!b)
			return -ENOMEM;
		b->io = io;
		b->next = NULL;
		pthread_mutex_lock(&d->lock);
		*d->bs_tail = b;
		d->bs_tail = &b->next;
		pthread_cond_signal(&d->cond);
		pthread_mutex_unlock(&d->lock);
		return 0;
	}
	o = malloc(sizeof(*o));
	if (!o)
		return -ENOMEM;
	o->d = d;
	o->io = io;
	o->then_flush = (io->flags & NBDV_F_FUA) != 0;
	r = rbd_aio_create_completion(o, op_done, &c);
	if (r < 0) {
		free(o);
		return r;
	}
	switch (io->op) {
	case NBDV_OP_READ:
		r = rbd_aio_read(d->image, io->offset, io->length, io->buf, c);
		break;
	case NBDV_OP_WRITE:
		r = rbd_aio_write(d->image, io->offset, io->length, io->buf, c);
		break;
	case NBDV_OP_FLUSH:
		o->then_flush = false;
		r = rbd_aio_flush(d->image, c);
		break;
	case NBDV_OP_TRIM:
		r = rbd_aio_discard(d->image, io->offset, io->length, c);
		break;
	case NBDV_OP_ZERO:
		/* Without NO_HOLE the range is deallocated; with it, written as zeroes. */
		r = rbd_aio_write_zeroes(
		    d->image, io->offset, io->length, c,
		    (io->flags & NBDV_F_MAY_TRIM) ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
		break;
	default:
		r = -EINVAL;
		break;
	}
	if (r < 0) {
		rbd_aio_release(c);
		free(o);
		return map_error(d, op_name(io->op), r);
	}
	return 0;
}

/* --- block status: rbd_diff_iterate2 on the diff thread --- */

struct diff_walk {
	struct nbdv_extents *ext;
	uint64_t pos, end;
	int full; /* the collector said stop */
};

/* Mark [pos, to) with @flags; stops the walk (1) when the collector is full. */
static int walk_to(struct diff_walk *w, uint64_t to, uint32_t flags)
{
	int r;

	if (to > w->end)
		to = w->end;
	if (to <= w->pos)
		return 0;
	r = nbdv_extents_add(w->ext, to - w->pos, flags);
	w->pos = to;
	if (r)
		w->full = r;
	return r;
}

static int diff_cb(uint64_t off, size_t len, int exists, void *arg)
{
	struct diff_walk *w = arg;

	/* Not reported: never written (a hole).  Reported: data, or discarded. */
	if (off > w->pos && walk_to(w, off, NBDV_STATE_HOLE | NBDV_STATE_ZERO))
		return -ECANCELED;
	if (walk_to(w, off + len, exists ? 0 : NBDV_STATE_HOLE | NBDV_STATE_ZERO))
		return -ECANCELED;
	return 0;
}

/* Object-level regions found through the object map (fast-diff). */
#define MAX_REGIONS 256
/* Bytes of existing objects looked at precisely (one RADOS op per object) per call. */
#define PRECISE_BUDGET (256ULL << 20)

struct regions {
	uint64_t off[MAX_REGIONS], len[MAX_REGIONS];
	int exists[MAX_REGIONS];
	unsigned n;
};

static int region_cb(uint64_t off, size_t len, int exists, void *arg)
{
	struct regions *g = arg;

	if (g->n == MAX_REGIONS)
		return -ECANCELED;
	g->off[g->n] = off;
	g->len[g->n] = len;
	g->exists[g->n++] = exists;
	return 0;
}

/* [off, off+len) precisely: the extents within existing objects. */
static int precise(struct rbd *d, struct diff_walk *w, uint64_t off, uint64_t len)
{
	int r = rbd_diff_iterate2(d->image, NULL, off, len, 1, 0, diff_cb, w);

	if (r == -ECANCELED || w->full)
		return w->full < 0 ? w->full : 1;
	if (r < 0)
		return map_error(d, "block status", r);
	return walk_to(w, off + len, NBDV_STATE_HOLE | NBDV_STATE_ZERO);
}

/*
 * The object map (fast-diff, when valid) says which 4 MiB objects exist, cheaply, over
 * any range; only existing objects are then listed precisely, up to PRECISE_BUDGET
 * bytes per call.  The reply may cover less than was asked (the client asks again).
 */
static int block_status(struct rbd *d, struct nbdv_io *io)
{
	struct diff_walk w = {io->extents, io->offset, io->offset + io->length, 0};
	uint64_t budget = PRECISE_BUDGET;
	struct regions *g;
	bool cut;
	int r;

	if (!d->whole_object)
		return precise(d, &w, io->offset, io->length < budget ? io->length : budget) < 0
			   ? -EIO
			   : 0;
	g = malloc(sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->n = 0;
	r = rbd_diff_iterate2(d->image, NULL, io->offset, io->length, 1, 1, region_cb, g);
	cut = r == -ECANCELED;
	if (r < 0 && !cut) {
		free(g);
		return map_error(d, "block status", r);
	}
	r = 0;
	for (unsigned i = 0; i < g->n && r == 0; i++) {
		uint64_t a = g->off[i] > w.pos ? g->off[i] : w.pos, b = g->off[i] + g->len[i];

		if (b > w.end)
			b = w.end;
		if (a >= b)
			continue;
		r = walk_to(&w, a, NBDV_STATE_HOLE | NBDV_STATE_ZERO);
		if (r)
			break;
		if (!g->exists[i]) {
			r = walk_to(&w, b, NBDV_STATE_HOLE | NBDV_STATE_ZERO);
		} else if (budget == 0) {
			r = 1; /* enough work for one call */
		} else {
			if (b - a > budget)
				b = a + budget;
			budget -= b - a;
			r = precise(d, &w, a, b - a);
		}
	}
	if (r == 0 && !cut)
		r = walk_to(&w, w.end, NBDV_STATE_HOLE | NBDV_STATE_ZERO);
	free(g);
	return r < 0 ? r : 0;
}

static void *diff_main(void *arg)
{
	struct rbd *d = arg;

	pthread_mutex_lock(&d->lock);
	for (;;) {
		struct bs_req *b = d->bs_head;

		if (!b) {
			if (d->stopping)
				break;
			pthread_cond_wait(&d->cond, &d->lock);
			continue;
		}
		d->bs_head = b->next;
		if (!d->bs_head)
			d->bs_tail = &d->bs_head;
		pthread_mutex_unlock(&d->lock);
		nbdv_io_complete(b->io, block_status(d, b->io));
		free(b);
		pthread_mutex_lock(&d->lock);
	}
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

/* --- life cycle --- */

static void rbd_destroy(struct nbdv_drv_instance *inst)
{
	struct rbd *d = (struct rbd *)inst;

	pthread_mutex_lock(&d->lock);
	d->stopping = true;
	pthread_cond_signal(&d->cond);
	pthread_mutex_unlock(&d->lock);
	pthread_join(d->diff_thread, NULL);
	if (d->image) {
		rbd_flush(d->image);
		rbd_close(d->image);
	}
	if (d->ioctx)
		rados_ioctx_destroy(d->ioctx);
	if (d->cluster)
		rados_shutdown(d->cluster);
	pthread_mutex_destroy(&d->lock);
	pthread_cond_destroy(&d->cond);
	free(d->label);
	free(d);
}

static int connect_cluster(struct rbd *d, const struct nbdv_value *v)
{
	char t[32];
	int r;

	r = rados_create(&d->cluster, v[K_USER].str);
	if (r < 0) {
		d->cluster = NULL;
		return r;
	}
	r = rados_conf_read_file(d->cluster, v[K_CONF].str);
	if (r < 0) {
		nbdv_log(NBDV_LOG_ERR, "rbd %s: cannot read %s: %s", d->label, v[K_CONF].str,
			 strerror(-r));
		return r;
	}
	snprintf(t, sizeof(t), "%llu", (unsigned long long)v[K_TIMEOUT].num);
	if ((v[K_KEYRING].set && set(d->cluster, "keyring", v[K_KEYRING].str) < 0) ||
	    set(d->cluster, "rados_osd_op_timeout", t) < 0 ||
	    set(d->cluster, "rados_mon_op_timeout", t) < 0 ||
	    set(d->cluster, "client_mount_timeout", v[K_TIMEOUT].num ? t : "300") < 0 ||
	    /* Safe across hosts: no client-side cache, and discard zeroes what it cannot
	     * deallocate (a trimmed range reads as zeroes). */
	    set(d->cluster, "rbd_cache", "false") < 0 ||
	    set(d->cluster, "rbd_skip_partial_discard", "false") < 0 ||
	    set(d->cluster, "log_to_stderr", "false") < 0 ||
	    set(d->cluster, "err_to_stderr", "false") < 0)
		return -EINVAL;
	r = rados_connect(d->cluster);
	if (r < 0) {
		nbdv_log(NBDV_LOG_ERR,
			 "rbd %s: cannot connect to the cluster (%s as client.%s): %s", d->label,
			 v[K_CONF].str, v[K_USER].str, strerror(-r));
		return r;
	}
	r = rados_ioctx_create(d->cluster, v[K_POOL].str, &d->ioctx);
	if (r < 0) {
		d->ioctx = NULL;
		nbdv_log(NBDV_LOG_ERR, "rbd %s: pool %s: %s", d->label, v[K_POOL].str,
			 strerror(-r));
		return r;
	}
	if (v[K_NAMESPACE].set)
		rados_ioctx_set_namespace(d->ioctx, v[K_NAMESPACE].str);
	return 0;
}

static int open_image(struct rbd *d, const struct nbdv_export_params *p)
{
	const struct nbdv_value *v = p->values;
	const char *snap = v[K_SNAPSHOT].set ? v[K_SNAPSHOT].str : NULL;
	uint64_t features = 0, flags = 0;
	int r;

	if (d->readonly)
		r = rbd_open_read_only(d->ioctx, v[K_IMAGE].str, &d->image, snap);
	else
		r = rbd_open(d->ioctx, v[K_IMAGE].str, &d->image, NULL);
	if (r == -ENOENT && !snap && p->size_given && !p->readonly) {
		int order = 0;

		r = rbd_create(d->ioctx, v[K_IMAGE].str, p->size, &order);
		if (r == 0 || r == -EEXIST) {
			nbdv_log(NBDV_LOG_INFO, "rbd %s: created (%llu bytes)", d->label,
				 (unsigned long long)p->size);
			r = rbd_open(d->ioctx, v[K_IMAGE].str, &d->image, NULL);
		}
	}
	if (r < 0) {
		d->image = NULL;
		nbdv_log(NBDV_LOG_ERR, "rbd %s: cannot open: %s", d->label, strerror(-r));
		return r;
	}
	r = rbd_get_size(d->image, &d->size);
	if (r < 0)
		return r;
	if (rbd_get_features(d->image, &features) == 0 && (features & RBD_FEATURE_FAST_DIFF) &&
	    rbd_get_flags(d->image, &flags) == 0 && !(flags & RBD_FLAG_FAST_DIFF_INVALID))
		d->whole_object = true;
	return 0;
}

static int rbd_create_inst(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{
	const struct nbdv_value *v = p->values;
	struct rbd *d = calloc(1, sizeof(*d));
	size_t n;
	int r;

	if (!d)
		return -ENOMEM;
	n = strlen(v[K_POOL].str) + strlen(v[K_IMAGE].str) +
	    (v[K_SNAPSHOT].set ? strlen(v[K_SNAPSHOT].str) : 0) + 3;
	d->label = malloc(n);
	if (!d->label) {
		free(d);
		return -ENOMEM;
	}
	snprintf(d->label, n, "%s/%s%s%s", v[K_POOL].str, v[K_IMAGE].str,
		 v[K_SNAPSHOT].set ? "@" : "", v[K_SNAPSHOT].set ? v[K_SNAPSHOT].str : "");
	d->readonly = p->readonly || v[K_SNAPSHOT].set;
	d->bs_tail = &d->bs_head;
	pthread_mutex_init(&d->lock, NULL);
	pthread_cond_init(&d->cond, NULL);
	if (pthread_create(&d->diff_thread, NULL, diff_main, d) != 0) {
		pthread_mutex_destroy(&d->lock);
		pthread_cond_destroy(&d->cond);
		free(d->label);
		free(d);
		return -EAGAIN;
	}
	r = connect_cluster(d, v);
	if (r == 0)
		r = open_image(d, p);
	if (r < 0) {
		rbd_destroy(&d->head);
		return r == -ENOENT || r == -EINVAL || r == -EPERM ? r : -EIO;
	}
	*out = &d->head;
	return 0;
}

/* NBD_CMD_RESIZE: librbd orders it against the operations in flight. */
static int rbd_resize_inst(struct nbdv_drv_instance *inst, uint64_t size)
{
	struct rbd *d = (struct rbd *)inst;
	int r = rbd_resize(d->image, size);

	if (r < 0)
		return map_error(d, "resize", r);
	__atomic_store_n(&d->size, size, __ATOMIC_RELAXED);
	nbdv_log(NBDV_LOG_INFO, "rbd %s: resized to %llu bytes", d->label,
		 (unsigned long long)size);
	return 0;
}

static uint32_t rbd_caps(struct nbdv_drv_instance *inst)
{
	struct rbd *d = (struct rbd *)inst;
	uint32_t caps = NBDV_CAP_ASYNC | NBDV_CAP_FLUSH | NBDV_CAP_EXTENTS | NBDV_CAP_MULTI_CONN;

	if (!d->readonly)
		caps |= NBDV_CAP_WRITE | NBDV_CAP_FUA | NBDV_CAP_TRIM | NBDV_CAP_ZERO |
			NBDV_CAP_FAST_ZERO;
	return caps;
}

static uint64_t rbd_get_size_inst(struct nbdv_drv_instance *inst)
{
	return __atomic_load_n(&((struct rbd *)inst)->size, __ATOMIC_RELAXED);
}

const struct nbdv_driver nbdvault_driver = {
    .api_version = NBDV_DRIVER_API_VERSION,
    .name = "rbd",
    .description = "Ceph RBD image (librbd, asynchronous)",
    .keys = rbd_keys,
    .needs = NBDV_NEEDS_NETWORK,
    .create = rbd_create_inst,
    .destroy = rbd_destroy,
    .caps = rbd_caps,
    .get_size = rbd_get_size_inst,
    .submit = rbd_submit,
    .resize = rbd_resize_inst,
};
