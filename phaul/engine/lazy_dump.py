"""The source side of the lazy final dump: CRIU dumps page maps only, the tree stays frozen.

Theory of operation (reference/lazy-final-dump.md, checked here over ``swrk`` with CRIU 4.2.1)
----------------------------------------------------------------------------------------------
A ``lazy_pages`` DUMP freezes the tree, writes every image, and for private anonymous memory
only ``PE_LAZY`` pagemap entries (no data): the pages stay pinned in page pipes. Over ``swrk``
the notifies then come in this order, all while the tree is frozen:

1. ``post-dump``: the images are complete (``final_rewrite.rewrite_final`` can run now, reading
   dirty pages from the frozen tasks). The answer IS the commit decision: True -> once the lazy
   session ends CRIU kills the tree (``Unfreezing tasks into 2``); False -> CRIU unlocks the
   network (the page-server rollback would skip that) and, once the session ends, resumes the
   tree intact. Restore on the target and check it inside this callback.
2. CRIU starts the lazy page server (``--address``/``ps.port``) and sends ``status-ready``; after
   our answer it writes one ``\\0`` byte to ``status_fd`` (if given; CRIU logs that status_fd is
   obsolete) and blocks in ``accept()``. The byte therefore means "page server listening", not
   "images complete" (that is ``post-dump``).
3. :func:`end_lazy_dump` (connect + close, no data): the page server reads EOF, "Session over",
   CRIU applies the decision of step 1 and answers the DUMP. Without a connection the tree stays
   frozen until CRIU is killed. This module connects from the ``status-ready`` callback itself
   (the socket is already listening then; the connection waits in the backlog), so no thread.

Never end a lazy dump by killing criu: ptrace detaches and the frozen source simply resumes,
after a target restore that is a split brain. If the DUMP fails after ``post-dump`` was answered
True (e.g. the page server cannot bind its port), the source resumes although the target runs:
:func:`run_lazy_final_dump` then kills the source tree itself and raises CommitUncertain.

Over RPC, CRIU 4.2 ignores ``ps.address`` for a lazy dump (cr-service.c sets only the port) and
would listen on INADDR_ANY, where any peer could read the frozen memory with ``PS_IOV_GET``:
:func:`spawn_lazy_swrk` passes ``--address`` as a global option instead.

File descriptors: the dump holds one pipe (2 fds) per ``fs.pipe-max-size`` (1 MiB here) of
anonymous memory until the session ends, and without CAP_SYS_RESOURCE CRIU cannot raise
RLIMIT_NOFILE (it inherits ours). :func:`check_fd_budget` refuses, before anything is frozen,
a tree that would exceed it (CRIU would fail with "Too many open files" and resume the tree).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import resource
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from phaul.engine.criu_locate import CriuBinary
from phaul.engine.criu_swrk import DumpOptions, DumpResult, NotifyCallback, Swrk
from phaul.engine.proctree import ProcessRef, read_status, wrap_oserror
from phaul.errors import CommitUncertain, CriuError, PhaulError, PreflightFailed, ProcessGone
from phaul.pb import criu_rpc_pb2 as rpc

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PAGE_SIZE = 4096
FDS_PER_PIPE = 2
CRIU_PIPE_MAX_PAGES = 819  # CRIU's PIPE_MAX_SIZE (criu/include/page-pipe.h)
CRIU_FD_RESERVE = 256  # images, service fds, the tree's own files while dumped
PIPES_PER_TASK_EXTRA = 2  # lazy and non-lazy pages never share a pipe; rounding
DEFAULT_END_TIMEOUT = 10.0

#: decide() runs at post-dump with the images complete and the tree frozen; True commits.
Decide = Callable[[], bool]

_LOG_TIME = re.compile(r"^\((\d+\.\d+)\)")


class FdBudgetExceeded(PreflightFailed):
    """The lazy dump would need more file descriptors than CRIU may open."""

    code = "preflight"


# --- preflight --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FdBudget:
    """What the lazy dump of a tree needs: its anonymous memory and the fds its pipes take."""

    anon_bytes: int
    pipes: int
    fds_needed: int
    soft_limit: int
    hard_limit: int

    @property
    def max_anon_bytes(self) -> int:
        """Roughly the most anonymous memory the soft limit allows (one task)."""
        pipes = max(0, (self.soft_limit - CRIU_FD_RESERVE) // FDS_PER_PIPE)
        return max(0, pipes - PIPES_PER_TASK_EXTRA) * pipe_bytes()


def pipe_bytes() -> int:
    """Bytes one page pipe of CRIU holds: ``fs.pipe-max-size`` (F_SETPIPE_SZ above it needs
    CAP_SYS_RESOURCE), at most CRIU's own cap of 819 pages."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        limit = 1 << 20
    return max(PAGE_SIZE, min(limit, CRIU_PIPE_MAX_PAGES * PAGE_SIZE)) // PAGE_SIZE * PAGE_SIZE


def anon_bytes(pid: int) -> int:
    """Private anonymous memory of ``pid`` (resident + swapped), what a lazy dump pins.

    Raises ProcessGone, AccessDenied."""
    with wrap_oserror(pid, "read smaps_rollup"), open(f"/proc/{pid}/smaps_rollup") as f:
        text = f.read()
    kib = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Anonymous", "Swap"):
            kib += int(rest.split()[0])
    return kib * 1024


def check_fd_budget(pids: Iterable[int], *, nofile: tuple[int, int] | None = None) -> FdBudget:
    """Refuse (FdBudgetExceeded) a lazy dump of the processes ``pids`` (host PIDs, one per
    address space) that would need more fds than RLIMIT_NOFILE (``nofile`` = (soft, hard),
    default ours, which criu inherits and cannot raise without CAP_SYS_RESOURCE)."""
    soft, hard = nofile if nofile is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    per_pipe = pipe_bytes()
    total = pipes = 0
    for pid in pids:
        nbytes = anon_bytes(pid)
        total += nbytes
        pipes += math.ceil(nbytes / per_pipe) + PIPES_PER_TASK_EXTRA
    needed = pipes * FDS_PER_PIPE + CRIU_FD_RESERVE
    budget = FdBudget(total, pipes, needed, int(soft), int(hard))
    if needed > soft:
        raise FdBudgetExceeded(
            f"the lazy final dump would hold {pipes} page pipes ({needed} fds with CRIU's own) "
            f"for {total / (1 << 20):.0f} MiB of anonymous memory, but RLIMIT_NOFILE is "
            f"{soft} (hard {hard}) and CRIU cannot raise it without CAP_SYS_RESOURCE; "
            f"the tree was not frozen. Raise the limit (ulimit -n / LimitNOFILE=), or "
            f"fs.pipe-max-size (now {per_pipe} bytes per pipe), or use a non-lazy final dump"
        )
    return budget


# --- options and the end of the session ---------------------------------------------------------


def free_port(address: str = LOOPBACK) -> int:
    """A TCP port free on ``address`` now (in our network namespace; a small race remains)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def spawn_lazy_swrk(criu: CriuBinary, *, address: str = LOOPBACK, netns: str | None = None) -> Swrk:
    """A ``criu swrk`` worker whose lazy page server will listen on ``address`` only (RPC
    cannot set it, see the module doc). Raises CriuError."""
    return Swrk.spawn(criu, netns=netns, criu_args=["--address", address])


def lazy_dump_options(base: DumpOptions, *, port: int, status_fd: int | None = None) -> DumpOptions:
    """``base`` (pid, images_dir, tcp_established, network_lock...) made a lazy final dump whose
    page server listens on ``port`` (the address comes from :func:`spawn_lazy_swrk`), with an
    optional ``status_fd`` (write end of a pipe, open in this process)."""
    return replace(base, lazy_pages=True, page_server_port=port, status_fd=status_fd)


def end_lazy_dump(address: str, port: int, timeout: float = DEFAULT_END_TIMEOUT) -> None:
    """End the lazy dump's page-server session: connect, then close without sending anything
    (EOF = "Session over"). CRIU then applies the post-dump decision. Raises PhaulError when
    the page server cannot be reached (the tree then stays frozen: retry, never kill criu)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            pass
    except OSError as err:
        raise PhaulError(f"cannot end the lazy dump at {address}:{port}: {err}") from err


def wait_status_byte(fd: int, timeout: float) -> bool:
    """Wait for CRIU's status byte on the read end ``fd`` of the status pipe; False on EOF or
    timeout (the page server never started)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 1) == b"\0"


# --- the whole dump ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LazyDumpResult:
    """How a lazy final dump ended. Times are seconds since the DUMP request was sent."""

    committed: bool  # post-dump answered True and CRIU finished: the source is gone
    dump: DumpResult | None
    images_complete: float  # post-dump notify
    decided: float  # post-dump answered
    page_server_ready: float  # status-ready notify
    finished: float  # DUMP answered
    log_times: dict[str, float]


def criu_log_times(log_path: Path) -> dict[str, float]:
    """Times (s since criu started) of the dump's milestones in its -v4 log: ``seized`` (first
    task frozen), ``post_dump``, ``status_ready``, ``unfreeze``, and ``frozen_until_images``
    (seized -> post-dump, the part of the freeze CRIU spends)."""
    marks = {
        "seized": "Seized task",
        "post_dump": "Running post-dump scripts",
        "status_ready": "Running status-ready scripts",
        "unfreeze": "Unfreezing tasks into",
    }
    out: dict[str, float] = {}
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                for key, needle in marks.items():
                    if key not in out and needle in line:
                        m = _LOG_TIME.match(line)
                        if m:
                            out[key] = float(m.group(1))
    except OSError:
        return out
    if "seized" in out and "post_dump" in out:
        out["frozen_until_images"] = out["post_dump"] - out["seized"]
    if "seized" in out and "unfreeze" in out:
        out["frozen_total"] = out["unfreeze"] - out["seized"]
    return out


def kill_tree(refs: Sequence[ProcessRef]) -> None:
    """SIGKILL every process of ``refs`` that is still that process (root first)."""
    for ref in refs:
        if ref.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(ref.pid, signal.SIGKILL)


def run_lazy_final_dump(
    swrk: Swrk,
    opts: DumpOptions,
    *,
    address: str,
    decide: Decide,
    tree: Sequence[ProcessRef],
    on_notify: NotifyCallback | None = None,
    timeout: float = 120.0,
) -> LazyDumpResult:
    """Run the lazy final dump ``opts`` (see :func:`lazy_dump_options`) on ``swrk`` (from
    :func:`spawn_lazy_swrk` with the same ``address``).

    ``decide()`` runs at post-dump (images complete, tree frozen): rewrite, restore on the
    target, check; its True commits (CRIU kills the source), False or an exception rolls back
    (CRIU resumes the source intact and NotifyRefused / the exception is raised). The session
    is ended with :func:`end_lazy_dump` at status-ready. ``tree``: the dumped processes, killed
    by us if CRIU fails after a commit (then CommitUncertain is raised). ``on_notify`` sees
    the other notifies. Raises CriuError when the dump fails (the source resumed).
    """
    if not opts.lazy_pages or opts.page_server_port is None:
        raise ValueError("opts must be a lazy dump with a page_server_port (lazy_dump_options)")
    port = opts.page_server_port
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    committed = False

    def notify(name: str, n: rpc.criu_notify) -> bool:
        nonlocal committed
        now = time.monotonic() - t0
        if name == "post-dump":
            marks["images_complete"] = now
            try:
                committed = bool(decide())
            finally:
                marks["decided"] = time.monotonic() - t0
            log.info("lazy final dump: post-dump answered %s", "commit" if committed else "abort")
            return committed
        if name == "status-ready":
            marks["page_server_ready"] = now
            end_lazy_dump(address, port)
            return True
        return on_notify(name, n) if on_notify is not None else True

    try:
        dump = swrk.dump(opts, notify, timeout=timeout)
    except BaseException as err:
        if committed:
            # CRIU failed after we committed: the source resumed while the target runs.
            kill_tree(tree)
            raise CommitUncertain(
                f"CRIU failed after the commit ({err}); the source tree was killed to avoid "
                "two running copies: check the target"
            ) from err
        raise
    if not committed:  # cannot happen: a refused post-dump makes swrk raise NotifyRefused
        raise CriuError("lazy final dump finished without a commit decision")
    finished = time.monotonic() - t0
    return LazyDumpResult(
        committed=True,
        dump=dump,
        images_complete=marks.get("images_complete", math.nan),
        decided=marks.get("decided", math.nan),
        page_server_ready=marks.get("page_server_ready", math.nan),
        finished=finished,
        log_times=criu_log_times(dump.log_path),
    )


def tree_pids_with_memory(tree: Sequence[ProcessRef]) -> list[int]:
    """One PID per address space of ``tree`` (threads share theirs; processes are listed)."""
    out: list[int] = []
    for ref in tree:
        try:
            status = read_status(ref.pid)
        except ProcessGone:
            continue
        if int(status.get("Tgid", ref.pid)) == ref.pid:
            out.append(ref.pid)
    return out
