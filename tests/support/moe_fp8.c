/* SPDX-License-Identifier: Apache-2.0 */
#include "tests/support/moe_fp8.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "nccl_moe.h"

static uint32_t moe_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static float moe_f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

#define MOE_F32_EXP_INF 0x7F800000u
#define MOE_E4M3_MAX_CODE 0x7Eu      /* 448 */
#define MOE_E4M3_MAX_BITS 0x43E00000u /* 448.0f */
#define MOE_E4M3_MIN_NORMAL_EXP (-6)
#define MOE_E4M3_SUBNORMAL_STEPS 512.0f /* 1 / 2^-9 */
#define MOE_E4M3_BIAS 7
#define MOE_F32_BIAS 127
#define MOE_F32_TO_E4M3_SHIFT 20 /* 23 - 3 mantissa bits */

uint8_t moe_fp8_e4m3_encode(float v) {
  uint32_t u = moe_f32_bits(v);
  uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
  uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > MOE_F32_EXP_INF) return MOE_FP8_NAN;
  /* Saturating: everything above 448 (Inf too) becomes 448. Values in
   * (448, 464] would round to 448 anyway; above that, to 480, out of range. */
  if (mag >= MOE_E4M3_MAX_BITS) return sign | MOE_E4M3_MAX_CODE;
  int exp = (int)(mag >> 23) - MOE_F32_BIAS;
  if (exp < MOE_E4M3_MIN_NORMAL_EXP) {
    /* Subnormal (or zero): multiples of 2^-9, rounded to nearest even. The
     * product is exact (power-of-two scaling) and < 8.5, so rintf is RNE. */
    float q = rintf(moe_f32_from_bits(mag) * MOE_E4M3_SUBNORMAL_STEPS);
    return sign | (uint8_t)q; /* q == 8 is the smallest normal's code */
  }
  /* Normal: keep 3 mantissa bits, round to nearest even on the dropped 20;
   * a carry out of the mantissa correctly bumps the exponent. */
  uint32_t lsb = (mag >> MOE_F32_TO_E4M3_SHIFT) & 1u;
  uint32_t r = (mag + ((1u << (MOE_F32_TO_E4M3_SHIFT - 1)) - 1u) + lsb) >> MOE_F32_TO_E4M3_SHIFT;
  uint32_t e8 = (r >> 3) - (MOE_F32_BIAS - MOE_E4M3_BIAS);
  uint32_t code = (e8 << 3) | (r & 7u);
  if (code > MOE_E4M3_MAX_CODE) code = MOE_E4M3_MAX_CODE;
  return sign | (uint8_t)code;
}

float moe_fp8_e4m3_decode(uint8_t code) {
  float sign = (code & 0x80u) ? -1.0f : 1.0f;
  uint32_t exp = (code >> 3) & 0xFu;
  uint32_t man = code & 7u;
  if (exp == 0xFu && man == 7u) return NAN;
  if (exp == 0) return sign * ldexpf((float)man, -9);
  return sign * ldexpf((float)(8u + man), (int)exp - MOE_E4M3_BIAS - 3);
}

float moe_fp8_block_scale(float amax, int pow2) {
  float scale = amax / NCCL_MOE_FP8_MAX;
  if (!(scale >= FLT_MIN)) return 1.0f; /* zero, tiny (or NaN: cannot happen) */
  if (pow2) {
    uint32_t u = moe_f32_bits(scale);
    if (u & 0x7FFFFFu) u = (u & 0xFF800000u) + 0x00800000u;
    scale = moe_f32_from_bits(u);
  }
  return scale;
}

float moe_bf16_to_float(uint16_t h) { return moe_f32_from_bits((uint32_t)h << 16); }

uint16_t moe_float_to_bf16(float f) {
  uint32_t u = moe_f32_bits(f);
  if ((u & 0x7FFFFFFFu) > MOE_F32_EXP_INF) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

void moe_fp8_quantize_ref(const uint16_t* x, int rows, int hidden, int pow2, uint8_t* codes,
                          float* scales) {
  int blocks = hidden / NCCL_MOE_FP8_BLOCK;
  for (int r = 0; r < rows; r++) {
    for (int b = 0; b < blocks; b++) {
      const uint16_t* in = x + (size_t)r * hidden + (size_t)b * NCCL_MOE_FP8_BLOCK;
      float amax = 0.0f;
      for (int i = 0; i < NCCL_MOE_FP8_BLOCK; i++) {
        float a = fabsf(moe_bf16_to_float(in[i]));
        if (isfinite(a) && a > amax) amax = a;
      }
      float scale = moe_fp8_block_scale(amax, pow2);
      float inv = 1.0f / scale;
      scales[(size_t)r * blocks + b] = scale;
      uint8_t* out = codes + (size_t)r * hidden + (size_t)b * NCCL_MOE_FP8_BLOCK;
      for (int i = 0; i < NCCL_MOE_FP8_BLOCK; i++) out[i] = moe_fp8_e4m3_encode(moe_bf16_to_float(in[i]) * inv);
    }
  }
}
