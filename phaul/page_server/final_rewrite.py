"""Turn a lazy final dump into a plain-restorable image chained to the pre-copy image.

Theory of operation (reference/lazy-final-dump.md)
--------------------------------------------------
``criu dump --lazy-pages`` freezes the tree and writes every image, but for private anonymous
memory it writes only pagemap entries flagged ``PE_LAZY`` (no data); the tree stays frozen, its
pages pinned, until the lazy page server is told the session is over. A plain (non-lazy)
restore of such images never ends (CRIU 4.2.1 reads the lazy runs "from self" past the end of
the pages file and loops on ``preadv() == 0``), so before the restore :func:`rewrite_final`
replaces, in every ``pagemap-<vpid>.img``:

- each ``PE_LAZY`` entry by runs: pages the caller declares *clean* (in the parent image and
  not written since the pass that put them there) become ``PE_PARENT`` (no data: the restore
  reads them from ``parent/``), every other page becomes ``PE_PRESENT | PE_LAZY`` (what a
  normal dump writes) with its data obtained from ``read_pages`` (the caller reads the frozen
  task with ``process_vm_readv``);
- ``PE_PRESENT`` entries (pages CRIU never makes lazy: the page under each thread's stack
  pointer, private file mappings...) are kept, their data copied in order from the old pages
  file.

The new ``pages-<id>.img`` (the pagemap head's id is kept) is the concatenation of the present
runs' data in entry order, as CRIU expects. Pages file and pagemap are written to temporary
files and renamed into place; finally the ``parent`` symlink is created (atomically).

Everything that would make CRIU fail late, or loop forever, is refused before any file is
written: a ``PE_PARENT`` run not covered by the parent's pagemap (CRIU: "Missing ... in parent
pagemap"), a parent pages file shorter than its pagemap says, a page ``read_pages`` did not
deliver, a lazy entry left in a pagemap this module does not rewrite.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phaul import trace
from phaul.errors import PhaulError, ProtocolError
from phaul.page_server.criu_image import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    pagemap_name,
    pages_name,
    read_pagemap,
    write_pagemap,
)

log = logging.getLogger(__name__)

#: A half-open byte address range ``(start, end)``, page aligned.
Range = tuple[int, int]
#: Sorted or not, overlapping or not: normalised by :func:`rewrite_final`.
Ranges = Sequence[Range]
#: ``read_pages(vpid, [(addr, nbytes), ...])`` -> ``(addr, view)`` runs covering exactly the
#: requested ranges in address order (``VmReader.read`` has this contract: each view needs to
#: stay valid only until the iterator is resumed).
ReadPages = Callable[[int, list[tuple[int, int]]], Iterable[tuple[int, memoryview]]]

PARENT_LINK = "parent"
_TASK_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
_KEEP, _PARENT, _READ = 0, 1, 2


class RewriteError(ProtocolError):
    """The final dump cannot be rewritten into a restorable chain (nothing was changed)."""


@dataclass(frozen=True, slots=True)
class ProcessRewrite:
    """What the rewrite did to one task's pagemap (page counts)."""

    vpid: int
    entries_in: int
    entries_out: int
    kept_pages: int  # PE_PRESENT pages of the lazy dump, copied
    lazy_pages: int  # PE_LAZY pages of the lazy dump
    parent_pages: int  # of those, now PE_PARENT
    read_pages: int  # of those, read with read_pages


@dataclass(frozen=True, slots=True)
class RewriteStats:
    """Totals of :func:`rewrite_final`; ``seconds`` includes the reads."""

    processes: tuple[ProcessRewrite, ...] = field(default=())
    seconds: float = 0.0

    @property
    def lazy_pages(self) -> int:
        return sum(p.lazy_pages for p in self.processes)

    @property
    def parent_pages(self) -> int:
        return sum(p.parent_pages for p in self.processes)

    @property
    def read_pages(self) -> int:
        return sum(p.read_pages for p in self.processes)

    @property
    def kept_pages(self) -> int:
        return sum(p.kept_pages for p in self.processes)

    @property
    def bytes_read(self) -> int:
        return self.read_pages * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class _Plan:
    vpid: int
    pagemap: Pagemap
    out: tuple[tuple[PagemapEntry, int], ...]  # (new entry, _KEEP | _PARENT | _READ)
    stats: ProcessRewrite


def _normalise(ranges: Iterable[Range], what: str) -> list[Range]:
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise ValueError(f"{what}: range {start:#x}-{end:#x} is not page aligned")
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _split_lazy(entry: PagemapEntry, clean: list[Range], i: int) -> tuple[list[PagemapEntry], int]:
    """Cut a lazy entry at the clean ranges; ``i`` is the first clean range that may touch it
    (entries come sorted, so the index only moves forward). Returns the runs and the new i."""
    runs: list[PagemapEntry] = []
    start, end = entry.vaddr, entry.end
    while i < len(clean) and clean[i][1] <= start:
        i += 1
    cur = start
    j = i
    while cur < end:
        if j < len(clean) and clean[j][0] < end:
            cs, ce = max(clean[j][0], cur), min(clean[j][1], end)
            if cs > cur:
                runs.append(PagemapEntry(cur, (cs - cur) // PAGE_SIZE, PE_PRESENT | PE_LAZY))
            runs.append(PagemapEntry(cs, (ce - cs) // PAGE_SIZE, PE_PARENT))
            cur = ce
            if clean[j][1] <= end:
                j += 1
            continue
        runs.append(PagemapEntry(cur, (end - cur) // PAGE_SIZE, PE_PRESENT | PE_LAZY))
        cur = end
    return runs, i


def _plan(
    vpid: int, pm: Pagemap, clean: list[Range], path: Path, parent_runs: bool = False
) -> _Plan:
    out: list[tuple[PagemapEntry, int]] = []
    kept = lazy = parent = read = 0
    i = 0
    for e in pm.entries:
        if e.flags & PE_PARENT and not parent_runs:
            raise RewriteError(
                f"{path}: already has PE_PARENT runs ({e.vaddr:#x}): not a lazy dump"
            )
        if e.flags & PE_PRESENT:
            out.append((e, _KEEP))
            kept += e.nr_pages
        elif e.flags == PE_LAZY or (parent_runs and e.flags == PE_PARENT):
            runs, i = _split_lazy(e, clean, i)
            lazy += e.nr_pages
            for r in runs:
                kind = _PARENT if r.flags == PE_PARENT else _READ
                out.append((r, kind))
                if kind == _PARENT:
                    parent += r.nr_pages
                else:
                    read += r.nr_pages
        else:
            raise RewriteError(f"{path}: entry {e.vaddr:#x} has unexpected flags {e.flags:#x}")
    stats = ProcessRewrite(vpid, len(pm.entries), len(out), kept, lazy, parent, read)
    return _Plan(vpid, pm, tuple(out), stats)


def _check_parent(plan: _Plan, parent_dir: Path) -> None:
    """Every PE_PARENT run must lie inside the parent's pagemap, whose pages file must hold its
    present pages (else CRIU fails with "Missing ... in parent pagemap" or loops at EOF)."""
    wanted = [(e.vaddr, e.end) for e, kind in plan.out if kind == _PARENT]
    if not wanted:
        return
    path = parent_dir / pagemap_name(plan.vpid)
    try:
        ppm = read_pagemap(path)
    except FileNotFoundError:
        raise RewriteError(
            f"{path} missing: {len(wanted)} runs of task {plan.vpid} would come from the parent"
        ) from None
    except OSError as err:
        raise RewriteError(f"cannot read the parent pagemap {path}: {err}") from err
    have = _normalise(
        ((e.vaddr, e.end) for e in ppm.entries if e.flags & (PE_PRESENT | PE_PARENT)), str(path)
    )
    j = 0
    for start, end in wanted:
        while j < len(have) and have[j][1] <= start:
            j += 1
        if j == len(have) or have[j][0] > start or have[j][1] < end:
            raise RewriteError(
                f"task {plan.vpid}: pages {start:#x}-{end:#x} marked clean are not all in the "
                f"parent image {path} (CRIU would fail: Missing ... in parent pagemap)"
            )
    pages_path = parent_dir / pages_name(ppm.pages_id)
    try:
        size = pages_path.stat().st_size
    except OSError as err:
        raise RewriteError(f"parent pages file {pages_path}: {err}") from err
    if size < ppm.present_pages * PAGE_SIZE:
        raise RewriteError(
            f"parent pages file {pages_path} has {size} bytes, its pagemap needs "
            f"{ppm.present_pages * PAGE_SIZE} (a restore would loop forever at EOF)"
        )


class _Cursor:
    """Hands out the bytes of ``read_pages`` runs in address order."""

    def __init__(self, vpid: int, runs: Iterable[tuple[int, memoryview]]) -> None:
        self.vpid = vpid
        self._it: Iterator[tuple[int, memoryview]] = iter(runs)
        self._addr = 0
        self._view = memoryview(b"")

    def copy_to(self, fd: int, vaddr: int, nbytes: int) -> None:
        while nbytes:
            if not len(self._view):
                try:
                    addr, view = next(self._it)
                except StopIteration:
                    raise RewriteError(
                        f"task {self.vpid}: page {vaddr:#x} could not be read "
                        f"({nbytes // PAGE_SIZE} pages missing)"
                    ) from None
                self._addr, self._view = addr, memoryview(view).cast("B")
            if self._addr != vaddr:
                raise RewriteError(
                    f"task {self.vpid}: page {vaddr:#x} could not be read "
                    f"(the reader went on at {self._addr:#x})"
                )
            n = min(len(self._view), nbytes)
            _write_all(fd, self._view[:n])
            self._view = self._view[n:]
            self._addr += n
            vaddr += n
            nbytes -= n

    def finish(self) -> None:
        if len(self._view) or next(self._it, None) is not None:
            raise RewriteError(f"task {self.vpid}: the page reader returned pages not asked for")


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _copy(src: int, src_off: int, dst: int, count: int) -> None:
    while count:
        n = os.copy_file_range(src, dst, count, src_off)
        if n == 0:
            raise RewriteError("the lazy dump's pages file is shorter than its pagemap")
        src_off += n
        count -= n


# A lazy restore (split recipe, reference/local-lazy-restore.md) wants clean runs left lazy
# without data (a local lazy-pages daemon serves them) and dirty runs restored eagerly.
_FOR_LAZY_RESTORE = {PE_PARENT: PE_LAZY, PE_PRESENT | PE_LAZY: PE_PRESENT}


def _write_process(
    final_dir: Path, plan: _Plan, read_pages: ReadPages, for_lazy_restore: bool = False
) -> None:
    pages_path = final_dir / pages_name(plan.pagemap.pages_id)
    to_read = [(e.vaddr, e.nr_pages * PAGE_SIZE) for e, kind in plan.out if kind == _READ]
    if to_read:
        _write_pages(pages_path, plan, read_pages, to_read)
    elif not pages_path.exists():
        pages_path.touch(mode=0o600)  # CRIU opens it even when no page is in it
    # else: the new pages file would be the kept runs' data in the same order, i.e. the old one
    # (the common case after a final pass: every lazy page is clean, nothing is read).
    entries = [e for e, _ in plan.out]
    if for_lazy_restore:
        entries = [
            PagemapEntry(e.vaddr, e.nr_pages, _FOR_LAZY_RESTORE.get(e.flags, e.flags))
            for e in entries
        ]
    if tuple(entries) != tuple(plan.pagemap.entries):
        write_pagemap(final_dir / pagemap_name(plan.vpid), plan.pagemap.pages_id, entries)


def _write_pages(
    pages_path: Path, plan: _Plan, read_pages: ReadPages, to_read: list[tuple[int, int]]
) -> None:
    tmp = pages_path.with_name(pages_path.name + ".tmp")
    src = -1
    if plan.stats.kept_pages:
        src = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if src >= 0 and os.fstat(src).st_size < plan.stats.kept_pages * PAGE_SIZE:
            raise RewriteError(f"{pages_path} is shorter than its pagemap")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            cursor = _Cursor(plan.vpid, read_pages(plan.vpid, to_read))
            src_off = 0
            for e, kind in plan.out:
                nbytes = e.nr_pages * PAGE_SIZE
                if kind == _KEEP:
                    _copy(src, src_off, dst, nbytes)
                    src_off += nbytes
                elif kind == _READ:
                    cursor.copy_to(dst, e.vaddr, nbytes)
            cursor.finish()
        finally:
            os.close(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if src >= 0:
            os.close(src)
    tmp.replace(pages_path)


def _link_parent(final_dir: Path, parent_link: str) -> None:
    link = final_dir / PARENT_LINK
    tmp = final_dir / f".{PARENT_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(parent_link)
    tmp.replace(link)


def rewrite_final(
    final_dir: Path,
    *,
    clean: Mapping[int, Ranges],
    read_pages: ReadPages,
    parent_link: str | None,
    require_parent: bool = True,
    for_lazy_restore: bool = False,
    parent_runs: bool = False,
) -> RewriteStats:
    """Rewrite the lazy final dump in ``final_dir`` into ``PE_PARENT`` + ``PE_PRESENT`` runs.

    ``clean[vpid]``: page-aligned byte ranges of task ``vpid`` (its pid inside the dumped pid
    namespace, as in ``pagemap-<vpid>.img``) that are in the parent image AND were not written
    since they were copied there; every other lazy page is read with
    ``read_pages(vpid, [(addr, nbytes), ...])``. ``parent_link``: the ``parent`` symlink to
    create (relative to ``final_dir``, e.g. ``"../pre"``); None keeps an existing one.
    ``for_lazy_restore``: write the split recipe's restore dir instead (clean runs ``PE_LAZY``
    without data, for the target's lazy-pages daemon; dirty runs ``PE_PRESENT``; no parent).
    ``parent_runs``: the dump is a tracked incremental dump (phaul/engine/tracked_dump.py)
    whose ``PE_PARENT`` runs point at a synthesized parent: they are rewritten like lazy runs.

    Before anything is written, every ``PE_PARENT`` run is checked against the parent's
    pagemap (``require_parent=False`` skips the check when the parent directory does not exist
    here). Raises RewriteError (nothing changed when raised before the writes; a failure while
    writing leaves the task's old files in place), ValueError for unaligned ranges, the
    reader's own errors (ProcessGone, AccessDenied), PhaulError on I/O errors.
    """
    t0 = time.monotonic()
    trace.event("src rewrite start")
    final_dir = Path(final_dir)
    plans: list[_Plan] = []
    try:
        names = sorted(p.name for p in final_dir.iterdir())
    except OSError as err:
        raise PhaulError(f"cannot list {final_dir}: {err}") from err
    for name in names:
        m = _TASK_PAGEMAP.match(name)
        path = final_dir / name
        if m is None:
            other_pagemap = name.startswith("pagemap-") and name.endswith(".img")
            if other_pagemap and any(
                e.flags == PE_LAZY or (parent_runs and e.flags & PE_PARENT)
                for e in read_pagemap(path).entries
            ):
                raise RewriteError(
                    f"{path} has lazy runs (or parent runs) this rewrite does not handle"
                )
            continue
        vpid = int(m.group(1))
        ranges = _normalise(clean.get(vpid, ()), f"clean[{vpid}]")
        plans.append(_plan(vpid, read_pagemap(path), ranges, path, parent_runs))
    if not plans:
        raise RewriteError(f"{final_dir} holds no pagemap-<pid>.img: not a dump")
    trace.event("src rewrite planned")

    if parent_link is not None:
        parent_dir = final_dir / parent_link
    elif (final_dir / PARENT_LINK).exists():
        parent_dir = final_dir / PARENT_LINK
    else:
        parent_dir = None
    needs_parent = not for_lazy_restore and any(p.stats.parent_pages for p in plans)
    if needs_parent:
        if parent_dir is not None and parent_dir.is_dir():
            for p in plans:
                _check_parent(p, parent_dir)
        elif require_parent or parent_dir is None:
            raise RewriteError(
                f"{final_dir}: pages would come from the parent image, but there is none "
                f"({parent_dir or 'no parent_link given'})"
            )
        else:
            log.warning("parent %s not here: PE_PARENT coverage not checked", parent_dir)

    try:
        for p in plans:
            _write_process(final_dir, p, read_pages, for_lazy_restore)
        if parent_link is not None:
            _link_parent(final_dir, parent_link)
    except OSError as err:
        raise PhaulError(f"rewrite of {final_dir} failed: {err}") from err
    stats = RewriteStats(tuple(p.stats for p in plans), time.monotonic() - t0)
    trace.event("src rewrite done")
    log.info(
        "final dump %s rewritten in %.1f ms: %d lazy pages, %d to parent, %d read, %d kept",
        final_dir,
        stats.seconds * 1000,
        stats.lazy_pages,
        stats.parent_pages,
        stats.read_pages,
        stats.kept_pages,
    )
    return stats
