#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One-command set-up for developing nccl-moe: installs what Debian 12 /
# Ubuntu 24.04 lack to build and test it, checks for the CUDA toolkit and
# NCCL, then configures and builds build/. Idempotent: a second run only
# rebuilds what changed. (Users who only want the Python package need none of
# this: pip install . builds the library itself, see README.md.)
# Usage: scripts/setup.sh [extra meson options...]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# --- system packages ---------------------------------------------------------
# To build and run the unit tests (required).
build_pkgs=(meson ninja-build pkg-config gcc g++ check libsubunit-dev libibverbs-dev)
# To build and test the Python package (pip install --no-build-isolation . in a
# venv, pytest) and to plot benchmark sweeps; their tests skip without them.
python_pkgs=(python3-venv python3-pip python3-mesonpy python3-pytest python3-matplotlib)
missing_pkgs() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
mapfile -t missing < <(missing_pkgs "${build_pkgs[@]}")
mapfile -t missing_py < <(missing_pkgs "${python_pkgs[@]}")
if [ "$((${#missing[@]} + ${#missing_py[@]}))" -gt 0 ]; then
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    echo "setup: installing ${missing[*]} ${missing_py[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" "${missing_py[@]}"
  elif [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: missing packages ${missing[*]} and no apt-get (or sudo): install them by hand" >&2
    exit 1
  else
    echo "setup: without ${missing_py[*]} the Python package and plot tests skip" >&2
  fi
fi

# --- CUDA toolkit and NCCL ---------------------------------------------------
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
done
if ! command -v nvcc >/dev/null; then
  cat >&2 <<'MSG'
setup: the CUDA toolkit (nvcc) was not found.
  Install CUDA 12.x or 13.x (https://developer.nvidia.com/cuda-downloads) and put
  its bin/ on PATH, or set CUDA_HOME to its prefix (e.g. /usr/local/cuda).
MSG
  exit 1
fi
nccl_found=""
for d in "${NCCL_HOME:-}" "${CUDA_HOME:-}" /usr/local/cuda /usr; do
  if [ -n "$d" ] && [ -f "$d/include/nccl.h" ]; then nccl_found="$d"; break; fi
done
if [ -z "$nccl_found" ] && ! pkg-config --exists nccl 2>/dev/null; then
  cat >&2 <<'MSG'
setup: NCCL (nccl.h, libnccl.so) was not found; the tests and tools link it.
  Install libnccl2 and libnccl-dev from NVIDIA's CUDA repository, or unpack NCCL
  and set NCCL_HOME to its prefix (NCCL_HOME/include/nccl.h, NCCL_HOME/lib/libnccl.so).
  (pip install . needs only NCCL's headers, and also finds PyTorch's NCCL wheel.)
MSG
  exit 1
fi

# --- configure and build -----------------------------------------------------
if [ -f build/build.ninja ]; then
  [ "$#" -gt 0 ] && meson configure build "$@"
else
  meson setup build "$@"
fi
ninja -C build
echo "setup: built build/ (tests: meson test -C build --print-errorlogs)"
