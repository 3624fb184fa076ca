"""Ask the local phaul agent to move or checkpoint the calling process (and its descendants).

A small library call, standard library only, for programs that want to migrate themselves (after
CRIU's self-dump, ``criu_dump()`` of libcriu)::

    from phaul.client import migrate_self, checkpoint_self

    result = migrate_self(to="10.0.0.2:7707", token_file="/etc/phaul.token")
    # returns on the TARGET host: result.outcome == "migrated"
    # on failure: SelfMigrationFailed is raised here, on the source, and the process goes on

    fd = os.open("/var/tmp/ckpt", os.O_RDONLY | os.O_DIRECTORY)
    result = checkpoint_self(fd)
    # returns twice, like fork(): now with outcome "checkpointed" (the caller keeps running),
    # and again with outcome "restored" in a process restored later with `criu restore -D ...`

The agent (``phaul agent --self-socket``) takes the caller's identity from the kernel
(``SO_PEERCRED``); the request names no process. What moves is the caller's process tree, or
the whole pid namespace when the caller runs in one (see :mod:`phaul.target.selfmig`). The tree
must be a session of its own (``setsid``) or a pid namespace, as for ``phaul migrate``.

What the caller sees: the call blocks in ``read()`` on its socket to the agent. After the tree
is frozen the agent writes a last line (``frozen``) and hangs up; CRIU dumps that socket as a
stream socket whose peer is gone, with the line still queued, and restores it the same way. So in
a restored process the read returns that line and then end-of-file, exactly as in the original
once it resumes; the library tells the two apart by the process's start time and the host's
boot id (a restored process is a new kernel task) and, in the original, asks the agent on a new
connection how the request ended.
"""

from __future__ import annotations

import array
import base64
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phaul.errors import PhaulError

DEFAULT_SOCKET = "/run/phaul/self.sock"
MAX_LINE = 64 << 10


class SelfMigrationFailed(PhaulError):
    """The agent refused the request, or the migration/checkpoint failed (the caller runs on)."""

    code = "self-migration"
    exit_code = 11

    def __init__(self, message: str, *, remote_code: str = "") -> None:
        super().__init__(message)
        self.remote_code = remote_code


@dataclass(frozen=True)
class SelfResult:
    """``outcome``: "migrated" (we run on the target), "checkpointed" (images written, this is
    the original process) or "restored" (this process was restored from a checkpoint)."""

    outcome: str
    request: str
    detail: dict[str, Any] = field(default_factory=dict)


def task_identity() -> tuple[str, int]:
    """(boot id, start time of this process): both survive nothing but the original task."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    stat = Path("/proc/self/stat").read_text()
    return boot, int(stat.rpartition(")")[2].split()[19])


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise SelfMigrationFailed(
            f"cannot reach the phaul agent at {path}: {err.strerror or err} "
            "(is `phaul agent --self-socket` running?)"
        ) from err
    return sock


def _send(sock: socket.socket, request: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(request).encode() + b"\n"
    if fd is None:
        sock.sendall(data)
        return
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def _lines(sock: socket.socket) -> list[dict[str, Any]]:
    """Every line until the agent hangs up (blocks: this is where the process is frozen)."""
    buf = b""
    while True:
        try:
            chunk = sock.recv(MAX_LINE)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
    out = []
    for line in buf.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _raise(msg: dict[str, Any]) -> None:
    raise SelfMigrationFailed(
        str(msg.get("error") or "the agent refused the request"),
        remote_code=str(msg.get("code", "")),
    )


def _request(
    request: dict[str, Any], restored: str, socket_path: str, fd: int | None = None
) -> SelfResult:
    before = task_identity()
    sock = _connect(socket_path)
    try:
        _send(sock, request, fd)
        msgs = _lines(sock)
    finally:
        sock.close()
    request_id = ""
    frozen = False
    for m in msgs:
        if m.get("stage") == "error":
            _raise(m)
        if m.get("stage") == "accepted":
            request_id = str(m.get("request", ""))
        if m.get("stage") == "frozen":
            frozen = True
            request_id = str(m.get("request", request_id))
    if not frozen:
        raise SelfMigrationFailed("the agent hung up before the process was frozen")
    if task_identity() != before:
        return SelfResult(restored, request_id)
    # Still the original task: the migration rolled back, or the checkpoint is being written.
    sock = _connect(socket_path)
    try:
        _send(sock, {"op": "result", "request": request_id})
        answers = _lines(sock)
    finally:
        sock.close()
    for m in answers:
        if m.get("stage") == "error":
            _raise(m)
        if m.get("stage") == "done":
            if not m.get("ok"):
                _raise(m)
            detail = {k: v for k, v in m.items() if k not in ("stage", "ok", "outcome")}
            return SelfResult(str(m.get("outcome", "")), request_id, detail)
    raise SelfMigrationFailed("the agent did not say how the request ended")


def migrate_self(
    to: str,
    token_file: str | os.PathLike[str] | None = None,
    *,
    socket_path: str = DEFAULT_SOCKET,
) -> SelfResult:
    """Move the calling process tree to the agent at ``to`` ("HOST:PORT").

    Returns on the target (outcome "migrated"). Raises SelfMigrationFailed on the source when the
    agent refuses or the migration fails (the tree then runs on here, unchanged).
    ``token_file``: the target's token (read here, so it must be readable by the caller); None
    uses the local agent's own token.
    """
    req: dict[str, Any] = {"op": "migrate", "to": to}
    if token_file is not None:
        try:
            token = Path(token_file).read_bytes().strip()
        except OSError as err:
            raise SelfMigrationFailed(f"cannot read token file {token_file}: {err}") from err
        req["token"] = base64.b64encode(token).decode()
    return _request(req, "migrated", socket_path)


def checkpoint_self(dir_fd: int, *, socket_path: str = DEFAULT_SOCKET) -> SelfResult:
    """Checkpoint the calling process tree into the empty directory open as ``dir_fd``.

    Returns "checkpointed" in the caller once the images are written (it keeps running), and
    "restored" in a process later restored from them (``criu restore -D DIR``). Raises
    SelfMigrationFailed when the agent refuses or CRIU fails.
    """
    return _request({"op": "checkpoint"}, "restored", socket_path, fd=dir_fd)
