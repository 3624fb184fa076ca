"""Mutual TLS transport, certificates and the transport-authenticated handshake (loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from phaul.certs import make_ca, make_host
from phaul.errors import AuthError, UsageError
from phaul.protocol import auth
from phaul.protocol.framing import Channel
from phaul.transport.bridge import page_socket
from phaul.transport.tls import TlsConfig, TlsDialer, server_context

TOKEN = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d / "ca")
    make_ca(d / "other-ca", name="someone else")
    agent = make_host("agent", d / "ca", d / "hosts", ips=("127.0.0.1",))
    source = make_host("source", d / "ca", d / "hosts")
    stranger = make_host("stranger", d / "other-ca", d / "hosts")
    wrong_name = make_host("elsewhere", d / "ca", d / "hosts", ips=("127.0.0.9",))
    ca = d / "ca" / "ca.pem"
    return {
        "agent": TlsConfig(agent.cert, agent.key, ca),
        "source": TlsConfig(source.cert, source.key, ca),
        "stranger": TlsConfig(stranger.cert, stranger.key, ca),
        "wrong-name": TlsConfig(wrong_name.cert, wrong_name.key, ca),
    }


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(cfg: TlsConfig, handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context(cfg))
    return server, server.sockets[0].getsockname()[1]


def agent_handler(token: bytes, results: list[object]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chan = Channel(reader, writer)
        try:
            hello = await auth.server_handshake(
                chan, token, "agent1", transport_peer=auth.transport_identity(writer)
            )
            results.append(hello)
        except Exception as err:
            results.append(err)
            await chan.send_error(err if isinstance(err, AuthError) else AuthError(str(err)))
        await chan.close()

    return handle


def test_ca_and_host_files(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    host = make_host("10.1.2.3", tmp_path / "ca", tmp_path / "out", dns=("b.lab",))
    assert ca.key.stat().st_mode & 0o777 == 0o600
    assert host.key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(UsageError):
        make_ca(tmp_path / "ca")  # never overwrites a CA
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(host.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["b.lab"]
    with pytest.raises(UsageError):
        TlsConfig.from_args(str(host.cert), None, None)
    assert TlsConfig.from_args(None, None, None) is None


@pytest.mark.parametrize("token", [b"", TOKEN], ids=["cert-only", "cert+token"])
def test_mutual_tls_handshake(pki: dict[str, TlsConfig], token: bytes) -> None:
    async def main() -> None:
        results: list[object] = []
        server, port = await serve(pki["agent"], agent_handler(token, results))
        async with server:
            reader, writer = await TlsDialer("127.0.0.1", port, pki["source"]).open()
            assert writer.get_extra_info("cipher")[1] == "TLSv1.3"
            assert auth.transport_identity(writer) == "tls:CN=agent"
            ok = await auth.client_handshake(Channel(reader, writer), token)
            assert ok.agent_id == "agent1"
            writer.close()
            for _ in range(100):
                if results:
                    break
                await asyncio.sleep(0.01)
        assert len(results) == 1 and not isinstance(results[0], Exception), results

    asyncio.run(main())


def test_token_mismatch_between_sides_is_refused(pki: dict[str, TlsConfig]) -> None:
    async def attempt(agent_token: bytes, client_token: bytes) -> list[object]:
        results: list[object] = []
        server, port = await serve(pki["agent"], agent_handler(agent_token, results))
        async with server:
            reader, writer = await TlsDialer("127.0.0.1", port, pki["source"]).open()
            with pytest.raises(AuthError):
                await auth.client_handshake(Channel(reader, writer), client_token)
            writer.close()
        return results

    # The agent wants its token too; the client has one the agent does not use; wrong token.
    assert isinstance(asyncio.run(attempt(TOKEN, b""))[0], AuthError)
    asyncio.run(attempt(b"", TOKEN))
    asyncio.run(attempt(TOKEN, TOKEN[::-1]))


@pytest.mark.parametrize("client", ["stranger", "none"])
def test_untrusted_or_missing_client_certificate_is_refused(
    pki: dict[str, TlsConfig], client: str
) -> None:
    async def main() -> None:
        results: list[object] = []
        server, port = await serve(pki["agent"], agent_handler(b"", results))
        async with server:
            if client == "none":
                ctx = ssl.create_default_context(cafile=str(pki["source"].ca))
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            else:
                reader, writer = await TlsDialer("127.0.0.1", port, pki[client]).open()
            # TLS 1.3: the client finishes first; the agent's refusal arrives on the first read.
            with pytest.raises(AuthError, match="certificate"):
                await auth.client_handshake(Channel(reader, writer), b"")
            writer.close()
            await asyncio.sleep(0.05)
        assert results == [], "the handler must never run for a refused certificate"

    asyncio.run(main())


def test_agent_certificate_must_match_host(pki: dict[str, TlsConfig]) -> None:
    async def main() -> None:
        server, port = await serve(pki["wrong-name"], agent_handler(b"", []))
        async with server:
            with pytest.raises(AuthError, match="do not trust"):
                await TlsDialer("127.0.0.1", port, pki["source"]).open()

    asyncio.run(main())


def test_no_token_over_plain_tcp_is_refused() -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            chan = Channel(reader, writer)
            with pytest.raises(AuthError):
                await auth.server_handshake(chan, b"", "a", transport_peer=None)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(AuthError, match="no token"):
                await auth.client_handshake(Channel(reader, writer), b"")
            writer.close()

    asyncio.run(main())


def test_page_stream_over_tls_through_the_bridge(pki: dict[str, TlsConfig]) -> None:
    """Both ends get blocking sockets bridged onto the TLS stream; bytes arrive intact."""
    size = 24 << 20
    payload = os.urandom(1 << 20)
    digest = hashlib.sha256(payload * (size // len(payload))).hexdigest()
    got: dict[str, str] = {}

    def sink(sock: socket.socket) -> None:
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        n = 0
        while n < size:
            k = sock.recv_into(buf)
            if not k:
                break
            h.update(memoryview(buf)[:k])
            n += k
        sock.sendall(b"ok")
        got["digest"] = h.hexdigest()

    def source(sock: socket.socket) -> None:
        for _ in range(size // len(payload)):
            sock.sendall(payload)
        got["ack"] = sock.recv(2).decode()

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock, bridge = await page_socket(reader, writer)
            assert bridge is not None, "TLS must be bridged"
            await asyncio.to_thread(sink, sock)
            await asyncio.sleep(0.05)
            await bridge.close()
            sock.close()

        server, port = await serve(pki["agent"], handle)
        async with server:
            reader, writer = await TlsDialer("127.0.0.1", port, pki["source"]).open()
            sock, bridge = await page_socket(reader, writer)
            assert bridge is not None
            t = threading.Thread(target=source, args=(sock,))
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.01)
            await bridge.close()
            sock.close()

    asyncio.run(main())
    assert got == {"digest": digest, "ack": "ok"}
