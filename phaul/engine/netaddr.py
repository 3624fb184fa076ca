"""The network identity of a process tree: which addresses it uses, and moving them.

Everything here acts in the network namespace of the *calling thread*: phaul's source and its
agent run inside their host's namespace, so the addresses they add or remove and the nftables
tables they delete are that host's. Netlink goes through pyroute2's ``IPRoute`` (no parsing of
``ip`` output). The tree's sockets are read from ``/proc/PID/fd`` and ``/proc/PID/net/{tcp,udp}
[6]`` of the tree's own processes, so a tree in another namespace is read correctly too.

CRIU's nftables network lock (``--network-lock nftables``) creates ``table inet CRIU-<run id>``
in the dumped tree's namespace, where ``<run id>`` is the dump's ``criu_run_id`` (a UUID,
CRIU criu/netfilter.c ``nftables_get_table``, criu/util.c ``util_init``), cut to its first 21
characters by CRIU's 32-byte buffer (:func:`lock_table_name`). CRIU also records it
in the images (``inventory.img``, field 13 ``dump_criu_run_id``) so that the restore side
unlocks the same table. After a dump that leaves the source locked (the source is then killed
or the dump is committed), the table stays behind in the source namespace; remove it with
:func:`remove_criu_lock_tables` naming that run's table, never all of them while another
migration may be running. Tables are listed with ``nft -j list tables`` and deleted with
``nft delete table inet NAME`` (argument lists, no shell), so the host needs the nftables CLI.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from phaul.errors import PhaulError

log = logging.getLogger(__name__)

LOCK_TABLE_PREFIX = "CRIU-"
INVENTORY_MAGIC = 0x58313116  # criu/include/magic.h
_INVENTORY_RUN_ID_FIELD = 13  # images/inventory.proto: dump_criu_run_id
_CRIU_TABLE_NAME_MAX = 32 - 1 - len("inet ")  # char table[32] incl. NUL, minus the family
_TABLE_RE = re.compile(r"^CRIU-[0-9A-Za-z-]+$")


class NetworkError(PhaulError):
    """Adding, removing or finding an address, or cleaning CRIU's lock, failed."""

    code = "network"
    exit_code = 1


# -- which addresses does a tree use ----------------------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except FileNotFoundError:
        return inodes  # the process is gone: it has no sockets
    except PermissionError as err:
        raise NetworkError(f"cannot read the sockets of PID {pid}: {err}") from err
    for entry in entries:
        try:
            target = str(entry.readlink())
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def parse_proc_net_addr(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a ``/proc/net/{tcp,udp}[6]`` ``ADDR:PORT`` field (host byte order words)."""
    hexaddr = field.split(":", 1)[0]
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    if len(raw) == 16:
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return ipaddress.IPv6Address(words)
    raise ValueError(f"bad /proc/net address field {field!r}")


def parse_proc_net(text: str) -> dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Map socket inode -> local address for the lines of a ``/proc/net/{tcp,udp}[6]`` file."""
    out: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        inode = int(cols[9])
        if inode:
            out[inode] = parse_proc_net_addr(cols[1])
    return out


def _usable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return None
        addr = mapped
    if addr.is_unspecified or addr.is_loopback:
        return None
    return addr


def local_addresses() -> list[ipaddress.IPv4Interface]:
    """Every IPv4 address configured in the current namespace, with its prefix."""
    with IPRoute() as ipr:
        msgs = ipr.get_addr(family=socket.AF_INET)
    return [
        ipaddress.IPv4Interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/"
                                f"{m['prefixlen']}")
        for m in msgs
    ]  # fmt: skip


IFA_F_SECONDARY = 0x01


def primary_addresses() -> set[ipaddress.IPv4Address]:
    """The primary (first, non-secondary) IPv4 address of every device: the host's identity.

    Service addresses that move with a workload are secondary addresses of a device; a host's
    primary address is never moved automatically (a tree that connects out from it reports it).
    """
    with IPRoute() as ipr:
        msgs = ipr.get_addr(family=socket.AF_INET)
    return {
        ipaddress.IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
        for m in msgs
        if not (int(m.get_attr("IFA_FLAGS") or m["flags"]) & IFA_F_SECONDARY)
    }


def movable_addresses(pids: Iterable[int]) -> list[ipaddress.IPv4Interface]:
    """The addresses to move with the tree: bound by its sockets, secondary on this host."""
    primary = primary_addresses()
    return [a for a in tree_bound_addresses(pids) if a.ip not in primary]


def tree_bound_addresses(pids: Iterable[int]) -> list[ipaddress.IPv4Interface]:
    """The IPv4 addresses the tree's TCP and UDP sockets are bound to, with their prefix.

    Wildcard and loopback addresses are left out; IPv4-mapped addresses of IPv6 sockets count.
    Both listening and connected sockets count (a connection accepted by a wildcard listener
    on a service address still needs that address on the target), so a tree that connects out
    from the host's own primary address reports it too: callers decide which to move. The
    prefix length is that of the address as configured on a local interface (current
    namespace); an address not configured here is reported as /32. Sorted, no duplicates.
    Processes that vanished meanwhile are ignored. Raises NetworkError if /proc is unreadable.
    """
    wanted: dict[int, set[int]] = {}  # netns inode -> socket inodes
    ns_pid: dict[int, int] = {}
    for pid in pids:
        inodes = _socket_inodes(pid)
        if not inodes:
            continue
        try:
            ns = Path(f"/proc/{pid}/ns/net").stat().st_ino
        except FileNotFoundError:
            continue
        wanted.setdefault(ns, set()).update(inodes)
        ns_pid.setdefault(ns, pid)
    found: set[ipaddress.IPv4Address] = set()
    for ns, inodes in wanted.items():
        for table in ("tcp", "tcp6", "udp", "udp6"):
            try:
                text = Path(f"/proc/{ns_pid[ns]}/net/{table}").read_text()
            except FileNotFoundError:
                continue  # no IPv6, or the process is gone
            for inode, addr in parse_proc_net(text).items():
                v4 = _usable(addr) if inode in inodes else None
                if v4 is not None:
                    found.add(v4)
    if not found:
        return []
    local = {i.ip: i for i in local_addresses()}
    result = []
    for addr in sorted(found):
        iface = local.get(addr)
        if iface is None:
            log.warning("address %s used by the tree is not configured here; using /32", addr)
            iface = ipaddress.IPv4Interface(f"{addr}/32")
        result.append(iface)
    return result


# -- moving addresses ---------------------------------------------------------------------------


def device_for(iface: ipaddress.IPv4Interface) -> str:
    """The device that holds ``iface``'s address, or else has a direct route to its subnet.

    Among direct (gateway-less) routes of the main table the longest prefix containing the
    address wins. Raises NetworkError when no device fits.
    """
    with IPRoute() as ipr:
        for m in ipr.get_addr(family=socket.AF_INET):
            if (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) == str(iface.ip):
                return _ifname(ipr, int(m["index"]))
        best: tuple[int, int] | None = None
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            if r.get_attr("RTA_GATEWAY") or r.get_attr("RTA_OIF") is None:
                continue
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            net = ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False)
            if iface.ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, int(r.get_attr("RTA_OIF")))
        if best is None:
            raise NetworkError(f"no device here holds {iface} or has a direct route to it")
        return _ifname(ipr, best[1])


def _ifname(ipr: IPRoute, index: int) -> str:
    links = ipr.get_links(index)
    if not links:
        raise NetworkError(f"interface index {index} vanished")
    return str(links[0].get_attr("IFLA_IFNAME"))


def _ifindex(ipr: IPRoute, dev: str) -> int:
    idx = ipr.link_lookup(ifname=dev)
    if not idx:
        raise NetworkError(f"no network device {dev!r} here")
    return int(idx[0])


def add_address(iface: ipaddress.IPv4Interface, dev: str) -> None:
    """Add ``iface`` (address/prefix) to ``dev``; nothing happens if it is already there."""
    with IPRoute() as ipr:
        index = _ifindex(ipr, dev)
        try:
            ipr.addr(
                "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                broadcast=str(iface.network.broadcast_address),
            )  # fmt: skip
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise NetworkError(f"cannot add {iface} to {dev}: {err}") from err
            log.debug("%s already on %s", iface, dev)
        else:
            log.info("added %s to %s", iface, dev)


def remove_address(iface: ipaddress.IPv4Interface, dev: str) -> None:
    """Remove ``iface`` from ``dev``; nothing happens if it is not there (or ``dev`` is gone)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            log.debug("%s: no device %s, nothing to remove", iface, dev)
            return
        try:
            ipr.addr(
                "del", index=int(idx[0]), address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as err:
            if err.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise NetworkError(f"cannot remove {iface} from {dev}: {err}") from err
            log.debug("%s not on %s", iface, dev)
        else:
            log.info("removed %s from %s", iface, dev)


# -- CRIU's network lock leftovers --------------------------------------------------------------


def lock_table_name(run_id: str) -> str:
    """The nftables table (family inet) CRIU's network lock uses for the dump ``run_id``.

    CRIU formats ``"inet CRIU-<run id>"`` into a ``char table[32]`` (criu/net.c,
    criu/netfilter.c), so the name is cut to 26 characters: "CRIU-" and the first 21
    characters of the UUID (checked with CRIU 4.2.1).
    """
    return f"{LOCK_TABLE_PREFIX}{run_id}"[:_CRIU_TABLE_NAME_MAX]


def run_id_from_images(images_dir: str | os.PathLike[str]) -> str:
    """The ``dump_criu_run_id`` recorded in ``images_dir/inventory.img``.

    inventory.img is the u32 INVENTORY_MAGIC, a u32 length and one inventory_entry message
    (criu/image.c); field 13 is a string. Raises NetworkError when it is missing or malformed.
    """
    path = Path(images_dir) / "inventory.img"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise NetworkError(f"cannot read {path}: {err}") from err
    if len(data) < 8 or struct.unpack_from("<I", data)[0] != INVENTORY_MAGIC:
        raise NetworkError(f"{path} is not a CRIU inventory image")
    (size,) = struct.unpack_from("<I", data, 4)
    msg = data[8 : 8 + size]
    for field, value in _pb_fields(msg):
        if field == _INVENTORY_RUN_ID_FIELD and isinstance(value, bytes):
            return value.decode()
    raise NetworkError(f"{path} records no dump run id (CRIU < 3.17?)")


def _pb_fields(msg: bytes) -> Iterable[tuple[int, int | bytes]]:
    """Walk the top-level (field number, value) pairs of a protobuf message."""

    def varint(pos: int) -> tuple[int, int]:
        val = shift = 0
        while True:
            if pos >= len(msg):
                raise NetworkError("truncated protobuf varint in inventory.img")
            b = msg[pos]
            pos += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return val, pos

    pos = 0
    while pos < len(msg):
        key, pos = varint(pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = varint(pos)
            yield field, val
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = varint(pos)
            yield field, msg[pos : pos + n]
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise NetworkError(f"unsupported protobuf wire type {wire} in inventory.img")


def _nft(*args: str) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise NetworkError("the nftables CLI (nft) is needed to clean CRIU's network lock")
    return subprocess.run([nft, *args], capture_output=True, text=True, check=False)


def criu_lock_tables() -> list[str]:
    """Names of the ``inet CRIU-*`` tables in the current network namespace."""
    res = _nft("-j", "list", "tables", "inet")
    if res.returncode != 0:
        raise NetworkError(f"nft list tables failed: {res.stderr.strip()}")
    data = json.loads(res.stdout or '{"nftables": []}')
    return [
        str(item["table"]["name"])
        for item in data.get("nftables", [])
        if "table" in item and str(item["table"]["name"]).startswith(LOCK_TABLE_PREFIX)
    ]


def remove_criu_lock_tables(which: str | None) -> list[str]:
    """Delete CRIU network-lock tables in the current namespace; return the names deleted.

    ``which`` is a table name as listed by nft (``CRIU-...``), a dump's run id (see
    :func:`run_id_from_images`), or ``"all"`` / None for every ``CRIU-*`` table (only when no
    other migration can be running in this namespace). A named table that is not there is
    not an error (the lock may already have been released). Raises NetworkError when nft fails.
    """
    if which is None or which == "all":
        names = criu_lock_tables()
    else:
        name = which if which.startswith(LOCK_TABLE_PREFIX) else lock_table_name(which)
        if not _TABLE_RE.match(name):
            raise NetworkError(f"{which!r} is not a CRIU lock table name or run id")
        names = [name] if name in criu_lock_tables() else []
    deleted = []
    for name in names:
        res = _nft("delete", "table", "inet", name)
        if res.returncode != 0:
            if name not in criu_lock_tables():
                continue  # released concurrently
            raise NetworkError(f"cannot delete nft table inet {name}: {res.stderr.strip()}")
        log.info("removed CRIU network lock table inet %s", name)
        deleted.append(name)
    return deleted
