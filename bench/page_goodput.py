"""Pre-copy page goodput: memwriter on lab host a -> PageSender -> TCP -> PrecopyReceiver on b.

Prints figures (not a test). Run as root from the checkout:

    .venv/bin/python bench/page_goodput.py [--mib 256] [--codecs none,lz4,zstd] [--store /dev/shm]

For each codec: pass 1 (a fresh image, received straight into its pages file) and pass 2 (the
same pages again, written in place), on an unshaped veth and then on a 1 Gbit/s tbf-shaped link.
Goodput = page bytes / (first byte sent .. ACK received). The receiver is a separate process
(as on a real target), so each end has its own interpreter and core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phaul.engine import maps, pagemap  # noqa: E402
from phaul.page_server.precopy_receiver import PrecopyReceiver  # noqa: E402
from phaul.source.page_sender import PageSender  # noqa: E402

PORT = 47311


def serve(port: int, store: str, count: int) -> None:
    """Receiver process: ``count`` connections, one fresh images dir each; one JSON line each."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1)
    print("ready", flush=True)
    for _ in range(count):
        conn, _ = ls.accept()
        images = Path(tempfile.mkdtemp(prefix="phaul-goodput-", dir=store))
        try:
            st = PrecopyReceiver(images).serve(conn)
        finally:
            conn.close()
            shutil.rmtree(images, ignore_errors=True)
        print(json.dumps({"pages": st.pages, "wire": st.wire_bytes, "s": st.seconds}), flush=True)


def send(ip: str, port: int, pid: int, codec: str) -> list[tuple[float, int, int]]:
    """Two passes; (seconds to ACK, page bytes, wire bytes) of each."""
    ranges = pagemap.present_ranges(
        pid, [m for m in maps.private_writable_mappings(pid) if m.anonymous]
    )
    sock = socket.create_connection((ip, port))
    out = []
    try:
        sender = PageSender(sock, codec=codec)
        for n in (1, 2):
            t0 = time.monotonic()
            st = sender.send_ranges(pid, 1, ranges)
            sender.end_pass(n)
            out.append((time.monotonic() - t0, st.pages * 4096, st.bytes_wire))
    finally:
        sock.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--codecs", default="none,lz4,zstd")
    ap.add_argument("--store", default="/dev/shm")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "STORE", "COUNT"))
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], int(args.serve[2]))
        return

    from tests.integration.lab import Lab
    from tests.workloads.memwriter import Memwriter

    codecs = args.codecs.split(",")
    with Lab(hosts=("a", "b")) as lab:
        a, b = lab.host("a"), lab.host("b")
        work = lab.tmp / "mw"
        with Memwriter.start(work, mib=args.mib, prefix=a.argv([])) as mw:
            runs = len(codecs) * args.repeat * 2  # one connection per run, two links
            log = open(lab.tmp / "receiver.out", "w+")  # noqa: SIM115
            rcv = b.popen(
                [sys.executable, __file__, "--serve", str(PORT), args.store, str(runs)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
            )
            deadline = time.monotonic() + 30
            while "ready" not in (lab.tmp / "receiver.out").read_text():
                if rcv.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((lab.tmp / "receiver.out").read_text())
                time.sleep(0.05)
            print(f"memwriter {args.mib} MiB, store {args.store}, receiver in its own process")
            print(f"{'link':<10} {'codec':<5} {'pass':>4} {'MiB/s':>8} {'wire MiB':>9} {'s':>7}")
            for link in ("veth", "1gbit"):
                if link == "1gbit":
                    lab.shape(a, "1gbit")
                for codec in codecs:
                    for _ in range(args.repeat):
                        for n, (secs, nbytes, wire) in enumerate(
                            a.call(send, b.ip, PORT, mw.pid, codec), start=1
                        ):
                            print(
                                f"{link:<10} {codec:<5} {n:>4} {nbytes / secs / 2**20:>8.0f} "
                                f"{wire / 2**20:>9.1f} {secs:>7.3f}",
                                flush=True,
                            )
            rcv.wait(30)


if __name__ == "__main__":
    main()
