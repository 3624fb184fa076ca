"""Page-table queries on another process: the ``PAGEMAP_SCAN`` ioctl and ``/proc/PID/pagemap``.

Theory of operation
-------------------
Since Linux 6.7, an ``ioctl(PAGEMAP_SCAN)`` on an open ``/proc/PID/pagemap`` walks the page
tables of the target in ``[start, end)`` and fills a vector of ``page_region`` records: runs of
pages that share the same category bits (``PAGE_IS_*``). A page is reported when all bits of
``category_mask`` match (after XOR with ``category_inverted``) and, if ``category_anyof_mask`` is
set, at least one of those bits is set. With ``PM_SCAN_WP_MATCHING`` the kernel also
write-protects the reported pages (uffd-wp async mode): that is what the dirty trackers build on.

The kernel may stop before ``end`` even when the vector is not full; ``walk_end`` says where it
stopped, and :func:`scan` continues from there until ``end``. Regions of consecutive calls that
touch and share categories are merged.

:func:`present_ranges` finds the pages a process actually has (present in RAM or swapped out),
which is what the first pre-copy pass reads. Where the ioctl is missing (``ENOTTY``/``EINVAL``,
kernel < 6.7) it falls back to reading the 64-bit entries of ``/proc/PID/pagemap`` (bit 63 =
present, bit 62 = swapped), about 20 times slower.

Constants and layouts: ``include/uapi/linux/fs.h``; checked on 6.18 (see
``reference/uffd-wp-tracking.md`` sections 1 and 5).
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import os
import sys
from collections.abc import Iterable
from types import TracebackType

from phaul.engine.maps import PAGE_SIZE, Mapping, Range
from phaul.engine.proctree import wrap_oserror
from phaul.errors import ProcessGone

log = logging.getLogger(__name__)

# Categories (PAGE_IS_*).
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8
ALL_CATEGORIES = (
    PAGE_IS_WPALLOWED
    | PAGE_IS_WRITTEN
    | PAGE_IS_FILE
    | PAGE_IS_PRESENT
    | PAGE_IS_SWAPPED
    | PAGE_IS_PFNZERO
    | PAGE_IS_HUGE
)
"""The categories every kernel with PAGEMAP_SCAN knows (SOFT_DIRTY and GUARD came later)."""

# Scan flags (PM_SCAN_*).
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# Bits of a /proc/PID/pagemap entry.
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_SOFT_DIRTY = 1 << 55

TASK_SIZE = 0x7FFFFFFFF000
"""Top of the x86-64 user address space (4-level paging); the end of a whole-space scan."""

DEFAULT_VEC_LEN = 4096
"""Regions per ioctl; 96 KiB of vector."""

_PAGEMAP_READ_PAGES = 65536
"""Entries read at once by the /proc/PID/pagemap fallback (512 KiB)."""


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` (12 x u64)."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class PageRegion(ctypes.Structure):
    """``struct page_region`` (3 x u64): ``[start, end)`` and the categories of its pages."""

    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


PAGEMAP_SCAN = 0xC0606610
"""``_IOWR('f', 16, struct pm_scan_arg)``."""

assert ctypes.sizeof(PmScanArg) == 96
assert ctypes.sizeof(PageRegion) == 24

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

if sys.byteorder != "little":  # pragma: no cover - phaul supports x86-64 only
    raise ImportError("phaul.engine.pagemap assumes a little-endian host")

Region = tuple[int, int, int]
"""``(start, end, categories)`` as reported by PAGEMAP_SCAN."""


class ScanUnsupported(OSError):
    """The kernel has no PAGEMAP_SCAN (``ENOTTY``/``EINVAL`` on the ioctl)."""


def make_vector(vec_len: int = DEFAULT_VEC_LEN) -> ctypes.Array[PageRegion]:
    """A region vector for :func:`scan`, to be reused across calls."""
    return (PageRegion * vec_len)()


def scan(
    fd: int,
    start: int,
    end: int,
    *,
    flags: int = 0,
    category_mask: int = 0,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = ALL_CATEGORIES,
    max_pages: int = 0,
    vec: ctypes.Array[PageRegion] | None = None,
) -> list[Region]:
    """Run PAGEMAP_SCAN on the pagemap ``fd`` over ``[start, end)`` until the whole range is walked
    (or ``max_pages`` pages are reported; 0 = no limit).

    Returns ``(start, end, categories)`` regions in address order, merged where consecutive
    ioctls split a run. Raises ScanUnsupported (no ioctl), ProcessGone (``ESRCH``), or OSError
    (e.g. ``EPERM`` with ``PM_SCAN_CHECK_WPASYNC`` on an unregistered VMA).
    """
    if start % PAGE_SIZE or end % PAGE_SIZE:
        raise ValueError(f"scan range {start:#x}-{end:#x} is not page aligned")
    if vec is None:
        vec = make_vector()
    vec_len = len(vec)
    regions: list[Region] = []
    arg = PmScanArg()
    arg.size = ctypes.sizeof(PmScanArg)
    arg.flags = flags
    arg.vec = ctypes.addressof(vec)
    arg.vec_len = vec_len
    arg.category_inverted = category_inverted
    arg.category_mask = category_mask
    arg.category_anyof_mask = category_anyof_mask
    arg.return_mask = return_mask
    words = memoryview(vec).cast("B").cast("Q")
    pages_left = max_pages
    pos = start
    while pos < end:
        arg.start = pos
        arg.end = end
        arg.walk_end = 0
        arg.max_pages = pages_left
        n = _ioctl(fd, PAGEMAP_SCAN, ctypes.addressof(arg))
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOTTY, errno.EINVAL) and not _scan_supported_known():
                raise ScanUnsupported(err, "PAGEMAP_SCAN not supported: " + os.strerror(err))
            if err == errno.ESRCH:
                raise ProcessGone("the process of this pagemap exited") from OSError(
                    err, os.strerror(err)
                )
            raise OSError(err, f"PAGEMAP_SCAN {pos:#x}-{end:#x}: {os.strerror(err)}")
        if n:
            flat = words[: 3 * n].tolist()
            got = list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
            if max_pages:
                pages_left -= sum(e - s for s, e, _ in got) // PAGE_SIZE
            if regions and got[0][0] == regions[-1][1] and got[0][2] == regions[-1][2]:
                regions[-1] = (regions[-1][0], got[0][1], got[0][2])
                got = got[1:]
            regions.extend(got)
            if max_pages and pages_left <= 0:
                break
        walk_end = int(arg.walk_end)
        if walk_end <= pos:
            # The kernel always advances unless something is badly wrong; never spin.
            raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {pos:#x}")
        pos = walk_end
    return regions


_SUPPORTED: bool | None = None


def _scan_supported_known() -> bool:
    return _SUPPORTED is True


def scan_supported() -> bool:
    """Whether this kernel has PAGEMAP_SCAN (probed once on our own pagemap, then cached)."""
    global _SUPPORTED  # noqa: PLW0603 - a process-wide capability probe, computed once
    if _SUPPORTED is None:
        buf = ctypes.create_string_buffer(PAGE_SIZE * 2)
        addr = (ctypes.addressof(buf) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            scan(fd, addr, addr + PAGE_SIZE, category_anyof_mask=PAGE_IS_PRESENT)
            _SUPPORTED = True
        except ScanUnsupported:
            _SUPPORTED = False
        finally:
            os.close(fd)
        log.debug("PAGEMAP_SCAN supported: %s", _SUPPORTED)
    return _SUPPORTED


def open_pagemap(pid: int) -> int:
    """Open ``/proc/PID/pagemap`` read-only (O_CLOEXEC). Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "open pagemap"):
        return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def read_entries(fd: int, start: int, end: int) -> array.array[int]:
    """The raw 64-bit pagemap entries of the pages in ``[start, end)`` (one per page).

    Raises ProcessGone when the process exited.
    """
    first = start // PAGE_SIZE
    count = (end - start) // PAGE_SIZE
    out = array.array("Q")
    try:
        data = os.pread(fd, count * 8, first * 8)
    except ProcessLookupError as err:
        raise ProcessGone("the process of this pagemap exited") from err
    out.frombytes(data[: len(data) - len(data) % 8])
    return out


def _present_by_entries(fd: int, start: int, end: int) -> list[Range]:
    """Present-or-swapped page ranges from raw pagemap entries (the fallback)."""
    out: list[Range] = []
    mask = PM_PRESENT | PM_SWAPPED
    pos = start
    while pos < end:
        chunk_end = min(end, pos + _PAGEMAP_READ_PAGES * PAGE_SIZE)
        entries = read_entries(fd, pos, chunk_end)
        run_start = -1
        for i, entry in enumerate(entries):
            addr = pos + i * PAGE_SIZE
            if entry & mask:
                if run_start < 0:
                    run_start = addr
            elif run_start >= 0:
                out.append((run_start, addr))
                run_start = -1
        if run_start >= 0:
            out.append((run_start, pos + len(entries) * PAGE_SIZE))
        if len(entries) < (chunk_end - pos) // PAGE_SIZE:
            break  # short read: beyond the end of the address space
        pos = chunk_end
    return _merge_adjacent(out)


def _merge_adjacent(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class PagemapFile:
    """An open ``/proc/PID/pagemap`` (context manager); owns the fd and a reusable vector.

    Raises ProcessGone / AccessDenied on open.
    """

    def __init__(self, pid: int, *, vec_len: int = DEFAULT_VEC_LEN) -> None:
        self.pid = pid
        self._fd = open_pagemap(pid)
        self._vec = make_vector(vec_len)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("PagemapFile is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PagemapFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def scan(
        self,
        start: int,
        end: int,
        *,
        flags: int = 0,
        category_mask: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = ALL_CATEGORIES,
        max_pages: int = 0,
    ) -> list[Region]:
        """:func:`scan` on this file, with the file's vector. ProcessGone names this PID."""
        try:
            return scan(
                self.fileno(),
                start,
                end,
                flags=flags,
                category_mask=category_mask,
                category_inverted=category_inverted,
                category_anyof_mask=category_anyof_mask,
                return_mask=return_mask,
                max_pages=max_pages,
                vec=self._vec,
            )
        except ProcessGone as err:
            raise ProcessGone(f"no process with PID {self.pid}") from err

    def entries(self, start: int, end: int) -> array.array[int]:
        """Raw pagemap entries of ``[start, end)`` (see :func:`read_entries`)."""
        try:
            return read_entries(self.fileno(), start, end)
        except ProcessGone as err:
            raise ProcessGone(f"no process with PID {self.pid}") from err

    def present_ranges(self, mappings: Iterable[Mapping]) -> list[Range]:
        """Ranges of pages present in RAM or swapped out, within ``mappings`` (special mappings
        are skipped). Each range lies within one mapping; sorted by address."""
        out: list[Range] = []
        use_scan = scan_supported()
        for m in sorted(mappings, key=lambda m: m.start):
            if m.special or m.end > TASK_SIZE:
                continue
            if use_scan:
                regions = self.scan(
                    m.start,
                    m.end,
                    category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                )
                out.extend(_merge_adjacent([(s, e) for s, e, _ in regions]))
            else:
                try:
                    out.extend(_present_by_entries(self.fileno(), m.start, m.end))
                except ProcessGone as err:
                    raise ProcessGone(f"no process with PID {self.pid}") from err
        return out


def present_ranges(pid: int, mappings: Iterable[Mapping]) -> list[Range]:
    """Ranges of pages of ``pid`` present in RAM or swapped out, within ``mappings``.

    Uses PAGEMAP_SCAN (``category_anyof_mask = PRESENT|SWAPPED``: no page tables are allocated
    for sparse mappings); falls back to ``/proc/PID/pagemap`` entries on kernels without it.
    Raises ProcessGone, AccessDenied.
    """
    with PagemapFile(pid) as pm:
        return pm.present_ranges(mappings)
