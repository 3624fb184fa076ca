"""phaul.engine.netaddr and phaul.engine.garp on real namespaces, sockets, nftables and CRIU."""

from __future__ import annotations

import ipaddress
import time
import uuid
from pathlib import Path

import pytest

from phaul.engine import netaddr
from phaul.engine.garp import GarpSender
from tests.integration.conftest import CRIU
from tests.integration.lab import Host, Lab, Workload

pytestmark = pytest.mark.integration
IF = ipaddress.IPv4Interface


def _wait_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (t / "children").read_text().split()]
    return out


def _server(host: Host, addr: str, port: int, tmp: Path) -> Workload:
    ready = tmp / f"ready-{port}"
    wl = host.python_workload("tcp_server.py", addr, str(port), "--ready", str(ready))
    _wait_file(ready)
    return wl


def _probe(host: Host, addr: str, port: int, tmp: Path) -> None:
    ready = tmp / f"probe-ready-{port}"
    host.start_script(
        "tcp_probe.py", addr, str(port), str(tmp / f"probe-{port}.json"),
        "--interval-ms", "5", "--duration", "60", "--ready", str(ready),
    )  # fmt: skip
    _wait_file(ready)


def test_bound_addresses_of_server_on_vip(lab: Lab, tmp_path: Path) -> None:
    a = lab.host("a")
    vip = lab.vip()
    a.add_address(vip)
    wl = _server(a, vip.split("/")[0], 7100, tmp_path)
    assert a.call(netaddr.tree_bound_addresses, _tree(wl.root_pid)) == [IF(vip)]
    # The prefix comes from the local configuration: from the root namespace the address is
    # unknown, so it is reported as a host address.
    assert netaddr.tree_bound_addresses(_tree(wl.root_pid)) == [IF(vip.split("/")[0] + "/32")]


def test_wildcard_listener_reports_addresses_of_its_connections(lab: Lab, tmp_path: Path) -> None:
    a = lab.host("a")
    vip = lab.vip()
    a.add_address(vip)
    wl = _server(a, "0.0.0.0", 7101, tmp_path)
    assert a.call(netaddr.tree_bound_addresses, _tree(wl.root_pid)) == []
    _probe(lab.host("client"), vip.split("/")[0], 7101, tmp_path)
    assert a.call(netaddr.tree_bound_addresses, _tree(wl.root_pid)) == [IF(vip)]


def test_gone_pids_are_ignored() -> None:
    assert netaddr.tree_bound_addresses([2**22 + 7]) == []


def test_device_for(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    vip = IF(lab.vip())
    a.add_address(str(vip))
    assert a.call(netaddr.device_for, vip) == "eth0"  # holds it
    assert b.call(netaddr.device_for, vip) == "eth0"  # has the subnet route
    with pytest.raises(netaddr.NetworkError, match="no device"):
        b.call(netaddr.device_for, IF("192.0.2.1/32"))


def test_add_and_remove_address_are_idempotent(lab: Lab) -> None:
    b = lab.host("b")
    vip = IF(lab.vip())
    b.call(netaddr.add_address, vip, "eth0")
    b.call(netaddr.add_address, vip, "eth0")
    assert b.addresses().count(str(vip)) == 1
    assert vip in b.call(netaddr.local_addresses)
    lab.host("client").run(["ping", "-c", "1", "-W", "2", str(vip.ip)])
    b.call(netaddr.remove_address, vip, "eth0")
    assert str(vip) not in b.addresses()
    b.call(netaddr.remove_address, vip, "eth0")
    b.call(netaddr.remove_address, vip, "nosuchdev")
    with pytest.raises(netaddr.NetworkError, match="nosuchdev"):
        b.call(netaddr.add_address, vip, "nosuchdev")


def _tables(host: Host) -> list[str]:
    return host.call(netaddr.criu_lock_tables)


def test_remove_only_the_named_lock_table(lab: Lab) -> None:
    a = lab.host("a")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    names = [netaddr.lock_table_name(i) for i in ids]
    for n in names:
        a.run(["nft", "add", "table", "inet", n])
    a.run(["nft", "add", "table", "inet", "unrelated"])
    assert sorted(_tables(a)) == sorted(names)
    assert a.call(netaddr.remove_criu_lock_tables, ids[0]) == [names[0]]  # by run id
    assert a.call(netaddr.remove_criu_lock_tables, names[1]) == [names[1]]  # by table name
    assert _tables(a) == [names[2]]
    assert a.call(netaddr.remove_criu_lock_tables, ids[0]) == []  # already gone: fine
    assert a.call(netaddr.remove_criu_lock_tables, "all") == [names[2]]
    assert "unrelated" in a.run(["nft", "list", "tables"]).stdout
    with pytest.raises(netaddr.NetworkError):
        a.call(netaddr.remove_criu_lock_tables, "CRIU-x; flush ruleset")


def test_criu_dump_lock_table_is_found_and_removed(lab: Lab, tmp_path: Path) -> None:
    """A real CRIU dump (kill mode, nftables lock) leaves its table; we remove exactly it."""
    a = lab.host("a")
    vip = lab.vip()
    a.add_address(vip)
    wl = _server(a, vip.split("/")[0], 7102, tmp_path)
    _probe(lab.host("client"), vip.split("/")[0], 7102, tmp_path)
    other = netaddr.lock_table_name(str(uuid.uuid4()))  # a concurrent migration's lock
    a.run(["nft", "add", "table", "inet", other])
    img = tmp_path / "img"
    img.mkdir()
    a.run(
        [CRIU, "dump", "-t", str(wl.root_pid), "-D", str(img), "-o", "dump.log",
         "-v4", "--tcp-established", "--network-lock", "nftables"],
    )  # fmt: skip
    run_id = netaddr.run_id_from_images(img)
    assert run_id in (img / "dump.log").read_text()
    assert sorted(_tables(a)) == sorted([netaddr.lock_table_name(run_id), other])
    assert a.call(netaddr.remove_criu_lock_tables, run_id) == [netaddr.lock_table_name(run_id)]
    assert _tables(a) == [other]


def test_garp_moves_the_clients_neighbour_entry(lab: Lab) -> None:
    a, b, client = lab.host("a"), lab.host("b"), lab.host("client")
    vip = IF(lab.vip())
    a.add_address(str(vip))
    client.run(["ping", "-c", "1", "-W", "2", str(vip.ip)])
    assert client.neigh(str(vip.ip)) == a.mac
    a.del_address(str(vip))
    b.add_address(str(vip))
    with b.call(GarpSender, "eth0") as sender:
        assert sender.mac.hex(":") == b.mac
        t0 = time.perf_counter()
        sender.send(vip)
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.01  # well under a millisecond normally; loose for a loaded CI box
    deadline = time.monotonic() + 2
    while client.neigh(str(vip.ip)) != b.mac:
        assert time.monotonic() < deadline, f"client still maps {vip.ip} to a: GARP not applied"
        time.sleep(0.01)
    client.run(["ping", "-c", "1", "-W", "2", str(vip.ip)])


def test_garp_sender_errors(lab: Lab) -> None:
    from phaul.engine.garp import GarpError

    with pytest.raises(GarpError, match="nosuchdev"):
        lab.host("b").call(GarpSender, "nosuchdev")
    with pytest.raises(GarpError, match="not an Ethernet"):
        lab.host("b").call(GarpSender, "lo")
