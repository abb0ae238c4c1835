/* SPDX-License-Identifier: Apache-2.0 */
/* The NCCL of the caller's communicator, found at run time.
 *
 * The library does not link libnccl: an ncclComm_t works only with the NCCL
 * that created it, and the process may hold another copy than the one the
 * loader would give us (torch's wheel, an NCCL linked into the application).
 * So the few NCCL functions ncclMoeCommInit needs are looked up, once, in
 * the NCCL already loaded: an object named libnccl.so* in the link map
 * (dlopen'ed with RTLD_NOLOAD, so a copy loaded RTLD_LOCAL is found too),
 * else the global symbol scope (an NCCL linked statically). */
#ifndef MOE_NCCL_H_
#define MOE_NCCL_H_

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_NCCL_WHERE_MAX 512

typedef struct {
  ncclResult_t (*commUserRank)(const ncclComm_t comm, int* rank);
  ncclResult_t (*commCount)(const ncclComm_t comm, int* count);
  ncclResult_t (*commCuDevice)(const ncclComm_t comm, int* device);
  ncclResult_t (*allGather)(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                            ncclComm_t comm, cudaStream_t stream);
  char where[MOE_NCCL_WHERE_MAX]; /* the object's path, or "the global symbol scope" */
} moe_nccl_t;

/* The NCCL loaded in this process (resolved on the first successful call;
 * thread-safe). ncclInvalidUsage with a message when none is loaded: a later
 * call looks again. */
ncclResult_t moe_nccl_get(const moe_nccl_t** nccl_p);

/* An all-gather over ncclAllGather on `comm`, for the bootstrap
 * (moe_allgather_fn of core/moe_bootstrap.h). Set every field; `stream` is a
 * stream of the communicator's device. */
typedef struct {
  const moe_nccl_t* nccl;
  ncclComm_t comm;
  int rank, nRanks;
  cudaStream_t stream;
} moe_nccl_allgather_ctx_t;

/* send: this rank's `bytes`; recv: nRanks * bytes, rank r's at r * bytes.
 * Returns an ncclResult_t (0 = success); the message is set on failure. The
 * communicator's device must be current. */
int moe_nccl_allgather(const void* send, void* recv, size_t bytes, void* ctx);

#ifdef __cplusplus
}
#endif
#endif
