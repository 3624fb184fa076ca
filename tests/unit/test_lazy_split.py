"""build_daemon_dir / check_split on synthetic images (the real CRIU daemon:
tests/integration/test_lazy_restore.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.page_server.criu_image import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PSTREE_MAGIC,
    PagemapEntry,
    frame_entry,
    image_header,
    read_pagemap,
    write_pagemap,
)
from phaul.page_server.lazy_split import (
    MAX_LAZY_ENTRY_PAGES,
    LazyNotInParent,
    SplitError,
    SplitMismatch,
    build_daemon_dir,
    check_split,
    reflag,
)
from phaul.pb import criu_images_pb2

P = PAGE_SIZE
ARENA = 0x7F0000000000
HEAP = 0x560000000000
LZ, PR = PE_LAZY, PE_PRESENT


def write_pstree(d: Path, pids: list[int]) -> None:
    parts = [image_header(PSTREE_MAGIC)]
    for pid in pids:
        msg = criu_images_pb2.pstree_entry(pid=pid, ppid=0 if pid == 1 else 1, pgid=1, sid=1)
        msg.threads.append(pid)
        parts.append(frame_entry(msg.SerializeToString()))
    (d / "pstree.img").write_bytes(b"".join(parts))


def make_restore_dir(d: Path, tasks: dict[int, list[PagemapEntry]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    write_pstree(d, sorted(tasks))
    (d / "inventory.img").write_bytes(b"inventory")
    for vpid, entries in tasks.items():
        (d / f"mm-{vpid}.img").write_bytes(b"mm%d" % vpid)
        write_pagemap(d / f"pagemap-{vpid}.img", vpid, entries)
        present = sum(e.nr_pages for e in entries if e.flags & PE_PRESENT)
        (d / f"pages-{vpid}.img").write_bytes(b"r" * present * P)


def make_parent(d: Path, vpid: int, runs: list[tuple[int, int]], pages_id: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    entries = [PagemapEntry(a, n, PE_PRESENT) for a, n in runs]
    write_pagemap(d / f"pagemap-{vpid}.img", pages_id, entries)
    (d / f"pages-{pages_id}.img").write_bytes(b"p" * sum(n for _, n in runs) * P)


def flags_by_page(entries: tuple[PagemapEntry, ...]) -> dict[int, int]:
    return {e.vaddr + i * P: e.flags for e in entries for i in range(e.nr_pages)}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "R", tmp_path / "P", tmp_path / "D"


def standard(r: Path, p: Path) -> None:
    """Task 2: arena of 2048 pages in the parent (two 1024-page entries); R leaves lazy the
    arena except pages 13 and 110..111 (dirty, eager) and has a heap page eager; task 1 (init)
    has no parent image and nothing lazy."""
    make_parent(p, 2, [(HEAP, 2), (ARENA, 1024), (ARENA + 1024 * P, 1024)], pages_id=77)
    make_restore_dir(
        r,
        {
            1: [PagemapEntry(HEAP, 1, PR)],
            2: [
                PagemapEntry(HEAP, 2, PR),
                PagemapEntry(ARENA, 13, LZ),
                PagemapEntry(ARENA + 13 * P, 1, PR),
                PagemapEntry(ARENA + 14 * P, 96, LZ),
                PagemapEntry(ARENA + 110 * P, 2, PR),
                PagemapEntry(ARENA + 112 * P, 144, LZ),  # CRIU cuts at the pipe size
                PagemapEntry(ARENA + 256 * P, 1792, LZ),
            ],
        },
    )


def test_daemon_dir_layout(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    standard(r, p)
    stats = build_daemon_dir(r, p, d)

    pm = read_pagemap(d / "pagemap-2.img")
    assert pm.pages_id == 77  # the parent's pages file, hard-linked
    assert os.stat(d / "pages-77.img").st_ino == os.stat(p / "pages-77.img").st_ino
    assert os.stat(p / "pages-77.img").st_nlink == 2
    # the daemon's entries consume the parent's file exactly as the parent's own do
    assert pm.present_pages == 2 + 2048
    assert all(e.flags in (PR, PR | LZ) for e in pm.entries)
    assert all(e.nr_pages <= MAX_LAZY_ENTRY_PAGES for e in pm.entries if e.flags & LZ)
    fl = flags_by_page(pm.entries)
    assert fl[HEAP] == fl[HEAP + P] == PR  # eager in R: skip
    assert fl[ARENA] == PR | LZ
    assert fl[ARENA + 13 * P] == PR  # dirty: skip
    assert fl[ARENA + 110 * P] == fl[ARENA + 111 * P] == PR
    assert fl[ARENA + 112 * P] == PR | LZ
    assert fl[ARENA + 2047 * P] == PR | LZ
    assert sum(1 for f in fl.values() if f & LZ) == 2048 - 3
    # the first entries, as in the reference's example
    assert pm.entries[:4] == (
        PagemapEntry(HEAP, 2, PR),
        PagemapEntry(ARENA, 13, PR | LZ),
        PagemapEntry(ARENA + 13 * P, 1, PR),
        PagemapEntry(ARENA + 14 * P, 96, PR | LZ),
    )

    # the task without a parent: empty pagemap and an empty pages file
    pm1 = read_pagemap(d / "pagemap-1.img")
    assert pm1.entries == ()
    assert (d / f"pages-{pm1.pages_id}.img").stat().st_size == 0
    assert pm1.pages_id != 77

    for name in ("inventory.img", "pstree.img", "mm-1.img", "mm-2.img"):
        assert os.stat(d / name).st_ino == os.stat(r / name).st_ino

    assert [(s.vpid, s.lazy_pages, s.skip_pages, s.eager_only) for s in stats.processes] == [
        (1, 0, 0, True),
        (2, 2045, 5, False),
    ]
    assert check_split(r, d) == 2045


def test_rebuild_replaces_existing_daemon_dir(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    standard(r, p)
    build_daemon_dir(r, p, d)
    build_daemon_dir(r, p, d)  # links and pagemaps are replaced, not refused
    assert check_split(r, d) == 2045


def test_lazy_page_outside_parent_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    """Invariant 1: a page R leaves lazy must have data in the parent (else: zeros)."""
    r, p, d = dirs
    make_parent(p, 2, [(ARENA, 100)], pages_id=5)
    make_restore_dir(r, {2: [PagemapEntry(ARENA, 101, LZ)]})
    with pytest.raises(LazyNotInParent, match=r"0x7f0000064000-0x7f0000065000"):
        build_daemon_dir(r, p, d)
    assert not (d / "pagemap-2.img").exists()  # nothing was built


def test_lazy_pages_without_any_parent_are_refused(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    p.mkdir()
    make_restore_dir(r, {2: [PagemapEntry(ARENA, 4, LZ)]})
    with pytest.raises(LazyNotInParent, match="task 2"):
        build_daemon_dir(r, p, d)


def test_daemon_missing_a_lazy_page_is_detected(dirs: tuple[Path, Path, Path]) -> None:
    """Invariant 2a: D lacks a page R left lazy -> zeros; check_split refuses."""
    r, p, d = dirs
    standard(r, p)
    build_daemon_dir(r, p, d)
    pm = read_pagemap(d / "pagemap-2.img")
    # turn the first lazy entry into a skip entry (same file layout)
    tampered = [
        PagemapEntry(e.vaddr, e.nr_pages, PR) if e.vaddr == ARENA else e for e in pm.entries
    ]
    write_pagemap(d / "pagemap-2.img", pm.pages_id, tampered)
    with pytest.raises(SplitMismatch, match="ZEROS"):
        check_split(r, d)


def test_daemon_serving_an_eager_page_is_detected(dirs: tuple[Path, Path, Path]) -> None:
    """Invariant 2b: D serves a page R restores eagerly -> EEXIST livelock; refused."""
    r, p, d = dirs
    standard(r, p)
    build_daemon_dir(r, p, d)
    pm = read_pagemap(d / "pagemap-2.img")
    tampered = [
        PagemapEntry(e.vaddr, e.nr_pages, PR | LZ) if e.vaddr == ARENA + 13 * P else e
        for e in pm.entries
    ]
    write_pagemap(d / "pagemap-2.img", pm.pages_id, tampered)
    with pytest.raises(SplitMismatch, match="livelock"):
        check_split(r, d)


def test_short_daemon_pages_file_is_detected(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    standard(r, p)
    build_daemon_dir(r, p, d)
    os.truncate(d / "pages-77.img", 100 * P)  # same inode: the parent is short too
    with pytest.raises(SplitMismatch, match="bytes"):
        check_split(r, d)
    with pytest.raises(SplitError, match="bytes"):
        build_daemon_dir(r, p, d)


def test_is_stack_quirk_process_has_empty_lazy_set(dirs: tuple[Path, Path, Path]) -> None:
    """CRIU 4.2.1: a page-aligned SP makes every page non-lazy; D then only skips."""
    r, p, d = dirs
    make_parent(p, 2, [(ARENA, 300)], pages_id=9)
    make_restore_dir(r, {2: [PagemapEntry(ARENA, 256, PR), PagemapEntry(ARENA + 256 * P, 44, PR)]})
    stats = build_daemon_dir(r, p, d)
    pm = read_pagemap(d / "pagemap-2.img")
    assert pm.entries == (PagemapEntry(ARENA, 300, PR),)
    assert stats.processes[0].eager_only and stats.lazy_pages == 0
    assert (r / "pages-2.img").stat().st_size == 300 * P  # R kept as CRIU wrote it
    assert check_split(r, d) == 0


@pytest.mark.parametrize("flags", [PR | LZ, PE_PARENT | LZ])
def test_restore_dir_with_unservable_lazy_flags_is_refused(
    dirs: tuple[Path, Path, Path], flags: int
) -> None:
    r, p, d = dirs
    make_parent(p, 2, [(ARENA, 8)], pages_id=9)
    make_restore_dir(r, {2: [PagemapEntry(ARENA, 8, flags)]})
    with pytest.raises(SplitError, match="PE_LAZY alone"):
        build_daemon_dir(r, p, d)


def test_non_flat_parent_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    p.mkdir()
    write_pagemap(p / "pagemap-2.img", 9, [PagemapEntry(ARENA, 8, PE_PARENT)])
    (p / "pages-9.img").write_bytes(b"")
    make_restore_dir(r, {2: [PagemapEntry(ARENA, 8, LZ)]})
    with pytest.raises(SplitError, match="FLAT"):
        build_daemon_dir(r, p, d)


def test_missing_restore_pagemap_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    r, p, d = dirs
    standard(r, p)
    (r / "pagemap-2.img").unlink()
    with pytest.raises(SplitError, match="missing"):
        build_daemon_dir(r, p, d)


@settings(max_examples=200, deadline=None)
@given(
    parent=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 3000)), min_size=1, max_size=6),
    lazy=st.lists(st.tuples(st.integers(0, 200000), st.integers(1, 5000)), max_size=8),
)
def test_reflag_model(parent: list[tuple[int, int]], lazy: list[tuple[int, int]]) -> None:
    """reflag keeps the parent's file layout and marks exactly parent ∩ lazy as lazy."""
    entries: list[PagemapEntry] = []
    cur = 0
    for gap, n in parent:
        cur += gap
        entries.append(PagemapEntry(cur * P, n, PR))
        cur += n
    want: set[int] = set()
    for s, n in lazy:
        want.update(range(s, s + n))
    runs: list[tuple[int, int]] = []
    for pg in sorted(want):
        if runs and runs[-1][1] == pg * P:
            runs[-1] = (runs[-1][0], (pg + 1) * P)
        else:
            runs.append((pg * P, (pg + 1) * P))
    out = reflag(entries, runs)
    assert sum(e.nr_pages for e in out) == sum(e.nr_pages for e in entries)
    assert [e.vaddr for e in out] == sorted(e.vaddr for e in out)
    got = flags_by_page(tuple(out))
    assert set(got) == set(flags_by_page(tuple(entries)))
    assert {a for a, f in got.items() if f & LZ} == {a for a in got if a // P in want}
    assert all(e.nr_pages <= MAX_LAZY_ENTRY_PAGES for e in out if e.flags & LZ)
