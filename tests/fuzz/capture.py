#!/usr/bin/python3
"""Record what real NBD clients send, as fuzzing seeds.

    tests/fuzz/capture.py NBDVAULT OUTDIR

Starts nbdvault on a unix socket, puts a recording proxy in front of it, runs nbdinfo,
nbdsh-free libnbd calls and qemu-io through the proxy, and writes each session's
client-to-server bytes to OUTDIR/options/ (the whole session after the greeting) and
the request stream after GO to OUTDIR/transmission/ (first byte: the harness's mode)."""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import nbdv  # noqa: E402


def proxy(listen_path, target, sessions):
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen_path)
    ls.listen(16)

    def pipe(a, b, record):
        while True:
            try:
                d = a.recv(65536)
            except OSError:
                d = b""
            if not d:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if record is not None:
                record.append(d)
            b.sendall(d)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            rec = []
            sessions.append(rec)
            threading.Thread(target=pipe, args=(c, s, rec), daemon=True).start()
            threading.Thread(target=pipe, args=(s, c, None), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ls


def split_requests(stream):
    """(mode, requests) after the GO/EXPORT_NAME in a client stream, or None."""
    pos, mode = 4, 0
    while pos + 16 <= len(stream):
        _, opt, ln = struct.unpack(">QII", stream[pos:pos + 16])
        pos += 16 + ln
        if opt == 8:
            mode |= 1
        if opt == 10:
            mode |= 2
        if opt in (1, 7):
            return mode, stream[pos:]
    return None


def main():
    nbdv.NBDVAULT = sys.argv[1]
    out = sys.argv[2]
    for d in ("options", "transmission"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    sessions = []
    with nbdv.Server() as srv:
        px = os.path.join(srv.dir, "proxy")
        proxy(px, srv.sock, sessions)
        uri = f"nbd+unix:///mem?socket={px}"
        cmds = [
            ["nbdinfo", "--list", f"nbd+unix:///?socket={px}"],
            ["nbdinfo", "--map", uri],
            ["qemu-io", "-f", "raw", "-c", "write -P 0x41 0 4k", "-c", "read -P 0x41 0 4k",
             "-c", "discard 64k 64k", "-c", "write -z 128k 4k", "-c", "flush", uri],
            ["/usr/bin/python3", "-c",
             "import nbd; h=nbd.NBD(); h.add_meta_context('base:allocation');"
             f"h.connect_uri('{uri}'); h.pwrite(b'x'*512, 4096, nbd.CMD_FLAG_FUA);"
             "h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE|nbd.CMD_FLAG_FAST_ZERO);"
             "h.cache(4096, 0); h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE);"
             "h.pread(1024, 0); h.shutdown()"],
            ["/usr/bin/python3", "-c",
             "import nbd; h=nbd.NBD(); h.set_request_structured_replies(False);"
             f"h.connect_uri('{uri}'); h.pread(512, 0); h.trim(4096, 0); h.shutdown()"],
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    for i, rec in enumerate(sessions):
        stream = b"".join(rec)
        if not stream:
            continue
        with open(os.path.join(out, "options", f"session-{i}"), "wb") as f:
            f.write(stream)
        sr = split_requests(stream)
        if sr and sr[1]:
            with open(os.path.join(out, "transmission", f"session-{i}"), "wb") as f:
                f.write(bytes([sr[0]]) + sr[1])
    print(f"captured {len(sessions)} sessions into {out}")


if __name__ == "__main__":
    main()
