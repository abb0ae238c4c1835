/* SPDX-License-Identifier: Apache-2.0 */
/* Low-latency dispatch / combine: argument and call-order checks, then the
 * kernels of kernels/lowlatency.cu (the buffer layout is in moe_config.c).
 * Nothing here waits for the GPU, so every call can be captured in a CUDA
 * graph. */
#include "core/moe_ll.h"

#include <cuda_runtime_api.h>
#include <stdint.h>
#include <string.h>

#include "common/moe_check.h"
#include "common/moe_log.h"
#include "core/moe_config.h"
#include "core/moe_device.h"

#define MOE_LL_UE8M0_PER_WORD 4

ncclResult_t moe_ll_comm_init(ncclMoeComm_t comm) {
  moe_ll_ctx_t* c = &comm->ll.ctx;
  if (c->l.bytes == 0) return ncclSuccess;
  c->rc = comm->ctx;
  c->numExperts = comm->config.numExperts;
  c->maxTokens = comm->config.llMaxTokensPerRank;
  c->maxTopk = comm->config.maxTopk;
  c->rowBytes = comm->config.hidden * 2;
  /* Every rank on this node until the internode set-up names the others. */
  memset(&c->net, 0, sizeof(c->net));
  for (int r = 0; r < NCCL_MOE_MAX_RANKS; r++) c->net.slot[r] = -1;
  MOE_CUDA_CHECK(moe_ll_preload());
  MOE_INFO(NCCL_INIT, "rank %d: %zu bytes of low-latency buffers (2 sets, %d tokens/rank)", comm->rank, c->l.bytes,
           c->maxTokens);
  return ncclSuccess;
}

void moe_ll_handle_destroy(ncclMoeHandle_t handle) {
  for (int b = 0; b < MOE_LL_SETS; b++)
    if (handle->comm != NULL && handle->comm->ll.pending[b] == handle) handle->comm->ll.pending[b] = NULL;
}

/* ------------------------------------------------------------ checks */
static ncclResult_t moe_ll_ready(ncclMoeComm_t comm, ncclMoeHandle_t handle) {
  MOE_CHECK(moe_comm_ready(comm));
  MOE_ARG_CHECK(comm->ll.ctx.l.bytes > 0,
                "this comm has no low-latency buffers: set config.llMaxTokensPerRank > 0 at init");
  MOE_ARG_CHECK(handle != NULL && handle->comm == comm, "handle is NULL or belongs to another comm");
  /* Mapped peers get peer stores, the others go through the low-latency proxy. */
  for (int r = 0; r < comm->nRanks; r++)
    if (comm->ctx.peers.base[r] == NULL && comm->ll.ctx.net.slot[r] < 0)
      return MOE_ERROR(ncclInternalError, "rank %d: rank %d is neither mapped nor reached by the network", comm->rank, r);
  return ncclSuccess;
}

static ncclResult_t moe_ll_dispatch_check(ncclMoeComm_t comm, const ncclMoeLowLatencyDispatchArgs_t* a,
                                          ncclMoeHandle_t handle) {
  const ncclMoeConfig_t* c = &comm->config;
  MOE_ARG_CHECK(a != NULL, "low-latency dispatch args is NULL");
  MOE_ARG_CHECK(a->numTokens >= 0 && a->numTokens <= c->llMaxTokensPerRank,
                "numTokens = %d: must be in [0, config.llMaxTokensPerRank = %d]", a->numTokens,
                c->llMaxTokensPerRank);
  MOE_ARG_CHECK(a->sendType == ncclBfloat16 || a->sendType == ncclFloat8e4m3,
                "sendType = %d: must be ncclFloat8e4m3 or ncclBfloat16", (int)a->sendType);
  const int fp8 = a->sendType == ncclFloat8e4m3;
  MOE_ARG_CHECK(!fp8 || a->scaleFormat == ncclMoeScaleFloat || a->scaleFormat == ncclMoeScalePow2 ||
                    a->scaleFormat == ncclMoeScaleUE8M0,
                "scaleFormat = %d: must be ncclMoeScaleFloat, ncclMoeScalePow2 or ncclMoeScaleUE8M0",
                (int)a->scaleFormat);
  MOE_ARG_CHECK(a->hidden >= 1 && a->hidden <= c->hidden, "hidden = %d: must be in [1, config.hidden = %d]",
                a->hidden, c->hidden);
  MOE_ARG_CHECK(!fp8 || a->hidden % NCCL_MOE_FP8_BLOCK == 0, "hidden = %d: FP8 needs a multiple of %d",
                a->hidden, NCCL_MOE_FP8_BLOCK);
  MOE_ARG_CHECK(a->hidden % 8 == 0, "hidden = %d: BF16 rows must be a multiple of 8 channels (16 bytes)", a->hidden);
  MOE_ARG_CHECK(a->topk >= 1 && a->topk <= c->maxTopk, "topk = %d: must be in [1, config.maxTopk = %d]", a->topk,
                c->maxTopk);
  MOE_ARG_CHECK(a->sendOnly == 0 || a->sendOnly == 1, "sendOnly = %d: must be 0 or 1", a->sendOnly);
  if (a->numTokens > 0) {
    MOE_CHECK(moe_check_device_ptr(a->x, NCCL_MOE_ALIGN, "x"));
    MOE_CHECK(moe_check_device_ptr(a->topkIdx, sizeof(int64_t), "topkIdx"));
  }
  if (a->cumulativeRecvCount != NULL)
    MOE_CHECK(moe_check_device_ptr(a->cumulativeRecvCount, sizeof(int64_t), "cumulativeRecvCount"));
  if (a->cumulativeRecvCount32 != NULL)
    MOE_CHECK(moe_check_device_ptr(a->cumulativeRecvCount32, sizeof(int), "cumulativeRecvCount32"));
  MOE_ARG_CHECK(a->scaleLayout == ncclMoeScaleRowMajor || a->scaleLayout == ncclMoeScaleColMajor,
                "scaleLayout = %d: must be ncclMoeScaleRowMajor or ncclMoeScaleColMajor", (int)a->scaleLayout);
  if (handle->ll.state == MOE_LL_DISPATCH_SENT || handle->ll.state == MOE_LL_COMBINE_SENT)
    return MOE_ERROR(ncclInvalidUsage, "the handle's previous low-latency call has a receive half not yet enqueued "
                                       "(ncclMoeLowLatencyDispatchRecv / ...CombineRecv)");
  const int set = comm->ll.nextSet;
  if (comm->ll.pending[set] != NULL)
    return MOE_ERROR(ncclInvalidUsage,
                     "buffer set %d is still waiting for the receive half of the call two dispatches ago: "
                     "enqueue it before this dispatch", set);
  return ncclSuccess;
}

/* ---------------------------------------------------------- launches */
/* The kernels' context, with the comm's current peer table and error word. */
static const moe_ll_ctx_t* moe_ll_ctx(ncclMoeComm_t comm) {
  comm->ll.ctx.rc = comm->ctx;
  return &comm->ll.ctx;
}

/* The send halves (with args->fused, both halves in one kernel). */
static ncclResult_t moe_ll_send(ncclMoeComm_t comm, int op, const moe_ll_args_t* a, cudaStream_t stream) {
  const moe_ll_ctx_t* c = moe_ll_ctx(comm);
  if (op == MOE_LL_OP_DISPATCH) MOE_CUDA_CHECK(moe_ll_dispatch_send_launch(c, a, stream));
  else MOE_CUDA_CHECK(moe_ll_combine_send_launch(c, a, stream));
  return ncclSuccess;
}

static void moe_ll_args(ncclMoeComm_t comm, const moe_ll_handle_t* h, moe_ll_args_t* a) {
  memset(a, 0, sizeof(*a));
  a->set = h->set;
  a->numTokens = h->numTokens;
  a->hidden = h->hidden;
  a->topk = h->topk;
  a->sendFp8 = h->sendFp8;
  a->scaleFormat = h->scaleFormat;
  a->cumulative = h->cumulative;
  a->cumulative32 = h->cumulative32;
  a->scaleTokenStride = h->scaleTokenStride;
  a->weights = h->weights;
  a->out = h->out;
  a->numBlocks = comm->waitBlocks;
}

static ncclResult_t moe_ll_dispatch_recv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_ll_args_t a;
  moe_ll_args(comm, &handle->ll, &a);
  MOE_CUDA_CHECK(moe_ll_dispatch_recv_launch(moe_ll_ctx(comm), &a, stream));
  comm->ll.pending[handle->ll.set] = NULL;
  handle->ll.state = MOE_LL_DISPATCHED;
  return ncclSuccess;
}

static ncclResult_t moe_ll_combine_recv(ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_ll_args_t a;
  moe_ll_args(comm, &handle->ll, &a);
  MOE_CUDA_CHECK(moe_ll_combine_recv_launch(moe_ll_ctx(comm), &a, stream));
  comm->ll.pending[handle->ll.set] = NULL;
  handle->ll.state = MOE_LL_DISPATCHED;
  return ncclSuccess;
}

/* ------------------------------------------------------------ public API */
static ncclResult_t moe_ll_dispatch(ncclMoeComm_t comm, const ncclMoeLowLatencyDispatchArgs_t* args,
                                    ncclMoeHandle_t handle,
                                    ncclMoeLowLatencyDispatchResult_t* result_p,
                                    cudaStream_t stream) {
  MOE_CHECK(moe_ll_ready(comm, handle));
  MOE_ARG_CHECK(result_p != NULL, "result_p is NULL");
  MOE_CHECK(moe_ll_dispatch_check(comm, args, handle));
  const ncclMoeLowLatencyDispatchArgs_t* d = args;
  moe_ll_comm_t* ll = &comm->ll;
  const int set = ll->nextSet;
  const int fp8 = d->sendType == ncclFloat8e4m3;
  const int scaleFormat = !fp8 ? MOE_LL_SCALE_FLOAT
                          : d->scaleFormat == ncclMoeScaleUE8M0 ? MOE_LL_SCALE_UE8M0
                          : d->scaleFormat == ncclMoeScalePow2 ? MOE_LL_SCALE_POW2 : MOE_LL_SCALE_FLOAT;
  moe_ll_args_t a;
  memset(&a, 0, sizeof(a));
  a.set = set;
  a.x = d->x;
  a.topkIdx = d->topkIdx;
  a.numTokens = d->numTokens;
  a.hidden = d->hidden;
  a.topk = d->topk;
  a.sendFp8 = fp8;
  a.scaleFormat = scaleFormat;
  a.numBlocks = comm->waitBlocks;
  a.cumulative = d->cumulativeRecvCount;
  a.cumulative32 = d->cumulativeRecvCount32;
  const int expertStride = comm->nRanks * comm->config.llMaxTokensPerRank;
  a.scaleTokenStride = fp8 && d->scaleLayout == ncclMoeScaleColMajor ? moe_scale_token_stride(expertStride) : 0;
  a.fused = !d->sendOnly;
  MOE_CHECK(moe_ll_send(comm, MOE_LL_OP_DISPATCH, &a, stream));

  /* The send half is enqueued: the set is taken. */
  ll->nextSet = set ^ 1;
  ll->gen[set]++;
  moe_ll_handle_t* h = &handle->ll;
  memset(h, 0, sizeof(*h));
  h->set = set;
  h->gen = ll->gen[set];
  h->numTokens = d->numTokens;
  h->hidden = d->hidden;
  h->topk = d->topk;
  h->sendFp8 = fp8;
  h->scaleFormat = scaleFormat;
  h->cumulative = d->cumulativeRecvCount;
  h->cumulative32 = d->cumulativeRecvCount32;
  h->scaleTokenStride = a.scaleTokenStride;
  /* Without sendOnly the send kernel ran the receive half too. */
  h->state = d->sendOnly ? MOE_LL_DISPATCH_SENT : MOE_LL_DISPATCHED;
  ll->pending[set] = d->sendOnly ? handle : NULL;

  const moe_ll_layout_t* l = &ll->ctx.l;
  char* buf = comm->buffer;
  const int nS = d->hidden / NCCL_MOE_FP8_BLOCK;
  ncclMoeLowLatencyDispatchResult_t r = {
      .recvX = buf + l->recvX[set],
      .recvScales = fp8 ? buf + l->recvScales[set] : NULL,
      .scaleStride = !fp8 ? 0 : scaleFormat == MOE_LL_SCALE_UE8M0 ? (nS + MOE_LL_UE8M0_PER_WORD - 1) / MOE_LL_UE8M0_PER_WORD : nS,
      .recvCountPerExpert = (int*)(buf + l->recvCount[set]),
      .recvSource = (int*)(buf + l->recvSrc[set]),
      .expertStride = expertStride,
      .numLocalExperts = comm->numLocalExperts,
      .scaleTokenStride = a.scaleTokenStride};
  *result_p = r;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t comm, const ncclMoeLowLatencyDispatchArgs_t* args,
                                                       ncclMoeHandle_t handle,
                                                       ncclMoeLowLatencyDispatchResult_t* result_p,
                                                       cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeLowLatencyDispatch", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_ll_dispatch(comm, args, handle, result_p, stream));
}

static ncclResult_t moe_ll_dispatch_recv_checked(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                 cudaStream_t stream) {
  MOE_CHECK(moe_ll_ready(comm, handle));
  if (handle->ll.state != MOE_LL_DISPATCH_SENT)
    return MOE_ERROR(ncclInvalidUsage, "the handle holds no low-latency dispatch sent with sendOnly = 1 and not yet "
                                       "received");
  return moe_ll_dispatch_recv(comm, handle, stream);
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatchRecv(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                           cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeLowLatencyDispatchRecv", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_ll_dispatch_recv_checked(comm, handle, stream));
}

static ncclResult_t moe_ll_combine(ncclMoeComm_t comm, const ncclMoeLowLatencyCombineArgs_t* args,
                                   ncclMoeHandle_t handle, cudaStream_t stream) {
  MOE_CHECK(moe_ll_ready(comm, handle));
  MOE_ARG_CHECK(args != NULL, "low-latency combine args is NULL");
  moe_ll_handle_t* h = &handle->ll;
  if (h->state != MOE_LL_DISPATCHED)
    return MOE_ERROR(ncclInvalidUsage, "the handle holds no received low-latency dispatch%s",
                     h->state == MOE_LL_COMBINE_SENT ? " (its previous combine's receive half is not enqueued)"
                     : h->state == MOE_LL_DISPATCH_SENT ? " (enqueue ncclMoeLowLatencyDispatchRecv first)" : "");
  if (h->gen != comm->ll.gen[h->set])
    return MOE_ERROR(ncclInvalidUsage, "a later low-latency dispatch took this handle's buffer set %d: combine each "
                                       "dispatch before the dispatch two calls later", h->set);
  MOE_ARG_CHECK(args->sendOnly == 0 || args->sendOnly == 1, "sendOnly = %d: must be 0 or 1", args->sendOnly);
  MOE_CHECK(moe_check_device_ptr(args->x, NCCL_MOE_ALIGN, "x"));
  if (h->numTokens > 0) MOE_CHECK(moe_check_device_ptr(args->out, NCCL_MOE_ALIGN, "out"));
  if (args->topkWeights != NULL && h->numTokens > 0)
    MOE_CHECK(moe_check_device_ptr(args->topkWeights, sizeof(float), "topkWeights"));
  if (comm->ll.pending[h->set] != NULL)
    return MOE_ERROR(ncclInvalidUsage, "buffer set %d has a receive half not yet enqueued", h->set);

  moe_ll_args_t a;
  moe_ll_args(comm, h, &a);
  a.x = args->x;
  a.weights = args->topkWeights;
  a.out = args->out;
  a.fused = !args->sendOnly;
  MOE_CHECK(moe_ll_send(comm, MOE_LL_OP_COMBINE, &a, stream));
  if (!args->sendOnly) return ncclSuccess; /* the send kernel ran the receive half too */
  h->weights = args->topkWeights;
  h->out = args->out;
  h->state = MOE_LL_COMBINE_SENT;
  comm->ll.pending[h->set] = handle;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t comm, const ncclMoeLowLatencyCombineArgs_t* args,
                                                      ncclMoeHandle_t handle, cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeLowLatencyCombine", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_ll_combine(comm, args, handle, stream));
}

static ncclResult_t moe_ll_combine_recv_checked(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                cudaStream_t stream) {
  MOE_CHECK(moe_ll_ready(comm, handle));
  if (handle->ll.state != MOE_LL_COMBINE_SENT)
    return MOE_ERROR(ncclInvalidUsage, "the handle holds no low-latency combine sent with sendOnly = 1 and not yet "
                                       "received");
  return moe_ll_combine_recv(comm, handle, stream);
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombineRecv(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                          cudaStream_t stream) {
  moe_device_guard_t guard;
  MOE_CHECK(moe_comm_enter(comm, "ncclMoeLowLatencyCombineRecv", &guard));
  return moe_comm_leave(comm, stream, &guard, moe_ll_combine_recv_checked(comm, handle, stream));
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyBufferBytes(ncclMoeComm_t comm, size_t* bytes_p) {
  MOE_ARG_CHECK(comm != NULL && bytes_p != NULL, "ncclMoeLowLatencyBufferBytes: comm or bytes_p is NULL");
  *bytes_p = comm->ll.ctx.l.bytes;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencySizeHint(const ncclMoeConfig_t* config, int nRanks, size_t* bytes_p) {
  MOE_ARG_CHECK(config != NULL && bytes_p != NULL, "ncclMoeLowLatencySizeHint: config or bytes_p is NULL");
  ncclMoeConfig_t c;
  MOE_CHECK(moe_config_resolve(config, nRanks, &c));
  moe_ll_layout_t l;
  moe_ll_layout_compute(&c, nRanks, 0, &l);
  *bytes_p = l.bytes;
  return ncclSuccess;
}
