/* SPDX-License-Identifier: Apache-2.0 */
/* The notify message (moe_intranode.h) and the routing every rank derives
 * once all sources' messages are in its notify area: shared by the
 * intranode notify kernel and the internode one, which differ only in how
 * messages travel. */
#ifndef MOE_NOTIFY_CUH_
#define MOE_NOTIFY_CUH_

#include "kernels/moe_intranode.h"
#include "kernels/moe_sync.cuh"

/* Int j of this rank's notify message to rank r. */
__device__ __forceinline__ int moe_notify_value(const moe_rank_ctx_t& c, const moe_route_t& rt,
                                                const moe_notify_args_t& a, int r, int j) {
  const int N = c.nRanks, L = c.numLocalExperts;
  if (j < N) return rt.tokensPerRank[j];
  if (j == MOE_NOTIFY_CAPACITY(N)) return a.capacity;
  if (j == MOE_NOTIFY_HIDDEN(N)) return a.hidden;
  if (j == MOE_NOTIFY_TYPE(N)) return a.sendType;
  if (j == MOE_NOTIFY_TOPK(N)) return a.topk;
  return rt.tokensPerExpert[r * L + (j - MOE_NOTIFY_EXPERTS(N))];
}

/* Run by every thread of one block once every source's message to this rank
 * is in its notify area: this rank's first row and the capacity at every
 * receiver, the rows it receives, per local expert too. Faults (a negative
 * count, an overflow anywhere, ranks disagreeing on shapes) are recorded. */
__device__ inline void moe_notify_finish(const moe_rank_ctx_t& c, const moe_route_t& rt,
                                         const moe_notify_args_t& a) {
  const int N = c.nRanks, L = c.numLocalExperts, M = c.layout.notifyInts;
  const volatile int* msg = reinterpret_cast<const int*>(c.peers.base[c.rank] + c.layout.notify);
  int fault = 0;
  for (int r = threadIdx.x; r < N; r += blockDim.x) {
    int before = 0, total = 0;
    for (int s = 0; s < N; s++) {
      int v = msg[s * M + r];
      if (v < 0) fault = MOE_KERR_BAD_NOTIFY;
      if (s < c.rank) before += v;
      total += v;
    }
    const int cap = msg[r * M + MOE_NOTIFY_CAPACITY(N)];
    rt.base[r] = before;
    rt.cap[r] = cap;
    if (total > cap) fault = MOE_KERR_CAPACITY; /* some rank overflows: every rank learns it */
  }
  for (int s = threadIdx.x; s < N; s += blockDim.x) {
    if (msg[s * M + MOE_NOTIFY_HIDDEN(N)] != a.hidden || msg[s * M + MOE_NOTIFY_TYPE(N)] != a.sendType ||
        msg[s * M + MOE_NOTIFY_TOPK(N)] != a.topk)
      fault = MOE_KERR_MISMATCH;
  }
  const int align = a.expertAlignment;
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < N; s++) sum += msg[s * M + MOE_NOTIFY_EXPERTS(N) + l];
    rt.recvPerExpert[l] = (sum + align - 1) / align * align;
  }
  if (threadIdx.x == 0) {
    int total = 0;
    for (int s = 0; s < N; s++) total += msg[s * M + c.rank];
    *rt.recvCount = total < 0 ? 0 : total; /* a negative count is a fault (above), never a size */
  }
  if (fault) moe_record_error(c, fault);
}

/* Exact mode (a.hostCounts set), run by every thread of one block after
 * moe_notify_finish (or after the barrier of a reused handle, whose counts
 * the earlier dispatch computed): copies the counts to the host-mapped ints,
 * then the sequence number, which the host polls. */
__device__ inline void moe_notify_publish(const moe_route_t& rt, const moe_notify_args_t& a, int numLocalExperts) {
  if (a.hostCounts == nullptr) return;
  __syncthreads(); /* rt written by the other threads of the block */
  for (int l = threadIdx.x; l < numLocalExperts; l += blockDim.x)
    a.hostCounts[MOE_HOST_EXPERTS + l] = rt.recvPerExpert[l];
  if (threadIdx.x == 0) a.hostCounts[MOE_HOST_RECV] = *rt.recvCount;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) a.hostCounts[MOE_HOST_SEQ] = (int)a.hostSeq;
}

#endif
