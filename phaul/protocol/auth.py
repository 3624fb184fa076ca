"""Token authentication: mutual HMAC-SHA256 challenge-response over both nonces.

The connecting side sends Hello(nonce_c); the agent answers HelloReply(nonce_a,
proof_a = HMAC(token, "phaul-agent" | nonce_c | nonce_a)); the client checks proof_a (so a fake
agent learns nothing it could replay) and sends AuthProof(HMAC(token, "phaul-source" | nonce_a |
nonce_c)); the agent checks it and answers AuthOk, or Error and closes. The token never crosses
the wire. Token mode authenticates but does not encrypt: the traffic itself is plain.

Transport-authenticated mode: when the transport itself authenticated the peer (a verified mutual
TLS certificate, an SSH channel) no token is needed. The client then offers the capability
``auth-transport`` instead of ``auth-token``; Hello/HelloReply still exchange versions, there are
no proofs, and the agent answers AuthOk directly. Each side accepts this mode only if its own
transport really authenticated the other (:func:`transport_identity`). With a token, both the
transport and the HMAC proofs are checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

from phaul import PROTOCOL_VERSION, __version__
from phaul.errors import AuthError, ProtocolError, UsageError
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.framing import Channel

NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0
CAPABILITIES = ("criu-page-stream", "fresh-pidns", "tcp-established")
CAP_AUTH_TOKEN = "auth-token"  # noqa: S105 (a capability name, not a secret)
CAP_AUTH_TRANSPORT = "auth-transport"
# Extra-info key a transport sets on a stream it authenticated itself (e.g. an SSH channel).
TRANSPORT_AUTH_INFO = "phaul_transport_auth"
# `--token-file` value meaning "no token: the transport authenticates" (NUL: never a real path).
TRANSPORT_ONLY = "\0transport-authenticated"


def transport_identity(writer: asyncio.StreamWriter | Any) -> str | None:
    """Who the transport itself authenticated, e.g. "tls:CN=b", "ssh:root@b"; None if nobody.

    A TLS peer counts only with a verified certificate (the contexts require one); other
    transports mark their streams with the ``TRANSPORT_AUTH_INFO`` extra info.
    """
    if writer.get_extra_info("ssl_object") is not None:
        cert = writer.get_extra_info("peercert")
        if not cert:
            return None
        from phaul.transport.tls import peer_name

        return f"tls:CN={peer_name(cert)}"
    ident = writer.get_extra_info(TRANSPORT_AUTH_INFO)
    return str(ident) if ident else None


def load_token(path: str | None) -> bytes:
    """Read a token file; it must exist, be non-empty and not readable by group or others.

    ``TRANSPORT_ONLY`` (set by the dialer/agent when TLS or SSH authenticates) gives b"".
    """
    if path == TRANSPORT_ONLY:
        return b""
    if not path:
        raise UsageError(
            "no token given: pass --token-file FILE (e.g. `head -c 32 /dev/urandom "
            "| base64 > FILE; chmod 600 FILE`, the same file on both hosts)"
        )
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes().strip()
    except OSError as err:
        raise UsageError(f"cannot read token file {path}: {err.strerror}") from err
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"token file {path} is readable by others: run `chmod 600 {path}`")
    if len(data) < 16:
        raise UsageError(f"token file {path} holds fewer than 16 bytes: use a longer secret")
    return data


def _proof(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + b"|" + first + b"|" + second, hashlib.sha256).digest()


def _hello() -> pb.Hello:
    return pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        software_version=__version__,
        capabilities=list(CAPABILITIES),
        nonce=secrets.token_bytes(NONCE_BYTES),
    )


async def client_handshake(
    chan: Channel, token: bytes, *, role: str = "control", ticket: bytes = b"", stream: str = ""
) -> pb.AuthOk:
    """Authenticate to an agent; raises AuthError if either side's proof is wrong.

    ``token`` b"": transport-authenticated mode (only over a transport that verified the agent).
    """
    try:
        return await _client_handshake(chan, token, role=role, ticket=ticket, stream=stream)
    except ssl.SSLError as err:
        raise AuthError(
            f"the agent refused our TLS certificate ({err.reason or err}): use a certificate "
            "and key issued by the agent's CA (--tls-cert/--tls-key)"
        ) from err
    except (ConnectionResetError, ProtocolError) as err:
        # TLS 1.3: the agent checks our certificate after our side of the handshake finished;
        # a refusal shows up here as the connection closing (or reset) before any frame.
        if chan.bytes_received == 0 and chan.writer.get_extra_info("ssl_object") is not None:
            raise AuthError(
                "the agent closed the TLS connection before answering: it refused our "
                "certificate (use --tls-cert/--tls-key issued by the agent's CA)"
            ) from err
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError("the agent closed the connection during the handshake") from err


async def _client_handshake(
    chan: Channel, token: bytes, *, role: str, ticket: bytes, stream: str
) -> pb.AuthOk:
    if not token and transport_identity(chan.writer) is None:
        raise AuthError(
            "no token and the transport does not authenticate the agent: pass --token-file, "
            "or use mutual TLS (--tls-*) or ssh://"
        )
    hello = _hello()
    hello.role = role
    hello.ticket = ticket
    hello.stream = stream
    hello.capabilities.append(CAP_AUTH_TOKEN if token else CAP_AUTH_TRANSPORT)
    await chan.send(hello)
    reply = await chan.recv(pb.HelloReply, HANDSHAKE_TIMEOUT)
    if reply.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"agent speaks protocol {reply.protocol_version}, we speak {PROTOCOL_VERSION}: "
            "install the same phaul version on both hosts"
        )
    if len(reply.nonce) != NONCE_BYTES:
        raise ProtocolError("agent sent a malformed nonce")
    if not token:
        if reply.proof or CAP_AUTH_TRANSPORT not in reply.capabilities:
            raise AuthError("the agent wants a token: pass --token-file")
        return await chan.recv(pb.AuthOk, HANDSHAKE_TIMEOUT)
    expected = _proof(token, b"phaul-agent", hello.nonce, reply.nonce)
    if not hmac.compare_digest(expected, reply.proof):
        raise AuthError("the agent does not know our token: check --token-file on both hosts")
    await chan.send(pb.AuthProof(proof=_proof(token, b"phaul-source", reply.nonce, hello.nonce)))
    return await chan.recv(pb.AuthOk, HANDSHAKE_TIMEOUT)


async def server_handshake(
    chan: Channel, token: bytes, agent_id: str, *, transport_peer: str | None = None
) -> pb.Hello:
    """Authenticate a connecting peer; returns its Hello. Raises AuthError/ProtocolError.

    ``token`` b"": no token; the peer must then be authenticated by the transport
    (``transport_peer``, e.g. from :func:`transport_identity`) and use transport mode.
    """
    hello = await chan.recv(pb.Hello, HANDSHAKE_TIMEOUT)
    if hello.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol {hello.protocol_version}, this agent speaks {PROTOCOL_VERSION}"
        )
    if len(hello.nonce) != NONCE_BYTES:
        raise ProtocolError("peer sent a malformed nonce")
    if CAP_AUTH_TRANSPORT in hello.capabilities or not token:
        return await _server_transport_mode(chan, token, agent_id, hello, transport_peer)
    reply = _hello()
    reply_msg = pb.HelloReply(
        protocol_version=reply.protocol_version,
        software_version=reply.software_version,
        capabilities=reply.capabilities,
        nonce=reply.nonce,
        proof=_proof(token, b"phaul-agent", hello.nonce, reply.nonce),
    )
    await chan.send(reply_msg)
    proof = await chan.recv(pb.AuthProof, HANDSHAKE_TIMEOUT)
    expected = _proof(token, b"phaul-source", reply.nonce, hello.nonce)
    if not hmac.compare_digest(expected, proof.proof):
        raise AuthError("authentication failed: wrong token")
    await chan.send(pb.AuthOk(agent_id=agent_id, host=socket.gethostname()))
    return hello


async def _server_transport_mode(
    chan: Channel, token: bytes, agent_id: str, hello: pb.Hello, transport_peer: str | None
) -> pb.Hello:
    if token:
        raise AuthError("this agent also requires its token: pass --token-file")
    if CAP_AUTH_TRANSPORT not in hello.capabilities:
        raise AuthError("this agent uses no token (TLS/SSH only): run without --token-file")
    if transport_peer is None:
        raise AuthError("no token and the connection is not authenticated by TLS or SSH")
    reply = _hello()
    await chan.send(
        pb.HelloReply(
            protocol_version=reply.protocol_version,
            software_version=reply.software_version,
            capabilities=[*reply.capabilities, CAP_AUTH_TRANSPORT],
            nonce=reply.nonce,
        )
    )
    await chan.send(pb.AuthOk(agent_id=agent_id, host=socket.gethostname()))
    return hello


def new_ticket() -> bytes:
    return os.urandom(32)
