"""Namespaces from Python: setns/unshare/mount through ctypes, and pid-namespace lookups in /proc.

Python 3.11 has no ``os.setns``/``os.unshare``; these wrappers call libc directly (checked
returns, ``OSError`` from errno). The /proc helpers read ``NSpid`` from ``/proc/PID/status``:
its first entry is the PID as seen from our pid namespace, the last one the PID inside the
process's own pid namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from phaul.errors import ProcessGone

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.mount.restype = ctypes.c_int


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(target: str | os.PathLike[str] | int, nstype: int = 0) -> None:
    """Move the calling thread into the namespace ``target`` (a path such as /run/netns/x or
    /proc/PID/ns/time, or an open fd). ``nstype`` 0 accepts any kind. Raises OSError.

    Joining a pid or time namespace needs a single-threaded caller (EINVAL/EUSERS otherwise);
    a pid namespace only applies to children forked afterwards.
    """
    if isinstance(target, int):
        _check(_libc.setns(target, nstype), f"setns(fd {target})")
        return
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns({os.fspath(target)})")
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    """unshare(2); raises OSError."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2); raises OSError."""
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount({source!r}, {target!r}, {fstype!r})",
    )


def ns_id(pid: int | str, kind: str) -> int:
    """Inode number of ``/proc/PID/ns/KIND`` (identifies the namespace). Raises ProcessGone."""
    try:
        return Path(f"/proc/{pid}/ns/{kind}").stat().st_ino
    except FileNotFoundError as err:
        raise ProcessGone(f"process {pid} does not exist") from err


def nspid(pid: int, proc: str = "/proc") -> list[int]:
    """The ``NSpid`` line of ``PROC/PID/status``: [pid as we see it, ..., pid in its own ns].

    Raises ProcessGone when there is no such process.
    """
    try:
        text = Path(f"{proc}/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise ProcessGone(f"process {pid} does not exist") from err
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [pid]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError as err:
        raise ProcessGone(f"process {pid} does not exist") from err
    # comm may contain spaces and parentheses: the fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    """Direct children of PID (all its threads), as PIDs of our pid namespace."""
    out: list[int] = []
    try:
        tasks = [t.name for t in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            out.extend(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except FileNotFoundError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """All descendants of PID, parents before their children (PID itself not included)."""
    out: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children(p))
    return out


def pidns_init_of(pid: int) -> int | None:
    """PID (in our namespace) of the init of PID's pid namespace; None when PID lives in our own
    pid namespace (normally the host's root one). Raises ProcessGone.
    """
    chain = nspid(pid)
    if len(chain) < 2:
        return None
    target_ns = ns_id(pid, "pid")
    # The init is normally an ancestor: walk up while we stay in the same pid namespace.
    cur = pid
    while cur > 1:
        ids = nspid(cur)
        if ids[-1] == 1:
            return cur
        parent = _ppid(cur)
        if parent <= 0:
            break
        try:
            if ns_id(parent, "pid") != target_ns:
                break
        except ProcessGone:
            break
        cur = parent
    # Entered with setns (parent outside): look for the process that is 1 in that namespace.
    for entry in (p.name for p in Path("/proc").iterdir()):
        if not entry.isdigit():
            continue
        try:
            if ns_id(entry, "pid") == target_ns and nspid(int(entry))[-1] == 1:
                return int(entry)
        except (ProcessGone, PermissionError):
            continue
    return None


def host_pid_in(init_pid: int, inner_pid: int) -> int | None:
    """Translate ``inner_pid`` of the pid namespace whose init is ``init_pid`` (a PID of ours)
    into a PID of our namespace; None when no such process exists.
    """
    if inner_pid == 1:
        return init_pid
    want_ns = ns_id(init_pid, "pid")
    depth = len(nspid(init_pid))
    todo = children(init_pid)
    while todo:
        cand = todo.pop(0)
        try:
            ids = nspid(cand)
            if len(ids) == depth and ids[-1] == inner_pid and ns_id(cand, "pid") == want_ns:
                return cand
        except ProcessGone:
            continue
        todo.extend(children(cand))
    return None
