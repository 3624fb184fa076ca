"""The restore's network-lock method: set in the dump's inventory (CRIU reads it there)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from phaul.page_server.criu_image import INVENTORY_MAGIC, iter_entries, set_network_lock
from phaul.target.session import _peer_elsewhere


def fields(payload: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message with varint and length-delimited fields."""
    out: list[tuple[int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = payload[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(payload):
        key = varint()
        if key & 7 == 0:
            out.append((key >> 3, varint()))
        else:
            n = varint()
            out.append((key >> 3, payload[i : i + n]))
            i += n
    return out


def test_network_lock_is_overridden_and_the_rest_kept(tmp_path: Path) -> None:
    # img_version=2 (field 1), network_lock_method=1 nftables (field 11), run id (field 13)
    entry = bytes([0x08, 0x02, 0x58, 0x01, 0x6A, 0x03]) + b"abc"
    path = tmp_path / "inventory.img"
    path.write_bytes(struct.pack("<II", INVENTORY_MAGIC, len(entry)) + entry)
    set_network_lock(path, "skip")
    (payload,) = list(iter_entries(path.read_bytes(), INVENTORY_MAGIC))
    assert payload.startswith(entry)
    got = fields(payload)
    last = dict(got)  # protobuf: the last occurrence of a scalar wins
    assert last[11] == 2 and last[1] == 2 and last[13] == b"abc"


def test_only_a_peer_in_another_namespace_counts_as_elsewhere() -> None:
    local = [ipaddress.IPv4Interface("10.0.0.2/24"), ipaddress.IPv4Interface("127.0.0.1/8")]
    assert _peer_elsewhere(("10.0.0.1", 4000), local)
    assert not _peer_elsewhere(("10.0.0.2", 4000), local)  # ourselves
    assert not _peer_elsewhere(("127.0.0.1", 4000), local)
    assert not _peer_elsewhere(None, local)  # stdio over SSH: unknown
    assert not _peer_elsewhere(("not-an-ip", 1), local)
