#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# All NCCL traffic through our plugin: with NCCL_P2P_DISABLE=1 and
# NCCL_SHM_DISABLE=1, nccl-moe-netcheck's all-reduce and all-to-all between 2+
# GPUs cross the MoE net plugin, and both results are checked. Skips (77) with
# fewer than 2 GPUs.
netcheck="$1"
out=$(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET "$netcheck" 2>&1)
rc=$?
[ "$rc" -eq 77 ] && { echo "SKIP: no GPU"; exit 77; }
printf '%s\n' "$out" | grep -E "NET/Plugin|Using network|netcheck"
gpus=$(printf '%s\n' "$out" | sed -n 's/^netcheck: all-reduce over \([0-9]*\) GPU.*/\1/p')
[ -n "$gpus" ] && [ "$gpus" -lt 2 ] && { echo "SKIP: $gpus GPU, needs 2"; exit 77; }
[ "$rc" -eq 0 ] || { echo "FAIL: netcheck exited $rc"; printf '%s\n' "$out" | tail -20; exit 1; }
printf '%s\n' "$out" | grep -q "Using network MoE" || { echo "FAIL: NCCL did not use the MoE network"; exit 1; }
echo "PASS: all-reduce and all-to-all over $gpus GPUs through the MoE plugin"
