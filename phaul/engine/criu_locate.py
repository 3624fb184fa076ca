"""Find the CRIU binary phaul runs, and check that it works on this host (``phaul check``).

Lookup order, first match wins:

1. an explicit path (``--criu``),
2. ``criu = "..."`` in ``/etc/phaul/phaul.toml``,
3. ``$PHAUL_CRIU``,
4. ``/opt/phaul/criu/criu`` (where ``deploy/install-criu.sh`` puts it),
5. ``criu`` on ``$PATH``.

A path that the operator named (1-3) is authoritative: if it is missing, not executable or too
old, that is an error, never a silent fall-through to the next candidate. The defaults (4, 5)
are tried in turn. CRIU must be >= 4.2: 4.1 cannot dump any IPv4/IPv6 socket on kernels >= 6.16
(``Can't get 1:16 opt``, fixed by CRIU commit 4b7398595).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import CriuNotFound

log = logging.getLogger(__name__)

CONFIG_PATH = Path("/etc/phaul/phaul.toml")
ENV_VAR = "PHAUL_CRIU"
DEFAULT_PATH = "/opt/phaul/criu/criu"
MIN_VERSION = (4, 2)
INSTALL_HINT = "run deploy/setup.sh (or deploy/install-criu.sh /opt/phaul/criu) to install CRIU"

_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
# Printed by every CRIU command on hosts without CAP_SYS_RESOURCE; harmless.
RLIMIT_NOISE = "Can't setup RLIMIT_NOFILE"


@dataclass(frozen=True)
class CriuBinary:
    """A CRIU executable that reported a usable version."""

    path: str
    version: str
    #: where the path came from: "argument", "config FILE", "$PHAUL_CRIU", "default", "PATH"
    source: str = ""


def parse_version(output: str) -> tuple[int, int, int] | None:
    """Parse ``criu --version`` output (``Version: 4.2.1``); None when there is no version."""
    m = _VERSION_RE.search(output)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def format_version(version: tuple[int, int, int]) -> str:
    return ".".join(str(v) for v in version)


def _config_criu(config_path: Path) -> str | None:
    try:
        with config_path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise CriuNotFound(f"cannot read {config_path}: {err}") from err
    value = data.get("criu")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CriuNotFound(f'{config_path}: "criu" must be a non-empty string (a path)')
    return value


def probe(path: str, source: str) -> CriuBinary:
    """Run ``PATH --version``; raise CriuNotFound unless it is a CRIU >= 4.2."""
    where = f"{path} (from {source})"
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except FileNotFoundError as err:
        raise CriuNotFound(f"CRIU {where} does not exist; {INSTALL_HINT}") from err
    except PermissionError as err:
        raise CriuNotFound(f"CRIU {where} is not executable; {INSTALL_HINT}") from err
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CriuNotFound(f"CRIU {where} cannot be run: {err}; {INSTALL_HINT}") from err
    version = parse_version(proc.stdout + proc.stderr)
    if proc.returncode != 0 or version is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise CriuNotFound(
            f"{where} is not a working CRIU ({path} --version: {last}); {INSTALL_HINT}"
        )
    if version[:2] < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise CriuNotFound(
            f"CRIU {where} is version {format_version(version)}, phaul needs >= {need} "
            f"(older CRIU cannot dump TCP sockets on this kernel); {INSTALL_HINT}"
        )
    return CriuBinary(path=path, version=format_version(version), source=source)


def find_criu(
    explicit: str | None = None,
    *,
    config_path: Path = CONFIG_PATH,
    env: Mapping[str, str] | None = None,
) -> CriuBinary:
    """Return the CRIU binary to use (lookup order in the module docstring).

    Raises CriuNotFound (with a hint to run deploy/setup.sh) when the configured one does not
    work or no candidate is found.
    """
    environ = os.environ if env is None else env
    if explicit:
        return probe(explicit, "argument")
    configured = _config_criu(config_path)
    if configured:
        return probe(configured, f"config {config_path}")
    from_env = environ.get(ENV_VAR)
    if from_env:
        return probe(from_env, f"${ENV_VAR}")
    errors: list[str] = []
    candidates: list[tuple[str, str]] = []
    if Path(DEFAULT_PATH).exists():
        candidates.append((DEFAULT_PATH, "default"))
    on_path = shutil.which("criu", path=environ.get("PATH", os.defpath))
    if on_path:
        candidates.append((on_path, "PATH"))
    for path, source in candidates:
        try:
            found = probe(path, source)
        except CriuNotFound as err:
            log.debug("skipping %s: %s", path, err)
            errors.append(err.message)
            continue
        log.debug("using CRIU %s %s from %s", found.version, found.path, found.source)
        return found
    tried = "; ".join(errors) if errors else f"nothing at {DEFAULT_PATH} or on PATH"
    raise CriuNotFound(f"no CRIU >= 4.2 found ({tried}); {INSTALL_HINT}")


def check_criu(criu: CriuBinary, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``criu check``: (True, "Looks good.") when CRIU works on this kernel, else (False, why).

    The RLIMIT_NOFILE line CRIU prints without CAP_SYS_RESOURCE is left out of the text.
    """
    try:
        proc = subprocess.run(
            [criu.path, "check"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"cannot run {criu.path} check: {err}"
    lines = [
        ln.strip()
        for ln in (proc.stdout + proc.stderr).splitlines()
        if ln.strip() and RLIMIT_NOISE not in ln
    ]
    text = "\n".join(lines) or f"exit status {proc.returncode}"
    ok = proc.returncode == 0 and "Looks good" in text
    return ok, text


def cmd_check(args: argparse.Namespace) -> int:
    """``phaul check``: which CRIU, where it came from, its version and whether it works here."""
    as_json = bool(getattr(args, "json", False))
    try:
        criu = find_criu(getattr(args, "criu", None))
    except CriuNotFound as err:
        if as_json:
            print(json.dumps({"ok": False, "error": err.message}))
        else:
            print(f"CRIU: not usable: {err.message}")
        return CriuNotFound.exit_code
    ok, text = check_criu(criu)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "path": criu.path,
                    "source": criu.source,
                    "version": criu.version,
                    "check": text,
                }
            )
        )
    else:
        print(f"CRIU:    {criu.path} (from {criu.source})")
        print(f"version: {criu.version}")
        print(f"check:   {'ok' if ok else 'FAILED'}: {text}")
        if not ok:
            print(f"CRIU does not work on this host; {INSTALL_HINT}, then see the log above")
    return 0 if ok else CriuNotFound.exit_code
