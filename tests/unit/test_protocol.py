"""Framing and token authentication with two in-memory peers (no root needed)."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.errors import AuthError, ProtocolError, UsageError
from phaul.pb import phaul_pb2 as pb
from phaul.phase import Phase, PhaseMachine
from phaul.protocol import auth
from phaul.protocol.framing import Channel, decode_body, encode


async def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Channel(ra, wa), Channel(rb, wb)


def test_roundtrip_and_type_check() -> None:
    async def go() -> None:
        x, y = await _pair()
        await x.send(pb.Prepare(migration_id="m1", fresh_pidns=True))
        msg = await y.recv(pb.Prepare, 5)
        assert msg.migration_id == "m1" and msg.fresh_pidns
        await x.send(pb.Commit())
        with pytest.raises(ProtocolError, match="expected Restore"):
            await y.recv(pb.Restore, 5)
        await x.close()
        with pytest.raises(ProtocolError, match="closed"):
            await y.recv_any(5)

    asyncio.run(go())


def test_error_frame_is_rebuilt_as_exception() -> None:
    async def go() -> None:
        x, y = await _pair()
        await x.send(pb.Error(code="auth", message="nope"))
        with pytest.raises(AuthError, match="nope"):
            await y.recv_any(5)

    asyncio.run(go())


def test_oversized_frame_rejected_without_reading_it() -> None:
    async def go() -> None:
        x, y = await _pair()
        y.max_frame = 1024
        x.writer.write(struct.pack(">I", 1 << 30))
        await x.writer.drain()
        with pytest.raises(ProtocolError, match="limit"):
            await y.recv_any(5)

    asyncio.run(go())


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=512))
def test_decode_never_crashes(body: bytes) -> None:
    try:
        decode_body(body)
    except ProtocolError:
        pass


def test_encode_refuses_non_control_messages() -> None:
    with pytest.raises(TypeError):
        encode(pb.Address(cidr="1.2.3.4/24"))


@pytest.mark.parametrize("same", [True, False])
def test_handshake(same: bool) -> None:
    tok = b"s3cret-token-for-tests-0123456789"
    other = tok if same else b"another-token-for-tests-012345678"

    async def go() -> None:
        x, y = await _pair()
        server = asyncio.create_task(auth.server_handshake(y, tok, "agent1"))
        if same:
            ok = await auth.client_handshake(x, other)
            assert ok.agent_id == "agent1"
            hello = await server
            assert hello.role == "control"
        else:
            with pytest.raises(AuthError):
                await auth.client_handshake(x, other)
            await x.close()
            with pytest.raises((AuthError, ProtocolError)):
                await server

    asyncio.run(go())


def test_token_file_rules(tmp_path: Path) -> None:
    p = tmp_path / "tok"
    p.write_bytes(b"0123456789abcdef0123")
    p.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        auth.load_token(str(p))
    p.chmod(0o600)
    assert auth.load_token(str(p)) == b"0123456789abcdef0123"
    p.write_bytes(b"short")
    with pytest.raises(UsageError, match="16 bytes"):
        auth.load_token(str(p))
    with pytest.raises(UsageError, match="--token-file"):
        auth.load_token(None)


def test_phase_machine_refuses_illegal_transitions() -> None:
    m = PhaseMachine()
    m.advance(Phase.PREFLIGHT)
    with pytest.raises(ProtocolError):
        m.advance(Phase.COMMIT)
    m.advance(Phase.DUMP)
    m.advance(Phase.RESTORE)
    m.advance(Phase.COMMIT)
    with pytest.raises(ProtocolError):
        m.advance(Phase.ROLLED_BACK)  # after commit there is no way back
    m.advance(Phase.DONE)
    assert m.terminal
