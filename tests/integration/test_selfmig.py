"""Self-migration service: a process moves or checkpoints itself with phaul.client (real CRIU)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import CRIU
from tests.integration.lab import Host, Lab
from tests.integration.phaul_lab import AgentProc, make_token, pids_in, start_agent, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent

WORKLOAD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from phaul.client import SelfMigrationFailed, checkpoint_self, migrate_self

mode, sock, out = sys.argv[1:4]

def log(*words):
    with open(out, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")

log("start", os.getpid(), os.readlink("/proc/self/ns/net"))
try:
    if mode == "migrate":
        r = migrate_self(to=sys.argv[4], token_file=sys.argv[5], socket_path=sock)
    else:
        fd = os.open(sys.argv[4], os.O_RDONLY | os.O_DIRECTORY)
        r = checkpoint_self(fd, socket_path=sock)
        os.close(fd)
    log("result", r.outcome, os.readlink("/proc/self/ns/net"))
except SelfMigrationFailed as err:
    log("failed", str(err).replace(chr(10), " "))
n = 0
while True:
    n += 1
    log("tick", n)
    time.sleep(0.05)
"""


def script(lab: Lab) -> Path:
    path = lab.tmpfile("selfmig", ".py")
    path.write_text(WORKLOAD.format(repo=str(REPO)))
    return path


def lines(out: Path, word: str) -> list[list[str]]:
    if not out.exists():
        return []
    return [ln.split() for ln in out.read_text().splitlines() if ln.startswith(word + " ")]


def ticks(out: Path) -> int:
    t = lines(out, "tick")
    return int(t[-1][1]) if t else 0


def self_agent(lab: Lab, host: Host, token: Path, **kw: object) -> tuple[AgentProc, str]:
    sock = str(Path(lab.tmp) / f"self-{host.name}.sock")
    agent = start_agent(lab, host, token, extra=["--self-socket", sock], **kw)  # type: ignore[arg-type]
    wait_for(lambda: Path(sock).exists(), 10, "self socket")
    return agent, sock


def test_process_migrates_itself(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    token = make_token(lab)
    target = start_agent(lab, b, token)
    _, sock = self_agent(lab, a, token)
    out = lab.tmpfile("selfmig-out", ".txt")
    src_ns = os.readlink(f"/proc/{target.proc.pid}/ns/net")  # b's namespace
    wl = a.start_workload(
        ["python3", str(script(lab)), "migrate", sock, str(out), target.address, str(token)],
        own_pidns=False,
    )
    wait_for(lambda: lines(out, "result") or lines(out, "failed"), 60, "the call to return")
    assert lines(out, "failed") == [], out.read_text()
    result = lines(out, "result")[0]
    # The call returned on the target: in b's network namespace, in a restored process.
    assert result[1] == "migrated" and result[2] == src_ns, result
    start = lines(out, "start")
    assert len(start) == 1, "the process started twice"
    n = ticks(out)
    wait_for(lambda: ticks(out) > n + 5, 10, "the migrated process to keep running")
    assert not wl.alive(), "the source copy still runs"
    assert set(pids_in(b)) - {target.proc.pid}, "nothing runs on the target"


def test_failed_migration_returns_error_on_source(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    token = make_token(lab)
    target = start_agent(lab, b, token, env={"PHAUL_FAULT": "target-fail-restore"})
    _, sock = self_agent(lab, a, token)
    out = lab.tmpfile("selfmig-out", ".txt")
    wl = a.start_workload(
        ["python3", str(script(lab)), "migrate", sock, str(out), target.address, str(token)],
        own_pidns=False,
    )
    wait_for(lambda: lines(out, "result") or lines(out, "failed"), 60, "the call to return")
    failed = out.read_text()
    # Frozen, dumped, restore failed on the target: rolled back, the error reaches the caller.
    assert lines(out, "failed") and "fault injected" in failed, failed
    assert wl.alive()
    n = ticks(out)
    wait_for(lambda: ticks(out) > n + 5, 10, "the process to keep running on the source")
    wait_for(lambda: set(pids_in(b)) <= {target.proc.pid}, 10, "target to be empty")


def raw_request(sock: str, payload: dict[str, object], fd: int | None = None) -> list[dict]:
    import array

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(sock)
        data = json.dumps(payload).encode() + b"\n"
        if fd is None:
            s.sendall(data)
        else:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


def test_request_naming_another_pid_is_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    token = make_token(lab)
    target = start_agent(lab, b, token)
    agent, sock = self_agent(lab, a, token)
    victim_out = lab.tmpfile("victim", ".txt")
    victim = a.python_workload("counter.py", str(victim_out), own_pidns=False)
    d = lab.tmpfile("ckpt")
    d.unlink()
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for req, pass_fd in (
            ({"op": "migrate", "to": target.address, "pid": victim.root_pid}, None),
            ({"op": "migrate", "to": target.address, "root_pid": victim.root_pid}, None),
            ({"op": "checkpoint", "pid": victim.root_pid}, fd),
            ({"op": "checkpoint", "target_pid": str(victim.root_pid)}, fd),
            ({"op": "migrate", "to": target.address, "to_pid": victim.root_pid}, None),
        ):
            answer = raw_request(sock, req, pass_fd)
            assert answer and answer[-1]["stage"] == "error", (req, answer)
            assert "unknown field" in answer[-1]["error"], answer
    finally:
        os.close(fd)
    assert os.listdir(d) == []
    assert victim.alive() and agent.alive() and target.alive()
    assert set(pids_in(b)) == {target.proc.pid}
    log = agent.log.read_text()
    assert log.count("unknown field") >= 5 and "tree root" not in log, log[-2000:]


def test_checkpoint_to_dir_fd_then_criu_restore(lab: Lab) -> None:
    a = lab.host("a")
    token = make_token(lab)
    _, sock = self_agent(lab, a, token)
    out = lab.tmpfile("selfmig-out", ".txt")
    d = lab.tmpfile("ckpt")
    d.unlink()
    d.mkdir()
    wl = a.start_workload(
        ["python3", str(script(lab)), "checkpoint", sock, str(out), str(d)], own_pidns=False
    )
    wait_for(lambda: lines(out, "result") or lines(out, "failed"), 60, "the call to return")
    assert lines(out, "failed") == [], out.read_text()
    assert lines(out, "result")[0][1] == "checkpointed"
    names = os.listdir(d)
    assert "pstree.img" in names and any(n.startswith("core-") for n in names), names
    n = ticks(out)
    wait_for(lambda: ticks(out) > n + 3, 10, "the original to keep running")
    pid = wl.root_pid
    wl.kill()
    assert not wl.alive()
    # A later plain `criu restore` accepts the images; the restored process's call returns
    # again, now saying "restored" (its read() gets the queued "frozen" line, then EOF).
    res = subprocess.run(
        a.argv([CRIU, "restore", "-D", str(d), "-d", "-o", "restore.log", "-v4"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr + (d / "restore.log").read_text()[-3000:]
    try:
        wait_for(lambda: len(lines(out, "result")) == 2, 20, "the restored call to return")
        assert lines(out, "result")[1][1] == "restored", out.read_text()[-2000:]
        m = ticks(out)
        wait_for(lambda: ticks(out) > m + 3, 10, "the restored process to run")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
