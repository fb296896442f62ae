#!/usr/bin/python3
"""Extended headers (issue 15): NBD_OPT_EXTENDED_HEADERS, 32-byte requests and replies
in both directions, 64-bit lengths bounded like 32-bit ones, BLOCK_STATUS_EXT and
BLOCK_STATUS with a payload; raw sockets for what clients never send, and qemu 10 (the
first client that asks for them) when tests/qemu10 can provide it."""

import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import nbdv

nbdv.require_libnbd()

EXT_REQ, EXT_REP = 0x21E41C71, 0x6E8A278C
FLAG_PAYLOAD_LEN = 1 << 5
REPLY_DONE = 1
T_NONE, T_DATA, T_HOLE, T_BS, T_BS_EXT, T_ERROR = 0, 1, 2, 5, 6, 0x8001
REP_ERR_EXT_HEADER_REQD = nbdv.REP_ERR | 10
FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

EXPORTS = """
  - name: mem
    driver: memory
    size: 64M
  - name: big
    driver: memory
    size: 8G
  - name: huge
    driver: memory
    size: 8T
"""


class Ext(nbdv.Raw):
    """A raw client speaking extended headers."""

    def ext_go(self, name=b"mem", meta=False):
        self.greet()
        assert self.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0] == nbdv.REP_ACK
        if meta:
            q = b"base:allocation"
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q
            assert self.opt(nbdv.OPT_SET_META_CONTEXT, data)[-1][0] == nbdv.REP_ACK
        replies = self.opt(nbdv.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert replies[-1][0] == nbdv.REP_ACK, replies
        for rtype, payload in replies:
            if rtype == nbdv.REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                _, self.size, self.tflags = struct.unpack(">HQH", payload[:12])

    def xreq(self, cmd, offset=0, length=0, flags=0, cookie=1, data=b""):
        self.s.sendall(struct.pack(">IHHQQQ", EXT_REQ, flags, cmd, cookie, offset, length) +
                       data)

    def xreply(self):
        """(flags, type, cookie, offset, payload) of one extended reply."""
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ",
                                                                    self.recvn(32))
        assert magic == EXT_REP, f"reply magic {magic:#x}"
        return flags, rtype, cookie, offset, self.recvn(length)

    def xreplies(self):
        """Every chunk of one reply, up to the one with DONE."""
        out = []
        while True:
            out.append(self.xreply())
            if out[-1][0] & REPLY_DONE:
                return out


class ExtendedTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = nbdv.Server(EXPORTS, extra="limits:\n  max-request: 1M\n").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.__exit__(None, None, None)

    def tearDown(self):
        self.assertTrue(self.srv.alive(), "server died:\n" + self.srv.logtext())
        nbdv.check_serves(self, self.srv)  # a client that never asks: as before

    def ext(self):
        r = Ext(self.srv.sock)
        self.addCleanup(r.close)
        return r

    def test_option_rules(self):
        r = self.ext()
        r.greet()
        self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS, b"x")[-1][0], nbdv.REP_ERR_INVALID)
        self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0], nbdv.REP_ACK)
        self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0], nbdv.REP_ERR_INVALID)
        self.assertEqual(r.opt(nbdv.OPT_STRUCTURED_REPLY)[-1][0], REP_ERR_EXT_HEADER_REQD)
        # Meta contexts need structured replies, which extended headers imply.
        q = b"base:allocation"
        data = struct.pack(">I", 3) + b"mem" + struct.pack(">II", 1, len(q)) + q
        self.assertEqual(r.opt(nbdv.OPT_SET_META_CONTEXT, data)[-1][0], nbdv.REP_ACK)
        # EXPORT_NAME could not answer in extended form: refused with a disconnect.
        r.send_opt(nbdv.OPT_EXPORT_NAME, b"mem")
        self.assertTrue(r.closed_by_server())

    def test_structured_then_extended(self):
        r = self.ext()
        r.greet()
        self.assertEqual(r.opt(nbdv.OPT_STRUCTURED_REPLY)[-1][0], nbdv.REP_ACK)
        self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0], nbdv.REP_ACK)
        replies = r.opt(nbdv.OPT_GO, struct.pack(">I", 3) + b"mem\0\0")
        self.assertEqual(replies[-1][0], nbdv.REP_ACK)
        r.xreq(nbdv.CMD_FLUSH, cookie=9)
        self.assertEqual(r.xreply()[:4], (REPLY_DONE, T_NONE, 9, 0))

    def test_every_reply_is_extended_and_echoes_the_offset(self):
        r = self.ext()
        r.ext_go()
        self.assertTrue(r.tflags & FLAG_BLOCK_STAT_PAYLOAD)
        data = os.urandom(8192)
        r.xreq(nbdv.CMD_WRITE, 65536, len(data), cookie=1, data=data)
        self.assertEqual(r.xreply()[:4], (REPLY_DONE, T_NONE, 1, 65536))
        # The same with PAYLOAD_LEN set (allowed on WRITE).
        r.xreq(nbdv.CMD_WRITE, 0, 512, flags=FLAG_PAYLOAD_LEN, cookie=2, data=b"p" * 512)
        self.assertEqual(r.xreply()[:4], (REPLY_DONE, T_NONE, 2, 0))
        r.xreq(nbdv.CMD_READ, 65536, 8192, cookie=3, flags=1 << 2)  # DF: one chunk
        flags, rtype, cookie, offset, payload = r.xreply()
        self.assertEqual((flags, rtype, cookie, offset), (REPLY_DONE, T_DATA, 3, 65536))
        self.assertEqual(struct.unpack(">Q", payload[:8])[0], 65536)
        self.assertEqual(payload[8:], data)
        # An error: an ERROR chunk, still extended, still echoing.
        r.xreq(nbdv.CMD_READ, r.size - 512, 4096, cookie=4)
        flags, rtype, cookie, offset, payload = r.xreply()
        self.assertEqual((flags, rtype, cookie, offset), (REPLY_DONE, T_ERROR, 4, r.size - 512))
        self.assertEqual(struct.unpack(">I", payload[:4])[0], nbdv.EINVAL)
        for cmd, cookie in ((nbdv.CMD_FLUSH, 5), (nbdv.CMD_CACHE, 6)):
            r.xreq(cmd, 0, 0 if cmd == nbdv.CMD_FLUSH else 4096, cookie=cookie)
            self.assertEqual(r.xreply()[:3], (REPLY_DONE, T_NONE, cookie))

    def test_64_bit_lengths(self):
        r = self.ext()
        r.ext_go(b"big", meta=True)
        self.assertEqual(r.size, 8 << 30)
        r.xreq(nbdv.CMD_WRITE, (5 << 30) + 4096, 4096, cookie=1, data=b"d" * 4096)
        self.assertEqual(r.xreply()[1], T_NONE)
        # One BLOCK_STATUS over all 8 GiB: 64-bit descriptors with a count.
        r.xreq(nbdv.CMD_BLOCK_STATUS, 0, 8 << 30, cookie=2)
        flags, rtype, cookie, offset, payload = r.xreply()
        self.assertEqual((flags & REPLY_DONE, rtype, cookie), (REPLY_DONE, T_BS_EXT, 2))
        ctx, count = struct.unpack(">II", payload[:8])
        self.assertEqual(len(payload), 8 + 16 * count)
        descs = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
        self.assertEqual(descs[0], ((5 << 30) + 4096, 3))  # > 4 GiB of hole in one
        # Trim and zero more than 4 GiB at once.
        r.xreq(nbdv.CMD_TRIM, 0, 6 << 30, cookie=3)
        self.assertEqual(r.xreply()[1:3], (T_NONE, 3))
        r.xreq(nbdv.CMD_WRITE_ZEROES, 1 << 30, 5 << 30, cookie=4)
        self.assertEqual(r.xreply()[1:3], (T_NONE, 3 + 1))
        r.xreq(nbdv.CMD_READ, (5 << 30) + 4096, 4096, cookie=5, flags=1 << 2)
        self.assertEqual(r.xreply()[4][8:], bytes(4096))  # trimmed
        # Bounded exactly as 32-bit lengths: READ over max-request is EINVAL; beyond the
        # end EINVAL; a WRITE announcing more than max-request is answered and closed.
        r.xreq(nbdv.CMD_READ, 0, (1 << 20) + 1, cookie=6)
        self.assertEqual(struct.unpack(">I", r.xreply()[4][:4])[0], nbdv.EINVAL)
        r.xreq(nbdv.CMD_TRIM, 0, 1 << 63, cookie=7)
        self.assertEqual(struct.unpack(">I", r.xreply()[4][:4])[0], nbdv.EINVAL)
        r.xreq(nbdv.CMD_READ, 0xFFFFFFFFFFFFF000, 1 << 40, cookie=8)
        self.assertEqual(struct.unpack(">I", r.xreply()[4][:4])[0], nbdv.EINVAL)
        r.xreq(nbdv.CMD_WRITE, 0, 1 << 40, cookie=9)
        rep = r.xreply()
        self.assertEqual((rep[1], rep[2]), (T_ERROR, 9))
        self.assertTrue(r.closed_by_server())

    def test_block_status_ext_on_a_sparse_8_tib_export(self):
        r = self.ext()
        r.ext_go(b"huge", meta=True)
        self.assertEqual(r.size, 8 << 40)
        r.xreq(nbdv.CMD_WRITE, 6 << 40, 4096, cookie=1, data=b"t" * 4096)
        self.assertEqual(r.xreply()[1], T_NONE)
        r.xreq(nbdv.CMD_BLOCK_STATUS, 0, 8 << 40, cookie=2)
        flags, rtype, cookie, offset, payload = r.xreply()
        self.assertEqual(rtype, T_BS_EXT)
        ctx, count = struct.unpack(">II", payload[:8])
        descs = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
        self.assertEqual(descs[0], (6 << 40, 3))  # 6 TiB of hole: one 64-bit descriptor
        self.assertEqual(descs[1], (4096, 0))
        r.xreq(nbdv.CMD_READ, (6 << 40) - 4096, 8192, cookie=3, flags=1 << 2)
        self.assertEqual(r.xreply()[4][8:], bytes(4096) + b"t" * 4096)

    def test_block_status_with_payload(self):
        r = self.ext()
        r.ext_go(b"big", meta=True)
        # Effect length and context id in the payload; the header's length is the
        # payload's.
        r.xreq(nbdv.CMD_BLOCK_STATUS, 4096, 12, flags=FLAG_PAYLOAD_LEN, cookie=1,
               data=struct.pack(">QI", 1 << 20, 1))
        flags, rtype, cookie, offset, payload = r.xreply()
        self.assertEqual((rtype, cookie, offset), (T_BS_EXT, 1, 4096))
        self.assertEqual(struct.unpack(">QQ", payload[8:24]), (1 << 20, 3))
        # Bad payloads are consumed, then EINVAL: the stream stays in step.
        for cookie, data in ((2, b"\0" * 7), (3, struct.pack(">QI", 4096, 77)),
                             (4, struct.pack(">QH", 4096, 1))):
            r.xreq(nbdv.CMD_BLOCK_STATUS, 0, len(data), flags=FLAG_PAYLOAD_LEN,
                   cookie=cookie, data=data)
            rep = r.xreply()
            self.assertEqual((rep[1], rep[2]), (T_ERROR, cookie), rep)
            self.assertEqual(struct.unpack(">I", rep[4][:4])[0], nbdv.EINVAL)
        # PAYLOAD_LEN on a command that takes none: consumed, EINVAL.
        r.xreq(nbdv.CMD_READ, 0, 16, flags=FLAG_PAYLOAD_LEN, cookie=5, data=b"z" * 16)
        rep = r.xreply()
        self.assertEqual((rep[1], rep[2]), (T_ERROR, 5))
        r.xreq(nbdv.CMD_FLUSH, cookie=6)
        self.assertEqual(r.xreply()[1:3], (T_NONE, 6))

    def test_compact_request_after_extended_closes(self):
        r = self.ext()
        r.ext_go()
        # A compact header (and 4 more bytes, to make 32): its magic is not extended.
        r.s.sendall(struct.pack(">IHHQQI", nbdv.REQUEST_MAGIC, 0, nbdv.CMD_READ, 1, 0, 512) +
                    b"\0" * 4)
        self.assertTrue(r.closed_by_server())
        self.assertIn("bad extended request magic", self.srv.logtext())

    def test_extended_magic_without_negotiation_closes(self):
        r = self.ext()
        r.greet()
        r.go()
        r.xreq(nbdv.CMD_READ, 0, 512)
        self.assertTrue(r.closed_by_server())


class ExtendedTlsTest(unittest.TestCase):
    def test_starttls_resets_extended_headers(self):
        tmp = tempfile.mkdtemp(prefix="nbdvault-ext-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = nbdv.make_pki(os.path.join(tmp, "pki"))
        tls = f"tls:\n  mode: optional\n  certificates: {pki}\n"
        with nbdv.Server(extra=tls) as srv:
            r = Ext(srv.sock)
            r.greet()
            self.assertEqual(r.opt(nbdv.OPT_EXTENDED_HEADERS)[-1][0], nbdv.REP_ACK)
            r.starttls(f"{pki}/ca-cert.pem")
            replies = r.opt(nbdv.OPT_GO, struct.pack(">I", 3) + b"mem\0\0")
            self.assertEqual(replies[-1][0], nbdv.REP_ACK)
            r.request(nbdv.CMD_READ, 0, 512, cookie=1)  # compact again, simple reply
            self.assertEqual(r.simple_reply(512)[:2], (0, 1))
            r.close()


def qemu10():
    """Directory with qemu 10's qemu-img and qemu-io, or None (tests/qemu10 fetches it
    from Debian's bookworm-backports into the build tree)."""
    d = os.environ.get("NBDVAULT_QEMU10")
    if d and os.path.exists(os.path.join(d, "qemu-img")):
        return d
    return None


class Qemu10Test(unittest.TestCase):
    """qemu-img/qemu-io 10 through extended headers: plain, x509 and PSK."""

    def run_qemu(self, d, srv, opts, objects=()):
        tmp = tempfile.mkdtemp(prefix="nbdvault-q10-")
        self.addCleanup(shutil.rmtree, tmp, True)
        src = os.path.join(tmp, "src.img")
        with open(src, "wb") as f:
            f.truncate(64 << 20)
            f.seek(5 << 20)
            f.write(os.urandom(3 << 20))
        img, io = os.path.join(d, "qemu-img"), os.path.join(d, "qemu-io")
        obj = [a for o in objects for a in ("--object", o)]

        def run(*a):
            p = subprocess.run(a, capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, f"{a}: {p.stdout}{p.stderr}")
            return p.stdout

        run(img, "convert", "-n", *obj, "-f", "raw", src, "--target-image-opts", opts)
        self.assertIn("identical", run(img, "compare", *obj, "--image-opts",
                                       f"driver=raw,file.driver=file,file.filename={src}",
                                       opts))
        out = run(io, *obj, "--image-opts", opts, "-c", "write -P 0x5a 1M 64k",
                  "-c", "read -P 0x5a 1M 64k", "-c", "write -z 6M 1M",
                  "-c", "read -P 0 6M 1M", "-c", "discard 7M 1M", "-c", "read -P 0 7M 1M")
        self.assertNotIn("Pattern verification failed", out)
        self.assertIn('"data": true', run(img, "map", *obj, "--output=json", "--image-opts",
                                          opts))
        self.assertIn("(extended headers, base:allocation)", srv.logtext())

    def test_qemu10_uses_extended_headers(self):
        d = qemu10()
        if not d:
            self.skipTest("qemu 10 not fetched (tests/qemu10)")
        with nbdv.Server(EXPORTS) as srv:
            self.run_qemu(d, srv, f"driver=nbd,path={srv.sock},export=mem")

    def test_qemu10_over_tls_x509_and_psk(self):
        d = qemu10()
        if not d:
            self.skipTest("qemu 10 not fetched (tests/qemu10)")
        tmp = tempfile.mkdtemp(prefix="nbdvault-q10tls-")
        self.addCleanup(shutil.rmtree, tmp, True)
        # The default development PKI, as a newcomer would use it: an ECDSA server
        # certificate, and a client certificate qemu 10 accepts (it refuses one whose
        # critical key usage lacks key encipherment, as certtool writes ECDSA ones).
        pki = nbdv.make_pki(os.path.join(tmp, "pki"))
        psk_dir = os.path.join(tmp, "psk")
        os.mkdir(psk_dir)
        shutil.copy(os.path.join(pki, "keys.psk"), psk_dir)
        tls = (f"tls:\n  mode: require\n  certificates: {pki}\n  verify-clients: true\n"
               f"  psk-file: {pki}/keys.psk\n")
        with nbdv.Server(EXPORTS, extra=tls, tcp=True) as srv:
            opts = (f"driver=nbd,host=127.0.0.1,port={srv.port},export=mem,tls-creds=t0")
            x509 = (f"tls-creds-x509,id=t0,dir={pki}/clients/client,endpoint=client,"
                    "verify-peer=on")
            self.run_qemu(d, srv, opts, [x509])
            psk = f"tls-creds-psk,id=t0,dir={psk_dir},username=alice,endpoint=client"
            self.run_qemu(d, srv, opts, [psk])
            self.assertIn("client psk:alice", srv.logtext())
            self.assertIn("client dn:CN=client", srv.logtext())


if __name__ == "__main__":
    nbdv.main()
