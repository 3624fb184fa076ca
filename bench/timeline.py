"""Print a PHAUL_TRACE timeline, one migration at a time, in ms relative to its freeze.

    PHAUL_TRACE=/tmp/trace.txt .venv/bin/python bench/precopy.py --scenario dirty512
    .venv/bin/python bench/timeline.py /tmp/trace.txt [--run N] [--until MS]

Source events start with ``src`` (the report's marks), agent events with ``tgt``, CRIU
notifies with ``criu``; both sides use CLOCK_REALTIME, so in a lab on one host they share an
axis. The workload's stall ends shortly before ``tgt criu_restored`` (CRIU's post-resume).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--run", type=int, default=None, help="only migration N (0-based)")
    ap.add_argument("--until", type=float, default=600.0, help="ms after the freeze to show")
    args = ap.parse_args()
    events = []
    for line in args.trace.read_text().splitlines():
        t, pid, label = line.split(None, 2)
        events.append((float(t), pid, label))
    starts = [i for i, e in enumerate(events) if e[2] == "src start"] + [len(events)]
    for n, (a, b) in enumerate(itertools.pairwise(starts)):
        if args.run is not None and n != args.run:
            continue
        run = events[a:b]
        freeze = next((t for t, _, label in run if label == "src freeze"), None)
        if freeze is None:
            continue
        print(f"--- migration {n}")
        for t, pid, label in run:
            ms = (t - freeze) * 1000
            if -50 <= ms <= args.until:
                print(f"{ms:8.1f} {pid:>7} {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
