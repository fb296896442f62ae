"""Helpers shared by the bench scripts (bench.py, rbd.py, fairness.py, exthdr.py,
metrics_ab.py)."""

import os
import resource
import socket
import subprocess
import time

TICK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# qemu 10 from bookworm-backports, unpacked by tests/qemu10 (bin/, lib/.../qemu modules).
QEMU10 = os.path.join(ROOT, "build", "qemu10", "usr")
# The qemu-nbd peer: 10.0 when tests/qemu10 has unpacked it (it sets TCP_NODELAY, 7.2
# does not), else the system's.
_Q10_NBD = os.path.join(QEMU10, "bin", "qemu-nbd")
QEMU_NBD = _Q10_NBD if os.path.exists(_Q10_NBD) else "qemu-nbd"


def make_pki(path, rsa=False):
    """A throwaway CA, server and client certificates in @path (certs/make-dev-certs):
    ECDSA P-256, or RSA 3072 with @rsa."""
    subprocess.run([os.path.join(ROOT, "certs", "make-dev-certs"), path] +
                   (["--rsa"] if rsa else []), check=True, capture_output=True)
    return path


def version(program):
    """The first line @program --version prints (stdout, else stderr), its leading
    path cut to the program's name; "?" when it cannot be run."""
    try:
        p = subprocess.run([program, "--version"], capture_output=True, text=True)
        first = (p.stdout or p.stderr).splitlines()[0].strip()
    except (OSError, IndexError):
        return "?"
    name, _, rest = first.partition(" ")
    return f"{os.path.basename(name)} {rest}".strip()


def random_file(path, nbytes):
    """@path filled with @nbytes of random data (a whole number of MiB), on disk when
    this returns: its writeback would otherwise run during the first measurements."""
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    return path


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_seconds(pid):
    """User + system CPU seconds process @pid has used so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def timed(server, argv, parse, timeout=600):
    """Run a client command against @server (its .proc); returns (parse(stdout, wall),
    server CPU s, client CPU s, wall s)."""
    c0 = cpu_seconds(server.proc.pid)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {p.stderr.strip()[:300]}")
    client = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return parse(p.stdout, wall), cpu_seconds(server.proc.pid) - c0, client, wall


def wait_socket(path, proc, timeout=20):
    """Wait until the server @proc accepts on unix socket @path; raise if it exits or
    does not listen within @timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")
