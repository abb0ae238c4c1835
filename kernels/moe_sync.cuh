/* Cross-rank synchronization for the intranode kernels: release/acquire flag
 * accesses at system scope, the epoch barrier, and error reporting. Every
 * wait is bounded by ctx.timeoutNs; a timeout records MOE_KERR_TIMEOUT in the
 * host-mapped error word and returns false (it never traps). */
#ifndef MOE_SYNC_CUH_
#define MOE_SYNC_CUH_

#include "kernels/moe_intranode.h"

__device__ __forceinline__ void moe_st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long moe_ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ long long moe_now_ns(void) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return (long long)t;
}

__device__ __forceinline__ void moe_record_error(const moe_rank_ctx_t& c, int code) {
  if (c.error[MOE_ERR_CODE] == MOE_KERR_NONE) c.error[MOE_ERR_CODE] = code;
  __threadfence_system();
}

/* True when an earlier wait of this rank timed out (the epochs of the ranks
 * no longer agree), the network proxy failed, a peer sent impossible counts,
 * or the host aborted the comm: every later kernel of the comm does nothing. */
__device__ __forceinline__ bool moe_comm_broken(const moe_rank_ctx_t& c) {
  const int e = c.error[MOE_ERR_CODE];
  return e == MOE_KERR_TIMEOUT || e == MOE_KERR_NET || e == MOE_KERR_BAD_NOTIFY || e == MOE_KERR_ABORT;
}

/* Records a timeout (the first error wins): the wait's target `want`, the
 * peer it waited for and the value that peer had reached. */
__device__ __forceinline__ void moe_record_timeout(const moe_rank_ctx_t& c, unsigned long long want, int peer,
                                                   unsigned long long seen, moe_wait_t what) {
  if (c.error[MOE_ERR_CODE] == MOE_KERR_NONE) {
    c.error[MOE_ERR_EPOCH] = (int)want;
    c.error[MOE_ERR_PEER] = peer;
    c.error[MOE_ERR_PEER_EPOCH] = (int)seen;
    c.error[MOE_ERR_WAIT] = what;
  }
  moe_record_error(c, MOE_KERR_TIMEOUT);
}

__device__ __forceinline__ unsigned long long* moe_signal_slot(const moe_rank_ctx_t& c, int owner,
                                                               int from) {
  return reinterpret_cast<unsigned long long*>(c.peers.base[owner] + c.layout.signals) + from;
}

/* All-to-all barrier of the ranks whose memory this rank maps (the ranks of
 * its node), run by ONE thread. Ranks run the same sequence of
 * barriers, so a per-rank counter names each one (graph replays included);
 * a peer already at a later barrier satisfies ">= epoch" too. */
__device__ inline bool moe_barrier(const moe_rank_ctx_t& c) {
  unsigned long long e = *c.epoch + 1;
  *c.epoch = e;
  __threadfence_system();
  for (int r = 0; r < c.nRanks; r++)
    if (c.peers.base[r] != NULL) moe_st_release_sys(moe_signal_slot(c, r, c.rank), e);
  long long start = moe_now_ns();
  for (int r = 0; r < c.nRanks; r++) {
    if (c.peers.base[r] == NULL) continue; /* another node: met through the proxy, not here */
    const unsigned long long* slot = moe_signal_slot(c, c.rank, r);
    while (moe_ld_acquire_sys(slot) < e) {
      if (moe_now_ns() - start > c.timeoutNs) {
        moe_record_timeout(c, e, r, moe_ld_acquire_sys(slot), MOE_WAIT_BARRIER);
        return false;
      }
    }
  }
  return true;
}

/* Called by every thread of every block at the end of a kernel that wrote to
 * (or read from) peers: the last block to finish runs the barrier, so the
 * kernel completes only when every peer has finished the same phase. */
__device__ inline void moe_grid_done_barrier(const moe_rank_ctx_t& c) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int prev = atomicAdd(c.blocksDone, 1u);
    if (prev == gridDim.x - 1) {
      *c.blocksDone = 0;
      moe_barrier(c);
    }
  }
}

#endif
