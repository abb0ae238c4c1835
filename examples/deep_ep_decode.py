#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A decode step of a Mixture-of-Experts layer in low-latency mode, written
against DeepEP's API (nccl_moe.deep_ep), captured once in a CUDA graph and
replayed with new tokens; each replay is checked against the same layer
computed densely (no communication).

The step: router (softmax, top-k) -> low_latency_dispatch (FP8, receive hook)
-> the local experts as a masked grouped computation on the expert-major
rows (rows past each expert's received count are masked, as DeepGEMM's
masked grouped GEMM skips them; the FP8 scales come column-major, the layout
that GEMM reads) -> low_latency_combine (weighted, receive hook). Nothing
waits on the host, so the whole step is one graph replay.

Expert parallel over a process group, one GPU per rank:
    torchrun --nproc-per-node=8 examples/deep_ep_decode.py
N virtual ranks on one GPU (each on its own thread; set
CUDA_DEVICE_MAX_CONNECTIONS=32 CUDA_MODULE_LOADING=EAGER):
    python examples/deep_ep_decode.py --virtual 4

From a source checkout: PYTHONPATH=python, and the library in build/ (or
NCCL_MOE_LIBRARY=/path/to/libnccl-net-moe.so).
"""

import argparse
import os
import sys
import threading

# Virtual ranks (one thread and two streams each): before torch starts CUDA.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
from nccl_moe import deep_ep, fp8  # noqa: E402  (sets CUDA_DEVICE_MAX_CONNECTIONS first)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def decode_step(buf, x, gate, w1, w2, args):
    """One rank's layer on its tokens x [T, H]; w1, w2: this rank's experts."""
    H, E, M = args.hidden, args.experts, args.max_tokens
    probs = torch.softmax(x.float() @ gate, dim=-1)
    weights, idx = probs.topk(args.topk, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True,
                                                                   return_recv_hook=True)
    hook()  # the receive half (other work could run before it)
    codes, scales = recv_x  # [L, S, H] FP8, [L, S, H / 128] column-major
    L, S, _ = codes.shape
    xf = (codes.float().unflatten(2, (H // 128, 128)) * scales.unsqueeze(3)).flatten(2)
    h = torch.relu(xf @ w1) @ w2  # every expert at once: [L, S, H] x [L, H, F] x [L, F, H]
    valid = torch.arange(S, device=x.device).unsqueeze(0) < recv_count.unsqueeze(1)
    y = torch.where(valid.unsqueeze(2), h, torch.zeros((), device=x.device)).to(torch.bfloat16)
    out, _, chook = buf.low_latency_combine(y, idx, weights, handle, return_recv_hook=True)
    chook()
    return out, idx


def dense_reference(x, idx, gate, w1, w2):
    """The layer without communication: each chosen expert on the token's
    FP8-rounded values, weighted (the routing idx of the step)."""
    probs = torch.softmax(x.float() @ gate, dim=-1)
    w = probs.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    xf = fp8.dequantize(*fp8.quantize(x), torch.float32)
    out = torch.zeros(x.shape[0], w2.shape[2], device=x.device)
    for k in range(idx.shape[1]):
        e = idx[:, k]
        h = torch.relu(torch.bmm(xf.unsqueeze(1), w1[e])) @ w2[e]
        out += w[:, k:k + 1] * h.squeeze(1)
    return out


def run_rank(buf, rank, n_ranks, args, weights, barrier):
    dev = buf.device
    gate, w1, w2 = (t.to(dev) for t in weights)
    L = args.experts // n_ranks
    my_w1, my_w2 = w1[rank * L:(rank + 1) * L], w2[rank * L:(rank + 1) * L]
    T = args.tokens - rank % 3  # ranks differ in tokens; fixed per rank (captured shapes)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    steps = [torch.randn(T, args.hidden, generator=gen).to(torch.bfloat16).to(dev) for _ in range(args.replays + 1)]
    x_s = steps[0].clone()
    decode_step(buf, x_s, gate, my_w1, my_w2, args)  # warm-up (eager)
    torch.cuda.current_stream().synchronize()
    if barrier is not None:
        barrier.wait()  # no rank captures while another still runs (see tests/python/test_cuda_graphs.py)
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(capture_error_mode="thread_local")
    try:
        out, idx = decode_step(buf, x_s, gate, my_w1, my_w2, args)
    finally:
        graph.capture_end()
    if barrier is not None:
        barrier.wait()
    worst = 0.0
    for x in steps[1:]:
        x_s.copy_(x)
        graph.replay()
        ref = dense_reference(x, idx, gate, w1, w2)
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        worst = max(worst, err)
    torch.cuda.current_stream().synchronize()
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--virtual", type=int, default=0, metavar="N", help="N virtual ranks on one GPU")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per rank (a few less on some ranks)")
    p.add_argument("--max-tokens", type=int, default=32, help="num_max_dispatch_tokens_per_rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=3e-2)
    args = p.parse_args()
    if args.tokens > args.max_tokens or args.tokens < 3:
        sys.exit("--tokens must be in [3, --max-tokens]")

    gen = torch.Generator().manual_seed(args.seed)
    H, F, E = args.hidden, args.ffn, args.experts
    weights = (torch.randn(H, E, generator=gen) * H ** -0.5, torch.randn(E, H, F, generator=gen) * H ** -0.5,
               torch.randn(E, F, H, generator=gen) * F ** -0.5)
    if args.virtual:
        n = args.virtual
        if E % n:
            sys.exit("--experts must be a multiple of the %d ranks" % n)
        torch.cuda.set_device(0)
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(args.max_tokens, H, n, E)
        barrier = threading.Barrier(n, timeout=300)
        with deep_ep.virtual_buffers(n, 0, hint, True, hidden=H, num_experts=E,
                                     num_max_dispatch_tokens_per_rank=args.max_tokens) as group:
            errors = group.run(lambda buf: run_rank(buf, buf.rank, n, args, weights, barrier))
            group.owner.check_async_error()
        ranks = list(range(n))
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        n = dist.get_world_size()
        if E % n:
            sys.exit("--experts must be a multiple of the %d ranks" % n)
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(args.max_tokens, H, n, E)
        buf = deep_ep.Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, num_qps_per_rank=E // n,
                             explicitly_destroy=True)
        with torch.cuda.stream(torch.cuda.Stream()):  # graphs are captured off the default stream
            errors = [run_rank(buf, dist.get_rank(), n, args, weights, None)]
        buf.destroy()
        ranks = [dist.get_rank()]
        dist.destroy_process_group()
    bad = False
    for r, err in zip(ranks, errors):
        ok = err <= args.tolerance
        bad |= not ok
        print("rank %d: decode step replayed from a CUDA graph %d times, max error %.2e of the reference's max %s"
              % (r, args.replays, err, "ok" if ok else "FAIL"))
    if not bad:
        print("decode step graph matches the dense reference on every rank")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
