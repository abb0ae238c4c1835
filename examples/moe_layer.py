#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A small Mixture-of-Experts layer on nccl_moe: router, top-k, dispatch,
per-expert MLP, combine; forward and backward, checked against the same layer
computed densely (every token through its experts, no communication).

Expert parallel over a process group, one GPU per rank:
    torchrun --nproc-per-node=8 examples/moe_layer.py
N virtual ranks on one GPU (no process group):
    python examples/moe_layer.py --virtual 8

Installed (pip install .) or from a source checkout: PYTHONPATH=python, and
the library in build/ (or NCCL_MOE_LIBRARY=/path/to/libnccl-net-moe.so).
Prints one line per check and exits 1 if the output or a gradient differs
from the dense reference (2 for bad arguments).
"""

import argparse
import os
import sys

import nccl_moe
import torch
import torch.distributed as dist
from nccl_moe import fp8


class MoELayer(torch.nn.Module):
    """Router and the local experts of one expert-parallel rank. Rank r of N
    owns experts [r * E/N, (r + 1) * E/N) of the global weights."""

    def __init__(self, gate, w1, w2, rank, num_ranks, topk):
        super().__init__()
        L = w1.shape[0] // num_ranks
        self.gate = torch.nn.Parameter(gate.clone())
        self.w1 = torch.nn.Parameter(w1[rank * L:(rank + 1) * L].clone())
        self.w2 = torch.nn.Parameter(w2[rank * L:(rank + 1) * L].clone())
        self.topk = topk

    def route(self, x):
        probs = torch.softmax(x.float() @ self.gate, dim=-1)
        weights, idx = probs.topk(self.topk, dim=-1)
        return idx, weights / weights.sum(-1, keepdim=True)

    def experts(self, recv_x, recv_idx, recv_weights, tokens_per_expert):
        """One BF16 row per received row: the weighted sum of this rank's
        experts that the token chose, as one grouped computation.

        Every (row, k) pair that chose local expert l gets a place in l's
        slab of an [L, C, H] batch (C = rows received, the most pairs one
        expert can get); its place is a running count on the device. One
        batched matmul per layer runs all experts; rows of a slab past the
        expert's count (tokens_per_expert, from the dispatch) are masked, as
        a masked grouped GEMM skips them. No host synchronization and no
        per-expert loop: shapes depend only on the number of rows, so the
        step can also be captured in a CUDA graph (capacity mode)."""
        L, dev = self.w1.shape[0], recv_x.device
        rows, K = recv_idx.shape
        C = max(rows, 1)
        e = recv_idx.reshape(-1)
        hits = (e.unsqueeze(1) == torch.arange(L, device=dev)).to(torch.int64)  # [pairs, L]
        pos = (hits.cumsum(0) - 1).gather(1, e.clamp(min=0).unsqueeze(1)).squeeze(1)
        valid = (e >= 0) & (pos < C)
        slot = torch.where(valid, e * C + pos, torch.full_like(e, L * C))  # L * C: a spare row for the rest
        batch = recv_x.new_zeros(L * C + 1, recv_x.shape[1])
        batch = batch.index_copy(0, slot, recv_x.repeat_interleave(K, dim=0))
        h = torch.relu(batch[:L * C].view(L, C, -1) @ self.w1) @ self.w2  # [L, C, hidden]
        mask = torch.arange(C, device=dev).unsqueeze(0) < tokens_per_expert.unsqueeze(1)
        h = (h * mask.unsqueeze(2)).reshape(L * C, -1)
        h = torch.cat([h, h.new_zeros(1, h.shape[1])])
        w = torch.where(valid, recv_weights.reshape(-1), torch.zeros_like(recv_weights.reshape(-1)))
        y = (h.index_select(0, slot) * w.unsqueeze(1)).view(rows, K, h.shape[1]).sum(1)
        return y.to(torch.bfloat16)


def moe_forward(buf, layers, xs, args):
    """The layer on every rank this process runs (one with a process group,
    N virtual ones): lists in, lists out."""
    routed = [layer.route(x) for layer, x in zip(layers, xs)]
    sent = [fp8.quantize(x) for x in xs] if args.fp8 else xs
    idxs = [i for i, _ in routed]
    ws = [w for _, w in routed]
    if isinstance(buf, nccl_moe.VirtualBuffer):
        results = buf.dispatch(sent, idxs, ws, capacity=args.capacity)
    else:
        results = [buf.dispatch(sent[0], idxs[0], ws[0], capacity=args.capacity)]
    ys = []
    for layer, res in zip(layers, results):
        recv = fp8.dequantize(*res.recv_x, torch.float32) if args.fp8 else res.recv_x.float()
        ys.append(layer.experts(recv, res.recv_topk_idx, res.recv_topk_weights, res.recv_tokens_per_expert))
    if isinstance(buf, nccl_moe.VirtualBuffer):
        outs = [o for o, _ in buf.combine(ys, [r.handle for r in results])]
    else:
        outs = [buf.combine(ys[0], results[0].handle)[0]]
    return outs, idxs


def dense_forward(x, idx, gate, w1, w2, args):
    """Reference: the same routing, every expert applied where chosen."""
    probs = torch.softmax(x.float() @ gate, dim=-1)
    w = probs.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    xf = fp8.dequantize(*fp8.quantize(x), torch.float32) if args.fp8 else x.float()
    out = torch.zeros(x.shape[0], w2.shape[2], device=x.device)
    for e in range(w1.shape[0]):
        rows, ks = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            h = torch.relu(xf[rows] @ w1[e]) @ w2[e]
            out = out.index_add(0, rows, h * w[rows, ks].unsqueeze(1))
    return out


def max_rel_err(got, want):
    if got is None or want is None:  # no gradient path (a rank without tokens): zeros
        got = torch.zeros(0) if got is None else got
        want = torch.zeros_like(got) if want is None else want
        got = torch.zeros_like(want) if got.numel() == 0 and want.numel() else got
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 else err


def int_in(lo, hi):
    """argparse type: an integer in [lo, hi] (bad values exit 2 with the usage)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not an integer" % text) from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError("%d is not in [%d, %d]" % (v, lo, hi))
        return v
    return parse


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not v > 0:
        raise argparse.ArgumentTypeError("%r is not positive" % text)
    return v


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--virtual", type=int_in(0, 31), default=0, metavar="N", help="N virtual ranks on one GPU")
    p.add_argument("--tokens", type=int_in(1, 1 << 20), default=128,
                   help="tokens per rank (ranks get a few less, one none)")
    p.add_argument("--hidden", type=int_in(8, 65536), default=512)
    p.add_argument("--ffn", type=int_in(1, 1 << 16), default=256, help="expert MLP width")
    p.add_argument("--experts", type=int_in(1, 1024), default=32)
    p.add_argument("--topk", type=int_in(1, 16), default=4)
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 (x quantized in torch; x gets no gradient)")
    p.add_argument("--capacity", type=int_in(0, 1 << 30), default=0,
                   help="capacity mode with this many rows (0: exact mode)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=1)
    p.add_argument("--tolerance", type=positive_float, default=2e-2, help="max error relative to the reference's max")
    args = p.parse_args()
    if args.topk > args.experts:
        p.error("--topk %d: a token picks distinct experts, and there are %d" % (args.topk, args.experts))
    if args.virtual and args.experts % args.virtual:
        p.error("--experts %d is not a multiple of the %d virtual ranks" % (args.experts, args.virtual))
    if args.hidden % 8:
        p.error("--hidden %d: rows must be a multiple of 8 channels" % args.hidden)
    if args.fp8 and args.hidden % 128:
        p.error("--hidden %d: FP8 needs a multiple of 128 (one scale per 128 channels)" % args.hidden)
    return args


def main():
    args = parse()
    if args.virtual:
        # This script's own process, before CUDA starts: virtual ranks need a
        # hardware queue per rank and every kernel loaded up front (see
        # nccl_moe.VirtualBuffer; the package itself never sets these).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        torch.cuda.set_device(0)
        n_ranks, ranks = args.virtual, list(range(args.virtual))
        who = "virtual ranks"
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        try:  # eager NCCL init (torch >= 2.3), so the communicator exists now
            dist.init_process_group("nccl", device_id=device)
        except TypeError:
            dist.init_process_group("nccl")
            dist.all_reduce(torch.zeros(1, device=device))
        n_ranks, ranks = dist.get_world_size(), [dist.get_rank()]
        who = "rank %d" % ranks[0]
    dev = torch.device("cuda", torch.cuda.current_device())
    if args.experts % n_ranks:
        print("--experts %d is not a multiple of the %d ranks" % (args.experts, n_ranks), file=sys.stderr)
        sys.exit(2)

    # Same seed everywhere: every process knows every rank's tokens and all
    # expert weights, so it can compute the dense reference of the whole
    # layer and compare its own part.
    gen = torch.Generator().manual_seed(args.seed)
    H, F, E = args.hidden, args.ffn, args.experts
    gate = (torch.randn(H, E, generator=gen) * H ** -0.5).to(dev)
    w1 = (torch.randn(E, H, F, generator=gen) * H ** -0.5).to(dev)
    w2 = (torch.randn(E, F, H, generator=gen) * F ** -0.5).to(dev)
    # Uneven loads, and one rank without tokens (it still takes part).
    tokens = [0 if (r == 1 and n_ranks > 2) else args.tokens - (7 * r) % max(1, args.tokens // 2)
              for r in range(n_ranks)]
    all_x = [torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev) for T in tokens]
    all_g = [torch.randn(T, H, generator=gen).to(torch.bfloat16).float().to(dev) for T in tokens]

    config = dict(max_tokens_per_rank=max(tokens), hidden=H, num_experts=E, max_topk=args.topk)
    buf = nccl_moe.VirtualBuffer(n_ranks, **config) if args.virtual else nccl_moe.Buffer(**config)
    layers = [MoELayer(gate, w1, w2, r, n_ranks, args.topk) for r in ranks]
    xs = [all_x[r].clone().requires_grad_(not args.fp8) for r in ranks]

    outs, idxs = moe_forward(buf, layers, xs, args)
    loss = sum((o.float() * all_g[r]).sum() for o, r in zip(outs, ranks))
    loss.backward()
    router_grad = sum(layer.gate.grad for layer in layers)
    if not args.virtual:
        dist.all_reduce(router_grad)  # the router is replicated: as data parallelism would sum it
        # The dense reference needs every rank's routing: gathered padded to
        # one shape (all_gather wants equal sizes).
        padded = torch.full((max(tokens), args.topk), -1, dtype=torch.int64, device=dev)
        padded[:tokens[ranks[0]]] = idxs[0]
        gathered = [torch.empty_like(padded) for _ in range(n_ranks)]
        dist.all_gather(gathered, padded)
        all_idx = [g[:T] for g, T in zip(gathered, tokens)]
    else:
        all_idx = idxs

    r_gate = gate.clone().requires_grad_()
    r_w1, r_w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    r_x = [x.clone().requires_grad_(not args.fp8) for x in all_x]
    ref = [dense_forward(x, i, r_gate, r_w1, r_w2, args) for x, i in zip(r_x, all_idx)]
    sum((o * g).sum() for o, g in zip(ref, all_g)).backward()

    L = E // n_ranks
    checks = []
    for k, r in enumerate(ranks):
        checks.append(("rank %d output" % r, max_rel_err(outs[k], ref[r])))
        if not args.fp8:
            checks.append(("rank %d grad x" % r, max_rel_err(xs[k].grad, r_x[r].grad)))
        checks.append(("rank %d grad experts" % r, max(max_rel_err(layers[k].w1.grad, r_w1.grad[r * L:(r + 1) * L]),
                                                       max_rel_err(layers[k].w2.grad, r_w2.grad[r * L:(r + 1) * L]))))
    checks.append(("grad router", max_rel_err(router_grad, r_gate.grad)))
    bad = [(name, e) for name, e in checks if not e <= args.tolerance]
    mode = ("FP8" if args.fp8 else "BF16") + (" capacity %d" % args.capacity if args.capacity else " exact")
    for name, e in checks:
        print("%s: %s (%s dispatch, %d ranks): max error %.2e of the reference's max %s"
              % (who, name, mode, n_ranks, e, "FAIL" if (name, e) in bad else "ok"))
    if not bad:
        print("%s: MoE layer output and gradients match the dense reference (tolerance %.0e)" % (who, args.tolerance))
    buf.check_async_error()
    buf.destroy()  # with a process group: waits for every rank first
    if not args.virtual:
        dist.destroy_process_group()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
