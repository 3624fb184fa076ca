"""``phaul agent``: accept authenticated connections and run one TargetSession per migration.

Every connection authenticates first (phaul.protocol.auth); until then the agent reads at most
one small Hello frame. Control connections become sessions; page connections join the session
whose ticket they present; status connections ask what became of a migration (a source that
lost its connection right after saying Commit asks here instead of guessing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.errors import PhaulError, ProtocolError
from phaul.pb import phaul_pb2 as pb
from phaul.phase import Phase
from phaul.protocol.auth import TRANSPORT_ONLY, load_token, server_handshake, transport_identity
from phaul.protocol.framing import Channel
from phaul.target.journal import recover
from phaul.target.session import TargetSession
from phaul.transport.bridge import page_socket
from phaul.transport.tcp import parse_hostport
from phaul.transport.tls import TlsConfig, server_context

log = logging.getLogger(__name__)


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
        ssl_ctx = server_context(self.config.tls) if self.config.tls else None
        self.server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, ssl=ssl_ctx
        )
        if ssl_ctx is None:
            log.warning("token auth over plain TCP: traffic (memory included) is NOT encrypted")
        addrs = ", ".join(str(s.getsockname()) for s in self.server.sockets)
        log.info("agent %s listening on %s (CRIU %s)", self.agent_id, addrs, self.criu.version)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        chan = Channel(reader, writer, max_frame=64 << 10)  # small until authenticated
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
        chan.max_frame = 4 << 20
        if hello.role == "control":
            if len(self.sessions) >= self.config.max_sessions:
                await chan.send_error(ProtocolError("agent busy: too many concurrent migrations"))
                await chan.close()
                return
            session = TargetSession(self, chan, peer)
            self.sessions.add(session)
            await session.run()
        elif hello.role == "pages":
            target = self.tickets.get(hello.ticket)
            if target is None:
                await chan.send_error(ProtocolError("unknown or expired page ticket"))
                await chan.close()
                return
            sock, bridge = await page_socket(reader, writer)
            try:
                await target.attach_page_stream(sock, hello.stream)
            except (PhaulError, OSError) as err:
                log.warning("page stream from %s failed: %s", peer, err)
            finally:
                if bridge is not None:
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

    async def serve_forever(self) -> None:
        await self.start()
        assert self.server is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with self.server:
            await stop.wait()
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
    config = AgentConfig(
        host=host, port=port, token=token, workdir=Path(args.workdir), ip_dev=args.ip_dev,
        tls=tls, stdio=stdio, max_sessions=1 if stdio else 4,
    )  # fmt: skip
    if stdio:
        from phaul.transport.ssh import serve_stdio

        asyncio.run(serve_stdio(Agent(config, criu)))
        return 0
    asyncio.run(Agent(config, criu).serve_forever())
    return 0
