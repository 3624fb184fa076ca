"""The one interface of the dirty-page trackers, and the start-up choice between them.

A tracker follows the memory of ONE process (a tree has one tracker per process; the caller
loops). Its domain is the process's private writable mappings (:func:`maps.is_private_writable`):
what pre-copy moves. The protocol:

- ``start(pid)`` arms it. Nothing is reported yet.
- ``collect()`` returns :class:`DirtyRanges`: the pages of the domain whose content may have
  changed since the previous ``collect()`` (the first one reports the whole domain), as sorted,
  merged, page-aligned byte ranges. Ranges that entered the domain since the previous collect (new
  mappings, ``mprotect`` to writable, ``mremap``) are reported whole. ``vanished`` lists the ranges
  that left the domain (unmapped, or no longer private and writable). A tracker may over-report
  (a page reported that did not change) but never under-report; reported ranges may include
  never-populated pages, which read as zeros (:func:`pagemap.present_ranges` filters them).
  Read the reported pages AFTER ``collect()`` returns: a write racing with the collect is then
  either in what is read or reported by the next collect.
- ``copied(addr, data)`` (optional to call) tells the tracker which bytes the caller read for
  a reported range. The hash tracker then compares the next pass against what the destination
  really holds instead of what it hashed during collect; without it, a page that changes
  A -> B (read by the caller as B) -> A between two collects would be missed. The other
  trackers ignore it.
- ``stop()`` disarms it and releases everything it holds in the target; the target is left as it
  was. Idempotent.

Backends (chosen once by :func:`choose_tracker`, the choice is logged):

- ``uffd`` (:mod:`phaul.engine.uffd`): userfaultfd async write-protect + ``PAGEMAP_SCAN``; exact,
  cheap scans, kernel >= 6.7. Preferred.
- ``soft-dirty`` (:mod:`phaul.engine.softdirty`): ``clear_refs`` + pagemap bit 55; needs
  ``CONFIG_MEM_SOFT_DIRTY`` (absent on our 6.18 hosts and on arm64).
- ``hash`` (:mod:`phaul.engine.hashtrack`): compares a content hash of every page between
  passes; works anywhere, costs a full read of the domain per pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from phaul.engine.maps import PAGE_SIZE, Range, merge_ranges
from phaul.errors import PhaulError, UsageError

log = logging.getLogger(__name__)

TrackerName = Literal["auto", "uffd", "hash", "soft-dirty"]
TRACKER_NAMES: tuple[str, ...] = ("auto", "uffd", "hash", "soft-dirty")


class TrackerUnavailable(PhaulError):
    """A dirty-page tracker cannot work on this kernel or for this process (the reason says)."""

    code = "tracker-unavailable"
    exit_code = 1


@dataclass(frozen=True)
class DirtyRanges:
    """What one ``collect()`` found. Ranges are sorted, merged, page-aligned ``[start, end)``."""

    dirty: list[Range] = field(default_factory=list)
    vanished: list[Range] = field(default_factory=list)

    @property
    def pages(self) -> int:
        """Number of dirty pages."""
        return sum(e - s for s, e in self.dirty) // PAGE_SIZE

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in self.dirty)

    def page_addresses(self) -> Iterable[int]:
        """Every dirty page's address, in order."""
        for s, e in self.dirty:
            yield from range(s, e, PAGE_SIZE)


def page_align(ranges: Iterable[Range]) -> list[Range]:
    """Round ranges out to whole pages, then sort and merge them."""
    mask = PAGE_SIZE - 1
    return merge_ranges((s & ~mask, (e + mask) & ~mask) for s, e in ranges)


def pages_to_ranges(pages: Iterable[int]) -> list[Range]:
    """Page addresses -> sorted, merged ranges."""
    out: list[Range] = []
    for p in sorted(set(pages)):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + PAGE_SIZE)
        else:
            out.append((p, p + PAGE_SIZE))
    return out


@runtime_checkable
class DirtyTracker(Protocol):
    """See the module docstring for the contract."""

    name: str

    def start(self, pid: int) -> None:
        """Arm tracking of ``pid``. Raises ProcessGone, AccessDenied (or a backend error)."""
        ...

    def collect(self) -> DirtyRanges:
        """Pages written since the previous collect (everything on the first). Raises
        ProcessGone when the process exited (or exec'd, for uffd)."""
        ...

    def copied(self, addr: int, data: bytes | memoryview) -> None:
        """The caller read ``data`` at ``addr`` (whole pages) after a collect."""
        ...

    def stop(self) -> None:
        """Disarm and release; idempotent, never raises for a process that is gone."""
        ...


def choose_tracker(name: str, pid: int) -> DirtyTracker:
    """Make the tracker ``name`` ("auto", "uffd", "hash", "soft-dirty") for ``pid`` (not started).

    Capabilities are probed once per phaul process (cached). ``auto`` takes uffd when its
    self-test passes, else soft-dirty when the kernel has it, else hash. Naming a backend the
    kernel cannot support raises :class:`UsageError` with the reason.
    """
    from phaul.engine import hashtrack, softdirty, uffd

    if name not in TRACKER_NAMES:
        raise UsageError(
            f"unknown dirty tracker {name!r}; choose one of {', '.join(TRACKER_NAMES)}"
        )
    tracker: DirtyTracker
    if name in {"uffd", "auto"}:
        ok, why = uffd.probe()
        if ok:
            tracker = uffd.UffdTracker()
            log.info("dirty tracker for pid %d: uffd-wp (%s)", pid, why)
            return tracker
        if name == "uffd":
            raise UsageError(f"the uffd dirty tracker cannot work here: {why}")
        log.info("uffd-wp tracking unavailable: %s", why)
    if name in {"soft-dirty", "auto"}:
        ok, why = softdirty.probe()
        if ok:
            log.info("dirty tracker for pid %d: soft-dirty (%s)", pid, why)
            return softdirty.SoftDirtyTracker()
        if name == "soft-dirty":
            raise UsageError(f"the soft-dirty tracker cannot work here: {why}")
        log.info("soft-dirty tracking unavailable: %s", why)
    log.info("dirty tracker for pid %d: content hashing", pid)
    return hashtrack.HashTracker()
