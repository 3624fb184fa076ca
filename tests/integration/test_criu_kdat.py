"""CRIU's kernel-probe cache is kept where CRIU cannot keep it itself (phaul/engine/criu_kdat.py).

Real CRIU: the cache is what ``criu check`` writes in a private tmpfs, and CRIU then loads it
instead of probing the kernel again."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from phaul.engine import criu_kdat
from phaul.engine.criu_locate import find_criu


def test_primes_a_non_tmpfs_run_dir_and_keeps_it_while_current(tmp_path: Path) -> None:
    criu = find_criu()
    run, stamps = tmp_path / "run", tmp_path / "run" / "phaul"
    run.mkdir()
    assert not criu_kdat.run_is_tmpfs(run)  # /tmp is ext4 here, like this VM's /run

    assert criu_kdat.prime(criu, run=run, stamp_dir=stamps) == "primed"
    cache = next(run / c for c in criu_kdat.CANDIDATES if (run / c).is_file())
    first = cache.read_bytes()
    assert len(first) > 100  # CRIU's struct kerndat_s, magic included
    assert (cache.stat().st_mode & 0o777) == 0o600
    assert (stamps / "criu-kdat.stamp").read_text() == criu_kdat.stamp_for(criu)

    assert criu_kdat.prime(criu, run=run, stamp_dir=stamps) == "cached"
    # Another boot, kernel or CRIU: probed again.
    (stamps / "criu-kdat.stamp").write_text("boot=another\n")
    assert criu_kdat.prime(criu, run=run, stamp_dir=stamps) == "primed"
    assert cache.read_bytes()[:8] == first[:8]


def test_leaves_a_tmpfs_run_dir_to_criu() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        run = Path(shm)
        assert criu_kdat.run_is_tmpfs(run)
        assert criu_kdat.prime(find_criu(), run=run, stamp_dir=run / "phaul") == "tmpfs"
        assert list(run.iterdir()) == []


def test_criu_loads_the_primed_cache(tmp_path: Path) -> None:
    """After priming the real /run (or with a tmpfs /run, where CRIU caches by itself), a CRIU
    run skips its kernel probes: its log says it loaded the cache."""
    criu = find_criu()
    result = criu_kdat.prime(criu)
    assert result in ("primed", "cached", "tmpfs"), result
    if result == "tmpfs":
        subprocess.run([criu.path, "check"], capture_output=True, timeout=60, check=False)
    log = tmp_path / "check.log"
    subprocess.run(
        [criu.path, "check", "-v4", "-o", str(log)], capture_output=True, timeout=60, check=False
    )
    assert "Loaded kdat cache" in log.read_text()
