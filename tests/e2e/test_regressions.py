#!/usr/bin/python3
"""Regression tests for classes of bugs that hit other NBD servers (nbdkit, qemu-nbd,
nbd-server), each named after the class it guards.  docs/security.md maps each class to
the code that prevents it."""

import os
import shutil
import socket
import struct
import tempfile
import time
import unittest

import nbdv

nbdv.require_libnbd()

TLS_EXPORTS = """
  - name: disk
    driver: file
    path: {dir}/disk.img
    size: 8M
  - name: big
    driver: memory
    size: 16T
"""


class RegressionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nbdvault-reg-")
        cls.pki = nbdv.make_pki(os.path.join(cls.tmp, "pki"), "--client", "c")
        cls.extra = (f"tls:\n  mode: optional\n  certificates: {cls.pki}\n"
                     f"  verify-clients: true\n")
        cls.cert = (f"{cls.pki}/ca-cert.pem", f"{cls.pki}/clients/c/client-cert.pem",
                    f"{cls.pki}/clients/c/client-key.pem")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def server(self, extra="", exports=TLS_EXPORTS):
        return nbdv.Server(exports, extra=extra)

    def raw(self, srv):
        r = nbdv.Raw(srv.sock)
        self.addCleanup(r.close)
        r.greet()
        return r

    # nbdkit and others once acted on options sent before STARTTLS in FORCEDTLS mode.
    def test_options_processed_before_starttls(self):
        extra = f"tls:\n  mode: require\n  certificates: {self.pki}\n"
        with self.server(extra) as srv:
            r = self.raw(srv)
            go = struct.pack(">I", 4) + b"disk" + b"\0\0"
            for opt, data in ((nbdv.OPT_STRUCTURED_REPLY, b""), (nbdv.OPT_GO, go),
                              (nbdv.OPT_LIST, b"")):
                self.assertEqual(r.opt(opt, data)[-1][0], nbdv.REP_ERR_TLS_REQD)
            r.starttls(self.cert[0])
            r.go(b"disk")
            r.request(nbdv.CMD_READ, 0, 512, cookie=1)
            self.assertEqual(r.simple_reply(512)[:2], (0, 1))  # SR above never took

    # CVE-2021-3716 (nbdkit): structured replies negotiated in plaintext survived STARTTLS.
    def test_cve_2021_3716_state_survives_starttls(self):
        with self.server(self.extra) as srv:
            r = self.raw(srv)
            self.assertEqual(r.opt(nbdv.OPT_STRUCTURED_REPLY)[-1][0], nbdv.REP_ACK)
            q = b"base:allocation"
            meta = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(q)) + q
            self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, meta)[-1][0], nbdv.REP_ACK)
            r.starttls(*self.cert)
            # Inside TLS, meta contexts need structured replies again: refused.
            self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, meta)[-1][0],
                             nbdv.REP_ERR_INVALID)
            r.go(b"disk")
            r.request(nbdv.CMD_BLOCK_STATUS, 0, 4096, cookie=2)
            self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 2))
            r.request(nbdv.CMD_READ, 0, 512, cookie=3)
            self.assertEqual(r.simple_reply(512)[:2], (0, 3))

    # CVE-2019-14850 (nbdkit): the backend was opened before the handshake completed.
    def test_cve_2019_14850_backend_opened_before_handshake(self):
        with self.server() as srv:
            img = os.path.join(srv.dir, "disk.img")
            r = self.raw(srv)
            r.opt(nbdv.OPT_LIST)
            info = r.opt(nbdv.OPT_INFO, struct.pack(">I", 4) + b"disk" + b"\0\0")
            self.assertEqual(info[-1][0], nbdv.REP_ACK)
            size = [struct.unpack(">HQH", p[:12])[1] for t, p in info
                    if t == nbdv.REP_INFO and p[:2] == b"\0\0"]
            self.assertEqual(size, [8 << 20])  # INFO answered from the driver's probe
            self.assertFalse(os.path.exists(img), "INFO created the backing file")
            self.assertNotIn("export disk: opened", srv.logtext())
            r.go(b"disk")
            self.assertTrue(os.path.exists(img))
            self.assertIn("export disk: opened", srv.logtext())

    # CVE-2019-14851 (nbdkit): NBD_OPT_INFO followed by NBD_OPT_GO hit an assertion.
    def test_cve_2019_14851_info_followed_by_go(self):
        with self.server() as srv:
            r = self.raw(srv)
            for name in (b"disk", b"big", b"disk"):
                rep = r.opt(nbdv.OPT_INFO, struct.pack(">I", len(name)) + name + b"\0\0")
                self.assertEqual(rep[-1][0], nbdv.REP_ACK)
            r.go(b"big")
            self.assertEqual(r.size, 16 << 40)
            r.request(nbdv.CMD_WRITE, (16 << 40) - 512, 512, cookie=4, data=b"e" * 512)
            self.assertEqual(r.simple_reply()[:2], (0, 4))

    # CVE-2020-10761 (qemu-nbd): a long export name echoed into an error message broke
    # the string limit and tripped an assertion.
    def test_cve_2020_10761_long_name_echoed_in_error(self):
        with self.server() as srv:
            r = self.raw(srv)
            name = b"\xff" * 4096  # not UTF-8, maximal length
            for opt in (nbdv.OPT_INFO, nbdv.OPT_GO):
                rep = r.opt(opt, struct.pack(">I", len(name)) + name + b"\0\0")
                self.assertEqual(rep[-1][0], nbdv.REP_ERR_UNKNOWN)
                self.assertLess(len(rep[-1][1]), 256)
                self.assertNotIn(b"\xff" * 100, rep[-1][1])
            self.assertEqual(r.opt(nbdv.OPT_LIST)[-1][0], nbdv.REP_ACK)
            self.assertLess(max(len(line) for line in srv.logtext().splitlines()), 1024)

    # CVE-2017-15119 (qemu-nbd): a huge option length made the server read (allocate) it.
    def test_cve_2017_15119_huge_option_length(self):
        with self.server() as srv:
            for length in (0xFFFFFFFF, 0x7FFFFFFF, (64 << 10) + 1):
                r = self.raw(srv)
                r.send_opt(nbdv.OPT_INFO, length=length)
                self.assertEqual(r.read_reply()[1], nbdv.REP_ERR_TOO_BIG)
                self.assertTrue(r.closed_by_server())
            nbdv.check_serves(self, srv, "big")

    # CVE-2022-26495/26496 (nbd-server): a name length larger than the option overflowed.
    def test_cve_2022_26496_name_length_larger_than_option(self):
        with self.server() as srv:
            r = self.raw(srv)
            for namelen in (0xFFFFFFFF, 0xFFFFFFFA, 7, 1 << 20):
                for opt in (nbdv.OPT_INFO, nbdv.OPT_GO):
                    rep = r.opt(opt, struct.pack(">I", namelen) + b"dis\0\0")
                    self.assertEqual(rep[-1][0], nbdv.REP_ERR_INVALID)
                for opt in (nbdv.OPT_LIST_META_CONTEXT, nbdv.OPT_SET_META_CONTEXT):
                    rep = r.opt(opt, struct.pack(">I", namelen) + b"disk" + b"\0" * 4)
                    self.assertEqual(rep[-1][0], nbdv.REP_ERR_INVALID)
            r.send_opt(nbdv.OPT_EXPORT_NAME, b"x" * 5000)
            self.assertTrue(r.closed_by_server())

    # CVE-2017-10664 (qemu-nbd): SIGPIPE killed the server when a client closed mid-read.
    def test_cve_2017_10664_sigpipe_on_client_closing_mid_read(self):
        with self.server(self.extra) as srv:
            for tls in (False, True):
                for _ in range(5):
                    r = self.raw(srv)
                    if tls:
                        r.starttls(*self.cert)
                    r.go(b"big")
                    for i in range(16):
                        r.request(nbdv.CMD_READ, 0, 8 << 20, cookie=i)
                    r.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    r.close()
                time.sleep(0.3)
                self.assertTrue(srv.alive())
            nbdv.check_serves(self, srv, "big")

    # CVE-2024-7409 (qemu-nbd): unlimited half-open connections exhausted the server.
    def test_cve_2024_7409_unlimited_half_open_connections(self):
        extra = "limits:\n  max-connections: 20\n  handshake-timeout: 1s\n"
        with self.server(extra) as srv:
            time.sleep(0.2)
            half = [nbdv.Raw(srv.sock) for _ in range(40)]
            for r in half:
                self.assertTrue(r.closed_by_server(timeout=5))
                r.close()
            self.assertIn("max-connections (20) reached", srv.logtext())
            self.assertIn("handshake not finished", srv.logtext())
            nbdv.check_serves(self, srv, "big")

    # CVE-2025-47711/47712 (nbdkit): block status over huge ranges overflowed or asserted.
    def test_cve_2025_47711_block_status_over_huge_ranges(self):
        with self.server() as srv:
            r = self.raw(srv)
            r.go(b"big", structured=True, meta=True)
            size = 16 << 40
            for off, length, flags in ((0, 0xFFFFFFFF, 0), (size - 0xFFFFFFFF, 0xFFFFFFFF, 0),
                                       (size - 512, 512, 0), (0, 0xFFFFFFFF, 8),
                                       (size - 1, 1, 0)):
                r.request(nbdv.CMD_WRITE, off, 1, cookie=9, data=b"x")
                self.assertEqual(r.any_reply()[1], 0)
                r.request(nbdv.CMD_BLOCK_STATUS, off, length, flags=flags, cookie=10)
                kind, rflags, rtype, cookie, payload = r.any_reply()
                self.assertEqual((rtype, cookie, rflags & 1), (5, 10, 1))
                n = (len(payload) - 4) // 8
                self.assertTrue(1 <= n <= (1 if flags else 1024))
                lens = struct.unpack(">" + "II" * n, payload[4:])[0::2]
                self.assertTrue(all(lens) and sum(lens) <= length)
            for off, length in ((size - 512, 1024), (size, 1), (0xFFFFFFFFFFFFFFFF, 2)):
                r.request(nbdv.CMD_BLOCK_STATUS, off, length, cookie=11)
                self.assertEqual(r.error_of(r.any_reply()), nbdv.EINVAL)

    # Over-long NBD_OPT_SET_META_CONTEXT: many or long queries stay bounded.
    def test_overlong_set_meta_context(self):
        with self.server() as srv:
            r = self.raw(srv)
            self.assertEqual(r.opt(nbdv.OPT_STRUCTURED_REPLY)[-1][0], nbdv.REP_ACK)
            q = b"base:allocation"
            many = struct.pack(">I", 3) + b"big" + struct.pack(">I", 3000)
            many += (struct.pack(">I", len(q)) + q) * 3000
            rep = r.opt(nbdv.OPT_SET_META_CONTEXT, many)
            self.assertEqual([t for t, _ in rep], [nbdv.REP_META_CONTEXT, nbdv.REP_ACK])
            long_q = b"base:" + b"a" * 5000
            data = struct.pack(">I", 3) + b"big" + struct.pack(">II", 1, len(long_q)) + long_q
            self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, data)[-1][0], nbdv.REP_ERR_TOO_BIG)
            huge = struct.pack(">I", 3) + b"big" + struct.pack(">I", 1) + b"\0" * 4
            r.send_opt(nbdv.OPT_SET_META_CONTEXT, huge + b"q" * 60000,
                       length=len(huge) + 60000)
            self.assertEqual(r.read_reply()[1], nbdv.REP_ERR_INVALID)
            r.send_opt(nbdv.OPT_SET_META_CONTEXT, length=1 << 20)
            self.assertEqual(r.read_reply()[1], nbdv.REP_ERR_TOO_BIG)
            self.assertTrue(r.closed_by_server())


if __name__ == "__main__":
    nbdv.main()
