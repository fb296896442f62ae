#!/usr/bin/python3
"""Live reconfiguration (issue 16): SIGHUP re-reads the YAML file, validates it whole,
and applies exports added and removed and policy changed, closing sessions whose
identity is no longer allowed; what needs a restart is refused, never half applied."""

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

import nbdv

nbdv.require("certtool", "psktool")
nbdv.require_libnbd()
import nbd  # noqa: E402


def export(name, extra=""):
    return f"  - name: {name}\n    driver: memory\n    size: 16M\n" + extra


class ReloadTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nbdvault-reload-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.psk = os.path.join(self.tmp, "keys.psk")
        for user in ("alice", "bob"):
            subprocess.run(["psktool", "-u", user, "-p", self.psk], check=True,
                           capture_output=True)
        self.head = f"tls:\n  mode: optional\n  psk-file: {self.psk}\n"
        self.srv = nbdv.Server("\n" + export("a"), extra=self.head).start()
        self.addCleanup(self.srv.__exit__, None, None, None)

    def rewrite(self, exports, head=None):
        with open(self.srv.config, "w") as f:
            f.write(f"listen:\n  - unix: {self.srv.sock}\n" + (head or self.head) +
                    "exports:\n" + exports)

    def reload(self, expect):
        nbdv.sighup(self.srv, expect)

    def connect(self, name, user=None):
        if user:
            return nbdv.psk_connect(self.srv.sock, name, self.psk, user)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{name}?socket={self.srv.sock}")
        return h

    def test_add_then_remove_with_a_session_open(self):
        self.rewrite(export("a") + export("b"))
        self.reload("configuration reloaded: 1 export(s) added")
        h = self.connect("b")
        h.pwrite(b"b" * 4096, 0)
        self.rewrite(export("a"))
        self.reload("configuration reloaded: 0 export(s) added, 1 removed")
        # The open session finishes its work; a new open is refused.
        self.assertEqual(h.pread(4096, 0), b"b" * 4096)
        with self.assertRaises(nbd.Error):
            self.connect("b")
        nbdv.disconnect(h)
        # a kept its driver instance: data written before the reloads is still there.
        x = self.connect("a")
        x.pwrite(b"k" * 512, 0)
        self.rewrite(export("a", "    description: changed\n"))
        self.reload("configuration reloaded: 0 export(s) added, 0 removed, 1 kept")
        self.assertEqual(x.pread(512, 0), b"k" * 512)
        nbdv.disconnect(x)

    def test_on_remove_close(self):
        self.rewrite(export("a") + export("c", "    on-remove: close\n"))
        self.reload("configuration reloaded: 1 export(s) added")
        h = self.connect("c")
        self.rewrite(export("a"))
        self.reload("was removed by a reload (on-remove: close), closing")
        with self.assertRaises(nbd.Error):
            for _ in range(50):
                h.pread(512, 0)
                time.sleep(0.02)

    def test_revoked_identity_is_closed(self):
        self.rewrite(export("a") + export("s", '    allow: ["psk:alice", "psk:bob"]\n'))
        self.reload("configuration reloaded: 1 export(s) added")
        alice, bob = self.connect("s", "alice"), self.connect("s", "bob")
        alice.pwrite(b"a" * 512, 0)
        self.rewrite(export("a") + export("s", '    allow: ["psk:bob"]\n'))
        self.reload("psk:alice is no longer allowed on export s after a reload, closing")
        with self.assertRaises(nbd.Error):
            for _ in range(50):
                alice.pread(512, 0)
                time.sleep(0.02)
        with self.assertRaises(nbd.Error):
            self.connect("s", "alice")
        self.assertEqual(bob.pread(512, 0), b"a" * 512)  # bob untouched
        nbdv.disconnect(bob)

    def test_revocation_bites_on_a_running_qemu_io(self):
        # qemu-io reads, sleeps while the operator removes alice from the allow list and
        # reloads, then reads again: that read fails, and a new connection is refused.
        nbdv.require("qemu-io")
        self.rewrite(export("a") + export("s", '    allow: ["psk:alice"]\n'))
        self.reload("configuration reloaded: 1 export(s) added")
        qdir = os.path.join(self.tmp, "qemu-psk")
        os.mkdir(qdir)
        shutil.copy(self.psk, os.path.join(qdir, "keys.psk"))
        obj = f"tls-creds-psk,id=t0,dir={qdir},username=alice,endpoint=client"
        opts = f"driver=nbd,path={self.srv.sock},export=s,tls-creds=t0"
        # stdbuf: qemu-io's stdout is a pipe, which stdio would buffer until exit.
        q = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "--object", obj, "--image-opts",
                              opts, "-c", "read 0 512", "-c", f"sleep {int(3000 * nbdv.SLOW)}",
                              "-c", "read 0 512"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        self.addCleanup(q.kill)
        # Revoke once the first read has been answered (not merely once the session is
        # up: under valgrind the first read may come later than the reload).
        first = b""
        deadline = time.monotonic() + 20 * nbdv.SLOW
        while b"read 512/512 bytes" not in first:
            self.assertLess(time.monotonic(), deadline, first)
            if select.select([q.stdout], [], [], 0.1)[0]:
                chunk = os.read(q.stdout.fileno(), 4096)
                self.assertTrue(chunk, f"qemu-io ended early: {first!r}")
                first += chunk
        self.rewrite(export("a") + export("s", '    allow: ["psk:bob"]\n'))
        self.reload("psk:alice is no longer allowed on export s after a reload, closing")
        rest, _ = q.communicate(timeout=60 * nbdv.SLOW)
        out = (first + rest).decode(errors="replace")
        self.assertEqual(out.count("read 512/512 bytes"), 1, out)  # the second read failed
        with self.assertRaises(nbd.Error):
            self.connect("s", "alice")

    def test_invalid_file_and_restart_only_changes_change_nothing(self):
        h = self.connect("a")
        with open(self.srv.config, "a") as f:
            f.write("  - name: [broken\n")
        self.reload("SIGHUP: configuration not reloaded")
        refusal = next(line for line in reversed(self.srv.logtext().splitlines())
                       if "configuration not reloaded" in line)
        self.assertIn("nbdvault.yaml:", refusal)  # names the file (and line, column)
        self.rewrite(export("a") + export("z"), head=self.head + "workers: 1\n")
        self.reload("workers changed, which needs a restart")
        with self.assertRaises(nbd.Error):
            self.connect("z")  # not half applied
        self.rewrite(export("a").replace("16M", "32M"))
        self.reload("export a's driver, its keys, size or mode changed, which needs a restart")
        self.assertEqual(len(h.pread(512, 0)), 512)
        nbdv.disconnect(h)

    def test_changed_limits_apply_to_new_connections(self):
        old = self.connect("a")
        self.assertEqual(old.get_block_size(nbd.SIZE_MAXIMUM), 32 << 20)
        self.rewrite(export("a"), head=self.head + "limits:\n  max-request: 1M\n"
                     "  max-connections-per-identity: 1\n")
        self.reload("SIGHUP: configuration reloaded")
        new = self.connect("a")
        self.assertEqual(new.get_block_size(nbd.SIZE_MAXIMUM), 1 << 20)
        # The connection from before keeps the limits it was accepted under.
        self.assertEqual(len(old.pread(2 << 20, 0)), 2 << 20)
        # A new identity cap: a second session of alice is refused.
        s1 = self.connect("a", "alice")
        with self.assertRaises(nbd.Error):
            self.connect("a", "alice")
        for h in (old, new, s1):
            nbdv.disconnect(h)

    def test_listeners_added_and_removed(self):
        srv = nbdv.Server("\n" + export("a"), extra="sandbox: false\n").start()
        self.addCleanup(srv.__exit__, None, None, None)
        sock2 = os.path.join(srv.dir, "sock2")
        port = nbdv.free_port()

        def write(listen):
            with open(srv.config, "w") as f:
                f.write("sandbox: false\nlisten:\n" + listen + "exports:\n" + export("a"))

        def reload(expect):
            nbdv.sighup(srv, expect)

        def reads(uri):
            h = nbd.NBD()
            h.connect_uri(uri)
            n = len(h.pread(512, 0))
            nbdv.disconnect(h)
            return n

        old = nbd.NBD()
        old.connect_uri(srv.uri("a"))
        write(f"  - unix: {srv.sock}\n  - unix: {sock2}\n"
              f"  - address: 127.0.0.1\n    port: {port}\n")
        reload("SIGHUP: configuration reloaded")
        self.assertEqual(reads(f"nbd+unix:///a?socket={sock2}"), 512)
        self.assertEqual(reads(f"nbd://127.0.0.1:{port}/a"), 512)
        # Removed: the first socket stops listening (its file goes); sessions stay.
        write(f"  - unix: {sock2}\n  - address: 127.0.0.1\n    port: {port}\n")
        reload(f"SIGHUP: stopped listening on unix socket {srv.sock}")
        self.assertFalse(os.path.exists(srv.sock))
        with self.assertRaises(nbd.Error):
            reads(srv.uri("a"))
        self.assertEqual(len(old.pread(512, 0)), 512)
        nbdv.disconnect(old)
        # An entry that cannot be bound refuses the whole reload (nothing changed).
        taken = nbdv.free_port()
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        self.addCleanup(blocker.close)
        write(f"  - unix: {sock2}\n  - address: 127.0.0.1\n    port: {taken}\n")
        reload("listen (a new entry could not be bound: see above), which needs a restart")
        self.assertEqual(reads(f"nbd://127.0.0.1:{port}/a"), 512)
        # Back to the original socket, so that the server stops as usual.
        write(f"  - unix: {srv.sock}\n")
        reload(f"SIGHUP: stopped listening on unix socket {sock2}")
        self.assertEqual(reads(srv.uri("a")), 512)
        self.assertFalse(os.path.exists(sock2))

    def test_new_listener_with_the_sandbox_on_needs_a_restart(self):
        sock2 = os.path.join(self.srv.dir, "sock2")
        with open(self.srv.config, "w") as f:
            f.write(f"listen:\n  - unix: {self.srv.sock}\n  - unix: {sock2}\n" + self.head +
                    "exports:\n" + export("a") + export("z"))
        self.reload("listen (a new listener needs socket() and bind(), which the sandbox "
                    "forbids once serving; removing listeners works live), which needs a "
                    "restart")
        self.assertFalse(os.path.exists(sock2))
        with self.assertRaises(nbd.Error):
            self.connect("z")  # not half applied

    def test_reload_command_through_the_pidfile(self):
        pidfile = os.path.join(self.tmp, "nbdvault.pid")
        srv = nbdv.Server("\n" + export("a"), args=["--pidfile", pidfile]).start()
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), srv.proc.pid)
        with open(srv.config, "a") as f:
            f.write(export("p"))
        p = subprocess.run([nbdv.NBDVAULT, "--reload", "--pidfile", pidfile],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        deadline = time.monotonic() + 10 * nbdv.SLOW
        while "configuration reloaded: 1 export(s) added" not in srv.logtext():
            self.assertLess(time.monotonic(), deadline, srv.logtext())
            time.sleep(0.02)
        h = nbd.NBD()
        h.connect_uri(srv.uri("p"))
        nbdv.disconnect(h)
        srv.__exit__(None, None, None)
        self.assertFalse(os.path.exists(pidfile))  # removed at exit, sandbox and all
        p = subprocess.run([nbdv.NBDVAULT, "--reload", "--pidfile", pidfile],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 1)
        self.assertIn("No such file", p.stderr)

    def test_100_reloads_under_4_clients(self):
        errors, stop = [], threading.Event()

        def client(i):
            try:
                h = self.connect("a")
                while not stop.is_set():
                    data = os.urandom(4096)
                    h.pwrite(data, i * 4096)
                    if h.pread(4096, i * 4096) != data:
                        errors.append("mismatch")
                nbdv.disconnect(h)
            except nbd.Error as e:
                errors.append(str(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for k in range(100):
            extra = export(f"x{k % 3}") if k % 2 else ""
            self.rewrite(export("a") + extra)
            self.srv.proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertTrue(self.srv.alive())


if __name__ == "__main__":
    nbdv.main()
