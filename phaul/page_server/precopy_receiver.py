"""Target side of the pre-copy page stream (format: :mod:`phaul.page_server.framing`).

Theory of operation
-------------------
:meth:`PrecopyReceiver.serve` reads frames from one connection until EOF, in the calling thread.
Headers are received into a 32-byte buffer and validated before anything else is read; payloads
go with ``recv_into`` into one preallocated ``MAX_PAYLOAD`` buffer (compressed ones into a
second buffer, then decompressed into the first). Pages are written into one
:class:`~phaul.page_server.store.FlatPageImage` per vpid in ``images_dir`` (opened on first use;
pages file ``pages-<PAGES_ID_BASE + vpid>.img`` unless the image exists already). ZERO runs are
written as zero pages from a preallocated zero buffer. DROP frames are counted, not applied: a
FlatPageImage cannot forget pages (see the framing module for why stale pages are harmless).

At PASS_END every image is committed and an ACK with the pass's figures is sent. At EOF (between
frames) every image is committed and :meth:`serve` returns. Malformed input raises ProtocolError
(as does EOF inside a frame); the images are then closed without committing: the files hold the
last committed pass plus in-place updates of pages it already had, which the next pass or the
final dump's pages overwrite. ``max_bytes`` bounds the pages the images hold (committed and
staged, all vpids): exceeding it raises ProtocolError("quota exceeded"), at most one frame's worth
(1 MiB) late.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from phaul import trace
from phaul.errors import PhaulError, ProtocolError
from phaul.page_server.criu_image import (
    PE_PRESENT,
    PagemapEntry,
    pagemap_name,
    pages_name,
    write_pagemap,
)
from phaul.page_server.framing import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    PAGE_SHIFT,
    Ack,
    Codec,
    Decompressor,
    FrameHeader,
    Kind,
    decode_header,
    encode_ack,
)
from phaul.page_server.store import MAX_ENTRY_PAGES, FlatPageImage

log = logging.getLogger(__name__)

PAGES_ID_BASE = 0x100000
"""Pages ids of the flat images: clear of CRIU's own ids (1..) and its page server's (0x10001..)."""
WINDOW_BYTES = 64 << 20
"""Size of the mapped window of a fresh image's pages file."""


class PageStream(Protocol):
    """What the receiver needs from a connection (blocking)."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def sendall(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, slots=True)
class ReceiveStats:
    """What one :meth:`PrecopyReceiver.serve` stored.

    pages: pages written (zero pages included); zero_pages: from ZERO frames; bytes: page bytes
    written to the images; wire_bytes: bytes received; dropped_pages: pages of DROP frames;
    passes: PASS_END frames answered; seconds: first byte to EOF; images: vpids served.
    """

    pages: int
    zero_pages: int
    bytes: int
    wire_bytes: int
    dropped_pages: int
    passes: int
    seconds: float
    images: tuple[int, ...] = field(default=())

    @property
    def mib_per_second(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


class PrecopyReceiver:
    """Stores the pre-copy passes of one source into ``images_dir`` (see the module docstring).

    One receiver serves one connection at a time; not thread-safe.
    """

    def __init__(self, images_dir: Path, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.images_dir = Path(images_dir)
        self.max_bytes = max_bytes
        self._buf = bytearray(MAX_PAYLOAD)
        self._view = memoryview(self._buf)
        self._zbuf = bytearray(MAX_PAYLOAD)  # compressed payloads
        self._zview = memoryview(self._zbuf)
        self._zeros = memoryview(bytes(MAX_PAYLOAD))
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._decompressor = Decompressor()
        self._images: dict[int, FlatPageImage | _FreshImage] = {}
        self._images_seen: set[int] = set()
        self._usage = 0  # pages held by all images (committed + staged)
        self._first_byte = 0.0
        self._wire = 0
        self._reset_pass()

    def _reset_pass(self) -> None:
        self._pass_t0 = 0.0
        self._pass_pages = 0
        self._pass_zero = 0

    # -- public -----------------------------------------------------------------------------

    def serve(self, stream: PageStream) -> ReceiveStats:
        """Receive frames until EOF; commit and return what was stored. Blocking (a thread).

        Raises ProtocolError on malformed input, a broken connection or an exceeded quota;
        PhaulError when an image cannot be written.
        """
        self._first_byte = 0.0
        self._wire = 0
        self._images_seen = set()
        self._reset_pass()
        totals = [0, 0, 0, 0]  # pages, zero pages, dropped pages, passes
        _set_nodelay(stream)
        try:
            while self._recv_header(stream):
                h = decode_header(self._hdr)
                self._wire += HEADER_SIZE
                if not self._pass_t0:
                    self._pass_t0 = time.monotonic()
                if h.kind is Kind.DATA:
                    self._data(stream, h)
                    totals[0] += h.nr_pages
                elif h.kind is Kind.ZERO:
                    self._zero_run(h)
                    totals[0] += h.nr_pages
                    totals[1] += h.nr_pages
                elif h.kind is Kind.DROP:
                    totals[2] += h.nr_pages
                    log.debug("vpid %d: range %#x-%#x vanished", h.vpid, h.vaddr, h.end)
                elif h.kind is Kind.PASS_END:
                    trace.event("tgt recv pass_end")
                    self._commit_all()
                    trace.event("tgt recv pass committed")
                    ack = Ack(
                        pass_no=h.aux,
                        pages=self._pass_pages,
                        zero_pages=self._pass_zero,
                        bytes=self._pass_pages << PAGE_SHIFT,
                        seconds=time.monotonic() - self._pass_t0,
                    )
                    _send(stream, encode_ack(ack))
                    totals[3] += 1
                    log.info(
                        "pre-copy pass %d stored: %d pages (%d zero) in %.3f s",
                        ack.pass_no,
                        ack.pages,
                        ack.zero_pages,
                        ack.seconds,
                    )
                    self._reset_pass()
                else:  # ACK goes target -> source only
                    raise ProtocolError(f"page stream: unexpected {h.kind.name} frame")
            trace.event("tgt recv EOF")
            self._commit_all()
            trace.event("tgt recv committed")
        finally:
            self._close_all()
            trace.event("tgt recv closed")
        seconds = time.monotonic() - self._first_byte if self._first_byte else 0.0
        stats = ReceiveStats(
            pages=totals[0],
            zero_pages=totals[1],
            bytes=totals[0] << PAGE_SHIFT,
            wire_bytes=self._wire,
            dropped_pages=totals[2],
            passes=totals[3],
            seconds=seconds,
            images=tuple(sorted(self._images_seen)),
        )
        log.info(
            "pre-copy store %s: %d pages, %d passes, %.3f s, %.0f MiB/s",
            self.images_dir,
            stats.pages,
            stats.passes,
            stats.seconds,
            stats.mib_per_second,
        )
        return stats

    # -- frames -----------------------------------------------------------------------------

    def _data(self, stream: PageStream, h: FrameHeader) -> None:
        raw = h.raw_len
        img = self._target(h.vpid, h.vaddr)
        if isinstance(img, _FreshImage):
            self._charge(h.nr_pages)
            slot = img.slot(raw)
            try:
                self._receive_pages(stream, h, slot)
            finally:
                slot.release()
            img.append(h.vaddr, h.nr_pages)
        else:
            self._receive_pages(stream, h, self._view[:raw])
            self._store(img, h.vaddr, self._view[:raw])
        self._wire += h.payload_len
        self._pass_pages += h.nr_pages

    def _receive_pages(self, stream: PageStream, h: FrameHeader, out: memoryview) -> None:
        if h.codec is Codec.NONE:
            _recv_exact(stream, out)
        else:
            payload = self._zview[: h.payload_len]
            _recv_exact(stream, payload)
            self._decompressor.decompress_into(h.codec, payload, out, h.raw_len)

    def _zero_run(self, h: FrameHeader) -> None:
        img = self._target(h.vpid, h.vaddr)
        if isinstance(img, _FreshImage):
            self._charge(h.nr_pages)
            img.append(h.vaddr, h.nr_pages)  # a hole of the pages file: reads as zeros
        else:
            chunk_pages = MAX_PAYLOAD >> PAGE_SHIFT
            vaddr, left = h.vaddr, h.nr_pages
            while left:
                n = min(left, chunk_pages)
                self._store(img, vaddr, self._zeros[: n << PAGE_SHIFT])
                vaddr += n << PAGE_SHIFT
                left -= n
        self._pass_pages += h.nr_pages
        self._pass_zero += h.nr_pages

    def _charge(self, pages: int) -> None:
        """Account pages added to a fresh image, refusing them beyond the quota."""
        if self.max_bytes is not None and ((self._usage + pages) << PAGE_SHIFT) > self.max_bytes:
            raise ProtocolError(
                f"page stream: image quota exceeded "
                f"({(self._usage + pages) << PAGE_SHIFT} > {self.max_bytes} bytes)"
            )
        self._usage += pages

    def _store(self, img: FlatPageImage, vaddr: int, data: memoryview) -> None:
        before = img.pages + img.staged_pages
        img.write(vaddr, data)
        self._usage += img.pages + img.staged_pages - before
        if self.max_bytes is not None and (self._usage << PAGE_SHIFT) > self.max_bytes:
            raise ProtocolError(
                f"page stream: image quota exceeded ({self._usage << PAGE_SHIFT} > "
                f"{self.max_bytes} bytes)"
            )

    def _target(self, vpid: int, vaddr: int) -> FlatPageImage | _FreshImage:
        """The image of ``vpid`` that takes pages at ``vaddr``: a fresh image (no image existed
        and the pages keep arriving in address order) or the FlatPageImage."""
        img = self._images.get(vpid)
        if img is None:
            pages_id = PAGES_ID_BASE + vpid
            if (self.images_dir / pagemap_name(vpid)).exists():
                img = FlatPageImage(self.images_dir, vpid, pages_id)
                self._usage += img.pages
            else:
                img = _FreshImage(self.images_dir, vpid, pages_id)
            self._images[vpid] = img
            self._images_seen.add(vpid)
        if isinstance(img, _FreshImage) and vaddr < img.end:
            img = self._settle(vpid, img)
        return img

    def _settle(self, vpid: int, fresh: _FreshImage) -> FlatPageImage:
        """Write a fresh image's pagemap; further pages go through a FlatPageImage."""
        del self._images[vpid]
        fresh.finish()
        img = FlatPageImage(self.images_dir, vpid, fresh.pages_id)
        self._images[vpid] = img
        return img

    def _commit_all(self) -> None:
        for vpid, img in list(self._images.items()):
            if isinstance(img, _FreshImage):
                self._settle(vpid, img)
            else:
                img.commit()

    def _close_all(self) -> None:
        """Close every image; fresh ones (never committed) are removed."""
        images, self._images = self._images, {}
        self._usage = 0
        for img in images.values():
            try:
                if isinstance(img, _FreshImage):
                    img.abort()
                else:
                    img.close()
            except OSError as err:
                log.warning("pre-copy store: closing %s: %s", img.pages_path, err)

    def _recv_header(self, stream: PageStream) -> bool:
        """Fill the header buffer; False on EOF before its first byte."""
        got = 0
        while got < HEADER_SIZE:
            n = _recv(stream, self._hdr_view[got:], HEADER_SIZE - got)
            if n == 0:
                if got == 0:
                    return False
                raise ProtocolError(f"page stream: connection closed inside a header ({got} B)")
            if not self._first_byte:
                self._first_byte = time.monotonic()
            got += n
        return True


def _recv(stream: PageStream, view: memoryview, nbytes: int) -> int:
    try:
        return stream.recv_into(view, nbytes)
    except OSError as err:
        raise ProtocolError(f"page stream: receive failed: {err}") from err


def _recv_exact(stream: PageStream, view: memoryview) -> None:
    got = 0
    want = len(view)
    while got < want:
        n = _recv(stream, view[got:], want - got)
        if n == 0:
            raise ProtocolError(f"page stream: connection closed inside a payload ({got} B)")
        got += n


def _send(stream: PageStream, data: bytes) -> None:
    try:
        stream.sendall(data)
    except OSError as err:
        raise ProtocolError(f"page stream: send failed: {err}") from err


def _set_nodelay(stream: PageStream) -> None:
    """ACKs are tiny and the source waits for them."""
    if isinstance(stream, socket.socket) and stream.family in (socket.AF_INET, socket.AF_INET6):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _FreshImage:
    """The first pages of a vpid that has no image yet, while they arrive in address order
    (a first pass does): received straight into the pages file through a mapped window
    (``WINDOW_BYTES``), ZERO runs left as holes; :meth:`finish` writes the pagemap, after which
    the image is an ordinary flat image (all entries ``PE_PRESENT``, pages in address order)."""

    def __init__(self, images_dir: Path, vpid: int, pages_id: int) -> None:
        self.pages_id = pages_id
        self.pagemap_path = images_dir / pagemap_name(vpid)
        self.pages_path = images_dir / pages_name(pages_id)
        try:
            self._fd = os.open(
                self.pages_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
        except OSError as err:
            raise PhaulError(f"pre-copy store: cannot create {self.pages_path}: {err}") from err
        self.size = 0
        self.end = 0
        self.runs: list[list[int]] = []
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._map_off = 0

    @property
    def pages(self) -> int:
        return self.size >> PAGE_SHIFT

    def slot(self, nbytes: int) -> memoryview:
        """A writable view of the next ``nbytes`` of the pages file (release it after use)."""
        off = self.size
        try:
            if self._view is None or off + nbytes > self._map_off + WINDOW_BYTES:
                self._remap(off)
            assert self._map is not None and self._view is not None
            rel = off - self._map_off
        except OSError as err:
            raise PhaulError(f"pre-copy store: cannot map {self.pages_path}: {err}") from err
        return self._view[rel : rel + nbytes]

    def _remap(self, off: int) -> None:
        self._unmap()
        os.ftruncate(self._fd, off + WINDOW_BYTES)
        self._map = mmap.mmap(self._fd, WINDOW_BYTES, offset=off)
        self._map_off = off
        self._view = memoryview(self._map)

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def append(self, vaddr: int, nr_pages: int) -> None:
        """Record ``nr_pages`` pages at ``vaddr`` (>= :attr:`end`) as the next in the file."""
        last = self.runs[-1] if self.runs else None
        if last is not None and last[0] + (last[1] << PAGE_SHIFT) == vaddr:
            last[1] += nr_pages
        else:
            self.runs.append([vaddr, nr_pages])
        self.size += nr_pages << PAGE_SHIFT
        self.end = vaddr + (nr_pages << PAGE_SHIFT)

    def finish(self) -> None:
        """Cut the pages file to its data, write the pagemap, close."""
        try:
            self._unmap()
            os.ftruncate(self._fd, self.size)
            os.close(self._fd)
            entries = []
            for vaddr, nr in self.runs:
                for i in range(0, nr, MAX_ENTRY_PAGES):
                    n = min(MAX_ENTRY_PAGES, nr - i)
                    entries.append(PagemapEntry(vaddr + (i << PAGE_SHIFT), n, PE_PRESENT))
            write_pagemap(self.pagemap_path, self.pages_id, entries)
        except OSError as err:
            raise PhaulError(f"pre-copy store: cannot write {self.pagemap_path}: {err}") from err

    def abort(self) -> None:
        """Drop the image (it was never committed)."""
        self._unmap()
        os.close(self._fd)
        self.pages_path.unlink(missing_ok=True)
