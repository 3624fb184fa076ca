"""The fresh pid namespace init (phaul.engine.nsinit) and the namespace helpers (nsutil)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul.engine import nsutil
from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.engine.criu_swrk import Swrk

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def criu() -> CriuBinary:
    return find_criu()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_layout_of_a_fresh_pid_namespace(criu: CriuBinary) -> None:
    with Swrk.spawn(criu, fresh_pidns=True) as swrk:
        init = swrk.init_pid
        assert init is not None
        holder = swrk.pid
        assert _ppid(holder) == os.getpid()
        assert _ppid(init) == holder
        assert nsutil.nspid(init) == [init, 1]
        assert nsutil.ns_id(init, "pid") != nsutil.ns_id(os.getpid(), "pid")
        assert nsutil.ns_id(init, "mnt") != nsutil.ns_id(os.getpid(), "mnt")
        kids = nsutil.children(init)
        assert len(kids) == 1  # criu swrk, waiting for its request
        criu_inner = nsutil.nspid(kids[0])[-1]
        assert "criu" in Path(f"/proc/{kids[0]}/cmdline").read_text()
        # The namespace has its own /proc showing only its own processes...
        inner_proc = sorted(
            int(p.name) for p in Path(f"/proc/{init}/root/proc").iterdir() if p.name.isdigit()
        )
        assert inner_proc == [1, criu_inner]
        # ...and ours is untouched (the mount did not propagate back: / was made a slave).
        assert Path("/proc/self").resolve().name == str(os.getpid())
        assert nsutil.pidns_init_of(kids[0]) == init
    assert _wait_gone(init)
    assert swrk._proc.returncode is not None  # the holder was reaped


def test_namespace_ends_when_the_client_goes_away(criu: CriuBinary) -> None:
    swrk = Swrk.spawn(criu, fresh_pidns=True)
    try:
        init = swrk.init_pid
        assert init is not None
        assert swrk._ctl is not None
        swrk._ctl.close()  # as if the client died before any restore
        assert _wait_gone(init), "init must exit when its control socket closes"
        assert swrk._proc.wait(timeout=5) == 1
    finally:
        swrk.close()


@contextlib.contextmanager
def _pidns_shell() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`unshare --pid --fork sh` whose sh (pid 1 inside) runs a sleep child."""
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "sh", "-c", "sleep 60 & wait"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            kids = nsutil.children(proc.pid)
            if kids and nsutil.children(kids[0]):
                break
            assert time.monotonic() < deadline, "pid namespace shell did not start"
            time.sleep(0.01)
        yield proc, kids[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_pidns_init_of(tmp_path: Path) -> None:
    assert nsutil.pidns_init_of(os.getpid()) is None
    with _pidns_shell() as (_, sh):
        sleep = nsutil.children(sh)[0]
        assert nsutil.pidns_init_of(sleep) == sh
        assert nsutil.pidns_init_of(sh) == sh
        assert nsutil.host_pid_in(sh, nsutil.nspid(sleep)[-1]) == sleep
        assert nsutil.host_pid_in(sh, 1) == sh
        assert nsutil.host_pid_in(sh, 4000000) is None
        # A process that entered with setns has its parent outside the namespace.
        entered = subprocess.Popen(
            ["nsenter", f"--pid=/proc/{sh}/ns/pid", "sleep", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 5
            while not nsutil.children(entered.pid):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            inside = nsutil.children(entered.pid)[0]
            assert len(nsutil.nspid(inside)) == 2
            assert nsutil.pidns_init_of(inside) == sh
        finally:
            entered.kill()
            entered.wait()


def test_setns_moves_only_the_calling_thread() -> None:
    name = f"phaul-nsutil-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = f"/run/netns/{name}"
        want = Path(path).stat().st_ino
        seen: list[int] = []

        def worker() -> None:
            nsutil.setns(path, nsutil.CLONE_NEWNET)
            seen.append(Path("/proc/thread-self/ns/net").stat().st_ino)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == [want]
        assert Path("/proc/thread-self/ns/net").stat().st_ino != want
        with pytest.raises(OSError) as exc:
            nsutil.setns(path, nsutil.CLONE_NEWPID)  # wrong kind
        assert exc.value.errno == errno.EINVAL
        fd = os.open(path, os.O_RDONLY)
        try:
            result: list[int] = []

            def by_fd() -> None:
                nsutil.setns(fd, 0)
                result.append(Path("/proc/thread-self/ns/net").stat().st_ino)

            t = threading.Thread(target=by_fd)
            t.start()
            t.join()
            assert result == [want]
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
    with pytest.raises(FileNotFoundError):
        nsutil.setns("/run/netns/does-not-exist-phaul", nsutil.CLONE_NEWNET)
