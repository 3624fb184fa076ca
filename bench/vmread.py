"""process_vm_readv throughput: large (1 MiB) iovecs against page-sized (4 KiB) ones.

Starts a memwriter holding SIZE MiB (default 1024), reads all of it with VmReader a few times
per configuration and prints the best throughput and the ratio. Target on the reference VM:
>= 4 GB/s with large iovecs. Run as root from the repository root:

    .venv/bin/python -m bench.vmread [SIZE_MIB] [BUFFER_MIB]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from phaul.engine.vmread import LARGE_IOV_BYTES, VmReader
from tests.workloads.memwriter import Memwriter

ROUNDS = 3


def throughput(mw: Memwriter, buffer_bytes: int, iov_bytes: int) -> tuple[float, int]:
    """Best GB/s over ROUNDS full reads, and the number of syscalls per read."""
    reader = VmReader(mw.pid, buffer_bytes, max_iov_bytes=iov_bytes)
    best = 0.0
    for _ in range(ROUNDS):
        calls = reader.stats.calls
        t0 = time.perf_counter()
        total = sum(len(view) for _, view in reader.read([(mw.addr, mw.size)]))
        dt = time.perf_counter() - t0
        if total != mw.size:
            raise SystemExit(f"short read: {total} of {mw.size} bytes")
        best = max(best, total / dt / 1e9)
    return best, reader.stats.calls - calls


def main() -> None:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    buffer_mibs = [int(sys.argv[2])] if len(sys.argv) > 2 else [64, 4]
    with tempfile.TemporaryDirectory() as tmp, Memwriter.start(Path(tmp), mib=size_mib) as mw:
        print(f"reading {size_mib} MiB of memwriter PID {mw.pid}, best of {ROUNDS}")
        for buf_mib in buffer_mibs:
            large, large_calls = throughput(mw, buf_mib << 20, LARGE_IOV_BYTES)
            small, small_calls = throughput(mw, buf_mib << 20, 4096)
            print(f"buffer {buf_mib:3d} MiB  1 MiB iovecs: {large:5.2f} GB/s ({large_calls} calls)")
            print(f"buffer {buf_mib:3d} MiB  4 KiB iovecs: {small:5.2f} GB/s ({small_calls} calls)")
            print(f"buffer {buf_mib:3d} MiB  ratio: {large / small:4.1f}x")


if __name__ == "__main__":
    main()
