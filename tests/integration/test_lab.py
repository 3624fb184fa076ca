"""The namespace lab and the workloads work, and the lab cleans up after itself."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import CRIU
from tests.integration.lab import NETNS_DIR, Lab, pids_in_netns
from tests.workloads.counter import last

pytestmark = pytest.mark.integration


def _wait_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_hosts_reach_each_other(lab: Lab) -> None:
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    assert len({a.ip, b.ip, client.ip}) == 3
    assert a.netns_path.startswith("/run/netns/phl-") and Path(a.netns_path).exists()
    assert a.addresses() == [f"{a.ip}/24"]
    client.run(["ping", "-c", "1", "-W", "2", b.ip])
    vip = lab.vip()
    assert vip != lab.vip()
    a.add_address(vip)
    assert vip in a.addresses()
    client.run(["ping", "-c", "1", "-W", "2", vip.split("/")[0]])
    assert client.neigh(vip.split("/")[0]) == a.mac


def test_two_labs_do_not_collide() -> None:
    with Lab(hosts=("x",)) as l1, Lab(hosts=("x",)) as l2:
        assert l1.net != l2.net
        assert l1.host("x").netns_path != l2.host("x").netns_path


def test_teardown_kills_everything_and_deletes_namespaces(tmp_path: Path) -> None:
    lab = Lab(hosts=("a", "b"))
    with pytest.raises(RuntimeError, match="boom"), lab:
        a = lab.host("a")
        wl = a.python_workload("counter.py", str(tmp_path / "c"))
        # A process the lab did not start (double fork, reparented) still dies via its netns.
        stray = a.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"]).stdout
        paths = [h.netns_path for h in lab]
        raise RuntimeError("boom")
    for p in paths:
        assert not Path(p).exists()
    assert not wl.alive()
    stray_pid = int(stray)
    deadline = time.monotonic() + 3
    while Path(f"/proc/{stray_pid}").exists():
        state = Path(f"/proc/{stray_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        assert time.monotonic() < deadline, "stray process survived the lab"
        time.sleep(0.02)
    assert not any(n.name.startswith(lab.prefix) for n in NETNS_DIR.iterdir())


def test_counter_workload_in_own_pidns(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "counter"
    wl = lab.host("a").python_workload("counter.py", str(out))
    assert wl.own_pidns and wl.alive()
    assert Path(f"/proc/{wl.root_pid}/cmdline").read_bytes().startswith(b"/usr/bin/tini")
    # tini is pid 1 of its own pid namespace, and a session leader there.
    status = Path(f"/proc/{wl.root_pid}/status").read_text()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
    assert nspid[-1] == "1"
    assert os.getsid(wl.root_pid) == wl.root_pid
    assert wl.root_pid in pids_in_netns(lab.host("a").netns_path)
    _wait_file(out)
    first = last(str(out))
    time.sleep(0.2)
    later = last(str(out))
    assert first is not None and later is not None and later[0] > first[0]
    assert later[1] == 2  # the counter is pid 2 (tini's child) inside its namespace


def test_tcp_server_and_probe(lab: Lab, tmp_path: Path) -> None:
    a, client = lab.host("a"), lab.host("client")
    vip = lab.vip()
    a.add_address(vip)
    addr = vip.split("/")[0]
    ready = tmp_path / "ready"
    lab.host("a").python_workload("tcp_server.py", addr, "7000", "--ready", str(ready))
    _wait_file(ready)
    out, pready = tmp_path / "probe.json", tmp_path / "pready"
    probe = client.start_script(
        "tcp_probe.py", addr, "7000", str(out),
        "--interval-ms", "2", "--duration", "30", "--ready", str(pready),
    )  # fmt: skip
    _wait_file(pready)
    time.sleep(0.3)
    probe.send_signal(signal.SIGTERM)
    assert probe.wait(timeout=10) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == [] and not res["reset"] and res["connected"]
    assert res["replies"] >= 10 and res["requests"] - res["replies"] in (0, 1)
    assert res["first_handled"] == 1 and res["last_handled"] == res["replies"]
    assert res["pids"] == [2]
    assert 0 < res["max_gap_ms"] < 1000


def test_probe_reports_reset(lab: Lab, tmp_path: Path) -> None:
    a, client = lab.host("a"), lab.host("client")
    ready = tmp_path / "ready"
    wl = a.python_workload("tcp_server.py", a.ip, "7001", "--ready", str(ready))
    _wait_file(ready)
    out, pready = tmp_path / "probe.json", tmp_path / "pready"
    probe = client.start_script(
        "tcp_probe.py", a.ip, "7001", str(out), "--duration", "30", "--ready", str(pready)
    )
    _wait_file(pready)
    wl.kill()  # the kernel closes the socket: the probe sees EOF or a reset, never silence
    assert probe.wait(timeout=10) == 0
    res = json.loads(out.read_text())
    assert res["errors"], res


def test_shape_limits_rate(lab: Lab) -> None:
    lab.shape("a", "8mbit")
    qd = lab.host("a").run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in qd and "8Mbit" in qd


def test_workload_is_dumpable_by_criu(lab: Lab, tmp_path: Path) -> None:
    """A lab workload (own pidns, tini, setsid, stdio to files) passes a real CRIU dump."""
    a = lab.host("a")
    ready = tmp_path / "ready"
    wl = a.python_workload("tcp_server.py", a.ip, "7002", "--ready", str(ready))
    _wait_file(ready)
    img = tmp_path / "img"
    img.mkdir()
    a.run(
        [CRIU, "dump", "-t", str(wl.root_pid), "-D", str(img), "-o", "dump.log",
         "--tcp-established", "--network-lock", "nftables", "--leave-running"],
    )  # fmt: skip
    assert (img / "pstree.img").exists()
    assert wl.alive()
