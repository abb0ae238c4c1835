# SPDX-License-Identifier: Apache-2.0
"""The C API additions behind nccl_moe.deep_ep, called directly (ctypes) on
virtual ranks: column-major TMA-aligned FP8 scales in normal mode (FP8 input
and in-kernel cast, capacity and exact mode, rows not a multiple of 4),
the per-call numSMs, the split halves' call-order checks, and the combine
biases."""

import ctypes
import functools

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import nccl_moe  # noqa: E402
from nccl_moe import _dlpack, _lib, fp8  # noqa: E402
from moe_reference import Routing, bf16_rows, make_routing  # noqa: E402

N, H, K, E = 4, 1024, 4, 16
TOKENS = [70, 0, 45, 31]
NS = H // _lib.FP8_BLOCK


def align4(n):
    return (n + 3) // 4 * 4


def raw_dispatch(vb, xs, scales, idxs, capacity, **fields):
    """ncclMoeDispatch on every rank with extra args fields; returns the
    (route, result) of each rank."""
    core = vb._core
    lib = core.lib
    routes = [core.acquire(i) for i in range(N)]
    args, results = [], []
    for x, s, idx in zip(xs, scales, idxs):
        a = _lib.DispatchArgs()
        a.x = x.data_ptr() or None
        a.xType = _lib.ncclFloat8e4m3 if s is not None else _lib.ncclBfloat16
        a.xScales = (s.data_ptr() or None) if s is not None else None
        a.sendType = _lib.ncclFloat8e4m3
        a.numTokens, a.hidden, a.topk = x.shape[0], H, K
        a.topkIdx = idx.data_ptr() or None
        a.capacity = capacity
        for k, v in fields.items():
            setattr(a, k, v)
        args.append(a)
        results.append(_lib.DispatchResult())

    def call(i, stream):
        lib.check(lib.ncclMoeDispatch(core.comms[i].ptr, ctypes.byref(args[i]), routes[i].ptr,
                                      ctypes.byref(results[i]), stream), "ncclMoeDispatch rank %d" % i)

    with core.on_device():
        core.run([functools.partial(call, i) for i in range(N)])
    return list(zip(routes, results))


@pytest.mark.parametrize("capacity", [0, sum(TOKENS)], ids=["exact", "capacity"])
@pytest.mark.parametrize("cast", [False, True], ids=["fp8_input", "cast"])
def test_column_major_scales(capacity, cast, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [bf16_rows(gen, T, H, 3.0) for T in TOKENS]
    idxs = [make_routing(gen, T, K, E, N, "uniform", 0.1) for T in TOKENS]
    ref = Routing(idxs, N, E)
    q = [fp8.quantize(x) for x in xs]
    # Neither 150 nor 146 (the capacity) is a multiple of 4: the columns are
    # padded (to 152, 148); they fit because the comm's hidden is larger.
    max_recv = 150
    with nccl_moe.VirtualBuffer(N, max_tokens_per_rank=max(TOKENS), hidden=H + 128, num_experts=E, max_topk=K,
                                max_recv_tokens=max_recv, timeout_ms=30000) as vb:
        dev = vb.device
        if cast:
            dx = [x.to(dev) for x in xs]
            ds = [None] * N
        else:
            dx = [c.to(dev) for c, _ in q]
            ds = [s.to(dev) for _, s in q]
        didx = [i.to(dev) for i in idxs]
        out = raw_dispatch(vb, dx, ds, didx, capacity, scaleLayout=_lib.SCALE_COL_MAJOR, numSMs=3)
        torch.cuda.synchronize()
        vb.check_async_error()
        want_tp = align4(capacity if capacity else max_recv)
        for r, (route, res) in enumerate(out):
            n = ref.counts[r]
            assert res.scaleTokenStride == want_tp
            assert res.recvScales % 16 == 0
            cols = _dlpack.wrap(res.recvScales, (NS, want_tp), torch.float32, dev, vb._core)
            got = cols.T[:n].cpu()  # [rows, H / 128] with strides (1, tp)
            assert torch.equal(got, ref.recv(r, lambda s: q[s][1])), "rank %d: scales" % r
            codes = _dlpack.wrap(res.recvX, (n, H), torch.uint8, dev, vb._core).cpu()
            assert torch.equal(codes, ref.recv(r, lambda s: fp8.fp8_codes(q[s][0])))


def test_column_major_scales_must_fit(seed):
    """Exact mode pads the columns to align4(maxRecvTokens): with the call's
    hidden equal to the comm's and maxRecvTokens not a multiple of 4 they do
    not fit; every rank gets the error before any GPU work (no rank waits)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [40, 0, 25, 20]  # at most 85 rows to any rank: capacity 100 never overflows
    xs = [bf16_rows(gen, T, H) for T in tokens]
    idxs = [make_routing(gen, T, K, E, N) for T in tokens]
    with nccl_moe.VirtualBuffer(N, max_tokens_per_rank=max(tokens), hidden=H, num_experts=E, max_topk=K,
                                max_recv_tokens=101, timeout_ms=30000) as vb:
        dev = vb.device
        dx, didx = [x.to(dev) for x in xs], [i.to(dev) for i in idxs]
        with pytest.raises(_lib.NcclMoeArgumentError, match="maxRecvTokens"):
            raw_dispatch(vb, dx, [None] * N, didx, 0, scaleLayout=_lib.SCALE_COL_MAJOR)
        for bad in (dict(numSMs=_lib.MAX_CALL_SMS + 1), dict(scaleLayout=7), dict(sendOnly=2)):
            with pytest.raises(_lib.NcclMoeArgumentError):
                raw_dispatch(vb, dx, [None] * N, didx, 0, **bad)
        # Capacity 100 fits (columns of 100); the ranks still work together.
        out = raw_dispatch(vb, dx, [None] * N, didx, 100, scaleLayout=_lib.SCALE_COL_MAJOR, numSMs=1)
        torch.cuda.synchronize()
        vb.check_async_error()
        assert all(res.scaleTokenStride == 100 for _, res in out)


def test_split_call_order(seed):
    """A dispatch or combine while a split receive half is pending is
    ncclInvalidUsage (and changes nothing); receive halves without a send
    half too; after the receive half the ranks go on."""
    gen = torch.Generator().manual_seed(seed)
    xs = [bf16_rows(gen, T, H) for T in TOKENS]
    idxs = [make_routing(gen, T, K, E, N) for T in TOKENS]
    ref = Routing(idxs, N, E)
    with nccl_moe.VirtualBuffer(N, max_tokens_per_rank=max(TOKENS), hidden=H, num_experts=E, max_topk=K,
                                timeout_ms=30000) as vb:
        core, lib, dev = vb._core, vb._core.lib, vb.device
        dx, didx = [x.to(dev) for x in xs], [i.to(dev) for i in idxs]
        cap = sum(TOKENS)

        def each(fn):
            with core.on_device():
                return core.run([functools.partial(fn, i) for i in range(N)])

        def expect(code, fn):
            def one(i, stream):
                res = fn(i, stream)
                assert res == code, "rank %d: %s, want %s (%s)" % (
                    i, _lib.RESULT_NAMES.get(res), _lib.RESULT_NAMES[code], lib.last_error())
            each(one)

        routes = [core.acquire(i) for i in range(N)]
        expect(_lib.ncclInvalidUsage, lambda i, s: lib.ncclMoeDispatchRecv(core.comms[i].ptr, routes[i].ptr, s))
        out = raw_dispatch(vb, dx, [None] * N, didx, cap, sendType=_lib.ncclBfloat16, sendOnly=1)
        again = [_lib.DispatchArgs() for _ in range(N)]
        res2 = [_lib.DispatchResult() for _ in range(N)]
        expect(_lib.ncclInvalidUsage, lambda i, s: lib.ncclMoeDispatch(core.comms[i].ptr, ctypes.byref(again[i]),
                                                                         routes[i].ptr, ctypes.byref(res2[i]), s))
        expect(_lib.ncclSuccess, lambda i, s: lib.ncclMoeDispatchRecv(core.comms[i].ptr, out[i][0].ptr, s))
        torch.cuda.synchronize()
        vb.check_async_error()
        for r, (route, res) in enumerate(out):
            n = ref.counts[r]
            got = _dlpack.wrap(res.recvX, (n, H), torch.bfloat16, dev, core).cpu()
            assert torch.equal(got, ref.recv(r, lambda s: xs[s]))
        # Combine halves with biases: out = b0 + b1 + the rows of each reached rank.
        b = [[bf16_rows(gen, T, H).to(dev) for _ in range(2)] for T in TOKENS]
        y = [torch.ones(cap, H, dtype=torch.bfloat16, device=dev) for _ in range(N)]
        outs = [torch.empty(T, H, dtype=torch.bfloat16, device=dev) for T in TOKENS]
        cargs = []
        for i in range(N):
            a = _lib.CombineArgs()
            a.x, a.hidden, a.out = y[i].data_ptr(), H, outs[i].data_ptr() or core.dummy.data_ptr()
            a.bias0, a.bias1 = b[i][0].data_ptr() or None, b[i][1].data_ptr() or None
            a.sendOnly, a.numSMs = 1, 2
            cargs.append(a)
        expect(_lib.ncclSuccess, lambda i, s: lib.ncclMoeCombine(core.comms[i].ptr, ctypes.byref(cargs[i]),
                                                                  out[i][0].ptr, s))
        expect(_lib.ncclInvalidUsage, lambda i, s: lib.ncclMoeCombine(core.comms[i].ptr, ctypes.byref(cargs[i]),
                                                                       out[i][0].ptr, s))
        expect(_lib.ncclInvalidUsage, lambda i, s: lib.ncclMoeDispatchRecv(core.comms[i].ptr, out[i][0].ptr, s))
        expect(_lib.ncclSuccess, lambda i, s: lib.ncclMoeCombineRecv(core.comms[i].ptr, out[i][0].ptr, s))
        torch.cuda.synchronize()
        vb.check_async_error()
        def biased_ones(r):
            # The kernel's fp32 steps: 0 + b0 + b1, then 1.0 per reached rank.
            acc = b[r][0].float().cpu() + b[r][1].float().cpu()
            reached = ref.in_rank[r].sum(1, keepdim=True)
            for k in range(N):
                acc = acc + (reached > k).float()
            return acc.to(torch.bfloat16)

        for r in range(N):
            want = biased_ones(r)
            assert torch.equal(outs[r].cpu(), want), "rank %d" % r
        # A whole combine after the split one (it waits for the peers' pulls
        # before staging) and another dispatch: the ranks went on in step.
        for i in range(N):
            cargs[i].sendOnly = 0
        expect(_lib.ncclSuccess, lambda i, s: lib.ncclMoeCombine(core.comms[i].ptr, ctypes.byref(cargs[i]),
                                                                  out[i][0].ptr, s))
        raw_dispatch(vb, dx, [None] * N, didx, cap, sendType=_lib.ncclBfloat16)
        torch.cuda.synchronize()
        vb.check_async_error()
        for r in range(N):
            want = biased_ones(r)
            assert torch.equal(outs[r].cpu(), want), "rank %d (whole combine)" % r
