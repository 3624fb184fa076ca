"""The self-migration service: a local process asks the agent to move or checkpoint *itself*.

After CRIU's self-dump (``criu_dump()`` from libcriu, which answers the dumped process through the
socket it asked on), with phaul's rules for who may move what.

Theory of operation
-------------------
The agent listens on a unix socket (``--self-socket``, mode 0666 or 0660 with a group). A process
connects (:mod:`phaul.client`) and sends one request, a JSON object on one line::

    {"op": "migrate", "to": "HOST:PORT", "token": "<base64>"}   token optional (agent's own)
    {"op": "checkpoint"}          + the destination directory as an SCM_RIGHTS fd
    {"op": "result", "request": "<id>"}                         outcome of an earlier request

The request never names a process. The agent takes the requester from the kernel: its PID and
uid from ``SO_PEERCRED``, pinned with ``SO_PEERPIDFD`` (so a requester that exits cannot have
its PID reused under us). What moves is the tree CRIU would dump for that PID
(:func:`phaul.source.migrate.find_dump_root`): the requester and its descendants, or, when the
requester lives inside a pid namespace (one phaul restored, or started with ``phaul run``), that
whole namespace. Unless the requester is root, every process of that tree must have the
requester's uid. Unknown fields are refused (a request naming a PID is an error, not ignored).

The agent answers ``{"stage": "accepted", "request": ID}`` and runs the same code as ``phaul
migrate`` (:class:`~phaul.source.migrate.SourceMigration`); a checkpoint is a plain CRIU dump with
``leave_running``. At CRIU's ``query-ext-files`` notify — the first one after the tree is frozen,
before CRIU looks at its files — the agent writes ``{"stage": "frozen", "request": ID}`` and
closes its end. CRIU then dumps the requester's socket as a stream socket whose peer is gone
(state ESTABLISHED, shut down both ways) with that line still queued, and restores it the same
way (a socketpair whose other end is closed, queue refilled). So the requester, blocked in
``read()``, sees the same thing wherever it runs next: the ``frozen`` line, then end-of-file.
It tells where it is by comparing its own start time and the boot id with what it read before
asking (a restored process is a new kernel task): changed means restored (on the target, or from
the checkpoint); unchanged means this is the original, after a rollback or a checkpoint, and it
asks ``{"op": "result"}`` on a new connection, which answers once the request has finished
(the error message of a failed migration, or where the checkpoint's images are). A request that
fails before the freeze gets ``{"stage": "error", ...}`` on its own connection.

Checkpoint images are written by CRIU into a private directory of the agent and then copied
into the requester's directory with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and handed to the requester's
uid; the directory must be empty and (unless the requester is root) owned and writable by it, so
the service cannot be used to write into directories the requester could not write itself.
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import socket
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phaul.errors import AccessDenied, PhaulError, ProtocolError, UsageError

if TYPE_CHECKING:
    from phaul.target.agent import Agent

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
REQUEST_TIMEOUT = 10.0
SO_PEERPIDFD = 77  # Linux >= 6.5 (socket.SO_PEERPIDFD only from Python 3.13)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

FIELDS: dict[str, dict[str, type]] = {
    "migrate": {"op": str, "to": str, "token": str},
    "checkpoint": {"op": str},
    "result": {"op": str, "request": str},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "migrate": ("to",),
    "checkpoint": (),
    "result": ("request",),
}


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, as the kernel says (never as the request says)."""

    pid: int
    uid: int
    gid: int
    pidfd: int  # -1 when SO_PEERPIDFD is not available


@dataclass
class Request:
    op: str
    fields: dict[str, Any]
    dir_fd: int | None = None


@dataclass
class Outcome:
    uid: int
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    outcome: str = ""
    error: str = ""
    code: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Validate one request line; ProtocolError on anything unexpected (unknown fields too)."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError("self request: not a JSON object") from err
    if not isinstance(data, dict):
        raise ProtocolError("self request: not a JSON object")
    op = data.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise ProtocolError(f"self request: unknown op {op!r}")
    allowed = FIELDS[op]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ProtocolError(
            f"self request: unknown field(s) {', '.join(unknown)} (the process to move is "
            "always the one asking, as the kernel identifies it)"
        )
    for key, value in data.items():
        if not isinstance(value, allowed[key]):
            raise ProtocolError(f"self request: field {key} must be a {allowed[key].__name__}")
    missing = [k for k in REQUIRED[op] if not data.get(k)]
    if missing:
        raise ProtocolError(f"self request: missing {', '.join(missing)}")
    return op, data


def peer_credentials(conn: socket.socket) -> Peer:
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pidfd = -1
    return Peer(pid, uid, gid, pidfd)


def pidfd_alive(pidfd: int) -> bool:
    """A pidfd becomes readable when its process exits."""
    if pidfd < 0:
        return True
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


def _read_request(conn: socket.socket) -> Request:
    """One line (and at most one fd) from the requester; blocking, with a timeout."""
    conn.settimeout(REQUEST_TIMEOUT)
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        if len(buf) > MAX_REQUEST:
            raise ProtocolError("self request too long")
        data, anc, _flags, _addr = conn.recvmsg(
            MAX_REQUEST, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(arr)
        if not data:
            break
        buf += data
    line = buf.split(b"\n", 1)[0]
    try:
        op, data_ = parse_request(line)
        if op == "checkpoint":
            if len(fds) != 1:
                raise ProtocolError("checkpoint: pass exactly one directory fd (SCM_RIGHTS)")
            return Request(op, data_, fds.pop())
        if fds:
            raise ProtocolError(f"{op}: no file descriptor expected")
        return Request(op, data_)
    finally:
        for fd in fds:
            os.close(fd)


def _uids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:]}
    return set()


def _session_of(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rpartition(")")[2].split()[3])


def resolve_tree(peer: Peer) -> tuple[int, list[int]]:
    """The root CRIU must dump for the requester and the PIDs of that tree; checks ownership."""
    from phaul.source.migrate import find_dump_root

    root = find_dump_root(peer.pid)
    if peer.uid != 0:
        for pid in root.pids:
            try:
                uids = _uids(pid)
            except OSError:
                continue  # exited meanwhile
            if uids != {peer.uid}:
                raise AccessDenied(
                    f"process {pid} of the tree to move is not owned by uid {peer.uid} only"
                )
    if not pidfd_alive(peer.pidfd):
        raise ProtocolError("the requesting process exited")
    return root.pid, root.pids


def _check_dir(dir_fd: int, peer: Peer) -> None:
    st = os.fstat(dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError("checkpoint: the fd passed is not a directory")
    if peer.uid != 0 and (st.st_uid != peer.uid or not st.st_mode & stat.S_IWUSR):
        raise AccessDenied("checkpoint: the directory must be owned and writable by the caller")
    if os.listdir(dir_fd):
        raise UsageError("checkpoint: the directory must be empty")


def copy_into(src: Path, dir_fd: int, uid: int, gid: int) -> list[str]:
    """Copy the files of ``src`` into ``dir_fd`` (new files only, no links followed)."""
    names = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(path.name, flags, 0o600, dir_fd=dir_fd)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    os.write(out, chunk)
            os.fchown(out, uid, gid)
        finally:
            os.close(out)
        names.append(path.name)
    return names


def send_line(conn: socket.socket, obj: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(obj).encode() + b"\n")


class SelfService:
    """The unix-socket listener of one agent (``--self-socket``)."""

    def __init__(self, agent: Agent) -> None:
        assert agent.config.self_socket is not None
        self.agent = agent
        self.path = agent.config.self_socket
        self.sock: socket.socket | None = None
        self.results: dict[str, Outcome] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._busy = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise UsageError(f"--self-socket {self.path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(self.path)) == 0:
                    raise UsageError(f"--self-socket {self.path}: another agent listens there")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        group = self.agent.config.self_socket_group
        if group:
            import grp

            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError as err:
                sock.close()
                raise UsageError(f"--self-socket-group {group}: no such group") from err
            os.chown(self.path, 0, gid)
            self.path.chmod(0o660)
        else:
            # Any local user may ask to move or checkpoint its own processes (nothing else).
            self.path.chmod(0o666)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        self._accepting = asyncio.create_task(self._accept_loop())
        log.info("self-migration service on %s", self.path)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
        for t in list(self._tasks):
            t.cancel()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(True)
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        peer: Peer | None = None
        req: Request | None = None
        try:
            peer = peer_credentials(conn)
            req = await asyncio.to_thread(_read_request, conn)
            conn.settimeout(None)
            if req.op == "result":
                await self._result(conn, peer, req)
                return
            if self._busy >= self.agent.config.max_sessions:
                raise ProtocolError("agent busy: too many concurrent self requests")
            self._busy += 1
            try:
                await self._run(conn, peer, req)
            finally:
                self._busy -= 1
        except (PhaulError, OSError, TimeoutError) as err:
            who = f"PID {peer.pid} (uid {peer.uid})" if peer else "?"
            log.warning("self request from %s refused or failed: %s", who, err)
            code = err.code if isinstance(err, PhaulError) else "error"
            send_line(conn, {"stage": "error", "error": str(err), "code": code})
        finally:
            if req is not None and req.dir_fd is not None:
                os.close(req.dir_fd)
            if peer is not None and peer.pidfd >= 0:
                os.close(peer.pidfd)
            conn.close()

    async def _result(self, conn: socket.socket, peer: Peer, req: Request) -> None:
        outcome = self.results.get(req.fields["request"])
        if outcome is None or peer.uid not in (0, outcome.uid):
            raise ProtocolError("no such self request")
        await asyncio.to_thread(outcome.done.wait)
        send_line(
            conn,
            {
                "stage": "done",
                "ok": outcome.ok,
                "outcome": outcome.outcome,
                "error": outcome.error,
                "code": outcome.code,
                **outcome.detail,
            },
        )

    async def _run(self, conn: socket.socket, peer: Peer, req: Request) -> None:
        root, pids = await asyncio.to_thread(resolve_tree, peer)
        if req.dir_fd is not None:
            _check_dir(req.dir_fd, peer)
        request_id = secrets.token_hex(16)
        outcome = Outcome(uid=peer.uid)
        self.results[request_id] = outcome
        log.info(
            "self %s request %s from PID %d (uid %d): tree root %d, %d process(es)",
            req.op, request_id, peer.pid, peer.uid, root, len(pids),
        )  # fmt: skip
        send_line(conn, {"stage": "accepted", "request": request_id, "root": root})
        frozen = threading.Event()

        def on_frozen() -> None:
            """In CRIU's notify (tree frozen): last words to the requester, then hang up."""
            if frozen.is_set():
                return
            frozen.set()
            send_line(conn, {"stage": "frozen", "request": request_id})
            with contextlib.suppress(OSError):
                conn.close()

        try:
            if req.op == "migrate":
                outcome.detail = await self._migrate(req, root, on_frozen)
                outcome.outcome = "migrated"
            else:
                assert req.dir_fd is not None
                outcome.detail = await asyncio.to_thread(
                    self._checkpoint, root, req.dir_fd, peer, request_id, on_frozen
                )
                outcome.outcome = "checkpointed"
            outcome.ok = True
        except PhaulError as err:
            outcome.error, outcome.code = str(err), err.code
            outcome.outcome = "failed"
            if not frozen.is_set():
                raise
            log.warning("self %s request %s failed: %s", req.op, request_id, err)
        finally:
            outcome.done.set()
            self._forget_later(request_id)

    def _forget_later(self, request_id: str, after: float = 600.0) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(after, self.results.pop, request_id, None)

    async def _migrate(self, req: Request, root: int, on_frozen: Any) -> dict[str, Any]:
        from phaul.source.migrate import MigrateConfig, SourceMigration
        from phaul.transport import Dialer, TcpDialer
        from phaul.transport.tcp import parse_hostport
        from phaul.transport.tls import TlsDialer

        cfg = self.agent.config
        host, port = parse_hostport(req.fields["to"])
        token = cfg.token
        if req.fields.get("token"):
            try:
                token = base64.b64decode(req.fields["token"], validate=True)
            except (binascii.Error, ValueError) as err:
                raise UsageError("token: not base64") from err
        dialer: Dialer = TlsDialer(host, port, cfg.tls) if cfg.tls else TcpDialer(host, port)
        mcfg = MigrateConfig(
            pid=root,
            target=req.fields["to"],
            token=token,
            workdir=cfg.workdir / "outgoing",
            criu_path=self.agent.criu.path,
        )

        def emit(event: str, **_kw: Any) -> None:
            if event == "frozen":
                on_frozen()

        mig = SourceMigration(mcfg, self.agent.criu, dialer, emit)
        await mig.run()
        return {"migration": mig.id}

    def _checkpoint(
        self, root: int, dir_fd: int, peer: Peer, request_id: str, on_frozen: Any
    ) -> dict[str, Any]:
        from phaul.engine.criu_swrk import DumpOptions, Swrk

        work = self.agent.config.workdir / "self" / request_id
        images = work / "images"
        images.mkdir(parents=True, mode=0o700)
        try:
            opts = DumpOptions(
                pid=root,
                images_dir=images,
                leave_running=True,
                tcp_established=False,
                network_lock="skip",
                shell_job=_session_of(root) != root,
            )

            def on_notify(name: str, _n: Any) -> bool:
                if name == "query-ext-files":
                    on_frozen()
                return True

            swrk = Swrk.spawn(self.agent.criu)
            try:
                swrk.dump(opts, on_notify)
            finally:
                swrk.close()
            names = copy_into(images, dir_fd, peer.uid, peer.gid)
            return {"files": len(names)}
        finally:
            # The images went to the caller; CRIU's log stays here for the operator.
            with contextlib.suppress(OSError):
                (images / "dump.log").rename(work / "dump.log")
            shutil.rmtree(images, ignore_errors=True)
