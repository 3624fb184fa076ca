"""``phaul run`` starts a migratable workload: own pid namespace, tini, setsid, files for stdio."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import CRIU
from tests.integration.lab import Lab, pids_in_netns
from tests.workloads.counter import last

pytestmark = pytest.mark.integration
PHAUL = [sys.executable, "-m", "phaul.cli"]
WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"


def _phaul_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PHAUL, "run", *args], capture_output=True, text=True, timeout=30, check=False
    )


def _status(pid: int, key: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split()[1:]
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_run_in_netns(lab: Lab, tmp_path: Path) -> None:
    a = lab.host("a")
    out, pidfile, log = tmp_path / "counter", tmp_path / "pid", tmp_path / "log"
    t0 = time.monotonic()
    res = _phaul_run(
        "--netns", a.netns_path, "--pidfile", str(pidfile), "--stdout", str(log), "--",
        "sh", "-c", f'echo started; exec python3 {WORKLOADS / "counter.py"} {out}',
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 10
    pid = int(res.stdout.strip())
    assert int(pidfile.read_text()) == pid
    # tini, pid 1 of its own pid namespace, session leader, in host a's network namespace.
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"tini")
    assert _status(pid, "NSpid")[-1] == "1" and len(_status(pid, "NSpid")) == 2
    assert os.getsid(pid) == pid
    assert pid in pids_in_netns(a.netns_path)
    child = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    assert os.readlink(f"/proc/{child}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{child}/fd/1") == str(log)
    # It keeps running after `phaul run` returned.
    deadline = time.monotonic() + 5
    while (first := last(str(out))) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    later = last(str(out))
    assert later is not None and later[0] > first[0] and later[1] == 2
    assert log.read_text().startswith("started")
    # And CRIU can dump it.
    img = tmp_path / "img"
    img.mkdir()
    a.run([CRIU, "dump", "-t", str(pid), "-D", str(img), "-o", "d.log", "--leave-running"])
    assert (img / "pstree.img").exists()


def test_run_in_current_netns(tmp_path: Path) -> None:
    res = _phaul_run("--", "sleep", "300")
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout)
    try:
        assert _status(pid, "NSpid")[-1] == "1"
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        os.kill(pid, signal.SIGKILL)  # pid 1 of the namespace: takes sleep with it


def test_run_errors(tmp_path: Path) -> None:
    res = _phaul_run("--stdout", str(tmp_path / "log"), "--", "/nonexistent/cmd")
    assert res.returncode != 0
    assert "exited at once" in res.stderr
    res = _phaul_run("--netns", "/run/netns/phl-no-such-ns", "--", "true")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _phaul_run()
    assert res.returncode == 2 and "no command" in res.stderr
