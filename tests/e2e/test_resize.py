#!/usr/bin/python3
"""NBD_CMD_RESIZE (issue 15, spec branch extension-resize): the new size in the offset
field, one live size per export, every refusal the branch names.  No packaged client
sends RESIZE yet: raw sockets, with libnbd to check what other clients then see."""

import os
import struct
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

CMD_RESIZE = 8
FLAG_SEND_RESIZE = 1 << 9
ESHUTDOWN = 108

EXPORTS = """
  - name: mem
    driver: memory
    size: 64M
    resizable: true
    max-size: 1G
  - name: fixed
    driver: memory
    size: 64M
  - name: ro
    driver: memory
    size: 64M
    readonly: true
    resizable: true
  - name: aligned
    driver: memory
    size: 64M
    resizable: true
    minimum-block-size: 4K
  - name: file
    driver: file
    path: {dir}/disk.img
    size: 16M
    resizable: true
"""
M = 1 << 20


class ResizeTest(unittest.TestCase):
    def setUp(self):
        self.srv = nbdv.Server(EXPORTS).start()
        self.addCleanup(self.srv.__exit__, None, None, None)

    def raw(self, name=b"mem", **kw):
        r = nbdv.Raw(self.srv.sock)
        self.addCleanup(r.close)
        r.greet()
        r.go(name, **kw)
        return r

    def resize(self, r, size, cookie=1, length=0):
        r.request(CMD_RESIZE, size, length, cookie=cookie)
        err, c, _ = r.simple_reply()
        self.assertEqual(c, cookie)
        return err

    def libnbd_size(self, name="mem"):
        h = nbd.NBD()
        h.connect_uri(self.srv.uri(name))
        size = h.get_size()
        nbdv.disconnect(h)
        return size

    def test_flag_only_where_configured(self):
        self.assertTrue(self.raw(b"mem").tflags & FLAG_SEND_RESIZE)
        r = self.raw(b"fixed")
        self.assertFalse(r.tflags & FLAG_SEND_RESIZE)
        self.assertEqual(self.resize(r, 128 * M), nbdv.EINVAL)  # not a command here
        self.assertEqual(self.libnbd_size("fixed"), 64 * M)

    def test_grow_is_seen_by_every_connection_at_once(self):
        other = self.raw(b"mem")  # open before the resize
        meta = self.raw(b"mem", structured=True, meta=True)  # and one for block status
        r = self.raw(b"mem")
        other.request(nbdv.CMD_WRITE, 100 * M, 4096, cookie=1, data=b"x" * 4096)
        self.assertEqual(other.simple_reply()[:2], (nbdv.ENOSPC, 1))  # beyond 64 MiB
        meta.request(nbdv.CMD_BLOCK_STATUS, 100 * M, 4096, cookie=11)
        self.assertEqual(meta.error_of(meta.any_reply()), nbdv.EINVAL)  # past the end
        self.assertEqual(self.resize(r, 128 * M), 0)
        # Block status now describes the grown range (a hole: nothing written there).
        meta.request(nbdv.CMD_BLOCK_STATUS, 100 * M, 4096, cookie=12)
        kind, flags, rtype, cookie, payload = meta.any_reply()
        self.assertEqual((rtype, cookie), (5, 12))  # NBD_REPLY_TYPE_BLOCK_STATUS
        length, state = struct.unpack(">II", payload[4:12])
        self.assertEqual((length, state & 1), (4096, 1))  # NBD_STATE_HOLE
        other.request(nbdv.CMD_WRITE, 100 * M, 4096, cookie=2, data=b"x" * 4096)
        self.assertEqual(other.simple_reply()[:2], (0, 2))
        r.request(nbdv.CMD_READ, 100 * M, 4096, cookie=3)
        self.assertEqual(r.simple_reply(4096), (0, 3, b"x" * 4096))
        self.assertEqual(self.libnbd_size(), 128 * M)  # a new GO reports it
        info = nbdv.Raw(self.srv.sock)
        info.greet()
        rep = info.opt(nbdv.OPT_INFO, struct.pack(">I", 3) + b"mem\0\0")
        sizes = [struct.unpack(">HQH", p[:12])[1] for t, p in rep
                 if t == nbdv.REP_INFO and p[:2] == b"\0\0"]
        self.assertEqual(sizes, [128 * M])  # and INFO
        info.close()
        self.assertIn("resized to 134217728 bytes", self.srv.logtext())

    def test_shrink_refused_while_others_are_open_then_enospc_beyond(self):
        r = self.raw(b"mem")
        r.request(nbdv.CMD_WRITE, 40 * M, 4096, cookie=1, data=b"a" * 4096)
        self.assertEqual(r.simple_reply()[:2], (0, 1))
        other = self.raw(b"mem")
        self.assertEqual(self.resize(r, 32 * M, cookie=2), nbdv.EPERM)
        other.close()
        import time
        deadline = time.monotonic() + 5 * nbdv.SLOW
        while self.resize(r, 32 * M, cookie=3) == nbdv.EPERM:  # until the close lands
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        # Beyond the new end but within the old: ENOSPC for reads and writes alike.
        for cmd, data, cookie in ((nbdv.CMD_READ, b"", 4), (nbdv.CMD_WRITE, b"b" * 4096, 5),
                                  (nbdv.CMD_TRIM, b"", 6)):
            r.request(cmd, 40 * M, 4096, cookie=cookie, data=data)
            self.assertEqual(r.simple_reply()[:2], (nbdv.ENOSPC, cookie))
        # Beyond anything this client was told: the usual EINVAL for a read.
        r.request(nbdv.CMD_READ, 100 * M, 4096, cookie=7)
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 7))
        r.request(nbdv.CMD_READ, 0, 4096, cookie=8)
        self.assertEqual(r.simple_reply(4096)[:2], (0, 8))
        # Growing again: what was cut away reads as zeroes, never stale data.
        self.assertEqual(self.resize(r, 64 * M, cookie=9), 0)
        r.request(nbdv.CMD_READ, 40 * M, 4096, cookie=10)
        self.assertEqual(r.simple_reply(4096), (0, 10, bytes(4096)))
        # A shrink to a size that ends inside a chunk clears that chunk's tail.
        r.request(nbdv.CMD_WRITE, 0, 8192, cookie=11, data=b"c" * 8192)
        self.assertEqual(r.simple_reply()[:2], (0, 11))
        self.assertEqual(self.resize(r, 5000, cookie=12), 0)
        self.assertEqual(self.resize(r, 8192, cookie=13), 0)
        r.request(nbdv.CMD_READ, 0, 8192, cookie=14)
        self.assertEqual(r.simple_reply(8192), (0, 14, b"c" * 5000 + bytes(3192)))

    def test_resize_under_concurrent_io(self):
        # Four libnbd clients write and read back their own regions while a fifth
        # connection grows the export 16 times (growth is allowed while others are
        # open): every RESIZE succeeds, no client sees an error or stale data.
        import threading
        errors, stop = [], threading.Event()

        def client(idx):
            h = nbd.NBD()
            h.connect_uri(self.srv.uri("mem"))
            base = idx * 8 * M
            i = 0
            while not stop.is_set() and i < 20000:
                data = os.urandom(4096)
                off = base + (i % 2048) * 4096
                h.pwrite(data, off)
                if h.pread(4096, off) != data:
                    errors.append(f"client {idx}: stale data at {off}")
                    break
                i += 1
            nbdv.disconnect(h)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        r = self.raw(b"mem")
        import time
        for k in range(16):
            time.sleep(0.02)  # with the clients' I/O in flight
            self.assertEqual(self.resize(r, (64 + 32 * (k + 1)) * M, cookie=k + 1), 0)
        stop.set()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(self.libnbd_size(), (64 + 32 * 16) * M)
        r.request(nbdv.CMD_READ, (64 + 32 * 16) * M - 4096, 4096, cookie=99)
        self.assertEqual(r.simple_reply(4096), (0, 99, bytes(4096)))

    def test_refusals(self):
        r = self.raw(b"mem")
        self.assertEqual(self.resize(r, 2 << 30), nbdv.ENOSPC)  # over max-size
        self.assertEqual(self.resize(r, 128 * M, length=512), nbdv.EINVAL)
        ro = self.raw(b"ro")
        self.assertEqual(self.resize(ro, 128 * M), nbdv.EPERM)
        self.assertEqual(self.libnbd_size(), 64 * M)

    def test_size_not_a_multiple_of_the_minimum_block_size(self):
        h = nbd.NBD()
        h.connect_uri(self.srv.uri("aligned"))
        self.assertEqual(h.get_block_size(nbd.SIZE_MINIMUM), 4096)  # advertised
        nbdv.disconnect(h)
        r = self.raw(b"aligned")
        self.assertEqual(self.resize(r, 64 * M + 1000), nbdv.EINVAL)
        self.assertEqual(self.resize(r, 64 * M + 512, cookie=2), nbdv.EINVAL)
        self.assertEqual(self.libnbd_size("aligned"), 64 * M)  # nothing changed
        self.assertEqual(self.resize(r, 64 * M + 8192, cookie=3), 0)
        self.assertEqual(self.libnbd_size("aligned"), 64 * M + 8192)
        # Byte-granular exports (the default minimum of 1) take any size.
        m = self.raw(b"mem")
        self.assertEqual(self.resize(m, 64 * M + 1000, cookie=4), 0)
        self.assertEqual(self.libnbd_size(), 64 * M + 1000)

    def test_file_export_grows_and_shrinks_on_disk(self):
        r = self.raw(b"file")
        path = os.path.join(self.srv.dir, "disk.img")
        self.assertEqual(self.resize(r, 48 * M), 0)
        self.assertEqual(os.path.getsize(path), 48 * M)
        r.request(nbdv.CMD_WRITE, 40 * M, 4096, cookie=2, data=b"f" * 4096)
        self.assertEqual(r.simple_reply()[:2], (0, 2))
        self.assertEqual(self.resize(r, 8 * M, cookie=3), 0)
        self.assertEqual(os.path.getsize(path), 8 * M)
        self.assertEqual(self.resize(r, 1 << 62, cookie=4), nbdv.ENOSPC)  # no such space
        self.assertEqual(self.libnbd_size("file"), 8 * M)

    def test_resize_with_extended_headers(self):
        r = nbdv.Raw(self.srv.sock)
        self.addCleanup(r.close)
        r.greet()
        self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0], nbdv.REP_ACK)
        rep = r.opt(nbdv.OPT_GO, struct.pack(">I", 3) + b"mem\0\0")
        self.assertEqual(rep[-1][0], nbdv.REP_ACK)
        r.s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 0, CMD_RESIZE, 5, 96 * M, 0))
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", r.recvn(32))
        self.assertEqual((flags, rtype, cookie, offset), (1, 0, 5, 96 * M))
        self.assertEqual(self.libnbd_size(), 96 * M)


if __name__ == "__main__":
    nbdv.main()
