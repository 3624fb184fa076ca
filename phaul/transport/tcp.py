"""Plain TCP transport (token mode): asyncio streams for control, raw sockets for page streams."""

from __future__ import annotations

import asyncio
import os
import socket

from phaul.errors import ConnectError, UsageError

DEFAULT_PORT = 7707
CONNECT_TIMEOUT = 10.0


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host:
        raise UsageError(f"bad address {text!r}: expected HOST:PORT")
    try:
        number = int(port)
    except ValueError as err:
        raise UsageError(f"bad port in {text!r}: expected HOST:PORT") from err
    if not 0 < number < 65536:
        raise UsageError(f"bad port in {text!r}")
    return host, number


async def connect(
    host: str, port: int, timeout: float = CONNECT_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError as err:
        raise ConnectError(
            f"no answer from {host}:{port} within {timeout:.0f}s: is `phaul agent` running "
            "there and reachable?"
        ) from err
    except OSError as err:
        raise ConnectError(
            f"cannot connect to {host}:{port}: {err.strerror or err}: is `phaul agent` running "
            "there and reachable?"
        ) from err
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def detach_socket(writer: asyncio.StreamWriter) -> socket.socket:
    """Take the connection out of asyncio as a blocking socket (for a page stream thread).

    Only safe when the peer sends nothing until we answered (the page-stream handshake ends with
    our AuthOk / the agent's AuthOk), so no bytes sit in the StreamReader's buffer.
    """
    tsock = writer.get_extra_info("socket")
    if tsock is None:
        raise ConnectError("page stream transport has no socket")
    fd = os.dup(tsock.fileno())
    # Closing the asyncio transport closes only its own fd (no shutdown): the dup keeps the
    # connection open for the blocking page stream.
    writer.close()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock
