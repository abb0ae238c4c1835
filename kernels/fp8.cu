/* Stand-alone FP8 quantization of a BF16 tensor: the codec of moe_fp8.cuh as
 * a kernel (used by tests and the benchmark to make FP8 inputs). */
#include "moe_fp8.cuh"
#include "moe_kernels.h"

/* Each half-warp quantizes one 128-channel block: 16 lanes x 8 values. */
#define MOE_FP8_LANES_PER_BLOCK (NCCL_MOE_FP8_BLOCK / 8)

__global__ void moe_fp8_quantize_kernel(const uint4* __restrict__ x, int rows, int hidden,
                                        int pow2, uint2* __restrict__ codes,
                                        float* __restrict__ scales) {
  int blocksPerRow = hidden / NCCL_MOE_FP8_BLOCK;
  long long totalBlocks = (long long)rows * blocksPerRow;
  int lane = threadIdx.x % MOE_FP8_LANES_PER_BLOCK;
  long long group = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / MOE_FP8_LANES_PER_BLOCK;
  long long stride = (long long)gridDim.x * blockDim.x / MOE_FP8_LANES_PER_BLOCK;
  /* The two half-warps of a warp may leave the loop at different times, so
   * each shuffles only within its own 16 lanes. */
  unsigned mask = 0xFFFFu << (threadIdx.x & 16u);
  for (; group < totalBlocks; group += stride) {
    uint4 v = x[group * MOE_FP8_LANES_PER_BLOCK + lane];
    float amax = moe_bf16x8_amax(v);
#pragma unroll
    for (int m = MOE_FP8_LANES_PER_BLOCK / 2; m > 0; m >>= 1)
      amax = fmaxf(amax, __shfl_xor_sync(mask, amax, m, MOE_FP8_LANES_PER_BLOCK));
    float scale = moe_fp8_block_scale_dev(amax, pow2);
    codes[group * MOE_FP8_LANES_PER_BLOCK + lane] = moe_fp8_encode8_dev(v, 1.0f / scale);
    if (lane == 0) scales[group] = scale;
  }
}

extern "C" cudaError_t moe_fp8_quantize_launch(const void* x, int rows, int hidden, int pow2,
                                               void* codes, float* scales, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = 256;
  long long groups = (long long)rows * (hidden / NCCL_MOE_FP8_BLOCK);
  long long want = (groups * MOE_FP8_LANES_PER_BLOCK + threads - 1) / threads;
  int grid = (int)(want < 4096 ? want : 4096);
  moe_fp8_quantize_kernel<<<grid, threads, 0, stream>>>((const uint4*)x, rows, hidden, pow2,
                                                        (uint2*)codes, scales);
  return cudaGetLastError();
}
