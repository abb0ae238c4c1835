/* SPDX-License-Identifier: Apache-2.0 */
/* The benchmark's gate and no-op kernels (tests/support/moe_test_kernels.h). */
#include "kernels/moe_kernels.h"
#include "tests/support/moe_test_kernels.h"

__global__ void moe_test_gate_kernel(const volatile int* flag, int value, long long timeoutNs) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    if (*flag >= value) return;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while ((long long)(now - start) < timeoutNs);
}

extern "C" cudaError_t moe_test_gate_launch(const volatile int* flag, int value, long long timeoutNs,
                                            cudaStream_t stream) {
  moe_test_gate_kernel<<<1, 1, 0, stream>>>(flag, value, timeoutNs);
  return cudaGetLastError();
}

__global__ void moe_test_noop_kernel(void) {}

extern "C" cudaError_t moe_test_noop_launch(int blocks, int threads, cudaStream_t stream) {
  moe_test_noop_kernel<<<blocks, threads, 0, stream>>>();
  return cudaGetLastError();
}

extern "C" cudaError_t moe_test_kernels_preload(void) {
  const void* kernels[] = {(const void*)moe_test_gate_kernel, (const void*)moe_test_noop_kernel};
  return moe_preload_kernels(kernels, sizeof(kernels) / sizeof(kernels[0]));
}
