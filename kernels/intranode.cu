/* SPDX-License-Identifier: Apache-2.0 */
/* Intranode expert-parallel kernels (high-throughput mode): layout, notify,
 * dispatch, combine. Senders write each token straight into the receiver's
 * comm-owned output rows (no intermediate ring), once per destination rank;
 * combine pulls every copy back from the peers and reduces in fp32 in rank
 * order. See moe_intranode.h for the buffer layout and notify message. */
#include "kernels/moe_copy.cuh"
#include "kernels/moe_fp8.cuh"
#include "kernels/moe_kernels.h"
#include "kernels/moe_intranode.h"
#include "kernels/moe_notify.cuh"
#include "kernels/moe_split.cuh"
#include "kernels/moe_sync.cuh"

#define MOE_LAYOUT_THREADS 1024

/* ------------------------------------------------------------------ layout */
/* One block per rank: per-expert counts in shared memory, and for each
 * destination rank an exclusive scan over tokens (warp ballots, then a scan
 * over warps) giving each token's index among the tokens sent there. */
__global__ void __launch_bounds__(MOE_LAYOUT_THREADS)
moe_layout_kernel(moe_rank_ctx_t c, const int64_t* __restrict__ idx, int T, int K, int E,
                  int* tokensPerRank, int* tokensPerExpert, uint8_t* inRank, int* pos) {
  extern __shared__ int sh[];
  const int N = c.nRanks, L = c.numLocalExperts;
  int* cntE = sh;
  int* warpCnt = sh + E;                       /* [warps][N] */
  int* carry = warpCnt + (blockDim.x / MOE_WARP) * N;
  const int lane = threadIdx.x % MOE_WARP, warp = threadIdx.x / MOE_WARP;
  const int nWarps = blockDim.x / MOE_WARP;
  for (int i = threadIdx.x; i < E; i += blockDim.x) cntE[i] = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) carry[i] = 0;
  __syncthreads();
  int bad = 0;
  for (int t0 = 0; t0 < T; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    unsigned long long mask = 0;
    if (t < T) {
      for (int k = 0; k < K; k++) {
        int64_t e = idx[(size_t)t * K + k];
        if (e == -1) continue;
        if (e < -1 || e >= E) { bad = 1; continue; } /* never used as an address */
        atomicAdd(&cntE[e], 1);
        mask |= 1ull << (e / L);
      }
    }
    for (int r = 0; r < N; r++) {
      unsigned b = __ballot_sync(MOE_FULL_MASK, (mask >> r) & 1ull);
      if (lane == 0) warpCnt[warp * N + r] = __popc(b);
    }
    __syncthreads();
    if (threadIdx.x < N) {
      int run = carry[threadIdx.x];
      for (int w = 0; w < nWarps; w++) {
        int v = warpCnt[w * N + threadIdx.x];
        warpCnt[w * N + threadIdx.x] = run;
        run += v;
      }
      carry[threadIdx.x] = run;
    }
    __syncthreads();
    const unsigned lowerLanes = (1u << lane) - 1u;
    for (int r = 0; r < N; r++) {
      unsigned b = __ballot_sync(MOE_FULL_MASK, (mask >> r) & 1ull);
      if (t < T) {
        int in = (int)((mask >> r) & 1ull);
        if (pos != NULL) pos[(size_t)t * N + r] = in ? warpCnt[warp * N + r] + __popc(b & lowerLanes) : -1;
        if (inRank != NULL) inRank[(size_t)t * N + r] = (uint8_t)in;
      }
    }
    __syncthreads(); /* warpCnt is rewritten by the next chunk */
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) moe_record_error(c, MOE_KERR_BAD_EXPERT);
  for (int i = threadIdx.x; i < N; i += blockDim.x) tokensPerRank[i] = carry[i];
  for (int i = threadIdx.x; i < E; i += blockDim.x) tokensPerExpert[i] = cntE[i];
}

extern "C" cudaError_t moe_layout_launch(const moe_rank_ctx_t* ctx, const int64_t* topkIdx,
                                         int numTokens, int topk, int numExperts,
                                         int* tokensPerRank, int* tokensPerExpert,
                                         uint8_t* isTokenInRank, int* pos, cudaStream_t stream) {
  size_t shmem = sizeof(int) * (numExperts + (MOE_LAYOUT_THREADS / MOE_WARP) * ctx->nRanks + ctx->nRanks);
  moe_layout_kernel<<<1, MOE_LAYOUT_THREADS, shmem, stream>>>(*ctx, topkIdx, numTokens, topk,
                                                             numExperts, tokensPerRank,
                                                             tokensPerExpert, isTokenInRank, pos);
  return cudaGetLastError();
}

/* ------------------------------------------------------------------ notify */
__global__ void __launch_bounds__(MOE_NOTIFY_THREADS)
moe_notify_kernel(moe_rank_ctx_t c, moe_route_t rt, moe_notify_args_t a) {
  __shared__ int proceed;
  const int N = c.nRanks, M = c.layout.notifyInts;
  if (!moe_block_proceed(c)) return;
  if (a.notify) {
    for (int i = threadIdx.x; i < N * M; i += blockDim.x) {
      const int r = i / M, j = i % M;
      volatile int* dst = reinterpret_cast<int*>(c.peers.base[r] + c.layout.notify) + (size_t)c.rank * M + j;
      *dst = moe_notify_value(c, rt, a, r, j);
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) proceed = moe_barrier(c);
  __syncthreads();
  if (!proceed) return;
  if (a.notify) moe_notify_finish(c, rt, a);
  moe_notify_publish(rt, a, c.numLocalExperts);
}

extern "C" cudaError_t moe_notify_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                         const moe_notify_args_t* args, cudaStream_t stream) {
  moe_notify_kernel<<<1, MOE_NOTIFY_THREADS, 0, stream>>>(*ctx, *route, *args);
  return cudaGetLastError();
}

/* ---------------------------------------------------------------- dispatch */
__global__ void moe_dispatch_kernel(moe_rank_ctx_t c, moe_route_t rt, moe_dispatch_args_t a) {
  __shared__ int sBase[NCCL_MOE_MAX_RANKS], sCap[NCCL_MOE_MAX_RANKS];
  const int N = c.nRanks, K = a.topk;
  moe_load_rows(rt, NULL, N, sBase, sCap);
  if (!moe_block_proceed(c)) return;
  const int lane = threadIdx.x % MOE_WARP;
  const int warpsPerBlock = blockDim.x / MOE_WARP;
  const int nScales = a.hidden / NCCL_MOE_FP8_BLOCK;
  const int inBytes = a.hidden * (a.xIsFp8 ? 1 : 2), outBytes = a.hidden * (a.sendFp8 ? 1 : 2);
  const bool withWeights = a.topkWeights != NULL;
  for (int t = blockIdx.x * warpsPerBlock + threadIdx.x / MOE_WARP; t < a.numTokens;
       t += gridDim.x * warpsPerBlock) {
    const int row = moe_lane_row(c, rt, NULL, sBase, sCap, N, t, lane);
    /* Lane r: the column length of receiver r's column-major scales, or 0. */
    const int colRows = a.scaleColMajor && lane < N ? moe_scale_token_stride(sCap[lane]) : 0;
    const moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, NULL, NULL, NULL, colRows};
    if (d.dmask == 0) continue;
    int64_t e = -1;
    float w = 0.0f;
    if (lane < K) {
      e = a.topkIdx[(size_t)t * K + lane];
      if (withWeights) w = a.topkWeights[(size_t)t * K + lane];
    }
    const float* scales = a.xIsFp8 ? a.xScales + (size_t)t * nScales : NULL;
    moe_write_meta(c, d, K, lane, e, w, withWeights, scales, nScales, false);
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(a.x) + (size_t)t * inBytes);
    if (a.sendFp8 && !a.xIsFp8) moe_cast_row_to(c, src, a.hidden, a.pow2Scales, d, lane);
    else moe_copy_row_to(c, src, outBytes / 16, d, lane, false);
  }
  if (a.arriveOnly) moe_grid_done_arrive(c); /* split: ncclMoeDispatchRecv waits */
  else moe_grid_done_barrier(c);
}

extern "C" cudaError_t moe_dispatch_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                           const moe_dispatch_args_t* args, cudaStream_t stream) {
  moe_dispatch_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *route, *args);
  return cudaGetLastError();
}

/* ----------------------------------------------------------------- combine */
__global__ void moe_combine_kernel(moe_rank_ctx_t c, moe_route_t rt, moe_combine_args_t a) {
  __shared__ int sBase[NCCL_MOE_MAX_RANKS], sCap[NCCL_MOE_MAX_RANKS];
  const int N = c.nRanks, K = a.topk;
  moe_load_rows(rt, NULL, N, sBase, sCap);
  if (!moe_block_proceed(c)) return;
  const int lane = threadIdx.x % MOE_WARP;
  const int warpsPerBlock = blockDim.x / MOE_WARP;
  const int nvec = a.hidden / MOE_VEC_BF16;
  const uint4* bias0 = static_cast<const uint4*>(a.bias0);
  const uint4* bias1 = static_cast<const uint4*>(a.bias1);
  for (int t = blockIdx.x * warpsPerBlock + threadIdx.x / MOE_WARP; t < a.numTokens;
       t += gridDim.x * warpsPerBlock) {
    const int row = moe_lane_row(c, rt, NULL, sBase, sCap, N, t, lane);
    const moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, NULL, NULL, NULL};
    uint4* out = reinterpret_cast<uint4*>(a.out) + (size_t)t * nvec;
    for (int v0 = 0; v0 < nvec; v0 += MOE_WARP * MOE_COMBINE_UNROLL) {
      float acc[MOE_COMBINE_UNROLL][MOE_VEC_BF16];
      moe_acc_zero(acc);
      /* The biases first, then the ranks (DeepEP's order of the fp32 sum). */
      if (bias0 != NULL || bias1 != NULL) {
#pragma unroll
        for (int u = 0; u < MOE_COMBINE_UNROLL; u++) {
          const int v = v0 + u * MOE_WARP + lane;
          if (v >= nvec) continue;
          if (bias0 != NULL) moe_acc_bf16x8(acc[u], bias0[(size_t)t * nvec + v]);
          if (bias1 != NULL) moe_acc_bf16x8(acc[u], bias1[(size_t)t * nvec + v]);
        }
      }
      moe_acc_peer_rows(c, d, nvec, v0, lane, acc); /* rank order, ascending */
      moe_store_acc(out, acc, nvec, v0, lane);
    }
    if (a.withWeights) {
      const float sum = moe_sum_peer_weights(c, d, K, lane);
      if (lane < K) a.outTopkWeights[(size_t)t * K + lane] = sum;
    }
  }
  if (a.arriveOnly) moe_grid_done_arrive(c); /* split: peers wait at their next combine send */
  else moe_grid_done_barrier(c);
}

extern "C" cudaError_t moe_combine_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                          const moe_combine_args_t* args, cudaStream_t stream) {
  moe_combine_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *route, *args);
  return cudaGetLastError();
}

/* Copies the caller's expert outputs into this rank's combine buffers; the
 * row count is read on the device (capacity mode never syncs the host). */
__global__ void moe_combine_stage_kernel(moe_rank_ctx_t c, moe_route_t rt, const uint4* x,
                                         const float* weights, int hidden, int K) {
  const int rows = max(0, min(*rt.recvCount, rt.cap[c.rank])); /* counts may come from a peer */
  const size_t nvec = x != NULL ? (size_t)rows * hidden / MOE_VEC_BF16 : 0;
  uint4* dst = reinterpret_cast<uint4*>(c.peers.base[c.rank] + c.layout.combineX);
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) dst[i] = moe_ld_nc(x + i);
  if (weights != NULL) {
    float* dw = reinterpret_cast<float*>(c.peers.base[c.rank] + c.layout.combineWeights);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)rows * K; i += stride) dw[i] = weights[i];
  }
}

extern "C" cudaError_t moe_combine_stage_launch(const moe_rank_ctx_t* ctx, const moe_route_t* route,
                                                const void* x, const float* weights, int hidden,
                                                int topk, cudaStream_t stream) {
  moe_combine_stage_kernel<<<256, 512, 0, stream>>>(*ctx, *route, (const uint4*)x, weights, hidden, topk);
  return cudaGetLastError();
}

/* ------------------------------------------------------------ split halves */
/* One block: waits for every peer's arrival at this rank's current epoch
 * (moe_split.cuh). One warp covers the peers of a node (<= 32 ranks). */
#define MOE_SPLIT_WAIT_THREADS MOE_WARP

__global__ void __launch_bounds__(MOE_SPLIT_WAIT_THREADS) moe_split_wait_kernel(moe_rank_ctx_t c) {
  if (moe_comm_broken(c)) return;
  moe_split_wait(c);
}

extern "C" cudaError_t moe_split_wait_launch(const moe_rank_ctx_t* ctx, cudaStream_t stream) {
  moe_split_wait_kernel<<<1, MOE_SPLIT_WAIT_THREADS, 0, stream>>>(*ctx);
  return cudaGetLastError();
}

/* One thread: arrives (after this rank's earlier work in stream order). */
__global__ void __launch_bounds__(1) moe_split_arrive_kernel(moe_rank_ctx_t c) {
  if (moe_comm_broken(c)) return;
  moe_barrier_arrive(c);
}

extern "C" cudaError_t moe_split_arrive_launch(const moe_rank_ctx_t* ctx, cudaStream_t stream) {
  moe_split_arrive_kernel<<<1, 1, 0, stream>>>(*ctx);
  return cudaGetLastError();
}

/* Comm init loads every kernel up front (see moe_preload_kernels). */
extern "C" cudaError_t moe_intranode_preload(void) {
  const void* kernels[] = {(const void*)moe_layout_kernel, (const void*)moe_notify_kernel,
                           (const void*)moe_dispatch_kernel, (const void*)moe_combine_kernel,
                           (const void*)moe_combine_stage_kernel, (const void*)moe_split_wait_kernel,
                           (const void*)moe_split_arrive_kernel};
  return moe_preload_kernels(kernels, sizeof(kernels) / sizeof(kernels[0]));
}
