/*
 * nbdvault - least privilege: the user switch and the sandbox.
 *
 * Once the listeners are bound and the credentials read, the server needs little: its
 * export files, its certificate directory (for SIGHUP), its config file, and a fixed
 * set of system calls.  sandbox_drop_user() switches to `user:`/`group:`;
 * sandbox_enter() then applies two independent layers:
 *
 *   Landlock  the filesystem shrinks to the directories of the exports, the
 *             certificates and PSK file, the config file and `sandbox-paths:` (read-only
 *             where that is all they need); nothing may be executed.  Rules are bound
 *             to directories, not files, so that a certificate replaced by rename or an
 *             export created on first use stays reachable.
 *   seccomp   every system call outside the list below traps; the handler writes one
 *             line naming it and the process dies of SIGSYS.
 *
 * Both are entered on the main thread before any other thread exists (Landlock applies
 * to the calling thread and its future children only).  Where the kernel lacks either,
 * the server says so once and goes on.  Sanitizer builds keep Landlock but not seccomp:
 * the sanitizers' runtimes make system calls of their own (reports, leak checks).
 */
#include "build-config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/landlock.h>
#include <pwd.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef HAVE_SECCOMP
#include <seccomp.h>
#endif

#include "compiler.h"
#include "config.h"
#include "log.h"
#include "sandbox.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(undefined_behavior_sanitizer)
#define SANITIZED 1
#endif
#endif

/* --- user switch --- */

/* A decimal id; -1 when @s is not one. */
static int parse_id(const char *s, unsigned *out)
{
	char *end;
	unsigned long n;

	errno = 0;
	n = strtoul(s, &end, 10);
	if (errno || *end || end == s || n >= UINT_MAX)
		return -1;
	*out = (unsigned)n;
	return 0;
}

/* A user name or number, and its primary group. */
static int lookup_uid(const char *name, uid_t *uid, gid_t *gid)
{
	struct passwd *pw = getpwnam(name);
	unsigned n;

	if (!pw) {
		if (parse_id(name, &n) < 0)
			return -1;
		pw = getpwuid((uid_t)n);
		*uid = (uid_t)n;
		*gid = pw ? pw->pw_gid : (gid_t)n;
		return 0;
	}
	*uid = pw->pw_uid;
	*gid = pw->pw_gid;
	return 0;
}

/* A group name or number. */
static int lookup_gid(const char *name, gid_t *gid)
{
	struct group *gr = getgrnam(name);
	unsigned n;

	if (gr) {
		*gid = gr->gr_gid;
		return 0;
	}
	if (parse_id(name, &n) < 0)
		return -1;
	*gid = (gid_t)n;
	return 0;
}

int sandbox_resolve_user(const struct nbdv_config *cfg, struct nbdv_ids *ids)
{
	ids->wanted = cfg->user != NULL;
	if (!cfg->user)
		return 0;
	ids->name = cfg->user;
	if (lookup_uid(cfg->user, &ids->uid, &ids->gid) < 0) {
		log_err("user: no user '%s'", cfg->user);
		return -1;
	}
	if (cfg->group && lookup_gid(cfg->group, &ids->gid) < 0) {
		log_err("group: no group '%s'", cfg->group);
		return -1;
	}
	if (geteuid() != 0 && (geteuid() != ids->uid || getegid() != ids->gid)) {
		log_err("user: cannot switch to '%s': not running as root", cfg->user);
		return -1;
	}
	return 0;
}

int sandbox_drop_user(const struct nbdv_ids *ids)
{
	uid_t uid = ids->uid, ru, eu, su;
	gid_t gid = ids->gid, rg, eg, sg;

	if (!ids->wanted || geteuid() != 0)
		return 0; /* nothing asked, or already that user (checked when resolved) */
	/* Supplementary groups first (needs root), then the group, then the user. */
	if (setgroups(1, &gid) < 0 || setresgid(gid, gid, gid) < 0 ||
	    setresuid(uid, uid, uid) < 0) {
		log_err("user: cannot switch to %s: %s", ids->name, strerror(errno));
		return -1;
	}
	/* Verify, as a careful daemon does: every id changed and root cannot come back. */
	if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 || ru != uid ||
	    eu != uid || su != uid || rg != gid || eg != gid || sg != gid ||
	    (uid != 0 && setuid(0) == 0)) {
		log_err("user: the switch to %s did not hold", ids->name);
		return -1;
	}
	log_info("running as user %s (uid %u), group %u", ids->name, (unsigned)uid, (unsigned)gid);
	return 0;
}

/* --- Landlock --- */

#ifndef LANDLOCK_ACCESS_FS_REFER
#define LANDLOCK_ACCESS_FS_REFER (1ULL << 13)
#endif
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif
#ifndef LANDLOCK_CREATE_RULESET_VERSION
#define LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#endif

#define FS_READ	 (LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR)
#define FS_WRITE (LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_MAKE_REG)

struct ruleset {
	int fd;		   /* the ruleset being built */
	uint64_t handled;  /* rights it restricts */
	const char *error; /* first rule that could not be added, for the log */
};

static int ll_create(const struct landlock_ruleset_attr *attr, size_t size, uint32_t flags)
{
	return (int)syscall(__NR_landlock_create_ruleset, attr, size, flags);
}

/* Allow @access beneath @path: a directory (or, for a device or other non-directory, the
 * node itself, with the rights a file can carry). */
static void allow(struct ruleset *rs, const char *path, uint64_t access)
{
	struct landlock_path_beneath_attr pb = {0};
	struct stat st;
	int fd = open(path, O_PATH | O_CLOEXEC);

	if (fd < 0) {
		log_debug("sandbox: %s: %s (not allowed)", path, strerror(errno));
		return;
	}
	if (fstat(fd, &st) == 0 && !S_ISDIR(st.st_mode))
		access &= LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_WRITE_FILE |
			  LANDLOCK_ACCESS_FS_TRUNCATE;
	pb.allowed_access = access & rs->handled;
	pb.parent_fd = fd;
	if (pb.allowed_access &&
	    syscall(__NR_landlock_add_rule, rs->fd, LANDLOCK_RULE_PATH_BENEATH, &pb, 0) < 0 &&
	    !rs->error)
		rs->error = path;
	close(fd);
}

char *sandbox_dir_of(const char *path, char *dir, size_t len)
{
	char *slash;

	snprintf(dir, len, "%s", path);
	slash = strrchr(dir, '/');
	if (!slash)
		snprintf(dir, len, ".");
	else if (slash == dir)
		dir[1] = '\0';
	else
		*slash = '\0';
	return dir;
}

/* The directory holding @path. */
static void allow_dir_of(struct ruleset *rs, const char *path, uint64_t access)
{
	char dir[PATH_MAX];

	allow(rs, sandbox_dir_of(path, dir, sizeof(dir)), access);
}

/* An export's path: the directory holding a file (it may be created, or replaced), a
 * device node itself. */
static void allow_export(struct ruleset *rs, const char *path, uint64_t access)
{
	struct stat st;

	if (stat(path, &st) == 0 && (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode)))
		allow(rs, path, access);
	else
		allow_dir_of(rs, path, access);
}

static int enter_landlock(const struct nbdv_config *cfg)
{
	struct landlock_ruleset_attr attr = {0};
	struct ruleset rs = {.fd = -1};
	int abi = ll_create(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
	uint64_t rw = FS_READ | FS_WRITE | LANDLOCK_ACCESS_FS_TRUNCATE;

	if (abi < 1) {
		log_warn("sandbox: this kernel has no Landlock (%s): the filesystem is not "
			 "restricted",
			 strerror(errno));
		return 0;
	}
	/* Every right this ABI knows, so that nothing unlisted stays open. */
	rs.handled = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;
	if (abi >= 2)
		rs.handled |= LANDLOCK_ACCESS_FS_REFER;
	if (abi >= 3)
		rs.handled |= LANDLOCK_ACCESS_FS_TRUNCATE;
	attr.handled_access_fs = rs.handled;
	rs.fd = ll_create(&attr, sizeof(attr), 0);
	if (rs.fd < 0) {
		log_err("sandbox: Landlock: %s", strerror(errno));
		return -1;
	}
	for (size_t i = 0; i < cfg->n_exports; i++) {
		const struct nbdv_export_cfg *e = &cfg->exports[i];
		const char *path;

		for (size_t j = 0; (path = config_export_path(e, NBDV_KEY_PATH, j)); j++)
			allow_export(&rs, path, e->readonly ? FS_READ : rw);
		for (size_t j = 0; (path = config_export_path(e, NBDV_KEY_FILE, j)); j++)
			allow_dir_of(&rs, path, FS_READ);
	}
	if (cfg->tls.certificates)
		allow(&rs, cfg->tls.certificates, FS_READ);
	if (cfg->tls.psk_file)
		allow_dir_of(&rs, cfg->tls.psk_file, FS_READ);
	allow_dir_of(&rs, cfg->file, FS_READ);
	for (size_t i = 0; i < cfg->n_listen; i++)
		if (cfg->listen[i].unix_path) /* removed at exit */
			allow_dir_of(&rs, cfg->listen[i].unix_path, LANDLOCK_ACCESS_FS_REMOVE_FILE);
	for (size_t i = 0; i < cfg->n_sandbox_paths; i++)
		allow(&rs, cfg->sandbox_paths[i], rw);
	if (cfg->pidfile)
		allow_dir_of(&rs, cfg->pidfile, LANDLOCK_ACCESS_FS_REMOVE_FILE);
	if (cfg->audit_log && cfg->audit_log[0] == '/') /* reopened (created) on SIGHUP */
		allow_dir_of(&rs, cfg->audit_log,
			     LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_MAKE_REG);
#ifdef SANITIZED
	/* Reports read the memory map and run the symbolizer. */
	allow(&rs, "/proc", FS_READ);
	allow(&rs, "/usr", FS_READ | LANDLOCK_ACCESS_FS_EXECUTE);
#endif
	if (rs.error) {
		log_err("sandbox: Landlock refused a rule for %s: %s", rs.error, strerror(errno));
		close(rs.fd);
		return -1;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    syscall(__NR_landlock_restrict_self, rs.fd, 0) < 0) {
		log_err("sandbox: cannot enter Landlock: %s", strerror(errno));
		close(rs.fd);
		return -1;
	}
	close(rs.fd);
	log_info("sandbox: filesystem limited to the exports, certificates and config "
		 "(Landlock ABI %d)",
		 abi);
	return 0;
}

/* --- seccomp --- */

#if defined(HAVE_SECCOMP) && !defined(SANITIZED)

/* What the server does once serving: sockets it was given, files Landlock lets it
 * open, memory, threads, time, signals.  No exec, no new sockets, no ptrace, no
 * mount, no module or key syscalls, no changing ids. */
static const char *const allowed_calls[] = {
    /* files and sockets already open, and the export files */
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "close",
    "access",
    "faccessat",
    "faccessat2",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
    "openat",
    "open",
    "fcntl",
    "dup",
    "dup3",
    "pipe2",
    "ioctl",
    "fdatasync",
    "fsync",
    "fallocate",
    "sync_file_range",
    "ftruncate",
    "sendfile",
    "fstatfs",
    "mincore",
    "fadvise64",
    "readahead",
    "unlink",
    "unlinkat",
    "getdents64",
    "accept",
    "accept4",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    /* event loops */
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "eventfd2",
    "signalfd4",
    /* memory and threads */
    "mmap",
    "munmap",
    "mprotect",
    "madvise",
    "mremap",
    "brk",
    "futex",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "clone",
    "membarrier",
    "sched_getaffinity",
    "sched_yield",
    "getrlimit",
    "prlimit64",
    /* time, randomness, identity */
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "clock_getres",
    "getrusage", /* the stall gate: did a slow inline write wait? */
    "gettimeofday",
    "time",
    "getrandom",
    "getpid",
    "gettid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "uname",
    "sysinfo",
    /* signals and exit */
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "tgkill",
    "tkill",
    "restart_syscall",
    "exit",
    "exit_group",
};

/* Added when an export's driver says NBDV_NEEDS_NETWORK (a storage cluster's client
 * library, librados: it reconnects to storage daemons and runs its own event loops). */
static const char *const network_calls[] = {
    "socket",
    "connect",
    "epoll_create",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    "getcpu",
    "sched_setaffinity",
    "setpriority",
    "getpriority",
    "ioprio_set",
    "ioprio_get",
    "pipe",
    "getppid",
    "sched_getparam",
    "sched_getscheduler",
    "set_tid_address",
    "fstatfs",
    "statfs",
    "readlink",
    "readlinkat",
    "mkdirat",
    "times",
    "bind",
};

static void sigsys_handler(int sig, siginfo_t *si, void *ctx)
{
	char line[128];
	/* (snprintf of an int is async-signal-safe in glibc; nothing here allocates.) */
	int n = snprintf(line, sizeof(line),
			 "nbdvault: error: sandbox: system call %d is not allowed: stopping "
			 "(see ausyscall %d)\n",
			 si->si_syscall, si->si_syscall);

	(void)ctx;
	if (n > 0)
		(void)!write(STDERR_FILENO, line, (size_t)n);
	signal(sig, SIG_DFL);
	raise(sig);
}

/* Valgrind runs the program's system calls itself, from its own code: a filter meant
 * for the server would judge valgrind's calls. */
static bool under_valgrind(void)
{
	const char *p = getenv("LD_PRELOAD");

	return p && strstr(p, "vgpreload");
}

static int enter_seccomp(bool network)
{
	scmp_filter_ctx ctx;
	struct sigaction sa = {0};
	int r;

	if (under_valgrind()) {
		log_info("sandbox: no seccomp filter under valgrind");
		return 0;
	}
	ctx = seccomp_init(SCMP_ACT_TRAP);
	r = ctx ? 0 : -ENOMEM;

	for (size_t i = 0; r == 0 && i < ARRAY_SIZE(allowed_calls); i++) {
		int nr = seccomp_syscall_resolve_name(allowed_calls[i]);
		if (nr != __NR_SCMP_ERROR)
			r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
	for (size_t i = 0; network && r == 0 && i < ARRAY_SIZE(network_calls); i++) {
		int nr = seccomp_syscall_resolve_name(network_calls[i]);
		if (nr != __NR_SCMP_ERROR)
			r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
#ifdef __NR_cachestat
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, __NR_cachestat, 0);
#elif defined(__x86_64__)
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, 451 /* cachestat */, 0);
#endif
	/* prctl only to name a thread (libmicrohttpd names its own). */
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(prctl), 1,
				     SCMP_A0(SCMP_CMP_EQ, PR_SET_NAME));
	/* glibc tries clone3 first and falls back to clone on ENOSYS. */
	if (r == 0 && seccomp_syscall_resolve_name("clone3") != __NR_SCMP_ERROR)
		r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS),
				     seccomp_syscall_resolve_name("clone3"), 0);
	/* Every thread, including any a library started. */
	if (r == 0)
		r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
	sa.sa_sigaction = sigsys_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (r == 0 && sigaction(SIGSYS, &sa, NULL) < 0)
		r = -errno;
	if (r == 0)
		r = seccomp_load(ctx);
	seccomp_release(ctx);
	if (r == -ENOSYS || r == -EINVAL) {
		log_warn("sandbox: this kernel has no seccomp filters (%s): system calls are "
			 "not restricted",
			 strerror(-r));
		return 0;
	}
	if (r < 0) {
		log_err("sandbox: cannot install the seccomp filter: %s", strerror(-r));
		return -1;
	}
	log_info("sandbox: %zu system calls allowed (seccomp)%s",
		 ARRAY_SIZE(allowed_calls) + 1 + (network ? ARRAY_SIZE(network_calls) : 0),
		 network ? ", with network clients for storage" : "");
	return 0;
}

#else

static int enter_seccomp(bool network)
{
	(void)network;
#ifdef SANITIZED
	log_info("sandbox: no seccomp filter in a sanitizer build");
#else
	log_warn("sandbox: built without libseccomp: system calls are not restricted");
#endif
	return 0;
}

#endif

int sandbox_enter(const struct nbdv_config *cfg)
{
	if (!cfg->sandbox) {
		log_info("sandbox: off (sandbox: false)");
		return 0;
	}
	if (enter_landlock(cfg) < 0 || enter_seccomp(config_needs_network(cfg)) < 0)
		return -1;
	return 0;
}

#ifdef NBDV_TEST_HOOKS
/* Tests only: try what the sandbox must refuse, as a compromised server would. */
void sandbox_test_escape(void)
{
	const char *what = getenv("NBDVAULT_TEST_ESCAPE");
	int fd;

	if (!what)
		return;
	if (strcmp(what, "open") == 0) {
		fd = open("/etc/passwd", O_RDONLY | O_CLOEXEC);
		log_info("test escape: open /etc/passwd: %s", fd < 0 ? strerror(errno) : "opened");
		if (fd >= 0)
			close(fd);
	} else if (strcmp(what, "exec") == 0) {
		char *const argv[] = {(char *)"/bin/true", NULL};
		execve("/bin/true", argv, NULL);
		log_info("test escape: execve /bin/true: %s", strerror(errno));
	}
}
#endif
