"""Pure parts of the CRIU driver: stats images and log error extraction."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from phaul.engine.criu_swrk import (
    IMG_SERVICE_MAGIC,
    STATS_MAGIC,
    DumpOptions,
    RestoreOptions,
    log_errors,
    read_stats,
)
from phaul.errors import CriuError
from phaul.pb import criu_stats_pb2


def _stats_file(
    path: Path, entry: criu_stats_pb2.stats_entry, head: int = IMG_SERVICE_MAGIC
) -> None:
    body = entry.SerializePartialToString()
    path.write_bytes(struct.pack("<III", head, STATS_MAGIC, len(body)) + body)


def test_read_dump_stats(tmp_path: Path) -> None:
    entry = criu_stats_pb2.stats_entry()
    d = entry.dump
    d.freezing_time, d.frozen_time, d.memdump_time, d.memwrite_time = 1069, 47043, 10965, 6385
    d.pages_scanned, d.pages_skipped_parent, d.pages_written, d.pages_lazy = 1306, 0, 1234, 0
    _stats_file(tmp_path / "stats-dump", entry)
    got = read_stats(tmp_path, "dump")
    assert got["frozen_time"] == 47043
    assert got["pages_written"] == 1234
    assert "page_pipes" not in got  # optional and absent


def test_read_restore_stats(tmp_path: Path) -> None:
    entry = criu_stats_pb2.stats_entry()
    r = entry.restore
    r.pages_compared, r.pages_skipped_cow, r.forking_time, r.restore_time = 0, 0, 583, 39705
    r.pages_restored = 1234
    _stats_file(tmp_path / "stats-restore", entry)
    assert read_stats(str(tmp_path), "restore") == {
        "pages_compared": 0,
        "pages_skipped_cow": 0,
        "forking_time": 583,
        "restore_time": 39705,
        "pages_restored": 1234,
    }


def test_read_stats_rejects_bad_files(tmp_path: Path) -> None:
    entry = criu_stats_pb2.stats_entry()
    entry.restore.restore_time = 1
    _stats_file(tmp_path / "stats-restore", entry, head=0x54564319)  # IMG_COMMON, wrong here
    with pytest.raises(CriuError, match="not a CRIU stats image"):
        read_stats(tmp_path, "restore")
    (tmp_path / "stats-restore").write_bytes(
        struct.pack("<III", IMG_SERVICE_MAGIC, STATS_MAGIC, 50)
    )
    with pytest.raises(CriuError, match="truncated"):
        read_stats(tmp_path, "restore")
    (tmp_path / "stats-restore").write_bytes(b"\x01\x02")
    with pytest.raises(CriuError, match="truncated"):
        read_stats(tmp_path, "restore")
    with pytest.raises(FileNotFoundError):
        read_stats(tmp_path, "dump")
    with pytest.raises(ValueError, match="kind"):
        read_stats(tmp_path, "pre-dump")  # type: ignore[arg-type]


LOG = """\
(00.000000) Version: 4.2.1 (gitid 0)
(00.000050) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE (1 -> 1): EPERM
(00.010000) Warn  (criu/x.c:1): harmless
(00.020000) Error (criu/cr-restore.c:1237): Can't fork for 9987: File exists
(00.020010) Error (criu/cr-restore.c:2460): Restoring FAILED.
"""


def test_log_errors_skip_the_rlimit_line(tmp_path: Path) -> None:
    log = tmp_path / "restore.log"
    log.write_text(LOG)
    assert log_errors(log) == [
        "Error (criu/cr-restore.c:1237): Can't fork for 9987: File exists",
        "Error (criu/cr-restore.c:2460): Restoring FAILED.",
    ]
    assert log_errors(log, limit=1) == ["Error (criu/cr-restore.c:2460): Restoring FAILED."]
    assert log_errors(tmp_path / "missing.log") == []


def test_option_defaults_follow_the_verified_recipe(tmp_path: Path) -> None:
    d = DumpOptions(pid=1, images_dir=tmp_path)
    assert (d.tcp_established, d.network_lock, d.log_level) == (True, "nftables", 4)
    r = RestoreOptions(images_dir=tmp_path)
    assert r.rst_sibling and r.tcp_established and r.root is None
