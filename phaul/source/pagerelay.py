"""Relay CRIU's page stream from a local socketpair onto the authenticated page connection.

CRIU writes its page-server protocol into the fd we hand it (``opts.ps.fd``). We give it one end
of a unix socketpair and copy bytes both ways between the other end and the page connection
(CRIU's PS_IOV_* requests go out, the target's replies come back). Page bytes are copied by
``recv_into`` into one preallocated 1 MiB buffer per direction; nothing is parsed here. Handing
CRIU the TCP socket directly would also work, but CRIU corks it and its final FORCE_CLOSE then
waits for the cork timer (~200 ms, measured by an earlier prototype).
"""

from __future__ import annotations

import logging
import socket
import threading

log = logging.getLogger(__name__)

BUF = 1 << 20


class PageRelay:
    def __init__(self, net: socket.socket) -> None:
        self.net = net
        self.criu_end, self.local = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bytes_out = 0
        self.bytes_in = 0
        self.error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.local, net, True), daemon=True),
            threading.Thread(target=self._pump, args=(net, self.local, False), daemon=True),
        ]

    def release_criu_end(self) -> None:
        """Close our copy of CRIU's end once CRIU holds its own."""
        self.criu_end.close()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        buf = bytearray(BUF)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                dst.sendall(view[:n])
                if outbound:
                    self.bytes_out += n
                else:
                    self.bytes_in += n
        except OSError as err:
            if self.error is None:
                self.error = err
            log.debug("page relay (%s) ended: %s", "out" if outbound else "in", err)
            if outbound:
                # The target hung up (e.g. its quota was exceeded): CRIU must not block writing
                # pages nobody reads; its next write fails and the dump ends (tree resumes).
                try:
                    src.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def wait(self, timeout: float) -> bool:
        """True when both directions have ended (CRIU closed its stream, the target answered)."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        for s in (self.criu_end, self.local, self.net):
            try:
                s.close()
            except OSError:
                pass
