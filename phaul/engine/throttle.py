"""CPU throttling of a process tree, for workloads that dirty memory faster than the link.

As QEMU's auto-converge does for VMs, the tree's CPU bandwidth is cut in steps so that it
writes less per pre-copy pass. The tree is moved into a child cgroup of the cgroup its root is
in (``phaul-throttle-<id>``) whose CFS quota we set: cgroup v1 ``cpu.cfs_quota_us`` or cgroup v2
``cpu.max``, whichever hierarchy has the cpu controller (this machine mounts v1 controllers plus
an empty v2 hierarchy, so both are probed). :meth:`CpuThrottle.release` lifts the quota first
and only then moves the tasks back and removes the cgroup: it runs before the final dump, so
CRIU records the tree's original cgroups, never ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from phaul.errors import PhaulError

log = logging.getLogger(__name__)

PERIOD_US = 100_000
MIN_QUOTA_US = 1_000


class ThrottleUnavailable(PhaulError):
    code = "throttle"


def _cgroup_lines(pid: int) -> list[tuple[str, list[str], str]]:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as err:
        raise ThrottleUnavailable(f"cannot read the cgroups of PID {pid}: {err}") from err
    out = []
    for line in text.splitlines():
        num, ctrls, path = line.split(":", 2)
        out.append((num, ctrls.split(",") if ctrls else [], path))
    return out


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1], parts[2], parts[3].split(",")))
    return out


def find_cpu_cgroup(pid: int) -> tuple[str, Path]:
    """("v1"|"v2", directory of ``pid``'s cpu cgroup). Raises ThrottleUnavailable."""
    lines = _cgroup_lines(pid)
    for mnt, fstype, opts in _mounts():
        if fstype == "cgroup" and "cpu" in opts:
            for _num, ctrls, path in lines:
                if "cpu" in ctrls:
                    return "v1", Path(mnt + path)
    for mnt, fstype, _opts in _mounts():
        if fstype != "cgroup2":
            continue
        for num, _ctrls, path in lines:
            if num == "0":
                d = Path(mnt + path)
                with contextlib.suppress(OSError):
                    if "cpu" in (d / "cgroup.controllers").read_text().split():
                        return "v2", d
    raise ThrottleUnavailable("no cgroup hierarchy with the cpu controller is mounted")


class CpuThrottle:
    """Caps the CPU bandwidth of the processes ``pids`` (and what they fork meanwhile)."""

    def __init__(self, pids: list[int]) -> None:
        if not pids:
            raise ThrottleUnavailable("nothing to throttle")
        self.kind, self.origin = find_cpu_cgroup(pids[0])
        self.group = self.origin / f"phaul-throttle-{secrets.token_hex(3)}"
        self.pids = list(pids)
        self.fraction = 0.0
        self.active = False

    def set(self, fraction: float) -> None:
        """Throttle to ``1 - fraction`` of one CPU (fraction 0.2 = 20 % cut). Idempotent."""
        fraction = min(max(fraction, 0.0), 0.99)
        quota = max(int(PERIOD_US * (1.0 - fraction)), MIN_QUOTA_US)
        try:
            if not self.active:
                self.group.mkdir()
                self.active = True
                self._write_quota(quota)
                for pid in self.pids:
                    with contextlib.suppress(ProcessLookupError):
                        self._move(self.group, pid)
            else:
                self._write_quota(quota)
        except OSError as err:
            self.release()
            raise ThrottleUnavailable(f"cannot throttle via {self.group}: {err}") from err
        self.fraction = fraction
        log.info("CPU throttle %.0f %% (%s %s)", fraction * 100, self.kind, self.group)

    def _write_quota(self, quota: int | None) -> None:
        if self.kind == "v1":
            if quota is not None:
                (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.group / "cpu.cfs_quota_us").write_text(str(quota if quota else -1))
        else:
            (self.group / "cpu.max").write_text(f"{quota if quota else 'max'} {PERIOD_US}")

    def _move(self, group: Path, pid: int) -> None:
        try:
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as err:
            if err.errno == 3:  # ESRCH: gone meanwhile
                raise ProcessLookupError(pid) from err
            raise

    def release(self) -> None:
        """Lift the cap, move every task back to its original cgroup, remove ours."""
        if not self.active:
            return
        # The quota goes first: a task moved out of a throttled group while it is throttled
        # can stay throttled until its next period.
        with contextlib.suppress(OSError):
            self._write_quota(None)
        with contextlib.suppress(OSError):
            for line in (self.group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError, ProcessLookupError):
                    self._move(self.origin, int(line))
        try:
            self.group.rmdir()
        except OSError as err:
            log.warning("could not remove %s: %s", self.group, err)
        self.active = False
        self.fraction = 0.0
        log.info("CPU throttle released")


def throttle_supported(pid: int | None = None) -> bool:
    try:
        find_cpu_cgroup(pid or os.getpid())
    except ThrottleUnavailable:
        return False
    return True
