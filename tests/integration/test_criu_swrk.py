"""The CRIU driver (phaul.engine.criu_swrk) on real CRIU with real counter processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from phaul.engine import nsutil
from phaul.engine.criu_locate import CriuBinary, check_criu, find_criu
from phaul.engine.criu_swrk import (
    DumpOptions,
    NotifyRefused,
    RestoreOptions,
    Swrk,
    read_stats,
)
from phaul.errors import CriuError
from phaul.pb import criu_rpc_pb2 as rpc
from tests.workloads.counter import last

pytestmark = pytest.mark.integration

COUNTER = Path(__file__).resolve().parents[1] / "workloads" / "counter.py"


@pytest.fixture(scope="module")
def criu() -> CriuBinary:
    return find_criu()


@dataclass
class Counter:
    proc: subprocess.Popen[bytes]  # our child: unshare (pid ns) or the counter itself (bare)
    root: int  # the tree's root: tini (pid 1 inside) or the bare counter
    out: Path

    def n(self) -> int:
        got = last(str(self.out))
        return got[0] if got else 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _stopped(pid: int) -> None:
    """CRIU detaches a leave_stopped tree with a SIGSTOP: the state becomes T a moment later."""
    _wait_for(lambda: _state(pid) == "T", timeout=2, what=f"{pid} to be stopped")


def _wait_for(cond: object, timeout: float = 5.0, what: str = "condition") -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _lines(out: Path) -> list[tuple[int, int]]:
    rows = []
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((int(parts[0]), int(parts[1])))
    return rows


@contextlib.contextmanager
def _counter(tmp_path: Path, *, pidns: bool) -> Iterator[Counter]:
    out = tmp_path / "count.txt"
    argv = [sys.executable, str(COUNTER), str(out)]
    if pidns:
        argv = ["unshare", "--pid", "--fork", "setsid", "tini", "-s", "--", *argv]
    with open(tmp_path / "workload.log", "wb") as logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
    try:
        if pidns:
            _wait_for(lambda: nsutil.children(proc.pid), what="tini")
            root = nsutil.children(proc.pid)[0]
        else:
            root = proc.pid
        c = Counter(proc, root, out)
        _wait_for(lambda: c.n() >= 3, what="the counter to count")
        yield c
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.root if "c" in locals() else proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _reaped(pid: int) -> Iterator[None]:
    """Kill and reap our child ``pid`` (a restored root or an nsinit holder) at the end."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_real_criu_is_found_and_works(criu: CriuBinary) -> None:
    ok, text = check_criu(criu)
    assert ok, text
    assert criu.version.startswith("4.")


def test_pidns_dump_leave_stopped_then_restore_keeps_counting(
    criu: CriuBinary, tmp_path: Path
) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=True) as c:
        dump_notifies: list[str] = []
        with Swrk.spawn(criu) as swrk:
            assert swrk.version.startswith("4.")
            dumped = swrk.dump(
                DumpOptions(pid=c.root, images_dir=images, leave_stopped=True),
                lambda name, _n: dump_notifies.append(name) or True,
                timeout=30,
            )
        assert "pre-dump" in dump_notifies
        assert dump_notifies[-1] == "post-dump"
        _stopped(c.root)
        frozen_at = c.n()
        time.sleep(0.1)
        assert c.n() == frozen_at, "the source must stay frozen"
        assert dumped.stats["frozen_time"] > 0
        assert dumped.stats == read_stats(images, "dump")
        assert dumped.log_path == images / "dump.log"

        restore_notifies: list[tuple[str, int]] = []

        def on_restore(name: str, notify: rpc.criu_notify) -> bool:
            restore_notifies.append((name, notify.pid))
            return True

        with Swrk.spawn(criu) as swrk:
            res = swrk.restore(RestoreOptions(images_dir=images), on_restore, timeout=30)
        with _reaped(res.child_pid):
            assert res.child_pid == res.pid  # rst_sibling: the root is our child
            assert res.pid != c.root
            assert res.init_pid is None
            assert ("post-restore", res.criu_pid_in_ns) in restore_notifies
            assert [n for n, _ in restore_notifies][-2:] == ["pre-resume", "post-resume"]
            assert res.stats["restore_time"] > 0
            assert nsutil.nspid(res.pid)[-1] == 1  # tini is pid 1 of a new pid namespace
            _wait_for(lambda: c.n() >= frozen_at + 5, what="the restored counter")
            assert _state(c.root) == "T", "source still frozen while the copy runs"
            # The copy went on from where it was frozen: no restart, no gap, same inner pid.
            rows = _lines(c.out)
            numbers = [n for n, _ in rows]
            assert numbers == list(range(1, len(numbers) + 1))
            assert len({pid for _, pid in rows}) == 1


def test_post_dump_refusal_rolls_back(criu: CriuBinary, tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=True) as c:
        seen: list[str] = []

        def refuse(name: str, _n: rpc.criu_notify) -> bool:
            seen.append(name)
            return name != "post-dump"

        with Swrk.spawn(criu) as swrk, pytest.raises(NotifyRefused) as exc:
            swrk.dump(DumpOptions(pid=c.root, images_dir=images), refuse, timeout=30)
        assert exc.value.notify == "post-dump"
        assert "resumed" in str(exc.value)
        assert seen[-1] == "post-dump"
        assert _state(c.root) in ("S", "R")
        before = c.n()
        _wait_for(lambda: c.n() >= before + 5, what="the source to keep counting")
        rows = _lines(c.out)
        assert [n for n, _ in rows] == list(range(1, len(rows) + 1))


def test_bare_process_restored_in_fresh_pidns_while_source_frozen(
    criu: CriuBinary, tmp_path: Path
) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=False) as c:
        assert nsutil.pidns_init_of(c.root) is None
        # spawned before the freeze: its start-up is off the critical path
        target = Swrk.spawn(criu, fresh_pidns=True)
        with target:
            assert target.init_pid is not None
            assert nsutil.nspid(target.init_pid)[-1] == 1
            with Swrk.spawn(criu) as swrk:
                swrk.dump(
                    DumpOptions(pid=c.root, images_dir=images, leave_stopped=True), timeout=30
                )
            _stopped(c.root)
            frozen_at = c.n()
            res = target.restore(RestoreOptions(images_dir=images), timeout=30)
        with _reaped(res.child_pid):
            assert res.init_pid == target.init_pid
            assert res.child_pid == target.pid
            assert res.criu_pid_in_ns == c.root  # same PID inside the new namespace
            assert nsutil.nspid(res.pid) == [res.pid, c.root]
            assert nsutil.pidns_init_of(res.pid) == res.init_pid
            # one time namespace for the whole pid namespace (init joined the root's)
            assert nsutil.ns_id(res.init_pid, "time") == nsutil.ns_id(res.pid, "time")
            _wait_for(lambda: c.n() >= frozen_at + 5, what="the restored counter")
            _stopped(c.root)
            rows = _lines(c.out)
            assert [n for n, _ in rows] == list(range(1, len(rows) + 1))
            # The namespace ends when the restored root exits; the holder reports it.
            os.kill(res.pid, signal.SIGTERM)
            _, status = os.waitpid(res.child_pid, 0)
            assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
            assert not Path(f"/proc/{res.init_pid}").exists()


def test_failed_restore_names_the_error_and_the_log(criu: CriuBinary, tmp_path: Path) -> None:
    images = tmp_path / "empty"
    images.mkdir()
    with Swrk.spawn(criu) as swrk, pytest.raises(CriuError) as exc:
        swrk.restore(RestoreOptions(images_dir=images), timeout=30)
    err = exc.value
    assert Path(err.log_path) == images / "restore.log"
    assert Path(err.log_path).exists()
    assert "Error (" in err.message
    assert "RLIMIT_NOFILE" not in err.message
    assert swrk._proc.returncode is not None  # criu reaped


def test_restore_timeout_kills_criu(criu: CriuBinary, tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=True) as c:
        with Swrk.spawn(criu) as swrk:
            swrk.dump(DumpOptions(pid=c.root, images_dir=images, leave_stopped=True), timeout=30)
        frozen_at = c.n()
        swrk = Swrk.spawn(criu)
        criu_pid = swrk.pid
        # 1 ms: with CRIU's kernel probes cached (criu_kdat) a small restore is done in ~20 ms.
        with swrk, pytest.raises(CriuError) as exc:
            swrk.restore(RestoreOptions(images_dir=images), timeout=0.001)
        assert exc.value.detail == "timeout"
        assert "timed out" in str(exc.value)
        assert not Path(f"/proc/{criu_pid}").exists(), "criu killed and reaped"
        time.sleep(0.2)
        assert c.n() == frozen_at, "no restored copy may run after a timeout"
        with contextlib.suppress(ChildProcessError):
            assert os.waitpid(-1, os.WNOHANG) == (0, 0)


def test_spawn_in_netns_keeps_criu_our_child(criu: CriuBinary) -> None:
    name = f"phaul-swrk-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Swrk.spawn(criu, netns=f"/run/netns/{name}") as swrk:
            pid = swrk.pid
            assert nsutil.ns_id(pid, "net") == Path(f"/run/netns/{name}").stat().st_ino
            assert nsutil.ns_id(pid, "net") != nsutil.ns_id(os.getpid(), "net")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert int(stat[1]) == os.getpid()
        assert not Path(f"/proc/{pid}").exists()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_second_request_is_refused(criu: CriuBinary, tmp_path: Path) -> None:
    with Swrk.spawn(criu) as swrk:
        with pytest.raises(CriuError):
            swrk.restore(RestoreOptions(images_dir=tmp_path), timeout=30)
        with pytest.raises(CriuError, match="one request"):
            swrk.restore(RestoreOptions(images_dir=tmp_path), timeout=30)


def test_pre_resume_refusal_kills_and_reaps_the_restored_tree(
    criu: CriuBinary, tmp_path: Path
) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=True) as c:
        with Swrk.spawn(criu) as swrk:
            swrk.dump(DumpOptions(pid=c.root, images_dir=images, leave_stopped=True), timeout=30)
        frozen_at = c.n()
        roots: list[int] = []

        def refuse(name: str, notify: rpc.criu_notify) -> bool:
            if name == "post-restore":
                roots.append(notify.pid)
            return name != "pre-resume"

        with Swrk.spawn(criu) as swrk, pytest.raises(NotifyRefused) as exc:
            swrk.restore(RestoreOptions(images_dir=images), refuse, timeout=30)
        assert exc.value.notify == "pre-resume"
        assert roots
        # CRIU killed the tree; the root was our child and must be reaped (no zombie left).
        assert not Path(f"/proc/{roots[0]}").exists()
        time.sleep(0.1)
        assert c.n() == frozen_at
        _stopped(c.root)


def test_fresh_pidns_restore_timeout_ends_the_namespace(criu: CriuBinary, tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    with _counter(tmp_path, pidns=False) as c:
        target = Swrk.spawn(criu, fresh_pidns=True)
        init = target.init_pid
        assert init is not None
        with Swrk.spawn(criu) as swrk:
            swrk.dump(DumpOptions(pid=c.root, images_dir=images, leave_stopped=True), timeout=30)
        frozen_at = c.n()
        with target, pytest.raises(CriuError) as exc:
            target.restore(RestoreOptions(images_dir=images), timeout=0.001)
        assert exc.value.detail == "timeout"
        assert not Path(f"/proc/{init}").exists(), "the namespace init was killed"
        assert target._proc.returncode is not None, "the holder was reaped"
        time.sleep(0.2)
        assert c.n() == frozen_at
        _stopped(c.root)
