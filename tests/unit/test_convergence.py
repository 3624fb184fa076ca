"""The convergence policy's decisions, from synthetic pass measurements."""

from __future__ import annotations

import pytest

from phaul.errors import UsageError
from phaul.source.convergence import Convergence, ConvergencePolicy, Decision

MB = 1 << 20


def conv(**kw: object) -> Convergence:
    return Convergence(ConvergencePolicy(**kw), fixed_ms=100)  # type: ignore[arg-type]


def test_converges_when_prediction_under_budget() -> None:
    c = conv(max_downtime_ms=300)
    c.record(pages=65536, bytes_wire=256 * MB, seconds=2.0, dirty_bytes=5 * MB)
    # goodput 128 MiB/s: 5 MiB -> 39 ms + 1280 pages x 0.08 ms + 100 fixed = 241 ms
    assert c.decide() is Decision.FINAL
    assert 238 < c.passes[-1].predicted_ms < 244
    assert "converged" in c.reason


def test_continues_while_shrinking() -> None:
    c = conv(max_downtime_ms=150)
    c.record(pages=65536, bytes_wire=256 * MB, seconds=2.0, dirty_bytes=64 * MB)
    assert c.decide() is Decision.CONTINUE
    c.record(pages=16384, bytes_wire=64 * MB, seconds=0.5, dirty_bytes=16 * MB)
    assert c.decide() is Decision.CONTINUE


@pytest.mark.parametrize(
    ("mode", "expect"),
    [("throttle", Decision.THROTTLE), ("stop-and-copy", Decision.FINAL), ("abort", Decision.ABORT)],
)
def test_not_shrinking(mode: str, expect: Decision) -> None:
    c = conv(max_downtime_ms=150, on_no_converge=mode)
    c.record(pages=1000, bytes_wire=100 * MB, seconds=1.0, dirty_bytes=100 * MB)
    assert c.decide() is Decision.CONTINUE
    c.record(pages=1000, bytes_wire=100 * MB, seconds=1.0, dirty_bytes=99 * MB)
    assert c.decide() is expect


def test_throttle_steps_like_auto_converge() -> None:
    c = conv(max_downtime_ms=10, max_iterations=20)
    steps = []
    for _ in range(6):
        c.record(pages=1, bytes_wire=100 * MB, seconds=1.0, dirty_bytes=100 * MB)
        if c.decide() is Decision.THROTTLE:
            steps.append(round(c.throttle, 2))
    assert steps == [0.2, 0.3, 0.4, 0.5, 0.6]


def test_out_of_passes_goes_final_or_aborts() -> None:
    for mode, expect in (("throttle", Decision.FINAL), ("abort", Decision.ABORT)):
        c = conv(max_downtime_ms=10, max_iterations=2, on_no_converge=mode)
        c.record(pages=1, bytes_wire=100 * MB, seconds=1.0, dirty_bytes=50 * MB)
        assert c.decide() is Decision.CONTINUE
        c.record(pages=1, bytes_wire=50 * MB, seconds=0.5, dirty_bytes=10 * MB)
        assert c.decide() is expect


def test_bad_policy_rejected() -> None:
    with pytest.raises(UsageError, match="on-no-converge"):
        ConvergencePolicy(on_no_converge="pray")
    with pytest.raises(UsageError, match="max-iterations"):
        ConvergencePolicy(max_iterations=0)
