"""``phaul demo``: a live migration on one machine, with network namespaces as hosts.

It builds three "hosts" (network namespaces on a bridge: ``a``, ``b`` and ``client``), runs
``phaul agent`` on b, starts a small stateful TCP service (``tcp_server.py``, in its own pid
namespace) on a service address of a, connects a client (``tcp_probe.py``) that sends a request
every 5 ms and checks each reply, migrates the service to b with ``phaul migrate`` and shows what
the client saw. Everything is removed afterwards (``--keep`` leaves it for inspection).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phaul.errors import PhaulError, UsageError

HERE = Path(__file__).resolve().parent
PORT = 7707
SERVICE_PORT = 7000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class DemoLab:
    def __init__(self) -> None:
        tag = os.urandom(2).hex()
        self.names = {h: f"phaul-demo-{tag}-{h}" for h in ("br", "a", "b", "client")}
        self.net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="phaul-demo-"))

    def ns(self, host: str) -> str:
        return f"/run/netns/{self.names[host]}"

    def ip_of(self, host: str) -> str:
        return f"{self.net}.{ {'a': 1, 'b': 2, 'client': 3}[host] }"

    def build(self) -> None:
        for name in self.names.values():
            _ip("netns", "add", name)
        br = self.names["br"]
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, host in enumerate(("a", "b", "client")):
            ns = self.names[host]
            _ip("link", "add", f"pd{i}", "netns", ns, "type", "veth", "peer", "pd{i}p".replace(
                "{i}", str(i)), "netns", br)  # fmt: skip
            _ip("-n", br, "link", "set", f"pd{i}p", "master", "br0", "up")
            _ip("-n", ns, "link", "set", f"pd{i}", "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.ip_of(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def popen(self, host: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "ab") as out:
            p = subprocess.Popen(
                ["nsenter", f"--net={self.ns(host)}", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(p)
        return p

    def teardown(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for name in self.names.values():
            inode = _ns_inode(f"/run/netns/{name}")
            for pid in _pids_in(inode):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _ns_inode(path: str) -> int:
    try:
        return Path(path).stat().st_ino
    except OSError:
        return -1


def _pids_in(inode: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "ns" / "net").stat().st_ino == inode and int(d.name) != os.getpid():
                    out.append(int(d.name))
    return out


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return
        time.sleep(0.05)
    raise PhaulError(f"demo: timed out waiting for {what}")


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("phaul demo needs root (it creates network namespaces)")
    from phaul.engine.criu_locate import find_criu

    criu = find_criu(None)
    lab = DemoLab()
    phaul = [sys.executable, "-m", "phaul.cli"]
    try:
        say(f"creating hosts a, b, client (network namespaces on a bridge, {lab.net}.0/24)")
        lab.build()
        token = lab.tmp / "token"
        token.write_bytes(os.urandom(24).hex().encode())
        token.chmod(0o600)
        b_ip = lab.ip_of("b")
        say(f"starting `phaul agent` on b ({b_ip}:{PORT}), CRIU {criu.version}")
        lab.popen(
            "b",
            [*phaul, "agent", "--listen", f"{b_ip}:{PORT}", "--token-file", str(token),
             "--workdir", str(lab.tmp / "agent")],
            "agent.log",
        )  # fmt: skip
        _wait(lambda: "listening" in (lab.tmp / "agent.log").read_text(), 20, "the agent")
        vip = f"{lab.net}.100"
        _ip("-n", lab.names["a"], "addr", "add", f"{vip}/24", "dev", "eth0")
        say(f"starting a TCP service on a, bound to the service address {vip}")
        service = lab.popen(
            "a",
            ["unshare", "--pid", "--fork", "setsid", "tini", "-s", "--", sys.executable,
             str(HERE / "tcp_server.py"), vip, str(SERVICE_PORT)],
            "service.log",
        )  # fmt: skip
        probe_out = lab.tmp / "probe.json"
        ready = lab.tmp / "probe.ready"
        probe = lab.popen(
            "client",
            [sys.executable, str(HERE / "tcp_probe.py"), vip, str(SERVICE_PORT), str(probe_out),
             "--interval-ms", "5", "--duration", "120", "--ready", str(ready)],
            "probe.log",
        )  # fmt: skip
        _wait(ready.exists, 20, "the client to connect")
        root = _service_root(service.pid)
        say(f"client on host `client` sends a request every 5 ms; service runs as PID {root}")
        time.sleep(1.0)
        say(f"phaul migrate {root} --to {b_ip}:{PORT}")
        res = subprocess.run(
            ["nsenter", f"--net={lab.ns('a')}", "--", *phaul, "migrate", str(root), "--to",
             f"{b_ip}:{PORT}", "--token-file", str(token), "--workdir", str(lab.tmp / "src"),
             "--report", str(lab.tmp / "report.json")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        print(res.stdout, end="")
        if res.returncode != 0:
            print(res.stderr, end="", file=sys.stderr)
            say(f"migration failed (exit {res.returncode}); logs in {lab.tmp}")
            return res.returncode
        time.sleep(1.0)
        probe.send_signal(signal.SIGTERM)
        probe.wait(10)
        result = json.loads(probe_out.read_text())
        pids = sorted(set(result.get("pids", [])))
        say(
            f"client: {result['replies']} replies to {result['requests']} requests, "
            f"errors {result['errors'] or 'none'}, reset {result['reset']}, "
            f"longest gap {result['max_gap_ms']:.0f} ms"
        )
        say(
            "the same TCP connection was served before and after the move "
            f"(server pid inside its namespace: {pids}); address {vip} is now on b"
        )
        return 0 if not result["errors"] and not result["reset"] else 1
    finally:
        if args.keep:
            say(f"kept: namespaces {', '.join(lab.names.values())}; files in {lab.tmp}")
        else:
            lab.teardown()
            say("cleaned up")


def _service_root(unshare_pid: int) -> int:
    """tini's host PID (the child of unshare): the root of the tree to migrate."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.02)
    raise PhaulError("demo: the service did not start")
