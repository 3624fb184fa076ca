"""TCP server workload for migration tests (stdlib only, select-based, one thread).

Usage: tcp_server.py ADDR PORT [--ready FILE]

For each request line ``seq`` received on a connection it replies ``seq handled pid``, where
``handled`` counts the requests answered on that connection (1, 2, ...) and ``pid`` is
``os.getpid()``. ``handled`` is kept only in this process's memory: after a migration it must
continue where it was, which tcp_probe.py checks. With ``--ready FILE`` it writes "ready" to
FILE once it listens. Runs until killed.
"""

from __future__ import annotations

import argparse
import os
import select
import socket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    ap.add_argument("--ready")
    a = ap.parse_args()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((a.addr, a.port))
    lsock.listen(16)
    if a.ready:
        with open(a.ready, "w") as f:
            f.write("ready\n")
    conns: dict[socket.socket, tuple[bytearray, list[int]]] = {}
    pid = os.getpid()
    while True:
        readable, _, _ = select.select([lsock, *conns], [], [])
        for s in readable:
            if s is lsock:
                c, _ = lsock.accept()
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[c] = (bytearray(), [0])
                continue
            buf, handled = conns[s]
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                del conns[s]
                s.close()
                continue
            buf += data
            out = bytearray()
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                handled[0] += 1
                out += f"{line.decode().strip()} {handled[0]} {pid}\n".encode()
            try:
                s.sendall(out)
            except OSError:
                del conns[s]
                s.close()


if __name__ == "__main__":
    main()
