"""Keep CRIU's kernel-probe cache (``/run/criu.kdat``) in place where CRIU cannot.

Every CRIU request starts with ``kerndat_init()``: about 50 probes of the kernel (netlink,
nftables, vdso, uffd, ...), 50-65 ms here. CRIU saves the result to ``/run/criu.kdat`` and
loads it next time, but only saves it when ``/run`` is a tmpfs (so that a reboot into another
kernel cannot leave a stale cache behind; criu/kerndat.c ``kerndat_save_cache``). Loading does
not check the file system.

On hosts where ``/run`` is not a tmpfs (this VM: ext3) every dump and every restore pays the
probes again, and a restore pays them inside the freeze: ``Swrk.restore`` is called after the
tree is frozen on the source, and the probes run before CRIU restores anything. :func:`prime`
makes CRIU write its own cache inside a private mount namespace with a tmpfs on ``/run`` and
installs that file at the real path, with a stamp (boot id, kernel, CRIU binary) next to it in
``/run/phaul``; a stamp that no longer matches (reboot, other kernel, other CRIU) makes it
probe again. Where ``/run`` is a tmpfs nothing is done: CRIU keeps its cache itself.

A cache that outlives a reboot into another kernel would mislead other CRIU users on the host
until phaul runs again: ``deploy/setup.sh`` installs a systemd-tmpfiles rule that removes the
file at boot, and the stamp guards phaul's own runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from phaul.engine.criu_locate import CriuBinary

log = logging.getLogger(__name__)

RUN = Path("/run")
STAMP_DIR = Path("/run/phaul")
#: where CRIU builds look for the cache (KDAT_RUNDIR is /run in Debian's, /run/criu upstream)
CANDIDATES = ("criu.kdat", "criu/criu.kdat")
TMPFS_MAGIC = 0x01021994
PROBE_TIMEOUT = 30.0

_SCRIPT = r"""
mount -t tmpfs -o size=4m,mode=0755 phaul-kdat /run || exit 90
"$1" check >/dev/null 2>&1
for f in criu.kdat criu/criu.kdat; do
    if [ -f "/run/$f" ]; then cp "/run/$f" "$2" && echo "$f" && exit 0; fi
done
exit 91
"""


def run_is_tmpfs(run: Path = RUN) -> bool:
    try:
        return _fs_type(run) == TMPFS_MAGIC
    except OSError:
        return False


def _fs_type(path: Path) -> int:
    """statfs(2) f_type (os.statvfs does not expose it)."""
    import ctypes
    import ctypes.util

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = Statfs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def stamp_for(criu: CriuBinary) -> str:
    """What the cache was probed for: this boot, this kernel, this CRIU binary."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    mtime = Path(criu.path).stat().st_mtime_ns
    return f"boot={boot} kernel={os.uname().release} criu={criu.path} {criu.version} {mtime}\n"


def prime(criu: CriuBinary, *, run: Path = RUN, stamp_dir: Path = STAMP_DIR) -> str:
    """Make sure CRIU finds a current kernel-probe cache. Never raises: a failure only costs
    time. Returns what was done: "tmpfs" (CRIU keeps its own), "cached" (ours is current),
    "primed" (probed now), or "failed: ..."."""
    if run_is_tmpfs(run):
        return "tmpfs"
    try:
        stamp = stamp_for(criu)
        stamp_file = stamp_dir / "criu-kdat.stamp"
        current = next((run / c for c in CANDIDATES if (run / c).is_file()), None)
        with contextlib.suppress(OSError):
            if current is not None and stamp_file.read_text() == stamp:
                return "cached"
        rel, data = _probe(criu)
        dest = run / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        _install(dest, data)
        stamp_dir.mkdir(parents=True, exist_ok=True)
        _install(stamp_file, stamp.encode())
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        log.debug("could not prime CRIU's kdat cache: %s", err)
        return f"failed: {err}"
    log.debug("primed CRIU's kdat cache at %s", dest)
    return "primed"


def _install(dest: Path, data: bytes) -> None:
    """Write ``dest`` atomically (mode 0600): a concurrent CRIU reads the old or the new."""
    fd, name = tempfile.mkstemp(prefix=".phaul-", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    Path(name).replace(dest)


def _probe(criu: CriuBinary) -> tuple[str, bytes]:
    """Run ``criu check`` with a private tmpfs on /run; returns (path under /run, cache)."""
    with tempfile.TemporaryDirectory(prefix="phaul-kdat-") as tmp:
        out = Path(tmp) / "kdat"
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, "phaul-kdat",
             criu.path, str(out)],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False,
        )  # fmt: skip
        rel = proc.stdout.strip()
        if proc.returncode != 0 or rel not in CANDIDATES or not out.is_file():
            raise RuntimeError(
                f"criu check in a private /run gave no cache (exit {proc.returncode}: "
                f"{proc.stderr.strip()[:200]})"
            )
        return rel, out.read_bytes()
