"""VmReader on a real memwriter: exact content, batching, vanishing mappings, dead processes."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul.engine import maps
from phaul.engine.proctree import read_stat, threads
from phaul.engine.vmread import VmReader
from phaul.errors import ProcessGone
from tests.workloads.memwriter import MAGIC2, PAGE, Memwriter, build, expected_page, page_gen

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("memwriter-bin"))


@pytest.fixture
def writer(tmp_path: Path, binary: Path) -> Iterator[Memwriter]:
    with Memwriter.start(tmp_path, mib=32, binary=binary, lockstep=True) as mw:
        yield mw


def test_read_whole_buffer_exact(writer: Memwriter) -> None:
    # A 4 MiB buffer over 32 MiB: 8 batches; every page must be exactly page i, generation 0.
    reader = VmReader(writer.pid, 4 << 20)
    seen = 0
    for addr, view in reader.read([(writer.addr, writer.size)]):
        assert len(view) % PAGE == 0
        for off in range(0, len(view), PAGE):
            idx = writer.page_index(addr + off)
            assert idx == seen, "pages out of order or missing"
            assert page_gen(view[off : off + PAGE], idx) == 0, f"page {idx} corrupt"
            seen += 1
    assert seen == writer.pages
    assert reader.gone == [] and reader.unreadable == []
    assert reader.stats.calls == 8


def test_scattered_ranges_merged_and_split(writer: Memwriter) -> None:
    # Rewrite some pages so generations differ, then read a random scattered set of pages
    # (with adjacent runs, duplicates, a tiny iovec limit and a tiny buffer).
    assert writer.command("r 100 50") == "ack 50"
    assert writer.command("w 5 6 7 1000") == "ack 4"
    gens = dict.fromkeys(range(writer.pages), 0)
    for i in [*range(100, 150), 5, 6, 7, 1000]:
        gens[i] = 1
    rng = random.Random(7)
    wanted = sorted(set(rng.sample(range(writer.pages), 700)) | {5, 6, 7, 99, 100, 149, 150})
    ranges = [(writer.addr + i * PAGE, PAGE) for i in wanted]
    ranges += ranges[:20]  # duplicates are read once
    reader = VmReader(writer.pid, 16 * PAGE, iov_max=4)
    got: dict[int, bytes] = {}
    for addr, view in reader.read(ranges):
        for off in range(0, len(view), PAGE):
            idx = writer.page_index(addr + off)
            assert idx not in got
            got[idx] = bytes(view[off : off + PAGE])
    assert sorted(got) == wanted
    for idx, data in got.items():
        assert data == expected_page(idx, gens[idx]), f"page {idx}"
    # Adjacent pages were merged into runs: far fewer iovecs than pages.
    assert reader.stats.iovecs < len(wanted)


def test_unmapped_ranges_reported_gone(writer: Memwriter) -> None:
    regions = []
    for n in (3, 5, 7, 9):
        ack = writer.command(f"map {n}").split()
        assert ack[0] == "ack"
        regions.append((int(ack[1], 16), n))
    # Unmap the second and the fourth region, and the middle page of the third.
    assert writer.command(f"unmap {regions[1][0]:#x} {regions[1][1]}") == "ack 0"
    assert writer.command(f"unmap {regions[3][0]:#x} {regions[3][1]}") == "ack 0"
    third = regions[2][0]
    assert writer.command(f"unmap {third + 3 * PAGE:#x} 1") == "ack 0"
    ranges = [(a, n * PAGE) for a, n in regions] + [(writer.addr, 16 * PAGE)]
    reader = VmReader(writer.pid, 1 << 20)
    got: dict[int, bytes] = {}
    for addr, view in reader.read(ranges):
        for off in range(0, len(view), PAGE):
            got[addr + off] = bytes(view[off : off + PAGE])
    gone = maps.merge_ranges(reader.gone)
    expect_gone = maps.merge_ranges(
        [
            (regions[1][0], regions[1][0] + 5 * PAGE),
            (regions[3][0], regions[3][0] + 9 * PAGE),
            (third + 3 * PAGE, third + 4 * PAGE),
        ]
    )
    assert gone == expect_gone
    # (region start, first page index, page count) of what must have been read.
    readable = [(regions[0][0], 0, 3), (third, 0, 3), (third, 4, 3)]
    for base, first, n in readable:
        for idx in range(first, first + n):
            assert page_gen(got.pop(base + idx * PAGE), idx, MAGIC2) == 0
    for i in range(16):
        assert page_gen(got.pop(writer.addr + i * PAGE), i) == 0
    assert got == {}


def test_unreadable_mapping_is_skipped(writer: Memwriter) -> None:
    vsyscall = [m for m in maps.read_maps(writer.pid) if m.path == "[vsyscall]"]
    assert vsyscall, "this kernel maps [vsyscall] (x86-64, vsyscall=xonly)"
    v = vsyscall[0]
    reader = VmReader(writer.pid, 1 << 20)
    out = list(reader.read([(writer.addr, PAGE), (v.start, v.size)]))
    assert [(a, len(b)) for a, b in out] == [(writer.addr, PAGE)]
    assert reader.unreadable == [(v.start, v.end)]
    assert reader.gone == []


def test_reading_during_churn_survives(tmp_path: Path, binary: Path) -> None:
    # Mappings of 1..256 pages appear and vanish every few ms while we read everything.
    with Memwriter.start(tmp_path, mib=16, churn_pages=256, binary=binary) as mw:
        reader = VmReader(mw.pid, 8 << 20)
        gone_seen = 0
        passes = 0
        deadline = time.monotonic() + 20
        while (gone_seen == 0 or passes < 20) and time.monotonic() < deadline:
            ms = maps.private_writable_mappings(mw.pid)
            ranges = [(m.start, m.size) for m in ms]
            total = 0
            for addr, view in reader.read(ranges):
                total += len(view)
                # The main buffer is never rewritten: it must read back exact at every pass.
                if addr <= mw.addr < addr + len(view):
                    off = mw.addr - addr
                    assert page_gen(view[off : off + PAGE], 0) == 0
            gone_seen += len(reader.gone)
            passes += 1
            assert total >= mw.size
        assert gone_seen > 0, f"no mapping vanished during {passes} passes"
        assert mw.verify() == f"ok pages={mw.pages} bad=0"


def test_dead_process_raises_process_gone(tmp_path: Path, binary: Path) -> None:
    mw = Memwriter.start(tmp_path, mib=4, binary=binary)
    try:
        reader = VmReader(mw.pid, 1 << 20)
        assert sum(len(v) for _, v in reader.read([(mw.addr, mw.size)])) == mw.size
        os.kill(mw.pid, signal.SIGKILL)
        mw.proc.wait()
        with pytest.raises(ProcessGone, match=str(mw.pid)):
            list(reader.read([(mw.addr, mw.size)]))
    finally:
        mw.stop()


def test_frozen_dirtying_writer_reads_consistent(tmp_path: Path, binary: Path) -> None:
    # 2 threads rewrite pages at 40 MiB/s, logging each write. Frozen with SIGSTOP, every page
    # read must be at the generation of its last logged write before the freeze, except a page
    # a thread was writing at that instant (it may be torn).
    import struct

    with Memwriter.start(tmp_path, mib=16, rate=40, threads=2, log=True, binary=binary) as mw:
        time.sleep(0.5)
        assert mw.verify() == f"ok pages={mw.pages} bad=0"
        os.kill(mw.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while any(read_stat(t).state != "T" for t in threads(mw.pid)):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            t_freeze = time.monotonic_ns()
            gens: dict[int, int | None] = {}
            for addr, view in VmReader(mw.pid, 4 << 20).read([(mw.addr, mw.size)]):
                for off in range(0, len(view), PAGE):
                    idx = mw.page_index(addr + off)
                    gens[idx] = page_gen(view[off : off + PAGE], idx)
        finally:
            os.kill(mw.pid, signal.SIGCONT)
        mw.stop()  # SIGTERM: the writers flush their logs
        assert len(gens) == mw.pages
        last: dict[int, int] = {}
        inflight: set[int] = set()
        for path in mw.log_files():
            for before, after, page, gen in struct.iter_unpack("<QQII", path.read_bytes()):
                if after < t_freeze:
                    last[page] = max(gen, last.get(page, 0))
                elif before < t_freeze:
                    inflight.add(page)
        assert len(last) > 100, "writers logged too little"
        assert len(inflight) <= 2
        wrong = [p for p, g in gens.items() if g != last.get(p, 0) and p not in inflight]
        assert wrong == []
