# SPDX-License-Identifier: Apache-2.0
"""nccl_moe.deep_ep normal mode with virtual ranks (N ranks on one GPU, each
driven from its own thread, as DeepEP's one rank per process), checked the
way DeepEP's legacy tests/test_intranode.py checks, against the plain
reference of moe_reference.py: layout counts, received rows by source, per
expert counts, top-k ids and weights, num_worst_tokens padding, cached
dispatch, combine = the rows times the ranks reached (plus biases), async
events, previous_event, allocate_on_comm_stream, the split send / receive
halves (two micro-batches), and the arguments DeepEP has and nccl-moe does
not."""

import os
import threading

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from nccl_moe import _lib, deep_ep, fp8  # noqa: E402
from moe_reference import Routing, bf16_rows, make_routing  # noqa: E402

# The communicators' timeout (MOE_TEST_TIMEOUT_MS: shorter to see a stuck rank sooner).
TIMEOUT_MS = int(os.environ.get("MOE_TEST_TIMEOUT_MS", "30000"))

N, H, K, E = 4, 1024, 4, 16
L = E // N
TOKENS = [96, 0, 61, 33]  # a rank without tokens, uneven loads
ROWS = 512                 # receive rows the buffers hold (>= any rank's receive here)


def make_group(**kw):
    nvl = deep_ep.normal_row_bytes(H) * ROWS + 4096
    return deep_ep.virtual_buffers(N, nvl, hidden=H, num_experts=E, timeout_ms=TIMEOUT_MS, **kw)


def make_inputs(gen, tokens=TOKENS, kind="uniform", drop=0.15):
    """Per rank: x BF16 with column 0 = the rank and column 1 = the token
    index (so rows tell their source), topk_idx, topk_weights."""
    xs, idxs, ws = [], [], []
    for r, T in enumerate(tokens):
        x = bf16_rows(gen, T, H, 2.0)
        x[:, 0] = r
        x[:, 1] = torch.arange(T, dtype=torch.float32).to(torch.bfloat16)
        xs.append(x)
        idxs.append(make_routing(gen, T, K, E, N, kind, drop))
        ws.append(torch.rand(T, K, generator=gen) + 0.5)
    return xs, idxs, ws


def sum_in_rank_order(parts):
    """The combine kernel's fp32 sum: start at 0, add each part in order."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc = acc + p.float()
    return acc


def combine_reference(ref, s, rows_of_rank, biases=()):
    """out[t] of rank s: bias0 + bias1 + the rows returned by every rank the
    token reached, in rank order, in fp32, rounded once."""
    T = ref.idxs[s].shape[0]
    acc = torch.zeros(T, H, dtype=torch.float32)
    for b in biases:
        acc = acc + b.float()
    for r in range(N):
        rr = ref.row[s][:, r]
        m = rr >= 0
        acc[m] = acc[m] + rows_of_rank[r][rr[m]].float()
    return acc.to(torch.bfloat16)


def layout_args(buf, idx):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    assert per_rdma is None
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def test_layout_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, _ = make_inputs(gen, kind="skewed")
    ref = Routing(idxs, N, E)
    with make_group() as group:
        def rank(buf):
            dev = buf.device
            idx = idxs[buf.rank].to(dev)
            got = buf.get_dispatch_layout(idx, E)
            want = ref.layout(buf.rank)
            assert torch.equal(got[0].cpu(), want[0]) and got[0].dtype == torch.int32
            assert torch.equal(got[2].cpu(), want[1]) and got[2].dtype == torch.int32
            assert torch.equal(got[3].cpu(), want[2]) and got[3].dtype == torch.bool
            # The torch fallback (used before a communicator exists) agrees.
            t = deep_ep._layout_torch(idx, E, N)
            assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(t, (got[0], got[2], got[3])))
            # async: the event carries the result.
            ev = buf.get_dispatch_layout(idx, E, async_finish=True)[-1]
            assert ev.event is not None
            ev.current_stream_wait()
        group.run(rank)


MODES = {
    "bf16": dict(),
    "bf16_async": dict(async_finish=True),
    "bf16_previous_event": dict(previous=True),
    "bf16_alloc_on_comm": dict(previous=True, async_finish=True, allocate_on_comm_stream=True),
    "fp8": dict(fp8=True),
    "fp8_async_previous": dict(fp8=True, async_finish=True, previous=True),
    "no_weights": dict(weights=False),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_dispatch_combine(mode, seed):
    m = MODES[mode]
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_inputs(gen)
    ref = Routing(idxs, N, E)
    sent = [fp8.quantize(x) for x in xs] if m.get("fp8") else None
    xs2 = [bf16_rows(gen, T, H) for T in TOKENS]  # for the cached dispatch
    biases = [[bf16_rows(gen, T, H, 0.5) for _ in range(2)] for T in TOKENS]
    with make_group() as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            async_finish = m.get("async_finish", False)
            opts = dict(async_finish=async_finish,
                        allocate_on_comm_stream=m.get("allocate_on_comm_stream", False))

            def prev():
                return dict(previous_event=buf.capture()) if m.get("previous") else {}

            if sent is not None:
                codes, scales = sent[r]
                # Column-major scales, as DeepEP's test passes them.
                x = (codes.to(dev), scales.to(dev).T.contiguous().T)
            else:
                x = xs[r].to(dev)
            idx = idxs[r].to(dev)
            w = ws[r].to(dev) if m.get("weights", True) else None
            la = layout_args(buf, idx)
            recv_x, recv_idx, recv_w, per_expert, handle, event = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, **la, **opts, **prev())
            if async_finish:
                event.current_stream_wait()
            else:
                assert event.event is None
            n = ref.counts[r]
            # Received count, per-expert counts, rows by source.
            if sent is not None:
                assert isinstance(recv_x, tuple) and recv_x[0].shape == (n, H) and recv_x[1].shape == (n, H // 128)
                assert fp8.FP8_DTYPE is None or recv_x[0].dtype == fp8.FP8_DTYPE
                assert torch.equal(fp8.fp8_codes(recv_x[0]).cpu(), ref.recv(r, lambda s: fp8.fp8_codes(sent[s][0])))
                assert torch.equal(recv_x[1].cpu(), ref.recv(r, lambda s: sent[s][1]))
                rows = fp8.dequantize(*recv_x, torch.bfloat16)
            else:
                assert recv_x.shape == (n, H) and recv_x.dtype == torch.bfloat16
                assert torch.equal(recv_x.cpu(), ref.recv(r, lambda s: xs[s]))
                rows = recv_x
            assert per_expert == ref.tokens_per_expert(r).tolist()
            assert torch.equal(recv_idx.cpu(), ref.recv_idx(r))
            for l_, count in enumerate(per_expert):
                assert int((recv_idx == l_).sum()) == count
            if w is None:
                assert recv_w is None
            else:
                assert torch.equal(recv_w.cpu(), ref.recv_weights(r, ws))
            # Cached dispatch: the routing of `handle`, other rows.
            if sent is None:
                out2 = buf.dispatch(xs2[r].to(dev), handle=handle, **opts, **prev())
                assert out2[1:5] == (None, None, None, None)
                if async_finish:
                    out2[5].current_stream_wait()
                assert torch.equal(out2[0].cpu(), ref.recv(r, lambda s: xs2[s]))
            # Combine: every rank returns its rows; out = their sum (+ biases).
            b = tuple(t.to(dev) for t in biases[r])
            combined, combined_w, event = buf.combine(rows, handle, topk_weights=recv_w, bias=b, **opts, **prev())
            if async_finish:
                event.current_stream_wait()
            return r, rows.cpu(), combined.cpu(), None if combined_w is None else combined_w.cpu()

        got = group.run(rank)
        rows_of_rank = [g[1] for g in got]
        for s, _, combined, combined_w in got:
            want = combine_reference(ref, s, rows_of_rank, biases[s])
            assert torch.equal(combined, want), "rank %d: combined" % s
            if combined_w is not None:
                # Each weight comes back once, from the rank owning its expert.
                want_w = torch.where(idxs[s] >= 0, ws[s], torch.zeros_like(ws[s]))
                assert torch.equal(combined_w, want_w)


def test_num_worst_tokens(seed):
    """No host synchronization: num_worst_tokens rows, the received ones
    first, ids -1 and weights 0 past them; an empty per-expert list."""
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_inputs(gen, kind="skewed")
    ref = Routing(idxs, N, E)
    worst = sum(TOKENS)
    with make_group() as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            idx = idxs[r].to(dev)
            la = layout_args(buf, idx)
            x = xs[r].to(dev)
            recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=ws[r].to(dev), num_worst_tokens=worst, **la)
            n = ref.counts[r]
            assert per_expert == []
            assert recv_x.shape == (worst, H) and recv_idx.shape == (worst, K) and recv_w.shape == (worst, K)
            assert torch.equal(recv_x[:n].cpu(), ref.recv(r, lambda s: xs[s]))
            assert torch.equal(recv_idx[:n].cpu(), ref.recv_idx(r))
            assert bool((recv_idx[n:] == -1).all()) and bool((recv_w[n:] == 0).all())
            # Combine reads the received rows only.
            y = recv_x * 3
            combined, _, _ = buf.combine(y, handle)
            return r, (y[:n]).cpu(), combined.cpu()

        got = group.run(rank)
        rows_of_rank = [g[1] for g in got]
        for s, _, combined in got:
            assert torch.equal(combined, combine_reference(ref, s, rows_of_rank))


def test_split_halves_two_micro_batches(seed):
    """dispatch(return_recv_hook=True): the send half now, the receive half
    (and the copy out) when the hook runs; another micro-batch's compute in
    between. Normal calls while a receive half is pending are refused."""
    gen = torch.Generator().manual_seed(seed)
    batches = [make_inputs(gen), make_inputs(gen, kind="one_rank", drop=0.0)]
    refs = [Routing(b[1], N, E) for b in batches]
    worst = sum(TOKENS)
    with make_group() as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            work = torch.randn(1024, 1024, device=dev)
            results = []
            for (xs, idxs, ws), ref in zip(batches, refs):
                idx = idxs[r].to(dev)
                la = layout_args(buf, idx)
                *out, hook = buf.dispatch(xs[r].to(dev), topk_idx=idx, topk_weights=ws[r].to(dev),
                                          num_worst_tokens=worst, return_recv_hook=True, **la)
                with pytest.raises(_lib.NcclMoeError, match="receive half"):
                    buf.dispatch(xs[r].to(dev), topk_idx=idx, num_worst_tokens=worst, **la)
                work = work @ work / 1024  # the other micro-batch's compute
                hook()
                recv_x, recv_idx, recv_w, _, handle, _ = out
                n = ref.counts[r]
                assert torch.equal(recv_x[:n].cpu(), ref.recv(r, lambda s: xs[s]))
                assert torch.equal(recv_w[:n].cpu(), ref.recv_weights(r, ws))
                y = (recv_x.float() * 0.5).to(torch.bfloat16)
                combined, combined_w, _, chook = buf.combine(y, handle, topk_weights=recv_w, return_recv_hook=True)
                work = work @ work / 1024
                chook()
                results.append((y[:n].cpu(), combined.cpu(), combined_w.cpu()))
            torch.cuda.current_stream().synchronize()
            return r, results

        got = group.run(rank)
        for b, ((xs, idxs, ws), ref) in enumerate(zip(batches, refs)):
            rows_of_rank = [g[1][b][0] for g in got]
            for s, results in got:
                assert torch.equal(results[b][1], combine_reference(ref, s, rows_of_rank)), "batch %d rank %d" % (b, s)
                want_w = torch.where(idxs[s] >= 0, ws[s], torch.zeros_like(ws[s]))
                assert torch.equal(results[b][2], want_w)


def test_config_and_num_sms(seed):
    """Config.num_sms is each call's block budget; set_num_sms changes the
    default; Config's checks are DeepEP's."""
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = make_inputs(gen)
    ref = Routing(idxs, N, E)
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(2)
        assert deep_ep.Buffer.get_dispatch_config(N).num_sms == 2
        with pytest.raises(ValueError, match="even"):
            deep_ep.Buffer.set_num_sms(3)
    finally:
        deep_ep.Buffer.num_sms = old
    with pytest.raises(ValueError):
        deep_ep.Config(20, 8, 8)  # send chunk must be below the receive chunk
    # DeepEP rounds the RDMA receive chunk up to a multiple of the send chunk.
    assert deep_ep.Config(24, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132
    with make_group() as group:
        def rank(buf):
            r, dev = buf.rank, buf.device
            idx = idxs[r].to(dev)
            for cfg in (deep_ep.Config(1), deep_ep.Config(64, 8, 256)):
                recv_x, _, _, _, handle, _ = buf.dispatch(xs[r].to(dev), topk_idx=idx, config=cfg,
                                                          **layout_args(buf, idx))
                assert torch.equal(recv_x.cpu(), ref.recv(r, lambda s: xs[s]))
                combined, _, _ = buf.combine(recv_x, handle, config=cfg)
            return r, recv_x.cpu(), combined.cpu()

        got = group.run(rank)
        for s, _, combined in got:
            assert torch.equal(combined, combine_reference(ref, s, [g[1] for g in got]))


def test_unsupported_arguments_raise(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, _ = make_inputs(gen)
    for kw, exc in [(dict(allow_mnnvl=True), NotImplementedError), (dict(use_fabric=True), NotImplementedError),
                    (dict(enable_shrink=True), NotImplementedError),
                    (dict(allow_nvlink_for_low_latency_mode=False), NotImplementedError),
                    (dict(comm=object()), NotImplementedError), (dict(num_qps_per_rank=0), ValueError)]:
        with pytest.raises(exc):
            deep_ep.Buffer(None, int(1e6), 0, **kw)
    with pytest.raises(ValueError, match="group is None"):
        deep_ep.Buffer(None, int(1e6))
    errors = []
    lock = threading.Lock()
    with make_group(explicitly_destroy=True) as group:
        def rank(buf):
            dev = buf.device
            r = buf.rank
            x, idx = xs[r].to(dev), idxs[r].to(dev)
            la = layout_args(buf, idx)
            checks = [
                (NotImplementedError, lambda: buf.dispatch(x, **la)),  # no topk_idx
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx)),   # no layout
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, num_tokens_per_rdma_rank=la["num_tokens_per_rank"],
                                                  **la)),
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, allocate_on_comm_stream=True, **la)),
                (ValueError, lambda: buf.dispatch(x.float(), topk_idx=idx, **la)),
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, num_worst_tokens=ROWS + 4, **la)),
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, return_recv_hook=True, **la)),  # exact mode
                (NotImplementedError, lambda: buf.get_local_buffer_tensor(torch.bfloat16)),
                (ValueError, lambda: buf.low_latency_dispatch(x, idx, 128, E)),  # not low_latency_mode
                (ValueError, lambda: buf.dispatch(x, topk_idx=idx, config=object(), **la)),
            ]
            for exc, fn in checks:
                try:
                    fn()
                except exc:
                    continue
                except Exception as e:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append("rank %d: %r raised %r" % (r, fn, e))
                    continue
                with lock:
                    errors.append("rank %d: %r did not raise %s" % (r, fn, exc.__name__))
            # Nothing above reached the library: the ranks still work together.
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, **la)
            with pytest.raises(TypeError, match="opaque"):
                handle[0]
            buf.combine(recv_x, handle)
            torch.cuda.current_stream().synchronize()

        group.run(rank)
    assert not errors, "\n".join(errors)
