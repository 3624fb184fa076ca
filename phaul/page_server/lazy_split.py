"""The daemon half of the "split" lazy restore: an image dir for ``criu lazy-pages`` built from the
restore dir and the target's flat pre-copy images, without copying a page.

Theory of operation (reference/local-lazy-restore.md §1, §3c)
--------------------------------------------------------------
``criu restore --lazy-pages -D R`` skips every pagemap entry flagged ``PE_LAZY`` and registers
the anonymous private VMAs with userfaultfd; the ``criu lazy-pages -D D`` daemon (same work dir
``-W``, where the ``lazy-pages.socket`` lives) then serves, from ITS OWN images dir D, every
entry flagged ``PE_LAZY`` whose data is in D's own pages file (``PE_PRESENT|PE_LAZY``). It
cannot follow ``PE_PARENT`` (that path never completes the fault and spins), and it zero-fills
any fault outside its lazy entries. Entries with ``PE_PRESENT`` only are "skip" entries: the
reader advances its file offset over them and never serves them.

So D is, per task (vpid):

- ``pagemap-<vpid>.img``: the flat parent's pagemap (head ``pages_id`` = the PARENT's id),
  each entry cut at the borders of R's lazy set: pages R leaves lazy become
  ``PE_PRESENT|PE_LAZY`` (at most :data:`MAX_LAZY_ENTRY_PAGES` per entry: the daemon buffers one
  entry), every other page ``PE_PRESENT`` (skip);
- ``pages-<parent id>.img``: a HARD LINK of the parent's pages file (same inode: a later
  ``FlatPageImage.commit`` that replaces the parent's file by rename leaves D's view intact);
- ``inventory.img``, ``pstree.img``, ``mm-<vpid>.img``: hard links of R's.

A task without a parent image gets an empty pagemap and an empty pages file (a missing pagemap
makes the daemon fail).

The invariant, checked by :func:`check_split` before :func:`build_daemon_dir` returns: for every
task, D's lazy page set equals R's lazy page set exactly, and every page R leaves lazy has data
in D. A page lazy in R but missing in D is served as a ZERO page (silent corruption, the daemon
still exits 0); a page lazy in D but restored eagerly from R makes ``UFFDIO_COPY`` fail with
EEXIST, retried forever (the daemon livelocks and never exits).

CRIU 4.2.1 ``is_stack()`` quirk (mem.c:198, reference §7.1): when any thread's stack pointer is
page aligned, every page of that process is dumped non-lazily with data. Such a process simply
has an empty lazy set in R (its pages stay as CRIU wrote them and are restored eagerly); D then
holds only skip entries for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phaul.errors import PhaulError
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
    read_pstree,
    write_pagemap,
)

log = logging.getLogger(__name__)

#: CRIU's lazy-pages daemon allocates a buffer as large as its longest lazy iov (§7.6).
MAX_LAZY_ENTRY_PAGES = 1024
#: Pages files of tasks without a parent image get ids from here up (clear of CRIU's ids, of
#: CRIU's page server's 0x10001.., and of FlatPageImage ids chosen by the receiver).
EMPTY_PAGES_ID_BASE = 0x7F000000

INVENTORY = "inventory.img"
PSTREE = "pstree.img"

#: Half-open byte range ``(start, end)``, page aligned.
Range = tuple[int, int]


class SplitError(PhaulError):
    """The daemon dir cannot be built, or disagrees with the restore dir."""

    code = "lazy-split"


class LazyNotInParent(SplitError):
    """A page the restore dir leaves lazy has no data in the parent image: the daemon would
    serve it as zeros."""

    code = "lazy-split"


class SplitMismatch(SplitError):
    """The daemon dir's lazy set differs from the restore dir's (zeros or a livelock)."""

    code = "lazy-split"


@dataclass(frozen=True, slots=True)
class ProcessSplit:
    """What :func:`build_daemon_dir` made for one task (page counts)."""

    vpid: int
    has_parent: bool
    parent_pages: int  # pages in the parent image (all PE_PRESENT)
    lazy_pages: int  # pages R leaves lazy = pages D serves
    skip_pages: int  # parent pages D never serves (restored eagerly from R, or gone)
    entries: int  # entries of D's pagemap
    eager_only: bool  # R has no lazy entry (CRIU 4.2.1 is_stack quirk, or no anon memory)


@dataclass(frozen=True, slots=True)
class SplitStats:
    """Totals of :func:`build_daemon_dir`; ``seconds`` includes the invariant check."""

    processes: tuple[ProcessSplit, ...] = field(default=())
    seconds: float = 0.0

    @property
    def lazy_pages(self) -> int:
        return sum(p.lazy_pages for p in self.processes)

    @property
    def skip_pages(self) -> int:
        return sum(p.skip_pages for p in self.processes)

    @property
    def entries(self) -> int:
        return sum(p.entries for p in self.processes)


# --- range helpers ------------------------------------------------------------------------------


def _merge(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _first_uncovered(want: Sequence[Range], have: Sequence[Range]) -> Range | None:
    """The first part of the merged ranges ``want`` outside the merged ranges ``have``."""
    j = 0
    for s, e in want:
        cur = s
        while cur < e:
            while j < len(have) and have[j][1] <= cur:
                j += 1
            if j == len(have) or have[j][0] > cur:
                nxt = have[j][0] if j < len(have) else e
                return cur, min(e, nxt)
            cur = have[j][1]
    return None


def _diff(a: Sequence[Range], b: Sequence[Range]) -> Range | None:
    """The first part of ``a`` not in ``b`` (both merged)."""
    return _first_uncovered(a, b)


def lazy_ranges(pm: Pagemap) -> list[Range]:
    """Merged byte ranges of the entries flagged ``PE_LAZY``."""
    return _merge((e.vaddr, e.end) for e in pm.entries if e.flags & PE_LAZY)


# --- building D ---------------------------------------------------------------------------------


def _restore_lazy_set(path: Path) -> list[Range]:
    """R's lazy set for one task; refuses lazy entries the split recipe cannot serve."""
    try:
        pm = read_pagemap(path)
    except FileNotFoundError:
        raise SplitError(f"{path} missing: not a restore dir of this tree") from None
    except OSError as err:
        raise SplitError(f"cannot read {path}: {err}") from err
    for e in pm.entries:
        if e.flags & PE_LAZY and e.flags != PE_LAZY:
            raise SplitError(
                f"{path}: entry {e.vaddr:#x} has flags {e.flags:#x}; a split restore dir has "
                "lazy runs as PE_LAZY alone (no data, no parent): PE_PRESENT|PE_LAZY would be "
                "served from the parent's stale copy, PE_PARENT|PE_LAZY hangs the daemon"
            )
    return lazy_ranges(pm)


def _parent_pagemap(path: Path) -> Pagemap | None:
    try:
        pm = read_pagemap(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SplitError(f"cannot read the parent pagemap {path}: {err}") from err
    for e in pm.entries:
        if not e.flags & PE_PRESENT or e.flags & PE_PARENT:
            raise SplitError(
                f"{path}: entry {e.vaddr:#x} has flags {e.flags:#x}; the daemon needs a FLAT "
                "parent (every page PE_PRESENT in one pages file: it cannot follow PE_PARENT)"
            )
    return pm


def reflag(parent: Sequence[PagemapEntry], lazy: Sequence[Range]) -> list[PagemapEntry]:
    """The parent's (flat, sorted) entries cut at the borders of ``lazy`` (merged): pages in
    ``lazy`` -> ``PE_PRESENT|PE_LAZY`` (<= MAX_LAZY_ENTRY_PAGES each), others -> ``PE_PRESENT``.
    The entries consume the parent's pages file exactly as the parent's own entries do."""
    out: list[PagemapEntry] = []
    i = 0
    for p in parent:
        start, end = p.vaddr, p.end
        while i < len(lazy) and lazy[i][1] <= start:
            i += 1
        cur, j = start, i
        while cur < end:
            if j < len(lazy) and lazy[j][0] < end:
                ls, le = max(lazy[j][0], cur), min(lazy[j][1], end)
                if ls > cur:
                    out.append(PagemapEntry(cur, (ls - cur) // PAGE_SIZE, PE_PRESENT))
                a = ls
                while a < le:
                    n = min((le - a) // PAGE_SIZE, MAX_LAZY_ENTRY_PAGES)
                    out.append(PagemapEntry(a, n, PE_PRESENT | PE_LAZY))
                    a += n * PAGE_SIZE
                cur = le
                if lazy[j][1] <= end:
                    j += 1
                continue
            out.append(PagemapEntry(cur, (end - cur) // PAGE_SIZE, PE_PRESENT))
            cur = end
    return out


def relink(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``, replacing it atomically: ``dst`` is never missing on the
    way and concurrent callers (the agent links inventory and pstree to start the daemon early,
    while the split links them too) cannot collide."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        tmp.replace(dst)
    except FileNotFoundError as err:
        tmp.unlink(missing_ok=True)
        raise SplitError(f"cannot link {src} into the daemon dir: {src} is missing") from err
    except OSError as err:
        hint = " (the daemon dir must be on the same file system)" if err.errno == 18 else ""
        raise SplitError(f"cannot link {src} as {dst}: {err}{hint}") from err


def task_vpids(restore_dir: Path) -> list[int]:
    """The pids (inside the dumped pid namespace) of the tasks in ``restore_dir/pstree.img``."""
    try:
        return [t.pid for t in read_pstree(Path(restore_dir) / PSTREE)]
    except OSError as err:
        raise SplitError(f"cannot read {Path(restore_dir) / PSTREE}: {err}") from err


def build_daemon_dir(restore_dir: Path, parent_dir: Path, daemon_dir: Path) -> SplitStats:
    """Build the lazy-pages daemon's images dir ``daemon_dir`` (created if needed; same file
    system as ``parent_dir`` and ``restore_dir``) from the split restore dir ``restore_dir``
    (R: clean runs ``PE_LAZY`` without data, dirty runs ``PE_PRESENT`` with data, no parent)
    and the flat pre-copy images in ``parent_dir`` (``pagemap-<vpid>.img`` + ``pages-<id>.img``,
    all ``PE_PRESENT``). See the module docstring.

    Raises LazyNotInParent when R leaves lazy a page the parent does not hold, SplitMismatch
    when the result disagrees with R (see :func:`check_split`), SplitError on malformed input
    or a failed link (EXDEV: not the same file system).
    """
    t0 = time.monotonic()
    restore_dir, parent_dir, daemon_dir = Path(restore_dir), Path(parent_dir), Path(daemon_dir)
    vpids = task_vpids(restore_dir)
    if not vpids:
        raise SplitError(f"{restore_dir / PSTREE} lists no task")
    daemon_dir.mkdir(parents=True, exist_ok=True)

    plans: list[tuple[int, list[Range], Pagemap | None]] = []
    for vpid in vpids:
        lazy = _restore_lazy_set(restore_dir / pagemap_name(vpid))
        parent = _parent_pagemap(parent_dir / pagemap_name(vpid))
        have = _merge((e.vaddr, e.end) for e in parent.entries) if parent else []
        missing = _first_uncovered(lazy, have)
        if missing is not None:
            raise LazyNotInParent(
                f"task {vpid}: pages {missing[0]:#x}-{missing[1]:#x} are lazy in {restore_dir} "
                f"but not in the parent image {parent_dir} (the daemon would serve zeros); "
                "restore them eagerly (PE_PRESENT with data) in the restore dir"
            )
        plans.append((vpid, lazy, parent))

    used_ids = [pm.pages_id for _, _, pm in plans if pm is not None]
    if len(set(used_ids)) != len(used_ids):
        raise SplitError(f"{parent_dir}: two parent pagemaps name the same pages file")
    next_empty = max([EMPTY_PAGES_ID_BASE - 1, *used_ids]) + 1

    for name in (INVENTORY, PSTREE):
        relink(restore_dir / name, daemon_dir / name)
    out: list[ProcessSplit] = []
    for vpid, lazy, parent in plans:
        relink(restore_dir / f"mm-{vpid}.img", daemon_dir / f"mm-{vpid}.img")
        if parent is None:
            pages_id = next_empty
            next_empty += 1
            pages = daemon_dir / pages_name(pages_id)
            pages.unlink(missing_ok=True)
            pages.touch(mode=0o600)
            entries: list[PagemapEntry] = []
        else:
            pages_id = parent.pages_id
            src = parent_dir / pages_name(pages_id)
            try:
                size = src.stat().st_size
            except OSError as err:
                raise SplitError(f"parent pages file {src}: {err}") from err
            if size < parent.present_pages * PAGE_SIZE:
                raise SplitError(
                    f"parent pages file {src} has {size} bytes, its pagemap needs "
                    f"{parent.present_pages * PAGE_SIZE}"
                )
            relink(src, daemon_dir / pages_name(pages_id))
            entries = reflag(parent.entries, lazy)
        try:
            write_pagemap(daemon_dir / pagemap_name(vpid), pages_id, entries)
        except OSError as err:
            raise SplitError(f"cannot write the daemon pagemap of task {vpid}: {err}") from err
        # The invariant, on exactly what was written (check_split re-reads it from disk).
        _check_task(
            vpid,
            lazy,
            Pagemap(pages_id=pages_id, entries=tuple(entries)),
            daemon_dir / pagemap_name(vpid),
            restore_dir,
            daemon_dir,
        )
        lazy_pages = sum(e - s for s, e in lazy) // PAGE_SIZE
        parent_pages = parent.present_pages if parent else 0
        eager_only = not lazy
        if eager_only and parent_pages:
            log.info(
                "task %d has no lazy page in %s: restored eagerly (nothing clean, or CRIU "
                "4.2.1's is_stack quirk: a page-aligned stack pointer)",
                vpid,
                restore_dir,
            )
        out.append(
            ProcessSplit(
                vpid=vpid,
                has_parent=parent is not None,
                parent_pages=parent_pages,
                lazy_pages=lazy_pages,
                skip_pages=parent_pages - lazy_pages,
                entries=len(entries),
                eager_only=eager_only,
            )
        )
    stats = SplitStats(tuple(out), time.monotonic() - t0)
    log.info(
        "daemon dir %s built in %.1f ms: %d lazy pages served, %d skipped, %d entries",
        daemon_dir,
        stats.seconds * 1000,
        stats.lazy_pages,
        stats.skip_pages,
        stats.entries,
    )
    return stats


def check_split(restore_dir: Path, daemon_dir: Path) -> int:
    """Check, from the files on disk, that the daemon dir serves exactly what the restore dir
    leaves lazy: per task of R's pstree, D's ``PE_LAZY`` set == R's ``PE_LAZY`` set, every D lazy
    entry is ``PE_PRESENT|PE_LAZY`` and at most MAX_LAZY_ENTRY_PAGES long, and D's pages file
    holds all of D's present pages. Returns the number of lazy pages.

    Raises SplitMismatch (naming the first differing range and its consequence), SplitError
    when a file is missing or malformed.
    """
    restore_dir, daemon_dir = Path(restore_dir), Path(daemon_dir)
    total = 0
    for vpid in task_vpids(restore_dir):
        r_lazy = _restore_lazy_set(restore_dir / pagemap_name(vpid))
        d_path = daemon_dir / pagemap_name(vpid)
        try:
            d_pm = read_pagemap(d_path)
        except OSError as err:
            raise SplitError(f"daemon pagemap {d_path}: {err}") from err
        total += _check_task(vpid, r_lazy, d_pm, d_path, restore_dir, daemon_dir)
    return total


def _check_task(
    vpid: int,
    r_lazy: list[Range],
    d_pm: Pagemap,
    d_path: Path,
    restore_dir: Path,
    daemon_dir: Path,
) -> int:
    """The invariant for one task: D serves exactly R's lazy set (see :func:`check_split`)."""
    for e in d_pm.entries:
        if e.flags & PE_LAZY and e.flags != PE_PRESENT | PE_LAZY:
            raise SplitMismatch(
                f"{d_path}: lazy entry {e.vaddr:#x} has flags {e.flags:#x}, the daemon "
                "serves only PE_PRESENT|PE_LAZY entries"
            )
        if e.flags & PE_LAZY and e.nr_pages > MAX_LAZY_ENTRY_PAGES:
            raise SplitMismatch(f"{d_path}: lazy entry {e.vaddr:#x} of {e.nr_pages} pages")
    d_lazy = lazy_ranges(d_pm)
    missing = _diff(r_lazy, d_lazy)
    if missing is not None:
        raise SplitMismatch(
            f"task {vpid}: pages {missing[0]:#x}-{missing[1]:#x} are lazy in {restore_dir} "
            f"but not served by {daemon_dir}: they would read as ZEROS"
        )
    extra = _diff(d_lazy, r_lazy)
    if extra is not None:
        raise SplitMismatch(
            f"task {vpid}: pages {extra[0]:#x}-{extra[1]:#x} are served by {daemon_dir} but "
            f"restored eagerly from {restore_dir}: the daemon would livelock on EEXIST"
        )
    pages = daemon_dir / pages_name(d_pm.pages_id)
    try:
        size = pages.stat().st_size
    except OSError as err:
        raise SplitError(f"daemon pages file {pages}: {err}") from err
    if size < d_pm.present_pages * PAGE_SIZE:
        raise SplitMismatch(
            f"{pages} has {size} bytes, {d_path} needs {d_pm.present_pages * PAGE_SIZE}"
        )
    return sum(e - s for s, e in d_lazy) // PAGE_SIZE


def chain_to_lazy(restore_dir: Path) -> int:
    """Turn a final dump rewritten for an eager chain restore (``rewrite_final``: clean runs
    ``PE_PARENT``, dirty runs ``PE_PRESENT|PE_LAZY`` with data) into the split recipe's restore
    dir R: clean runs ``PE_LAZY`` without data (served by the lazy-pages daemon), dirty runs
    ``PE_PRESENT`` (restored eagerly), and no ``parent`` link. The pages files stay as they are:
    the present runs are the same, in the same order. Returns the pages left lazy.
    Raises SplitError for flags this cannot come from.
    """
    flip = {PE_PARENT: PE_LAZY, PE_PRESENT | PE_LAZY: PE_PRESENT, PE_PRESENT: PE_PRESENT}
    lazy = 0
    for path in sorted(Path(restore_dir).glob("pagemap-*.img")):
        pm = read_pagemap(path)
        entries = []
        for e in pm.entries:
            if e.flags not in flip:
                raise SplitError(f"{path}: entry {e.vaddr:#x} has flags {e.flags:#x}")
            entries.append(PagemapEntry(e.vaddr, e.nr_pages, flip[e.flags]))
            if e.flags == PE_PARENT:
                lazy += e.nr_pages
        write_pagemap(path, pm.pages_id, entries)
    link = Path(restore_dir) / "parent"
    if link.is_symlink() or link.exists():
        link.unlink()
    return lazy
