#!/usr/bin/python3
"""Fair service (issue 13, finding 4): a connection with a deep queue of expensive
requests may slow itself, not other clients.

Hogs run in their own processes (so that the Python interpreter's lock adds nothing to
the victim's figures) and keep hundreds of BLOCK_STATUS requests in flight; a victim on
another connection measures its own round trips.  The bound (median under 4 ms, 8 under
sanitizers) is a generous functional one; the figures themselves belong to
bench/fairness."""

import contextlib
import multiprocessing
import os
import statistics
import struct
import tempfile
import threading
import time
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

# Sanitizers make the server slower: the same bound, scaled, still tells a fair server
# from one that serves a backlog first.
SANITIZED = os.environ.get("NBDVAULT_SANITIZE", "none") != "none"
BOUND_MS = 4 * nbdv.SLOW * (2 if SANITIZED else 1)


def hog(sock_path, export, length, depth, seconds, ready):
    """Keep @depth BLOCK_STATUS(@length) requests in flight on @export for @seconds."""
    r = nbdv.Raw(sock_path, timeout=60)
    r.greet()
    r.go(export.encode(), structured=True, meta=True)
    size = r.size
    req = lambda i: struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_BLOCK_STATUS, i,
                                (i * length) % max(1, size - length), length)
    r.s.sendall(b"".join(req(i) for i in range(depth)))
    ready.set()
    # Refill in bursts of half the window: the server finds many requests at once.
    i, deadline = depth, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(depth // 2):
            rep = r.any_reply()
            assert rep[0] == "chunk" and r.error_of(rep) == 0, rep
        r.s.sendall(b"".join(req(i + k) for k in range(depth // 2)))
        i += depth // 2
    r.close()


def tls_setup():
    """A scratch directory with a PKI: (directory, PKI, configuration lines for one
    reactor requiring TLS, the client certificate's directory)."""
    tmp = tempfile.mkdtemp(prefix="nbdvault-fairness-")
    pki = nbdv.make_pki(os.path.join(tmp, "pki"))
    tls = f"workers: 1\ntls:\n  mode: require\n  certificates: {pki}\n"
    return tmp, pki, tls, os.path.join(pki, "clients", "client")


def tls_client(srv, client, export):
    """A libnbd handle on @export of @srv over TLS, with the certificate in @client."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(f"nbds+unix:///{export}?socket={srv.sock}&tls-certificates={client}")
    return h


def paced_reads(h, count, t0=None, interval=0.002):
    """Round trips (ms) of @count 4 KiB reads on handle @h, the i-th started at
    @t0 + i * @interval or as soon as the one before it has its reply (closed loop: a
    stall shows in the read caught in it; the bounds here are on the slowest read or
    the median of many)."""
    lat, t0 = [], time.monotonic() if t0 is None else t0
    for i in range(count):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        h.pread(4096, i * 4096)
        lat.append((time.monotonic() - t) * 1000)
    return lat


def option_flood(port, stop):
    """Before any TLS: pipeline NBD_OPT_LIST (answered NBD_REP_ERR_TLS_REQD) until
    @stop is set, a second thread reading every reply as it comes.  Returns the
    sender's thread."""
    r = nbdv.Raw(port=port, timeout=60)
    r.greet()
    blob = struct.pack(">QII", nbdv.IHAVEOPT, nbdv.OPT_LIST, 0) * 4096

    def drain():
        while not stop.is_set() and r.s.recv(1 << 20):
            pass

    def send():
        reader = threading.Thread(target=drain)
        reader.start()
        while not stop.is_set():
            r.s.sendall(blob)
        reader.join(60)
        r.close()
    t = threading.Thread(target=send)
    t.start()
    return t


def start_hogs(sock_path, export, length, depth, n, seconds):
    """@n hog processes on the server at unix socket @sock_path (also used by
    bench/fairness.py against other servers)."""
    ctx = multiprocessing.get_context("fork")
    procs = []
    for _ in range(n):
        ready = ctx.Event()
        p = ctx.Process(target=hog, args=(sock_path, export, length, depth, seconds, ready))
        p.start()
        assert ready.wait(30), "hog did not start"
        procs.append(p)
    time.sleep(0.3)  # let the backlog build up
    return procs


def victim_ms(sock_path, export, cmd, count, length=0, interval=0.01):
    """Round trips of @count requests sent at a steady pace (open loop, one every
    @interval seconds, whatever the replies do), in ms.  A closed loop would hide a
    stall: the one request caught in it is slow and the many sent right after are fast.
    """
    r = nbdv.Raw(sock_path, timeout=60)
    r.greet()
    r.go(export.encode())
    sent, got = {}, {}

    def reader():
        for _ in range(count):
            err, cookie, _ = r.simple_reply(length)
            got[cookie] = time.monotonic()
            assert err == 0, err

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.monotonic()
        r.request(cmd, 0, length, cookie=i)
    t.join(120)
    r.close()
    assert len(got) == count, f"{len(got)} of {count} replies"
    return [(got[i] - sent[i]) * 1000 for i in range(count)]


class FairnessTest(unittest.TestCase):
    def setUp(self):
        if nbdv.WRAPPER or "thread" in os.environ.get("NBDVAULT_SANITIZE", ""):
            # valgrind runs the server's threads one at a time, ~50x slower, and
            # ThreadSanitizer instruments every table lookup of the memory driver:
            # latency there says nothing about fairness (plain and ASan runs check it).
            self.skipTest("latency bounds mean nothing under valgrind or TSan")

    def victim_beside_hogs(self, srv, victim, hogs):
        """victim: (export, command, length); hogs: (export, BLOCK_STATUS length,
        depth, how many).  Asserts the victim's median round trip beside them."""
        export, cmd, length = victim
        base = victim_ms(srv.sock, export, cmd, 20, length)
        procs = start_hogs(srv.sock, *hogs, 4 * min(nbdv.SLOW, 2))
        loaded = victim_ms(srv.sock, export, cmd, 200, length)
        for p in procs:
            p.join(120)
            self.assertEqual(p.exitcode, 0)
        med = statistics.median(loaded)
        print(f"victim median {statistics.median(base):.2f} ms alone, {med:.2f} ms beside "
              f"{hogs[3]} hog(s) (max {max(loaded):.1f})")
        self.assertLess(med, BOUND_MS)

    def test_block_status_backlog_does_not_delay_another_flush(self):
        # File export: one connection with 512 BLOCK_STATUS(64 MiB) in flight over a
        # fragmented sparse file.  Before: the victim's FLUSH waited behind the whole
        # backlog on the I/O threads (0.34 ms -> 274 ms median).
        exports = """
  - name: frag
    driver: file
    path: {dir}/frag.img
    size: 1G
"""
        with nbdv.Server(exports) as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri("frag"))
            for off in range(0, 512 << 20, 128 << 10):  # 4096 data islands
                h.pwrite(b"d" * 4096, off)
            h.flush()
            nbdv.disconnect(h)
            self.victim_beside_hogs(srv, ("frag", nbdv.CMD_FLUSH, 0),
                                    ("frag", 64 << 20, 512, 1))

    def test_huge_block_status_on_memory_does_not_stall_the_reactor(self):
        # Memory export of 8 GiB: BLOCK_STATUS(4 GiB) ran on the reactor for 4-16 ms
        # each; two such connections pushed a victim's 4 KiB READ on another export
        # from 0.09 ms to 487 ms median.  Calls are cut at 64 MiB of table now (~0.1 ms),
        # and each connection takes 0.5 ms turns; but a connection that ended its turn
        # came back before the loop polled again (libev ran the read event it fed itself
        # in the same pass, and its own replies brought it back through the flusher),
        # so the victim still waited for every request the hogs had sent: 11-21 ms
        # median (28-42 under ASan).  It goes on after the next poll now: 0.6-0.9 ms.
        exports = """
  - name: big
    driver: memory
    size: 8G
  - name: mem
    driver: memory
    size: 64M
"""
        with nbdv.Server(exports, extra="workers: 1\n") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri("big"))
            for gib in range(8):  # one chunk in each GiB: every table level is there
                h.pwrite(b"d" * 4096, (gib << 30) + (5 << 20))
            nbdv.disconnect(h)
            self.victim_beside_hogs(srv, ("mem", nbdv.CMD_READ, 4096),
                                    ("big", (4 << 30) - 4096, 64, 2))

    @contextlib.contextmanager
    def tls_hogs_beside_a_victim(self, fill, hogs):
        """A one-reactor TLS server whose 96 MiB memory export `big` holds @fill bytes
        (copies of one random MiB), a libnbd victim on its `mem` export, and @hogs raw
        TLS connections to `big` with receive buffers (512 MiB) that never fill:
        yields (the MiB, the victim, the hogs)."""
        tmp, pki, tls, client = tls_setup()
        exports = """
  - name: big
    driver: memory
    size: 96M
  - name: mem
    driver: memory
    size: 64M
"""
        block = os.urandom(1 << 20)
        # MALLOC_PERTURB_ (meson sets it) fills each 32 MiB reply buffer as the reactor
        # allocates it, faulting in its pages there: 25-30 ms a read that a server run
        # without it never spends.
        with nbdv.Server(exports, extra=tls, tcp=True, tmpdir=tmp,
                         env={"MALLOC_PERTURB_": "0"}) as srv:
            h = tls_client(srv, client, "big")
            for off in range(0, fill, len(block)):
                h.pwrite(block, off)
            nbdv.disconnect(h)
            victim = tls_client(srv, client, "mem")
            raws = []
            for _ in range(hogs):
                try:
                    r = nbdv.Raw(port=srv.port, timeout=60, rcvbuf=512 << 20,
                                 rcvbuf_force=True)
                except PermissionError:
                    self.skipTest("SO_RCVBUFFORCE needs CAP_NET_ADMIN")
                r.greet()
                r.starttls(os.path.join(pki, "ca-cert.pem"))
                r.go(b"big")
                raws.append(r)
            yield block, victim, raws
            for r in raws:
                r.close()
            nbdv.disconnect(victim)

    def test_sending_large_tls_replies_takes_turns(self):
        # Four clients each ask for 3 x 32 MiB over TLS and read nothing, with receive
        # buffers larger than all of it: their sockets never fill, and the reactor has
        # ~0.3 s of encryption to do.  It used to send until a socket was full or its
        # queue empty: each whole 32 MiB reply (~25 ms here) went out before it looked at
        # another connection.  It sends for one turn (0.5 ms) at a time now.  And a read
        # that large of a memory export, copied on the reactor into a fresh buffer, held
        # it another 25-30 ms; it goes to the I/O threads now.  A TLS victim on the same
        # reactor reads 4 KiB every 2 ms meanwhile.  Its slowest read took 290-390 ms
        # before (one stall: the reactor sent everything queued at once) and 9-50 ms
        # after (the copies, now on the I/O threads, share the two cores with it).
        length, n = 32 << 20, 3
        with self.tls_hogs_beside_a_victim(n * length, 4) as (block, victim, hogs):
            t0 = time.monotonic()
            for r in hogs:
                for i in range(n):
                    r.request(nbdv.CMD_READ, i * length, length, cookie=i)
            lat = paced_reads(victim, 50, t0)
            for r in hogs:
                for _ in range(n):
                    err, cookie, data = r.simple_reply(length)
                    self.assertEqual((err, data[:len(block)]), (0, block))
        mean = statistics.mean(lat)
        lat.sort()
        print(f"TLS victim beside 4 x {n} x 32 MiB TLS replies: mean {mean:.2f} ms, median "
              f"{statistics.median(lat):.2f}, top 5 {[round(x, 1) for x in lat[-5:]]}")
        self.assertLess(lat[-1], 150 * nbdv.SLOW * (5 if SANITIZED else 1))

    def test_pipelined_tls_reads_into_a_large_buffer_take_turns(self):
        # One client pipelines 300 TLS READs of 256 KiB (nbdcopy's size) and has a
        # receive buffer that takes all 75 MiB.  Each reply that leaves makes room for
        # its next READs, so the connection came back to the flusher after each of its
        # turns and the reactor did not poll until all were sent: the victim's slowest
        # read took 55-110 ms, once per burst.  A flusher pass lasts a turn now, then
        # the loop polls: 1-4 ms.
        size, n = 256 * 1024, 300
        worst = []
        with self.tls_hogs_beside_a_victim(n * size, 1) as (block, victim, (r,)):
            for _ in range(3):
                t0 = time.monotonic()
                r.s.sendall(nbdv.read_requests(n, size))
                lat = paced_reads(victim, 50, t0)
                self.assertEqual(r.simple_replies(n, size), set(range(n)))
                worst.append(max(lat))
        print(f"TLS victim beside 3 x {n} pipelined 256 KiB TLS READs: slowest read per "
              f"burst {[round(x, 1) for x in worst]} ms")
        self.assertLess(max(worst), 20 * nbdv.SLOW * (5 if SANITIZED else 1))

    def test_unauthenticated_option_flood_takes_turns(self):
        # Options were processed without turns: a client that pipelines cheap options
        # and reads the replies, before TLS and without credentials, kept the reactor
        # on a whole input buffer of them (~4,000) at a time.  Four such clients pushed
        # a TLS victim's 4 KiB READ on the same reactor from 0.07 ms to 10.6-11.3 ms
        # median (two: 4-6 ms; each client adds its share).  Options take turns like
        # requests now: 0.20-0.24 ms.  (The floods run as threads of this process: in
        # processes of their own they sometimes flooded too little to show it.)
        tmp, pki, tls, client = tls_setup()
        exports = """
  - name: mem
    driver: memory
    size: 64M
"""
        with nbdv.Server(exports, extra=tls, tcp=True, tmpdir=tmp) as srv:
            victim = tls_client(srv, client, "mem")
            stop = threading.Event()
            floods = [option_flood(srv.port, stop) for _ in range(4)]
            try:
                time.sleep(0.5)
                lat = paced_reads(victim, 500)
            finally:
                stop.set()
                for t in floods:
                    t.join(60)
            self.assertEqual(victim.pread(4096, 0), bytes(4096))  # still served
            nbdv.disconnect(victim)
        med = statistics.median(lat)
        print(f"TLS victim beside 4 option floods: median {med:.2f} ms, max {max(lat):.1f}")
        self.assertLess(med, BOUND_MS)


if __name__ == "__main__":
    nbdv.main()
