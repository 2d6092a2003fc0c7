#!/usr/bin/env bash
# Create .venv with CellOS and its test tools. Works as root (installs missing Debian packages)
# and as a normal user (uses sudo when it is there, otherwise says what to install).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need_pkgs=()
# The default backend sandboxes cells with its own small C launcher (built once, on first use,
# with gcc and the libc/kernel headers) and a libseccomp filter.
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(libc6-dev)
dpkg-query -W -f='${Status}' libseccomp2 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(libseccomp2)
# Tests and benchmarks use util-linux's unshare and setsid.
command -v unshare >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v "$PYTHON" >/dev/null 2>&1 || need_pkgs+=(python3)
if command -v "$PYTHON" >/dev/null 2>&1; then
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { echo "error: python: CellOS needs Python 3.11 or newer" >&2; exit 2; }
  "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
fi

# Optional backends: installed where we may install, otherwise reported (cellos doctor).
want_pkgs=()
command -v runsc >/dev/null 2>&1 || want_pkgs+=(runsc)
# cellos mcp's run_code(language=node) runs the host's node inside the cell (/usr is bound in).
command -v node >/dev/null 2>&1 || want_pkgs+=(nodejs)
# Egress authority writes the kernel's nf_tables itself; nft shows a cell's table (the tests
# compare with it).
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || want_pkgs+=(nftables)
# Its teardown deletes the cell's link through iproute2's ip (a thread of the supervisor
# without it: correct, but the kernel's wait is then the cell's).
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || [ -x /usr/bin/ip ] || [ -x /bin/ip ] || want_pkgs+=(iproute2)
# The microVM backend boots guests with QEMU; its image is built with gcc (static guest init).
command -v qemu-system-x86_64 >/dev/null 2>&1 || want_pkgs+=(qemu-system-x86)
# The console's browser tests drive Debian's headless Chromium through its chromedriver.
command -v chromium >/dev/null 2>&1 || want_pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || want_pkgs+=(chromium-driver)

if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else SUDO="none"
fi
if ((${#need_pkgs[@]})) && [ "$SUDO" = none ]; then
  echo "error: setup: missing Debian packages: ${need_pkgs[*]} (ask an administrator to install them)" >&2
  exit 1
fi
if [ "$SUDO" = none ]; then
  if ((${#want_pkgs[@]})); then
    echo "note: setup: optional packages not installed: ${want_pkgs[*]}" >&2
  fi
elif ((${#need_pkgs[@]} + ${#want_pkgs[@]})); then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" "${want_pkgs[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.cellos-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # pip's output goes to a log, shown only when the install fails.
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -e '.[test]'; } >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "error: setup: pip install failed (log above, also in .venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
# Byte-compile the sources now: each `cellos-supervisor` process is one cell, and where
# PYTHONDONTWRITEBYTECODE is set (some CI images) every start would recompile them (~40 ms).
.venv/bin/python -m compileall -q src >/dev/null 2>&1 || true  # a cache: best effort
# Host tuning (root): every cell's launcher joins the cell's cgroup, and without the cgroup2
# mount option favordynmods that join waits for an RCU grace period (5-20 ms per cell here);
# with it 0.1 ms, for slightly dearer forks and exits (docs/isolation.md). Not persistent:
# a reboot drops it (`cellos doctor` says so).
if [ "$(id -u)" = 0 ]; then
  cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
  if [ -n "$cg2" ] && ! awk -v m="$cg2" '$2 == m' /proc/mounts | grep -q favordynmods; then
    if mount -o remount,favordynmods "$cg2" 2>/dev/null; then
      echo "setup: cgroup2 at $cg2 remounted with favordynmods (faster cell start)"
    else
      echo "setup: note: cannot set favordynmods on $cg2 (cells start 5-20 ms slower)" >&2
    fi
  fi
fi
# Build the sandbox launcher now (it is cached per user), so a broken toolchain shows here.
.venv/bin/python - <<'PY'
import sys
from cellos.core.errors import CellosError
from cellos.hosts.cellos.launcher import launcher_path
try:
    launcher_path()
except CellosError as exc:
    sys.exit(f"error: setup: {exc.path}: {exc.reason}")
PY
# The qemu backend's default guest image (per-user cache, built once per builder/QEMU version),
# so that `CELLOS_CELL_BACKEND=qemu cellos-supervisor FILE` works right away. Optional: when it
# cannot be built here, the first qemu cell says why.
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  if ! .venv/bin/cellos microvm build-image >/dev/null; then
    echo "note: setup: the microVM guest image was not built (error above); the qemu backend builds it on first use" >&2
  fi
fi
