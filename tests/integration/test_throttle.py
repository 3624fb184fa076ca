"""CPU throttling (auto-converge) on this machine's real cgroups, released without leftovers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from phaul.engine.throttle import CpuThrottle, find_cpu_cgroup

pytestmark = pytest.mark.integration

BUSY = "import time\nwhile True:\n    pass\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def usage(pid: int, seconds: float = 1.0) -> float:
    a = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - a) / seconds


def test_throttle_caps_cpu_and_release_restores_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.3)
        kind, origin = find_cpu_cgroup(proc.pid)
        free = usage(proc.pid)
        assert free > 0.2, f"busy loop only got {free:.2f} CPU (machine too loaded?)"
        t = CpuThrottle([proc.pid])
        t.set(0.95)
        assert t.group.is_dir()
        time.sleep(0.3)
        capped = usage(proc.pid)
        assert capped < 0.1, f"throttled to 5 % but used {capped:.2f} CPU ({kind})"
        t.release()
        assert not t.group.exists()
        own = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert "phaul-throttle" not in own
        time.sleep(0.3)
        assert usage(proc.pid) > 0.15, "still throttled after release"
        assert origin.is_dir()
    finally:
        proc.kill()
        proc.wait()
