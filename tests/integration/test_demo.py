"""`phaul demo`, the first thing a new user runs, works end to end and cleans up."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_migrates_and_cleans_up() -> None:
    before = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    res = subprocess.run(
        [sys.executable, "-m", "phaul.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "migrated PID" in res.stdout
    assert "errors none, reset False" in res.stdout
    after = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    assert "phaul-demo" not in after.replace(before, "")
