"""PAGEMAP_SCAN and /proc/PID/pagemap on our own process (no root needed)."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import subprocess
from collections.abc import Iterator

import pytest

from phaul.engine import maps, pagemap
from phaul.engine.pagemap import PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN
from phaul.errors import ProcessGone

PAGE = 4096
NPAGES = 64


@pytest.fixture
def region() -> Iterator[tuple[mmap.mmap, int]]:
    """64 untouched anonymous private pages and their address."""
    m = mmap.mmap(-1, NPAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    yield m, addr
    del anchor
    m.close()


def _touch(m: mmap.mmap, pages: list[int]) -> None:
    for p in pages:
        m[p * PAGE] = 1


def _own_mapping(addr: int) -> list[maps.Mapping]:
    return [m for m in maps.read_maps(os.getpid()) if m.contains(addr)]


def test_scan_is_supported_here() -> None:
    # Kernel 6.18: the ioctl must exist; if this fails the fast path is silently lost.
    assert pagemap.scan_supported()


def test_present_ranges_exact(region: tuple[mmap.mmap, int]) -> None:
    m, addr = region
    touched = [0, 1, 2, 7, 30, 31, 63]
    _touch(m, touched)
    got = pagemap.present_ranges(os.getpid(), _own_mapping(addr))
    expect = [(addr, addr + 3 * PAGE), (addr + 7 * PAGE, addr + 8 * PAGE)]
    expect += [(addr + 30 * PAGE, addr + 32 * PAGE), (addr + 63 * PAGE, addr + 64 * PAGE)]
    assert maps.intersect_ranges(got, [(addr, addr + NPAGES * PAGE)]) == expect


def test_fallback_agrees_with_scan(region: tuple[mmap.mmap, int]) -> None:
    m, addr = region
    _touch(m, list(range(0, NPAGES, 5)))
    with pagemap.PagemapFile(os.getpid()) as pm:
        # The VMA may have merged with a neighbour: compare within our pages only.
        by_scan = maps.intersect_ranges(
            pm.present_ranges(_own_mapping(addr)), [(addr, addr + NPAGES * PAGE)]
        )
        by_entries = pagemap._present_by_entries(pm.fileno(), addr, addr + NPAGES * PAGE)
        entries = pm.entries(addr, addr + NPAGES * PAGE)
    assert by_scan == by_entries
    assert len(by_scan) == len(range(0, NPAGES, 5))
    assert len(entries) == NPAGES
    assert [i for i, e in enumerate(entries) if e & pagemap.PM_PRESENT] == list(range(0, NPAGES, 5))


def test_scan_categories_and_small_vector(region: tuple[mmap.mmap, int]) -> None:
    m, addr = region
    touched = list(range(0, NPAGES, 2))  # 32 separate regions
    _touch(m, touched)
    fd = pagemap.open_pagemap(os.getpid())
    try:
        # A vector of 3 regions forces many ioctls: the loop on walk_end must collect all.
        got = pagemap.scan(
            fd,
            addr,
            addr + NPAGES * PAGE,
            category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask=PAGE_IS_PRESENT,
            vec=pagemap.make_vector(3),
        )
        assert got == [(addr + p * PAGE, addr + (p + 1) * PAGE, PAGE_IS_PRESENT) for p in touched]
        # Everything, with all categories: present runs alternate with non-present ones.
        allr = pagemap.scan(fd, addr, addr + NPAGES * PAGE, vec=pagemap.make_vector(2))
        assert allr[0][0] == addr and allr[-1][1] == addr + NPAGES * PAGE
        assert all(a[1] == b[0] for a, b in itertools.pairwise(allr))
        assert [r[2] & PAGE_IS_PRESENT for r in allr] == [PAGE_IS_PRESENT, 0] * 32
        # max_pages stops early.
        few = pagemap.scan(
            fd, addr, addr + NPAGES * PAGE, category_mask=PAGE_IS_PRESENT, max_pages=5
        )
        assert sum((e - s) // PAGE for s, e, _ in few) == 5
    finally:
        os.close(fd)


def test_runs_merge_across_ioctls(region: tuple[mmap.mmap, int]) -> None:
    m, addr = region
    _touch(m, list(range(NPAGES)))
    with pagemap.PagemapFile(os.getpid(), vec_len=1) as pm:
        got = pm.scan(addr, addr + NPAGES * PAGE, category_mask=PAGE_IS_PRESENT, return_mask=8)
    assert got == [(addr, addr + NPAGES * PAGE, PAGE_IS_PRESENT)]


def test_written_category_without_uffd(region: tuple[mmap.mmap, int]) -> None:
    # Without uffd-wp registration every page counts as WRITTEN (nothing is protected).
    m, addr = region
    _touch(m, [3])
    with pagemap.PagemapFile(os.getpid()) as pm:
        got = pm.scan(addr + 3 * PAGE, addr + 4 * PAGE, return_mask=PAGE_IS_WRITTEN)
    assert got == [(addr + 3 * PAGE, addr + 4 * PAGE, PAGE_IS_WRITTEN)]


def test_unaligned_range_rejected() -> None:
    with pytest.raises(ValueError, match="aligned"):
        pagemap.scan(0, 1, PAGE)


def test_gone_process() -> None:
    with pytest.raises(ProcessGone, match="no process with PID"):
        pagemap.PagemapFile(2**22 + 11)
    proc = subprocess.Popen(["sleep", "0.1"])
    try:
        pm = pagemap.PagemapFile(proc.pid)
        ms = maps.read_maps(proc.pid)
    finally:
        proc.wait()
    with pm, pytest.raises(ProcessGone, match=str(proc.pid)):
        pm.present_ranges(ms)
