#!/usr/bin/env bash
# Idempotent machine set-up for tug: Debian packages, CRIU >= 4.2, kernel knobs, venv.
# Every step checks before it acts, so running it twice costs a few seconds.
# Why each step exists is recorded in shared/platform.md (CRIU on kernel >= 6.16, pipe size).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TUG_VENV:-$REPO/.venv}"
CACHE="${TUG_CACHE:-/var/cache/tug}"
CRIU_MIN="4.2"
CRIU_SRC_VERSION="4.2.1"
PIPE_MAX_SIZE=16777216
# CRIU keeps what it probes of the kernel (its "kerndat": some thirty checks,
# several forking or ptracing a child) in RUNDIR/criu.kdat, on a tmpfs only.
# Without that cache every CRIU run probes again: 15-25 ms per run measured
# here, and a migration's frozen window holds three runs (dump, lazy-pages
# daemon, restore). Debian's /run is a tmpfs; on hosts where it is not (this
# kind of VM), tug's CRIU keeps its cache in /run/criu, made a small tmpfs.
CRIU_RUNDIR=/run/criu

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (CRIU, runc and network namespaces need it)"

PACKAGES=(
  runc iptables openssh-server openssh-client iproute2 busybox-static rsync
  # podman (its OCI runtime stays runc: tug dumps the containers runc runs for it)
  podman conmon
  gcc make libc6-dev pkg-config procps kmod
  # CRIU build dependencies (bookworm)
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  libnl-3-dev libnet1-dev libcap-dev libnftables-dev libbsd-dev libgnutls28-dev
  python3-protobuf libaio-dev uuid-dev xz-utils dpkg-dev
)

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

criu_ok() {
  local bin="$1" v
  [ -x "$bin" ] || return 1
  v="$("$bin" --version 2>/dev/null | awk '/^Version:/ {print $2}')"
  [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" || return 1
  "$bin" check >/dev/null 2>&1
}

criu_cache_dir() {
  mkdir -p "$CRIU_RUNDIR"
  if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
    log "mounting a tmpfs at $CRIU_RUNDIR for CRIU's kernel-feature cache (CRIU keeps it on a tmpfs only)"
    mount -t tmpfs -o size=1m,mode=0755 tug-criu-cache "$CRIU_RUNDIR"
  fi
}

install_criu() {
  local found
  found="$(command -v criu || echo /nonexistent)"
  if [ "$found" != /usr/local/sbin/criu ] && criu_ok "$found"; then
    return  # the distribution's CRIU is new enough (its cache lives in /run)
  fi
  # Built with its cache in $CRIU_RUNDIR (the name says so: an older build of
  # tug's, cached in /run, is replaced).
  local cached="$CACHE/criu-$CRIU_SRC_VERSION-rundir/criu"
  if ! criu_ok "$cached"; then
    log "building CRIU $CRIU_SRC_VERSION from Debian's sid source (cached in $CACHE)"
    mkdir -p "$CACHE/src"
    local srcfile="/etc/apt/sources.list.d/tug-sid-src.sources"
    if [ ! -f "$srcfile" ]; then
      # deb-src only: binary packages from sid would drag in a new libc6.
      cat >"$srcfile" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
      apt_updated=0
    fi
    apt_update_once
    local orig="$CACHE/src/criu_${CRIU_SRC_VERSION}.orig.tar.xz"
    if [ ! -f "$orig" ]; then
      # The debian.tar.xz may 404 while the orig tarball arrives: judge by the file.
      (cd "$CACHE/src" && apt-get source --download-only "criu/sid" >&2) || true
      [ -f "$orig" ] || orig="$(ls "$CACHE"/src/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1)"
      [ -n "$orig" ] && [ -f "$orig" ] || die "could not download CRIU source from sid (apt-get source criu/sid)"
    fi
    local build="$CACHE/build"
    rm -rf "$build" && mkdir -p "$build"
    tar -C "$build" -xf "$orig"
    local dir
    dir="$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n1)"
    log "make criu RUNDIR=$CRIU_RUNDIR (in $dir)"
    make -C "$dir" -j"$(nproc)" criu RUNDIR="$CRIU_RUNDIR" >"$CACHE/build.log" 2>&1 \
      || die "CRIU build failed; see $CACHE/build.log"
    mkdir -p "$(dirname "$cached")"
    install -m 0755 "$dir/criu/criu" "$cached"
    rm -rf "$build"
  fi
  if ! cmp -s "$cached" /usr/local/sbin/criu; then
    log "installing $cached to /usr/local/sbin/criu"
    install -m 0755 "$cached" /usr/local/sbin/criu
    hash -r
  fi
  criu_ok /usr/local/sbin/criu || die "/usr/local/sbin/criu installed but 'criu check' fails: run 'criu check' to see why"
}

tune_kernel() {
  local cur
  cur="$(cat /proc/sys/fs/pipe-max-size)"
  if [ "$cur" -lt "$PIPE_MAX_SIZE" ]; then
    log "raising fs.pipe-max-size $cur -> $PIPE_MAX_SIZE (CRIU's page pipes need it without CAP_SYS_RESOURCE)"
    echo "$PIPE_MAX_SIZE" >/proc/sys/fs/pipe-max-size
  fi
  # The lab bridges frames between namespaces; bridge-nf would push them through iptables.
  modprobe br_netfilter 2>/dev/null || true
}

setup_venv() {
  local py="${TUG_PYTHON:-}"
  if [ -z "$py" ]; then
    for cand in python3.13 python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        py="$(command -v "$cand")"; break
      fi
    done
  fi
  [ -n "$py" ] || die "need Python >= 3.11"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.tug-installed"
  if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
    log "installing tug (editable) with test and bench extras into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    "$VENV/bin/pip" install -q -e "$REPO[test,bench]" >&2
    touch "$stamp"
  fi
}

install_packages
criu_cache_dir
install_criu
tune_kernel
[ "${1:-}" = "--system-only" ] || setup_venv
log "ready: $(criu --version | head -n1 | tr -s ' '), $(runc --version | head -n1)"
