"""The content-hash tracker (phaul.engine.hashtrack), with the checks shared by every tracker
(tests/integration/test_uffd.py)."""

from __future__ import annotations

import mmap
import subprocess
from pathlib import Path

import pytest

from phaul.engine.hashtrack import HashTracker
from phaul.engine.maps import PAGE_SIZE, read_maps
from phaul.engine.pagemap import present_ranges
from phaul.engine.vmread import VmReader
from tests.integration.test_uffd import (
    WRITE,
    ZAP,
    Lockstep,
    lockstep,  # noqa: F401 - fixture
    lockstep_bin,  # noqa: F401 - fixture
    negative_control,
    pages_of,
    run_lockstep_rounds,
    shadow_check,
)

pytestmark = pytest.mark.integration


def test_lockstep_no_missed_page(lockstep: Lockstep) -> None:  # noqa: F811
    checked = run_lockstep_rounds(lockstep, HashTracker(), rounds=60, seed=2, exact=True)
    assert checked > 400


def test_lockstep_negative_control(lockstep: Lockstep) -> None:  # noqa: F811
    negative_control(lockstep, HashTracker())


def test_free_running_shadow_equals_frozen_memory(
    lockstep_bin: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    res = shadow_check(lockstep_bin, tmp_path, HashTracker, seconds=1.5)
    assert res.passes >= 3
    assert (res.missing, res.mismatched) == (0, 0), res


def test_sparse_mapping_stays_sparse(tmp_path: Path) -> None:
    """Hashing reads only populated anonymous pages: a 1 GiB mapping with 3 pages touched stays
    at 3 present pages, and the zapping of one of them is reported."""
    script = (
        "import mmap, sys\n"
        "m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "for off in (0, 123 << 20, (1 << 30) - 4096):\n"
        "    m[off] = 1\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"m.madvise({mmap.MADV_DONTNEED}, 123 << 20, 4096)\n"
        "print('zapped', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        ["python3", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    tracker = HashTracker()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        big = next(m for m in read_maps(proc.pid) if m.size == 1 << 30)
        tracker.start(proc.pid)
        first = tracker.collect()
        assert pages_of(first.dirty, big.start, big.end) == set(range(big.start, big.end, 4096))
        present = present_ranges(proc.pid, [big])
        assert sum(e - s for s, e in present) == 3 * 4096
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"zapped"
        d = tracker.collect()
        zapped = big.start + (123 << 20)
        assert pages_of(d.dirty, big.start, big.end) == {zapped}
        assert not pages_of(tracker.collect().dirty, big.start, big.end)
    finally:
        tracker.stop()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def test_copied_closes_the_aba_window(lockstep: Lockstep) -> None:  # noqa: F811
    """Hashed as zeros, read by the caller after a write, zeroed again: only the hashes of what
    the caller read (``copied``) reveal the change; without them it is missed."""
    page = lockstep.base + 5 * PAGE_SIZE
    lo, hi = lockstep.base, lockstep.base + lockstep.npages * PAGE_SIZE
    for tell in (True, False):
        lockstep.run([(WRITE, 5)])  # populated before tracking starts
        tracker = HashTracker()
        tracker.start(lockstep.proc.pid)
        try:
            tracker.collect()
            lockstep.run([(ZAP, 5)])
            assert pages_of(tracker.collect().dirty, lo, hi) == {page}
            lockstep.run([(WRITE, 5)])  # between the collect and the caller's read
            reader = VmReader(lockstep.proc.pid, 1 << 20)
            for addr, view in reader.read([(page, PAGE_SIZE)]):
                assert any(view)
                if tell:
                    tracker.copied(addr, view)
            lockstep.run([(ZAP, 5)])
            reported = pages_of(tracker.collect().dirty, lo, hi)
            assert reported == ({page} if tell else set())
        finally:
            tracker.stop()
