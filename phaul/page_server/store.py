"""Target-side page store: receives a CRIU dump's pages over CRIU's page-server protocol.

Theory of operation
-------------------
``criu dump --page-server --address A --port P`` connects to a page server and, instead of
writing ``pagemap-*.img``/``pages-*.img`` itself, streams them (criu/page-xfer.c): for each
pagemap an ``OPEN2`` (answered with a has-parent byte), then one ``ADD_F`` header per run of pages
followed by the raw pages when the run is ``PE_PRESENT``, and at the end ``CLOSE`` (answered with
an s32 0). :class:`CriuPageReceiver` plays CRIU's own page server (``criu page-server``) for one
such session and writes exactly the files CRIU's page server would:

- ``pagemap-<vpid>.img`` (or ``pagemap-shmem-<shmid>.img``) with a ``pagemap_head`` naming
  ``pages-<n>.img``, ``n`` counting from 0x10001 per opened pagemap as CRIU's page server does
  (``up_page_ids_base``: it keeps clear of ids the dumping CRIU may use for its local images);
- ``pages-<n>.img``: the raw data of the present runs, in order.

Copy the dump's other images into the same directory and a plain ``criu restore -D dir`` works.

Page data never becomes Python objects: it is received with ``recv_into`` straight into one
preallocated buffer (``batch_bytes``, >= 1 MiB) and written to the pages file with ``os.write``
whenever the buffer is full or the image changes. Headers are 32 bytes read into their own buffer.

The session ends with ``CLOSE``/``FORCE_CLOSE``: the s32 reply is sent and :meth:`serve` returns;
the caller closes the connection (CRIU's dump side closes it after reading the reply). An EOF, a
stream error, a malformed command or an exceeded quota raises ProtocolError, after removing every
file this session created: an images directory never holds a half-received image.

A parent image (``<images_dir>/parent/pagemap-<id>.img``) is reported to CRIU in the OPEN2 and
PARENT replies as CRIU's page server does, so a dump with ``--prev-images-dir`` may send
``PE_PARENT`` runs (without data).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from phaul.errors import PhaulError, ProtocolError
from phaul.page_server.criu_image import (
    PAGE_SHIFT,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    PagemapWriter,
    pagemap_name,
    pages_name,
    read_pagemap,
    write_pagemap,
)
from phaul.page_server.criu_protocol import (
    IOV_SIZE,
    Command,
    ImageId,
    PageServerIov,
    decode_dst_id,
    decode_iov,
    encode_close_reply,
    encode_open2_reply,
    encode_parent_reply,
)

log = logging.getLogger(__name__)

FIRST_PAGES_ID = 0x10001  # CRIU's page server: page_ids (1) + 0x10000, criu/image.c
MIN_BATCH_BYTES = 1 << 20
DEFAULT_BATCH_BYTES = 4 << 20


class PageStream(Protocol):
    """What the receiver needs from a connection (a ``socket.socket`` fits; a TLS or SSH channel
    adapter must provide the same two calls, blocking)."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def sendall(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, slots=True)
class ReceiveStats:
    """What one session stored.

    pages/bytes: page data received (PE_PRESENT runs); seconds: from the first byte received to
    the CLOSE reply; files: image files written (pagemaps + pages files); images: their names.
    """

    pages: int
    bytes: int
    seconds: float
    files: int
    images: tuple[str, ...] = field(default=())

    @property
    def mib_per_second(self) -> float:
        """Goodput of the page data."""
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


class _OpenImage:
    """The pagemap/pages pair being received."""

    def __init__(
        self, image: ImageId, dst_id: int, pagemap: PagemapWriter, pages_fd: int, has_parent: bool
    ):
        self.image = image
        self.dst_id = dst_id
        self.pagemap = pagemap
        self.pages_fd = pages_fd
        self.has_parent = has_parent

    def close(self) -> None:
        try:
            self.pagemap.close()
        finally:
            os.close(self.pages_fd)


class CriuPageReceiver:
    """Receives one CRIU dump's pages into ``images_dir`` (see the module docstring).

    ``max_bytes`` bounds what the session may write (page data plus pagemap entries); beyond it
    the session fails with ProtocolError("image quota exceeded"). One receiver serves one session
    at a time. Reused for another session, it keeps counting pages ids, so the second session
    does not overwrite the first one's pages files.
    """

    def __init__(
        self,
        images_dir: Path,
        *,
        max_bytes: int | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        if batch_bytes < MIN_BATCH_BYTES or batch_bytes % (1 << PAGE_SHIFT):
            raise ValueError(f"batch_bytes must be a multiple of 4096 and >= {MIN_BATCH_BYTES}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.images_dir = Path(images_dir)
        self.max_bytes = max_bytes
        self._buf = bytearray(batch_bytes)
        self._view = memoryview(self._buf)
        self._hdr = bytearray(IOV_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._next_pages_id = FIRST_PAGES_ID
        # per-session state, reset by serve()
        self._fill = 0
        self._cur: _OpenImage | None = None
        self._created: dict[Path, None] = {}  # ordered set
        self._written = 0
        self._pages = 0
        self._first_byte = 0.0

    # -- public -----------------------------------------------------------------------------

    def serve(self, stream: PageStream) -> ReceiveStats:
        """Serve one dump session on ``stream`` until CLOSE; blocking (run it in a thread).

        Returns what was stored. Raises ProtocolError when the peer sends something malformed,
        closes or fails mid-session, or exceeds ``max_bytes``; PhaulError when an image file
        cannot be written. On any error every file of the session is removed.
        """
        self._fill = 0
        self._cur = None
        self._created = {}
        self._written = 0
        self._pages = 0
        self._first_byte = 0.0
        _set_nodelay(stream)
        try:
            stats = self._serve(stream)
        except BaseException:
            self._abort()
            raise
        log.info(
            "page store %s: %d pages (%d bytes) in %d files, %.3f s, %.0f MiB/s",
            self.images_dir,
            stats.pages,
            stats.bytes,
            stats.files,
            stats.seconds,
            stats.mib_per_second,
        )
        return stats

    # -- session ----------------------------------------------------------------------------

    def _serve(self, stream: PageStream) -> ReceiveStats:
        while True:
            if not self._recv_header(stream):
                raise ProtocolError("page server: connection closed before CLOSE (dump incomplete)")
            iov = decode_iov(self._hdr)
            cmd = iov.command
            if cmd in (Command.ADD_F, Command.ADD, Command.HOLE):
                self._add(stream, iov)
            elif cmd is Command.OPEN2:
                has_parent = self._open(iov.dst_id)
                _send(stream, encode_open2_reply(has_parent))
            elif cmd is Command.OPEN:
                self._open(iov.dst_id)
            elif cmd is Command.PARENT:
                _send(stream, encode_parent_reply(self._has_parent(decode_dst_id(iov.dst_id))))
            elif cmd in (Command.CLOSE, Command.FORCE_CLOSE):
                self._finish_image()
                _send(stream, encode_close_reply(0))
                seconds = time.monotonic() - self._first_byte
                return ReceiveStats(
                    pages=self._pages,
                    bytes=self._pages << PAGE_SHIFT,
                    seconds=seconds,
                    files=len(self._created),
                    images=tuple(p.name for p in self._created),
                )
            else:  # Command.GET: asks a dump side for pages; we are the receiving side.
                raise ProtocolError(f"page server: {cmd.name} is not served by the page store")

    def _recv_header(self, stream: PageStream) -> bool:
        """Fill the 32-byte header; False on a clean EOF before its first byte."""
        got = 0
        while got < IOV_SIZE:
            n = _recv(stream, self._hdr_view[got:], IOV_SIZE - got)
            if n == 0:
                if got == 0:
                    return False
                raise ProtocolError(f"page server: connection closed inside a header ({got} B)")
            if not self._first_byte:
                self._first_byte = time.monotonic()
            got += n
        return True

    def _has_parent(self, image: ImageId) -> bool:
        return (self.images_dir / "parent" / image.pagemap_name).exists()

    def _open(self, dst_id: int) -> bool:
        image = decode_dst_id(dst_id)
        self._finish_image()
        pages_id = self._next_pages_id
        self._next_pages_id += 1
        pagemap_path = self.images_dir / image.pagemap_name
        pages_path = self.images_dir / pages_name(pages_id)
        log.debug("page store: open %s -> %s", pagemap_path.name, pages_path.name)
        self._charge(32)  # magics + pagemap_head
        try:
            self._created[pagemap_path] = None
            pagemap = PagemapWriter(pagemap_path, pages_id)
            try:
                self._created[pages_path] = None
                fd = os.open(
                    pages_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
            except BaseException:
                pagemap.close()
                raise
        except OSError as err:
            raise PhaulError(f"page store: cannot create {pagemap_path}: {err}") from err
        has_parent = self._has_parent(image)
        self._cur = _OpenImage(image, dst_id, pagemap, fd, has_parent)
        return has_parent

    def _add(self, stream: PageStream, iov: PageServerIov) -> None:
        if self._cur is None or self._cur.dst_id != iov.dst_id:
            # CRIU's page server opens implicitly too ("Deprecated IO w/o open").
            self._open(iov.dst_id)
        cur = self._cur
        assert cur is not None
        if iov.flags & PE_PARENT and not cur.has_parent:
            # We answered "no parent": a restore could not find these pages anywhere.
            raise ProtocolError(f"page server: PE_PARENT run for {cur.image}, which has no parent")
        entry = PagemapEntry(vaddr=iov.vaddr, nr_pages=iov.nr_pages, flags=iov.flags)
        nbytes = iov.payload_bytes
        self._charge(nbytes + 32)  # the entry itself is at most ~30 bytes
        try:
            cur.pagemap.add(entry)
        except OSError as err:
            raise PhaulError(f"page store: cannot write {cur.pagemap.path}: {err}") from err
        if not iov.flags & PE_PRESENT:
            return
        self._recv_pages(stream, nbytes)
        self._pages += iov.nr_pages

    def _recv_pages(self, stream: PageStream, nbytes: int) -> None:
        view = self._view
        cap = len(view)
        remaining = nbytes
        while remaining:
            if self._fill == cap:
                self._flush()
            want = min(remaining, cap - self._fill)
            n = _recv(stream, view[self._fill : self._fill + want], want)
            if n == 0:
                raise ProtocolError(
                    f"page server: connection closed inside page data "
                    f"({nbytes - remaining} of {nbytes} bytes)"
                )
            self._fill += n
            remaining -= n

    def _flush(self) -> None:
        if not self._fill:
            return
        cur = self._cur
        assert cur is not None
        data = self._view[: self._fill]
        try:
            while data:
                n = os.write(cur.pages_fd, data)
                data = data[n:]
        except OSError as err:
            raise PhaulError(f"page store: cannot write pages of {cur.image}: {err}") from err
        self._fill = 0

    def _finish_image(self) -> None:
        cur = self._cur
        if cur is None:
            return
        try:
            self._flush()
        finally:
            self._cur = None
            try:
                cur.close()
            except OSError as err:
                raise PhaulError(f"page store: cannot close {cur.pagemap.path}: {err}") from err

    def _charge(self, nbytes: int) -> None:
        self._written += nbytes
        if self.max_bytes is not None and self._written > self.max_bytes:
            raise ProtocolError(
                f"page server: image quota exceeded ({self._written} > {self.max_bytes} bytes)"
            )

    def _abort(self) -> None:
        cur, self._cur = self._cur, None
        self._fill = 0
        if cur is not None:
            try:
                cur.close()
            except OSError as err:
                log.warning("page store: closing %s after an error: %s", cur.pagemap.path, err)
        for path in self._created:
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("page store: cannot remove partial image %s: %s", path, err)
        if self._created:
            log.info("page store: removed %d partial image files", len(self._created))
        self._created = {}


def _recv(stream: PageStream, view: memoryview, nbytes: int) -> int:
    try:
        return stream.recv_into(view, nbytes)
    except OSError as err:  # reset, timeout, TLS/SSH adapter failures surface as OSError
        raise ProtocolError(f"page server: receive failed: {err}") from err


def _send(stream: PageStream, data: bytes) -> None:
    try:
        stream.sendall(data)
    except OSError as err:
        raise ProtocolError(f"page server: send failed: {err}") from err


def _set_nodelay(stream: PageStream) -> None:
    """Replies are tiny and CRIU waits for them: never let Nagle hold one back."""
    if isinstance(stream, socket.socket) and stream.family in (socket.AF_INET, socket.AF_INET6):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- flat per-process image for pre-copy ------------------------------------------------------

MAX_ENTRY_PAGES = 1024  # CRIU's lazy-pages daemon buffers one entry: keep them small (lazy §7.6)


class FlatPageImage:
    """One process's pre-copy image, updated in place: ``pagemap-<vpid>.img`` + ``pages-<id>.img``
    covering every page sent so far, all entries ``PE_PRESENT`` (a restore, the final dump's
    ``parent`` link and the lazy-pages daemon all read it; reference/local-lazy-restore.md).

    :meth:`write` puts pages that lie inside the committed layout straight into place
    (``pwrite``); pages outside it go to a side file ``pages-<id>.img.staged`` (pages written
    again before the next commit overwrite their staged copy). :meth:`commit` merges the staged
    runs into a new layout (copying with ``copy_file_range``, the old file unlinked before the new
    one is renamed into place, see lazy-final-dump.md §7.3) and rewrites the pagemap atomically.
    Between commits the files on disk are always a consistent image of the last commit plus
    in-place updates. Not thread-safe: one writer per process image.
    """

    def __init__(self, images_dir: Path, vpid: int, pages_id: int) -> None:
        """Open the image of ``vpid`` in ``images_dir``, creating an empty one (pages file
        ``pages-<pages_id>.img``) when there is none. An existing pagemap's own pages id wins.
        Raises ProtocolError when an existing pagemap is malformed or not flat."""
        self.images_dir = Path(images_dir)
        self.pagemap_path = self.images_dir / pagemap_name(vpid)
        if self.pagemap_path.exists():
            pm = read_pagemap(self.pagemap_path)
            if any(e.flags & (PE_PRESENT | PE_PARENT) != PE_PRESENT for e in pm.entries):
                raise ProtocolError(f"{self.pagemap_path}: not a flat image (non-present runs)")
            pages_id = pm.pages_id
            runs = [(e.vaddr, e.nr_pages) for e in pm.entries]
        else:
            runs = []
        self.pages_id = pages_id
        self.pages_path = self.images_dir / pages_name(pages_id)
        self._staged_path = self.pages_path.with_name(self.pages_path.name + ".staged")
        self._layout = _Runs(runs)
        self._staged = _Runs([])
        if not self.pagemap_path.exists():
            write_pagemap(self.pagemap_path, pages_id, [])
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.pages_path, flags, 0o600)
        size = os.fstat(self._fd).st_size
        if size != self._layout.pages << PAGE_SHIFT:
            os.close(self._fd)
            raise ProtocolError(
                f"{self.pages_path}: {size} bytes, pagemap says {self._layout.pages} pages"
            )
        self._staged_fd = os.open(self._staged_path, flags | os.O_TRUNC, 0o600)

    @property
    def pages(self) -> int:
        """Pages in the committed layout."""
        return self._layout.pages

    @property
    def staged_pages(self) -> int:
        """Pages written outside the layout since the last commit."""
        return self._staged.pages

    def covers(self, vaddr: int, nr_pages: int) -> bool:
        """Whether every page of the range is in the committed layout."""
        return self._layout.covered(vaddr, nr_pages) == nr_pages

    def write(self, vaddr: int, data: bytes | bytearray | memoryview) -> None:
        """Store the pages ``data`` (a multiple of 4096 bytes) of the range starting at
        ``vaddr``. Raises ValueError on misaligned input, PhaulError on I/O errors."""
        view = memoryview(data).cast("B")
        if vaddr % (1 << PAGE_SHIFT) or len(view) % (1 << PAGE_SHIFT):
            raise ValueError("write: vaddr and length must be page aligned")
        page = 1 << PAGE_SHIFT
        end = vaddr + len(view)
        addr = vaddr
        try:
            while addr < end:
                nr = (end - addr) // page
                done = self._layout.pwrite(self._fd, addr, view[addr - vaddr :], nr)
                if done:
                    addr += done * page
                    continue
                # addr is outside the layout: up to the next layout run goes to the side file
                gap = min(nr, self._layout.gap_after(addr))
                chunk = view[addr - vaddr : addr - vaddr + gap * page]
                sub = addr
                while sub < addr + gap * page:
                    left = (addr + gap * page - sub) // page
                    n = self._staged.pwrite(self._staged_fd, sub, chunk[sub - addr :], left)
                    if not n:
                        n = min(left, self._staged.gap_after(sub))
                        off = self._staged.append(sub, n)
                        _pwrite_all(self._staged_fd, chunk[sub - addr : sub - addr + n * page], off)
                    sub += n * page
                addr += gap * page
        except OSError as err:
            raise PhaulError(f"flat image {self.pages_path}: write failed: {err}") from err

    def commit(self) -> None:
        """Merge the staged pages into the layout and rewrite pagemap and pages file."""
        if not self._staged.pages:
            return
        page = 1 << PAGE_SHIFT
        merged: list[tuple[int, int, int, int]] = []  # vaddr, nr, fd, file offset
        for vaddr, nr, off in self._layout.extents():
            merged.append((vaddr, nr, self._fd, off))
        for vaddr, nr, off in self._staged.extents():
            merged.append((vaddr, nr, self._staged_fd, off))
        merged.sort()
        tmp = self.pages_path.with_name(self.pages_path.name + ".new")
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                pos = 0
                for _vaddr, nr, fd, off in merged:
                    _copy_range(fd, off, out, pos, nr * page)
                    pos += nr * page
            finally:
                os.close(out)
            runs = _coalesce([(v, n) for v, n, _, _ in merged])
            os.close(self._fd)
            self.pages_path.unlink()
            tmp.replace(self.pages_path)
            self._fd = os.open(self.pages_path, os.O_RDWR | os.O_CLOEXEC)
            write_pagemap(
                self.pagemap_path,
                self.pages_id,
                [PagemapEntry(v, n, PE_PRESENT) for v, n in _split(runs, MAX_ENTRY_PAGES)],
            )
            os.ftruncate(self._staged_fd, 0)
        except OSError as err:
            raise PhaulError(f"flat image {self.pages_path}: commit failed: {err}") from err
        self._layout = _Runs(runs)
        self._staged = _Runs([])

    def close(self) -> None:
        """Close the files and drop uncommitted staged pages."""
        os.close(self._fd)
        os.close(self._staged_fd)
        self._staged_path.unlink(missing_ok=True)


class _Runs:
    """Sorted, non-overlapping page runs laid out back to back in a file (page offsets)."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.offsets: list[int] = []  # file offset (bytes) of each run
        self.pages = 0
        for vaddr, nr in runs:
            self.starts.append(vaddr)
            self.ends.append(vaddr + (nr << PAGE_SHIFT))
            self.offsets.append(self.pages << PAGE_SHIFT)
            self.pages += nr

    def _find(self, addr: int) -> int:
        """Index of the run containing addr, or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i if i >= 0 and addr < self.ends[i] else -1

    def covered(self, vaddr: int, nr: int) -> int:
        page = 1 << PAGE_SHIFT
        addr, end = vaddr, vaddr + nr * page
        while addr < end:
            i = self._find(addr)
            if i < 0:
                break
            addr = min(end, self.ends[i])
        return (addr - vaddr) // page

    def gap_after(self, addr: int) -> int:
        """Pages from addr (outside every run) to the next run (a huge number when none)."""
        i = bisect.bisect_right(self.starts, addr)
        return (self.starts[i] - addr) >> PAGE_SHIFT if i < len(self.starts) else 1 << 62

    def pwrite(self, fd: int, addr: int, data: memoryview, nr: int) -> int:
        """Write up to nr pages from addr while inside runs; returns pages written."""
        page = 1 << PAGE_SHIFT
        done = 0
        while done < nr:
            a = addr + done * page
            i = self._find(a)
            if i < 0:
                break
            n = min(nr - done, (self.ends[i] - a) // page)
            _pwrite_all(
                fd, data[done * page : (done + n) * page], self.offsets[i] + a - self.starts[i]
            )
            done += n
        return done

    def append(self, vaddr: int, nr: int) -> int:
        """Add a run at the end of the file (it must not overlap); returns its file offset."""
        i = bisect.bisect_right(self.starts, vaddr)
        off = self.pages << PAGE_SHIFT
        self.starts.insert(i, vaddr)
        self.ends.insert(i, vaddr + (nr << PAGE_SHIFT))
        self.offsets.insert(i, off)
        self.pages += nr
        return off

    def extents(self) -> list[tuple[int, int, int]]:
        """(vaddr, nr_pages, file offset) of every run, by vaddr."""
        return [
            (s, (e - s) >> PAGE_SHIFT, o)
            for s, e, o in zip(self.starts, self.ends, self.offsets, strict=True)
        ]


def _coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for vaddr, nr in runs:
        if out and out[-1][0] + (out[-1][1] << PAGE_SHIFT) == vaddr:
            out[-1] = (out[-1][0], out[-1][1] + nr)
        else:
            out.append((vaddr, nr))
    return out


def _split(runs: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    out = []
    for vaddr, nr in runs:
        while nr > limit:
            out.append((vaddr, limit))
            vaddr += limit << PAGE_SHIFT
            nr -= limit
        out.append((vaddr, nr))
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    while count:
        n = os.copy_file_range(src, dst, count, src_off, dst_off)
        if n == 0:
            raise OSError(errno.EIO, "copy_file_range: source shorter than its layout")
        src_off += n
        dst_off += n
        count -= n
