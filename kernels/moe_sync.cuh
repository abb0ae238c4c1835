/* SPDX-License-Identifier: Apache-2.0 */
/* Cross-rank synchronization for every kernel: release/acquire flag accesses
 * at system scope, the one wait (moe_wait_geq), the epoch barrier, and error
 * recording (the protocol: moe_error.h). Every wait is bounded by
 * ctx.timeoutNs; a timeout records MOE_KERR_TIMEOUT in the host-mapped error
 * record and returns false (it never traps). */
#ifndef MOE_SYNC_CUH_
#define MOE_SYNC_CUH_

#include "kernels/moe_intranode.h"

/* Grid kernels that wait for peers (internode, low latency) wait at their
 * start, so every virtual rank's blocks must fit on the GPU together: two
 * 512-thread blocks per SM (at most 64 registers), as the host's automatic
 * block count assumes. */
#define MOE_WAIT_GRID_THREADS 512
#define MOE_WAIT_GRID_BLOCKS_PER_SM 2
#define MOE_WAIT_GRID_BOUNDS __launch_bounds__(MOE_WAIT_GRID_THREADS, MOE_WAIT_GRID_BLOCKS_PER_SM)

__device__ __forceinline__ void moe_st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void moe_st_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
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

/* Records `code` in the rank's error record (moe_error.h: the first fatal
 * error wins; any thread may call it). */
__device__ __forceinline__ void moe_record_error(const moe_rank_ctx_t& c, int code) {
  moe_error_record_kernel(c.errorClaim, c.error, code, NULL);
}

/* True when a fatal error was recorded (a wait of this rank timed out, so the
 * epochs of the ranks no longer agree; the network proxy failed; a peer sent
 * impossible counts; the host aborted): every later kernel of the comm does
 * nothing. The host's word is host memory: a read crosses PCIe, so waits read
 * it at a bounded rate. */
__device__ __forceinline__ bool moe_comm_broken(const moe_rank_ctx_t& c) {
  return moe_error_fatal(c.errorClaim, c.error);
}

/* Every thread of the block, at a kernel's start: false when the comm is
 * broken (one thread reads the error record). Ends with a block barrier. */
__device__ __forceinline__ bool moe_block_proceed(const moe_rank_ctx_t& c) {
  return __syncthreads_and(threadIdx.x != 0 || !moe_comm_broken(c)) != 0;
}

/* Records a timeout with what was waited for: the flag's target `want`, the
 * rank expected to write it (-1: unknown) and the value last read. */
__device__ __noinline__ inline void moe_record_timeout(const moe_rank_ctx_t& c, moe_wait_t what, unsigned long long want,
                                                int peer, unsigned long long seen) {
  const moe_error_details_t d = {what, peer, want, seen};
  moe_error_record_kernel(c.errorClaim, c.error, MOE_KERR_TIMEOUT, &d);
}

/* How often a wait that has not ended reads the error record, and the first
 * time it does: a fast wait never reads it. */
#define MOE_WAIT_ERROR_CHECK_NS 1000000
/* `start` of moe_wait_geq: the timeout counts from the wait's first miss. */
#define MOE_WAIT_FROM_NOW 0

/* The one way a kernel waits: until *flag >= want (epochs, use and operation
 * numbers and progress words only grow), read with acquire at system scope
 * (the writer is a peer GPU, another process or the CPU proxy). The timeout
 * (ctx.timeoutNs) counts from `start` (a moe_now_ns() value, or
 * MOE_WAIT_FROM_NOW). Returns true once arrived, with the value read in
 * *seen_p (may be NULL); false on a timeout (recorded: `what`, want, `peer`
 * (-1: unknown), the value seen) or once the comm is broken (another wait
 * timed out, the proxy failed). Never traps. */
__device__ inline bool moe_wait_geq(const moe_rank_ctx_t& c, const unsigned long long* flag, unsigned long long want,
                                    moe_wait_t what, int peer, long long start, unsigned long long* seen_p) {
  unsigned long long v = moe_ld_acquire_sys(flag);
  if (v < want) {
    const long long first = moe_now_ns();
    const long long since = start != MOE_WAIT_FROM_NOW ? start : first;
    long long nextCheck = first + MOE_WAIT_ERROR_CHECK_NS;
    for (;;) {
      v = moe_ld_acquire_sys(flag);
      if (v >= want) break;
      const long long now = moe_now_ns();
      if (now > nextCheck) {
        if (moe_comm_broken(c)) return false;
        nextCheck = now + MOE_WAIT_ERROR_CHECK_NS;
      }
      if (now - since > c.timeoutNs) {
        moe_record_timeout(c, what, want, peer, v);
        return false;
      }
    }
  }
  if (seen_p != NULL) *seen_p = v;
  return true;
}

__device__ __forceinline__ unsigned long long* moe_signal_slot(const moe_rank_ctx_t& c, int owner,
                                                               int from) {
  return reinterpret_cast<unsigned long long*>(c.peers.base[owner] + c.layout.signals) + from;
}

/* The all-to-all barrier of the ranks whose memory this rank maps (the
 * ranks of its node), in two steps that moe_barrier runs back to back (the
 * split halves of dispatch / combine run them apart). Ranks run the same
 * sequence of barriers, so a per-rank counter names each one (graph replays
 * included); a peer already at a later barrier satisfies ">= epoch" too.
 * Arrive (ONE thread): this rank's next epoch, stored to every mapped peer
 * after this rank's earlier stores; returns the epoch. */
__device__ inline unsigned long long moe_barrier_arrive(const moe_rank_ctx_t& c) {
  const unsigned long long e = *c.epoch + 1;
  *c.epoch = e;
  __threadfence_system();
  for (int r = 0; r < c.nRanks; r++)
    if (c.peers.base[r] != NULL) moe_st_release_sys(moe_signal_slot(c, r, c.rank), e);
  return e;
}

/* Wait (ONE thread): every mapped peer has reached epoch e; one timeout for
 * the whole barrier. Ranks of other nodes are met through the proxy. */
__device__ inline bool moe_barrier_wait(const moe_rank_ctx_t& c, unsigned long long e) {
  const long long start = moe_now_ns();
  for (int r = 0; r < c.nRanks; r++) {
    if (c.peers.base[r] == NULL) continue;
    if (!moe_wait_geq(c, moe_signal_slot(c, c.rank, r), e, MOE_WAIT_BARRIER, r, start, NULL)) return false;
  }
  return true;
}

__device__ inline bool moe_barrier(const moe_rank_ctx_t& c) { return moe_barrier_wait(c, moe_barrier_arrive(c)); }

/* Called by every thread at the end of a kernel: the last block to finish
 * returns true (in thread 0) to run the kernel's epilogue. */
__device__ inline bool moe_last_block(const moe_rank_ctx_t& c) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x != 0) return false;
  const unsigned int prev = atomicAdd(c.blocksDone, 1u);
  if (prev != gridDim.x - 1) return false;
  *c.blocksDone = 0;
  __threadfence();
  return true;
}

/* Called by every thread of every block at the end of a kernel that wrote to
 * (or read from) peers: the last block to finish runs the barrier, so the
 * kernel completes only when every peer has finished the same phase. */
__device__ inline void moe_grid_done_barrier(const moe_rank_ctx_t& c) {
  if (moe_last_block(c)) moe_barrier(c);
}

#endif
