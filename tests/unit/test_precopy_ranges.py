"""Range arithmetic of pre-copy bookkeeping (sent, pending, clean), against sets of pages."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from phaul.engine.maps import Mapping, merge_ranges
from phaul.source.precopy import clip_maps, intersect, subtract

P = 4096
pages = st.sets(st.integers(min_value=0, max_value=200), max_size=80)


def to_ranges(s: set[int]) -> list[tuple[int, int]]:
    return merge_ranges((p * P, (p + 1) * P) for p in s)


def to_set(r: list[tuple[int, int]]) -> set[int]:
    return {a // P for s, e in r for a in range(s, e, P)}


@settings(max_examples=500, deadline=None)
@given(pages, pages)
def test_subtract_and_intersect_match_sets(a: set[int], b: set[int]) -> None:
    ra, rb = to_ranges(a), to_ranges(b)
    assert to_set(subtract(ra, rb)) == a - b
    assert to_set(intersect(ra, rb)) == a & b
    out = subtract(ra, rb)
    assert out == sorted(out) and all(s < e for s, e in out)


@settings(max_examples=300, deadline=None)
@given(pages, pages)
def test_clip_maps_keeps_exactly_the_mapped_pending_pages(
    mapped: set[int], pending: set[int]
) -> None:
    maps = [
        Mapping(s, e, "rw-p", 0, "00:00", 0, "") for s, e in reversed(to_ranges(mapped))
    ]  # unsorted on purpose
    clipped = clip_maps(maps, to_ranges(pending))
    got = to_set([(m.start, m.end) for m in clipped])
    assert got == mapped & pending
    assert all(m.perms == "rw-p" for m in clipped)
