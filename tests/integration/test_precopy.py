"""Pre-copy migrations end to end: a writer keeps dirtying memory while it moves; afterwards
every page holds exactly what the writer last wrote (the workload checks itself)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.lab import Host, Lab
from tests.integration.phaul_lab import make_token, migrate, pids_in, start_agent, wait_for
from tests.workloads.memwriter import build

pytestmark = pytest.mark.integration


def start_writer(lab: Lab, host: Host, *args: str) -> tuple[int, Path]:
    work = Path(lab.tmp) / f"mw-{os.urandom(3).hex()}"
    work.mkdir()
    exe = build(work)
    info = work / "info"
    wl = host.start_workload([str(exe), "-i", str(info), "-r", str(work / "result"), *args])
    wait_for(info.exists, 30, "memwriter to fill its memory")
    return wl.root_pid, work


def writer_on(host: Host, work: Path) -> int:
    for pid in pids_in(host):
        try:
            if Path(f"/proc/{pid}/exe").resolve() == (work / "memwriter").resolve():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no memwriter runs on {host.name}")


def verify(pid: int, work: Path) -> str:
    result = work / "result"
    result.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    wait_for(result.exists, 30, "memwriter's self-check")
    return result.read_text().strip()


def run_precopy(lab: Lab, tracker: str, *writer_args: str, env: dict[str, str] | None = None):
    a, b = lab.host("a"), lab.host("b")
    root, work = start_writer(lab, a, *writer_args)
    agent = start_agent(lab, b, make_token(lab))
    report = lab.tmpfile("report", ".json")
    res = migrate(
        lab, a, root, agent, "--precopy", "on", "--tracker", tracker, "--report", str(report),
        env=env,
    )  # fmt: skip
    return res, work, json.loads(report.read_text()) if report.exists() else {}


@pytest.mark.parametrize("tracker", ["uffd", "hash"])
def test_precopy_memory_exact_with_threads_and_churn(lab: Lab, tracker: str) -> None:
    # 64 MiB, two writer threads dirtying 8 MiB/s, and a thread mapping/unmapping regions.
    res, work, report = run_precopy(lab, tracker, "-m", "64", "-d", "8", "-t", "2", "-c", "16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert report["precopy"] and report["tracker"] == tracker
    assert len(report["passes"]) >= 1
    total_pages = 64 * 256
    assert report["final_pages"] < total_pages / 2, "the freeze re-read most of the memory"
    # The last writes went out on the pre-copy stream while CRIU was still dumping.
    assert report["phases_ms"]["final-pass"] >= 0, report["phases_ms"]
    pid = writer_on(lab.host("b"), work)
    time.sleep(0.3)
    assert verify(pid, work).startswith("ok pages=16384 bad=0")
    print(
        f"{tracker}: downtime {report['downtime_ms']} ms, {len(report['passes'])} passes, "
        f"{report['final_pages']} pages read while frozen"
    )


def test_lost_writes_are_caught(lab: Lab) -> None:
    """Negative control: a tracker that loses written pages must make the check fail (single
    lost pages are caught by the tracker and rewrite tests, tests/integration/test_uffd.py,
    test_hashtrack.py and test_lazy_final_dump.py)."""
    res, work, _ = run_precopy(
        lab, "uffd", "-m", "32", "-d", "20", "-t", "1",
        env={"PHAUL_FAULT": "precopy-drop-last-writes"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    pid = writer_on(lab.host("b"), work)
    out = verify(pid, work)
    assert out.startswith("bad "), out + res.stderr[-4000:]


@pytest.mark.parametrize("final_dump", ["auto", "lazy"])
def test_lazy_restore_memory_exact(lab: Lab, final_dump: str) -> None:
    """The tree resumes on the target before its memory is in; once the lazy-pages daemon is
    done (Committed), every page is exact. With the tracked final dump (auto: CRIU pins
    nothing) and with CRIU's lazy dump."""
    a, b = lab.host("a"), lab.host("b")
    root, work = start_writer(lab, a, "-m", "64", "-d", "8", "-t", "2")
    agent = start_agent(lab, b, make_token(lab))
    report_path = lab.tmpfile("report", ".json")
    res = migrate(
        lab, a, root, agent, "--precopy", "on", "--restore", "lazy", "--final-dump", final_dump,
        "--report", str(report_path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["restore"] == "lazy" and report["lazy_pages"] > 10000, report
    assert report["final_dump"] == ("tracked" if final_dump == "auto" else "lazy"), report
    pid = writer_on(b, work)
    assert verify(pid, work).startswith("ok pages=16384 bad=0")
    # Nothing left on the target but logs: no images, no daemon.
    assert not list(agent.workdir.glob("*/images/*.img"))
    print(
        f"lazy: downtime {report['downtime_ms']} ms, {report['lazy_pages']} pages filled in "
        f"{report['fill_ms']} ms"
    )


def test_lazy_daemon_death_rolls_back(lab: Lab) -> None:
    """The daemon dies before the memory is in: the restored copy is killed and the source
    resumes, intact."""
    a, b = lab.host("a"), lab.host("b")
    root, work = start_writer(lab, a, "-m", "32", "-d", "4", "-t", "1")
    agent = start_agent(lab, b, make_token(lab), env={"PHAUL_FAULT": "target-kill-lazy-daemon"})
    res = migrate(lab, a, root, agent, "--precopy", "on", "--restore", "lazy")
    assert res.returncode == 11, res.stderr[-3000:]
    # The agent notices the dead daemon, or (when the daemon dies before CRIU has resumed the
    # copy) CRIU's restore fails: both roll back.
    assert "lazy-pages daemon" in res.stderr or "CRIU restore" in res.stderr, res.stderr[-2000:]
    pid = writer_on(a, work)
    assert verify(pid, work).startswith("ok pages=8192 bad=0")
    wait_for(lambda: set(pids_in(b)) <= {agent.proc.pid}, 10, "the target copy to be gone")


def test_writer_faster_than_link_is_throttled_then_converges(lab: Lab) -> None:
    """A workload dirtying memory faster than a 80 Mbit/s link: passes stop shrinking, the
    tree's CPU is capped in steps until pre-copy converges; memory exact; cap released."""
    a, b = lab.host("a"), lab.host("b")
    lab.shape(a, "80mbit")
    root, work = start_writer(lab, a, "-m", "24", "-d", "40", "-t", "1")
    agent = start_agent(lab, b, make_token(lab))
    report_path = lab.tmpfile("report", ".json")
    res = migrate(
        lab, a, root, agent, "--precopy", "on", "--restore", "eager", "--max-downtime", "400",
        "--max-iterations", "12", "--report", str(report_path), timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    throttles = [p["throttle"] for p in report["passes"]]
    assert max(throttles) >= 0.2, report["passes"]
    assert "throttl" in res.stderr.lower()
    pid = writer_on(b, work)
    assert verify(pid, work).startswith("ok pages=6144 bad=0")
    assert "phaul-throttle" not in Path(f"/proc/{pid}/cgroup").read_text()


def test_abort_when_not_converging_leaves_the_tree_running(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    lab.shape(a, "40mbit")
    root, work = start_writer(lab, a, "-m", "16", "-d", "40", "-t", "1")
    agent = start_agent(lab, b, make_token(lab))
    res = migrate(
        lab, a, root, agent, "--precopy", "on", "--max-downtime", "50", "--on-no-converge",
        "abort", timeout=300,
    )  # fmt: skip
    assert res.returncode == 11, res.stderr[-3000:]
    assert "not converging" in res.stderr or "not converged" in res.stderr
    pid = writer_on(a, work)
    assert verify(pid, work).startswith("ok pages=4096 bad=0")
    wait_for(lambda: not list(agent.workdir.glob("*/precopy/*.img")), 10, "target cleanup")


def test_only_the_lazy_dump_needs_the_fd_budget(lab: Lab) -> None:
    """Under a 300-fd limit a 64 MiB tree is refused before anything moves when the final dump
    would be CRIU's lazy dump (a pipe per MiB); the tracked dump opens no pipes and migrates it."""
    import subprocess

    from tests.integration.phaul_lab import PHAUL

    a, b = lab.host("a"), lab.host("b")
    root, work = start_writer(lab, a, "-m", "64", "-d", "4", "-t", "1")
    agent = start_agent(lab, b, make_token(lab))

    def run(final_dump: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "prlimit", "--nofile=300:300", "--", *PHAUL, "migrate", str(root), "--to",
            agent.address, "--token-file", str(agent.token_file), "--workdir",
            str(Path(lab.tmp) / "src-fd"), "--precopy", "on", "--restore", "lazy",
            "--final-dump", final_dump,
        ]  # fmt: skip
        return subprocess.run(
            a.argv(argv), capture_output=True, text=True, timeout=120, check=False
        )

    res = run("lazy")
    assert res.returncode == 10, res.stderr[-2000:]  # preflight: nothing changed
    assert "descriptors" in res.stderr or "RLIMIT_NOFILE" in res.stderr, res.stderr[-2000:]
    assert verify(writer_on(a, work), work).startswith("ok pages=16384 bad=0")

    res = run("auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert verify(writer_on(b, work), work).startswith("ok pages=16384 bad=0")


FORKER = r"""
import hashlib, os, signal, sys, time
work = sys.argv[1]
def fill(mib, seed):
    buf = bytearray(mib << 20)
    for off in range(0, len(buf), 4096):
        buf[off:off + 32] = hashlib.sha256(b"%d:%d" % (seed, off)).digest()
    return buf
def check(buf, seed, name):
    bad = sum(
        buf[off:off + 32] != hashlib.sha256(b"%d:%d" % (seed, off)).digest()
        for off in range(0, len(buf), 4096)
    )
    with open(os.path.join(work, name + ".tmp"), "w") as f:
        f.write("ok" if bad == 0 else "bad %d" % bad)
    os.rename(os.path.join(work, name + ".tmp"), os.path.join(work, name))
mem = fill(32, 1)
signal.signal(signal.SIGUSR1, lambda *_: check(mem, 1, "parent-result"))
open(os.path.join(work, "ready"), "w").close()
while not os.path.exists(os.path.join(work, "spawn")):
    time.sleep(0.02)
if os.fork() == 0:
    child = fill(8, 2)
    signal.signal(signal.SIGUSR1, lambda *_: check(child, 2, "child-result"))
    open(os.path.join(work, "child-ready"), "w").close()
    while True:
        time.sleep(1)
while True:
    mem[4096 * (int(time.time() * 1000) % 8192)] ^= 0  # keep running, write nothing new
    time.sleep(0.01)
"""


def test_process_born_during_precopy_is_dumped_whole(lab: Lab) -> None:
    """A child forked while pre-copy runs has no tracker and no pre-copied pages: its memory is
    taken whole by the final dump (tracked dump: CRIU finds no parent for it), and both
    processes check their memory exact on the target."""
    import subprocess

    a, b = lab.host("a"), lab.host("b")
    lab.shape(a, "80mbit")  # 32 MiB of pre-copy takes ~3.5 s
    work = Path(lab.tmp) / "forker"
    work.mkdir()
    script = work / "forker.py"
    script.write_text(FORKER)
    wl = a.start_workload(["python3", str(script), str(work)])
    wait_for((work / "ready").exists, 60, "the workload to fill its memory")
    agent = start_agent(lab, b, make_token(lab))
    report = lab.tmpfile("report", ".json")
    with open(lab.tmpfile("migrate", ".log"), "w") as log:
        from tests.integration.phaul_lab import PHAUL

        proc = subprocess.Popen(
            a.argv([
                *PHAUL, "migrate", str(wl.root_pid), "--to", agent.address, "--token-file",
                str(agent.token_file), "--workdir", str(Path(lab.tmp) / "src-forker"),
                "--precopy", "on", "--restore", "lazy", "--report", str(report),
            ]),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(1.0)  # pre-copy is under way
        (work / "spawn").touch()
        wait_for((work / "child-ready").exists, 30, "the child to fill its memory")
        assert proc.poll() is None, "the migration ended before the child was born"
        assert proc.wait(180) == 0, Path(log.name).read_text()[-3000:]
    rep = json.loads(report.read_text())
    assert rep["final_dump"] == "tracked" and rep["restore"] == "lazy", rep
    pythons = [
        p for p in pids_in(b)
        if p != agent.proc.pid
        and Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:2] == [bytes(script)]
    ]  # fmt: skip
    assert len(pythons) == 2, pythons
    for p in pythons:
        os.kill(p, signal.SIGUSR1)
    for name in ("parent-result", "child-result"):
        wait_for((work / name).exists, 30, name)
        assert (work / name).read_text() == "ok", name
