"""Source side of the pre-copy page stream (format: :mod:`phaul.page_server.framing`).

Theory of operation
-------------------
:meth:`PageSender.send_ranges` reads byte ranges of a (running) process with one
:class:`~phaul.engine.vmread.VmReader` (``process_vm_readv`` into a reused buffer, batches of
``batch_bytes`` >= 1 MiB). Each run read is cut into pages; all-zero pages are found cheaply
(the first word of every page is gathered with one strided ``memoryview`` copy, and only pages
whose first word is zero are compared whole) and sent as ZERO runs without payload. The other
pages go out as DATA frames of up to ``MAX_DATA_PAGES`` pages. Uncompressed, a frame is a header
plus a ``memoryview`` of the reader's buffer, and the frames of one run leave in one
``sendmsg`` (up to ``IOV_MAX`` buffers): the page bytes are copied once, by the kernel, from the
buffer into the socket. With a codec, each frame is compressed (a frame whose compressed form
does not save 1/32 goes raw, and after such a frame the next 1, 2, 4 ... 64 frames go raw
without trying: incompressible memory costs little more than no codec).

Ranges that vanished while being read (``VmReader.gone``) are sent as DROP frames; ranges mapped
but unreadable (``PROT_NONE``) are skipped and listed in :attr:`SendStats.unreadable`.

:meth:`PageSender.end_pass` sends PASS_END and blocks until the target's ACK.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from phaul.engine.maps import Range
from phaul.engine.vmread import VmReader
from phaul.errors import ProtocolError
from phaul.page_server.framing import (
    ACK_PAYLOAD,
    HEADER_SIZE,
    MAX_DATA_PAGES,
    MAX_RUN_PAGES,
    PAGE_SHIFT,
    PAGE_SIZE,
    Ack,
    Codec,
    Compressor,
    Kind,
    decode_ack,
    decode_header,
    encode_header,
    parse_codec,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 8 << 20
MIN_BATCH_BYTES = 1 << 20
IOV_MAX = 1024
MAX_BACKOFF = 64
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_WORD = bytes(8)
_WORDS_PER_PAGE = PAGE_SIZE // 8


@dataclass(frozen=True, slots=True)
class SendStats:
    """What one :meth:`PageSender.send_ranges` sent.

    pages: pages sent (DATA and ZERO); zero_pages: those sent as ZERO; bytes_payload: raw bytes
    of the DATA pages (before compression); bytes_wire: bytes written to the socket (headers
    and payloads); dropped_pages: pages of ranges that vanished (DROP frames); unreadable:
    ranges skipped because mapped but unreadable; seconds: wall time of the call.
    """

    pages: int
    zero_pages: int
    bytes_payload: int
    bytes_wire: int
    seconds: float
    dropped_pages: int = 0
    unreadable: tuple[Range, ...] = field(default=())

    @property
    def mib_per_second(self) -> float:
        """Page goodput (all pages, zero ones included)."""
        if self.seconds <= 0:
            return 0.0
        return (self.pages << PAGE_SHIFT) / (1 << 20) / self.seconds


class PageSender:
    """Sends pre-copy passes over ``sock`` (a blocking stream socket: TCP, or a bridge's end).

    ``codec``: ``"none"``, ``"lz4"`` or ``"zstd"``. ``batch_bytes``: the VmReader buffer.
    Not thread-safe; one sender per page connection.
    """

    def __init__(
        self, sock: socket.socket, *, codec: str = "none", batch_bytes: int = DEFAULT_BATCH_BYTES
    ) -> None:
        if batch_bytes < MIN_BATCH_BYTES or batch_bytes % PAGE_SIZE:
            raise ValueError(f"batch_bytes must be a multiple of 4096 and >= {MIN_BATCH_BYTES}")
        self.sock = sock
        self.codec = parse_codec(codec)
        self.batch_bytes = batch_bytes
        self._compressor = Compressor(self.codec) if self.codec is not Codec.NONE else None
        self._reader: VmReader | None = None
        self._backoff = 0  # frames to send raw after an incompressible one (doubles)
        self._skip = 0
        self._ack_buf = bytearray(HEADER_SIZE + ACK_PAYLOAD.size)
        # per-call counters
        self._wire = 0
        self._payload = 0
        self._pages = 0
        self._zero = 0

    def close(self) -> None:
        """Release the read buffer (the socket belongs to the caller)."""
        self._reader = None

    def _reader_for(self, pid: int) -> VmReader:
        if self._reader is None or self._reader.pid != pid:
            self._reader = VmReader(pid, self.batch_bytes)
        return self._reader

    def send_ranges(
        self,
        pid: int,
        vpid: int,
        ranges: Iterable[tuple[int, int]],
        on_read: Callable[[int, memoryview], None] | None = None,
    ) -> SendStats:
        """Send the page-aligned byte ranges ``[start, end)`` of process ``pid`` (``vpid``: its
        pid in its own namespace, naming the target's image). Raises ProcessGone, AccessDenied,
        ProtocolError (connection failed), ValueError (unaligned range)."""
        t0 = time.monotonic()
        self._wire = self._payload = self._pages = self._zero = 0
        pairs: list[tuple[int, int]] = []
        for start, end in ranges:
            if start % PAGE_SIZE or end % PAGE_SIZE:
                raise ValueError(f"send_ranges: range {start:#x}-{end:#x} is not page aligned")
            if end > start:
                pairs.append((start, end - start))
        reader = self._reader_for(pid)
        for addr, view in reader.read(pairs):
            if on_read is not None:
                on_read(addr, view)  # e.g. the hash tracker records what was really sent
            self._send_run(vpid, addr, view)
        dropped = 0
        for start, end in reader.gone:
            dropped += (end - start) >> PAGE_SHIFT
            self._send_runs_of(Kind.DROP, vpid, start, (end - start) >> PAGE_SHIFT)
        stats = SendStats(
            pages=self._pages,
            zero_pages=self._zero,
            bytes_payload=self._payload,
            bytes_wire=self._wire,
            seconds=time.monotonic() - t0,
            dropped_pages=dropped,
            unreadable=tuple(reader.unreadable),
        )
        log.debug(
            "pid %d: sent %d pages (%d zero) %d B on the wire in %.3f s",
            pid,
            stats.pages,
            stats.zero_pages,
            stats.bytes_wire,
            stats.seconds,
        )
        return stats

    def end_pass(self, pass_no: int) -> Ack:
        """Send PASS_END ``pass_no`` and wait for the target's ACK (blocking)."""
        self._sendmsg([encode_header(Kind.PASS_END, aux=pass_no)])
        buf = memoryview(self._ack_buf)
        self._recv_exact(buf[:HEADER_SIZE])
        header = decode_header(buf[:HEADER_SIZE])
        if header.kind is not Kind.ACK:
            raise ProtocolError(f"page stream: expected ACK, got {header.kind.name}")
        self._recv_exact(buf[HEADER_SIZE:])
        ack = decode_ack(header, buf[HEADER_SIZE:])
        if ack.pass_no != pass_no:
            raise ProtocolError(f"page stream: ACK for pass {ack.pass_no}, expected {pass_no}")
        return ack

    # -- internals ------------------------------------------------------------------------

    def _send_run(self, vpid: int, addr: int, view: memoryview) -> None:
        """Send one contiguous run read from the process (a multiple of the page size)."""
        npages = len(view) >> PAGE_SHIFT
        self._pages += npages
        parts: list[bytes | memoryview] = []
        start = 0  # first page of the pending data run
        for z0, z1 in _zero_runs(view, npages):
            if z0 > start:
                self._data_frames(parts, vpid, addr, view, start, z0)
            nz = z1 - z0
            self._zero += nz
            self._queue_runs(parts, Kind.ZERO, vpid, addr + (z0 << PAGE_SHIFT), nz)
            start = z1
        if npages > start:
            self._data_frames(parts, vpid, addr, view, start, npages)
        if parts:
            self._sendmsg(parts)

    def _data_frames(
        self,
        parts: list[bytes | memoryview],
        vpid: int,
        addr: int,
        view: memoryview,
        first: int,
        end: int,
    ) -> None:
        while first < end:
            n = min(MAX_DATA_PAGES, end - first)
            chunk = view[first << PAGE_SHIFT : (first + n) << PAGE_SHIFT]
            vaddr = addr + (first << PAGE_SHIFT)
            self._payload += len(chunk)
            payload: bytes | memoryview = chunk
            codec = Codec.NONE
            if self._compressor is not None:
                if self._skip:
                    self._skip -= 1
                else:
                    packed = self._compressor.compress(chunk)
                    if len(packed) < len(chunk) - len(chunk) // 32:
                        payload, codec = packed, self.codec
                        self._backoff = 0
                    else:  # incompressible: try again after 1, 2, 4 ... 64 frames
                        self._backoff = min(max(1, 2 * self._backoff), MAX_BACKOFF)
                        self._skip = self._backoff
            parts.append(encode_header(Kind.DATA, vpid=vpid, vaddr=vaddr, nr_pages=n,
                                       payload_len=len(payload), codec=codec))  # fmt: skip
            parts.append(payload)
            if len(parts) >= IOV_MAX:
                self._sendmsg(parts)
                parts.clear()
            first += n

    def _queue_runs(
        self, parts: list[bytes | memoryview], kind: Kind, vpid: int, vaddr: int, nr: int
    ) -> None:
        while nr:
            n = min(nr, MAX_RUN_PAGES)
            parts.append(encode_header(kind, vpid=vpid, vaddr=vaddr, nr_pages=n))
            vaddr += n << PAGE_SHIFT
            nr -= n
            if len(parts) >= IOV_MAX:
                self._sendmsg(parts)
                parts.clear()

    def _send_runs_of(self, kind: Kind, vpid: int, vaddr: int, nr: int) -> None:
        parts: list[bytes | memoryview] = []
        self._queue_runs(parts, kind, vpid, vaddr, nr)
        if parts:
            self._sendmsg(parts)

    def _sendmsg(self, parts: list[bytes | memoryview]) -> None:
        """Send all of ``parts`` (sendmsg may stop early: resume where it stopped)."""
        total = sum(len(p) for p in parts)
        self._wire += total
        bufs = parts
        try:
            while True:
                n = self.sock.sendmsg(bufs)
                total -= n
                if total <= 0:
                    return
                i = 0
                while n >= len(bufs[i]):
                    n -= len(bufs[i])
                    i += 1
                bufs = [memoryview(bufs[i])[n:], *bufs[i + 1 :]]
        except OSError as err:
            raise ProtocolError(f"page stream: send failed: {err}") from err

    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise ProtocolError("page stream: target closed the connection")
                got += n
        except OSError as err:
            raise ProtocolError(f"page stream: receive failed: {err}") from err


def _zero_runs(view: memoryview, npages: int) -> list[tuple[int, int]]:
    """Runs ``[first, end)`` of all-zero pages in ``view`` (page indices), in order."""
    firsts = view.cast("B").cast("Q")[::_WORDS_PER_PAGE].tobytes()
    runs: list[tuple[int, int]] = []
    pos = 0
    while True:
        p = firsts.find(_ZERO_WORD, pos)
        if p < 0:
            return runs
        if p % 8:
            pos = p + 8 - p % 8
            continue
        i = p >> 3
        pos = p + 8
        off = i << PAGE_SHIFT
        if view[off : off + PAGE_SIZE] != _ZERO_PAGE:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
