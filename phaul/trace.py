"""A timeline for performance work: ``PHAUL_TRACE=FILE`` appends one line per event.

Each line is ``<CLOCK_REALTIME seconds> <pid> <event>``. The source (its report marks), the
agent (its session steps, page stream and lazy-pages daemon) and every CRIU notify write to
it, so in a lab where source and target share the host clock both sides line up on one time
axis; ``bench/timeline.py FILE`` prints each migration relative to its freeze. Without the
variable nothing is written (one environment lookup per event).
"""

from __future__ import annotations

import os
import time


def event(label: str) -> None:
    path = os.environ.get("PHAUL_TRACE")
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {label}\n")
    except OSError:
        pass
