"""Pure parts of the tracked final dump (phaul/engine/tracked_dump.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.engine import tracked_dump as td
from phaul.engine.maps import merge_ranges
from phaul.page_server.criu_image import INVENTORY_MAGIC, iter_entries, read_pagemap

P = 4096


def cache(dirty: int = 0) -> bytes:
    """A kdat cache with the fields tracked_dump checks, as CRIU 4.2 lays them out."""
    buf = bytearray(912)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    struct.pack_into("<i", buf, td.OFF_LAST_CAP, last_cap)
    buf[td.OFF_DIRTY_TRACK : td.OFF_DIRTY_TRACK + 4] = bytes([dirty, 1, 1, 1])
    struct.pack_into("<Q", buf, td.OFF_TASK_SIZE, 0x7FFFFFFFF000)
    return bytes(buf)


def test_fake_kdat_sets_only_the_dirty_track_flag() -> None:
    real = cache()
    fake = td.fake_kdat(real)
    assert fake[td.OFF_DIRTY_TRACK] == 1
    assert [i for i in range(len(real)) if real[i] != fake[i]] == [td.OFF_DIRTY_TRACK]


@pytest.mark.parametrize(
    "broken",
    [
        lambda b: b[:20],  # too short
        lambda b: b[:16] + struct.pack("<i", 12345) + b[20:],  # another last_cap
        lambda b: b[:33] + bytes([7]) + b[34:],  # not a bool where one is expected
        lambda b: b[:40] + struct.pack("<Q", 4096) + b[48:],  # implausible task size
    ],
)
def test_fake_kdat_refuses_an_unknown_layout(broken) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(td.TrackedDumpUnavailable):
        td.fake_kdat(broken(cache()))


def test_synthesized_parent_covers_user_space(tmp_path: Path) -> None:
    td.write_parent(tmp_path, [1, 7], 0x7FFFFFFFF000)
    for vpid in (1, 7):
        pm = read_pagemap(tmp_path / f"pagemap-{vpid}.img")
        assert pm.entries[0].vaddr == P
        assert all(a.end == b.vaddr for a, b in zip(pm.entries, pm.entries[1:], strict=False))
        assert pm.entries[-1].end == 0x7FFFFFFFF000
    assert (tmp_path / f"pages-{td.PARENT_PAGES_ID}.img").stat().st_size == 0
    (inv,) = iter_entries((tmp_path / "inventory.img").read_bytes(), INVENTORY_MAGIC)
    assert inv[:2] == bytes([0x08, td.CRIU_IMAGES_V1_1]) and inv[2] == 0x40


pages = st.sets(st.integers(min_value=0, max_value=150), max_size=60)


@settings(max_examples=300, deadline=None)
@given(pages, pages)
def test_subtract_matches_sets(a: set[int], b: set[int]) -> None:
    def ranges(s: set[int]) -> list[tuple[int, int]]:
        return merge_ranges((p * P, (p + 1) * P) for p in s)

    got = td._subtract(ranges(a), ranges(b))
    assert {x // P for s, e in got for x in range(s, e, P)} == a - b
