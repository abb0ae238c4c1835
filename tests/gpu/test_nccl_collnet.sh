#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Real NCCL with a CollNet library passed through ours (NCCL_MOE_COLLNET_PLUGIN,
# the test's fake: a v11 table, a context made at init, no devices): NCCL must
# load it ("Loaded collnet plugin FakeCollNet (v11)"), leave CollNet off, run
# netcheck's all-reduce and all-to-all, and destroy its communicators (NCCL
# 2.28.3 used to crash there, calling finalize through a NULL CollNet table).
netcheck="$1"
fake="$2"
out=$(NCCL_MOE_COLLNET_PLUGIN="$fake" NCCL_COLLNET_ENABLE=1 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET,ENV \
      "$netcheck" 2>&1)
rc=$?
[ "$rc" -eq 77 ] && { echo "SKIP: no GPU"; exit 77; }
printf '%s\n' "$out" | grep -E "collnet|CollNet|netcheck"
[ "$rc" -eq 0 ] || { echo "FAIL: netcheck exited $rc"; printf '%s\n' "$out" | tail -20; exit 1; }
for want in 'Loaded collnet plugin FakeCollNet \(v11\)' 'FakeCollNet v11: init' \
            'all-reduce over [0-9]+ GPU\(s\): OK' 'all-to-all over [0-9]+ GPU\(s\): OK'; do
  printf '%s\n' "$out" | grep -qE "$want" || { echo "FAIL: no \"$want\" in the output"; exit 1; }
done
echo "PASS: NCCL loaded the CollNet passed through and ran without it"
