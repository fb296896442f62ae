/*
 * nbdvault - `file` driver: a regular (sparse) file or a block device.
 *
 *  - FLUSH: fdatasync.  FUA: pwritev2(RWF_DSYNC), falling back to write + fdatasync.
 *  - Write-behind: after `writeback-after` bytes of large writes, writeback of the file's
 *    dirty pages is started (sync_file_range), so that the FLUSH ending a bulk copy
 *    finds little left to write.
 *  - TRIM: fallocate(PUNCH_HOLE) on files, BLKDISCARD on block devices.
 *  - WRITE_ZEROES: punch a hole when trimming is allowed, else ZERO_RANGE, else
 *    BLKZEROOUT; failing all that, write zeroes, or -ENOTSUP when the client asked
 *    for a fast zero.
 *  - Block status: SEEK_DATA / SEEK_HOLE; holes read as zeroes.
 * Every call may block, so they run on the executor's I/O threads, concurrently:
 * only positional I/O is used, and nothing in the instance changes after create()
 * but atomic flags.  Small cached reads (RWF_NOWAIT) and small page-aligned writes
 * (into the page cache) are offered to the reactor through the *_nowait calls, and
 * large reads wholly in the page cache are sent from it (cached_fd, cachestat(2)).
 */
#include "build-config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "compiler.h"
#include "nbdvault/driver.h"
#include "log.h"
#include "protocol.h"

/* cachestat(2) is Linux 6.5; older C library headers do not name it.  The number is the
 * same on every architecture (the unified syscall table). */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
/* The `path:` key (file_keys[0]) and `writeback-after:` (file_keys[1]). */
#define PATH_OF(p)	      ((p)->values[0].str)
#define WRITEBACK_AFTER_OF(p) ((p)->values[1].num)
/* Writes at least this large count toward `writeback-after`: bulk copies, whose data
 * a FLUSH will soon want on disk.  Smaller writes are left to the kernel's writeback,
 * which may find a hot page rewritten several times before it is due. */
#define WRITEBACK_MIN_WRITE (64 * 1024)

struct cachestat_range_v1 {
	uint64_t off, len;
};
struct cachestat_v1 {
	uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};
/* Most extents of a range that cached_fd() looks at before leaving it to the I/O threads. */
#define FIEMAP_EXTENTS 8

struct filedrv {
	struct nbdv_drv_instance head;	/* must be first */
	int fd;				/* open file or device */
	uint64_t size;			/* bytes */
	bool is_blk;			/* a block device */
	bool readonly;			/* opened O_RDONLY */
	uint64_t page_mask;		/* page size - 1 */
	atomic_bool no_nowait_write;	/* pwritev2(RWF_NOWAIT) is EOPNOTSUPP here */
	atomic_bool no_cachestat;	/* cachestat(2) is missing or refused here */
	atomic_bool no_fiemap;		/* FS_IOC_FIEMAP is not supported here */
	uint64_t writeback_after;	/* `writeback-after`; 0: never start writeback */
	atomic_uint_fast64_t unstarted; /* bytes of large writes since writeback was started */
	atomic_bool no_sync_file_range; /* sync_file_range(2) is refused here */
	char name[];			/* export name, for log lines */
};

static struct filedrv *to_file(struct nbdv_drv_instance *inst)
{
	return (struct filedrv *)inst;
}

static int file_create(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{
	struct filedrv *f;
	struct stat st;
	int fd, r;

	fd = open(PATH_OF(p), (p->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT && p->size_given && !p->readonly) {
		fd = open(PATH_OF(p), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd >= 0 && ftruncate(fd, (off_t)p->size) < 0) {
			r = -errno;
			log_err("export %s: cannot size new file %s: %s", p->name, PATH_OF(p),
				strerror(errno));
			close(fd);
			unlink(PATH_OF(p));
			return r;
		}
		if (fd >= 0)
			log_info("export %s: created sparse file %s", p->name, PATH_OF(p));
	}
	if (fd < 0) {
		r = -errno;
		log_err("export %s: cannot open %s: %s", p->name, PATH_OF(p), strerror(errno));
		return r;
	}
	f = calloc(1, sizeof(*f) + strlen(p->name) + 1);
	if (!f) {
		close(fd);
		return -ENOMEM;
	}
	f->fd = fd;
	strcpy(f->name, p->name);
	f->readonly = p->readonly;
	f->page_mask = (uint64_t)sysconf(_SC_PAGESIZE) - 1;
	f->writeback_after = p->readonly ? 0 : WRITEBACK_AFTER_OF(p);
	if (fstat(fd, &st) < 0)
		goto err_errno;
	if (S_ISBLK(st.st_mode)) {
		f->is_blk = true;
		if (ioctl(fd, BLKGETSIZE64, &f->size) < 0)
			goto err_errno;
	} else if (S_ISREG(st.st_mode)) {
		f->size = (uint64_t)st.st_size;
		if (p->size_given && p->size != f->size)
			log_warn("export %s: %s exists with size %llu, not the configured %llu; "
				 "serving the file's size",
				 p->name, PATH_OF(p), (unsigned long long)f->size,
				 (unsigned long long)p->size);
	} else {
		log_err("export %s: %s is neither a regular file nor a block device", p->name,
			PATH_OF(p));
		errno = EINVAL;
		goto err_errno;
	}
	*out = &f->head;
	return 0;
err_errno:
	r = -errno;
	close(fd);
	free(f);
	return r;
}

static void file_destroy(struct nbdv_drv_instance *inst)
{
	struct filedrv *f = to_file(inst);

	close(f->fd);
	free(f);
}

static uint32_t caps_for(bool readonly)
{
	uint32_t caps = NBDV_CAP_FLUSH | NBDV_CAP_FUA | NBDV_CAP_EXTENTS | NBDV_CAP_CACHE |
			NBDV_CAP_MULTI_CONN | NBDV_CAP_BLOCKING;

	if (!readonly)
		caps |= NBDV_CAP_WRITE | NBDV_CAP_TRIM | NBDV_CAP_ZERO | NBDV_CAP_FAST_ZERO;
	return caps;
}

static uint32_t file_caps(struct nbdv_drv_instance *inst)
{
	return caps_for(to_file(inst)->readonly);
}

/* What create() would serve, from metadata only: nothing is created or written. */
static int file_probe(const struct nbdv_export_params *p, uint64_t *size, uint32_t *caps)
{
	struct stat st;

	*caps = caps_for(p->readonly);
	if (stat(PATH_OF(p), &st) < 0) {
		if (errno == ENOENT && p->size_given && !p->readonly) {
			*size = p->size; /* created with this size at GO */
			return 0;
		}
		return -errno;
	}
	if (S_ISREG(st.st_mode)) {
		*size = (uint64_t)st.st_size;
		return 0;
	}
	if (S_ISBLK(st.st_mode)) {
		int fd = open(PATH_OF(p), O_RDONLY | O_CLOEXEC);
		int r = fd < 0 || ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
		if (fd >= 0)
			close(fd);
		return r;
	}
	return -EINVAL;
}

static uint64_t file_get_size(struct nbdv_drv_instance *inst)
{
	return to_file(inst)->size;
}

/*
 * RESIZE: a regular file is truncated or extended (sparse); growth beyond the space the
 * filesystem has left is refused with ENOSPC rather than promised.  A block device's
 * size is not ours to change: EPERM.
 */
static int file_resize(struct nbdv_drv_instance *inst, uint64_t size)
{
	struct filedrv *f = to_file(inst);
	struct statvfs vfs;

	if (f->is_blk || f->readonly)
		return -EPERM;
	if (size > (uint64_t)INT64_MAX)
		return -ENOSPC;
	if (size > f->size && fstatvfs(f->fd, &vfs) == 0 &&
	    size - f->size > (uint64_t)vfs.f_bavail * vfs.f_frsize)
		return -ENOSPC;
	if (ftruncate(f->fd, (off_t)size) < 0)
		return errno == EFBIG || errno == EINVAL ? -ENOSPC : -errno;
	f->size = size;
	return 0;
}

static int file_pread(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off,
		      uint32_t flags)
{
	struct filedrv *f = to_file(inst);
	char *p = buf;

	while (len) {
		ssize_t n = pread(f->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			/* The file shrank under us: what is past its end reads as zeroes. */
			memset(p, 0, len);
			return 0;
		}
		p += n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

/* All from the page cache, or -EAGAIN (RWF_NOWAIT); a short read counts as EAGAIN. */
static int file_pread_nowait(struct nbdv_drv_instance *inst, void *buf, uint64_t len, uint64_t off)
{
	struct iovec iov = {.iov_base = buf, .iov_len = len};
	ssize_t n;

	if (to_file(inst)->is_blk)
		return -EAGAIN;
	n = preadv2(to_file(inst)->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
	if (n == (ssize_t)len)
		return 0;
	if (n >= 0 && off + (uint64_t)n >= to_file(inst)->size) {
		/* Past the end of a file that shrank: zeroes, as file_pread does. */
		memset((char *)buf + n, 0, len - (uint64_t)n);
		return 0;
	}
	return -EAGAIN;
}

/* A call a fast path depends on failed with @err for good: stop using it, and say so
 * once (with @consequence) so that an admin can tell why it is not taken. */
static void give_up(struct filedrv *f, atomic_bool *flag, const char *call, int err,
		    const char *consequence)
{
	if (!atomic_exchange_explicit(flag, true, memory_order_relaxed))
		log_info("export %s: %s: %s; %s", f->name, call, strerror(err), consequence);
}

/* Whether [off, off+len) is all in the page cache (false if that cannot be asked). */
static bool all_cached(struct filedrv *f, uint64_t len, uint64_t off)
{
	struct cachestat_range_v1 range = {off, len};
	struct cachestat_v1 cs;
	uint64_t page = f->page_mask + 1;
	uint64_t pages = (off + len + f->page_mask) / page - off / page;

	if (atomic_load_explicit(&f->no_cachestat, memory_order_relaxed))
		return false;
	if (syscall(__NR_cachestat, f->fd, &range, &cs, 0) < 0) {
		/* ENOSYS: kernel before 6.5; EPERM: newer kernels allow it only to those
		 * who could write the file.  Either way it will not change. */
		if (errno == ENOSYS || errno == EPERM || errno == EOPNOTSUPP)
			give_up(f, &f->no_cachestat, "cachestat", errno,
				"READ data will be copied, never sent from the page cache");
		return false;
	}
	return cs.nr_cache >= pages;
}

/*
 * Whether [off, off+len) is all allocated data, asked with FIEMAP for this range only
 * (SEEK_HOLE would walk every extent up to the next hole, without bound).  Unwritten
 * (preallocated) extents and ranges of more than FIEMAP_EXTENTS extents count as
 * "not known": the I/O threads' path sorts them out.
 */
static bool all_data(struct filedrv *f, uint64_t len, uint64_t off)
{
	uint64_t q[(sizeof(struct fiemap) + FIEMAP_EXTENTS * sizeof(struct fiemap_extent)) / 8] = {
	    0};
	struct fiemap *fm = (struct fiemap *)q;
	uint64_t pos = off;

	if (atomic_load_explicit(&f->no_fiemap, memory_order_relaxed))
		return false;
	fm->fm_start = off;
	fm->fm_length = len;
	fm->fm_extent_count = FIEMAP_EXTENTS;
	if (ioctl(f->fd, FS_IOC_FIEMAP, fm) < 0) {
		if (errno == ENOTTY || errno == EOPNOTSUPP)
			give_up(f, &f->no_fiemap, "FIEMAP", errno,
				"READs that may report holes will be copied, never sent from "
				"the page cache");
		return false;
	}
	for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
		const struct fiemap_extent *e = &fm->fm_extents[i];

		if (e->fe_logical > pos || (e->fe_flags & FIEMAP_EXTENT_UNWRITTEN))
			return false;
		pos = NBDV_MAX(pos, e->fe_logical + e->fe_length);
		if (pos >= off + len)
			return true;
	}
	return false;
}

static int file_cached_fd(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, bool no_holes)
{
	struct filedrv *f = to_file(inst);

	if (!all_cached(f, len, off))
		return -EAGAIN;
	/* A block device has no holes; cached pages past the end of a file that shrank
	 * cannot exist, so sendfile() will find every byte. */
	if (no_holes && !f->is_blk && !all_data(f, len, off))
		return -EAGAIN;
	return f->fd;
}

static int file_flush(struct nbdv_drv_instance *inst, uint32_t flags)
{
	return fdatasync(to_file(inst)->fd) < 0 ? -errno : 0;
}

/* Whether a write of @len bytes counts toward `writeback-after` at all. */
static bool counts_for_writeback(struct filedrv *f, uint64_t len)
{
	return f->writeback_after && len >= WRITEBACK_MIN_WRITE &&
	       !atomic_load_explicit(&f->no_sync_file_range, memory_order_relaxed);
}

/* Whether a write of @len bytes would make `writeback-after` due: the reactor's
 * file_pwrite_nowait() leaves it to an I/O thread, where starting writeback may block. */
static bool writeback_due(struct filedrv *f, uint64_t len)
{
	return counts_for_writeback(f, len) &&
	       atomic_load_explicit(&f->unstarted, memory_order_relaxed) + len >=
		   f->writeback_after;
}

/*
 * Count @len bytes just written (not FUA: those are on disk); on an I/O thread
 * (@may_block), start writeback of the whole file's dirty pages once `writeback-after`
 * is reached.  SYNC_FILE_RANGE_WRITE only queues the pages and waits for nothing but
 * request slots.  It leaves the file's writeback error state alone: an I/O error
 * still fails the next FLUSH, which is where the client learns of it.
 */
static void wrote(struct filedrv *f, uint64_t len, bool may_block)
{
	if (!counts_for_writeback(f, len))
		return;
	if (atomic_fetch_add_explicit(&f->unstarted, len, memory_order_relaxed) + len <
		f->writeback_after ||
	    !may_block)
		return;
	atomic_store_explicit(&f->unstarted, 0, memory_order_relaxed);
	if (sync_file_range(f->fd, 0, 0, SYNC_FILE_RANGE_WRITE) < 0 &&
	    (errno == ENOSYS || errno == EPERM || errno == ESPIPE || errno == EINVAL))
		give_up(f, &f->no_sync_file_range, "sync_file_range", errno,
			"writeback is left to the kernel");
}

/* Write all of @buf at @off, durably when @dsync. */
static int write_all(struct filedrv *f, const char *p, uint64_t len, uint64_t off, bool dsync)
{
	while (len) {
		struct iovec iov = {.iov_base = (void *)p, .iov_len = len};
		ssize_t n;

		n = pwritev2(f->fd, &iov, 1, (off_t)off, dsync ? RWF_DSYNC : 0);
		if (n < 0 && dsync && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) {
			/* Older kernel or filesystem: plain write, then fdatasync below. */
			n = pwrite(f->fd, p, len, (off_t)off);
			if (n >= 0 && fdatasync(f->fd) < 0)
				return -errno;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

static int file_pwrite(struct nbdv_drv_instance *inst, const void *buf, uint64_t len, uint64_t off,
		       uint32_t flags)
{
	struct filedrv *f = to_file(inst);
	bool dsync = flags & NBDV_F_FUA;
	int r = write_all(f, buf, len, off, dsync);

	if (r == 0 && !dsync)
		wrote(f, len, true);
	return r;
}

/*
 * A write of whole pages of a regular file goes to the page cache without reading
 * anything first.  Where the filesystem supports RWF_NOWAIT for buffered writes (XFS,
 * btrfs) it is used; ext4 answers EOPNOTSUPP and gets a plain pwrite, which may still
 * block (dirty-page throttling, the inode lock): the wrapper's stall gate covers that.
 */
static int file_pwrite_nowait(struct nbdv_drv_instance *inst, const void *buf, uint64_t len,
			      uint64_t off)
{
	struct filedrv *f = to_file(inst);
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
	ssize_t n = 0;
	int r;

	if (f->is_blk || ((off | len) & f->page_mask) || writeback_due(f, len))
		return -EAGAIN;
	if (!atomic_load_explicit(&f->no_nowait_write, memory_order_relaxed)) {
		n = pwritev2(f->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
		if (n < 0 && errno == EAGAIN)
			return -EAGAIN;
		if (n < 0 && (errno == EOPNOTSUPP || errno == EINVAL))
			give_up(f, &f->no_nowait_write, "pwritev2(RWF_NOWAIT)", errno,
				"small writes are made with plain pwrite");
		else if (n < 0)
			return -errno;
		n = NBDV_MAX(n, (ssize_t)0);
	}
	/* What RWF_NOWAIT did not write (all of it on ext4), the ordinary way. */
	r = write_all(f, (const char *)buf + n, len - (uint64_t)n, off + (uint64_t)n, false);
	if (r == 0)
		wrote(f, len, false);
	return r;
}

static int fua_sync(struct filedrv *f, uint32_t flags)
{
	if ((flags & NBDV_F_FUA) && fdatasync(f->fd) < 0)
		return -errno;
	return 0;
}

static int file_trim(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	struct filedrv *f = to_file(inst);

	if (f->is_blk) {
		uint64_t range[2] = {off, len};
		/* Discard is a hint; a device without it simply keeps the data. */
		if (ioctl(f->fd, BLKDISCARD, range) < 0 && errno != EOPNOTSUPP && errno != ENOTTY)
			return -errno;
	} else if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
			     (off_t)len) < 0 &&
		   errno != EOPNOTSUPP) {
		return -errno;
	}
	return fua_sync(f, flags);
}

static int file_zero(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	static const char zeroes[64 * 1024];
	struct filedrv *f = to_file(inst);
	int r = 0;

	if ((flags & NBDV_F_MAY_TRIM) && !f->is_blk &&
	    fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) ==
		0)
		return fua_sync(f, flags);
	if (fallocate(f->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) ==
	    0)
		return fua_sync(f, flags);
	if (f->is_blk && !(flags & NBDV_F_FAST)) {
		uint64_t range[2] = {off, len};
		if (ioctl(f->fd, BLKZEROOUT, range) == 0)
			return fua_sync(f, flags);
	}
	/* No fast path: a client that asked for a fast zero gets ENOTSUP and no change. */
	if (flags & NBDV_F_FAST)
		return -ENOTSUP;
	while (len && r == 0) {
		uint64_t n = NBDV_MIN(len, (uint64_t)sizeof(zeroes));
		r = file_pwrite(inst, zeroes, n, off, 0);
		off += n;
		len -= n;
	}
	return r ? r : fua_sync(f, flags);
}

static int file_block_status(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off,
			     uint32_t flags, struct nbdv_extents *ext)
{
	struct filedrv *f = to_file(inst);
	uint64_t end = off + len;
	int r = 0;

	if (f->is_blk)
		return nbdv_extents_add(ext, len, 0) < 0 ? -ENOMEM : 0;
	while (off < end && r == 0) {
		off_t data = lseek(f->fd, (off_t)off, SEEK_DATA);
		off_t hole;

		if (data < 0 && errno == ENXIO) {
			/* No data from here to the end of the file. */
			r = nbdv_extents_add(ext, end - off, NBD_STATE_HOLE | NBD_STATE_ZERO);
			break;
		}
		if (data < 0) {
			/* The filesystem cannot tell: everything is data. */
			r = nbdv_extents_add(ext, end - off, 0);
			break;
		}
		if ((uint64_t)data > off) {
			uint64_t n = NBDV_MIN((uint64_t)data, end) - off;
			r = nbdv_extents_add(ext, n, NBD_STATE_HOLE | NBD_STATE_ZERO);
			off += n;
			if (r || off >= end)
				break;
		}
		hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
		if (hole < 0 || (uint64_t)hole <= off)
			hole = (off_t)end;
		{
			uint64_t n = NBDV_MIN((uint64_t)hole, end) - off;
			r = nbdv_extents_add(ext, n, 0);
			off += n;
		}
	}
	return r < 0 ? r : 0;
}

static int file_cache(struct nbdv_drv_instance *inst, uint64_t len, uint64_t off, uint32_t flags)
{
	int r = posix_fadvise(to_file(inst)->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
	return -r;
}

static const struct nbdv_key file_keys[] = {
    {"path", NBDV_KEY_PATH, 1, NULL,
     "file or block device to serve (a missing file is created sparse when size is given)"},
    {"writeback-after", NBDV_KEY_SIZE, 0, "8M",
     "start writing dirty pages to disk after this many bytes of writes of 64 KiB or more, "
     "so that a FLUSH after a bulk copy has little left to do (0: leave it to the kernel)"},
    {NULL, 0, 0, NULL, NULL},
};

const struct nbdv_driver nbdv_driver_file = {
    .api_version = NBDV_DRIVER_API_VERSION,
    .name = "file",
    .description = "regular file (sparse-aware) or block device",
    .keys = file_keys,
    .create = file_create,
    .destroy = file_destroy,
    .caps = file_caps,
    .get_size = file_get_size,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .trim = file_trim,
    .zero = file_zero,
    .block_status = file_block_status,
    .cache = file_cache,
    .probe = file_probe,
    .pread_nowait = file_pread_nowait,
    .pwrite_nowait = file_pwrite_nowait,
    .cached_fd = file_cached_fd,
    .resize = file_resize,
};
