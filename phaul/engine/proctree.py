"""Processes as phaul sees them: identity (PID + start time), trees, threads, pid namespaces.

This is the /proc boundary of the engine (psutil style): every read of /proc goes through
:func:`wrap_oserror`, which turns ``ENOENT``/``ESRCH`` into :class:`~phaul.errors.ProcessGone` and
``EACCES``/``EPERM`` into :class:`~phaul.errors.AccessDenied`, chained with ``raise ... from err``.

A process is never identified by its PID alone: :class:`ProcessRef` carries the start time (field
22 of ``/proc/PID/stat``, in clock ticks since boot), so a recycled PID is detected.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import AccessDenied, NotMigratable, ProcessGone

log = logging.getLogger(__name__)

PF_KTHREAD = 0x00200000
"""``task_struct.flags`` bit of kernel threads (``include/linux/sched.h``)."""

KTHREADD_PID = 2

_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def wrap_oserror(pid: int, what: str = "") -> Iterator[None]:
    """Translate OS errors raised in the block for process ``pid`` into phaul errors.

    ``ENOENT``/``ESRCH`` become :class:`ProcessGone`, ``EACCES``/``EPERM`` :class:`AccessDenied`;
    other ``OSError`` pass through unchanged. ``what`` names the operation for the message.
    """
    try:
        yield
    except ProcessLookupError as err:
        raise ProcessGone(f"no process with PID {pid}") from err
    except OSError as err:
        if err.errno in _GONE_ERRNOS:
            raise ProcessGone(f"no process with PID {pid}") from err
        if err.errno in _DENIED_ERRNOS:
            op = f" ({what})" if what else ""
            raise AccessDenied(
                f"access to process {pid} denied{op}: run phaul as root "
                f"(with CAP_SYS_PTRACE) in the process's pid namespace or above"
            ) from err
        raise


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the engine uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int


def parse_stat(text: str) -> ProcStat:
    """Parse the text of ``/proc/PID/stat`` (``comm`` may contain spaces and parentheses)."""
    head, _, tail = text.rpartition(")")
    pid_text, _, comm = head.partition(" (")
    fields = tail.split()
    # fields[0] is field 3 (state): field N is fields[N - 3].
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        flags=int(fields[6]),
        start_time=int(fields[19]),
    )


def read_stat(pid: int) -> ProcStat:
    """Read ``/proc/PID/stat``. Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "read stat"), open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        text = f.read()
    if not text:
        raise ProcessGone(f"no process with PID {pid}")
    return parse_stat(text)


def read_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict of raw (stripped) values. Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "read status"), open(f"/proc/{pid}/status", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


@dataclass(frozen=True)
class ProcessRef:
    """One process: PID plus start time, so that a recycled PID is never mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """The process that has ``pid`` now. Raises ProcessGone ("no process with PID N")."""
        if pid <= 0:
            raise ProcessGone(f"no process with PID {pid}")
        return cls(pid, read_stat(pid).start_time)

    def alive(self) -> bool:
        """True while this very process (same PID, same start time) exists and is not a zombie."""
        try:
            st = read_stat(self.pid)
        except ProcessGone:
            return False
        return st.start_time == self.start_time and st.state not in ("Z", "X")

    def check(self) -> None:
        """Raise ProcessGone unless :meth:`alive`."""
        if not self.alive():
            raise ProcessGone(f"no process with PID {self.pid} (it exited or its PID was reused)")

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"


def threads(pid: int) -> list[int]:
    """Thread IDs of process ``pid``, sorted. Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "list threads"):
        names = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    return sorted(int(n) for n in names if n.isdigit())


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children). Raises ProcessGone, AccessDenied."""
    out: list[int] = []
    for tid in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue  # that thread exited meanwhile
        except OSError:
            with wrap_oserror(pid, "read children"):
                raise
    return sorted(set(out))


def tree(root: int) -> list[ProcessRef]:
    """``root`` and all its descendants, parents before children (breadth first).

    Descendants that exit during the walk are left out. Raises ProcessGone if ``root`` is gone.
    """
    root_ref = ProcessRef.of(root)
    result = [root_ref]
    seen = {root}
    queue = [root]
    while queue:
        parent = queue.pop(0)
        try:
            kids = children(parent)
        except ProcessGone:
            if parent == root:
                raise
            continue
        for kid in kids:
            if kid in seen:
                continue
            try:
                ref = ProcessRef.of(kid)
            except ProcessGone:
                continue
            seen.add(kid)
            result.append(ref)
            queue.append(kid)
    return result


def ancestors(pid: int) -> list[int]:
    """PIDs of the parents of ``pid`` up to (and including) PID 1, nearest first."""
    out: list[int] = []
    cur = pid
    while cur > 1:
        try:
            cur = read_stat(cur).ppid
        except ProcessGone:
            break
        if cur <= 0:
            break
        out.append(cur)
    return out


def nspid(pid: int) -> list[int]:
    """The ``NSpid`` line of ``/proc/PID/status``: the PID in our namespace first, then in each
    nested pid namespace down to the process's own. Raises ProcessGone, AccessDenied."""
    value = read_status(pid).get("NSpid")
    if not value:
        return [pid]
    return [int(x) for x in value.split()]


def pidns_of(pid: int) -> int:
    """Inode number of the pid namespace of ``pid``. Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "stat pid namespace"):
        return Path(f"/proc/{pid}/ns/pid").stat().st_ino


def is_pidns_init(pid: int) -> bool:
    """True if ``pid`` is PID 1 of a pid namespace nested below ours (not our own init)."""
    ids = nspid(pid)
    return len(ids) > 1 and ids[-1] == 1


def validate_migratable(pid: int) -> ProcessRef:
    """Check that ``pid`` names a process phaul may migrate; return its reference.

    Raises ProcessGone for an unknown PID, NotMigratable for a kernel thread, a thread ID that is
    not a process, the init of our pid namespace, phaul itself or one of its ancestors.
    """
    ref = ProcessRef.of(pid)
    st = read_stat(pid)
    if st.flags & PF_KTHREAD or KTHREADD_PID in (pid, st.ppid):
        raise NotMigratable(
            f"PID {pid} ({st.comm}) is a kernel thread: only user-space processes can be migrated"
        )
    status = read_status(pid)
    tgid = int(status.get("Tgid", pid))
    if tgid != pid:
        raise NotMigratable(
            f"PID {pid} is a thread of process {tgid}: migrate the process (PID {tgid}) instead"
        )
    if pid == 1:
        raise NotMigratable(
            "PID 1 is the host's init and cannot be migrated: migrate a process tree below it, "
            "or start the workload with 'phaul run'"
        )
    me = os.getpid()
    if pid == me:
        raise NotMigratable(f"PID {pid} is phaul itself: give the PID of the workload to migrate")
    if pid in ancestors(me):
        raise NotMigratable(
            f"PID {pid} ({st.comm}) is an ancestor of phaul (it would migrate phaul too): "
            "run phaul outside the tree, e.g. from another shell or session"
        )
    return ref
