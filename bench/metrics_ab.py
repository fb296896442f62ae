#!/usr/bin/python3
"""bench/metrics_ab.py: what collecting metrics costs (issue 16): the 4k qd32 rows on a
memory export with `metrics:` off and on, alternating in one run.

    bench/metrics_ab.py [NBDVAULT] [RUNS]   (default build-release/nbdvault, 5 runs)

The client is bench/nbdload (libnbd) on a unix socket, 4 s per run; reported: IOPS
median (min..max) for each side and the ratio on/off.  Writes
bench/results/metrics_ab.md; asserts nothing.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, wait_socket  # noqa: E402


def run(nbdvault, nbdload, tmp, metrics, pattern):
    sock = os.path.join(tmp, "sock")
    cfg = os.path.join(tmp, "nbdvault.yaml")
    with open(cfg, "w") as f:
        f.write(f"listen:\n  - unix: {sock}\n")
        if metrics:
            f.write(f"metrics:\n  unix: {tmp}/metrics.sock\n")
        f.write("exports:\n  - name: mem\n    driver: memory\n    size: 1G\n")
    p = subprocess.Popen([nbdvault, "--config", cfg], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, p)
        out = subprocess.run([nbdload, f"nbd+unix:///mem?socket={sock}", pattern, "4096",
                              "32", "4"], check=True, capture_output=True, text=True).stdout
        ops, _, secs = out.split()[:3]
        return float(ops) / float(secs)
    finally:
        p.terminate()
        p.wait(30)


def main():
    nbdvault = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build-release",
                                                                  "nbdvault")
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    tmp = tempfile.mkdtemp(prefix="nbdvault-mab-")
    nbdload = os.path.join(tmp, "nbdload")
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libnbd"], check=True,
                               capture_output=True, text=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", nbdload, os.path.join(ROOT, "bench", "nbdload.c"),
                        *flags], check=True)
        rows = []
        for pattern in ("randread", "randwrite"):
            res = {False: [], True: []}
            for i in range(runs):
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    res[on].append(run(nbdvault, nbdload, tmp, on, pattern))
            rows.append((pattern, res))
            print(pattern, {k: [round(x) for x in v] for k, v in res.items()}, flush=True)
        out = os.path.join(ROOT, "bench", "results", "metrics_ab.md")
        with open(out, "w") as f:
            f.write("# Cost of collecting metrics\n\n")
            f.write(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                    f"`bench/metrics_ab.py` (`{nbdvault}`), memory export, bench/nbdload "
                    f"4 KiB at depth 32 for 4 s on a unix socket, {runs} runs per side, "
                    "alternating.\n\n| workload | metrics off, IOPS | metrics on, IOPS | "
                    "on/off |\n| --- | --- | --- | --- |\n")
            for pattern, res in rows:
                off, on = res[False], res[True]
                f.write(f"| 4k {pattern} qd32 | {statistics.median(off):.0f} "
                        f"({min(off):.0f}..{max(off):.0f}) | {statistics.median(on):.0f} "
                        f"({min(on):.0f}..{max(on):.0f}) | "
                        f"{statistics.median(on) / statistics.median(off):.3f} |\n")
        print("wrote", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
