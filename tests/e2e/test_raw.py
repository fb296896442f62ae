#!/usr/bin/python3
"""Raw-socket tests for what real clients refuse to send (issue 2, acceptance 4).

Each test checks the spec's answer (error reply or disconnect), then that a new
connection to the same server still reads back what it writes."""

import struct
import unittest

import nbdv

nbdv.require_libnbd()



class RawTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = nbdv.Server().start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.__exit__(None, None, None)

    def raw(self):
        r = nbdv.Raw(self.srv.sock)
        self.addCleanup(r.close)
        return r

    def tearDown(self):
        self.assertTrue(self.srv.alive(), "server died:\n" + self.srv.logtext())
        nbdv.check_serves(self, self.srv)

    # --- option phase ---

    def test_greeting_flags(self):
        r = self.raw()
        gflags = r.greet()
        self.assertEqual(gflags, 3)  # FIXED_NEWSTYLE | NO_ZEROES

    def test_unknown_client_flags_close(self):
        r = self.raw()
        r.greet(flags=0x80000001)
        self.assertTrue(r.closed_by_server())

    def test_option_length_ffffffff(self):
        r = self.raw()
        r.greet()
        r.send_opt(nbdv.OPT_GO, length=0xFFFFFFFF)
        _, rtype, msg = r.read_reply()
        self.assertEqual(rtype, nbdv.REP_ERR_TOO_BIG)
        self.assertTrue(r.closed_by_server())

    def test_bad_option_magic_closes(self):
        r = self.raw()
        r.greet()
        r.s.sendall(struct.pack(">QII", 0x1122334455667788, nbdv.OPT_LIST, 0))
        self.assertTrue(r.closed_by_server())

    def test_go_export_name_5000_bytes(self):
        r = self.raw()
        r.greet()
        name = b"x" * 5000
        replies = r.opt(nbdv.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        self.assertEqual(replies[-1][0], nbdv.REP_ERR_TOO_BIG)
        self.assertLess(len(replies[-1][1]), 4096)  # the message does not echo the name
        # Still in step: the next option is parsed normally.
        self.assertEqual(r.opt(nbdv.OPT_LIST)[-1][0], nbdv.REP_ACK)

    def test_export_name_option_5000_bytes_closes(self):
        r = self.raw()
        r.greet()
        r.send_opt(nbdv.OPT_EXPORT_NAME, b"y" * 5000)
        self.assertTrue(r.closed_by_server())

    def test_info_name_longer_than_option(self):
        r = self.raw()
        r.greet()
        for opt in (nbdv.OPT_INFO, nbdv.OPT_GO):
            replies = r.opt(opt, struct.pack(">I", 1000) + b"mem" + b"\0\0")
            self.assertEqual(replies, [(nbdv.REP_ERR_INVALID, replies[0][1])])
        # Request count that does not match the length.
        replies = r.opt(nbdv.OPT_INFO, struct.pack(">I", 3) + b"mem" + struct.pack(">H", 5))
        self.assertEqual(replies[-1][0], nbdv.REP_ERR_INVALID)
        self.assertEqual(r.opt(nbdv.OPT_LIST)[-1][0], nbdv.REP_ACK)

    def test_unknown_option_then_next(self):
        r = self.raw()
        r.greet()
        replies = r.opt(0x7777, b"some data")
        self.assertEqual(replies[-1][0], nbdv.REP_ERR_UNSUP)
        replies = r.opt(nbdv.OPT_LIST, b"junk")
        self.assertEqual(replies[-1][0], nbdv.REP_ERR_INVALID)
        replies = r.opt(nbdv.OPT_LIST)
        names = [p[4:4 + struct.unpack(">I", p[:4])[0]] for t, p in replies if t == nbdv.REP_SERVER]
        self.assertEqual(names, [b"mem"])
        self.assertEqual(r.opt(nbdv.OPT_STARTTLS)[-1][0], nbdv.REP_ERR_POLICY)
        self.assertEqual(r.opt(nbdv.OPT_STARTTLS, b"x")[-1][0], nbdv.REP_ERR_INVALID)

    def test_meta_context_checks(self):
        r = self.raw()
        r.greet()
        q = b"base:allocation"
        data = struct.pack(">I", 3) + b"mem" + struct.pack(">II", 1, len(q)) + q
        self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, data)[-1][0], nbdv.REP_ERR_INVALID)
        self.assertEqual(r.opt(nbdv.OPT_STRUCTURED_REPLY)[-1][0], nbdv.REP_ACK)
        replies = r.opt(nbdv.OPT_SET_META_CONTEXT, data)
        self.assertEqual([t for t, _ in replies], [nbdv.REP_META_CONTEXT, nbdv.REP_ACK])
        self.assertEqual(replies[0][1][4:], q)
        # A query count far beyond what the option holds.
        bad = struct.pack(">I", 3) + b"mem" + struct.pack(">II", 0xFFFFFFFF, 4) + b"abcd"
        self.assertEqual(r.opt(nbdv.OPT_LIST_META_CONTEXT, bad)[-1][0], nbdv.REP_ERR_INVALID)
        # A query length past the end.
        bad = struct.pack(">I", 3) + b"mem" + struct.pack(">II", 1, 60000) + b"base:"
        self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, bad)[-1][0], nbdv.REP_ERR_INVALID)
        # LIST with no query lists base:allocation.
        empty = struct.pack(">I", 3) + b"mem" + struct.pack(">I", 0)
        replies = r.opt(nbdv.OPT_LIST_META_CONTEXT, empty)
        self.assertEqual([(t, p[4:]) for t, p in replies],
                         [(nbdv.REP_META_CONTEXT, q), (nbdv.REP_ACK, b"")])
        # A valid query that matches nothing: a lone ACK, for LIST and SET.
        for other in (b"x-other:thing", b"base:nothing"):
            data = struct.pack(">I", 3) + b"mem" + struct.pack(">II", 1, len(other)) + other
            for opt in (nbdv.OPT_LIST_META_CONTEXT, nbdv.OPT_SET_META_CONTEXT):
                self.assertEqual([t for t, _ in r.opt(opt, data)], [nbdv.REP_ACK], other)

    def test_abort(self):
        r = self.raw()
        r.greet()
        self.assertEqual(r.opt(nbdv.OPT_ABORT)[-1][0], nbdv.REP_ACK)
        self.assertTrue(r.closed_by_server())

    # --- transmission phase ---

    def test_truncated_header_then_close(self):
        r = self.raw()
        r.greet()
        r.go()
        r.s.sendall(struct.pack(">IHH", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_READ) + b"\1\2")
        r.close()

    def test_truncated_write_payload_then_close(self):
        r = self.raw()
        r.greet()
        r.go()
        r.request(nbdv.CMD_WRITE, 0, 65536, data=b"z" * 1000)
        r.close()

    def test_bad_request_magic(self):
        r = self.raw()
        r.greet()
        r.go()
        r.request(nbdv.CMD_READ, 0, 512, magic=0xDEADBEEF)
        self.assertTrue(r.closed_by_server())

    def test_offset_length_overflow(self):
        r = self.raw()
        r.greet()
        r.go()
        r.request(nbdv.CMD_READ, 0xFFFFFFFFFFFFFE00, 4096, cookie=7)
        self.assertEqual(r.simple_reply(4096)[:2], (nbdv.EINVAL, 7))
        r.request(nbdv.CMD_WRITE, 0xFFFFFFFFFFFFFE00, 1024, cookie=8, data=b"w" * 1024)
        self.assertEqual(r.simple_reply()[:2], (nbdv.ENOSPC, 8))
        # A trim beyond the end is EINVAL, like a read (spec, "Error values"); writes
        # and write-zeroes get ENOSPC.
        r.request(nbdv.CMD_TRIM, r.size - 512, 1024, cookie=9)
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 9))
        r.request(nbdv.CMD_WRITE_ZEROES, r.size - 512, 1024, cookie=11)
        self.assertEqual(r.simple_reply()[:2], (nbdv.ENOSPC, 11))
        # The payload of the refused WRITE was consumed: the stream is still in step.
        r.request(nbdv.CMD_READ, 0, 512, cookie=10)
        self.assertEqual(r.simple_reply(512)[:2], (0, 10))

    def test_1gib_write_header(self):
        pid = self.srv.proc.pid
        before = nbdv.rss_kib(pid)
        r = self.raw()
        r.greet()
        r.go()
        r.request(nbdv.CMD_WRITE, 0, 1 << 30, cookie=3)
        err, cookie, _ = r.simple_reply()
        self.assertEqual((err, cookie), (nbdv.EINVAL, 3))
        self.assertTrue(r.closed_by_server())
        self.assertLess(nbdv.rss_kib(pid) - before, 64 * 1024, "the payload was allocated")

    def test_block_status_beyond_the_end_is_einval(self):
        """Spec, NBD_CMD_BLOCK_STATUS: a range past the end SHOULD get EINVAL, as an
        error chunk (the reply is structured)."""
        r = self.raw()
        r.greet()
        r.go(structured=True, meta=True)
        r.request(nbdv.CMD_BLOCK_STATUS, r.size - 512, 1024, cookie=21)
        reply = r.any_reply()
        self.assertEqual((reply[3], r.error_of(reply)), (21, nbdv.EINVAL))
        self.assertTrue(reply[2] & 0x8000 and reply[1] & 1)  # an error chunk, DONE
        # Up to the last byte is fine: at least one descriptor, none past the end.
        r.request(nbdv.CMD_BLOCK_STATUS, r.size - 512, 512, cookie=22)
        kind, flags, rtype, cookie, payload = r.any_reply()
        self.assertEqual((rtype, cookie), (5, 22))  # NBD_REPLY_TYPE_BLOCK_STATUS
        lengths = [struct.unpack(">I", payload[i:i + 4])[0] for i in range(4, len(payload), 8)]
        self.assertTrue(lengths and sum(lengths) <= 512 and all(lengths))

    def test_oversized_read(self):
        r = self.raw()
        r.greet()
        r.go(structured=True)
        r.request(nbdv.CMD_READ, 0, 64 << 20, cookie=4)
        reply = r.any_reply()
        self.assertEqual(r.error_of(reply), nbdv.EINVAL)
        self.assertEqual(reply[2], 0x8001)  # NBD_REPLY_TYPE_ERROR
        self.assertTrue(reply[1] & 1)  # DONE

    def test_unknown_command_and_flag(self):
        r = self.raw()
        r.greet()
        r.go()
        r.request(42, 0, 512, cookie=5)
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 5))
        r.request(nbdv.CMD_READ, 0, 512, flags=1 << 9, cookie=6)
        self.assertEqual(r.simple_reply(512)[:2], (nbdv.EINVAL, 6))
        r.request(nbdv.CMD_READ, 0, 512, flags=4, cookie=11)  # DF without structured
        self.assertEqual(r.simple_reply(512)[:2], (nbdv.EINVAL, 11))
        r.request(nbdv.CMD_FLUSH, 4096, 0, cookie=12)
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 12))
        r.request(nbdv.CMD_BLOCK_STATUS, 0, 4096, cookie=13)  # no meta context
        self.assertEqual(r.simple_reply()[:2], (nbdv.EINVAL, 13))
        r.request(nbdv.CMD_READ, 0, 512, flags=1, cookie=14)  # FUA is valid everywhere
        self.assertEqual(r.simple_reply(512)[:2], (0, 14))

    def test_sparse_read_uses_hole_chunks(self):
        r = self.raw()
        r.greet()
        r.go(structured=True, meta=True)
        base = 32 << 20
        r.request(nbdv.CMD_WRITE, base + 65536, 4096, cookie=1, data=b"D" * 4096)
        self.assertEqual(r.any_reply()[1], 0)
        r.request(nbdv.CMD_READ, base, 3 * 65536, cookie=2)
        chunks = []
        while True:
            kind, flags, rtype, cookie, payload = r.any_reply()
            self.assertEqual(cookie, 2)
            chunks.append((rtype, payload))
            if flags & 1:
                break
        types = [t for t, _ in chunks]
        self.assertIn(2, types)  # OFFSET_HOLE
        self.assertIn(1, types)  # OFFSET_DATA
        data = bytearray(3 * 65536)
        covered = 0
        for t, p in chunks:
            off = struct.unpack(">Q", p[:8])[0] - base
            if t == 1:
                data[off:off + len(p) - 8] = p[8:]
                covered += len(p) - 8
            elif t == 2:
                covered += struct.unpack(">I", p[8:12])[0]
        self.assertEqual(covered, 3 * 65536)
        self.assertEqual(bytes(data[65536:65536 + 4096]), b"D" * 4096)
        self.assertEqual(bytes(data[:65536]), bytes(65536))
        # DF: one data chunk, zeroes included.
        r.request(nbdv.CMD_READ, base, 3 * 65536, flags=4, cookie=3)
        kind, flags, rtype, cookie, payload = r.any_reply()
        self.assertEqual((rtype, flags & 1, len(payload) - 8), (1, 1, 3 * 65536))

    def test_many_in_flight_out_of_order_cookies(self):
        r = self.raw()
        r.greet()
        r.go()
        for i in range(200):
            r.request(nbdv.CMD_WRITE, i * 512, 512, cookie=1000 + i, data=bytes([i % 256]) * 512)
        seen = set()
        for _ in range(200):
            err, cookie, _ = r.simple_reply()
            self.assertEqual(err, 0)
            seen.add(cookie)
        self.assertEqual(seen, set(range(1000, 1200)))
        r.request(nbdv.CMD_DISC)
        self.assertTrue(r.closed_by_server())

    def read_replies(self, r):
        """Structured replies until @r's server closes: (cookie, error, data) in the
        order they finished (their DONE chunk), data joined from OFFSET_DATA chunks."""
        done, data = [], {}
        while True:
            try:
                reply = r.any_reply()
            except EOFError:
                return done
            if reply[0] == "simple":
                done.append((reply[2], reply[1], b""))
                continue
            kind, flags, rtype, cookie, payload = reply
            if rtype == 1:  # OFFSET_DATA
                data.setdefault(cookie, bytearray()).extend(payload[8:])
            if flags & 1:
                done.append((cookie, r.error_of((kind, flags, rtype, cookie, payload)),
                             bytes(data.pop(cookie, b""))))

    def pipeline(self, r, tail):
        """Sixteen 1 MiB READs (cookies 100..115, more than the send-ahead holds),
        then @tail (request bytes), then NBD_CMD_DISC, all in one send before any reply
        is read."""
        reqs = b"".join(struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_READ, 100 + i,
                                    i << 20, 1 << 20) for i in range(16))
        disc = struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_DISC, 1, 0, 0)
        r.s.sendall(reqs + tail + disc)
        return self.read_replies(r)

    def test_block_status_goes_ahead_of_reads_waiting_for_room(self):
        """READs past the send-ahead wait for the socket; a BLOCK_STATUS behind them is
        answered before them, as nbdcopy needs (it asks for extents with 64 READs
        outstanding and sends no READ until the answer).  Everything is answered."""
        r = self.raw()
        r.greet()
        r.go(structured=True, meta=True)
        bs = struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_BLOCK_STATUS, 7, 0, 1 << 20)
        order = [cookie for cookie, err, _ in self.pipeline(r, bs)]
        self.assertEqual(sorted(order), [7] + list(range(100, 116)))
        self.assertLess(order.index(7), 8, order)  # without look-ahead: 16th (last)

    def test_other_requests_keep_their_place_behind_waiting_reads(self):
        """Only READs and BLOCK_STATUS are taken past waiting READs: a WRITE behind
        them is served after them (the READ of the range it overwrites still sees the
        old data), and DISC closes only after every reply."""
        r = self.raw()
        r.greet()
        r.go(structured=True, meta=True)
        old = self.raw()
        old.greet()
        old.go()
        before, new = b"B" * 4096, b"N" * 4096
        old.request(nbdv.CMD_WRITE, 15 << 20, 4096, cookie=1, data=before)
        self.assertEqual(old.simple_reply()[:2], (0, 1))
        wr = struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_WRITE, 9, 15 << 20,
                         4096) + new
        replies = self.pipeline(r, wr)
        self.assertEqual([c for c, _, _ in replies], list(range(100, 116)) + [9])
        self.assertTrue(all(err == 0 for _, err, _ in replies))
        self.assertEqual(replies[15][2][:4096], before)
        old.request(nbdv.CMD_READ, 15 << 20, 4096, cookie=2)
        self.assertEqual(old.simple_reply(4096)[2], new)

    def test_empty_name_is_the_default_export(self):
        with nbdv.Server(extra="default-export: mem\n") as srv:
            r = nbdv.Raw(srv.sock)
            r.greet()
            r.send_opt(nbdv.OPT_EXPORT_NAME, b"")
            size, _ = struct.unpack(">QH", r.recvn(10))
            self.assertEqual(size, 64 << 20)
            r.close()
            r = nbdv.Raw(srv.sock)
            r.greet()
            r.go(b"")
            self.assertEqual(r.size, 64 << 20)
            r.request(nbdv.CMD_READ, 0, 512, cookie=1)
            self.assertEqual(r.simple_reply(512), (0, 1, bytes(512)))
            r.close()

    def test_export_name_no_zeroes(self):
        for flags, extra in ((3, 0), (1, 124)):
            r = self.raw()
            r.greet(flags=flags)
            r.send_opt(nbdv.OPT_EXPORT_NAME, b"")  # empty name: no default export here
            self.assertTrue(r.closed_by_server())
            r = self.raw()
            r.greet(flags=flags)
            r.send_opt(nbdv.OPT_EXPORT_NAME, b"mem")
            size, tflags = struct.unpack(">QH", r.recvn(10))
            self.assertEqual(size, 64 << 20)
            if extra:
                self.assertEqual(r.recvn(extra), bytes(extra))
            r.request(nbdv.CMD_READ, 0, 512, cookie=77)
            self.assertEqual(r.simple_reply(512)[:2], (0, 77))


if __name__ == "__main__":
    nbdv.main()
