#!/usr/bin/python3
"""The out-of-tree driver ABI (issue 14, acceptance 1): examples/driver/ builds against a
`meson install --destdir` of nbdvault through pkg-config only, loads, passes the
driver-conformance suite in each mode (inline, blocking, async) and serves qemu-img and
qemu-io; bad drivers (no symbol, another ABI version, unknown key, missing required key)
each stop the server with one line naming the file and the export."""

import glob
import os
import shutil
import subprocess
import tempfile
import unittest

import nbdv

BUILDDIR = os.environ.get("NBDVAULT_BUILDDIR", "")
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EXAMPLE = os.path.join(SRC, "examples", "driver")

# A driver with one required key, for the missing-key error.
NEEDS_POOL = r"""
#include <errno.h>
#include <nbdvault/driver.h>
static const struct nbdv_key keys[] = {
    {"pool", NBDV_KEY_STRING, 1, NULL, "pool name"},
    {"replicas", NBDV_KEY_UINT, 0, "3", "copies"},
    {NULL, 0, 0, NULL, NULL},
};
static int create(const struct nbdv_export_params *p, struct nbdv_drv_instance **out)
{ return -EIO; }
static void destroy(struct nbdv_drv_instance *i) {}
static uint32_t caps(struct nbdv_drv_instance *i) { return 0; }
static uint64_t size(struct nbdv_drv_instance *i) { return 0; }
const struct nbdv_driver nbdvault_driver = {
    .api_version = NBDV_DRIVER_API_VERSION, .name = "needspool", .description = "test",
    .keys = keys, .create = create, .destroy = destroy, .caps = caps, .get_size = size,
};
"""
# A driver built for version 1 of the ABI (its first member is the version).
OLD_ABI = r"""
struct old { int api_version; const char *name; };
const struct old nbdvault_driver = {1, "old"};
"""
NO_SYMBOL = "int not_a_driver = 1;\n"


def run(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kw)


class ExampleDriverTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        nbdv.require("meson", "ninja", "pkg-config", "cc")
        if not BUILDDIR:
            raise unittest.SkipTest("NBDVAULT_BUILDDIR is not set (run through meson test)")
        cls.tmp = tempfile.mkdtemp(prefix="nbdvault-driver-")
        dest = os.path.join(cls.tmp, "dest")
        p = run("meson", "install", "-C", BUILDDIR, "--no-rebuild", "--quiet", "--destdir", dest)
        assert p.returncode == 0, p.stdout + p.stderr
        pcs = glob.glob(os.path.join(dest, "**", "nbdvault-driver.pc"), recursive=True)
        assert len(pcs) == 1, pcs
        cls.headers = glob.glob(os.path.join(dest, "**", "nbdvault", "driver.h"), recursive=True)
        # Only pkg-config knows where the installed ABI is; the sysroot maps its
        # /usr/local paths into the destdir.
        cls.env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]),
                       PKG_CONFIG_SYSROOT_DIR=dest)
        cls.out = os.path.join(cls.tmp, "build")
        p = run("meson", "setup", cls.out, EXAMPLE, env=cls.env)
        assert p.returncode == 0, p.stdout + p.stderr
        p = run("ninja", "-C", cls.out, env=cls.env)
        assert p.returncode == 0, p.stdout + p.stderr
        cls.so = os.path.join(cls.out, "ramdisk.so")
        cls.cflags = run("pkg-config", "--cflags", "nbdvault-driver", env=cls.env).stdout

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_built_from_the_installed_header_only(self):
        self.assertEqual(len(self.headers), 1)
        self.assertTrue(os.path.exists(self.so))
        # The compile line the example used points into the install, not the sources.
        cmds = run("ninja", "-C", self.out, "-t", "commands").stdout
        self.assertIn(os.path.dirname(os.path.dirname(self.headers[0])), cmds)
        self.assertNotIn(os.path.realpath(os.path.join(SRC, "include")), cmds)

    def test_conformance_in_each_mode(self):
        exe = os.path.join(BUILDDIR, "tests", "test-driver-conformance")
        for mode in ("inline", "blocking", "async"):
            with self.subTest(mode=mode):
                p = run(exe, "--load", self.so, f"mode={mode}")
                self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                self.assertIn(f"driver ramdisk: conformant ({mode} mode)", p.stdout)

    def test_qemu_img_and_qemu_io(self):
        nbdv.require("qemu-img", "qemu-io", "nbdinfo")
        exports = """
  - name: async
    driver: ramdisk
    size: 32M
    mode: async
  - name: inline
    driver: ramdisk
    size: 32M
"""
        with nbdv.Server(exports, extra=f"driver-dir: {self.out}\n") as srv:
            src = os.path.join(srv.dir, "src.img")
            with open(src, "wb") as f:
                f.write(os.urandom(3 << 20))
                f.seek(20 << 20)
                f.write(os.urandom(1 << 20))
                f.truncate(32 << 20)
            for name in ("async", "inline"):
                with self.subTest(export=name):
                    uri = srv.uri(name)
                    p = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
                    self.assertEqual(p.returncode, 0, p.stderr)
                    p = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
                    self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                    # Never-written space is a hole, written space data.
                    m = run("nbdinfo", "--map", uri).stdout.split("\n")
                    self.assertRegex(m[0], r"^\s+0\s+3145728\s+0\s+data")
                    self.assertRegex(m[1], r"^\s+3145728\s+17825792\s+3\s+hole,zero")
                    p = run("qemu-io", "-f", "raw", "-c", "write -z 0 1M", "-c",
                            "discard 1M 1M", "-c", "write -P 0x5a 2M 64k", "-c",
                            "read -P 0 0 2M", "-c", "read -P 0x5a 2M 64k", uri)
                    self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                    self.assertNotIn("Pattern verification failed", p.stdout)
            log = srv.logtext()
        self.assertIn("export async: opened (ramdisk", log)

    def test_reload_uses_loaded_drivers_and_refuses_new_ones(self):
        exports = "\n  - name: a\n    driver: ramdisk\n    size: 8M\n"
        with nbdv.Server(exports, extra=f"driver-dir: {self.out}\n") as srv:
            def reload(text, expect):
                with open(srv.config, "w") as f:
                    f.write(f"listen:\n  - unix: {srv.sock}\ndriver-dir: {self.out}\n"
                            "exports:" + text)
                nbdv.sighup(srv, expect)
            # Another export of a driver loaded at start: added live.
            reload(exports + "  - name: b\n    driver: ramdisk\n    size: 8M\n    mode: async\n",
                   "SIGHUP: configuration reloaded: 1 export(s) added")
            p = run("nbdinfo", "--size", srv.uri("b"))
            self.assertEqual(p.stdout.strip(), str(8 << 20), p.stderr)
            # A driver that was not loaded at start: a restart, nothing changed.
            so = self.build("needspool2", NEEDS_POOL)
            reload(exports + f"  - name: c\n    driver: {so}\n    pool: p\n",
                   f"driver {so} was not loaded at start: needs a restart")
            self.assertNotEqual(run("nbdinfo", "--size", srv.uri("c")).returncode, 0)
            self.assertEqual(run("nbdinfo", "--size", srv.uri("b")).returncode, 0)

    def bad_start(self, exports, extra=""):
        """Start a server expected to refuse its config: (stderr line, config path)."""
        srv = nbdv.Server(exports, extra=extra)
        p = run(nbdv.NBDVAULT, "--config", srv.config)
        shutil.rmtree(srv.dir, ignore_errors=True)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, "one line: " + p.stderr)
        return p.stderr, srv.config

    def build(self, name, source):
        c = os.path.join(self.tmp, name + ".c")
        so = os.path.join(self.tmp, name + ".so")
        with open(c, "w") as f:
            f.write(source)
        p = run("cc", "-shared", "-fPIC", "-o", so, c, *self.cflags.split(), env=self.env)
        self.assertEqual(p.returncode, 0, p.stderr)
        return so

    def test_missing_symbol(self):
        so = self.build("nosym", NO_SYMBOL)
        err, cfg = self.bad_start(f"\n  - name: d1\n    driver: {so}\n    size: 1M\n")
        self.assertIn(f"{cfg}:5:13: exports[0].driver: driver {so} has no symbol "
                      "nbdvault_driver", err)
        self.assertIn("(export 'd1')", err)

    def test_abi_version_mismatch(self):
        so = self.build("oldabi", OLD_ABI)
        err, cfg = self.bad_start(f"\n  - name: d2\n    driver: {so}\n    size: 1M\n")
        self.assertIn(f"driver {so} has ABI version 1, this nbdvault needs version 2", err)
        self.assertIn("(export 'd2')", err)

    def test_missing_file(self):
        err, cfg = self.bad_start("\n  - name: d3\n    driver: nosuch\n    size: 1M\n",
                                  extra=f"driver-dir: {self.tmp}\n")
        self.assertIn(f"no driver 'nosuch': not built in (file, memory, faulty), and "
                      f"{self.tmp}/nosuch.so: No such file or directory (export 'd3')", err)

    def test_unknown_key(self):
        err, cfg = self.bad_start("\n  - name: d4\n    driver: ramdisk\n    size: 1M\n"
                                  "    pool: rbd\n", extra=f"driver-dir: {self.out}\n")
        self.assertIn(f"{cfg}:8:5: exports[0]: unknown key 'pool'", err)
        self.assertIn("driver ramdisk takes mode)", err)

    def test_missing_required_key_and_types(self):
        so = self.build("needspool", NEEDS_POOL)
        err, cfg = self.bad_start(f"\n  - name: d5\n    driver: {so}\n")
        self.assertIn(f"{cfg}:4:5: exports[0]: missing required key 'pool' for driver "
                      "needspool", err)
        err, cfg = self.bad_start(f"\n  - name: d6\n    driver: {so}\n    pool: p\n"
                                  "    replicas: many\n")
        self.assertIn(f"{cfg}:7:15: exports[0].replicas: expected an integer, found 'many'",
                      err)
        # --driver-help prints the table.
        p = run(nbdv.NBDVAULT, "--driver-help", so)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("pool (string, required): pool name", p.stdout)
        self.assertIn("replicas (integer, optional, default 3): copies", p.stdout)


if __name__ == "__main__":
    nbdv.main()
