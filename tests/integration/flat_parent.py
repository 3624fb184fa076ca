"""Test stand-in for pre-copy: every present page of each task's private anonymous mappings
copied into one FlatPageImage per vpid (what phaul's page store holds after a pass)."""

from __future__ import annotations

from pathlib import Path

from phaul.engine.maps import Range, read_maps
from phaul.engine.pagemap import present_ranges
from phaul.engine.vmread import VmReader
from phaul.page_server.store import FlatPageImage


def build_flat_parent(vpid_map: dict[int, int], pre: Path) -> dict[int, list[Range]]:
    """``vpid_map``: vpid -> host pid. Returns what each vpid's image covers."""
    pre.mkdir()
    covered: dict[int, list[Range]] = {}
    for vpid, pid in vpid_map.items():
        maps = [m for m in read_maps(pid) if m.private and m.readable and m.anonymous]
        ranges = present_ranges(pid, maps)
        img = FlatPageImage(pre, vpid, pages_id=vpid)
        reader = VmReader(pid, 8 << 20)
        try:
            for addr, view in reader.read((s, e - s) for s, e in ranges):
                img.write(addr, view)
            img.commit()
        finally:
            img.close()
        assert not reader.gone and not reader.unreadable
        covered[vpid] = ranges
    return covered
