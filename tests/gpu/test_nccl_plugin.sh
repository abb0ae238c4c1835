#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Real NCCL loads our plugin: a 1-rank-per-GPU all-reduce through
# nccl-moe-netcheck with NCCL_DEBUG=INFO must log "Loaded net plugin MoE".
netcheck="$1"
out=$(NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET "$netcheck" 2>&1)
rc=$?
[ "$rc" -eq 77 ] && { echo "SKIP: no GPU"; exit 77; }
printf '%s\n' "$out" | grep -E "NET/Plugin|Using network|netcheck"
[ "$rc" -eq 0 ] || { echo "FAIL: netcheck exited $rc"; printf '%s\n' "$out" | tail -20; exit 1; }
printf '%s\n' "$out" | grep -q "Loaded net plugin MoE" || { echo "FAIL: NCCL did not log loading our plugin"; exit 1; }
echo "PASS: NCCL loaded the MoE plugin"
