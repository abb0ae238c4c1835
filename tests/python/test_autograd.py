# SPDX-License-Identifier: Apache-2.0
"""Autograd through dispatch and combine, with virtual ranks on one GPU:
exact gradients of each op against the routing reference, and a small MoE
layer (router, top-k, dispatch, experts, combine) whose gradients must match
the same layer computed densely without communication."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import nccl_moe  # noqa: E402
from nccl_moe import fp8  # noqa: E402
from moe_reference import (Routing, assert_close, bf16_rows, dense_moe, local_experts, make_routing,  # noqa: E402
                           router)

DEV = torch.device("cuda", torch.cuda.current_device())


def make_buffer(N, max_tokens, H, E, K):
    return nccl_moe.VirtualBuffer(N, max_tokens_per_rank=max(max_tokens, 1), hidden=H, num_experts=E, max_topk=K,
                                  timeout_ms=30000)


@pytest.mark.parametrize("capacity", [0, 1])
def test_dispatch_gradient_is_a_combine(seed, capacity):
    gen = torch.Generator().manual_seed(seed)
    N, H, K, E = 4, 256, 3, 16
    tokens = [40, 0, 33, 64]
    cap = sum(tokens) if capacity else 0
    xs = [bf16_rows(gen, T, H) for T in tokens]
    idxs = [make_routing(gen, T, K, E, N, "uniform", 0.2) for T in tokens]
    ws = [torch.rand(T, K, generator=gen) for T in tokens]
    ref = Routing(idxs, N, E)
    with make_buffer(N, max(tokens), H, E, K) as vb:
        x_leaf = [x.to(DEV).requires_grad_() for x in xs]
        w_leaf = [w.to(DEV).requires_grad_() for w in ws]
        res = vb.dispatch(x_leaf, [i.to(DEV) for i in idxs], w_leaf, capacity=cap)
        # Gradients of the received rows: BF16 values, so that the combine's
        # fp32 sum rounded once is the exact reference.
        gx = [bf16_rows(gen, r.handle.rows, H) for r in res]
        gw = [torch.randn(r.handle.rows, K, generator=gen) for r in res]
        loss = sum((r.recv_x.float() * g.to(DEV).float()).sum() + (r.recv_topk_weights * g2.to(DEV)).sum()
                   for r, g, g2 in zip(res, gx, gw))
        loss.backward()
        caps = [cap] * N if cap else None
        want_x = ref.combine(gx, caps)
        L = E // N
        for s in range(N):
            assert torch.equal(x_leaf[s].grad.cpu(), want_x[s]), "rank %d: grad x" % s
            # The weight of expert k flows back from the expert's rank only.
            idx = idxs[s]
            owner = torch.where(idx >= 0, idx // L, torch.zeros_like(idx))
            row = ref.row[s].gather(1, owner)
            want_w = torch.zeros_like(ws[s])
            for t in range(tokens[s]):
                for k in range(K):
                    if idx[t, k] >= 0:
                        want_w[t, k] = gw[owner[t, k]][row[t, k], k]
            assert torch.equal(w_leaf[s].grad.cpu(), want_w), "rank %d: grad topk_weights" % s


def test_combine_gradient_is_a_dispatch(seed):
    gen = torch.Generator().manual_seed(seed)
    N, H, K, E = 4, 512, 4, 16
    tokens = [50, 17, 0, 80]
    xs = [bf16_rows(gen, T, H) for T in tokens]
    idxs = [make_routing(gen, T, K, E, N, "skewed", 0.1) for T in tokens]
    ref = Routing(idxs, N, E)
    with make_buffer(N, max(tokens), H, E, K) as vb:
        res = vb.dispatch([x.to(DEV) for x in xs], [i.to(DEV) for i in idxs])
        assert not res[0].recv_x.requires_grad  # nothing required grad: views
        ys = [bf16_rows(gen, r.handle.rows, H).to(DEV).requires_grad_() for r in res]
        out = vb.combine(ys, [r.handle for r in res])
        g = [bf16_rows(gen, T, H) for T in tokens]
        sum((o.float() * gg.to(DEV).float()).sum() for (o, _), gg in zip(out, g)).backward()
        for r in range(N):
            assert torch.equal(ys[r].grad.cpu(), ref.recv(r, lambda s: g[s])), "rank %d: grad of combine x" % r


def test_recorded_dispatch_returns_copies(seed):
    gen = torch.Generator().manual_seed(seed)
    N, H, K, E = 2, 128, 2, 4
    xs = [bf16_rows(gen, 16, H).to(DEV).requires_grad_() for _ in range(N)]
    idxs = [make_routing(gen, 16, K, E, N).to(DEV) for _ in range(N)]
    with make_buffer(N, 16, H, E, K) as vb:
        first = vb.dispatch(xs, idxs)
        kept = [r.recv_x.detach().clone() for r in first]
        vb.dispatch([x.detach() * 2 for x in xs], idxs)  # overwrites the communicator's rows
        for r in range(N):
            assert torch.equal(first[r].recv_x.detach(), kept[r])
            assert first[r].recv_x.requires_grad


def _moe_case(seed, capacity, send_fp8=False):
    gen = torch.Generator().manual_seed(seed)
    N, H, F, E, K = 4, 256, 64, 16, 3
    tokens = [40, 0, 33, 64]
    L = E // N
    gate = (torch.randn(H, E, generator=gen) * H ** -0.5).to(DEV)
    w1 = (torch.randn(E, H, F, generator=gen) * H ** -0.5).to(DEV)
    w2 = (torch.randn(E, F, H, generator=gen) * F ** -0.5).to(DEV)
    xs = [bf16_rows(gen, T, H).to(DEV) for T in tokens]
    drops = [(torch.rand(T, K, generator=gen) < 0.1).to(DEV) for T in tokens]
    g = [bf16_rows(gen, T, H).float().to(DEV) for T in tokens]  # BF16-exact output gradients

    # Ours: each rank its own copy of the router and its local experts.
    p_gate = [gate.clone().requires_grad_() for _ in range(N)]
    p_w1 = [w1[r * L:(r + 1) * L].clone().requires_grad_() for r in range(N)]
    p_w2 = [w2[r * L:(r + 1) * L].clone().requires_grad_() for r in range(N)]
    x_leaf = [x.clone().requires_grad_(not send_fp8) for x in xs]
    routed = [router(x, pg, K, d) for x, pg, d in zip(x_leaf, p_gate, drops)]
    with make_buffer(N, max(tokens), H, E, K) as vb:
        sent = [fp8.quantize(x) for x in x_leaf] if send_fp8 else x_leaf
        res = vb.dispatch(sent, [i for i, _ in routed], [w for _, w in routed],
                          capacity=sum(tokens) if capacity else 0)
        ys = []
        for r, got in enumerate(res):
            xf = fp8.dequantize(*got.recv_x, torch.float32) if send_fp8 else got.recv_x.float()
            ys.append(local_experts(xf, got.recv_topk_idx, got.recv_topk_weights, p_w1[r], p_w2[r]))
        out = [o for o, _ in vb.combine(ys, [r.handle for r in res])]
        sum((o.float() * gg).sum() for o, gg in zip(out, g)).backward()

    # Dense reference: every expert on every token, no communication.
    r_gate = gate.clone().requires_grad_()
    r_w1 = w1.clone().requires_grad_()
    r_w2 = w2.clone().requires_grad_()
    r_x = [x.clone().requires_grad_(not send_fp8) for x in xs]
    ref_out = []
    for x, d, (idx, _) in zip(r_x, drops, routed):
        idx_ref, w_ref = router(x, r_gate, K, d)
        assert torch.equal(idx_ref, idx)
        xf = fp8.dequantize(*fp8.quantize(x), torch.float32) if send_fp8 else x.float()
        ref_out.append(dense_moe(xf, idx_ref, w_ref, r_w1, r_w2))
    sum((o * gg).sum() for o, gg in zip(ref_out, g)).backward()

    for s in range(N):
        assert_close(out[s], ref_out[s], "rank %d: layer output" % s)
        if not send_fp8:
            assert_close(x_leaf[s].grad, r_x[s].grad, "rank %d: grad x" % s, rel=3e-2)
    assert_close(sum(p.grad for p in p_gate), r_gate.grad, "grad router")
    assert_close(torch.cat([p.grad for p in p_w1]), r_w1.grad, "grad w1")
    assert_close(torch.cat([p.grad for p in p_w2]), r_w2.grad, "grad w2")


@pytest.mark.parametrize("capacity", [False, True], ids=["exact", "capacity"])
def test_moe_layer_gradients_match_dense(seed, capacity):
    _moe_case(seed, capacity)


def test_moe_layer_fp8_dispatch_gradients_match_dense(seed):
    # x itself gets no gradient through the FP8 send; router and experts do.
    _moe_case(seed, capacity=False, send_fp8=True)


def test_fp8_send_of_a_grad_requiring_x_is_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    with make_buffer(2, 8, 128, 4, 2) as vb:
        xs = [bf16_rows(gen, 8, 128).to(DEV).requires_grad_() for _ in range(2)]
        idxs = [make_routing(gen, 8, 2, 4, 2).to(DEV) for _ in range(2)]
        with pytest.raises(ValueError, match="gradients do not flow through the FP8 cast"):
            vb.dispatch(xs, idxs, send_fp8=True)


def test_combine_is_recorded_through_the_dispatch_token(seed):
    # Experts that ignore the received rows (outputs not requiring grad) still
    # make the combine part of the graph: its backward, and the dispatch's,
    # must run on every rank.
    gen = torch.Generator().manual_seed(seed)
    N, H, K, E = 2, 128, 2, 4
    ws = [torch.rand(12, K, generator=gen).to(DEV).requires_grad_() for _ in range(N)]
    idxs = [make_routing(gen, 12, K, E, N).to(DEV) for _ in range(N)]
    with make_buffer(N, 12, H, E, K) as vb:
        res = vb.dispatch([bf16_rows(gen, 12, H).to(DEV) for _ in range(N)], idxs, ws)
        ys = [torch.zeros(r.handle.rows, H, dtype=torch.bfloat16, device=DEV) for r in res]
        out = vb.combine(ys, [r.handle for r in res])
        assert all(o.requires_grad for o, _ in out)
        sum(o.float().sum() for o, _ in out).backward()
        assert all(torch.count_nonzero(w.grad).item() == 0 for w in ws)
