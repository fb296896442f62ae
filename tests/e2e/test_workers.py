#!/usr/bin/python3
"""Several reactors (`workers:`): connections spread over them, many connections with
many requests in flight each, a flush on one worker covering writes made through
another (multi-conn), an orderly drain of every worker on SIGTERM (issue 4,
acceptance 3), and `busy-poll` keeping a worker awake for a client's next request."""

import os
import re
import signal
import threading
import time
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

EXPORTS = """
  - name: mem
    driver: memory
    size: 64M
  - name: disk
    driver: file
    path: {dir}/disk.img
    size: 64M
"""

BLOCK = 65536


def workers_of(log):
    """Live connection id -> worker index, from the server's log lines (the start-up
    probe of nbdv.Server is a connection too; closed ones are left out)."""
    opened = {int(c): int(w) for c, w in
              re.findall(r"c(\d+): connection from .* \(worker (\d+)\)", log)}
    for c in re.findall(r"c(\d+): closed", log):
        opened.pop(int(c), None)
    return opened


def connect(srv, export):
    h = nbd.NBD()
    h.connect_uri(srv.uri(export))
    return h


class WorkersTest(unittest.TestCase):
    def test_connections_spread_over_workers(self):
        with nbdv.Server(EXPORTS, extra="workers: 3\n") as srv:
            handles = [connect(srv, "mem") for _ in range(12)]
            got = workers_of(srv.logtext())
            self.assertEqual(len(got), 12, srv.logtext())
            # The least loaded worker takes each new connection: 4 each (give or take
            # the start-up probe, which may still have been open).
            for w in range(3):
                self.assertIn(sum(1 for x in got.values() if x == w), (3, 4, 5), got)
            self.assertIn("3 worker(s)", srv.logtext())
            for h in handles:
                nbdv.disconnect(h)

    def started_under(self, prefix):
        """Worker count of a server started with @prefix before its command."""
        saved = nbdv.WRAPPER
        nbdv.WRAPPER = prefix + saved
        try:
            with nbdv.Server(EXPORTS) as srv:
                h = connect(srv, "mem")
                nbdv.disconnect(h)
                return int(re.search(r"(\d+) worker\(s\)", srv.logtext()).group(1))
        finally:
            nbdv.WRAPPER = saved

    def test_default_workers_follow_cpu_affinity(self):
        if len(os.sched_getaffinity(0)) < 2:
            self.skipTest("needs two CPUs")
        self.assertEqual(self.started_under([]), min(len(os.sched_getaffinity(0)), 64))
        self.assertEqual(self.started_under(["taskset", "-c", "0"]), 1)

    def test_default_workers_follow_cgroup_cpu_quota(self):
        # A container limited to one CPU's worth of time gets one worker, however many
        # CPUs it can see.  Needs a writable cgroup v1 cpu controller (root).
        base = "/sys/fs/cgroup/cpu"
        if len(os.sched_getaffinity(0)) < 2 or not os.access(base, os.W_OK) or \
                not os.path.exists(f"{base}/cpu.cfs_quota_us"):
            self.skipTest("no writable cgroup v1 cpu controller, or one CPU")
        group = f"{base}/nbdvault-test-{os.getpid()}"
        os.mkdir(group)
        self.addCleanup(os.rmdir, group)
        with open(f"{group}/cpu.cfs_period_us", "w") as f:
            f.write("100000")
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            f.write("100000")
        self.assertEqual(self.started_under(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]), 1)

    def test_one_worker_without_busy_poll(self):
        with nbdv.Server(EXPORTS, extra="workers: 1\nbusy-poll: 0\n") as srv:
            handles = [connect(srv, "mem") for _ in range(4)]
            self.assertEqual(set(workers_of(srv.logtext()).values()), {0})
            for k, h in enumerate(handles):
                h.pwrite(bytes([k + 1]) * 4096, k * 4096)
            for k, h in enumerate(handles):
                self.assertEqual(h.pread(4096, ((k + 1) % 4) * 4096), bytes([(k + 1) % 4 + 1]) * 4096)
            for h in handles:
                nbdv.disconnect(h)

    def sleeps_between_requests(self, busy_poll, n=40, think=0.002):
        """How many times the server's threads slept while a client sent @n 4 KiB
        READs at depth 1, each @think seconds after the previous reply (voluntary
        context switches of every thread: with one worker and a memory export, only
        the worker has anything to do)."""
        with nbdv.Server(EXPORTS, extra=f"workers: 1\nbusy-poll: {busy_poll}\n") as srv:
            r = nbdv.Raw(srv.sock)
            self.addCleanup(r.close)
            r.greet()
            r.go(b"mem")

            def sleeps():
                total = 0
                for tid in os.listdir(f"/proc/{srv.proc.pid}/task"):
                    with open(f"/proc/{srv.proc.pid}/task/{tid}/status") as f:
                        total += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)",
                                               f.read(), re.M).group(1))
                return total

            r.request(nbdv.CMD_READ, 0, 4096, cookie=0)
            self.assertEqual(r.simple_reply(4096)[0], 0)
            time.sleep(0.05)  # the worker has gone to sleep: count from here
            before = sleeps()
            for i in range(n):
                time.sleep(think)
                r.request(nbdv.CMD_READ, i * 4096, 4096, cookie=i + 1)
                err, cookie, _ = r.simple_reply(4096)
                self.assertEqual((err, cookie), (0, i + 1))
            return sleeps() - before

    def test_busy_poll_keeps_the_worker_awake_for_the_next_request(self):
        # busy-poll 10ms and a client that sends its next request 2 ms after each reply:
        # the worker is still polling when it comes (a few sleeps are allowed for a
        # client that a busy machine leaves waiting longer).  That the window starts
        # once the reply is out, however long the send takes, is unit/test-busy-poll.c.
        if nbdv.WRAPPER:
            self.skipTest("under valgrind the client's 2 ms are not the server's")
        self.assertLessEqual(self.sleeps_between_requests("10ms"), 10)

    def test_without_busy_poll_the_worker_sleeps_between_requests(self):
        # The same client with busy-poll 0: the worker sleeps after each reply (the
        # control for the test above: the count it reads does see the sleeps).
        if nbdv.WRAPPER:
            self.skipTest("under valgrind the client's 2 ms are not the server's")
        self.assertGreaterEqual(self.sleeps_between_requests(0), 30)

    def test_many_connections_many_in_flight(self):
        """16 connections on 2 workers, each with 64 writes and then 64 reads in
        flight; every connection reads back another connection's blocks."""
        n_conns, depth = 16, 64
        for export in ("mem", "disk"):
            with self.subTest(export=export), \
                    nbdv.Server(EXPORTS, extra="workers: 2\n") as srv:
                blobs = [[os.urandom(BLOCK) for _ in range(depth)] for _ in range(n_conns)]
                handles = [connect(srv, export) for _ in range(n_conns)]
                errors = []
                barrier = threading.Barrier(n_conns)

                def region(k, i):
                    return (k * depth + i) * BLOCK % (64 << 20)

                def client(k):
                    try:
                        h = handles[k]
                        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)),
                                                region(k, i))
                                   for i, b in enumerate(blobs[k])]
                        if h.aio_in_flight() < 1:
                            errors.append(f"conn {k}: nothing in flight")
                        while h.aio_in_flight():
                            h.poll(-1)
                        for c in cookies:
                            h.aio_command_completed(c)
                        h.flush()
                        barrier.wait(timeout=60)
                        # Read the blocks written through the next connection.
                        j = (k + 1) % n_conns
                        bufs = [nbd.Buffer(BLOCK) for _ in range(depth)]
                        cookies = [h.aio_pread(bufs[i], region(j, i)) for i in range(depth)]
                        while h.aio_in_flight():
                            h.poll(-1)
                        for i, c in enumerate(cookies):
                            h.aio_command_completed(c)
                            if bytes(bufs[i].to_bytearray()) != blobs[j][i]:
                                errors.append(f"conn {k}: block {i} of conn {j} differs")
                    except Exception as e:  # reported below, with the thread's name
                        errors.append(f"conn {k}: {e!r}")

                threads = [threading.Thread(target=client, args=(k,)) for k in range(n_conns)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                self.assertFalse(any(t.is_alive() for t in threads), "a client hung")
                self.assertEqual(errors, [])
                self.assertEqual(set(workers_of(srv.logtext()).values()), {0, 1})
                for h in handles:
                    nbdv.disconnect(h)

    def test_flush_on_one_worker_covers_writes_on_another(self):
        """NBD_FLAG_CAN_MULTI_CONN: a write acknowledged on connection A (worker 0),
        then a flush on connection B (worker 1): the data is visible to a third
        connection and survives kill -9 of the server."""
        with nbdv.Server(EXPORTS, extra="workers: 2\n") as srv:
            a = connect(srv, "disk")
            b = connect(srv, "disk")
            self.assertEqual(sorted(workers_of(srv.logtext()).values()), [0, 1],
                             srv.logtext())
            self.assertTrue(a.can_multi_conn() and b.can_multi_conn())
            pattern = os.urandom(1 << 20)
            a.pwrite(pattern, 5 << 20)
            b.flush()
            c = connect(srv, "disk")
            self.assertEqual(c.pread(1 << 20, 5 << 20), pattern)
            srv.kill9()
            for h in (a, b, c):
                nbdv.disconnect(h)
            with open(os.path.join(srv.dir, "disk.img"), "rb") as f:
                f.seek(5 << 20)
                self.assertEqual(f.read(1 << 20), pattern)
            srv.start()

    def test_sigterm_drains_every_worker(self):
        with nbdv.Server(EXPORTS, extra="workers: 2\n") as srv:
            raws = []
            for _ in range(4):
                r = nbdv.Raw(srv.sock)
                r.greet()
                r.go(b"disk")
                raws.append(r)
            self.assertEqual(set(workers_of(srv.logtext()).values()), {0, 1})
            n = 200
            for r in raws:
                for i in range(n):
                    r.request(nbdv.CMD_WRITE, i * 4096, 4096, cookie=i, data=b"D" * 4096)
            srv.proc.send_signal(signal.SIGTERM)
            for k, r in enumerate(raws):
                seen = set()
                for _ in range(n):
                    err, cookie, _ = r.simple_reply()
                    # Unread requests may be refused with ESHUTDOWN, never dropped.
                    self.assertIn(err, (0, 108), f"conn {k} cookie {cookie}")
                    seen.add(cookie)
                self.assertEqual(seen, set(range(n)))
                self.assertTrue(r.closed_by_server())
                r.close()
            self.assertEqual(srv.stop(), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
