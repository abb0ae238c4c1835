#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds nccl-moe and runs the GPU test suite on a GPU machine like the device
# machine (Ubuntu 24.04, CUDA 13, meson on PATH, no Check, no registry), then
# prints a summary last.
#   scripts/device-test.sh [suite ...]     default suite: gpu
# Check: from pkg-config, else from .deps/root (scripts/fetch-check.sh makes it
# on a machine with apt; carry .deps along). Build dir: $MOE_BUILD_DIR
# (default build-device). Extra commands after the tests: $MOE_AFTER_TESTS.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
suites=("$@")
[ "${#suites[@]}" -gt 0 ] || suites=(gpu)
builddir="${MOE_BUILD_DIR:-build-device}"
log="${OUT:-/tmp}/device-test.log"

opts=()
if ! pkg-config --exists check 2>/dev/null; then
  if [ ! -f .deps/root/usr/include/check.h ]; then
    echo "device-test: Check not found: run scripts/fetch-check.sh where apt works and carry .deps" >&2
    exit 1
  fi
  opts+=("-Dcheck_root=$PWD/.deps/root")
fi
if [ ! -f "$builddir/build.ninja" ]; then
  meson setup "$builddir" "${opts[@]}" >"${log%.log}-setup.log" 2>&1 || {
    cat "${log%.log}-setup.log"; echo "device-test: meson setup failed" >&2; exit 1; }
fi
ninja -C "$builddir" >"${log%.log}-build.log" 2>&1 || {
  tail -50 "${log%.log}-build.log"; echo "device-test: build failed" >&2; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
suite_args=()
for s in "${suites[@]}"; do suite_args+=(--suite "$s"); done
meson test -C "$builddir" "${suite_args[@]}" --print-errorlogs --num-processes 1 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
[ -n "${MOE_AFTER_TESTS:-}" ] && bash -c "$MOE_AFTER_TESTS"
echo "==== device-test summary (${suites[*]}) ===="
grep -E '^ *[0-9]+/[0-9]+ ' "$log" | sed 's/^ *//'
grep -E '^(Ok|Fail|Skipped|Timeout|Expected Fail|Unexpected Pass): ' "$log"
exit "$rc"
