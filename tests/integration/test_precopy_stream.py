"""Pre-copy page stream end to end: a running memwriter -> PageSender -> socketpair ->
PrecopyReceiver (thread), two passes (the second after SIGSTOP), then the flat image must hold
exactly the stopped process's memory."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from phaul.engine import maps, pagemap
from phaul.engine.vmread import VmReader
from phaul.page_server.criu_image import read_pagemap
from phaul.page_server.precopy_receiver import PrecopyReceiver, ReceiveStats
from phaul.source.page_sender import PageSender
from tests.workloads.memwriter import Memwriter

pytestmark = pytest.mark.integration

P = 4096


def anon_present(pid: int) -> list[tuple[int, int]]:
    ms = [m for m in maps.private_writable_mappings(pid) if m.anonymous]
    return pagemap.present_ranges(pid, ms)


def stop(pid: int) -> None:
    """SIGSTOP and wait until every thread is stopped (the signal is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(s in "tT" for s in states):
            return
        assert time.monotonic() < deadline, f"{pid} did not stop: {states}"
        time.sleep(0.005)


def image_mismatches(images: Path, vpid: int, pid: int) -> list[int]:
    """Addresses of image pages that differ from the (stopped) process's memory."""
    pm = read_pagemap(images / f"pagemap-{vpid}.img")
    bad: list[int] = []
    reader = VmReader(pid, 16 << 20)
    with open(images / f"pages-{pm.pages_id}.img", "rb") as f:
        for e in pm.entries:
            want = f.read(e.nr_pages * P)
            assert len(want) == e.nr_pages * P
            got = b"".join(bytes(v) for _, v in reader.read([(e.vaddr, e.nr_pages * P)]))
            assert len(got) == len(want), f"entry {e.vaddr:#x} not readable in the process"
            if got != want:
                bad.extend(
                    e.vaddr + i * P
                    for i in range(e.nr_pages)
                    if got[i * P : (i + 1) * P] != want[i * P : (i + 1) * P]
                )
        assert f.read(1) == b""
    return bad


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_two_passes_reproduce_the_stopped_process(tmp_path: Path, codec: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with Memwriter.start(tmp_path / "mw", mib=64, rate=50, threads=1) as mw:
        a, b = socket.socketpair()
        box: dict[str, ReceiveStats | BaseException] = {}

        def serve() -> None:
            try:
                box["stats"] = PrecopyReceiver(images).serve(b)
            except BaseException as err:
                box["stats"] = err

        t = threading.Thread(target=serve)
        t.start()
        try:
            sender = PageSender(a, codec=codec)
            ranges1 = anon_present(mw.pid)
            st1 = sender.send_ranges(mw.pid, 1, ranges1)
            ack1 = sender.end_pass(1)
            stop(mw.pid)
            ranges2 = anon_present(mw.pid)
            st2 = sender.send_ranges(mw.pid, 1, ranges2)
            ack2 = sender.end_pass(2)
        finally:
            a.shutdown(socket.SHUT_WR)
            t.join(60)
            a.close()
            b.close()
        try:
            stats = box["stats"]
            assert isinstance(stats, ReceiveStats), stats
            assert stats.passes == 2
            assert ack1.pages == st1.pages and ack2.pages == st2.pages
            assert st1.pages >= mw.pages  # the whole 64 MiB buffer was present
            assert st2.dropped_pages == 0 and not st2.unreadable
            # Never more than the pages plus one header per 256 pages and per zero run.
            assert st1.bytes_wire <= st1.bytes_payload + 32 * (st1.pages // 64 + 64)
            # The image holds exactly what the second pass read: every present page.
            pm = read_pagemap(images / "pagemap-1.img")
            covered = maps.merge_ranges((e.vaddr, e.end) for e in pm.entries)
            assert maps.subtract_ranges(ranges2, covered) == []
            assert image_mismatches(images, 1, mw.pid) == []
            # Negative control: one corrupted page is caught.
            pages_file = images / f"pages-{pm.pages_id}.img"
            victim = pm.present_pages // 2
            with open(pages_file, "r+b") as f:
                f.seek(victim * P + 100)
                old = f.read(1)
                f.seek(victim * P + 100)
                f.write(bytes([old[0] ^ 0xFF]))
            assert len(image_mismatches(images, 1, mw.pid)) == 1
        finally:
            os.kill(mw.pid, signal.SIGCONT)
