"""A network lab on one machine: "hosts" are network namespaces joined by a bridge.

``Lab(hosts=("a", "b", "client"))`` builds, for one test:

* a bridge namespace ``phl-<id>-br`` holding bridge ``br0``;
* one namespace per host, ``phl-<id>-<name>`` (``<id>`` is random, so parallel test runs of
  other developers never collide), each with a veth renamed ``eth0`` plugged into the bridge,
  loopback up, and an address in a private ``10.x.y.0/24`` subnet that is not in use anywhere
  on this machine (checked against every interface of every named namespace, and reserved with
  a file under ``/run/phaul-lab`` against concurrent labs);
* helpers to run processes "on" a host. They always use ``nsenter --net=/run/netns/...``, never
  ``ip netns exec`` (that one creates a private mount namespace per call, which breaks CRIU
  dumps: reference/criu-on-this-kernel.md §3).

Teardown (``__exit__``, also when the test failed) kills every process the lab started, then
every process still living in one of its namespaces (found by the inode of /proc/PID/ns/net,
which also catches processes restored there by CRIU), deletes the namespaces, releases the
subnet and removes the lab's scratch directory (kept when ``PHAUL_KEEP_LAB=1``).

Host IPs: the n-th host gets ``.n`` (a=.1, b=.2, client=.3 for the default fixture); VIPs
handed out by :meth:`Lab.vip` start at ``.100``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

NETNS_DIR = Path("/run/netns")
RESERVE_DIR = Path("/run/phaul-lab")
TINI = "/usr/bin/tini"
WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
# The demo's TCP service and probe ship with phaul (`phaul demo` uses them); tests use the same.
DEMO = Path(__file__).resolve().parent.parent.parent / "phaul" / "demo"


def workload_path(script: str) -> Path:
    """tests/workloads/SCRIPT, or phaul/demo/SCRIPT for the demo's service and probe."""
    path = WORKLOADS / script
    return path if path.exists() else DEMO / script


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    return subprocess.run([*argv, *args], check=True, capture_output=True, text=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _state(pid: int) -> str:
    """The one-letter state of PID ('' when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def pids_in_netns(netns_path: str | os.PathLike[str]) -> list[int]:
    """Every PID (host view) whose network namespace is the one bound at ``netns_path``."""
    try:
        st = os.stat(netns_path)
    except OSError:
        return []
    key = (st.st_dev, st.st_ino)
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == key:
            out.append(int(entry.name))
    return out


def used_ipv4_networks() -> set[ipaddress.IPv4Network]:
    """The IPv4 networks configured in the root namespace and every named namespace."""
    spaces: list[str | None] = [None]
    if NETNS_DIR.is_dir():
        spaces += [p.name for p in NETNS_DIR.iterdir()]
    nets: set[ipaddress.IPv4Network] = set()
    for ns in spaces:
        try:
            data = json.loads(_ip("-j", "-4", "addr", "show", netns=ns).stdout or "[]")
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            continue  # a namespace deleted meanwhile
        for link in data:
            for a in link.get("addr_info", []):
                nets.add(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network)
    return nets


def _reserve_subnet() -> tuple[ipaddress.IPv4Network, Path]:
    """Pick a free random 10.x.y.0/24 and reserve it with an O_EXCL file holding our PID."""
    RESERVE_DIR.mkdir(parents=True, exist_ok=True)
    used = used_ipv4_networks()
    rng = secrets.SystemRandom()
    for _ in range(200):
        x, y = rng.randrange(64, 254), rng.randrange(0, 256)
        if (x, y) == (91, 0):  # the reference experiments' lab subnet
            continue
        net = ipaddress.IPv4Network(f"10.{x}.{y}.0/24")
        if any(net.overlaps(u) for u in used):
            continue
        marker = RESERVE_DIR / f"10.{x}.{y}"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError, ValueError):
                owner = int(marker.read_text().strip())
                if not _pid_alive(owner):
                    marker.unlink()  # stale reservation from a crashed run: try again later
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return net, marker
    raise RuntimeError("no free 10.x.y.0/24 subnet found for the lab")


def _rate_bits(rate: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    r = rate.lower().removesuffix("bit").removesuffix("bps")
    if r and r[-1] in units:
        return int(float(r[:-1]) * units[r[-1]])
    return int(r)


@dataclass
class Workload:
    """A process tree started by :meth:`Host.start_workload`.

    ``root_pid`` is the PID to migrate: tini's host PID for ``own_pidns`` workloads (tini is
    pid 1 of the new pid namespace and a session leader), otherwise the command's own PID.
    ``launcher`` is the process the lab spawned (``unshare`` for ``own_pidns``), ``log`` the
    file that receives stdout and stderr.
    """

    root_pid: int
    launcher: subprocess.Popen[bytes]
    log: Path
    own_pidns: bool
    host: Host

    def alive(self) -> bool:
        """True while ``root_pid`` exists and is not a zombie."""
        return _state(self.root_pid) not in ("", "Z", "X")

    def kill(self) -> None:
        """SIGKILL the tree (if still here) and reap the launcher."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.root_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.launcher.pid, signal.SIGKILL)
        try:
            self.launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.launcher.kill()
            self.launcher.wait(timeout=5)


@dataclass
class Host:
    """One namespace "host" of a :class:`Lab`."""

    name: str
    netns_path: str
    ip: str
    dev: str = "eth0"
    lab: Lab | None = field(default=None, repr=False, compare=False)

    @property
    def netns(self) -> str:
        """The namespace's name (for ``ip -n``)."""
        return Path(self.netns_path).name

    @property
    def mac(self) -> str:
        """The MAC address of ``dev``."""
        data = json.loads(_ip("-j", "link", "show", "dev", self.dev, netns=self.netns).stdout)
        return str(data[0]["address"])

    def _lab(self) -> Lab:
        assert self.lab is not None, "host not attached to a lab"
        return self.lab

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in this host's network namespace."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` in a new thread that joined this host's network namespace.

        Sockets, netlink and child processes created by that thread belong to this host, as
        they would in a phaul process running there. Exceptions propagate to the caller.
        """
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.netns_path}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["result"] = fn(*args, **kw)
            except BaseException as err:
                box["error"] = err

        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host (new session); the lab kills and reaps it at teardown."""
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self._lab().track(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host to completion; checked, output captured as text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        try:
            return subprocess.run(self.argv(argv), check=True, timeout=timeout, **kw)
        except subprocess.CalledProcessError as err:
            raise AssertionError(
                f"{argv} on {self.name} failed ({err.returncode}): {err.stderr}"
            ) from err

    def add_address(self, cidr: str) -> None:
        """Add ``cidr`` (e.g. "10.x.y.100/24") to ``dev``."""
        _ip("addr", "add", cidr, "dev", self.dev, netns=self.netns)

    def del_address(self, cidr: str) -> None:
        """Remove ``cidr`` from ``dev``."""
        _ip("addr", "del", cidr, "dev", self.dev, netns=self.netns)

    def addresses(self) -> list[str]:
        """The IPv4 addresses of ``dev`` as "a.b.c.d/len" strings."""
        data = json.loads(_ip("-j", "-4", "addr", "show", "dev", self.dev, netns=self.netns).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for link in data for a in link["addr_info"]]

    def neigh(self, ip: str) -> str | None:
        """The MAC this host's neighbour table has for ``ip`` (None if no usable entry)."""
        data = json.loads(_ip("-j", "neigh", "show", ip, "dev", self.dev, netns=self.netns).stdout)
        for entry in data:
            if "lladdr" in entry and "FAILED" not in entry.get("state", []):
                return str(entry["lladdr"])
        return None

    def start_workload(
        self,
        argv: Sequence[str],
        *,
        own_pidns: bool = True,
        cwd: str | os.PathLike[str] | None = None,
        log: str | os.PathLike[str] | None = None,
        timeout: float = 10,
    ) -> Workload:
        """Start a CRIU-dumpable workload in this host and return it once it runs.

        It runs in a new session with stdin from /dev/null and stdout/stderr to ``log`` (a
        file in the lab's scratch directory by default), and with ``own_pidns`` as
        ``unshare --pid --fork setsid tini -s -- ARGV`` (tini is pid 1 and session leader of
        the new pid namespace; reference §4). Returns when the command itself has been
        exec'd (for ``own_pidns``: tini and its first child exist).
        """
        lab = self._lab()
        logpath = Path(log) if log is not None else lab.tmpfile(f"{self.name}-workload", ".log")
        full = list(argv)
        if own_pidns:
            full = ["unshare", "--pid", "--fork", "setsid", TINI, "-s", "--", *full]
        with open(os.devnull, "rb") as devnull, open(logpath, "ab") as out:
            proc = self.popen(
                full, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, close_fds=True
            )
        deadline = time.monotonic() + timeout
        root = proc.pid
        if own_pidns:
            root = 0
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"workload {argv} exited early: {logpath.read_text()}")
                kids = _children(proc.pid)
                exe = _cmdline(kids[0])[:1] if kids else []
                if exe and Path(exe[0]).name == "tini" and _children(kids[0]):
                    root = kids[0]
                    break
                time.sleep(0.005)
            if not root:
                raise AssertionError(f"workload {argv}: tini did not start in {timeout} s")
        else:
            # nsenter execs argv in place; wait until that exec happened.
            while time.monotonic() < deadline and _cmdline(proc.pid)[:1] == ["nsenter"]:
                time.sleep(0.005)
        wl = Workload(root_pid=root, launcher=proc, log=logpath, own_pidns=own_pidns, host=self)
        lab.workloads.append(wl)
        return wl

    def python_workload(
        self, script: str, *args: str, own_pidns: bool = True, **kw: Any
    ) -> Workload:
        """Start ``tests/workloads/<script>`` with the system python3 and ``args``."""
        return self.start_workload(
            ["python3", str(workload_path(script)), *args], own_pidns=own_pidns, **kw
        )

    def start_script(
        self, script: str, *args: str, log: str | os.PathLike[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``tests/workloads/<script>`` here as a plain process (e.g. tcp_probe.py).

        stdin is /dev/null, stdout+stderr go to ``log`` (a scratch file by default); the lab
        kills and reaps it at teardown.
        """
        logpath = Path(log) if log is not None else self._lab().tmpfile(script, ".log")
        with open(os.devnull, "rb") as devnull, open(logpath, "ab") as out:
            return self.popen(
                ["python3", str(workload_path(script)), *args],
                stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip


class Lab:
    """Network namespaces on a bridge; a context manager that always cleans up."""

    def __init__(self, hosts: Sequence[str] = ("a", "b", "client")) -> None:
        self.id = secrets.token_hex(3)
        self.prefix = f"phl-{self.id}"
        self.host_names = tuple(hosts)
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.workloads: list[Workload] = []
        self.namespaces: list[str] = []
        self.net: ipaddress.IPv4Network | None = None
        self._marker: Path | None = None
        self._next_vip = 100
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))

    # -- construction -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_netns(self, name: str) -> str:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "set", "lo", "up", netns=name)
        return str(NETNS_DIR / name)

    def _build(self) -> None:
        self.net, self._marker = _reserve_subnet()
        br = f"{self.prefix}-br"
        self._add_netns(br)
        _ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", netns=br)
        _ip("link", "set", "br0", "up", netns=br)
        for i, name in enumerate(self.host_names, start=1):
            path = self._add_netns(f"{self.prefix}-{name}")
            port = f"v{i}-{name}"[:15]
            _ip(
                "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", Path(path).name, netns=br,
            )  # fmt: skip
            _ip("link", "set", port, "master", "br0", "up", netns=br)
            ip = str(self.net.network_address + i)
            _ip("addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0", netns=Path(path).name)
            _ip("link", "set", "eth0", "up", netns=Path(path).name)
            self.hosts[name] = Host(name=name, netns_path=path, ip=ip, lab=self)

    # -- use ----------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        """The host called ``name``."""
        return self.hosts[name]

    def vip(self) -> str:
        """A new free address in the lab subnet ("10.x.y.100/24", then .101, ...)."""
        assert self.net is not None
        addr = self.net.network_address + self._next_vip
        self._next_vip += 1
        return f"{addr}/{self.net.prefixlen}"

    def track(self, proc: subprocess.Popen[Any]) -> None:
        """Kill and reap ``proc`` (and its process group) at teardown."""
        self.procs.append(proc)

    def tmpfile(self, stem: str, suffix: str = "") -> Path:
        """A new, not yet existing path in the lab's scratch directory."""
        fd, name = tempfile.mkstemp(prefix=f"{stem}-", suffix=suffix, dir=self.tmp)
        os.close(fd)
        return Path(name)

    def shape(self, host: Host | str, rate: str = "1gbit", *, both: bool = True) -> None:
        """Limit ``host``'s link to ``rate`` with tc tbf (egress; ``both``: ingress too)."""
        h = self.host(host) if isinstance(host, str) else host
        bits = _rate_bits(rate)
        burst = max(bits // 8 // 100, 16 * 1024)  # 10 ms worth of bytes, at least 16 KiB
        tbf = ["root", "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
        subprocess.run(
            ["tc", "-n", h.netns, "qdisc", "replace", "dev", h.dev, *tbf],
            check=True, capture_output=True,
        )  # fmt: skip
        if both:
            i = self.host_names.index(h.name) + 1
            port = f"v{i}-{h.name}"[:15]
            subprocess.run(
                ["tc", "-n", f"{self.prefix}-br", "qdisc", "replace", "dev", port, *tbf],
                check=True, capture_output=True,
            )  # fmt: skip

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Kill everything the lab started or that lives in its namespaces; delete them."""
        errors: list[str] = []
        for wl in self.workloads:
            try:
                wl.kill()
            except Exception as err:
                errors.append(f"workload {wl.root_pid}: {err}")
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} did not die")
        for name in self.namespaces:
            path = NETNS_DIR / name
            for _ in range(50):
                pids = [p for p in pids_in_netns(path) if _state(p) not in ("Z", "X", "")]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)
            else:
                errors.append(f"processes left in {name}")
        for name in reversed(self.namespaces):
            try:
                _ip("netns", "del", name)
            except subprocess.CalledProcessError as err:
                errors.append(f"netns del {name}: {err.stderr}")
        self.namespaces.clear()
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None
        if os.environ.get("PHAUL_KEEP_LAB") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise RuntimeError("lab teardown: " + "; ".join(errors))

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())
