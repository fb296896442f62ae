#!/usr/bin/python3
"""python3-libnbd against nbdvault: replies, block status, concurrency, FUA, flush,
cache, write-zeroes flags and read-only refusals (issue 2, acceptance 3)."""

import os
import unittest

import nbdv

nbdv.require_libnbd()
import nbd  # noqa: E402

EXPORTS = """
  - name: mem
    description: memory test export
    driver: memory
    size: 64M
  - name: file
    driver: file
    path: {dir}/disk.img
    size: 64M
  - name: shm
    driver: file
    path: /dev/shm/{shm}
    size: 8M
  - name: ro
    driver: memory
    size: 1M
    readonly: true
"""


class LibnbdTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.shm = f"nbdvault-test-{os.getpid()}.img"
        cls.srv = nbdv.Server(EXPORTS.replace("{shm}", cls.shm)).start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.__exit__(None, None, None)
        try:
            os.unlink("/dev/shm/" + cls.shm)
        except OSError:
            pass

    def connect(self, export="mem", structured=True, meta=True, strict=True):
        h = nbd.NBD()
        if not structured:
            h.set_request_structured_replies(False)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri(self.srv.uri(export))
        self.addCleanup(nbdv.disconnect, h)
        return h

    def test_structured_read_write(self):
        h = self.connect("file")
        self.assertTrue(h.get_structured_replies_negotiated())
        base = 20 << 20  # a region no other test touches
        data = os.urandom(300000)
        h.pwrite(data, base + 12345)
        self.assertEqual(h.pread(len(data), base + 12345), data)
        # A read spanning hole, data, hole (sparse reply with OFFSET_HOLE chunks).
        self.assertEqual(h.pread(1 << 20, 40 << 20), bytes(1 << 20))
        mixed = h.pread(2 << 20, base)
        self.assertEqual(mixed[12345:12345 + len(data)], data)
        self.assertEqual(mixed[:12345], bytes(12345))
        self.assertEqual(mixed[12345 + len(data):], bytes((2 << 20) - 12345 - len(data)))

    def test_simple_replies(self):
        h = self.connect("file", structured=False, meta=False)
        self.assertFalse(h.get_structured_replies_negotiated())
        self.assertFalse(h.can_df())
        data = os.urandom(65536)
        h.pwrite(data, 1 << 20)
        self.assertEqual(h.pread(65536, 1 << 20), data)

    def extents(self, h, count, offset, flags=0):
        out = []

        def cb(metacontext, off, entries, err):
            self.assertEqual(metacontext, nbd.CONTEXT_BASE_ALLOCATION)
            out.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(count, offset, cb, flags)
        return out

    def test_block_status(self):
        for export in ("mem", "file"):
            with self.subTest(export=export):
                h = self.connect(export)
                self.assertTrue(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
                base = 16 << 20
                h.pwrite(b"\x01" * 65536, base + 65536)
                ext = self.extents(h, 4 * 65536, base)
                self.assertEqual(ext[0], (65536, nbd.STATE_HOLE | nbd.STATE_ZERO))
                self.assertEqual(ext[1][1], 0)
                self.assertGreaterEqual(ext[1][0], 65536)
                self.assertLessEqual(sum(e[0] for e in ext), 4 * 65536)
                one = self.extents(h, 4 * 65536, base, nbd.CMD_FLAG_REQ_ONE)
                self.assertEqual(len(one), 1)
                h.trim(65536, base + 65536)
                ext = self.extents(h, 4 * 65536, base)
                self.assertEqual(ext, [(4 * 65536, nbd.STATE_HOLE | nbd.STATE_ZERO)])

    def test_64_concurrent_aio(self):
        for export in ("mem", "file"):
            with self.subTest(export=export):
                h = self.connect(export)
                blobs = [os.urandom(65536) for _ in range(64)]
                cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), i * 65536)
                           for i, b in enumerate(blobs)]
                self.assertEqual(h.aio_in_flight(), 64)
                while h.aio_in_flight():
                    h.poll(-1)
                for c in cookies:
                    self.assertTrue(h.aio_command_completed(c))
                bufs = [nbd.Buffer(65536) for _ in range(64)]
                cookies = [h.aio_pread(bufs[i], i * 65536) for i in range(64)]
                while h.aio_in_flight():
                    h.poll(-1)
                for i, c in enumerate(cookies):
                    self.assertTrue(h.aio_command_completed(c))
                    self.assertEqual(bytes(bufs[i].to_bytearray()), blobs[i])

    def test_fua_flush_cache(self):
        h = self.connect("file")
        self.assertTrue(h.can_fua() and h.can_flush() and h.can_cache())
        self.assertTrue(h.can_multi_conn())
        h.pwrite(b"F" * 4096, 0, nbd.CMD_FLAG_FUA)
        h.flush()
        h.cache(1 << 20, 0)
        self.assertEqual(h.pread(4096, 0), b"F" * 4096)
        # The bytes are in the file itself, not only in a server-side cache.
        with open(os.path.join(self.srv.dir, "disk.img"), "rb") as f:
            self.assertEqual(f.read(4096), b"F" * 4096)

    def test_write_zeroes(self):
        h = self.connect("file")
        self.assertTrue(h.can_zero() and h.can_fast_zero())
        h.pwrite(b"\xaa" * (1 << 20), 4 << 20)
        h.zero(65536, 4 << 20)  # may punch a hole
        h.zero(65536, (4 << 20) + 65536, nbd.CMD_FLAG_NO_HOLE)
        h.zero(65536, (4 << 20) + 131072, nbd.CMD_FLAG_FAST_ZERO)
        self.assertEqual(h.pread(3 * 65536, 4 << 20), bytes(3 * 65536))
        self.assertEqual(h.pread(65536, (4 << 20) + 3 * 65536), b"\xaa" * 65536)
        ext = self.extents(h, 65536, 4 << 20)
        self.assertEqual(ext[0][1], nbd.STATE_HOLE | nbd.STATE_ZERO)

    def test_fast_zero_without_fast_path(self):
        # tmpfs can punch holes but has no ZERO_RANGE: a fast zero that must not leave
        # a hole has no fast path, so it fails with ENOTSUP and changes nothing.
        h = self.connect("shm")
        h.pwrite(b"\x55" * 65536, 0)
        with self.assertRaises(nbd.Error) as cm:
            h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
        self.assertEqual(cm.exception.errno, "ENOTSUP")
        self.assertEqual(h.pread(65536, 0), b"\x55" * 65536)
        h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)  # slow path still works
        self.assertEqual(h.pread(65536, 0), bytes(65536))

    def test_readonly_eperm(self):
        h = self.connect("ro", strict=False)
        self.assertTrue(h.is_read_only())
        self.assertFalse(h.can_trim())
        self.assertFalse(h.can_zero())
        for op in (lambda: h.pwrite(b"x" * 512, 0),
                   lambda: h.trim(512, 0),
                   lambda: h.zero(512, 0)):
            with self.assertRaises(nbd.Error) as cm:
                op()
            self.assertEqual(cm.exception.errno, "EPERM")
        self.assertEqual(h.pread(512, 0), bytes(512))

    def test_out_of_range(self):
        h = self.connect("mem", strict=False)
        size = h.get_size()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(4096, size - 512)
        self.assertEqual(cm.exception.errno, "EINVAL")
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(b"x" * 4096, size - 512)
        self.assertEqual(cm.exception.errno, "ENOSPC")
        nbdv.check_serves(self, self.srv)

    def test_info_details(self):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_full_info(True)
        h.connect_uri(self.srv.uri("mem"))
        self.addCleanup(nbdv.disconnect, h)
        h.opt_info()
        self.assertEqual(h.get_size(), 64 << 20)
        self.assertEqual(h.get_export_description(), "memory test export")
        self.assertEqual(h.get_canonical_export_name(), "mem")
        self.assertEqual(h.get_block_size(nbd.SIZE_MAXIMUM), 32 << 20)
        h.opt_go()
        self.assertEqual(h.pread(512, 60 << 20), bytes(512))

    def test_unknown_export(self):
        h = nbd.NBD()
        with self.assertRaises(nbd.Error):
            h.connect_uri(self.srv.uri("nope"))
        nbdv.check_serves(self, self.srv)


if __name__ == "__main__":
    nbdv.main()
