/* SPDX-License-Identifier: Apache-2.0 */
/* Launch functions of the CUDA kernels: the only way host code reaches them.
 * Each returns the launch's cudaError_t; argument checks are the caller's. */
#ifndef MOE_KERNELS_H_
#define MOE_KERNELS_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CUDA loads kernels lazily, at their first launch, and that load waits for
 * the device: a first launch while a peer's kernel spins at a barrier would
 * stall until the timeout. Comm init loads every kernel up front with this. */
static inline cudaError_t moe_preload_kernels(const void* const* kernels, size_t n) {
  for (size_t i = 0; i < n; i++) {
    struct cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, kernels[i]);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

#ifdef __cplusplus
}
#endif
#endif
