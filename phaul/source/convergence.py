"""When to stop pre-copy: predicted downtime against the budget, as measured pass by pass.

After each pass we know how many bytes the link carried and how long it took (goodput), and how
many bytes the workload dirtied meanwhile (the next pass's work, hence the final dump's). The
final freeze costs a fixed part (CRIU freezing, dumping the tree's state, restoring it: measured
per migration from the tree size, refined by the caller) plus the dirty bytes at goodput.
Decisions, in order:
1. predicted downtime <= budget: FINAL (converged);
2. ``max_iterations`` passes done: FINAL anyway (a longer freeze), or ABORT with
   ``on_no_converge=abort`` (nothing changed, the tree keeps running);
3. the dirty set stopped shrinking (> ``stall_ratio`` of the previous pass's): the workload
   dirties faster than we send. ``on_no_converge``: ``throttle`` steps the tree's CPU cap (20 %,
   then +10 % per pass up to 99 %, like QEMU's auto-converge) and goes on; ``stop-and-copy``
   goes FINAL; ``abort`` gives up;
4. otherwise: another pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from phaul.errors import UsageError


class Decision(enum.Enum):
    CONTINUE = "continue"
    THROTTLE = "throttle"
    FINAL = "final"
    ABORT = "abort"


@dataclass(frozen=True)
class ConvergencePolicy:
    max_downtime_ms: float = 300.0
    max_iterations: int = 8
    on_no_converge: str = "throttle"  # "throttle" | "stop-and-copy" | "abort"
    stall_ratio: float = 0.9
    throttle_initial: float = 0.2
    throttle_step: float = 0.1
    throttle_max: float = 0.99

    def __post_init__(self) -> None:
        if self.on_no_converge not in ("throttle", "stop-and-copy", "abort"):
            raise UsageError(f"unknown --on-no-converge {self.on_no_converge!r}")
        if self.max_iterations < 1:
            raise UsageError("--max-iterations must be at least 1")
        if self.max_downtime_ms <= 0:
            raise UsageError("--max-downtime must be positive (milliseconds)")


@dataclass
class PassRecord:
    n: int
    pages: int
    bytes_wire: int
    seconds: float
    dirty_bytes: int  # written while this pass ran (what the next pass has to send)
    goodput_bps: float
    dirty_rate_bps: float
    predicted_ms: float
    throttle: float = 0.0
    decision: str = ""


@dataclass
class Convergence:
    policy: ConvergencePolicy
    fixed_ms: float = 150.0
    per_page_ms: float = 0.08
    passes: list[PassRecord] = field(default_factory=list)
    throttle: float = 0.0
    reason: str = ""

    def predict_ms(self, dirty_bytes: int, goodput_bps: float) -> float:
        """Fixed part + moving the dirty pages + handling them while frozen (reading each from
        the frozen tree, rewriting the page maps, writing them on the target: measured
        ~0.1 ms per page here, more than the wire time on a 1 Gbit/s link)."""
        if goodput_bps <= 0:
            return float("inf")
        pages = dirty_bytes / 4096
        return self.fixed_ms + dirty_bytes / goodput_bps * 1000.0 + pages * self.per_page_ms

    def goodput(self) -> float:
        """Bytes per second over the passes that moved enough to be measured."""
        big = [p for p in self.passes if p.bytes_wire >= 1 << 20 and p.seconds > 0]
        if not big:
            big = [p for p in self.passes if p.seconds > 0]
        if not big:
            return 0.0
        return sum(p.bytes_wire for p in big) / sum(p.seconds for p in big)

    def record(
        self, *, pages: int, bytes_wire: int, seconds: float, dirty_bytes: int
    ) -> PassRecord:
        n = len(self.passes)
        rate = dirty_bytes / seconds if seconds > 0 else 0.0
        rec = PassRecord(
            n=n,
            pages=pages,
            bytes_wire=bytes_wire,
            seconds=seconds,
            dirty_bytes=dirty_bytes,
            goodput_bps=bytes_wire / seconds if seconds > 0 else 0.0,
            dirty_rate_bps=rate,
            predicted_ms=0.0,
            throttle=self.throttle,
        )
        self.passes.append(rec)
        rec.predicted_ms = self.predict_ms(dirty_bytes, self.goodput())
        return rec

    def decide(self) -> Decision:
        rec = self.passes[-1]
        pol = self.policy
        # When the fixed part alone (CRIU freezing and restoring the tree) eats the budget, no
        # amount of pre-copy helps: accept once the dirty part is a quarter of the budget.
        goal = max(pol.max_downtime_ms, self.fixed_ms + 0.25 * pol.max_downtime_ms)
        if rec.predicted_ms <= goal:
            self.reason = (
                f"converged: predicted downtime {rec.predicted_ms:.0f} ms <= {goal:.0f} ms"
            )
            return self._set(rec, Decision.FINAL)
        prev = self.passes[-2].dirty_bytes if len(self.passes) >= 2 else None
        stalled = prev is not None and rec.dirty_bytes > pol.stall_ratio * prev
        out_of_passes = len(self.passes) >= pol.max_iterations
        if out_of_passes:
            if pol.on_no_converge == "abort":
                self.reason = f"not converged in {pol.max_iterations} passes; aborting as asked"
                return self._set(rec, Decision.ABORT)
            self.reason = (
                f"not converged in {pol.max_iterations} passes: final dump with predicted "
                f"downtime {rec.predicted_ms:.0f} ms"
            )
            return self._set(rec, Decision.FINAL)
        if not stalled:
            return self._set(rec, Decision.CONTINUE)
        if pol.on_no_converge == "abort":
            self.reason = "not converging (passes stopped shrinking); aborting as asked"
            return self._set(rec, Decision.ABORT)
        if pol.on_no_converge == "throttle" and self.throttle < pol.throttle_max:
            self.throttle = (
                pol.throttle_initial
                if self.throttle == 0
                else min(self.throttle + pol.throttle_step, pol.throttle_max)
            )
            self.reason = (
                f"passes stopped shrinking: throttling the tree's CPU by {self.throttle:.0%}"
            )
            return self._set(rec, Decision.THROTTLE)
        self.reason = (
            "passes stopped shrinking: final dump with predicted downtime "
            f"{rec.predicted_ms:.0f} ms"
        )
        return self._set(rec, Decision.FINAL)

    @staticmethod
    def _set(rec: PassRecord, d: Decision) -> Decision:
        rec.decision = d.value
        return d
