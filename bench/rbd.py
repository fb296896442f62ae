#!/usr/bin/python3
"""bench/rbd.py: an RBD image served by nbdvault's rbd driver against qemu-nbd 10.0
serving the same image through qemu's own rbd driver (issue 14, acceptance 4).

    bench/rbd.py [--quick] [--reps N] [--only REGEX] [NBDVAULT]
                                        (default: build-release/nbdvault, then build/)

A throwaway Ceph cluster (tests/ceph/cluster: one mon, one memstore OSD, so the OSD's
storage is RAM and the cluster's own work is what both servers share) holds one 1 GiB
image.  The servers take turns on it (one at a time: two would hand the image's
exclusive lock back and forth), on 127.0.0.1 TCP, plain and TLS 1.3 (the same RSA
certificate: qemu-nbd refuses ECDSA).  Workloads: nbdcopy 1 GiB write (--flush) and
read to null: with nbdcopy's default connections (4, but no more than the cores: 2
here), and 4 KiB random read and write at depth 1 and 32
(bench/nbdload, libnbd).  3 repetitions alternating which server goes first (--quick: 1, 1 s runs, 256 MiB).
Reports median (min..max), server and client CPU seconds, and nbdvault's ratio;
writes bench/results/rbd.md.  Asserts nothing.

qemu-nbd 10.0 and its block-rbd module come from tests/qemu10 (Debian bookworm-backports
packages unpacked into build/qemu10).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QEMU10 as Q10, ROOT, free_port, timed  # noqa: E402

CLUSTER = os.path.join(ROOT, "tests", "ceph", "cluster")
NBDLOAD = os.path.join(ROOT, "build-release", "nbdload")


def wait_port(port, proc, timeout=60):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


class Server:
    def __init__(self, kind, tls, tmp, nbdvault, rbd_so, conf, pki):
        self.port = free_port()
        if kind == "nbdvault":
            cfg = os.path.join(tmp, "nbdvault.yaml")
            with open(cfg, "w") as f:
                f.write(f"listen:\n  - address: 127.0.0.1\n    port: {self.port}\n")
                if tls:
                    f.write(f"tls:\n  mode: require\n  certificates: {pki}\n")
                f.write(f"exports:\n  - name: disk\n    driver: {rbd_so}\n    pool: rbd\n"
                        f"    image: bench\n    ceph-conf: {conf}\n")
            cmd = [nbdvault, "--config", cfg]
            env = None
        else:
            cmd = [os.path.join(Q10, "bin", "qemu-nbd"), "-t", "-b", "127.0.0.1", "-p",
                   str(self.port), "-x", "disk", "-e", "8", "--image-opts",
                   f"driver=rbd,pool=rbd,image=bench,conf={conf}"]
            if tls:
                cmd[1:1] = ["--object", f"tls-creds-x509,id=t0,dir={pki},endpoint=server",
                            "--tls-creds", "t0"]
            env = dict(os.environ,
                       QEMU_MODULE_DIR=os.path.join(Q10, "lib", "x86_64-linux-gnu", "qemu"))
        self.log = os.path.join(tmp, f"{kind}.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as e:
            with open(self.log) as f:
                raise RuntimeError(f"{kind}: {e}: {f.read()[-1000:]}") from None
        self.uri = f"nbd://127.0.0.1:{self.port}/disk"
        if tls:
            self.uri = (f"nbds://127.0.0.1:{self.port}/disk"
                        f"?tls-certificates={pki}/clients/client")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def workloads(copy_bytes, src, secs):
    def copy_write(s):
        return timed(s, ["nbdcopy", "--flush", src, s.uri],
                     lambda out, wall: copy_bytes / wall / 2**20, timeout=900)

    def copy_read(s):
        return timed(s, ["nbdcopy", s.uri, "null:"],
                     lambda out, wall: copy_bytes / wall / 2**20, timeout=900)

    def load(rw, qd):
        # Inside the bytes the copy wrote (all of the image in a full run, a quarter with
        # --quick): past them a read is of a hole, answered without a payload.
        return lambda s: timed(s, [NBDLOAD, s.uri, rw, "4096", str(qd), str(secs),
                                   str(copy_bytes)],
                               lambda out, wall: int(out.split()[0]) / float(out.split()[2]),
                               timeout=900)
    return [("nbdcopy write, MiB/s", copy_write), ("nbdcopy read, MiB/s", copy_read),
            ("4k randread qd1, IOPS", load("randread", 1)),
            ("4k randread qd32, IOPS", load("randread", 32)),
            ("4k randwrite qd1, IOPS", load("randwrite", 1)),
            ("4k randwrite qd32, IOPS", load("randwrite", 32))]


def main():
    import argparse
    import re
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--only", help="regular expression: the workloads (and rows) to run")
    ap.add_argument("nbdvault", nargs="?")
    opt = ap.parse_args()
    quick = opt.quick
    args = [opt.nbdvault] if opt.nbdvault else []
    reps, secs, copy_bytes = (1, 1, 256 << 20) if quick else (3, 3, 1 << 30)
    reps = opt.reps or reps
    only = re.compile(opt.only) if opt.only else None
    nbdvault = args[0] if args else next(
        p for p in (os.path.join(ROOT, "build-release", "nbdvault"),
                    os.path.join(ROOT, "build", "nbdvault")) if os.path.exists(p))
    rbd_so = os.path.join(os.path.dirname(nbdvault), "rbd.so")
    if not os.path.exists(os.path.join(Q10, "lib", "x86_64-linux-gnu", "qemu", "block-rbd.so")):
        sys.exit("bench/rbd.py: run tests/qemu10 build/qemu10 first (qemu 10 with block-rbd)")
    if not os.path.exists(NBDLOAD):
        subprocess.run(f"gcc -O2 -o {NBDLOAD} {ROOT}/bench/nbdload.c "
                       "$(pkg-config --cflags --libs libnbd)", shell=True, check=True)
    tmp = tempfile.mkdtemp(prefix="nbdvault-rbdbench-", dir="/tmp")
    ceph = os.path.join(tmp, "ceph")
    try:
        subprocess.run([CLUSTER, "start", ceph], check=True, stdin=subprocess.DEVNULL)
        conf = os.path.join(ceph, "ceph.conf")
        subprocess.run(["timeout", "60", "rbd", "-c", conf, "create", "--size", "1G",
                        "rbd/bench"], check=True)
        pki = os.path.join(tmp, "pki")
        # RSA: qemu-nbd refuses an ECDSA server certificate (no key encipherment).
        subprocess.run([os.path.join(ROOT, "certs", "make-dev-certs"), pki, "--rsa"],
                       check=True, capture_output=True)
        src = os.path.join(tmp, "src.img")
        with open(src, "wb") as f:
            block = os.urandom(64 << 20)
            for _ in range(copy_bytes // len(block)):
                f.write(block)
        results = {}
        for tls in (False, True):
            for name, fn in workloads(copy_bytes, src, secs):
                row = f"{'TLS' if tls else 'plain'} {name}"
                if only and not only.search(row):
                    continue
                for rep in range(reps):
                    order = ("nbdvault", "qemu-nbd") if rep % 2 == 0 else ("qemu-nbd", "nbdvault")
                    for kind in order:
                        s = Server(kind, tls, tmp, nbdvault, rbd_so, conf, pki)
                        try:
                            r = fn(s)
                        finally:
                            s.stop()
                        results.setdefault((tls, name, kind), []).append(r)
                        print(f"{'TLS' if tls else 'plain'} {name} {kind}: {r[0]:.0f} "
                              f"(server {r[1]:.1f} s, client {r[2]:.1f} s CPU)", flush=True)
        write_report(results, reps, quick, nbdvault, copy_bytes, secs, opt.only)
    finally:
        subprocess.run([CLUSTER, "stop", ceph], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(results, reps, quick, nbdvault, copy_bytes, secs, only=None):
    name = "rbd-quick.md" if quick else "rbd-ab.md" if only else "rbd.md"
    out = os.path.join(ROOT, "bench", "results", name)
    q = subprocess.run([os.path.join(Q10, "bin", "qemu-nbd"), "--version"], capture_output=True,
                       text=True).stdout.split("\n")[0]
    with open(out, "w") as f:
        f.write("# RBD: nbdvault's rbd driver against qemu-nbd 10.0's\n\n")
        f.write(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/rbd.py"
                f"{' --quick' if quick else ''}{f' --reps {reps}' if only else ''}"
                f"{f' --only {only!r}' if only else ''}` on this project's 2-core VM: one 1 GiB image "
                f"on a throwaway single-node Ceph 16.2 (memstore OSD, `tests/ceph/cluster`), "
                f"served by nbdvault `{os.path.relpath(nbdvault, ROOT)}` (rbd.so, cache off) and by "
                f"{q.replace(ROOT + '/', '').replace(os.path.normpath(ROOT) + '/', '')} "
                f"(`--image-opts driver=rbd`, `-e 8`), one at a time, on 127.0.0.1 TCP. "
                f"nbdcopy {copy_bytes >> 20} MiB with its default connections ({min(4, os.cpu_count())}: "
                f"4, but no more than the cores); 4 KiB random I/O with "
                f"bench/nbdload for {secs} s. {reps} run(s) each, alternating; median "
                f"(min..max), then median server / client CPU seconds. Ceph's own daemons "
                f"share the two cores with both.\n\n")
        f.write("| transport | workload | nbdvault | CPU s (srv/cli) | qemu-nbd 10.0 | "
                "CPU s (srv/cli) | ratio |\n| --- | --- | --- | --- | --- | --- | --- |\n")
        for tls in (False, True):
            for name, _ in workloads(copy_bytes, "", secs):
                if (tls, name, "nbdvault") not in results:
                    continue
                a = results[(tls, name, "nbdvault")]
                b = results[(tls, name, "qemu-nbd")]

                def cell(v):
                    xs = [x[0] for x in v]
                    return (f"{statistics.median(xs):.0f} ({min(xs):.0f}..{max(xs):.0f}) | "
                            f"{statistics.median(x[1] for x in v):.1f} / "
                            f"{statistics.median(x[2] for x in v):.1f}")
                ratio = statistics.median(x[0] for x in a) / statistics.median(x[0] for x in b)
                f.write(f"| {'TLS 1.3' if tls else 'plain'} | {name} | {cell(a)} | {cell(b)} | "
                        f"{ratio:.2f}x |\n")
    print("wrote", os.path.relpath(out, ROOT))


if __name__ == "__main__":
    main()
