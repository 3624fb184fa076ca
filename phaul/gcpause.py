"""Keep Python's cyclic garbage collector out of the freeze.

A full collection walks every tracked object; in a process holding the pre-copy bookkeeping
(range lists, protobuf messages, image buffers) it takes 10-20 ms here, and it runs whenever
allocations cross a threshold, so now and then in the middle of the freeze. Between the
freeze and the commit phaul allocates little, so the collector is paused there and resumed
afterwards. Pauses nest (an agent may serve several migrations at once): the collector runs
again when the last one ends.
"""

from __future__ import annotations

import gc
import sys
import threading

FREEZE_SWITCH_INTERVAL = 0.0005  # seconds; Python's default is 0.005


class _Pauses:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.was_enabled = True
        self.interval = 0.005


_state = _Pauses()


def pause() -> None:
    """Pause the collector until the matching :func:`resume`."""
    with _state.lock:
        if _state.depth == 0:
            _state.was_enabled = gc.isenabled()
            gc.disable()
            # Threads (page stream, CRIU notifies, daemon start) wait less for the GIL.
            _state.interval = sys.getswitchinterval()
            sys.setswitchinterval(FREEZE_SWITCH_INTERVAL)
        _state.depth += 1


def resume() -> None:
    """Undo one :func:`pause`; the collector runs again after the last one."""
    with _state.lock:
        if _state.depth == 0:
            return
        _state.depth -= 1
        if _state.depth == 0:
            sys.setswitchinterval(_state.interval)
            if _state.was_enabled:
                gc.enable()


def depth() -> int:
    return _state.depth
