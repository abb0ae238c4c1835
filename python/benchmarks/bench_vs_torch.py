#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""nccl_moe dispatch/combine against the same routing done by plain torch, in
the same run, printing times, bandwidths and ratios (torch time / ours: above
1 means nccl_moe is faster).

One GPU, N virtual ranks: the baseline is torch gather (index_select of the
routed rows) and scatter-add (index_add_ back into the tokens) on that GPU.
    python python/benchmarks/bench_vs_torch.py --virtual 8
Several GPUs, one process each: the baseline is torch.distributed
all_to_all_single (counts exchanged first, rows grouped per destination,
combine rows sent back and summed with index_add_).
    torchrun --nproc-per-node=8 python/benchmarks/bench_vs_torch.py

Both sides do the whole job from topk_idx: routing, the host synchronization
for the received count (our exact mode, torch's split sizes), moving the rows,
and the reduction. The torch baseline moves only the rows (not the top-k ids
and weights nccl_moe delivers as well). Times are wall-clock per call
(synchronized before and after), median over --iters; bandwidth counts
received rows x bytes per row (FP8: hidden + hidden/128 x 4; BF16: hidden x
2), summed over the ranks of the process, as the C benchmark does. The
received rows and combined tokens of both sides are compared first.
--json: the figures as one JSON object on stdout (the report on stderr).
Exit status: 0 ok, 1 failure, 2 bad arguments.
"""

import argparse
import json
import os
import statistics
import sys
import time

# torch and nccl_moe are imported by main(), after the arguments are checked:
# --help and argument errors need neither (nor a GPU).
torch = dist = nccl_moe = fp8 = None


def _import_torch():
    global torch, dist, nccl_moe, fp8
    import nccl_moe
    import torch
    import torch.distributed as dist
    from nccl_moe import fp8


def int_in(lo, hi):
    """argparse type: an integer in [lo, hi] (bad values exit 2 with the usage)."""
    def parse_int(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not an integer" % text) from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError("%d is not in [%d, %d]" % (v, lo, hi))
        return v
    return parse_int


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--virtual", type=int_in(0, 31), default=0, metavar="N", help="N virtual ranks on one GPU")
    p.add_argument("--tokens", type=int_in(1, 1 << 20), default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int_in(8, 65536), default=7168)
    p.add_argument("--topk", type=int_in(1, 16), default=8)
    p.add_argument("--experts", type=int_in(1, 1024), default=256)
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 (codes + scales) instead of BF16")
    p.add_argument("--iters", type=int_in(1, 1000000), default=20)
    p.add_argument("--warmup", type=int_in(0, 1000000), default=5)
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 iterations (a smoke test)")
    p.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.hidden, a.topk, a.experts, a.iters, a.warmup = 64, 256, 4, 32, 2, 1
    if a.topk > a.experts:
        p.error("--topk %d: a token picks distinct experts, and there are %d" % (a.topk, a.experts))
    if a.virtual and a.experts % a.virtual:
        p.error("--experts %d is not a multiple of the %d virtual ranks" % (a.experts, a.virtual))
    if a.hidden % 8:
        p.error("--hidden %d: rows must be a multiple of 8 channels" % a.hidden)
    if a.fp8 and a.hidden % 128:
        p.error("--hidden %d: FP8 needs a multiple of 128 (one scale per 128 channels)" % a.hidden)
    return a


def timed(fn, iters, warmup):
    """Median wall-clock seconds of fn() over iters calls (after warmup)."""
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row_bytes(a):
    return a.hidden + a.hidden // 128 * 4 if a.fp8 else a.hidden * 2


def as_rows(x, a):
    """The bytes one token moves, as one uint8 row (FP8: codes then scales)."""
    if a.fp8:
        codes, scales = x
        return torch.cat([fp8.fp8_codes(codes), scales.view(torch.uint8)], 1)
    return x.view(torch.uint8)


def report(a, n_ranks, where, recv_rows, ours, theirs):
    gb = recv_rows * row_bytes(a) / 1e9
    comb_gb = recv_rows * a.hidden * 2 / 1e9
    text = sys.stderr if a.json else sys.stdout
    print("nccl-moe vs torch (%s): %d ranks, %d tokens/rank, hidden %d, top-%d of %d experts, %s dispatch, "
          "%d received rows" % (where, n_ranks, a.tokens, a.hidden, a.topk, a.experts, "FP8" if a.fp8 else "BF16",
                                recv_rows), file=text)
    figures = {"tool": "bench_vs_torch", "version": nccl_moe.__version__, "torch": torch.__version__,
               "baseline": where, "ranks": n_ranks, "tokens": a.tokens, "hidden": a.hidden, "topk": a.topk,
               "experts": a.experts, "dispatch": "fp8" if a.fp8 else "bf16", "received_rows": recv_rows,
               "iters": a.iters, "warmup": a.warmup, "seed": a.seed}
    for op, size in (("dispatch", gb), ("combine", comb_gb)):
        t_ours, t_torch = ours[op], theirs[op]
        print("  %-8s nccl_moe %8.3f ms %7.1f GB/s | torch %8.3f ms %7.1f GB/s | ratio torch/ours %.2fx"
              % (op, t_ours * 1e3, size / t_ours, t_torch * 1e3, size / t_torch, t_torch / t_ours), file=text)
        figures.update({op + "_us": t_ours * 1e6, op + "_GBps": size / t_ours, "torch_" + op + "_us": t_torch * 1e6,
                        "torch_" + op + "_GBps": size / t_torch, op + "_ratio": t_torch / t_ours})
    print("RESULT dispatch_ratio=%.3f combine_ratio=%.3f" % (theirs["dispatch"] / ours["dispatch"],
                                                             theirs["combine"] / ours["combine"]), file=text)
    if a.json:
        print(json.dumps(figures), flush=True)


# --------------------------------------------------------------- one GPU
def run_virtual(a):
    N = a.virtual
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    L = a.experts // N
    xs = [torch.randn(a.tokens, a.hidden, generator=gen, device=dev).to(torch.bfloat16) for _ in range(N)]
    idxs = [torch.rand(a.tokens, a.experts, generator=gen, device=dev).topk(a.topk, 1).indices for _ in range(N)]
    ws = [torch.rand(a.tokens, a.topk, generator=gen, device=dev) for _ in range(N)]
    sent = [fp8.quantize(x) for x in xs] if a.fp8 else xs
    vb = nccl_moe.VirtualBuffer(N, max_tokens_per_rank=a.tokens, hidden=a.hidden, num_experts=a.experts,
                                max_topk=a.topk)

    state = {}

    def ours_dispatch():
        state["res"] = vb.dispatch(sent, idxs, ws)

    def ours_combine():
        vb.combine(state["ys"], [r.handle for r in state["res"]])

    # torch: all ranks' tokens in one tensor (rank-major); rank r receives the
    # tokens that chose one of its experts, in (source rank, token) order.
    x_all = torch.cat([as_rows(s, a) for s in sent]) if a.fp8 else torch.cat(xs)
    idx_all = torch.cat(idxs)

    def torch_dispatch():
        owner = idx_all // L
        in_rank = torch.stack([(owner == r).any(1) for r in range(N)], 1)
        rows = [in_rank[:, r].nonzero().flatten() for r in range(N)]  # host sync, as split sizes would
        state["rows"] = rows
        state["recv"] = [x_all.index_select(0, r) for r in rows]

    def torch_combine():
        out = torch.zeros(N * a.tokens, a.hidden, dtype=torch.float32, device=dev)
        for r, y in zip(state["rows"], state["ys"]):
            out.index_add_(0, r, y.float())
        state["out"] = out.to(torch.bfloat16)

    # Check that both sides move the same rows and sum the same values.
    ours_dispatch()
    torch_dispatch()
    for r in range(N):
        got = as_rows(state["res"][r].recv_x, a) if a.fp8 else state["res"][r].recv_x
        assert torch.equal(got, state["recv"][r]), "virtual rank %d: received rows differ from torch's" % r
    state["ys"] = [torch.randn(res.handle.rows, a.hidden, generator=gen, device=dev).to(torch.bfloat16)
                   for res in state["res"]]
    ours_out = [o for o, _ in vb.combine(state["ys"], [r.handle for r in state["res"]])]
    torch_combine()
    err = (torch.cat(ours_out).float() - state["out"].float()).abs().max().item()
    assert err <= 2e-2 * state["out"].float().abs().max().item() + 1e-3, "combine differs from torch's: %g" % err

    recv_rows = sum(r.handle.rows for r in state["res"])
    ours = {"dispatch": timed(ours_dispatch, a.iters, a.warmup), "combine": timed(ours_combine, a.iters, a.warmup)}
    theirs = {"dispatch": timed(torch_dispatch, a.iters, a.warmup),
              "combine": timed(torch_combine, a.iters, a.warmup)}
    report(a, N, "virtual ranks on one GPU; torch gather/scatter-add", recv_rows, ours, theirs)
    vb.check_async_error()
    vb.destroy()


# ------------------------------------------------------------ several GPUs
def run_distributed(a):
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    try:
        dist.init_process_group("nccl", device_id=dev)
    except TypeError:
        dist.init_process_group("nccl")
        dist.all_reduce(torch.zeros(1, device=dev))
    rank, N = dist.get_rank(), dist.get_world_size()
    L = a.experts // N
    gen = torch.Generator(device=dev).manual_seed(a.seed * 1000 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=gen, device=dev).to(torch.bfloat16)
    idx = torch.rand(a.tokens, a.experts, generator=gen, device=dev).topk(a.topk, 1).indices
    w = torch.rand(a.tokens, a.topk, generator=gen, device=dev)
    sent = fp8.quantize(x) if a.fp8 else x
    buf = nccl_moe.Buffer(max_tokens_per_rank=a.tokens, hidden=a.hidden, num_experts=a.experts, max_topk=a.topk)
    payload = as_rows(sent, a) if a.fp8 else x
    state = {}

    def ours_dispatch():
        state["res"] = buf.dispatch(sent, idx, w)

    def ours_combine():
        buf.combine(state["y"], state["res"].handle)

    def torch_dispatch():
        owner = idx // L
        in_rank = torch.stack([(owner == r).any(1) for r in range(N)], 1)
        order = [in_rank[:, r].nonzero().flatten() for r in range(N)]
        send_counts = torch.tensor([o.numel() for o in order], device=dev)  # host sync
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send = payload.index_select(0, torch.cat(order))
        recv = torch.empty(int(recv_counts.sum().item()), payload.shape[1], dtype=payload.dtype, device=dev)
        dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist())
        state["order"], state["send_counts"], state["recv_counts"] = order, send_counts, recv_counts
        state["recv"] = recv

    def torch_combine():
        back = torch.empty(int(state["send_counts"].sum().item()), a.hidden, dtype=torch.bfloat16, device=dev)
        dist.all_to_all_single(back, state["y"], state["send_counts"].tolist(), state["recv_counts"].tolist())
        out = torch.zeros(a.tokens, a.hidden, dtype=torch.float32, device=dev)
        out.index_add_(0, torch.cat(state["order"]), back.float())
        state["out"] = out.to(torch.bfloat16)

    ours_dispatch()
    torch_dispatch()
    got = as_rows(state["res"].recv_x, a) if a.fp8 else state["res"].recv_x
    assert torch.equal(got, state["recv"]), "rank %d: received rows differ from torch's all_to_all" % rank
    state["y"] = torch.randn(state["res"].handle.rows, a.hidden, generator=gen, device=dev).to(torch.bfloat16)
    ours_out, _ = buf.combine(state["y"], state["res"].handle)
    torch_combine()
    err = (ours_out.float() - state["out"].float()).abs().max().item()
    assert err <= 2e-2 * state["out"].float().abs().max().item() + 1e-3, "rank %d: combine differs" % rank

    ours = {"dispatch": timed(ours_dispatch, a.iters, a.warmup), "combine": timed(ours_combine, a.iters, a.warmup)}
    theirs = {"dispatch": timed(torch_dispatch, a.iters, a.warmup),
              "combine": timed(torch_combine, a.iters, a.warmup)}
    # The slowest rank sets the pace; rows are summed over ranks.
    t = torch.tensor([ours["dispatch"], ours["combine"], theirs["dispatch"], theirs["combine"]], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rows = torch.tensor([state["res"].handle.rows], device=dev)
    dist.all_reduce(rows)
    if rank == 0:
        t = t.tolist()
        report(a, N, "one GPU per rank; torch all_to_all_single", int(rows.item()),
               {"dispatch": t[0], "combine": t[1]}, {"dispatch": t[2], "combine": t[3]})
    buf.check_async_error()
    buf.destroy()  # waits for every rank first
    dist.destroy_process_group()


def main():
    a = parse()
    _import_torch()
    if a.virtual:
        # This script's own process, before CUDA starts: virtual ranks need a
        # hardware queue per rank and every kernel loaded up front (see
        # nccl_moe.VirtualBuffer; the package itself never sets these).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        run_virtual(a)
    else:
        run_distributed(a)


if __name__ == "__main__":
    main()
