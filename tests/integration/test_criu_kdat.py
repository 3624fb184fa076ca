"""CRIU's kernel-probe cache is kept where CRIU cannot keep it itself (phaul/engine/criu_kdat.py).

Real CRIU: the cache is what ``criu check`` writes in a private tmpfs, and CRIU then loads it
instead of probing the kernel again."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def test_the_tracked_dump_takes_a_private_copy_and_criu_believes_it(tmp_path: Path) -> None:
    """The real cache has the layout tracked_dump checks; under the shim CRIU reports dirty
    tracking, without it (the host's cache) it still does not: nothing global changed."""
    from phaul.engine import tracked_dump as td

    criu = find_criu()
    real = td._real_cache(criu)
    fake = tmp_path / "criu.kdat"
    fake.write_bytes(td.fake_kdat(real))
    env = {"LD_PRELOAD": str(td.SHIM), "PHAUL_KDAT": str(fake)}
    td._verified.pop(criu.path, None)
    td._verify(criu, env)  # raises when CRIU does not take it
    plain = subprocess.run(
        [criu.path, "check", "--feature", "mem_dirty_track"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert plain.returncode != 0, plain.stdout  # this kernel has no soft-dirty
    assert td._real_cache(criu) == real


def test_trees_with_shared_anonymous_memory_keep_the_lazy_dump() -> None:
    from phaul.engine import tracked_dump as td

    code = (
        "import mmap, time; m = mmap.mmap(-1, 1 << 20); m[0] = 1; print(1, flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline()
        with pytest.raises(td.TrackedDumpUnavailable, match="shared anonymous"):
            td.check_tree([proc.pid])
        td.check_tree([os.getpid()])  # ours has none: accepted
    finally:
        proc.kill()
        proc.wait()
