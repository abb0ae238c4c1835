# SPDX-License-Identifier: Apache-2.0
"""nccl_moe.deep_ep without a GPU: the torch layout fallback, Config's and
the constructor's argument checks, the size hints, EventOverlap, and the
low-latency handle's DeepEP-style items (computed from the receive views).
Needs torch (skips otherwise) and the built library for the size hint."""

import types

import pytest

torch = pytest.importorskip("torch")

from nccl_moe import _lib, deep_ep  # noqa: E402
from moe_reference import Routing, make_routing  # noqa: E402


def test_layout_fallback_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    N, E, K = 4, 16, 4
    idxs = [make_routing(gen, T, K, E, N, kind, 0.2) for T, kind in ((50, "uniform"), (0, "uniform"),
                                                                      (33, "skewed"), (20, "one_rank"))]
    ref = Routing(idxs, N, E)
    for s, idx in enumerate(idxs):
        got = deep_ep._layout_torch(idx, E, N)
        want = ref.layout(s)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_layout_fallback_out_of_range_ids():
    # Ids outside [0, E) count nowhere (never used as an index).
    idx = torch.tensor([[0, 5, -1], [7, 7, 2], [-1, -1, -1], [9, -3, 1]])
    per_rank, per_expert, in_rank = deep_ep._layout_torch(idx, 8, 4)
    assert per_rank.tolist() == [2, 1, 1, 1]
    assert per_expert.tolist() == [1, 1, 1, 0, 0, 1, 0, 2]
    assert in_rank.tolist() == [[True, False, True, False], [False, True, False, True],
                                [False, False, False, False], [True, False, False, False]]


def test_config_checks():
    c = deep_ep.Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (20, 6, 256)
    assert deep_ep.Config(24, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132  # rounded up, as DeepEP
    for bad in [(20, 0, 256), (20, 8, 8), (20, 6, 256, 0, 128), (20, 6, 256, 100, 64), (-1,),
                (_lib.MAX_CALL_SMS + 1,), (1.5,), (True,)]:
        with pytest.raises(ValueError):
            deep_ep.Config(*bad)
    # Every row a rank can receive is kept: the hint grows with the ranks.
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8) == 2 * c.get_nvl_buffer_size_hint(7168 * 2, 4) - 8 * 256
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8) >= 8 * 4096 * deep_ep.normal_row_bytes(7168)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 16) == 0
    assert deep_ep.Buffer.get_dispatch_config(8).num_sms == deep_ep.Buffer.num_sms
    with pytest.raises(ValueError):
        deep_ep.Buffer.get_dispatch_config(_lib.MAX_RANKS + 1)


def test_row_budget():
    H = 1024
    for rows in (4, 100, 4096):
        nvl = deep_ep._bytes_for_rows(rows, H)
        assert deep_ep._rows_for_bytes(nvl, H) >= rows
        assert deep_ep._rows_for_bytes(nvl, H) % 4 == 0
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        deep_ep._build_config_kwargs(4, 1000, H, 16, 0, 0)
    kw, rows = deep_ep._build_config_kwargs(4, 0, H, 16, 32, 0)
    assert rows == 0 and kw["max_tokens_per_rank"] == 1 and kw["ll_max_tokens_per_rank"] == 32


def test_low_latency_size_hint():
    try:
        _lib.get_library()
    except _lib.LibraryNotFoundError as e:
        pytest.skip("library not built: %s" % str(e).splitlines()[0])
    small = deep_ep.Buffer.get_low_latency_rdma_size_hint(16, 1024, 4, 16)
    big = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert 0 < small < big
    # Per set the received rows alone are E * M * 2H bytes (BF16).
    assert big >= 2 * 256 * 128 * 7168 * 2
    with pytest.raises(ValueError):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(16, 1024, 3, 16)  # experts not a multiple of the ranks
    with pytest.raises(ValueError):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(_lib.LL_MAX_TOKENS + 1, 1024, 4, 16)


def test_constructor_checks():
    for kw, exc in [(dict(allow_mnnvl=True), NotImplementedError), (dict(use_fabric=True), NotImplementedError),
                    (dict(enable_shrink=True), NotImplementedError),
                    (dict(allow_nvlink_for_low_latency_mode=False), NotImplementedError),
                    (dict(comm=object()), NotImplementedError), (dict(num_qps_per_rank=0), ValueError),
                    (dict(num_nvl_bytes=-1), ValueError), (dict(low_latency_mode=1), ValueError),
                    (dict(timeout_ms=-5), ValueError)]:
        with pytest.raises(exc):
            deep_ep.Buffer(None, **kw)
    with pytest.raises(ValueError, match="group is None"):
        deep_ep.Buffer(None, int(1e6))
    with pytest.raises(ValueError, match="even"):
        deep_ep.Buffer.set_num_sms(7)


def test_event_overlap_without_event():
    ev = deep_ep.EventOverlap(None)
    with pytest.raises(ValueError, match="async_finish"):
        ev.current_stream_wait()
    with ev:  # nothing to wait for
        pass
    assert deep_ep.topk_idx_t == torch.int64


def test_low_latency_handle_items():
    """handle[0]: each row's source token; handle[1]: (begin << 32) | count
    of each source rank's rows, as DeepEP's; computed from the views."""
    N, M, L = 3, 5, 2
    S = N * M
    counts = torch.tensor([4, 0], dtype=torch.int32)
    src = torch.full((L, S), 7777, dtype=torch.int32)  # stale past the count
    src[0, :4] = torch.tensor([0 * M + 2, 0 * M + 4, 2 * M + 0, 2 * M + 3], dtype=torch.int32)
    stub = types.SimpleNamespace(group_size=N, rank=0)
    h = deep_ep._LowLatencyHandle(stub, None, (src, counts), 9, 2, 256, M, N * L, ())
    assert len(h) == 5 and h[2:] == (M, 256, N * L)
    assert h[0][0, :4].tolist() == [2, 4, 0, 3]
    assert h[1].tolist() == [[(0 << 32) | 2, (2 << 32) | 0, (2 << 32) | 2], [0, 0, 0]]
    a, b, m, hidden, e = h  # unpacks like DeepEP's tuple
    assert (m, hidden, e) == (M, 256, N * L) and a is h[0] and b is h[1]
