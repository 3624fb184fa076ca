"""An agent that cannot be abused: source filters, session and disk limits, idle peers, replayed
and out-of-order frames. Real agents in namespace hosts; clients speak the real protocol."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from phaul.errors import PhaulError, ProtocolError
from phaul.page_server.criu_image import PE_PRESENT
from phaul.page_server.criu_protocol import Command, encode_iov
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.auth import _hello, client_handshake
from phaul.protocol.framing import Channel, decode_body, encode
from tests.integration.lab import Host, Lab
from tests.integration.phaul_lab import (
    PHAUL,
    PORT,
    AgentProc,
    make_token,
    migrate,
    raw_exchange,
    start_agent,
    wait_for,
)
from tests.integration.test_tls import make_pki, start_tls_agent, tls_args
from tests.workloads.counter import last

pytestmark = pytest.mark.integration
T = TypeVar("T")


def on(host: Host, fn: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine function ``fn`` in ``host``'s network namespace."""
    return host.call(lambda: asyncio.run(fn()))  # type: ignore[arg-type]


async def open_chan(agent: AgentProc) -> Channel:
    reader, writer = await asyncio.open_connection(agent.host.ip, PORT)
    return Channel(reader, writer)


async def control(agent: AgentProc) -> Channel:
    chan = await open_chan(agent)
    await client_handshake(chan, agent.token_file.read_bytes().strip())
    return chan


def handshake_works(host: Host, agent: AgentProc) -> bool:
    async def go() -> bool:
        chan = await control(agent)
        await chan.close()
        return True

    return on(host, go)


def frames(data: bytes) -> list[Any]:
    out = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        out.append(decode_body(data[4 : 4 + size]))
        data = data[4 + size :]
    return out


def test_refused_source_address(lab: Lab) -> None:
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    agent = start_agent(lab, b, make_token(lab), extra=["--allow-source", f"{client.ip}/32"])
    hello = encode(_hello())
    # From a: closed before the handshake, not one byte back.
    assert raw_exchange(a, b.ip, hello) == b""
    assert "source address not allowed" in agent.log.read_text()
    # From the allowed host the handshake goes on (HelloReply), and a full one succeeds.
    reply = frames(raw_exchange(client, b.ip, hello))
    assert reply and isinstance(reply[0], pb.HelloReply)
    assert handshake_works(client, agent)
    assert agent.alive()


def test_tls_peer_certificate_name_must_be_allowed(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    pki = make_pki(lab, b.ip)
    d = pki.ca.parent.parent
    subprocess.run(
        [*PHAUL, "certs", "host", "c", "--ca", str(d / "ca"), "--out", str(d)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    agent = start_tls_agent(lab, b, pki, "--allow-cn", "a")
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    workdir = lab.tmpfile("src")
    workdir.unlink()
    argv = [*PHAUL, "migrate", str(wl.root_pid), "--to", f"{b.ip}:{PORT}",
            "--workdir", str(workdir)]  # fmt: skip
    res = subprocess.run(
        a.argv([*argv, *tls_args((d / "c.pem", d / "c.key"), pki.ca)]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode in (7, 8, 9), res.stderr
    assert "certificate CN 'c' not allowed" in agent.log.read_text()  # type: ignore[attr-defined]
    assert wl.alive()
    res = subprocess.run(
        a.argv([*argv, *tls_args(pki.source, pki.ca)]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert agent.poll() is None


def test_too_many_sessions(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    agent = start_agent(lab, b, make_token(lab), extra=["--max-sessions", "1"])

    async def go() -> str:
        first = await control(agent)
        second = await control(agent)
        try:
            await second.recv(pb.PreflightReply, 10)
        except PhaulError as err:
            return str(err)
        finally:
            await first.close()
            await second.close()
        return "no error"

    assert "too many concurrent migrations" in on(a, go)
    assert agent.alive()
    assert handshake_works(a, agent)  # the slot is free again


def test_quota_exceeded_rolls_back_and_source_keeps_running(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    wait_for(lambda: (last(str(out)) or (0,))[0] > 3, 10, "counter to start")
    agent = start_agent(lab, b, make_token(lab), extra=["--max-image-mib", "1"])
    t0 = time.monotonic()
    res = migrate(lab, a, wl.root_pid, agent, "--precopy", "off")
    assert res.returncode in (6, 9, 11, 12), res.stderr[-3000:]
    assert time.monotonic() - t0 < 30  # the source's CRIU does not wait for a deadline
    assert "quota" in agent.log.read_text()
    assert wl.alive() and agent.alive()
    n = (last(str(out)) or (0,))[0]
    wait_for(lambda: (last(str(out)) or (0,))[0] > n + 3, 10, "counter to keep counting")
    assert not list(agent.workdir.glob("*/images/*.img"))


def test_idle_peer_dropped_mid_session_and_mid_transfer(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    agent = start_agent(lab, b, make_token(lab), extra=["--idle-timeout", "2"])

    async def silent_control() -> tuple[float, str]:
        chan = await control(agent)
        t0 = time.monotonic()
        try:
            await chan.recv_any(30)
        except PhaulError as err:
            return time.monotonic() - t0, str(err)
        finally:
            await chan.close()
        return time.monotonic() - t0, "no error"

    elapsed, _why = on(a, silent_control)
    assert elapsed < 8, elapsed

    async def stalled_pages() -> tuple[float, bytes, str]:
        chan = await control(agent)
        await chan.send(pb.PreflightRequest(migration_id="idle-test-1", pids=[1]))
        await chan.recv(pb.PreflightReply, 10)
        await chan.send(pb.Prepare(migration_id="idle-test-1", fresh_pidns=True))
        prep = await chan.recv(pb.PrepareReply, 30)
        reader, writer = await asyncio.open_connection(b.ip, PORT)
        pchan = Channel(reader, writer)
        token = agent.token_file.read_bytes().strip()
        await client_handshake(pchan, token, role="pages", ticket=prep.page_ticket, stream="criu")
        dst = (1 << 8) | 1
        writer.write(encode_iov(Command.OPEN2, dst_id=dst) + b"\x00")
        writer.write(
            encode_iov(Command.ADD_F, flags=PE_PRESENT, nr_pages=4, vaddr=0x10000, dst_id=dst)
        )
        writer.write(b"\xab" * 4096)  # one page of four, then silence
        await writer.drain()
        t0 = time.monotonic()
        rest = b""
        try:
            rest = await asyncio.wait_for(reader.read(), 30)  # the agent hangs up
        except (ConnectionError, OSError):
            pass
        elapsed = time.monotonic() - t0
        try:
            await chan.recv_any(10)
            why = "no error"
        except PhaulError as err:
            why = str(err)
        writer.close()
        await chan.close()
        return elapsed, rest, why

    elapsed, _rest, _why = on(a, stalled_pages)
    assert elapsed < 8, elapsed
    assert agent.alive()
    wait_for(lambda: "rolled back" in agent.log.read_text(), 10, "rollback")
    assert not list(agent.workdir.glob("*/images/*"))
    assert handshake_works(a, agent)


def test_replayed_handshake_fails(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    token = make_token(lab)
    agent = start_agent(lab, b, token)
    secret = token.read_bytes().strip()

    def record() -> bytes:
        with socket.create_connection((b.ip, PORT), 5) as s:
            hello = _hello()
            hello.role = "control"
            hello.capabilities.append("auth-token")
            sent = encode(hello)
            s.sendall(sent)
            s.settimeout(5)
            data = b""
            while len(frames(data)) < 1:
                data += s.recv(65536)
            reply = frames(data)[0]
            proof = hmac.new(
                secret, b"phaul-source|" + reply.nonce + b"|" + hello.nonce, hashlib.sha256
            ).digest()
            p = encode(pb.AuthProof(proof=proof))
            s.sendall(p)
            data = b""
            while len(frames(data)) < 1:
                data += s.recv(65536)
            assert isinstance(frames(data)[0], pb.AuthOk)  # the recorded session was good
            return sent + p

    recorded = a.call(record)
    replies = frames(raw_exchange(a, b.ip, recorded))
    assert not any(isinstance(m, pb.AuthOk) for m in replies), replies
    assert isinstance(replies[-1], pb.Error) and "authentication failed" in replies[-1].message
    assert agent.alive() and handshake_works(a, agent)


def test_out_of_order_frames_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    agent = start_agent(lab, b, make_token(lab))

    async def commit_first() -> list[str]:
        errors = []
        chan = await control(agent)
        await chan.send(pb.Commit())
        try:
            await chan.recv_any(10)
        except ProtocolError as err:
            errors.append(str(err))
        await chan.close()
        # Commit before Restore: after Prepare, while the agent waits for images.
        chan = await control(agent)
        await chan.send(pb.PreflightRequest(migration_id="order-test-1", pids=[1]))
        await chan.recv(pb.PreflightReply, 10)
        await chan.send(pb.Prepare(migration_id="order-test-1", fresh_pidns=True))
        await chan.recv(pb.PrepareReply, 30)
        await chan.send(pb.Commit())
        try:
            await chan.recv_any(10)
        except ProtocolError as err:
            errors.append(str(err))
        await chan.close()
        return errors

    errors = on(a, commit_first)
    assert len(errors) == 2, errors
    assert "expected PreflightRequest" in errors[0] and "Commit" in errors[1], errors
    assert agent.alive() and handshake_works(a, agent)
    assert not list(Path(agent.workdir).glob("*/images/*"))
