"""Fixtures for integration tests: root, real CRIU, and a namespace lab (see lab.py).

Integration tests must run; when they cannot (not root, no CRIU) the session fails loudly
instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.lab import Lab

CRIU = os.environ.get("PHAUL_CRIU", "/opt/phaul/criu/criu")


@pytest.fixture(scope="session", autouse=True)
def _integration_requirements() -> None:
    """Fail (never skip) when the integration environment is missing."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run tests/run as root)", pytrace=False)
    if not os.access(CRIU, os.X_OK):
        pytest.fail(f"CRIU not found at {CRIU} (deploy/setup.sh installs it)", pytrace=False)
    try:
        out = subprocess.run(
            [CRIU, "--version"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"{CRIU} --version failed: {err}", pytrace=False)
    if "Version: 4." not in out or "Version: 4.0" in out or "Version: 4.1" in out:
        pytest.fail(f"CRIU >= 4.2 needed, {CRIU} says: {out.strip()}", pytrace=False)
    for tool in ("ip", "nsenter", "unshare", "tini", "nft", "tc", "gcc", "redis-server"):
        if shutil.which(tool) is None:
            pytest.fail(f"integration tests need `{tool}` on PATH", pytrace=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab with hosts a, b and client; torn down even when the test fails."""
    with Lab(hosts=("a", "b", "client")) as lb:
        yield lb
