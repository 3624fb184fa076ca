"""The operator's report: per-phase timings, downtime, bytes, CRIU statistics; human and JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from phaul import trace


@dataclass
class Report:
    migration_id: str
    pid: int
    target: str
    outcome: str = "running"  # "migrated" | "rolled-back" | "failed"
    error: str = ""
    phase_reached: str = ""
    downtime_ms: float = 0.0  # freeze on the source -> running on the target
    total_ms: float = 0.0
    bytes_on_wire: int = 0
    page_bytes: int = 0
    image_bytes: int = 0
    addresses: list[str] = field(default_factory=list)
    target_pid: int = 0
    phases_ms: dict[str, float] = field(default_factory=dict)
    criu_dump_stats: dict[str, int] = field(default_factory=dict)
    criu_restore_stats: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    precopy: bool = False
    tracker: str = ""
    passes: list[dict[str, Any]] = field(default_factory=list)
    precopy_reason: str = ""
    predicted_downtime_ms: float = 0.0
    final_pages: int = 0  # pages read from the frozen tree by the final dump
    restore: str = "eager"  # "eager" | "lazy"
    final_dump: str = ""  # after pre-copy: "tracked" | "lazy"
    lazy_pages: int = 0  # pages left to the target's lazy-pages daemon
    fill_ms: float = 0.0  # lazy restore: tree running -> all memory in (source frozen till then)
    _t0: float = field(default_factory=time.monotonic, repr=False)
    _marks: dict[str, float] = field(default_factory=dict, repr=False)

    def mark(self, name: str) -> float:
        now = time.monotonic()
        trace.event("src " + name)
        self._marks[name] = now
        return now

    def span(self, name: str, start: str, end: str) -> None:
        if start in self._marks and end in self._marks:
            self.phases_ms[name] = round((self._marks[end] - self._marks[start]) * 1000, 1)

    def at(self, name: str) -> float | None:
        return self._marks.get(name)

    def finish(self) -> None:
        self.total_ms = round((time.monotonic() - self._t0) * 1000, 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("_t0", "_marks"):
            data.pop(key, None)
        return data

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")

    def summary(self) -> str:
        lines = []
        if self.outcome == "migrated":
            lines.append(
                f"migrated PID {self.pid} to {self.target}: runs there as PID {self.target_pid}"
            )
        else:
            lines.append(f"migration of PID {self.pid} to {self.target}: {self.outcome}")
            if self.error:
                lines.append(f"  error:    {self.error}")
        lines.append(f"  downtime: {self.downtime_ms:.0f} ms    total: {self.total_ms:.0f} ms")
        if self.restore == "lazy":
            lines.append(
                f"  restore:  lazy, {self.lazy_pages} pages filled in {self.fill_ms:.0f} ms "
                "after the tree resumed"
            )
        lines.append(
            f"  on wire:  {self.bytes_on_wire / 1e6:.1f} MB "
            f"(pages {self.page_bytes / 1e6:.1f} MB, images {self.image_bytes / 1e3:.0f} kB)"
        )
        if self.addresses:
            lines.append(f"  moved:    {', '.join(self.addresses)}")
        if self.passes:
            lines.append(
                f"  pre-copy: {len(self.passes)} passes ({self.tracker}); {self.precopy_reason}; "
                f"final dump {self.final_dump or 'lazy'}"
            )
            lines.append("    pass    pages      MB      s   dirty MB/s  goodput MB/s  predicted")
            for p in self.passes:
                lines.append(
                    f"    {p['n']:4d} {p['pages']:8d} {p['bytes_wire'] / 1e6:7.1f} "
                    f"{p['seconds']:6.2f} {p['dirty_rate_bps'] / 1e6:11.1f} "
                    f"{p['goodput_bps'] / 1e6:13.1f} {p['predicted_ms']:8.0f} ms"
                )
            lines.append(
                f"  final:    {self.final_pages} pages read while frozen; predicted downtime "
                f"{self.predicted_downtime_ms:.0f} ms"
            )
        if self.phases_ms:
            lines.append(
                "  phases:   " + ", ".join(f"{k} {v:.0f} ms" for k, v in self.phases_ms.items())
            )
        for name, path in self.logs.items():
            lines.append(f"  {name} log: {path}")
        return "\n".join(lines)
