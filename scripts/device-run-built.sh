#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs steps against a build directory made on another machine (binaries
# built here run on the GPU machine: carry the build dir, configured with
# -Dcheck_root=$PWD/.deps/root so Check links statically). No Meson needed
# there, so no rebuild spends device time.
#   scripts/device-run-built.sh BUILD_DIR STEP...
# Steps: gpu (every gpu test binary), <test name> (one gpu test binary),
# multiproc (the multiproc tier: ranks as processes on GPU 0, under a private
# MPS daemon when the machine has nvidia-cuda-mps-control; its first line
# says whether MPS is on),
# python[=PYTEST_ARGS] (the pytest suite, or the given files / -k filter),
# bench[=ARGS] (nccl-moe-bench ARGS), torch (python/benchmarks/bench_vs_torch.py
# --virtual 8), example (examples/moe_layer.py --virtual 8), sweep (nccl-moe-bench
# --sweep --json in both modes: $OUT/sweep-normal.jsonl and $OUT/sweep-ll.jsonl,
# for scripts/plot_perf.py), netcheck (nccl-moe-netcheck: real NCCL through the
# plugin), collnet (netcheck again with the test's fake CollNet passed through,
# NCCL_COLLNET_ENABLE=1, NCCL_DEBUG=INFO: the log shows which CollNet NCCL
# loaded), procs (nccl-moe-bench --procs 8 beside the virtual ranks),
# stripe (nccl-moe-bench --nodes 2 at 4096 and 1024 tokens and --mode ll at 1
# token, each with NCCL_MOE_SOCKET_STRIPE_KB=0 and 256: the striping A/B),
# overflow (test_intranode's overflow case 5 times with MOE_CASE_TRACE=1:
# per-rank timelines), sanitize (compute-sanitizer memcheck and synccheck on
# the small gpu cases: fp8, error record, the errors cases). Python hangs:
# python=... with MOE_TEST_STACKS_AFTER_S=N set prints every thread's stack
# while a test runs past N s (add -s). Each step's output goes to
# $OUT/<n>-<step>.log too; a summary comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
bin="$1"
shift
out="${OUT:-/tmp}"
export CUDA_DEVICE_MAX_CONNECTIONS=32
export CUDA_MODULE_LOADING=EAGER  # virtual ranks: see ncclMoeCommInitVirtual
export NCCL_MOE_LIBRARY="$PWD/$bin/libnccl-net-moe.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
summary=()
n=0

step() { # name, timeout (s), command...
  local name="$1" limit="$2"
  shift 2
  n=$((n + 1))
  local log="$out/$n-${name//[^A-Za-z0-9_.-]/_}.log"
  echo "==== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 40 "$log"
  summary+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
}

py=python3
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
for s in "$@"; do
  case "$s" in
    gpu)
      for t in "$bin"/tests/gpu/test_*; do
        [ -x "$t" ] && [ -f "$t" ] && step "$(basename "$t")" 600 "$t"
      done ;;
    test_*) step "$s" 600 "$bin/tests/gpu/$s" ;;
    multiproc) step multiproc 600 "$bin/tests/multiproc/test_multiproc" ;;
    python) step python 600 "$py" -m pytest -q -p no:cacheprovider tests/python ;;
    python=*) step "python ${s#python=}" 600 "$py" -m pytest -q -p no:cacheprovider ${s#python=} ;;
    bench) step bench 300 "$bin/nccl-moe-bench" ;;
    bench=*) step "bench ${s#bench=}" 300 "$bin/nccl-moe-bench" ${s#bench=} ;;
    sweep)
      for mode in normal ll; do
        step "sweep $mode" 300 sh -c '"$1" --mode "$2" --sweep --json > "$3"' sh "$bin/nccl-moe-bench" "$mode" \
          "$out/sweep-$mode.jsonl"
      done ;;
    netcheck) step netcheck 300 "$bin/nccl-moe-netcheck" --plugin "$PWD/$bin/libnccl-net-moe.so" ;;
    collnet)
      step collnet 300 env NCCL_MOE_COLLNET_PLUGIN="$PWD/$bin/tests/support/libfake-collnet.so" NCCL_COLLNET_ENABLE=1 \
        NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET,ENV "$bin/nccl-moe-netcheck" --plugin "$PWD/$bin/libnccl-net-moe.so"
      grep -hE 'collnet|CollNet|netcheck:' "$out/$n-collnet.log" ;;
    procs) step procs 300 "$bin/nccl-moe-bench" --procs 8 ;;
    stripe)
      for kb in 0 256; do
        for args in "--nodes 2 --tokens 4096" "--nodes 2 --tokens 1024" "--mode ll --nodes 2 --tokens 1"; do
          step "stripe $kb $args" 300 env NCCL_MOE_SOCKET_STRIPE_KB=$kb "$bin/nccl-moe-bench" $args
        done
      done ;;
    overflow)
      step overflow 600 sh -c 'for i in 1 2 3 4 5; do echo "== run $i"; CK_RUN_CASE=overflow MOE_CASE_TRACE=1 "$1"; done' \
        sh "$bin/tests/gpu/test_intranode" ;;
    sanitize)
      san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
      for tool in memcheck synccheck; do
        step "$tool fp8" 600 "$san" --tool $tool --error-exitcode 3 "$bin/tests/gpu/test_fp8_gpu"
        step "$tool error_record" 600 "$san" --tool $tool --error-exitcode 3 "$bin/tests/gpu/test_error_record_gpu"
        for t in test_intranode test_lowlatency; do
          step "$tool $t errors" 600 env CK_RUN_CASE=errors "$san" --tool $tool --error-exitcode 3 \
            "$bin/tests/gpu/$t"
        done
      done ;;
    torch) step torch 300 "$py" python/benchmarks/bench_vs_torch.py --virtual 8 ;;
    example) step example 300 "$py" examples/moe_layer.py --virtual 8 ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
echo "==== summary"
printf '%s\n' "${summary[@]}"
echo "==== RESULT lines"
grep -h '^RESULT' "$out"/*.log 2>/dev/null
