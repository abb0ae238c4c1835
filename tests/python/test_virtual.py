# SPDX-License-Identifier: Apache-2.0
"""VirtualBuffer (N ranks on one GPU) against the plain torch reference of
moe_reference.py, on fresh random inputs (seed printed): exact and capacity
mode, BF16 / FP8 inputs / in-kernel casts, -1 experts, ranks without tokens,
uneven loads, handle reuse, zero-copy combine, views vs copies, async
errors."""

import dataclasses
from typing import List, Optional

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import nccl_moe  # noqa: E402
from nccl_moe import fp8  # noqa: E402
from moe_reference import Routing, bf16_rows, make_routing  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())


def make_buffer(N, max_tokens, H, E, K, **kw):
    kw.setdefault("timeout_ms", 30000)
    return nccl_moe.VirtualBuffer(N, max_tokens_per_rank=max(max_tokens, 1), hidden=H, num_experts=E, max_topk=K,
                                  **kw)


@dataclasses.dataclass
class Case:
    N: int
    tokens: List[int]
    H: int
    K: int
    E: int
    kind: str = "uniform"
    drop: float = 0.0
    weights: bool = True
    x_fp8: bool = False
    send_fp8: bool = False
    pow2: bool = False
    capacity: int = 0
    alignment: int = 0
    overflow: bool = False
    max_recv: Optional[int] = None


CASES = {
    "bf16_exact_2ranks": Case(2, [97] * 2, 2048, 4, 8, drop=1 / 7),
    "fp8_input_exact_4ranks": Case(4, [300] * 4, 1024, 8, 64, drop=0.2, x_fp8=True, alignment=32),
    "cast_8ranks": Case(8, [256] * 8, 2048, 8, 64, send_fp8=True),
    "pow2_cast_zero_tokens": Case(8, [0, 130, 130, 1, 130, 0, 130, 130], 1024, 9, 72, send_fp8=True, pow2=True),
    "all_to_one_rank": Case(4, [200] * 4, 1024, 2, 16, kind="one_rank"),
    "odd_hidden_topk1_skewed": Case(4, [150] * 4, 2056, 1, 8, kind="skewed", weights=False),
    "all_dropped": Case(2, [64] * 2, 512, 3, 8, drop=1.0),
    "capacity_fp8_skewed": Case(8, [128] * 8, 2048, 8, 64, kind="skewed", x_fp8=True, capacity=8 * 128),
    "capacity_bf16_uneven": Case(3, [50, 0, 77], 512, 4, 12, drop=0.1, capacity=130, alignment=8),
    "capacity_overflow": Case(4, [100] * 4, 1024, 4, 16, kind="one_rank", capacity=150, overflow=True),
    "exact_small_max_recv": Case(2, [40, 40], 256, 2, 4, max_recv=100),
}


def make_inputs(c, gen):
    xs = [bf16_rows(gen, T, c.H, 3.0) for T in c.tokens]
    idxs = [make_routing(gen, T, c.K, c.E, c.N, c.kind, c.drop) for T in c.tokens]
    ws = [torch.rand(T, c.K, generator=gen) for T in c.tokens]
    return xs, idxs, ws


def check_dispatch(c, res, xs, idxs, ws, ref):
    cap = c.capacity
    sent = [fp8.quantize(x, c.pow2) for x in xs] if (c.send_fp8 or c.x_fp8) else None
    for r in range(c.N):
        got = res[r]
        n = ref.counts[r]
        rows = cap if cap else n
        valid = min(n, rows)
        assert int(got.recv_count.item()) == n, "rank %d: recv_count" % r
        if cap:
            assert got.num_recv is None and got.num_recv_tokens_per_expert is None
            assert got.handle.num_recv is None and got.handle.rows == cap
        else:
            assert got.num_recv == n and got.handle.rows == n
        want_tpe = ref.tokens_per_expert(r, c.alignment)
        assert torch.equal(got.recv_tokens_per_expert.cpu(), want_tpe), "rank %d: tokens per expert" % r
        if not cap:
            assert got.num_recv_tokens_per_expert == want_tpe.tolist()
        if c.send_fp8 or c.x_fp8:
            codes, scales = got.recv_x
            assert codes.shape == (rows, c.H) and scales.shape == (rows, c.H // 128)
            assert fp8.FP8_DTYPE is None or codes.dtype == fp8.FP8_DTYPE
            if valid:
                want_codes = ref.recv(r, lambda s: fp8.fp8_codes(sent[s][0]))
                want_scales = ref.recv(r, lambda s: sent[s][1])
                assert torch.equal(fp8.fp8_codes(codes)[:valid].cpu(), want_codes[:valid]), "rank %d: codes" % r
                assert torch.equal(scales[:valid].cpu(), want_scales[:valid]), "rank %d: scales" % r
        else:
            assert got.recv_x.dtype == torch.bfloat16 and got.recv_x.shape == (rows, c.H)
            if valid:
                assert torch.equal(got.recv_x[:valid].cpu(), ref.recv(r, lambda s: xs[s])[:valid]), \
                    "rank %d: rows" % r
        assert got.recv_topk_idx.shape == (rows, c.K)
        if valid:
            assert torch.equal(got.recv_topk_idx[:valid].cpu(), ref.recv_idx(r)[:valid]), "rank %d: ids" % r
        if c.weights:
            assert got.recv_topk_weights.shape == (rows, c.K)
            if valid:
                assert torch.equal(got.recv_topk_weights[:valid].cpu(), ref.recv_weights(r, ws)[:valid])
        else:
            assert got.recv_topk_weights is None


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatch_combine_against_reference(name, seed):
    c = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_inputs(c, gen)
    ref = Routing(idxs, c.N, c.E)
    kw = {} if c.max_recv is None else {"max_recv_tokens": c.max_recv}
    with make_buffer(c.N, max(c.tokens), c.H, c.E, c.K, **kw) as vb:
        x_in = [fp8.quantize(x.to(DEV), c.pow2) if c.x_fp8 else x.to(DEV) for x in xs]
        res = vb.dispatch(x_in, [i.to(DEV) for i in idxs], [w.to(DEV) for w in ws] if c.weights else None,
                          send_fp8=c.send_fp8 or None, scale_format="pow2" if c.pow2 else "float",
                          capacity=c.capacity, expert_alignment=c.alignment)
        if c.overflow:
            torch.cuda.synchronize()
            with pytest.raises(nccl_moe.NcclMoeArgumentError, match="capacity"):
                vb.check_async_error()
        check_dispatch(c, res, xs, idxs, ws, ref)

        # Combine: fresh rows, one per received row; the received weights go
        # back too and must sum to the weights of the experts that kept them.
        ys = [bf16_rows(gen, r.handle.rows, c.H) for r in res]
        out = vb.combine([y.to(DEV) for y in ys], [r.handle for r in res],
                         [r.recv_topk_weights for r in res] if c.weights else None)
        caps = [c.capacity] * c.N if c.capacity else None
        want = ref.combine(ys, caps)
        for s in range(c.N):
            got, got_w = out[s]
            assert got.dtype == torch.bfloat16 and got.shape == (c.tokens[s], c.H)
            assert torch.equal(got.cpu(), want[s]), "rank %d: combined rows differ" % s
            if not c.weights:
                assert got_w is None
                continue
            idx = idxs[s]
            owner = torch.where(idx >= 0, idx // (c.E // c.N), torch.zeros_like(idx))
            row = ref.row[s].gather(1, owner) if c.tokens[s] else owner
            kept = (idx >= 0) & (row >= 0) & ((row < c.capacity) if c.capacity else True)
            assert torch.equal(got_w.cpu(), torch.where(kept, ws[s], torch.zeros_like(ws[s]))), \
                "rank %d: combined weights differ" % s
        if not c.overflow:
            vb.check_async_error()


def test_layout_against_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    N, E, K = 4, 32, 6
    tokens = [90, 0, 1, 257]
    idxs = [make_routing(gen, T, K, E, N, "skewed", 0.25) for T in tokens]
    ref = Routing(idxs, N, E)
    with make_buffer(N, max(tokens), 128, E, K) as vb:
        lay = vb.get_dispatch_layout([i.to(DEV) for i in idxs])
        for s in range(N):
            per_rank, per_expert, in_rank = ref.layout(s)
            assert lay[s].num_tokens_per_rank.dtype == torch.int32
            assert torch.equal(lay[s].num_tokens_per_rank.cpu(), per_rank)
            assert torch.equal(lay[s].num_tokens_per_expert.cpu(), per_expert)
            assert lay[s].is_token_in_rank.dtype == torch.bool
            assert torch.equal(lay[s].is_token_in_rank.cpu(), in_rank)


def test_reuse_handle_and_zero_copy_combine(seed):
    gen = torch.Generator().manual_seed(seed)
    c = Case(4, [333, 120, 0, 333], 3072, 6, 32, drop=1 / 9, send_fp8=True)
    xs, idxs, ws = make_inputs(c, gen)
    ref = Routing(idxs, c.N, c.E)
    idx_dev = [i.to(DEV) for i in idxs]
    with make_buffer(c.N, 333, c.H, c.E, c.K) as vb:
        first = vb.dispatch([x.to(DEV) for x in xs], idx_dev, [w.to(DEV) for w in ws], send_fp8=True)
        handles = [r.handle for r in first]
        # Same routing, new payload: reuse the handles (no layout, no notify).
        xs2 = [bf16_rows(gen, T, c.H) for T in c.tokens]
        second = vb.dispatch([x.to(DEV) for x in xs2], idx_dev, [w.to(DEV) for w in ws], send_fp8=True,
                             handle=handles)
        check_dispatch(c, second, xs2, idxs, ws, ref)
        assert [r.handle._route for r in second] == [h._route for h in handles]
        # Expert outputs written straight into each rank's combine buffer.
        ys = [bf16_rows(gen, r.handle.rows, c.H) for r in second]
        bufs = []
        for r in range(c.N):
            b = vb.get_combine_buffer(r, second[r].handle)
            assert b.shape == (ref.counts[r], c.H)
            b.copy_(ys[r].to(DEV))
            bufs.append(b)
        out = vb.combine(bufs, handles)
        want = ref.combine(ys)
        for s in range(c.N):
            assert torch.equal(out[s][0].cpu(), want[s])
        with pytest.raises(ValueError, match="reusing a handle needs"):
            vb.dispatch([x.to(DEV) for x in xs2], idx_dev, None, send_fp8=True, capacity=64, handle=handles)


def test_views_are_overwritten_copies_are_not(seed):
    gen = torch.Generator().manual_seed(seed)
    c = Case(2, [64, 64], 256, 2, 4)
    xs, idxs, ws = make_inputs(c, gen)
    ref = Routing(idxs, c.N, c.E)
    idx_dev = [i.to(DEV) for i in idxs]
    with make_buffer(c.N, 64, c.H, c.E, c.K) as vb:
        views = vb.dispatch([x.to(DEV) for x in xs], idx_dev)
        copies = vb.dispatch([x.to(DEV) for x in xs], idx_dev, copy=True)
        xs2 = [bf16_rows(gen, 64, c.H) for _ in range(2)]
        vb.dispatch([x.to(DEV) for x in xs2], idx_dev)
        for r in range(2):
            assert torch.equal(copies[r].recv_x.cpu(), ref.recv(r, lambda s: xs[s]))
            # The first result's views now show the third dispatch's rows.
            assert torch.equal(views[r].recv_x.cpu(), ref.recv(r, lambda s: xs2[s]))


def test_handles_are_recycled(seed):
    gen = torch.Generator().manual_seed(seed)
    c = Case(2, [32, 32], 128, 2, 4)
    xs, idxs, _ = make_inputs(c, gen)
    with make_buffer(c.N, 32, c.H, c.E, c.K) as vb:
        for _ in range(6):
            res = vb.dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs])
            vb.combine([torch.zeros(r.handle.rows, c.H, dtype=torch.bfloat16, device=DEV) for r in res],
                       [r.handle for r in res])
            del res
        assert all(len(comm.created) <= 2 for comm in vb._core.comms)


def test_bad_expert_id_is_reported(seed):
    gen = torch.Generator().manual_seed(seed)
    c = Case(2, [16, 16], 256, 4, 8)
    xs, idxs, _ = make_inputs(c, gen)
    idxs[1][5, 2] = c.E  # out of range on rank 1 only
    with make_buffer(c.N, 16, c.H, c.E, c.K) as vb:
        vb.dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs], capacity=32)
        torch.cuda.synchronize()
        with pytest.raises(nccl_moe.NcclMoeArgumentError, match="rank 1") as info:
            vb.check_async_error()
        assert "rank 0" not in str(info.value)
    with make_buffer(c.N, 16, c.H, c.E, c.K) as vb:  # exact mode raises by itself
        with pytest.raises(nccl_moe.NcclMoeArgumentError, match="expert id"):
            vb.dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs])


def test_argument_errors_on_gpu(seed):
    gen = torch.Generator().manual_seed(seed)
    c = Case(2, [8, 8], 128, 2, 4)
    xs, idxs, _ = make_inputs(c, gen)
    with make_buffer(c.N, 8, c.H, c.E, c.K) as vb, make_buffer(c.N, 8, c.H, c.E, c.K) as other:
        with pytest.raises(ValueError, match="rank 0: x is on cpu"):
            vb.dispatch(xs, [i.to(DEV) for i in idxs])
        res = vb.dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs])
        rows = [r.handle.rows for r in res]
        with pytest.raises(ValueError, match="received rows, hidden"):
            vb.combine([torch.zeros(n + 1, c.H, dtype=torch.bfloat16, device=DEV) for n in rows],
                       [r.handle for r in res])
        with pytest.raises(ValueError, match="another buffer"):
            other.combine([torch.zeros(n, c.H, dtype=torch.bfloat16, device=DEV) for n in rows],
                          [r.handle for r in res])
        with pytest.raises(ValueError, match="another buffer or rank"):
            vb.combine([torch.zeros(n, c.H, dtype=torch.bfloat16, device=DEV) for n in reversed(rows)],
                       [r.handle for r in reversed(res)])
        # Nothing above reached the GPU: the comm still works.
        out = vb.combine([torch.zeros(n, c.H, dtype=torch.bfloat16, device=DEV) for n in rows],
                         [r.handle for r in res])
        assert all(torch.count_nonzero(o).item() == 0 for o, _ in out)
        vb.check_async_error()


def test_too_few_connections_is_an_error(monkeypatch):
    # Checked from the environment before any native call: nothing to clean up.
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")
    with pytest.raises(RuntimeError, match="CUDA_DEVICE_MAX_CONNECTIONS >= 5"):
        make_buffer(4, 8, 128, 8, 2)


def test_properties_and_destroy():
    vb = make_buffer(4, 10, 256, 16, 3)
    assert (vb.num_ranks, vb.num_experts, vb.num_local_experts, vb.hidden) == (4, 16, 4, 256)
    assert (vb.max_tokens_per_rank, vb.max_topk, vb.max_recv_tokens) == (10, 3, 40)
    assert vb.device == DEV
    assert len(vb.buffer_bytes) == 4 and all(b > 0 for b in vb.buffer_bytes)
    whole = vb.get_combine_buffer(3)
    assert whole.shape == (40, 256) and whole.dtype == torch.bfloat16
    del whole
    vb.destroy()
    vb.destroy()  # twice is fine
    with pytest.raises(RuntimeError, match="destroyed"):
        vb.get_combine_buffer(0)
