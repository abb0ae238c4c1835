# SPDX-License-Identifier: Apache-2.0
"""FP8 (e4m3, "fn" variant) block quantization in torch, bit for bit the
codec of the library (tests/support/moe_fp8.h documents it; the dispatch kernel's
in-kernel cast produces the same bytes):

    amax  = max |x| over a block of 128 channels of a row (NaN, Inf ignored)
    scale = amax / 448 (fp32 division), or that value rounded up to a power
            of two ("pow2"); a block whose scale is not a normal fp32 number
            (all zeros included) gets scale 1
    code  = e4m3(x * (1 / scale)), round to nearest even, saturating at 448
    value = decode(code) * scale

Codes are returned as torch.float8_e4m3fn where torch has it, else as uint8
(the raw e4m3 bytes). Both are accepted wherever the package takes FP8.
Every step uses exact fp32 arithmetic (tensor/tensor division, integer bit
operations), so CPU and GPU give the same bytes.
"""

from __future__ import annotations

import math

import torch

from ._lib import FP8_BLOCK, FP8_MAX

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
"""torch.float8_e4m3fn, or None on a torch without FP8 types."""

_F32_EXP_INF = 0x7F800000
_E4M3_MAX_CODE = 0x7E
_E4M3_MAX_BITS = 0x43E00000  # 448.0f
_E4M3_NAN = 0x7F
_F32_TO_E4M3_SHIFT = 20  # 23 - 3 mantissa bits
_E4M3_MIN_NORMAL_EXP = -6
_F32_BIAS = 127
_E4M3_BIAS = 7
_FLT_MIN = 2.0 ** -126


def fp8_codes(t: torch.Tensor) -> torch.Tensor:
    """The uint8 bytes of an FP8 tensor (float8_e4m3fn or uint8), same shape."""
    if t.dtype == torch.uint8:
        return t
    if FP8_DTYPE is not None and t.dtype == FP8_DTYPE:
        return t.view(torch.uint8)
    raise ValueError("expected float8_e4m3fn or uint8 (raw e4m3 codes), got %s" % t.dtype)


def as_fp8(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 codes as torch.float8_e4m3fn when torch has it."""
    return codes.view(FP8_DTYPE) if FP8_DTYPE is not None else codes


def e4m3_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> uint8 e4m3 codes: nearest even, saturating (|v| > 448
    and Inf -> +-448), NaN -> 0x7F."""
    v = v.to(torch.float32).contiguous()
    u = v.view(torch.int32)
    sign = (u >> 24) & 0x80  # arithmetic shift: bit 31 lands on bit 7
    mag = u & 0x7FFFFFFF
    exp = (mag >> 23) - _F32_BIAS
    # Subnormal range: multiples of 2^-9, rounded half to even (torch.round).
    sub = torch.round(mag.view(torch.float32) * 512.0).to(torch.int32)
    # Normal range: keep 3 mantissa bits, round half to even on the dropped
    # 20; a carry out of the mantissa bumps the exponent, as it should.
    lsb = (mag >> _F32_TO_E4M3_SHIFT) & 1
    r = (mag + ((1 << (_F32_TO_E4M3_SHIFT - 1)) - 1) + lsb) >> _F32_TO_E4M3_SHIFT
    normal = (((r >> 3) - (_F32_BIAS - _E4M3_BIAS)) << 3) | (r & 7)
    normal = torch.clamp(normal, max=_E4M3_MAX_CODE)
    code = torch.where(exp < _E4M3_MIN_NORMAL_EXP, sub, normal)
    code = torch.where(mag >= _E4M3_MAX_BITS, torch.full_like(code, _E4M3_MAX_CODE), code)
    code = sign | code
    code = torch.where(mag > _F32_EXP_INF, torch.full_like(code, _E4M3_NAN), code)
    return code.to(torch.uint8)


def _decode_table() -> list:
    values = []
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        exp = (c >> 3) & 0xF
        man = c & 7
        if exp == 0xF and man == 7:
            values.append(float("nan"))
        elif exp == 0:
            values.append(sign * math.ldexp(man, -9))
        else:
            values.append(sign * math.ldexp(8 + man, exp - _E4M3_BIAS - 3))
    return values


_DECODE = _decode_table()


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (or float8_e4m3fn) codes -> fp32 values."""
    codes = fp8_codes(codes)
    table = torch.tensor(_DECODE, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def block_scales(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Scale of each block from its amax (fp32), as the library computes it."""
    amax = amax.to(torch.float32)
    # Tensor / tensor: a true fp32 division (torch turns a division by a
    # Python scalar into a multiplication by its reciprocal on the GPU).
    scale = amax / torch.full_like(amax, FP8_MAX)
    scale = torch.where(scale >= _FLT_MIN, scale, torch.ones_like(scale))  # NaN fails >= too
    if pow2:
        bits = scale.contiguous().view(torch.int32)
        up = ((bits & 0x7F800000) + 0x00800000)
        bits = torch.where((bits & 0x7FFFFF) != 0, up, bits)
        scale = bits.view(torch.float32)
    return scale


def quantize(x: torch.Tensor, pow2_scales: bool = False):
    """x [T, H] (any float dtype; H a multiple of 128) -> (codes [T, H],
    scales fp32 [T, H / 128]): the `(float8_e4m3fn, scales)` pair dispatch
    takes, identical to what the in-kernel cast sends."""
    if x.dim() != 2 or x.shape[1] % FP8_BLOCK != 0:
        raise ValueError("quantize: x must be [T, H] with H a multiple of %d, got %s" % (FP8_BLOCK, list(x.shape)))
    T, H = x.shape
    xf = x.to(torch.float32).reshape(T, H // FP8_BLOCK, FP8_BLOCK)
    a = xf.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    amax = a.amax(dim=2) if T > 0 else torch.zeros(T, H // FP8_BLOCK, device=x.device)
    scale = block_scales(amax, pow2_scales)
    inv = torch.ones_like(scale) / scale
    codes = e4m3_encode(xf * inv.unsqueeze(2)).reshape(T, H)
    return as_fp8(codes), scale.contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(codes [T, H], scales [T, H / 128]) -> values [T, H] of `dtype`."""
    if codes.dim() != 2 or codes.shape[1] % FP8_BLOCK != 0:
        raise ValueError("dequantize: codes must be [T, H] with H a multiple of %d, got %s"
                         % (FP8_BLOCK, list(codes.shape)))
    T, H = codes.shape
    if tuple(scales.shape) != (T, H // FP8_BLOCK):
        raise ValueError("dequantize: scales must be [%d, %d], got %s" % (T, H // FP8_BLOCK, list(scales.shape)))
    v = e4m3_decode(codes).reshape(T, H // FP8_BLOCK, FP8_BLOCK) * scales.to(torch.float32).unsqueeze(2)
    return v.reshape(T, H).to(dtype)
