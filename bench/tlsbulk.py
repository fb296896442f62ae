#!/usr/bin/python3
"""bench/tlsbulk.py: bulk copies over TLS, the backup / `qemu-img convert` workload
(issue 17), nbdvault against every peer at hand, in one run.

    bench/tlsbulk.py [--reps N] [--nbdkit-new PATH] [--quick] [NBDVAULT]

nbdcopy 1 GiB write then read, 1 and 4 connections, memory and file exports, TLS 1.3
(same RSA certificate for all); then the backup workload itself, `qemu-img convert`
(qemu 10, one connection) of the export to a null target, when tests/qemu10 has
unpacked qemu 10.  Peers: Debian 12's nbdkit 1.32, a newer nbdkit when
--nbdkit-new names its binary (bench/newer-nbdkit builds 1.42 from Debian trixie's
source package), qemu-nbd 10.0 (file only; tests/qemu10 unpacks it) else the system's.
Servers alternate within each cell and the order reverses every repetition; each
server takes one unmeasured copy before the first cell (a memory export's first write
allocates its pages), and the source file is on disk before anything is timed.  The bare
GnuTLS loopback stream (bench/stream) is measured in the same run, between the cells,
twice: from one cached 256 KiB buffer to another (the issue's ceiling), and through
buffers as large as the copy (SPAN), so that the stream too reads every byte from RAM
and writes it to RAM, as a server and its client do.

Writes bench/results/tls-bulk.md: MiB/s median (min..max) and server / client CPU
seconds per GiB (medians), nbdvault's ratio to the best peer on the same backing (~
where the ranges overlap), and TLS reads as a share of both streams.  Asserts
nothing.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from benchlib import QEMU10, ROOT, make_pki, random_file, timed, version  # noqa: E402

QEMU_IMG = os.path.join(QEMU10, "bin", "qemu-img")


def w_convert(server, a, conns):
    """qemu-img convert of @server's export (its first GiB written, the rest a hole that
    block status skips) to a null target: one connection, qemu's defaults."""
    argv = [QEMU_IMG, "convert", "-n", "--object",
            f"tls-creds-x509,id=t0,dir={server.pki}/clients/client,endpoint=client",
            "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
            f"server.port={server.port},export=d,tls-creds=t0",
            "--target-image-opts", f"driver=null-co,size={2 * bench.GIB}"]
    return timed(server, argv, lambda out, wall: a.copy_bytes / wall / 2**20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 256 MiB copies")
    ap.add_argument("--nbdkit-new", help="a newer nbdkit binary to add as a peer")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tls-bulk.md"))
    ap.add_argument("nbdvault", nargs="?", default=bench.NBDVAULT)
    a = ap.parse_args()
    if a.quick:
        a.reps = 1
    a.copy_bytes = (256 if a.quick else 1024) << 20
    bench.raise_nofile()
    work = tempfile.mkdtemp(prefix="nbdvault-tlsbulk-", dir="/tmp")
    try:
        # RSA: qemu-nbd 10 refuses certtool's ECDSA server certificates (their critical
        # key usage lacks key encipherment); the key type only matters to handshakes.
        pki = make_pki(os.path.join(work, "pki"), rsa=True)
        a.src = random_file(os.path.join(work, "src.img"), a.copy_bytes)
        peers = [("nbdkit", None, "nbdkit")]
        if a.nbdkit_new:
            peers.append(("nbdkit", a.nbdkit_new, "nbdkit-new"))
        servers = {}
        for backing in ("memory", "file"):
            servers[backing] = [bench.Server("nbdvault", backing, True, work, pki,
                                             binary=a.nbdvault)]
            servers[backing] += [bench.Server(k, backing, True, work, pki, binary=b, label=l)
                                 for k, b, l in peers]
            if backing == "file":
                servers[backing].append(bench.Server("qemu-nbd", "file", True, work, pki))
        cells = [(op, conns, backing) for op in ("write", "read") for conns in (1, 4)
                 for backing in ("memory", "file")]
        if os.path.exists(QEMU_IMG):
            cells += [("convert", 1, backing) for backing in ("memory", "file")]
        results, stream, stream_ram = {}, [], []
        started = time.monotonic()
        try:
            # One unmeasured copy into each server first: a memory export's first write
            # allocates all of its pages, and that is not what the cells compare.
            for ss in servers.values():
                for s in ss:
                    bench.w_nbdcopy_write(s, a, 4)
            for op, conns, backing in cells:
                fn = {"write": bench.w_nbdcopy_write, "read": bench.w_nbdcopy_read,
                      "convert": w_convert}[op]
                for rep in range(a.reps):
                    order = servers[backing] if rep % 2 == 0 else servers[backing][::-1]
                    for s in order:
                        results.setdefault((op, conns, backing, s.name), []).append(
                            fn(s, a, conns))
                # The ceiling, measured between the cells so that it sees the same machine.
                stream.append(bench.run_stream("tls", a.copy_bytes, pki))
                stream_ram.append(bench.run_stream("tls", a.copy_bytes, pki, a.copy_bytes))
                print(f"{op} {conns} conn {backing} done ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        finally:
            versions = {s.name.rsplit("-", 1)[0]: version(s.argv[0])
                        for ss in servers.values() for s in ss}
            for ss in servers.values():
                for s in ss:
                    s.stop()
        report(a, cells, servers, results, stream, stream_ram, versions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fmt(v):
    return f"{v:,.0f}"


def stream_line(what, runs, gib):
    v = [x[0] for x in runs]
    return (f"{what}: {fmt(statistics.median(v))} MiB/s median ({fmt(min(v))}..{fmt(max(v))}), "
            f"sender {statistics.median(x[1] for x in runs) / gib:.2f} / receiver "
            f"{statistics.median(x[2] for x in runs) / gib:.2f} CPU s per GiB, {runs[0][3]}.")


def report(a, cells, servers, results, stream, stream_ram, versions):
    gib = a.copy_bytes / (1 << 30)
    names = []
    for ss in servers.values():
        for s in ss:
            base = s.name.rsplit("-", 1)[0]
            if base not in names:
                names.append(base)
    sm = statistics.median(x[0] for x in stream)
    smr = statistics.median(x[0] for x in stream_ram)
    lines = [
        "# TLS bulk copies: nbdvault and its peers",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/tlsbulk.py` on "
        f"this project's 2-core VM: nbdcopy {a.copy_bytes >> 20} MiB, write then read, "
        f"{a.reps} repetitions per cell after one unmeasured copy into each server, servers "
        "alternating (order reversed every repetition), TLS 1.3 with one RSA 3072 certificate for all, client nbdcopy "
        "(libnbd 1.14) on the same machine."
        + (f" `convert` rows: {version(QEMU_IMG)}, `qemu-img convert -n` of the export "
           "(one connection, qemu's defaults: 8 coroutines) to a `null-co` target."
           if any(c[0] == "convert" for c in cells) else ""),
        "",
    ]
    lines += [f"- {n}: {versions.get(n, '?')}" for n in names]
    lines += [
        "",
        "Each cell: MiB/s median (min..max) [server / client CPU seconds per GiB, medians]. "
        "Ratio: nbdvault against the best peer's median on the same backing; ~ where "
        "nbdvault's min..max and that peer's overlap.",
        "",
        f"Bare GnuTLS loopback stream (bench/stream, {a.copy_bytes >> 20} MiB, each kind "
        "measured once per cell):",
        "",
        "- " + stream_line("cached (one 256 KiB buffer per side)", stream, gib),
        "- " + stream_line(f"through RAM ({a.copy_bytes >> 20} MiB buffer per side)",
                           stream_ram, gib),
        "",
        "| op | conns | backing | " + " | ".join(names) +
        " | ratio | nbdvault / stream cached, through RAM |",
        "|---" * (len(names) + 5) + "|",
    ]
    for op, conns, backing in cells:
        row = [op, str(conns), backing]
        med = {}
        for n in names:
            runs = results.get((op, conns, backing, f"{n}-{backing}"))
            if not runs:
                row.append("—")
                continue
            v = [r[0] for r in runs]
            med[n] = (statistics.median(v), min(v), max(v))
            row.append(f"{fmt(med[n][0])} ({fmt(min(v))}..{fmt(max(v))}) "
                       f"[{statistics.median(r[1] for r in runs) / gib:.2f} / "
                       f"{statistics.median(r[2] for r in runs) / gib:.2f}]")
        peers = {n: m for n, m in med.items() if n != "nbdvault"}
        best = max(peers, key=lambda n: peers[n][0])
        mine = med["nbdvault"]
        overlap = mine[1] <= peers[best][2] and peers[best][1] <= mine[2]
        row.append(f"{mine[0] / peers[best][0]:.2f}{' ~' if overlap else ''} ({best})")
        row.append(f"{mine[0] / sm:.0%}, {mine[0] / smr:.0%}" if op != "write" else "")
        lines.append("| " + " | ".join(row) + " |")
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
