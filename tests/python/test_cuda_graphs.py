# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs from Python: every virtual rank captures a step in
torch.cuda.graph (capacity-mode dispatch + expert compute + combine through
nccl_moe.deep_ep with num_worst_tokens, and a low-latency dispatch + combine
with receive hooks), then replays it several times with new inputs copied
into the captured input tensors; each replay is checked against the plain
reference."""

import threading

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from nccl_moe import deep_ep  # noqa: E402
from moe_reference import Routing, assert_close, bf16_rows, make_routing  # noqa: E402

N, H, K, E = 4, 512, 4, 16
TOKENS = [40, 0, 23, 64]  # fixed per rank (the shapes are captured)
REPLAYS = 3
LL_M = 64


def inputs(gen, kind="uniform"):
    xs = [bf16_rows(gen, T, H, 2.0) for T in TOKENS]
    idxs = [make_routing(gen, T, K, E, N, kind, 0.2) for T in TOKENS]
    ws = [torch.rand(T, K, generator=gen) + 0.1 for T in TOKENS]
    return xs, idxs, ws


def capture(fn, barrier):
    """fn() captured on this thread's current stream (each rank's own), in
    thread-local mode: the ranks capture at the same time. No rank captures
    while another still runs or synchronizes (barriers around), and
    CUDAGraph.capture_begin is used rather than torch.cuda.graph, whose entry
    synchronizes the device and empties the cache while other threads may
    already be capturing."""
    torch.cuda.current_stream().synchronize()
    barrier.wait()
    g = torch.cuda.CUDAGraph()
    g.capture_begin(capture_error_mode="thread_local")
    try:
        out = fn()
    finally:
        g.capture_end()
    barrier.wait()
    return g, out


def test_capacity_mode_graph(seed):
    gen = torch.Generator().manual_seed(seed)
    data = [inputs(gen, kind) for kind in ("uniform", "skewed", "uniform", "one_rank")]
    refs = [Routing(d[1], N, E) for d in data]
    worst = sum(TOKENS)
    barrier = threading.Barrier(N, timeout=120)
    nvl = deep_ep._bytes_for_rows(worst, H)  # rows are allocated in whole alignment units
    with deep_ep.virtual_buffers(N, nvl, hidden=H, num_experts=E, timeout_ms=30000) as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            x_s = data[0][0][r].to(dev)
            idx_s = data[0][1][r].to(dev)
            w_s = data[0][2][r].to(dev)

            def step():
                per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_s, E)
                recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
                    x_s, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=idx_s, topk_weights=w_s, num_worst_tokens=worst)
                y = (recv_x.float() * 2).to(torch.bfloat16)  # the "experts"
                combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
                return recv_x, recv_idx, combined, combined_w, handle

            step()  # warm-up: allocator, kernels, a pooled native handle
            torch.cuda.current_stream().synchronize()
            g, (recv_x, recv_idx, combined, combined_w, handle) = capture(step, barrier)
            got = []
            for xs, idxs, ws in data[1:]:
                x_s.copy_(xs[r].to(dev))
                idx_s.copy_(idxs[r].to(dev))
                w_s.copy_(ws[r].to(dev))
                g.replay()
                got.append((recv_x.cpu(), recv_idx.cpu(), combined.cpu(), combined_w.cpu()))
            torch.cuda.current_stream().synchronize()
            del handle
            return r, got

        results = group.run(rank)
        group.owner.check_async_error()
    for i, ((xs, idxs, ws), ref) in enumerate(zip(data[1:], refs[1:])):
        for r, got in results:
            recv_x, recv_idx, combined, combined_w = got[i]
            n = ref.counts[r]
            assert torch.equal(recv_x[:n], ref.recv(r, lambda s: xs[s])), "replay %d rank %d: rows" % (i, r)
            assert torch.equal(recv_idx[:n], ref.recv_idx(r))
            assert bool((recv_idx[n:] == -1).all())
            # Every reached rank returned 2 * x: the sum is exact.
            reached = ref.in_rank[r].sum(1, keepdim=True).float()
            assert torch.equal(combined, (xs[r].float() * 2 * reached).to(torch.bfloat16)), "replay %d rank %d" % (i, r)
            assert torch.equal(combined_w, torch.where(idxs[r] >= 0, ws[r], torch.zeros_like(ws[r])))


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_low_latency_graph(use_fp8, seed):
    gen = torch.Generator().manual_seed(seed)
    data = [inputs(gen) for _ in range(REPLAYS + 1)]
    barrier = threading.Barrier(N, timeout=120)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_M, H, N, E)
    with deep_ep.virtual_buffers(N, 0, hint, True, hidden=H, num_experts=E, num_max_dispatch_tokens_per_rank=LL_M,
                                 timeout_ms=30000) as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            x_s = data[0][0][r].to(dev)
            idx_s = data[0][1][r].to(dev)
            w_s = data[0][2][r].to(dev)

            def step():
                recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
                    x_s, idx_s, LL_M, E, use_fp8=use_fp8, return_recv_hook=True)
                hook()
                if use_fp8:  # dequantize with the column-major scales, per 128 channels
                    codes, scales = recv_x
                    y = (codes.float().unflatten(2, (H // 128, 128)) * scales.unsqueeze(3)).flatten(2)
                else:
                    y = recv_x.float()
                y = (y * 2).to(torch.bfloat16)
                out, _, chook = buf.low_latency_combine(y, idx_s, w_s, handle, return_recv_hook=True)
                chook()
                return recv_count, out, handle

            step()
            torch.cuda.current_stream().synchronize()
            g, (recv_count, out, handle) = capture(step, barrier)
            got = []
            for xs, idxs, ws in data[1:]:
                x_s.copy_(xs[r].to(dev))
                idx_s.copy_(idxs[r].to(dev))
                w_s.copy_(ws[r].to(dev))
                g.replay()
                got.append((recv_count.cpu(), out.cpu()))
            torch.cuda.current_stream().synchronize()
            del handle
            return r, got

        results = group.run(rank)
        group.owner.check_async_error()
    from nccl_moe import fp8

    for i, (xs, idxs, ws) in enumerate(data[1:]):
        for r, got in results:
            recv_count, out = got[i]
            # Rows per local expert: (source, token) pairs choosing it, a
            # token once per distinct expert.
            want = [0] * (E // N)
            for s in range(N):
                for t in range(TOKENS[s]):
                    for e in set(idxs[s][t].tolist()):
                        if e >= 0 and e // (E // N) == r:
                            want[e % (E // N)] += 1
            assert recv_count.tolist() == want, "replay %d rank %d" % (i, r)
            # Each expert returned 2 * (what it received) of the token.
            x = fp8.dequantize(*fp8.quantize(xs[r]), torch.float32) if use_fp8 else xs[r].float()
            x = (x * 2).to(torch.bfloat16).float()
            wsum = torch.where(idxs[r] >= 0, ws[r], torch.zeros_like(ws[r])).sum(1, keepdim=True)
            assert_close(out, x * wsum, "replay %d rank %d: combined" % (i, r), rel=1e-2)
