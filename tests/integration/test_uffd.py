"""The uffd-wp dirty tracker (phaul.engine.uffd) on real processes, and the checks every tracker
shares (imported by test_hashtrack.py and test_softdirty.py):

- lockstep: tests/workloads/lockstep.c writes / zaps / remaps exactly the pages it is told to;
  the tracker must report every page whose content changed (0 missed), over random rounds; a
  negative control shows that dropping one reported page is caught;
- free-running: a multi-threaded writer with mmap/munmap/mremap/MADV_DONTNEED churn; a shadow copy
  maintained only from the tracker's reports must equal the SIGSTOPped process's memory.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from phaul.engine import uffd
from phaul.engine.maps import (
    PAGE_SIZE,
    Range,
    is_private_writable,
    read_maps,
    read_vmflags,
    subtract_ranges,
)
from phaul.engine.pagemap import PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PM_UFFD_WP, PagemapFile
from phaul.engine.tracker import DirtyRanges, DirtyTracker, choose_tracker
from phaul.engine.vmread import VmReader

pytestmark = pytest.mark.integration

WORKLOAD_C = Path(__file__).resolve().parent.parent / "workloads" / "lockstep.c"
CRIU = os.environ.get("PHAUL_CRIU", "/opt/phaul/criu/criu")

WRITE, ZAP, REMAP = 0, 1, 2


@pytest.fixture(scope="module")
def lockstep_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lockstep") / "lockstep"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(out), str(WORKLOAD_C)], check=True, timeout=60
    )
    return out


# -- lockstep ---------------------------------------------------------------------------------


@dataclass
class Lockstep:
    """A running lockstep workload and a model of its buffer's content."""

    proc: subprocess.Popen[bytes]
    cmd: int
    ack: int
    base: int
    npages: int
    counter: int = 0
    model: dict[int, int] = field(default_factory=dict)  # page index -> last value (0 = zeros)
    remapped: set[int] = field(default_factory=set)  # pages made new VMAs in the last run()

    def run(self, ops: list[tuple[int, int]]) -> set[int]:
        """Perform ops; return the page addresses whose content changed. Pages that became new
        mappings are in :attr:`remapped` (a tracker may report them even if the content ended
        where it began: new mappings are reported whole)."""
        before = dict(self.model)
        self.remapped = {self.base + idx * PAGE_SIZE for kind, idx in ops if kind == REMAP}
        words = [(kind << 28) | idx for kind, idx in ops]
        os.write(self.cmd, struct.pack(f"<I{len(words)}I", len(words), *words))
        for kind, idx in ops:
            if kind == ZAP:
                self.model[idx] = 0
            else:
                self.counter += 1
                self.model[idx] = self.counter
        if os.read(self.ack, 1) != b"k":
            raise AssertionError("lockstep workload did not ack")
        return {
            self.base + i * PAGE_SIZE
            for i in set(before) | set(self.model)
            if before.get(i, -1) != self.model.get(i, -1)
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.cmd)
        os.close(self.ack)


@pytest.fixture
def lockstep(lockstep_bin: Path, tmp_path: Path) -> Iterator[Lockstep]:
    npages = 1024
    cmd_path, ack_path = tmp_path / "cmd", tmp_path / "ack"
    os.mkfifo(cmd_path)
    os.mkfifo(ack_path)
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(
            [str(lockstep_bin), "lockstep", str(cmd_path), str(ack_path), str(npages)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    cmd = ack = -1
    try:
        cmd = os.open(cmd_path, os.O_WRONLY)
        ack = os.open(ack_path, os.O_RDONLY)
        (base,) = struct.unpack("<Q", os.read(ack, 8))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    ls = Lockstep(proc, cmd, ack, base, npages, model=dict.fromkeys(range(npages), -2))
    try:
        yield ls
    finally:
        ls.close()


def pages_of(ranges: list[Range], lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for s, e in ranges:
        out.update(range(max(s, lo), min(e, hi), PAGE_SIZE))
    return out


def missed_pages(expected: set[int], reported: DirtyRanges, lo: int, hi: int) -> set[int]:
    return expected - pages_of(reported.dirty, lo, hi)


def run_lockstep_rounds(
    ls: Lockstep, tracker: DirtyTracker, *, rounds: int, seed: int, exact: bool
) -> int:
    """Random rounds of writes/zaps/remaps; assert 0 missed (and 0 extra when ``exact``).
    Returns the number of page changes checked."""
    rng = random.Random(seed)
    lo, hi = ls.base, ls.base + ls.npages * PAGE_SIZE
    tracker.start(ls.proc.pid)
    try:
        first = tracker.collect()
        assert pages_of(first.dirty, lo, hi) == set(range(lo, hi, PAGE_SIZE))
        checked = 0
        for rnd in range(rounds):
            n = rng.choice([0, 1, 2, 5, 30, 200])
            ops = []
            for _ in range(n):
                r = rng.random()
                kind = WRITE if r < 0.8 else ZAP if r < 0.95 else REMAP
                ops.append((kind, rng.randrange(ls.npages)))
            expected = ls.run(ops)
            got = tracker.collect()
            missed = missed_pages(expected, got, lo, hi)
            assert not missed, f"round {rnd}: {len(missed)} missed pages of {len(expected)}"
            if exact:
                extra = pages_of(got.dirty, lo, hi) - expected - ls.remapped
                assert not extra, f"round {rnd}: {len(extra)} pages reported but not changed"
            checked += len(expected)
        return checked
    finally:
        tracker.stop()


def negative_control(ls: Lockstep, tracker: DirtyTracker) -> None:
    """Dropping one page from a correct report must be detected by the comparison."""
    lo, hi = ls.base, ls.base + ls.npages * PAGE_SIZE
    tracker.start(ls.proc.pid)
    try:
        tracker.collect()
        expected = ls.run([(WRITE, 7), (WRITE, 100), (ZAP, 500)])
        got = tracker.collect()
        assert not missed_pages(expected, got, lo, hi)
        victim = ls.base + 100 * PAGE_SIZE
        dropped = DirtyRanges(
            dirty=subtract_ranges(got.dirty, [(victim, victim + PAGE_SIZE)]), vanished=got.vanished
        )
        assert missed_pages(expected, dropped, lo, hi) == {victim}
    finally:
        tracker.stop()


# -- free-running shadow copy ---------------------------------------------------------------


def _domain(pid: int) -> list[Range]:
    return [(m.start, m.end) for m in read_maps(pid) if is_private_writable(m)]


def _read_pages(reader: VmReader, ranges: list[Range]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for addr, view in reader.read((s, e - s) for s, e in ranges):
        for off in range(0, len(view) - PAGE_SIZE + 1, PAGE_SIZE):
            out[addr + off] = bytes(view[off : off + PAGE_SIZE])
    return out


@dataclass
class ShadowResult:
    passes: int
    pages_compared: int
    missing: int
    mismatched: int
    copied: int
    examples: list[str] = field(default_factory=list)


def shadow_check(
    lockstep_bin: Path,
    tmp_path: Path,
    make_tracker: Callable[[], DirtyTracker],
    *,
    seconds: float = 2.0,
    npages: int = 4096,
    threads: int = 2,
    corrupt_one: bool = False,
) -> ShadowResult:
    """Pre-copy simulation against the free-running workload (see the module docstring)."""
    with open(tmp_path / "free.out", "wb") as out:
        proc = subprocess.Popen(
            [str(lockstep_bin), "free", str(npages), str(threads)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    tracker = make_tracker()
    try:
        deadline = time.monotonic() + 5
        while b"ready" not in (tmp_path / "free.out").read_bytes():
            assert time.monotonic() < deadline, "free-running workload did not start"
            time.sleep(0.01)
        reader = VmReader(proc.pid, 8 << 20)
        shadow: dict[int, bytes] = {}

        def apply(d: DirtyRanges) -> int:
            for s, e in d.vanished:
                for p in range(s, e, PAGE_SIZE):
                    shadow.pop(p, None)
            n = 0
            for addr, view in reader.read((s, e - s) for s, e in d.dirty):
                tracker.copied(addr, view)
                for off in range(0, len(view) - PAGE_SIZE + 1, PAGE_SIZE):
                    shadow[addr + off] = bytes(view[off : off + PAGE_SIZE])
                    n += 1
            return n

        tracker.start(proc.pid)
        passes = copied = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            copied += apply(tracker.collect())
            passes += 1
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        # SIGSTOP takes effect per thread, asynchronously: wait until EVERY thread is stopped
        # (the leader's state alone says nothing about the writer threads).
        while any(
            t.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] != "T"
            for t in Path(f"/proc/{proc.pid}/task").iterdir()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        copied += apply(tracker.collect())
        passes += 1
        tracker.stop()
        actual = _read_pages(reader, _domain(proc.pid))
        if corrupt_one:
            victim = next(p for p in sorted(shadow) if p in actual)
            shadow[victim] = bytes(PAGE_SIZE) if any(shadow[victim]) else b"\1" * PAGE_SIZE
        missing = sum(1 for p in actual if p not in shadow)
        bad = [p for p, data in actual.items() if p in shadow and shadow[p] != data]
        maps = read_maps(proc.pid)
        examples = [
            f"{p:#x} in {next((str(m) for m in maps if m.contains(p)), '?')}: shadow "
            f"{'zero' if not any(shadow[p]) else 'data'}, actual "
            f"{'zero' if not any(actual[p]) else 'data'}"
            for p in bad[:5]
        ]
        return ShadowResult(passes, len(actual), missing, len(bad), copied, examples)
    finally:
        tracker.stop()
        proc.kill()
        proc.wait()


# -- the uffd tracker -------------------------------------------------------------------------


def test_self_test_passes_on_this_kernel() -> None:
    ok, why = uffd.probe()
    assert ok, why
    assert isinstance(choose_tracker("auto", os.getpid()), uffd.UffdTracker)


def test_lockstep_no_missed_page(lockstep: Lockstep) -> None:
    checked = run_lockstep_rounds(lockstep, uffd.UffdTracker(), rounds=150, seed=1, exact=True)
    assert checked > 1000
    # stop() left nothing behind: no uffd-wp registration, no protected page.
    pid = lockstep.proc.pid
    assert not any("uw" in flags for flags in read_vmflags(pid).values())
    with PagemapFile(pid) as pm:
        entries = pm.entries(lockstep.base, lockstep.base + lockstep.npages * PAGE_SIZE)
    assert not any(e & PM_UFFD_WP for e in entries)


def test_lockstep_negative_control(lockstep: Lockstep) -> None:
    negative_control(lockstep, uffd.UffdTracker())


def test_free_running_shadow_equals_frozen_memory(lockstep_bin: Path, tmp_path: Path) -> None:
    res = shadow_check(lockstep_bin, tmp_path, uffd.UffdTracker)
    assert res.passes > 5
    assert res.pages_compared > 4096
    assert (res.missing, res.mismatched) == (0, 0), res


def test_free_running_checker_catches_a_bad_page(lockstep_bin: Path, tmp_path: Path) -> None:
    res = shadow_check(lockstep_bin, tmp_path, uffd.UffdTracker, seconds=0.3, corrupt_one=True)
    assert res.mismatched == 1, res


def test_new_mprotected_and_refused_ranges(tmp_path: Path) -> None:
    """New mappings, mprotect to writable, and a range owned by the target's own uffd (EBUSY,
    tracked by hashing) are all reported."""
    script = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
ro = libc.mmap(None, 8192, 1, 0x22, -1, 0)           # PROT_READ private anon
own = libc.mmap(None, 8192, 3, 0x22, -1, 0)
ctypes.memset(own, 1, 8192)
# The workload's own uffd on `own` (MODE_MISSING): our registration there gets EBUSY.
ufd = libc.syscall(323, 0o2000000 | 0o4000 | 1)
api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)
assert libc.ioctl(ufd, 0xC018AA3F, api) == 0
reg = (ctypes.c_uint64 * 4)(own, 8192, 1, 0)
assert libc.ioctl(ufd, 0xC020AA00, reg) == 0, ctypes.get_errno()
print(ro, own, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "new":
        p = libc.mmap(None, 3 * 4096, 3, 0x22, -1, 0)
        ctypes.memset(p, 2, 4096)
        print(p, flush=True)
    elif cmd[0] == "prot":
        libc.mprotect(ro, 8192, 3)
        print("ok", flush=True)
    elif cmd[0] == "own":
        ctypes.memset(own + 4096, 7, 16)
        print("ok", flush=True)
"""
    proc = subprocess.Popen(
        ["python3", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "err", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    tracker = uffd.UffdTracker()
    try:
        assert proc.stdin is not None and proc.stdout is not None

        def ask(cmd: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(cmd.encode() + b"\n")
            proc.stdin.flush()
            return proc.stdout.readline().decode().strip()

        ro, own = (int(v) for v in proc.stdout.readline().split())
        tracker.start(proc.pid)
        first = tracker.collect()
        assert pages_of(first.dirty, own, own + 8192) == {own, own + 4096}
        assert not pages_of(first.dirty, ro, ro + 8192)  # not writable: not in the domain
        assert tracker.collect().pages < 64  # python's own heap may move a little
        new = int(ask("new"))
        d = tracker.collect()
        assert pages_of(d.dirty, new, new + 3 * 4096) == {new, new + 4096, new + 8192}
        assert ask("prot") == "ok"
        d = tracker.collect()
        assert pages_of(d.dirty, ro, ro + 8192) == {ro, ro + 4096}
        assert ask("own") == "ok"
        d = tracker.collect()
        assert pages_of(d.dirty, own, own + 8192) == {own + 4096}
        assert tracker.stats["hashed_ranges"] >= 1
    finally:
        tracker.stop()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def _criu(args: list[str], log_dir: Path) -> None:
    res = subprocess.run([CRIU, *args], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, (args, res.stderr[-2000:], _tail(log_dir))


def _tail(d: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in d.glob("*.log"))


@pytest.mark.parametrize("while_tracked", [False, True], ids=["untracked", "tracked"])
def test_criu_dump_and_restore(tmp_path: Path, while_tracked: bool) -> None:
    """A process that is tracked, or was tracked and untracked again, dumps and restores with
    CRIU with its memory intact, and the never-populated holes of a sparse mapping are not
    dumped (armed holes would look like swapped pages to CRIU)."""
    memcheck = tmp_path / "memcheck"
    script = r"""
import hashlib, mmap, os, signal, sys, time
sparse = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
dense = bytearray(os.urandom(3 << 20))
for i in range(0, 64 << 20, 1 << 20):
    sparse[i : i + 8] = i.to_bytes(8, "little")
def digest(full):
    h = hashlib.sha256(bytes(dense))
    for i in range(0, 64 << 20, 1 << 20):
        h.update(sparse[i : i + 4096])
    # Reading the whole sparse mapping would populate it (zero pages): only after restore.
    return h.hexdigest() + (" " + hashlib.sha256(sparse[:]).hexdigest() if full else "")
def report(sig, frame):
    with open(sys.argv[1], "a") as f:
        f.write(digest(sig != 0) + "\n")
signal.signal(signal.SIGUSR1, report)
report(0, None)
while True:
    time.sleep(0.05)
"""
    dump_dir = tmp_path / "dump"
    dump_dir.mkdir()
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(
            ["python3", "-c", script, str(memcheck)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    restored_pid = 0
    restorer: subprocess.Popen[bytes] | None = None
    tracker = uffd.UffdTracker()
    try:
        deadline = time.monotonic() + 10
        while not memcheck.exists() or not memcheck.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = memcheck.read_text().split()[0]
        expected_sparse = bytearray(64 << 20)
        for i in range(0, 64 << 20, 1 << 20):
            expected_sparse[i : i + 8] = i.to_bytes(8, "little")
        sparse_digest = hashlib.sha256(expected_sparse).hexdigest()
        tracker.start(proc.pid)
        for _ in range(3):
            tracker.collect()
            time.sleep(0.05)
        # Holes stay unarmed: no uffd-wp markers (which scan as SWAPPED) in the sparse mapping.
        sparse = next(m for m in read_maps(proc.pid) if m.size == 64 << 20)
        with PagemapFile(proc.pid) as pm:
            regions = pm.scan(
                sparse.start,
                sparse.end,
                category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            )
        assert sum(e - s for s, e, c in regions if c & PAGE_IS_SWAPPED) == 0
        assert sum(e - s for s, e, _ in regions) == 64 * PAGE_SIZE
        if not while_tracked:
            tracker.stop()
        _criu(
            ["dump", "-t", str(proc.pid), "-D", str(dump_dir), "-o", "dump.log", "-j", "-v4"],
            dump_dir,
        )
        proc.wait(10)
        tracker.stop()  # the process is gone: must not raise
        # Not detached: CRIU stays the parent of the restored process and reaps it.
        with open(tmp_path / "restore.out", "wb") as out:
            restorer = subprocess.Popen(
                [
                    CRIU, "restore", "-D", str(dump_dir), "-o", "restore.log", "-j", "-v4",
                    "--pidfile", str(tmp_path / "pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text().strip():
            assert restorer.poll() is None, _tail(dump_dir)
            assert time.monotonic() < deadline, "restore did not finish"
            time.sleep(0.05)
        restored_pid = int((tmp_path / "pid").read_text())
        os.kill(restored_pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while len(memcheck.read_text().split()) < 3:
            assert time.monotonic() < deadline, "restored process did not answer"
            time.sleep(0.02)
        assert memcheck.read_text().split()[1:] == [before, sparse_digest]
        pages = sum(p.stat().st_size for p in dump_dir.glob("pages-*.img"))
        assert pages < 40 << 20, f"dump has {pages} bytes of pages: holes were dumped"
    finally:
        tracker.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored_pid:
            try:
                os.kill(restored_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if restorer is not None and restorer.poll() is None:
            try:
                restorer.wait(10)
            except subprocess.TimeoutExpired:
                restorer.kill()
                restorer.wait()
        shutil.rmtree(dump_dir, ignore_errors=True)
