"""CriuPageReceiver with real CRIU: `criu dump --page-server` into our store, plain `criu restore`.

The workload (tests/workloads/memcheck.c, built here with gcc) fills 64 MiB with a per-page
pattern and verifies every page on SIGUSR1. It runs in its own pid namespace under tini, so its
restore never clashes with PIDs of the (killed) source.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phaul.errors import ProtocolError
from phaul.page_server import CriuPageReceiver, PageStream, ReceiveStats
from phaul.page_server.criu_image import read_pagemap, read_pstree
from phaul.page_server.store import FlatPageImage

pytestmark = pytest.mark.integration

CRIU = os.environ.get("PHAUL_CRIU", "/opt/phaul/criu/criu")
SOURCE = Path(__file__).resolve().parent.parent / "workloads" / "memcheck.c"
SIZE_MIB = 64
NPAGES = SIZE_MIB * 256
MAGIC = b"MEMCHECK"


def wait_for(what: str, cond: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no {path})"


@pytest.fixture(scope="module")
def memcheck_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memcheck") / "memcheck"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(SOURCE)], check=True)
    return out


class Memcheck:
    """memcheck under `unshare --pid --fork ... setsid tini -s`, stdio to files."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.dir = workdir
        self.ready = workdir / "ready"
        self.result = workdir / "result"
        seed = random.getrandbits(63)
        inner = 'exec setsid tini -s -- "$0" "$@" </dev/null >>"$OUT" 2>>"$ERR"'
        env = dict(os.environ, OUT=str(workdir / "out"), ERR=str(workdir / "err"))
        with open(workdir / "unshare.out", "wb") as uout:
            # unshare gets its own output file: it writes there when the source is killed, and
            # CRIU would then refuse to restore files whose size changed (lazy-final-dump.md §1).
            self.unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "sh", "-c", inner, str(binary), str(SIZE_MIB),
                 str(seed), str(self.ready), str(self.result)],
                stdin=subprocess.DEVNULL, stdout=uout, stderr=subprocess.STDOUT, env=env,
                cwd=workdir, start_new_session=True,
            )  # fmt: skip
        self.restore: subprocess.Popen[bytes] | None = None
        self.tini = 0
        try:
            wait_for("memcheck ready", self.ready.exists)
            kids = children(self.unshare.pid)
            assert len(kids) == 1, kids
            self.tini = kids[0]
        except BaseException:
            self.close()
            raise

    def program(self, tini: int) -> int:
        kids = wait_for("memcheck under tini", lambda: children(tini))
        assert isinstance(kids, list) and len(kids) == 1, kids
        return int(kids[0])

    def check(self, tini: int) -> tuple[int, int, int]:
        """SIGUSR1 the memcheck under ``tini``; returns (ok, bad, first_bad)."""
        before = self.result.read_text().count("\n") if self.result.exists() else 0
        os.kill(self.program(tini), signal.SIGUSR1)

        def line() -> str | None:
            lines = self.result.read_text().splitlines() if self.result.exists() else []
            return lines[-1] if len(lines) > before else None

        text = wait_for("memcheck result", line)
        fields = dict(f.split("=") for f in str(text).split()[1:])
        return int(fields["ok"]), int(fields["bad"]), int(fields["first_bad"])

    def kill_source(self) -> None:
        if self.unshare.poll() is None and self.tini:
            try:
                os.kill(self.tini, signal.SIGKILL)  # pid 1 of the namespace: all of it dies
            except ProcessLookupError:
                pass
        try:
            self.unshare.wait(10)
        except subprocess.TimeoutExpired:
            self.unshare.kill()
            self.unshare.wait(10)

    def start_restore(self, images: Path) -> int:
        """Plain `criu restore` (not detached: criu stays the parent and reaps the tree)."""
        pidfile = images / "restored.pid"
        self.restore = subprocess.Popen(
            [CRIU, "restore", "-D", str(images), "--pidfile", str(pidfile), "-o", "restore.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

        def pid() -> int:
            if self.restore is not None and self.restore.poll() is not None:
                raise AssertionError(
                    f"criu restore exited {self.restore.returncode}:\n"
                    + log_tail(images / "restore.log")
                )
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            return int(text) if text and children(int(text)) else 0

        return int(str(wait_for("restored tree", pid, timeout=30)))

    def kill_restored(self, tini: int) -> None:
        if self.restore is None:
            return
        if self.restore.poll() is None:
            try:
                os.kill(tini, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.restore.wait(10)
            except subprocess.TimeoutExpired:
                self.restore.kill()
                self.restore.wait(10)
        self.restore = None

    def close(self) -> None:
        if self.restore is not None:
            self.restore.kill()
            self.restore.wait(10)
        self.kill_source()


@pytest.fixture
def memcheck(memcheck_bin: Path, tmp_path: Path) -> Iterator[Memcheck]:
    wdir = tmp_path / "workload"
    wdir.mkdir()
    m = Memcheck(memcheck_bin, wdir)
    try:
        yield m
    finally:
        m.close()


class Server:
    """A loopback listening socket; the first connection is served by CriuPageReceiver."""

    def __init__(
        self, receiver: CriuPageReceiver, wrap: Callable[[socket.socket], PageStream] | None = None
    ) -> None:
        self.lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsk.bind(("127.0.0.1", 0))
        self.lsk.listen(1)
        self.lsk.settimeout(30)
        self.port = self.lsk.getsockname()[1]
        self.result: ReceiveStats | BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            conn = None
            try:
                conn, _ = self.lsk.accept()
                conn.settimeout(30)
                self.result = receiver.serve(wrap(conn) if wrap else conn)
            except BaseException as err:
                self.result = err
            finally:
                self.finished_at = time.monotonic()
                if conn is not None:
                    conn.close()

        self.thread = threading.Thread(target=run, name="page-store", daemon=True)
        self.thread.start()

    def join(self) -> ReceiveStats | BaseException | None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "page store thread hangs"
        return self.result

    def close(self) -> None:
        self.lsk.close()
        self.thread.join(30)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    store.mkdir()
    return src, store


def criu_dump(
    tini: int, src: Path, port: int, leave: str = "--leave-stopped"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CRIU, "dump", "-t", str(tini), "-D", str(src), "-o", "dump.log", leave,
         "--page-server", "--address", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
    )  # fmt: skip


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp, without connecting)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def test_dump_through_store_then_plain_restore(
    memcheck: Memcheck, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = dirs
    assert memcheck.check(memcheck.tini) == (NPAGES, 0, -1)
    server = Server(CriuPageReceiver(store))
    try:
        t0 = time.monotonic()
        dump = criu_dump(memcheck.tini, src, server.port)
        result = server.join()
    finally:
        server.close()
    assert dump.returncode == 0, log_tail(src / "dump.log")
    assert isinstance(result, ReceiveStats), result
    assert result.pages >= NPAGES
    assert result.bytes == result.pages * 4096
    assert result.files == 4  # tini and memcheck: one pagemap + one pages file each

    # The store holds exactly what CRIU's page server would: pagemap-<vpid>.img per task of the
    # dumped pid namespace, each naming its pages file, with the data of the present entries.
    tasks = read_pstree(src / "pstree.img")
    assert sorted(t.pid for t in tasks) == [1, 2]
    assert not list(src.glob("pagemap-*")) and not list(src.glob("pages-*"))
    for t in tasks:
        pm = read_pagemap(store / f"pagemap-{t.pid}.img")
        pages = store / f"pages-{pm.pages_id}.img"
        assert pages.stat().st_size == pm.present_pages * 4096
    memcheck_pm = read_pagemap(store / "pagemap-2.img")
    assert memcheck_pm.present_pages >= NPAGES

    # The rest of the dump joins the store's directory; the source goes away; plain restore.
    for f in src.iterdir():
        if f.name != "dump.log":
            shutil.copy2(f, store / f.name)
    memcheck.kill_source()
    t1 = time.monotonic()
    tini = memcheck.start_restore(store)
    restore_s = time.monotonic() - t1
    try:
        ok, bad, first_bad = memcheck.check(tini)
        assert (ok, bad, first_bad) == (NPAGES, 0, -1)
    finally:
        memcheck.kill_restored(tini)

    # The same image rebuilt as flat pre-copy images (FlatPageImage: entries written in reverse
    # order, so they are staged and merged by commit), with one arena page deliberately wrong:
    # the restore must work and the check must see exactly that page (the control).
    flat = store.parent / "flat"
    flat.mkdir()
    victim = 1234
    for vpid in (1, 2):
        pm = read_pagemap(store / f"pagemap-{vpid}.img")
        data = memoryview((store / f"pages-{pm.pages_id}.img").read_bytes())
        img = FlatPageImage(flat, vpid, pm.pages_id)
        extents, off = [], 0
        for e in pm.entries:
            if e.present:
                extents.append((e.vaddr, data[off : off + e.nr_pages * 4096]))
                off += e.nr_pages * 4096
        for vaddr, chunk in reversed(extents):
            img.write(vaddr, chunk)
        img.commit()
        for vaddr, chunk in extents:
            at = bytes(chunk).find(MAGIC + victim.to_bytes(8, "little"))
            if vpid == 2 and at >= 0:
                assert at % 4096 == 0
                bad = bytearray(chunk[at : at + 4096])
                bad[100] ^= 0xFF
                img.write(vaddr + at, bad)  # in place
        img.close()
    assert sorted(p.name for p in flat.iterdir()) == sorted(result.images)
    for f in src.iterdir():
        if f.name != "dump.log":
            shutil.copy2(f, flat / f.name)
    tini = memcheck.start_restore(flat)
    try:
        assert memcheck.check(tini) == (NPAGES - 1, 1, victim)
    finally:
        memcheck.kill_restored(tini)

    with capsys.disabled():
        print(
            f"\n[page store] {result.bytes / 2**20:.1f} MiB in {result.seconds * 1000:.0f} ms: "
            f"{result.mib_per_second:.0f} MiB/s receive goodput; criu dump wall "
            f"{(server.finished_at - t0) * 1000:.0f} ms; restore {restore_s * 1000:.0f} ms"
        )


def test_layout_matches_criu_page_server(
    memcheck: Memcheck, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same idle tree dumped twice (--leave-running): once to CRIU's own page server, once to
    ours. The memcheck task's pagemap and pages must be byte-identical; tini's must agree in
    names and layout (tini itself may touch its stack between the two dumps)."""
    src, store = dirs
    criu_src, criu_store = tmp_path / "criu-src", tmp_path / "criu-store"
    criu_src.mkdir()
    criu_store.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ps = subprocess.Popen(
        [CRIU, "page-server", "-D", str(criu_store), "--address", "127.0.0.1", "--port", str(port),
         "-o", "ps.log"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for("criu page-server listening", lambda: listening(port))
        dump = criu_dump(memcheck.tini, criu_src, port, leave="--leave-running")
        assert dump.returncode == 0, log_tail(criu_src / "dump.log")
        assert ps.wait(30) == 0, log_tail(criu_store / "ps.log")
    finally:
        if ps.poll() is None:
            ps.kill()
            ps.wait(10)
    server = Server(CriuPageReceiver(store))
    try:
        dump = criu_dump(memcheck.tini, src, server.port, leave="--leave-running")
        result = server.join()
    finally:
        server.close()
    assert dump.returncode == 0, log_tail(src / "dump.log")
    assert isinstance(result, ReceiveStats), result

    ours = sorted(p.name for p in store.iterdir())
    assert ours == sorted(p.name for p in criu_store.iterdir() if p.name != "ps.log")
    assert ours == sorted(result.images)
    for vpid in (1, 2):
        mine, theirs = store / f"pagemap-{vpid}.img", criu_store / f"pagemap-{vpid}.img"
        pm = read_pagemap(mine)
        assert pm.pages_id == read_pagemap(theirs).pages_id
        assert (store / f"pages-{pm.pages_id}.img").stat().st_size == pm.present_pages * 4096
        if vpid == 2:
            assert mine.read_bytes() == theirs.read_bytes()
            pages = f"pages-{pm.pages_id}.img"
            a, b = (store / pages).read_bytes(), (criu_store / pages).read_bytes()
            assert len(a) == len(b)
            # The task ran between the dumps (sigsuspend restarted, libc state): a few pages
            # outside the arena may differ; all 16384 arena pages may not.
            differ = [i for i in range(0, len(a), 4096) if a[i : i + 4096] != b[i : i + 4096]]
            assert len(differ) <= 4, len(differ)
            assert not [i for i in differ if a[i : i + 8] == MAGIC]
            assert a.count(MAGIC) >= NPAGES and b.count(MAGIC) >= NPAGES


class CutAfter:
    """A stream that ends (EOF, and the connection is shut down) after ``limit`` bytes."""

    def __init__(self, sk: socket.socket, limit: int) -> None:
        self.sk = sk
        self.limit = limit
        self.got = 0

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        if self.got >= self.limit:
            self.sk.shutdown(socket.SHUT_RDWR)
            return 0
        n = min(nbytes or len(buffer), self.limit - self.got)
        got = self.sk.recv_into(buffer, n)
        self.got += got
        return got

    def sendall(self, data: bytes, /) -> None:
        self.sk.sendall(data)


def test_stream_cut_mid_transfer(memcheck: Memcheck, dirs: tuple[Path, Path]) -> None:
    src, store = dirs
    server = Server(CriuPageReceiver(store), wrap=lambda sk: CutAfter(sk, 16 << 20))
    try:
        dump = criu_dump(memcheck.tini, src, server.port)
        result = server.join()
    finally:
        server.close()
    assert isinstance(result, ProtocolError), result
    assert "inside page data" in str(result)
    assert dump.returncode != 0
    assert sorted(p.name for p in store.iterdir()) == []  # no partial pagemap or pages file
    # The failed dump resumed the source, intact.
    wait_for("source resumed", lambda: Path(f"/proc/{memcheck.tini}/stat").read_text()
             .rsplit(")", 1)[1].split()[0] in "SR")  # fmt: skip
    assert memcheck.check(memcheck.tini) == (NPAGES, 0, -1)


def test_garbage_fails_fast(tmp_path: Path) -> None:
    server = Server(CriuPageReceiver(tmp_path))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sk:
            t0 = time.monotonic()
            sk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
            result = server.join()
            elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert isinstance(result, ProtocolError), result
    assert elapsed < 1.0
    assert list(tmp_path.iterdir()) == []
