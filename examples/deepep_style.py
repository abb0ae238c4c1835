#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Code written for DeepEP (its legacy deep_ep.Buffer API), running on
nccl-moe: the only change is the import. Normal mode with DeepEP's overlap
idiom (previous_event, async_finish, allocate_on_comm_stream), then
low-latency mode with receive hooks; each result checked.

    torchrun --nproc-per-node=8 examples/deepep_style.py

From a source checkout: PYTHONPATH=python and the library in build/.
"""

import os

import torch
import torch.distributed as dist

from nccl_moe import deep_ep  # was: import deep_ep


def main():
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    group = dist.new_group(list(range(dist.get_world_size())))
    rank, num_ranks = group.rank(), group.size()
    num_tokens, hidden, num_topk, num_experts, ll_num_tokens = 512, 2048, 8, 64, 64
    torch.manual_seed(rank)

    # Sized the way DeepEP code sizes its buffer.
    num_nvl_bytes = deep_ep.Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(ll_num_tokens, hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // num_ranks, explicitly_destroy=True)

    # ---- normal mode (training, prefill)
    x = torch.randn((num_tokens, hidden), dtype=torch.bfloat16, device="cuda")
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device="cuda").abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1].to(deep_ep.topk_idx_t)
    topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32, device="cuda")
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    for i, count in enumerate(num_recv_tokens_per_expert_list):
        assert recv_topk_idx.eq(i).sum().item() == count
    # The experts would run here; combine sums what every reached rank returns.
    combined_x, combined_topk_weights, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights,
                                                              previous_event=buffer.capture(), async_finish=True)
    event.current_stream_wait()
    reached = is_token_in_rank.sum(dim=1, keepdim=True)
    assert torch.equal(combined_x, (x.float() * reached).to(torch.bfloat16))
    assert torch.equal(combined_topk_weights, topk_weights)

    # ---- low-latency mode (decode)
    buffer.clean_low_latency_buffer(ll_num_tokens, hidden, num_experts)
    x = x[:ll_num_tokens].contiguous()
    topk_idx = topk_idx[:ll_num_tokens].contiguous()
    topk_weights = topk_weights[:ll_num_tokens].abs().contiguous()
    cumulative_local_expert_recv_stats = torch.zeros((num_experts // num_ranks,), dtype=torch.int, device="cuda")
    packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, ll_num_tokens, num_experts, cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
        use_fp8=True, return_recv_hook=True)
    hook()
    assert torch.equal(cumulative_local_expert_recv_stats, packed_recv_count)
    codes, scales = packed_recv_x  # scales column-major: [local experts, tokens, hidden / 128]
    simulated_gemm_x = (codes.float().unflatten(2, (hidden // 128, 128)) * scales.unsqueeze(3)).flatten(2)
    combined_x, event, hook = buffer.low_latency_combine(simulated_gemm_x.to(torch.bfloat16), topk_idx, topk_weights,
                                                         handle, return_recv_hook=True)
    hook()
    ref = x.float() * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1, keepdim=True)
    diff = (combined_x.float() - ref).abs().max().item() / ref.abs().max().item()
    assert diff < 0.07, diff  # FP8 (3 mantissa bits) on the way there

    buffer.destroy()
    dist.barrier()
    dist.destroy_process_group()
    print("rank %d: DeepEP-style normal and low-latency steps OK on nccl-moe" % rank)


if __name__ == "__main__":
    main()
