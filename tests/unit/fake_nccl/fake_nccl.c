/* SPDX-License-Identifier: Apache-2.0 */
/* A stand-in for libnccl with the four functions nccl-moe resolves at run
 * time (core/moe_nccl.c), for test_core_setup. It is built twice: as
 * libnccl.so.2 (found through the link map even when loaded RTLD_LOCAL) and
 * under a name no NCCL has (found only through the global symbol scope). The
 * comm reads as rank 1 of 2 and ncclCommCuDevice fails, so ncclMoeCommInit
 * stops before it touches CUDA. */
#include <nccl.h>

#define FAKE_NCCL_EXPORT __attribute__((visibility("default")))

FAKE_NCCL_EXPORT int fake_nccl_calls;

FAKE_NCCL_EXPORT ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  (void)comm;
  fake_nccl_calls++;
  *rank = 1;
  return ncclSuccess;
}

FAKE_NCCL_EXPORT ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  (void)comm;
  fake_nccl_calls++;
  *count = 2;
  return ncclSuccess;
}

FAKE_NCCL_EXPORT ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
  (void)comm;
  (void)device;
  fake_nccl_calls++;
  return ncclInvalidUsage;
}

FAKE_NCCL_EXPORT ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                                            ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
  (void)sendbuff, (void)recvbuff, (void)sendcount, (void)datatype, (void)comm, (void)stream;
  fake_nccl_calls++;
  return ncclInternalError;
}
