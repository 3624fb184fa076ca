"""deploy/phaul-agent.service passes `systemd-analyze verify` (installed by deploy/setup.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
UNIT = REPO / "deploy" / "phaul-agent.service"


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run deploy/setup.sh (package systemd)")
    return subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_verifies(tmp_path: Path) -> None:
    # The unit names the checkout in /opt/phaul/src; verify it against this checkout's phaul.
    text = UNIT.read_text()
    assert "/opt/phaul/src/.venv/bin/phaul agent" in text
    unit = tmp_path / "phaul-agent.service"
    unit.write_text(text.replace("/opt/phaul/src/.venv", str(REPO / ".venv")))
    res = verify(unit)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    for key in ("Type=simple", "Restart=on-failure", "KillMode=process"):
        assert f"\n{key}\n" in text, key
    # Protections that would break CRIU restores must stay off (see the unit's comment).
    active = [ln.split("=")[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
    for off in ("PrivatePIDs", "PrivateNetwork", "ProtectSystem", "NoNewPrivileges",
                "SystemCallFilter", "PrivateTmp", "RestrictNamespaces"):  # fmt: skip
        assert off not in active, off


def test_broken_unit_is_caught(tmp_path: Path) -> None:
    """Negative control: the check would notice a unit systemd cannot run."""
    unit = tmp_path / "phaul-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/phaul/src/.venv", "/nonexistent"))
    assert verify(unit).returncode != 0
