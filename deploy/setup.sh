#!/usr/bin/env bash
# Set up a fresh Debian host for phaul (and for phaul's test suite). Idempotent; a second run takes
# seconds. Run as root from the repository root:  deploy/setup.sh
#   1. system tools phaul drives or the tests use (iproute2, nftables, tini, sshd, ...)
#   2. CRIU >= 4.2 into /opt/phaul/criu (deploy/install-criu.sh)
#   3. a virtualenv in .venv with phaul and its development tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { echo "setup: $*" >&2; }

PKGS=(iproute2 nftables iptables tini openssh-server openssh-client iputils-ping procps psmisc
      gcc libc6-dev ca-certificates redis-server systemd)  # systemd: systemd-analyze (unit test)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts services on install; phaul's tests run their own sshd and redis per test host.
  systemctl disable --now ssh redis-server >/dev/null 2>&1 || true
fi

deploy/install-criu.sh /opt/phaul/criu
# phaul keeps CRIU's kernel-probe cache where /run is not a tmpfs; it must not outlive a boot.
install -D -m 0644 deploy/phaul-tmpfiles.conf /etc/tmpfiles.d/phaul.conf
# The final dump's private kdat redirect (phaul/engine/tracked_dump.py).
SHIM=/opt/phaul/lib/phaul-kdat-shim.so
if [ ! -f "$SHIM" ] || [ deploy/phaul-kdat-shim.c -nt "$SHIM" ]; then
  log "building $SHIM"
  mkdir -p /opt/phaul/lib
  gcc -O2 -Wall -shared -fPIC -o "$SHIM.tmp" deploy/phaul-kdat-shim.c -ldl && mv "$SHIM.tmp" "$SHIM"
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import phaul, pytest, ruff, mypy' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.phaul-installed ]; then
  log "installing phaul into .venv"
  # (pip's notes about this machine's local package folders are filtered out; errors still fail)
  .venv/bin/pip install -q -e '.[dev]' 2> >(grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' >&2)
  touch .venv/.phaul-installed
fi
log "done: CRIU $(/opt/phaul/criu/criu --version | sed -n 's/^Version: *//p'), $(.venv/bin/phaul --version)"
