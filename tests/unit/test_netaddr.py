"""Unit tests of phaul.engine.netaddr parsers (no root needed)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phaul.engine import netaddr


def _fmt_v4(addr: ipaddress.IPv4Address, port: int) -> str:
    # The kernel prints the be32 address as a host-order (little-endian here) u32 with %08X.
    return f"{struct.unpack('<I', addr.packed)[0]:08X}:{port:04X}"


def _fmt_v6(addr: ipaddress.IPv6Address, port: int) -> str:
    words = struct.unpack("<4I", addr.packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def test_parse_golden_fields() -> None:
    assert netaddr.parse_proc_net_addr("0100007F:1F90") == ipaddress.IPv4Address("127.0.0.1")
    assert netaddr.parse_proc_net_addr("6400A8C0:0050") == ipaddress.IPv4Address("192.168.0.100")
    assert netaddr.parse_proc_net_addr(
        "0000000000000000FFFF00006400A8C0:0050"
    ) == ipaddress.IPv6Address("::ffff:192.168.0.100")
    with pytest.raises(ValueError):
        netaddr.parse_proc_net_addr("0100:1F90")


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_parse_v4_roundtrip(addr: ipaddress.IPv4Address, port: int) -> None:
    assert netaddr.parse_proc_net_addr(_fmt_v4(addr, port)) == addr


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_parse_v6_roundtrip(addr: ipaddress.IPv6Address, port: int) -> None:
    assert netaddr.parse_proc_net_addr(_fmt_v6(addr, port)) == addr


def test_parse_table_skips_header_and_inode_zero() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
        "   0: 6400A8C0:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
        "        0 4242 1 0000000000000000 100 0 0 10 0\n"
        "   1: 6400A8C0:1B58 0A00A8C0:D1F2 06 00000000:00000000 03:00000F3A 00000000     0"
        "        0 0 3 0000000000000000\n"
    )
    assert netaddr.parse_proc_net(text) == {4242: ipaddress.IPv4Address("192.168.0.100")}


def test_parse_live_sockets_of_this_process() -> None:
    s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s4.bind(("127.0.0.2", 0))
        s4.listen()
        s6.bind(("::ffff:127.0.0.3", 0))
        ino4 = os.fstat(s4.fileno()).st_ino
        ino6 = os.fstat(s6.fileno()).st_ino
        tcp = netaddr.parse_proc_net(Path("/proc/self/net/tcp").read_text())
        udp6 = netaddr.parse_proc_net(Path("/proc/self/net/udp6").read_text())
        assert tcp[ino4] == ipaddress.IPv4Address("127.0.0.2")
        assert udp6[ino6] == ipaddress.IPv6Address("::ffff:127.0.0.3")
        # loopback addresses are never reported as addresses to move
        assert netaddr.tree_bound_addresses([os.getpid()]) == []
    finally:
        s4.close()
        s6.close()


def test_usable_addresses() -> None:
    u = netaddr._usable
    assert u(ipaddress.IPv4Address("10.1.2.3")) == ipaddress.IPv4Address("10.1.2.3")
    assert u(ipaddress.IPv6Address("::ffff:10.1.2.3")) == ipaddress.IPv4Address("10.1.2.3")
    assert u(ipaddress.IPv4Address("0.0.0.0")) is None
    assert u(ipaddress.IPv4Address("127.0.0.1")) is None
    assert u(ipaddress.IPv6Address("::")) is None
    assert u(ipaddress.IPv6Address("2001:db8::1")) is None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _inventory(run_id: str | None) -> bytes:
    msg = _varint(1 << 3) + _varint(2)  # img_version = 2 (varint)
    msg += _varint(5 << 3 | 5) + struct.pack("<I", 7)  # a fixed32
    msg += _varint(3 << 3 | 2) + _varint(3) + b"\x08\x01\x10"  # a nested message (skipped)
    msg += _varint(8 << 3) + _varint(2**40)  # dump_uptime
    if run_id is not None:
        raw = run_id.encode()
        msg += _varint(13 << 3 | 2) + _varint(len(raw)) + raw
    return struct.pack("<II", netaddr.INVENTORY_MAGIC, len(msg)) + msg


def test_run_id_from_images(tmp_path: Path) -> None:
    rid = "7f0f583e-6b3c-46cb-97a2-7f36155e1080"
    (tmp_path / "inventory.img").write_bytes(_inventory(rid))
    assert netaddr.run_id_from_images(tmp_path) == rid
    (tmp_path / "inventory.img").write_bytes(_inventory(None))
    with pytest.raises(netaddr.NetworkError, match="no dump run id"):
        netaddr.run_id_from_images(tmp_path)
    (tmp_path / "inventory.img").write_bytes(b"\0" * 16)
    with pytest.raises(netaddr.NetworkError, match="not a CRIU inventory"):
        netaddr.run_id_from_images(tmp_path)
    (tmp_path / "inventory.img").write_bytes(_inventory(rid)[:-40])
    with pytest.raises(netaddr.NetworkError):
        netaddr.run_id_from_images(tmp_path)
    with pytest.raises(netaddr.NetworkError, match="cannot read"):
        netaddr.run_id_from_images(tmp_path / "missing")


def test_lock_table_name_is_cut_like_criu() -> None:
    rid = "1e69b3bd-d710-4112-a7d4-620295aae6b1"
    # Observed with CRIU 4.2.1: "inet CRIU-<uuid>" in a char[32].
    assert netaddr.lock_table_name(rid) == "CRIU-1e69b3bd-d710-4112-a7"
    assert netaddr.lock_table_name("abc") == "CRIU-abc"


def test_remove_rejects_odd_names_before_running_nft() -> None:
    for bad in ("CRIU-x y", "CRIU-", "x;y", "CRIU-a/b"):
        with pytest.raises(netaddr.NetworkError, match="not a CRIU lock table"):
            netaddr.remove_criu_lock_tables(bad)
