#!/usr/bin/python3
"""Running under systemd (issue 16): socket activation through systemd-socket-activate,
the readiness protocol read from a notify socket of our own, syslog priorities for
journald, and what `meson install` lays out, checked by systemd-analyze."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


class SystemdTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nbdvault-sd-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def config(self, extra=""):
        path = os.path.join(self.tmp, "nbdvault.yaml")
        with open(path, "w") as f:
            f.write(extra + "exports:\n  - name: mem\n    driver: memory\n    size: 16M\n")
        return path

    def test_socket_activation_and_notify(self):
        nbdv.require("systemd-socket-activate")
        notify_path = os.path.join(self.tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(30 * nbdv.SLOW)
        self.addCleanup(notify.close)
        sock = os.path.join(self.tmp, "sock")
        log = open(os.path.join(self.tmp, "log"), "ab")
        # No listen: in the config: the passed socket is all there is.
        cmd = (["systemd-socket-activate", "-l", sock, "-E", f"NOTIFY_SOCKET={notify_path}"] +
               nbdv.WRAPPER + [nbdv.NBDVAULT, "--config", self.config()])
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        log.close()
        self.addCleanup(lambda: p.poll() is None and p.kill())

        def logtext():
            with open(os.path.join(self.tmp, "log")) as f:
                return f.read()

        def wait_for(state):
            seen = []
            while True:
                try:
                    msg = notify.recv(4096).decode()
                except socket.timeout:
                    raise AssertionError(f"no {state} (saw {seen}):\n{logtext()}")
                seen.append(msg)
                if state in msg.split("\n"):
                    return msg

        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        # The first connection starts the server on the passed socket.
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///mem?socket={sock}")
        h.pwrite(b"s" * 4096, 0)
        self.assertEqual(h.pread(4096, 0), b"s" * 4096)
        ready = wait_for("READY=1")
        self.assertIn("STATUS=serving 1 export(s) on 1 listener(s)", ready)
        self.assertIn(f"MAINPID={p.pid}", ready)
        self.assertIn("passed by systemd", logtext())
        p.send_signal(signal.SIGHUP)
        self.assertIn("MONOTONIC_USEC=", wait_for("RELOADING=1"))
        wait_for("READY=1")
        nbdv.disconnect(h)
        p.send_signal(signal.SIGTERM)
        wait_for("STOPPING=1")
        self.assertEqual(p.wait(30 * nbdv.SLOW), 0, logtext())
        self.assertTrue(os.path.exists(sock))  # systemd's socket: not ours to remove

    def test_passed_socket_named_with_config_adds_the_config_listeners(self):
        nbdv.require("systemd-socket-activate")
        sock, own = os.path.join(self.tmp, "sock"), os.path.join(self.tmp, "own")
        log = open(os.path.join(self.tmp, "log"), "ab")
        cmd = (["systemd-socket-activate", "-l", sock, "--fdname=with-config"] +
               nbdv.WRAPPER + [nbdv.NBDVAULT, "--config",
                               self.config(f"listen:\n  - unix: {own}\n")])
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        log.close()
        self.addCleanup(lambda: p.poll() is None and p.kill())
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        # The first connection (on the passed socket) starts the server, which then also
        # listens on the config's entry.
        for path in (sock, own):
            deadline = time.monotonic() + 20 * nbdv.SLOW
            while True:
                try:
                    h = nbd.NBD()
                    h.connect_uri(f"nbd+unix:///mem?socket={path}")
                    break
                except nbd.Error:
                    self.assertLess(time.monotonic(), deadline, path)
                    time.sleep(0.05)
            self.assertEqual(len(h.pread(4096, 0)), 4096)
            nbdv.disconnect(h)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(30 * nbdv.SLOW), 0)
        self.assertFalse(os.path.exists(own))  # ours: removed at exit

    def test_journal_gets_syslog_priorities(self):
        srv = nbdv.Server()
        self.addCleanup(shutil.rmtree, srv.dir, True)
        open(srv.log, "ab").close()
        st = os.stat(srv.log)
        srv.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        with srv:
            nbdv.check_serves(self, srv)
            deadline = time.monotonic() + 5 * nbdv.SLOW
            while "<6>info: " not in srv.logtext():
                self.assertLess(time.monotonic(), deadline, srv.logtext())
                time.sleep(0.05)
            own = [l for l in srv.logtext().splitlines() if "info:" in l or "error:" in l]
            self.assertTrue(all(l.startswith("<") for l in own), own)
        # Not journald's stream: plain lines.
        with nbdv.Server(env={"JOURNAL_STREAM": "1:2"}) as plain:
            nbdv.check_serves(self, plain)
            self.assertIn("nbdvault: info: ", plain.logtext())
            self.assertNotIn("<6>", plain.logtext())

    def test_install_layout_and_units(self):
        builddir = os.environ.get("NBDVAULT_BUILDDIR")
        if not builddir:
            self.skipTest("NBDVAULT_BUILDDIR not set (run through meson test)")
        nbdv.require("meson", "systemd-analyze")
        dest = os.path.join(self.tmp, "dest")
        p = subprocess.run(["meson", "install", "-C", builddir, "--destdir", dest,
                            "--no-rebuild", "--quiet"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        files = {os.path.relpath(os.path.join(d, f), dest)
                 for d, _, fs in os.walk(dest) for f in fs}
        names = {os.path.basename(f) for f in files}
        for want in ("nbdvault", "nbdvault.8", "nbdvault.service", "nbdvault.socket",
                     "nbdvault.yaml.example", "driver.h", "nbdvault-driver.pc"):
            self.assertIn(want, names, sorted(files))
        self.assertTrue(any(f.endswith("sysusers.d/nbdvault.conf") for f in files))
        self.assertTrue(any(f.endswith("tmpfiles.d/nbdvault.conf") for f in files))
        unit = next(os.path.join(dest, f) for f in files if f.endswith("nbdvault.service"))
        text = open(unit).read()
        for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                    "User=nbdvault", "Type=notify"):
            self.assertIn(key, text)
        # systemd-analyze checks the executable exists: point it at the built one.
        exe = next(os.path.join(dest, f) for f in files if f.endswith("sbin/nbdvault"))
        vdir = os.path.join(self.tmp, "verify")
        os.mkdir(vdir)
        with open(os.path.join(vdir, "nbdvault.service"), "w") as f:
            f.write(text.replace(exe[len(dest):], exe))
        shutil.copy(unit.replace(".service", ".socket"), vdir)
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", "nbdvault.socket",
                            "nbdvault.service"], cwd=vdir, capture_output=True, text=True)
        # verify exits 0 on unknown keys too, with a warning: require silence.
        self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""))


if __name__ == "__main__":
    nbdv.main()
