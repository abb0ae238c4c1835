/* SPDX-License-Identifier: Apache-2.0 */
/* ncclMoe layout / dispatch / combine and handles: argument checks, then the
 * kernels of kernels/intranode.cu (kernels/internode.cu across nodes) in
 * stream order. */
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdlib.h>

#include "common/moe_check.h"
#include "common/moe_log.h"
#include "core/moe_backoff.h"
#include "core/moe_comm.h"
#include "core/moe_device.h"
#include "core/moe_inter.h"
#include "core/moe_ll.h"
#include "transport/moe_transport.h"

#define MOE_DISPATCH_THREADS 512
/* Exact mode: the host waits for the counts at most this many comm timeouts
 * (the notify kernel's own waits, at most three of them across nodes, end
 * sooner with a precise error; this bounds the work before it on the
 * stream), looks at the kernel's completion every this many checks, and
 * sleeps at most this long between checks. */
#define MOE_EXACT_WAIT_TIMEOUTS 4
#define MOE_EXACT_QUERY_EVERY 64
#define MOE_EXACT_MAX_SLEEP_NS 20000
#define MOE_MAX_EXPERT_ALIGNMENT (1 << 16)
#define MOE_SEND_BF16 0
#define MOE_SEND_FP8 1

/* Thread blocks of one dispatch / combine data kernel: the call's numSMs, or
 * the comm's budget. Across nodes every block waits for peers, so the comm's
 * (co-residency checked) budget is the most. */
static int moe_call_blocks(ncclMoeComm_t comm, int numSMs) {
  if (comm->inter != NULL) return numSMs > 0 && numSMs < comm->waitBlocks ? numSMs : comm->waitBlocks;
  return numSMs > 0 ? numSMs : comm->numBlocks;
}

/* No dispatch / combine may start while a split call waits for its receive
 * half: it would reuse the receive rows or the epochs the half waits on. */
static ncclResult_t moe_no_split_pending(ncclMoeComm_t comm, const char* what) {
  const ncclMoeHandle_t h = comm->splitPending;
  if (h == NULL) return ncclSuccess;
  return MOE_ERROR(ncclInvalidUsage, "%s: a %s sent with sendOnly = 1 still waits for its receive half: enqueue "
                   "%s first", what, h->split == MOE_SPLIT_DISPATCH_SENT ? "dispatch" : "combine",
                   h->split == MOE_SPLIT_DISPATCH_SENT ? "ncclMoeDispatchRecv" : "ncclMoeCombineRecv");
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeHandleCreate(ncclMoeComm_t comm, ncclMoeHandle_t* handle_p) {
  MOE_ARG_CHECK(comm != NULL && handle_p != NULL, "ncclMoeHandleCreate: comm or handle_p is NULL");
  struct ncclMoeHandle* h = calloc(1, sizeof(*h));
  if (h == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  const int N = comm->nRanks, L = comm->numLocalExperts;
  const size_t routeInts = (size_t)comm->config.maxTokensPerRank * N + 3 * (size_t)N + 1 + L;
  const size_t ints = routeInts + (comm->inter != NULL ? moe_inter_route_ints(comm->inter) : 0);
  moe_device_guard_t guard;
  ncclResult_t res = moe_device_enter(comm->device, &guard);
  if (res != ncclSuccess) {
    free(h);
    return res;
  }
  cudaError_t e = cudaMalloc(&h->mem, ints * sizeof(int));
  moe_device_leave(&guard);
  if (e != cudaSuccess) {
    free(h);
    return MOE_ERROR(ncclUnhandledCudaError, "cannot allocate a handle: %s", cudaGetErrorString(e));
  }
  int* p = h->mem;
  h->route.pos = p;
  p += (size_t)comm->config.maxTokensPerRank * N;
  h->route.base = p;
  p += N;
  h->route.cap = p;
  p += N;
  h->route.recvCount = p;
  p += 1;
  h->route.recvPerExpert = p;
  if (comm->inter != NULL) moe_inter_route_init(comm->inter, (int*)h->mem + routeInts, &h->fwd);
  h->route.tokensPerRank = comm->tokensPerRank;
  h->route.tokensPerExpert = comm->tokensPerExpert;
  h->comm = comm;
  *handle_p = h;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t handle) {
  MOE_ARG_CHECK(handle != NULL, "ncclMoeHandleDestroy: handle is NULL");
  /* A dispatch send half left alone holds up no peer (its receive half only
   * waits), so the handle may go; a combine send half may not (its receive
   * half arrives, and the peers count on that arrival). */
  if (handle->split == MOE_SPLIT_COMBINE_SENT)
    return MOE_ERROR(ncclInvalidUsage, "ncclMoeHandleDestroy: the handle has a combine send half whose receive half "
                     "was not called (ncclMoeCombineRecv): the ranks' barrier epochs would part");
  if (handle->comm != NULL && handle->comm->splitPending == handle) handle->comm->splitPending = NULL;
  /* A send half without its receive half would leave peers waiting for this
   * rank's acknowledgement on that buffer set (unless the comm is broken:
   * then nobody waits, and the handle goes before ncclMoeCommAbort). */
  const int broken = moe_kerr_fatal(moe_error_read_host(handle->comm->hostError, NULL, NULL));
  if (!broken && (handle->ll.state == MOE_LL_DISPATCH_SENT || handle->ll.state == MOE_LL_COMBINE_SENT))
    return MOE_ERROR(ncclInvalidUsage, "ncclMoeHandleDestroy: the handle has a low-latency send half whose receive "
                     "half was not called (ncclMoeLowLatency*Recv)");
  moe_ll_handle_destroy(handle);
  cudaFree(handle->mem);
  free(handle);
  return ncclSuccess;
}

static ncclResult_t moe_dispatch_layout(ncclMoeComm_t comm, const int64_t* topkIdx, int numTokens,
                                        int topk, int* numTokensPerRank, int* numTokensPerExpert,
                                        uint8_t* isTokenInRank, cudaStream_t stream) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(numTokens >= 0 && numTokens <= comm->config.maxTokensPerRank,
                "numTokens = %d: must be in [0, config.maxTokensPerRank = %d]", numTokens, comm->config.maxTokensPerRank);
  MOE_ARG_CHECK(topk >= 1 && topk <= comm->config.maxTopk, "topk = %d: must be in [1, config.maxTopk = %d]", topk,
                comm->config.maxTopk);
  if (numTokens > 0) MOE_CHECK(moe_check_device_ptr(topkIdx, sizeof(int64_t), "topkIdx"));
  MOE_CHECK(moe_check_device_ptr(numTokensPerRank, sizeof(int), "numTokensPerRank"));
  MOE_CHECK(moe_check_device_ptr(numTokensPerExpert, sizeof(int), "numTokensPerExpert"));
  if (isTokenInRank != NULL && numTokens > 0) MOE_CHECK(moe_check_device_ptr(isTokenInRank, 1, "isTokenInRank"));
  MOE_CUDA_CHECK(moe_layout_launch(&comm->ctx, topkIdx, numTokens, topk, comm->config.numExperts,
                                   numTokensPerRank, numTokensPerExpert, isTokenInRank, NULL, stream));
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeGetDispatchLayout(ncclMoeComm_t comm, const int64_t* topkIdx, int numTokens,
                                                      int topk, int* numTokensPerRank, int* numTokensPerExpert,
                                                      uint8_t* isTokenInRank, cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeGetDispatchLayout", &guard));
  const ncclResult_t res = moe_dispatch_layout(comm, topkIdx, numTokens, topk, numTokensPerRank, numTokensPerExpert,
                                               isTokenInRank, stream);
  return moe_comm_leave(comm, stream, &guard, res);
}

static ncclResult_t moe_dispatch_check(ncclMoeComm_t comm, const ncclMoeDispatchArgs_t* a, ncclMoeHandle_t handle) {
  const ncclMoeConfig_t* c = &comm->config;
  MOE_ARG_CHECK(a != NULL, "dispatch args is NULL");
  MOE_ARG_CHECK(handle != NULL && handle->comm == comm, "handle is NULL or belongs to another comm");
  MOE_ARG_CHECK(a->xType == ncclBfloat16 || a->xType == ncclFloat8e4m3,
                "xType = %d: must be ncclBfloat16 or ncclFloat8e4m3", (int)a->xType);
  MOE_ARG_CHECK(a->sendType == ncclBfloat16 || a->sendType == ncclFloat8e4m3,
                "sendType = %d: must be ncclBfloat16 or ncclFloat8e4m3", (int)a->sendType);
  MOE_ARG_CHECK(!(a->xType == ncclFloat8e4m3 && a->sendType == ncclBfloat16), "FP8 x must be sent as FP8");
  MOE_ARG_CHECK(a->scaleFormat == ncclMoeScaleFloat || a->scaleFormat == ncclMoeScalePow2,
                "scaleFormat = %d: unknown", (int)a->scaleFormat);
  MOE_ARG_CHECK(a->numTokens >= 0 && a->numTokens <= c->maxTokensPerRank,
                "numTokens = %d: must be in [0, config.maxTokensPerRank = %d]", a->numTokens, c->maxTokensPerRank);
  MOE_ARG_CHECK(a->hidden >= 1 && a->hidden <= c->hidden, "hidden = %d: must be in [1, config.hidden = %d]",
                a->hidden, c->hidden);
  int fp8 = a->xType == ncclFloat8e4m3 || a->sendType == ncclFloat8e4m3;
  MOE_ARG_CHECK(!fp8 || a->hidden % NCCL_MOE_FP8_BLOCK == 0, "hidden = %d: FP8 needs a multiple of %d", a->hidden,
                NCCL_MOE_FP8_BLOCK);
  MOE_ARG_CHECK(a->hidden % 8 == 0, "hidden = %d: BF16 rows must be a multiple of 8 channels (16 bytes)", a->hidden);
  MOE_ARG_CHECK(a->topk >= 1 && a->topk <= c->maxTopk, "topk = %d: must be in [1, config.maxTopk = %d]", a->topk,
                c->maxTopk);
  MOE_ARG_CHECK(a->capacity >= 0 && a->capacity <= comm->maxRecv,
                "capacity = %d: must be 0 (exact mode) or in [1, config.maxRecvTokens = %d]", a->capacity, comm->maxRecv);
  MOE_ARG_CHECK(a->expertAlignment >= 0 && a->expertAlignment <= MOE_MAX_EXPERT_ALIGNMENT,
                "expertAlignment = %d: must be in [0, %d]", a->expertAlignment, MOE_MAX_EXPERT_ALIGNMENT);
  MOE_ARG_CHECK(a->scaleLayout == ncclMoeScaleRowMajor || a->scaleLayout == ncclMoeScaleColMajor,
                "scaleLayout = %d: must be ncclMoeScaleRowMajor or ncclMoeScaleColMajor", (int)a->scaleLayout);
  MOE_ARG_CHECK(a->sendOnly == 0 || a->sendOnly == 1, "sendOnly = %d: must be 0 or 1", a->sendOnly);
  MOE_ARG_CHECK(a->numSMs >= 0 && a->numSMs <= NCCL_MOE_MAX_CALL_SMS,
                "numSMs = %d: must be in [0, %d] (0 = the comm's)", a->numSMs, NCCL_MOE_MAX_CALL_SMS);
  if (a->sendOnly && comm->inter != NULL)
    return MOE_ERROR(ncclInvalidUsage, "sendOnly: split dispatch halves are not supported across nodes (this comm "
                     "spans nodes)");
  if (fp8 && a->scaleLayout == ncclMoeScaleColMajor) {
    if (comm->inter != NULL)
      return MOE_ERROR(ncclInvalidArgument, "scaleLayout = ncclMoeScaleColMajor is not supported across nodes (this "
                       "comm spans nodes): use row-major scales");
    /* The padded columns must fit in the comm's scale rows. */
    const long long need = (long long)(a->hidden / NCCL_MOE_FP8_BLOCK) *
                           moe_scale_token_stride(a->capacity > 0 ? a->capacity : comm->maxRecv);
    const long long have = (long long)comm->maxRecv * ((c->hidden + NCCL_MOE_FP8_BLOCK - 1) / NCCL_MOE_FP8_BLOCK);
    MOE_ARG_CHECK(need <= have, "scaleLayout = ncclMoeScaleColMajor: %lld scales (rows padded to a multiple of %d) "
                  "do not fit the comm's %lld: make config.maxRecvTokens (%d) a multiple of %d", need,
                  NCCL_MOE_SCALE_TOKEN_ALIGN, have, comm->maxRecv, NCCL_MOE_SCALE_TOKEN_ALIGN);
  }
  if (a->reuseHandle) {
    MOE_ARG_CHECK(handle->valid, "reuseHandle = 1 but the handle holds no routing (no dispatch filled it)");
    MOE_ARG_CHECK(handle->numTokens == a->numTokens && handle->capacity == a->capacity &&
                      handle->hidden == a->hidden && handle->topk == a->topk,
                  "reuseHandle = 1 but numTokens/capacity/hidden/topk differ from the dispatch that filled the handle");
  }
  if (a->numTokens > 0) {
    MOE_CHECK(moe_check_device_ptr(a->x, NCCL_MOE_ALIGN, "x"));
    if (a->xType == ncclFloat8e4m3) MOE_CHECK(moe_check_device_ptr(a->xScales, sizeof(float), "xScales"));
    MOE_CHECK(moe_check_device_ptr(a->topkIdx, sizeof(int64_t), "topkIdx"));
    if (a->topkWeights != NULL) MOE_CHECK(moe_check_device_ptr(a->topkWeights, sizeof(float), "topkWeights"));
  }
  return ncclSuccess;
}

static unsigned int moe_exact_seq_seen(ncclMoeComm_t comm) {
  return (unsigned int)__atomic_load_n(&comm->hostCounts[MOE_HOST_SEQ], __ATOMIC_ACQUIRE);
}

/* Exact mode: waits until the notify kernel published this dispatch's
 * counts (sequence number `seq`), and for nothing else on the stream. A
 * fatal error of the comm (a peer's timeout, the proxy) ends the wait early
 * with that error, and so does the kernel's end without them (a fault). */
static ncclResult_t moe_exact_wait(ncclMoeComm_t comm, unsigned int seq) {
  const uint64_t limitNs = (uint64_t)MOE_EXACT_WAIT_TIMEOUTS * (uint64_t)comm->config.timeoutMs * 1000000ull;
  const uint64_t start = moe_net_now_ns();
  moe_backoff_t backoff;
  moe_backoff_init(&backoff, MOE_EXACT_MAX_SLEEP_NS);
  for (unsigned int i = 1;; i++) {
    if (moe_exact_seq_seen(comm) == seq) return ncclSuccess;
    MOE_CHECK(moe_comm_ready(comm));
    if (i % MOE_EXACT_QUERY_EVERY == 0) {
      const cudaError_t e = cudaEventQuery(comm->notified);
      if (e == cudaSuccess) {
        /* The kernel ended: it published first, or it stopped early. */
        if (moe_exact_seq_seen(comm) == seq) return ncclSuccess;
        MOE_CHECK(moe_comm_ready(comm));
        return MOE_ERROR(ncclInternalError, "rank %d: exact-mode dispatch: the notify kernel ended without "
                         "publishing the receive counts", comm->rank);
      }
      if (e != cudaErrorNotReady)
        return MOE_ERROR(ncclUnhandledCudaError, "rank %d: exact-mode dispatch: waiting for the receive counts: %s",
                         comm->rank, cudaGetErrorString(e));
      if (moe_net_now_ns() - start > limitNs)
        return MOE_ERROR(ncclSystemError, "rank %d: exact-mode dispatch: the receive counts did not arrive within "
                         "%d x %d ms (the comm's timeout): the work before the dispatch on its stream did not finish",
                         comm->rank, MOE_EXACT_WAIT_TIMEOUTS, comm->config.timeoutMs);
    }
    moe_backoff_wait(&backoff);
  }
}

static ncclResult_t moe_dispatch(ncclMoeComm_t comm, const ncclMoeDispatchArgs_t* args,
                                 ncclMoeHandle_t handle, ncclMoeDispatchResult_t* result_p,
                                 cudaStream_t stream) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(result_p != NULL, "result_p is NULL");
  MOE_CHECK(moe_no_split_pending(comm, "ncclMoeDispatch"));
  MOE_CHECK(moe_dispatch_check(comm, args, handle));
  const ncclMoeDispatchArgs_t* a = args;
  const int exact = a->capacity == 0;
  if (exact) {
    enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
      return MOE_ERROR(ncclInvalidUsage, "exact mode (capacity = 0) waits on the host for the receive count and "
                       "cannot be captured in a CUDA graph: pass a capacity > 0");
  }
  const int sendFp8 = a->sendType == ncclFloat8e4m3;
  const int scaleTokenStride = sendFp8 && a->scaleLayout == ncclMoeScaleColMajor
                                   ? moe_scale_token_stride(exact ? comm->maxRecv : a->capacity) : 0;
  moe_route_t* rt = &handle->route;

  const moe_net_ctx_t* net = comm->inter != NULL ? &comm->inter->net : NULL;
  handle->valid = 0;
  if (!a->reuseHandle) {
    MOE_CUDA_CHECK(moe_layout_launch(&comm->ctx, a->topkIdx, a->numTokens, a->topk, comm->config.numExperts,
                                     rt->tokensPerRank, rt->tokensPerExpert, NULL, rt->pos, stream));
    if (net != NULL) MOE_CUDA_CHECK(moe_inter_layout_launch(&comm->ctx, net, rt, &handle->fwd, a->numTokens, stream));
  }
  moe_notify_args_t n = {.notify = !a->reuseHandle,
                         .capacity = exact ? comm->maxRecv : a->capacity,
                         .hidden = a->hidden,
                         .sendType = sendFp8 ? MOE_SEND_FP8 : MOE_SEND_BF16,
                         .topk = a->topk,
                         .expertAlignment = a->expertAlignment > 0 ? a->expertAlignment : 1};
  if (exact) {
    if (++comm->exactSeq == 0) comm->exactSeq = 1; /* 0 is the word's initial value */
    n.hostCounts = comm->devHostCounts;
    n.hostSeq = comm->exactSeq;
  }
  /* A reused handle still needs the node's barrier: no rank writes into a
   * peer's receive rows before the peer is done with the previous ones. */
  if (net == NULL || !n.notify) MOE_CUDA_CHECK(moe_notify_launch(&comm->ctx, rt, &n, stream));
  else MOE_CUDA_CHECK(moe_inter_notify_launch(&comm->ctx, net, rt, &handle->fwd, &n, stream));
  comm->splitUnmatched = 0; /* notify is a whole barrier: every peer is past its last arrival */
  if (exact) {
    MOE_CUDA_CHECK(cudaEventRecord(comm->notified, stream));
    MOE_CHECK(moe_exact_wait(comm, comm->exactSeq));
  }
  moe_dispatch_args_t d = {.x = a->x, .xScales = a->xScales, .topkIdx = a->topkIdx, .topkWeights = a->topkWeights,
                           .numTokens = a->numTokens, .hidden = a->hidden, .topk = a->topk,
                           .xIsFp8 = a->xType == ncclFloat8e4m3, .sendFp8 = sendFp8,
                           .pow2Scales = a->scaleFormat == ncclMoeScalePow2,
                           .numBlocks = moe_call_blocks(comm, a->numSMs),
                           .threads = MOE_DISPATCH_THREADS,
                           .arriveOnly = a->sendOnly,
                           .scaleColMajor = scaleTokenStride > 0};
  if (net == NULL) MOE_CUDA_CHECK(moe_dispatch_launch(&comm->ctx, rt, &d, stream));
  else MOE_CUDA_CHECK(moe_inter_dispatch_launch(&comm->ctx, net, rt, &handle->fwd, &d, stream));
  if (a->sendOnly) {
    handle->split = MOE_SPLIT_DISPATCH_SENT;
    comm->splitPending = handle;
  }

  handle->valid = 1;
  const int numRecv = exact ? comm->hostCounts[MOE_HOST_RECV] : -1;
  handle->numRecv = numRecv;
  handle->numTokens = a->numTokens;
  handle->capacity = a->capacity;
  handle->hidden = a->hidden;
  handle->topk = a->topk;
  char* buf = comm->buffer;
  ncclMoeDispatchResult_t r = {
      .recvX = buf + comm->layout.recvX,
      .recvScales = sendFp8 ? (float*)(buf + comm->layout.recvScales) : NULL,
      .recvTopkIdx = (int64_t*)(buf + comm->layout.recvTopkIdx),
      .recvTopkWeights = a->topkWeights != NULL ? (float*)(buf + comm->layout.recvTopkWeights) : NULL,
      .recvCount = rt->recvCount,
      .recvTokensPerExpert = rt->recvPerExpert,
      .numRecv = exact ? (numRecv < comm->maxRecv ? numRecv : comm->maxRecv) : -1,
      .hostRecvTokensPerExpert = exact ? comm->hostCounts + MOE_HOST_EXPERTS : NULL,
      .scaleTokenStride = scaleTokenStride};
  *result_p = r;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeDispatch(ncclMoeComm_t comm, const ncclMoeDispatchArgs_t* args,
                                             ncclMoeHandle_t handle, ncclMoeDispatchResult_t* result_p,
                                             cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeDispatch", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_dispatch(comm, args, handle, result_p, stream));
}

static ncclResult_t moe_dispatch_recv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(handle != NULL && handle->comm == comm, "handle is NULL or belongs to another comm");
  if (handle->split != MOE_SPLIT_DISPATCH_SENT)
    return MOE_ERROR(ncclInvalidUsage, "ncclMoeDispatchRecv: the handle holds no dispatch sent with sendOnly = 1 "
                     "and not yet received");
  MOE_CUDA_CHECK(moe_split_wait_launch(&comm->ctx, stream));
  handle->split = MOE_SPLIT_NONE;
  comm->splitPending = NULL;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeDispatchRecv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeDispatchRecv", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_dispatch_recv(comm, handle, stream));
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeGetCombineBuffer(ncclMoeComm_t comm, void** buffer_p, size_t* bytes_p) {
  MOE_ARG_CHECK(comm != NULL && buffer_p != NULL, "ncclMoeGetCombineBuffer: comm or buffer_p is NULL");
  *buffer_p = comm->buffer + comm->layout.combineX;
  if (bytes_p != NULL) *bytes_p = (size_t)comm->maxRecv * comm->config.hidden * 2;
  return ncclSuccess;
}

static ncclResult_t moe_combine(ncclMoeComm_t comm, const ncclMoeCombineArgs_t* args,
                                ncclMoeHandle_t handle, cudaStream_t stream) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(args != NULL, "combine args is NULL");
  MOE_CHECK(moe_no_split_pending(comm, "ncclMoeCombine"));
  MOE_ARG_CHECK(handle != NULL && handle->comm == comm, "handle is NULL or belongs to another comm");
  MOE_ARG_CHECK(handle->valid, "the handle holds no routing: pass the handle of a dispatch");
  const ncclMoeCombineArgs_t* a = args;
  MOE_ARG_CHECK(a->hidden == handle->hidden, "hidden = %d: the dispatch of this handle used %d", a->hidden,
                handle->hidden);
  /* An exact-mode dispatch that received nothing has no rows to read: x and
   * topkWeights are then never dereferenced (NULL allowed). */
  const int noRows = handle->numRecv == 0;
  if (!noRows) MOE_CHECK(moe_check_device_ptr(a->x, NCCL_MOE_ALIGN, "x"));
  if (handle->numTokens > 0) MOE_CHECK(moe_check_device_ptr(a->out, NCCL_MOE_ALIGN, "out"));
  if (a->topkWeights != NULL) {
    if (!noRows) MOE_CHECK(moe_check_device_ptr(a->topkWeights, sizeof(float), "topkWeights"));
    MOE_ARG_CHECK(a->outTopkWeights != NULL, "topkWeights given but outTopkWeights is NULL");
    if (handle->numTokens > 0) MOE_CHECK(moe_check_device_ptr(a->outTopkWeights, sizeof(float), "outTopkWeights"));
  }
  MOE_ARG_CHECK(a->sendOnly == 0 || a->sendOnly == 1, "sendOnly = %d: must be 0 or 1", a->sendOnly);
  MOE_ARG_CHECK(a->numSMs >= 0 && a->numSMs <= NCCL_MOE_MAX_CALL_SMS,
                "numSMs = %d: must be in [0, %d] (0 = the comm's)", a->numSMs, NCCL_MOE_MAX_CALL_SMS);
  if (a->sendOnly && comm->inter != NULL)
    return MOE_ERROR(ncclInvalidUsage, "sendOnly: split combine halves are not supported across nodes (this comm "
                     "spans nodes)");
  if (a->bias0 != NULL || a->bias1 != NULL) {
    if (comm->inter != NULL)
      return MOE_ERROR(ncclInvalidArgument, "bias0 / bias1 are not supported across nodes yet (this comm spans "
                       "nodes): add the bias to out after the combine");
    if (handle->numTokens > 0 && a->bias0 != NULL) MOE_CHECK(moe_check_device_ptr(a->bias0, NCCL_MOE_ALIGN, "bias0"));
    if (handle->numTokens > 0 && a->bias1 != NULL) MOE_CHECK(moe_check_device_ptr(a->bias1, NCCL_MOE_ALIGN, "bias1"));
  }
  moe_route_t* rt = &handle->route;
  const void* combineX = comm->buffer + comm->layout.combineX;
  const int zeroCopy = a->x == combineX || (noRows && a->x == NULL);
  /* A split half, or any combine after a split receive half (which arrived
   * without waiting), first waits until every peer has finished reading this
   * rank's previous combine rows: the stage below overwrites them. */
  if (a->sendOnly || comm->splitUnmatched) MOE_CUDA_CHECK(moe_split_wait_launch(&comm->ctx, stream));
  if (!zeroCopy || a->topkWeights != NULL)
    MOE_CUDA_CHECK(moe_combine_stage_launch(&comm->ctx, rt, zeroCopy ? NULL : a->x, a->topkWeights, a->hidden,
                                            handle->topk, stream));
  moe_combine_args_t c = {.out = a->out, .outTopkWeights = a->outTopkWeights, .numTokens = handle->numTokens,
                          .hidden = a->hidden, .topk = handle->topk, .withWeights = a->topkWeights != NULL,
                          .numBlocks = moe_call_blocks(comm, a->numSMs),
                          .threads = MOE_DISPATCH_THREADS,
                          .bias0 = a->bias0, .bias1 = a->bias1};
  if (a->sendOnly) { /* announce the staged rows; ncclMoeCombineRecv reduces */
    MOE_CUDA_CHECK(moe_split_arrive_launch(&comm->ctx, stream));
    c.arriveOnly = 1;
    handle->splitCombine = c;
    handle->split = MOE_SPLIT_COMBINE_SENT;
    comm->splitPending = handle;
    return ncclSuccess;
  }
  moe_notify_args_t barrier = {.notify = 0};
  MOE_CUDA_CHECK(moe_notify_launch(&comm->ctx, rt, &barrier, stream));
  if (comm->inter == NULL) MOE_CUDA_CHECK(moe_combine_launch(&comm->ctx, rt, &c, stream));
  else MOE_CUDA_CHECK(moe_inter_combine_launch(&comm->ctx, &comm->inter->net, rt, &handle->fwd, &c, stream));
  comm->splitUnmatched = 0; /* the combine ended with a whole barrier */
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCombine(ncclMoeComm_t comm, const ncclMoeCombineArgs_t* args,
                                            ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeCombine", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_combine(comm, args, handle, stream));
}

static ncclResult_t moe_combine_recv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(handle != NULL && handle->comm == comm, "handle is NULL or belongs to another comm");
  if (handle->split != MOE_SPLIT_COMBINE_SENT)
    return MOE_ERROR(ncclInvalidUsage, "ncclMoeCombineRecv: the handle holds no combine sent with sendOnly = 1 "
                     "and not yet received");
  /* Every peer has staged its rows (arrived after its stage), then pull. */
  MOE_CUDA_CHECK(moe_split_wait_launch(&comm->ctx, stream));
  MOE_CUDA_CHECK(moe_combine_launch(&comm->ctx, &handle->route, &handle->splitCombine, stream));
  handle->split = MOE_SPLIT_NONE;
  comm->splitPending = NULL;
  comm->splitUnmatched = 1;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCombineRecv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeCombineRecv", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_combine_recv(comm, handle, stream));
}
