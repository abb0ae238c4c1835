#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything a one-GPU device run should verify, in two phases that each fit
# one device call (carry .deps, see scripts/device-test.sh):
#   scripts/device-all.sh tests   the gpu and python suites
#   scripts/device-all.sh bench   every benchmark mode, RESULT lines last
# Both build in build-device/ first (device-test.sh). Output also in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-tests}"
bin=build-device
out="${OUT:-/tmp}"
export CUDA_DEVICE_MAX_CONNECTIONS=32
export CUDA_MODULE_LOADING=EAGER  # virtual ranks: see ncclMoeCommInitVirtual

case "$phase" in
  tests)
    exec bash scripts/device-test.sh gpu python ;;
  bench)
    MOE_AFTER_TESTS=true bash scripts/device-test.sh unit >/dev/null 2>&1 || { echo "build failed" >&2; exit 1; }
    run() { # name, timeout (s), command...
      local name="$1" limit="$2"; shift 2
      echo "==== $name: $*"
      timeout "$limit" "$@" 2>&1 | tee "$out/bench-$name.log"
    }
    run normal 120 "$bin/nccl-moe-bench"
    run cast 120 "$bin/nccl-moe-bench" --dispatch cast
    run ll128 120 "$bin/nccl-moe-bench" --mode ll
    run ll1 120 "$bin/nccl-moe-bench" --mode ll --tokens 1
    run nodes2 180 "$bin/nccl-moe-bench" --nodes 2 --tokens 1024 --iters 10 --warmup 2
    NCCL_MOE_LIBRARY="$PWD/$bin/libnccl-net-moe.so" PYTHONPATH=python \
      run torch 180 python3 python/benchmarks/bench_vs_torch.py --virtual 8
    echo "==== RESULT lines"
    grep -h '^RESULT' "$out"/bench-*.log ;;
  *)
    echo "usage: scripts/device-all.sh tests|bench" >&2
    exit 2 ;;
esac
