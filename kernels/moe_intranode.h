/* SPDX-License-Identifier: Apache-2.0 */
/* Plain structs shared by the host and the intranode kernels, and their launch
 * functions. A kernel reaches peers only through moe_peers_t: one base pointer
 * per rank (the same pointer for virtual ranks in one process, a CUDA IPC
 * mapping for processes on one node), with every rank's buffer laid out by
 * the same moe_layout_t. */
#ifndef MOE_INTRANODE_H_
#define MOE_INTRANODE_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "kernels/moe_error.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Byte offsets of the regions of one rank's shared (peer-visible) buffer. */
typedef struct {
  size_t signals;        /* uint64 [MAX_RANKS]: barrier epoch written by each peer */
  size_t notify;         /* int32 [nRanks][notifyInts]: the notify message of each source */
  size_t recvX;          /* [maxRecv, hidden] of the send type */
  size_t recvScales;     /* fp32 [maxRecv, hidden / 128] */
  size_t recvTopkIdx;    /* int64 [maxRecv, topk] */
  size_t recvTopkWeights;/* fp32 [maxRecv, topk] */
  size_t combineX;       /* BF16 [maxRecv, hidden] */
  size_t combineWeights; /* fp32 [maxRecv, topk] */
  size_t total;
  int notifyInts;        /* ints of one notify message (see MOE_NOTIFY_*) */
} moe_layout_t;

/* One notify message (from a source rank, into each peer's notify area):
 * [tokens to rank 0 .. nRanks-1][capacity][hidden][sendType][topk]
 * [tokens per expert of the receiving rank, numLocalExperts]. */
#define MOE_NOTIFY_CAPACITY(n) (n)
#define MOE_NOTIFY_HIDDEN(n) ((n) + 1)
#define MOE_NOTIFY_TYPE(n) ((n) + 2)
#define MOE_NOTIFY_TOPK(n) ((n) + 3)
#define MOE_NOTIFY_EXPERTS(n) ((n) + 4)

typedef struct {
  char* base[NCCL_MOE_MAX_RANKS];
} moe_peers_t;

/* What every kernel of one rank needs to find its peers and report. */
typedef struct {
  moe_peers_t peers;
  moe_layout_t layout;
  int rank, nRanks, numLocalExperts;
  volatile int* error;        /* host-mapped error record [MOE_ERR_WORDS] (moe_error.h) */
  int* errorClaim;            /* the kernels' claim word of the record (device, moe_error.h) */
  unsigned long long* epoch;  /* this rank's barrier counter (device) */
  unsigned int* blocksDone;   /* grid-completion counter (device) */
  long long timeoutNs;
} moe_rank_ctx_t;

/* Routing kept by a handle (device arrays, owned by the handle). */
typedef struct {
  int* pos;            /* [numTokens, nRanks]: index among the tokens sent to that rank, -1 none */
  int* base;           /* [nRanks]: first row of this rank's tokens in each receiver's buffer */
  int* cap;            /* [nRanks]: each receiver's capacity (rows) */
  int* recvCount;      /* [1] rows received by this rank */
  int* recvPerExpert;  /* [numLocalExperts], rounded up to the alignment */
  int* tokensPerRank;  /* [nRanks] scratch of the layout */
  int* tokensPerExpert;/* [numExperts] scratch of the layout */
} moe_route_t;

cudaError_t moe_layout_launch(const moe_rank_ctx_t* ctx, const int64_t* topkIdx, int numTokens,
                              int topk, int numExperts, int* tokensPerRank, int* tokensPerExpert,
                              uint8_t* isTokenInRank, int* pos, cudaStream_t stream);

/* Exact mode: the notify kernel publishes this rank's receive counts in
 * host-mapped ints, so the host waits for them alone (not for the stream):
 * [MOE_HOST_RECV] rows received, [MOE_HOST_EXPERTS + l] rows of local expert
 * l (as recvPerExpert), then, once those are visible to the host,
 * [MOE_HOST_SEQ] = the dispatch's sequence number. */
enum { MOE_HOST_SEQ = 0, MOE_HOST_RECV = 1, MOE_HOST_EXPERTS = 2 };

/* Sends this rank's counts to every peer (unless reuse), waits for all peers
 * (a barrier), then computes the handle's base/cap/recvCount/recvPerExpert.
 * With notify == 0 it is a bare barrier. With hostCounts, it then publishes
 * the handle's counts there (see MOE_HOST_*), with notify or without. */
typedef struct {
  int notify;
  int capacity, hidden, sendType, topk, expertAlignment;
  volatile int* hostCounts;  /* device view of the host-mapped ints, or NULL */
  unsigned int hostSeq;      /* written to hostCounts[MOE_HOST_SEQ] last */
} moe_notify_args_t;
cudaError_t moe_notify_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                              const moe_notify_args_t* args, cudaStream_t stream);

typedef struct {
  const void* x;
  const float* xScales;
  const int64_t* topkIdx;
  const float* topkWeights;
  int numTokens, hidden, topk;
  int xIsFp8, sendFp8, pow2Scales;
  int numBlocks, threads;
  /* Intranode only. 1: the send half of a split dispatch: end with an
   * arrival (moe_split.cuh), not a barrier. */
  int arriveOnly;
  /* 1: FP8 scales column-major at the receivers (ncclMoeScaleColMajor):
   * [hidden / 128][S] at receiver r, S = its capacity (rt.cap[r]) rounded up
   * to NCCL_MOE_SCALE_TOKEN_ALIGN; 0: row-major. */
  int scaleColMajor;
} moe_dispatch_args_t;

#ifdef __CUDACC__
#define MOE_SCALE_HD __host__ __device__
#else
#define MOE_SCALE_HD
#endif
/* Elements per column-major scale column (ncclMoeScaleColMajor) of `rows`
 * rows: 16-byte aligned columns. */
static inline MOE_SCALE_HD int moe_scale_token_stride(int rows) {
  return (rows + NCCL_MOE_SCALE_TOKEN_ALIGN - 1) / NCCL_MOE_SCALE_TOKEN_ALIGN * NCCL_MOE_SCALE_TOKEN_ALIGN;
}
cudaError_t moe_dispatch_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                const moe_dispatch_args_t* args, cudaStream_t stream);

typedef struct {
  void* out;
  float* outTopkWeights;
  int numTokens, hidden, topk, withWeights;
  int numBlocks, threads;
  /* Intranode only: BF16 [numTokens, hidden] added to out, or NULL. */
  const void* bias0;
  const void* bias1;
  /* Intranode only. 1: the receive half of a split combine: end with an
   * arrival, not a barrier. */
  int arriveOnly;
} moe_combine_args_t;
cudaError_t moe_combine_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                               const moe_combine_args_t* args, cudaStream_t stream);

/* Copies rows [0, *recvCount) of x (BF16 [.., hidden]) and optional weights
 * into this rank's combine buffers. */
cudaError_t moe_combine_stage_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                     const void* x, const float* weights, int hidden, int topk,
                                     cudaStream_t stream);

/* Split halves (ncclMoeDispatchRecv / ncclMoeCombineRecv): one thread block
 * that waits until every peer has arrived where this rank last arrived
 * (moe_split.cuh), and one that arrives (epoch + 1, signalled to every peer)
 * without waiting. */
cudaError_t moe_split_wait_launch(const moe_rank_ctx_t* ctx, cudaStream_t stream);
cudaError_t moe_split_arrive_launch(const moe_rank_ctx_t* ctx, cudaStream_t stream);

/* Loads every intranode kernel now (see intranode.cu: lazy loading). */
cudaError_t moe_intranode_preload(void);

#ifdef __cplusplus
}
#endif
#endif
