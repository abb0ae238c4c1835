#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer targets with clang (build-fuzz/) and runs each one for
# a bounded time under AddressSanitizer + UndefinedBehaviorSanitizer, starting
# from the seeds in tests/fuzz/corpus/<target>/ (docs/FUZZING.md).
# Usage: scripts/fuzz.sh [seconds per target, default 20] [target ...]
# Fails, never skips: without clang or libFuzzer, when a target does not
# build, or when a target finds a crash, a sanitizer report, a broken
# invariant or a hang (the input is left in build-fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(fuzz_net_parsers fuzz_sock_peer fuzz_proxy_peer)

# clang with libFuzzer: Debian/Ubuntu's clang and libclang-rt-dev, installed
# here when missing (CI images start without them).
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf 'int LLVMFuzzerTestOneInput(const unsigned char* d, unsigned long n) { (void)d; (void)n; return 0; }\n' > "$probe/p.c"
have_libfuzzer() { command -v clang >/dev/null && clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" 2> "$probe/err"; }
if ! have_libfuzzer; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "fuzz: installing clang and libclang-rt-dev (libFuzzer)"
  if ! command -v apt-get >/dev/null ||
     ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
     ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang libclang-rt-dev ||
     ! have_libfuzzer; then
    [ -f "$probe/err" ] && cat "$probe/err" >&2
    echo "fuzz: FAILED: clang with libFuzzer is required (install clang and libclang-rt-dev)" >&2
    exit 1
  fi
fi

if [ ! -f build-fuzz/build.ninja ]; then
  CC=clang meson setup build-fuzz
fi
ninja -C build-fuzz "${targets[@]/#/tests/fuzz/}"

mkdir -p build-fuzz/artifacts
status=0
for t in "${targets[@]}"; do
  corpus="build-fuzz/corpus/$t"
  mkdir -p "$corpus"
  echo "fuzz: $t for ${secs}s"
  # New inputs go to the first directory; the seeds are read only.
  if ! ASAN_OPTIONS="abort_on_error=1:detect_leaks=1" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "build-fuzz/tests/fuzz/$t" -max_total_time="$secs" -timeout=25 -len_control=0 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/artifacts/$t-" "$corpus" "tests/fuzz/corpus/$t" > "build-fuzz/artifacts/$t.log" 2>&1; then
    tail -n 60 "build-fuzz/artifacts/$t.log" >&2
    echo "fuzz: $t FAILED; the input is in build-fuzz/artifacts/ (replay: build-fuzz/tests/fuzz/$t <file>)" >&2
    status=1
  else
    grep -E "^stat::number_of_executed_units|^Done" "build-fuzz/artifacts/$t.log" || true
  fi
done
exit "$status"
