#!/usr/bin/python3
"""Least privilege (issue 13): `user:`/`group:` verified from /proc, and a sandbox that
refuses what a compromised server would try (reading /etc/passwd, running a program).
The rest of the e2e suite runs with the sandbox on too: it is on by default."""

import os
import pwd
import grp
import shutil
import signal
import tempfile
import time
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

UNDER_WRAPPER = bool(nbdv.WRAPPER)
SANITIZED = os.environ.get("NBDVAULT_SANITIZE", "none") != "none"


def status_ids(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp"):
                out[k] = v.split()
    return out


def wait_log(srv, needle, timeout=10):
    deadline = time.monotonic() + timeout * nbdv.SLOW
    while needle not in srv.logtext():
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the log:\n{srv.logtext()}")
        time.sleep(0.05)


class SandboxTest(unittest.TestCase):
    def test_escape_open_refused(self):
        with nbdv.Server(env={"NBDVAULT_TEST_ESCAPE": "open"}) as srv:
            wait_log(srv, "test escape: open /etc/passwd:")
            if "has no Landlock" in srv.logtext():
                # valgrind 3.19 does not know the Landlock system calls.
                self.skipTest("no Landlock here: " + ("under valgrind" if UNDER_WRAPPER
                                                       else "the kernel lacks it"))
            self.assertIn("test escape: open /etc/passwd: Permission denied", srv.logtext())
            nbdv.check_serves(self, srv)

    def test_escape_open_allowed_without_sandbox(self):
        # The control: the same hook with the sandbox off reads the file, so the test
        # above can fail.
        with nbdv.Server(extra="sandbox: false\n",
                         env={"NBDVAULT_TEST_ESCAPE": "open"}) as srv:
            wait_log(srv, "test escape: open /etc/passwd:")
            self.assertIn("test escape: open /etc/passwd: opened", srv.logtext())
            self.assertIn("sandbox: off", srv.logtext())

    def test_escape_exec_kills_with_a_log_line(self):
        if UNDER_WRAPPER or SANITIZED:
            self.skipTest("no seccomp filter under valgrind or a sanitizer")
        srv = nbdv.Server(env={"NBDVAULT_TEST_ESCAPE": "exec"})
        self.addCleanup(shutil.rmtree, srv.dir, True)
        logf = open(srv.log, "ab")
        import subprocess
        env = dict(os.environ, NBDVAULT_TEST_ESCAPE="exec")
        p = subprocess.Popen([nbdv.NBDVAULT, "--config", srv.config], stdout=logf, stderr=logf,
                             env=env)
        logf.close()
        rc = p.wait(20)
        self.assertEqual(rc, -signal.SIGSYS, srv.logtext())
        self.assertIn("sandbox: system call 59 is not allowed", srv.logtext())
        self.assertNotIn("test escape: execve", srv.logtext())

    def test_proc_shows_the_filter(self):
        if UNDER_WRAPPER or SANITIZED:
            self.skipTest("no seccomp filter under valgrind or a sanitizer")
        with nbdv.Server() as srv:
            wait_log(srv, "ready")  # the socket listens before the sandbox closes
            ids = status_ids(srv.proc.pid)
            self.assertEqual(ids["NoNewPrivs"], ["1"])
            self.assertEqual(ids["Seccomp"], ["2"])  # filter mode
            self.assertIn("sandbox: filesystem limited", srv.logtext())

    def test_file_export_created_and_served_in_the_sandbox(self):
        exports = """
  - name: disk
    driver: file
    path: {dir}/sub/disk.img
    size: 16M
"""
        tmp = tempfile.mkdtemp(prefix="nbdvault-sbx-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.mkdir(os.path.join(tmp, "sub"))
        with nbdv.Server(exports, tmpdir=tmp) as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri("disk"))
            h.pwrite(b"s" * 4096, 8192)
            self.assertEqual(h.pread(4096, 8192), b"s" * 4096)
            h.flush()
            nbdv.disconnect(h)
            self.assertTrue(os.path.exists(os.path.join(tmp, "sub", "disk.img")))

    def test_user_and_group_drop(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        user = pwd.getpwnam("nobody")
        group = grp.getgrnam("nogroup")
        tmp = tempfile.mkdtemp(prefix="nbdvault-user-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.chown(tmp, user.pw_uid, group.gr_gid)
        exports = """
  - name: disk
    driver: file
    path: {dir}/disk.img
    size: 16M
"""
        extra = "user: nobody\ngroup: nogroup\n"
        with nbdv.Server(exports, extra=extra, tmpdir=tmp) as srv:
            wait_log(srv, "ready")
            if not UNDER_WRAPPER:
                ids = status_ids(srv.proc.pid)
                want = [str(user.pw_uid)] * 4
                self.assertEqual(ids["Uid"], want)
                self.assertEqual(ids["Gid"], [str(group.gr_gid)] * 4)
                self.assertEqual(ids["Groups"], [str(group.gr_gid)])
            wait_log(srv, f"running as user nobody (uid {user.pw_uid})")
            h = nbd.NBD()
            h.connect_uri(srv.uri("disk"))
            h.pwrite(b"u" * 4096, 0)
            self.assertEqual(h.pread(4096, 0), b"u" * 4096)
            nbdv.disconnect(h)
            st = os.stat(os.path.join(tmp, "disk.img"))
            self.assertEqual(st.st_uid, user.pw_uid)  # created after the switch

    def test_unknown_user_stops_the_server(self):
        srv = nbdv.Server(extra="user: no-such-user-nbdvault\n")
        self.addCleanup(shutil.rmtree, srv.dir, True)
        with self.assertRaises(RuntimeError) as cm:
            srv.start()
        self.assertIn("user: no user 'no-such-user-nbdvault'", str(cm.exception))


if __name__ == "__main__":
    nbdv.main()
