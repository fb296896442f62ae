#!/usr/bin/python3
"""qemu-img, qemu-io, nbdinfo and nbdcopy against nbdvault (issue 2, acceptance 2)."""

import hashlib
import os
import random
import subprocess
import unittest

import nbdv

nbdv.require("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")

EXPORTS = """
  - name: disk0
    description: Scratch disk for tests
    driver: file
    path: {dir}/disk0.img
    size: 256M
  - name: fresh
    driver: file
    path: {dir}/fresh.img
    size: 64M
  - name: mem
    description: memory test export
    driver: memory
    size: 64M
"""


def run(*args, **kw):
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def nbdinfo_map(uri):
    """[(offset, length, type-string)] from nbdinfo --map."""
    out = []
    for line in run("nbdinfo", "--map", uri).splitlines():
        f = line.split()
        out.append((int(f[0]), int(f[1]), " ".join(f[3:])))
    return out


class ClientsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = nbdv.Server(EXPORTS).start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.__exit__(None, None, None)

    def make_source(self, path, size_mib=256):
        """A raw image with random data in some MiB-sized blocks and holes elsewhere."""
        rnd = random.Random(2)
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
            for mib in range(size_mib):
                if rnd.random() < 0.4:
                    f.seek(mib << 20)
                    f.write(os.urandom(1 << 20))
        return path

    def test_qemu_img_convert_compare(self):
        src = self.make_source(os.path.join(self.srv.dir, "src.img"))
        uri = self.srv.uri("disk0")
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
        out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
        self.assertIn("identical", out)
        # Change one byte behind the server's back: compare must notice.
        with open(os.path.join(self.srv.dir, "disk0.img"), "r+b") as f:
            f.seek(123456789)
            b = f.read(1)
            f.seek(123456789)
            f.write(bytes([b[0] ^ 0xFF]))
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri],
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("Content mismatch at offset 1234565", p.stdout)

    def test_qemu_io_round_trips(self):
        uri = self.srv.uri("mem")
        out = run("qemu-io", "-f", "raw",
                  "-c", "write -P 0x5a 1M 256k",
                  "-c", "read -P 0x5a 1M 256k",
                  "-c", "discard 1M 64k",
                  "-c", "read -P 0 1M 64k",
                  "-c", "write -z 1088k 64k",
                  "-c", "read -P 0 1088k 64k",
                  "-c", "read -P 0x5a 1152k 128k",
                  "-c", "write -P 0x11 -f 2M 4k",
                  "-c", "flush",
                  "-c", "read -P 0x11 2M 4k",
                  uri)
        self.assertNotIn("Pattern verification failed", out)
        self.assertEqual(out.count("read "), 5, out)
        # A mismatch makes qemu-io fail, so the run above would have failed too.
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 1M 4k", uri],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Pattern verification failed", p.stdout)

    def test_nbdinfo_list(self):
        out = run("nbdinfo", "--list", self.srv.uri(""))
        for name in ("disk0", "fresh", "mem"):
            self.assertIn(f'export="{name}"', out)
        self.assertIn("description: Scratch disk for tests", out)
        self.assertIn("description: memory test export", out)

    def test_nbdinfo_map_holes(self):
        uri = self.srv.uri("fresh")
        self.assertEqual(nbdinfo_map(uri), [(0, 64 << 20, "hole,zero")])
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 2M", uri)
        m = nbdinfo_map(uri)
        self.assertEqual(m[0], (0, 2 << 20, "data"))
        self.assertEqual(m[1], (2 << 20, 62 << 20, "hole,zero"))
        run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", uri)
        m = nbdinfo_map(uri)
        self.assertEqual(m[:2], [(0, 1 << 20, "data"), (1 << 20, 63 << 20, "hole,zero")])

    def test_nbdcopy_checksum(self):
        src = self.make_source(os.path.join(self.srv.dir, "copy-src.img"), 64)
        uri = self.srv.uri("mem")
        run("nbdcopy", src, uri)
        out = os.path.join(self.srv.dir, "copy-out.img")
        run("nbdcopy", uri, out)
        for conns in ("--connections=1", "--connections=4"):
            run("nbdcopy", conns, uri, out)
            with open(src, "rb") as a, open(out, "rb") as b:
                self.assertEqual(hashlib.sha256(a.read()).hexdigest(),
                                 hashlib.sha256(b.read()).hexdigest())


if __name__ == "__main__":
    nbdv.main()
