# SPDX-License-Identifier: Apache-2.0
"""Low-latency dispatch / combine (decode mode) with virtual ranks on one GPU
against a plain reference: expert-major rows in (source rank, token) order,
their sources, FP8 codes and scales (fp32, power-of-two, packed UE8M0), the
weighted combine, the split send / receive halves, two steps in flight, and
the cumulative per-expert counts. Skips when the library has no low-latency
API."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import nccl_moe  # noqa: E402
from nccl_moe import fp8  # noqa: E402
from moe_reference import assert_close, bf16_rows, ll_combine, ll_routing, make_routing  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
N, M, H, K, E = 4, 32, 1024, 4, 16
L = E // N
TOKENS = [32, 0, 17, 5]


def make_buffer(**kw):
    vb = nccl_moe.VirtualBuffer(N, max_tokens_per_rank=1, hidden=H, num_experts=E, max_topk=K,
                                ll_max_tokens_per_rank=M, timeout_ms=30000, **kw)
    if not vb.has_low_latency:
        vb.destroy()
        pytest.skip("the library has no low-latency API")
    return vb


def make_step(gen):
    xs = [bf16_rows(gen, T, H, 2.0) for T in TOKENS]
    idxs = [make_routing(gen, T, K, E, N, "uniform", 0.2) for T in TOKENS]
    for idx in idxs:  # a few repeated ids: sent once, weighted once per occurrence
        if idx.shape[0] > 3:
            idx[1:4, 1] = idx[1:4, 0]
    ws = [torch.rand(T, K, generator=gen) * 2 - 1 for T in TOKENS]
    return xs, idxs, ws


def check_dispatch(res, xs, rows, fmt):
    q = {"float": [fp8.quantize(x) for x in xs], "pow2": [fp8.quantize(x, True) for x in xs],
         "ue8m0": [fp8.quantize(x, True) for x in xs]}.get(fmt)
    for r in range(N):
        got = res[r]
        assert got.expert_stride == N * M and got.num_local_experts == L
        counts = got.recv_count_per_expert.cpu()
        src = got.recv_source.cpu()
        if fmt == "bf16":
            assert got.recv_x.shape == (L, N * M, H) and got.recv_x.dtype == torch.bfloat16
        else:
            codes, scales = got.recv_x
            assert codes.shape == (L, N * M, H)
        for l in range(L):
            want = rows[r][l]
            n = len(want)
            assert counts[l].item() == n, "rank %d expert %d: %d rows, want %d" % (r, l, counts[l], n)
            if n == 0:
                continue
            assert src[l, :n].tolist() == [s * M + t for s, t in want]
            if fmt == "bf16":
                assert torch.equal(got.recv_x[l, :n].cpu(), torch.stack([xs[s][t] for s, t in want]))
                continue
            assert torch.equal(fp8.fp8_codes(codes[l, :n]).cpu(),
                               torch.stack([fp8.fp8_codes(q[s][0])[t] for s, t in want]))
            want_s = torch.stack([q[s][1][t] for s, t in want])
            if fmt == "ue8m0":
                nS = H // 128
                words = (nS + 3) // 4
                assert scales.dtype == torch.int32 and scales.shape == (L, N * M, words)
                raw = scales[l, :n].cpu().contiguous().view(torch.uint8).reshape(n, words * 4)
                exps = ((want_s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
                assert torch.equal(raw[:, :nS], exps) and (raw[:, nS:] == 0).all()
            else:
                assert scales.dtype == torch.float32
                assert torch.equal(scales[l, :n].cpu(), want_s)


def expert_outputs(gen, rows):
    ys = []
    for r in range(N):
        y = torch.zeros(L, N * M, H, dtype=torch.bfloat16)
        for l in range(L):
            y[l, :len(rows[r][l])] = bf16_rows(gen, len(rows[r][l]), H)
        ys.append(y)
    return ys


def combine_reference(idxs, ws, ys, at, weights=True):
    return [ll_combine(idxs, ws if weights else None, ys, at, N, E, s) for s in range(N)]


@pytest.mark.parametrize("fmt", ["bf16", "float", "pow2", "ue8m0"])
@pytest.mark.parametrize("send_only", [False, True], ids=["whole", "halves"])
def test_low_latency_round_trip(seed, fmt, send_only):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_step(gen)
    rows, at = ll_routing(idxs, N, E)
    with make_buffer() as vb:
        cum = [torch.zeros(L, dtype=torch.int64, device=DEV) for _ in range(N)]
        res = vb.low_latency_dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs], send_fp8=fmt != "bf16",
                                      scale_format="float" if fmt == "bf16" else fmt, cumulative_recv_count=cum,
                                      send_only=send_only)
        handles = [r.handle for r in res]
        if send_only:
            vb.low_latency_dispatch_recv(handles)
        check_dispatch(res, xs, rows, fmt)
        for r in range(N):
            assert cum[r].tolist() == [len(rows[r][l]) for l in range(L)]
        ys = expert_outputs(gen, rows)
        outs = vb.low_latency_combine([y.to(DEV) for y in ys], handles, [w.to(DEV) for w in ws],
                                      send_only=send_only)
        if send_only:
            assert vb.low_latency_combine_recv(handles) == outs
        torch.cuda.synchronize()
        vb.check_async_error()  # first: an error explains wrong values
        want = combine_reference(idxs, ws, ys, at)
        for s in range(N):
            assert outs[s].shape == (TOKENS[s], H)
            assert_close(outs[s], want[s], "rank %d: combined" % s, rel=8e-3)


@pytest.mark.parametrize("send_only", [False, True], ids=["whole", "halves"])
def test_low_latency_virtual_nodes(seed, send_only):
    """Two virtual nodes of two ranks: the ranks of the other node through
    the network proxy, their rows after those of the receiver's node."""
    gen = torch.Generator().manual_seed(seed)
    with make_buffer(ranks_per_node=2) as vb:
        for _ in range(3):  # both buffer sets, then the first again
            xs, idxs, ws = make_step(gen)
            rows, at = ll_routing(idxs, N, E, ranks_per_node=2)
            res = vb.low_latency_dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs], send_fp8=True,
                                          scale_format="ue8m0", send_only=send_only)
            handles = [r.handle for r in res]
            if send_only:
                vb.low_latency_dispatch_recv(handles)
            check_dispatch(res, xs, rows, "ue8m0")
            ys = expert_outputs(gen, rows)
            outs = vb.low_latency_combine([y.to(DEV) for y in ys], handles, [w.to(DEV) for w in ws],
                                          send_only=send_only)
            if send_only:
                vb.low_latency_combine_recv(handles)
            torch.cuda.synchronize()
            vb.check_async_error()
            want = combine_reference(idxs, ws, ys, at)
            for s in range(N):
                assert_close(outs[s], want[s], "rank %d: combined" % s, rel=8e-3)


def test_low_latency_two_steps_in_flight(seed):
    # dispatch A, dispatch B (the other buffer set), combine A, combine B.
    gen = torch.Generator().manual_seed(seed)
    steps = [make_step(gen) for _ in range(2)]
    with make_buffer() as vb:
        res = [vb.low_latency_dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs])
               for xs, idxs, _ in steps]
        outs = []
        for (xs, idxs, ws), rs in zip(steps, res):
            rows, at = ll_routing(idxs, N, E)
            check_dispatch(rs, xs, rows, "bf16")
            ys = expert_outputs(gen, rows)
            got = vb.low_latency_combine([y.to(DEV) for y in ys], [r.handle for r in rs])  # weight 1
            outs.append((got, combine_reference(idxs, ws, ys, at, weights=False)))
        for got, want in outs:
            for s in range(N):
                assert_close(got[s], want[s], "rank %d: combined" % s, rel=8e-3)
        vb.check_async_error()


def test_low_latency_argument_checks(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, _ = make_step(gen)
    x_dev = [x.to(DEV) for x in xs]
    i_dev = [i.to(DEV) for i in idxs]
    with nccl_moe.VirtualBuffer(N, max_tokens_per_rank=M, hidden=H, num_experts=E, max_topk=K) as plain:
        if not plain.has_low_latency:
            pytest.skip("the library has no low-latency API")
        with pytest.raises(ValueError, match="ll_max_tokens_per_rank > 0"):
            plain.low_latency_dispatch(x_dev, i_dev)
    with make_buffer() as vb:
        too_many = [bf16_rows(gen, M + 1, H).to(DEV)] + x_dev[1:]
        with pytest.raises(ValueError, match="more than ll_max_tokens_per_rank"):
            vb.low_latency_dispatch(too_many, [torch.zeros(M + 1, K, dtype=torch.int64, device=DEV)] + i_dev[1:])
        with pytest.raises(ValueError, match="scale_format must be one of"):
            vb.low_latency_dispatch(x_dev, i_dev, send_fp8=True, scale_format="e8m0")
        res = vb.low_latency_dispatch(x_dev, i_dev)
        with pytest.raises(ValueError, match="num_local_experts, expert_stride, hidden"):
            vb.low_latency_combine([torch.zeros(L, N * M, H + 8, dtype=torch.bfloat16, device=DEV)] * N,
                                   [r.handle for r in res])
        with pytest.raises(ValueError, match="LowLatencyHandle"):
            vb.low_latency_combine([torch.zeros(L, N * M, H, dtype=torch.bfloat16, device=DEV)] * N, [None] * N)
        # The checks above stopped before the library: the step completes.
        vb.low_latency_combine([torch.zeros(L, N * M, H, dtype=torch.bfloat16, device=DEV) for _ in range(N)],
                               [r.handle for r in res])
        vb.check_async_error()
        assert all(b > 0 for b in vb.low_latency_buffer_bytes)
