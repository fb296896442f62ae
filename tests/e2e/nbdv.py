"""Helpers for nbdvault's end-to-end tests: start the real server on a temporary
config, talk raw NBD on a socket, and skip (exit 77) when a client tool is missing."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

NBDVAULT = os.environ.get("NBDVAULT", "nbdvault")
# A command to run the server under (e.g. valgrind), and how much slower that makes it:
# the few time bounds in the tests are multiplied by SLOW.
WRAPPER = os.environ.get("NBDVAULT_WRAPPER", "").split()
SLOW = float(os.environ.get("NBDV_SLOW", "1"))

NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module lacks the name
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = REP_ERR | 1, REP_ERR | 2, REP_ERR | 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = REP_ERR | 5, REP_ERR | 6, REP_ERR | 9
CERTS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "certs",
                            "make-dev-certs")


def make_pki(outdir, *args):
    """Run certs/make-dev-certs into outdir; skip the test program without certtool."""
    require("certtool", "psktool")
    subprocess.run([CERTS_SCRIPT, outdir, *args], check=True, capture_output=True)
    return outdir


def make_client_cert(pki, name, template_lines, key_type="ecdsa"):
    """Sign one more client certificate with make_pki()'s CA, from certtool template
    lines (the subject is added); written as pki/clients/NAME/ the way libnbd and
    qemu read a directory.  Returns that directory."""
    d = os.path.join(pki, "clients", name)
    os.makedirs(d, exist_ok=True)
    tmpl = os.path.join(d, "tmpl")
    with open(tmpl, "w") as f:
        f.write(f'cn = "{name}"\norganization = "nbdvault dev"\nexpiration_days = 30\n')
        f.write("".join(line + "\n" for line in template_lines))
    key, cert = os.path.join(d, "client-key.pem"), os.path.join(d, "client-cert.pem")
    subprocess.run(["certtool", "--generate-privkey", "--key-type", key_type, "--outfile", key],
                   check=True, capture_output=True)
    subprocess.run(["certtool", "--generate-certificate", "--load-privkey", key,
                    "--load-ca-certificate", f"{pki}/ca-cert.pem",
                    "--load-ca-privkey", f"{pki}/ca-key.pem", "--template", tmpl,
                    "--outfile", cert], check=True, capture_output=True)
    shutil.copy(os.path.join(pki, "ca-cert.pem"), os.path.join(d, "ca-cert.pem"))
    os.unlink(tmpl)
    return d


CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28


def require(*tools):
    """Skip the whole test program (exit 77, meson's skip code) if a tool is absent."""
    for t in tools:
        if shutil.which(t) is None:
            print(f"SKIP: {t} is not installed")
            sys.exit(77)


def require_libnbd():
    try:
        import nbd  # noqa: F401
    except ImportError:
        print("SKIP: python3-libnbd (module nbd) is not installed for", sys.executable)
        sys.exit(77)


def rss_kib(pid):
    """Resident memory of process @pid, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# An export of the `faulty` driver, f, whose control file is control() (for Server()).
FAULTY = """
  - name: f
    driver: faulty
    path: {dir}/control
    size: 16M
"""


def wake(sock):
    """Open and close a connection to unix socket @sock, if it still listens: an event
    for a server's loop."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
    except OSError:
        pass


def sighup(srv, expect=None, until=None, timeout=10):
    """Send SIGHUP to @srv, then wait until its log shows @expect once more than before
    (or @until() holds); fails after @timeout seconds (times SLOW) with the log's tail.

    Under ThreadSanitizer a signal that lands just as the main thread enters
    epoll_wait() may be held until that call returns: once in CI a reload then waited
    for an event that never came.  After 1 s the wait opens a connection, which is one.
    """
    before = srv.logtext().count(expect) if expect else 0
    done = until or (lambda: srv.logtext().count(expect) > before)
    srv.proc.send_signal(signal.SIGHUP)
    start = time.monotonic()
    poked = False
    while not done():
        if time.monotonic() > start + timeout * SLOW:
            raise AssertionError(f"SIGHUP: no {expect or 'change'} within {timeout} s:\n"
                                 + srv.logtext()[-3000:])
        if not poked and time.monotonic() > start + 1 and \
                os.environ.get("NBDVAULT_SANITIZE") == "thread":
            poked = True
            wake(srv.sock)
        time.sleep(0.02)


def control(srv, text):
    """Tell @srv's FAULTY export what to do (a control line such as "delay 1" or
    "EIO 0 4096"), or with None to behave again."""
    path = os.path.join(srv.dir, "control")
    if text is None:
        if os.path.exists(path):
            os.unlink(path)
    else:
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


def read_requests(n, size):
    """@n READ requests of @size bytes at offset 0, cookies 0..n-1, as one buffer."""
    return b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, 0, size)
                    for i in range(n))


def metrics_config(mport):
    """The `metrics:` section serving Prometheus text on 127.0.0.1:@mport."""
    return f"metrics:\n  address: 127.0.0.1\n  port: {mport}\n"


def scrape(mport):
    """The Prometheus text from the metrics endpoint on 127.0.0.1:@mport, once it
    answers (it is bound a little after the NBD listeners)."""
    import urllib.request
    deadline = time.monotonic() + 10 * SLOW
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as f:
                return f.read().decode()
        except OSError:
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            time.sleep(0.05)


def metric(mport, name, **labels):
    """The value of series @name{@labels} on @mport's /metrics; None when it has none."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{want}}}" if labels else name
    for line in scrape(mport).splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def memory_held(mport):
    """nbdvault_memory_held_bytes (what requests and replies are charged, process-wide)
    from the metrics endpoint on @mport."""
    return int(metric(mport, "nbdvault_memory_held_bytes"))


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """One nbdvault process on a fresh temporary directory.

    exports: YAML text of the exports list entries (indented as list items), in which
    {dir} is replaced by the temporary directory.  The server listens on a unix socket
    ({dir}/sock) and, with tcp=True, on 127.0.0.1:<free port>."""

    def __init__(self, exports=None, extra="", tcp=False, tmpdir=None, max_fds=None, env=None,
                 args=()):
        self.dir = tmpdir or tempfile.mkdtemp(prefix="nbdvault-test-")
        self.sock = os.path.join(self.dir, "sock")
        self.port = free_port() if tcp else None
        if exports is None:
            exports = """
  - name: mem
    description: memory test export
    driver: memory
    size: 64M
"""
        listen = f"listen:\n  - unix: {self.sock}\n"
        if tcp:
            listen += f"  - address: 127.0.0.1\n    port: {self.port}\n"
        self.config = os.path.join(self.dir, "nbdvault.yaml")
        with open(self.config, "w") as f:
            f.write(listen + extra.format(dir=self.dir) + "exports:" +
                    exports.format(dir=self.dir))
        self.log = os.path.join(self.dir, "server.log")
        self.proc = None
        self.max_fds = max_fds  # RLIMIT_NOFILE for the server, to provoke EMFILE
        self.env = env  # extra environment variables for the server
        self.args = list(args)  # extra command-line arguments

    def start(self, timeout=10):
        timeout *= SLOW
        logf = open(self.log, "ab")
        def limit():
            if self.max_fds:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))

        env = dict(os.environ, **self.env) if self.env else None
        self.proc = subprocess.Popen(WRAPPER + [NBDVAULT, "--config", self.config] + self.args,
                                     stdout=logf,
                                     stderr=logf, preexec_fn=limit, env=env)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logtext()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.sock)
                if self.port:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        pass
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("server did not start listening:\n" + self.logtext())

    def logtext(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def uri(self, export="mem"):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def tcp_uri(self, export="mem"):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=40):
        """Signal the server and wait; returns its exit status."""
        timeout *= SLOW
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if os.environ.get("NBDVAULT_SANITIZE") == "thread":
            # A signal ThreadSanitizer held back (see sighup()) waits for an event: give
            # an idle server one.
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                wake(self.sock)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError("server did not exit in time:\n" + self.logtext())
        self.proc = None
        return rc

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        """Stop the server; unless a test is already failing, insist that it exited 0
        and that no sanitizer complained, then remove the directory."""
        rc = self.stop() if self.proc is not None else 0
        log = self.logtext()
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc and exc[0] is not None:
            return
        for needle in ("runtime error:", "AddressSanitizer", "LeakSanitizer", "ThreadSanitizer",
                       "ERROR SUMMARY: 1", "definitely lost: 1"):
            assert needle not in log, f"sanitizer report in the server log:\n{log}"
        assert rc == 0, f"server exited with status {rc}:\n{log}"


RECV_CHUNK = 256 << 10  # the most Raw.recvn() asks of one recv()


class Raw:
    """A raw NBD client on a socket, for what real clients refuse to send."""

    def __init__(self, path=None, port=None, timeout=10, rcvbuf=None, rcvbuf_force=False,
                 mss=None):
        """rcvbuf (TCP): SO_RCVBUF before connect; with rcvbuf_force, SO_RCVBUFFORCE,
        which may exceed net.core.rmem_max (PermissionError without CAP_NET_ADMIN).
        mss (TCP): TCP_MAXSEG before connect, so that what this client sends comes in
        segments of at most that size."""
        timeout *= SLOW
        if path:
            deadline = time.monotonic() + timeout
            while True:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.settimeout(timeout)
                try:
                    self.s.connect(path)
                    break
                except BlockingIOError:  # listen backlog full: the server is busy
                    self.s.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        else:
            self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            if rcvbuf:  # before connect, so that the window scale fits this size
                self.s.setsockopt(socket.SOL_SOCKET,
                                  SO_RCVBUFFORCE if rcvbuf_force else socket.SO_RCVBUF, rcvbuf)
            if mss:
                self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
            self.s.connect(("127.0.0.1", port))

    def close(self):
        self.s.close()

    def recvn(self, n):
        # A bytearray grows in place: appending each chunk to a bytes object copied a
        # 32 MiB reply thousands of times over.  Each recv() asks for at most 256 KiB:
        # Python allocates the whole size asked for before the socket returns a TLS
        # record's 16 KiB, and with meson's MALLOC_PERTURB_ glibc fills that allocation
        # (a 32 MiB fill per record: 220 s instead of 3 for test_fairness's large
        # reads).  (Only recv() is asked of self.s: tests put their own TLS wrappers
        # there.)
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(min(n - len(buf), RECV_CHUNK))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout=5):
        """True if the server closes the connection (EOF or reset) within timeout."""
        self.s.settimeout(timeout * SLOW)
        try:
            while True:
                data = self.s.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError as e:  # ssl.SSLError and friends: the peer went away mid-record
            return "EOF" in str(e) or "reset" in str(e).lower() or "closed" in str(e).lower()
        except socket.timeout:
            return False

    def starttls(self, ca, cert=None, key=None):
        """NBD_OPT_STARTTLS, then a TLS handshake on the same socket (x509)."""
        replies = self.opt(OPT_STARTTLS)
        assert replies[-1][0] == REP_ACK, f"STARTTLS refused: {replies}"
        self.tls_wrap(ca, cert, key)

    def tls_wrap(self, ca, cert=None, key=None):
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost")

    def greet(self, flags=3):
        magic, ihave, gflags = struct.unpack(">QQH", self.recvn(18))
        assert magic == NBD_MAGIC and ihave == IHAVEOPT, "bad greeting"
        self.s.sendall(struct.pack(">I", flags))
        return gflags

    def send_opt(self, opt, data=b"", length=None):
        if length is None:
            length = len(data)
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, length) + data)

    def read_reply(self):
        magic, opt, rtype, rlen = struct.unpack(">QIII", self.recvn(20))
        assert magic == REP_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, rtype, self.recvn(rlen) if rlen else b""

    def opt(self, opt, data=b""):
        """Send an option; return the list of (type, data) replies up to the final one."""
        self.send_opt(opt, data)
        replies = []
        while True:
            o, rtype, payload = self.read_reply()
            assert o == opt, f"reply for option {o}, expected {opt}"
            replies.append((rtype, payload))
            if rtype not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                return replies

    def go(self, name=b"mem", structured=False, meta=False):
        if structured:
            assert self.opt(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        if meta:
            q = b"base:allocation"
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q
            assert self.opt(OPT_SET_META_CONTEXT, data)[-1][0] == REP_ACK
        replies = self.opt(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] == REP_ACK, f"GO failed: {replies}"
        for rtype, payload in replies:
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                _, self.size, self.tflags = struct.unpack(">HQH", payload[:12])
        return replies

    def request(self, cmd, offset=0, length=0, flags=0, cookie=1, data=b"", magic=REQUEST_MAGIC):
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data)

    def simple_reply(self, datalen=0):
        magic, err, cookie = struct.unpack(">IIQ", self.recvn(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"expected a simple reply, got magic {magic:#x}"
        data = self.recvn(datalen) if (datalen and err == 0) else b""
        return err, cookie, data

    def simple_replies(self, n, datalen):
        """Read @n successful simple replies of @datalen bytes each, in any order;
        returns their cookies."""
        cookies = set()
        for _ in range(n):
            err, cookie, data = self.simple_reply(datalen)
            assert (err, len(data)) == (0, datalen), f"reply {cookie}: error {err}"
            cookies.add(cookie)
        return cookies

    def any_reply(self):
        """Read one reply of either kind: ('simple', err, cookie, b'') or
        ('chunk', flags, type, cookie, payload)."""
        magic = struct.unpack(">I", self.recvn(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recvn(12))
            return ("simple", err, cookie, b"")
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recvn(16))
        return ("chunk", flags, rtype, cookie, self.recvn(length))

    def error_of(self, reply):
        """NBD error number carried by a reply from any_reply()."""
        if reply[0] == "simple":
            return reply[1]
        _, flags, rtype, cookie, payload = reply
        return struct.unpack(">I", payload[:4])[0] if rtype & 0x8000 else 0


def psk_connect(sock, export, psk_file, user):
    """A libnbd handle on @export over the unix socket, TLS with @user's PSK."""
    import nbd
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk_file)
    h.set_tls_username(user)
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    return h


def disconnect(h):
    """Politely end a libnbd handle's connection (libnbd 1.14 has no close())."""
    try:
        h.shutdown()
    except Exception:
        pass


def check_serves(test, server, export="mem", size=None):
    """Assert that a new libnbd connection reads back what it writes."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(server.uri(export))
    data = os.urandom(4096)
    h.pwrite(data, 8192)
    test.assertEqual(h.pread(4096, 8192), data)
    h.shutdown()


def main():
    unittest.main(verbosity=2)
