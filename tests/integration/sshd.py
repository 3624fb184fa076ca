"""A real OpenSSH server (Debian's sshd) in a lab host, for the SSH transport tests.

Everything is private to the test: its own config file, a generated ed25519 host key, a client
key that is the only authorized key (key-only auth, root allowed with keys only), and a
known_hosts file naming the host key. The lab kills sshd and its sessions at teardown.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.lab import Host, Lab

SSHD = "/usr/sbin/sshd"
PORT = 2222


@dataclass
class Sshd:
    host: Host
    port: int
    proc: subprocess.Popen[Any]
    dir: Path
    client_key: Path
    known_hosts: Path
    host_key_line: str  # "ssh-ed25519 AAAA..." as in known_hosts
    log: Path

    @property
    def url(self) -> str:
        return f"ssh://root@{self.host.ip}:{self.port}"

    def write_known_hosts(self, key_line: str | None = None, path: Path | None = None) -> Path:
        """known_hosts naming this server with ``key_line`` (default: its real host key)."""
        path = path or self.known_hosts
        path.write_text(f"[{self.host.ip}]:{self.port} {key_line or self.host_key_line}\n")
        return path


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def start_sshd(lab: Lab, host: Host, port: int = PORT) -> Sshd:
    d = lab.tmpfile("sshd")
    d.unlink()
    d.mkdir(mode=0o700)
    host_key_line = _keygen(d / "host_key")
    _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    config = d / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {host.ip}",
                f"HostKey {d / 'host_key'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "AllowStreamLocalForwarding yes",
                "X11Forwarding no",
                "PrintMotd no",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
    log = d / "sshd.log"
    with log.open("ab") as out:
        proc = host.popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Sshd(host, port, proc, d, d / "client_key", d / "known_hosts", host_key_line, log)
    server.write_known_hosts()

    def listening() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((host.ip, port)) == 0

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {log.read_text()}")
        if host.call(listening):
            return server
        time.sleep(0.05)
    raise AssertionError(f"sshd did not start: {log.read_text()}")
