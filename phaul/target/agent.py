"""``phaul agent``: accept authenticated connections and run one TargetSession per migration.

Every connection authenticates first (phaul.protocol.auth); until then the agent reads at most
one small Hello frame. Control connections become sessions; page connections join the session
whose ticket they present; status connections ask what became of a migration (a source that
lost its connection right after saying Commit asks here instead of guessing).

Limits (what keeps a peer from abusing the agent):
- ``allow_sources``: a connection from an address outside these networks is closed before any
  byte is read or written (before TLS too: the agent listens in plain TCP and starts TLS after
  the check); ``allow_cns``: with TLS, the peer certificate's CN must be one of these.
- at most ``max_sessions`` concurrent migrations, ``MAX_PENDING`` connections still in their
  handshake;
- ``max_image_bytes``: disk quota of one migration (pages and image files), enforced by the page
  stores and the session's image writer; exceeding it rolls the migration back;
- ``idle_timeout``: a peer that sends nothing for that long, on the control connection or on the
  page stream of its session, is dropped and its migration rolled back (:class:`IdleChannel`,
  :class:`ActivitySocket`). Each control step keeps its own, longer deadline as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.errors import PhaulError, ProtocolError, UsageError
from phaul.pb import phaul_pb2 as pb
from phaul.phase import Phase
from phaul.protocol.auth import TRANSPORT_ONLY, load_token, server_handshake, transport_identity
from phaul.protocol.framing import Channel
from phaul.target.journal import recover
from phaul.target.session import TargetSession
from phaul.transport.bridge import page_socket
from phaul.transport.tcp import parse_hostport
from phaul.transport.tls import TlsConfig, peer_name, server_context

log = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_PENDING = 32  # connections still authenticating
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_SELF_SOCKET = "/run/phaul/self.sock"


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[IpNetwork, ...]:
    """``--allow-source`` values (CIDR or a single address) -> networks; UsageError if bad."""
    nets: list[IpNetwork] = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v, strict=False))
        except ValueError as err:
            raise UsageError(f"--allow-source {v!r}: not an address or CIDR network") from err
    return tuple(nets)


def address_allowed(peer: Any, allowed: tuple[IpNetwork, ...]) -> bool:
    """True when ``peer`` (a peername) lies in one of ``allowed`` (empty: everything is).

    Unix-socket peers (SSH stdio mode: the SSH server authenticated them) are always allowed.
    IPv4-mapped IPv6 addresses are compared as IPv4.
    """
    if not allowed or not isinstance(peer, tuple):
        return True
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in allowed)


class IdleChannel(Channel):
    """A control channel that gives up on a peer that stops talking.

    A read fails with TimeoutError once neither this connection nor the session's page stream
    (which calls :meth:`touch`) has received anything for ``idle_timeout`` seconds, and with the
    page stream's exception as soon as that stream fails (``watch`` returns its future), so a
    broken or over-quota page stream ends the session at once instead of at the next deadline.
    A frame that trickles in byte by byte counts as idle: only complete frames are activity.
    """

    def __init__(self, *args: Any, idle_timeout: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.watch: Callable[[], asyncio.Future[Any] | None] | None = None

    def touch(self) -> None:
        """Something arrived from the peer (called from page-stream threads too)."""
        self.last_activity = time.monotonic()

    async def _read_one(self) -> Any:
        read = asyncio.ensure_future(super()._read_one())
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {read}
                side = self.watch() if self.watch is not None else None
                if side is not None:
                    if side.done():
                        if not side.cancelled() and side.exception() is not None:
                            raise side.exception()  # type: ignore[misc]
                    else:
                        waits.add(side)
                left = self.idle_timeout - (time.monotonic() - self.last_activity)
                if left <= 0:
                    raise TimeoutError(f"peer sent nothing for {self.idle_timeout:g} s")
                done, _ = await asyncio.wait(
                    waits, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if read in done:
                    self.touch()
                    return read.result()
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await read


class ActivitySocket(socket.socket):
    """A page-stream socket with a receive timeout that reports every receive as activity."""

    on_activity: Callable[[], None] | None = None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        if self.on_activity is not None:
            self.on_activity()
        return n


@dataclass(frozen=True)
class AgentConfig:
    host: str
    port: int
    token: bytes
    workdir: Path
    ip_dev: str | None = None
    max_sessions: int = 4
    max_image_bytes: int = 0  # 0: no quota
    handshake_timeout: float = 10.0
    tls: TlsConfig | None = None  # mutual TLS (clients need a certificate from tls.ca)
    stdio: bool = False  # one session on stdin/stdout, run by SSH (phaul.transport.ssh)
    allow_sources: tuple[IpNetwork, ...] = ()  # (): any address
    allow_cns: tuple[str, ...] = ()  # TLS: (): any certificate from tls.ca
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    self_socket: Path | None = None  # local self-migration service (phaul.target.selfmig)
    self_socket_group: str | None = None  # None: mode 0666; else 0660 with this group


class Agent:
    def __init__(self, config: AgentConfig, criu: CriuBinary) -> None:
        self.config = config
        self.criu = criu
        self.agent_id = secrets.token_hex(4)
        self.sessions: set[TargetSession] = set()
        self.tickets: dict[bytes, TargetSession] = {}
        self.outcomes: dict[str, tuple[Phase, int]] = {}
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._ssl: ssl.SSLContext | None = None
        self.page_socks: dict[TargetSession, set[socket.socket]] = {}
        self.self_service: Any = None
        self.refused = 0  # connections closed by allow_sources / allow_cns / limits

    # --- bookkeeping used by sessions ---------------------------------------------------------
    def record(self, migration_id: str, phase: Phase, root_pid: int) -> None:
        if migration_id:
            self.outcomes[migration_id] = (phase, root_pid)

    def register_ticket(self, ticket: bytes, session: TargetSession) -> None:
        self.tickets[ticket] = session

    def unregister_ticket(self, ticket: bytes) -> None:
        self.tickets.pop(ticket, None)

    def forget(self, session: TargetSession) -> None:
        self.sessions.discard(session)
        if session.ticket:
            self.tickets.pop(session.ticket, None)

    def adopt(self, pid: int) -> None:
        """Reap a restored tree's root when it exits (it is our child through rst_sibling)."""

        def wait() -> None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)

        threading.Thread(target=wait, name=f"reap-{pid}", daemon=True).start()

    # --- serving ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        rolled = await asyncio.to_thread(recover, self.config.workdir)
        if rolled:
            log.warning("rolled back %d interrupted migration(s): %s", len(rolled), rolled)
        # TLS starts in _accept, after the source address was checked (start_tls).
        self._ssl = server_context(self.config.tls) if self.config.tls else None
        self.server = await asyncio.start_server(self._accept, self.config.host, self.config.port)
        if self._ssl is None:
            log.warning("token auth over plain TCP: traffic (memory included) is NOT encrypted")
        if self.config.self_socket is not None:
            from phaul.target.selfmig import SelfService

            self.self_service = SelfService(self)
            await self.self_service.start()
        addrs = ", ".join(str(s.getsockname()) for s in self.server.sockets)
        log.info("agent %s listening on %s (CRIU %s)", self.agent_id, addrs, self.criu.version)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if await self._admit(writer):
                await self._handle(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Source address, TLS and certificate name checks; False: the connection was closed."""
        cfg = self.config
        peername = writer.get_extra_info("peername")
        why = ""
        if not address_allowed(peername, cfg.allow_sources):
            why = "source address not allowed (--allow-source)"
        elif self._pending >= MAX_PENDING:
            why = f"too many connections in their handshake ({MAX_PENDING})"
        elif self._ssl is not None:
            try:
                await writer.start_tls(self._ssl, ssl_handshake_timeout=cfg.handshake_timeout)
            except (OSError, ConnectionError, TimeoutError) as err:  # ssl.SSLError is an OSError
                why = f"TLS handshake failed: {err}"
            else:
                cn = peer_name(writer.get_extra_info("peercert"))
                if cfg.allow_cns and cn not in cfg.allow_cns:
                    why = f"certificate CN {cn!r} not allowed (--allow-cn)"
        if not why:
            return True
        self.refused += 1
        log.warning("refused connection from %s: %s", peername, why)
        writer.transport.abort()
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        chan = IdleChannel(
            reader, writer, max_frame=64 << 10, idle_timeout=self.config.idle_timeout
        )  # frames stay small until authenticated
        self._pending += 1
        try:
            # Stdio mode: everything arrives through SSH (stdio, or a unix socket in a 0700 dir).
            ident = transport_identity(writer) or ("ssh:stdio" if self.config.stdio else None)
            hello = await server_handshake(
                chan, self.config.token, self.agent_id, transport_peer=ident
            )
        except (PhaulError, TimeoutError) as err:
            perr = err if isinstance(err, PhaulError) else ProtocolError("handshake timed out")
            log.warning("refused connection from %s: %s", peer, perr)
            await chan.send_error(perr)
            await chan.close()
            return
        except (ConnectionError, OSError) as err:
            log.info("connection from %s lost during handshake: %s", peer, err)
            await chan.close()
            return
        finally:
            self._pending -= 1
        chan.max_frame = 4 << 20
        if hello.role == "control":
            if len(self.sessions) >= self.config.max_sessions:
                self.refused += 1
                log.warning(
                    "refused session from %s: %d sessions running", peer, len(self.sessions)
                )
                await chan.send_error(ProtocolError("agent busy: too many concurrent migrations"))
                await chan.close()
                return
            session = TargetSession(self, chan, peer)
            chan.watch = lambda: session.page_done
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                # A page stream still receiving for a finished session is cut now.
                for psock in self.page_socks.pop(session, set()):
                    with contextlib.suppress(OSError):
                        psock.shutdown(socket.SHUT_RDWR)
        elif hello.role == "pages":
            target = self.tickets.get(hello.ticket)
            if target is None:
                await chan.send_error(ProtocolError("unknown or expired page ticket"))
                await chan.close()
                return
            raw, bridge = await page_socket(reader, writer)
            sock = self._page_stream_socket(raw, target)
            try:
                await target.attach_page_stream(sock, hello.stream)
            except (PhaulError, OSError) as err:
                log.warning("page stream from %s failed: %s", peer, err)
            finally:
                self.page_socks.get(target, set()).discard(sock)
                sock.close()
                if bridge is not None:
                    # Let the pump deliver the store's last answer (CRIU waits for it).
                    with contextlib.suppress(Exception):
                        await asyncio.wait(bridge.tasks[1:], timeout=5)
                    await bridge.close()
        elif hello.role == "status":
            try:
                query = await chan.recv(pb.StatusQuery, 10)
                phase, pid = self.outcomes.get(query.migration_id, (None, 0))
                await chan.send(
                    pb.Status(
                        migration_id=query.migration_id,
                        phase=phase.value if phase else "",
                        root_pid=pid,
                    )
                )
            except (PhaulError, TimeoutError, ConnectionError, OSError) as err:
                log.info("status query from %s failed: %s", peer, err)
            await chan.close()
        else:
            await chan.send_error(ProtocolError(f"unknown role {hello.role!r}"))
            await chan.close()

    def _page_stream_socket(self, raw: socket.socket, session: TargetSession) -> socket.socket:
        """The page stream's socket with the idle timeout; its receives keep the session alive."""
        sock = ActivitySocket(fileno=raw.detach())
        sock.settimeout(self.config.idle_timeout)
        chan = session.chan
        if isinstance(chan, IdleChannel):
            sock.on_activity = chan.touch
        self.page_socks.setdefault(session, set()).add(sock)
        return sock

    async def serve_forever(self) -> None:
        await self.start()
        assert self.server is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with self.server:
            await stop.wait()
        if self.self_service is not None:
            await self.self_service.close()
        log.info("agent stopping")


def cmd_agent(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.listen)
    tls = TlsConfig.from_args(
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_ca", None),
    )
    stdio = bool(getattr(args, "stdio", False))
    if tls is not None:
        server_context(tls)  # fail now on unreadable files, not at the first connection
    # With TLS or SSH the transport authenticates the source: the token becomes optional.
    token = load_token(args.token_file or (TRANSPORT_ONLY if tls or stdio else None))
    criu = find_criu(args.criu)
    allow_cns = tuple(getattr(args, "allow_cn", None) or ())
    if allow_cns and tls is None:
        raise UsageError("--allow-cn needs mutual TLS (--tls-cert/--tls-key/--tls-ca)")
    max_sessions = int(getattr(args, "max_sessions", None) or 4)
    max_mib = int(getattr(args, "max_image_mib", None) or 0)
    idle = float(getattr(args, "idle_timeout", None) or DEFAULT_IDLE_TIMEOUT)
    if max_sessions < 1 or max_mib < 0 or idle <= 0:
        raise UsageError("--max-sessions must be >= 1, --max-image-mib >= 0, --idle-timeout > 0")
    self_sock = getattr(args, "self_socket", None)
    config = AgentConfig(
        host=host, port=port, token=token, workdir=Path(args.workdir), ip_dev=args.ip_dev,
        tls=tls, stdio=stdio, max_sessions=1 if stdio else max_sessions,
        max_image_bytes=max_mib << 20, idle_timeout=idle,
        allow_sources=parse_networks(getattr(args, "allow_source", None) or ()),
        allow_cns=allow_cns,
        self_socket=Path(self_sock) if self_sock and not stdio else None,
        self_socket_group=getattr(args, "self_socket_group", None),
    )  # fmt: skip
    if stdio:
        from phaul.transport.ssh import serve_stdio

        asyncio.run(serve_stdio(Agent(config, criu)))
        return 0
    asyncio.run(Agent(config, criu).serve_forever())
    return 0
