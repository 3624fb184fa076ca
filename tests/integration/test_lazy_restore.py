"""Restore before the memory is in, on real CRIU: lazy final dump of a pid-namespace memwriter,
split restore dir R + daemon dir D built from our own flat parent, ``criu lazy-pages`` daemon,
``criu restore --lazy-pages`` while the source is frozen (reference/local-lazy-restore.md).

The helpers here (workload, parent, lazy dump, R) are also used by bench/lazy_restore.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from phaul.engine import nsutil
from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.engine.criu_swrk import DumpOptions, NotifyRefused, Swrk
from phaul.engine.lazy_restore import (
    DaemonOptions,
    LazyPagesDaemon,
    restore_lazily,
)
from phaul.engine.maps import Range, intersect_ranges, subtract_ranges
from phaul.engine.proctree import read_stat
from phaul.engine.vmread import VmReader
from phaul.page_server.criu_image import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    read_pagemap,
    write_pagemap,
)
from phaul.page_server.final_rewrite import PARENT_LINK, rewrite_final
from phaul.page_server.lazy_split import SplitStats, build_daemon_dir
from phaul.pb import criu_rpc_pb2 as rpc
from tests.integration.flat_parent import build_flat_parent
from tests.workloads.memwriter import PAGE, Memwriter, build

pytestmark = pytest.mark.integration

MIB = 64
DIRTY = [13 + i * 97 for i in range(160)]
CRIU_TIMEOUT = 60.0  # every CRIU call: restores of bad images loop forever in CRIU 4.2.1
RESTORE_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def criu() -> CriuBinary:
    return find_criu()


# --- workload -------------------------------------------------------------------------------


@dataclass
class Workload:
    unshare: subprocess.Popen[bytes]
    mw: Memwriter
    tini: int  # host PIDs
    writer: int

    def vpid_map(self) -> dict[int, int]:
        """vpid (pid inside the workload's pid namespace, from NSpid) -> host pid."""
        return {nsutil.nspid(p)[-1]: p for p in (self.tini, self.writer)}


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def workload(tmp_path: Path, mib: int = MIB, extra: tuple[str, ...] = ()) -> Iterator[Workload]:
    """``setsid unshare --pid --fork setsid tini -s -- memwriter -m MIB -L fifo ...`` with
    stdio to files; pid 1 of its own namespace, so the target restore does not clash with the
    frozen source. Killed (the whole namespace) on exit."""
    wd = tmp_path / "w"
    wd.mkdir()
    exe = build(tmp_path)
    fifo = wd / "cmd"
    os.mkfifo(fifo)
    os.mkfifo(str(fifo) + ".ack")
    argv = [str(exe), "-m", str(mib), "-r", str(wd / "result"), "-i", str(wd / "info")]
    argv += ["-b", str(wd / "beat"), "-L", str(fifo), *extra]
    # unshare has its own output file: it writes there when the source is killed, and CRIU
    # checks the size of the files the tree has open (lazy-final-dump.md §1).
    shell = f'exec setsid tini -s -- "$@" </dev/null >>{wd}/out 2>>{wd}/err'
    with open(wd / "unshare.out", "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "sh", "-c", shell, "sh", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tini = 0
    mw: Memwriter | None = None
    try:
        wait_for(lambda: nsutil.children(proc.pid), what="tini")
        tini = nsutil.children(proc.pid)[0]
        wait_for(lambda: nsutil.children(tini), what="memwriter")
        writer = nsutil.children(tini)[0]
        mw = Memwriter(proc, wd, lockstep=True)
        mw.pid = writer
        yield Workload(proc, mw, tini, writer)
    finally:
        if tini:
            with contextlib.suppress(ProcessLookupError):
                os.kill(tini, signal.SIGKILL)  # pid 1 of the namespace: all of it dies
        proc.kill()
        proc.wait()
        if mw is not None:
            mw.stop()


def build_parent(w: Workload, pre: Path) -> dict[int, list[Range]]:
    """The pre-copy stand-in for this workload (tests/integration/flat_parent.py)."""
    return build_flat_parent(w.vpid_map(), pre)


def clean_ranges(w: Workload, covered: dict[int, list[Range]], dirty: list[int]) -> dict:
    """Clean = in the parent, inside the arena, not in the known dirty set; everything else
    (tini, heap, stacks) counts as dirty: the test tracks only the arena."""
    wv = nsutil.nspid(w.writer)[-1]
    arena = [(w.mw.addr, w.mw.addr + w.mw.size)]
    clean: dict[int, list[Range]] = {vpid: [] for vpid in w.vpid_map()}
    dirty_r = [(w.mw.addr + i * PAGE, w.mw.addr + (i + 1) * PAGE) for i in dirty]
    clean[wv] = subtract_ranges(intersect_ranges(covered[wv], arena), dirty_r)
    return clean


def rewrite(final: Path, pre: Path, w: Workload, clean: dict, *, split: bool) -> None:
    """R from the lazy final dump. ``split=False``: the eager chain (clean -> PE_PARENT, dirty
    -> PE_PRESENT|PE_LAZY with data, ``parent`` link). ``split=True``: the same, then re-flagged
    for a lazy restore: clean -> PE_LAZY (no data), dirty -> PE_PRESENT, no parent link (the
    pages file is unchanged: the present runs are the same in the same order)."""
    readers = {vpid: VmReader(pid, 16 << 20) for vpid, pid in w.vpid_map().items()}
    rewrite_final(
        final,
        clean=clean,
        read_pages=lambda vpid, rr: readers[vpid].read(rr),
        parent_link=os.path.relpath(pre, final),
    )
    if not split:
        return
    flip = {PE_PARENT: PE_LAZY, PE_PRESENT | PE_LAZY: PE_PRESENT, PE_PRESENT: PE_PRESENT}
    for path in final.glob("pagemap-*.img"):
        pm = read_pagemap(path)
        entries = [PagemapEntry(e.vaddr, e.nr_pages, flip[e.flags]) for e in pm.entries]
        write_pagemap(path, pm.pages_id, entries)
    (final / PARENT_LINK).unlink()


# --- the lazy final dump --------------------------------------------------------------------


@dataclass
class DumpRun:
    t_request: float = 0.0  # time.time() when the DUMP request was sent
    outcome: object = None  # None (committed) or the exception
    marks: dict[str, float] = field(default_factory=dict)


def lazy_final_dump(
    criu: CriuBinary, w: Workload, final: Path, decide: Callable[[], bool], *, log_level: int = 4
) -> DumpRun:
    """``criu dump --lazy-pages --address 127.0.0.1 --port P --status-fd`` over swrk.
    ``decide()`` runs at post-dump (images complete, tree frozen) and its answer commits (True:
    the source is killed once the session ends) or rolls back. The session is ended at
    status-ready with connect + close."""
    final.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = DumpRun()
    rfd, wfd = os.pipe()

    def notify(name: str, _n: rpc.criu_notify) -> bool:
        if name == "post-dump":
            run.marks["post_dump"] = time.time()
            return decide()
        if name == "status-ready":
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # EOF = session over: CRIU applies the post-dump answer
        return True

    opts = DumpOptions(
        pid=w.tini,
        images_dir=final,
        tcp_established=False,
        network_lock="skip",
        log_level=log_level,
        lazy_pages=True,
        page_server_port=port,
        status_fd=wfd,
    )
    try:
        with Swrk.spawn(criu, criu_args=["--address", "127.0.0.1"]) as sw:
            run.t_request = time.time()
            try:
                sw.dump(opts, notify, timeout=CRIU_TIMEOUT)
            except Exception as err:  # returned to the test
                run.outcome = err
    finally:
        os.close(rfd)
        os.close(wfd)
    return run


@contextlib.contextmanager
def reaped(pids: list[int]) -> Iterator[None]:
    """Kill and reap restored roots (our children) left in ``pids``."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


# --- tests ----------------------------------------------------------------------------------


def test_lazy_restore_commit_every_page_exact(criu: CriuBinary, tmp_path: Path) -> None:
    with workload(tmp_path) as w:
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        pre = tmp_path / "pre"
        covered = build_parent(w, pre)
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        clean = clean_ranges(w, covered, DIRTY)
        final, ddir, work = tmp_path / "R", tmp_path / "D", tmp_path / "W"
        roots: list[int] = []
        got: dict[str, object] = {}

        def decide() -> bool:
            rewrite(final, pre, w, clean, split=True)
            got["split"] = build_daemon_dir(final, pre, ddir)
            daemon = LazyPagesDaemon.start(criu, DaemonOptions(ddir, work, log_level=4))
            with daemon:
                res = restore_lazily(criu, final, daemon, timeout=RESTORE_TIMEOUT)
                roots.append(res.child_pid)
                got["early"] = w.mw.command("v")  # while the daemon may still be filling
                # the safe commit rule: the source stays frozen until every page is in
                got["daemon"] = result = daemon.wait(timeout=60, stall_timeout=5)
                return result.complete

        with reaped(roots):
            run = lazy_final_dump(criu, w, final, decide)
            assert run.outcome is None, run.outcome
            split = got["split"]
            assert isinstance(split, SplitStats)
            # the arena minus the dirty pages is served by the daemon from the parent's file
            assert split.lazy_pages >= MIB * 256 - len(DIRTY) - 16
            res = got["daemon"]
            assert res.complete and res.returncode == 0, res  # type: ignore[attr-defined]
            log = (work / "lazy-pages.log").read_text(errors="replace")
            assert "UFFD transferred pages" in log
            assert got["early"] == f"ok pages={MIB * 256} bad=0"
            # committed: the source is gone, the restored copy is exact
            wait_for(lambda: not os.path.exists(f"/proc/{w.writer}"), 5, "the source to die")
            assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"
            assert w.mw.command("w 1 2 3") == "ack 3"
            assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"
            assert nsutil.nspid(roots[0])[-1] == 1
            assert (work / "restore.log").exists()  # the restore's log is in the work dir


def test_daemon_killed_before_completion_is_a_failure(criu: CriuBinary, tmp_path: Path) -> None:
    """The daemon is stopped before the restore hands it the uffds, so it cannot finish:
    wait() reports the stall, then the SIGKILL; the test kills the restored tree and rolls
    back, and the source resumes intact."""
    with workload(tmp_path) as w:
        pre = tmp_path / "pre"
        covered = build_parent(w, pre)
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        clean = clean_ranges(w, covered, DIRTY)
        final, ddir, work = tmp_path / "R", tmp_path / "D", tmp_path / "W"
        roots: list[int] = []
        got: dict[str, object] = {}

        def decide() -> bool:
            rewrite(final, pre, w, clean, split=True)
            build_daemon_dir(final, pre, ddir)
            with LazyPagesDaemon.start(criu, DaemonOptions(ddir, work)) as daemon:

                def stop_daemon(name: str, _n: rpc.criu_notify) -> bool:
                    if name == "setup-namespaces":
                        os.kill(daemon.pid, signal.SIGSTOP)
                    return True

                res = restore_lazily(
                    criu, final, daemon, timeout=RESTORE_TIMEOUT, on_notify=stop_daemon
                )
                roots.append(res.child_pid)
                got["stalled"] = daemon.wait(timeout=30, stall_timeout=1.0)
                os.kill(daemon.pid, signal.SIGKILL)
                got["killed"] = daemon.wait(timeout=10, stall_timeout=5)
            # the restored copy is not complete: kill it and roll back
            os.kill(res.child_pid, signal.SIGKILL)
            os.waitpid(res.child_pid, 0)
            roots.clear()
            return False

        with reaped(roots):
            run = lazy_final_dump(criu, w, final, decide)
            assert isinstance(run.outcome, NotifyRefused), run.outcome
            stalled, killed = got["stalled"], got["killed"]
            assert not stalled.complete and stalled.reason == "stalled"  # type: ignore[attr-defined]
            assert stalled.running  # type: ignore[attr-defined]
            assert not killed.complete and killed.reason == "signal 9"  # type: ignore[attr-defined]
            # rollback: the source runs again, every page at its expected generation
            wait_for(lambda: read_stat(w.writer).state in "SR", 5, "the source to resume")
            assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"


def test_mismatched_daemon_dir_is_refused_before_restore(criu: CriuBinary, tmp_path: Path) -> None:
    """A daemon dir that would serve an eagerly restored page (livelock) is refused by
    restore_lazily before CRIU runs; the source is rolled back."""
    from phaul.page_server.lazy_split import SplitMismatch

    with workload(tmp_path) as w:
        pre = tmp_path / "pre"
        covered = build_parent(w, pre)
        assert w.mw.command("w " + " ".join(map(str, DIRTY))) == f"ack {len(DIRTY)}"
        clean = clean_ranges(w, covered, DIRTY)
        final, ddir, work = tmp_path / "R", tmp_path / "D", tmp_path / "W"
        got: dict[str, object] = {}

        def decide() -> bool:
            rewrite(final, pre, w, clean, split=True)
            build_daemon_dir(final, pre, ddir)
            wv = nsutil.nspid(w.writer)[-1]
            pm = read_pagemap(ddir / f"pagemap-{wv}.img")
            victim = w.mw.addr + DIRTY[0] * PAGE
            entries = [
                PagemapEntry(e.vaddr, e.nr_pages, PE_PRESENT | PE_LAZY) if e.vaddr == victim else e
                for e in pm.entries
            ]
            write_pagemap(ddir / f"pagemap-{wv}.img", pm.pages_id, entries)
            with LazyPagesDaemon.start(criu, DaemonOptions(ddir, work)) as daemon:
                try:
                    restore_lazily(criu, final, daemon, timeout=RESTORE_TIMEOUT)
                except SplitMismatch as err:
                    got["err"] = err
            return False

        run = lazy_final_dump(criu, w, final, decide)
        assert isinstance(run.outcome, NotifyRefused)
        assert "livelock" in str(got["err"])
        assert not (work / "restore.log").exists()
        wait_for(lambda: read_stat(w.writer).state in "SR", 5, "the source to resume")
        assert w.mw.command("v") == f"ok pages={MIB * 256} bad=0"
