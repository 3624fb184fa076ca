"""One migration as seen by the target agent: images in, restore, hold at pre-resume, commit.

Phase by phase (phaul.phase.Phase):
- PREFLIGHT: checks only (CRIU, addresses, disk); nothing is created.
- DUMP: a work directory with the images dir is created, a restore CRIU is spawned ahead of time
  and a gratuitous-ARP socket is opened; the page stream (CRIU's page-server protocol, on its own
  authenticated connection) and the image files arrive.
- RESTORE: the addresses are added, CRIU restores the tree and stops at its ``pre-resume``
  notify: the tree exists but has not run. We answer ``Restored`` and wait for the source.
- COMMIT: on ``Commit`` a gratuitous ARP goes out for every moved address and CRIU resumes the
  tree; ``Committed`` is sent. On ``Abort``, a lost connection or a timeout, the addresses are
  withdrawn first (so the never-run tree's sockets cannot reset the peer), then CRIU kills the
  tree: ROLLED_BACK.
Undo steps are pushed on an AsyncExitStack as they are taken, so every failure unwinds the same
way; a commit pops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phaul import gcpause, trace
from phaul.errors import MigrationAborted, PhaulError, ProtocolError
from phaul.pb import phaul_pb2 as pb
from phaul.phase import Phase, PhaseMachine
from phaul.protocol.framing import Channel
from phaul.target.journal import Journal

if TYPE_CHECKING:
    import socket

    from phaul.target.agent import Agent

log = logging.getLogger(__name__)


def _peer_elsewhere(peer: object, local: list[ipaddress.IPv4Interface]) -> bool:
    """True when the connection comes from another network namespace for sure (an address
    that is not loopback and not one of ours); unknown peers (stdio over SSH) count as here."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return not ip.is_loopback and all(ip != a.ip for a in local)


def fault(name: str) -> None:
    """Named fault-injection point (PHAUL_FAULT=name), as CRIU's CRIU_FAULT: for rollback tests.

    ``target-exit-after-images``: the agent process dies at once (as if killed);
    ``target-fail-restore``: the restore fails as if CRIU had failed;
    ``target-drop-committed``: the connection breaks right before Committed is sent;
    ``target-kill-lazy-daemon``: the lazy-pages daemon dies before the memory is in.
    """
    if os.environ.get("PHAUL_FAULT") != name:
        return
    log.warning("fault injected: %s", name)
    if name.startswith("target-exit"):
        os._exit(70)
    raise MigrationAborted(f"fault injected: {name}", phase="restore")


IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
PRE_RESUME_TIMEOUT = 60.0
STEP_TIMEOUT = 120.0


class TargetSession:
    """Drives one migration on the target; created for an authenticated control connection."""

    def __init__(self, agent: Agent, chan: Channel, peer: str) -> None:
        self.agent = agent
        self.chan = chan
        self.peer = peer
        self.machine = PhaseMachine(Phase.HANDSHAKE)
        self.migration_id = ""
        self.ticket = b""
        self.workdir: Path | None = None
        self.images_dir: Path | None = None
        self.addresses: list[tuple[ipaddress.IPv4Interface, str]] = []
        self.fresh_pidns = False
        self.precopy = False
        self.precopy_dir: Path | None = None
        self.lazy = False
        self.lazy_pages = 0
        self.daemon: Any = None
        self.daemon_task: asyncio.Future[Any] | None = None
        self.prepare_task: asyncio.Future[None] | None = None
        self.resumed = False
        self.page_stats: Any = None
        self.page_done: asyncio.Future[Any] | None = None
        self.image_bytes = 0
        self.root_pid = 0
        self.swrk: Any = None
        self.garp: dict[str, Any] = {}
        self.log = logging.LoggerAdapter(log, {"side": "target"})
        self.journal: Journal | None = None
        self.gc_paused = False
        self.source_elsewhere = False  # the source is in another network namespace

    def _resume_gc(self) -> None:
        if self.gc_paused:
            self.gc_paused = False
            gcpause.resume()

    def _journal(self) -> None:
        """Record the phase (and what recovery must undo) before acting on it."""
        self.agent.record(self.migration_id, self.phase, self.root_pid)
        if self.journal is not None:
            start = None
            if self.root_pid:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{self.root_pid}/stat").read_text()
                    start = int(stat.rsplit(")", 1)[1].split()[19])
            self.journal.write(
                phase=self.phase.value,
                addresses=[[str(i), d] for i, d in self.addresses],
                root_pid=self.root_pid,
                root_start=start,
            )

    @property
    def phase(self) -> Phase:
        return self.machine.phase

    # --- driver ---------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with AsyncExitStack() as undo:
                await self._preflight()
                await self._prepare(undo)
                await self._receive_images()
                await self._restore_and_commit(undo)
                undo.pop_all()  # committed: nothing may be undone any more
        except PhaulError as err:
            self._note_failure(err)
            await self.chan.send_error(err, self.phase.value)
        except (ConnectionError, OSError, TimeoutError) as err:
            self._note_failure(err)
            if not isinstance(err, ConnectionError):
                # A local failure (file system, timeout): say so rather than just hang up.
                await self.chan.send_error(PhaulError(f"target: {err}"), self.phase.value)
        finally:
            self._resume_gc()
            self._cleanup_files()
            for sock in self.garp.values():
                sock.close()
            if self.swrk is not None:
                self.swrk.close()
            if self.prepare_task is not None:
                with contextlib.suppress(BaseException):
                    await self.prepare_task
            if self.daemon is None and self.daemon_task is not None:
                with contextlib.suppress(BaseException):
                    self.daemon = await self.daemon_task
            if self.daemon is not None:
                self.daemon.close()
            self.agent.forget(self)
            await self.chan.close()

    def _note_failure(self, err: BaseException) -> None:
        if self.phase not in (Phase.COMMIT, Phase.DONE):
            if self.phase is not Phase.HANDSHAKE:
                self.machine.phase = Phase.ROLLED_BACK  # terminal, recorded for status queries
            self.log.warning("migration %s rolled back in target: %s", self.migration_id, err)
        else:
            self.log.error("migration %s failed after commit: %s", self.migration_id, err)
        self._journal()

    # --- phases ---------------------------------------------------------------------------------
    async def _preflight(self) -> None:
        req = await self.chan.recv(pb.PreflightRequest, STEP_TIMEOUT)
        self.machine.advance(Phase.PREFLIGHT)
        self.migration_id = req.migration_id
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", self.migration_id):
            raise ProtocolError("malformed migration id")
        self.agent.record(self.migration_id, self.phase, 0)
        problems: list[str] = []
        from phaul.engine import netaddr

        local = await asyncio.to_thread(netaddr.local_addresses)
        self.source_elsewhere = _peer_elsewhere(self.chan.writer.get_extra_info("peername"), local)
        for addr in req.addresses:
            try:
                iface = ipaddress.IPv4Interface(addr.cidr)
            except ValueError:
                problems.append(f"bad address {addr.cidr!r}")
                continue
            if any(iface.ip == a.ip for a in local):
                problems.append(f"address {iface.ip} is already configured on the target")
        missing = [f for f in req.files if not Path(f).exists()]
        if missing:
            problems.append(
                "files the tree uses are missing on the target: " + ", ".join(missing[:5])
            )
        free = shutil.disk_usage(self.agent.config.workdir).free
        await self.chan.send(
            pb.PreflightReply(
                problems=problems,
                criu_version=self.agent.criu.version,
                kernel=os.uname().release,
                free_bytes=free,
            )
        )

    async def _prepare(self, undo: AsyncExitStack) -> None:
        from phaul.engine import netaddr
        from phaul.engine.criu_swrk import Swrk
        from phaul.engine.garp import GarpSender

        msg = await self.chan.recv_any(STEP_TIMEOUT)
        if isinstance(msg, pb.Abort):
            raise MigrationAborted("source cancelled after preflight", phase=self.phase.value)
        if not isinstance(msg, pb.Prepare):
            raise ProtocolError(f"expected Prepare, peer sent {msg.DESCRIPTOR.name}")
        self.machine.advance(Phase.DUMP)
        self._journal()
        self.fresh_pidns = msg.fresh_pidns
        self.precopy = msg.precopy
        if msg.restore not in ("", "eager", "lazy"):
            raise ProtocolError(f"unknown restore mode {msg.restore!r}")
        self.lazy = msg.restore == "lazy"
        if self.lazy and not self.precopy:
            raise ProtocolError("a lazy restore needs pre-copy (its pages come from there)")
        self.workdir = self.agent.config.workdir / self.migration_id
        self.workdir.mkdir(parents=True, exist_ok=False)
        self.images_dir = self.workdir / "images"
        self.images_dir.mkdir()
        if self.precopy:
            self.precopy_dir = self.workdir / "precopy"
            self.precopy_dir.mkdir()
        self.journal = Journal(self.workdir)
        self._journal()
        for addr in msg.addresses:
            iface = ipaddress.IPv4Interface(addr.cidr)
            dev: str = addr.dev or self.agent.config.ip_dev or ""
            if not dev:
                dev = await asyncio.to_thread(netaddr.device_for, iface)
            self.addresses.append((iface, dev))
            if dev not in self.garp:
                self.garp[dev] = GarpSender(dev)
        # Spawned now so that its start-up is not part of the freeze.
        self.swrk = await asyncio.to_thread(
            Swrk.spawn, self.agent.criu, fresh_pidns=self.fresh_pidns
        )
        self.ticket = os.urandom(32)
        loop = asyncio.get_running_loop()
        self.page_done = loop.create_future()
        self.agent.register_ticket(self.ticket, self)
        undo.callback(self.agent.unregister_ticket, self.ticket)
        await self.chan.send(pb.PrepareReply(page_ticket=self.ticket, workdir=str(self.workdir)))

    async def attach_page_stream(self, sock: socket.socket, stream: str) -> None:
        """Called by the agent for an authenticated page connection presenting our ticket."""
        from phaul.page_server.store import CriuPageReceiver

        assert self.page_done is not None and self.images_dir is not None
        try:
            expected = "precopy" if self.precopy else "criu"
            if stream != expected:
                raise ProtocolError(f"page stream {stream!r} not expected (want {expected!r})")
            if self.phase is not Phase.DUMP or self.page_done.done():
                raise ProtocolError("page stream not expected now")
            quota = self.agent.config.max_image_bytes or None
            receiver: Any
            if self.precopy:
                from phaul.page_server.precopy_receiver import PrecopyReceiver

                assert self.precopy_dir is not None
                receiver = PrecopyReceiver(self.precopy_dir, max_bytes=quota)
            else:
                receiver = CriuPageReceiver(self.images_dir, max_bytes=quota)
            stats = await asyncio.to_thread(receiver.serve, sock)
            trace.event("tgt page stream served")
            if not self.page_done.done():
                self.page_done.set_result(stats)
        except BaseException as err:
            if not self.page_done.done():
                self.page_done.set_exception(err)
            raise
        finally:
            sock.close()

    async def _receive_images(self) -> None:
        assert self.images_dir is not None and self.page_done is not None
        open_files: dict[str, Any] = {}
        try:
            while True:
                # Pre-copy passes may take long with no control message at all; a dead or
                # silent peer is caught by the idle check (which also sees the page stream).
                wait = None if self.precopy else STEP_TIMEOUT
                msg = await self.chan.recv_any(wait)
                if isinstance(msg, pb.ImageFile):
                    if msg.name in ("inventory.img", "pstree.img"):
                        trace.event(f"tgt image {msg.name}")
                    if not self.gc_paused:
                        # The source is frozen from now on (phaul/gcpause.py).
                        gcpause.pause()
                        self.gc_paused = True
                    self._write_image_chunk(msg, open_files)
                elif isinstance(msg, pb.ImagesDone):
                    break
                elif isinstance(msg, pb.Abort):
                    raise MigrationAborted(f"source aborted: {msg.reason}", phase=self.phase.value)
                else:
                    raise ProtocolError(f"unexpected {msg.DESCRIPTOR.name} while receiving images")
        finally:
            for f in open_files.values():
                f.close()
        if open_files:
            raise ProtocolError("image files left incomplete")
        trace.event("tgt images_done")
        self.page_stats = await asyncio.wait_for(self.page_done, STEP_TIMEOUT)
        trace.event("tgt pages_done")
        if self.precopy and not self.lazy:
            # The final dump's page maps name the pre-copy images as their parent.
            (self.images_dir / "parent").symlink_to("../precopy")
        if self.lazy:
            if self.prepare_task is not None:
                await self.prepare_task
            else:
                await asyncio.to_thread(self._prepare_lazy)
            if self.daemon_task is not None:
                self.daemon = await self.daemon_task
            else:
                self.daemon = await asyncio.to_thread(self._start_daemon)
        trace.event("tgt prepared")
        fault("target-exit-after-images")

    def _write_image_chunk(self, msg: pb.ImageFile, open_files: dict[str, Any]) -> None:
        assert self.images_dir is not None
        # Without pre-copy, pages come only through the page store (CRIU's page stream).
        page_image = msg.name.startswith(("pages-", "pagemap-"))
        if not IMAGE_NAME.match(msg.name) or (page_image and not self.precopy):
            raise ProtocolError(f"refusing image file name {msg.name!r}")
        self.image_bytes += len(msg.data)
        limit = self.agent.config.max_image_bytes
        if limit and self.image_bytes > limit:
            raise ProtocolError("image quota exceeded")
        f = open_files.get(msg.name)
        if f is None:
            self._maybe_prepare_lazy_early(msg.name)
            path = self.images_dir / msg.name
            if path.exists():
                raise ProtocolError(f"image file {msg.name} sent twice")
            f = open_files[msg.name] = open(path, "xb")  # noqa: SIM115 (closed below / finally)
        f.write(msg.data)
        if msg.last:
            f.close()
            del open_files[msg.name]
            self._maybe_prestart_daemon()

    async def _restore_and_commit(self, undo: AsyncExitStack) -> None:
        from phaul.engine import netaddr
        from phaul.engine.criu_swrk import RestoreOptions
        from phaul.page_server.criu_image import set_network_lock

        assert self.images_dir is not None
        req = await self.chan.recv_any(STEP_TIMEOUT)
        if isinstance(req, pb.Abort):
            raise MigrationAborted(f"source aborted: {req.reason}", phase=self.phase.value)
        if not isinstance(req, pb.Restore):
            raise ProtocolError(f"expected Restore, peer sent {req.DESCRIPTOR.name}")
        trace.event("tgt restore_req")
        self.machine.advance(Phase.RESTORE)
        self._journal()
        trace.event("tgt journaled")
        fault("target-fail-restore")
        # The addresses must be here before CRIU restores sockets bound to them.
        for iface, dev in self.addresses:
            await asyncio.to_thread(netaddr.add_address, iface, dev)
            undo.push_async_callback(asyncio.to_thread, self._withdraw_address, iface, dev)

        loop = asyncio.get_running_loop()
        decided = threading.Event()
        t0 = time.monotonic()
        timings: dict[str, float] = {}

        def on_notify(name: str, notify: Any) -> bool:
            if name == "post-restore":
                # In a fresh pid namespace CRIU names the root by its inner PID; killing the
                # namespace's init (what the journal needs) kills the whole tree.
                inner = int(getattr(notify, "pid", 0) or 0)
                self.root_pid = self.swrk.init_pid or inner or self.root_pid
                self._journal()
            if name != "pre-resume":
                return True
            timings["pre_resume"] = time.monotonic()
            trace.event("tgt pre_resume")
            if (
                self.daemon is not None
                and os.environ.get("PHAUL_FAULT") == "target-kill-lazy-daemon"
            ):
                self.log.warning("fault injected: target-kill-lazy-daemon")
                self.daemon.kill()  # before a single page was served
            fut = asyncio.run_coroutine_threadsafe(self._at_pre_resume(timings), loop)
            try:
                ok = fut.result(PRE_RESUME_TIMEOUT + 5)
            except BaseException:
                self.log.exception("pre-resume decision failed")
                ok = False
            decided.set()
            return ok

        if self._restore_lock() == "skip":
            set_network_lock(self.images_dir / "inventory.img", "skip")
        opts = RestoreOptions(images_dir=self.images_dir, lazy_pages=self.lazy)
        try:
            trace.event("tgt criu_restore")
            result = await asyncio.to_thread(self.swrk.restore, opts, on_notify, STEP_TIMEOUT)
            trace.event("tgt criu_restored")
        except PhaulError:
            if self.phase is Phase.COMMIT:
                # Committed but CRIU failed while resuming: nothing to roll back to any more.
                self.log.error("restore failed after commit")
            raise
        if self.phase is not Phase.COMMIT and not self.resumed:
            raise MigrationAborted("restore finished without a commit", phase=self.phase.value)
        self.root_pid = result.pid
        self._resume_gc()  # the tree runs
        self.agent.adopt(result.child_pid)
        resume_ms = int((time.monotonic() - timings.get("commit", t0)) * 1000)
        fill_ms = 0
        if self.lazy:
            fill_ms = await self._wait_lazy_fill(result)
            self.machine.advance(Phase.COMMIT)
        self.machine.advance(Phase.DONE)
        self._journal()
        undo.pop_all()
        if os.environ.get("PHAUL_FAULT") == "target-drop-committed":
            # Fault point: the confirmation is lost; the source must ask, not guess.
            self.log.warning("fault injected: target-drop-committed")
            self.chan.writer.transport.abort()
        with contextlib.suppress(ConnectionError, OSError):
            await self.chan.send(
                pb.Committed(
                    root_pid=result.pid,
                    resume_ms=resume_ms,
                    criu_stats=result.stats,
                    fill_ms=fill_ms,
                )
            )
        self.log.info(
            "migration %s done: tree runs as PID %d (restore %.0f ms)",
            self.migration_id,
            result.pid,
            (time.monotonic() - t0) * 1000,
        )

    def _restore_lock(self) -> str:
        """CRIU's network lock on restore. For a tree in the host's network namespace CRIU
        locks nothing on restore, but at the end deletes the nftables table the DUMP created
        (named after the dump's run id): here, on another host, that table does not exist and
        the attempt costs ~15 ms of libnftables inside the freeze. ``skip`` leaves that out
        (CRIU reads the method from the dump's inventory, so it is set there);
        a tree with its own network namespace (``netns-*.img``), or a source in this very
        namespace (the table is here and must go at resume), keeps ``nftables``."""
        assert self.images_dir is not None
        if self.source_elsewhere and not any(self.images_dir.glob("netns-*.img")):
            return "skip"
        return "nftables"

    async def _at_pre_resume(self, timings: dict[str, float]) -> bool:
        """The tree is restored and has not run: ask the source, then resume or not."""
        await self.chan.send(
            pb.Restored(
                root_pid=self.root_pid,
                restore_ms=0,
                page_bytes=getattr(self.page_stats, "bytes", 0),
            )
        )
        try:
            msg = await self.chan.recv_any(PRE_RESUME_TIMEOUT)
        except (PhaulError, ConnectionError, OSError, TimeoutError) as err:
            self.log.warning("no commit from the source (%s): rolling back", err)
            await asyncio.to_thread(self._withdraw_all)
            return False
        if not isinstance(msg, pb.Commit):
            self.log.warning("source sent %s instead of Commit: rolling back", msg.DESCRIPTOR.name)
            await asyncio.to_thread(self._withdraw_all)
            return False
        timings["commit"] = time.monotonic()
        trace.event("tgt commit")
        if self.lazy:
            # The tree runs before its memory is in: the migration commits only when the
            # lazy-pages daemon has finished; until then a failure still rolls back.
            self.resumed = True
        else:
            self.machine.advance(Phase.COMMIT)
        self._journal()
        for iface, dev in self.addresses:
            self.garp[dev].send(iface.ip)
        return True

    def _prepare_lazy(self) -> None:
        """Split recipe: R = our images re-flagged, D = the daemon's view of the pre-copy
        images; the invariant between them is checked in build_daemon_dir. The daemon's work
        dir is R itself (restore and daemon must share it; a fresh pid namespace restore cannot
        take a separate work dir over RPC)."""
        from phaul.page_server.lazy_split import build_daemon_dir

        assert self.images_dir is not None and self.precopy_dir and self.workdir
        # The source wrote our images as the restore dir R already (rewrite_final
        # for_lazy_restore): clean pages PE_LAZY without data, dirty ones PE_PRESENT.
        trace.event("tgt split_start")
        stats = build_daemon_dir(self.images_dir, self.precopy_dir, self.workdir / "daemon")
        self.lazy_pages = stats.lazy_pages
        trace.event("tgt split_done")

    def _maybe_prepare_lazy_early(self, name: str) -> None:
        """The source sends inventory and pstree, then every ``mm-*`` and ``pagemap-*``, then
        the rest (source.migrate.image_rank): once another file starts, all page maps are
        here; split them while the rest still arrives."""
        if not self.lazy or self.prepare_task is not None:
            return
        if name not in ("inventory.img", "pstree.img") and not name.startswith(("mm-", "pagemap-")):
            self.prepare_task = asyncio.ensure_future(self._prepare_lazy_after_pages())

    async def _prepare_lazy_after_pages(self) -> None:
        """The split reads the flat pre-copy images: only once their stream has ended (the
        source's final pass runs during its dump and ends the stream before the images come,
        so this rarely waits)."""
        assert self.page_done is not None
        await asyncio.wait_for(asyncio.shield(self.page_done), STEP_TIMEOUT)
        await asyncio.to_thread(self._prepare_lazy)

    def _maybe_prestart_daemon(self) -> None:
        """The daemon reads only inventory.img and pstree.img at start (the rest when the
        restore connects): start it as soon as those two are here (the source sends them
        first), while the other images and the split are still being done."""
        if not self.lazy or self.daemon_task is not None or self.images_dir is None:
            return
        if all((self.images_dir / n).exists() for n in ("inventory.img", "pstree.img")):
            self.daemon_task = asyncio.ensure_future(asyncio.to_thread(self._start_daemon))

    def _start_daemon(self) -> Any:
        from phaul.engine.lazy_restore import DaemonOptions, LazyPagesDaemon
        from phaul.page_server.lazy_split import relink

        trace.event("tgt daemon thread")
        assert self.images_dir is not None and self.workdir is not None
        daemon_dir = self.workdir / "daemon"
        daemon_dir.mkdir(exist_ok=True)
        for name in ("inventory.img", "pstree.img"):
            relink(self.images_dir / name, daemon_dir / name)
        trace.event("tgt daemon_start")
        return LazyPagesDaemon.start(
            self.agent.criu, DaemonOptions(daemon_dir=daemon_dir, work_dir=self.images_dir)
        )

    async def _wait_lazy_fill(self, result: Any) -> int:
        """The tree runs; wait until the daemon has copied every page (exit 0)."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.chan.send(pb.Resumed(root_pid=result.pid, lazy_pages=self.lazy_pages))
        t0 = time.monotonic()
        outcome = await asyncio.to_thread(self.daemon.wait, STEP_TIMEOUT, 5.0)
        if outcome.complete:
            return int((time.monotonic() - t0) * 1000)
        # Its memory will never be complete: the copy must go, the source resumes.
        await asyncio.to_thread(self._withdraw_all)
        victim = result.init_pid or result.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        raise MigrationAborted(
            f"the lazy-pages daemon failed ({outcome.reason}); the restored copy was killed",
            phase=Phase.RESTORE.value,
            log_path=str(outcome.log_path),
        )

    # --- undo -----------------------------------------------------------------------------------
    def _withdraw_address(self, iface: ipaddress.IPv4Interface, dev: str) -> None:
        from phaul.engine import netaddr

        try:
            netaddr.remove_address(iface, dev)
        except Exception:
            self.log.exception("could not remove %s from %s", iface, dev)

    def _withdraw_all(self) -> None:
        for iface, dev in self.addresses:
            self._withdraw_address(iface, dev)

    def _cleanup_files(self) -> None:
        if self.images_dir is not None and self.workdir is not None:
            # CRIU writes its logs into the images dir: keep them, drop the (large) images.
            for logfile in self.images_dir.glob("*.log"):
                with contextlib.suppress(OSError):
                    logfile.rename(self.workdir / logfile.name)
            shutil.rmtree(self.images_dir, ignore_errors=True)
        if self.precopy_dir is not None:
            shutil.rmtree(self.precopy_dir, ignore_errors=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir / "daemon", ignore_errors=True)
