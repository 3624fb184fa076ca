"""phaul/pb is committed generated code: it must equal what protobuf/generate.sh makes now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PB = REPO / "phaul" / "pb"


def _generate(out: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [str(REPO / "protobuf" / "generate.sh"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"protobuf/generate.sh failed:\n{proc.stderr}"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "__init__.py"}
    assert fresh, "generate.sh produced nothing"
    stale = sorted(name for name, data in fresh.items() if (PB / name).read_bytes() != data)
    missing = sorted(name for name in fresh if not (PB / name).exists())
    orphans = sorted(
        p.name
        for p in PB.iterdir()
        if (p.name.endswith(("_pb2.py", "_pb2.pyi"))) and p.name not in fresh
    )
    hint = "run protobuf/generate.sh and commit phaul/pb"
    assert not missing, f"not generated into phaul/pb: {missing}; {hint}"
    assert not stale, f"stale generated code in phaul/pb: {stale}; {hint}"
    assert not orphans, f"phaul/pb has modules without a .proto: {orphans}"


def test_criu_rpc_field_numbers_match_criu() -> None:
    """Spot-check the numbers that phaul relies on against CRIU's images/rpc.proto (v4.2)."""
    from phaul.pb import criu_rpc_pb2 as rpc

    opts = rpc.criu_opts.DESCRIPTOR.fields_by_name
    expected = {
        "images_dir_fd": 1,
        "pid": 2,
        "leave_running": 3,
        "ext_unix_sk": 4,
        "tcp_established": 5,
        "shell_job": 7,
        "file_locks": 8,
        "log_level": 9,
        "log_file": 10,
        "ps": 11,
        "notify_scripts": 12,
        "root": 13,
        "work_dir_fd": 17,
        "manage_cgroups": 24,
        "rst_sibling": 26,
        "external": 37,
        "lazy_pages": 48,
        "status_fd": 49,
        "orphan_pts_master": 50,
        "tcp_close": 52,
        "network_lock": 64,
        "images_dir": 68,
        "leave_stopped": 69,
    }
    assert {name: opts[name].number for name in expected} == expected
    assert rpc.NFTABLES == 2
    assert rpc.IPTABLES == 1
    assert rpc.RESTORE == 2
    assert rpc.NOTIFY == 6
    assert rpc.VERSION == 10
    # Wire bytes as CRIU's protobuf-c expects them: type=DUMP, opts{images_dir_fd=-1, pid=7}.
    req = rpc.criu_req(type=rpc.DUMP, opts=rpc.criu_opts(images_dir_fd=-1, pid=7))
    opts_bytes = b"\x08" + b"\xff" * 9 + b"\x01" + b"\x10\x07"
    assert req.SerializeToString() == b"\x08\x01\x12" + bytes([len(opts_bytes)]) + opts_bytes


def test_criu_stats_field_numbers_match_criu() -> None:
    from phaul.pb import criu_stats_pb2 as st

    dump = st.dump_stats_entry.DESCRIPTOR.fields_by_name
    assert dump["frozen_time"].number == 2
    assert dump["pages_written"].number == 7
    assert dump["pages_lazy"].number == 9
    rst = st.restore_stats_entry.DESCRIPTOR.fields_by_name
    assert rst["restore_time"].number == 4
    assert rst["pages_restored"].number == 5
