#!/usr/bin/python3
"""bench/fairness.py: what one client's backlog of expensive requests costs another
client, on nbdvault, nbdkit and qemu-nbd side by side (issue 13, acceptance 4).

    bench/fairness.py [NBDVAULT]     (default: build-release/nbdvault, then build/nbdvault)

Two attacks, each against every server that can take it, all on unix sockets:

  A  file export, a sparse 1 GiB file with 4096 data islands in its first 512 MiB: one
     hog keeps 512 BLOCK_STATUS(64 MiB) requests in flight; the victim, on another
     connection to the same export, sends a FLUSH every 10 ms.
  B  memory export of 8 GiB with one written chunk in each GiB: two hogs keep 64
     BLOCK_STATUS(4 GiB - 4 KiB) in flight each; the victim reads 4 KiB every 10 ms.

The victim is open-loop (it sends on schedule, whatever the replies do), so a stall
shows in every request sent during it.  Reported: the victim's p50/p99 alone and beside
the hogs, and the ratio of the p99s.  Writes bench/results/fairness.md; asserts nothing.
The hogs and the victim are the test suite's (tests/e2e/test_fairness.py).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QEMU_NBD, ROOT, wait_socket  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import nbdv  # noqa: E402
import test_fairness as tf  # noqa: E402

import nbd  # noqa: E402

SAMPLES = 400
HOG_SECONDS = 8


def start(kind, backing, sock, nbdvault, tmp):
    """Start one server on unix socket @sock; returns the process."""
    name = "frag" if backing == "file" else "big"
    img = os.path.join(tmp, "frag.img")
    if kind == "nbdvault":
        cfg = os.path.join(tmp, "nbdvault.yaml")
        with open(cfg, "w") as f:
            f.write(f"listen:\n  - unix: {sock}\nexports:\n  - name: {name}\n")
            if backing == "file":
                f.write(f"    driver: file\n    path: {img}\n")
            else:
                f.write("    driver: memory\n    size: 8G\n")
        cmd = [nbdvault, "--config", cfg]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-U", sock, "--exportname", name]
        cmd += ["file", img] if backing == "file" else ["memory", "8G"]
    else:  # qemu-nbd: file only
        cmd = [QEMU_NBD, "-f", "raw", "-x", name, "-k", sock, "-t", "-e", "8",
               "--cache=writeback", img]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p


def populate(sock, backing):
    h = nbd.NBD()
    h.set_export_name("frag" if backing == "file" else "big")
    h.connect_unix(sock)
    if backing == "file":
        for off in range(0, 512 << 20, 128 << 10):
            h.pwrite(b"d" * 4096, off)
        h.flush()
    else:
        for gib in range(8):
            h.pwrite(b"d" * 4096, (gib << 30) + (5 << 20))
    h.shutdown()


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def run_one(kind, backing, nbdvault):
    tmp = tempfile.mkdtemp(prefix="nbdvault-fair-")
    sock = os.path.join(tmp, "sock")
    try:
        if backing == "file":
            with open(os.path.join(tmp, "frag.img"), "wb") as f:
                f.truncate(1 << 30)
        p = start(kind, backing, sock, nbdvault, tmp)
        try:
            populate(sock, backing)
            if backing == "file":
                victim = ("frag", nbdv.CMD_FLUSH, 0)
                hogs = ("frag", 64 << 20, 512, 1)
            else:
                victim = ("big", nbdv.CMD_READ, 4096)
                hogs = ("big", (4 << 30) - 4096, 64, 2)
            export, cmd, length = victim
            alone = tf.victim_ms(sock, export, cmd, 100, length)
            procs = tf.start_hogs(sock, *hogs, HOG_SECONDS)
            loaded = tf.victim_ms(sock, export, cmd, SAMPLES, length)
            for h in procs:
                h.join(120)
            return alone, loaded
        finally:
            p.terminate()
            p.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "missing"


def main():
    nbdvault = sys.argv[1] if len(sys.argv) > 1 else next(
        (p for p in (os.path.join(ROOT, "build-release", "nbdvault"),
                     os.path.join(ROOT, "build", "nbdvault")) if os.path.exists(p)))
    rows = []
    for backing, kinds in (("file", ("nbdvault", "nbdkit", "qemu-nbd")),
                           ("memory", ("nbdvault", "nbdkit"))):
        for kind in kinds:
            alone, loaded = run_one(kind, backing, nbdvault)
            row = (kind, backing, statistics.median(alone), pct(alone, 0.99),
                   statistics.median(loaded), pct(loaded, 0.99))
            print("%-9s %-6s alone p50 %.2f p99 %.2f ms | attacked p50 %.2f p99 %.2f ms" %
                  row, flush=True)
            rows.append(row)
    out = os.path.join(ROOT, "bench", "results", "fairness.md")
    with open(out, "w") as f:
        f.write("# Fairness: a victim beside a client's backlog\n\n")
        f.write(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                "`bench/fairness.py` on this project's 2-core VM; attack A is a file "
                "export and 512 BLOCK_STATUS(64 MiB) in flight on a fragmented file, "
                "the victim a FLUSH every 10 ms; attack B a memory export of 8 GiB and "
                "two connections with 64 BLOCK_STATUS(4 GiB) each, the victim a 4 KiB "
                f"READ every 10 ms ({SAMPLES} victim requests, open loop).\n\n")
        f.write(f"Versions: nbdvault {nbdvault}, {version(['nbdkit', '--version'])}, "
                f"{version([QEMU_NBD, '--version'])}.\n\n")
        f.write("| server | attack | victim alone p50 / p99 (ms) | beside the hogs p50 / p99 (ms) "
                "| p99 vs nbdvault |\n| --- | --- | --- | --- | --- |\n")
        ours = {b: r[5] for r in rows for b in (r[1],) if r[0] == "nbdvault"}
        for kind, backing, a50, a99, l50, l99 in rows:
            f.write(f"| {kind} | {'A (file)' if backing == 'file' else 'B (memory)'} | "
                    f"{a50:.2f} / {a99:.2f} | {l50:.2f} / {l99:.2f} | "
                    f"{l99 / ours[backing]:.1f}x |\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
