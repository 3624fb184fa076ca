"""``phaul migrate``: the migration as seen from the source.

Sequence (stop-and-copy; the hinge is CRIU's ``post-dump`` notify):
1. validate the PID, find CRIU, learn the tree and the addresses to move;
2. connect and authenticate, preflight on the target (a failure changes nothing);
3. Prepare: the target makes a work dir and gives us a ticket for the page connection;
4. CRIU dumps the tree (frozen, network locked); its page stream goes through a socketpair that
   we relay onto the authenticated page connection into the target's page store;
5. at ``post-dump`` (tree still frozen): send the small image files, ask for Restore, wait until
   the target holds the restored tree at pre-resume (``Restored``), say ``Commit``, wait for
   ``Committed``, and only then answer CRIU "success" (CRIU kills the source tree). Any failure
   before Commit answers "failure": CRIU unlocks the network and the tree resumes, unchanged.
6. after commit: the addresses leave the source, CRIU's network-lock table is removed.
A lost ``Committed`` is not guessed: we ask the agent on a new connection (StatusQuery).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phaul import trace
from phaul.engine import proctree
from phaul.engine.criu_locate import CriuBinary, find_criu
from phaul.errors import (
    CommitUncertain,
    ConnectError,
    MigrationAborted,
    PhaulError,
    PreflightFailed,
    ProcessGone,
    ProtocolError,
    UsageError,
)
from phaul.pb import phaul_pb2 as pb
from phaul.phase import Phase, PhaseMachine
from phaul.protocol.auth import client_handshake, load_token
from phaul.protocol.framing import IMAGE_CHUNK, Channel
from phaul.source.convergence import Convergence, ConvergencePolicy
from phaul.source.pagerelay import PageRelay
from phaul.source.report import Report
from phaul.transport import Dialer, TcpDialer
from phaul.transport.bridge import Bridge, page_socket
from phaul.transport.tcp import parse_hostport

log = logging.getLogger(__name__)

COMMIT_ACK_TIMEOUT = 30.0
STATUS_RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class MigrateConfig:
    pid: int
    target: str  # as the operator wrote it, for the report
    token: bytes
    workdir: Path
    move_ips: tuple[ipaddress.IPv4Interface, ...] = ()
    auto_ips: bool = True
    timeout: float = 120.0
    criu_path: str | None = None
    precopy: str = "auto"  # "auto" | "on" | "off"
    tracker: str = "auto"
    policy: ConvergencePolicy = field(default_factory=ConvergencePolicy)
    compress: str = "none"
    restore: str = "auto"  # "auto" | "eager" | "lazy"
    final_dump: str = "auto"  # "auto" (tracked when possible) | "lazy"
    fault: str = field(default_factory=lambda: os.environ.get("PHAUL_FAULT", ""))


PRECOPY_AUTO_BYTES = 16 << 20
# Below this, CRIU's eager restore of all memory costs less than starting the lazy-pages
# daemon and splitting the images (reference/local-lazy-restore.md: ~0.2 s per 256 MiB).
LAZY_AUTO_BYTES = 256 << 20


def anon_bytes(pids: list[int]) -> int:
    """Private anonymous memory of the processes (what pre-copy and CRIU's page dump move)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Anonymous:"):
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class DumpRoot:
    pid: int  # what CRIU dumps
    own_pidns: bool  # the root is the init of its own pid namespace
    pids: list[int]


def find_dump_root(pid: int) -> DumpRoot:
    """The process CRIU must dump for ``pid``: itself, or the init of its pid namespace."""
    from phaul.engine import nsutil

    proctree.validate_migratable(pid)
    if proctree.is_pidns_init(pid):
        root, own = pid, True
    else:
        init = nsutil.pidns_init_of(pid)
        if init is not None:
            # Inside a pid namespace (e.g. one phaul restored earlier): the namespace moves whole.
            root, own = init, True
        else:
            root, own = pid, False
    pids = [ref.pid for ref in proctree.tree(root)]
    return DumpRoot(root, own, pids)


class SourceMigration:
    def __init__(
        self, cfg: MigrateConfig, criu: CriuBinary, dialer: Dialer, emit: Any = None
    ) -> None:
        self.cfg = cfg
        self.criu = criu
        self.dialer = dialer
        self.id = uuid.uuid4().hex[:12]
        self.machine = PhaseMachine(Phase.HANDSHAKE)
        self.report = Report(self.id, cfg.pid, cfg.target)
        self.emit = emit or (lambda event, **kw: None)
        self.chan: Channel | None = None
        self.addresses: list[ipaddress.IPv4Interface] = []
        self.images_dir = cfg.workdir / self.id / "images"
        self.committed = False
        self.commit_sent = False
        self.post_dump_error: BaseException | None = None
        self.relay: PageRelay | None = None
        self.bridge: Bridge | None = None
        self.precopy: Any = None
        self.page_sender: Any = None  # the pre-copy stream, open until the final pass is sent
        self.page_sock: socket.socket | None = None
        self.final_pass: concurrent.futures.Future[Any] | None = None

    def _phase(self, to: Phase) -> None:
        self.machine.advance(to)
        self.report.phase_reached = to.value
        self.report.mark(to.value)
        self.emit("phase", phase=to.value)
        log.info("migration %s: %s", self.id, to.value)

    async def run(self) -> Report:
        try:
            await self._run()
            self.report.outcome = "migrated"
        except PhaulError as err:
            self.report.outcome = "migrated" if self.committed else "rolled-back"
            self.report.error = str(err)
            raise
        finally:
            self.report.finish()
            if self.chan is not None:
                await self.chan.close()
            if self.relay is not None:
                self.relay.close()
            if self.bridge is not None:
                await self.bridge.close()
            if self.precopy is not None:
                await asyncio.to_thread(self.precopy.stop)
            await self.dialer.close()
        return self.report

    async def _run(self) -> None:
        cfg = self.cfg
        root = find_dump_root(cfg.pid)
        self.report.mark("start")
        self.addresses = list(cfg.move_ips)
        if not self.addresses and cfg.auto_ips:
            from phaul.engine import netaddr

            self.addresses = await asyncio.to_thread(netaddr.movable_addresses, root.pids)
        self.report.addresses = [str(a) for a in self.addresses]

        reader, writer = await self.dialer.open()
        self.chan = Channel(reader, writer, on_log=self._target_log)
        await client_handshake(self.chan, cfg.token)
        self._phase(Phase.PREFLIGHT)
        await self.chan.send(
            pb.PreflightRequest(
                migration_id=self.id,
                criu_version=self.criu.version,
                kernel=os.uname().release,
                arch=os.uname().machine,
                addresses=[pb.Address(cidr=str(a)) for a in self.addresses],
                own_pidns=root.own_pidns,
                pids=root.pids,
            )
        )
        reply = await self.chan.recv(pb.PreflightReply, 60)
        if reply.problems:
            await self.chan.send(pb.Abort(reason="preflight failed"))
            raise PreflightFailed("target refused: " + "; ".join(reply.problems))

        anon = anon_bytes(root.pids)
        use_precopy = cfg.precopy == "on" or (cfg.precopy == "auto" and anon >= PRECOPY_AUTO_BYTES)
        self.report.precopy = use_precopy
        if cfg.restore == "lazy" and not use_precopy:
            raise UsageError("--restore lazy needs pre-copy (--precopy on or auto)")
        lazy_restore = use_precopy and (
            cfg.restore == "lazy" or (cfg.restore == "auto" and anon >= LAZY_AUTO_BYTES)
        )
        self.report.restore = "lazy" if lazy_restore else "eager"
        await self.chan.send(
            pb.Prepare(
                migration_id=self.id,
                addresses=[pb.Address(cidr=str(a)) for a in self.addresses],
                fresh_pidns=not root.own_pidns,
                tcp_established=True,
                precopy=use_precopy,
                restore=self.report.restore,
            )
        )
        prep = await self.chan.recv(pb.PrepareReply, 60)
        self.images_dir.mkdir(parents=True)
        if use_precopy:
            from phaul.engine.lazy_dump import check_fd_budget

            if not self._tracked_expected(root):
                check_fd_budget(root.pids)  # a lazy dump's pipes: refused before pre-copy
            self._phase(Phase.PRECOPY)
            sock = await self._page_connection(prep.page_ticket, "precopy")
            self.page_sock = sock
            try:
                await self._precopy(root, sock, anon)
                self._phase(Phase.DUMP)
                await self._dump(root, lazy=True)
            finally:
                await self._close_page_stream()
        else:
            self._phase(Phase.DUMP)
            sock = await self._page_connection(prep.page_ticket, "criu")
            self.relay = PageRelay(sock)
            self.relay.start()
            await self._dump(root, lazy=False)

    async def _page_connection(self, ticket: bytes, stream: str) -> socket.socket:
        reader, writer = await self.dialer.open()
        await client_handshake(
            Channel(reader, writer), self.cfg.token, role="pages", ticket=ticket, stream=stream
        )
        sock, self.bridge = await page_socket(reader, writer)
        return sock

    async def _precopy(self, root: DumpRoot, sock: socket.socket, anon: int) -> None:
        from phaul.source.page_sender import PageSender
        from phaul.source.precopy import Precopy, tree_vpids

        cfg = self.cfg
        sender = PageSender(sock, codec=cfg.compress)
        gib = anon / (1 << 30)
        # Freeze costs that do not shrink with pre-copy, as measured here (docs/measurements.md):
        # CRIU dumping the tree's state, the hand-off and CRIU's restore (~100 ms for a small
        # tree; the tracked final dump pins no memory, a lazy one ~80 ms/GiB), plus, for an
        # eager restore, faulting in all memory on the target (~750 ms/GiB on this VM).
        lazy = self.report.restore == "lazy"
        fixed_ms = 100.0 + 20.0 * gib if lazy else 150.0 + 750.0 * gib
        procs = tree_vpids(root.pid, root.pids)
        pre = Precopy(
            procs,
            tracker=cfg.tracker,
            sender=sender,
            convergence=Convergence(cfg.policy, fixed_ms=fixed_ms),
            emit=self.emit,
        )
        self.precopy = pre
        self.page_sender = sender
        await asyncio.to_thread(pre.start)
        self.report.tracker = pre.tracker_name
        # The stream stays open: the final pass runs on it while CRIU dumps the frozen tree.
        result = await asyncio.to_thread(pre.run)
        self.report.passes = [asdict(p) for p in result.passes]
        self.report.precopy_reason = result.reason
        self.report.page_bytes += result.bytes_wire
        self.report.predicted_downtime_ms = round(result.passes[-1].predicted_ms, 1)
        self.report.mark("precopy_done")

    async def _dump(self, root: DumpRoot, *, lazy: bool) -> None:
        """The final dump with the garbage collector paused (phaul/gcpause.py) and what the
        freeze needs imported beforehand (a first import costs milliseconds)."""
        import gc

        from phaul import gcpause
        from phaul.engine import vmread  # noqa: F401
        from phaul.page_server import final_rewrite  # noqa: F401

        gc.collect()
        gcpause.pause()
        try:
            await self._final_dump(root, lazy=lazy)
        finally:
            gcpause.resume()
            # The tracked dump's private kdat copy and synthesized parent (tracked_dump.py).
            with contextlib.suppress(OSError):
                (self.images_dir.parent / "criu.kdat").unlink(missing_ok=True)
            shutil.rmtree(self.images_dir.parent / "tracked-parent", ignore_errors=True)

    async def _final_dump(self, root: DumpRoot, *, lazy: bool) -> None:
        """CRIU's final dump; the hand-off happens inside its post-dump notify.

        ``lazy`` (after pre-copy): CRIU dumps page maps without page data and keeps the tree
        frozen; at post-dump we rewrite them against the pre-copy images (only pages written
        since the last pass are read, from the frozen tree). CRIU then starts a page server for
        the lazy pages and says so on the status fd; we end it with connect+close, after which
        CRIU applies the post-dump decision (kill the source, or resume it). Never end a lazy
        dump by killing criu: the tree would resume after a target restore.
        Otherwise CRIU's page stream goes through the relay during the freeze.
        """
        from phaul.engine.criu_swrk import DumpOptions, Swrk

        loop = asyncio.get_running_loop()
        tracked = await asyncio.to_thread(self._prepare_tracked, root) if lazy else None
        if tracked is not None:
            # No page is pinned: CRIU writes PE_PARENT holes, the final pass sends the rest.
            swrk = await asyncio.to_thread(Swrk.spawn, self.criu, extra_env=tracked.env)
            opts = DumpOptions(
                pid=root.pid,
                images_dir=self.images_dir,
                tcp_established=True,
                network_lock="nftables",
                track_mem=True,
                parent_img=tracked.parent_img,
            )
            post_dump = self._at_post_dump_lazy
        elif lazy:
            from phaul.engine import lazy_dump

            lazy_dump.check_fd_budget(root.pids)  # still before the freeze
            swrk = await asyncio.to_thread(lazy_dump.spawn_lazy_swrk, self.criu)
            opts = lazy_dump.lazy_dump_options(
                DumpOptions(
                    pid=root.pid,
                    images_dir=self.images_dir,
                    tcp_established=True,
                    network_lock="nftables",
                ),
                port=lazy_dump.free_port(),
            )
            post_dump = self._at_post_dump_lazy
        else:
            assert self.relay is not None
            criu_fd = self.relay.criu_end.fileno()
            swrk = await asyncio.to_thread(Swrk.spawn, self.criu, pass_fds=(criu_fd,))
            # criu holds its own copy under the same number; ours must go, or CRIU closing the
            # page stream would never reach the relay as end-of-file.
            self.relay.release_criu_end()
            opts = DumpOptions(
                pid=root.pid,
                images_dir=self.images_dir,
                tcp_established=True,
                network_lock="nftables",
                page_server_fd=criu_fd,
            )
            post_dump = self._at_post_dump

        def decide() -> bool:
            """At post-dump (tree frozen, images complete): True commits, False rolls back."""
            self.report.mark("dumped")
            fut = asyncio.run_coroutine_threadsafe(post_dump(), loop)
            try:
                return fut.result()
            except BaseException as err:  # noqa: BLE001 - any failure here means roll back
                self.post_dump_error = err
                return False

        def on_notify(name: str, _notify: Any) -> bool:
            if name == "pre-dump":
                self.report.mark("freeze")
                self.emit("freeze")
                return True
            if name == "post-dump":
                return decide()
            if name == "query-ext-files":
                # CRIU's first notify after the tree is frozen (before its files are collected):
                # the self-migration service closes the requester's socket here.
                self.report.mark("frozen")
                self.emit("frozen")
                if lazy:
                    self._start_final_pass()
            return True

        def run_dump() -> Any:
            if not lazy or tracked is not None:
                return swrk.dump(opts, on_notify)
            # Ends CRIU's lazy page-server session at status-ready (connect+close), whatever
            # the decision; kills the source itself if CRIU fails after a commit.
            tree = proctree.tree(root.pid)
            return lazy_dump.run_lazy_final_dump(
                swrk,
                opts,
                address=lazy_dump.LOOPBACK,
                decide=decide,
                tree=tree,
                on_notify=on_notify,
                timeout=self.cfg.timeout,
            ).dump

        dump_log = str(self.images_dir.parent / "dump.log")
        self.report.logs["dump"] = dump_log
        try:
            result = await asyncio.to_thread(run_dump)
        except CommitUncertain:
            swrk.close()
            self._keep_log()
            raise
        except PhaulError as err:
            swrk.close()
            self._keep_log()
            await self._after_rollback()
            if self.post_dump_error is not None:
                cause = self.post_dump_error
                if isinstance(cause, PhaulError):
                    raise MigrationAborted(
                        cause.message, phase=self.machine.phase.value, log_path=cause.log_path
                    ) from cause
                raise MigrationAborted(str(cause), phase=self.machine.phase.value) from cause
            if self.committed:
                raise
            raise MigrationAborted(
                f"CRIU dump failed: {err.message}", phase="dump", log_path=dump_log
            ) from err
        swrk.close()
        self._keep_log()
        # A lazy dump's stats-dump is garbage (CRIU re-inits its stats for the page server,
        # reference/lazy-final-dump.md): report only a stop-and-copy dump's.
        if not lazy:
            self.report.criu_dump_stats = dict(getattr(result, "stats", {}) or {})
        await self._after_commit()

    def _tracked_expected(self, root: DumpRoot) -> bool:
        """Will the final dump be a tracked one (no pipes, no fd budget)? Checked again,
        fully, at the dump (_prepare_tracked)."""
        from phaul.engine import tracked_dump

        if self.cfg.final_dump != "auto" or not tracked_dump.SHIM.is_file():
            return False
        try:
            tracked_dump.check_tree(root.pids)
        except tracked_dump.TrackedDumpUnavailable:
            return False
        return True

    def _prepare_tracked(self, root: DumpRoot) -> Any:
        """The tracked final dump (phaul/engine/tracked_dump.py) if it can be used, else None
        (the lazy dump is used; the reason is logged)."""
        from phaul.engine import tracked_dump

        self.report.final_dump = "lazy"
        if self.cfg.final_dump != "auto" or self.precopy is None:
            return None
        pre = self.precopy
        try:
            tracked = tracked_dump.prepare(
                self.criu,
                self.images_dir.parent,
                vpids=[p.vpid for p in pre.procs],
                pids=root.pids,
            )
        except tracked_dump.TrackedDumpUnavailable as err:
            log.info("final dump: lazy (tracked dump unavailable: %s)", err.message)
            return None
        self.report.final_dump = "tracked"
        return tracked

    def _start_final_pass(self) -> None:
        """The tree is frozen: collect its last writes and send them on the pre-copy stream
        in a thread, while CRIU goes on dumping (~40 ms of its own work plus ~80 ms/GiB of page
        pinning). By post-dump the target's flat images then hold every tracked page."""
        if self.final_pass is not None or self.precopy is None:
            return
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.final_pass = fut

        def work() -> None:
            try:
                trace.event("src final pass start")
                result = self.precopy.final_pass()
                self.report.mark("final_pass_done")
                self._end_page_stream()
                fut.set_result(result)
            except BaseException as err:  # noqa: BLE001 - handed to post-dump
                fut.set_exception(err)

        threading.Thread(target=work, name="phaul-final-pass", daemon=True).start()

    def _end_page_stream(self) -> None:
        """End of the pre-copy stream: the target commits its flat images (EOF)."""
        if self.page_sender is not None:
            self.page_sender.close()
        if self.page_sock is not None:
            with contextlib.suppress(OSError):
                self.page_sock.shutdown(socket.SHUT_WR)

    async def _close_page_stream(self) -> None:
        sock, self.page_sock = self.page_sock, None
        if sock is None:
            return
        fut = self.final_pass
        if fut is not None and not fut.done():
            # A failure before post-dump: unblock the final pass (waiting for an ACK) first.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        if self.page_sender is not None:
            self.page_sender.close()
        sock.close()

    def _keep_log(self) -> None:
        src = self.images_dir / "dump.log"
        with contextlib.suppress(OSError):
            src.rename(self.images_dir.parent / "dump.log")

    async def _at_post_dump_lazy(self) -> bool:
        """Frozen after a lazy dump: rewrite its page maps against the pre-copy images."""
        from phaul.engine.vmread import VmReader
        from phaul.page_server.final_rewrite import rewrite_final

        pre = self.precopy
        assert pre is not None
        try:
            # Normally started at CRIU's first notify after the freeze; if CRIU did not send
            # that one, now (the tree is frozen all the same).
            self._start_final_pass()
            assert self.final_pass is not None
            clean, sent = await asyncio.wrap_future(self.final_pass)
            self.report.mark("collected")
            pids = pre.pids_by_vpid()

            def read_pages(vpid: int, ranges: list[tuple[int, int]]) -> Any:
                pid = pids.get(vpid)
                if pid is None:  # a process born during pre-copy: not tracked, read it all
                    pid = self._host_pid(vpid)
                yield from VmReader(pid, 4 << 20).read(ranges)

            # The parent (the pre-copy images) lives on the target, where the session puts the
            # same link; the coverage check is done there (ours is a dangling link, not sent).
            # For a lazy restore the target's daemon serves the clean pages instead.
            lazy_restore = self.report.restore == "lazy"
            tracked = self.report.final_dump == "tracked"
            if tracked and lazy_restore:
                clean = await asyncio.to_thread(self._lazy_ok, clean, pids)
            stats = await asyncio.to_thread(
                rewrite_final,
                self.images_dir,
                clean=clean,
                read_pages=read_pages,
                parent_link=None if lazy_restore else "../precopy",
                require_parent=False,
                for_lazy_restore=lazy_restore,
                parent_runs=tracked,
            )
            self.report.final_pages = int(stats.read_pages) + int(sent)
            self.report.mark("pages_sent")
        except BaseException as err:
            with contextlib.suppress(Exception):
                assert self.chan is not None
                await self.chan.send(pb.Abort(reason=str(err)[:200]))
            raise
        return await self._handoff()

    @staticmethod
    def _lazy_ok(
        clean: dict[int, list[tuple[int, int]]], pids: dict[int, int]
    ) -> dict[int, list[tuple[int, int]]]:
        """A tracked dump does not say which pages CRIU could leave lazy: only clean pages in
        private anonymous memory, not under a thread's stack pointer (read now, frozen)."""
        from phaul.engine.tracked_dump import lazy_ok_ranges
        from phaul.source.precopy import intersect

        out: dict[int, list[tuple[int, int]]] = {}
        for vpid, ranges in clean.items():
            pid = pids.get(vpid)
            try:
                ok = lazy_ok_ranges(pid) if pid is not None else []
            except OSError:
                ok = []
            out[vpid] = intersect(list(ranges), ok)
        return out

    def _host_pid(self, vpid: int) -> int:
        pre = self.precopy
        root = pre.procs[0].pid if pre and pre.procs else self.cfg.pid
        from phaul.engine import nsutil

        host = nsutil.host_pid_in(root, vpid)
        if host is None:
            raise ProcessGone(f"process {vpid} of the tree not found")
        return host

    async def _at_post_dump(self) -> bool:
        """Tree frozen and dumped through the relay: wait for the page stream, then hand off."""
        assert self.chan is not None and self.relay is not None
        try:
            done = await asyncio.to_thread(self.relay.wait, self.cfg.timeout)
            if not done or self.relay.error is not None:
                raise ConnectError(f"page stream to the target failed: {self.relay.error}")
            self.report.page_bytes = self.relay.bytes_out
            self.report.mark("pages_sent")
        except BaseException as err:
            with contextlib.suppress(Exception):
                await self.chan.send(pb.Abort(reason=str(err)[:200]))
            raise
        return await self._handoff()

    async def _handoff(self) -> bool:
        """Images to the target, restore there up to pre-resume, commit; True = committed."""
        assert self.chan is not None
        try:
            if self.cfg.fault == "post-dump":
                raise MigrationAborted("fault injected at post-dump", phase="dump")
            await self._send_images()
            self.report.mark("images_sent")
            self._phase(Phase.RESTORE)
            await self.chan.send(pb.Restore(network_lock="nftables"))
            restored = await self.chan.recv(pb.Restored, self.cfg.timeout)
            self.report.mark("restored")
            self.report.target_pid = restored.root_pid
            if self.cfg.fault == "before-commit":
                raise MigrationAborted("fault injected before commit", phase="restore")
        except BaseException as err:
            with contextlib.suppress(Exception):
                await self.chan.send(pb.Abort(reason=str(err)[:200]))
            raise
        self._phase(Phase.COMMIT)
        self.commit_sent = True
        await self.chan.send(pb.Commit())
        try:
            msg = await self.chan.recv_any(COMMIT_ACK_TIMEOUT)
            if isinstance(msg, pb.Resumed):
                # Lazy restore: the tree runs on the target while its memory fills in. We stay
                # frozen (and able to resume) until the target says all memory is in.
                self.report.mark("running")
                self.report.lazy_pages = msg.lazy_pages
                self.emit("resumed", lazy_pages=msg.lazy_pages)
                msg = await self.chan.recv_any(self.cfg.timeout)
            if not isinstance(msg, pb.Committed):
                raise ProtocolError(f"expected Committed, target sent {msg.DESCRIPTOR.name}")
            done_msg = msg
        except PhaulError as err:
            if self.report.restore == "lazy" and err.code != ProtocolError.code:
                # The target failed to complete the lazy restore and killed its copy.
                log.warning("target could not complete the lazy restore: %s", err)
                self.post_dump_error = err
                return False
            log.warning("no Committed from the target (%s): asking it directly", err)
            return await self._resolve_commit()
        except (ConnectionError, OSError, TimeoutError) as err:
            log.warning("no Committed from the target (%s): asking it directly", err)
            return await self._resolve_commit()
        if self.report.at("running") is None:
            self.report.mark("running")
        self.report.fill_ms = done_msg.fill_ms
        self.report.mark("complete")
        self.report.target_pid = done_msg.root_pid
        self.report.criu_restore_stats = dict(done_msg.criu_stats)
        self.committed = True
        return True

    async def _resolve_commit(self) -> bool:
        """Commit was sent but not acknowledged: ask the agent what became of the migration."""
        deadline = time.monotonic() + STATUS_RETRY_SECONDS
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(self.dialer.open(), 10)
                chan = Channel(reader, writer)
                await client_handshake(chan, self.cfg.token, role="status")
                await chan.send(pb.StatusQuery(migration_id=self.id))
                status = await chan.recv(pb.Status, 10)
                await chan.close()
            except (PhaulError, OSError, TimeoutError) as err:
                log.warning("status query failed (%s), retrying", err)
                await asyncio.sleep(1)
                continue
            if status.phase in (Phase.DONE.value, Phase.COMMIT.value):
                if self.report.at("running") is None:
                    self.report.mark("running")
                self.report.target_pid = status.root_pid
                self.committed = True
                return True
            if status.phase == Phase.RESTORE.value:
                # Still restoring (e.g. a lazy restore filling memory): not decided yet.
                await asyncio.sleep(0.5)
                continue
            return False
        self.post_dump_error = CommitUncertain(
            "the target did not confirm the commit and cannot be reached: the tree resumes here; "
            "check the target for a second copy before restarting anything"
        )
        return False

    async def _send_images(self) -> None:
        assert self.chan is not None
        files = 0
        total = 0
        # inventory and pstree first: a lazy restore's daemon can start on them alone; then
        # the mm and page maps: the target splits them while the rest arrives.
        paths = sorted(self.images_dir.iterdir(), key=lambda p: (image_rank(p.name), p.name))
        for path in paths:
            if path.suffix == ".log" or not path.is_file():
                continue
            data = path.read_bytes()
            files += 1
            total += len(data)
            for off in range(0, max(len(data), 1), IMAGE_CHUNK):
                chunk = data[off : off + IMAGE_CHUNK]
                last = off + IMAGE_CHUNK >= len(data)
                await self.chan.send(pb.ImageFile(name=path.name, data=chunk, last=last))
        await self.chan.send(pb.ImagesDone(files=files, bytes=total))
        self.report.image_bytes = total

    async def _after_commit(self) -> None:
        await asyncio.to_thread(self._release_network)
        self._phase(Phase.DONE)
        self._timings()
        shutil.rmtree(self.images_dir, ignore_errors=True)

    def _release_network(self) -> None:
        """After the commit: the addresses leave the source, then CRIU's lock table goes."""
        from phaul.engine import netaddr

        for iface in self.addresses:
            try:
                netaddr.remove_address(iface, netaddr.device_for(iface))
            except PhaulError as err:
                log.warning("could not remove %s from the source: %s", iface, err)
        try:
            # Only this dump's lock table: a concurrent migration's must stay.
            netaddr.remove_criu_lock_tables(netaddr.run_id_from_images(self.images_dir))
        except PhaulError as err:
            log.warning("could not remove CRIU's network lock table: %s", err)

    async def _after_rollback(self) -> None:
        shutil.rmtree(self.images_dir, ignore_errors=True)
        self.machine.phase = Phase.ROLLED_BACK
        self.report.phase_reached = self.report.phase_reached or Phase.ROLLED_BACK.value
        self._timings()

    def _timings(self) -> None:
        r = self.report
        r.span("connect+preflight", "start", "dump")
        r.span("dump", "freeze", "dumped")
        r.span("final-pass", "frozen", "final_pass_done")
        r.span("final-pass-wait", "dumped", "collected")
        r.span("rewrite", "collected", "pages_sent")
        r.span("images", "pages_sent", "images_sent")
        r.span("restore", "images_sent", "restored")
        r.span("commit", "restored", "running")
        freeze, running = r.at("freeze"), r.at("running")
        if freeze is not None and running is not None:
            r.downtime_ms = round((running - freeze) * 1000, 1)
        r.bytes_on_wire = (
            (self.chan.bytes_sent + self.chan.bytes_received if self.chan else 0)
            + (self.relay.bytes_out + self.relay.bytes_in if self.relay else 0)
            + (self.precopy.bytes_wire if self.precopy is not None else 0)
        )

    def _target_log(self, msg: pb.Log) -> None:
        log.info("target: %s", msg.text)


def image_rank(name: str) -> int:
    """The order images are sent in (the target relies on it, session._maybe_split_early)."""
    if name in ("inventory.img", "pstree.img"):
        return 0
    if name.startswith(("mm-", "pagemap-")):
        return 1
    return 2


def _parse_ips(values: list[str]) -> tuple[ipaddress.IPv4Interface, ...]:
    out = []
    for v in values:
        if "/" not in v:
            raise UsageError(f"--move-ip {v}: give the prefix length too, e.g. {v}/24")
        try:
            out.append(ipaddress.IPv4Interface(v))
        except ValueError as err:
            raise UsageError(f"--move-ip {v}: not an IPv4 address with prefix") from err
    return tuple(out)


class Progress:
    """Live progress: a line per phase and per pre-copy pass on stderr (rich), or the same
    events as JSON lines on stdout with ``--json``."""

    def __init__(self, *, json_lines: bool) -> None:
        from rich.console import Console

        self.json_lines = json_lines
        self.console = Console(stderr=True, highlight=False)
        self.t0 = time.monotonic()

    def emit(self, event: str, **kw: Any) -> None:
        if self.json_lines:
            print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)
            return
        t = time.monotonic() - self.t0
        if event == "phase":
            self.console.print(f"[dim]{t:7.2f}s[/dim] [bold]{kw.get('phase')}[/bold]")
        elif event == "pass":
            self.console.print(
                f"[dim]{t:7.2f}s[/dim]   pass {kw['n']}: {kw['pages']} pages, "
                f"{kw['bytes'] / 1e6:.1f} MB in {kw['seconds']:.2f} s "
                f"({kw['goodput_mbps']:.0f} MB/s); dirtied {kw['dirty_bytes'] / 1e6:.1f} MB "
                f"({kw['dirty_rate_mbps']:.1f} MB/s); predicted freeze "
                f"{kw['predicted_ms']:.0f} ms -> {kw['decision']}"
                + (f" (CPU throttled {kw['throttle']:.0%})" if kw.get("throttle") else "")
            )
        elif event == "freeze":
            self.console.print(f"[dim]{t:7.2f}s[/dim]   tree frozen")


def make_dialer(args: argparse.Namespace) -> Dialer:
    """The transport for ``--to``: HOST:PORT (token over TCP), + --tls-* (mutual TLS), ssh://.

    With TLS or SSH the transport authenticates the agent, so the token becomes optional: without
    --token-file, ``args.token_file`` is set to ``auth.TRANSPORT_ONLY`` (load_token gives b"").
    """
    from phaul.protocol.auth import TRANSPORT_ONLY
    from phaul.transport.tls import TlsConfig, TlsDialer

    tls = TlsConfig.from_args(
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_ca", None),
    )
    dialer: Dialer
    if args.to.startswith("ssh://"):
        from phaul.transport.ssh import SshConfig, SshDialer, agent_command_argv

        if tls is not None:
            raise UsageError("--tls-* options do not apply to ssh:// targets")
        command = getattr(args, "ssh_agent_command", None) or "phaul agent --stdio"
        agent_command_argv(command)
        known = getattr(args, "ssh_known_hosts", None)
        dialer = SshDialer(
            SshConfig.parse(
                args.to,
                known_hosts=Path(known) if known else None,
                accept_unknown=bool(getattr(args, "ssh_accept_unknown", False)),
                keys=tuple(Path(k) for k in getattr(args, "ssh_key", None) or ()),
                agent_command=command,
            )
        )
    else:
        host, port = parse_hostport(args.to)
        if tls is None:
            log.warning("token auth over plain TCP to %s:%d: traffic is NOT encrypted", host, port)
            return TcpDialer(host, port)
        dialer = TlsDialer(host, port, tls)
    if not args.token_file:
        args.token_file = TRANSPORT_ONLY
    return dialer


def cmd_migrate(args: argparse.Namespace) -> int:
    dialer = make_dialer(args)
    proctree.validate_migratable(args.pid)
    token = load_token(args.token_file)
    criu = find_criu(args.criu)
    cfg = MigrateConfig(
        pid=args.pid,
        target=args.to,
        token=token,
        workdir=Path(args.workdir),
        move_ips=_parse_ips(args.move_ip),
        auto_ips=not args.no_move_ip,
        timeout=args.timeout,
        criu_path=args.criu,
        precopy=args.precopy,
        tracker=args.tracker,
        policy=ConvergencePolicy(
            max_downtime_ms=args.max_downtime,
            max_iterations=args.max_iterations,
            on_no_converge=args.on_no_converge,
        ),
        compress=args.compress,
        restore=args.restore,
        final_dump=args.final_dump,
    )

    progress = Progress(json_lines=args.json)
    emit = progress.emit

    mig = SourceMigration(cfg, criu, dialer, emit)
    try:
        report = asyncio.run(mig.run())
    except PhaulError:
        if args.report:
            mig.report.write(args.report)
        if not args.json:
            print(mig.report.summary(), file=sys.stderr)
        raise
    if args.report:
        report.write(args.report)
    if args.json:
        emit("done", report=report.to_json())
    else:
        print(report.summary())
    return 0
