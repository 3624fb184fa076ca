"""Restore before the memory is in: CRIU's local lazy-pages daemon plus ``restore --lazy-pages``.

Theory of operation (reference/local-lazy-restore.md)
------------------------------------------------------
The restore dir R (the lazy final dump, clean runs left ``PE_LAZY`` without data, dirty runs
``PE_PRESENT`` with data, no parent) is restored with ``lazy_pages``: CRIU restores everything
but the lazy runs, registers the anonymous private VMAs with userfaultfd, hands the uffds to the
``criu lazy-pages`` daemon over ``lazy-pages.socket`` and resumes the tree. The daemon, run on
its own images dir D (:func:`phaul.page_server.lazy_split.build_daemon_dir`), copies every lazy
page in (on fault first, in address order in the background) from the flat pre-copy pages
file, and exits 0 when all tasks have all their pages.

- The socket is a RELATIVE path in the work dir: the daemon (``-W W``) and the restore
  (``RestoreOptions.work_dir = W``) must share W. One W per migration: the daemon unlinks and
  rebinds the socket.
- The daemon reads ``inventory.img``/``pstree.img`` at start and the rest only when the restore
  connects; it blocks in ``accept()`` forever if no restore connects (wait with a timeout).
- Until the daemon has exited 0 the restored tree is NOT complete. If the daemon dies, the tree
  keeps running on ZERO-filled pages (silently); if it hangs, the tree blocks on the next missing
  page. :meth:`LazyPagesDaemon.wait` therefore treats any exit but 0, and a daemon that makes no
  progress (its file reads, ``/proc/PID/io`` ``rchar``, stop growing) for ``stall_timeout``
  seconds, as a failure: the caller must then kill the restored tree and roll back.
- The local variant needs neither ``fs.pipe-max-size`` above its 1 MiB default nor extra file
  descriptors (the pipes of a lazy dump belong to the SOURCE side, see lazy_dump.py): the
  daemon holds one uffd per task and one pages file per task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from phaul import trace
from phaul.engine.criu_locate import RLIMIT_NOISE, CriuBinary
from phaul.engine.criu_swrk import (
    NotifyCallback,
    RestoreOptions,
    RestoreResult,
    Swrk,
    log_errors,
)
from phaul.errors import CriuError
from phaul.page_server.lazy_split import check_split

log = logging.getLogger(__name__)

SOCKET_NAME = "lazy-pages.socket"  # criu/uffd.c LAZY_PAGES_SOCK_NAME, relative to -W
DEFAULT_READY_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


class LazyDaemonError(CriuError):
    """The lazy-pages daemon failed to start, died, stalled or did not finish in time."""

    code = "criu"


@dataclass(frozen=True)
class DaemonOptions:
    """One ``criu lazy-pages`` daemon. ``work_dir`` is created if needed; the log goes there."""

    daemon_dir: Path
    work_dir: Path
    log_file: str = "lazy-pages.log"
    #: -v4 logs every chunk (``UFFD transferred pages: (N/N)`` per task at the end); -v2
    #: (errors and warnings) keeps the log small at GiB sizes.
    log_level: int = 2
    ready_timeout: float = DEFAULT_READY_TIMEOUT


@dataclass(frozen=True)
class DaemonResult:
    """How :meth:`LazyPagesDaemon.wait` ended.

    ``complete``: the daemon exited 0, every lazy page is in. Otherwise ``reason`` says why
    (``exit N``, ``signal N``, ``stalled``, ``timeout``) and the daemon may still be running
    (``running``): kill it, kill the restored tree, roll back.
    """

    complete: bool
    reason: str
    returncode: int | None
    running: bool
    seconds: float  # from the start of wait() to the outcome
    bytes_read: int  # the daemon's rchar at the outcome (what it read from the pages files)
    log_path: Path
    errors: tuple[str, ...] = field(default=())


def _rchar(pid: int) -> int | None:
    """Bytes ``pid`` has read (``/proc/PID/io`` rchar), None once it is gone."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as err:
        log.debug("cannot read /proc/%d/io: %s", pid, err)
    return None


class LazyPagesDaemon:
    """A running ``criu lazy-pages -D daemon_dir -W work_dir`` (our child, in its own process
    group). Use as a context manager, or call :meth:`close`: it is killed and reaped."""

    def __init__(self, opts: DaemonOptions, proc: subprocess.Popen[bytes]) -> None:
        self.opts = opts
        self._proc = proc
        self.log_path = Path(opts.work_dir) / opts.log_file
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def daemon_dir(self) -> Path:
        return Path(self.opts.daemon_dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.opts.work_dir)

    @classmethod
    def start(
        cls, criu: CriuBinary, opts: DaemonOptions, *, restore_dir: Path | None = None
    ) -> LazyPagesDaemon:
        """Start the daemon and wait until it listens (its status fd gives a byte).

        With ``restore_dir`` the daemon dir is first checked against it
        (:func:`~phaul.page_server.lazy_split.check_split`; SplitMismatch / SplitError: the
        daemon would serve zeros or livelock). The daemon dir needs at least ``inventory.img``
        and ``pstree.img`` now (it may be started before the final dump with the pre-copy
        ones, as long as the task set does not change); the rest must be in place before the
        restore. Raises LazyDaemonError when it does not come up within ``ready_timeout``.
        """
        if restore_dir is not None:
            check_split(restore_dir, opts.daemon_dir)
        from phaul.engine import criu_kdat

        criu_kdat.prime(criu)
        work = Path(opts.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("inventory.img", "pstree.img"):
            if not (Path(opts.daemon_dir) / name).exists():
                raise LazyDaemonError(f"daemon dir {opts.daemon_dir} has no {name}")
        rfd, wfd = os.pipe()
        argv = [
            criu.path,
            "lazy-pages",
            "-D",
            str(opts.daemon_dir),
            "-W",
            str(work),
            "-o",
            opts.log_file,
            f"-v{opts.log_level}",
            "--status-fd",
            str(wfd),
        ]
        trace.event("daemon popen")
        try:
            with open(work / (opts.log_file + ".out"), "wb") as out:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=[wfd],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # own process group: kill() takes all of it
                    cwd="/",
                )
        except OSError as err:
            os.close(rfd)
            os.close(wfd)
            raise LazyDaemonError(f"cannot start {criu.path} lazy-pages: {err}") from err
        os.close(wfd)
        trace.event("daemon popened")
        self = cls(opts, proc)
        try:
            ready, _, _ = select.select([rfd], [], [], opts.ready_timeout)
            byte = os.read(rfd, 1) if ready else b""
            if byte != b"\0":
                why = "exited" if ready else f"not ready within {opts.ready_timeout:g} s"
                self.kill()
                raise LazyDaemonError(
                    f"criu lazy-pages {why}: {self._why()}", log_path=str(self.log_path)
                )
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(rfd)
        trace.event("daemon ready")
        log.info(
            "lazy-pages daemon %d listening in %s (images %s)", proc.pid, work, opts.daemon_dir
        )
        return self

    def _why(self) -> str:
        errs = log_errors(self.log_path)
        if errs:
            return "; ".join(errs)
        try:
            text = (self.work_dir / (self.opts.log_file + ".out")).read_text(errors="replace")
        except OSError:
            text = ""
        lines = [ln for ln in text.splitlines() if ln.strip() and RLIMIT_NOISE not in ln]
        rc = self._proc.poll()
        return "; ".join(lines[-3:]) or (f"exit status {rc}" if rc is not None else "no error")

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: float, stall_timeout: float = 5.0) -> DaemonResult:
        """Wait until the daemon has served every page (exit 0) -- call it once the lazy
        restore has returned. Failure (``complete`` False) when it exits non-zero or by a
        signal, when it reads nothing for ``stall_timeout`` s (hung, or blocked in accept()
        because no restore connected), or after ``timeout`` s. Never raises for those; the
        daemon is left as it is (kill() it).
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = _rchar(self.pid) or 0
        last_change = t0
        while True:
            rc = self._proc.poll()
            now = time.monotonic()
            if rc is not None:
                reason = "exit 0" if rc == 0 else (f"exit {rc}" if rc > 0 else f"signal {-rc}")
                return self._result(rc == 0, reason, rc, now - t0, last)
            cur = _rchar(self.pid)
            if cur is not None and cur != last:
                last, last_change = cur, now
            if now - last_change >= stall_timeout:
                log.error(
                    "lazy-pages daemon %d made no progress for %.1f s", self.pid, now - last_change
                )
                return self._result(False, "stalled", None, now - t0, last)
            if now >= deadline:
                return self._result(False, "timeout", None, now - t0, last)
            time.sleep(POLL_INTERVAL)

    def _result(
        self, ok: bool, reason: str, rc: int | None, seconds: float, rchar: int
    ) -> DaemonResult:
        errors = () if ok else tuple(log_errors(self.log_path))
        if not ok:
            log.error(
                "lazy-pages daemon %d failed (%s) after %.2f s: %s (log %s)",
                self.pid,
                reason,
                seconds,
                "; ".join(errors) or "no error logged",
                self.log_path,
            )
        return DaemonResult(
            complete=ok,
            reason=reason,
            returncode=rc,
            running=self.running(),
            seconds=seconds,
            bytes_read=rchar,
            log_path=self.log_path,
            errors=errors,
        )

    def kill(self) -> None:
        """SIGKILL the daemon's process group and reap it (idempotent)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("lazy-pages daemon %d did not die", self._proc.pid)

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> LazyPagesDaemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def restore_lazily(
    criu: CriuBinary,
    restore_dir: Path,
    daemon: LazyPagesDaemon,
    *,
    timeout: float = 30.0,
    netns: str | None = None,
    on_notify: NotifyCallback | None = None,
    log_file: str = "restore.log",
    log_level: int = 4,
    tcp_established: bool = False,
    root: str | None = None,
    check: bool = True,
) -> RestoreResult:
    """``criu restore --lazy-pages`` of ``restore_dir`` over swrk, sharing ``daemon``'s work
    dir (the log goes there), under ``timeout`` (on timeout criu and the tree are killed).

    With ``check`` the daemon dir is checked against ``restore_dir`` first (SplitMismatch).
    The restored tree runs when this returns, but is complete only once
    ``daemon.wait(...)`` reports ``complete``. Raises LazyDaemonError when the daemon is not
    running, CriuError when the restore fails.
    """
    if check:
        check_split(restore_dir, daemon.daemon_dir)
    if not daemon.running():
        raise LazyDaemonError(
            f"the lazy-pages daemon exited before the restore: {daemon._why()}",
            log_path=str(daemon.log_path),
        )
    if not (daemon.work_dir / SOCKET_NAME).exists():
        raise LazyDaemonError(f"no {SOCKET_NAME} in {daemon.work_dir}: the daemon is not listening")
    opts = RestoreOptions(
        images_dir=Path(restore_dir),
        log_file=log_file,
        log_level=log_level,
        tcp_established=tcp_established,
        root=root,
        lazy_pages=True,
        work_dir=daemon.work_dir,
    )
    with Swrk.spawn(criu, netns=netns) as sw:
        return sw.restore(opts, on_notify, timeout=timeout)
