"""Mutual TLS transport: both ends present a certificate signed by the same private CA.

The agent listens with :func:`server_context` (TLS 1.3 only, client certificate required and
verified against ``--tls-ca``); the source connects with :class:`TlsDialer`, which verifies the
agent's certificate against the CA *and* the host name or IP address it dialled. A verified
certificate authenticates the peer, so no token is needed (see ``phaul.protocol.auth``); with a
token both checks are made. Page streams run over the same kind of connection; they stay in
asyncio and are bridged to the page threads (``phaul.transport.bridge``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import AuthError, ConnectError, UsageError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> TlsConfig | None:
        """None when no TLS option is given; UsageError when only some are."""
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3 or cert is None or key is None or ca is None:
            raise UsageError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
        return cls(Path(cert), Path(key), Path(ca))


def _context(purpose: ssl.Purpose, cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load TLS certificate {cfg.cert} / key {cfg.key}: {err}") from err
    try:
        ctx.load_verify_locations(cafile=cfg.ca)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load TLS CA {cfg.ca}: {err}") from err
    return ctx


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The agent's context: TLS >= 1.3, a client certificate from the CA is required."""
    return _context(ssl.Purpose.CLIENT_AUTH, cfg)


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The source's context: TLS >= 1.3, the agent's certificate must match CA and host."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, cfg)
    ctx.check_hostname = True
    return ctx


def peer_name(cert: dict[str, object] | None) -> str:
    """The subject CN of a peer certificate as returned by ``getpeercert()``."""
    for rdn in (cert or {}).get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"


class TlsDialer:
    """Connections to an agent over mutual TLS."""

    def __init__(self, host: str, port: int, cfg: TlsConfig) -> None:
        self.host = host
        self.port = port
        self.context = client_context(cfg)
        self.description = f"{host}:{port} (mutual TLS, encrypted)"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = f"{self.host}:{self.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.context,
                    server_hostname=self.host,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                ),
                CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
            )
        except ssl.SSLCertVerificationError as err:
            raise AuthError(
                f"the agent at {where} presented a certificate we do not trust "
                f"({err.verify_message}): check --tls-ca and that its certificate names {self.host}"
            ) from err
        except ssl.SSLError as err:
            raise AuthError(
                f"TLS handshake with {where} failed ({err.reason or err}): the agent may not "
                "trust our certificate (--tls-cert/--tls-key from its CA?)"
            ) from err
        except TimeoutError as err:
            raise ConnectError(f"no TLS answer from {where} within the timeout") from err
        except ConnectionResetError as err:
            raise AuthError(
                f"{where} closed the connection during the TLS handshake: it refused our "
                "certificate or does not speak TLS"
            ) from err
        except OSError as err:
            raise ConnectError(
                f"cannot connect to {where}: {err.strerror or err}: is `phaul agent` running "
                "there with --tls-* options?"
            ) from err
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("TLS to %s: %s, agent %s", where, writer.get_extra_info("cipher"),
                  peer_name(writer.get_extra_info("peercert")))  # fmt: skip
        return reader, writer

    async def close(self) -> None:
        return None
