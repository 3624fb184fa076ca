"""``phaul run``: start a command as a workload that CRIU can migrate.

A tree is easiest to migrate when it owns a pid namespace (no PID clash on the target, so the
source can stay frozen until the target commits; reference/criu-on-this-kernel.md §4). So the
command runs as

    [nsenter --net=NETNS --] unshare --pid --fork setsid tini -s -- CMD ...

* ``unshare --pid --fork``: a new pid namespace; its forked child becomes pid 1 there.
* ``setsid``: that child is the session leader *inside* the namespace; CRIU refuses a tree
  whose session leader is outside its pid namespace (``--shell-job`` does not help).
* ``tini -s``: a real init as pid 1 (reaps orphans, forwards signals; ``-s`` registers it as
  subreaper too), so CMD's children are reaped promptly.
* ``nsenter --net=PATH`` (never ``ip netns exec``, which adds a private mount namespace per call
  and breaks CRIU dumps) when a network namespace is asked for.
* stdin is /dev/null and stdout/stderr go to a file (pipes to a terminal or to phaul would tie
  the tree to this process; CRIU restores files, not pipes to processes left behind).

The PID to migrate is tini's PID as seen from here (the child of ``unshare``). ``phaul run``
prints it, writes it to ``--pidfile`` and returns at once; the workload keeps running detached.
The mount namespace is shared with the host (a private one needs the extra steps of §4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import PhaulError, UsageError

START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Launched:
    """A started workload: ``pid`` is the root to migrate (tini), ``launcher`` the ``unshare``
    process (its parent, which the caller may reap with ``launcher.wait()``)."""

    pid: int
    launcher: subprocess.Popen[bytes]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise PhaulError(f"`{name}` is needed to start a migratable workload; install it")
    return path


def netns_path(netns: str) -> str:
    """``/run/netns/NAME`` for a bare name, the path itself otherwise. Raises UsageError."""
    path = netns if "/" in netns else f"/run/netns/{netns}"
    if not Path(path).exists():
        raise UsageError(f"network namespace {path} does not exist")
    return path


def launch_argv(cmd: Sequence[str], netns: str | None = None) -> list[str]:
    """The argument list that starts ``cmd`` as a migratable workload."""
    argv = [_tool("unshare"), "--pid", "--fork", _tool("setsid"), _tool("tini"), "-s", "--"]
    argv += list(cmd)
    if netns is not None:
        argv = [_tool("nsenter"), f"--net={netns_path(netns)}", "--", *argv]
    return argv


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _argv0(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return Path(raw.split(b"\0", 1)[0].decode(errors="replace")).name


def launch(
    cmd: Sequence[str],
    *,
    netns: str | None = None,
    stdout: str | os.PathLike[str] = os.devnull,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> Launched:
    """Start ``cmd`` as a migratable workload (see the module doc) and return its root PID.

    Returns once tini runs and has started ``cmd``. Raises UsageError for an empty command or
    a missing namespace, PhaulError when a tool is missing or the workload ends at once (the
    tail of its output is in the message).
    """
    if not cmd:
        raise UsageError("no command given: phaul run [options] -- CMD ...")
    argv = launch_argv(cmd, netns)
    with open(os.devnull, "rb") as devnull, open(stdout, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        if kids and _argv0(kids[0]) == "tini":
            grandkids = _children(kids[0])
            # tini forks, then the child execs cmd: wait for the exec so a bad command shows.
            if grandkids and _argv0(grandkids[0]) not in ("", "tini"):
                return Launched(pid=kids[0], launcher=proc)
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    rc = proc.poll()
    if rc is None:
        proc.kill()
        proc.wait()
        raise PhaulError(f"workload {cmd[0]!r} did not start within {timeout:.0f} s")
    raise PhaulError(
        f"workload {cmd[0]!r} exited at once (status {rc})" + _tail(stdout),
    )


def _tail(path: str | os.PathLike[str]) -> str:
    if os.fspath(path) == os.devnull:
        return ""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()[-3:]
    except OSError:
        return ""
    return (": " + " | ".join(text)) if text else ""


def cmd_run(args: argparse.Namespace) -> int:
    """``phaul run [--netns PATH] [--pidfile F] [--stdout F] -- CMD ...``: print the root PID."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    started = launch(cmd, netns=args.netns, stdout=args.stdout or os.devnull)
    if args.pidfile:
        tmp = Path(f"{args.pidfile}.tmp{os.getpid()}")
        tmp.write_text(f"{started.pid}\n")
        tmp.replace(args.pidfile)
    print(started.pid, flush=True)
    return 0
