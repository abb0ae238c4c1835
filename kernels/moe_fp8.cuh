/* SPDX-License-Identifier: Apache-2.0 */
/* FP8 e4m3 device codec: the same function as the host reference in
 * plugin/moe_fp8.c (see its header for the rules), bit for bit. The cast uses
 * the hardware's round-to-nearest-even saturating conversion. */
#ifndef MOE_FP8_CUH_
#define MOE_FP8_CUH_

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "nccl_moe.h"

#define MOE_FP8_FLT_MIN 1.17549435e-38f

__device__ __forceinline__ float moe_fp8_block_scale_dev(float amax, int pow2) {
  float scale = amax / NCCL_MOE_FP8_MAX;
  if (!(scale >= MOE_FP8_FLT_MIN)) return 1.0f;
  if (pow2) {
    uint32_t u = __float_as_uint(scale);
    if (u & 0x7FFFFFu) u = (u & 0xFF800000u) + 0x00800000u;
    scale = __uint_as_float(u);
  }
  return scale;
}

/* |v| if finite, else 0: NaN and Inf do not set a block's amax. */
__device__ __forceinline__ float moe_fp8_finite_abs(float v) {
  float a = fabsf(v);
  return a <= 3.40282347e+38f ? a : 0.0f;
}

__device__ __forceinline__ uint8_t moe_fp8_encode_dev(float v) {
  return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

/* Two values at once (lower byte = a). */
__device__ __forceinline__ uint16_t moe_fp8_encode2_dev(float a, float b) {
  return (uint16_t)__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float moe_fp8_decode_dev(uint8_t code) {
  __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)code, __NV_E4M3);
  return __half2float(__half(h));
}

#define MOE_VEC_BF16 8 /* BF16 values in one 16-byte vector */

/* Quantizes 8 BF16 values held as one 16-byte vector, with the block's
 * inverse scale, into 8 FP8 codes (returned as 8 bytes). */
__device__ __forceinline__ uint2 moe_fp8_encode8_dev(uint4 v, float inv) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float2 f = __bfloat1622float2(p[i]);
    lo |= (uint32_t)moe_fp8_encode2_dev(f.x * inv, f.y * inv) << (16 * i);
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float2 f = __bfloat1622float2(p[2 + i]);
    hi |= (uint32_t)moe_fp8_encode2_dev(f.x * inv, f.y * inv) << (16 * i);
  }
  return make_uint2(lo, hi);
}

/* Largest finite |value| among 8 BF16 values in a 16-byte vector. */
__device__ __forceinline__ float moe_bf16x8_amax(uint4 v) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __bfloat1622float2(p[i]);
    m = fmaxf(m, fmaxf(moe_fp8_finite_abs(f.x), moe_fp8_finite_abs(f.y)));
  }
  return m;
}

/* Lanes that hold one 128-channel block, one 16-byte vector each (also: the
 * vectors of a block). */
#define MOE_FP8_BLOCK_LANES (NCCL_MOE_FP8_BLOCK / MOE_VEC_BF16)

/* Casts one 128-channel block held by MOE_FP8_BLOCK_LANES aligned lanes (a
 * half-warp; `mask` names the lanes that call together): this lane's 8
 * values become 8 codes, and every lane gets the block's scale. */
__device__ __forceinline__ uint2 moe_fp8_cast_block_dev(uint4 v, int pow2, unsigned mask, float* scale_p) {
  float amax = moe_bf16x8_amax(v);
#pragma unroll
  for (int m = MOE_FP8_BLOCK_LANES / 2; m > 0; m >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(mask, amax, m, MOE_FP8_BLOCK_LANES));
  const float scale = moe_fp8_block_scale_dev(amax, pow2);
  *scale_p = scale;
  return moe_fp8_encode8_dev(v, 1.0f / scale);
}

#endif
