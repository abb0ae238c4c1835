/* SPDX-License-Identifier: Apache-2.0 */
/* Device helpers shared by the kernel families: 16-byte vector loads that
 * bypass L1 (peer and host-mapped memory is read once), BF16x8 accumulation
 * in fp32, one token's row and metadata to its destination ranks, and the
 * combine sum of a row's copies at those ranks. */
#ifndef MOE_COPY_CUH_
#define MOE_COPY_CUH_

#include <cuda_bf16.h>
#include <stdint.h>

#include "kernels/moe_fp8.cuh"
#include "kernels/moe_intranode.h"
#include "nccl_moe.h"

#define MOE_WARP 32
#define MOE_FULL_MASK 0xffffffffu
#define MOE_NOTIFY_THREADS 256
/* 16-byte vectors each lane keeps in flight per destination pass. */
#define MOE_COPY_UNROLL 4
#define MOE_COMBINE_UNROLL 4

__device__ __forceinline__ uint4 moe_ld_nc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

/* A 16-byte load that always goes to memory: for host-mapped slabs the
 * network proxy fills while kernels run. */
__device__ __forceinline__ uint4 moe_ld_volatile(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

/* The MOE_VEC_BF16 values of a 16-byte vector, as floats. */
__device__ __forceinline__ void moe_bf16x8_unpack(uint4 v, float* f) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < MOE_VEC_BF16 / 2; i++) {
    const float2 x = __bfloat1622float2(p[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

/* acc[i] += value i of the BF16x8 vector v. */
__device__ __forceinline__ void moe_acc_bf16x8(float* acc, uint4 v) {
  float f[MOE_VEC_BF16];
  moe_bf16x8_unpack(v, f);
#pragma unroll
  for (int i = 0; i < MOE_VEC_BF16; i++) acc[i] += f[i];
}

/* acc[i] += w * value i of v, rounded once (fma). */
__device__ __forceinline__ void moe_fma_bf16x8(float* acc, uint4 v, float w) {
  float f[MOE_VEC_BF16];
  moe_bf16x8_unpack(v, f);
#pragma unroll
  for (int i = 0; i < MOE_VEC_BF16; i++) acc[i] = __fmaf_rn(w, f[i], acc[i]);
}

__device__ __forceinline__ uint4 moe_pack_bf16x8(const float* acc) {
  uint4 v;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < MOE_VEC_BF16 / 2; i++) p[i] = __float22bfloat162_rn(make_float2(acc[2 * i], acc[2 * i + 1]));
  return v;
}

/* The token's expert ids mapped to rank r's local experts, and its weights. */
__device__ __forceinline__ void moe_write_topk(const moe_rank_ctx_t& c, char* peer, int row, int r,
                                               int K, int lane, int64_t e, float w, bool withWeights) {
  if (lane >= K) return;
  const int L = c.numLocalExperts;
  int64_t local = (e >= (int64_t)r * L && e < (int64_t)(r + 1) * L) ? e - (int64_t)r * L : -1;
  reinterpret_cast<int64_t*>(peer + c.layout.recvTopkIdx)[(size_t)row * K + lane] = local;
  if (withWeights)
    reinterpret_cast<float*>(peer + c.layout.recvTopkWeights)[(size_t)row * K + lane] = local >= 0 ? w : 0.0f;
}

/* Where a row goes: for each lane l in dmask, row `row` (held by lane l) of
 * the receive buffers of rank laneRank[l] (rank l when laneRank is NULL);
 * or, when one != NULL, that single place (a network record) instead. */
typedef struct {
  unsigned dmask;
  int row;
  const int* laneRank;
  void* one;         /* payload of a record */
  float* oneScales;  /* its scales (FP8) */
  /* Held per lane like row: > 0, the scales at that lane's receiver are
   * column-major (ncclMoeScaleColMajor) with columns of this many elements.
   * Unused for `one`. */
  int scaleTokenStride;
} moe_dests_t;

__device__ __forceinline__ int moe_dest_rank(const moe_dests_t& d, int l) {
  return d.laneRank != NULL ? d.laneRank[l] : l;
}

__device__ __forceinline__ char* moe_dest_peer(const moe_rank_ctx_t& c, const moe_dests_t& d, int l) {
  return c.peers.base[moe_dest_rank(d, l)];
}

/* For each lane l < nLanes (rank laneRank[l], or rank l when laneRank is
 * NULL): sBase[l], this rank's first row at that rank, and sCap[l], that
 * rank's capacity. */
__device__ __forceinline__ void moe_load_rows(const moe_route_t& rt, const int* laneRank, int nLanes, int* sBase,
                                              int* sCap) {
  for (int l = threadIdx.x; l < nLanes; l += blockDim.x) {
    const int r = laneRank != NULL ? laneRank[l] : l;
    sBase[l] = rt.base[r];
    sCap[l] = rt.cap[r];
  }
}

/* Lane l < nLanes gets the row of token t at its rank (as in moe_load_rows),
 * or -1: the token does not go there, or the row would pass that rank's
 * capacity (dropped; notify recorded the overflow). */
__device__ __forceinline__ int moe_lane_row(const moe_rank_ctx_t& c, const moe_route_t& rt, const int* laneRank,
                                            const int* sBase, const int* sCap, int nLanes, int t, int lane) {
  int row = -1;
  if (lane < nLanes) {
    const int p = rt.pos[(size_t)t * c.nRanks + (laneRank != NULL ? laneRank[lane] : lane)];
    if (p >= 0 && sBase[lane] + p < sCap[lane]) row = sBase[lane] + p;
  }
  return row;
}

/* To every destination of d (not a record): the token's expert ids mapped
 * to that rank's local experts, its weights (lane k holds entry k: e, w),
 * and, when scales != NULL, its nScales FP8 scales (read from a host-mapped
 * slab when fromHost). */
__device__ __forceinline__ void moe_write_meta(const moe_rank_ctx_t& c, const moe_dests_t& d, int K, int lane,
                                               int64_t e, float w, bool withWeights, const float* scales,
                                               int nScales, bool fromHost) {
  for (unsigned m = d.dmask; m != 0; m &= m - 1) {
    const int l = __ffs(m) - 1, r = moe_dest_rank(d, l);
    const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
    char* peer = c.peers.base[r];
    moe_write_topk(c, peer, drow, r, K, lane, e, w, withWeights);
    if (scales == NULL) continue;
    /* Row-major: [row][j]; column-major: [j][row], columns of
     * d.scaleTokenStride elements (ncclMoeScaleColMajor). */
    const int colRows = __shfl_sync(MOE_FULL_MASK, d.scaleTokenStride, l);
    const size_t jStride = colRows > 0 ? (size_t)colRows : 1;
    float* dscale = reinterpret_cast<float*>(peer + c.layout.recvScales) +
                    (colRows > 0 ? (size_t)drow : (size_t)drow * nScales);
    for (int j = lane; j < nScales; j += MOE_WARP)
      dscale[j * jStride] = fromHost ? reinterpret_cast<const volatile float*>(scales)[j] : scales[j];
  }
}

/* Copies `nvec` 16-byte vectors of one row (from device memory, or from a
 * host-mapped slab when fromHost) to its destinations. */
__device__ __forceinline__ void moe_copy_row_to(const moe_rank_ctx_t& c, const uint4* src, int nvec,
                                                const moe_dests_t& d, int lane, bool fromHost) {
  const unsigned targets = d.one != NULL ? 1u : d.dmask;
  for (int v0 = 0; v0 < nvec; v0 += MOE_WARP * MOE_COPY_UNROLL) {
    uint4 buf[MOE_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_COPY_UNROLL; u++) {
      int v = v0 + u * MOE_WARP + lane;
      if (v < nvec) buf[u] = fromHost ? moe_ld_volatile(src + v) : moe_ld_nc(src + v);
    }
    for (unsigned m = targets; m != 0; m &= m - 1) {
      uint4* dst;
      if (d.one != NULL) {
        dst = reinterpret_cast<uint4*>(d.one);
      } else {
        const int l = __ffs(m) - 1;
        const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
        dst = reinterpret_cast<uint4*>(moe_dest_peer(c, d, l) + c.layout.recvX) + (size_t)drow * nvec;
      }
#pragma unroll
      for (int u = 0; u < MOE_COPY_UNROLL; u++) {
        int v = v0 + u * MOE_WARP + lane;
        if (v < nvec) dst[v] = buf[u];
      }
    }
  }
}

/* Casts one BF16 row to FP8 (a half-warp per 128-channel block) and writes
 * codes and scales to its destinations. */
__device__ __forceinline__ void moe_cast_row_to(const moe_rank_ctx_t& c, const uint4* src, int hidden,
                                                int pow2, const moe_dests_t& d, int lane) {
  const int nGroups = hidden / NCCL_MOE_FP8_BLOCK;
  const int half = lane / MOE_FP8_BLOCK_LANES, sub = lane % MOE_FP8_BLOCK_LANES;
  for (int g0 = 0; g0 < nGroups; g0 += 2 * MOE_COPY_UNROLL) {
    uint2 code[MOE_COPY_UNROLL];
    float scale[MOE_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_COPY_UNROLL; u++) {
      const int g = g0 + 2 * u + half;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (g < nGroups) v = moe_ld_nc(src + (size_t)g * MOE_FP8_BLOCK_LANES + sub);
      code[u] = moe_fp8_cast_block_dev(v, pow2, MOE_FULL_MASK, &scale[u]);
    }
    const unsigned targets = d.one != NULL ? 1u : d.dmask;
    for (unsigned m = targets; m != 0; m &= m - 1) {
      uint2* dst;
      float* dscale;
      size_t gStride = 1; /* elements between the scales of two blocks of the row */
      if (d.one != NULL) {
        dst = reinterpret_cast<uint2*>(d.one);
        dscale = d.oneScales;
      } else {
        const int l = __ffs(m) - 1;
        const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
        const int colRows = __shfl_sync(MOE_FULL_MASK, d.scaleTokenStride, l);
        char* peer = moe_dest_peer(c, d, l);
        dst = reinterpret_cast<uint2*>(peer + c.layout.recvX) + (size_t)drow * (hidden / 8);
        dscale = reinterpret_cast<float*>(peer + c.layout.recvScales) +
                 (colRows > 0 ? (size_t)drow : (size_t)drow * nGroups);
        if (colRows > 0) gStride = (size_t)colRows;
      }
#pragma unroll
      for (int u = 0; u < MOE_COPY_UNROLL; u++) {
        const int g = g0 + 2 * u + half;
        if (g < nGroups) {
          dst[(size_t)g * MOE_FP8_BLOCK_LANES + sub] = code[u];
          if (sub == 0) dscale[(size_t)g * gStride] = scale[u];
        }
      }
    }
  }
}

/* ----------------------------------------------------------- combine */
/* Accumulators of one combine pass: MOE_COMBINE_UNROLL vectors per lane. */
__device__ __forceinline__ void moe_acc_zero(float (*acc)[MOE_VEC_BF16]) {
#pragma unroll
  for (int u = 0; u < MOE_COMBINE_UNROLL; u++)
#pragma unroll
    for (int i = 0; i < MOE_VEC_BF16; i++) acc[u][i] = 0.0f;
}

/* acc[u] += vector v0 + u * MOE_WARP + lane of row d.row (held by lane l)
 * of the combine buffer of every destination rank of d, in lane order:
 * with lanes in rank order, the same sum bit for bit on every run. */
__device__ __forceinline__ void moe_acc_peer_rows(const moe_rank_ctx_t& c, const moe_dests_t& d, int nvec, int v0,
                                                  int lane, float (*acc)[MOE_VEC_BF16]) {
  for (unsigned m = d.dmask; m != 0; m &= m - 1) {
    const int l = __ffs(m) - 1;
    const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
    const uint4* src = reinterpret_cast<const uint4*>(moe_dest_peer(c, d, l) + c.layout.combineX) + (size_t)drow * nvec;
    uint4 buf[MOE_COMBINE_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_COMBINE_UNROLL; u++) {
      const int v = v0 + u * MOE_WARP + lane;
      if (v < nvec) buf[u] = moe_ld_nc(src + v);
    }
#pragma unroll
    for (int u = 0; u < MOE_COMBINE_UNROLL; u++)
      if (v0 + u * MOE_WARP + lane < nvec) moe_acc_bf16x8(acc[u], buf[u]);
  }
}

/* out[v0 + u * MOE_WARP + lane] = acc[u] rounded to BF16. */
__device__ __forceinline__ void moe_store_acc(uint4* out, float (*acc)[MOE_VEC_BF16], int nvec, int v0, int lane) {
#pragma unroll
  for (int u = 0; u < MOE_COMBINE_UNROLL; u++) {
    const int v = v0 + u * MOE_WARP + lane;
    if (v < nvec) out[v] = moe_pack_bf16x8(acc[u]);
  }
}

/* Lane k < K: the sum, in lane order, of top-k weight k of row d.row at
 * every destination rank of d (0 in the other lanes). */
__device__ __forceinline__ float moe_sum_peer_weights(const moe_rank_ctx_t& c, const moe_dests_t& d, int K,
                                                      int lane) {
  float sum = 0.0f;
  for (unsigned m = d.dmask; m != 0; m &= m - 1) {
    const int l = __ffs(m) - 1;
    const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
    if (lane < K) sum += reinterpret_cast<const float*>(moe_dest_peer(c, d, l) + c.layout.combineWeights)[(size_t)drow * K + lane];
  }
  return sum;
}


#endif
