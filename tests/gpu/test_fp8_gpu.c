/* SPDX-License-Identifier: Apache-2.0 */
/* The device FP8 codec produces the host reference's bits, on random inputs
 * with the awkward values mixed in (zeros, NaN, Inf, tiny and huge blocks). */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests/support/moe_fp8.h"
#include "tests/support/moe_test_kernels.h"
#include "nccl_moe.h"
#include "test_common.h"

#define CUDA_OK(call) ck_assert_msg((call) == cudaSuccess, "%s: %s", #call, cudaGetErrorString(cudaGetLastError()))

static void make_input(moe_rng_t* rng, uint16_t* x, int rows, int hidden) {
  for (int r = 0; r < rows; r++) {
    /* Each row gets its own magnitude, from tiny to huge. */
    float spread = ldexpf(1.0f, (int)moe_rng_below(rng, 200) - 100);
    int kind = (int)moe_rng_below(rng, 8);
    for (int i = 0; i < hidden; i++) {
      float v = moe_rng_normal(rng) * spread;
      if (kind == 0) v = 0.0f;                                /* all-zero row */
      if (kind == 1 && moe_rng_below(rng, 50) == 0) v = NAN;  /* scattered NaN */
      if (kind == 2 && moe_rng_below(rng, 50) == 0) v = (i & 1) ? INFINITY : -INFINITY;
      if (kind == 3) v = ldexpf(moe_rng_normal(rng), -130);   /* bf16 subnormals */
      x[(size_t)r * hidden + i] = moe_float_to_bf16(v);
    }
  }
}

static void check_quantize(int rows, int hidden, int pow2) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() + (uint64_t)rows * 31 + hidden + pow2);
  size_t n = (size_t)rows * hidden, nb = n / NCCL_MOE_FP8_BLOCK;
  uint16_t* x = malloc(n * 2);
  uint8_t *ref = malloc(n), *got = malloc(n);
  float *ref_s = malloc(nb * 4), *got_s = malloc(nb * 4);
  make_input(&rng, x, rows, hidden);
  moe_fp8_quantize_ref(x, rows, hidden, pow2, ref, ref_s);

  void *dx, *dcodes;
  float* dscales;
  CUDA_OK(cudaMalloc(&dx, n * 2));
  CUDA_OK(cudaMalloc(&dcodes, n));
  CUDA_OK(cudaMalloc((void**)&dscales, nb * 4));
  CUDA_OK(cudaMemcpy(dx, x, n * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dcodes, 0xA5, n)); /* poison */
  CUDA_OK(cudaMemset(dscales, 0xFF, nb * 4));
  CUDA_OK(moe_fp8_quantize_launch(dx, rows, hidden, pow2, dcodes, dscales, 0));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(got, dcodes, n, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got_s, dscales, nb * 4, cudaMemcpyDeviceToHost));
  for (size_t b = 0; b < nb; b++)
    ck_assert_msg(memcmp(&ref_s[b], &got_s[b], 4) == 0, "scale %zu: host %a device %a", b, ref_s[b],
                  got_s[b]);
  for (size_t i = 0; i < n; i++)
    ck_assert_msg(ref[i] == got[i], "code %zu (value %a, scale %a): host 0x%02x device 0x%02x", i,
                  moe_bf16_to_float(x[i]), ref_s[i / NCCL_MOE_FP8_BLOCK], ref[i], got[i]);
  cudaFree(dx);
  cudaFree(dcodes);
  cudaFree(dscales);
  free(x), free(ref), free(got), free(ref_s), free(got_s);
}

START_TEST(test_quantize_float_scales) {
  check_quantize(1, 128, 0);
  check_quantize(257, 7168, 0);
  check_quantize(33, 2048, 0);
}
END_TEST

START_TEST(test_quantize_pow2_scales) {
  check_quantize(3, 384, 1);
  check_quantize(129, 7168, 1);
}
END_TEST

START_TEST(test_quantize_zero_rows) {
  ck_assert_int_eq(moe_fp8_quantize_launch(NULL, 0, 7168, 0, NULL, NULL, 0), cudaSuccess);
}
END_TEST

int main(void) {
  moe_test_require_gpus(1);
  moe_test_seed();
  Suite* s = suite_create("fp8_gpu");
  TCase* tc = tcase_create("codec");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, test_quantize_float_scales);
  tcase_add_test(tc, test_quantize_pow2_scales);
  tcase_add_test(tc, test_quantize_zero_rows);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
