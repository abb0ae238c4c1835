/* SPDX-License-Identifier: Apache-2.0 */
/* FP8 e4m3 host codec: exact values, rounding, saturation, subnormals,
 * block scales and the round-trip error bound. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests/support/moe_fp8.h"
#include "nccl_moe.h"
#include "test_common.h"

START_TEST(test_exact_values) {
  ck_assert_uint_eq(moe_fp8_e4m3_encode(0.0f), 0x00);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-0.0f), 0x80);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(1.0f), 0x38);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-2.0f), 0xC0);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(448.0f), 0x7E);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-448.0f), 0xFE);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(0.015625f), 0x08); /* 2^-6, smallest normal */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(ldexpf(1.0f, -9)), 0x01); /* smallest subnormal */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(ldexpf(7.0f, -9)), 0x07); /* largest subnormal */
  ck_assert_float_eq(moe_fp8_e4m3_decode(0x7E), 448.0f);
  ck_assert_float_eq(moe_fp8_e4m3_decode(0x01), ldexpf(1.0f, -9));
  ck_assert_float_eq(moe_fp8_e4m3_decode(0xB8), -1.0f);
  ck_assert(isnan(moe_fp8_e4m3_decode(0x7F)));
  ck_assert(isnan(moe_fp8_e4m3_decode(0xFF)));
}
END_TEST

START_TEST(test_rounding_ties_to_even) {
  /* 1.0625 lies halfway between 1.0 (mantissa 000) and 1.125 (001): even wins. */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(1.0625f), 0x38);
  /* 1.1875 lies halfway between 1.125 (001) and 1.25 (010). */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(1.1875f), 0x3A);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(nextafterf(1.0625f, 2.0f)), 0x39);
  /* Subnormal ties: 0.5 and 1.5 steps of 2^-9. */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(ldexpf(0.5f, -9)), 0x00);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(ldexpf(1.5f, -9)), 0x02);
  /* 7.5 steps rounds up into the smallest normal. */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(ldexpf(7.5f, -9)), 0x08);
  /* A carry out of the mantissa bumps the exponent: 1.9375 -> 2.0. */
  ck_assert_uint_eq(moe_fp8_e4m3_encode(1.9375f), 0x40);
}
END_TEST

START_TEST(test_saturation_and_specials) {
  ck_assert_uint_eq(moe_fp8_e4m3_encode(449.0f), 0x7E);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(464.0f), 0x7E);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(1.0e6f), 0x7E);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-1.0e30f), 0xFE);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(INFINITY), 0x7E);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-INFINITY), 0xFE);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(NAN), MOE_FP8_NAN);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-NAN), MOE_FP8_NAN);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(FLT_MIN), 0x00);
  ck_assert_uint_eq(moe_fp8_e4m3_encode(-FLT_TRUE_MIN), 0x80);
}
END_TEST

/* Every finite code decodes and re-encodes to itself, and every value between
 * two neighbours rounds to the nearer (ties to the even code). */
START_TEST(test_all_codes_round_trip) {
  for (int c = 0; c < 256; c++) {
    float v = moe_fp8_e4m3_decode((uint8_t)c);
    if (isnan(v)) continue;
    uint8_t back = moe_fp8_e4m3_encode(v);
    if (c == 0x80) ck_assert_uint_eq(back, 0x80);
    else ck_assert_msg(back == c, "code 0x%02x -> %g -> 0x%02x", c, v, back);
  }
  for (int c = 0; c < 0x7E; c++) {
    float lo = moe_fp8_e4m3_decode((uint8_t)c), hi = moe_fp8_e4m3_decode((uint8_t)(c + 1));
    float mid = 0.5f * (lo + hi);
    uint8_t even = (c & 1) ? (uint8_t)(c + 1) : (uint8_t)c;
    ck_assert_uint_eq(moe_fp8_e4m3_encode(mid), even);
    ck_assert_uint_eq(moe_fp8_e4m3_encode(nextafterf(mid, 0.0f)), c);
    ck_assert_uint_eq(moe_fp8_e4m3_encode(nextafterf(mid, 1000.0f)), c + 1);
  }
}
END_TEST

START_TEST(test_block_scale) {
  ck_assert_float_eq(moe_fp8_block_scale(448.0f, 0), 1.0f);
  ck_assert_float_eq(moe_fp8_block_scale(0.0f, 0), 1.0f);
  ck_assert_float_eq(moe_fp8_block_scale(0.0f, 1), 1.0f);
  ck_assert_float_eq(moe_fp8_block_scale(1e-37f, 0), 1.0f); /* amax/448 not normal */
  ck_assert_float_eq(moe_fp8_block_scale(896.0f, 1), 2.0f);
  ck_assert_float_eq(moe_fp8_block_scale(900.0f, 1), 4.0f);
  ck_assert_float_eq(moe_fp8_block_scale(3.0f, 1), 0.0078125f); /* 3/448 -> 2^-7 */
}
END_TEST

static void fill_bf16(moe_rng_t* rng, uint16_t* x, size_t n, float spread) {
  for (size_t i = 0; i < n; i++) x[i] = moe_float_to_bf16(moe_rng_normal(rng) * spread);
}

/* Random blocks: |x - decode| within half an e4m3 step of x (relative 2^-4
 * for normals, 2^-10 * scale for subnormals), scales as documented. */
START_TEST(test_round_trip_error_bound) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() + 11);
  enum { ROWS = 64, HIDDEN = 1024 };
  static uint16_t x[ROWS * HIDDEN];
  static uint8_t codes[ROWS * HIDDEN];
  static float scales[ROWS * HIDDEN / NCCL_MOE_FP8_BLOCK];
  for (int pow2 = 0; pow2 < 2; pow2++) {
    fill_bf16(&rng, x, ROWS * HIDDEN, ldexpf(1.0f, (int)moe_rng_below(&rng, 40) - 20));
    moe_fp8_quantize_ref(x, ROWS, HIDDEN, pow2, codes, scales);
    for (int i = 0; i < ROWS * HIDDEN; i++) {
      float scale = scales[i / NCCL_MOE_FP8_BLOCK];
      float v = moe_bf16_to_float(x[i]);
      float d = moe_fp8_e4m3_decode(codes[i]) * scale;
      float bound = fmaxf(fabsf(v) * 0.0625f, ldexpf(scale, -10)) * 1.0001f;
      ck_assert_msg(fabsf(v - d) <= bound, "i=%d v=%g d=%g scale=%g", i, v, d, scale);
    }
    for (int b = 0; b < ROWS * HIDDEN / NCCL_MOE_FP8_BLOCK; b++) {
      float amax = 0;
      for (int i = 0; i < NCCL_MOE_FP8_BLOCK; i++)
        amax = fmaxf(amax, fabsf(moe_bf16_to_float(x[b * NCCL_MOE_FP8_BLOCK + i])));
      ck_assert(scales[b] * NCCL_MOE_FP8_MAX >= amax * 0.9999f);
      if (pow2) {
        int e;
        ck_assert_float_eq(frexpf(scales[b], &e), 0.5f);
      } else {
        ck_assert_float_eq(scales[b], amax / NCCL_MOE_FP8_MAX);
      }
    }
  }
}
END_TEST

START_TEST(test_zero_and_special_blocks) {
  uint16_t x[2 * NCCL_MOE_FP8_BLOCK];
  uint8_t codes[2 * NCCL_MOE_FP8_BLOCK];
  float scales[2];
  memset(x, 0, sizeof(x));
  /* Second block: one NaN, one -Inf, the rest small: amax ignores both. */
  for (int i = 0; i < NCCL_MOE_FP8_BLOCK; i++) x[NCCL_MOE_FP8_BLOCK + i] = moe_float_to_bf16(0.5f);
  x[NCCL_MOE_FP8_BLOCK + 3] = moe_float_to_bf16(NAN);
  x[NCCL_MOE_FP8_BLOCK + 4] = moe_float_to_bf16(-INFINITY);
  x[NCCL_MOE_FP8_BLOCK + 5] = moe_float_to_bf16(-0.75f);
  moe_fp8_quantize_ref(x, 1, 2 * NCCL_MOE_FP8_BLOCK, 0, codes, scales);
  ck_assert_float_eq(scales[0], 1.0f);
  for (int i = 0; i < NCCL_MOE_FP8_BLOCK; i++) ck_assert_uint_eq(codes[i], 0);
  ck_assert_float_eq(scales[1], 0.75f / NCCL_MOE_FP8_MAX);
  ck_assert_uint_eq(codes[NCCL_MOE_FP8_BLOCK + 3], MOE_FP8_NAN);
  ck_assert_uint_eq(codes[NCCL_MOE_FP8_BLOCK + 4], 0xFE);
  ck_assert_uint_eq(codes[NCCL_MOE_FP8_BLOCK + 5], 0xFE);
}
END_TEST

START_TEST(test_bf16) {
  ck_assert_uint_eq(moe_float_to_bf16(1.0f), 0x3F80);
  ck_assert_uint_eq(moe_float_to_bf16(-2.0f), 0xC000);
  ck_assert_float_eq(moe_bf16_to_float(0x3F80), 1.0f);
  /* 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0). */
  ck_assert_uint_eq(moe_float_to_bf16(1.00390625f), 0x3F80);
  ck_assert_uint_eq(moe_float_to_bf16(1.01171875f), 0x3F82);
  ck_assert(isnan(moe_bf16_to_float(moe_float_to_bf16(NAN))));
  ck_assert_uint_eq(moe_float_to_bf16(INFINITY), 0x7F80);
}
END_TEST

static Suite* fp8_suite(void) {
  Suite* s = suite_create("fp8");
  TCase* tc = tcase_create("codec");
  tcase_add_test(tc, test_exact_values);
  tcase_add_test(tc, test_rounding_ties_to_even);
  tcase_add_test(tc, test_saturation_and_specials);
  tcase_add_test(tc, test_all_codes_round_trip);
  tcase_add_test(tc, test_block_scale);
  tcase_add_test(tc, test_round_trip_error_bound);
  tcase_add_test(tc, test_zero_and_special_blocks);
  tcase_add_test(tc, test_bf16);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  moe_test_seed();
  return moe_test_run(fp8_suite());
}
