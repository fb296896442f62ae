#!/usr/bin/python3
"""bench/ab.py: a same-hour A/B of a few cells, two or more servers alternating.

    bench/ab.py [--reps N] [--copy-mib N] [--seconds S] [--extra NAME=LINE]...
                CELLS NAME=PROGRAM [NAME=PROGRAM...]

The tool behind the A/B tables of results/analysis.md: when a change is judged by a
few cells, run them here, servers alternating within each repetition and the order
reversed every other one, rather than comparing two full runs made at different hours
on a shared machine.

CELLS is a comma-separated list of OP:N:BACKING, BACKING being `memory` or `file`
(TLS 1.3, one RSA certificate for all) or `memory+plain` / `file+plain` (no TLS):

    write:N    nbdcopy --flush of a synced random file into the export, N connections
    read:N     nbdcopy of the export to null:, N connections
    convert:1  qemu-img convert (qemu 10, from tests/qemu10) of the export to null-co
    rr4k:N     4 KiB random reads at depth N for --seconds (fio plain, nbdload TLS)
    rw4k:N     4 KiB random writes at depth N
    seq1m:N    1 MiB sequential reads at depth N

Each NAME=PROGRAM is a server: nbdvault unless NAME starts with `nbdkit` or
`qemu-nbd`.  `--extra NAME=LINE` adds a top-level line to that nbdvault's
configuration (e.g. `--extra off='busy-poll: 0'` with `off=build-release/nbdvault`)
so that settings can be compared with one binary.  Every server takes one unmeasured
write of the whole copy first.  Prints per cell and server: median (min..max) in MiB/s
(copies, seq1m) or IOPS, [server / client CPU seconds per GiB, medians], and the first
server's ratio to each other one (~ where their ranges overlap).  Asserts nothing.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import tlsbulk  # noqa: E402
from benchlib import make_pki, random_file  # noqa: E402

BACKINGS = ("memory", "file", "memory+plain", "file+plain")
OPS = {
    "write": bench.w_nbdcopy_write,
    "read": bench.w_nbdcopy_read,
    "convert": tlsbulk.w_convert,
    "rr4k": lambda s, a, n: bench.w_fio(s, a, "randread", 4096, n),
    "rw4k": lambda s, a, n: bench.w_fio(s, a, "randwrite", 4096, n),
    "seq1m": lambda s, a, n: bench.w_fio(s, a, "read", 1 << 20, n),
}


def parse_cells(text):
    cells = []
    for c in text.split(","):
        op, n, backing = c.split(":")
        if op not in OPS or backing not in BACKINGS:
            raise SystemExit(f"bad cell {c!r}: OP:N:memory|file[+plain], OP one of {list(OPS)}")
        cells.append((op, int(n), backing))
    return cells


def kind_of(name):
    return next((k for k in ("nbdkit", "qemu-nbd") if name.startswith(k)), "nbdvault")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=LINE")
    ap.add_argument("cells")
    ap.add_argument("servers", nargs="+", metavar="NAME=PROGRAM")
    a = ap.parse_args()
    cells = parse_cells(a.cells)
    servers = [s.split("=", 1) for s in a.servers]
    extra = {}
    for e in a.extra:
        name, line = e.split("=", 1)
        extra[name] = extra.get(name, "") + line + "\n"
    a.copy_bytes = a.copy_mib << 20
    bench.raise_nofile()
    work = tempfile.mkdtemp(prefix="nbdvault-ab-", dir="/tmp")
    started = []
    try:
        pki = make_pki(os.path.join(work, "pki"), rsa=True)
        a.src = random_file(os.path.join(work, "src.img"), a.copy_bytes)
        os.sync()
        srv = {}
        for backing in sorted({b for _, _, b in cells}):
            for name, program in servers:
                s = bench.Server(kind_of(name), backing.split("+")[0],
                                 not backing.endswith("+plain"), work, pki,
                                 tag=backing.replace("+", "-"), binary=program,
                                 label=name, extra=extra.get(name, ""))
                started.append(s)
                srv[(name, backing)] = s
                bench.w_nbdcopy_write(s, a, 4)
        res = {}
        for rep in range(a.reps):
            order = servers if rep % 2 == 0 else servers[::-1]
            for op, n, backing in cells:
                for name, _ in order:
                    res.setdefault((op, n, backing, name), []).append(
                        OPS[op](srv[(name, backing)], a, n))
        for op, n, backing in cells:
            rows = {}
            for name, _ in servers:
                runs = res[(op, n, backing, name)]
                # CPU per GiB: copies move a.copy_bytes; timed runs move rate x wall.
                moved = [a.copy_bytes if op in ("write", "read", "convert") else
                         (r[0] * (1 << 20) if op == "seq1m" else r[0] * 4096) * r[3]
                         for r in runs]
                scpu = statistics.median(r[1] / (m / bench.GIB) for r, m in zip(runs, moved))
                ccpu = statistics.median(r[2] / (m / bench.GIB) for r, m in zip(runs, moved))
                rows[name] = bench.summary(runs)
                print(f"{op}:{n}:{backing} {name}: {rows[name][0]:,.0f} "
                      f"({rows[name][1]:,.0f}..{rows[name][2]:,.0f}) [{scpu:.2f} / {ccpu:.2f}]")
            first = servers[0][0]
            for name, _ in servers[1:]:
                m0, lo0, hi0 = rows[first]
                m1, lo1, hi1 = rows[name]
                ratio = (m0 / m1, lo0 <= hi1 and lo1 <= hi0)
                print(f"  {first} / {name}: {bench.fmt_ratio(ratio)}")
            sys.stdout.flush()
    finally:
        for s in started:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
