#!/usr/bin/env bash
# Install a CRIU >= 4.2 that works on this kernel into a private prefix (default /opt/phaul/criu).
#
# Why: bookworm's criu 3.17 fails on kernel 6.x (vDSO layout) and trixie's 4.1.1 cannot dump any
# INET socket on kernels >= 6.16 ("Can't get 1:16 opt", fixed in CRIU 4.2, commit 4b7398595).
# Debian forky/sid ship 4.2.x. We fetch that package and its runtime libraries with apt and a
# private sources list (the host's dpkg state is not touched), unpack them with `dpkg -x` and run
# criu through the prefix's own dynamic loader (the prefix's glibc is newer than the host's).
#
# Usage: deploy/install-criu.sh [PREFIX]      env: PHAUL_CRIU_SUITES="forky sid"
# Idempotent: if PREFIX/criu already passes `criu check` with version >= 4.2, nothing is done.
set -euo pipefail

PREFIX=${1:-/opt/phaul/criu}
SUITES=${PHAUL_CRIU_SUITES:-"forky sid"}
# Pinned sha256 of the criu package, by version: a pinned version whose download differs is
# refused. forky and sid move, so a newer version not listed here is accepted with a warning (apt
# has verified the Debian archive's signature; the version check >= 4.2 and `criu check` still
# apply) unless PHAUL_CRIU_REQUIRE_PINNED=1; add its line here once checked.
declare -A PINNED=(
  [4.2.1-1]="4039578de7dd6480964754c1348416f0f0658fba3eadaa918bfe43e9a5fb9b04"
)

log() { echo "install-criu: $*" >&2; }

version_ok() {  # $1 = criu binary
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}; local minor=${rest%%.*}
  [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 2 ]; }
}

works() {  # $1 = criu binary
  version_ok "$1" && "$1" check >/dev/null 2>&1
}

if [ -x "$PREFIX/criu" ] && works "$PREFIX/criu"; then
  log "CRIU $("$PREFIX/criu" --version | sed -n 's/^Version: *//p') already installed at $PREFIX/criu"
  exit 0
fi
# The distro's criu, if new enough and working, is used as is (phaul finds it on PATH).
if command -v criu >/dev/null 2>&1 && works "$(command -v criu)"; then
  mkdir -p "$PREFIX"
  ln -sfn "$(command -v criu)" "$PREFIX/criu"
  log "using the system's CRIU $(criu --version | sed -n 's/^Version: *//p')"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/phaul-criu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
for SUITE in $SUITES; do
  log "fetching criu from Debian $SUITE"
  S=$WORK/$SUITE
  mkdir -p "$S/lists/partial" "$S/cache/archives/partial" "$S/debs" "$S/root"
  echo "deb http://deb.debian.org/debian $SUITE main" > "$S/sources.list"
  A=(-o "Dir::Etc::SourceList=$S/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$S/lists" -o Dir::State::status=/dev/null -o "Dir::Cache=$S/cache"
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  if ! apt-get "${A[@]}" update >"$S/update.log" 2>&1; then
    log "apt-get update for $SUITE failed (see below)"; tail -5 "$S/update.log" >&2; continue
  fi
  PKGS=$(apt-cache "${A[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
         --no-breaks --no-replaces --no-enhances criu | grep -v '^ ' | grep -v '^<' | sort -u)
  (cd "$S/debs" && apt-get "${A[@]}" download $PKGS >"$S/download.log" 2>&1) || {
    log "download from $SUITE failed"; tail -5 "$S/download.log" >&2; continue; }
  DEB=$(ls "$S"/debs/criu_*.deb)
  VER=$(dpkg-deb -f "$DEB" Version)
  SUM=$(sha256sum "$DEB" | cut -d' ' -f1)
  if [ -n "${PINNED[$VER]+x}" ] && [ -n "${PINNED[$VER]}" ] && [ "${PINNED[$VER]}" != "$SUM" ]; then
    log "criu $VER from $SUITE has sha256 $SUM, expected ${PINNED[$VER]}: refusing"; continue
  fi
  if [ -z "${PINNED[$VER]+x}" ]; then
    if [ "${PHAUL_CRIU_REQUIRE_PINNED:-0}" = 1 ]; then
      log "criu $VER from $SUITE is not pinned in $0 (sha256 $SUM): refusing (PHAUL_CRIU_REQUIRE_PINNED=1)"
      continue
    fi
    log "WARNING: criu $VER from $SUITE is not pinned in $0; accepting it (sha256 $SUM, signature checked by apt)"
  fi
  for d in "$S"/debs/*.deb; do dpkg -x "$d" "$S/root"; done
  L=$S/root/usr/lib/x86_64-linux-gnu
  # Stage into the final prefix atomically.
  NEW=$PREFIX.new.$$
  rm -rf "$NEW"; mkdir -p "$(dirname "$PREFIX")"
  cp -a "$S/root" "$NEW"
  NL=$PREFIX/usr/lib/x86_64-linux-gnu
  printf '#!/bin/sh\n# CRIU %s from Debian %s, run through its own loader (deploy/install-criu.sh)\nexec %s/ld-linux-x86-64.so.2 --library-path %s %s/usr/sbin/criu "$@"\n' \
    "$VER" "$SUITE" "$NL" "$NL" "$PREFIX" > "$NEW/criu"
  chmod +x "$NEW/criu"
  echo "$VER $SUITE $SUM" > "$NEW/VERSION"
  if "$L/ld-linux-x86-64.so.2" --list --library-path "$L" "$S/root/usr/sbin/criu" | grep 'not found' >&2; then
    log "unresolved libraries in criu from $SUITE"; rm -rf "$NEW"; continue
  fi
  rm -rf "$PREFIX.old"; [ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
  mv "$NEW" "$PREFIX"; rm -rf "$PREFIX.old"
  if works "$PREFIX/criu"; then
    log "installed CRIU $VER from $SUITE at $PREFIX/criu (criu check: ok)"
    exit 0
  fi
  log "CRIU $VER from $SUITE does not pass 'criu check' here:"; "$PREFIX/criu" check >&2 || true
done
log "no working CRIU >= 4.2 could be installed"
exit 1
