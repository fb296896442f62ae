#!/usr/bin/python3
"""Per-identity caps (issue 16): bandwidth and IOPS token buckets per TLS identity,
enforced by pausing the reading of requests, never by dropping them.  Two identities
with different caps each get their own, measured side by side in one run."""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

import nbdv

nbdv.require("certtool", "psktool")
nbdv.require_libnbd()
import nbd  # noqa: E402

M = 1 << 20


class IdentityLimitsTest(unittest.TestCase):
    def setUp(self):
        if nbdv.WRAPPER:
            self.skipTest("rates under valgrind measure valgrind")
        self.tmp = tempfile.mkdtemp(prefix="nbdvault-idlim-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.psk = os.path.join(self.tmp, "keys.psk")
        for user in ("alice", "bob", "carol"):
            subprocess.run(["psktool", "-u", user, "-p", self.psk], check=True,
                           capture_output=True)
        self.mport = nbdv.free_port()
        self.audit = os.path.join(self.tmp, "audit.log")
        extra = (f"metrics:\n  address: 127.0.0.1\n  port: {self.mport}\n"
                 f"audit-log: {self.audit}\n"
                 f"tls:\n  mode: require\n  psk-file: {self.psk}\n"
                 "limits:\n  identity-iops: 200\n  identities:\n"
                 "    psk:alice: {{bandwidth: 4M}}\n    psk:bob: {{bandwidth: 8M}}\n")
        exports = ("\n  - name: d\n    driver: memory\n    size: 64M\n"
                   "  - name: capped\n    driver: memory\n    size: 64M\n    bandwidth: 2M\n")
        self.srv = nbdv.Server(exports, extra=extra, tcp=True).start()
        self.addCleanup(self.srv.__exit__, None, None, None)

    def handle(self, user):
        return nbdv.psk_connect(self.srv.sock, "d", self.psk, user)

    def test_two_identities_each_get_their_bandwidth(self):
        seconds = 3.0
        rates = {}

        def writer(user, base):
            h = self.handle(user)
            buf = os.urandom(256 * 1024)
            done, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                h.pwrite(buf, base + (done % (16 * M)))
                done += len(buf)
            rates[user] = done / (time.monotonic() - t0)
            self.assertEqual(h.pread(4096, base), buf[:4096])  # nothing was dropped
            nbdv.disconnect(h)

        threads = [threading.Thread(target=writer, args=("alice", 0)),
                   threading.Thread(target=writer, args=("bob", 32 * M))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        print(f"alice {rates['alice'] / M:.2f} MiB/s (cap 4), "
              f"bob {rates['bob'] / M:.2f} MiB/s (cap 8)")
        self.assertAlmostEqual(rates["alice"] / (4 * M), 1.0, delta=0.2)
        self.assertAlmostEqual(rates["bob"] / (8 * M), 1.0, delta=0.2)
        self.assertAlmostEqual(rates["bob"] / rates["alice"], 2.0, delta=0.4)
        # The time held back shows in the metrics: most of alice's 3 s.
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/metrics") as r:
            text = r.read().decode()
        line = next(l for l in text.splitlines()
                    if l.startswith('nbdvault_identity_throttled_seconds_total{identity="psk:alice"}'))
        self.assertGreater(float(line.split()[-1]), 1.0, line)
        # And in the audit log: each connection's close says how long it was held back.
        import json
        deadline = time.monotonic() + 10
        while True:
            with open(self.audit) as f:
                events = [json.loads(line) for line in f]
            closes = [e for e in events if e["event"] == "close" and e["requests"]]
            if len(closes) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertGreaterEqual(len(closes), 2, events)
        self.assertTrue(all(e["throttled_s"] > 1.0 for e in closes), closes)

    def test_bandwidth_cap_paces_large_writes_over_tcp(self):
        # Over TCP a large WRITE's payload wakes the reactor in steps of up to 256 KiB
        # (SO_RCVLOWAT): the cap must still pace 1 MiB writes, none held much longer
        # than its own 0.25 s at 4 MiB/s.
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(f"nbds://alice@127.0.0.1:{self.srv.port}/d?tls-psk-file={self.psk}")
        buf = os.urandom(M)
        done, worst, t0 = 0, 0.0, time.monotonic()
        while time.monotonic() - t0 < 3.0:
            a = time.monotonic()
            h.pwrite(buf, done % (32 * M))
            worst = max(worst, time.monotonic() - a)
            done += M
        rate = done / (time.monotonic() - t0)
        self.assertAlmostEqual(rate / (4 * M), 1.0, delta=0.2)
        self.assertLess(worst, 1.0)
        self.assertEqual(h.pread(4096, 0), buf[:4096])
        nbdv.disconnect(h)

    def test_export_cap_shared_by_its_sessions(self):
        # Two of carol's connections on an export capped at 2 MiB/s share that cap.
        seconds, done = 3.0, []

        def writer(base):
            h = nbdv.psk_connect(self.srv.sock, "capped", self.psk, "carol")
            buf = os.urandom(128 * 1024)
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                h.pwrite(buf, base + (n % (8 * M)))
                n += len(buf)
            done.append(n)
            nbdv.disconnect(h)

        threads = [threading.Thread(target=writer, args=(i * 16 * M,)) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        rate = sum(done) / (time.monotonic() - t0)
        print(f"export capped at 2 MiB/s: {rate / M:.2f} MiB/s over 2 connections")
        self.assertAlmostEqual(rate / (2 * M), 1.0, delta=0.2)

    def test_default_iops_cap(self):
        # carol has no entry of her own: the default 200 requests/s applies.
        h = self.handle("carol")
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 2.0:
            h.pread(4096, 0)
            n += 1
        rate = n / (time.monotonic() - t0)
        nbdv.disconnect(h)
        print(f"carol {rate:.0f} requests/s (cap 200)")
        self.assertAlmostEqual(rate / 200, 1.0, delta=0.2)


if __name__ == "__main__":
    nbdv.main()
