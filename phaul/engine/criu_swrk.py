"""The CRIU driver: one DUMP or RESTORE request over CRIU's ``swrk`` RPC.

Theory of operation. ``criu swrk FD`` serves CRIU's RPC protocol (protobuf messages, one per
packet) on a SOCK_SEQPACKET socket it inherits; a SOCK_STREAM pair does not work. During a
request CRIU sends NOTIFY messages (``pre-dump``, ``post-dump``, ``post-restore``,
``pre-resume``, ...) and waits for our answer; answering failure aborts the request, and at
``post-dump`` that makes CRIU resume the source tree: the hinge of phaul's two-phase commit.

- :meth:`Swrk.spawn` starts the worker ahead of time (off the freeze's critical path) and checks
  it with a VERSION request (``keep_open``, the only request kinds CRIU serves more than once
  besides FEATURE_CHECK, CPUINFO_* and PAGE_SERVER*). With ``netns`` it runs under
  ``nsenter --net=PATH``, which execs, so criu stays our direct child: with ``rst_sibling`` the
  restored root then becomes OUR child and we must reap it. With ``fresh_pidns`` it runs under
  :mod:`phaul.engine.nsinit` as the child of pid 1 of a new pid namespace.
- One request per worker. Directory fds (``images_dir_fd``) and ``status_fd`` are opened in
  OUR process: CRIU reopens them as ``/proc/<SO_PEERCRED pid>/fd/N``. ``ps.fd`` (a page-server
  socket) is different: CRIU uses the number as its own fd, so it must be passed to criu at
  spawn time (``Swrk.spawn(pass_fds=...)``). In a fresh pid namespace our PID is not visible to
  criu, so the images directory is passed by path there.
- Every request runs under a timeout counting CRIU's time (our notify callbacks own their
  time limits): restores of malformed images can loop forever. On timeout criu, and for a
  restore the restored tree, are killed and CriuError is raised.
- CRIU's ``cr_errmsg`` is useless here (it holds the FIRST error logged, always the harmless
  RLIMIT_NOFILE line without CAP_SYS_RESOURCE); errors quote the last real ``Error (`` lines of
  the request's log file and point to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from phaul import trace
from phaul.engine import nsutil
from phaul.engine.criu_locate import RLIMIT_NOISE, CriuBinary
from phaul.errors import CriuError, ProcessGone
from phaul.pb import criu_rpc_pb2 as rpc
from phaul.pb import criu_stats_pb2

log = logging.getLogger(__name__)

#: on_notify(name, notify) -> answer; False makes CRIU abort (at post-dump: resume the source)
NotifyCallback = Callable[[str, rpc.criu_notify], bool]

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
NETWORK_LOCKS = {"iptables": rpc.IPTABLES, "nftables": rpc.NFTABLES, "skip": rpc.SKIP}
START_TIMEOUT = 20.0
_MAX_MSG = 1 << 20
_MAX_FDS = 16


@dataclass(frozen=True)
class DumpOptions:
    """A DUMP request. ``images_dir`` must exist; the log is written there."""

    pid: int
    images_dir: Path
    log_file: str = "dump.log"
    log_level: int = 4
    tcp_established: bool = True
    network_lock: str = "nftables"  # "nftables" | "iptables" | "skip"
    leave_stopped: bool = False
    leave_running: bool = False
    shell_job: bool = False
    page_server_fd: int | None = None  # must be in Swrk.spawn(pass_fds=...)
    #: ps.port: with lazy_pages the port the lazy page server listens on (0: any free port).
    #: CRIU 4.2 ignores ps.address for a lazy dump over RPC (cr-service.c) and listens on
    #: INADDR_ANY: give the address as a global option, Swrk.spawn(criu_args=["--address", A]).
    page_server_port: int | None = None
    #: ps.address: the page server to connect to (non-lazy dumps only, see page_server_port)
    page_server_address: str | None = None
    lazy_pages: bool = False
    status_fd: int | None = None  # open in this process
    ext_unix_sk: bool = False
    file_locks: bool = False
    #: incremental dump: pages CRIU believes unchanged become PE_PARENT holes against
    #: ``parent_img`` (relative to images_dir); see phaul/engine/tracked_dump.py
    track_mem: bool = False
    parent_img: str | None = None


@dataclass(frozen=True)
class RestoreOptions:
    """A RESTORE request from ``images_dir`` (the log is written there)."""

    images_dir: Path
    log_file: str = "restore.log"
    log_level: int = 4
    tcp_established: bool = True
    rst_sibling: bool = True
    root: str | None = None
    shell_job: bool = False
    lazy_pages: bool = False
    #: CRIU's work dir (-W: logs, and with lazy_pages the ``lazy-pages.socket`` shared with
    #: ``criu lazy-pages -W``); the log is then written there. Default: images_dir.
    work_dir: Path | None = None


@dataclass(frozen=True)
class DumpResult:
    log_path: Path
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    #: host PID (our pid namespace) of the restored root
    pid: int
    #: the root's PID as CRIU reported it (in CRIU's pid namespace)
    criu_pid_in_ns: int
    #: our direct child that the caller must reap: the restored root itself, or with
    #: fresh_pidns the nsinit holder (exits with the root's status when the root exits)
    child_pid: int
    #: host PID of pid 1 of the fresh pid namespace (fresh_pidns only)
    init_pid: int | None
    log_path: Path
    stats: dict[str, int] = field(default_factory=dict)


class NotifyRefused(CriuError):
    """Our notify callback answered failure and CRIU aborted (at post-dump: the source resumed)."""

    def __init__(self, notify: str, message: str, *, log_path: str = "") -> None:
        super().__init__(message, detail=f"refused:{notify}", log_path=log_path)
        self.notify = notify


def read_stats(images_dir: Path | str, kind: Literal["dump", "restore"]) -> dict[str, int]:
    """Read CRIU's ``stats-KIND`` file (timing and page counters) as {field: value}.

    CRIU names it ``stats-dump`` / ``stats-restore`` (no ``.img``: image-desc.c "stats-%s").

    Times are in microseconds. Raises FileNotFoundError when CRIU wrote none, CriuError when the
    file is malformed.
    """
    if kind not in ("dump", "restore"):
        raise ValueError(f"kind must be 'dump' or 'restore', not {kind!r}")
    path = Path(images_dir) / f"stats-{kind}"
    data = path.read_bytes()
    if len(data) < 12:
        raise CriuError(f"stats image {path} is truncated")
    head, magic, size = struct.unpack_from("<III", data)
    if head != IMG_SERVICE_MAGIC or magic != STATS_MAGIC:
        raise CriuError(f"{path} is not a CRIU stats image (magic {head:#x} {magic:#x})")
    if len(data) < 12 + size:
        raise CriuError(f"stats image {path} is truncated")
    try:
        entry = criu_stats_pb2.stats_entry.FromString(data[12 : 12 + size])
    except Exception as err:  # protobuf raises DecodeError (not exported in typed form)
        raise CriuError(f"cannot decode {path}: {err}") from err
    sub = entry.dump if kind == "dump" else entry.restore
    return {f.name: int(v) for f, v in sub.ListFields()}


def log_errors(log_path: Path, limit: int = 3) -> list[str]:
    """The last ``limit`` ``Error (`` lines of a CRIU log, without the harmless rlimit one."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    errs = [
        ln[ln.index("Error (") :].strip()
        for ln in lines
        if "Error (" in ln and RLIMIT_NOISE not in ln
    ]
    return errs[-limit:]


def _waitpid_bounded(pid: int, timeout: float) -> bool:
    """Reap our child PID within ``timeout`` s; True when reaped (or not ours any more)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _signal_tree(root: int, sig: int) -> None:
    """Send ``sig`` to ``root`` and every descendant (all listed first)."""
    victims = [root, *nsutil.descendants(root)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Swrk:
    """One ``criu swrk`` worker serving one DUMP or RESTORE request. Use as a context manager
    (or call close()): criu is always killed and reaped, a failed restore's tree too.
    """

    def __init__(
        self,
        criu: CriuBinary,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        *,
        netns: str | None,
        ctl: socket.socket | None,
        passed_fds: Sequence[int],
        stderr: IO[bytes],
    ) -> None:
        self.criu = criu
        self.netns = netns
        self.version = ""
        self._proc = proc
        self._sock = sock
        self._ctl = ctl
        self._passed_fds = tuple(passed_fds)
        self._stderr = stderr
        self.init_pid: int | None = None  # fresh_pidns: host PID of the namespace's pid 1
        self._criu_pid_in_ns: int | None = None
        self._used = False
        self._handed_over = False  # fresh_pidns restore succeeded: the holder is the caller's
        self._closed = False
        self._root_in_ns: int | None = None  # restored root as CRIU names it (from notifies)

    # --- life cycle ---------------------------------------------------------------------------
    @classmethod
    def spawn(
        cls,
        criu: CriuBinary,
        *,
        netns: str | None = None,
        fresh_pidns: bool = False,
        pass_fds: Sequence[int] = (),
        start_timeout: float = START_TIMEOUT,
        criu_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ) -> Swrk:
        """Start ``criu swrk`` (in network namespace ``netns``, a path such as /run/netns/x;
        in a new pid namespace with ``fresh_pidns``) and check that it answers.

        ``pass_fds``: extra fds criu must hold under the same numbers (a page-server socket for
        DumpOptions.page_server_fd). ``criu_args``: global CRIU options placed before ``swrk``
        (e.g. ``--address 127.0.0.1``, which RPC cannot set for a lazy dump's page server);
        not with ``fresh_pidns``. Raises CriuError when the worker does not come up.
        """
        from phaul.engine import criu_kdat

        # Without it, CRIU probes the kernel for 50-65 ms at every request (in a restore:
        # inside the freeze) on hosts where /run is not a tmpfs.
        criu_kdat.prime(criu)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl_ours: socket.socket | None = None
        ctl_theirs: socket.socket | None = None
        fds = [theirs.fileno(), *pass_fds]
        if criu_args and fresh_pidns:
            raise ValueError("criu_args are not supported with fresh_pidns")
        if fresh_pidns:
            ctl_ours, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(ctl_theirs.fileno())
            argv = [
                sys.executable,
                "-m",
                "phaul.engine.nsinit",
                "--ctl",
                str(ctl_theirs.fileno()),
                criu.path,
                str(theirs.fileno()),
            ]
        else:
            argv = [criu.path, *criu_args, "swrk", str(theirs.fileno())]
        if netns:
            argv = ["nsenter", f"--net={netns}", *argv]
        env = None
        if fresh_pidns:
            # nsinit must import phaul even when phaul runs from a checkout (cwd is "/").
            here = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        if extra_env:
            env = {**(env or os.environ), **extra_env}
        stderr = tempfile.TemporaryFile(prefix="phaul-swrk-")  # noqa: SIM115 - owned by Swrk
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
                cwd="/",
                env=env,
            )
        except OSError as err:
            for s in (ours, theirs, ctl_ours, ctl_theirs):
                if s is not None:
                    s.close()
            stderr.close()
            raise CriuError(f"cannot start {argv[0]}: {err}") from err
        finally:
            theirs.close()
            if ctl_theirs is not None:
                ctl_theirs.close()
        self = cls(criu, proc, ours, netns=netns, ctl=ctl_ours, passed_fds=pass_fds, stderr=stderr)
        try:
            deadline = time.monotonic() + start_timeout
            if fresh_pidns:
                self._await_nsinit(deadline)
            self.version = self._query_version(deadline)
        except BaseException:
            self.close()
            raise
        log.debug(
            "criu swrk pid %d up (CRIU %s%s%s)",
            proc.pid,
            self.version,
            f", netns {netns}" if netns else "",
            f", fresh pid ns init {self.init_pid}" if fresh_pidns else "",
        )
        return self

    def __enter__(self) -> Swrk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """PID of our child: criu itself, or with fresh_pidns the nsinit holder."""
        return self._proc.pid

    def close(self) -> None:
        """Kill and reap criu (and a fresh pid namespace unless a restore succeeded there)."""
        if self._closed:
            return
        self._closed = True
        if self.init_pid is not None and not self._handed_over and self._proc.poll() is None:
            self._end_namespace()
        if not self._handed_over and self._proc.poll() is None:
            # criu exits by itself after answering; give it a moment before the kill.
            try:
                self._proc.wait(timeout=0 if self._used is False else 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for s in (self._sock, self._ctl):
            if s is not None:
                s.close()
        self._stderr.close()

    # --- requests -----------------------------------------------------------------------------
    def dump(
        self,
        opts: DumpOptions,
        on_notify: NotifyCallback | None = None,
        timeout: float = 120.0,
    ) -> DumpResult:
        """Dump the tree rooted at ``opts.pid`` into ``opts.images_dir``.

        ``on_notify`` runs synchronously for every notify; its False (or an exception) aborts
        the dump: at ``post-dump`` CRIU then resumes the tree (rollback) and NotifyRefused (or
        the callback's exception) is raised. Raises CriuError (log_path set) on failure or
        after ``timeout`` seconds of CRIU time.
        """
        self._claim("dump")
        if self.init_pid is not None:
            raise ValueError("dump from a fresh-pid-namespace worker is not supported")
        if opts.network_lock not in NETWORK_LOCKS:
            raise ValueError(f"network_lock must be one of {sorted(NETWORK_LOCKS)}")
        if opts.page_server_fd is not None and opts.page_server_fd not in self._passed_fds:
            raise ValueError(
                "page_server_fd must be passed to criu: Swrk.spawn(pass_fds=[fd]) "
                "(CRIU uses ps.fd as an fd number of its own)"
            )
        images_dir = Path(opts.images_dir)
        log_path = images_dir / opts.log_file
        dfd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            o = rpc.criu_opts(
                images_dir_fd=dfd,
                pid=opts.pid,
                log_file=opts.log_file,
                log_level=opts.log_level,
                notify_scripts=True,
                tcp_established=opts.tcp_established,
                network_lock=NETWORK_LOCKS[opts.network_lock],
                leave_stopped=opts.leave_stopped,
                leave_running=opts.leave_running,
                shell_job=opts.shell_job,
                ext_unix_sk=opts.ext_unix_sk,
                file_locks=opts.file_locks,
                lazy_pages=opts.lazy_pages,
                track_mem=opts.track_mem,
            )
            if opts.parent_img is not None:
                o.parent_img = opts.parent_img
            if opts.page_server_fd is not None:
                o.ps.fd = opts.page_server_fd
            if opts.page_server_port is not None:
                o.ps.port = opts.page_server_port
            if opts.page_server_address is not None:
                o.ps.address = opts.page_server_address
            if opts.status_fd is not None:
                o.status_fd = opts.status_fd
            what = f"dump of PID {opts.pid}"
            self._request(
                rpc.criu_req(type=rpc.DUMP, opts=o),
                on_notify,
                timeout,
                what,
                log_path,
                kill_tree=False,
            )
        finally:
            os.close(dfd)
        self._reap_criu()
        return DumpResult(log_path=log_path, stats=self._stats(images_dir, "dump"))

    def restore(
        self,
        opts: RestoreOptions,
        on_notify: NotifyCallback | None = None,
        timeout: float = 120.0,
    ) -> RestoreResult:
        """Restore the tree in ``opts.images_dir``; with ``rst_sibling`` (default) the root
        becomes our child (or, in a fresh pid namespace, the child of its init).

        ``on_notify`` as for dump; False at ``pre-resume`` or earlier aborts the restore and
        CRIU kills the restored tree. Raises CriuError (log_path set); on timeout criu and the
        restored tree are killed.
        """
        self._claim("restore")
        images_dir = Path(opts.images_dir)
        log_path = Path(opts.work_dir or images_dir) / opts.log_file
        fresh = self.init_pid is not None
        if fresh and opts.work_dir is not None:
            raise ValueError("work_dir is not supported with fresh_pidns")
        dfd = -1 if fresh else os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY)
        wfd = -1
        try:
            if opts.work_dir is not None:
                wfd = os.open(opts.work_dir, os.O_RDONLY | os.O_DIRECTORY)
            o = rpc.criu_opts(
                images_dir_fd=dfd,
                log_file=opts.log_file,
                log_level=opts.log_level,
                notify_scripts=True,
                tcp_established=opts.tcp_established,
                rst_sibling=opts.rst_sibling,
                shell_job=opts.shell_job,
                lazy_pages=opts.lazy_pages,
            )
            if fresh:
                # criu cannot see our PID (other pid namespace): no /proc/<us>/fd/N for it.
                o.images_dir = str(images_dir.resolve())
            if opts.root is not None:
                o.root = opts.root
            if wfd >= 0:
                o.work_dir_fd = wfd  # CRIU opens /proc/<us>/fd/N, as for images_dir_fd
            what = f"restore from {images_dir}"
            resp = self._request(
                rpc.criu_req(type=rpc.RESTORE, opts=o),
                on_notify,
                timeout,
                what,
                log_path,
                kill_tree=True,
            )
        finally:
            if dfd >= 0:
                os.close(dfd)
            if wfd >= 0:
                os.close(wfd)
        inner = resp.restore.pid
        if self.init_pid is not None:
            host = nsutil.host_pid_in(self.init_pid, inner)
            if host is None:
                raise CriuError(
                    f"restored root {inner} not found in the pid namespace of {self.init_pid}",
                    log_path=str(log_path),
                )
            # The holder now belongs to the caller (RestoreResult.child_pid): mark the Popen
            # finished so that subprocess's clean-up of dropped Popen objects never reaps it
            # behind the caller's back.
            self._handed_over = True
            self._proc.returncode = 0
            child = self._proc.pid
        else:
            host = child = inner
            self._reap_criu()
        return RestoreResult(
            pid=host,
            criu_pid_in_ns=inner,
            child_pid=child,
            init_pid=self.init_pid,
            log_path=log_path,
            stats=self._stats(Path(opts.work_dir or images_dir), "restore"),  # CRIU: in -W
        )

    # --- internals ----------------------------------------------------------------------------
    def _claim(self, what: str) -> None:
        if self._closed:
            raise CriuError(f"cannot {what}: this criu worker was closed")
        if self._used:
            raise CriuError(f"cannot {what}: criu swrk serves one request per process")
        self._used = True

    def _stats(self, images_dir: Path, kind: Literal["dump", "restore"]) -> dict[str, int]:
        try:
            return read_stats(images_dir, kind)
        except (OSError, CriuError) as err:
            log.warning("no CRIU %s stats: %s", kind, err)
            return {}

    def _reap_criu(self) -> None:
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("criu %d did not exit after its answer; killing it", self._proc.pid)
            self._proc.kill()
            self._proc.wait()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip() and RLIMIT_NOISE not in ln]
        return "; ".join(lines[-3:])

    def _died(self, what: str, log_path: Path | None) -> CriuError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=2)
        rc = self._proc.returncode
        errs = log_errors(log_path) if log_path else []
        why = "; ".join(errs) or self._stderr_tail() or f"exit status {rc}"
        return CriuError(
            f"criu exited during {what}: {why}", log_path=str(log_path) if log_path else ""
        )

    def _send(self, req: rpc.criu_req) -> None:
        self._sock.send(req.SerializeToString())

    def _recv(self, timeout: float, what: str, log_path: Path | None) -> rpc.criu_resp:
        """One message from criu (closing any fd attached); TimeoutError after ``timeout``."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            raise TimeoutError
        data, ancdata, flags, _ = self._sock.recvmsg(_MAX_MSG, socket.CMSG_SPACE(_MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                for fd in struct.unpack(f"{usable // 4}i", payload[:usable]):
                    os.close(fd)
        if not data:
            raise self._died(what, log_path)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise CriuError(f"oversized message from criu during {what}")
        return rpc.criu_resp.FromString(data)

    def _query_version(self, deadline: float) -> str:
        self._send(rpc.criu_req(type=rpc.VERSION, keep_open=True))
        try:
            resp = self._recv(deadline - time.monotonic(), "start-up", None)
        except TimeoutError as err:
            raise CriuError(f"criu swrk did not answer within {START_TIMEOUT:.0f} s") from err
        if resp.type != rpc.VERSION or not resp.success:
            raise CriuError("criu swrk refused a VERSION request")
        v = resp.version
        return f"{v.major_number}.{v.minor_number}" + (f".{v.sublevel}" if v.sublevel else "")

    def _ctl_recv(self, deadline: float) -> str:
        assert self._ctl is not None
        poller = select.poll()
        poller.register(self._ctl, select.POLLIN)
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise CriuError("the fresh pid namespace init did not answer")
        msg = self._ctl.recv(4096).decode()
        if not msg:
            raise CriuError(f"the fresh pid namespace init exited: {self._stderr_tail()}")
        if msg.startswith("error"):
            raise CriuError(f"fresh pid namespace: {msg[6:]}")
        return msg

    def _await_nsinit(self, deadline: float) -> None:
        # "init" (from the holder) and "ready" (from the init) may arrive in either order.
        while self._criu_pid_in_ns is None or self.init_pid is None:
            word, _, arg = self._ctl_recv(deadline).partition(" ")
            if word == "init":
                self.init_pid = int(arg)
            elif word == "ready":
                self._criu_pid_in_ns = int(arg)

    def _join_timens(self, root_in_ns: int) -> bool:
        """fresh_pidns: make the namespace's init join the restored root's time namespace."""
        assert self._ctl is not None
        try:
            self._ctl.send(f"root {root_in_ns}".encode())
            answer = self._ctl_recv(time.monotonic() + 10)
        except (OSError, CriuError) as err:
            log.error("fresh pid namespace init failed to join the time namespace: %s", err)
            return False
        return answer == "ok"

    def _internal_notify(self, name: str, notify: rpc.criu_notify) -> bool:
        if name in ("setup-namespaces", "post-restore") and notify.HasField("pid"):
            self._root_in_ns = notify.pid
        if name == "post-restore" and self._ctl is not None and self._root_in_ns is not None:
            return self._join_timens(self._root_in_ns)
        return True

    def _restored_root(self) -> int | None:
        """Host PID of the root CRIU is restoring (known from setup-namespaces/post-restore)."""
        root = self._root_in_ns
        if root is None or self.init_pid is None:
            return root
        try:
            return nsutil.host_pid_in(self.init_pid, root)
        except ProcessGone:
            return None

    def _signal_restored(self, sig: int) -> int | None:
        """Send ``sig`` to the restored tree (root first); returns the root's host PID."""
        root = self._restored_root()
        if root is not None:
            _signal_tree(root, sig)
        return root

    def _kill_restored(self) -> None:
        """Kill (and, as it is our child, reap) what CRIU restored, if anything."""
        root = self._signal_restored(signal.SIGKILL)
        if root is not None and self.init_pid is None and not _waitpid_bounded(root, 5):
            log.warning("restored root %d could not be reaped", root)

    def _request(
        self,
        req: rpc.criu_req,
        on_notify: NotifyCallback | None,
        timeout: float,
        what: str,
        log_path: Path,
        *,
        kill_tree: bool,
    ) -> rpc.criu_resp:
        budget = timeout
        refused: str | None = None
        cb_error: Exception | None = None
        started = time.monotonic()
        self._send(req)
        while True:
            t0 = time.monotonic()
            try:
                resp = self._recv(budget, what, log_path)
            except TimeoutError:
                self._on_timeout(kill_tree)
                raise CriuError(
                    f"CRIU {what} timed out after {timeout:g} s (criu killed)",
                    detail="timeout",
                    log_path=str(log_path),
                ) from None
            except CriuError:
                if kill_tree:
                    self._kill_restored()
                raise
            budget -= time.monotonic() - t0
            if resp.type != rpc.NOTIFY:
                break
            name = resp.notify.script
            trace.event(f"criu {what} notify {name}")
            log.debug(
                "CRIU %s: notify %s (%.0f ms)", what, name, (time.monotonic() - started) * 1000
            )
            try:
                ok = self._internal_notify(name, resp.notify)
                if ok and on_notify is not None:
                    ok = bool(on_notify(name, resp.notify))
            except Exception as err:  # noqa: BLE001 - re-raised after CRIU has answered
                log.debug("notify %s callback raised", name, exc_info=True)
                cb_error = err
                ok = False
            if not ok and refused is None:
                refused = name
            if not ok and name == "pre-resume":
                # CRIU 4.2 only logs a failed pre-resume answer and resumes the tree anyway
                # (cr-restore.c: "Pre-resume script ret code"). Killing the tree now would
                # deadlock CRIU (it waits for the root while still tracing the others), so a
                # SIGSTOP is queued: it takes effect on the way out of the restorer, before any
                # code of the tree runs, and the tree is killed once CRIU has answered.
                self._signal_restored(signal.SIGSTOP)
            self._send(rpc.criu_req(type=rpc.NOTIFY, notify_success=ok))
        if resp.success and refused in (None, "post-resume"):
            if refused:
                log.warning("CRIU %s: post-resume was refused, too late to stop the tree", what)
            return resp
        if kill_tree:
            self._kill_restored()
        errs = log_errors(log_path)
        why = "; ".join(errs) or self._stderr_tail() or "no error in the log"
        if cb_error is not None:
            cb_error.add_note(f"CRIU {what} was aborted; CRIU: {why} (log: {log_path})")
            raise cb_error
        if refused is not None:
            resumed = "; CRIU resumed the tree" if refused == "post-dump" else ""
            raise NotifyRefused(
                refused,
                f"CRIU {what} aborted: the {refused} notify was answered with failure{resumed}",
                log_path=str(log_path),
            )
        raise CriuError(
            f"CRIU {what} failed: {why}",
            log_path=str(log_path),
            criu_errno=resp.cr_errno if resp.HasField("cr_errno") else 0,
        )

    def _on_timeout(self, kill_tree: bool) -> None:
        if self.init_pid is not None:
            self._end_namespace()  # kills criu and any restored tree with it
            return
        self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        if kill_tree:
            self._kill_restored()

    def _end_namespace(self) -> None:
        """fresh_pidns: SIGKILL the namespace's init (the kernel then kills every process in
        it); the holder reaps the init and exits, and we reap the holder.
        """
        assert self.init_pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("nsinit holder %d did not exit; killing it", self._proc.pid)
            self._proc.kill()
            self._proc.wait()
