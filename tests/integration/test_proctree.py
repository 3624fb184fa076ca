"""Process identity, trees, threads, pid namespaces and migratability checks on real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul.engine import proctree
from phaul.engine.proctree import ProcessRef
from phaul.errors import NotMigratable, ProcessGone

pytestmark = pytest.mark.integration

UNUSED_PID = 2**22 + 3  # above pid_max's maximum


def _wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def family(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """sh with two sleeping children, one of which has a child of its own."""
    script = "sleep 60 & sh -c 'sleep 60 & wait' & wait"
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script], stdout=out, stderr=out, start_new_session=True
        )
    try:
        _wait_for(lambda: len(proctree.tree(proc.pid)) == 4)
        yield proc
    finally:
        _kill_group(proc)


def test_tree_and_children(family: subprocess.Popen[bytes]) -> None:
    refs = proctree.tree(family.pid)
    assert refs[0].pid == family.pid
    pids = [r.pid for r in refs]
    assert len(set(pids)) == 4
    kids = proctree.children(family.pid)
    assert len(kids) == 2 and set(kids) <= set(pids)
    # Parents come before their children.
    for ref in refs[1:]:
        assert proctree.read_stat(ref.pid).ppid in pids[: pids.index(ref.pid)]
    assert all(r.alive() for r in refs)


def test_process_ref_identity(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ref = ProcessRef.of(proc.pid)
        assert ref.alive()
        ref.check()
        assert ref.start_time == proctree.read_stat(proc.pid).start_time > 0
        # Same PID, other start time: a recycled PID is not our process.
        assert not ProcessRef(proc.pid, ref.start_time + 1).alive()
        proc.kill()
        proc.wait()
        assert not ref.alive()
        with pytest.raises(ProcessGone, match=f"no process with PID {proc.pid}"):
            ref.check()
        with pytest.raises(ProcessGone, match=f"no process with PID {proc.pid}"):
            ProcessRef.of(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    try:
        ref = ProcessRef.of(proc.pid)
        _wait_for(lambda: proctree.read_stat(proc.pid).state == "Z")
        assert not ref.alive()
    finally:
        proc.wait()


def test_threads() -> None:
    stop = threading.Event()
    ts = [threading.Thread(target=stop.wait) for _ in range(3)]
    for t in ts:
        t.start()
    try:
        tids = proctree.threads(os.getpid())
        assert os.getpid() in tids
        assert {t.native_id for t in ts} <= set(tids)
    finally:
        stop.set()
        for t in ts:
            t.join()
    with pytest.raises(ProcessGone):
        proctree.threads(UNUSED_PID)


def test_validate_migratable_accepts_a_normal_process() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert proctree.validate_migratable(proc.pid) == ProcessRef.of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _kernel_thread() -> int:
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) > 2:
            try:
                st = proctree.read_stat(int(name))
            except ProcessGone:
                continue
            if st.flags & proctree.PF_KTHREAD:
                return st.pid
    raise AssertionError("no kernel thread found")


def test_validate_migratable_refusals() -> None:
    with pytest.raises(NotMigratable, match="kernel thread"):
        proctree.validate_migratable(2)
    with pytest.raises(NotMigratable, match="kernel thread"):
        proctree.validate_migratable(_kernel_thread())
    with pytest.raises(NotMigratable, match="PID 1 is the host's init"):
        proctree.validate_migratable(1)
    with pytest.raises(NotMigratable, match="phaul itself"):
        proctree.validate_migratable(os.getpid())
    with pytest.raises(NotMigratable, match="ancestor of phaul"):
        proctree.validate_migratable(os.getppid())
    with pytest.raises(ProcessGone, match=f"no process with PID {UNUSED_PID}"):
        proctree.validate_migratable(UNUSED_PID)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert t.native_id is not None
        with pytest.raises(NotMigratable, match=f"thread of process {os.getpid()}"):
            proctree.validate_migratable(t.native_id)
    finally:
        stop.set()
        t.join()


def test_pid_namespace(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "sleep", "60"],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: bool(proctree.children(proc.pid)))
        (inner,) = proctree.children(proc.pid)
        _wait_for(lambda: proctree.read_stat(inner).comm == "sleep")
        assert proctree.nspid(inner) == [inner, 1]
        assert proctree.is_pidns_init(inner)
        assert not proctree.is_pidns_init(proc.pid)
        assert not proctree.is_pidns_init(1)
        assert proctree.pidns_of(inner) != proctree.pidns_of(os.getpid())
        assert proctree.pidns_of(proc.pid) == proctree.pidns_of(os.getpid())
        assert proctree.nspid(os.getpid()) == [os.getpid()]
    finally:
        _kill_group(proc)


def test_access_denied_is_translated(tmp_path: Path) -> None:
    # An unprivileged process reading another user's pagemap: EACCES/EPERM -> AccessDenied.
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from phaul.engine import pagemap; from phaul.errors import AccessDenied\n"
        "try:\n  pagemap.PagemapFile(1)\nexcept AccessDenied as e:\n  print('denied:', e)"
    )
    root = str(Path(proctree.__file__).resolve().parents[2])
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = subprocess.run(
        [*drop, sys.executable, "-S", "-c", code, root],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.startswith("denied: access to process 1 denied"), out.stderr
