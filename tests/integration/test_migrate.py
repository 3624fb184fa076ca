"""End-to-end `phaul migrate` between namespace hosts, with real CRIU and real processes."""

from __future__ import annotations

import json
import signal
import struct
import time

import pytest

from tests.integration.lab import Lab
from tests.integration.phaul_lab import (
    make_token,
    migrate,
    pids_in,
    raw_exchange,
    start_agent,
    wait_for,
)
from tests.workloads.counter import last

pytestmark = pytest.mark.integration


def counter_values(path: str) -> list[int]:
    with open(path, "rb") as f:
        return [int(line.split()[0]) for line in f.read().splitlines() if len(line.split()) == 3]


def assert_counts_on(path: str, after: int, timeout: float = 5) -> None:
    wait_for(lambda: (last(path) or (0,))[0] > after + 5, timeout, "counter to advance")


@pytest.mark.parametrize("own_pidns", [True, False], ids=["pidns", "bare"])
def test_counter_keeps_counting_on_target(lab: Lab, own_pidns: bool) -> None:
    a, b = lab.host("a"), lab.host("b")
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out), own_pidns=own_pidns)
    wait_for(lambda: (last(str(out)) or (0,))[0] > 10, 10, "counter to start")
    agent = start_agent(lab, b, make_token(lab))
    report_path = lab.tmpfile("report", ".json")

    res = migrate(lab, a, wl.root_pid, agent, "--report", str(report_path))
    assert res.returncode == 0, res.stderr + res.stdout

    before = last(str(out))
    assert before is not None
    assert_counts_on(str(out), before[0])
    values = counter_values(str(out))
    assert values == sorted(values) and len(set(values)) == len(values), "counter restarted"
    # It runs in b's network namespace and nowhere in a's.
    assert not wl.alive()
    counter_pid = last(str(out))[1]  # type: ignore[index]
    assert not [p for p in pids_in(a) if p == wl.root_pid]
    assert pids_in(b), "nothing runs in the target namespace"
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "migrated"
    assert 0 < report["downtime_ms"] < report["total_ms"]
    assert report["bytes_on_wire"] > report["page_bytes"] > 0
    assert report["criu_dump_stats"], report
    print(f"downtime {report['downtime_ms']} ms, total {report['total_ms']} ms, pid {counter_pid}")


def test_tcp_connection_survives_and_address_moves(lab: Lab) -> None:
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    vip = lab.vip()
    ip = vip.split("/")[0]
    a.add_address(vip)
    wl = a.python_workload("tcp_server.py", ip, "7000")
    probe_out = lab.tmpfile("probe", ".json")
    ready = lab.tmpfile("probe-ready")
    probe = client.start_script(
        "tcp_probe.py", ip, "7000", str(probe_out), "--interval-ms", "5", "--duration", "60",
        "--ready", str(ready),
    )  # fmt: skip
    wait_for(ready.exists, 10, "probe to connect")
    time.sleep(0.3)
    agent = start_agent(lab, b, make_token(lab))
    report_path = lab.tmpfile("report", ".json")

    res = migrate(lab, a, wl.root_pid, agent, "--report", str(report_path))
    assert res.returncode == 0, res.stderr + res.stdout
    time.sleep(0.5)
    probe.send_signal(signal.SIGTERM)
    probe.wait(10)
    result = json.loads(probe_out.read_text())
    assert result["errors"] == [], result
    assert not result["reset"]
    assert result["replies"] >= result["requests"] - 1 > 50
    # The same connection was served by the restored process (handled counter continued).
    assert vip in b.addresses() and vip not in a.addresses()
    nft = a.run(["nft", "list", "tables"]).stdout
    assert "CRIU" not in nft, f"lock table left on the source: {nft}"
    report = json.loads(report_path.read_text())
    assert report["addresses"] == [vip]
    print(f"client max gap {result['max_gap_ms']:.1f} ms, downtime {report['downtime_ms']} ms")


@pytest.mark.parametrize("fault", ["target-exit-after-images", "target-fail-restore"])
def test_target_failure_leaves_tree_running_on_source(lab: Lab, fault: str) -> None:
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    vip = lab.vip()
    ip = vip.split("/")[0]
    a.add_address(vip)
    wl = a.python_workload("tcp_server.py", ip, "7000")
    probe_out = lab.tmpfile("probe", ".json")
    ready = lab.tmpfile("probe-ready")
    probe = client.start_script(
        "tcp_probe.py", ip, "7000", str(probe_out), "--interval-ms", "5", "--duration", "60",
        "--ready", str(ready),
    )  # fmt: skip
    wait_for(ready.exists, 10, "probe to connect")
    agent = start_agent(lab, b, make_token(lab), env={"PHAUL_FAULT": fault})

    res = migrate(lab, a, wl.root_pid, agent)
    assert res.returncode == 11, res.stderr + res.stdout  # MigrationAborted
    assert "runs on the source" in res.stderr
    assert wl.alive(), "the tree must run on the source"
    assert vip in a.addresses() and vip not in b.addresses()
    time.sleep(0.5)
    probe.send_signal(signal.SIGTERM)
    probe.wait(10)
    result = json.loads(probe_out.read_text())
    assert result["errors"] == [] and not result["reset"], result
    assert result["replies"] > 50
    assert "CRIU" not in a.run(["nft", "list", "tables"]).stdout
    # Nothing left on the target: no restored process, no images.
    wait_for(lambda: set(pids_in(b)) <= {agent.proc.pid}, 10, "target namespace to be empty")
    if fault == "target-exit-after-images":
        # The agent died holding images: restarted, it replays its journal and cleans up.
        assert list(agent.workdir.glob("*/images/*.img"))
        agent = start_agent(lab, b, agent.token_file, workdir=agent.workdir)
    assert not list(agent.workdir.glob("*/images/*.img"))
    assert vip not in b.addresses()


def test_wrong_token_is_refused_and_nothing_changes(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    agent = start_agent(lab, b, make_token(lab))
    wrong = make_token(lab, "wrong")
    res = migrate(lab, a, wl.root_pid, agent, token=wrong)
    assert res.returncode == 8, res.stderr
    assert "token" in res.stderr
    assert wl.alive() and agent.alive()
    n = (last(str(out)) or (0,))[0]
    assert_counts_on(str(out), n)


def test_garbage_and_oversized_frames_are_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    agent = start_agent(lab, b, make_token(lab))
    # Random garbage, a frame announcing 1 GiB, and a truncated frame: each connection is
    # closed by the agent (with an error frame at most), and the agent keeps serving.
    for payload in (b"\xde\xad\xbe\xef" * 64, struct.pack(">I", 1 << 30) + b"x" * 10, b"\x00\x00"):
        reply = raw_exchange(a, b.ip, payload)
        assert len(reply) < 4096
        assert agent.alive()
    # A real migration still works afterwards.
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    wait_for(lambda: (last(str(out)) or (0,))[0] > 3, 10, "counter to start")
    res = migrate(lab, a, wl.root_pid, agent)
    assert res.returncode == 0, res.stderr


def test_bad_input_gives_one_line_errors(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    agent = start_agent(lab, b, make_token(lab))
    res = migrate(lab, a, 4_000_000, agent)
    assert res.returncode == 3 and "no process" in res.stderr.lower(), res.stderr
    res = migrate(lab, a, 1, agent)
    assert res.returncode == 3, res.stderr
    res = migrate(lab, a, 2, agent)  # kthreadd
    assert res.returncode == 3 and "kernel thread" in res.stderr.lower(), res.stderr
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    agent.stop()
    res = migrate(lab, a, wl.root_pid, agent)
    assert res.returncode == 7 and "agent" in res.stderr, res.stderr
    res = migrate(lab, a, wl.root_pid, agent, "--criu", "/nonexistent/criu")
    assert res.returncode == 5, res.stderr
    assert wl.alive()


def test_lost_commit_confirmation_is_asked_for_not_guessed(lab: Lab) -> None:
    """The connection breaks after the target resumed the tree but before it confirmed: the
    source asks the agent on a new connection and completes (one copy, on the target)."""
    a, b = lab.host("a"), lab.host("b")
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    wait_for(lambda: (last(str(out)) or (0,))[0] > 5, 10, "counter to start")
    agent = start_agent(lab, b, make_token(lab), env={"PHAUL_FAULT": "target-drop-committed"})
    res = migrate(lab, a, wl.root_pid, agent)
    assert res.returncode == 0, res.stderr
    assert "asking it directly" in res.stderr
    assert not wl.alive()
    n = (last(str(out)) or (0,))[0]
    assert_counts_on(str(out), n)
    values = counter_values(str(out))
    assert values == sorted(values) and len(set(values)) == len(values), "two copies counted"
