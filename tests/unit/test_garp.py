"""Unit tests of the gratuitous ARP frame (no root needed)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from phaul.engine import garp

MAC = bytes.fromhex("02aabbccddee")
IP = ipaddress.IPv4Address("10.77.1.100")


def test_frame_layout() -> None:
    f = garp.garp_frame(MAC, IP)
    assert len(f) == 60
    assert f[0:6] == b"\xff" * 6 and f[6:12] == MAC
    assert struct.unpack("!H", f[12:14])[0] == 0x0806
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert f[22:28] == MAC  # sender MAC
    assert f[28:32] == IP.packed  # sender IP
    assert f[32:38] == b"\0" * 6  # target MAC unknown
    assert f[38:42] == IP.packed  # target IP == sender IP: gratuitous
    assert f[42:] == b"\0" * 18


def test_bad_mac() -> None:
    with pytest.raises(ValueError):
        garp.garp_frame(b"\x01\x02", IP)


def test_address_forms() -> None:
    assert garp._as_ip("10.77.1.100") == IP
    assert garp._as_ip("10.77.1.100/24") == IP
    assert garp._as_ip(ipaddress.IPv4Interface("10.77.1.100/24")) == IP
    assert garp._as_ip(IP) == IP
