#!/usr/bin/python3
"""bench/exthdr.py: 64 MiB reads and writes over extended headers, nbdvault against
qemu-nbd 10.0 (the only packaged peer that speaks them), plain and TLS (issue 15,
acceptance 6).

    bench/exthdr.py [NBDVAULT]     (default: build-release/nbdvault, then build/nbdvault)

Both serve a 2 GiB file of data in /tmp on a unix socket; the client is qemu-io 10.0
(2 GiB in 64 MiB aio requests, two in flight), which negotiates extended headers with
both.  qemu 10 comes from tests/qemu10 (Debian bookworm-backports, unpacked into
build/qemu10).  Servers alternate, 3 repetitions; MiB/s median and min..max, and
nbdvault's ratio to qemu-nbd.  Writes bench/results/exthdr.md; asserts nothing.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QEMU10, ROOT, version, wait_socket  # noqa: E402
Q10 = os.path.join(QEMU10, "bin")
REPS, SIZE, REQ = 3, 2 << 30, 64 << 20


def start(kind, tls, tmp, nbdvault, pki):
    sock = os.path.join(tmp, f"{kind}.sock")
    img = os.path.join(tmp, "disk.img")  # filled with data once (see main)
    if kind == "nbdvault":
        cfg = os.path.join(tmp, "nbdvault.yaml")
        with open(cfg, "w") as f:
            f.write(f"listen:\n  - unix: {sock}\n")
            if tls:
                f.write(f"tls:\n  mode: require\n  certificates: {pki}\n")
            f.write(f"exports:\n  - name: disk\n    driver: file\n    path: {img}\n")
        cmd = [nbdvault, "--config", cfg]
    else:
        cmd = [os.path.join(Q10, "qemu-nbd"), "-f", "raw", "-x", "disk", "-k", sock, "-t",
               "-e", "8", "--cache=writeback", "--aio=threads"]
        if tls:
            cmd += ["--object", f"tls-creds-x509,id=t0,dir={pki},endpoint=server",
                    "--tls-creds", "t0"]
        cmd.append(img)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p, sock


def bench(sock, tls, pki, write):
    """qemu-io 10 (qemu-img bench has no --object for TLS): the whole image in 64 MiB
    aio requests, two in flight at a time."""
    opts = f"driver=nbd,path={sock},export=disk"
    obj = []
    if tls:
        opts += ",tls-creds=c0,tls-hostname=localhost"
        obj = ["--object", f"tls-creds-x509,id=c0,dir={pki}/clients/client,endpoint=client"]
    cmds = []
    for off in range(0, SIZE, 2 * REQ):
        for o in (off, off + REQ):
            cmds += ["-c", f"{'aio_write -P 0x5a' if write else 'aio_read'} -q {o} {REQ}"]
        cmds += ["-c", "aio_flush"]
    cmd = [os.path.join(Q10, "qemu-io"), *obj, "--image-opts", opts, *cmds]
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode or "error" in p.stdout.lower():
        raise RuntimeError(f"qemu-io: {p.stdout[-500:]}{p.stderr[-500:]}")
    return SIZE / (time.monotonic() - t) / (1 << 20)


def main():
    nbdvault = sys.argv[1] if len(sys.argv) > 1 else next(
        p for p in (os.path.join(ROOT, "build-release", "nbdvault"),
                    os.path.join(ROOT, "build", "nbdvault")) if os.path.exists(p))
    if not os.path.exists(os.path.join(Q10, "qemu-img")):
        sys.exit("bench/exthdr.py: run tests/qemu10 build/qemu10 first")
    tmp = tempfile.mkdtemp(prefix="nbdvault-exthdr-", dir="/tmp")
    try:
        pki = os.path.join(tmp, "pki")
        subprocess.run([os.path.join(ROOT, "certs", "make-dev-certs"), pki, "--rsa"],
                       check=True, capture_output=True)
        # Data, not holes: a sparse file would measure hole replies, not transfers.
        block = os.urandom(64 << 20)
        with open(os.path.join(tmp, "disk.img"), "wb") as f:
            for _ in range(SIZE // len(block)):
                f.write(block)
        results = {}
        for tls in (False, True):
            for write in (False, True):
                for rep in range(REPS):
                    order = ("nbdvault", "qemu-nbd") if rep % 2 == 0 else ("qemu-nbd", "nbdvault")
                    for kind in order:
                        p, sock = start(kind, tls, tmp, nbdvault, pki)
                        try:
                            r = bench(sock, tls, pki, write)
                        finally:
                            p.terminate()
                            p.wait(30)
                        results.setdefault((tls, write, kind), []).append(r)
                        print(f"{'TLS' if tls else 'plain'} {'write' if write else 'read'} "
                              f"{kind}: {r:.0f} MiB/s", flush=True)
        out = os.path.join(ROOT, "bench", "results", "exthdr.md")
        q = version(os.path.join(Q10, "qemu-img")).split()[2]
        with open(out, "w") as f:
            f.write("# 64 MiB requests over extended headers\n\n")
            f.write(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                    f"`bench/exthdr.py` on this project's 2-core VM: client qemu-io {q} "
                    f"(2 GiB in 64 MiB aio requests, two in flight), servers on a unix socket over a "
                    f"2 GiB file of data in /tmp (page cache warm); nbdvault `{nbdvault}`, qemu-nbd {q} "
                    f"(`--cache=writeback`). {REPS} runs each, alternating; MiB/s median "
                    f"(min..max).\n\n")
            f.write("| transport | op | nbdvault | qemu-nbd 10.0 | ratio |\n"
                    "| --- | --- | --- | --- | --- |\n")
            for tls in (False, True):
                for write in (False, True):
                    a = results[(tls, write, "nbdvault")]
                    b = results[(tls, write, "qemu-nbd")]
                    f.write(f"| {'TLS 1.3' if tls else 'plain'} | {'write' if write else 'read'}"
                            f" | {statistics.median(a):.0f} ({min(a):.0f}..{max(a):.0f}) | "
                            f"{statistics.median(b):.0f} ({min(b):.0f}..{max(b):.0f}) | "
                            f"{statistics.median(a) / statistics.median(b):.2f}x |\n")
        print("wrote", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
