"""Running phaul itself in a lab: an agent on one host, `phaul migrate` on another."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.lab import Host, Lab

PHAUL = [sys.executable, "-m", "phaul.cli"]
PORT = 7707


def pids_in(host: Host) -> list[int]:
    from tests.integration.lab import pids_in_netns

    return pids_in_netns(host.netns_path)


@dataclass
class AgentProc:
    host: Host
    proc: subprocess.Popen[Any]
    token_file: Path
    workdir: Path
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{PORT}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_token(lab: Lab, name: str = "token", value: bytes | None = None) -> Path:
    path = lab.tmpfile(name)
    path.write_bytes(value if value is not None else os.urandom(24).hex().encode())
    path.chmod(0o600)
    return path


def start_agent(
    lab: Lab,
    host: Host,
    token: Path,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    workdir: Path | None = None,
) -> AgentProc:
    if workdir is None:
        workdir = Path(lab.tmp) / f"agent-{host.name}-{os.urandom(3).hex()}"
        workdir.mkdir()
    log = lab.tmpfile(f"agent-{host.name}", ".log")
    full_env = {**os.environ, **(env or {})}
    with open(log, "ab") as out:
        proc = host.popen(
            [*PHAUL, "--debug", "agent", "--listen", f"{host.ip}:{PORT}", "--token-file",
             str(token), "--workdir", str(workdir), *(extra or [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
        )  # fmt: skip
    agent = AgentProc(host, proc, token, workdir, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited: {log.read_text()}")
        if "listening on" in log.read_text():
            return agent
        time.sleep(0.05)
    raise AssertionError(f"agent did not start: {log.read_text()}")


def migrate(
    lab: Lab,
    src: Host,
    pid: int,
    agent: AgentProc,
    *args: str,
    token: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `phaul migrate` on host ``src``; returns the completed process (not checked)."""
    workdir = Path(lab.tmp) / f"src-{src.name}"
    workdir.mkdir(exist_ok=True)
    argv = [
        *PHAUL, "--debug", "migrate", str(pid), "--to", agent.address, "--token-file",
        str(token or agent.token_file), "--workdir", str(workdir), *args,
    ]  # fmt: skip
    return subprocess.run(
        src.argv(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


RAW_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
s.sendall(bytes.fromhex(sys.argv[3]))
s.settimeout(5)
data = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError as err:
    sys.stderr.write(repr(err))
sys.stdout.write(data.hex())
"""


def raw_exchange(host: Host, ip: str, payload: bytes, port: int = PORT) -> bytes:
    """Connect from ``host``, send raw bytes, return everything the peer sent until it closed."""
    out = host.run([sys.executable, "-c", RAW_CLIENT, ip, str(port), payload.hex()], timeout=30)
    return bytes.fromhex(out.stdout)


def wait_for(pred: Any, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def free_port_probe(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0
