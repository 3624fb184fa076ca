"""CRIU image files: against hand-built bytes (the layout CRIU 4.2 writes), and round trips."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phaul.errors import ProtocolError
from phaul.page_server import criu_image as ci


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def le32(n: int) -> bytes:
    return struct.pack("<I", n)


def hand_entry(vaddr: int, flags: int, nr_pages: int) -> bytes:
    # The encoding CRIU writes (reference/lazy-final-dump.md):
    # 08 <vaddr> 10 00 20 <flags> 28 <nr_pages>
    return (
        b"\x08" + varint(vaddr) + b"\x10\x00" + b"\x20" + varint(flags) + b"\x28" + varint(nr_pages)
    )


def hand_pagemap(pages_id: int, entries: list[tuple[int, int, int]]) -> bytes:
    head = b"\x08" + varint(pages_id)
    out = le32(0x54564319) + le32(0x56084025) + le32(len(head)) + head
    for vaddr, flags, nr in entries:
        e = hand_entry(vaddr, flags, nr)
        out += le32(len(e)) + e
    return out


ENTRIES = [(0x7FF61CE00000, 6, 254), (0x7FF61CFFE000, 2, 256), (0x7FFF00000000, 4, 1)]


def test_constants_match_criu() -> None:
    assert (ci.PE_PARENT, ci.PE_LAZY, ci.PE_PRESENT) == (1, 2, 4)
    assert ci.IMG_COMMON_MAGIC == 0x54564319
    assert ci.PAGEMAP_MAGIC == 0x56084025
    assert ci.PSTREE_MAGIC == 0x50273030
    assert ci.pagemap_name(2) == "pagemap-2.img"
    assert ci.shmem_pagemap_name(77) == "pagemap-shmem-77.img"
    assert ci.pages_name(65537) == "pages-65537.img"


def test_entry_encoding_is_byte_identical_to_criu() -> None:
    entry = ci.PagemapEntry(vaddr=0x7FF61CE00000, nr_pages=254, flags=6)
    assert ci.encode_pagemap_entry(entry) == hand_entry(0x7FF61CE00000, 6, 254)
    # vaddr 0x7ff61ce00000 as a varint, spelled out
    assert hand_entry(0x7FF61CE00000, 6, 254).hex() == "08808080e7e1fe1f1000200628fe01"


def test_encode_pagemap_matches_hand_built_file() -> None:
    entries = [ci.PagemapEntry(v, n, f) for v, f, n in ENTRIES]
    assert ci.encode_pagemap(65537, entries) == hand_pagemap(65537, ENTRIES)


def test_decode_hand_built_pagemap() -> None:
    pm = ci.decode_pagemap(hand_pagemap(3, ENTRIES))
    assert pm.pages_id == 3
    assert [(e.vaddr, e.flags, e.nr_pages) for e in pm.entries] == ENTRIES
    assert pm.present_pages == 254 + 1
    assert pm.entries[0].end == 0x7FF61CE00000 + 254 * 4096


def test_decode_legacy_entries_like_criu() -> None:
    # in_parent=true without flags -> PE_PARENT; no flags -> PE_PRESENT; no nr_pages -> compat.
    parent = b"\x08" + varint(0x1000) + b"\x10\x03" + b"\x18\x01"
    plain = b"\x08" + varint(0x10000) + b"\x10\x02"
    data = le32(0x54564319) + le32(0x56084025) + le32(2) + b"\x08\x01"
    data += le32(len(parent)) + parent + le32(len(plain)) + plain
    pm = ci.decode_pagemap(data)
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x1000, 3, ci.PE_PARENT),
        (0x10000, 2, ci.PE_PRESENT),
    ]


def test_decode_accepts_bare_magic() -> None:
    data = hand_pagemap(1, ENTRIES)[4:]  # without IMG_COMMON, as images of CRIU < 1.6
    assert len(ci.decode_pagemap(data).entries) == 3


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (le32(0x54564319), "truncated image header"),
        (le32(0x54564319) + le32(0x50273030), "magic"),
        (le32(0x12345678), "magic"),
        (le32(0x54564319) + le32(0x56084025), "no pagemap_head"),
        (le32(0x54564319) + le32(0x56084025) + b"\x02\x00", "truncated entry length"),
        (le32(0x54564319) + le32(0x56084025) + le32(0xFFFFFFF0), "absurd"),
        (le32(0x54564319) + le32(0x56084025) + le32(5) + b"\x08", "truncated"),
        (le32(0x54564319) + le32(0x56084025) + le32(1) + b"\xff", "pagemap_head"),
        (le32(0x54564319) + le32(0x56084025) + le32(0), "without pages_id"),
    ],
)
def test_decode_rejects_malformed(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        ci.decode_pagemap(data)


def test_decode_rejects_unsorted_overlapping_unaligned() -> None:
    with pytest.raises(ProtocolError, match="overlaps or is out of order"):
        ci.decode_pagemap(hand_pagemap(1, [(0x3000, 4, 1), (0x2000, 4, 1)]))
    with pytest.raises(ProtocolError, match="overlaps"):
        ci.decode_pagemap(hand_pagemap(1, [(0x2000, 4, 2), (0x3000, 4, 1)]))
    with pytest.raises(ProtocolError, match="unaligned"):
        ci.decode_pagemap(hand_pagemap(1, [(0x2001, 4, 1)]))


def test_decode_pstree_hand_built() -> None:
    e1 = b"\x08\x01\x10\x00\x18\x01\x20\x01\x28\x01"  # pid 1, ppid 0, pgid 1, sid 1, threads [1]
    e2 = b"\x08\x02\x10\x01\x18\x01\x20\x01\x28\x02\x28\x03"  # threads 2, 3 (unpacked repeated)
    data = le32(0x54564319) + le32(0x50273030) + le32(len(e1)) + e1 + le32(len(e2)) + e2
    tree = ci.decode_pstree(data)
    assert tree == [
        ci.PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=(1,)),
        ci.PstreeEntry(pid=2, ppid=1, pgid=1, sid=1, threads=(2, 3)),
    ]
    with pytest.raises(ProtocolError, match="required"):
        ci.decode_pstree(le32(0x54564319) + le32(0x50273030) + le32(2) + b"\x08\x01")


def test_write_and_read_pagemap_file(tmp_path: Path) -> None:
    path = tmp_path / ci.pagemap_name(1)
    entries = [ci.PagemapEntry(v, n, f) for v, f, n in ENTRIES]
    ci.write_pagemap(path, 9, entries)
    assert path.read_bytes() == hand_pagemap(9, ENTRIES)
    assert ci.read_pagemap(path) == ci.Pagemap(9, tuple(entries))
    assert not list(tmp_path.glob("*.tmp"))


def test_pagemap_writer_streams_and_checks_order(tmp_path: Path) -> None:
    path = tmp_path / "pagemap-2.img"
    w = ci.PagemapWriter(path, 65537)
    for v, f, n in ENTRIES:
        w.add(ci.PagemapEntry(v, n, f))
    with pytest.raises(ProtocolError, match="overlaps"):
        w.add(ci.PagemapEntry(0x1000, 1, 4))
    w.close()
    assert path.read_bytes() == hand_pagemap(65537, ENTRIES)
    assert w.size == len(path.read_bytes())
    assert w.entries == 3


runs = st.lists(
    st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 18), st.sampled_from([1, 2, 4, 6])),
    max_size=40,
)


@given(st.integers(0, (1 << 32) - 1), runs)
def test_round_trip(pages_id: int, raw: list[tuple[int, int, int]]) -> None:
    entries = []
    addr = 0
    for gap, nr, flags in raw:
        addr += gap * 4096
        entries.append(ci.PagemapEntry(addr, nr, flags))
        addr += nr * 4096
    pm = ci.decode_pagemap(ci.encode_pagemap(pages_id, entries))
    assert pm == ci.Pagemap(pages_id, tuple(entries))


@given(st.binary(max_size=200))
def test_garbage_raises_protocol_error_only(data: bytes) -> None:
    for blob in (data, ci.image_header(ci.PAGEMAP_MAGIC) + data):
        try:
            ci.decode_pagemap(blob)
        except ProtocolError:
            pass
