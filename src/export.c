/* nbdvault - run-time exports and their lazily opened driver instances. */
#include "build-config.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "export.h"
#include "log.h"
#include "protocol.h"

struct nbdv_export *exports_new(const struct nbdv_config *cfg, size_t *n)
{
	struct nbdv_export *v = calloc(cfg->n_exports + NBDV_RELOAD_EXPORTS, sizeof(*v));

	if (!v)
		return NULL;
	for (size_t i = 0; i < cfg->n_exports + NBDV_RELOAD_EXPORTS; i++)
		pthread_mutex_init(&v[i].rate_lock, NULL);
	for (size_t i = 0; i < cfg->n_exports; i++)
		v[i].cfg = &cfg->exports[i];
	*n = cfg->n_exports;
	return v;
}

int exports_flush(struct nbdv_export *v, size_t n)
{
	int ret = 0;

	for (size_t i = 0; i < n; i++) {
		int r;
		if (!v[i].opened)
			continue;
		r = driver_flush(&v[i].dev);
		if (r < 0) {
			log_err("export %s: final flush failed: %s", v[i].cfg->name, strerror(-r));
			if (!ret)
				ret = r;
		}
	}
	return ret;
}

void exports_free(struct nbdv_export *v, size_t n)
{
	if (!v)
		return;
	for (size_t i = 0; i < n; i++) {
		if (v[i].opened)
			driver_close(&v[i].dev);
	}
	free(v); /* (rate_lock: nothing to release on Linux for a default mutex) */
}

struct nbdv_export *exports_find(struct nbdv_export *v, size_t n, const struct nbdv_config *cfg,
				 const char *name, size_t namelen)
{
	if (namelen == 0) {
		if (!cfg->default_export)
			return NULL;
		name = cfg->default_export;
		namelen = strlen(name);
	}
	for (size_t i = 0; i < n; i++) {
		const char *en = v[i].cfg->name;
		if (!v[i].removed && strlen(en) == namelen && memcmp(en, name, namelen) == 0)
			return &v[i];
	}
	return NULL;
}

/* Reactors open exports at GO on their own threads: one lock serialises opening and
 * probing (rare events); an opened export's device is never changed again. */
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;

/* What a driver is told about export @c. */
static struct nbdv_export_params params_of(const struct nbdv_export_cfg *c)
{
	struct nbdv_export_params p = {
	    .name = c->name,
	    .values = c->values,
	    .size = c->size,
	    .size_given = c->size_given,
	    .readonly = c->readonly,
	    .resizable = c->resizable,
	};
	return p;
}

static int open_locked(struct nbdv_export *e, const struct nbdv_dev **dev)
{
	const struct nbdv_export_cfg *c = e->cfg;
	struct nbdv_export_params p = params_of(c);
	int r;

	if (!e->opened) {
		r = driver_open(c->drv, &p, &e->dev);
		if (r < 0) {
			log_err("export %s: driver %s failed to open: %s", c->name, c->drv->name,
				strerror(-r));
			return r;
		}
		e->opened = true;
		log_info("export %s: opened (%s, %llu bytes%s)", c->name, c->drv->name,
			 (unsigned long long)e->dev.size, c->readonly ? ", read-only" : "");
	}
	*dev = &e->dev;
	return 0;
}

int export_open(struct nbdv_export *e, const struct nbdv_dev **dev)
{
	int r;

	pthread_mutex_lock(&open_lock);
	r = open_locked(e, dev);
	pthread_mutex_unlock(&open_lock);
	return r;
}

bool export_gate_stats(struct nbdv_export *e, struct nbdv_gate_stats *out)
{
	bool r;

	pthread_mutex_lock(&open_lock); /* e->opened */
	r = e->opened && driver_gate_stats(&e->dev, out);
	pthread_mutex_unlock(&open_lock);
	return r;
}

int export_describe(struct nbdv_export *e, uint64_t *size, uint32_t *caps)
{
	const struct nbdv_export_cfg *c = e->cfg;
	const struct nbdv_dev *dev;
	int r;

	pthread_mutex_lock(&open_lock);
	if (!e->opened && c->drv->probe) {
		struct nbdv_export_params p = params_of(c);
		r = driver_probe(c->drv, &p, size, caps);
	} else {
		r = open_locked(e, &dev);
		if (r == 0) {
			*size = dev->size;
			*caps = dev->caps;
		}
	}
	pthread_mutex_unlock(&open_lock);
	return r;
}

uint16_t export_tflags(uint32_t caps, bool structured, bool extended)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;

	if (!(caps & NBDV_CAP_WRITE)) {
		f |= NBD_FLAG_READ_ONLY;
	} else {
		f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
		/* Fast zero is honest only if a slow zero can be refused (or never happens). */
		if (caps & NBDV_CAP_FAST_ZERO)
			f |= NBD_FLAG_SEND_FAST_ZERO;
	}
	if (structured)
		f |= NBD_FLAG_SEND_DF;
	f |= NBD_FLAG_SEND_CACHE;
	if (caps & NBDV_CAP_MULTI_CONN)
		f |= NBD_FLAG_CAN_MULTI_CONN;
	/* BLOCK_STATUS with a payload (context ids, 64-bit effect length) needs the 64-bit
	 * length field of extended headers. */
	if (extended)
		f |= NBD_FLAG_BLOCK_STAT_PAYLOAD;
	return f;
}

#define BUCKET_SECONDS 0.1 /* a bucket holds a tenth of a second of its rate */

uint64_t rate_take(struct nbdv_rate *r, double bw, double iops, uint64_t bytes, uint64_t now)
{
	double dt = r->refilled_ns ? (double)(now - r->refilled_ns) / 1e9 : BUCKET_SECONDS;
	uint64_t wait = 0;

	r->refilled_ns = now;
	if (bw > 0) {
		r->bw_tokens += dt * bw;
		if (r->bw_tokens > bw * BUCKET_SECONDS)
			r->bw_tokens = bw * BUCKET_SECONDS;
		r->bw_tokens -= (double)bytes;
		if (r->bw_tokens < 0)
			wait = (uint64_t)(-r->bw_tokens / bw * 1e9);
	}
	if (iops > 0) {
		r->iops_tokens += dt * iops;
		if (r->iops_tokens > iops * BUCKET_SECONDS + 1)
			r->iops_tokens = iops * BUCKET_SECONDS + 1;
		r->iops_tokens -= 1;
		if (r->iops_tokens < 0)
			wait = NBDV_MAX(wait, (uint64_t)(-r->iops_tokens / iops * 1e9));
	}
	return wait;
}

uint64_t export_charge(struct nbdv_export *e, uint64_t bytes)
{
	const struct nbdv_export_cfg *c = e->cfg;
	uint64_t wait;

	if (!c->bandwidth && !c->iops)
		return 0;
	pthread_mutex_lock(&e->rate_lock);
	wait = rate_take(&e->rate, (double)c->bandwidth, (double)c->iops, bytes, nbdv_now_ns());
	pthread_mutex_unlock(&e->rate_lock);
	return wait;
}
