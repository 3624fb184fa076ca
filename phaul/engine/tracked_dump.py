"""A final dump after pre-copy that pins no memory: CRIU's incremental dump, fed by our tracker.

Why
---
A lazy final dump (phaul/engine/lazy_dump.py) makes CRIU walk and vmsplice every anonymous page
of the frozen tree into pipes: ~40 ms per 512 MiB here, the one part of the freeze that grows
with memory. CRIU can skip unchanged pages itself, in an incremental dump (``track_mem`` +
``parent_img``: an unchanged page becomes a ``PE_PARENT`` hole, no data, nothing pinned), but
it learns "unchanged" from the kernel's soft-dirty bits, and refuses ``track_mem`` on a kernel
without them (this one: ``kdat.has_dirty_track`` false).

phaul does not need the kernel's answer: after pre-copy it knows exactly which pages changed
(the uffd-wp or hash tracker), and the final pass has already sent them while CRIU dumps. So:

1. CRIU is told that dirty tracking works. It reads that from its kernel-probe cache; a copy
   with ``has_dirty_track`` set is given to the final dump's CRIU *only*, through
   ``deploy/phaul-kdat-shim.c`` (LD_PRELOAD: opens of ``/run/criu.kdat*`` go to
   ``$PHAUL_KDAT``). The host's cache and every other CRIU run are untouched. The copy is
   checked before use: the struct layout (offsets verified against the CRIU 4.2 sources and
   this cache's known fields) and ``criu check --feature mem_dirty_track`` under the shim.
2. On this kernel the soft-dirty bit reads 0, so CRIU declares *every* page unchanged: a
   ``PE_PARENT`` hole, checked against a parent pagemap. The parent is synthesized: per task
   one pagemap entry set covering all of user space, an empty pages file, and an
   ``inventory.img`` whose dump time is now (CRIU's pid-reuse check compares it with the
   tasks' start times).
3. At post-dump ``rewrite_final(parent_runs=True)`` treats CRIU's ``PE_PARENT`` runs as it
   treats a lazy dump's runs: pages phaul sent and that were not written since stay
   ``PE_PARENT`` (eager restore from the target's flat images) or become ``PE_LAZY`` (lazy
   restore); every other page is read from the frozen tree and written with its data.
   For a lazy restore only pages CRIU itself could leave lazy may stay lazy
   (:func:`lazy_ok_ranges`: private anonymous memory, not the page under a thread's stack
   pointer), the rest is read.

The dump is not a lazy dump: no page server, no pipes, no fd budget. It falls back to the lazy
dump (with the reason logged) when the shim is not installed, the cache layout is not the one
checked, the tree has shared anonymous memory (CRIU's shmem dump would look for a parent image
too) or locked memory (CRIU never makes locked memory lazy).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from phaul.engine import criu_kdat
from phaul.engine.criu_locate import CriuBinary
from phaul.engine.maps import Range, merge_ranges, read_maps
from phaul.errors import PhaulError
from phaul.page_server.criu_image import (
    INVENTORY_MAGIC,
    PE_PRESENT,
    PagemapEntry,
    _varint,
    frame_entry,
    pagemap_name,
    pages_name,
    write_pagemap,
)

log = logging.getLogger(__name__)

SHIM = Path(os.environ.get("PHAUL_KDAT_SHIM", "/opt/phaul/lib/phaul-kdat-shim.so"))
PAGE = 4096
#: struct kerndat_s (criu/include/kerndat.h, CRIU 4.2, x86_64): u32 magic1, magic2; dev_t
#: shmem_dev @8; int last_cap @16; u64 zero_page_pfn @24; bool has_dirty_track @32, has_memfd,
#: has_memfd_hugetlb, has_fdinfo_lock @33-35; unsigned long task_size @40.
OFF_LAST_CAP, OFF_DIRTY_TRACK, OFF_TASK_SIZE = 16, 32, 40
CRIU_IMAGES_V1_1 = 2
PARENT_PAGES_ID = 1 << 20
MAX_ENTRY_PAGES = 0xFFFF0000  # pagemap_entry.nr_pages is a u32

_verified: dict[str, str | None] = {}  # criu path -> None (works) or the reason it does not


class TrackedDumpUnavailable(PhaulError):
    """The tracked final dump cannot be used here; the lazy dump is used instead."""


@dataclass(frozen=True)
class TrackedDump:
    env: dict[str, str]  # for Swrk.spawn(extra_env=...)
    parent_img: str  # DumpOptions.parent_img (relative to the images dir)


def fake_kdat(cache: bytes) -> bytes:
    """``cache`` with ``has_dirty_track`` set, after checking that the layout is the expected
    one (fields whose values are known here). Raises TrackedDumpUnavailable."""
    if len(cache) < OFF_TASK_SIZE + 8:
        raise TrackedDumpUnavailable(f"CRIU's kdat cache is {len(cache)} bytes: unknown layout")
    (last_cap,) = struct.unpack_from("<i", cache, OFF_LAST_CAP)
    (task_size,) = struct.unpack_from("<Q", cache, OFF_TASK_SIZE)
    try:
        want_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        want_cap = -1
    flags = cache[OFF_DIRTY_TRACK : OFF_DIRTY_TRACK + 4]
    if (
        last_cap != want_cap
        or task_size < (1 << 39)
        or task_size % PAGE
        or any(b not in (0, 1) for b in flags)
    ):
        raise TrackedDumpUnavailable(
            "CRIU's kdat cache does not have the layout phaul knows (CRIU 4.2, x86_64)"
        )
    out = bytearray(cache)
    out[OFF_DIRTY_TRACK] = 1
    return bytes(out)


def task_size(cache: bytes) -> int:
    (size,) = struct.unpack_from("<Q", cache, OFF_TASK_SIZE)
    return int(size)


def _real_cache(criu: CriuBinary) -> bytes:
    criu_kdat.prime(criu)
    for _ in range(2):
        for rel in criu_kdat.CANDIDATES:
            path = criu_kdat.RUN / rel
            if path.is_file():
                return path.read_bytes()
        # A tmpfs /run whose cache CRIU has not written yet: any CRIU run writes it.
        subprocess.run([criu.path, "check"], capture_output=True, timeout=60, check=False)
    raise TrackedDumpUnavailable("CRIU wrote no kdat cache")


def _verify(criu: CriuBinary, env: dict[str, str]) -> None:
    """Once per CRIU binary: does CRIU, under the shim, take the copy?"""
    reason = _verified.get(criu.path, "")
    if reason == "":
        proc = subprocess.run(
            [criu.path, "check", "--feature", "mem_dirty_track"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **env},
        )  # fmt: skip
        ok = proc.returncode == 0 and "is supported" in proc.stdout + proc.stderr
        reason = None if ok else f"CRIU under the shim still says: {proc.stdout.strip()[:200]}"
        _verified[criu.path] = reason
    if reason is not None:
        raise TrackedDumpUnavailable(reason)


def check_tree(pids: list[int]) -> None:
    """Refuse trees whose memory the tracked dump cannot handle (TrackedDumpUnavailable)."""
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            maps = read_maps(pid)
        except OSError:
            continue  # gone: the dump itself will say so
        m = re.search(r"^VmLck:\s+(\d+)", status, re.M)
        if m and int(m.group(1)):
            raise TrackedDumpUnavailable(f"process {pid} has locked memory")
        for mp in maps:
            shared = "s" in mp.perms
            anon = mp.inode == 0 or mp.path.startswith(("/dev/zero", "/memfd:", "/SYSV"))
            if shared and anon:
                raise TrackedDumpUnavailable(f"process {pid} has shared anonymous memory")


def prepare(criu: CriuBinary, workdir: Path, vpids: list[int], pids: list[int]) -> TrackedDump:
    """Everything the tracked final dump needs, in ``workdir`` (next to the images dir).
    Raises TrackedDumpUnavailable (use the lazy dump)."""
    if not SHIM.is_file():
        raise TrackedDumpUnavailable(f"{SHIM} is not installed (deploy/setup.sh builds it)")
    check_tree(pids)
    cache = _real_cache(criu)
    fake = workdir / "criu.kdat"
    fake.write_bytes(fake_kdat(cache))
    env = {"LD_PRELOAD": str(SHIM), "PHAUL_KDAT": str(fake)}
    _verify(criu, env)
    parent = workdir / "tracked-parent"
    write_parent(parent, vpids, task_size(cache))
    return TrackedDump(env=env, parent_img=f"../{parent.name}")


def write_parent(parent: Path, vpids: list[int], user_end: int) -> None:
    """The synthesized parent image: every task's whole user space "in the parent"."""
    parent.mkdir(parents=True, exist_ok=True)
    entries: list[PagemapEntry] = []
    start = PAGE
    while start < user_end:
        n = min((user_end - start) // PAGE, MAX_ENTRY_PAGES)
        entries.append(PagemapEntry(start, n, PE_PRESENT))
        start += n * PAGE
    for vpid in vpids:
        write_pagemap(parent / pagemap_name(vpid), PARENT_PAGES_ID, entries)
    (parent / pages_name(PARENT_PAGES_ID)).touch()
    # inventory_entry: img_version (1) and dump_uptime (8, microseconds since boot): CRIU takes
    # a task that started after the parent dump for a reused pid (and dumps it in full).
    uptime_us = int(float(Path("/proc/uptime").read_text().split()[0]) * 1e6) + 10_000_000
    payload = bytes([1 << 3, CRIU_IMAGES_V1_1, 8 << 3]) + _varint(uptime_us)
    (parent / "inventory.img").write_bytes(
        struct.pack("<I", INVENTORY_MAGIC) + frame_entry(payload)
    )


def lazy_ok_ranges(pid: int) -> list[Range]:
    """Where CRIU itself would allow lazy pages in the frozen ``pid``: private anonymous
    mappings (not vdso/vvar/vsyscall), minus the page under each thread's stack pointer (CRIU's
    restorer writes there before the lazy-pages daemon serves anything; criu/mem.c is_stack).
    Raises OSError when the process is gone."""
    anon = [
        (m.start, m.end)
        for m in read_maps(pid)
        if "p" in m.perms and m.inode == 0 and m.path in ("", "[heap]", "[stack]")
    ]
    sps: list[Range] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if len(fields) >= 3 and fields[0] != "running":
            sp = int(fields[-2], 16) & ~(PAGE - 1)
            sps.append((sp, sp + PAGE))
        else:  # unknown SP: no lazy page for this process at all
            return []
    return _subtract(merge_ranges(anon), merge_ranges(sps))


def _subtract(ranges: list[Range], minus: list[Range]) -> list[Range]:
    out: list[Range] = []
    j = 0
    for start, end in ranges:
        cur = start
        while j < len(minus) and minus[j][1] <= cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < end:
            if minus[k][0] > cur:
                out.append((cur, minus[k][0]))
            cur = max(cur, minus[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out
