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
