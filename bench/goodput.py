"""Page goodput over plain TCP, mutual TLS and SSH, through phaul's page-stream path.

Run as root (it builds a two-host namespace lab and starts a private sshd in host b):

    .venv/bin/python bench/goodput.py [--size-mib 256] [--rounds 2]

For each transport a blocking thread in host a writes SIZE bytes into the socket that
``phaul.transport.bridge.page_socket`` gives it (plain TCP: the connection itself; TLS and SSH:
a socketpair bridged by asyncio tasks), and a blocking thread in host b reads them from its own
``page_socket`` and acknowledges. SSH uses the same path as ``--to ssh://``: an asyncssh
``direct-streamlocal`` channel, through sshd, to a unix socket that the remote command
announced. Figures are MB/s of payload (1 MB = 10^6 bytes), best of the rounds. Both ends and
the crypto of both ends share this machine's cores, as they would not across two hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phaul.transport import Dialer, TcpDialer  # noqa: E402
from phaul.transport.bridge import Bridge, page_socket  # noqa: E402

HEADER = struct.Struct(">Q")
CHUNK = 1 << 20
TCP_PORT, TLS_PORT = 7801, 7802


# --- receiving side (host b) -------------------------------------------------------------------
def sink(sock: socket.socket) -> None:
    head = b""
    while len(head) < HEADER.size:
        part = sock.recv(HEADER.size - len(head))
        if not part:
            return
        head += part
    (size,) = HEADER.unpack(head)
    buf = bytearray(CHUNK)
    n = 0
    while n < size:
        k = sock.recv_into(buf)
        if not k:
            return
        n += k
    sock.sendall(b"ok")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock, bridge = await page_socket(reader, writer)
    await asyncio.to_thread(sink, sock)
    await asyncio.sleep(0.1)
    if bridge is not None:
        await bridge.close()
    sock.close()


async def serve(args: argparse.Namespace) -> None:
    if args.serve == "stdio":  # run by sshd: announce a unix socket, serve until stdin closes
        from phaul.transport.ssh import ANNOUNCE

        d = tempfile.mkdtemp(prefix="goodput-")
        path = f"{d}/sink.sock"
        server = await asyncio.start_unix_server(handle, path)
        sys.stdout.buffer.write(ANNOUNCE + path.encode() + b"\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.buffer.read)
        server.close()
        return
    ssl_ctx = None
    if args.serve == "tls":
        from phaul.transport.tls import TlsConfig, server_context

        ssl_ctx = server_context(TlsConfig(Path(args.cert), Path(args.key), Path(args.ca)))
    host, port = args.addr.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), ssl=ssl_ctx)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


# --- sending side (host a) ---------------------------------------------------------------------
def source(sock: socket.socket, size: int, out: dict[str, float]) -> None:
    payload = os.urandom(CHUNK)  # incompressible
    t0 = time.perf_counter()
    sock.sendall(HEADER.pack(size))
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(payload[:n])
        left -= n
    ack = sock.recv(2)
    out["seconds"] = time.perf_counter() - t0
    out["ok"] = float(ack == b"ok")


async def push(dialer: Dialer, size: int, skip_first: bool) -> float:
    """MB/s for ``size`` bytes over a new connection of ``dialer``."""
    try:
        if skip_first:  # SSH: the first connection is the remote command's stdio
            await dialer.open()
        reader, writer = await dialer.open()
        sock, bridge = await page_socket(reader, writer)
        out: dict[str, float] = {}
        await asyncio.to_thread(source, sock, size, out)
        if isinstance(bridge, Bridge):
            await bridge.close()
        sock.close()
        if out.get("ok") != 1.0:
            raise RuntimeError("no acknowledgement from the sink")
        return size / out["seconds"] / 1e6
    finally:
        await dialer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", choices=("tcp", "tls", "stdio"), help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return

    from phaul.certs import make_ca, make_host
    from phaul.transport.ssh import SshConfig, SshDialer
    from phaul.transport.tls import TlsConfig, TlsDialer
    from tests.integration.lab import Lab
    from tests.integration.sshd import start_sshd

    size = args.size_mib << 20
    me = [sys.executable, str(Path(__file__).resolve())]
    with Lab(hosts=("a", "b")) as lab:
        a, b = lab.host("a"), lab.host("b")
        make_ca(lab.tmp / "ca")
        hb = make_host("b", lab.tmp / "ca", lab.tmp, ips=(b.ip,))
        ha = make_host("a", lab.tmp / "ca", lab.tmp)
        ca = lab.tmp / "ca" / "ca.pem"
        for mode, port, extra in (
            ("tcp", TCP_PORT, []),
            ("tls", TLS_PORT, ["--cert", str(hb.cert), "--key", str(hb.key), "--ca", str(ca)]),
        ):
            proc = b.popen(
                [*me, "--serve", mode, "--addr", f"{b.ip}:{port}", *extra],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            proc.stdout.readline()
        sshd = start_sshd(lab, b)
        stdio_cmd = shlex.join([*me, "--serve", "stdio"])

        def ssh(cipher: str) -> SshDialer:
            cfg = SshConfig.parse(
                sshd.url,
                known_hosts=sshd.known_hosts,
                keys=(sshd.client_key,),
                agent_command=stdio_cmd,
                extra={"encryption_algs": [cipher]},
            )
            return SshDialer(cfg)

        cases: list[tuple[str, object, bool]] = [
            ("plain TCP (token auth, NOT encrypted)", lambda: TcpDialer(b.ip, TCP_PORT), False),
            (
                "mutual TLS 1.3",
                lambda: TlsDialer(b.ip, TLS_PORT, TlsConfig(ha.cert, ha.key, ca)),
                False,
            ),
            ("SSH chacha20-poly1305", lambda: ssh("chacha20-poly1305@openssh.com"), True),
            ("SSH aes128-gcm", lambda: ssh("aes128-gcm@openssh.com"), True),
        ]
        print(f"page goodput, {args.size_mib} MiB per run, best of {args.rounds}, host a -> b")
        for name, make, skip in cases:
            best = 0.0
            for _ in range(args.rounds):
                rate = a.call(asyncio.run, push(make(), size, skip))  # type: ignore[operator]
                best = max(best, rate)
            print(f"  {name:40s} {best:8.1f} MB/s", flush=True)


if __name__ == "__main__":
    main()
