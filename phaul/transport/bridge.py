"""Give a blocking page-stream thread a socket, whatever the transport.

Plain TCP connections are taken out of asyncio as they are (no copy). Encrypted ones (TLS, an SSH
channel) stay in asyncio; a local socketpair is bridged to them by two pump tasks, and the
thread gets the other end. Either way the thread sees ``recv_into``/``sendall`` on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from phaul.transport.tcp import detach_socket

PUMP_CHUNK = 1 << 20


def is_plain(writer: asyncio.StreamWriter) -> bool:
    return (
        writer.get_extra_info("ssl_object") is None
        and writer.get_extra_info("socket") is not None
        and writer.get_extra_info("peername") is not None
        and not hasattr(writer.transport, "get_channel")  # asyncssh-style channels
    )


class Bridge:
    """Pumps bytes between an asyncio stream pair and a local socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.thread_end, self._local = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._local.setblocking(False)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> socket.socket:
        self.tasks = [
            asyncio.create_task(self._to_thread()),
            asyncio.create_task(self._from_thread()),
        ]
        return self.thread_end

    async def _to_thread(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await self.reader.read(PUMP_CHUNK):
                await loop.sock_sendall(self._local, data)
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self._local.shutdown(socket.SHUT_WR)

    async def _from_thread(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(self._local, PUMP_CHUNK):
                self.writer.write(data)
                await self.writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError, AttributeError):
                if self.writer.can_write_eof():
                    self.writer.write_eof()

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._local.close()
        self.writer.close()


async def page_socket(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[socket.socket, Bridge | None]:
    """A blocking socket carrying this connection's bytes (and the bridge to close, if any)."""
    if is_plain(writer):
        return detach_socket(writer), None
    bridge = Bridge(reader, writer)
    return await bridge.start(), bridge
