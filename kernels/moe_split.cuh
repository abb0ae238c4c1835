/* The intranode barrier of moe_sync.cuh cut in two, for the split halves of
 * ncclMoeDispatch / ncclMoeCombine (sendOnly): "arrive" takes this rank to
 * the next epoch and tells every peer, without waiting; "wait" waits until
 * every peer has reached the epoch this rank last arrived at. moe_barrier is
 * the two back to back, on the same per-rank epoch counter and signal slots,
 * so whole calls and halves keep every rank's epochs in step (each does the
 * same number of arrivals per call). The wait is bounded by ctx.timeoutNs
 * and records MOE_KERR_TIMEOUT, like every other wait. */
#ifndef MOE_SPLIT_CUH_
#define MOE_SPLIT_CUH_

#include "kernels/moe_intranode.h"
#include "kernels/moe_sync.cuh"

/* One thread: epoch + 1, stored to every mapped peer after this rank's
 * earlier stores (the caller's fence covers the other blocks' stores). */
__device__ inline void moe_split_arrive(const moe_rank_ctx_t& c) {
  const unsigned long long e = *c.epoch + 1;
  *c.epoch = e;
  __threadfence_system();
  for (int r = 0; r < c.nRanks; r++)
    if (c.peers.base[r] != NULL) moe_st_release_sys(moe_signal_slot(c, r, c.rank), e);
}

/* Every thread of one block: waits until every mapped peer has arrived at
 * this rank's current epoch (a peer already further satisfies it too). True
 * in every thread when all have; false after a timeout (recorded). */
__device__ inline bool moe_split_wait(const moe_rank_ctx_t& c) {
  const unsigned long long e = *c.epoch;
  bool ok = true;
  const long long start = moe_now_ns();
  for (int r = threadIdx.x; r < c.nRanks; r += blockDim.x) {
    if (c.peers.base[r] == NULL) continue;
    const unsigned long long* slot = moe_signal_slot(c, c.rank, r);
    while (ok && moe_ld_acquire_sys(slot) < e) {
      if (moe_now_ns() - start > c.timeoutNs) {
        moe_record_timeout(c, e, r, moe_ld_acquire_sys(slot), MOE_WAIT_BARRIER);
        ok = false;
      }
    }
  }
  return __syncthreads_and(ok);
}

/* moe_grid_done_barrier without the wait: every thread of every block at the
 * end of a kernel that wrote to (or read from) peers; the last block to
 * finish arrives, so peers that wait for this epoch see every block's work. */
__device__ inline void moe_grid_done_arrive(const moe_rank_ctx_t& c) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int prev = atomicAdd(c.blocksDone, 1u);
    if (prev == gridDim.x - 1) {
      *c.blocksDone = 0;
      moe_split_arrive(c);
    }
  }
}

#endif
