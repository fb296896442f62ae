#!/usr/bin/python3
"""Command line and configuration errors as a user meets them (issue 2, acceptance 6):
each invalid fixture makes the binary exit non-zero naming FILE:LINE:COLUMN."""

import glob
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import nbdv

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples",
                       "nbdvault.yaml")


def run(*args):
    return subprocess.run([nbdv.NBDVAULT, *args], capture_output=True, text=True, timeout=30)


class CliTest(unittest.TestCase):
    def test_each_invalid_config_names_file_line_column(self):
        files = sorted(glob.glob(os.path.join(DATA, "invalid", "*.yaml")))
        self.assertGreaterEqual(len(files), 20)
        for path in files:
            with self.subTest(fixture=os.path.basename(path)):
                with open(path) as f:
                    m = re.match(r"# expect: (\d+):(\d+) (.*)", f.readline())
                self.assertIsNotNone(m, "fixture lacks its expect line")
                for mode in (["--check-config"], []):
                    p = run("--config", path, *mode)
                    self.assertEqual(p.returncode, 1, p.stderr)
                    self.assertIn(f"{path}:{m.group(1)}:{m.group(2)}: ", p.stderr)
                    self.assertIn(m.group(3), p.stderr)
                    self.assertEqual(p.stderr.count("\n"), 1, "one line, no noise")

    def test_check_config_lists_exports(self):
        tmp = tempfile.mkdtemp(prefix="nbdvault-cli-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = nbdv.make_pki(os.path.join(tmp, "pki"))
        with open(os.path.join(DATA, "valid", "full.yaml")) as f:
            text = f.read().replace("/etc/nbdvault/pki", pki).replace(
                "/etc/nbdvault/keys.psk", pki + "/keys.psk")
        cfg = os.path.join(tmp, "full.yaml")
        with open(cfg, "w") as f:
            f.write(text)
        p = run("--check-config", "--config", cfg)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("export disk0: driver=file path=/var/tmp/disk0.img size=10737418240 "
                      "(default) description=\"Scratch disk\"", p.stdout)
        self.assertIn("export scratch: driver=memory size=524288 readonly", p.stdout)
        self.assertIn("listen unix:/tmp/nbdvault-valid.sock", p.stdout)
        # The credential files are checked too, without starting anything.
        os.unlink(os.path.join(pki, "server-key.pem"))
        p = run("--check-config", "--config", cfg)
        self.assertEqual(p.returncode, 1)
        self.assertIn(os.path.join(pki, "server-key.pem") + ": cannot read", p.stderr)

    def test_example_config_is_valid(self):
        # The README's run command serves this file with certs/out made by
        # certs/make-dev-certs; check it against such a PKI made here.
        tmp = tempfile.mkdtemp(prefix="nbdvault-cli-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = nbdv.make_pki(os.path.join(tmp, "pki"))
        with open(EXAMPLE) as f:
            text = f.read()
        self.assertIn("mode: require", text)
        self.assertIn("verify-clients: true", text)
        cfg = os.path.join(tmp, "example.yaml")
        with open(cfg, "w") as f:
            f.write(text.replace("certs/out", pki))
        p = run("--check-config", "-c", cfg)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("driver=file", p.stdout)

    def test_missing_config_file(self):
        p = run("--config", "/nonexistent/x.yaml")
        self.assertEqual(p.returncode, 1)
        self.assertIn("/nonexistent/x.yaml:1:1: cannot open", p.stderr)

    def test_version_help_and_bad_args(self):
        p = run("--version")
        self.assertEqual(p.returncode, 0)
        self.assertRegex(p.stdout, r"^nbdvault \d+\.\d+\.\d+")
        p = run("--help")
        self.assertEqual(p.returncode, 0)
        for opt in ("--config", "--check-config", "--verbose", "--version"):
            self.assertIn(opt, p.stdout)
        p = run("--bogus")
        self.assertEqual(p.returncode, 2)
        p = run("extra-argument")
        self.assertEqual(p.returncode, 2)

    def test_listen_failure_is_fatal(self):
        with nbdv.Server(tcp=True) as srv:
            cfg = os.path.join(srv.dir, "clash.yaml")
            with open(cfg, "w") as f:
                f.write(f"listen:\n  - address: 127.0.0.1\n    port: {srv.port}\n"
                        "exports: []\n")
            p = run("-c", cfg)
            self.assertEqual(p.returncode, 1)
            self.assertIn("Address already in use", p.stderr)


if __name__ == "__main__":
    nbdv.main()
