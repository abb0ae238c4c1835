#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One process per rank under torchrun: nccl_moe.Buffer over the process
group, against the torch reference. Every process draws every rank's inputs
from one seed, so each can compute what it must receive and what its combine
must return. Run by test_multigpu.py (one process per GPU, the group's own
NCCL communicator), test_examples.py (one process) and test_oob.py:
    torchrun --nproc-per-node=N tests/python/mp_worker.py --seed S
        [--backend gloo] [--same-gpu] [--raw-comm]
--backend gloo: a gloo group, so the Buffer bootstraps out of band
(ncclMoeCommInitOob through all_gather_object on the group); --same-gpu:
every process on GPU 0 (only with gloo: NCCL refuses two ranks on one GPU);
--raw-comm: Buffer.from_nccl_comm on the NCCL group's raw ncclComm_t.
Exits non-zero on the first mismatch, naming it."""

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nccl_moe  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from nccl_moe import fp8  # noqa: E402
from moe_reference import (Routing, assert_close, bf16_rows, dense_moe, ll_combine, ll_routing,  # noqa: E402
                           local_experts, make_routing, router)


def init(backend, same_gpu):
    local = int(os.environ.get("LOCAL_RANK", "0"))
    index = 0 if same_gpu else local
    torch.cuda.set_device(index)
    dev = torch.device("cuda", index)
    if backend == "gloo":
        dist.init_process_group("gloo")
        return dev
    try:  # eager communicator creation (torch >= 2.3)
        dist.init_process_group("nccl", device_id=dev)
    except TypeError:
        dist.init_process_group("nccl")
        dist.all_reduce(torch.zeros(1, device=dev))
    return dev


def make_buffer(raw_comm, **kw):
    """Buffer(group) on the default group, or over its raw ncclComm_t."""
    if not raw_comm:
        return nccl_moe.Buffer(**kw)
    from nccl_moe.buffer import nccl_comm_pointer

    return nccl_moe.Buffer.from_nccl_comm(nccl_comm_pointer(dist.group.WORLD), group=dist.group.WORLD, **kw)


def tokens_of(N, T):
    # Uneven loads; with more than two ranks, rank 1 sends nothing.
    return [0 if (r == 1 and N > 2) else T - 13 * r % (T // 2) for r in range(N)]


def check_case(buf, dev, rank, N, gen, H, K, E, x_fp8=False, send_fp8=False, pow2=False, capacity=0,
               alignment=0, kind="uniform", drop=0.15):
    tokens = tokens_of(N, 96)
    xs = [bf16_rows(gen, T, H, 3.0) for T in tokens]
    idxs = [make_routing(gen, T, K, E, N, kind, drop) for T in tokens]
    ws = [torch.rand(T, K, generator=gen) for T in tokens]
    ref = Routing(idxs, N, E)
    x = fp8.quantize(xs[rank].to(dev), pow2) if x_fp8 else xs[rank].to(dev)
    res = buf.dispatch(x, idxs[rank].to(dev), ws[rank].to(dev), send_fp8=send_fp8 or None,
                       scale_format="pow2" if pow2 else "float", capacity=capacity, expert_alignment=alignment)
    n = ref.counts[rank]
    rows = capacity or n
    assert int(res.recv_count.item()) == n, "recv_count %d, want %d" % (res.recv_count.item(), n)
    assert res.num_recv == (None if capacity else n)
    assert torch.equal(res.recv_tokens_per_expert.cpu(), ref.tokens_per_expert(rank, alignment))
    if x_fp8 or send_fp8:
        q = [fp8.quantize(v, pow2) for v in xs]
        codes, scales = res.recv_x
        assert codes.shape == (rows, H)
        assert torch.equal(fp8.fp8_codes(codes)[:n].cpu(), ref.recv(rank, lambda s: fp8.fp8_codes(q[s][0]))), "codes"
        assert torch.equal(scales[:n].cpu(), ref.recv(rank, lambda s: q[s][1])), "scales"
    else:
        assert res.recv_x.shape == (rows, H)
        assert torch.equal(res.recv_x[:n].cpu(), ref.recv(rank, lambda s: xs[s])), "received rows"
    assert torch.equal(res.recv_topk_idx[:n].cpu(), ref.recv_idx(rank)), "received ids"
    assert torch.equal(res.recv_topk_weights[:n].cpu(), ref.recv_weights(rank, ws)), "received weights"

    # Every process knows every rank's combine input: draw all of them.
    ys = [bf16_rows(gen, capacity or ref.counts[r], H) for r in range(N)]
    out, out_w = buf.combine(ys[rank].to(dev), res.handle, res.recv_topk_weights)
    want = ref.combine(ys, [capacity] * N if capacity else None)[rank]
    assert torch.equal(out.cpu(), want), "combined rows"
    assert torch.equal(out_w.cpu(), torch.where(idxs[rank] >= 0, ws[rank], torch.zeros_like(ws[rank]))), "weights"

    lay = buf.get_dispatch_layout(idxs[rank].to(dev))
    per_rank, per_expert, in_rank = ref.layout(rank)
    assert torch.equal(lay.num_tokens_per_rank.cpu(), per_rank)
    assert torch.equal(lay.num_tokens_per_expert.cpu(), per_expert)
    assert torch.equal(lay.is_token_in_rank.cpu(), in_rank)

    # Same routing again, reusing the handle; combine from the comm's buffer.
    x2 = bf16_rows(gen, tokens[rank], H).to(dev)
    res2 = buf.dispatch(x2, idxs[rank].to(dev), None, send_fp8=(x_fp8 or send_fp8) or None,
                        scale_format="pow2" if pow2 else "float", capacity=capacity, handle=res.handle)
    assert int(res2.recv_count.item()) == n
    b = buf.get_combine_buffer(res2.handle)
    b.copy_(ys[rank].to(dev))
    out2, _ = buf.combine(b, res2.handle)
    assert torch.equal(out2.cpu(), want), "zero-copy combine"
    buf.check_async_error()


def check_low_latency(buf, dev, rank, N, gen, H, K, E, M):
    """Two low-latency steps in flight (both buffer sets), FP8 then BF16,
    split into send and receive halves, against the reference."""
    L = E // N
    steps = []
    for fp8_send in (True, False):
        tokens = tokens_of(N, M)
        xs = [bf16_rows(gen, T, H, 2.0) for T in tokens]
        idxs = [make_routing(gen, T, K, E, N, "uniform", 0.2) for T in tokens]
        ws = [torch.rand(T, K, generator=gen) for T in tokens]
        res = buf.low_latency_dispatch(xs[rank].to(dev), idxs[rank].to(dev), send_fp8=fp8_send, send_only=True)
        steps.append((fp8_send, xs, idxs, ws, res))
    for fp8_send, xs, idxs, ws, res in steps:
        buf.low_latency_dispatch_recv(res.handle)
        rows, at = ll_routing(idxs, N, E)
        counts = res.recv_count_per_expert.cpu().tolist()
        assert counts == [len(rows[rank][l]) for l in range(L)], "low-latency counts"
        src = res.recv_source.cpu()
        q = [fp8.quantize(x) for x in xs] if fp8_send else None
        for l in range(L):
            n = counts[l]
            if n == 0:
                continue
            assert src[l, :n].tolist() == [s * M + t for s, t in rows[rank][l]], "low-latency sources"
            if fp8_send:
                codes, scales = res.recv_x
                want = torch.stack([fp8.fp8_codes(q[s][0])[t] for s, t in rows[rank][l]])
                assert torch.equal(fp8.fp8_codes(codes[l, :n]).cpu(), want), "low-latency codes"
                assert torch.equal(scales[l, :n].cpu(), torch.stack([q[s][1][t] for s, t in rows[rank][l]]))
            else:
                assert torch.equal(res.recv_x[l, :n].cpu(), torch.stack([xs[s][t] for s, t in rows[rank][l]]))
        # Every process draws every rank's expert outputs.
        ys = []
        for r in range(N):
            y = torch.zeros(L, res.expert_stride, H, dtype=torch.bfloat16)
            for l in range(L):
                y[l, :len(rows[r][l])] = bf16_rows(gen, len(rows[r][l]), H)
            ys.append(y)
        buf.low_latency_combine(ys[rank].to(dev), res.handle, ws[rank].to(dev), send_only=True)
        out = buf.low_latency_combine_recv(res.handle)
        assert_close(out, ll_combine(idxs, ws, ys, at, N, E, rank), "low-latency combine", rel=8e-3)
    buf.check_async_error()


def check_layer(buf, dev, rank, N, gen, H, F, E, K, lazy_rank):
    """The MoE layer, forward and backward, against the dense reference.
    lazy_rank's experts ignore what they receive (outputs not requiring
    grad): its backward collectives must still run, or the others hang."""
    L = E // N
    tokens = tokens_of(N, 64)
    gate = (torch.randn(H, E, generator=gen) * H ** -0.5).to(dev)
    w1 = (torch.randn(E, H, F, generator=gen) * H ** -0.5).to(dev)
    w2 = (torch.randn(E, F, H, generator=gen) * F ** -0.5).to(dev)
    xs = [bf16_rows(gen, T, H).to(dev) for T in tokens]
    g = [bf16_rows(gen, T, H).float().to(dev) for T in tokens]
    p_gate = gate.clone().requires_grad_()
    p_w1 = w1[rank * L:(rank + 1) * L].clone().requires_grad_()
    p_w2 = w2[rank * L:(rank + 1) * L].clone().requires_grad_()
    x = xs[rank].clone().requires_grad_()
    idx, w = router(x, p_gate, K)
    res = buf.dispatch(x, idx, w)
    if rank == lazy_rank:
        y = torch.zeros(res.handle.rows, H, dtype=torch.bfloat16, device=dev)
    else:
        y = local_experts(res.recv_x.float(), res.recv_topk_idx, res.recv_topk_weights, p_w1, p_w2)
    out, _ = buf.combine(y, res.handle)
    (out.float() * g[rank]).sum().backward()
    if lazy_rank is not None:
        return  # the reference would need the lazy rank's zeros: finishing without a hang is the check
    dist.all_reduce(p_gate.grad)

    r_gate, r_w1, r_w2 = gate.clone().requires_grad_(), w1.clone().requires_grad_(), w2.clone().requires_grad_()
    r_x = [v.clone().requires_grad_() for v in xs]
    ref = []
    for v in r_x:
        i, wr = router(v, r_gate, K)
        ref.append(dense_moe(v.float(), i, wr, r_w1, r_w2))
    sum((o * gg).sum() for o, gg in zip(ref, g)).backward()
    assert_close(out, ref[rank], "layer output")
    assert_close(x.grad, r_x[rank].grad, "grad x", rel=3e-2)
    assert_close(p_gate.grad, r_gate.grad, "grad router")
    assert_close(p_w1.grad, r_w1.grad[rank * L:(rank + 1) * L], "grad w1")
    assert_close(p_w2.grad, r_w2.grad[rank * L:(rank + 1) * L], "grad w2")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--same-gpu", action="store_true")
    p.add_argument("--raw-comm", action="store_true")
    a = p.parse_args()
    if a.same_gpu and a.backend != "gloo":
        p.error("--same-gpu needs --backend gloo (NCCL refuses two ranks on one GPU)")
    if a.raw_comm and a.backend != "nccl":
        p.error("--raw-comm needs the NCCL backend")
    dev = init(a.backend, a.same_gpu)
    rank, N = dist.get_rank(), dist.get_world_size()
    H, K, E = 1024, 4, 4 * N
    failed = 0
    try:
        with make_buffer(a.raw_comm, max_tokens_per_rank=96, hidden=H, num_experts=E, max_topk=K,
                         timeout_ms=60000) as buf:
            assert buf.rank == rank and buf.num_ranks == N and buf.device == dev
            assert buf.buffer_bytes > 0
            cases = [
                ("bf16 exact", dict()),
                ("fp8 input exact, alignment 16", dict(x_fp8=True, alignment=16)),
                ("pow2 cast, capacity", dict(send_fp8=True, pow2=True, capacity=N * 96, kind="skewed")),
                ("bf16 capacity, all -1", dict(capacity=N * 96, drop=1.0)),
            ]
            for name, kw in cases:
                gen = torch.Generator().manual_seed(a.seed + len(name))
                check_case(buf, dev, rank, N, gen, H, K, E, **kw)
                print("rank %d: %s: ok" % (rank, name), flush=True)
        if nccl_moe.get_library().has_low_latency:
            with make_buffer(a.raw_comm, max_tokens_per_rank=1, hidden=H, num_experts=E, max_topk=K,
                             timeout_ms=60000, ll_max_tokens_per_rank=32) as buf:
                check_low_latency(buf, dev, rank, N, torch.Generator().manual_seed(a.seed + 7), H, K, E, 32)
                print("rank %d: low-latency, two steps in flight: ok" % rank, flush=True)
        with make_buffer(a.raw_comm, max_tokens_per_rank=64, hidden=256, num_experts=2 * N, max_topk=2,
                         timeout_ms=60000) as buf:
            check_layer(buf, dev, rank, N, torch.Generator().manual_seed(a.seed), 256, 64, 2 * N, 2, None)
            print("rank %d: MoE layer gradients: ok" % rank, flush=True)
            check_layer(buf, dev, rank, N, torch.Generator().manual_seed(a.seed + 1), 256, 64, 2 * N, 2, N - 1)
            print("rank %d: backward with a rank whose experts ignore their rows: ok" % rank, flush=True)
    except Exception:  # noqa: BLE001 - reported, then the process fails
        traceback.print_exc()
        failed = 1
        print("rank %d: FAIL (seed %d)" % (rank, a.seed), flush=True)
    if not failed:
        print("rank %d: PASS" % rank, flush=True)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    sys.exit(failed)


if __name__ == "__main__":
    main()
