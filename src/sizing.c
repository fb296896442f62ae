/*
 * nbdvault - sizing: how many reactors to run (CPU affinity and cgroup CPU quota).
 */
#include "build-config.h"

#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "sizing.h"

/* The first line of @path into @buf; false if it cannot be read. */
static bool read_first_line(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");
	bool ok;

	if (!f)
		return false;
	ok = fgets(buf, (int)len, f) != NULL;
	fclose(f);
	return ok;
}

/* Whether the comma-separated controller list @list (it ends at ':') names "cpu". */
static bool has_cpu_controller(const char *list)
{
	while (*list && *list != ':') {
		size_t n = strcspn(list, ",:");

		if (n == 3 && strncmp(list, "cpu", 3) == 0)
			return true;
		list += n;
		if (*list == ',')
			list++;
	}
	return false;
}

/*
 * CPUs the cgroup's quota allows, rounded up (0: no quota): cgroup v2 cpu.max
 * ("QUOTA PERIOD"; "max PERIOD" is no quota), else v1 cpu.cfs_quota_us (-1: none)
 * over cpu.cfs_period_us.
 */
static long cgroup_cpu_limit(void)
{
	char line[512], path[640], val[128];
	long long quota = 0, period = 0;
	FILE *f = fopen("/proc/self/cgroup", "r");

	if (!f)
		return 0;
	while (quota <= 0 && fgets(line, sizeof(line), f)) {
		char *controllers = strchr(line, ':'), *rel = strrchr(line, ':');

		if (!controllers || rel == controllers)
			continue;
		rel[strcspn(rel, "\n")] = '\0';
		quota = period = 0;
		if (strncmp(line, "0::", 3) == 0) {
			snprintf(path, sizeof(path), "/sys/fs/cgroup%s/cpu.max", rel + 1);
			if (!read_first_line(path, val, sizeof(val)) ||
			    sscanf(val, "%lld %lld", &quota, &period) != 2)
				quota = 0;
		} else if (has_cpu_controller(controllers + 1)) {
			snprintf(path, sizeof(path), "/sys/fs/cgroup/cpu%s/cpu.cfs_quota_us",
				 rel + 1);
			if (!read_first_line(path, val, sizeof(val)) ||
			    sscanf(val, "%lld", &quota) != 1)
				quota = 0;
			snprintf(path, sizeof(path), "/sys/fs/cgroup/cpu%s/cpu.cfs_period_us",
				 rel + 1);
			if (quota > 0 && (!read_first_line(path, val, sizeof(val)) ||
					  sscanf(val, "%lld", &period) != 1))
				quota = 0;
		}
	}
	fclose(f);
	return quota > 0 && period > 0 ? (long)((quota + period - 1) / period) : 0;
}

/* One worker per CPU this process may run on: its affinity mask (taskset, cpusets)
 * and its cgroup's CPU quota (containers), not just the CPUs online. */
unsigned sizing_default_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN), quota = cgroup_cpu_limit();
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		n = CPU_COUNT(&set);
	if (quota > 0 && quota < n)
		n = quota;
	return n < 1 ? 1 : n > NBDV_MAX_WORKERS ? NBDV_MAX_WORKERS : (unsigned)n;
}
