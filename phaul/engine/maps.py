"""The address space of a process: ``/proc/PID/maps`` (and ``smaps`` VmFlags) parsed and diffed.

A :class:`Mapping` is one line of ``/proc/PID/maps``. Pre-copy reads the private writable ones (the
rest is either shared, read-only file content CRIU restores from the file, or special kernel
mappings), and diffs snapshots between passes with :func:`diff` to find ranges that appeared
(to be read whole) and ranges that vanished (to be dropped from the target's page store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from phaul.engine.proctree import wrap_oserror
from phaul.errors import ProcessGone

log = logging.getLogger(__name__)

PAGE_SIZE = 4096

SPECIAL_PATHS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"})
"""Mappings the kernel provides itself; never read, tracked or registered."""

Range = tuple[int, int]
"""A half-open address range ``(start, end)``."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """One VMA as ``/proc/PID/maps`` shows it. ``end`` is exclusive."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def special(self) -> bool:
        """``[vdso]``, ``[vvar]``, ``[vvar_vclock]`` or ``[vsyscall]``."""
        return self.path in SPECIAL_PATHS

    @property
    def anonymous(self) -> bool:
        """Not backed by a file: heap, stack, ``mmap(MAP_ANONYMOUS)``, named ``[anon:...]``."""
        return self.inode == 0 and not self.special

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def same_object(self, other: Mapping) -> bool:
        """Same range, permissions and backing (what a pass may assume did not change)."""
        return (
            self.start == other.start
            and self.end == other.end
            and self.perms == other.perms
            and self.offset == other.offset
            and self.dev == other.dev
            and self.inode == other.inode
            and self.path == other.path
        )

    def __str__(self) -> str:
        return f"{self.start:x}-{self.end:x} {self.perms} {self.path}".rstrip()


def parse_maps_line(line: str) -> Mapping:
    """Parse one line of ``/proc/PID/maps``. Raises ValueError on a malformed line."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5:
        raise ValueError(f"malformed maps line: {line!r}")
    start_s, _, end_s = parts[0].partition("-")
    perms = parts[1]
    if len(perms) != 4:
        raise ValueError(f"malformed permissions in maps line: {line!r}")
    path = parts[5].rstrip("\n") if len(parts) == 6 else ""
    return Mapping(
        start=int(start_s, 16),
        end=int(end_s, 16),
        perms=perms,
        offset=int(parts[2], 16),
        dev=parts[3],
        inode=int(parts[4]),
        path=path,
    )


def parse_maps(text: str) -> list[Mapping]:
    """Parse the whole text of ``/proc/PID/maps``."""
    return [parse_maps_line(line) for line in text.splitlines() if line.strip()]


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of process ``pid``, in address order. Raises ProcessGone, AccessDenied.

    An empty maps file (a zombie, or a process exiting) is reported as ProcessGone.
    """
    with wrap_oserror(pid, "read maps"), open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        text = f.read()
    if not text:
        raise ProcessGone(f"no process with PID {pid} (it has no address space left)")
    return parse_maps(text)


def parse_smaps_vmflags(text: str) -> dict[int, frozenset[str]]:
    """Parse ``/proc/PID/smaps``: start address of each VMA -> its ``VmFlags`` mnemonics."""
    out: dict[int, frozenset[str]] = {}
    current: int | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("VmFlags:"):
            if current is not None:
                out[current] = frozenset(line[len("VmFlags:") :].split())
            continue
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start_s, _, end_s = head.partition("-")
            try:
                current = int(start_s, 16)
                int(end_s, 16)
            except ValueError:
                continue
    return out


def read_vmflags(pid: int) -> dict[int, frozenset[str]]:
    """``VmFlags`` of every VMA of ``pid`` (e.g. ``uw`` = uffd-wp registered, ``dd`` = dontdump,
    ``io``/``pf`` = device memory). Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "read smaps"), open(f"/proc/{pid}/smaps", encoding="utf-8") as f:
        return parse_smaps_vmflags(f.read())


def is_private_writable(m: Mapping) -> bool:
    """A mapping whose content pre-copy must move: private, writable, not a kernel special."""
    return m.private and m.writable and not m.special


def private_writable_mappings(pid: int) -> list[Mapping]:
    """The private writable mappings of ``pid``. Raises ProcessGone, AccessDenied."""
    return [m for m in read_maps(pid) if is_private_writable(m)]


# ---------------------------------------------------------------------------------------------
# Range arithmetic and snapshot diffs


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge overlapping or adjacent ranges; empty ranges are dropped."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract_ranges(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    """Parts of the ranges ``a`` not covered by any range of ``b`` (both merged first)."""
    bs = merge_ranges(b)
    out: list[Range] = []
    j = 0
    for start, end in merge_ranges(a):
        cur = start
        while j < len(bs) and bs[j][1] <= cur:
            j += 1
        k = j
        while k < len(bs) and bs[k][0] < end:
            if bs[k][0] > cur:
                out.append((cur, bs[k][0]))
            cur = max(cur, bs[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def intersect_ranges(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    """Address ranges covered by both ``a`` and ``b``."""
    am = merge_ranges(a)
    return subtract_ranges(am, subtract_ranges(am, b))


@dataclass(frozen=True)
class MapsDiff:
    """What changed between two snapshots of an address space.

    ``added``/``removed`` are mappings present in only one snapshot (compared by range and
    backing); ``changed`` pairs (old, new) with the same range but other permissions or backing.
    ``new_ranges`` are addresses mapped now that were not mapped before; ``vanished_ranges``
    addresses that were mapped and are not any more.
    """

    added: list[Mapping] = field(default_factory=list)
    removed: list[Mapping] = field(default_factory=list)
    changed: list[tuple[Mapping, Mapping]] = field(default_factory=list)
    new_ranges: list[Range] = field(default_factory=list)
    vanished_ranges: list[Range] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(old: Sequence[Mapping], new: Sequence[Mapping]) -> MapsDiff:
    """Compare two snapshots of one process's mappings (see :class:`MapsDiff`).

    Note that a mapping replaced in place (``MAP_FIXED`` with the same backing) can look
    identical: a diff cannot prove that nothing changed, only show what visibly did.
    """
    old_by_range = {(m.start, m.end): m for m in old}
    new_by_range = {(m.start, m.end): m for m in new}
    added: list[Mapping] = []
    changed: list[tuple[Mapping, Mapping]] = []
    for key, m in new_by_range.items():
        prev = old_by_range.get(key)
        if prev is None:
            added.append(m)
        elif not prev.same_object(m):
            changed.append((prev, m))
    removed = [m for key, m in old_by_range.items() if key not in new_by_range]
    old_ranges = [(m.start, m.end) for m in old]
    new_ranges = [(m.start, m.end) for m in new]
    return MapsDiff(
        added=sorted(added, key=lambda m: m.start),
        removed=sorted(removed, key=lambda m: m.start),
        changed=sorted(changed, key=lambda p: p[1].start),
        new_ranges=subtract_ranges(new_ranges, old_ranges),
        vanished_ranges=subtract_ranges(old_ranges, new_ranges),
    )
