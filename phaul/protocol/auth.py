"""Token authentication: mutual HMAC-SHA256 challenge-response over both nonces.

The connecting side sends Hello(nonce_c); the agent answers HelloReply(nonce_a,
proof_a = HMAC(token, "phaul-agent" | nonce_c | nonce_a)); the client checks proof_a (so a fake
agent learns nothing it could replay) and sends AuthProof(HMAC(token, "phaul-source" | nonce_a |
nonce_c)); the agent checks it and answers AuthOk, or Error and closes. The token never crosses
the wire. Token mode authenticates but does not encrypt: the traffic itself is plain.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
from pathlib import Path

from phaul import PROTOCOL_VERSION, __version__
from phaul.errors import AuthError, ProtocolError, UsageError
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.framing import Channel

NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0
CAPABILITIES = ("criu-page-stream", "fresh-pidns", "tcp-established")


def load_token(path: str | None) -> bytes:
    """Read a token file; it must exist, be non-empty and not readable by group or others."""
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
    """Authenticate to an agent; raises AuthError if either side's proof is wrong."""
    hello = _hello()
    hello.role = role
    hello.ticket = ticket
    hello.stream = stream
    await chan.send(hello)
    reply = await chan.recv(pb.HelloReply, HANDSHAKE_TIMEOUT)
    if reply.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"agent speaks protocol {reply.protocol_version}, we speak {PROTOCOL_VERSION}: "
            "install the same phaul version on both hosts"
        )
    if len(reply.nonce) != NONCE_BYTES:
        raise ProtocolError("agent sent a malformed nonce")
    expected = _proof(token, b"phaul-agent", hello.nonce, reply.nonce)
    if not hmac.compare_digest(expected, reply.proof):
        raise AuthError("the agent does not know our token: check --token-file on both hosts")
    await chan.send(pb.AuthProof(proof=_proof(token, b"phaul-source", reply.nonce, hello.nonce)))
    return await chan.recv(pb.AuthOk, HANDSHAKE_TIMEOUT)


async def server_handshake(chan: Channel, token: bytes, agent_id: str) -> pb.Hello:
    """Authenticate a connecting peer; returns its Hello. Raises AuthError/ProtocolError."""
    hello = await chan.recv(pb.Hello, HANDSHAKE_TIMEOUT)
    if hello.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol {hello.protocol_version}, this agent speaks {PROTOCOL_VERSION}"
        )
    if len(hello.nonce) != NONCE_BYTES:
        raise ProtocolError("peer sent a malformed nonce")
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


def new_ticket() -> bytes:
    return os.urandom(32)
