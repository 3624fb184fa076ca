"""Dirty-page tracking by content hashing: works on any kernel, costs a read of the domain.

Theory of operation
-------------------
Every collect reads the tracked pages with :class:`vmread.VmReader` (``process_vm_readv`` in
large batches) and hashes each 4 KiB page with xxHash ``xxh3_64``. A page whose hash differs from
the one of the previous collect is dirty. Anonymous mappings are read only where pages are
populated (:meth:`pagemap.PagemapFile.present_ranges`); an unpopulated anonymous page reads as
zeros, so it is given the hash of a zero page without being read (sparse mappings stay sparse),
and a populated page that was zapped (``MADV_DONTNEED``) shows up as a change to that hash.
File-backed private mappings are read whole (an unpopulated page there shows the file's bytes).
Ranges seen for the first time are reported whole; pages that cannot be read (mapped but
unreadable) are always reported.

The pages the caller reads after a collect are not the bytes that were hashed during it: a page
hashed as A, read by the caller as B and back to A at the next collect would be missed (seen in
the free-running test: a page zapped, rewritten, zapped again). So the caller hands what it read
back through :meth:`HashTracker.copied`, and the next collect compares with the hash of *that*;
once it does, a reported page it did not confirm (its read failed because the range was
unmapped for a moment, and the address was then reused) is reported again. A caller that never
calls ``copied`` gets the weaker guarantee above. A 64-bit hash can still collide
(2^-64 per changed page). Memory: one dict entry per hashed page (~100 bytes). The uffd tracker
has none of these problems and is preferred wherever its self-test passes.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import xxhash

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
from phaul.engine.pagemap import PagemapFile
from phaul.engine.proctree import ProcessRef
from phaul.engine.tracker import DirtyRanges, pages_to_ranges
from phaul.engine.vmread import VmReader

log = logging.getLogger(__name__)

ZERO_PAGE_HASH: int = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
READ_BUFFER_BYTES = 4 << 20
_MAX = 1 << 64
_PENDING = -1  # never equal to a hash: reported, not yet confirmed read by the caller


class PageHasher:
    """Per-page content hashes of chosen mappings of one process, compared between updates."""

    def __init__(self, pid: int, *, buffer_bytes: int = READ_BUFFER_BYTES) -> None:
        self.pid = pid
        self._reader = VmReader(pid, buffer_bytes)
        self._pm = PagemapFile(pid)
        self._hashes: dict[int, int] = {}
        self._known: list[Range] = []
        self._verified = False  # the caller reports what it read (copied)
        self.pages_hashed = 0

    def close(self) -> None:
        self._pm.close()

    def copied(self, addr: int, data: bytes | memoryview) -> None:
        """Record the hashes of pages the caller read (whole pages within the tracked ranges).

        From the first call on, reported pages that are never confirmed this way are reported
        again by the next update.
        """
        self._verified = True
        view = memoryview(data)
        digest = xxhash.xxh3_64_intdigest
        known = self._known
        for off in range(0, len(view) - PAGE_SIZE + 1, PAGE_SIZE):
            page = addr + off
            i = bisect.bisect_right(known, (page, _MAX)) - 1
            if i >= 0 and known[i][0] <= page < known[i][1]:
                self._hashes[page] = digest(view[off : off + PAGE_SIZE])

    def update(self, maps: Sequence[Mapping]) -> list[Range]:
        """Hash the pages of ``maps``; return the ranges whose content changed since the previous
        update (ranges not covered by the previous update are returned whole).

        Raises ProcessGone, AccessDenied.
        """
        ranges = merge_ranges((m.start, m.end) for m in maps)
        new = subtract_ranges(ranges, self._known)
        anon = [m for m in maps if m.anonymous]
        to_read = merge_ranges(
            [
                *self._pm.present_ranges(anon),
                *((m.start, m.end) for m in maps if not m.anonymous),
            ]
        )
        old = self._hashes
        fresh: dict[int, int] = {}
        dirty: list[int] = []
        digest = xxhash.xxh3_64_intdigest
        for addr, view in self._reader.read((s, e - s) for s, e in to_read):
            for off in range(0, len(view) - PAGE_SIZE + 1, PAGE_SIZE):
                page = addr + off
                h = digest(view[off : off + PAGE_SIZE])
                fresh[page] = h
                if old.get(page, ZERO_PAGE_HASH) != h:
                    dirty.append(page)
        self.pages_hashed += len(fresh)
        # Pages hashed before and not read now: unpopulated (zero) or gone.
        dirty.extend(p for p, h in old.items() if h != ZERO_PAGE_HASH and p not in fresh)
        self._known = ranges
        out = intersect_ranges(
            merge_ranges([*pages_to_ranges(dirty), *new, *self._reader.unreadable]), ranges
        )
        if self._verified:
            # Until the caller confirms what it read (copied), a reported page compares unequal
            # to anything: a page it failed to read (unmapped meanwhile) is reported again.
            for start, end in out:
                for page in range(start, end, PAGE_SIZE):
                    fresh[page] = _PENDING
        self._hashes = fresh
        return out


class HashTracker:
    """The content-hash tracker (see the module docstring). One instance per process."""

    name = "hash"

    def __init__(self) -> None:
        self._ref: ProcessRef | None = None
        self._hasher: PageHasher | None = None
        self._domain: list[Range] = []

    def start(self, pid: int) -> None:
        """Prepare to hash ``pid``'s private writable memory. Raises ProcessGone, AccessDenied."""
        self._ref = ProcessRef.of(pid)
        self._hasher = PageHasher(pid)
        self._domain = []

    def collect(self) -> DirtyRanges:
        """Pages whose content changed since the previous collect (all on the first)."""
        if self._ref is None or self._hasher is None:
            raise RuntimeError("HashTracker.collect() before start()")
        self._ref.check()
        maps = [m for m in read_maps(self._ref.pid) if is_private_writable(m)]
        domain = merge_ranges((m.start, m.end) for m in maps)
        dirty = self._hasher.update(maps)
        vanished = subtract_ranges(self._domain, domain)
        self._domain = domain
        return DirtyRanges(dirty=dirty, vanished=vanished)

    def copied(self, addr: int, data: bytes | memoryview) -> None:
        """Remember what the caller read (see the module docstring)."""
        if self._hasher is not None:
            self._hasher.copied(addr, data)

    def stop(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None
