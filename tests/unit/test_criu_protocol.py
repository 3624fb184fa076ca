"""page_server_iov codec: hand-built headers as CRIU 4.2 sends them, and bounded rejection."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phaul.errors import ProtocolError
from phaul.page_server import criu_protocol as cp
from phaul.page_server.criu_image import PE_LAZY, PE_PARENT, PE_PRESENT


def hdr(cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
    # struct page_server_iov { u32 cmd; [4 pad]; u64 nr_pages; u64 vaddr; u64 dst_id; }
    return struct.pack("<I", cmd) + b"\0" * 4 + struct.pack("<QQQ", nr_pages, vaddr, dst_id)


def test_layout_and_command_numbers() -> None:
    assert cp.IOV_SIZE == 32
    assert [int(c) for c in cp.Command] == [1, 2, 3, 4, 5, 6, 7, 0x1023, 0x1024]
    assert cp.Command.legacy_name(0x1023) == "PS_IOV_FLUSH"
    assert cp.Command.legacy_name(0x1024) == "PS_IOV_FLUSH_N_CLOSE"
    assert cp.Command.legacy_name(4) == "PS_IOV_OPEN2"


def test_decode_add_f_with_flags_in_high_bits() -> None:
    # task vpid 2 -> dst_id 2 << 8 | 1
    raw = hdr(6 | (PE_PRESENT | PE_LAZY) << 16, 254, 0x7FF61CE00000, 0x201)
    iov = cp.decode_iov(raw)
    assert iov == cp.PageServerIov(cp.Command.ADD_F, 6, 254, 0x7FF61CE00000, 0x201)
    assert iov.payload_bytes == 254 * 4096
    assert iov.image == cp.ImageId(cp.ImageKind.TASK, 2)
    assert iov.image.pagemap_name == "pagemap-2.img"
    assert (
        cp.encode_iov(cp.Command.ADD_F, flags=6, nr_pages=254, vaddr=0x7FF61CE00000, dst_id=0x201)
        == raw
    )


def test_lazy_and_parent_runs_carry_no_payload() -> None:
    assert cp.decode_iov(hdr(6 | PE_LAZY << 16, 10, 0x1000, 0x101)).payload_bytes == 0
    assert cp.decode_iov(hdr(6 | PE_PARENT << 16, 10, 0x1000, 0x101)).payload_bytes == 0
    hole = cp.decode_iov(hdr(2, 3, 0x2000, 0x101))
    assert (hole.command, hole.flags, hole.payload_bytes) == (cp.Command.HOLE, PE_PARENT, 0)
    add = cp.decode_iov(hdr(1, 3, 0x2000, 0x101))
    assert (add.command, add.flags, add.payload_bytes) == (cp.Command.ADD, PE_PRESENT, 3 * 4096)


def test_dst_id_kinds_including_legacy() -> None:
    assert cp.decode_dst_id(7 << 8 | 1) == cp.ImageId(cp.ImageKind.TASK, 7)
    assert cp.decode_dst_id(9 << 8 | 2).pagemap_name == "pagemap-shmem-9.img"
    assert cp.decode_dst_id(5 << 8 | 11) == cp.ImageId(cp.ImageKind.TASK, 5)  # CRIU 2.x
    assert cp.decode_dst_id(5 << 8 | 34).kind is cp.ImageKind.SHMEM
    assert cp.ImageId(cp.ImageKind.SHMEM, 9).encode() == 9 << 8 | 2
    with pytest.raises(ProtocolError, match="unknown pagemap type"):
        cp.decode_dst_id(5 << 8 | 3)


def test_open2_close_and_replies() -> None:
    assert cp.decode_iov(hdr(4, dst_id=0x101)).command is cp.Command.OPEN2
    assert cp.decode_iov(hdr(0x1023)).command is cp.Command.CLOSE
    assert cp.decode_iov(hdr(0x1024)).command is cp.Command.FORCE_CLOSE
    assert cp.encode_open2_reply(True) == b"\x01"
    assert cp.encode_open2_reply(False) == b"\x00"
    assert cp.encode_parent_reply(True) == b"\x01\0\0\0"
    assert cp.encode_close_reply() == b"\0\0\0\0"
    assert cp.decode_s32(b"\xff\xff\xff\xff") == -1
    with pytest.raises(ProtocolError):
        cp.decode_s32(b"\0\0")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (hdr(0xDEAD), "unknown command"),
        (hdr(8), "unknown command"),
        (hdr(6 | 8 << 16, 1, 0x1000, 0x101), "unknown pagemap flags"),
        (hdr(6, 1, 0x1000, 0x101), "without flags"),
        (hdr(4 | 1 << 16, dst_id=0x101), "flags"),
        (hdr(6 | 4 << 16, 0, 0x1000, 0x101), "of 0 pages"),
        (hdr(6 | 4 << 16, 1 << 40, 0x1000, 0x101), "pages"),
        (hdr(6 | 4 << 16, 1, 0x1001, 0x101), "unaligned"),
        (hdr(6 | 4 << 16, 16, (1 << 57) - 4096, 0x101), "out of range"),
        (hdr(6 | 4 << 16, 1, (1 << 64) - 4096, 0x101), "out of range"),
        (hdr(6 | 4 << 16, 1, 0x1000, 0x105), "unknown pagemap type"),
        (hdr(4, dst_id=0xFF), "unknown pagemap type"),
        (b"\0" * 31, "header of 31 bytes"),
    ],
)
def test_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        cp.decode_iov(raw)


def test_encode_rejects_unknown_flags() -> None:
    with pytest.raises(ValueError, match="flags"):
        cp.encode_iov(cp.Command.ADD_F, flags=0x10)


@given(st.binary(min_size=32, max_size=32))
def test_garbage_never_raises_anything_else(raw: bytes) -> None:
    try:
        iov = cp.decode_iov(raw)
    except ProtocolError:
        return
    assert iov.payload_bytes <= cp.MAX_NR_PAGES * 4096


@given(
    st.sampled_from([1, 2, 4, 5, 6]),
    st.integers(1, cp.MAX_NR_PAGES),
    st.integers(0, (1 << 45) - 1),
    st.integers(1, 1 << 22),
)
def test_round_trip(flags: int, nr: int, page: int, vpid: int) -> None:
    page = min(page, (cp.MAX_ADDRESS // 4096) - nr)  # the whole run must lie below the limit
    dst = cp.ImageId(cp.ImageKind.TASK, vpid).encode()
    raw = cp.encode_iov(cp.Command.ADD_F, flags=flags, nr_pages=nr, vaddr=page * 4096, dst_id=dst)
    iov = cp.decode_iov(raw)
    assert (iov.flags, iov.nr_pages, iov.vaddr, iov.image.id) == (flags, nr, page * 4096, vpid)
