"""Agent limits without root: address filters, idle control channel, page-socket activity, and the
self-migration request parser (a request can never name a process)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from phaul.errors import ProtocolError, UsageError
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.framing import encode
from phaul.target.agent import ActivitySocket, IdleChannel, address_allowed, parse_networks
from phaul.target.selfmig import copy_into, parse_request


def test_networks_and_addresses() -> None:
    nets = parse_networks(["10.1.2.0/24", "192.168.0.7", "fd00::/8"])
    assert address_allowed(("10.1.2.9", 5000), nets)
    assert address_allowed(("192.168.0.7", 1), nets)
    assert not address_allowed(("192.168.0.8", 1), nets)
    assert address_allowed(("::ffff:10.1.2.3", 1, 0, 0), nets)  # IPv4-mapped
    assert address_allowed(("fd12::1", 1, 0, 0), nets)
    assert not address_allowed(("10.1.3.1", 1), nets)
    assert not address_allowed(("garbage", 1), nets)
    assert address_allowed(("1.2.3.4", 1), ())  # no filter
    assert address_allowed("", nets)  # unix socket (SSH stdio mode)
    with pytest.raises(UsageError):
        parse_networks(["10.0.0.0/33"])


class _Writer:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


def test_idle_channel_drops_a_silent_peer() -> None:
    async def go() -> float:
        reader = asyncio.StreamReader()
        chan = IdleChannel(reader, _Writer(), idle_timeout=0.3)  # type: ignore[arg-type]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await chan.recv_any(30)
        return time.monotonic() - t0

    assert 0.25 < asyncio.run(go()) < 2


def test_idle_channel_page_activity_keeps_it_alive_and_trickle_does_not() -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        chan = IdleChannel(reader, _Writer(), idle_timeout=0.3)  # type: ignore[arg-type]

        async def pages() -> None:  # the page stream is busy for 0.8 s, then a frame arrives
            for _ in range(8):
                chan.touch()
                await asyncio.sleep(0.1)
            reader.feed_data(encode(pb.Commit()))

        task = asyncio.create_task(pages())
        assert isinstance(await chan.recv_any(5), pb.Commit)
        await task
        # A frame trickling in byte by byte is not activity.
        frame = encode(pb.Commit())

        async def trickle() -> None:
            for b in frame[:-1]:
                reader.feed_data(bytes([b]))
                await asyncio.sleep(0.1)

        task = asyncio.create_task(trickle())
        with pytest.raises(TimeoutError):
            await chan.recv_any(5)
        task.cancel()

    asyncio.run(go())


def test_idle_channel_raises_page_stream_failure_at_once() -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        chan = IdleChannel(reader, _Writer(), idle_timeout=30)  # type: ignore[arg-type]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        chan.watch = lambda: fut
        asyncio.get_running_loop().call_later(0.1, fut.set_exception, ProtocolError("quota"))
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="quota"):
            await chan.recv_any(30)
        assert time.monotonic() - t0 < 2

    asyncio.run(go())


def test_activity_socket_reports_receives_and_times_out() -> None:
    a, b = socket.socketpair()
    s = ActivitySocket(fileno=a.detach())
    seen: list[float] = []
    s.on_activity = lambda: seen.append(time.monotonic())
    s.settimeout(0.2)
    b.sendall(b"hello")
    buf = bytearray(16)
    assert s.recv_into(buf) == 5 and seen
    with pytest.raises(TimeoutError):
        s.recv_into(buf)
    s.close()
    b.close()


@pytest.mark.parametrize(
    "line",
    [
        b'{"op": "migrate", "to": "h:1", "pid": 42}',
        b'{"op": "checkpoint", "root": 42}',
        b'{"op": "migrate", "to": "h:1", "target_pid": "42"}',
        b'{"op": "result", "request": "x", "uid": 0}',
        b'{"op": "migrate"}',
        b'{"op": "migrate", "to": 5}',
        b'{"op": "exec", "cmd": "sh"}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_self_request_parser_refuses(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_request(line)


def test_self_request_parser_accepts() -> None:
    assert parse_request(b'{"op": "migrate", "to": "h:1"}')[0] == "migrate"
    assert parse_request(b'{"op": "checkpoint"}')[0] == "checkpoint"


def test_copy_into_never_follows_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "core-1.img").write_bytes(b"core")
    dst = tmp_path / "dst"
    dst.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (dst / "core-1.img").symlink_to(victim)  # planted by the caller after the emptiness check
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            copy_into(src, fd, os.getuid(), os.getgid())
    finally:
        os.close(fd)
    assert victim.read_text() == "keep"
