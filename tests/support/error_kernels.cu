/* SPDX-License-Identifier: Apache-2.0 */
/* Kernels that drive the error record's device half and the one wait
 * (kernels/moe_error.h, kernels/moe_sync.cuh) for tests/gpu/test_error_record_gpu. */
#include "kernels/moe_sync.cuh"
#include "tests/support/moe_test_kernels.h"

/* Thread 0 of every block waits for *go (so the blocks and the host thread
 * start together), then records codes[k][block] into every record k. */
__global__ void moe_test_error_race_kernel(volatile int* recs, int* claims, int nRecords, const int* codes, int* won,
                                           const volatile int* go, long long timeoutNs) {
  if (threadIdx.x != 0) return;
  const long long start = moe_now_ns();
  while (*go == 0 && moe_now_ns() - start < timeoutNs) {
  }
  const int writers = gridDim.x, id = blockIdx.x;
  for (int k = 0; k < nRecords; k++) {
    const moe_error_details_t d = moe_test_error_details(id, k);
    won[(size_t)k * writers + id] = moe_error_record_kernel(&claims[k], recs + (size_t)k * MOE_ERR_WORDS,
                                                            codes[(size_t)k * writers + id], &d);
  }
}

extern "C" cudaError_t moe_test_error_race_launch(volatile int* recs, int* claims, int nRecords, const int* codes,
                                                  int* won, int blocks, const volatile int* go, long long timeoutNs,
                                                  cudaStream_t stream) {
  moe_test_error_race_kernel<<<blocks, 32, 0, stream>>>(recs, claims, nRecords, codes, won, go, timeoutNs);
  return cudaGetLastError();
}

/* Block 0 waits for flags[0] >= 7 (never written) with the comm's timeout;
 * block 1 for flags[1] >= 5 (the host writes it); every other block for
 * flags[2] >= 1 (never written) with a timeout of longTimeoutNs, so it
 * should end when block 0's timeout breaks the comm. Per block: the result,
 * the value seen, and how long the wait took. */
__global__ void moe_test_wait_kernel(moe_rank_ctx_t c, unsigned long long* flags, long long longTimeoutNs,
                                     int* ok, unsigned long long* seen, long long* elapsedNs) {
  if (threadIdx.x != 0) return;
  const int b = blockIdx.x;
  moe_rank_ctx_t mine = c;
  unsigned long long v = ~0ull;
  const long long start = moe_now_ns();
  bool r;
  if (b == 0) {
    r = moe_wait_geq(mine, flags, 7, MOE_WAIT_BARRIER, 3, MOE_WAIT_FROM_NOW, &v);
  } else if (b == 1) {
    r = moe_wait_geq(mine, flags + 1, 5, MOE_WAIT_NET, 1, MOE_WAIT_FROM_NOW, &v);
  } else {
    mine.timeoutNs = longTimeoutNs;
    r = moe_wait_geq(mine, flags + 2, 1, MOE_WAIT_LL_DATA, b, MOE_WAIT_FROM_NOW, &v);
  }
  ok[b] = r;
  seen[b] = v;
  elapsedNs[b] = moe_now_ns() - start;
}

extern "C" cudaError_t moe_test_wait_launch(const moe_rank_ctx_t* ctx, unsigned long long* flags,
                                            long long longTimeoutNs, int blocks, int* ok, unsigned long long* seen,
                                            long long* elapsedNs, cudaStream_t stream) {
  moe_test_wait_kernel<<<blocks, 32, 0, stream>>>(*ctx, flags, longTimeoutNs, ok, seen, elapsedNs);
  return cudaGetLastError();
}
