"""PAGEMAP_SCAN / present_ranges on a real memwriter (another process, as root)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul.engine import maps, pagemap
from phaul.engine.pagemap import PAGE_IS_PRESENT, PagemapFile
from phaul.engine.proctree import read_stat
from phaul.errors import ProcessGone
from tests.workloads.memwriter import PAGE, Memwriter, build

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("memwriter-bin"))


@pytest.fixture
def writer(tmp_path: Path, binary: Path) -> Iterator[Memwriter]:
    with Memwriter.start(tmp_path, mib=16, binary=binary, lockstep=True) as mw:
        yield mw


def _mapping_at(pid: int, addr: int) -> maps.Mapping:
    """The VMA holding ``addr`` (the kernel may have merged it with an anonymous neighbour)."""
    (m,) = [m for m in maps.read_maps(pid) if m.contains(addr)]
    return m


def _within(ranges: list[maps.Range], start: int, end: int) -> list[maps.Range]:
    return maps.intersect_ranges(ranges, [(start, end)])


def test_main_buffer_fully_present(writer: Memwriter) -> None:
    m = _mapping_at(writer.pid, writer.addr)
    present = pagemap.present_ranges(writer.pid, [m])
    end = writer.addr + writer.size
    assert _within(present, writer.addr, end) == [(writer.addr, end)]


def test_present_ranges_match_touched_pages(writer: Memwriter) -> None:
    ack = writer.command("sparse 256 3").split()
    assert ack[0] == "ack"
    base = int(ack[1], 16)
    # The kernel may merge the new VMA with a neighbour: look only at the new pages.
    m = _mapping_at(writer.pid, base)
    assert m.end >= base + 256 * PAGE
    touched = [(base + i * PAGE, base + (i + 1) * PAGE) for i in range(0, 256, 3)]
    present = pagemap.present_ranges(writer.pid, [m])
    assert _within(present, base, base + 256 * PAGE) == touched
    # Rewrite a run of the main buffer and drop (MADV_DONTNEED) a part of it.
    assert writer.command(f"drop {writer.addr + 10 * PAGE:#x} 20") == "ack 0"
    main = _mapping_at(writer.pid, writer.addr)
    present = pagemap.present_ranges(writer.pid, [main])
    assert _within(present, writer.addr, writer.addr + writer.size) == [
        (writer.addr, writer.addr + 10 * PAGE),
        (writer.addr + 30 * PAGE, writer.addr + writer.size),
    ]


def test_scan_and_pagemap_entries_agree_on_whole_address_space(writer: Memwriter) -> None:
    assert writer.command("sparse 100 7").startswith("ack")
    # Stopped, so that its heartbeat's stdio buffers cannot touch a heap page in between.
    os.kill(writer.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while read_stat(writer.pid).state != "T":  # the stop is asynchronous
        assert time.monotonic() < deadline, "memwriter did not stop"
        time.sleep(0.001)
    try:
        ms = [m for m in maps.read_maps(writer.pid) if not m.special]
        with PagemapFile(writer.pid) as pm:
            by_scan = pm.present_ranges(ms)
            by_entries = [
                r for m in ms for r in pagemap._present_by_entries(pm.fileno(), m.start, m.end)
            ]
            # Raw scan of everything with the loop on walk_end.
            regions = pm.scan(0, pagemap.TASK_SIZE, category_mask=PAGE_IS_PRESENT)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    assert by_scan == by_entries
    # The raw scan also sees the kernel's [vvar]/[vdso] pages, which present_ranges leaves out.
    raw = maps.intersect_ranges(((s, e) for s, e, _ in regions), ((m.start, m.end) for m in ms))
    assert maps.merge_ranges(by_scan) == raw


def test_private_writable_present_covers_buffer(writer: Memwriter) -> None:
    ms = maps.private_writable_mappings(writer.pid)
    present = pagemap.present_ranges(writer.pid, ms)
    covered = maps.intersect_ranges(present, [(writer.addr, writer.addr + writer.size)])
    assert covered == [(writer.addr, writer.addr + writer.size)]


def test_exited_process_raises_process_gone(tmp_path: Path, binary: Path) -> None:
    mw = Memwriter.start(tmp_path, mib=4, binary=binary)
    try:
        pm = PagemapFile(mw.pid)
        ms = maps.read_maps(mw.pid)
        os.kill(mw.pid, signal.SIGKILL)
        mw.proc.wait()
        with pm, pytest.raises(ProcessGone, match=str(mw.pid)):
            pm.present_ranges(ms)
        with pytest.raises(ProcessGone):
            pagemap.present_ranges(mw.pid, ms)
    finally:
        mw.stop()
