"""Dirty-page tracking with the kernel's soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY``).

Theory of operation
-------------------
Writing ``4`` to ``/proc/PID/clear_refs`` clears the soft-dirty bit of every PTE of the process
and write-protects the pages; the next write to a page sets the bit again, visible as bit 55 of
its ``/proc/PID/pagemap`` entry (``Documentation/admin-guide/mm/soft-dirty.rst``). New VMAs are
soft-dirty as a whole. This is what CRIU's ``pre-dump``/``track_mem`` uses.

Reading the bits and clearing them are two system calls, and a write between the two would be
lost, so each collect stops every thread of the target (ptrace seize + interrupt,
:func:`inject.run_frozen`) around "read entries, clear". Zapped pages (``MADV_DONTNEED``) lose
their PTE and with it the bit, so pages that were present or swapped at the previous collect and
are not any more are reported too.

Many kernels do not have soft-dirty: it is off in our 6.18 hosts' configuration and does not
exist on arm64 (CRIU issues #1859, #2676). :func:`probe` checks, in phaul's own process, that the
bit is really set by a write and cleared by ``clear_refs``; it never claims support it cannot
deliver.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading

from phaul.engine import inject
from phaul.engine.maps import (
    PAGE_SIZE,
    Range,
    is_private_writable,
    merge_ranges,
    read_maps,
    subtract_ranges,
)
from phaul.engine.pagemap import PM_PRESENT, PM_SOFT_DIRTY, PM_SWAPPED, PagemapFile
from phaul.engine.proctree import ProcessRef, wrap_oserror
from phaul.engine.tracker import DirtyRanges, TrackerUnavailable, pages_to_ranges

log = logging.getLogger(__name__)

CLEAR_REFS_SOFT_DIRTY = b"4"


def clear_soft_dirty(pid: int | str) -> None:
    """Write ``4`` to ``/proc/PID/clear_refs``. Raises ProcessGone, AccessDenied."""
    with wrap_oserror(int(pid) if pid != "self" else os.getpid(), "clear soft-dirty bits"):
        fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, CLEAR_REFS_SOFT_DIRTY)
        finally:
            os.close(fd)


def _kernel_config_says() -> str:
    """``CONFIG_MEM_SOFT_DIRTY`` from /proc/config.gz when readable (for the log), else ''."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if "CONFIG_MEM_SOFT_DIRTY" in line:
                    return line.strip()
    except OSError:
        return ""
    return ""


def _own_entry(fd: int, addr: int) -> int:
    return int.from_bytes(os.pread(fd, 8, (addr // PAGE_SIZE) * 8), "little")


def self_test() -> tuple[bool, str]:
    """Check in phaul's own process that a write sets bit 55 and clear_refs clears it."""
    area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        anchor = ctypes.c_char.from_buffer(area)
        addr = ctypes.addressof(anchor)
        del anchor
        area[0] = 1
        if not _own_entry(fd, addr) & PM_SOFT_DIRTY:
            config = _kernel_config_says()
            extra = f" ({config})" if config else ""
            return False, f"a written page is not soft-dirty: kernel without soft-dirty{extra}"
        clear_soft_dirty("self")
        if _own_entry(fd, addr) & PM_SOFT_DIRTY:
            return False, "clear_refs did not clear the soft-dirty bit"
        area[0] = 2
        if not _own_entry(fd, addr) & PM_SOFT_DIRTY:
            return False, "a write after clear_refs did not set the soft-dirty bit"
        return True, "self-test passed"
    except OSError as err:
        return False, f"soft-dirty self-test failed: {err}"
    finally:
        os.close(fd)
        area.close()


_PROBE_LOCK = threading.Lock()
_PROBE: tuple[bool, str] | None = None


def probe() -> tuple[bool, str]:
    """Whether soft-dirty tracking works on this kernel (self-test run once, cached) and why."""
    global _PROBE  # noqa: PLW0603 - a process-wide capability probe, computed once
    with _PROBE_LOCK:
        if _PROBE is None:
            _PROBE = self_test()
            log.info("soft-dirty self-test: %s", _PROBE[1])
        return _PROBE


class SoftDirtyTracker:
    """The soft-dirty tracker (see the module docstring). One instance per process."""

    name = "soft-dirty"

    def __init__(self) -> None:
        self._ref: ProcessRef | None = None
        self._pm: PagemapFile | None = None
        self._domain: list[Range] = []
        self._present: list[Range] = []
        self._first = True

    def start(self, pid: int) -> None:
        """Prepare tracking of ``pid`` (the first collect clears the bits). Raises ProcessGone,
        AccessDenied, TrackerUnavailable (this kernel has no working soft-dirty)."""
        ok, why = probe()
        if not ok:
            raise TrackerUnavailable(f"soft-dirty tracking unavailable: {why}")
        self._ref = ProcessRef.of(pid)
        self._pm = PagemapFile(pid)
        self._first = True

    def collect(self) -> DirtyRanges:
        """Pages written since the previous collect (the whole domain on the first)."""
        if self._ref is None or self._pm is None:
            raise RuntimeError("SoftDirtyTracker.collect() before start()")
        self._ref.check()
        pid = self._ref.pid
        pm = self._pm

        def read_and_clear() -> tuple[list[Range], list[int], list[int]]:
            maps = [m for m in read_maps(pid) if is_private_writable(m)]
            domain = merge_ranges((m.start, m.end) for m in maps)
            dirty: list[int] = []
            present: list[int] = []
            for start, end in domain:
                for i, entry in enumerate(pm.entries(start, end)):
                    if entry & PM_SOFT_DIRTY:
                        dirty.append(start + i * PAGE_SIZE)
                    if entry & (PM_PRESENT | PM_SWAPPED):
                        present.append(start + i * PAGE_SIZE)
            clear_soft_dirty(pid)
            return domain, dirty, present

        domain, dirty_pages, present_pages = inject.run_frozen(pid, read_and_clear)
        present = pages_to_ranges(present_pages)
        if self._first:
            dirty = domain
            self._first = False
        else:
            dirty = merge_ranges(
                [
                    *pages_to_ranges(dirty_pages),
                    *subtract_ranges(self._present, present),
                    *subtract_ranges(domain, self._domain),
                ]
            )
            dirty = subtract_ranges(dirty, subtract_ranges(dirty, domain))
        vanished = subtract_ranges(self._domain, domain)
        self._domain = domain
        self._present = present
        return DirtyRanges(dirty=dirty, vanished=vanished)

    def copied(self, addr: int, data: bytes | memoryview) -> None:
        """Not needed: soft-dirty bits do not depend on content."""

    def stop(self) -> None:
        """Nothing stays armed in the target (soft-dirty bits are harmless); close the pagemap."""
        if self._pm is not None:
            self._pm.close()
            self._pm = None
