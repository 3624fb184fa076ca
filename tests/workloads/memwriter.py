"""Python side of the memwriter workload (memwriter.c): build it, start it, check its pages.

    with Memwriter.start(tmp_path, mib=64, rate=20, threads=2) as mw:
        mw.addr, mw.pages                  # the main buffer
        page_gen(data, mw.page_index(addr))  # generation of one page read from outside, or None
        mw.verify()                        # SIGUSR1 -> "ok pages=N bad=0"

Lockstep mode (``lockstep=True``): ``mw.command("w 1 5 9")`` returns the ack line.
Stdlib only; the binary is compiled with gcc once per directory.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

SOURCE = Path(__file__).resolve().parent / "memwriter.c"
PAGE = 4096
WORDS = PAGE // 8
MAGIC = 0x6D656D7772697465
MAGIC2 = 0x636875726E706167
GOLDEN = 0x9E3779B97F4A7C15
FNV = 0x100000001B3
_M64 = (1 << 64) - 1
_TEMPLATE = int.from_bytes(
    b"".join(((k * GOLDEN) & _M64).to_bytes(8, "little") for k in range(3, WORDS)), "little"
)
LOG_RECORD = "<QQII"  # t_before_ns, t_after_ns, page, gen


def mix64(x: int) -> int:
    x = (x + GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def expected_page(index: int, gen: int, magic: int = MAGIC) -> bytes:
    """The exact content of page ``index`` at generation ``gen``."""
    v = mix64(((index * FNV) & _M64) ^ (gen << 40) ^ magic)
    body = int.from_bytes(v.to_bytes(8, "little") * (WORDS - 3), "little") ^ _TEMPLATE
    head = magic.to_bytes(8, "little") + index.to_bytes(8, "little") + gen.to_bytes(8, "little")
    return head + body.to_bytes(PAGE - 24, "little")


def page_gen(data: bytes | memoryview, index: int, magic: int = MAGIC) -> int | None:
    """The generation of a page whose bytes are ``data`` if it is a valid page ``index``, else
    None (wrong index, torn or corrupt)."""
    data = bytes(data)
    if len(data) != PAGE:
        return None
    if int.from_bytes(data[0:8], "little") != magic:
        return None
    if int.from_bytes(data[8:16], "little") != index:
        return None
    gen = int.from_bytes(data[16:24], "little")
    return gen if data == expected_page(index, gen, magic) else None


def build(directory: Path) -> Path:
    """Compile memwriter.c into ``directory`` (once) and return the binary's path."""
    binary = directory / "memwriter"
    if not binary.exists():
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(SOURCE)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return binary


class Memwriter:
    """A running memwriter; a context manager that kills and reaps it."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, lockstep: bool) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.workdir = workdir
        self.result_path = workdir / "result"
        self.info_path = workdir / "info"
        self.beat_path = workdir / "beat"
        self.log_path = workdir / "log"
        self.fifo = workdir / "cmd"
        self._cmd_fd = -1
        self._ack_fd = -1
        self.addr = 0
        self.size = 0
        self.pages = 0
        self._wait_info()
        if lockstep:
            self._cmd_fd = os.open(self.fifo, os.O_WRONLY | os.O_CLOEXEC)
            self._ack_fd = os.open(str(self.fifo) + ".ack", os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        mib: int,
        rate: float = 0,
        threads: int = 1,
        churn_pages: int = 0,
        log: bool = False,
        lockstep: bool = False,
        binary: Path | None = None,
        prefix: list[str] | None = None,
    ) -> Memwriter:
        """Build (if needed) and start memwriter with its files in ``workdir``; wait until its
        buffer is filled. ``prefix`` is prepended to the command (e.g. nsenter ...)."""
        workdir.mkdir(parents=True, exist_ok=True)
        exe = binary or build(workdir)
        for stale in ("info", "result", "beat", "stdout", "stderr"):
            (workdir / stale).unlink(missing_ok=True)
        for stale_log in workdir.glob("log.*"):
            stale_log.unlink()
        argv = [str(exe), "-m", str(mib), "-r", str(workdir / "result")]
        argv += ["-i", str(workdir / "info"), "-b", str(workdir / "beat")]
        if rate:
            argv += ["-d", str(rate), "-t", str(threads)]
        if churn_pages:
            argv += ["-c", str(churn_pages)]
        if log:
            argv += ["-l", str(workdir / "log")]
        if lockstep:
            fifo = workdir / "cmd"
            for p in (fifo, Path(str(fifo) + ".ack")):
                if not p.exists():
                    os.mkfifo(p)
            argv += ["-L", str(fifo)]
        with (
            open(workdir / "stdout", "wb") as out,
            open(workdir / "stderr", "wb") as err,
        ):
            proc = subprocess.Popen(
                [*(prefix or []), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            return cls(proc, workdir, lockstep)
        except BaseException:
            proc.kill()
            proc.wait()
            raise

    def _wait_info(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.info_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"memwriter exited with {self.proc.returncode}: "
                    f"{(self.workdir / 'stderr').read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("memwriter did not fill its buffer in time")
            time.sleep(0.01)
        fields = dict(kv.split("=", 1) for kv in self.info_path.read_text().split())
        self.addr = int(fields["addr"], 16)
        self.size = int(fields["size"])
        self.pages = int(fields["pages"])

    def page_index(self, addr: int) -> int:
        return (addr - self.addr) // PAGE

    def verify(self, timeout: float = 30.0) -> str:
        """Ask the workload to check all its pages (SIGUSR1); return its result line."""
        self.result_path.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not self.result_path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("memwriter did not report a verification result")
            time.sleep(0.01)
        return self.result_path.read_text().strip()

    def command(self, line: str, timeout: float = 30.0) -> str:
        """Lockstep: send one command line, return the ack line."""
        if self._cmd_fd < 0:
            raise RuntimeError("memwriter was not started with lockstep=True")
        os.write(self._cmd_fd, line.encode() + b"\n")
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._ack_fd], [], [], left)[0]:
                raise TimeoutError(f"no ack for {line!r}")
            chunk = os.read(self._ack_fd, 1)
            if not chunk:
                raise RuntimeError("memwriter closed its ack FIFO")
            out += chunk
        return out.decode().strip()

    def beat(self) -> tuple[int, int]:
        """(heartbeat counter, total page writes) from the heartbeat file."""
        parts = self.beat_path.read_text().split()
        return int(parts[1]), int(parts[3])

    def log_files(self) -> list[Path]:
        return sorted(self.workdir.glob("log.*"))

    def stop(self) -> None:
        if self._cmd_fd >= 0:
            os.close(self._cmd_fd)
            self._cmd_fd = -1
        if self._ack_fd >= 0:
            os.close(self._ack_fd)
            self._ack_fd = -1
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Memwriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
