"""Dirty-page tracking with userfaultfd write-protect (async mode) and ``PAGEMAP_SCAN``.

Theory of operation
-------------------
A userfaultfd is created *inside* the target by ptrace injection (:func:`inject.take_userfaultfd`:
``userfaultfd()`` + ``close()``, the target is stopped for well under a millisecond) and copied
into phaul with ``pidfd_getfd``. Everything else happens from phaul's side on that fd:

1. ``UFFDIO_API`` with ``UFFD_FEATURE_WP_ASYNC``: a write to a write-protected page is resolved
   by the kernel itself (it clears the page's uffd-wp bit) instead of blocking the writer, so a
   dead or stopped phaul never hangs the target.
2. ``UFFDIO_REGISTER`` (mode WP) of every private writable VMA.
3. Each :meth:`UffdTracker.collect` runs three ``PAGEMAP_SCAN`` walks on ``/proc/PID/pagemap``:

   a. *untracked*: report-only, ``category_inverted = category_mask = WPALLOWED``: the ranges
      of VMAs without async-WP registration. Private writable ones (new ``mmap``\\s, ``brk``
      growth into a new VMA, ``mremap``, ``MAP_FIXED`` replacements, ``mprotect`` to writable)
      are registered and reported whole. Ranges the kernel refuses (``EPERM``: no
      ``VM_MAYWRITE``; ``EINVAL``: ``MAP_DROPPABLE`` and the like; ``EBUSY``: the target uses
      its own userfaultfd there) are tracked by content hashing instead
      (:class:`hashtrack.PageHasher`), range by range.
   b. *protect*: ``PM_SCAN_WP_MATCHING`` with ``category_mask = WRITTEN|WPALLOWED``,
      ``category_anyof_mask = PRESENT|SWAPPED``, ``return_mask = WRITTEN``, looping on
      ``walk_end``: reports the populated pages written since they were last protected and
      protects them again, atomically per page table.
   c. *present*: report-only, ``category_mask = WPALLOWED``, ``anyof = PRESENT``: the populated
      pages of the registered VMAs. A page present at the previous collect and absent now was
      zapped (``MADV_DONTNEED``, ``MADV_FREE`` reclaim, ``madvise(REMOVE)``, swap-out): its
      content changed (to zeros, or to the file's), so it is reported dirty.

Why not the reference's fast path (``category_mask == return_mask == WRITTEN``, no anyof)?
That scan also *arms* never-populated holes: it installs uffd-wp PTE markers in them, which
allocates page tables on sparse mappings (1/512 of the size) and, worse, makes the holes look
like swapped-out pages to anyone else who scans (CRIU dumps armed holes as swapped pages). With
``anyof = PRESENT|SWAPPED`` holes are never armed; a first write to a hole creates a fresh PTE
without the uffd-wp bit, which reads as WRITTEN in the next protect scan, and a populated page
that becomes a hole is caught by the present-set diff (c). This also does not depend on the two
recent kernel fixes for the WRITTEN state of ``pte_none``/``pmd_none`` holes.

Correctness of the ordering: every content change of a tracked page is either a write through a
PTE without the uffd-wp bit (reported by the next protect scan: a write racing with scan (b)
lands either before the page is re-protected, so it is in what the caller reads after
``collect()`` returns, or after, so the next scan reports it) or a present->absent transition
(reported by the present diff). The caller reads reported pages after ``collect()`` returns.

Start-up self-test (:func:`probe`, cached): phaul tracks a 4 MiB THP-backed region of its own
memory with exactly this algorithm, writes one page, zaps one 4 KiB page and one whole 2 MiB
THP, and requires exactly those to be reported (and a write into a zapped hole after that).

Costs and limits (reference ``uffd-wp-tracking.md``): the target pays ~1.2 µs for the first
write to each page after each collect; protected THPs are split on the first write; writes by
other processes into shared memory and DMA into pinned pages are invisible (only private
writable mappings are tracked); an ``execve`` in the target makes collect raise ProcessGone
(the new image would need a new tracker); kernel >= 6.7.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence

from phaul.engine import inject
from phaul.engine.hashtrack import PageHasher
from phaul.engine.maps import (
    PAGE_SIZE,
    Mapping,
    Range,
    intersect_ranges,
    is_private_writable,
    merge_ranges,
    read_maps,
    subtract_ranges,
)
from phaul.engine.pagemap import (
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SCAN_WP_MATCHING,
    TASK_SIZE,
    PagemapFile,
)
from phaul.engine.proctree import ProcessRef
from phaul.engine.tracker import DirtyRanges, TrackerUnavailable
from phaul.errors import PhaulError, ProcessGone

log = logging.getLogger(__name__)

UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdUnavailable(TrackerUnavailable):
    """userfaultfd write-protect tracking cannot work on this kernel or for this process."""


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def uffd_api(fd: int) -> int:
    """``UFFDIO_API`` with async write-protect; returns the features the kernel granted."""
    arg = UffdioApi(api=UFFD_API, features=UFFD_FEATURE_WP_ASYNC, ioctls=0)
    _check(_ioctl(fd, UFFDIO_API, ctypes.addressof(arg)), "UFFDIO_API(WP_ASYNC)")
    if not arg.features & UFFD_FEATURE_WP_ASYNC:
        raise OSError(errno.EINVAL, "UFFDIO_API: kernel did not grant WP_ASYNC")
    return int(arg.features)


def uffd_register(fd: int, start: int, end: int) -> None:
    """``UFFDIO_REGISTER`` ``[start, end)`` in write-protect mode. Raises OSError."""
    arg = UffdioRegister(start=start, len=end - start, mode=UFFDIO_REGISTER_MODE_WP, ioctls=0)
    _check(
        _ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(arg)), f"UFFDIO_REGISTER {start:#x}-{end:#x}"
    )


def uffd_unregister(fd: int, start: int, end: int) -> None:
    """``UFFDIO_UNREGISTER`` ``[start, end)`` (clears the uffd-wp bits there). Raises OSError."""
    arg = UffdioRange(start=start, len=end - start)
    _check(_ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(arg)), f"UFFDIO_UNREGISTER {start:#x}")


def _regions_to_ranges(regions: Sequence[tuple[int, int, int]]) -> list[Range]:
    return merge_ranges((s, e) for s, e, _ in regions)


class UffdTracker:
    """The uffd-wp tracker (see the module docstring). One instance per process."""

    name = "uffd"

    def __init__(self) -> None:
        self._ref: ProcessRef | None = None
        self._uffd = -1
        self._pm: PagemapFile | None = None
        self._window: Range | None = None  # the self-test limits the domain to its own region
        self._domain: list[Range] = []
        self._present: list[Range] = []
        self._registered: list[Range] = []
        self._refused: dict[Range, int] = {}  # range -> errno of the failed registration
        self._hasher: PageHasher | None = None  # created on first need
        self.stats: dict[str, int] = {"collects": 0, "registered": 0, "hashed_ranges": 0}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, pid: int) -> None:
        """Take a userfaultfd from ``pid`` and initialise it (registration happens in collect).

        Raises ProcessGone, AccessDenied, InjectionFailed, UffdUnavailable.
        """
        ref = ProcessRef.of(pid)
        fd = inject.take_userfaultfd(pid)
        self._attach(ref, fd)

    def _attach(self, ref: ProcessRef, fd: int, window: Range | None = None) -> None:
        try:
            uffd_api(fd)
            self._pm = PagemapFile(ref.pid)
        except OSError as err:
            os.close(fd)
            raise UffdUnavailable(f"userfaultfd async write-protect unavailable: {err}") from err
        except BaseException:
            os.close(fd)
            raise
        self._ref = ref
        self._uffd = fd
        self._window = window
        log.debug("uffd tracker armed for pid %s (uffd %d)", ref, fd)

    def stop(self) -> None:
        """Unregister everything and close the uffd; the target keeps no trace. Idempotent."""
        if self._uffd >= 0:
            for start, end in merge_ranges(self._registered):
                try:
                    uffd_unregister(self._uffd, start, end)
                except OSError as err:
                    # ENOMEM/EINVAL: the range is gone; ESRCH etc.: the process is. Closing the
                    # uffd below releases whatever is left in the kernel anyway.
                    log.debug("unregister %#x-%#x: %s", start, end, err)
            os.close(self._uffd)
            self._uffd = -1
        if self._pm is not None:
            self._pm.close()
            self._pm = None
        self._registered = []
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None

    def copied(self, addr: int, data: bytes | memoryview) -> None:
        """Only the hash-tracked fallback ranges need to know what the caller read."""
        if self._hasher is not None:
            self._hasher.copied(addr, data)

    def __del__(self) -> None:
        if getattr(self, "_uffd", -1) >= 0:
            os.close(self._uffd)

    # -- collecting ---------------------------------------------------------------------------

    def _domain_mappings(self) -> list[Mapping]:
        assert self._ref is not None
        maps = [m for m in read_maps(self._ref.pid) if is_private_writable(m)]
        if self._window is not None:
            lo, hi = self._window
            maps = [
                Mapping(max(m.start, lo), min(m.end, hi), m.perms, m.offset, m.dev, m.inode, m.path)
                for m in maps
                if m.start < hi and m.end > lo
            ]
        return maps

    def collect(self) -> DirtyRanges:
        """Pages written since the previous collect (the whole domain on the first).

        Raises ProcessGone if the process exited or exec'd.
        """
        if self._pm is None or self._ref is None:
            raise RuntimeError("UffdTracker.collect() before start()")
        self._ref.check()
        pm = self._pm
        lo, hi = self._window if self._window is not None else (0, TASK_SIZE)
        try:
            domain_maps = self._domain_mappings()
            domain = merge_ranges((m.start, m.end) for m in domain_maps)

            # (a) untracked ranges: register them, or hash them when the kernel refuses.
            untracked = _regions_to_ranges(
                pm.scan(
                    lo,
                    hi,
                    category_inverted=PAGE_IS_WPALLOWED,
                    category_mask=PAGE_IS_WPALLOWED,
                    return_mask=PAGE_IS_WPALLOWED,
                )
            )
            new_whole: list[Range] = []
            hashed: list[Mapping] = []
            for m in domain_maps:
                if not intersect_ranges([(m.start, m.end)], untracked):
                    continue
                key = (m.start, m.end)
                if key not in self._refused:
                    try:
                        uffd_register(self._uffd, m.start, m.end)
                    except OSError as err:
                        if err.errno == errno.ENOMEM:
                            continue  # unmapped since we read maps: the next collect sees it
                        if err.errno == errno.ESRCH:
                            raise ProcessGone(f"process {self._ref.pid} exited") from err
                        self._refused[key] = err.errno or 0
                        log.info(
                            "pid %d: cannot write-protect %s (%s); tracking it by hashing",
                            self._ref.pid,
                            m,
                            os.strerror(err.errno or 0),
                        )
                    else:
                        self._registered.append(key)
                        self.stats["registered"] += 1
                        new_whole.append(key)
                        continue
                hashed.append(m)

            # (b) protect: written populated pages, re-armed.
            written = _regions_to_ranges(
                pm.scan(
                    lo,
                    hi,
                    flags=PM_SCAN_WP_MATCHING,
                    category_mask=PAGE_IS_WRITTEN | PAGE_IS_WPALLOWED,
                    category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    return_mask=PAGE_IS_WRITTEN,
                )
            )
            # (c) present set of the registered VMAs; pages that left it were zapped.
            present = _regions_to_ranges(
                pm.scan(
                    lo,
                    hi,
                    category_mask=PAGE_IS_WPALLOWED,
                    category_anyof_mask=PAGE_IS_PRESENT,
                    return_mask=PAGE_IS_PRESENT,
                )
            )
        except OSError as err:
            if err.errno == errno.ESRCH:
                raise ProcessGone(f"process {self._ref.pid} exited or exec'd") from err
            raise
        zapped = subtract_ranges(self._present, present)
        hashed_dirty = self._hash_ranges(hashed)

        entered = subtract_ranges(domain, self._domain)
        dirty = merge_ranges([*written, *zapped, *new_whole, *entered, *hashed_dirty])
        dirty = intersect_ranges(dirty, domain)
        vanished = subtract_ranges(self._domain, domain)
        self._domain = domain
        self._present = present
        self._registered = merge_ranges(self._registered)
        # Forget refusals of ranges that are no longer mapped as such.
        self._refused = {
            k: v for k, v in self._refused.items() if k in {(m.start, m.end) for m in domain_maps}
        }
        self.stats["collects"] += 1
        return DirtyRanges(dirty=dirty, vanished=vanished)

    def _hash_ranges(self, maps: list[Mapping]) -> list[Range]:
        if not maps and self._hasher is None:
            return []
        assert self._ref is not None
        if self._hasher is None:
            self._hasher = PageHasher(self._ref.pid)
        self.stats["hashed_ranges"] = len(maps)
        return self._hasher.update(maps)


# -- start-up self-test ----------------------------------------------------------------------

_PROBE_LOCK = threading.Lock()
_PROBE: tuple[bool, str] | None = None

_HUGE = 2 << 20


def _own_userfaultfd() -> int:
    fd = int(
        inject._syscall(
            ctypes.c_long(inject.SYS_USERFAULTFD),
            ctypes.c_long(inject.O_CLOEXEC | inject.O_NONBLOCK | inject.UFFD_USER_MODE_ONLY),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd(): {os.strerror(err)}")
    return fd


def self_test() -> None:
    """Track a region of phaul's own memory and check that writes and zaps are all reported.

    Raises UffdUnavailable (with the reason) when this kernel cannot track exactly.
    """
    area = mmap.mmap(-1, 3 * _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tracker = UffdTracker()
    try:
        anchor = ctypes.c_char.from_buffer(area)
        base = ctypes.addressof(anchor)
        del anchor  # an exported buffer could not be closed
        lo = (base + _HUGE - 1) & ~(_HUGE - 1)
        off = lo - base
        hi = lo + 2 * _HUGE
        with contextlib.suppress(OSError):
            area.madvise(mmap.MADV_HUGEPAGE, off, 2 * _HUGE)
        area[off : off + 2 * _HUGE] = b"\x5a" * (2 * _HUGE)
        try:
            fd = _own_userfaultfd()
        except OSError as err:
            raise UffdUnavailable(f"userfaultfd() failed: {err.strerror}") from err
        tracker._attach(ProcessRef.of(os.getpid()), fd, window=(lo, hi))
        first = tracker.collect()
        if first.dirty != [(lo, hi)]:
            raise UffdUnavailable(f"first pass reported {first.dirty}, not the whole region")
        if tracker.collect().dirty:
            raise UffdUnavailable("pages reported dirty without any write (no protection?)")
        page_a = lo + 3 * PAGE_SIZE
        page_b = lo + 16 * PAGE_SIZE
        area[page_a - base] = 1
        area.madvise(mmap.MADV_DONTNEED, page_b - base, PAGE_SIZE)
        area.madvise(mmap.MADV_DONTNEED, off + _HUGE, _HUGE)  # a whole THP
        got = tracker.collect().dirty
        want = merge_ranges(
            [(page_a, page_a + PAGE_SIZE), (page_b, page_b + PAGE_SIZE), (lo + _HUGE, hi)]
        )
        if got != want:
            raise UffdUnavailable(
                f"self-test: write+zaps reported as {[(hex(s), hex(e)) for s, e in got]}, "
                f"expected {[(hex(s), hex(e)) for s, e in want]}"
            )
        # First writes into holes: a 4 KiB hole, and the zapped THP (may come back as a THP).
        hole = lo + _HUGE + 5 * PAGE_SIZE
        area[page_b - base] = 2
        area[hole - base] = 3
        got = tracker.collect().dirty
        if (
            intersect_ranges(got, [(page_b, page_b + PAGE_SIZE)]) != [(page_b, page_b + PAGE_SIZE)]
            or intersect_ranges(got, [(hole, hole + PAGE_SIZE)]) != [(hole, hole + PAGE_SIZE)]
            or subtract_ranges(got, [(page_b, page_b + PAGE_SIZE), (lo + _HUGE, hi)])
        ):
            raise UffdUnavailable(f"self-test: writes into holes reported as {got}")
    except OSError as err:
        raise UffdUnavailable(f"self-test failed: {err}") from err
    finally:
        tracker.stop()
        area.close()


def probe() -> tuple[bool, str]:
    """Whether uffd-wp tracking works here (the self-test, run once and cached) and why."""
    global _PROBE  # noqa: PLW0603 - a process-wide capability probe, computed once
    with _PROBE_LOCK:
        if _PROBE is None:
            try:
                self_test()
                _PROBE = (True, "self-test passed")
            except PhaulError as err:
                _PROBE = (False, str(err))
            log.info("uffd-wp self-test: %s", _PROBE[1])
        return _PROBE
