#!/usr/bin/python3
"""The audit log (issue 16): JSON lines naming every TLS identity and outcome, with x509,
PSK and refused clients; a flooding client cannot fill it; logrotate's rename + SIGHUP
continues in a new file."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import nbdv

nbdv.require("certtool", "psktool", "nbdinfo")
nbdv.require_libnbd()
import nbd  # noqa: E402

EXPORTS = """
  - name: open
    driver: memory
    size: 16M
  - name: vmonly
    driver: memory
    size: 16M
    allow: ["psk:alice"]
"""


class AuditTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nbdvault-audit-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = nbdv.make_pki(os.path.join(self.tmp, "pki"))
        self.rogue = nbdv.make_pki(os.path.join(self.tmp, "rogue"))
        self.audit = os.path.join(self.tmp, "audit", "audit.log")
        os.mkdir(os.path.dirname(self.audit))
        extra = (f"audit-log: {self.audit}\n"
                 f"tls:\n  mode: require\n  certificates: {self.pki}\n"
                 f"  verify-clients: true\n  psk-file: {self.pki}/keys.psk\n")
        self.srv = nbdv.Server(EXPORTS, extra=extra, tcp=True).start()
        self.addCleanup(self.srv.__exit__, None, None, None)

    def events(self, path=None):
        with open(path or self.audit) as f:
            return [json.loads(line) for line in f]  # every line parses, or the test fails

    def wait_events(self, pred, path=None):
        deadline = time.monotonic() + 10 * nbdv.SLOW
        while True:
            ev = self.events(path)
            if pred(ev):
                return ev
            self.assertLess(time.monotonic(), deadline, json.dumps(ev, indent=1))
            time.sleep(0.05)

    def x509(self, export, certs):
        return subprocess.run(["nbdinfo", "--size", f"nbds://127.0.0.1:{self.srv.port}/{export}"
                               f"?tls-certificates={certs}"], capture_output=True, text=True,
                              timeout=60)

    def test_identities_and_outcomes(self):
        client = os.path.join(self.pki, "clients", "client")
        self.assertEqual(self.x509("open", client).returncode, 0)
        # PSK: writes and reads on the export only alice may open.
        h = nbd.NBD()
        h.set_export_name("vmonly")
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(f"{self.pki}/keys.psk")
        h.set_tls_username("alice")
        h.connect_tcp("127.0.0.1", str(self.srv.port))
        h.pwrite(b"a" * 8192, 0)
        self.assertEqual(h.pread(4096, 0), b"a" * 4096)
        nbdv.disconnect(h)
        # Refused by the allow list (x509 client on alice's export), and a certificate
        # from another CA (the handshake fails).
        self.assertNotEqual(self.x509("vmonly", client).returncode, 0)
        rogue = os.path.join(self.tmp, "rogue-client")  # our CA, another CA's client
        os.mkdir(rogue)
        shutil.copy(os.path.join(self.pki, "ca-cert.pem"), rogue)
        for f in ("client-cert.pem", "client-key.pem"):
            shutil.copy(os.path.join(self.rogue, "clients", "client", f), rogue)
        self.assertNotEqual(self.x509("open", rogue).returncode, 0)
        ev = self.wait_events(lambda ev: sum(e["event"] == "close" for e in ev) >= 4)
        for e in ev:
            self.assertIn("time", e)
            self.assertTrue(e["conn"].startswith("c"))
        by = {}
        for e in ev:
            by.setdefault(e["event"], []).append(e)
        self.assertGreaterEqual(len(by["accept"]), 4)
        self.assertTrue(all(a["listener"].startswith("127.0.0.1:") for a in by["accept"]
                            if a["peer"].startswith("127.")))
        tls = {t["identity"]: t for t in by["tls"]}
        x = tls["dn:CN=client,O=nbdvault dev"]
        self.assertEqual((x["auth"], x["cn"], x["resumed"]), ("x509", "client", False))
        self.assertTrue(x["version"].startswith("TLS1.") and x["cipher"])
        self.assertEqual(tls["psk:alice"]["auth"], "psk")
        opened = {(o["export"], o["identity"]) for o in by["export-open"]}
        self.assertIn(("open", "dn:CN=client,O=nbdvault dev"), opened)
        self.assertIn(("vmonly", "psk:alice"), opened)
        refused = by["refused"]
        self.assertTrue(any(r["export"] == "vmonly" and "allow list" in r["reason"] and
                            r["identity"] == "dn:CN=client,O=nbdvault dev" for r in refused),
                        refused)
        self.assertTrue(any("certificate" in f["reason"] for f in by["tls-failed"]),
                        by.get("tls-failed"))
        alice = next(t["conn"] for t in by["tls"] if t["identity"] == "psk:alice")
        close = next(c for c in by["close"] if c["conn"] == alice)
        self.assertEqual((close["bytes_written"], close["bytes_read"]), (8192, 4096))
        self.assertGreaterEqual(close["requests"], 3)  # write, read, disconnect
        self.assertGreater(close["duration_s"], 0)
        self.assertEqual(close["throttled_s"], 0.0)  # no caps configured here

    def test_flooder_cannot_fill_the_log(self):
        r = nbdv.Raw(port=self.srv.port)
        r.greet()
        for _ in range(200):  # each one refused with TLS_REQD
            self.assertEqual(r.opt(nbdv.OPT_LIST)[-1][0], nbdv.REP_ERR_TLS_REQD)
        cid = None
        ev = self.wait_events(lambda ev: any(e["event"] == "refused" for e in ev))
        cid = next(e["conn"] for e in ev if e["event"] == "refused")
        r.close()
        ev = self.wait_events(lambda ev: any(e["event"] == "close" and e["conn"] == cid
                                             for e in ev))
        mine = [e for e in ev if e["conn"] == cid and e["event"] == "refused"]
        self.assertEqual(len(mine), 17)  # 16 refusals, then one line saying so
        self.assertIn("not logged", mine[-1]["reason"])
        self.assertEqual(mine[0]["identity"], "none (no TLS)")

    def test_logrotate_rename_and_sighup(self):
        client = os.path.join(self.pki, "clients", "client")
        self.assertEqual(self.x509("open", client).returncode, 0)
        self.wait_events(lambda ev: any(e["event"] == "close" for e in ev))
        os.rename(self.audit, self.audit + ".1")
        nbdv.sighup(self.srv, until=lambda: os.path.exists(self.audit))
        before = len(self.events(self.audit + ".1"))
        self.assertEqual(self.x509("open", client).returncode, 0)
        ev = self.wait_events(lambda ev: any(e["event"] == "close" for e in ev))
        self.assertTrue(any(e["event"] == "tls" for e in ev))
        self.assertEqual(len(self.events(self.audit + ".1")), before)


if __name__ == "__main__":
    nbdv.main()
