/* SPDX-License-Identifier: Apache-2.0 */
/* Stand-alone FP8 quantization of a BF16 tensor: the codec of moe_fp8.cuh as
 * a kernel (used by tests and the benchmark to make FP8 inputs). */
#include "kernels/moe_fp8.cuh"
#include "tests/support/moe_test_kernels.h"

/* Each half-warp quantizes one 128-channel block: 16 lanes x 8 values. */
__global__ void moe_fp8_quantize_kernel(const uint4* __restrict__ x, int rows, int hidden,
                                        int pow2, uint2* __restrict__ codes,
                                        float* __restrict__ scales) {
  int blocksPerRow = hidden / NCCL_MOE_FP8_BLOCK;
  long long totalBlocks = (long long)rows * blocksPerRow;
  int lane = threadIdx.x % MOE_FP8_BLOCK_LANES;
  long long group = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / MOE_FP8_BLOCK_LANES;
  long long stride = (long long)gridDim.x * blockDim.x / MOE_FP8_BLOCK_LANES;
  /* The two half-warps of a warp may leave the loop at different times, so
   * each shuffles only within its own 16 lanes. */
  unsigned mask = 0xFFFFu << (threadIdx.x & 16u);
  for (; group < totalBlocks; group += stride) {
    float scale;
    codes[group * MOE_FP8_BLOCK_LANES + lane] =
        moe_fp8_cast_block_dev(x[group * MOE_FP8_BLOCK_LANES + lane], pow2, mask, &scale);
    if (lane == 0) scales[group] = scale;
  }
}

extern "C" cudaError_t moe_fp8_quantize_launch(const void* x, int rows, int hidden, int pow2,
                                               void* codes, float* scales, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = 256;
  long long groups = (long long)rows * (hidden / NCCL_MOE_FP8_BLOCK);
  long long want = (groups * MOE_FP8_BLOCK_LANES + threads - 1) / threads;
  int grid = (int)(want < 4096 ? want : 4096);
  moe_fp8_quantize_kernel<<<grid, threads, 0, stream>>>((const uint4*)x, rows, hidden, pow2,
                                                        (uint2*)codes, scales);
  return cudaGetLastError();
}
