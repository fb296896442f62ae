#!/usr/bin/python3
"""Side-by-side NBD server benchmark (called by bench/run).

Servers: nbdvault (memory and file export), nbdkit (memory and file plugins), qemu-nbd
(raw file, --cache=writeback --aio=io_uring), each plain and with TLS (x509, TLS 1.3,
the same ECDSA certificate for all but qemu-nbd 10, which gets an RSA one), on
127.0.0.1.  Workloads alternate between servers and repeat; the table reports the
median, min..max, server and client CPU, and the ratio of nbdvault to the best peer on
the same kind of backing.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QEMU_NBD, ROOT, free_port, make_pki, random_file, timed, version  # noqa: E402

NBDVAULT = os.path.join(ROOT, "build-release", "nbdvault")
NBDLOAD = os.path.join(ROOT, "build-release", "nbdload")
STREAM = os.path.join(ROOT, "build-release", "stream")
RESUME = os.path.join(ROOT, "build-release", "resume")
PEERS = {"nbdkit": "nbdkit", "qemu-nbd": QEMU_NBD}
PY = "/usr/bin/python3"
GIB = 1 << 30
# fio and nbdload keep to the first GiB of the 2 GiB exports, where the copies wrote data:
# past it a read is of a hole, which nbdvault answers with a hole chunk and no payload.
LOAD_SPAN = GIB


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


class Server:
    def __init__(self, kind, backing, tls, work, pki, tag="", binary=None, label=None,
                 extra=""):
        """A @kind (nbdvault, nbdkit, qemu-nbd) server on a @backing (memory, file)
        export; @binary overrides the program (a second nbdkit version), @label the
        name it is reported under (default KIND-BACKING), @extra adds top-level lines to
        nbdvault's configuration."""
        self.kind, self.backing, self.tls = kind, backing, tls
        self.name = f"{label or kind}-{backing}"
        self.port = free_port()
        self.work, self.pki = work, pki
        img = os.path.join(work, f"{label or kind}-{'tls' if tls else 'plain'}{tag}.img")
        if backing == "file":
            with open(img, "wb") as f:
                f.truncate(2 * GIB)
        if kind == "nbdvault":
            cfg = os.path.join(work, f"nbdvault-{backing}-{tls}{tag}.yaml")
            with open(cfg, "w") as f:
                f.write(f"listen:\n  - address: 127.0.0.1\n    port: {self.port}\n"
                        "default-export: d\nlimits:\n  max-connections: 4096\n" + extra)
                if tls:
                    f.write(f"tls:\n  certificates: {pki}\n")
                f.write("exports:\n  - name: d\n")
                f.write(f"    driver: file\n    path: {img}\n" if backing == "file" else
                        "    driver: memory\n    size: 2G\n")
            argv = [binary or NBDVAULT, "-c", cfg]
        elif kind == "nbdkit":
            argv = [binary or PEERS["nbdkit"], "-f", "-i", "127.0.0.1", "-p", str(self.port)]
            if tls:
                argv += ["--tls=require", f"--tls-certificates={pki}"]
            argv += ["file", img] if backing == "file" else ["memory", "2G"]
        else:
            argv = [binary or PEERS["qemu-nbd"], "-t", "-b", "127.0.0.1", "-p", str(self.port), "-e", "4096",
                    "-f", "raw", "--cache=writeback", "--aio=io_uring", "-x", "d"]
            if tls:
                argv += ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,"
                         "verify-peer=off", "--tls-creds=tls0"]
            argv += [img]
        self.log = open(os.path.join(work, f"{self.name}-{tls}{tag}.log"), "wb")
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log,
                                     preexec_fn=raise_nofile)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {argv}")
                time.sleep(0.05)
        client = os.path.join(pki, "clients", "client")
        self.uri = (f"nbds://127.0.0.1:{self.port}/d?tls-certificates={client}" if tls else
                    f"nbd://127.0.0.1:{self.port}/d")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def nbdcopy_conns(conns):
    """nbdcopy's options for @conns connections (None: its defaults).  nbdcopy opens no
    more connections than it runs threads, and its threads default to the number of
    cores: --connections=4 alone opens 2 on a 2-core machine (`nbdcopy -v` prints
    connections=2), so the threads are asked for too."""
    return [f"--connections={conns}", f"--threads={conns}"] if conns else []


def w_nbdcopy_write(server, a, conns):
    argv = ["nbdcopy", "--flush"] + nbdcopy_conns(conns) + [a.src, server.uri]
    return timed(server, argv, lambda out, wall: a.copy_bytes / wall / 2**20)


def w_nbdcopy_read(server, a, conns):
    argv = ["nbdcopy"] + nbdcopy_conns(conns) + [server.uri, "null:"]
    return timed(server, argv, lambda out, wall: a.copy_bytes / wall / 2**20)


def w_fio(server, a, rw, bs, qd):
    if server.tls:  # fio's nbd engine cannot load TLS files: use nbdload
        argv = [NBDLOAD, server.uri, "seqread" if rw == "read" else rw, str(bs), str(qd),
                str(a.seconds), str(LOAD_SPAN)]
        unit = (lambda out, wall: int(out.split()[0]) / float(out.split()[2])) if bs < 65536 \
            else (lambda out, wall: int(out.split()[1]) / float(out.split()[2]) / 2**20)
        return timed(server, argv, unit)
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={qd}", f"--runtime={a.seconds}", "--time_based",
            f"--size={LOAD_SPAN}", "--output-format=json"]

    def parse(out, wall):
        j = json.loads(out[out.index("{"):])["jobs"][0]
        side = j["write"] if "write" in rw else j["read"]
        return side["iops"] if bs < 65536 else side["bw_bytes"] / 2**20
    return timed(server, argv, parse)


def w_latency(server, a, rw):
    argv = [NBDLOAD, server.uri, rw, "4096", "1", str(a.seconds), str(LOAD_SPAN)]
    return timed(server, argv, lambda out, wall: (float(out.split()[3]), float(out.split()[4])))


CONNECT_LOOP = r"""
import nbd, sys, time
uri, secs = sys.argv[1], float(sys.argv[2])
n, end = 0, time.monotonic() + secs
t0 = time.monotonic()
while time.monotonic() < end:
    h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(uri); h.shutdown(); n += 1
print(n / (time.monotonic() - t0))
"""

IDLE_CONNS = r"""
import nbd, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
hs = []
for i in range(int(sys.argv[2])):
    h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1]); hs.append(h)
print("ready", flush=True)
sys.stdin.readline()
"""


def w_connects(server, a):
    return timed(server, [PY, "-c", CONNECT_LOOP, server.uri, str(a.seconds)],
                 lambda out, wall: float(out.strip()))


def idle_conns(uri, n):
    """n connections that sit idle after GO; .stdin.write('\\n') closes them."""
    p = subprocess.Popen([PY, "-c", IDLE_CONNS, uri, str(n)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("idle connections failed")
    return p


def w_idle_rss(server, a):
    """VmRSS growth per idle connection, on a fresh server of the same kind: one that
    has run the other workloads would place the connections in memory those already
    dirtied, and its figure would mean little.  20 connections first warm up pools
    and the export."""
    fresh = Server(server.kind, server.backing, server.tls, server.work, server.pki,
                   tag="-idle")
    held = []
    try:
        held.append(idle_conns(fresh.uri, 20))
        time.sleep(0.3)
        before = rss_kib(fresh.proc.pid)
        held.append(idle_conns(fresh.uri, a.idle))
        time.sleep(0.5)
        after = rss_kib(fresh.proc.pid)
    finally:
        for p in held:
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(120)
        fresh.stop()
    return (after - before) / a.idle, 0.0, 0.0, 0.0


def run_stream(kind, nbytes, pki, span=None):
    """One bench/stream run of @nbytes (tcp or tls), from one cached buffer per side or,
    with @span, through buffers of that many bytes: (MiB/s, sender CPU s, receiver CPU
    s, cipher)."""
    p = subprocess.run([STREAM, kind, str(nbytes), pki] + ([str(span)] if span else []),
                       capture_output=True, text=True, timeout=300, check=True)
    f = p.stdout.split()
    return float(f[0]), float(f[1]), float(f[2]), f[3]


def ceilings(a, pki):
    """Bare loopback stream limits (no NBD): what any server could reach here.  The TLS
    stream twice: from one cached buffer, and through buffers of the copy's size (every
    byte read from RAM and written to RAM, as a server and its client must)."""
    return {(kind, span): [run_stream(kind, a.copy_bytes * 2, pki, span)
                           for _ in range(a.reps)]
            for kind, span in (("tcp", None), ("tls", None), ("tls", a.copy_bytes))}


def w_reconnects(server, a, pki, mode):
    """bench/resume: TLS connections (handshake + GO + disconnect) per second, with a
    full handshake each time or resuming the previous session from its ticket."""
    argv = [RESUME, "127.0.0.1", str(server.port), "d", str(a.seconds),
            os.path.join(pki, "clients", "client"), mode]
    return timed(server, argv, lambda out, wall: tuple(float(x) for x in out.split()[:3]))


def handshake_cost(a, work, pki_by_key):
    """Server CPU per TLS connection, full handshake and resumed (session ticket), for
    ECDSA and RSA certificates.  Values: (conn/s, server CPU ms per connection,
    fraction of connections resumed)."""
    out = {}
    for key, pki in pki_by_key.items():
        servers = [Server(k, "memory", True, work, pki) for k in ("nbdvault", "nbdkit")]
        try:
            for rep in range(a.reps):
                for s in (servers if rep % 2 == 0 else servers[::-1]):
                    for mode in ("full", "resume"):
                        (rate, resumed, n), srv_cpu, _, _ = w_reconnects(s, a, pki, mode)
                        out.setdefault((key, s.kind, mode), []).append(
                            (rate, srv_cpu / n * 1e3, resumed / n))
        finally:
            for s in servers:
                s.stop()
    return out


def workloads(quick):
    w = [
        ("nbdcopy write 1 conn", "MiB/s", lambda s, a: w_nbdcopy_write(s, a, 1)),
        ("nbdcopy read 1 conn", "MiB/s", lambda s, a: w_nbdcopy_read(s, a, 1)),
        ("nbdcopy write default", "MiB/s", lambda s, a: w_nbdcopy_write(s, a, None)),
        ("nbdcopy read default", "MiB/s", lambda s, a: w_nbdcopy_read(s, a, None)),
        ("4k randread qd32", "IOPS", lambda s, a: w_fio(s, a, "randread", 4096, 32)),
        ("4k randwrite qd32", "IOPS", lambda s, a: w_fio(s, a, "randwrite", 4096, 32)),
        ("4k randread qd1", "IOPS", lambda s, a: w_fio(s, a, "randread", 4096, 1)),
        ("4k randwrite qd1", "IOPS", lambda s, a: w_fio(s, a, "randwrite", 4096, 1)),
        ("1M seqread qd8", "MiB/s", lambda s, a: w_fio(s, a, "read", 1 << 20, 8)),
        ("4k randread qd1 latency", "us mean/p99", lambda s, a: w_latency(s, a, "randread")),
        ("connections per second", "conn/s", w_connects),
        ("idle connection RSS", "KiB/conn", w_idle_rss),
    ]
    if quick:
        keep = {"nbdcopy write default", "nbdcopy read default", "4k randread qd32",
                "4k randwrite qd32", "4k randread qd1 latency", "connections per second",
                "idle connection RSS"}
        w = [x for x in w if x[0] in keep]
    return w


LOWER_IS_BETTER = {"idle connection RSS", "4k randread qd1 latency"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short run, under 3 minutes")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    a.reps = 1 if a.quick else 3
    a.seconds = 1 if a.quick else 3
    a.copy_bytes = (256 << 20) if a.quick else GIB
    a.idle = 200 if a.quick else 1000
    raise_nofile()
    work = tempfile.mkdtemp(prefix="nbdvault-bench-", dir="/tmp")
    pki = make_pki(os.path.join(work, "pki"))
    rsa_pki = make_pki(os.path.join(work, "pki-rsa"), rsa=True)
    a.src = random_file(os.path.join(work, "src.img"), a.copy_bytes)
    kinds = [("nbdvault", "memory"), ("nbdvault", "file"), ("nbdkit", "memory"),
             ("nbdkit", "file"), ("qemu-nbd", "file")]
    results = {}  # (mode, workload, server) -> list of (value, srv_cpu, cli_cpu, wall)
    started = time.monotonic()
    a.ceil = ceilings(a, pki)
    print(f"stream ceilings done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    a.hs = handshake_cost(a, work, {"ECDSA P-256": pki, "RSA 3072": rsa_pki})
    print(f"handshake cost done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    for tls in (False, True):
        mode = "TLS" if tls else "plain"
        # qemu-nbd 10 refuses an ECDSA server certificate: its key usage (critical, as
        # certtool writes it) lacks key encipherment.  It gets the RSA one.
        servers = [Server(k, b, tls, work, rsa_pki if k == "qemu-nbd" else pki)
                   for k, b in kinds]
        try:
            for wname, unit, fn in workloads(a.quick):
                for rep in range(a.reps):
                    order = servers if rep % 2 == 0 else list(reversed(servers))
                    for s in order:
                        try:
                            r = fn(s, a)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {mode} {wname} {s.name}: {e}", file=sys.stderr)
                            continue
                        results.setdefault((mode, wname, s.name), []).append(r)
                print(f"{mode:5} {wname:26} done ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr)
        finally:
            for s in servers:
                s.stop()
    shutil.rmtree(work, ignore_errors=True)
    write_report(a, results, kinds)


def versions():
    return {
        "nbdvault": version(NBDVAULT),
        "nbdkit": version(PEERS["nbdkit"]),
        "qemu-nbd": version(PEERS["qemu-nbd"]),
        "libnbd": version("nbdcopy"),
        "fio": version("fio"),
        "gnutls": version("certtool"),
        "kernel": platform.release(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "?"),
        "cores": os.cpu_count(),
    }


def fmt(x):
    if isinstance(x, tuple):
        return f"{x[0]:.0f}/{x[1]:.0f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ratio(r):
    """A ratio to two decimals; above 99 (say, an idle cost near zero) just '>99'.
    None: no ratio; (ratio, True): the two servers' min..max ranges overlap ('~')."""
    if r is None:
        return "—"
    r, overlap = r if isinstance(r, tuple) else (r, False)
    return (">99" if r >= 99.5 else f"{r:.2f}") + (" ~" if overlap else "")


def summary(vals):
    """(median, min, max) of the first element (mean latency for tuples)."""
    key = [v[0][0] if isinstance(v[0], tuple) else v[0] for v in vals]
    return statistics.median(key), min(key), max(key)


def write_report(a, results, kinds):
    os.makedirs(a.out, exist_ok=True)
    names = [f"{k}-{b}" for k, b in kinds]
    lines = ["# nbdvault benchmark", "",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{'quick' if a.quick else 'full'} mode, {a.reps} repetition(s), "
             f"{a.seconds} s per timed run, nbdcopy of {a.copy_bytes >> 20} MiB, "
             f"{a.idle} idle connections.", ""]
    for k, v in versions().items():
        lines.append(f"- {k}: {v}")
    lines += ["", "Each cell: median (min..max) [server CPU s / client CPU s, median]. "
              "Ratio: nbdvault on memory vs nbdkit memory; nbdvault on file vs the best of "
              "nbdkit file and qemu-nbd; > 1.00 means nbdvault is better (for RSS and "
              "latency, lower is better and the ratio is inverted). A ratio marked ~: "
              "nbdvault's min..max range and the best peer's overlap, so the difference "
              "is within this run's spread.", ""]
    lines += ["## Ceilings (no NBD, same machine, same run)", "",
              "| stream | MiB/s median (min..max) | sender CPU s | receiver CPU s | cipher |",
              "|---|---|---|---|---|"]
    for (kind, span), runs in a.ceil.items():
        v = [r[0] for r in runs]
        through = f", through {span >> 20} MiB buffers" if span else ""
        lines.append(f"| bare {kind.upper()} loopback, {a.copy_bytes * 2 >> 20} MiB{through} | "
                     f"{statistics.median(v):,.0f} ({min(v):,.0f}..{max(v):,.0f}) | "
                     f"{statistics.median(r[1] for r in runs):.2f} | "
                     f"{statistics.median(r[2] for r in runs):.2f} | {runs[0][3]} |")
    lines += ["", "## TLS connection cost (handshake + GO + disconnect, memory export, "
              "bench/resume client)", "",
              "Full: a new TLS 1.3 handshake every time. Resumed: each connection offers "
              "the session ticket of the previous one (nbdkit 1.32 issues no tickets, so its "
              "resumed row is full handshakes).", "",
              "| certificate | server | handshake | conn/s median | server CPU ms per "
              "connection | resumed |", "|---|---|---|---|---|---|"]
    for (key, kind, mode), runs in sorted(a.hs.items()):
        lines.append(f"| {key} | {kind} | {mode} | "
                     f"{statistics.median(r[0] for r in runs):,.0f} | "
                     f"{statistics.median(r[1] for r in runs):.2f} | "
                     f"{statistics.median(r[2] for r in runs):.0%} |")
    lines.append("")
    plot = []
    tally = {"above": 0, "below": 0, "below ~": 0}
    for mode in ("plain", "TLS"):
        lines += [f"## {mode}", "",
                  "| workload | unit | " + " | ".join(names) + " | ratio mem | ratio file |",
                  "|---" * (len(names) + 4) + "|"]
        for wname, unit, _ in workloads(a.quick):
            cells, med, rng = [], {}, {}
            for n in names:
                vals = results.get((mode, wname, n))
                if not vals:
                    cells.append("—")
                    continue
                m, lo, hi = summary(vals)
                med[n] = m
                rng[n] = (lo, hi)
                extra = ""
                if isinstance(vals[0][0], tuple):
                    p99 = statistics.median(v[0][1] for v in vals)
                    extra = f" p99 {p99:.0f}"
                cpu = f" [{statistics.median(v[1] for v in vals):.2f}/" \
                      f"{statistics.median(v[2] for v in vals):.2f}]" if vals[0][3] else ""
                cells.append(f"{fmt(m)}{extra} ({fmt(lo)}..{fmt(hi)}){cpu}")

            def ratio(ours, peers):
                peers = [p for p in peers if p in med]
                if ours not in med or not peers or not med[ours]:
                    return None
                lower = wname in LOWER_IS_BETTER
                best = (min if lower else max)(peers, key=lambda p: med[p])
                r = med[best] / med[ours] if lower else med[ours] / med[best]
                overlap = rng[ours][0] <= rng[best][1] and rng[best][0] <= rng[ours][1]
                tally["above" if r >= 1 else "below ~" if overlap else "below"] += 1
                return r, overlap
            rm = ratio("nbdvault-memory", ["nbdkit-memory"])
            rf = ratio("nbdvault-file", ["nbdkit-file", "qemu-nbd-file"])
            lines.append(f"| {wname} | {unit} | " + " | ".join(cells) +
                         f" | {fmt_ratio(rm)} | {fmt_ratio(rf)} |")
            best = {}
            for n in names:
                if n in med:
                    peers = [med[p] for p in med if not p.startswith("nbdvault")]
                    if peers and med[n]:
                        ref = (min(peers) if wname in LOWER_IS_BETTER else max(peers))
                        best[n] = (ref / med[n]) if wname in LOWER_IS_BETTER else med[n] / ref
            plot.append((f"{mode}: {wname}", best))
        lines.append("")
    lines.append(f"Ratio cells: {tally['above']} at or above 1.00, "
                 f"{tally['below ~'] + tally['below']} below, of which {tally['below ~']} "
                 f"within the run's spread (~).")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        dump = {f"{m}|{w}|{s}": v for (m, w, s), v in results.items()}
        dump.update({f"tls-connection|{k}|{s}|{m}": v for (k, s, m), v in a.hs.items()})
        json.dump(dump, f, indent=1)
    write_svg(os.path.join(a.out, "results.svg"), plot, names)
    print("\n".join(lines))


def write_svg(path, plot, names):
    """Bars per workload, relative to the best peer (1.0 = as good as the best peer)."""
    colours = ["#1f77b4", "#6baed6", "#d62728", "#ff9896", "#2ca02c"]
    bar, gap, left, top = 9, 14, 250, 40
    height = top + len(plot) * (len(names) * bar + gap) + 60
    width = left + 520
    scale = 200  # pixels per 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="13">Relative to the best peer '
           '(higher is better; 1.0 = best of nbdkit/qemu-nbd)</text>']
    y = top
    for label, vals in plot:
        out.append(f'<text x="{left - 6}" y="{y + len(names) * bar / 2 + 4}" '
                   f'text-anchor="end">{label}</text>')
        for i, n in enumerate(names):
            v = vals.get(n)
            if v is not None:
                w = max(1, min(v, 2.5) * scale)
                out.append(f'<rect x="{left}" y="{y + i * bar}" width="{w:.1f}" '
                           f'height="{bar - 1}" fill="{colours[i]}"/>')
                out.append(f'<text x="{left + w + 3}" y="{y + i * bar + bar - 2}" '
                           f'font-size="8">{fmt_ratio(v).replace(">", "&gt;")}</text>')
        y += len(names) * bar + gap
    out.append(f'<line x1="{left + scale}" y1="{top - 5}" x2="{left + scale}" y2="{y}" '
               'stroke="black" stroke-dasharray="4 3"/>')
    for i, n in enumerate(names):
        lx = 10 + i * 150  # legend entries: 150 px apart, from the left edge
        out.append(f'<rect x="{lx}" y="{y + 15}" width="10" height="10" '
                   f'fill="{colours[i]}"/><text x="{lx + 14}" y="{y + 24}">{n}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
