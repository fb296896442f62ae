#!/usr/bin/python3
"""Prometheus metrics (issue 16): /metrics scraped during a run passes
`promtool check metrics`, and its counters match what the test did: bytes, requests by
command, errors, TLS handshakes, identities and their refusals."""

import os
import re
import shutil
import subprocess
import tempfile
import unittest
import urllib.error
import urllib.request

import nbdv

nbdv.require("certtool", "psktool")
nbdv.require_libnbd()
import nbd  # noqa: E402

EXPORTS = """
  - name: mem
    driver: memory
    size: 16M
  - name: alice-only
    driver: memory
    size: 16M
    allow: ["psk:alice"]
  - name: disk
    driver: file
    path: "{dir}/disk.img"
    size: 16M
"""


def parse(text):
    """{(name, frozenset(labels)): value} from the text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"unparsable line {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


class MetricsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nbdvault-metrics-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = nbdv.make_pki(os.path.join(self.tmp, "pki"))
        self.mport = nbdv.free_port()
        extra = (nbdv.metrics_config(self.mport) +
                 f"tls:\n  mode: optional\n  certificates: {self.pki}\n"
                 f"  verify-clients: true\n  psk-file: {self.pki}/keys.psk\n")
        self.srv = nbdv.Server(EXPORTS, extra=extra, tcp=True).start()
        self.addCleanup(self.srv.__exit__, None, None, None)
        # The metrics socket is bound a little after the NBD listeners the start-up
        # check waits for (a gap valgrind makes long enough to hit): nbdv.scrape waits.
        nbdv.scrape(self.mport)

    def get(self, path):
        """@path on the metrics endpoint, which is up (setUp waited for it)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.mport}{path}", timeout=10) as r:
            return r.read().decode()

    def test_counters_match_the_run_and_promtool_accepts_them(self):
        h = nbd.NBD()
        h.connect_uri(self.srv.uri("mem"))
        h.pwrite(os.urandom(8192), 0)
        h.pread(4096, 0)
        h.pread(4096, 4096)
        h.flush()
        nbdv.disconnect(h)
        r = nbdv.Raw(self.srv.sock)
        r.greet()
        r.go(b"mem")
        r.request(nbdv.CMD_READ, 64 << 20, 512, cookie=1)  # beyond the end: EINVAL
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 1))
        r.close()
        # An x509 client, then the same identity refused by an allow list.
        t = nbd.NBD()
        t.set_export_name("mem")
        t.set_tls(nbd.TLS_REQUIRE)
        t.set_tls_certificates(os.path.join(self.pki, "clients", "client"))
        t.connect_tcp("127.0.0.1", str(self.srv.port))
        self.assertEqual(len(t.pread(512, 0)), 512)
        nbdv.disconnect(t)
        u = nbd.NBD()
        u.set_export_name("alice-only")
        u.set_tls(nbd.TLS_REQUIRE)
        u.set_tls_certificates(os.path.join(self.pki, "clients", "client"))
        with self.assertRaises(nbd.Error):
            u.connect_tcp("127.0.0.1", str(self.srv.port))
        d = nbd.NBD()
        d.connect_uri(self.srv.uri("disk"))
        d.pwrite(b"d" * 4096, 0)  # runs on the reactor: the gate is open
        nbdv.disconnect(d)
        text = nbdv.scrape(self.mport)
        if shutil.which("promtool"):
            p = subprocess.run(["promtool", "check", "metrics"], input=text,
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        m = parse(text)

        def v(name, **labels):
            return m[(name, frozenset(labels.items()))]
        self.assertEqual(v("nbdvault_export_requests_total", export="mem", command="write"), 1)
        self.assertEqual(v("nbdvault_export_requests_total", export="mem", command="read"), 4)
        self.assertEqual(v("nbdvault_export_requests_total", export="mem", command="flush"), 1)
        self.assertEqual(v("nbdvault_export_written_bytes_total", export="mem"), 8192)
        self.assertEqual(v("nbdvault_export_read_bytes_total", export="mem"), 8192 + 512)
        self.assertEqual(v("nbdvault_export_errors_total", export="mem", errno="EINVAL"), 1)
        self.assertEqual(v("nbdvault_export_errors_total", export="mem", errno="EIO"), 0)
        self.assertEqual(v("nbdvault_export_request_duration_seconds_count", export="mem"), 6)
        self.assertEqual(v("nbdvault_export_request_duration_seconds_bucket", export="mem",
                           le="+Inf"), 6)
        self.assertGreater(v("nbdvault_export_request_duration_seconds_sum", export="mem"), 0)
        self.assertGreaterEqual(v("nbdvault_tls_handshakes_total", outcome="ok"), 2)
        ident = "dn:CN=client,O=nbdvault dev"
        self.assertGreaterEqual(v("nbdvault_identity_connections_total", identity=ident), 2)
        self.assertEqual(v("nbdvault_identity_refusals_total", identity=ident), 1)
        self.assertEqual(v("nbdvault_identity_bytes_total", identity=ident), 512)
        self.assertGreaterEqual(v("nbdvault_connections_accepted_total"), 4)
        self.assertEqual(v("nbdvault_export_sessions", export="mem"), 0)
        # The stall gate of the file export, none for the memory export (never
        # blocking: no gate).  Its one write normally ran on the reactor, quickly: the
        # gate is open.  When it was slow (always under valgrind), it was a stall and
        # closed the gate for 10 ms, which may be over by now.
        stalls = v("nbdvault_export_inline_write_stalls_total", export="disk")
        self.assertIn(stalls, (0, 1))
        self.assertIn(v("nbdvault_export_inline_writes", export="disk"), (1,) if stalls == 0 else (0, 1))
        self.assertEqual(v("nbdvault_export_inline_write_resumes_total", export="disk"), 0)
        self.assertEqual(v("nbdvault_export_written_bytes_total", export="disk"), 4096)
        self.assertNotIn(("nbdvault_export_inline_writes", frozenset({("export", "mem")})), m)

    def test_other_paths_and_methods(self):
        with self.assertRaises(urllib.error.HTTPError) as cm:
            self.get("/")
        self.assertEqual(cm.exception.code, 404)
        req = urllib.request.Request(f"http://127.0.0.1:{self.mport}/metrics", data=b"x",
                                     method="POST")
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(req, timeout=10)
        self.assertEqual(cm.exception.code, 405)
        self.assertIn("nbdvault_connections_open", self.get("/metrics"))


if __name__ == "__main__":
    nbdv.main()
