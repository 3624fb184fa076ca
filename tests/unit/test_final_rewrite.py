"""rewrite_final on synthetic lazy final dumps (the real CRIU chain: tests/integration/
test_lazy_final_dump.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.page_server.criu_image import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    read_pagemap,
    write_pagemap,
)
from phaul.page_server.final_rewrite import RewriteError, rewrite_final

P = PAGE_SIZE
A = 0x7F0000000000  # non-lazy run (2 pages)
B = 0x7F0000100000  # lazy run (8 pages), in the parent
C = 0x7F0000200000  # lazy run (4 pages), not in the parent


def page(vpid: int, addr: int, tag: int = 0) -> bytes:
    return struct.pack("<QQQ", vpid, addr, tag) * (P // 24) + bytes(P % 24)


class Memory:
    """A frozen process's memory as read_pages sees it; records what was asked for."""

    def __init__(self, holes: tuple[int, ...] = ()) -> None:
        self.asked: list[tuple[int, list[tuple[int, int]]]] = []
        self.holes = holes

    def read(self, vpid: int, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        self.asked.append((vpid, list(ranges)))
        for addr, nbytes in ranges:
            run: list[bytes] = []
            start = addr
            for a in range(addr, addr + nbytes, P):
                if a in self.holes:  # VmReader skips what it cannot read
                    if run:
                        yield start, memoryview(b"".join(run))
                    run, start = [], a + P
                else:
                    run.append(page(vpid, a, 1))
            if run:
                yield start, memoryview(b"".join(run))


def make_final(d: Path, vpid: int = 2, pages_id: int = 7) -> None:
    d.mkdir()
    write_pagemap(
        d / f"pagemap-{vpid}.img",
        pages_id,
        [
            PagemapEntry(A, 2, PE_PRESENT),
            PagemapEntry(B, 8, PE_LAZY),
            PagemapEntry(C, 4, PE_LAZY),
        ],
    )
    (d / f"pages-{pages_id}.img").write_bytes(page(vpid, A) + page(vpid, A + P))
    (d / "core-2.img").write_bytes(b"untouched")


def make_parent(d: Path, vpid: int = 2, entries: tuple[tuple[int, int], ...] = ((B, 8),)) -> None:
    d.mkdir()
    write_pagemap(
        d / f"pagemap-{vpid}.img", 1, [PagemapEntry(a, n, PE_PRESENT) for a, n in entries]
    )
    (d / "pages-1.img").write_bytes(
        b"".join(page(vpid, a + i * P) for a, n in entries for i in range(n))
    )


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_lazy_runs_become_parent_and_present(tmp_path: Path) -> None:
    final, pre = tmp_path / "final", tmp_path / "pre"
    make_final(final)
    make_parent(pre)
    mem = Memory()
    clean = {2: [(B + 2 * P, B + 6 * P)]}
    stats = rewrite_final(final, clean=clean, read_pages=mem.read, parent_link="../pre")

    pm = read_pagemap(final / "pagemap-2.img")
    assert pm.pages_id == 7
    assert pm.entries == (
        PagemapEntry(A, 2, PE_PRESENT),
        PagemapEntry(B, 2, PE_PRESENT | PE_LAZY),
        PagemapEntry(B + 2 * P, 4, PE_PARENT),
        PagemapEntry(B + 6 * P, 2, PE_PRESENT | PE_LAZY),
        PagemapEntry(C, 4, PE_PRESENT | PE_LAZY),
    )
    want = [page(2, A), page(2, A + P)]
    want += [page(2, B + i * P, 1) for i in (0, 1, 6, 7)]
    want += [page(2, C + i * P, 1) for i in range(4)]
    assert (final / "pages-7.img").read_bytes() == b"".join(want)
    # one read call with exactly the dirty runs
    assert mem.asked == [(2, [(B, 2 * P), (B + 6 * P, 2 * P), (C, 4 * P)])]
    assert os.readlink(final / "parent") == "../pre"
    assert (final / "core-2.img").read_bytes() == b"untouched"
    assert not list(final.glob("*.tmp"))
    assert (stats.lazy_pages, stats.parent_pages, stats.read_pages, stats.kept_pages) == (
        12,
        4,
        8,
        2,
    )
    assert stats.processes[0].entries_in == 3 and stats.processes[0].entries_out == 5


def test_clean_ranges_spanning_entries_and_outside_are_fine(tmp_path: Path) -> None:
    final, pre = tmp_path / "final", tmp_path / "pre"
    make_final(final)
    make_parent(pre, entries=((B, 8), (C, 4)))
    # unsorted, overlapping, reaching beyond the lazy entries and over the present one
    clean = {2: [(C, C + 0x100000), (A, B + 8 * P), (B + P, B + 3 * P)], 5: [(0, P)]}
    stats = rewrite_final(final, clean=clean, read_pages=Memory().read, parent_link="../pre")
    entries = read_pagemap(final / "pagemap-2.img").entries
    assert entries == (
        PagemapEntry(A, 2, PE_PRESENT),
        PagemapEntry(B, 8, PE_PARENT),
        PagemapEntry(C, 4, PE_PARENT),
    )
    assert stats.read_pages == 0
    assert (final / "pages-7.img").stat().st_size == 2 * P


def test_clean_page_not_in_parent_is_refused_before_writing(tmp_path: Path) -> None:
    final, pre = tmp_path / "final", tmp_path / "pre"
    make_final(final)
    make_parent(pre, entries=((B, 4),))  # the parent lacks B+4..B+8
    before = snapshot(final)
    mem = Memory()
    with pytest.raises(RewriteError, match="not all in the parent"):
        rewrite_final(final, clean={2: [(B, B + 8 * P)]}, read_pages=mem.read, parent_link="../pre")
    assert snapshot(final) == before
    assert not (final / "parent").exists()
    assert mem.asked == []  # refused before reading the frozen process


def test_truncated_parent_pages_file_is_refused(tmp_path: Path) -> None:
    final, pre = tmp_path / "final", tmp_path / "pre"
    make_final(final)
    make_parent(pre)
    os.truncate(pre / "pages-1.img", 3 * P)
    with pytest.raises(RewriteError, match="loop forever"):
        rewrite_final(
            final, clean={2: [(B, B + P)]}, read_pages=Memory().read, parent_link="../pre"
        )


def test_parent_runs_without_a_parent_are_refused(tmp_path: Path) -> None:
    final = tmp_path / "final"
    make_final(final)
    with pytest.raises(RewriteError, match="no parent_link"):
        rewrite_final(final, clean={2: [(B, B + P)]}, read_pages=Memory().read, parent_link=None)
    with pytest.raises(RewriteError, match="there is none"):
        rewrite_final(final, clean={2: [(B, B + P)]}, read_pages=Memory().read, parent_link="../x")
    # explicitly allowed (parent only on another host): not checked, but written
    stats = rewrite_final(
        final,
        clean={2: [(B, B + P)]},
        read_pages=Memory().read,
        parent_link="../x",
        require_parent=False,
    )
    assert stats.parent_pages == 1


def test_no_clean_pages_needs_no_parent(tmp_path: Path) -> None:
    final = tmp_path / "final"
    make_final(final)
    stats = rewrite_final(final, clean={}, read_pages=Memory().read, parent_link=None)
    assert stats.read_pages == 12
    assert all(e.flags & PE_PRESENT for e in read_pagemap(final / "pagemap-2.img").entries)
    assert not (final / "parent").exists()


def test_unreadable_page_fails_and_keeps_the_old_files(tmp_path: Path) -> None:
    final, pre = tmp_path / "final", tmp_path / "pre"
    make_final(final)
    make_parent(pre)
    before = snapshot(final)
    with pytest.raises(RewriteError, match=f"page {C + P:#x} could not be read"):
        rewrite_final(final, clean={}, read_pages=Memory(holes=(C + P,)).read, parent_link="../pre")
    assert snapshot(final) == before
    assert not list(final.glob("*.tmp"))


def test_existing_parent_runs_and_odd_flags_are_refused(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    write_pagemap(final / "pagemap-1.img", 1, [PagemapEntry(B, 1, PE_PARENT)])
    with pytest.raises(RewriteError, match="not a lazy dump"):
        rewrite_final(final, clean={}, read_pages=Memory().read, parent_link=None)
    write_pagemap(final / "pagemap-1.img", 1, [PagemapEntry(B, 1, 0)])
    with pytest.raises(RewriteError, match="unexpected flags"):
        rewrite_final(final, clean={}, read_pages=Memory().read, parent_link=None)


def test_lazy_shmem_pagemap_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "final"
    make_final(final)
    write_pagemap(final / "pagemap-shmem-99.img", 3, [PagemapEntry(B, 1, PE_LAZY)])
    with pytest.raises(RewriteError, match="lazy runs"):
        rewrite_final(final, clean={}, read_pages=Memory().read, parent_link=None)


def test_unaligned_clean_range_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "final"
    make_final(final)
    with pytest.raises(ValueError, match="page aligned"):
        rewrite_final(
            final, clean={2: [(B + 1, B + P)]}, read_pages=Memory().read, parent_link=None
        )


def test_not_a_dump_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RewriteError, match="no pagemap"):
        rewrite_final(tmp_path, clean={}, read_pages=Memory().read, parent_link=None)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), max_size=8),
    st.lists(st.integers(1, 24), min_size=1, max_size=6),
)
def test_every_lazy_page_ends_up_exactly_once(
    tmp_path_factory: pytest.TempPathFactory,
    clean_pages: list[tuple[int, int]],
    entry_sizes: list[int],
) -> None:
    base = tmp_path_factory.mktemp("h")
    final, pre = base / "final", base / "pre"
    final.mkdir()
    entries, addr = [], B
    for i, n in enumerate(entry_sizes):
        entries.append(PagemapEntry(addr, n, PE_LAZY))
        addr += (n + i % 2) * P  # some entries touch, some leave a hole
    write_pagemap(final / "pagemap-3.img", 1, entries)
    make_parent(pre, vpid=3, entries=((B, (addr - B) // P),))
    clean = [(B + s * P, B + (s + n) * P) for s, n in clean_pages]
    rewrite_final(final, clean={3: clean}, read_pages=Memory().read, parent_link="../pre")

    out = read_pagemap(final / "pagemap-3.img").entries  # decodes only sorted, non-overlapping
    lazy = {e.vaddr + i * P for e in entries for i in range(e.nr_pages)}
    got = {e.vaddr + i * P: e.flags for e in out for i in range(e.nr_pages)}
    assert set(got) == lazy
    in_clean = {a for a in lazy if any(s <= a < e for s, e in clean)}
    assert {a for a, f in got.items() if f == PE_PARENT} == in_clean
    data = (final / "pages-1.img").read_bytes()
    present = [e.vaddr + i * P for e in out if e.flags & PE_PRESENT for i in range(e.nr_pages)]
    assert data == b"".join(page(3, a, 1) for a in present)


def test_tracked_dump_parent_runs_are_rewritten_like_lazy_runs(tmp_path: Path) -> None:
    """A tracked incremental dump (phaul/engine/tracked_dump.py) writes PE_PARENT holes
    against a synthesized parent: clean pages stay lazy for the target's daemon, the rest is
    read; the same input without parent_runs is refused (it is not a lazy dump)."""
    final = tmp_path / "final"
    final.mkdir()
    write_pagemap(
        final / "pagemap-2.img",
        7,
        [PagemapEntry(A, 2, PE_PRESENT), PagemapEntry(B, 8, PE_PARENT)],
    )
    (final / "pages-7.img").write_bytes(page(2, A) + page(2, A + P))
    mem = Memory()
    clean = {2: [(B, B + 6 * P)]}
    with pytest.raises(RewriteError, match="PE_PARENT"):
        rewrite_final(final, clean=clean, read_pages=mem.read, parent_link=None)
    rewrite_final(
        final,
        clean=clean,
        read_pages=mem.read,
        parent_link=None,
        require_parent=False,
        for_lazy_restore=True,
        parent_runs=True,
    )
    assert read_pagemap(final / "pagemap-2.img").entries == (
        PagemapEntry(A, 2, PE_PRESENT),
        PagemapEntry(B, 6, PE_LAZY),
        PagemapEntry(B + 6 * P, 2, PE_PRESENT),
    )
    assert mem.asked == [(2, [(B + 6 * P, 2 * P)])]
    assert (final / "pages-7.img").read_bytes() == b"".join(
        [page(2, A), page(2, A + P), page(2, B + 6 * P, 1), page(2, B + 7 * P, 1)]
    )
