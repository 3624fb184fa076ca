"""TCP probe client: lock-step requests to tcp_server.py, checks continuity, reports as JSON.

Usage: tcp_probe.py ADDR PORT OUT [--interval-ms 5] [--duration S] [--ready FILE]
                    [--connect-timeout S] [--reply-timeout S]

Connects once (retrying until --connect-timeout), then sends ``seq`` every --interval-ms and
waits for its reply ``seq handled pid`` before the next one. It checks that each reply carries
the seq just sent and that ``handled`` grows by exactly 1 (continuous across a migration), and
records the longest time between two consecutive replies. It never reconnects: a reset or a
closed connection ends the run. With --ready FILE it writes "ready" after the first reply.

On exit (SIGTERM, SIGINT, --duration elapsed, or connection lost) it writes to OUT:
  {"requests": int, "replies": int, "max_gap_ms": float, "errors": [str, ...], "reset": bool,
   "pids": [int, ...], "first_handled": int|null, "last_handled": int|null,
   "connected": bool, "duration_s": float}
A healthy migration: errors == [], reset false, replies == requests (or requests - 1 when
stopped mid-request), max_gap_ms of the order of the downtime. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import time
from pathlib import Path


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise _Stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--ready")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--reply-timeout", type=float, default=60.0)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    res: dict[str, object] = {
        "requests": 0,
        "replies": 0,
        "max_gap_ms": 0.0,
        "errors": [],
        "reset": False,
        "pids": [],
        "first_handled": None,
        "last_handled": None,
        "connected": False,
        "duration_s": 0.0,
    }
    errors: list[str] = res["errors"]  # type: ignore[assignment]
    pids: list[int] = res["pids"]  # type: ignore[assignment]
    start = time.monotonic()
    sock: socket.socket | None = None
    try:
        deadline = start + a.connect_timeout
        while True:
            try:
                sock = socket.create_connection((a.addr, a.port), timeout=1.0)
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    errors.append(f"connect: {err}")
                    raise _Stop from err
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        res["connected"] = True
        end = start + a.duration
        buf = bytearray()
        seq = 0
        last_reply: float | None = None
        prev_handled: int | None = None
        while time.monotonic() < end:
            seq += 1
            sock.sendall(f"{seq}\n".encode())
            res["requests"] = seq
            reply_deadline = time.monotonic() + a.reply_timeout
            while b"\n" not in buf:
                left = min(reply_deadline, end + a.reply_timeout) - time.monotonic()
                if left <= 0:
                    errors.append(f"no reply to {seq} within {a.reply_timeout} s")
                    raise _Stop
                r, _, _ = select.select([sock], [], [], left)
                if r:
                    data = sock.recv(65536)
                    if not data:
                        errors.append(f"connection closed by server after {seq - 1} replies")
                        raise _Stop
                    buf += data
            now = time.monotonic()
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            parts = line.split()
            if len(parts) != 3 or int(parts[0]) != seq:
                errors.append(f"bad reply to {seq}: {line!r}")
                raise _Stop
            handled, pid = int(parts[1]), int(parts[2])
            if prev_handled is not None and handled != prev_handled + 1:
                errors.append(f"handled jumped {prev_handled} -> {handled} at seq {seq}")
            if res["first_handled"] is None:
                res["first_handled"] = handled
                if a.ready:
                    with open(a.ready, "w") as f:
                        f.write("ready\n")
            prev_handled = handled
            res["last_handled"] = handled
            if pid not in pids:
                pids.append(pid)
            res["replies"] = int(res["replies"]) + 1  # type: ignore[call-overload]
            if last_reply is not None:
                gap = (now - last_reply) * 1000.0
                if gap > float(res["max_gap_ms"]):  # type: ignore[arg-type]
                    res["max_gap_ms"] = round(gap, 3)
            last_reply = now
            time.sleep(a.interval_ms / 1000.0)
    except _Stop:
        pass
    except ConnectionResetError as err:
        res["reset"] = True
        errors.append(f"reset: {err}")
    except OSError as err:
        errors.append(f"{type(err).__name__}: {err}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        res["duration_s"] = round(time.monotonic() - start, 3)
        tmp = f"{a.out}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(res, f)
        Path(tmp).replace(a.out)
        if sock is not None:
            sock.close()


if __name__ == "__main__":
    main()
