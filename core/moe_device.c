/* SPDX-License-Identifier: Apache-2.0 */
#include "core/moe_device.h"

#include <cuda_runtime_api.h>

#include "common/moe_check.h"

ncclResult_t moe_device_enter(int dev, moe_device_guard_t* guard) {
  guard->dev = dev;
  if (cudaGetDevice(&guard->prev) != cudaSuccess) {
    cudaGetLastError();
    guard->prev = -1;
  }
  if (guard->prev != dev) MOE_CUDA_CHECK(cudaSetDevice(dev));
  return ncclSuccess;
}

void moe_device_leave(const moe_device_guard_t* guard) {
  if (guard->prev >= 0 && guard->prev != guard->dev) cudaSetDevice(guard->prev);
}
