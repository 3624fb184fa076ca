"""The tracker interface (phaul.engine.tracker): range helpers and the backend choice."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phaul.engine.hashtrack import HashTracker
from phaul.engine.tracker import (
    DirtyRanges,
    DirtyTracker,
    choose_tracker,
    page_align,
    pages_to_ranges,
)
from phaul.errors import UsageError

P = 4096


def test_pages_to_ranges_merges_runs() -> None:
    assert pages_to_ranges([3 * P, P, 2 * P, 7 * P, 7 * P]) == [(P, 4 * P), (7 * P, 8 * P)]
    assert pages_to_ranges([]) == []


@given(st.sets(st.integers(min_value=0, max_value=500)))
def test_pages_to_ranges_roundtrip(pages: set[int]) -> None:
    ranges = pages_to_ranges(p * P for p in pages)
    d = DirtyRanges(dirty=ranges)
    assert set(d.page_addresses()) == {p * P for p in pages}
    assert d.pages == len(pages)
    assert d.bytes == len(pages) * P
    # Sorted, non-overlapping, non-adjacent.
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))


def test_page_align_rounds_out() -> None:
    assert page_align([(P + 1, P + 2), (3 * P - 1, 3 * P)]) == [(P, 3 * P)]


def test_unknown_tracker_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dirty tracker"):
        choose_tracker("magic", 1)


def test_hash_tracker_is_always_available() -> None:
    tracker = choose_tracker("hash", 1)
    assert isinstance(tracker, HashTracker)
    assert isinstance(tracker, DirtyTracker)
    assert tracker.name == "hash"
