"""Gratuitous ARP: tell the LAN that an address now lives behind this host's device.

After a migration the service address sits on the target, but the peers' neighbour caches
still map it to the source's MAC; without an announcement an established connection stalls
until their entries expire (14-30 s here, reference/criu-on-this-kernel.md §3). The target
sends one gratuitous ARP at the restore's ``pre-resume`` notify, before the tree runs again;
sent after resume it races with the first packets and costs a TCP retransmission timeout.

:class:`GarpSender` opens its AF_PACKET socket ahead of time (when the device is known), in
the network namespace of the calling thread, so that :meth:`GarpSender.send` is one
``send()`` system call, well under a millisecond, with no fork or exec in the freeze window.

The frame is an ARP *request* "who-has IP tell IP" (sender IP = target IP), broadcast, sender
MAC = the device's MAC, target MAC zero (RFC 5227 announcement, as ``arping -U`` sends).
Linux peers treat it as a GARP (``arp_is_garp``) and override an existing entry at once,
regardless of ``locktime``; with ``arp_accept=0`` they do not create new entries, which is
fine: a peer without an entry resolves the address afresh. The device's MAC comes from
``getsockname()`` of the bound packet socket, not from SIOCGIFHWADDR (whose ``struct ifreq``
shares a union with SIOCGIFINDEX's result, a classic source of a zeroed MAC).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

from phaul.errors import PhaulError

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
BROADCAST = b"\xff" * 6
ETH_ZLEN = 60  # minimum Ethernet frame without FCS

AddressLike = str | ipaddress.IPv4Address | ipaddress.IPv4Interface


class GarpError(PhaulError):
    """The gratuitous ARP socket could not be opened or the frame not sent."""

    code = "network"


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """The Ethernet frame of a gratuitous ARP request for ``ip`` from ``mac``."""
    if len(mac) != 6:
        raise ValueError(f"not an Ethernet MAC: {mac.hex(':')}")
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST)
    arp += mac + ip.packed + b"\x00" * 6 + ip.packed
    return (eth + arp).ljust(ETH_ZLEN, b"\x00")


def _as_ip(ip: AddressLike) -> ipaddress.IPv4Address:
    if isinstance(ip, ipaddress.IPv4Interface):
        return ip.ip
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ipaddress.IPv4Interface(ip).ip


class GarpSender:
    """A packet socket bound to ``dev`` (current namespace) that sends gratuitous ARPs.

    Raises GarpError if the device does not exist, is not Ethernet, or the socket cannot be
    opened (needs CAP_NET_RAW). Close it with :meth:`close` or use it as a context manager.
    """

    def __init__(self, dev: str) -> None:
        self.dev = dev
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        except OSError as err:
            raise GarpError(f"cannot open a packet socket for ARP on {dev}: {err}") from err
        try:
            self._sock.bind((dev, ETH_P_ARP))
            name = self._sock.getsockname()
        except OSError as err:
            self._sock.close()
            raise GarpError(f"cannot bind the ARP socket to {dev}: {err}") from err
        # (ifname, proto, pkttype, hatype, hwaddr)
        if name[3] != ARPHRD_ETHER or len(name[4]) != 6:
            self._sock.close()
            raise GarpError(f"{dev} is not an Ethernet device (hatype {name[3]})")
        self.mac: bytes = bytes(name[4])
        log.debug("GARP socket on %s (%s) ready", dev, self.mac.hex(":"))

    def send(self, ip: AddressLike) -> None:
        """Send one gratuitous ARP for ``ip`` now. Raises GarpError if the send fails."""
        addr = _as_ip(ip)
        try:
            self._sock.send(garp_frame(self.mac, addr))
        except OSError as err:
            raise GarpError(f"sending the gratuitous ARP for {addr} on {self.dev}: {err}") from err
        log.info("gratuitous ARP for %s sent on %s", addr, self.dev)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()

    def __enter__(self) -> GarpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
