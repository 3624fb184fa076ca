"""Iterative pre-copy: memory moves while the tree runs; the freeze covers only the last writes.

Per process of the tree a dirty tracker (phaul.engine.tracker) is armed. Pass 0 sends every
present page of the tracked domain (private writable mappings); each later pass sends what the
tracker reports as written since the previous one. Pages go through a :class:`PageSender` on the
pre-copy page connection into the target's flat per-process images. After each pass the
convergence policy decides: another pass, throttle the tree's CPU, or stop.

We keep, per process, ``sent``: the pages whose content is at the target, and ``pending``: pages
written since they were last sent. At the freeze (CRIU's ``post-dump``) a last ``collect()``
completes ``pending``; ``clean() = sent - pending`` is what the final dump may take from the
parent image (PE_PARENT), everything else is read from the frozen tree.
Runs in one thread (blocking I/O); the caller owns it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from phaul import trace
from phaul.engine import pagemap, proctree
from phaul.engine.maps import Mapping, Range, merge_ranges, read_maps
from phaul.engine.tracker import DirtyTracker, choose_tracker
from phaul.errors import MigrationAborted, ProcessGone
from phaul.source.convergence import Convergence, Decision, PassRecord

log = logging.getLogger(__name__)

PAGE = 4096


def subtract(ranges: list[Range], minus: list[Range]) -> list[Range]:
    """Sorted merged ``ranges`` without ``minus`` (both sorted, merged)."""
    out: list[Range] = []
    j = 0
    for s, e in ranges:
        cur = s
        while j < len(minus) and minus[j][1] <= cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < e:
            ms, me = minus[k]
            if ms > cur:
                out.append((cur, ms))
            cur = max(cur, me)
            if me >= e:
                break
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect(ranges: list[Range], other: list[Range]) -> list[Range]:
    out: list[Range] = []
    i = j = 0
    while i < len(ranges) and j < len(other):
        s = max(ranges[i][0], other[j][0])
        e = min(ranges[i][1], other[j][1])
        if s < e:
            out.append((s, e))
        if ranges[i][1] < other[j][1]:
            i += 1
        else:
            j += 1
    return out


#: pending runs up to this size are sent without a present-page check in the final pass
SMALL_RUN = 16 * PAGE


def clip_maps(maps: list[Mapping], ranges: list[Range]) -> list[Mapping]:
    """The parts of ``maps`` inside ``ranges`` (sorted, disjoint), as mappings."""
    out: list[Mapping] = []
    maps = sorted(maps, key=lambda m: m.start)
    i = 0
    for start, end in ranges:
        while i < len(maps) and maps[i].end <= start:
            i += 1
        j = i
        while j < len(maps) and maps[j].start < end:
            m = maps[j]
            out.append(replace(m, start=max(m.start, start), end=min(m.end, end)))
            j += 1
    return out


def size(ranges: list[Range]) -> int:
    return sum(e - s for s, e in ranges)


@dataclass
class TrackedProcess:
    pid: int
    vpid: int
    tracker: DirtyTracker
    sent: list[Range] = field(default_factory=list)
    pending: list[Range] = field(default_factory=list)
    gone: bool = False

    def collect(self) -> None:
        if self.gone:
            return
        try:
            found = self.tracker.collect()
        except ProcessGone:
            self.gone = True
            self.pending = []
            self.sent = []
            return
        if found.vanished:
            self.sent = subtract(self.sent, merge_ranges(found.vanished))
            self.pending = subtract(self.pending, merge_ranges(found.vanished))
        self.pending = merge_ranges([*self.pending, *found.dirty])

    def present_pending(self) -> list[Range]:
        """Pending pages that exist (never-populated ones read as zeros and are not sent)."""
        if not self.pending:
            return []
        try:
            # Only where pages are pending: scanning all of a large tree's memory costs
            # milliseconds, and the final pass runs while the tree is frozen.
            maps = clip_maps(read_maps(self.pid), self.pending)
            present = pagemap.present_ranges(self.pid, maps)
        except ProcessGone:
            self.gone = True
            return []
        return intersect(self.pending, merge_ranges(present))

    def clean(self) -> list[Range]:
        return subtract(self.sent, self.pending)


@dataclass
class PrecopyResult:
    passes: list[PassRecord]
    reason: str
    tracker: str
    seconds: float
    bytes_wire: int


class Precopy:
    def __init__(
        self,
        procs: list[tuple[int, int]],  # (host pid, vpid)
        *,
        tracker: str,
        sender: Any,
        convergence: Convergence,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self.procs = [
            TrackedProcess(pid, vpid, choose_tracker(tracker, pid)) for pid, vpid in procs
        ]
        self.sender = sender
        self.conv = convergence
        self.emit = emit or (lambda event, **kw: None)
        self.throttle: Any = None
        self.bytes_wire = 0

    @property
    def tracker_name(self) -> str:
        return self.procs[0].tracker.name if self.procs else ""

    def start(self) -> None:
        for p in self.procs:
            p.tracker.start(p.pid)

    def run(self) -> PrecopyResult:
        """Passes until the policy says stop; returns with trackers still armed."""
        t_start = time.monotonic()
        for p in self.procs:
            p.collect()  # the first collect reports the whole domain
        try:
            while True:
                n = len(self.conv.passes)
                t0 = time.monotonic()
                pages = 0
                wire = 0
                for p in self.procs:
                    todo = p.present_pending()
                    if todo:
                        stats = self.sender.send_ranges(
                            p.pid, p.vpid, todo, on_read=p.tracker.copied
                        )
                        pages += stats.pages
                        wire += stats.bytes_wire
                    p.sent = merge_ranges([*p.sent, *todo])
                    p.pending = []
                self.sender.end_pass(n)
                seconds = time.monotonic() - t0
                for p in self.procs:
                    p.collect()
                dirty = sum(size(p.pending) for p in self.procs)
                self.bytes_wire += wire
                rec = self.conv.record(
                    pages=pages, bytes_wire=wire, seconds=seconds, dirty_bytes=dirty
                )
                decision = self.conv.decide()
                rec.throttle = self.conv.throttle
                self.emit("pass", **_pass_event(rec))
                log.info(
                    "pass %d: %d pages, %.1f MB in %.2f s; %.1f MB dirtied; %s",
                    n, pages, wire / 1e6, seconds, dirty / 1e6, self.conv.reason or decision.value,
                )  # fmt: skip
                if decision is Decision.FINAL:
                    break
                if decision is Decision.ABORT:
                    raise MigrationAborted(self.conv.reason, phase="precopy")
                if decision is Decision.THROTTLE:
                    self._throttle(self.conv.throttle)
                if all(p.gone for p in self.procs):
                    raise ProcessGone("the process tree exited during pre-copy")
        finally:
            self.release_throttle()
        return PrecopyResult(
            passes=self.conv.passes,
            reason=self.conv.reason,
            tracker=self.tracker_name,
            seconds=time.monotonic() - t_start,
            bytes_wire=self.bytes_wire,
        )

    def _throttle(self, fraction: float) -> None:
        from phaul.engine.throttle import CpuThrottle, ThrottleUnavailable

        try:
            if self.throttle is None:
                self.throttle = CpuThrottle([p.pid for p in self.procs if not p.gone])
            self.throttle.set(fraction)
        except ThrottleUnavailable as err:
            log.warning("cannot throttle the tree (%s): continuing without", err)

    def release_throttle(self) -> None:
        if self.throttle is not None:
            self.throttle.release()
            self.throttle = None

    def final_collect(self) -> dict[int, list[Range]]:
        """At the freeze: the last writes; returns the clean ranges per vpid."""
        before = {p.vpid: list(p.pending) for p in self.procs}
        for p in self.procs:
            p.collect()
        if os.environ.get("PHAUL_FAULT") == "precopy-drop-last-writes":
            self._drop_last_writes(before)
        return {p.vpid: p.clean() for p in self.procs}

    def final_pass(self) -> tuple[dict[int, list[Range]], int]:
        """With the tree frozen: the last collect, and what it found sent as one more pass
        (acknowledged by the target, so its flat images hold every tracked page as it is now).
        Returns the clean ranges per vpid (everything sent) and the pages sent."""
        self.final_collect()
        trace.event("src final collected")
        pages = wire = 0
        for p in self.procs:
            # Small runs are written pages (present: a write populates): sent as they are.
            # Only large ones (a mapping born during pre-copy) are checked for present pages,
            # which costs a page-table scan per run.
            small = [r for r in p.pending if r[1] - r[0] <= SMALL_RUN]
            large = [r for r in p.pending if r[1] - r[0] > SMALL_RUN]
            p.pending = large
            todo = merge_ranges([*small, *p.present_pending()])
            trace.event("src final present_pending")
            if todo:
                stats = self.sender.send_ranges(p.pid, p.vpid, todo)
                pages += stats.pages
                wire += stats.bytes_wire
            p.sent = merge_ranges([*p.sent, *todo])
            p.pending = []
        trace.event("src final sent")
        self.sender.end_pass(len(self.conv.passes))
        trace.event("src final acked")
        self.bytes_wire += wire
        log.info("final pass (frozen): %d pages, %.1f MB", pages, wire / 1e6)
        return {p.vpid: p.clean() for p in self.procs}, pages

    def _drop_last_writes(self, before: dict[int, list[Range]]) -> None:
        """Fault injection for tests: lose what the last collect found in the largest private
        anonymous mapping (a test workload's data), as a tracker missing writes would. Only
        pages sent before that collect count (their copy at the target is then stale). A
        single page is not enough to be sure: the tracker may over-report (e.g. while CRIU
        pins pages for the lazy dump), and an over-reported page is not stale.
        """
        for p in self.procs:
            try:
                maps = [m for m in read_maps(p.pid) if m.anonymous and m.private]
            except ProcessGone:
                continue
            if not maps:
                continue
            big = max(maps, key=lambda m: m.end - m.start)
            fresh = subtract(p.pending, merge_ranges(before.get(p.vpid, [])))
            lost = intersect(intersect(fresh, p.sent), [(big.start, big.end)])
            if lost:
                p.pending = subtract(p.pending, lost)
                log.warning(
                    "fault injected: %d written pages of PID %d treated as clean",
                    size(lost) // PAGE,
                    p.pid,
                )

    def pids_by_vpid(self) -> dict[int, int]:
        return {p.vpid: p.pid for p in self.procs}

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.tracker.stop()
            except Exception:
                log.exception("could not stop the tracker of PID %d", p.pid)


def _pass_event(rec: PassRecord) -> dict[str, Any]:
    return {
        "n": rec.n,
        "pages": rec.pages,
        "bytes": rec.bytes_wire,
        "seconds": round(rec.seconds, 4),
        "dirty_bytes": rec.dirty_bytes,
        "dirty_rate_mbps": round(rec.dirty_rate_bps / 1e6, 2),
        "goodput_mbps": round(rec.goodput_bps / 1e6, 2),
        "predicted_ms": round(rec.predicted_ms, 1),
        "throttle": rec.throttle,
        "decision": rec.decision,
    }


def tree_vpids(root: int, pids: list[int]) -> list[tuple[int, int]]:
    """(host pid, pid in the root's pid namespace) for every process of the tree."""
    level = len(proctree.nspid(root)) - 1
    out = []
    for pid in pids:
        try:
            ns = proctree.nspid(pid)
        except ProcessGone:
            continue
        out.append((pid, ns[level] if level < len(ns) else pid))
    return out
