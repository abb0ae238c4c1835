/* SPDX-License-Identifier: Apache-2.0 */
/* Our own declarations of NCCL's net-plugin device-offload types (shared by
 * every net ABI version from v7 on). We never offload to the device: the
 * plugin reports NCCL_NET_DEVICE_HOST and leaves the device-handle pointers
 * NCCL passes to connect/accept untouched. */
#ifndef NCCL_MOE_NET_DEVICE_H_
#define NCCL_MOE_NET_DEVICE_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Layout pins usable from C and C++ translation units. */
#ifdef __cplusplus
#define NCCL_MOE_ABI_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define NCCL_MOE_ABI_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

#define NCCL_NET_DEVICE_INVALID_VERSION 0x0

typedef enum { NCCL_NET_DEVICE_HOST = 0, NCCL_NET_DEVICE_UNPACK = 1 } ncclNetDeviceType;

typedef struct {
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
  void* handle;
  size_t size;
  int needsProxyProgress;
} ncclNetDeviceHandle_v7_t;

typedef ncclNetDeviceHandle_v7_t ncclNetDeviceHandle_v8_t;
typedef ncclNetDeviceHandle_v7_t ncclNetDeviceHandle_v9_t;
typedef ncclNetDeviceHandle_v7_t ncclNetDeviceHandle_v10_t;
typedef ncclNetDeviceHandle_v7_t ncclNetDeviceHandle_v11_t;

/* Layout pins (LP64: x86-64 and aarch64 Linux, the only targets NCCL ships). */
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetDeviceType) == 4, "ncclNetDeviceType must be an int-sized enum");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetDeviceHandle_v7_t, netDeviceVersion) == 4, "device handle layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetDeviceHandle_v7_t, handle) == 8, "device handle layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetDeviceHandle_v7_t, size) == 16, "device handle layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetDeviceHandle_v7_t, needsProxyProgress) == 24, "device handle layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetDeviceHandle_v7_t) == 32, "device handle size");

#ifdef __cplusplus
}
#endif
#endif
