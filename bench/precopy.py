"""Pre-copy against stop-and-copy: downtime, total time and bytes on a 1 Gbit/s link.

Run as root from the repository root (it takes a few minutes):

    .venv/bin/python bench/precopy.py [--quick] [--scenario NAME ...] [--repeat N]

It builds a namespace lab (hosts a, b, client), shapes a's link (both directions) to
``--rate`` (default 1 Gbit/s) with tc tbf, and runs ``phaul agent`` on b. For each scenario it
starts a memwriter (tests/workloads/memwriter.c: M MiB of self-describing pages, D MiB/s
rewritten by one thread) in its own pid namespace on a and migrates it to b with ``phaul
migrate --precopy on`` and, in the same run and lab, with ``--precopy off`` (stop-and-copy, the
baseline). After each migration the workload checks every page itself (SIGUSR1 -> "ok pages=N
bad=0") on b; a run whose memory is not exact is reported as BAD and the benchmark exits 1.

Downtime is given three ways:
  * phaul: ``downtime_ms`` of the report (CRIU's pre-dump notify on the source to the target's
    Committed: freeze -> running);
  * criu: CRIU's ``frozen_time`` from the dump statistics (stop-and-copy only; a lazy dump's
    statistics are not meaningful, phaul leaves them out);
  * stall: what the workload itself saw. ``stallwatch`` (a 40-line C program built here) is the
    parent of memwriter in the migrated tree; it ticks every 1 ms on CLOCK_REALTIME and appends
    every gap above 5 ms to a file. The stall of a run is the longest gap inside the wall-clock
    window of ``phaul migrate``; it is frozen and resumed with memwriter (same tree).
Bytes: ``wire`` is what a's eth0 carried in both directions during the migration (interface
counters: payload plus TCP/IP/Ethernet headers), ``phaul`` is the report's ``bytes_on_wire``
(control, CRIU page stream and pre-copy page stream).

Scenarios (--quick divides the sizes by 4, keeps the rates):
  dirty512       M = 512 MiB, D = 10 MiB/s   (the targets below are stated for this one)
  idle64         M = 64 MiB, idle
  idle1g         M = 1 GiB, idle
  dirty512-lz4   as dirty512, pre-copy with --compress lz4  (not in the default set)
  dirty512-zstd  as dirty512, pre-copy with --compress zstd (not in the default set)
  dirty64, dirty1g, dirty2g   M = 64 MiB, 1 GiB, 2 GiB at D = 10 MiB/s, pre-copy with
                 --restore lazy and --restore eager (modes precopy-lazy / precopy-eager);
                 --sweep runs them with dirty512: the workload's stall against M

Targets: at dirty512 on 1 Gbit/s, downtime <= 500 ms and >= 10x less than stop-and-copy in the
same run; bytes on the wire <= 1.3 x M; with the lazy restore (the default from 256 MiB) a
workload stall <= 150 ms and >= 35x less than stop-and-copy; in the sweep, the lazy stall at
1 GiB within 1.5x of the one at 64 MiB. Reports, migrate output, the source's CRIU dump log
and the target's CRIU logs are copied to --out (default /tmp/phaul-bench-precopy-<time>).
With PHAUL_TRACE=FILE in the environment, bench/timeline.py FILE shows each freeze step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.lab import Host, Lab, pids_in_netns  # noqa: E402
from tests.integration.phaul_lab import AgentProc, make_token, migrate, start_agent  # noqa: E402
from tests.workloads.memwriter import build  # noqa: E402

MIB = 1 << 20
STALL_MIN_NS = 5_000_000

STALLWATCH_C = r"""
/* stallwatch OUT -- CMD...: run CMD as a child; every 1 ms read CLOCK_REALTIME and append
 * "prev_ns now_ns" to OUT for every gap of at least MIN_NS. SIGTERM/SIGINT go to the child; exits
 * with the child's status. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t term;
static void on_term(int sig) { (void)sig; term = 1; }

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 4 || strcmp(argv[2], "--")) {
		fputs("usage: stallwatch OUT -- CMD ...\n", stderr);
		return 2;
	}
	int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		execvp(argv[3], argv + 3);
		perror(argv[3]);
		_exit(127);
	}
	struct sigaction sa = {.sa_handler = on_term};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	struct timespec tick = {0, 1000000};
	int64_t prev = now_ns();
	for (;;) {
		if (term) {
			kill(child, SIGTERM);
			term = 0;
		}
		int st;
		if (waitpid(child, &st, WNOHANG) == child)
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		nanosleep(&tick, NULL);
		int64_t t = now_ns();
		if (t - prev >= MIN_NS) {
			char line[64];
			int n = snprintf(line, sizeof(line), "%" PRId64 " %" PRId64 "\n", prev, t);
			if (write(fd, line, (size_t)n) != n)
				return 1;
		}
		prev = t;
	}
}
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    mib: int
    rate: float  # MiB/s dirtied
    modes: tuple[str, ...] = ("precopy", "stop-and-copy")
    compress: str = "none"
    baseline: str = ""  # scenario whose stop-and-copy run is the comparison (compress variants)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("dirty512", 512, 10.0, ("precopy", "precopy-eager", "stop-and-copy")),
        Scenario("idle64", 64, 0.0),
        Scenario("idle1g", 1024, 0.0),
        Scenario("dirty512-lz4", 512, 10.0, ("precopy",), "lz4", "dirty512"),
        Scenario("dirty512-zstd", 512, 10.0, ("precopy",), "zstd", "dirty512"),
        # The restore sweep (--sweep): the same workload at other sizes, lazy and eager.
        Scenario("dirty64", 64, 10.0, ("precopy-lazy", "precopy-eager")),
        Scenario("dirty1g", 1024, 10.0, ("precopy-lazy", "precopy-eager")),
        Scenario("dirty2g", 2048, 10.0, ("precopy-lazy", "precopy-eager")),
    )
}
DEFAULT = ("dirty512", "idle64", "idle1g")
SWEEP = ("dirty64", "dirty512", "dirty1g", "dirty2g")


@dataclass
class Run:
    scenario: Scenario
    mode: str
    mib: int
    ok: bool = False
    check: str = ""
    error: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    wire_bytes: int = 0
    stall_ms: float | None = None
    wall_s: float = 0.0

    @property
    def downtime_ms(self) -> float:
        return float(self.report.get("downtime_ms", 0.0))

    @property
    def frozen_ms(self) -> float | None:
        us = self.report.get("criu_dump_stats", {}).get("frozen_time")
        return us / 1000.0 if us else None

    @property
    def phaul_bytes(self) -> int:
        return int(self.report.get("bytes_on_wire", 0))


# --- helpers ---------------------------------------------------------------------------------
def link_bytes(host: Host) -> int:
    """rx + tx bytes of ``host``'s eth0."""
    out = subprocess.run(
        ["ip", "-n", host.netns, "-j", "-s", "link", "show", "dev", host.dev],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def ppid_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def find(host: Host, exe: Path) -> list[int]:
    target = str(exe.resolve())
    return [p for p in pids_in_netns(host.netns_path) if exe_of(p) == target]


def wait_file(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def self_check(pid: int, work: Path) -> str:
    """SIGUSR1 -> memwriter verifies every page against its expected generation."""
    result = work / "result"
    result.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    wait_file(result, 60, "memwriter's self-check")
    return result.read_text().strip()


def stall_in(path: Path, t0_ns: int, t1_ns: int) -> float | None:
    """Longest recorded gap (ms) that lies inside [t0, t1]."""
    best: float | None = None
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        a, b = (int(x) for x in line.split())
        if a >= t0_ns and b <= t1_ns:
            gap = (b - a) / 1e6
            best = gap if best is None else max(best, gap)
    return best


def kill_tree(host: Host, pids: list[int]) -> None:
    """SIGKILL the restored tree: its pid-namespace init (tini, the parent of stallwatch, which
    takes the whole namespace with it) and ``pids``, if they live in ``host``."""
    netns = os.stat(host.netns_path).st_ino
    for pid in [*{ppid_of(p) for p in pids}, *pids]:
        try:
            if pid > 1 and os.stat(f"/proc/{pid}/ns/net").st_ino == netns:
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone, or exiting (its ns links are no longer readable)
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(exe_of(p) for p in pids):
        time.sleep(0.02)


# --- one migration ---------------------------------------------------------------------------
def one_run(
    lab: Lab,
    agent: AgentProc,
    tools: dict[str, Path],
    sc: Scenario,
    mode: str,
    mib: int,
    out_dir: Path,
    tag: str,
    extra: list[str],
) -> Run:
    a, b = lab.host("a"), lab.host("b")
    run = Run(sc, mode, mib)
    work = Path(lab.tmp) / f"mw-{tag}"
    work.mkdir()
    stall_file = work / "stalls"
    argv = [str(tools["stallwatch"]), str(stall_file), "--", str(tools["memwriter"]), "-m",
            str(mib), "-i", str(work / "info"), "-r", str(work / "result")]  # fmt: skip
    if sc.rate:
        argv += ["-d", str(sc.rate), "-t", "1"]
    # A private cwd: for a tree in its own pid namespace CRIU's parasite mounts proc on
    # "proc.crtools" in the task's cwd; two dumps sharing a cwd collide there (EEXIST).
    wl = a.start_workload(argv, log=work / "workload.log", cwd=work)
    wait_file(work / "info", 120, "memwriter to fill its memory")
    time.sleep(1.0)  # let the writer reach its rate
    report_path = work / "report.json"
    args = ["--precopy", "off" if mode == "stop-and-copy" else "on", "--no-move-ip",
            "--report", str(report_path), *extra]  # fmt: skip
    if mode == "precopy-eager":
        args += ["--restore", "eager"]
    if mode == "precopy-lazy":
        args += ["--restore", "lazy"]
    if mode == "precopy" and sc.compress != "none":
        args += ["--compress", sc.compress]
    before = link_bytes(a)
    t0 = time.time_ns()
    res = migrate(lab, a, wl.root_pid, agent, *args, timeout=600)
    t1 = time.time_ns()
    run.wall_s = (t1 - t0) / 1e9
    run.wire_bytes = link_bytes(a) - before
    (out_dir / f"{tag}.migrate.log").write_text(res.stdout + res.stderr)
    if report_path.exists():
        shutil.copy(report_path, out_dir / f"{tag}.report.json")
        run.report = json.loads(report_path.read_text())
    for name, path in run.report.get("logs", {}).items():
        if Path(path).exists():
            shutil.copy(path, out_dir / f"{tag}.{name}.log")
    try:
        if res.returncode != 0:
            run.error = (
                f"phaul migrate exited {res.returncode}: "
                + (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            )
            for name, path in run.report.get("logs", {}).items():
                if Path(path).exists():
                    shutil.copy(path, out_dir / f"{tag}.{name}.log")
            shutil.copy(agent.log, out_dir / f"{tag}.agent.log")
            return run
        moved = find(b, tools["memwriter"])
        if len(moved) != 1:
            run.error = f"expected one memwriter on b, found {moved}"
            return run
        time.sleep(0.2)
        run.check = self_check(moved[0], work)
        run.ok = run.check.startswith(f"ok pages={mib * 256} bad=0")
        run.stall_ms = stall_in(stall_file, t0, t1)
        kill_tree(b, [*moved, *find(b, tools["stallwatch"])])
    finally:
        wl.kill()
        # The agent's copy of the images: free the space, keep its CRIU logs.
        mid = run.report.get("migration_id", "")
        for mdir in [d for d in agent.workdir.iterdir() if d.is_dir()]:
            for sub in ("images", "precopy"):
                shutil.rmtree(mdir / sub, ignore_errors=True)
            if mid and mdir.name == mid:
                for logfile in mdir.glob("*.log"):
                    shutil.copy(logfile, out_dir / f"{tag}.target-{logfile.name}")
    return run


# --- output ----------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_runs(runs: list[Run]) -> None:
    head = (
        f"{'scenario':<14} {'mode':<13} {'phaul ms':>9} {'criu ms':>8} {'stall ms':>9} "
        f"{'restore':>8} {'rst':>5} {'fill ms':>7} "
        f"{'total s':>8} {'wire MB':>8} {'wire/M':>7} {'phaul MB':>9} {'passes':>6} "
        f"{'final pg':>8}  memory check"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        m_bytes = r.mib * MIB
        passes = len(r.report.get("passes", []))
        check = r.check if r.ok else f"BAD: {r.check or r.error}"
        name = r.scenario.name + ("" if r.mib == r.scenario.mib else f"({r.mib}M)")
        print(
            f"{name:<14} {r.mode:<13} {fmt(r.downtime_ms):>9} {fmt(r.frozen_ms):>8} "
            f"{fmt(r.stall_ms):>9} {fmt(r.report.get('phases_ms', {}).get('restore')):>8} "
            f"{r.report.get('restore', '-'):>5} {fmt(r.report.get('fill_ms') or None):>7} "
            f"{r.report.get('total_ms', 0) / 1000:8.2f} "
            f"{r.wire_bytes / 1e6:8.1f} {r.wire_bytes / m_bytes:7.2f} "
            f"{r.phaul_bytes / 1e6:9.1f} {passes:6d} {r.report.get('final_pages', 0):8d}  "
            f"{check}"
        )


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def print_ratios(runs: list[Run], scenarios: list[Scenario]) -> None:
    print("\nstop-and-copy / pre-copy (medians of the runs that verified ok):")
    for sc, mode in [(s, m) for s in scenarios for m in s.modes if m != "stop-and-copy"]:
        base = SCENARIOS[sc.baseline] if sc.baseline else sc
        pre = [r for r in runs if r.scenario == sc and r.mode == mode and r.ok]
        snc = [r for r in runs if r.scenario == base and r.mode == "stop-and-copy" and r.ok]
        if not pre or not snc:
            continue
        parts = []
        for label, attr in (("phaul downtime", "downtime_ms"), ("stall", "stall_ms")):
            p = med([v for r in pre if (v := getattr(r, attr)) is not None])
            s = med([v for r in snc if (v := getattr(r, attr)) is not None])
            if p and s:
                parts.append(f"{label} {s:.0f} / {p:.0f} ms = {s / p:.1f}x")
        total_p = med([r.report["total_ms"] for r in pre])
        total_s = med([r.report["total_ms"] for r in snc])
        if total_p and total_s:
            parts.append(f"total {total_s / 1000:.2f} / {total_p / 1000:.2f} s")
        src = f" (stop-and-copy of {base.name})" if sc.baseline else ""
        print(f"  {sc.name + ' ' + mode:<28} " + "; ".join(parts) + src)


def print_passes(runs: list[Run]) -> None:
    for i, r in enumerate(runs):
        if not r.mode.startswith("precopy") or not r.report.get("passes"):
            continue
        rep = r.report
        print(
            f"\n{r.scenario.name} {r.mode} run {i + 1}: tracker {rep.get('tracker')}, "
            f"{rep.get('precopy_reason')}"
        )
        print(
            "   pass    pages  wire MB      s  dirty MB/s  goodput MB/s  predicted ms  "
            "throttle  decision"
        )
        for p in rep["passes"]:
            print(
                f"   {p['n']:4d} {p['pages']:8d} {p['bytes_wire'] / 1e6:8.1f} "
                f"{p['seconds']:6.2f} {p['dirty_rate_bps'] / 1e6:11.1f} "
                f"{p['goodput_bps'] / 1e6:13.1f} {p['predicted_ms']:13.0f} "
                f"{p.get('throttle', 0):9.0%}  {p.get('decision', '')}"
            )
        phases = ", ".join(f"{k} {v:.0f}" for k, v in rep.get("phases_ms", {}).items())
        print(
            f"   final dump: {rep.get('final_pages')} pages read while frozen; predicted "
            f"downtime {rep.get('predicted_downtime_ms', 0):.0f} ms, measured "
            f"{rep.get('downtime_ms', 0):.0f} ms; phases (ms): {phases}"
        )
        if rep.get("restore") == "lazy":
            print(
                f"   lazy restore: {rep.get('lazy_pages', 0)} pages left to the target's "
                f"lazy-pages daemon, filled {rep.get('fill_ms', 0):.0f} ms after the tree "
                "resumed (the source stays frozen, not running, until then)"
            )


def print_sweep(runs: list[Run]) -> None:
    """Stall against memory size, lazy and eager restore (medians): the lazy stall should
    barely grow with M."""
    lazy: dict[int, float] = {}
    print("\nrestore sweep (10 MiB/s dirtied; medians of the runs that verified ok):")
    print("      M  restore   phaul ms  stall ms  restore ms  fill ms")
    for mib in sorted({r.mib for r in runs}):
        for restore in ("lazy", "eager"):
            rs = [
                r for r in runs
                if r.mib == mib and r.ok and r.mode.startswith("precopy")
                and r.report.get("restore") == restore and r.scenario.rate == 10.0
                and r.scenario.compress == "none"
            ]  # fmt: skip
            if not rs:
                continue
            down = med([r.downtime_ms for r in rs]) or 0.0
            stall = med([r.stall_ms for r in rs if r.stall_ms is not None])
            rst = med([r.report.get("phases_ms", {}).get("restore", 0.0) for r in rs]) or 0.0
            fill = med([r.report.get("fill_ms", 0) for r in rs]) or 0.0
            if restore == "lazy" and stall is not None:
                lazy[mib] = stall
            print(f"  {mib:5d}  {restore:<7} {down:9.0f} {fmt(stall):>9} {rst:11.0f} {fill:8.0f}")
    if 64 in lazy and 1024 in lazy:
        ratio = lazy[1024] / lazy[64]
        print(
            f"  lazy stall 1 GiB / 64 MiB: {lazy[1024]:.0f} / {lazy[64]:.0f} ms = {ratio:.2f}x "
            f"(target <= 1.5x: {'MET' if ratio <= 1.5 else 'MISSED'})"
        )


def print_targets(runs: list[Run]) -> None:
    pre = [r for r in runs if r.scenario.name == "dirty512" and r.mode == "precopy" and r.ok]
    snc = [r for r in runs if r.scenario.name == "dirty512" and r.mode == "stop-and-copy"]
    snc = [r for r in snc if r.ok]
    if not pre:
        return
    down = med([r.downtime_ms for r in pre])
    stall = med([r.stall_ms for r in pre if r.stall_ms is not None])
    wire = med([r.wire_bytes / (r.mib * MIB) for r in pre])
    assert down is not None and wire is not None
    worst = max(down, stall or 0.0)
    print(f"\ntargets ({pre[0].mib} MiB @ {pre[0].scenario.rate:g} MiB/s):")
    print(
        f"  downtime <= 500 ms:        phaul {down:.0f} ms, stall {fmt(stall)} ms  "
        f"{'MET' if worst <= 500 else 'MISSED'}"
    )
    print(
        f"  stall <= 150 ms (lazy):    phaul {down:.0f} ms, stall {fmt(stall)} ms  "
        f"{'MET' if worst <= 150 else 'MISSED'}"
    )
    if snc:
        s_down = med([r.downtime_ms for r in snc])
        s_stall = med([r.stall_ms for r in snc if r.stall_ms is not None])
        assert s_down is not None
        ratio = s_down / down
        sratio = s_stall / stall if s_stall and stall else None
        for need in (10, 35):
            met = ratio >= need and (sratio is None or sratio >= need)
            print(
                f"  >= {need}x stop-and-copy:      phaul {ratio:.1f}x, stall "
                f"{fmt(sratio, '.1f')}x  {'MET' if met else 'MISSED'}"
            )
    print(f"  wire <= 1.3 x M:           {wire:.2f} x M  {'MET' if wire <= 1.3 else 'MISSED'}")


TOUCH = """
import mmap, sys, time
size = int(sys.argv[1]) << 20
m = mmap.mmap(-1, size)
t0 = time.perf_counter()
for off in range(0, size, 4096):
    m[off] = 1
print(round((time.perf_counter() - t0) * 1000))
"""


def first_touch_ms(host: Host, mib: int) -> int:
    """Milliseconds a fresh process on ``host`` takes to fault in ``mib`` MiB of anonymous
    memory (one write per page): the floor under an eager CRIU restore of that much memory."""
    return int(host.run(["python3", "-c", TOUCH, str(mib)], timeout=120).stdout)


# --- main ------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes / 4")
    ap.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: "
        + ", ".join(DEFAULT),
    )  # fmt: skip
    ap.add_argument(
        "--sweep", action="store_true",
        help="the restore sweep: " + ", ".join(SWEEP) + " (lazy and eager restore)",
    )  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per scenario/mode")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of the a<->b link")
    ap.add_argument("--out", type=Path, help="where reports and logs are kept")
    ap.add_argument(
        "--migrate-arg", action="append", default=[], metavar="ARG",
        help="extra `phaul migrate` argument (repeatable; e.g. --migrate-arg=--tracker=hash)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/precopy.py needs root (namespaces, CRIU)", file=sys.stderr)
        return 2
    names = list(args.scenario or ([] if args.sweep else DEFAULT))
    names += [n for n in SWEEP if args.sweep and n not in names]
    scenarios = [SCENARIOS[n] for n in names]
    out_dir = args.out or Path(f"/tmp/phaul-bench-precopy-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    head = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    print(f"phaul {head or '(no git)'}; {os.uname().release}; {os.cpu_count()} cpus")
    print(
        f"phaul pre-copy benchmark: link {args.rate} (tbf), scenarios "
        f"{', '.join(s.name for s in scenarios)}{' (quick: sizes / 4)' if args.quick else ''}, "
        f"{args.repeat} run(s) each; reports in {out_dir}",
        flush=True,
    )
    with Lab(hosts=("a", "b", "client")) as lab:
        lab.shape("a", args.rate)
        agent = start_agent(lab, lab.host("b"), make_token(lab))
        tools = {"memwriter": build(Path(lab.tmp))}
        src = Path(lab.tmp) / "stallwatch.c"
        src.write_text(STALLWATCH_C)
        tools["stallwatch"] = Path(lab.tmp) / "stallwatch"
        subprocess.run(
            ["gcc", "-O2", "-Wall", f"-DMIN_NS={STALL_MIN_NS}LL", "-o",
             str(tools["stallwatch"]), str(src)],
            check=True, capture_output=True,
        )  # fmt: skip
        touch = [first_touch_ms(lab.host("b"), 512) for _ in range(3)]
        print(
            "first touch of 512 MiB of fresh anonymous memory on b (3 processes): "
            + ", ".join(f"{t} ms" for t in touch),
            flush=True,
        )
        n = 0
        for sc in scenarios:
            mib = sc.mib // 4 if args.quick else sc.mib
            for _ in range(args.repeat):
                for mode in sc.modes:
                    n += 1
                    tag = f"{n:02d}-{sc.name}-{mode}"
                    print(f"[{tag}] {mib} MiB @ {sc.rate:g} MiB/s ...", end=" ", flush=True)
                    try:
                        run = one_run(
                            lab, agent, tools, sc, mode, mib, out_dir, tag, args.migrate_arg
                        )
                    except Exception as err:  # reported in the table; go on
                        run = Run(sc, mode, mib, error=f"{type(err).__name__}: {err}")
                    runs.append(run)
                    if run.ok:
                        print(
                            f"downtime {run.downtime_ms:.0f} ms, stall {fmt(run.stall_ms)} ms, "
                            f"{run.check}",
                            flush=True,
                        )
                    else:
                        print(f"FAILED: {run.error or run.check} (logs in {out_dir})", flush=True)
        agent.stop()
    print()
    print_runs(runs)
    print_ratios(runs, scenarios)
    print_passes(runs)
    print_sweep(runs)
    print_targets(runs)
    print(f"\nreports and logs: {out_dir}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
