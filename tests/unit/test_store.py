"""CriuPageReceiver against an in-memory peer speaking CRIU's dump side of the protocol.

The real thing (criu dump --page-server + criu restore) is tests/integration/test_page_store.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.errors import ProtocolError
from phaul.page_server import CriuPageReceiver, ReceiveStats
from phaul.page_server import criu_protocol as cp
from phaul.page_server.criu_image import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    read_pagemap,
    write_pagemap,
)
from phaul.page_server.store import FlatPageImage

TASK = cp.ImageKind.TASK


def page(i: int) -> bytes:
    return struct.pack("<Q", i) * 512


class Peer:
    """Our end of a socketpair, receiver serving the other end in a thread."""

    def __init__(self, receiver: CriuPageReceiver) -> None:
        self.sk, theirs = socket.socketpair()
        self.sk.settimeout(10)
        self.result: ReceiveStats | BaseException | None = None

        def run() -> None:
            try:
                self.result = receiver.serve(theirs)
            except BaseException as err:
                self.result = err
            finally:
                theirs.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def open2(self, vpid: int) -> bytes:
        self.sk.sendall(cp.encode_iov(cp.Command.OPEN2, dst_id=cp.ImageId(TASK, vpid).encode()))
        return self.sk.recv(1)

    def add(self, vpid: int, vaddr: int, nr: int, flags: int, data: bytes = b"") -> None:
        dst = cp.ImageId(TASK, vpid).encode()
        self.sk.sendall(
            cp.encode_iov(cp.Command.ADD_F, flags=flags, nr_pages=nr, vaddr=vaddr, dst_id=dst)
            + data
        )

    def close(self) -> int:
        self.sk.sendall(cp.encode_iov(cp.Command.CLOSE))
        reply = b""
        while len(reply) < 4:
            chunk = self.sk.recv(4 - len(reply))
            assert chunk, "no CLOSE reply"
            reply += chunk
        return cp.decode_s32(reply)

    def finish(self) -> ReceiveStats | BaseException | None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.sk.close()
        return self.result


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(CriuPageReceiver(tmp_path))
    yield p
    p.sk.close()
    p.thread.join(10)


def test_session_writes_criu_layout(tmp_path: Path, peer: Peer) -> None:
    assert peer.open2(1) == b"\x00"
    peer.add(1, 0x10000, 2, PE_PRESENT, page(1) + page(2))
    peer.add(1, 0x20000, 1, PE_LAZY)
    peer.add(1, 0x30000, 1, PE_PRESENT | PE_LAZY, page(3))
    assert peer.open2(2) == b"\x00"
    peer.add(2, 0x5000, 300, PE_PRESENT | PE_LAZY, b"".join(page(i) for i in range(300)))
    assert peer.close() == 0
    stats = peer.finish()
    assert isinstance(stats, ReceiveStats)
    assert (stats.pages, stats.bytes, stats.files) == (303, 303 * 4096, 4)
    assert stats.images == ("pagemap-1.img", "pages-65537.img", "pagemap-2.img", "pages-65538.img")
    pm1 = read_pagemap(tmp_path / "pagemap-1.img")
    assert pm1.pages_id == 65537
    assert pm1.entries == (
        PagemapEntry(0x10000, 2, PE_PRESENT),
        PagemapEntry(0x20000, 1, PE_LAZY),
        PagemapEntry(0x30000, 1, PE_PRESENT | PE_LAZY),
    )
    assert (tmp_path / "pages-65537.img").read_bytes() == page(1) + page(2) + page(3)
    assert read_pagemap(tmp_path / "pagemap-2.img").pages_id == 65538
    assert (tmp_path / "pages-65538.img").read_bytes() == b"".join(page(i) for i in range(300))


def test_parent_reported_when_parent_pagemap_exists(tmp_path: Path, peer: Peer) -> None:
    (tmp_path / "parent").mkdir()
    write_pagemap(tmp_path / "parent" / "pagemap-1.img", 1, [PagemapEntry(0x1000, 1, PE_PRESENT)])
    assert peer.open2(2) == b"\x00"
    peer.sk.sendall(cp.encode_iov(cp.Command.PARENT, dst_id=cp.ImageId(TASK, 1).encode()))
    assert peer.sk.recv(4) == b"\x01\0\0\0"
    assert peer.open2(1) == b"\x01"
    peer.add(1, 0x1000, 1, PE_PARENT)
    assert peer.close() == 0
    assert isinstance(peer.finish(), ReceiveStats)
    assert read_pagemap(tmp_path / "pagemap-1.img").entries == (PagemapEntry(0x1000, 1, PE_PARENT),)


def assert_failed(peer: Peer, tmp_path: Path, match: str) -> None:
    result = peer.finish()
    assert isinstance(result, ProtocolError), result
    assert match in str(result)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "parent") == []


def test_eof_inside_pages_removes_partial_files(tmp_path: Path, peer: Peer) -> None:
    peer.open2(1)
    peer.add(1, 0x10000, 400, PE_PRESENT, b"x" * (300 * 4096))
    peer.sk.shutdown(socket.SHUT_WR)
    assert_failed(peer, tmp_path, "inside page data")


def test_eof_before_close_is_an_error(tmp_path: Path, peer: Peer) -> None:
    peer.open2(1)
    peer.add(1, 0x10000, 1, PE_PRESENT, page(0))
    peer.sk.shutdown(socket.SHUT_WR)
    assert_failed(peer, tmp_path, "before CLOSE")


def test_eof_inside_header(tmp_path: Path, peer: Peer) -> None:
    peer.sk.sendall(b"\x04\0\0\0")
    peer.sk.shutdown(socket.SHUT_WR)
    assert_failed(peer, tmp_path, "inside a header")


def test_garbage_fails_fast(tmp_path: Path, peer: Peer) -> None:
    t0 = time.monotonic()
    peer.sk.sendall(os.urandom(4096))
    assert_failed(peer, tmp_path, "page server")
    assert time.monotonic() - t0 < 2


def test_parent_run_without_parent_refused(tmp_path: Path, peer: Peer) -> None:
    assert peer.open2(1) == b"\x00"
    peer.add(1, 0x1000, 1, PE_PARENT)
    assert_failed(peer, tmp_path, "no parent")


def test_get_is_refused(tmp_path: Path, peer: Peer) -> None:
    peer.sk.sendall(cp.encode_iov(cp.Command.GET, nr_pages=1, vaddr=0x1000, dst_id=1))
    assert_failed(peer, tmp_path, "GET")


def test_unsorted_entries_refused(tmp_path: Path, peer: Peer) -> None:
    peer.open2(1)
    peer.add(1, 0x20000, 1, PE_LAZY)
    peer.add(1, 0x10000, 1, PE_LAZY)
    assert_failed(peer, tmp_path, "overlaps or is unsorted")


def test_quota(tmp_path: Path) -> None:
    p = Peer(CriuPageReceiver(tmp_path, max_bytes=1 << 20))
    p.open2(1)
    try:
        p.add(1, 0x100000, 512, PE_PRESENT, b"\0" * (512 * 4096))
    except OSError:
        pass  # the receiver may close before reading everything
    assert_failed(p, tmp_path, "image quota exceeded")


def test_implicit_open_and_force_close(tmp_path: Path, peer: Peer) -> None:
    peer.add(3, 0x1000, 1, PE_PRESENT, page(7))  # no OPEN2: CRIU's server opens implicitly
    peer.sk.sendall(cp.encode_iov(cp.Command.FORCE_CLOSE))
    assert peer.sk.recv(4) == b"\0\0\0\0"
    stats = peer.finish()
    assert isinstance(stats, ReceiveStats)
    assert (tmp_path / "pages-65537.img").read_bytes() == page(7)
    assert read_pagemap(tmp_path / "pagemap-3.img").entries == (PagemapEntry(0x1000, 1, 4),)


def test_small_batch_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_bytes"):
        CriuPageReceiver(tmp_path, batch_bytes=4096)


# -- FlatPageImage ------------------------------------------------------------------------------


def image_contents(d: Path, vpid: int) -> dict[int, bytes]:
    """page address -> content, read back the way a CRIU restore reads a flat image."""
    pm = read_pagemap(d / f"pagemap-{vpid}.img")
    data = (d / f"pages-{pm.pages_id}.img").read_bytes()
    assert len(data) == pm.present_pages * 4096
    out: dict[int, bytes] = {}
    off = 0
    for e in pm.entries:
        assert e.flags == PE_PRESENT and e.nr_pages <= 1024
        for i in range(e.nr_pages):
            out[e.vaddr + i * 4096] = data[off : off + 4096]
            off += 4096
    return out


def test_flat_image_in_place_and_staged(tmp_path: Path) -> None:
    img = FlatPageImage(tmp_path, 2, 7)
    assert image_contents(tmp_path, 2) == {}
    img.write(0x10000, page(1) + page(2) + page(3))
    assert img.staged_pages == 3 and img.pages == 0
    img.commit()
    assert img.pages == 3 and img.covers(0x10000, 3) and not img.covers(0x10000, 4)
    size = (tmp_path / "pages-7.img").stat().st_size
    img.write(0x11000, page(20))  # in place: the file does not grow
    assert img.staged_pages == 0 and (tmp_path / "pages-7.img").stat().st_size == size
    img.write(0xF000, page(30) + page(31) + page(32) + page(33) + page(34) + page(35))
    assert img.staged_pages == 3  # 0xf000 before, 0x13000.. after the run
    img.write(0x14000, page(40))  # overwrites its staged copy
    assert img.staged_pages == 3
    img.commit()
    assert image_contents(tmp_path, 2) == {
        0xF000: page(30),
        0x10000: page(31),
        0x11000: page(32),
        0x12000: page(33),
        0x13000: page(34),
        0x14000: page(40),
    }
    img.close()
    again = FlatPageImage(tmp_path, 2, 99)  # reopened: its own pages id wins
    assert again.pages_id == 7 and again.pages == 6
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pagemap-2.img", "pages-7.img"]


def test_flat_image_refuses_non_flat(tmp_path: Path) -> None:
    write_pagemap(tmp_path / "pagemap-1.img", 1, [PagemapEntry(0x1000, 1, PE_LAZY)])
    with pytest.raises(ProtocolError, match="not a flat image"):
        FlatPageImage(tmp_path, 1, 1)
    write_pagemap(tmp_path / "pagemap-3.img", 3, [PagemapEntry(0x1000, 2, PE_PRESENT)])
    (tmp_path / "pages-3.img").write_bytes(page(0))
    with pytest.raises(ProtocolError, match="pagemap says 2 pages"):
        FlatPageImage(tmp_path, 3, 3)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.integers(0, 1500), st.integers(1, 1100)),
            st.just((-1, 0)),  # commit
        ),
        max_size=12,
    )
)
def test_flat_image_matches_model(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    d = tmp_path_factory.mktemp("flat")
    img = FlatPageImage(d, 1, 1)
    model: dict[int, bytes] = {}
    committed: dict[int, bytes] = {}
    for n, (first, count) in enumerate(ops):
        if first < 0:
            img.commit()
            committed = dict(model)
            assert image_contents(d, 1) == committed
            continue
        data = b"".join(struct.pack("<QQ", n, first + i) * 256 for i in range(count))
        img.write(first * 4096, data)
        for i in range(count):
            model[(first + i) * 4096] = data[i * 4096 : (i + 1) * 4096]
        # pages inside the committed layout are updated in place at once
        on_disk = image_contents(d, 1)
        assert on_disk.keys() == committed.keys()
        assert all(on_disk[a] == model[a] for a in on_disk)
    img.commit()
    assert image_contents(d, 1) == model
    img.close()
