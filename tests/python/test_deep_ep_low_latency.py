# SPDX-License-Identifier: Apache-2.0
"""nccl_moe.deep_ep low-latency mode with virtual ranks, checked the way
DeepEP's legacy tests/test_low_latency.py checks, against moe_reference.py:
per-expert counts (and the int32 cumulative stats), each row's source token
(handle[0]) and each source's row range (handle[1]), the rows (BF16) or
their FP8 codes and scales in DeepEP's column-major, TMA-aligned layout
(fp32, power-of-two, packed UE8M0), the weighted combine, receive hooks,
async events, zero-copy combine, two steps in flight; a shape whose token
count per expert is not a multiple of 4 (padded scale columns)."""

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from nccl_moe import _lib, deep_ep, fp8  # noqa: E402
from moe_reference import assert_close, bf16_rows, ll_combine, ll_routing, make_routing  # noqa: E402

# The communicators' timeout (MOE_TEST_TIMEOUT_MS: shorter to see a stuck rank sooner).
TIMEOUT_MS = int(os.environ.get("MOE_TEST_TIMEOUT_MS", "30000"))

SHAPES = {
    #            N  M   E   K  H     tokens per rank
    "n4": (4, 32, 16, 4, 1024, [32, 0, 17, 5]),
    "n3_padded": (3, 7, 6, 2, 640, [7, 3, 0]),  # N * M = 21 rows per expert: scale columns of 24
}
FORMATS = ["bf16", "fp8", "round_scale", "ue8m0"]


def make_group(shape):
    N, M, E, K, H, _ = shape
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, N, E)
    group = deep_ep.virtual_buffers(N, 0, hint, True, hidden=H, num_experts=E, num_max_dispatch_tokens_per_rank=M,
                                    timeout_ms=TIMEOUT_MS)
    return group


def make_step(gen, shape):
    N, M, E, K, H, tokens = shape
    xs, idxs, ws = [], [], []
    for r, T in enumerate(tokens):
        x = bf16_rows(gen, T, H, 2.0)
        x[:, 0] = r
        x[:, -1] = torch.arange(T, dtype=torch.float32).to(torch.bfloat16)
        xs.append(x)
        idx = make_routing(gen, T, K, E, N, "uniform", 0.2)
        if T > 3 and K > 1:
            idx[1:3, 1] = idx[1:3, 0]  # a repeated expert: sent once, weighted per occurrence
        idxs.append(idx)
        ws.append(torch.rand(T, K, generator=gen) + 0.1)
    return xs, idxs, ws


def expert_outputs(gen, shape, rows):
    N, M, E, K, H, _ = shape
    L, S = E // N, N * M
    ys = []
    for r in range(N):
        y = torch.zeros(L, S, H, dtype=torch.bfloat16)
        for l_ in range(L):
            y[l_, :len(rows[r][l_])] = bf16_rows(gen, len(rows[r][l_]), H)
        ys.append(y)
    return ys


def dispatch_kwargs(fmt):
    return dict(use_fp8=fmt != "bf16", round_scale=fmt in ("round_scale", "ue8m0"), use_ue8m0=fmt == "ue8m0")


def check_dispatch(shape, r, fmt, recv_x, recv_count, handle, xs, rows, stats=None):
    """One rank's low-latency dispatch against the reference (CPU)."""
    N, M, E, K, H, _ = shape
    L, S = E // N, N * M
    counts = recv_count.cpu()
    assert recv_count.dtype == torch.int32 and recv_count.shape == (L,)
    assert len(handle) == 5 and tuple(handle)[2:] == (M, H, E)
    src_info, layout = handle[0].cpu(), handle[1].cpu()
    assert src_info.shape == (L, S) and src_info.dtype == torch.int32
    assert layout.shape == (L, N) and layout.dtype == torch.int64
    if fmt == "bf16":
        assert recv_x.shape == (L, S, H) and recv_x.dtype == torch.bfloat16 and recv_x.is_contiguous()
    else:
        codes, scales = recv_x
        assert codes.shape == (L, S, H) and (fp8.FP8_DTYPE is None or codes.dtype == fp8.FP8_DTYPE)
        cols = (H // 128 + 3) // 4 if fmt == "ue8m0" else H // 128
        tp = (S + 3) // 4 * 4  # token dimension padded to 16 bytes
        assert scales.shape == (L, S, cols)
        assert scales.dtype == (torch.int32 if fmt == "ue8m0" else torch.float32)
        # DeepEP's column-major, TMA-aligned layout: tokens contiguous.
        assert scales.stride() == (cols * tp, 1, tp), scales.stride()
        assert scales.data_ptr() % 16 == 0
        q = [fp8.quantize(x, fmt != "fp8") for x in xs]
    for l_ in range(L):
        want = rows[r][l_]
        n = len(want)
        assert counts[l_].item() == n, "rank %d expert %d: %d rows, want %d" % (r, l_, counts[l_], n)
        if stats is not None:
            assert stats[l_].item() == n
        assert src_info[l_, :n].tolist() == [t for _, t in want]
        begin = 0
        for j in range(N):
            cnt = sum(1 for s, _ in want if s == j)
            assert layout[l_, j].item() == (begin << 32) | cnt, "rank %d expert %d source %d" % (r, l_, j)
            begin += cnt
        if n == 0:
            continue
        if fmt == "bf16":
            assert torch.equal(recv_x[l_, :n].cpu(), torch.stack([xs[s][t] for s, t in want]))
            continue
        want_codes = torch.stack([fp8.fp8_codes(q[s][0])[t] for s, t in want])
        assert torch.equal(fp8.fp8_codes(codes[l_, :n]).cpu(), want_codes)
        want_s = torch.stack([q[s][1][t] for s, t in want])
        got_s = scales[l_, :n].cpu().contiguous()
        if fmt == "ue8m0":
            nS = H // 128
            raw = got_s.view(torch.uint8).reshape(n, -1)
            exps = ((want_s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
            assert torch.equal(raw[:, :nS], exps) and bool((raw[:, nS:] == 0).all())
        else:
            assert torch.equal(got_s, want_s)


def simulated_gemm(fmt, recv_x):
    """What DeepEP's test feeds combine: the received rows as BF16."""
    if fmt == "bf16":
        return recv_x.clone()
    codes, scales = recv_x
    L, S, H = codes.shape
    if scales.dtype == torch.int32:  # UE8M0 words -> fp32 powers of two
        nS = H // 128
        b = scales.contiguous().view(torch.uint8).reshape(L, S, -1)[:, :, :nS].to(torch.int32) << 23
        scales = b.view(torch.float32)
    return fp8.dequantize(codes.reshape(L * S, H), scales.reshape(L * S, H // 128), torch.bfloat16).reshape(L, S, H)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("how", ["plain", "hook", "async"])
def test_low_latency_round_trip(shape_name, fmt, how, seed):
    shape = SHAPES[shape_name]
    N, M, E, K, H, tokens = shape
    gen = torch.Generator().manual_seed(seed)
    steps = [make_step(gen, shape) for _ in range(3)]  # both buffer sets, then the first again
    routes = [ll_routing(s[1], N, E) for s in steps]
    with make_group(shape) as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            outs = []
            for (xs, idxs, ws), (rows, _) in zip(steps, routes):
                stats = torch.zeros(E // N, dtype=torch.int32, device=dev)
                x, idx = xs[r].to(dev), idxs[r].to(dev)
                recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
                    x, idx, M, E, cumulative_local_expert_recv_stats=stats, async_finish=how == "async",
                    return_recv_hook=how == "hook", **dispatch_kwargs(fmt))
                if how == "hook":
                    assert event.event is None and callable(hook)
                    hook()
                elif how == "async":
                    assert hook is None
                    event.current_stream_wait()
                check_dispatch(shape, r, fmt, recv_x, recv_count, handle, xs, rows, stats.cpu())
                y = simulated_gemm(fmt, recv_x)
                w = ws[r].to(dev)
                out = torch.empty(idx.shape[0], H, dtype=torch.bfloat16, device=dev)
                combined, event, chook = buf.low_latency_combine(y, idx, w, handle, async_finish=how == "async",
                                                                 return_recv_hook=how == "hook", out=out)
                assert combined is out
                if how == "hook":
                    chook()
                elif how == "async":
                    event.current_stream_wait()
                outs.append((y.cpu(), combined.cpu()))
            return r, outs

        got = group.run(rank)
        group.owner.check_async_error()
    for i, ((xs, idxs, ws), (rows, at)) in enumerate(zip(steps, routes)):
        ys = [g[1][i][0] for g in got]
        for s, outs in got:
            want = ll_combine(idxs, ws, ys, at, N, E, s)
            assert_close(outs[i][1], want, "step %d rank %d: combined" % (i, s), rel=8e-3)


def test_zero_copy_and_two_steps_in_flight(seed):
    """get_next_low_latency_combine_buffer + zero_copy=True reads that buffer
    (x is ignored); two dispatches in flight (both buffer sets) before their
    combines."""
    shape = SHAPES["n4"]
    N, M, E, K, H, tokens = shape
    gen = torch.Generator().manual_seed(seed)
    steps = [make_step(gen, shape) for _ in range(2)]
    routes = [ll_routing(s[1], N, E) for s in steps]
    ys = [expert_outputs(gen, shape, rows) for rows, _ in routes]
    with make_group(shape) as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            res = [buf.low_latency_dispatch(xs[r].to(dev), idxs[r].to(dev), M, E, use_fp8=False)
                   for xs, idxs, _ in steps]
            outs = []
            for i, ((xs, idxs, ws), (rows, _)) in enumerate(zip(steps, routes)):
                recv_x, recv_count, handle, _, _ = res[i]
                check_dispatch(shape, r, "bf16", recv_x, recv_count, handle, xs, rows)
                zbuf = buf.get_next_low_latency_combine_buffer(handle)
                assert zbuf.shape == (E // N, N * M, H) and zbuf.dtype == torch.bfloat16
                zbuf.copy_(ys[i][r].to(dev))
                ignored = torch.zeros(E // N, N * M, H, dtype=torch.bfloat16, device=dev)
                combined, _, _ = buf.low_latency_combine(ignored, idxs[r].to(dev), ws[r].to(dev), handle,
                                                         zero_copy=True)
                outs.append(combined.cpu())
            return r, outs

        got = group.run(rank)
    for i, ((xs, idxs, ws), (rows, at)) in enumerate(zip(steps, routes)):
        for s, outs in got:
            assert_close(outs[i], ll_combine(idxs, ws, ys[i], at, N, E, s), "step %d rank %d" % (i, s), rel=8e-3)


def test_low_latency_arguments(seed):
    shape = SHAPES["n4"]
    N, M, E, K, H, tokens = shape
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_step(gen, shape)
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, N, E) > 0
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        deep_ep.virtual_buffers(N, 0, 1024, True, hidden=H, num_experts=E, num_max_dispatch_tokens_per_rank=M)
    with make_group(shape) as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            x, idx, w = xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)
            for exc, fn in [
                (ValueError, lambda: buf.low_latency_dispatch(x, idx, M, E, use_ue8m0=True)),  # needs round_scale
                (ValueError, lambda: buf.low_latency_dispatch(x, idx, M, E, async_finish=True, return_recv_hook=True)),
                (NotImplementedError, lambda: buf.low_latency_dispatch(
                    x, idx, M, E, dispatch_wait_recv_cost_stats=torch.zeros(N, dtype=torch.int64, device=dev))),
                (ValueError, lambda: buf.low_latency_dispatch(x, idx, M + 1, E)),  # not what the buffers hold
                (ValueError, lambda: buf.low_latency_dispatch(
                    x, idx, M, E, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32, device=dev))),
                (NotImplementedError, lambda: buf.low_latency_update_mask_buffer(0, True)),
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=torch.zeros(
                    N, dtype=torch.int32, device=dev), is_token_in_rank=torch.zeros(
                    idx.shape[0], N, dtype=torch.bool, device=dev), num_tokens_per_expert=torch.zeros(
                    E, dtype=torch.int32, device=dev))),  # num_nvl_bytes = 0: no normal mode
            ]:
                with pytest.raises(exc):
                    fn()
            buf.clean_low_latency_buffer(M, H, E)  # nothing to clean; arguments checked
            recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E)
            y = simulated_gemm("fp8", recv_x)
            for exc, fn in [
                (NotImplementedError, lambda: buf.low_latency_combine(y, idx, w, handle, use_logfmt=True)),
                (ValueError, lambda: buf.low_latency_combine(y[:, :, :H - 8].contiguous(), idx, w, handle)),
                (ValueError, lambda: buf.low_latency_combine(y, idx, w, (1, 2, 3, 4, 5))),
                (ValueError, lambda: buf.low_latency_combine(y, idx, w, handle, zero_copy=True)),  # buffer never taken
            ]:
                with pytest.raises(exc):
                    fn()
            # The checks stopped before the library: the step completes.
            buf.low_latency_combine(y, idx, w, handle)
            torch.cuda.current_stream().synchronize()

        group.run(rank)
        group.owner.check_async_error()
    assert _lib.LL_MAX_TOKENS >= M
