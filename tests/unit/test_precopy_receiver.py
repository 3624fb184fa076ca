"""PrecopyReceiver against a real peer on a socketpair (a writer thread sends frames), and
PageSender -> PrecopyReceiver on this process's own memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phaul.errors import ProtocolError
from phaul.page_server import framing as fr
from phaul.page_server.criu_image import PE_PRESENT, read_pagemap
from phaul.page_server.framing import Codec, Kind
from phaul.page_server.precopy_receiver import PAGES_ID_BASE, PrecopyReceiver, ReceiveStats
from phaul.source.page_sender import PageSender

P = 4096
BASE = 0x7F0000000000
BASE2 = BASE + 0x20000000


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (P // 8)


def data_frame(vpid: int, vaddr: int, payload: bytes, codec: Codec = Codec.NONE) -> bytes:
    body = payload if codec is Codec.NONE else fr.Compressor(codec).compress(payload)
    hdr = fr.encode_header(Kind.DATA, vpid=vpid, vaddr=vaddr, nr_pages=len(payload) // P,
                           payload_len=len(body), codec=codec)  # fmt: skip
    return hdr + body


def zero_frame(vpid: int, vaddr: int, nr: int) -> bytes:
    return fr.encode_header(Kind.ZERO, vpid=vpid, vaddr=vaddr, nr_pages=nr)


def pass_end(n: int) -> bytes:
    return fr.encode_header(Kind.PASS_END, aux=n)


def image(directory: Path, vpid: int) -> dict[int, bytes]:
    """vaddr -> page content of the flat image of vpid."""
    pm = read_pagemap(directory / f"pagemap-{vpid}.img")
    data = (directory / f"pages-{pm.pages_id}.img").read_bytes()
    out: dict[int, bytes] = {}
    off = 0
    for e in pm.entries:
        assert e.flags == PE_PRESENT
        for i in range(e.nr_pages):
            out[e.vaddr + i * P] = data[off : off + P]
            off += P
    assert off == len(data)
    return out


class Peer:
    """The source end of a socketpair: sends scripted bytes from a thread, reads ACKs."""

    def __init__(self) -> None:
        self.src, self.dst = socket.socketpair()
        self.acks: list[fr.Ack] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self, steps: list[bytes | Callable[[], None]], *, close: bool = True) -> None:
        def body() -> None:
            try:
                for step in steps:
                    if callable(step):
                        step()
                        continue
                    self.src.sendall(step)
                    h = fr.decode_header(step[:32])
                    if h.kind is Kind.PASS_END:
                        self.acks.append(self.read_ack())
            except BaseException as err:  # reported by join()
                self.error = err
            finally:
                if close:
                    self.src.shutdown(socket.SHUT_WR)

        self._thread = threading.Thread(target=body)
        self._thread.start()

    def read_ack(self) -> fr.Ack:
        buf = bytearray()
        while len(buf) < 64:
            chunk = self.src.recv(64 - len(buf))
            if not chunk:
                raise EOFError("no ACK")
            buf += chunk
        return fr.decode_ack(fr.decode_header(bytes(buf[:32])), bytes(buf[32:]))

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.src.close()
        self.dst.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    if p._thread is not None and p._thread.is_alive():
        p.src.close()
        p._thread.join(5)


def serve(tmp_path: Path, peer: Peer, steps: list[bytes], **kw: int) -> ReceiveStats:
    peer.run(list(steps))
    try:
        return PrecopyReceiver(tmp_path, **kw).serve(peer.dst)
    finally:
        peer.join()


def test_two_passes_data_zero_and_in_place_updates(tmp_path: Path, peer: Peer) -> None:
    v = 42
    pass1 = [
        data_frame(v, BASE, page(1) + page(2) + page(3)),
        zero_frame(v, BASE + 3 * P, 2),
        data_frame(v, BASE + 0x100000, page(9)),
        pass_end(1),
    ]
    pass2 = [
        data_frame(v, BASE + P, page(22)),  # rewritten
        zero_frame(v, BASE, 1),  # became zero
        data_frame(v, BASE + 3 * P, page(44)),  # zero page got data
        data_frame(v, BASE + 0x200000, page(77)),  # new range (staged, committed)
        fr.encode_header(Kind.DROP, vpid=v, vaddr=BASE + 0x300000, nr_pages=5),
        pass_end(2),
    ]
    stats = serve(tmp_path, peer, pass1 + pass2)
    assert peer.error is None
    assert [a.pass_no for a in peer.acks] == [1, 2]
    assert (peer.acks[0].pages, peer.acks[0].zero_pages) == (6, 2)
    assert (peer.acks[1].pages, peer.acks[1].zero_pages) == (4, 1)
    assert peer.acks[0].bytes == 6 * P
    assert stats.passes == 2 and stats.pages == 10 and stats.zero_pages == 3
    assert stats.dropped_pages == 5 and stats.images == (v,)
    assert image(tmp_path, v) == {
        BASE: bytes(P),
        BASE + P: page(22),
        BASE + 2 * P: page(3),
        BASE + 3 * P: page(44),
        BASE + 4 * P: bytes(P),
        BASE + 0x100000: page(9),
        BASE + 0x200000: page(77),
    }
    assert read_pagemap(tmp_path / f"pagemap-{v}.img").pages_id == PAGES_ID_BASE + v
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"pagemap-{v}.img",
        f"pages-{PAGES_ID_BASE + v}.img",
    ]


def test_out_of_order_first_pass_and_several_vpids(tmp_path: Path, peer: Peer) -> None:
    steps = [
        data_frame(1, BASE + 8 * P, page(8)),
        data_frame(2, BASE, page(100)),
        data_frame(1, BASE, page(0)),  # below what vpid 1 got: its fresh image is settled
        zero_frame(1, BASE + 4 * P, 1),
        data_frame(1, BASE + 9 * P, page(9)),
    ]  # no PASS_END: EOF commits
    stats = serve(tmp_path, peer, steps)
    assert peer.error is None and stats.passes == 0 and stats.images == (1, 2)
    assert image(tmp_path, 1) == {
        BASE: page(0),
        BASE + 4 * P: bytes(P),
        BASE + 8 * P: page(8),
        BASE + 9 * P: page(9),
    }
    assert image(tmp_path, 2) == {BASE: page(100)}


def test_existing_image_is_continued_by_a_new_session(tmp_path: Path, peer: Peer) -> None:
    serve(tmp_path, peer, [data_frame(5, BASE, page(1) + page(2)), pass_end(1)])
    second = Peer()
    serve(tmp_path, second, [data_frame(5, BASE + P, page(3)), zero_frame(5, BASE + 2 * P, 1)])
    assert image(tmp_path, 5) == {BASE: page(1), BASE + P: page(3), BASE + 2 * P: bytes(P)}


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_compressed_frames(tmp_path: Path, peer: Peer, codec: Codec) -> None:
    pages = b"".join(page(i % 3) for i in range(256))
    frame = data_frame(3, BASE, pages, codec)
    assert len(frame) < len(pages) // 10
    stats = serve(tmp_path, peer, [frame, pass_end(1), data_frame(3, BASE, page(7), codec)])
    assert peer.error is None and stats.pages == 257
    got = image(tmp_path, 3)
    assert got[BASE] == page(7)
    assert all(got[BASE + i * P] == page(i % 3) for i in range(1, 256))


def test_corrupt_compressed_payload(tmp_path: Path, peer: Peer) -> None:
    bad = fr.encode_header(Kind.DATA, vpid=3, vaddr=BASE, nr_pages=1, payload_len=16,
                           codec=Codec.LZ4) + b"\xff" * 16  # fmt: skip
    with pytest.raises(ProtocolError, match="LZ4"):
        serve(tmp_path, peer, [bad])


@pytest.mark.parametrize(
    "tail",
    [
        b"\x00" * 32,  # bad magic
        fr.encode_header(Kind.ACK, aux=1, payload_len=32) + bytes(32),  # wrong direction
        fr.encode_header(Kind.DATA, vpid=1, vaddr=BASE2, nr_pages=2, payload_len=2 * P) + page(1),
        fr.encode_header(Kind.DATA, vpid=1, vaddr=BASE2, nr_pages=1, payload_len=P)[:20],
    ],
    ids=["magic", "ack", "eof-in-payload", "eof-in-header"],
)
def test_malformed_stream_raises_and_leaves_no_fresh_image(
    tmp_path: Path, peer: Peer, tail: bytes
) -> None:
    with pytest.raises(ProtocolError):
        serve(tmp_path, peer, [data_frame(1, BASE + 0x10000000, page(1)), tail])
    assert list(tmp_path.iterdir()) == []


def test_quota(tmp_path: Path, peer: Peer) -> None:
    steps = [data_frame(1, BASE, page(1) * 4), zero_frame(1, BASE + 4 * P, 1)]
    with pytest.raises(ProtocolError, match="quota"):
        serve(tmp_path, peer, steps, max_bytes=4 * P)
    ok = Peer()
    assert serve(tmp_path, ok, steps, max_bytes=5 * P).pages == 5


def test_quota_on_staged_pages(tmp_path: Path, peer: Peer) -> None:
    serve(tmp_path, peer, [data_frame(1, BASE, page(1) * 4), pass_end(1)])
    again = Peer()
    steps = [data_frame(1, BASE, page(2) * 4), data_frame(1, BASE + 0x100000, page(3))]
    with pytest.raises(ProtocolError, match="quota"):
        serve(tmp_path, again, steps, max_bytes=4 * P)


# -- PageSender -> PrecopyReceiver on this process's own memory -------------------------------


def _mapped(npages: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_sender_to_receiver_own_memory(tmp_path: Path, codec: str) -> None:
    npages = 1100  # > 4 DATA frames, not a multiple of 256
    m, addr = _mapped(npages)
    m[:] = b"".join(os.urandom(256) * 16 for _ in range(npages))  # compressible, never zero
    for i in (0, 1, 2, 300, 301, 1099):  # zero pages, at the edges too
        m[i * P : (i + 1) * P] = bytes(P)
    m[500 * P : 500 * P + 1] = b"\x01"  # first byte set, rest zero: not a zero page
    m[600 * P + P - 1 : 600 * P + P] = b"\x01"  # first word zero, last byte set
    m[700 * P : 700 * P + 8] = bytes(8)  # first word zero, rest random
    a, b = socket.socketpair()
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.setdefault("s", PrecopyReceiver(tmp_path).serve(b)))
    t.start()
    try:
        sender = PageSender(a, codec=codec, batch_bytes=1 << 20)
        st1 = sender.send_ranges(os.getpid(), 11, [(addr, addr + npages * P)])
        ack1 = sender.end_pass(1)
        m[1 * P : 2 * P] = page(5)  # zero -> data
        m[3 * P : 4 * P] = bytes(P)  # data -> zero
        st2 = sender.send_ranges(os.getpid(), 11, [(addr, addr + 8 * P)])
        ack2 = sender.end_pass(2)
    finally:
        a.shutdown(socket.SHUT_WR)
        t.join(30)
        a.close()
        b.close()
    assert (st1.pages, st1.zero_pages) == (npages, 6)
    assert (ack1.pages, ack1.zero_pages) == (npages, 6)
    assert st1.bytes_payload == (npages - 6) * P
    if codec == "none":
        overhead = st1.bytes_wire - st1.bytes_payload  # headers only: ~10 frames
        assert overhead % 32 == 0 and overhead <= 32 * 16
    else:
        assert st1.bytes_wire < st1.bytes_payload * 0.6
    assert (st2.pages, st2.zero_pages, ack2.pages) == (8, 3, 8)
    got = image(tmp_path, 11)
    assert len(got) == npages
    for i in range(npages):
        assert got[addr + i * P] == m[i * P : (i + 1) * P], f"page {i}"


def test_sender_reports_vanished_ranges_as_drop(tmp_path: Path) -> None:
    m, addr = _mapped(24)
    m[:] = os.urandom(24 * P)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libc.munmap(addr + 8 * P, 4 * P) == 0  # pages 8..11 vanish
    a, b = socket.socketpair()
    box: dict[str, ReceiveStats] = {}
    t = threading.Thread(target=lambda: box.setdefault("s", PrecopyReceiver(tmp_path).serve(b)))
    t.start()
    try:
        sender = PageSender(a)
        st = sender.send_ranges(os.getpid(), 12, [(addr, addr + 24 * P)])
        sender.end_pass(1)
    finally:
        a.shutdown(socket.SHUT_WR)
        t.join(30)
        a.close()
        b.close()
    assert st.dropped_pages == 4 and st.pages == 20
    assert box["s"].dropped_pages == 4 and box["s"].pages == 20
    got = image(tmp_path, 12)
    assert sorted(got) == [addr + i * P for i in (*range(8), *range(12, 24))]
    assert all(got[addr + i * P] == m[i * P : (i + 1) * P] for i in range(8))


def test_sender_refuses_unaligned_ranges() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="aligned"):
        PageSender(a).send_ranges(os.getpid(), 1, [(4096, 4097)])
