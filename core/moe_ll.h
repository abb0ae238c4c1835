/* SPDX-License-Identifier: Apache-2.0 */
/* Low-latency mode, host side (internal): the set-up step the comm init
 * runs, and what a handle's destruction undoes. The state types are in
 * core/moe_comm.h, the buffer layout in core/moe_config.h; the entry points
 * (ncclMoeLowLatency*) are in moe_ll.c. */
#ifndef MOE_LL_H_
#define MOE_LL_H_

#include "core/moe_comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Once comm->ctx is complete: the kernels' context, kernel preload. No-op
 * without low-latency buffers. */
ncclResult_t moe_ll_comm_init(ncclMoeComm_t comm);

/* A handle goes away: it no longer holds a buffer set's pending receive. */
void moe_ll_handle_destroy(ncclMoeHandle_t handle);

#ifdef __cplusplus
}
#endif
#endif
