"""A real service moves: redis-server from Debian, with a client connection kept open across
the migration (its data and the connection itself must survive)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.integration.lab import Lab
from tests.integration.phaul_lab import make_token, migrate, pids_in, start_agent

pytestmark = pytest.mark.integration

CLIENT = r"""
import json, socket, sys, time
ip, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
def cmd(s, f, *args):
    s.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]))
    line = f.readline()
    if line.startswith(b"$"):
        n = int(line[1:])
        return f.read(n + 2)[:-2] if n >= 0 else None
    return line.strip()
for _ in range(200):
    try:
        s = socket.create_connection((ip, 6379), 2)
        break
    except OSError:
        time.sleep(0.05)
f = s.makefile("rb")
res = {"errors": [], "incr": [], "gap_ms": 0.0}
cmd(s, f, b"SET", b"greeting", b"hello from the source")
cmd(s, f, b"SET", b"big", b"x" * 1000000)
last = time.monotonic()
import os
try:
    while not os.path.exists(stop):
        v = cmd(s, f, b"INCR", b"ticks")
        now = time.monotonic()
        res["gap_ms"] = max(res["gap_ms"], (now - last) * 1000)
        last = now
        res["incr"].append(int(v[1:]))
        time.sleep(0.005)
    res["greeting"] = cmd(s, f, b"GET", b"greeting").decode()
    res["big_len"] = len(cmd(s, f, b"GET", b"big"))
except Exception as err:
    res["errors"].append(repr(err))
json.dump(res, open(out, "w"))
"""


@pytest.mark.parametrize(
    "how",
    [(), ("--precopy", "on", "--restore", "lazy")],
    ids=["stop-and-copy", "precopy-tracked-lazy"],
)
def test_redis_keeps_its_data_and_client_connection(lab: Lab, how: tuple[str, ...]) -> None:
    """Redis (several threads) with a client connection open: stop-and-copy, and pre-copy with
    the tracked final dump and the lazy restore."""
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    vip = lab.vip()
    ip = vip.split("/")[0]
    a.add_address(vip)
    wl = a.start_workload(
        ["redis-server", "--bind", ip, "--port", "6379", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--dir", str(lab.tmp)],
        cwd=lab.tmp,
    )  # fmt: skip
    out, stop = lab.tmpfile("redis-client", ".json"), lab.tmpfile("stop")
    stop.unlink()
    proc = client.popen([sys.executable, "-c", CLIENT, ip, str(out), str(stop)])
    time.sleep(1.0)
    agent = start_agent(lab, b, make_token(lab))
    report = lab.tmpfile("report", ".json")
    res = migrate(lab, a, wl.root_pid, agent, *how, "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    if how:
        rep = json.loads(report.read_text())
        assert (rep["final_dump"], rep["restore"]) == ("tracked", "lazy"), rep
    time.sleep(0.5)
    stop.write_text("stop")
    proc.wait(30)
    result = json.loads(out.read_text())
    assert result["errors"] == [], result["errors"]
    ticks = result["incr"]
    assert ticks == list(range(1, len(ticks) + 1)), "the counter lost or repeated increments"
    assert len(ticks) > 100
    assert result["greeting"] == "hello from the source"
    assert result["big_len"] == 1000000
    assert not wl.alive()
    on_b = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids_in(b) if p != agent.proc.pid]
    assert any(b"redis-server" in cmdline for cmdline in on_b), "redis does not run on b"
    print(f"redis: longest gap between INCR replies {result['gap_ms']:.0f} ms")
