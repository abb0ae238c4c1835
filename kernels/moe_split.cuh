/* SPDX-License-Identifier: Apache-2.0 */
/* The intranode barrier of moe_sync.cuh cut in two, for the split halves of
 * ncclMoeDispatch / ncclMoeCombine (sendOnly): the send half's kernel ends
 * with the barrier's arrival, the receive half waits. Whole calls and halves
 * use the same per-rank epoch counter and signal slots, so every rank's
 * epochs stay in step (each does the same number of arrivals per call). */
#ifndef MOE_SPLIT_CUH_
#define MOE_SPLIT_CUH_

#include "kernels/moe_intranode.h"
#include "kernels/moe_sync.cuh"

/* Every thread of one block: waits until every mapped peer has arrived at
 * this rank's current epoch (peers in parallel, one timeout for all). True
 * in every thread when all have; false after a timeout (recorded) or once
 * the comm is broken. */
__device__ inline bool moe_split_wait(const moe_rank_ctx_t& c) {
  const unsigned long long e = *c.epoch;
  const long long start = moe_now_ns();
  bool ok = true;
  for (int r = threadIdx.x; r < c.nRanks && ok; r += blockDim.x)
    if (c.peers.base[r] != NULL) ok = moe_wait_geq(c, moe_signal_slot(c, c.rank, r), e, MOE_WAIT_BARRIER, r, start, NULL);
  return __syncthreads_and(ok);
}

/* moe_grid_done_barrier without the wait: every thread of every block at the
 * end of a kernel that wrote to (or read from) peers; the last block to
 * finish arrives, so peers that wait for this epoch see every block's work. */
__device__ inline void moe_grid_done_arrive(const moe_rank_ctx_t& c) {
  if (moe_last_block(c)) moe_barrier_arrive(c);
}

#endif
