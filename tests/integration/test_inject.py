"""ptrace syscall injection (phaul.engine.inject) on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul.engine import inject
from phaul.errors import ProcessGone

pytestmark = pytest.mark.integration

BLOCKER_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (strcmp(argv[1], "read") == 0) {
        char buf[64] = {0};
        ssize_t n = read(atoi(argv[2]), buf, sizeof buf - 1);
        printf("read %zd errno %d data %s\n", n, n < 0 ? errno : 0, buf);
    } else {
        struct timespec req = {1, 500000000};
        int rc = (int)syscall(SYS_nanosleep, &req, NULL);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double el = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("sleep %d errno %d elapsed %.3f\n", rc, rc ? errno : 0, el);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("blocker")
    (d / "blocker.c").write_text(BLOCKER_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "blocker"), str(d / "blocker.c")], check=True)
    return d / "blocker"


def _wait_syscall(pid: int, nr: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(f"/proc/{pid}/syscall").read_text().split()
        if text and text[0] == str(nr):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never blocked in syscall {nr}")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def _fds(pid: int) -> dict[str, str]:
    return {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}


def test_take_userfaultfd_leaves_fd_table_unchanged(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            ["sleep", "30"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    _wait_syscall(p.pid, 230)  # clock_nanosleep
    before = _fds(p.pid)
    for _ in range(10):
        fd = inject.take_userfaultfd(p.pid)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        finally:
            os.close(fd)
        assert _fds(p.pid) == before
    assert p.poll() is None
    status = Path(f"/proc/{p.pid}/status").read_text()
    assert "TracerPid:\t0" in status


def test_blocked_read_continues(
    procs: list[subprocess.Popen[bytes]], blocker: Path, tmp_path: Path
) -> None:
    r, w = os.pipe()
    try:
        with open(tmp_path / "out", "wb") as out:
            p = subprocess.Popen(
                [str(blocker), "read", str(r)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(r,),
                start_new_session=True,
            )
        procs.append(p)
        _wait_syscall(p.pid, 0)
        before = _fds(p.pid)
        fd = inject.take_userfaultfd(p.pid)
        os.close(fd)
        assert _fds(p.pid) == before
        time.sleep(0.1)
        assert p.poll() is None  # still blocked in read
        os.write(w, b"hello")
        assert p.wait(5) == 0
    finally:
        os.close(r)
        os.close(w)
    assert (tmp_path / "out").read_text().strip() == "read 5 errno 0 data hello"


def test_nanosleep_continues_with_full_duration(
    procs: list[subprocess.Popen[bytes]], blocker: Path, tmp_path: Path
) -> None:
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            [str(blocker), "sleep"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    _wait_syscall(p.pid, 35)  # nanosleep
    time.sleep(0.2)
    os.close(inject.take_userfaultfd(p.pid))
    # The restart fix-up turns the interrupted nanosleep into restart_syscall (219).
    _wait_syscall(p.pid, inject.SYS_RESTART_SYSCALL, timeout=1.0)
    assert p.wait(5) == 0
    words = (tmp_path / "out").read_text().split()
    assert words[:4] == ["sleep", "0", "errno", "0"], words
    assert 1.49 <= float(words[5]) < 1.8, words


def test_signals_arriving_during_injection_are_delivered(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    script = (
        "import signal, time, sys\n"
        "n = 0\n"
        "def h(s, f):\n"
        "    global n\n"
        "    n += 1\n"
        "signal.signal(signal.SIGUSR1, h)\n"
        "print('ready', flush=True)\n"
        "while n < 1:\n"
        "    time.sleep(0.01)\n"
        "print('got', n, flush=True)\n"
    )
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            ["python3", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    deadline = time.monotonic() + 5
    while b"ready" not in (tmp_path / "out").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def body(inj: inject.Injector) -> int:
        os.kill(p.pid, signal.SIGUSR1)  # arrives while the thread is stopped
        return inj.syscall(inject.SYS_GETPID)

    assert inject.run_injected(p.pid, body) == p.pid
    assert p.wait(5) == 0
    assert "got 1" in (tmp_path / "out").read_text()


def test_gone_process_raises_process_gone(procs: list[subprocess.Popen[bytes]]) -> None:
    p = subprocess.Popen(["true"], start_new_session=True)
    p.wait()
    with pytest.raises(ProcessGone):
        inject.take_userfaultfd(p.pid)


def test_run_frozen_stops_every_thread(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    script = (
        "import threading, time\n"
        "def spin():\n"
        "    while True:\n"
        "        time.sleep(0.001)\n"
        "for _ in range(3):\n"
        "    threading.Thread(target=spin, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            ["python3", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    deadline = time.monotonic() + 5
    while b"ready" not in (tmp_path / "out").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def states() -> dict[str, str]:
        out = {}
        for t in os.listdir(f"/proc/{p.pid}/task"):
            stat = Path(f"/proc/{p.pid}/task/{t}/stat").read_text()
            out[t] = stat.rsplit(")", 1)[1].split()[0]
        return out

    frozen = inject.run_frozen(p.pid, states)
    assert len(frozen) == 4
    assert set(frozen.values()) == {"t"}, frozen
    time.sleep(0.05)
    assert "t" not in states().values()
    assert "TracerPid:\t0" in Path(f"/proc/{p.pid}/status").read_text()
    assert p.poll() is None


def test_thread_in_epoll_wait_is_avoided(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The main thread sits in epoll_wait (PTRACE_INTERRUPT would make it return EINTR); the
    injection picks the other thread, and epoll_wait is not disturbed."""
    script = (
        "import select, threading, time, sys\n"
        "def other():\n"
        "    while True:\n"
        "        time.sleep(0.5)\n"
        "threading.Thread(target=other, daemon=True).start()\n"
        "ep = select.epoll()\n"
        "print('ready', flush=True)\n"
        "t = time.monotonic()\n"
        "ev = ep.poll(1.5)\n"
        "print('polled', ev, round(time.monotonic() - t, 1), flush=True)\n"
    )
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            ["python3", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    _wait_syscall(p.pid, 232)  # epoll_wait
    chosen = inject.choose_thread(p.pid)
    assert chosen != p.pid
    os.close(inject.take_userfaultfd(p.pid))
    assert p.wait(5) == 0
    # (Python would hide an EINTR by retrying, PEP 475: the thread choice above is the check;
    # this one only shows the process carried on normally.)
    assert (tmp_path / "out").read_text().split("\n")[1] == "polled [] 1.5"


def test_stopped_target_stays_stopped(procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen(
            ["sleep", "30"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    procs.append(p)
    _wait_syscall(p.pid, 230)

    def state() -> str:
        return Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    os.kill(p.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while state() != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.close(inject.take_userfaultfd(p.pid))
    deadline = time.monotonic() + 2
    while state() != "T":  # the group stop is re-instated shortly after detaching
        assert time.monotonic() < deadline, state()
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + 2
    while state() == "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert p.poll() is None
