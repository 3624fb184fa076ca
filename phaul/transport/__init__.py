"""Transports carry control frames and page streams; sessions do not know which one they use.

A :class:`Dialer` opens connections to one agent (plain TCP here; TLS and SSH dialers live next
to it). Each connection is an asyncio stream pair; page-stream threads get a blocking socket for
it from :func:`phaul.transport.bridge.page_socket`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Dialer(Protocol):
    description: str  # shown to the operator, e.g. "10.0.0.2:7707 (token, not encrypted)"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new authenticated-transport connection to the agent (auth handshake not done)."""
        ...

    async def close(self) -> None:
        """Release what the dialer holds (e.g. an SSH connection)."""
        ...


class TcpDialer:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.description = f"{host}:{port} (token auth, not encrypted)"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from phaul.transport.tcp import connect

        return await connect(self.host, self.port)

    async def close(self) -> None:
        return None
