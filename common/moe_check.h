/* SPDX-License-Identifier: Apache-2.0 */
/* Error-propagation macros in NCCL's style: every internal function returns
 * ncclResult_t; the first place an error is detected logs it. */
#ifndef MOE_CHECK_H_
#define MOE_CHECK_H_

#include "common/moe_log.h"

#define MOE_CHECK(call)                      \
  do {                                       \
    ncclResult_t moe_res_ = (call);          \
    if (moe_res_ != ncclSuccess) return moe_res_; \
  } while (0)

#define MOE_CHECK_GOTO(call, res, label)     \
  do {                                       \
    (res) = (call);                          \
    if ((res) != ncclSuccess) goto label;    \
  } while (0)

/* CUDA runtime calls (host code that includes cuda_runtime_api.h). */
#define MOE_CUDA_CHECK(call)                                                        \
  do {                                                                              \
    cudaError_t moe_err_ = (call);                                                  \
    if (moe_err_ != cudaSuccess)                                                    \
      return MOE_ERROR(ncclUnhandledCudaError, "CUDA error in %s: %s", #call,       \
                       cudaGetErrorString(moe_err_));                               \
  } while (0)

#define MOE_CUDA_CHECK_GOTO(call, res, label)                                       \
  do {                                                                              \
    cudaError_t moe_err_ = (call);                                                  \
    if (moe_err_ != cudaSuccess) {                                                  \
      (res) = MOE_ERROR(ncclUnhandledCudaError, "CUDA error in %s: %s", #call,      \
                        cudaGetErrorString(moe_err_));                              \
      goto label;                                                                   \
    }                                                                               \
  } while (0)

#define MOE_NCCL_CHECK_GOTO(call, res, label)                                       \
  do {                                                                              \
    (res) = (call);                                                                 \
    if ((res) != ncclSuccess) {                                                     \
      MOE_ERROR((res), "NCCL error in %s: %s", #call, moe_result_str(res));     \
      goto label;                                                                   \
    }                                                                               \
  } while (0)

/* Argument checks: ncclInvalidArgument with a message naming the argument. */
#define MOE_ARG_CHECK(cond, ...)                                   \
  do {                                                             \
    if (!(cond)) return MOE_ERROR(ncclInvalidArgument, __VA_ARGS__); \
  } while (0)

#endif
