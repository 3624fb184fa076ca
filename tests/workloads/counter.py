"""Counter workload: appends ``n pid time`` to OUT every ~10 ms, n = 1, 2, 3, ...

Usage: counter.py OUT

The counter lives only in memory, so a migrated (restored) counter keeps counting from where it
was, while a restarted one would start again at 1. A test reads the last line of OUT (see
``last``) before and after a migration and checks that n went on increasing. Each line is
flushed; OUT is opened in append mode. Stdlib only; runs until killed.
"""

from __future__ import annotations

import os
import sys
import time


def last(path: str) -> tuple[int, int, float] | None:
    """The last complete line of a counter file as (n, pid, time), or None."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        parts = line.split()
        if len(parts) == 3:
            return int(parts[0]), int(parts[1]), float(parts[2])
    return None


def main() -> None:
    out = sys.argv[1]
    n = 0
    with open(out, "a", buffering=1) as f:
        while True:
            n += 1
            f.write(f"{n} {os.getpid()} {time.time():.6f}\n")
            f.flush()
            time.sleep(0.01)


if __name__ == "__main__":
    main()
