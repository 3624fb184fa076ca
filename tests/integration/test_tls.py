"""`phaul migrate` over mutual TLS between namespace hosts (certificates from `phaul certs`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import CRIU
from tests.integration.lab import Host, Lab
from tests.integration.phaul_lab import PHAUL, PORT, make_token, pids_in, wait_for
from tests.workloads.counter import last

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    ca: Path  # ca.pem of the agent's CA
    agent: tuple[Path, Path]
    source: tuple[Path, Path]
    stranger: tuple[Path, Path]  # signed by another CA


def phaul(*args: str) -> None:
    subprocess.run([*PHAUL, *args], check=True, capture_output=True, text=True, timeout=60)


def make_pki(lab: Lab, agent_ip: str) -> Pki:
    d = lab.tmpfile("pki")
    d.unlink()
    phaul("certs", "ca", "--out", str(d / "ca"))
    phaul("certs", "ca", "--out", str(d / "other"))
    phaul("certs", "host", "b", "--ca", str(d / "ca"), "--out", str(d), "--ip", agent_ip)
    phaul("certs", "host", "a", "--ca", str(d / "ca"), "--out", str(d))
    phaul("certs", "host", "x", "--ca", str(d / "other"), "--out", str(d))
    assert (d / "a.key").stat().st_mode & 0o777 == 0o600
    pair = lambda n: (d / f"{n}.pem", d / f"{n}.key")  # noqa: E731
    return Pki(d / "ca" / "ca.pem", pair("b"), pair("a"), pair("x"))


def tls_args(pair: tuple[Path, Path], ca: Path) -> list[str]:
    return ["--tls-cert", str(pair[0]), "--tls-key", str(pair[1]), "--tls-ca", str(ca)]


def start_tls_agent(lab: Lab, host: Host, pki: Pki, *extra: str) -> subprocess.Popen[bytes]:
    workdir = lab.tmpfile("agent-tls")
    workdir.unlink()
    log = lab.tmpfile("agent-tls", ".log")
    argv = [
        *PHAUL, "--debug", "agent", "--listen", f"{host.ip}:{PORT}", "--workdir", str(workdir),
        "--criu", CRIU, *tls_args(pki.agent, pki.ca), *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = host.popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: "listening on" in log.read_text() or proc.poll() is not None, 20, "agent")
    assert proc.poll() is None, log.read_text()
    proc.log = log  # type: ignore[attr-defined]
    proc.workdir = workdir  # type: ignore[attr-defined]
    return proc


def run_migrate(lab: Lab, pid: int, to: str, *args: str) -> subprocess.CompletedProcess[str]:
    workdir = lab.tmpfile("src-a")
    workdir.unlink()
    argv = [*PHAUL, "--debug", "migrate", str(pid), "--to", to, "--workdir", str(workdir), *args]
    return subprocess.run(
        lab.host("a").argv(argv), capture_output=True, text=True, timeout=120, check=False
    )


def test_migrate_over_mutual_tls(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    pki = make_pki(lab, b.ip)
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    wait_for(lambda: (last(str(out)) or (0,))[0] > 10, 10, "counter to start")
    agent = start_tls_agent(lab, b, pki)
    report_path = lab.tmpfile("report", ".json")
    res = run_migrate(
        lab, wl.root_pid, f"{b.ip}:{PORT}", *tls_args(pki.source, pki.ca),
        "--report", str(report_path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    assert "NOT encrypted" not in res.stderr
    before = last(str(out))
    assert before is not None
    wait_for(lambda: (last(str(out)) or (0,))[0] > before[0] + 5, 5, "counter to advance")
    assert not wl.alive()
    assert set(pids_in(b)) - {agent.pid}, "nothing runs in the target namespace"
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "migrated" and report["page_bytes"] > 0
    print(f"tls: downtime {report['downtime_ms']} ms, total {report['total_ms']} ms")


RAW_TLS_NO_CERT = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
with socket.create_connection((sys.argv[1], int(sys.argv[2])), 5) as raw:
    with ctx.wrap_socket(raw, server_hostname=sys.argv[1]) as s:
        s.settimeout(5)
        try:
            print("got", s.recv(100).hex())
        except ssl.SSLError as err:
            print("refused", err.reason)
"""


def test_wrong_or_missing_client_certificate_is_refused(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    pki = make_pki(lab, b.ip)
    out = lab.tmpfile("counter", ".txt")
    wl = a.python_workload("counter.py", str(out))
    agent = start_tls_agent(lab, b, pki)
    to = f"{b.ip}:{PORT}"

    # A certificate from another CA.
    res = run_migrate(lab, wl.root_pid, to, *tls_args(pki.stranger, pki.ca))
    assert res.returncode == 8, res.stderr  # AuthError
    assert "refused our certificate" in res.stderr
    # No client certificate at all (a raw TLS client).
    raw = a.run([sys.executable, "-c", RAW_TLS_NO_CERT, b.ip, str(PORT), str(pki.ca)])
    # Refused with an alert or closed: either way no byte of the phaul protocol came back.
    assert raw.stdout.startswith("refused") or raw.stdout.strip() == "got", raw.stdout
    # No TLS at all: a token client against the TLS agent.
    token = make_token(lab)
    res = run_migrate(lab, wl.root_pid, to, "--token-file", str(token))
    assert res.returncode in (7, 8, 9), res.stderr
    # The agent must not trust a CA it was not given: our own CA file for the stranger's cert.
    res = run_migrate(
        lab, wl.root_pid, to, *tls_args(pki.stranger, pki.ca.parent.parent / "other" / "ca.pem")
    )
    assert res.returncode == 8, res.stderr

    time.sleep(0.2)
    assert wl.alive() and agent.poll() is None
    n = (last(str(out)) or (0,))[0]
    wait_for(lambda: (last(str(out)) or (0,))[0] > n + 3, 5, "counter to keep counting")
    assert set(pids_in(b)) == {agent.pid}, "something was restored on the target"
    assert not list(agent.workdir.glob("*"))  # type: ignore[attr-defined]
