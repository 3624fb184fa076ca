"""Eager vs lazy (split) restore of the same workload: freeze, completion, workload stall.

    sudo .venv/bin/python -m bench.lazy_restore [--sizes 64,512,1024,2048] [--dirty 676]

For each size M a memwriter (lockstep, in its own pid namespace under tini, with a 2 ms
CLOCK_REALTIME tick thread touching random pages: ``-T``) gets a flat parent image (our own
reads, one FlatPageImage per vpid), then ``--dirty`` pages are rewritten. Then, in one run:

1. eager: lazy final dump, rewrite into a PE_PARENT chain, plain restore while the source is
   frozen; the restored copy runs 0.4 s and is killed; post-dump answers False (rollback).
2. lazy: ``criu lazy-pages`` prestarted on D holding the tree's inventory.img and pstree.img
   (``--no-prestart``: started inside the freeze), lazy final dump, split R + daemon dir D
   (lazy_split), ``criu restore --lazy-pages``; the daemon's exit 0 is
   awaited before post-dump answers True (commit); the restored copy's memory is verified.

Figures (seconds): freeze = DUMP request sent -> restore returned (tree running); complete =
DUMP request -> daemon exited 0 (eager: = freeze); stall = the largest tick gap the workload
saw (CLOCK_REALTIME) after the DUMP request. Prints a table, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, for tests/

from phaul.engine.criu_locate import find_criu
from phaul.engine.criu_swrk import RestoreOptions, Swrk
from phaul.engine.lazy_restore import DaemonOptions, LazyPagesDaemon, restore_lazily
from phaul.page_server.lazy_split import build_daemon_dir
from tests.integration.test_lazy_restore import (
    build_parent,
    clean_ranges,
    lazy_final_dump,
    rewrite,
    workload,
)


def gaps_after(ticks: Path, t0: float) -> float:
    """The largest recorded tick gap (s) that ends after ``t0`` (time.time())."""
    best = 0.0
    with contextlib.suppress(FileNotFoundError):
        for line in ticks.read_text().splitlines():
            _, s, e = line.split()
            start, end = int(s) / 1e9, int(e) / 1e9
            if end > t0:
                best = max(best, end - start)
    return best


def one_size(criu, root: Path, mib: int, ndirty: int, prestart: bool) -> dict[str, float | str]:  # type: ignore[no-untyped-def]
    root.mkdir()
    ticks = root / "ticks"
    out: dict[str, float | str] = {"MiB": mib, "prestart": str(prestart)}
    with workload(root, mib=mib, extra=("-T", str(ticks))) as w:
        npages = w.mw.pages
        step = max(1, npages // ndirty)
        dirty = [(13 + i * step) % npages for i in range(ndirty)]
        pre = root / "pre"
        t = time.monotonic()
        covered = build_parent(w, pre)
        out["parent_s"] = round(time.monotonic() - t, 2)
        for i in range(0, len(dirty), 200):
            chunk = dirty[i : i + 200]
            assert w.mw.command("w " + " ".join(map(str, chunk))) == f"ack {len(chunk)}"
        clean = clean_ranges(w, covered, dirty)
        time.sleep(0.3)

        # -- eager: PE_PARENT chain, plain restore; rollback afterwards
        eager_final = root / "eager"
        marks: dict[str, float] = {}
        t_before = time.time()

        def run_t0() -> float:
            return t_before

        def decide_eager() -> bool:
            marks["request"] = run_t0()
            rewrite(eager_final, pre, w, clean, split=False)
            with Swrk.spawn(criu) as sw:
                res = sw.restore(
                    RestoreOptions(images_dir=eager_final, tcp_established=False, log_level=1),
                    timeout=120,
                )
            marks["running"] = time.time()
            check = w.mw.command("v", timeout=60)
            marks["check"] = check == f"ok pages={npages} bad=0"
            time.sleep(0.4)
            # read now: after the rollback the source records its own (long) freeze gap
            marks["stall"] = gaps_after(ticks, marks["request"])
            os.kill(res.child_pid, signal.SIGKILL)
            os.waitpid(res.child_pid, 0)
            return False

        run = lazy_final_dump(criu, w, eager_final, decide_eager, log_level=1)
        out["eager_freeze"] = round(marks["running"] - run.t_request, 3)
        out["eager_stall"] = round(marks["stall"], 3)
        out["eager_ok"] = "ok" if marks.get("check") else "BAD"
        time.sleep(0.5)  # the source resumed (rollback)
        assert w.mw.command("v", timeout=60) == f"ok pages={npages} bad=0"

        # -- lazy: split R + daemon; commit once the daemon is done
        final, ddir, work = root / "R", root / "D", root / "W"
        lz: dict[str, float | str] = {}
        roots: list[int] = []

        prestarted: list[LazyPagesDaemon] = []
        if prestart:
            # The daemon reads only inventory.img and pstree.img at start (the task set must
            # not change): take them from the eager run's dump of the same tree.
            ddir.mkdir()
            for name in ("inventory.img", "pstree.img"):
                os.link(eager_final / name, ddir / name)
            prestarted.append(LazyPagesDaemon.start(criu, DaemonOptions(ddir, work, log_level=1)))

        def decide_lazy() -> bool:
            t1 = time.time()
            rewrite(final, pre, w, clean, split=True)
            build_daemon_dir(final, pre, ddir)
            lz["split"] = time.time() - t1
            t2 = time.time()
            if not prestarted:
                prestarted.append(
                    LazyPagesDaemon.start(criu, DaemonOptions(ddir, work, log_level=1))
                )
            with prestarted[0] as daemon:
                lz["daemon_start"] = time.time() - t2
                t3 = time.time()
                res = restore_lazily(criu, final, daemon, timeout=60, log_level=1, check=False)
                roots.append(res.child_pid)
                lz["running"] = time.time()
                lz["restore"] = lz["running"] - t3
                result = daemon.wait(timeout=120, stall_timeout=10)
                lz["complete"] = time.time()
                lz["reason"] = result.reason
                return result.complete

        try:
            run = lazy_final_dump(criu, w, final, decide_lazy, log_level=1)
            time.sleep(0.4)
            out["lazy_freeze"] = round(float(lz["running"]) - run.t_request, 3)
            out["lazy_complete"] = round(float(lz["complete"]) - run.t_request, 3)
            out["lazy_stall"] = round(gaps_after(ticks, run.t_request), 3)
            out["lazy_split_s"] = round(float(lz["split"]), 3)
            out["lazy_daemon_start_s"] = round(float(lz["daemon_start"]), 3)
            out["lazy_restore_s"] = round(float(lz["restore"]), 3)
            out["lazy_images_s"] = round(run.marks["post_dump"] - run.t_request, 3)
            out["lazy_ok"] = (
                "ok"
                if run.outcome is None
                and w.mw.command("v", timeout=60) == f"ok pages={npages} bad=0"
                else f"BAD {run.outcome} {lz.get('reason')}"
            )
        finally:
            for d in prestarted:
                d.kill()
            for pid in roots:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,512,1024,2048", help="MiB, comma separated")
    ap.add_argument("--dirty", type=int, default=676, help="pages rewritten after the parent")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-prestart", action="store_true", help="start the daemon inside the freeze")
    args = ap.parse_args()
    criu = find_criu()
    rows = []
    with tempfile.TemporaryDirectory(prefix="phaul-bench-lazy-", dir="/var/tmp") as tmp:
        for mib in (int(s) for s in args.sizes.split(",")):
            row = one_size(criu, Path(tmp) / f"m{mib}", mib, args.dirty, not args.no_prestart)
            rows.append(row)
            print(json.dumps(row) if args.json else row, flush=True)
    cols = [
        "MiB",
        "eager_freeze",
        "eager_stall",
        "lazy_freeze",
        "lazy_stall",
        "lazy_complete",
        "lazy_images_s",
        "lazy_split_s",
        "lazy_daemon_start_s",
        "lazy_restore_s",
        "eager_ok",
        "lazy_ok",
    ]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    by = {r["MiB"]: r for r in rows}
    if 512 in by:
        print(f"target stall <= 0.150 s at 512 MiB: lazy {by[512]['lazy_stall']}")
    if 64 in by and 1024 in by:
        ratio = float(by[1024]["lazy_stall"]) / max(float(by[64]["lazy_stall"]), 1e-9)
        print(f"target stall(1 GiB) <= 1.5 x stall(64 MiB): ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
