"""SSH transport: ``phaul migrate PID --to ssh://[user@]host[:port]`` (asyncssh).

Theory of operation. The source opens one SSH connection with the operator's keys (ssh-agent,
``~/.ssh/id_*`` or ``--ssh-key``) and checks the host key against ``~/.ssh/known_hosts`` (or
``--ssh-known-hosts``); an unknown host is refused unless ``--ssh-accept-unknown`` (then its key
is recorded, as OpenSSH's ``StrictHostKeyChecking=accept-new`` does); a changed key is always
refused. Over that connection it runs ``phaul agent --stdio`` (configurable), which:

1. moves its stdin/stdout aside (so CRIU or any child writing to fd 1 cannot corrupt the protocol),
2. listens on a unix socket in a private 0700 temporary directory and announces it with one line
   ``PHAUL-STDIO 1 <path>`` on stdout,
3. serves exactly one control session on stdin/stdout; page and status connections arrive on the
   unix socket, which the source reaches as further channels of the same SSH connection
   (``direct-streamlocal``, asyncssh's ``open_unix_connection``), so every byte is encrypted and
   authenticated by SSH and no extra port is opened.

SSH authenticated both ends, so the phaul handshake runs in transport-authenticated mode (no
token needed; with a token both are checked). The agent's log (stderr) is relayed to our log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import tempfile
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from phaul.errors import AuthError, ConnectError, UsageError
from phaul.protocol.auth import TRANSPORT_AUTH_INFO

if TYPE_CHECKING:
    import asyncssh

    from phaul.target.agent import Agent

log = logging.getLogger(__name__)

ANNOUNCE = b"PHAUL-STDIO 1 "
DEFAULT_AGENT_COMMAND = "phaul agent --stdio"
START_TIMEOUT = 30.0
STDIO_IDENTITY = "ssh:stdio"


# --- source side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SshConfig:
    host: str
    port: int = 22
    user: str | None = None
    known_hosts: Path | None = None  # None: ~/.ssh/known_hosts
    accept_unknown: bool = False
    keys: tuple[Path, ...] = ()  # (): ssh-agent and the default ~/.ssh/id_* keys
    agent_command: str = DEFAULT_AGENT_COMMAND
    connect_timeout: float = 15.0
    extra: dict[str, Any] = field(default_factory=dict)  # more asyncssh.connect options

    @classmethod
    def parse(cls, url: str, **kw: Any) -> SshConfig:
        """``ssh://[user@]host[:port]`` -> SshConfig (UsageError when malformed)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"bad SSH target {url!r}: expected ssh://[user@]host[:port]")
        try:
            port = parts.port or 22
        except ValueError as err:
            raise UsageError(f"bad port in {url!r}") from err
        return cls(host=parts.hostname, port=port, user=parts.username or None, **kw)

    @property
    def known_hosts_path(self) -> Path:
        return self.known_hosts or Path("~/.ssh/known_hosts").expanduser()

    @property
    def where(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"ssh://{user}{self.host}" + (f":{self.port}" if self.port != 22 else "")


def _host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _make_client(cfg: SshConfig, seen: list[asyncssh.SSHKey]) -> type[asyncssh.SSHClient]:
    import asyncssh

    class Client(asyncssh.SSHClient):
        def validate_host_public_key(
            self, host: str, addr: str, port: int, key: asyncssh.SSHKey
        ) -> bool:
            """Called only for keys not trusted by known_hosts: accept-new semantics."""
            seen.append(key)
            path = cfg.known_hosts_path
            if not cfg.accept_unknown:
                return False
            known: tuple[Any, ...] = ((), (), ())
            if path.is_file():
                known = asyncssh.match_known_hosts(
                    str(path), host, addr, port if port != 22 else None
                )
            if known[0] or known[1] or known[2]:
                log.error("host key of %s changed (now %s): refusing", host, key.get_fingerprint())
                return False  # known host, different key: never accepted
            line = f"{_host_pattern(host, port)} {key.export_public_key('openssh').decode()}"
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(line if line.endswith("\n") else line + "\n")
            log.warning(
                "accepted unknown host key of %s (%s), recorded in %s",
                host,
                key.get_fingerprint(),
                path,
            )
            return True

    return Client


class SshDialer:
    """One SSH connection; the first ``open`` is the agent's stdio, later ones unix channels."""

    def __init__(self, cfg: SshConfig) -> None:
        self.cfg = cfg
        self.description = f"{cfg.where} (SSH, encrypted)"
        self._conn: asyncssh.SSHClientConnection | None = None
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._socket_path = ""
        self._stderr_task: asyncio.Task[None] | None = None
        self.agent_log: deque[str] = deque(maxlen=30)

    @property
    def identity(self) -> str:
        return f"ssh:{self.cfg.user or ''}@{self.cfg.host}"

    async def _connect(self) -> asyncssh.SSHClientConnection:
        import asyncssh

        cfg = self.cfg
        seen: list[asyncssh.SSHKey] = []
        opts: dict[str, Any] = {
            "port": cfg.port,
            "known_hosts": str(cfg.known_hosts) if cfg.known_hosts else (),
            "client_factory": _make_client(cfg, seen),
            "connect_timeout": cfg.connect_timeout,
            "password_auth": False,
            "kbdint_auth": False,
            "gss_auth": False,
            # AES-GCM uses AES-NI through OpenSSL: ~20% more page goodput than chacha20 here
            # (bench/goodput.py); chacha20 stays as a fallback.
            "encryption_algs": [
                "aes128-gcm@openssh.com",
                "aes256-gcm@openssh.com",
                "chacha20-poly1305@openssh.com",
                "aes128-ctr",
                "aes256-ctr",
            ],
            **cfg.extra,
        }
        if cfg.user:
            opts["username"] = cfg.user
        if cfg.keys:
            opts["client_keys"] = [str(k) for k in cfg.keys]
        try:
            conn = await asyncssh.connect(cfg.host, **opts)
        except asyncssh.HostKeyNotVerifiable as err:
            fp = f" (offered key {seen[-1].get_fingerprint()})" if seen else ""
            raise AuthError(
                f"host key of {cfg.host} is not trusted{fp}: it is not in "
                f"{cfg.known_hosts_path} or it changed. Verify it and add it to that file, "
                "or pass --ssh-accept-unknown for a first connection"
            ) from err
        except asyncssh.PermissionDenied as err:
            raise AuthError(
                f"{cfg.where} refused our SSH keys: load one in ssh-agent or pass --ssh-key"
            ) from err
        except (asyncssh.Error, OSError, TimeoutError) as err:
            raise ConnectError(f"cannot reach {cfg.where}: {err}") from err
        return conn

    def _mark(self, writer: Any) -> None:
        # No raw socket: page streams must be bridged (bridge.is_plain), and the handshake may
        # rely on SSH having authenticated the agent (auth.transport_identity).
        writer.channel.set_extra_info(socket=None, **{TRANSPORT_AUTH_INFO: self.identity})

    async def _pump_stderr(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        with contextlib.suppress(Exception):
            while line := await proc.stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self.agent_log.append(text)
                log.debug("ssh agent: %s", text)

    async def _start_agent(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self._conn = await self._connect()
        try:
            self._proc = await self._conn.create_process(self.cfg.agent_command, encoding=None)
        except Exception as err:
            raise ConnectError(f"cannot start `{self.cfg.agent_command}` there: {err}") from err
        self._stderr_task = asyncio.create_task(self._pump_stderr(self._proc))
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.startswith(ANNOUNCE):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait_closed(), 2)
            tail = " | ".join(list(self.agent_log)[-5:]) or line.decode(errors="replace")
            raise ConnectError(
                f"`{self.cfg.agent_command}` did not start on {self.cfg.where}: "
                f"{tail or 'no output'} (is phaul installed there? see --ssh-agent-command)"
            )
        self._socket_path = line[len(ANNOUNCE) :].decode().strip()
        self._mark(self._proc.stdin)
        log.info("agent started over %s (page channel %s)", self.cfg.where, self._socket_path)
        return (
            cast(asyncio.StreamReader, self._proc.stdout),
            cast(asyncio.StreamWriter, self._proc.stdin),
        )

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None:
            return await self._start_agent()
        try:
            reader, writer = await self._conn.open_unix_connection(self._socket_path)
        except Exception as err:
            raise ConnectError(f"cannot open a channel to the agent over SSH: {err}") from err
        self._mark(writer)
        return cast(asyncio.StreamReader, reader), cast(asyncio.StreamWriter, writer)

    async def close(self) -> None:
        if self._proc is not None:
            self._proc.close()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.wait_closed(), 5)
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stderr_task


# --- agent side --------------------------------------------------------------------------------
async def _stdio_streams() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The protocol streams on (copies of) fds 0 and 1; fd 0 becomes /dev/null, fd 1 stderr."""
    loop = asyncio.get_running_loop()
    in_fd, out_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", 0)
    )
    wproto = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    wtransport, _ = await loop.connect_write_pipe(lambda: wproto, os.fdopen(out_fd, "wb", 0))
    return reader, asyncio.StreamWriter(wtransport, wproto, reader, loop)


async def serve_stdio(agent: Agent) -> None:
    """Serve one control session on stdin/stdout (``phaul agent --stdio``, run by SSH).

    Page and status connections come in on a unix socket in a private 0700 directory, announced
    on stdout before the control protocol starts. Returns when the control session has ended
    and its page streams are done.
    """
    agent.config.workdir.mkdir(parents=True, exist_ok=True)
    reader, writer = await _stdio_streams()
    tmpdir = tempfile.mkdtemp(prefix="phaul-stdio-")  # mode 0700
    sock_path = Path(tmpdir) / "agent.sock"
    path = str(sock_path)
    server = await asyncio.start_unix_server(agent._accept, path)
    sock_path.chmod(0o600)
    try:
        writer.write(ANNOUNCE + path.encode() + b"\n")
        await writer.drain()
        log.info("agent %s serving one session on stdio (pages: %s)", agent.agent_id, path)
        await agent._accept(reader, writer)
        pending = {t for t in agent._tasks if t is not asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=30)
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        shutil.rmtree(tmpdir, ignore_errors=True)
        writer.close()
    log.info("stdio session ended")


def agent_command_argv(command: str) -> list[str]:
    """Split ``--ssh-agent-command`` (checked: it must contain --stdio)."""
    argv = shlex.split(command)
    if "--stdio" not in argv:
        raise UsageError(f"--ssh-agent-command {command!r} must run `phaul agent --stdio`")
    return argv
