"""The soft-dirty tracker (phaul.engine.softdirty).

Our 6.18 hosts are built without CONFIG_MEM_SOFT_DIRTY. The probe must say so (checked against
the kernel's own configuration), the tracker must refuse to start, and ``auto`` must not pick
it. Where the kernel does have soft-dirty, the behaviour test runs the lockstep check instead,
so a probe that claims support the kernel cannot deliver fails loudly; nothing is skipped.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from phaul.engine import softdirty
from phaul.engine.tracker import TrackerUnavailable, choose_tracker
from phaul.errors import UsageError
from tests.integration.test_uffd import (
    Lockstep,
    lockstep,  # noqa: F401 - fixture
    lockstep_bin,  # noqa: F401 - fixture
    negative_control,
    run_lockstep_rounds,
)

pytestmark = pytest.mark.integration


def _kernel_config_has_soft_dirty() -> bool:
    config = Path("/proc/config.gz")
    assert config.exists(), "this test needs /proc/config.gz to know the truth"
    with gzip.open(config, "rt") as f:
        return any(line.strip() == "CONFIG_MEM_SOFT_DIRTY=y" for line in f)


def test_probe_tells_the_truth() -> None:
    ok, why = softdirty.probe()
    assert ok == _kernel_config_has_soft_dirty(), why
    if not ok:
        assert "soft-dirty" in why


def test_behaviour_or_honest_refusal(lockstep: Lockstep) -> None:  # noqa: F811
    ok, _why = softdirty.probe()
    if ok:
        # The probe claims support: the tracker must deliver it (0 missed pages).
        run_lockstep_rounds(lockstep, softdirty.SoftDirtyTracker(), rounds=40, seed=3, exact=False)
        negative_control(lockstep, softdirty.SoftDirtyTracker())
        return
    with pytest.raises(TrackerUnavailable, match="soft-dirty"):
        softdirty.SoftDirtyTracker().start(lockstep.proc.pid)
    with pytest.raises(UsageError, match="soft-dirty"):
        choose_tracker("soft-dirty", lockstep.proc.pid)
    assert choose_tracker("auto", os.getpid()).name != "soft-dirty"
