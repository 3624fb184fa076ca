"""Parsing and diffing /proc/PID/maps (golden captures from this kernel)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phaul.engine import maps
from phaul.engine.maps import Mapping

# "~" marks the trailing space the kernel prints after an empty path or VmFlags.
GOLDEN_MAPS = """\
555bb06cd000-555bb06ce000 r--p 00000000 fe:00 2148946                    /tmp/mwt/memwriter
555bb06ce000-555bb06d0000 r-xp 00001000 fe:00 2148946                    /tmp/mwt/memwriter
555bb06d2000-555bb06d3000 rw-p 00004000 fe:00 2148946                    /tmp/mwt/memwriter
555bd1a75000-555bd1a96000 rw-p 00000000 00:00 0                          [heap]
7f0e52000000-7f0e92000000 rw-p 00000000 00:00 0~
7f0e92000000-7f0e92001000 rw-s 00000000 00:01 1029                       /dev/zero (deleted)
7f0e92001000-7f0e92002000 rw-s 00000000 00:01 2049                       /memfd:my buf (deleted)
7f0e92002000-7f0e92003000 ---p 00000000 00:00 0~
7f0e92003000-7f0e92004000 rw-p 00000000 00:00 0                          [anon:named region]
7ffe845a5000-7ffe845c6000 rw-p 00000000 00:00 0                          [stack]
7ffe845f0000-7ffe845f4000 r--p 00000000 00:00 0                          [vvar]
7ffe845f4000-7ffe845f6000 r--p 00000000 00:00 0                          [vvar_vclock]
7ffe845f6000-7ffe845f8000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
""".replace("~", " ")

GOLDEN_SMAPS = """\
555bd1a75000-555bd1a96000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
KernelPageSize:        4 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac~
7f0e52000000-7f0e92000000 rw-p 00000000 00:00 0~
Size:            1048576 kB
Rss:             1048576 kB
THPeligible:    0
VmFlags: rd wr mr mw me ac uw~
""".replace("~", " ")


def test_parse_golden() -> None:
    ms = maps.parse_maps(GOLDEN_MAPS)
    assert len(ms) == 14
    exe = ms[0]
    assert (exe.start, exe.end, exe.perms) == (0x555BB06CD000, 0x555BB06CE000, "r--p")
    assert exe.offset == 0 and exe.dev == "fe:00" and exe.inode == 2148946
    assert exe.path == "/tmp/mwt/memwriter"
    assert not exe.anonymous and exe.readable and not exe.writable and exe.private
    assert ms[1].executable and ms[1].offset == 0x1000
    heap = ms[3]
    assert heap.path == "[heap]" and heap.anonymous and heap.writable and heap.pages == 33
    assert ms[4].path == "" and ms[4].anonymous and ms[4].size == 1 << 30
    assert ms[5].shared and ms[5].deleted and ms[5].path == "/dev/zero (deleted)"
    assert ms[6].path == "/memfd:my buf (deleted)"
    assert not ms[7].readable and not ms[7].writable
    assert ms[8].path == "[anon:named region]" and ms[8].anonymous
    assert [m.path for m in ms if m.special] == ["[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"]
    assert not any(m.anonymous for m in ms if m.special)


def test_private_writable_selection() -> None:
    ms = maps.parse_maps(GOLDEN_MAPS)
    sel = [m.path for m in ms if maps.is_private_writable(m)]
    assert sel == ["/tmp/mwt/memwriter", "[heap]", "", "[anon:named region]", "[stack]"]


def test_malformed_lines_rejected() -> None:
    with pytest.raises(ValueError, match="malformed"):
        maps.parse_maps_line("garbage")
    with pytest.raises(ValueError, match="malformed"):
        maps.parse_maps_line("1000-2000 rw 0 00:00 0")


def test_smaps_vmflags() -> None:
    flags = maps.parse_smaps_vmflags(GOLDEN_SMAPS)
    assert flags[0x555BD1A75000] == frozenset({"rd", "wr", "mr", "mw", "me", "ac"})
    assert "uw" in flags[0x7F0E52000000]


def test_read_own_maps() -> None:
    ms = maps.read_maps(os.getpid())
    assert any(m.path == "[stack]" for m in ms)
    assert all(a.end <= b.start for a, b in itertools.pairwise(ms))
    assert maps.private_writable_mappings(os.getpid())
    assert any("mw" in f for f in maps.read_vmflags(os.getpid()).values())


def test_read_maps_unknown_pid() -> None:
    from phaul.errors import ProcessGone

    with pytest.raises(ProcessGone):
        maps.read_maps(2**22 + 7)


def _m(start: int, end: int, perms: str = "rw-p", path: str = "") -> Mapping:
    return Mapping(start, end, perms, 0, "00:00", 0, path)


def test_diff_snapshots() -> None:
    old = [_m(0x1000, 0x5000), _m(0x10000, 0x20000), _m(0x30000, 0x31000, "r--p")]
    new = [
        _m(0x1000, 0x3000),  # shrunk: old removed, new added, tail vanished
        _m(0x10000, 0x20000),  # same
        _m(0x30000, 0x31000, "rw-p"),  # mprotect: changed
        _m(0x40000, 0x42000),  # new
    ]
    d = maps.diff(old, new)
    assert [(m.start, m.end) for m in d.added] == [(0x1000, 0x3000), (0x40000, 0x42000)]
    assert [(m.start, m.end) for m in d.removed] == [(0x1000, 0x5000)]
    assert [(a.perms, b.perms) for a, b in d.changed] == [("r--p", "rw-p")]
    assert d.new_ranges == [(0x40000, 0x42000)]
    assert d.vanished_ranges == [(0x3000, 0x5000)]
    assert not d.empty
    assert maps.diff(old, old).empty


def test_range_helpers() -> None:
    assert maps.merge_ranges([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert maps.subtract_ranges([(0, 10), (20, 30)], [(2, 4), (8, 22), (29, 40)]) == [
        (0, 2),
        (4, 8),
        (22, 29),
    ]
    assert maps.intersect_ranges([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    # Generators are accepted (consumed once).
    assert maps.intersect_ranges(iter([(0, 10)]), iter([(5, 25)])) == [(5, 10)]


_ranges = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


def _cover(rs: list[tuple[int, int]]) -> set[int]:
    return {x for s, e in rs for x in range(s, e)}


@given(_ranges, _ranges)
def test_range_arithmetic_matches_sets(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    merged = maps.merge_ranges(a)
    assert _cover(merged) == _cover(a)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(merged))
    assert _cover(maps.subtract_ranges(a, b)) == _cover(a) - _cover(b)
    assert _cover(maps.intersect_ranges(a, b)) == _cover(a) & _cover(b)
