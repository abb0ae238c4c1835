/* SPDX-License-Identifier: Apache-2.0 */
/* The comm's CUDA device around a call. The library links its own (static)
 * CUDA runtime, whose current device says nothing about the caller's: every
 * entry point makes the comm's device current on the way in and gives the
 * caller's back on the way out. */
#ifndef MOE_DEVICE_H_
#define MOE_DEVICE_H_

#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int prev; /* the caller's device, -1 when it could not be read */
  int dev;
} moe_device_guard_t;

/* Makes `dev` current and remembers the previous device in *guard. */
ncclResult_t moe_device_enter(int dev, moe_device_guard_t* guard);

/* Makes the device current before moe_device_enter current again. */
void moe_device_leave(const moe_device_guard_t* guard);

#ifdef __cplusplus
}
#endif
#endif
