/* SPDX-License-Identifier: Apache-2.0 */
/* What every version of NCCL's net-plugin ABI shares (net_v*.h): handle
 * size, request bound, pointer types. See net.h. */
#ifndef NCCL_MOE_NET_BASE_H_
#define NCCL_MOE_NET_BASE_H_

#include <stddef.h>
#include <stdint.h>

#include "nccl_net/nccl_common.h"
#include "nccl_net/net_device.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The largest opaque connection handle NCCL exchanges between ranks. */
#define NCCL_NET_HANDLE_MAXSIZE 128
/* NCCL never has more than this many requests in flight on one comm. */
#define NCCL_NET_MAX_REQUESTS 32
/* NCCL's own upper bound for a single transfer (1 TiB). */
#define NCCL_MAX_NET_SIZE_BYTES (1ull << 40)
/* Virtual NICs merge at most this many physical devices. */
#define NCCL_NET_MAX_DEVS_PER_NIC 4

/* Memory types for regMr and bits of ncclNetProperties_*.ptrSupport. */
#define NCCL_PTR_HOST 0x1
#define NCCL_PTR_CUDA 0x2
#define NCCL_PTR_DMABUF 0x4

#define NCCL_NET_TRAFFIC_CLASS_UNDEF (-1)

#ifdef __cplusplus
}
#endif

#endif
