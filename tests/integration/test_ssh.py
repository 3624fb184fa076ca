"""`phaul migrate --to ssh://` through a real OpenSSH server (sshd in host b, key-only auth)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phaul.errors import AuthError
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.auth import client_handshake
from phaul.protocol.framing import Channel
from phaul.transport.bridge import is_plain
from phaul.transport.ssh import SshConfig, SshDialer
from tests.integration.conftest import CRIU
from tests.integration.lab import Lab
from tests.integration.phaul_lab import PHAUL, pids_in, wait_for
from tests.integration.sshd import Sshd, start_sshd
from tests.workloads.counter import last

pytestmark = pytest.mark.integration

PHAUL_BIN = Path(sys.executable).with_name("phaul")


def agent_command(lab: Lab) -> str:
    workdir = lab.tmpfile("ssh-agent-workdir")
    workdir.unlink()
    return f"{PHAUL_BIN} --debug agent --stdio --workdir {workdir} --criu {CRIU}"


def dialer(lab: Lab, server: Sshd, **kw: object) -> SshDialer:
    opts: dict[str, object] = {
        "known_hosts": server.known_hosts,
        "keys": (server.client_key,),
        "agent_command": agent_command(lab),
        **kw,
    }
    cfg = SshConfig.parse(server.url, **opts)
    return SshDialer(cfg)


async def control_and_status(d: SshDialer) -> tuple[pb.AuthOk, pb.Status, bool]:
    """Control session on the agent's stdio, then a status query on a second SSH channel."""
    try:
        reader, writer = await d.open()
        ok = await client_handshake(Channel(reader, writer), b"")
        r2, w2 = await d.open()
        chan = Channel(r2, w2)
        await client_handshake(chan, b"", role="status")
        await chan.send(pb.StatusQuery(migration_id="no-such-migration"))
        status = await chan.recv(pb.Status, 10)
        return ok, status, is_plain(w2)
    finally:
        await d.close()


def test_ssh_transport_handshake_and_second_channel(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    server = start_sshd(lab, b)
    ok, status, plain = a.call(asyncio.run, control_and_status(dialer(lab, server)))
    assert ok.agent_id and status.migration_id == "no-such-migration" and status.phase == ""
    assert not plain, "SSH channels must be bridged for page streams"
    assert "Accepted publickey for root" in server.log.read_text()


def test_unknown_or_changed_host_key_is_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    server = start_sshd(lab, b)
    empty = lab.tmpfile("known_hosts")
    with pytest.raises(AuthError, match="not trusted"):
        a.call(asyncio.run, control_and_status(dialer(lab, server, known_hosts=empty)))
    # A changed key is refused even with accept-unknown.
    other = lab.tmpfile("other")
    other.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = server.write_known_hosts(
        " ".join(other.with_suffix(".pub").read_text().split()[:2]), lab.tmpfile("kh-wrong")
    )
    with pytest.raises(AuthError, match="not trusted"):
        a.call(
            asyncio.run,
            control_and_status(dialer(lab, server, known_hosts=wrong, accept_unknown=True)),
        )
    # Accept-unknown records the key of an unknown host, and the next connection uses it.
    a.call(
        asyncio.run, control_and_status(dialer(lab, server, known_hosts=empty, accept_unknown=True))
    )
    assert server.host_key_line in empty.read_text()
    a.call(asyncio.run, control_and_status(dialer(lab, server, known_hosts=empty)))


def run_migrate(lab: Lab, server: Sshd, pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    a = lab.host("a")
    workdir = lab.tmpfile("src-a")
    workdir.unlink()
    argv = [
        *PHAUL, "--debug", "migrate", str(pid), "--to", server.url,
        "--ssh-key", str(server.client_key), "--ssh-agent-command", agent_command(lab),
        "--workdir", str(workdir), *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return subprocess.run(
        a.argv(argv), capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_migrate_over_ssh(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    server = start_sshd(lab, b)
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    wait_for(lambda: (last(str(out)) or (0,))[0] > 10, 10, "counter to start")
    report_path = lab.tmpfile("report", ".json")
    res = run_migrate(
        lab, server, wl.root_pid, "--ssh-known-hosts", str(server.known_hosts),
        "--report", str(report_path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    before = last(str(out))
    assert before is not None
    wait_for(lambda: (last(str(out)) or (0,))[0] > before[0] + 5, 5, "counter to advance")
    assert not wl.alive()
    assert pids_in(b), "nothing runs in the target namespace"
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "migrated" and report["page_bytes"] > 0
    print(f"ssh: downtime {report['downtime_ms']} ms, total {report['total_ms']} ms")


def test_migrate_to_unknown_ssh_host_is_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    server = start_sshd(lab, b)
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    empty = lab.tmpfile("known_hosts")
    res = run_migrate(lab, server, wl.root_pid, "--ssh-known-hosts", str(empty))
    assert res.returncode == 8, res.stderr  # AuthError
    assert "not trusted" in res.stderr and "--ssh-accept-unknown" in res.stderr
    assert wl.alive()
    n = (last(str(out)) or (0,))[0]
    wait_for(lambda: (last(str(out)) or (0,))[0] > n + 3, 5, "counter to keep counting")
    assert "Accepted publickey" not in server.log.read_text()
