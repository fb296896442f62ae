/*
 * nbdvault - YAML configuration loader.
 *
 * libyaml's document API builds a node tree in which every node keeps the line and
 * column where it starts, so each error can point at the exact spot.  Parsing fills
 * plain structs; validate() then checks what needs the whole file (duplicates, the
 * default export, driver requirements).
 */
#include "build-config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

#include "config.h"
#include "driver_registry.h"
#include "protocol.h"

struct parse_ctx {
	const char *file;    /* for messages */
	yaml_document_t doc; /* the loaded document */
	char *err;	     /* caller's error buffer */
	size_t errlen;
	bool failed;		/* first error already recorded */
	const char *driver_dir; /* `driver-dir:` (read before the exports), or NULL */
};

/* Record the first error, at @node's position. */
NBDV_PRINTF(3, 4)
static int fail(struct parse_ctx *ctx, const yaml_node_t *node, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int n;

	if (ctx->failed)
		return -1;
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* Messages quote values from the file: keep control characters (a multi-line
	 * scalar) from splitting the one-line error. */
	for (int i = 0; i < n && i < (int)sizeof(msg) - 1; i++) {
		if ((unsigned char)msg[i] < 0x20 || msg[i] == 0x7f)
			msg[i] = '?';
	}
	snprintf(ctx->err, ctx->errlen, "%s:%zu:%zu: %s", ctx->file,
		 node ? node->start_mark.line + 1 : 1, node ? node->start_mark.column + 1 : 1, msg);
	ctx->failed = true;
	return -1;
}

static const char *scalar(const yaml_node_t *n)
{
	return (const char *)n->data.scalar.value;
}

static const char *type_name(const yaml_node_t *n)
{
	switch (n->type) {
	case YAML_SCALAR_NODE:
		return "a scalar";
	case YAML_SEQUENCE_NODE:
		return "a list";
	case YAML_MAPPING_NODE:
		return "a mapping";
	default:
		return "nothing";
	}
}

static int want_type(struct parse_ctx *ctx, const yaml_node_t *n, yaml_node_type_t t,
		     const char *path)
{
	static const char *const want[] = {[YAML_SCALAR_NODE] = "a scalar",
					   [YAML_SEQUENCE_NODE] = "a list",
					   [YAML_MAPPING_NODE] = "a mapping"};
	if (n->type == t)
		return 0;
	return fail(ctx, n, "%s: expected %s, found %s", path, want[t], type_name(n));
}

static int get_string(struct parse_ctx *ctx, const yaml_node_t *n, const char *path, char **out)
{
	if (want_type(ctx, n, YAML_SCALAR_NODE, path) < 0)
		return -1;
	if (strlen(scalar(n)) != n->data.scalar.length)
		return fail(ctx, n, "%s: string contains a NUL byte", path);
	free(*out);
	*out = strdup(scalar(n));
	if (!*out)
		return fail(ctx, n, "%s: out of memory", path);
	return 0;
}

/* YAML's spellings of a boolean; 0, or -1 for anything else. */
static int bool_word(const char *s, bool *out)
{
	static const char *const yes[] = {"true", "True", "TRUE", "yes", "Yes", "on", "On"};
	static const char *const no[] = {"false", "False", "FALSE", "no", "No", "off", "Off"};

	for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
		if (strcmp(s, yes[i]) == 0) {
			*out = true;
			return 0;
		}
		if (strcmp(s, no[i]) == 0) {
			*out = false;
			return 0;
		}
	}
	return -1;
}

static int get_bool(struct parse_ctx *ctx, const yaml_node_t *n, const char *path, bool *out)
{
	if (want_type(ctx, n, YAML_SCALAR_NODE, path) < 0)
		return -1;
	if (bool_word(scalar(n), out) == 0)
		return 0;
	return fail(ctx, n, "%s: expected true or false, found '%.64s'", path, scalar(n));
}

static int get_uint(struct parse_ctx *ctx, const yaml_node_t *n, const char *path, uint64_t min,
		    uint64_t max, uint64_t *out)
{
	const char *s;
	char *end;
	unsigned long long v;

	if (want_type(ctx, n, YAML_SCALAR_NODE, path) < 0)
		return -1;
	s = scalar(n);
	errno = 0;
	v = strtoull(s, &end, 10);
	if (*s < '0' || *s > '9' || *end != '\0' || errno == ERANGE || v < min || v > max)
		return fail(ctx, n,
			    "%s: expected an integer from %" PRIu64 " to %" PRIu64
			    ", found '%.64s'",
			    path, min, max, s);
	*out = v;
	return 0;
}

int config_parse_size(const char *s, uint64_t *out)
{
	static const char units[] = "KMGTP";
	const char *p = s;
	uint64_t v = 0;
	unsigned shift = 0;

	if (*p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (UINT64_MAX - (uint64_t)(*p - '0')) / 10)
			return -EINVAL;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	if (*p) {
		const char *u = strchr(units, *p >= 'a' ? *p - 'a' + 'A' : *p);
		if (!u)
			return -EINVAL;
		shift = 10 * (unsigned)(u - units + 1);
		p++;
		if (strcmp(p, "iB") == 0 || strcmp(p, "B") == 0)
			p += strlen(p);
		if (*p)
			return -EINVAL;
		if (v > (UINT64_MAX >> shift))
			return -EINVAL;
	}
	*out = v << shift;
	return 0;
}

static int get_size(struct parse_ctx *ctx, const yaml_node_t *n, const char *path, uint64_t *out)
{
	if (want_type(ctx, n, YAML_SCALAR_NODE, path) < 0)
		return -1;
	if (config_parse_size(scalar(n), out) < 0 || *out > INT64_MAX)
		return fail(ctx, n,
			    "%s: '%.64s' is not a size (digits with an optional K, M, G, T or P "
			    "suffix, binary units)",
			    path, scalar(n));
	return 0;
}

/* Iterate a mapping's pairs; reports duplicate keys and non-scalar keys. */
#define for_each_pair(ctx, map, pair)                                                              \
	for (yaml_node_pair_t *pair = (map)->data.mapping.pairs.start;                             \
	     pair < (map)->data.mapping.pairs.top; pair++)

static int check_keys(struct parse_ctx *ctx, const yaml_node_t *map, const char *path)
{
	for_each_pair (ctx, map, a) {
		yaml_node_t *ka = yaml_document_get_node(&ctx->doc, a->key);
		if (ka->type != YAML_SCALAR_NODE)
			return fail(ctx, ka, "%s: keys must be scalars", path);
		for (yaml_node_pair_t *b = map->data.mapping.pairs.start; b < a; b++) {
			yaml_node_t *kb = yaml_document_get_node(&ctx->doc, b->key);
			if (strcmp(scalar(ka), scalar(kb)) == 0)
				return fail(ctx, ka, "%s: duplicate key '%.64s'", path, scalar(ka));
		}
	}
	return 0;
}

static int parse_listen_entry(struct parse_ctx *ctx, const yaml_node_t *map, const char *path,
			      struct nbdv_listen_cfg *l)
{
	bool have_port = false;

	if (want_type(ctx, map, YAML_MAPPING_NODE, path) < 0 || check_keys(ctx, map, path) < 0)
		return -1;
	l->port = NBDV_DEFAULT_PORT;
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		char sub[128];
		uint64_t port;

		snprintf(sub, sizeof(sub), "%s.%s", path, scalar(k));
		if (strcmp(scalar(k), "address") == 0) {
			if (get_string(ctx, v, sub, &l->address) < 0)
				return -1;
		} else if (strcmp(scalar(k), "port") == 0) {
			if (get_uint(ctx, v, sub, 1, 65535, &port) < 0)
				return -1;
			l->port = (uint16_t)port;
			have_port = true;
		} else if (strcmp(scalar(k), "unix") == 0) {
			if (get_string(ctx, v, sub, &l->unix_path) < 0)
				return -1;
			if (l->unix_path[0] == '\0')
				return fail(ctx, v, "%s: must not be empty", sub);
		} else {
			return fail(ctx, k,
				    "%s: unknown key '%.64s' (expected address, port or unix)",
				    path, scalar(k));
		}
	}
	if (l->unix_path && (l->address || have_port))
		return fail(ctx, map, "%s: give either unix or address/port, not both", path);
	if (!l->unix_path && !l->address)
		return fail(ctx, map, "%s: missing required key 'address' (or 'unix')", path);
	return 0;
}

/* `allow:` — a list of client identities, each "cn:NAME", "dn:DN" or "psk:USER". */
static int parse_allow(struct parse_ctx *ctx, const yaml_node_t *seq, const char *path,
		       struct nbdv_export_cfg *e)
{
	size_t n;

	if (want_type(ctx, seq, YAML_SEQUENCE_NODE, path) < 0)
		return -1;
	n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
	e->allow = calloc(n ? n : 1, sizeof(*e->allow));
	if (!e->allow)
		return fail(ctx, seq, "%s: out of memory", path);
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *v =
		    yaml_document_get_node(&ctx->doc, seq->data.sequence.items.start[i]);
		const char *a;
		char sub[160];

		snprintf(sub, sizeof(sub), "%s[%zu]", path, i);
		e->n_allow = i + 1;
		if (get_string(ctx, v, sub, &e->allow[i]) < 0)
			return -1;
		a = e->allow[i];
		if ((strncmp(a, "cn:", 3) != 0 && strncmp(a, "dn:", 3) != 0 &&
		     strncmp(a, "psk:", 4) != 0) ||
		    strchr(a, ':')[1] == '\0')
			return fail(
			    ctx, v,
			    "%s: '%.64s' is not an identity (use cn:NAME, dn:DN or psk:USER)", sub,
			    a);
	}
	return 0;
}

/* `sandbox-paths:` — absolute paths a reload may need beyond those known at start. */
static int parse_sandbox_paths(struct parse_ctx *ctx, const yaml_node_t *seq,
			       struct nbdv_config *cfg)
{
	size_t n;

	if (want_type(ctx, seq, YAML_SEQUENCE_NODE, "sandbox-paths") < 0)
		return -1;
	n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
	cfg->sandbox_paths = calloc(n ? n : 1, sizeof(*cfg->sandbox_paths));
	if (!cfg->sandbox_paths)
		return fail(ctx, seq, "sandbox-paths: out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *v =
		    yaml_document_get_node(&ctx->doc, seq->data.sequence.items.start[i]);
		char sub[64];

		snprintf(sub, sizeof(sub), "sandbox-paths[%zu]", i);
		cfg->n_sandbox_paths = i + 1;
		if (get_string(ctx, v, sub, &cfg->sandbox_paths[i]) < 0)
			return -1;
		if (cfg->sandbox_paths[i][0] != '/')
			return fail(ctx, v, "%s: '%.64s' is not an absolute path", sub,
				    cfg->sandbox_paths[i]);
	}
	return 0;
}

static int parse_tls(struct parse_ctx *ctx, const yaml_node_t *map, struct nbdv_config *cfg)
{
	struct nbdv_tls_cfg *t = &cfg->tls;
	const yaml_node_t *verify_node = NULL;

	if (want_type(ctx, map, YAML_MAPPING_NODE, "tls") < 0 || check_keys(ctx, map, "tls") < 0)
		return -1;
	t->mode = TLS_REQUIRE;
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		const char *key = scalar(k);
		char sub[64];
		int r;

		snprintf(sub, sizeof(sub), "tls.%s", key);
		if (strcmp(key, "mode") == 0) {
			r = want_type(ctx, v, YAML_SCALAR_NODE, sub);
			if (r == 0 && strcmp(scalar(v), "require") == 0)
				t->mode = TLS_REQUIRE;
			else if (r == 0 && strcmp(scalar(v), "optional") == 0)
				t->mode = TLS_OPTIONAL;
			else if (r == 0 && strcmp(scalar(v), "off") == 0)
				t->mode = TLS_OFF;
			else if (r == 0)
				r = fail(ctx, v,
					 "%s: expected require, optional or off, found '%.64s'",
					 sub, scalar(v));
		} else if (strcmp(key, "certificates") == 0) {
			r = get_string(ctx, v, sub, &t->certificates);
		} else if (strcmp(key, "verify-clients") == 0) {
			r = get_bool(ctx, v, sub, &t->verify_clients);
			verify_node = v;
		} else if (strcmp(key, "psk-file") == 0) {
			r = get_string(ctx, v, sub, &t->psk_file);
		} else if (strcmp(key, "priority") == 0) {
			r = get_string(ctx, v, sub, &t->priority);
		} else if (strcmp(key, "session-tickets") == 0) {
			r = get_bool(ctx, v, sub, &t->session_tickets);
		} else {
			r = fail(ctx, k,
				 "tls: unknown key '%.64s' (expected mode, certificates, "
				 "verify-clients, psk-file, priority or session-tickets)",
				 key);
		}
		if (r < 0)
			return -1;
	}
	if (t->mode != TLS_OFF && !t->certificates && !t->psk_file)
		return fail(ctx, map, "tls: give certificates, psk-file or both");
	if (t->verify_clients && !t->certificates)
		return fail(ctx, verify_node, "tls.verify-clients: needs tls.certificates");
	return 0;
}

/*
 * Set @v for driver key @k from @text (the YAML scalar at @n, or the key's default):
 * checked against the key's type.  @sub names the key in messages.
 */
static int driver_value(struct parse_ctx *ctx, const yaml_node_t *n, const char *sub,
			const struct nbdv_key *k, const char *text, struct nbdv_value *v)
{
	static const char *const types[] = {"",		 "a string",   "a path",
					    "a boolean", "an integer", "a size"};
	char *end;
	int r = 0;

	errno = 0;
	switch (k->type) {
	case NBDV_KEY_STRING:
		break;
	case NBDV_KEY_PATH:
	case NBDV_KEY_FILE:
		if (!text[0])
			r = -1;
		break;
	case NBDV_KEY_BOOL:
		r = bool_word(text, &v->flag);
		break;
	case NBDV_KEY_UINT:
		v->num = strtoull(text, &end, 10);
		if (*text < '0' || *text > '9' || *end || errno == ERANGE)
			r = -1;
		break;
	case NBDV_KEY_SIZE:
		r = config_parse_size(text, &v->num);
		break;
	}
	if (r < 0)
		return fail(ctx, n, "%s: expected %s, found '%.64s'", sub, types[k->type], text);
	free((char *)v->str);
	v->str = strdup(text);
	if (!v->str)
		return fail(ctx, n, "%s: out of memory", sub);
	v->set = true;
	return 0;
}

/* "pool, image, ..." : a driver's keys, for messages. */
static void key_list(const struct nbdv_driver *drv, char *out, size_t len)
{
	out[0] = '\0';
	for (const struct nbdv_key *k = drv->keys; k && k->name; k++)
		snprintf(out + strlen(out), len - strlen(out), ", %s", k->name);
}

/* `driver:` of the export at @map: resolved (loading it if it is a plugin) into e->drv. */
static int export_driver(struct parse_ctx *ctx, const yaml_node_t *map, const char *path,
			 struct nbdv_export_cfg *e)
{
	const yaml_node_t *node = NULL, *name = NULL;
	size_t n = 0;
	char why[512];

	for_each_pair (ctx, map, p) {
		const char *key = scalar(yaml_document_get_node(&ctx->doc, p->key));
		if (strcmp(key, "driver") == 0)
			node = yaml_document_get_node(&ctx->doc, p->value);
		else if (strcmp(key, "name") == 0)
			name = yaml_document_get_node(&ctx->doc, p->value);
	}
	if (!node)
		return fail(ctx, map, "%s: missing required key 'driver'", path);
	if (want_type(ctx, node, YAML_SCALAR_NODE, path) < 0)
		return -1;
	e->drv = driver_find(scalar(node), ctx->driver_dir, why, sizeof(why));
	if (!e->drv)
		return fail(ctx, node, "%s.driver: %s (export '%.64s')", path, why,
			    name && name->type == YAML_SCALAR_NODE ? scalar(name) : "");
	for (const struct nbdv_key *k = e->drv->keys; k && k->name; k++)
		n++;
	e->n_values = n;
	e->values = calloc(n ? n : 1, sizeof(*e->values));
	if (!e->values)
		return fail(ctx, node, "%s.driver: out of memory", path);
	return 0;
}

static int parse_export(struct parse_ctx *ctx, const yaml_node_t *map, const char *path,
			struct nbdv_export_cfg *e)
{
	const yaml_node_t *name_node = NULL, *size_node = NULL, *max_size_node = NULL;

	e->min_block = 1;
	if (want_type(ctx, map, YAML_MAPPING_NODE, path) < 0 || check_keys(ctx, map, path) < 0)
		return -1;
	/* The driver first: it says which further keys the export may have. */
	if (export_driver(ctx, map, path, e) < 0)
		return -1;
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		const char *key = scalar(k);
		char sub[128];
		int r;

		snprintf(sub, sizeof(sub), "%s.%s", path, key);
		if (strcmp(key, "name") == 0) {
			r = get_string(ctx, v, sub, &e->name);
			name_node = v;
		} else if (strcmp(key, "description") == 0) {
			r = get_string(ctx, v, sub, &e->description);
			if (r == 0 && strlen(e->description) > NBD_MAX_STRING)
				r = fail(ctx, v, "%s: longer than %d bytes", sub, NBD_MAX_STRING);
		} else if (strcmp(key, "driver") == 0) {
			r = get_string(ctx, v, sub, &e->driver_name);
		} else if (strcmp(key, "size") == 0) {
			r = get_size(ctx, v, sub, &e->size);
			e->size_given = true;
			size_node = v;
		} else if (strcmp(key, "readonly") == 0) {
			r = get_bool(ctx, v, sub, &e->readonly);
		} else if (strcmp(key, "bandwidth") == 0) {
			r = get_size(ctx, v, sub, &e->bandwidth);
		} else if (strcmp(key, "iops") == 0) {
			r = get_uint(ctx, v, sub, 0, 100000000, &e->iops);
		} else if (strcmp(key, "on-remove") == 0) {
			r = want_type(ctx, v, YAML_SCALAR_NODE, sub);
			if (r == 0 && strcmp(scalar(v), "close") == 0)
				e->on_remove_close = true;
			else if (r == 0 && strcmp(scalar(v), "finish") != 0)
				r = fail(ctx, v, "%s: expected finish or close, found '%.64s'", sub,
					 scalar(v));
		} else if (strcmp(key, "resizable") == 0) {
			r = get_bool(ctx, v, sub, &e->resizable);
		} else if (strcmp(key, "max-size") == 0) {
			r = get_size(ctx, v, sub, &e->max_size);
			max_size_node = v;
		} else if (strcmp(key, "minimum-block-size") == 0) {
			uint64_t mb = 0;

			r = get_size(ctx, v, sub, &mb);
			if (r == 0 && (mb == 0 || mb > 65536 || (mb & (mb - 1))))
				r = fail(ctx, v,
					 "%s: must be a power of two from 1 to 64K, found %llu",
					 sub, (unsigned long long)mb);
			e->min_block = (uint32_t)mb;
		} else if (strcmp(key, "tls") == 0) {
			r = want_type(ctx, v, YAML_SCALAR_NODE, sub);
			if (r == 0 && strcmp(scalar(v), "require") == 0)
				e->tls_required = true;
			else if (r == 0 && strcmp(scalar(v), "optional") != 0)
				r = fail(ctx, v, "%s: expected require or optional, found '%.64s'",
					 sub, scalar(v));
		} else if (strcmp(key, "allow") == 0) {
			r = parse_allow(ctx, v, sub, e);
		} else {
			/* A key of the export's driver, typed by its table. */
			size_t i = 0;
			const struct nbdv_key *dk = e->drv->keys;
			char keys[512];

			while (dk && dk[i].name && strcmp(dk[i].name, key) != 0)
				i++;
			if (dk && dk[i].name) {
				r = want_type(ctx, v, YAML_SCALAR_NODE, sub);
				if (r == 0 && strlen(scalar(v)) != v->data.scalar.length)
					r = fail(ctx, v, "%s: string contains a NUL byte", sub);
				if (r == 0)
					r = driver_value(ctx, v, sub, &dk[i], scalar(v),
							 &e->values[i]);
				e->values[i].given = true;
			} else {
				key_list(e->drv, keys, sizeof(keys));
				r = fail(ctx, k,
					 "%s: unknown key '%.64s' (expected name, description, "
					 "driver, size, readonly, resizable, max-size, "
					 "minimum-block-size, bandwidth, "
					 "iops, on-remove, tls or allow%s%s%s%s)",
					 path, key, keys[0] ? "; driver " : "",
					 keys[0] ? e->drv->name : "", keys[0] ? " takes " : "",
					 keys[0] ? keys + 2 : "");
			}
		}
		if (r < 0)
			return -1;
	}
	if (!name_node)
		return fail(ctx, map, "%s: missing required key 'name'", path);
	if (e->name[0] == '\0' || strlen(e->name) > NBD_MAX_STRING)
		return fail(ctx, name_node, "%s.name: must be 1 to %d bytes long", path,
			    NBD_MAX_STRING);
	for (size_t i = 0; i < e->n_values; i++) {
		const struct nbdv_key *dk = &e->drv->keys[i];
		char sub[128];

		snprintf(sub, sizeof(sub), "%s.%s (default of driver %s)", path, dk->name,
			 e->drv->name);
		if (e->values[i].given)
			continue;
		if (dk->required)
			return fail(ctx, map, "%s: missing required key '%s' for driver %s", path,
				    dk->name, e->drv->name);
		if (dk->default_value &&
		    driver_value(ctx, map, sub, dk, dk->default_value, &e->values[i]) < 0)
			return -1;
	}
	if ((e->drv->needs & NBDV_NEEDS_SIZE) && !e->size_given)
		return fail(ctx, map, "%s: missing required key 'size' for driver %s", path,
			    e->drv->name);
	if (size_node && e->size == 0)
		return fail(ctx, size_node, "%s.size: must be greater than 0", path);
	/* The spec wants the export's size a multiple of its minimum block size. */
	if (size_node && e->size % e->min_block)
		return fail(ctx, size_node, "%s.size: not a multiple of minimum-block-size (%u)",
			    path, e->min_block);
	if (max_size_node && e->max_size % e->min_block)
		return fail(ctx, max_size_node,
			    "%s.max-size: not a multiple of minimum-block-size (%u)", path,
			    e->min_block);
	return 0;
}

/*
 * Parse the list @seq under @name into a new array of @n items of @size bytes each
 * (*arr, owned by the config), calling @item for each with its "name[i]" path; *count
 * follows the items parsed so far so that config_free() frees exactly those.
 */
static int parse_list(struct parse_ctx *ctx, const yaml_node_t *seq, const char *name, size_t size,
		      void **arr, size_t *count,
		      int (*item)(struct parse_ctx *ctx, const yaml_node_t *node, const char *path,
				  void *elem))
{
	size_t n;

	if (want_type(ctx, seq, YAML_SEQUENCE_NODE, name) < 0)
		return -1;
	n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
	*arr = calloc(n ? n : 1, size);
	if (!*arr)
		return fail(ctx, seq, "%s: out of memory", name);
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *node =
		    yaml_document_get_node(&ctx->doc, seq->data.sequence.items.start[i]);
		char path[64];

		snprintf(path, sizeof(path), "%s[%zu]", name, i);
		*count = i + 1;
		if (item(ctx, node, path, (char *)*arr + i * size) < 0)
			return -1;
	}
	return 0;
}

static int listen_item(struct parse_ctx *ctx, const yaml_node_t *node, const char *path, void *elem)
{
	return parse_listen_entry(ctx, node, path, elem);
}

static int export_item(struct parse_ctx *ctx, const yaml_node_t *node, const char *path, void *elem)
{
	return parse_export(ctx, node, path, elem);
}

static int parse_listen(struct parse_ctx *ctx, const yaml_node_t *seq, struct nbdv_config *cfg)
{
	if (parse_list(ctx, seq, "listen", sizeof(*cfg->listen), (void **)&cfg->listen,
		       &cfg->n_listen, listen_item) < 0)
		return -1;
	if (cfg->n_listen == 0)
		return fail(ctx, seq, "listen: the list is empty");
	return 0;
}

static int parse_exports(struct parse_ctx *ctx, const yaml_node_t *seq, struct nbdv_config *cfg)
{
	if (parse_list(ctx, seq, "exports", sizeof(*cfg->exports), (void **)&cfg->exports,
		       &cfg->n_exports, export_item) < 0)
		return -1;
	for (size_t i = 1; i < cfg->n_exports; i++) {
		for (size_t j = 0; j < i; j++) {
			if (strcmp(cfg->exports[j].name, cfg->exports[i].name) == 0)
				return fail(ctx,
					    yaml_document_get_node(
						&ctx->doc, seq->data.sequence.items.start[i]),
					    "exports[%zu].name: duplicate export name '%.64s'", i,
					    cfg->exports[i].name);
		}
	}
	return 0;
}

int config_parse_duration(const char *s, double *out)
{
	char *end;
	double v;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	v = strtod(s, &end);
	if (errno == ERANGE)
		return -EINVAL;
	if (strcmp(end, "ms") == 0)
		v /= 1000;
	else if (strcmp(end, "us") == 0)
		v /= 1000000;
	else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
		v *= 60;
	else if (strcmp(end, "h") == 0)
		v *= 3600;
	else if (*end != '\0' && strcmp(end, "s") != 0)
		return -EINVAL;
	if (v > 7 * 24 * 3600.0)
		return -EINVAL;
	*out = v;
	return 0;
}

static int get_duration(struct parse_ctx *ctx, const yaml_node_t *n, const char *path, double *out)
{
	if (want_type(ctx, n, YAML_SCALAR_NODE, path) < 0)
		return -1;
	if (config_parse_duration(scalar(n), out) < 0)
		return fail(
		    ctx, n,
		    "%s: '%.64s' is not a duration (a number with us, ms, s, m or h; 0 is off; "
		    "at most a week)",
		    path, scalar(n));
	return 0;
}

/* One limits.identities entry: IDENTITY: {bandwidth, iops, max-connections}. */
static int parse_identity_limits(struct parse_ctx *ctx, const yaml_node_t *map, const char *path,
				 struct nbdv_identity_limits *l)
{
	if (want_type(ctx, map, YAML_MAPPING_NODE, path) < 0 || check_keys(ctx, map, path) < 0)
		return -1;
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		char sub[400];
		uint64_t n;
		int r;

		snprintf(sub, sizeof(sub), "%s.%s", path, scalar(k));
		if (strcmp(scalar(k), "bandwidth") == 0) {
			r = get_size(ctx, v, sub, &l->bandwidth);
		} else if (strcmp(scalar(k), "iops") == 0) {
			r = get_uint(ctx, v, sub, 0, 100000000, &l->iops);
		} else if (strcmp(scalar(k), "max-connections") == 0) {
			r = get_uint(ctx, v, sub, 0, 1000000, &n);
			l->max_connections = (unsigned)n;
		} else {
			r = fail(ctx, k,
				 "%s: unknown key '%.64s' (expected bandwidth, iops or "
				 "max-connections)",
				 path, scalar(k));
		}
		if (r < 0)
			return -1;
	}
	return 0;
}

static int parse_identities(struct parse_ctx *ctx, const yaml_node_t *map, struct nbdv_config *cfg)
{
	size_t n;

	if (want_type(ctx, map, YAML_MAPPING_NODE, "limits.identities") < 0 ||
	    check_keys(ctx, map, "limits.identities") < 0)
		return -1;
	n = (size_t)(map->data.mapping.pairs.top - map->data.mapping.pairs.start);
	cfg->identities = calloc(n ? n : 1, sizeof(*cfg->identities));
	if (!cfg->identities)
		return fail(ctx, map, "limits.identities: out of memory");
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		struct nbdv_identity_limits *l = &cfg->identities[cfg->n_identities++];
		char sub[320];

		snprintf(sub, sizeof(sub), "limits.identities.%.200s", scalar(k));
		if (strncmp(scalar(k), "psk:", 4) != 0 && strncmp(scalar(k), "dn:", 3) != 0)
			return fail(ctx, k, "%s: an identity is psk:USER or dn:DN", sub);
		l->identity = strdup(scalar(k));
		if (!l->identity)
			return fail(ctx, k, "%s: out of memory", sub);
		if (parse_identity_limits(ctx, v, sub, l) < 0)
			return -1;
	}
	return 0;
}

static int parse_limits(struct parse_ctx *ctx, const yaml_node_t *map, struct nbdv_config *cfg)
{
	if (want_type(ctx, map, YAML_MAPPING_NODE, "limits") < 0 ||
	    check_keys(ctx, map, "limits") < 0)
		return -1;
	for_each_pair (ctx, map, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		const char *key = scalar(k);
		uint64_t n;
		char sub[64];
		int r;

		snprintf(sub, sizeof(sub), "limits.%s", key);
		if (strcmp(key, "max-request") == 0) {
			r = get_size(ctx, v, sub, &n);
			/* 512 bytes .. 1 GiB: a larger payload could not be buffered sanely. */
			if (r == 0 && (n < 512 || n > (1U << 30)))
				r = fail(ctx, v, "%s: must be from 512 to 1G", sub);
			cfg->max_request = (uint32_t)n;
		} else if (strcmp(key, "max-inflight-bytes") == 0) {
			r = get_size(ctx, v, sub, &n);
			if (r == 0 && (n < (1U << 20) || n > (64ULL << 30)))
				r = fail(ctx, v, "%s: must be from 1M to 64G", sub);
			cfg->max_inflight_bytes = n;
		} else if (strcmp(key, "max-memory") == 0) {
			r = get_size(ctx, v, sub, &n);
			if (r == 0 && (n < (16U << 20) || n > (1ULL << 50)))
				r = fail(ctx, v, "%s: must be from 16M to 1P", sub);
			cfg->max_memory = n;
		} else if (strcmp(key, "identity-bandwidth") == 0) {
			r = get_size(ctx, v, sub, &cfg->identity_default.bandwidth);
		} else if (strcmp(key, "identity-iops") == 0) {
			r = get_uint(ctx, v, sub, 0, 100000000, &cfg->identity_default.iops);
		} else if (strcmp(key, "identities") == 0) {
			r = parse_identities(ctx, v, cfg);
		} else if (strcmp(key, "max-connections-per-identity") == 0) {
			r = get_uint(ctx, v, sub, 0, 1000000, &n);
			cfg->max_conns_per_identity = (unsigned)n;
		} else if (strcmp(key, "max-connections") == 0) {
			r = get_uint(ctx, v, sub, 1, 1000000, &n);
			cfg->max_connections = (unsigned)n;
		} else if (strcmp(key, "handshake-timeout") == 0) {
			r = get_duration(ctx, v, sub, &cfg->handshake_timeout);
		} else if (strcmp(key, "idle-timeout") == 0) {
			r = get_duration(ctx, v, sub, &cfg->idle_timeout);
		} else {
			r = fail(
			    ctx, k,
			    "limits: unknown key '%.64s' (expected max-connections, "
			    "max-connections-per-identity, identity-bandwidth, identity-iops, "
			    "identities, "
			    "handshake-timeout, idle-timeout, max-request, max-inflight-bytes or "
			    "max-memory)",
			    key);
		}
		if (r < 0)
			return -1;
	}
	return 0;
}

static int parse_root(struct parse_ctx *ctx, const yaml_node_t *root, struct nbdv_config *cfg)
{
	const yaml_node_t *default_node = NULL;
	bool have_exports = false;

	if (!root)
		return fail(ctx, NULL, "the file is empty (expected a mapping with 'exports')");
	if (want_type(ctx, root, YAML_MAPPING_NODE, "top level") < 0 ||
	    check_keys(ctx, root, "top level") < 0)
		return -1;
	/* driver-dir first: the exports' drivers are found through it. */
	for_each_pair (ctx, root, p) {
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);

		if (strcmp(scalar(yaml_document_get_node(&ctx->doc, p->key)), "driver-dir") != 0)
			continue;
		if (get_string(ctx, v, "driver-dir", &cfg->driver_dir) < 0)
			return -1;
		if (cfg->driver_dir[0] != '/')
			return fail(ctx, v, "driver-dir: '%.64s' is not an absolute path",
				    cfg->driver_dir);
		ctx->driver_dir = cfg->driver_dir;
	}
	for_each_pair (ctx, root, p) {
		yaml_node_t *k = yaml_document_get_node(&ctx->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&ctx->doc, p->value);
		const char *key = scalar(k);
		uint64_t n;
		int r;

		if (strcmp(key, "listen") == 0) {
			r = parse_listen(ctx, v, cfg);
		} else if (strcmp(key, "exports") == 0) {
			r = parse_exports(ctx, v, cfg);
			have_exports = true;
		} else if (strcmp(key, "default-export") == 0) {
			r = get_string(ctx, v, "default-export", &cfg->default_export);
			default_node = v;
		} else if (strcmp(key, "limits") == 0) {
			r = parse_limits(ctx, v, cfg);
		} else if (strcmp(key, "tls") == 0) {
			r = parse_tls(ctx, v, cfg);
		} else if (strcmp(key, "io-threads") == 0) {
			r = get_uint(ctx, v, "io-threads", 1, 256, &n);
			cfg->io_threads = (unsigned)n;
		} else if (strcmp(key, "busy-poll") == 0) {
			r = get_duration(ctx, v, "busy-poll", &cfg->busy_poll);
			if (r == 0 && cfg->busy_poll > NBDV_MAX_BUSY_POLL)
				r = fail(ctx, v, "busy-poll: at most 10ms");
		} else if (strcmp(key, "workers") == 0) {
			r = get_uint(ctx, v, "workers", 1, NBDV_MAX_WORKERS, &n);
			cfg->workers = (unsigned)n;
		} else if (strcmp(key, "user") == 0) {
			r = get_string(ctx, v, "user", &cfg->user);
			if (r == 0 && !cfg->user[0])
				r = fail(ctx, v, "user: must not be empty");
		} else if (strcmp(key, "group") == 0) {
			r = get_string(ctx, v, "group", &cfg->group);
			if (r == 0 && !cfg->group[0])
				r = fail(ctx, v, "group: must not be empty");
		} else if (strcmp(key, "metrics") == 0) {
			cfg->metrics = calloc(1, sizeof(*cfg->metrics));
			r = cfg->metrics ? parse_listen_entry(ctx, v, "metrics", cfg->metrics)
					 : fail(ctx, v, "metrics: out of memory");
		} else if (strcmp(key, "audit-log") == 0) {
			r = get_string(ctx, v, "audit-log", &cfg->audit_log);
			if (r == 0 && strcmp(cfg->audit_log, "stderr") != 0 &&
			    cfg->audit_log[0] != '/')
				r = fail(ctx, v, "audit-log: an absolute path or stderr");
		} else if (strcmp(key, "sandbox") == 0) {
			r = get_bool(ctx, v, "sandbox", &cfg->sandbox);
		} else if (strcmp(key, "sandbox-paths") == 0) {
			r = parse_sandbox_paths(ctx, v, cfg);
		} else if (strcmp(key, "driver-dir") == 0) {
			r = 0; /* read above */
		} else {
			r = fail(
			    ctx, k,
			    "unknown key '%.64s' (expected listen, default-export, exports, "
			    "tls, limits, workers, io-threads, busy-poll, user, group, sandbox, "
			    "sandbox-paths, driver-dir, audit-log or metrics)",
			    key);
		}
		if (r < 0)
			return -1;
	}
	if (!have_exports)
		return fail(ctx, root, "missing required key 'exports'");
	if (cfg->group && !cfg->user)
		return fail(ctx, root, "group: needs user (the group is set when the user is)");
	for (size_t i = 0; i < cfg->n_exports; i++) {
		const struct nbdv_export_cfg *e = &cfg->exports[i];
		for (size_t j = 0; j < e->n_allow; j++) {
			/* Certificate identities exist only when certificates are verified. */
			if (e->allow[j][0] != 'p' && !cfg->tls.verify_clients)
				return fail(ctx, root,
					    "exports[%zu].allow[%zu]: '%.64s' needs "
					    "tls.verify-clients: true",
					    i, j, e->allow[j]);
		}
		if (cfg->exports[i].n_allow && cfg->tls.mode == TLS_OFF)
			return fail(ctx, root,
				    "exports[%zu].allow: identities come from TLS, which is off "
				    "(add a tls block)",
				    i);
	}
	if (default_node &&
	    !config_find_export(cfg, cfg->default_export, strlen(cfg->default_export)))
		return fail(ctx, default_node, "default-export: no export is named '%.64s'",
			    cfg->default_export);
	return 0;
}

/* A quarter of the machine's memory, or of the cgroup's limit when that is lower. */
static uint64_t default_max_memory(void)
{
	long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
	uint64_t total = pages > 0 && psize > 0 ? (uint64_t)pages * (uint64_t)psize : 4ULL << 30;
	FILE *f = fopen("/sys/fs/cgroup/memory.max", "r");
	unsigned long long lim;

	if (f) {
		if (fscanf(f, "%llu", &lim) == 1 && lim < total)
			total = lim;
		fclose(f);
	}
	total /= 4;
	return total < (16U << 20) ? 16U << 20 : total;
}

static int set_defaults(struct nbdv_config *cfg)
{
	if (!cfg->max_memory)
		cfg->max_memory = default_max_memory();
	if (!cfg->tls.priority && !(cfg->tls.priority = strdup(NBDV_TLS_PRIORITY)))
		return -1;
	if (!cfg->n_listen) {
		cfg->listen = calloc(1, sizeof(*cfg->listen));
		if (!cfg->listen)
			return -1;
		cfg->listen[0].address = strdup("::");
		if (!cfg->listen[0].address)
			return -1;
		cfg->listen[0].port = NBDV_DEFAULT_PORT;
		cfg->n_listen = 1;
		cfg->listen_default = true;
	}
	return 0;
}

int config_load(const char *path, struct nbdv_config **out, char *err, size_t errlen)
{
	struct parse_ctx ctx = {.file = path, .err = err, .errlen = errlen};
	struct nbdv_config *cfg = NULL;
	yaml_parser_t parser;
	FILE *f;
	int ret = -1;

	*out = NULL;
	f = fopen(path, "rb");
	if (!f) {
		snprintf(err, errlen, "%s:1:1: cannot open: %s", path, strerror(errno));
		return -1;
	}
	if (!yaml_parser_initialize(&parser)) {
		snprintf(err, errlen, "%s:1:1: cannot initialise the YAML parser", path);
		goto out_close;
	}
	yaml_parser_set_input_file(&parser, f);
	if (!yaml_parser_load(&parser, &ctx.doc)) {
		snprintf(err, errlen, "%s:%zu:%zu: YAML syntax error: %s%s%s", path,
			 parser.problem_mark.line + 1, parser.problem_mark.column + 1,
			 parser.problem ? parser.problem : "unknown problem",
			 parser.context ? " " : "", parser.context ? parser.context : "");
		goto out_parser;
	}
	cfg = calloc(1, sizeof(*cfg));
	if (!cfg || !(cfg->file = strdup(path))) {
		snprintf(err, errlen, "%s:1:1: out of memory", path);
		goto out_doc;
	}
	cfg->max_request = NBDV_DEFAULT_MAX_REQUEST;
	cfg->max_inflight_bytes = NBDV_DEFAULT_MAX_INFLIGHT_BYTES;
	cfg->max_connections = NBDV_DEFAULT_MAX_CONNECTIONS;
	cfg->handshake_timeout = NBDV_DEFAULT_HANDSHAKE_TIMEOUT;
	cfg->io_threads = NBDV_DEFAULT_IO_THREADS;
	cfg->busy_poll = NBDV_DEFAULT_BUSY_POLL;
	cfg->tls.session_tickets = true;
	cfg->sandbox = true;
	if (parse_root(&ctx, yaml_document_get_root_node(&ctx.doc), cfg) < 0)
		goto out_doc;
	if (set_defaults(cfg) < 0) {
		snprintf(err, errlen, "%s:1:1: out of memory", path);
		goto out_doc;
	}
	*out = cfg;
	cfg = NULL;
	ret = 0;
out_doc:
	config_free(cfg);
	yaml_document_delete(&ctx.doc);
out_parser:
	yaml_parser_delete(&parser);
out_close:
	fclose(f);
	return ret;
}

void config_free(struct nbdv_config *cfg)
{
	if (!cfg)
		return;
	for (size_t i = 0; i < cfg->n_listen; i++) {
		free(cfg->listen[i].address);
		free(cfg->listen[i].unix_path);
	}
	free(cfg->listen);
	for (size_t i = 0; i < cfg->n_exports; i++) {
		struct nbdv_export_cfg *e = &cfg->exports[i];
		free(e->name);
		free(e->description);
		free(e->driver_name);
		for (size_t j = 0; j < e->n_values; j++)
			free((char *)e->values[j].str);
		free(e->values);
		for (size_t j = 0; j < e->n_allow; j++)
			free(e->allow[j]);
		free(e->allow);
	}
	free(cfg->tls.certificates);
	free(cfg->tls.psk_file);
	free(cfg->tls.priority);
	free(cfg->user);
	free(cfg->group);
	free(cfg->audit_log);
	free(cfg->driver_dir);
	for (size_t i = 0; i < cfg->n_identities; i++)
		free(cfg->identities[i].identity);
	free(cfg->identities);
	if (cfg->metrics) {
		free(cfg->metrics->address);
		free(cfg->metrics->unix_path);
		free(cfg->metrics);
	}
	for (size_t i = 0; i < cfg->n_sandbox_paths; i++)
		free(cfg->sandbox_paths[i]);
	free(cfg->sandbox_paths);
	free(cfg->exports);
	free(cfg->default_export);
	free(cfg->file);
	free(cfg);
}

const char *config_export_path(const struct nbdv_export_cfg *e, int type, size_t n)
{
	for (size_t i = 0; i < e->n_values; i++) {
		if (e->drv->keys[i].type == type && e->values[i].set && n-- == 0)
			return e->values[i].str;
	}
	return NULL;
}

bool config_needs_network(const struct nbdv_config *cfg)
{
	for (size_t i = 0; i < cfg->n_exports; i++)
		if (cfg->exports[i].drv->needs & NBDV_NEEDS_NETWORK)
			return true;
	return false;
}

bool config_same_driver_values(const struct nbdv_export_cfg *a, const struct nbdv_export_cfg *b)
{
	if (a->drv != b->drv || a->n_values != b->n_values)
		return false;
	for (size_t i = 0; i < a->n_values; i++) {
		const char *x = a->values[i].str, *y = b->values[i].str;
		if (a->values[i].set != b->values[i].set || (x && strcmp(x, y) != 0))
			return false;
	}
	return true;
}

const struct nbdv_export_cfg *config_find_export(const struct nbdv_config *cfg, const char *name,
						 size_t namelen)
{
	if (namelen == 0) {
		if (!cfg->default_export)
			return NULL;
		name = cfg->default_export;
		namelen = strlen(name);
	}
	for (size_t i = 0; i < cfg->n_exports; i++) {
		const char *n = cfg->exports[i].name;
		if (strlen(n) == namelen && memcmp(n, name, namelen) == 0)
			return &cfg->exports[i];
	}
	return NULL;
}
