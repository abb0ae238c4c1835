#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs the Python package's tests with pytest, against the library just built.
#   run_pytest.sh LIBRARY SOURCE_ROOT SUITE        SUITE: python | multigpu
# Python: $NCCL_MOE_PYTHON, else the first of python3, /usr/bin/python3 that
# has pytest and torch, else the first that has pytest. Tests that need torch
# or GPUs skip inside pytest; this script then exits 77 (Meson's "skipped")
# so that a machine without them does not report the suite as passed, while
# a failing CPU-only check still fails it. No pytest at all: 77.
set -u
lib="$1"
root="$2"
suite="$3"
here="$root/tests/python"

# Meson passes the library relative to the build directory (our cwd).
case "$lib" in /*) ;; *) [ -e "$lib" ] && lib="$PWD/$lib" ;; esac
export NCCL_MOE_LIBRARY="$lib"
export NCCL_MOE_INCLUDE="$(dirname "$lib")/include" # the generated nccl_moe_version.h
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 # keep the source tree clean
# Virtual ranks: a kernel loaded lazily in one rank's thread can wait for the
# other ranks' kernels (ncclMoeCommInitVirtual).
export CUDA_MODULE_LOADING="${CUDA_MODULE_LOADING:-EAGER}"

has() { "$1" -c "import $2" >/dev/null 2>&1; }
py=""
candidates=()
[ -n "${NCCL_MOE_PYTHON:-}" ] && candidates+=("$NCCL_MOE_PYTHON")
candidates+=(python3 /usr/bin/python3)
for c in "${candidates[@]}"; do
  command -v "$c" >/dev/null 2>&1 || continue
  if has "$c" pytest && has "$c" torch; then py="$c"; break; fi
done
if [ -z "$py" ]; then
  for c in "${candidates[@]}"; do
    command -v "$c" >/dev/null 2>&1 || continue
    if has "$c" pytest; then py="$c"; break; fi
  done
fi
if [ -z "$py" ]; then
  echo "SKIP: no Python with pytest (tried ${candidates[*]}; set NCCL_MOE_PYTHON)"
  exit 77
fi

case "$suite" in
  python)
    files=(test_package.py test_bindings.py test_cpu.py test_virtual.py test_autograd.py test_low_latency.py test_examples.py
           test_deep_ep_cpu.py test_deep_ep_intranode.py test_deep_ep_low_latency.py test_cuda_graphs.py
           test_c_api_overlap.py test_deep_ep_examples.py test_oob.py)
    need_gpus=1 ;;
  multigpu)
    files=(test_multigpu.py)
    need_gpus=2 ;;
  *)
    echo "run_pytest.sh: unknown suite '$suite'" >&2
    exit 2 ;;
esac
paths=()
for f in "${files[@]}"; do paths+=("$here/$f"); done

echo "python: $(command -v "$py") ($("$py" --version 2>&1)); library: $lib"
"$py" -m pytest -p no:cacheprovider -q -rs "${paths[@]}"
rc=$?
# 5: nothing collected (every module skipped itself: no torch or GPUs).
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
  echo "FAIL: pytest exited $rc"
  exit 1
fi

# The GPU probe runs in its own process: CUDA state never leaks between runs.
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
if [ -z "$gpus" ]; then
  echo "SKIP: torch is not installed for $py (only the CPU-only checks ran, and passed)"
  exit 77
fi
if [ "$gpus" -lt "$need_gpus" ]; then
  echo "SKIP: $gpus GPU(s), the $suite suite needs $need_gpus (only the checks that fit ran, and passed)"
  exit 77
fi
echo "PASS"
