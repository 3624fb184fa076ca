"""The lazy final dump on real CRIU: parent image from our own reads, lazy dump over swrk,
rewrite_final at post-dump, plain restore from the chain, commit or rollback.

Workload: memwriter (lockstep) under tini as pid 1 of its own pid namespace, so the target
restore can run while the source is still frozen (reference/lazy-final-dump.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from phaul.engine import nsutil
from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.engine.criu_swrk import DumpOptions, NotifyRefused, RestoreOptions, Swrk
from phaul.engine.lazy_dump import (
    FdBudgetExceeded,
    LazyDumpResult,
    check_fd_budget,
    criu_log_times,
    free_port,
    lazy_dump_options,
    run_lazy_final_dump,
    spawn_lazy_swrk,
    wait_status_byte,
)
from phaul.engine.maps import Range, intersect_ranges, subtract_ranges
from phaul.engine.proctree import ProcessRef, read_stat, tree
from phaul.engine.vmread import VmReader
from phaul.page_server.final_rewrite import RewriteStats, rewrite_final
from tests.integration.flat_parent import build_flat_parent
from tests.workloads.memwriter import PAGE, Memwriter, build

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

MIB = 64
DIRTY = [13 + i * 97 for i in range(160)]  # pages rewritten after the parent copy
RESTORE_TIMEOUT = 30.0  # a malformed chain makes CRIU 4.2.1 loop forever


@pytest.fixture(scope="module")
def criu() -> CriuBinary:
    return find_criu()


@dataclass
class Workload:
    unshare: subprocess.Popen[bytes]
    mw: Memwriter
    tini: int  # host PIDs
    writer: int
    refs: list[ProcessRef] = field(default_factory=list)

    def vpid_map(self) -> dict[int, int]:
        """vpid (pid inside the workload's pid namespace) -> host pid."""
        return {nsutil.nspid(p)[-1]: p for p in (self.tini, self.writer)}


def _wait_for(cond: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def _workload(tmp_path: Path) -> Iterator[Workload]:
    wd = tmp_path / "w"
    wd.mkdir()
    exe = build(tmp_path)
    fifo = wd / "cmd"
    os.mkfifo(fifo)
    os.mkfifo(str(fifo) + ".ack")
    mw_argv = [str(exe), "-m", str(MIB), "-r", str(wd / "result"), "-i", str(wd / "info")]
    mw_argv += ["-L", str(fifo)]
    # unshare keeps its own stderr: it writes to it when the source is killed, and CRIU checks
    # the size of the files the tree has open.
    shell = f'exec setsid tini -s -- "$@" </dev/null >>{wd}/out 2>>{wd}/err'
    with open(wd / "unshare.out", "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "sh", "-c", shell, "sh", *mw_argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tini = 0
    try:
        _wait_for(lambda: nsutil.children(proc.pid), what="tini")
        tini = nsutil.children(proc.pid)[0]
        _wait_for(lambda: nsutil.children(tini), what="memwriter")
        writer = nsutil.children(tini)[0]
        mw = Memwriter(proc, wd, lockstep=True)
        mw.pid = writer
        w = Workload(proc, mw, tini, writer)
        w.refs = tree(tini)
        yield w
    finally:
        if tini:
            with contextlib.suppress(ProcessLookupError):
                os.kill(tini, signal.SIGKILL)  # ends the pid namespace
        proc.kill()
        proc.wait()
        if "mw" in locals():
            mw.stop()


def _build_parent(w: Workload, pre: Path) -> dict[int, list[Range]]:
    """The pre-copy stand-in for this workload (tests/integration/flat_parent.py)."""
    return build_flat_parent(w.vpid_map(), pre)


@dataclass
class Run:
    rewrite: RewriteStats | None = None
    restored_root: int = 0  # our child
    restored_check: str = ""
    t_rewrite: float = 0.0
    t_restore: float = 0.0


def _dirty_ranges(mw: Memwriter, pages: list[int]) -> list[Range]:
    return [(mw.addr + i * PAGE, mw.addr + (i + 1) * PAGE) for i in pages]


def _final_dump(
    criu: CriuBinary,
    w: Workload,
    tmp_path: Path,
    *,
    covered: dict[int, list[Range]],
    dirty_known: list[int],
    commit: bool,
) -> tuple[Run, object]:
    """Lazy dump of the workload; at post-dump rewrite + restore + check, answer ``commit``."""
    final, pre = tmp_path / "final", tmp_path / "pre"
    final.mkdir()
    vpids = w.vpid_map()
    arena = [(w.mw.addr, w.mw.addr + w.mw.size)]
    # Clean: in the parent, inside the tracked arena, not written since. Everything else the
    # tasks have (heap, stacks, tini...) counts as dirty: the test tracks only the arena.
    clean = {vpid: [] for vpid in vpids}
    wv = nsutil.nspid(w.writer)[-1]
    clean[wv] = subtract_ranges(
        intersect_ranges(covered[wv], arena), _dirty_ranges(w.mw, dirty_known)
    )
    run = Run()
    readers = {vpid: VmReader(pid, 16 << 20) for vpid, pid in vpids.items()}

    def decide() -> bool:
        t0 = time.monotonic()
        run.rewrite = rewrite_final(
            final,
            clean=clean,
            read_pages=lambda vpid, rr: readers[vpid].read(rr),
            parent_link=os.path.relpath(pre, final),
        )
        run.t_rewrite = time.monotonic() - t0
        t1 = time.monotonic()
        with Swrk.spawn(criu) as rs:
            res = rs.restore(
                RestoreOptions(images_dir=final, tcp_established=False), timeout=RESTORE_TIMEOUT
            )
        run.t_restore = time.monotonic() - t1
        run.restored_root = res.child_pid
        run.restored_check = w.mw.command("v")  # only the restored copy runs: the source is frozen
        if not commit:
            os.kill(res.child_pid, signal.SIGKILL)  # pid 1 of its namespace: takes all with it
            os.waitpid(res.child_pid, 0)
            run.restored_root = 0
        return commit

    port = free_port()
    base = DumpOptions(
        pid=w.tini, images_dir=final, tcp_established=False, network_lock="skip", log_level=4
    )
    r, wfd = os.pipe()
    try:
        with spawn_lazy_swrk(criu) as sw:
            opts = lazy_dump_options(base, port=port, status_fd=wfd)
            try:
                outcome: object = run_lazy_final_dump(
                    sw, opts, address="127.0.0.1", decide=decide, tree=w.refs, timeout=60
                )
            except NotifyRefused as err:
                outcome = err
        os.close(wfd)
        wfd = -1
        assert wait_status_byte(r, 5), "CRIU did not write the status byte"
    finally:
        os.close(r)
        if wfd >= 0:
            os.close(wfd)
    return run, outcome


@contextlib.contextmanager
def _reaped(run: Run) -> Iterator[None]:
    try:
        yield
    finally:
        if run.restored_root:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.restored_root, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(run.restored_root, 0)


def _report(label: str, run: Run, outcome: object, final: Path) -> None:
    assert run.rewrite is not None
    rw = run.rewrite
    lt = {k: round(v * 1000, 1) for k, v in criu_log_times(final / "dump.log").items()}
    print(
        f"\n[{label}] lazy pages {rw.lazy_pages}, to parent {rw.parent_pages}, re-read "
        f"{rw.read_pages} ({rw.bytes_read / 1e6:.2f} MB), kept {rw.kept_pages}; "
        f"rewrite {run.t_rewrite * 1000:.1f} ms, restore {run.t_restore * 1000:.0f} ms; "
        f"CRIU log (ms): {lt}"
    )
    if isinstance(outcome, LazyDumpResult):
        print(
            f"  since the request (ms): images complete {outcome.images_complete * 1000:.0f}, "
            f"decided {outcome.decided * 1000:.0f}, page server ready "
            f"{outcome.page_server_ready * 1000:.0f}, finished {outcome.finished * 1000:.0f}"
        )
    for p in rw.processes:
        print(f"  vpid {p.vpid}: {p.entries_in} entries -> {p.entries_out}, {p.read_pages} read")


def test_lazy_final_dump_commit(criu: CriuBinary, tmp_path: Path) -> None:
    with _workload(tmp_path) as w:
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        covered = _build_parent(w, tmp_path / "pre")
        # the known dirty set: written again after the parent copy (generation 2 vs 1)
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        check_fd_budget([w.tini, w.writer])
        run, outcome = _final_dump(
            criu, w, tmp_path, covered=covered, dirty_known=DIRTY, commit=True
        )
        with _reaped(run):
            _report("commit", run, outcome, tmp_path / "final")
            assert not isinstance(outcome, BaseException), outcome
            assert run.restored_check == f"ok pages={MIB * 256} bad=0"
            assert run.rewrite is not None
            # proportional to the dirty set: the arena came from the parent except DIRTY
            assert run.rewrite.parent_pages >= MIB * 256 - len(DIRTY)
            assert run.rewrite.read_pages < MIB * 256 // 10
            # committed: the source is gone, the restored copy runs and is exact
            _wait_for(lambda: not any(ref.alive() for ref in w.refs), 5, "the source to die")
            assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"
            assert nsutil.nspid(run.restored_root)[-1] == 1
            assert isinstance(outcome, LazyDumpResult) and outcome.committed
            assert outcome.log_times["frozen_total"] > outcome.log_times["frozen_until_images"]


def test_stale_page_is_caught_then_rollback_resumes_source(
    criu: CriuBinary, tmp_path: Path
) -> None:
    """Negative control + rollback: one dirty page left out of the dirty set restores stale
    (the restored copy reports exactly that page); answering False at post-dump resumes the
    source, which is intact."""
    with _workload(tmp_path) as w:
        covered = _build_parent(w, tmp_path / "pre")
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        forgotten = DIRTY[7]
        known = [p for p in DIRTY if p != forgotten]
        run, outcome = _final_dump(
            criu, w, tmp_path, covered=covered, dirty_known=known, commit=False
        )
        with _reaped(run):
            _report("rollback", run, outcome, tmp_path / "final")
            assert isinstance(outcome, NotifyRefused) and outcome.notify == "post-dump"
            assert run.restored_check == f"bad pages={MIB * 256} bad=1 first={forgotten}"
            # the source runs again, every page at its expected generation
            assert all(ref.alive() for ref in w.refs)
            _wait_for(lambda: read_stat(w.writer).state in "SR", 5, "the source to resume")
            assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"
            assert w.mw.command("w 1") == "ack 1"


def test_fd_budget_refused_before_freezing(tmp_path: Path) -> None:
    with _workload(tmp_path) as w:
        with pytest.raises(FdBudgetExceeded, match="cannot raise it without CAP_SYS_RESOURCE"):
            check_fd_budget([w.tini, w.writer], nofile=(300, 300))
        budget = check_fd_budget([w.tini, w.writer], nofile=(20000, 20000))
        assert budget.anon_bytes >= MIB << 20
        assert budget.fds_needed >= 2 * MIB
        assert read_stat(w.writer).state in "SR"  # never frozen
