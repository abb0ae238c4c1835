# SPDX-License-Identifier: Apache-2.0
"""What the package does without a GPU: the FP8 codec against an
independent nearest-value reference, DLPack views over host memory, the
process-group probing, and every argument check of dispatch / combine /
layout (on a buffer without native communicators, with CPU tensors)."""

import ctypes
import gc
import weakref

import pytest

torch = pytest.importorskip("torch")

import nccl_moe  # noqa: E402
from nccl_moe import _dlpack, fp8  # noqa: E402
from nccl_moe.buffer import Buffer, VirtualBuffer, check_virtual_environment, nccl_comm_pointer  # noqa: E402

# ------------------------------------------------------------------ FP8 codec
_POS = torch.tensor([fp8._DECODE[c] for c in range(0x7F)], dtype=torch.float64)  # 0 .. 448, ascending


def nearest_e4m3(v):
    """Independent reference: the e4m3 code nearest to each value (ties to
    the even code), saturating at 448, NaN -> 0x7F, sign kept (-0 -> 0x80)."""
    v = v.to(torch.float64)
    a = v.abs()
    hi = torch.searchsorted(_POS, a.clamp(max=448.0)).clamp(0, 0x7E)
    lo = (hi - 1).clamp(min=0)
    d_lo = a - _POS[lo]
    d_hi = _POS[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    pick = torch.where(a >= 448.0, torch.full_like(pick, 0x7E), pick)
    code = pick | torch.where(torch.signbit(v), 0x80, 0)
    return torch.where(torch.isnan(v), torch.full_like(code, 0x7F), code).to(torch.uint8)


def test_e4m3_encode_every_bf16_value():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16).float()
    got = fp8.e4m3_encode(v)
    want = nearest_e4m3(v)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, "value %r: code 0x%02x, want 0x%02x" % (
        v[bad[0]].item(), got[bad[0]].item(), want[bad[0]].item())


def test_e4m3_encode_random_fp32(seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1 << 18, generator=gen) * torch.exp2(torch.randint(-14, 10, (1 << 18,), generator=gen).float())
    assert torch.equal(fp8.e4m3_encode(v), nearest_e4m3(v))


def test_e4m3_specials():
    v = torch.tensor([0.0, -0.0, 448.0, 464.0, 1e9, float("inf"), -float("inf"), float("nan"), 2.0**-9, 2.0**-10,
                      1.5 * 2.0**-10, 1.0, -1.0])
    want = [0x00, 0x80, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x01, 0x00, 0x01, 0x38, 0xB8]
    assert fp8.e4m3_encode(v).tolist() == want
    dec = fp8.e4m3_decode(torch.tensor(want[:7] + [0x01, 0x38], dtype=torch.uint8)).tolist()
    assert dec == [0.0, -0.0, 448.0, 448.0, 448.0, 448.0, -448.0, 2.0**-9, 1.0]


def test_quantize_scales_are_exact_fp32_divisions(seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(37, 512, generator=gen) * 3).to(torch.bfloat16)
    x[5, 128:256] = 0  # an all-zero block gets scale 1
    codes, scales = fp8.quantize(x)
    amax = x.float().abs().reshape(37, 4, 128).amax(2)
    want = (amax.double() / 448.0).float()  # double then float: correctly rounded fp32 division
    want[5, 1] = 1.0
    assert torch.equal(scales, want)
    assert torch.equal(fp8.fp8_codes(codes)[5, 128:256], torch.zeros(128, dtype=torch.uint8))
    deq = fp8.dequantize(codes, scales, torch.float32)
    bound = x.float().abs() / 16 + scales.repeat_interleave(128, 1) * 2.0**-9
    assert ((deq - x.float()).abs() <= bound).all()


def test_quantize_pow2_scales(seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(20, 256, generator=gen) * 100).to(torch.bfloat16)
    _, s_float = fp8.quantize(x)
    codes, s_pow2 = fp8.quantize(x, pow2_scales=True)
    mant, _ = torch.frexp(s_pow2)
    assert (mant == 0.5).all()  # powers of two
    assert (s_pow2 >= s_float).all() and (s_pow2 < 2 * s_float).all()
    assert (fp8.e4m3_decode(codes).abs() <= 448).all()


def test_quantize_argument_checks():
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.quantize(torch.zeros(4, 100))
    with pytest.raises(ValueError, match="scales must be"):
        fp8.dequantize(torch.zeros(4, 128, dtype=torch.uint8), torch.zeros(4, 2))


# ------------------------------------------------------------------ DLPack
class _Owner:
    pass


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.bool]
                         + ([fp8.FP8_DTYPE] if fp8.FP8_DTYPE is not None else []))
def test_dlpack_view_over_host_memory(dtype):
    raw = (ctypes.c_uint8 * 256)(*[i % 2 for i in range(256)]) if dtype == torch.bool else \
        (ctypes.c_uint8 * 256)(*range(256))
    owner = _Owner()
    owner.raw = raw
    alive = weakref.ref(owner)
    before = _dlpack.live_count()
    elem = torch.empty(0, dtype=dtype).element_size()
    t = _dlpack.wrap(ctypes.addressof(raw), (4, 64 // elem), dtype, torch.device("cpu"), owner)
    del owner
    assert t.dtype == dtype and t.shape == (4, 64 // elem) and t.is_contiguous()
    assert t.data_ptr() == ctypes.addressof(raw)
    assert bytes(t.view(torch.uint8).flatten().tolist()) == bytes(raw)[:256]
    raw[0] = 1 if dtype == torch.bool else 77  # a view, not a copy
    assert t.view(torch.uint8)[0, 0].item() == raw[0]
    assert alive() is not None  # the view keeps its owner
    del t
    gc.collect()
    assert alive() is None and _dlpack.live_count() == before


def test_dlpack_empty_shape_is_a_fresh_tensor():
    t = _dlpack.wrap(0, (0, 16), torch.bfloat16, torch.device("cpu"), None)
    assert t.shape == (0, 16) and t.dtype == torch.bfloat16


# ------------------------------------------------------------ process group
class _Backend:
    def __init__(self, ptr):
        self.ptr = ptr

    def _comm_ptr(self):
        return self.ptr


class _Group:
    def __init__(self, backend):
        self.backend = backend

    def _get_backend(self, device):
        assert device == torch.device("cuda")
        if isinstance(self.backend, Exception):
            raise self.backend
        return self.backend


def test_comm_pointer_probing():
    assert nccl_comm_pointer(_Group(_Backend(0x1234))) == 0x1234
    with pytest.raises(RuntimeError, match="no _get_backend"):
        nccl_comm_pointer(object())
    with pytest.raises(RuntimeError, match="backend='nccl'"):
        nccl_comm_pointer(_Group(RuntimeError("no backend for cuda")))
    with pytest.raises(RuntimeError, match="has no _comm_ptr") as info:
        nccl_comm_pointer(_Group(object()))
    assert "PyTorch %s or newer" % nccl_moe._version.TORCH_MIN_VERSION in str(info.value)
    with pytest.raises(RuntimeError, match="device_id=") as info:
        nccl_comm_pointer(_Group(_Backend(0)))
    assert "all_reduce" in str(info.value)


ENOUGH = {"CUDA_DEVICE_MAX_CONNECTIONS": "32", "CUDA_MODULE_LOADING": "EAGER"}


@pytest.mark.parametrize("n, environ, match", [
    (8, {}, r"CUDA_DEVICE_MAX_CONNECTIONS >= 9 \(it is unset: CUDA's default is 8\).*CUDA_MODULE_LOADING=EAGER"),
    (8, {"CUDA_MODULE_LOADING": "EAGER"}, "CUDA_DEVICE_MAX_CONNECTIONS >= 9"),
    (4, {"CUDA_DEVICE_MAX_CONNECTIONS": "4", "CUDA_MODULE_LOADING": "EAGER"}, r">= 5 \(it is '4'\)"),
    (4, {"CUDA_DEVICE_MAX_CONNECTIONS": "many", "CUDA_MODULE_LOADING": "EAGER"}, "'many'"),
    (2, {"CUDA_DEVICE_MAX_CONNECTIONS": "32", "CUDA_MODULE_LOADING": "LAZY"}, "CUDA_MODULE_LOADING=EAGER .it is 'LAZY'"),
    (2, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}, "before the process first uses CUDA"),
])
def test_virtual_environment_is_checked(n, environ, match):
    with pytest.raises(RuntimeError, match=match):
        check_virtual_environment(n, environ)


def test_virtual_environment_accepted():
    check_virtual_environment(1, {})  # one rank waits for nobody
    check_virtual_environment(7, {"CUDA_MODULE_LOADING": "EAGER"})  # CUDA's default 8 queues suffice
    check_virtual_environment(31, ENOUGH)
    with pytest.raises(ValueError, match="at most 31"):
        check_virtual_environment(32, ENOUGH)


def test_virtual_buffer_checks_environment_before_cuda(monkeypatch):
    # Raised before torch is asked for a GPU: runs on a machine without one.
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    with pytest.raises(RuntimeError, match="CUDA_DEVICE_MAX_CONNECTIONS >= 9"):
        VirtualBuffer(8, max_tokens_per_rank=16, hidden=128, num_experts=8)


def test_buffer_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        Buffer(max_tokens_per_rank=16, hidden=128, num_experts=8)


def test_virtual_factory_is_the_same_class():
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        Buffer.virtual(3, max_tokens_per_rank=16, hidden=128, num_experts=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens_per_rank=0, hidden=128, num_experts=8), "max_tokens_per_rank"),
    (dict(max_tokens_per_rank=8, hidden=100, num_experts=8), "multiple of 8"),
    (dict(max_tokens_per_rank=8, hidden=128, num_experts=7), "multiple of the 2 ranks"),
    (dict(max_tokens_per_rank=8, hidden=128, num_experts=8, max_topk=17), "max_topk"),
    (dict(max_tokens_per_rank=8, hidden=128, num_experts=8, timeout_ms=-1), ">= 0"),
    (dict(max_tokens_per_rank=8.0, hidden=128, num_experts=8), "integer"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VirtualBuffer(2, **kwargs)


# ------------------------------------------------------------ argument checks
N, T0, T1, H, K, E, CAP = 2, 16, 5, 256, 4, 8, 20


@pytest.fixture
def vb():
    return VirtualBuffer._unbacked(N, max_tokens_per_rank=16, hidden=H, num_experts=E, max_topk=K,
                                   max_recv_tokens=CAP)


def good():
    xs = [torch.zeros(T0, H, dtype=torch.bfloat16), torch.zeros(T1, H, dtype=torch.bfloat16)]
    idxs = [torch.zeros(T0, K, dtype=torch.int64), torch.zeros(T1, K, dtype=torch.int64)]
    ws = [torch.zeros(T0, K), torch.zeros(T1, K)]
    return xs, idxs, ws


def misaligned(rows, cols, dtype):
    return torch.zeros(rows * cols + 1, dtype=dtype)[1:].view(rows, cols)


def _fp8_pair(T, h=H):
    return (torch.zeros(T, h, dtype=torch.uint8), torch.zeros(T, h // 128))


DISPATCH_CASES = [
    ("x not a list", lambda a: a.update(x=a["x"][0]), "one entry per virtual rank"),
    ("x one rank short", lambda a: a.update(x=a["x"][:1]), r"\(2\), got 1 items"),
    ("x float32", lambda a: a["x"].__setitem__(0, torch.zeros(T0, H)), "rank 0: x must be bfloat16, got float32"),
    ("x 1-D", lambda a: a["x"].__setitem__(1, torch.zeros(H, dtype=torch.bfloat16)), "rank 1: x must have shape"),
    ("x not contiguous", lambda a: a["x"].__setitem__(0, torch.zeros(H, T0, dtype=torch.bfloat16).t()),
     "contiguous"),
    ("x misaligned", lambda a: a["x"].__setitem__(0, misaligned(T0, H, torch.bfloat16)), "16-byte aligned"),
    ("x on another device", lambda a: a["x"].__setitem__(0, torch.zeros(T0, H, dtype=torch.bfloat16,
                                                                         device="meta")), "is on meta"),
    ("too many tokens", lambda a: (a["x"].__setitem__(0, torch.zeros(17, H, dtype=torch.bfloat16)),
                                   a["topk_idx"].__setitem__(0, torch.zeros(17, K, dtype=torch.int64))),
     "max_tokens_per_rank = 16"),
    ("hidden too large", lambda a: a["x"].__setitem__(0, torch.zeros(T0, H + 8, dtype=torch.bfloat16)),
     r"must be in \[1, 256\]"),
    ("hidden not a multiple of 8", lambda a: a["x"].__setitem__(0, torch.zeros(T0, 12, dtype=torch.bfloat16)),
     "multiple of 8 channels"),
    ("FP8 cast needs 128", lambda a: (a["x"].__setitem__(0, torch.zeros(T0, 136, dtype=torch.bfloat16)),
                                      a.update(send_fp8=True)), "FP8 needs a multiple of 128"),
    ("topk_idx int32", lambda a: a["topk_idx"].__setitem__(0, torch.zeros(T0, K, dtype=torch.int32)),
     "topk_idx must be int64"),
    ("topk_idx rows", lambda a: a["topk_idx"].__setitem__(1, torch.zeros(T1 + 1, K, dtype=torch.int64)),
     r"rank 1: topk_idx must have shape \[numTokens, topk\] = \[5, \*\]"),
    ("topk too large", lambda a: a["topk_idx"].__setitem__(0, torch.zeros(T0, K + 1, dtype=torch.int64)),
     "max_topk = 4"),
    ("weights float16", lambda a: a["topk_weights"].__setitem__(0, torch.zeros(T0, K, dtype=torch.float16)),
     "topk_weights must be float32"),
    ("weights shape", lambda a: a["topk_weights"].__setitem__(0, torch.zeros(T0, K + 1)), "topk_weights must have"),
    ("weights on one rank only", lambda a: a["topk_weights"].__setitem__(1, None), "must agree"),
    ("hidden differs across ranks", lambda a: a["x"].__setitem__(1, torch.zeros(T1, 128, dtype=torch.bfloat16)),
     "must agree"),
    ("FP8 triple", lambda a: a["x"].__setitem__(0, _fp8_pair(T0) + (None,)), "pair"),
    ("FP8 codes bf16", lambda a: a["x"].__setitem__(0, (torch.zeros(T0, H, dtype=torch.bfloat16),
                                                        torch.zeros(T0, 2))), r"x\[0\] \(FP8 codes\) must be"),
    ("FP8 scales shape", lambda a: a["x"].__setitem__(0, (torch.zeros(T0, H, dtype=torch.uint8),
                                                          torch.zeros(T0, 3))), r"x\[1\] \(scales\) must have"),
    ("FP8 sent as BF16", lambda a: (a["x"].__setitem__(0, _fp8_pair(T0)), a["x"].__setitem__(1, _fp8_pair(T1)),
                                    a.update(send_fp8=False)), "must be sent as FP8"),
    ("FP8 on one rank only", lambda a: a["x"].__setitem__(0, _fp8_pair(T0)), "must agree"),
    ("send_fp8 not a bool", lambda a: a.update(send_fp8="yes"), "send_fp8 must be"),
    ("capacity too large", lambda a: a.update(capacity=CAP + 1), "max_recv_tokens = 20"),
    ("capacity negative", lambda a: a.update(capacity=-1), "capacity = -1"),
    ("capacity not an int", lambda a: a.update(capacity=1.5), "capacity must be an integer"),
    ("alignment too large", lambda a: a.update(expert_alignment=(1 << 16) + 1), "expert_alignment"),
    ("scale format", lambda a: a.update(scale_format="ue8m0"), "scale_format must be one of"),
    ("handle not a Handle", lambda a: a.update(handle=[object(), object()]), "handle must be a Handle"),
]


@pytest.mark.parametrize("name, edit, match", DISPATCH_CASES, ids=[c[0] for c in DISPATCH_CASES])
def test_dispatch_argument_checks(vb, name, edit, match):
    xs, idxs, ws = good()
    args = dict(x=xs, topk_idx=idxs, topk_weights=ws)
    edit(args)
    with pytest.raises(ValueError, match=match):
        vb.dispatch(**args)


def test_good_arguments_reach_the_library(vb):
    # No native comm behind this buffer: passing every check, the call fails
    # in C, and that failure surfaces as NcclMoeArgumentError.
    xs, idxs, ws = good()
    with pytest.raises(nccl_moe.NcclMoeArgumentError, match="NULL"):
        vb.dispatch(xs, idxs, ws)
    pairs = [fp8.quantize(x) for x in xs]
    with pytest.raises(nccl_moe.NcclMoeArgumentError, match="NULL"):
        vb.dispatch(pairs, idxs, None, capacity=CAP, expert_alignment=64)


def test_single_rank_buffer_takes_tensors():
    b = Buffer._unbacked(4, max_tokens_per_rank=16, hidden=H, num_experts=E)
    with pytest.raises(ValueError, match=r"FP8 x is a pair \(codes, scales\), got 1 items"):
        b.dispatch([torch.zeros(T0, H, dtype=torch.bfloat16)], torch.zeros(T0, K, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got ndarray|x must be a torch.Tensor, got str"):
        b.dispatch("x", torch.zeros(T0, K, dtype=torch.int64))
    with pytest.raises(ValueError, match="^x must be bfloat16"):  # no "rank r:" prefix for one rank
        b.dispatch(torch.zeros(T0, H), torch.zeros(T0, K, dtype=torch.int64))
    with pytest.raises(ValueError, match="topk_idx must be int64"):
        b.get_dispatch_layout(torch.zeros(T0, K))
    with pytest.raises(ValueError, match="handle must be the Handle"):
        b.combine(torch.zeros(3, H, dtype=torch.bfloat16), handle=None)


def test_combine_and_layout_checks(vb):
    with pytest.raises(ValueError, match="one entry per virtual rank"):
        vb.combine([torch.zeros(1, H, dtype=torch.bfloat16)], [None, None])
    with pytest.raises(ValueError, match="rank 0: handle must be the Handle"):
        vb.combine([torch.zeros(1, H, dtype=torch.bfloat16)] * 2, [None, None])
    with pytest.raises(ValueError, match="rank 1: topk_idx has topk = 5"):
        vb.get_dispatch_layout([torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int64)])
    with pytest.raises(ValueError, match="more than max_tokens_per_rank"):
        vb.get_dispatch_layout([torch.zeros(17, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match="rank = 2"):
        vb.get_combine_buffer(2)


def test_destroyed_buffer_refuses_calls(vb):
    vb.destroy()
    xs, idxs, ws = good()
    with pytest.raises(RuntimeError, match="destroyed"):
        vb.dispatch(xs, idxs, ws)
