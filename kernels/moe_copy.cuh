/* Device helpers shared by the intranode and internode kernels: 16-byte
 * vector loads that bypass L1 (peer and host-mapped memory is read once),
 * and BF16x8 accumulation in fp32. */
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
#define MOE_VEC_BF16 8 /* BF16 values in one 16-byte vector */
#define MOE_FP8_VECS_PER_BLOCK MOE_FP8_BLOCK_LANES /* 16 lanes per 128 channels */

__device__ __forceinline__ uint4 moe_ld_nc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void moe_acc_bf16x8(float* acc, uint4 v) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __bfloat1622float2(p[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ uint4 moe_pack_bf16x8(const float* acc) {
  uint4 v;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) p[i] = __float22bfloat162_rn(make_float2(acc[2 * i], acc[2 * i + 1]));
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

__device__ __forceinline__ char* moe_dest_peer(const moe_rank_ctx_t& c, const moe_dests_t& d, int l) {
  return c.peers.base[d.laneRank != NULL ? d.laneRank[l] : l];
}

/* Copies `nvec` 16-byte vectors of one row (from device memory, or from a
 * host-mapped slab when fromHost) to its destinations. */
__device__ __forceinline__ void moe_copy_row_to(const moe_rank_ctx_t& c, const uint4* src, int nvec,
                                                const moe_dests_t& d, int lane, bool fromHost) {
  for (int v0 = 0; v0 < nvec; v0 += MOE_WARP * MOE_COPY_UNROLL) {
    uint4 buf[MOE_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_COPY_UNROLL; u++) {
      int v = v0 + u * MOE_WARP + lane;
      if (v < nvec) buf[u] = fromHost ? moe_ld_volatile(src + v) : moe_ld_nc(src + v);
    }
    if (d.one != NULL) {
      uint4* dst = reinterpret_cast<uint4*>(d.one);
#pragma unroll
      for (int u = 0; u < MOE_COPY_UNROLL; u++) {
        int v = v0 + u * MOE_WARP + lane;
        if (v < nvec) dst[v] = buf[u];
      }
      continue;
    }
    for (unsigned m = d.dmask; m != 0; m &= m - 1) {
      const int l = __ffs(m) - 1;
      const int drow = __shfl_sync(MOE_FULL_MASK, d.row, l);
      uint4* dst = reinterpret_cast<uint4*>(moe_dest_peer(c, d, l) + c.layout.recvX) + (size_t)drow * nvec;
#pragma unroll
      for (int u = 0; u < MOE_COPY_UNROLL; u++) {
        int v = v0 + u * MOE_WARP + lane;
        if (v < nvec) dst[v] = buf[u];
      }
    }
  }
}

/* Lane r holds the row at rank r. */
__device__ __forceinline__ void moe_copy_row(const moe_rank_ctx_t& c, const uint4* src, int nvec,
                                             unsigned dmask, int row, int lane) {
  moe_dests_t d = {dmask, row, NULL, NULL, NULL};
  moe_copy_row_to(c, src, nvec, d, lane, false);
}

/* Casts one BF16 row to FP8 (a half-warp per 128-channel block) and writes
 * codes and scales to its destinations. */
__device__ __forceinline__ void moe_cast_row_to(const moe_rank_ctx_t& c, const uint4* src, int hidden,
                                                int pow2, const moe_dests_t& d, int lane) {
  const int nGroups = hidden / NCCL_MOE_FP8_BLOCK;
  const int half = lane / MOE_FP8_VECS_PER_BLOCK, sub = lane % MOE_FP8_VECS_PER_BLOCK;
  for (int g0 = 0; g0 < nGroups; g0 += 2 * MOE_COPY_UNROLL) {
    uint2 code[MOE_COPY_UNROLL];
    float scale[MOE_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_COPY_UNROLL; u++) {
      const int g = g0 + 2 * u + half;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (g < nGroups) v = moe_ld_nc(src + (size_t)g * MOE_FP8_VECS_PER_BLOCK + sub);
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
          dst[(size_t)g * MOE_FP8_VECS_PER_BLOCK + sub] = code[u];
          if (sub == 0) dscale[(size_t)g * gStride] = scale[u];
        }
      }
    }
  }
}

/* Lane r holds the row at rank r, and (> 0) the column length of rank r's
 * column-major scales, or 0 for row-major ones. */
__device__ __forceinline__ void moe_cast_row(const moe_rank_ctx_t& c, const uint4* src, int hidden,
                                             int pow2, unsigned dmask, int row, int lane,
                                             int colRows) {
  moe_dests_t d = {dmask, row, NULL, NULL, NULL, colRows};
  moe_cast_row_to(c, src, hidden, pow2, d, lane);
}

#endif
