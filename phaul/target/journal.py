"""The target's migration journal: what a restarted agent needs to clean up after a crash.

Each migration has ``WORKDIR/<id>/journal.json``, rewritten atomically (temp file, fsync, rename)
whenever the session's phase changes. It records the phase, the addresses added on this host
and the restored tree's root (PID + start time, never PID alone). At start-up the agent replays
every journal (:func:`recover`): a migration that had not reached COMMIT is rolled back — its
restored tree (which never ran) is killed, its addresses withdrawn, its images deleted — and one
that had committed keeps its tree; both keep their logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from phaul.phase import Phase

log = logging.getLogger(__name__)

NAME = "journal.json"


class Journal:
    def __init__(self, migration_dir: Path) -> None:
        self.path = migration_dir / NAME
        self.data: dict[str, Any] = {}

    def write(self, **fields: Any) -> None:
        self.data.update(fields)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.path)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def recover(workdir: Path) -> list[str]:
    """Roll back every journaled migration that had not committed; return their ids."""
    from phaul.engine import netaddr

    rolled: list[str] = []
    if not workdir.is_dir():
        return rolled
    for jpath in sorted(workdir.glob(f"*/{NAME}")):
        mdir = jpath.parent
        try:
            data = json.loads(jpath.read_text())
        except (OSError, ValueError):
            log.warning("unreadable journal %s: removing the migration's images", jpath)
            shutil.rmtree(mdir / "images", ignore_errors=True)
            continue
        phase = data.get("phase", "")
        if phase not in (Phase.COMMIT.value, Phase.DONE.value, Phase.ROLLED_BACK.value):
            pid, start = int(data.get("root_pid", 0)), data.get("root_start")
            if pid and start is not None and _start_time(pid) == start:
                log.warning("journal %s: killing restored tree %d that never ran", jpath, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for cidr, dev in data.get("addresses", []):
                try:
                    netaddr.remove_address(ipaddress.IPv4Interface(cidr), dev)
                except Exception:
                    log.exception("journal %s: could not remove %s from %s", jpath, cidr, dev)
            data["phase"] = Phase.ROLLED_BACK.value
            Journal(mdir).write(**data)
            rolled.append(mdir.name)
            log.warning("migration %s was interrupted in phase %s: rolled back", mdir.name, phase)
        shutil.rmtree(mdir / "images", ignore_errors=True)
        shutil.rmtree(mdir / "precopy", ignore_errors=True)
        shutil.rmtree(mdir / "daemon", ignore_errors=True)
    return rolled
