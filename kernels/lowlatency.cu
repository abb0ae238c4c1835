/* SPDX-License-Identifier: Apache-2.0 */
/* Low-latency (decode) dispatch and combine, intranode over peer stores.
 *
 * Dispatch (use n of buffer set b; one kernel per rank when both halves run
 * together, else a send kernel and a receive kernel):
 *  A. every block counts this rank's (token, expert) pairs per expert (an
 *     expert repeated in a token's row counts once), and those of the tokens
 *     before its own token range;
 *  B. the count vector goes to every rank (count message + cntFlag = n);
 *  C. blocks wait for the count messages of all ranks: the rows of source s
 *     for expert e at its receiver start after the rows of sources 0..s-1,
 *     so each pair's final row is known and senders write straight into the
 *     receiver's expert-major output (no staging copy). A message for use n
 *     from every rank also proves every rank has started use n of set b, so
 *     it has finished with use n - 1's outputs (the API's rules);
 *  D. one warp per block assigns rows to the block's pairs in token order
 *     (deterministic output order); warps then cast each (token, 512-channel
 *     chunk) to FP8 once, store it to every destination, and after a fence
 *     mark that chunk of the destination row arrived (rowFlag = n);
 *  Receive: wait until every chunk of every row this rank receives (known
 *     from the count messages) is marked n. No second all-to-all round.
 * Combine (use c of set b, half h = c % 2 of the combine rows):
 *  send: every received row goes back to (source rank, token, top-k slot) in
 *     half h of the source's combX, each 512-channel chunk marked (combFlag =
 *     c) after a fence;
 *  receive: for each (token, chunk), wait for the marks of the token's rows
 *     (known from this rank's own routing), reduce the top-k rows in k order
 *     in fp32 (fma, weights), write BF16. Reduction starts as rows arrive.
 * Why half h is free when combine c writes it: the last reader of half h was
 * the source's receive of combine c - 2 (same set), which the source ran
 * before its send of combine c - 1; the writer's receive of combine c - 1
 * waited for that send's rows. (Combines of one set are ordered on every rank
 * by the API's rules; a dispatch between them changes nothing.)
 *
 * Flags are never cleared: each carries the use number of its set, counted
 * on the GPU (seq), so graph replays advance it. Every wait is bounded by the
 * comm's timeout and records MOE_KERR_TIMEOUT; ids out of range are dropped
 * and recorded; counts and row metadata from peers are checked before use. */
#include "kernels/moe_copy.cuh"
#include "kernels/moe_fp8.cuh"
#include "kernels/moe_kernels.h"
#include "kernels/moe_lowlatency.h"
#include "kernels/moe_sync.cuh"

#define MOE_LL_CHUNK_GROUPS 4                              /* dispatch item: 4 blocks = 512 channels */
#define MOE_LL_CHUNK (MOE_LL_CHUNK_GROUPS * NCCL_MOE_FP8_BLOCK)
#define MOE_LL_LANE_VECS (MOE_LL_CHUNK / MOE_VEC_BF16 / MOE_WARP) /* 16-byte vectors per lane per chunk */
#define MOE_LL_FLAG_VEC (MOE_LL_FLAG_CHANNELS / MOE_VEC_BF16) /* 16-byte vectors per flagged chunk */
#define MOE_LL_COMBINE_SEND_FLAGS 4                        /* combine send item: 4 flagged chunks */
#define MOE_LL_COMBINE_KGROUP 4                            /* top-k rows loaded at once */
#define MOE_LL_BATCH 4                                     /* items a warp stores before one fence */
#define MOE_LL_PREFETCH 4                                  /* token rows of expert ids loaded at once */

#ifdef MOE_LL_TRACE /* a diagnostic build: phase times of the low-latency kernels */
#define MOE_LL_TRACE_POINTS 16
__device__ unsigned long long moe_ll_trace_buf[NCCL_MOE_MAX_RANKS][MOE_LL_TRACE_POINTS];
#define MOE_LL_T(c, i) \
  do { if (threadIdx.x == 0) atomicMax(&moe_ll_trace_buf[(c).rc.rank][i], (unsigned long long)moe_now_ns()); } while (0)
/* The same once every thread of the block got there. */
#define MOE_LL_T_ALL(c, i) do { __syncthreads(); MOE_LL_T(c, i); } while (0)
extern "C" cudaError_t moe_ll_trace_take(unsigned long long* out, int n) {
  cudaError_t e = cudaMemcpyFromSymbol(out, moe_ll_trace_buf, sizeof(unsigned long long) * n * MOE_LL_TRACE_POINTS);
  static const unsigned long long zero[NCCL_MOE_MAX_RANKS][MOE_LL_TRACE_POINTS] = {};
  if (e == cudaSuccess) e = cudaMemcpyToSymbol(moe_ll_trace_buf, zero, sizeof(zero));
  return e;
}
#else
#define MOE_LL_T(c, i) do { } while (0)
#define MOE_LL_T_ALL(c, i) do { } while (0)
#endif

static_assert(MOE_LL_CHUNK == MOE_LL_FLAG_CHANNELS, "a dispatch item is one flagged chunk");
static_assert(MOE_LL_CHUNK_GROUPS == 4, "a dispatch item's UE8M0 scales are one 32-bit word");
static_assert(MOE_LL_FLAG_VEC == 2 * MOE_WARP, "a combine receive item is two vectors per lane");

/* ------------------------------------------------------------- helpers */
__device__ __forceinline__ unsigned long long* moe_ll_cnt_flag(const moe_ll_ctx_t& c, int owner, int set, int from) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[owner] + c.l.cntFlag) + (size_t)set * c.rc.nRanks + from;
}

/* Chunk f of dispatch row `row` of set `set` at rank `owner`. */
__device__ __forceinline__ unsigned long long* moe_ll_row_flag(const moe_ll_ctx_t& c, int owner, int set, size_t row,
                                                               int f) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[owner] + c.l.rowFlag[set]) + row * c.l.flagChunks + f;
}

/* Index of combine row (half, token, slot) of a set: in combX rows and in
 * combFlag rows of flagChunks flags. */
__device__ __forceinline__ size_t moe_ll_comb_row(const moe_ll_ctx_t& c, int half, int t, int k) {
  return ((size_t)half * c.maxTokens + t) * c.maxTopk + k;
}

__device__ __forceinline__ unsigned long long* moe_ll_comb_flag(const moe_ll_ctx_t& c, int owner, int set, size_t crow,
                                                                int f) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[owner] + c.l.combFlag[set]) + crow * c.l.flagChunks + f;
}

__device__ __forceinline__ unsigned long long* moe_ll_seq(const moe_ll_ctx_t& c, int set, int op) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[c.rc.rank] + c.l.seq) + set * MOE_LL_OPS + op;
}

/* The current use count of (set, op), as the previous kernel left it. */
__device__ __forceinline__ unsigned long long moe_ll_read_seq(const moe_ll_ctx_t& c, int set, int op) {
  return *reinterpret_cast<volatile unsigned long long*>(moe_ll_seq(c, set, op));
}

/* Every thread of every block, once the block no longer reads seq: the last
 * block to get here stores seq(set, op) = n. Local memory only: the next
 * kernel of this rank reads it. */
__device__ void moe_ll_count_use(const moe_ll_ctx_t& c, int set, int op, unsigned long long n) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int* done = reinterpret_cast<unsigned int*>(c.rc.peers.base[c.rc.rank] + c.l.done) + set * MOE_LL_OPS + op;
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0; /* every block has counted: the next launch starts from 0 */
      *moe_ll_seq(c, set, op) = n;
    }
  }
}

/* Every thread of the block: waits for the count messages of use n from
 * every rank of this node. True in every thread when all arrived. Ends with a block
 * barrier. */
__device__ bool moe_ll_wait_counts(const moe_ll_ctx_t& c, int set, unsigned long long n) {
  bool ok = true;
  for (int r = threadIdx.x; r < c.rc.nRanks; r += blockDim.x)
    if (c.rc.peers.base[r] != NULL)
      ok &= moe_wait_geq(c.rc, moe_ll_cnt_flag(c, c.rc.rank, set, r), n, MOE_WAIT_LL_COUNTS, r, MOE_WAIT_FROM_NOW, NULL);
  return __syncthreads_and(ok);
}

/* ------------------------------------------------------------- network */
__device__ __forceinline__ char* moe_ll_net_slab(const moe_ll_ctx_t& c, char* region, int ch, int j) {
  return moe_net_slab(&c.net.geom, region, ch, j);
}

/* Every thread of the block: waits until counter[ch][j] >= want for every
 * remote rank j (the proxy's counters, host memory). Ends with a block
 * barrier. */
__device__ bool moe_ll_net_wait(const moe_ll_ctx_t& c, const volatile unsigned long long (*counter)[MOE_MAX_NODES],
                                int ch, unsigned long long want) {
  bool ok = true;
  for (int j = threadIdx.x; j < c.net.nRemote; j += blockDim.x)
    ok &= moe_wait_geq(c.rc, const_cast<const unsigned long long*>(&counter[ch][j]), want, MOE_WAIT_NET,
                       c.net.remoteRank[j], MOE_WAIT_FROM_NOW, NULL);
  return __syncthreads_and(ok);
}

/* The slabs a send half writes to the remote ranks: rows[j] records of
 * `record` bytes after a `header`, each record written in partsPerRow parts
 * by warps, the header in one more. */
struct moe_ll_slabs_t {
  int ch, partsPerRow;
  unsigned long long header, record;
  const int* rows; /* [nRemote] */
};

/* One more part of slab j of use n written (the caller fenced its stores at
 * system scope): the part that completes the slab hands it to the proxy as
 * one chunk. */
__device__ void moe_ll_net_add(const moe_ll_ctx_t& c, const moe_ll_slabs_t& s, int j, unsigned long long n) {
  unsigned int* done = reinterpret_cast<unsigned int*>(c.rc.peers.base[c.rc.rank] + c.l.netDone) +
                       (size_t)s.ch * c.rc.nRanks + j;
  const unsigned total = (unsigned)s.rows[j] * s.partsPerRow + 1;
  if (atomicAdd(done, 1u) + 1 != total) return;
  *done = 0; /* every part of this use is in: the next use starts from 0 */
  moe_net_flags_t* f = c.net.flags;
  const unsigned long long bytes = s.header + (unsigned long long)s.rows[j] * s.record;
  f->bytes[s.ch][j] = bytes;
  f->nchunks[s.ch][j] = 1;
  f->chunkBytes[s.ch][j] = bytes;
  f->chunkReady[s.ch][j][0] = n;
  __threadfence_system();
  moe_st_release_sys(const_cast<unsigned long long*>(&f->ready[s.ch][j]), n);
}

/* Every thread of every block, at the end of a receive half that read the
 * network slabs of use n of (set, op): the last block to finish returns
 * them to the proxy (consumed = n), which lets the senders reuse them. */
__device__ void moe_ll_net_release(const moe_ll_ctx_t& c, int set, int op, unsigned long long n) {
  __syncthreads(); /* the block's reads of the slabs are done */
  if (threadIdx.x != 0) return;
  unsigned int* done = reinterpret_cast<unsigned int*>(c.rc.peers.base[c.rc.rank] + c.l.recvDone) + set * MOE_LL_OPS + op;
  __threadfence();
  if (atomicAdd(done, 1u) != gridDim.x - 1) return;
  *done = 0;
  __threadfence_system();
  const int ch = MOE_LL_NET_CHANNEL(op, set);
  for (int j = 0; j < c.net.nRemote; j++)
    moe_st_release_sys(const_cast<unsigned long long*>(&c.net.flags->consumed[ch][j]), n);
}

/* A warp's arrival marks and network parts, stored once the warp's data
 * stores are visible: one fence for up to MOE_LL_BATCH items. Marks: NULL
 * entries are skipped; parts: net[j] is the remote rank whose slab (of
 * `slabs`) the item wrote, -1 none. */
__device__ __forceinline__ void moe_ll_mark(const moe_ll_ctx_t& c, unsigned long long* const* flags, const int* net,
                                            const moe_ll_slabs_t& slabs, unsigned long long n) {
  __syncwarp();
  bool any = false;
#pragma unroll
  for (int j = 0; j < MOE_LL_BATCH; j++) any |= flags[j] != NULL || net[j] >= 0;
  if (!__any_sync(MOE_FULL_MASK, any)) return;
  __threadfence_system(); /* with the warp barrier: every lane's stores before any mark */
#pragma unroll
  for (int j = 0; j < MOE_LL_BATCH; j++) {
    if (flags[j] != NULL) moe_st_relaxed_sys(flags[j], n);
    if (net[j] >= 0) moe_ll_net_add(c, slabs, net[j], n);
  }
}

/* In-place exclusive scan of s[0..n) by one full warp; s[n] = total. */
__device__ void moe_ll_warp_scan(int* s, int n, int lane) {
  const int per = (n + MOE_WARP - 1) / MOE_WARP;
  const int lo = min(n, lane * per), hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; i++) sum += s[i];
  int incl = sum;
#pragma unroll
  for (int d = 1; d < MOE_WARP; d <<= 1) {
    const int y = __shfl_up_sync(MOE_FULL_MASK, incl, d);
    if (lane >= d) incl += y;
  }
  int run = incl - sum;
  for (int i = lo; i < hi; i++) {
    const int v = s[i];
    s[i] = run;
    run += v;
  }
  if (lane == MOE_WARP - 1) s[n] = incl;
}

/* ------------------------------------------------------ dispatch: send */
/* The token's expert ids of a lane (k = lane % 16 of a half-warp, or lane):
 * valid ids get a key shared by equal ids of the same token; invalid lanes
 * get unique keys, so __match_any_sync groups repeats of one expert. */
__device__ __forceinline__ unsigned long long moe_ll_key(int64_t id, int E, int tokenTag, int lane, bool* valid) {
  *valid = id >= 0 && id < E;
  return *valid ? (unsigned long long)(id * 2 + tokenTag) : ~(unsigned long long)lane;
}

/* Phase A: sCnt[e] = pairs of this rank for expert e; sStart[e] = those of
 * tokens before tBegin. Two tokens per warp (topk <= 16). */
__device__ void moe_ll_count(const moe_ll_args_t& a, int E, int tBegin, int* sCnt, int* sStart) {
  const int lane = threadIdx.x % MOE_WARP, warp = threadIdx.x / MOE_WARP;
  const int nWarps = blockDim.x / MOE_WARP, half = lane / 16, k = lane % 16;
  const int T = a.numTokens, step = 2 * nWarps;
  for (int t0 = 2 * warp; t0 < T; t0 += MOE_LL_PREFETCH * step) {
    int64_t ids[MOE_LL_PREFETCH]; /* every load first: one latency, not one per token pair */
#pragma unroll
    for (int j = 0; j < MOE_LL_PREFETCH; j++) {
      const int t = t0 + j * step + half;
      ids[j] = t < T && k < a.topk ? __ldg(a.topkIdx + (size_t)t * a.topk + k) : -1;
    }
#pragma unroll
    for (int j = 0; j < MOE_LL_PREFETCH; j++) {
      if (t0 + j * step >= T) break; /* warp-uniform */
      const int t = t0 + j * step + half;
      bool valid;
      const unsigned long long key = moe_ll_key(ids[j], E, half, lane, &valid);
      const unsigned m = __match_any_sync(MOE_FULL_MASK, key);
      if (valid && __ffs(m) - 1 == lane) {
        atomicAdd(&sCnt[ids[j]], 1);
        if (t < tBegin) atomicAdd(&sStart[ids[j]], 1);
      }
    }
  }
}

/* Phase B: this block's share of the count messages to the ranks of this
 * node (ranks blockIdx.x, blockIdx.x + gridDim.x, ...), each followed by its
 * flag. (Remote ranks get the counts in their slab's header.) */
__device__ void moe_ll_send_counts(const moe_ll_ctx_t& c, const moe_ll_args_t& a, const int* sCnt,
                                   unsigned long long n) {
  const int N = c.rc.nRanks, E = c.numExperts, MI = c.l.msgInts;
  if ((int)blockIdx.x >= N) return;
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  for (int r = blockIdx.x; r < N; r += gridDim.x) {
    if (c.rc.peers.base[r] == NULL) continue;
    volatile int* msg = reinterpret_cast<int*>(c.rc.peers.base[r] + c.l.counts[a.set]) + (size_t)c.rc.rank * MI;
    for (int i = threadIdx.x; i < E; i += blockDim.x) msg[i] = sCnt[i];
    if (threadIdx.x == 0) {
      msg[MOE_LL_MSG_HIDDEN(E)] = a.hidden;
      msg[MOE_LL_MSG_TYPE(E)] = typeCode;
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int r = blockIdx.x; r < N; r += gridDim.x)
      if (c.rc.peers.base[r] != NULL) moe_st_release_sys(moe_ll_cnt_flag(c, r, a.set, c.rc.rank), n);
}

/* A count from a peer's message (after its flag was acquired), checked:
 * 0 <= v <= M. */
__device__ __forceinline__ int moe_ll_msg_count(const int* msg, int M, int* fault) {
  int v = __ldcg(msg);
  if (v < 0 || v > M) {
    *fault = MOE_KERR_BAD_NOTIFY;
    v = v < 0 ? 0 : M;
  }
  return v;
}

/* Phase C (after every count message of this node arrived): sStart[e] +=
 * the rows before this rank's at e's receiver (blocks with tokens): on this
 * node, those of the sources before this rank; on another node, this rank's
 * rows to that receiver's experts before e (records in the slab to it).
 * sTot[l] = rows local expert l receives from this node (every block; block
 * 0 also stores them in localCount). Returns false in every thread when
 * the ranks disagree on hidden / type (then nothing is sent and sTot is 0). */
__device__ bool moe_ll_place(const moe_ll_ctx_t& c, const moe_ll_args_t& a, bool hasTokens, const int* sCnt,
                             int* sStart, int* sTot) {
  const int N = c.rc.nRanks, E = c.numExperts, L = c.rc.numLocalExperts, M = c.maxTokens, MI = c.l.msgInts;
  const int s = c.rc.rank;
  const int* msgs = reinterpret_cast<const int*>(c.rc.peers.base[s] + c.l.counts[a.set]);
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  int fault = 0, differs = 0;
  for (int r = threadIdx.x; r < N; r += blockDim.x)
    if (c.rc.peers.base[r] != NULL)
      differs |= __ldcg(msgs + (size_t)r * MI + MOE_LL_MSG_HIDDEN(E)) != a.hidden ||
                 __ldcg(msgs + (size_t)r * MI + MOE_LL_MSG_TYPE(E)) != typeCode;
  const bool mismatch = __syncthreads_or(differs);
  if (hasTokens)
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      int base = 0;
      if (c.rc.peers.base[e / L] != NULL) {
        for (int r = 0; r < s; r++)
          if (c.rc.peers.base[r] != NULL) base += moe_ll_msg_count(msgs + (size_t)r * MI + e, M, &fault);
      } else {
        for (int e0 = e - e % L; e0 < e; e0++) base += sCnt[e0];
      }
      sStart[e] += base;
    }
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int sum = 0;
    for (int r = 0; r < N; r++)
      if (c.rc.peers.base[r] != NULL) sum += moe_ll_msg_count(msgs + (size_t)r * MI + s * L + l, M, &fault);
    sTot[l] = mismatch ? 0 : sum;
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    int* localCount = reinterpret_cast<int*>(c.rc.peers.base[s] + c.l.localCount[a.set]);
    for (int l = threadIdx.x; l < L; l += blockDim.x) localCount[l] = sTot[l];
    if (fault) moe_record_error(c.rc, fault); /* one report per rank */
    if (mismatch && threadIdx.x == 0) moe_record_error(c.rc, MOE_KERR_MISMATCH);
  }
  return !mismatch;
}

/* Phase B for the remote ranks (blocks with tokens, and blocks that write a
 * header): sRows[j] = this rank's rows to remote rank j; once the proxy has
 * sent the slabs of the previous use (sent >= n - 1), the headers of slabs
 * j = blockIdx.x (mod gridDim.x). False when the wait failed. */
__device__ bool moe_ll_net_begin_dispatch(const moe_ll_ctx_t& c, const moe_ll_args_t& a, const int* sCnt, int* sRows,
                                          const moe_ll_slabs_t& slabs, unsigned long long n) {
  const int L = c.rc.numLocalExperts, R = c.net.nRemote;
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const int* cnt = sCnt + (size_t)c.net.remoteRank[j] * L;
    int rows = 0;
    for (int l = 0; l < L; l++) rows += cnt[l];
    sRows[j] = rows;
  }
  if (!moe_ll_net_wait(c, c.net.flags->sent, slabs.ch, n - 1)) return false;
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  for (int j = blockIdx.x; j < R; j += gridDim.x) {
    volatile int* h = reinterpret_cast<int*>(moe_ll_net_slab(c, c.net.sendBuf, slabs.ch, j));
    const int* cnt = sCnt + (size_t)c.net.remoteRank[j] * L;
    for (int l = threadIdx.x; l < L; l += blockDim.x) h[l] = cnt[l];
    if (threadIdx.x == 0) {
      h[L] = a.hidden;
      h[L + 1] = typeCode;
      h[L + 2] = sRows[j];
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int j = blockIdx.x; j < R; j += gridDim.x) moe_ll_net_add(c, slabs, j, n);
  return true;
}

/* Phase D, one warp: rows for the pairs of tokens [tBegin, tEnd), in token
 * order, into route, and with remote ranks their remote index into
 * routePeer (see moe_lowlatency.h). With place == false every pair is
 * marked unsent. */
__device__ void moe_ll_assign_rows(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int tBegin, int tEnd, int* sStart,
                                   bool place, int* route, int* routePeer) {
  const int lane = threadIdx.x % MOE_WARP, K = a.topk, E = c.numExperts;
  bool bad = false;
  for (int t0 = tBegin; t0 < tEnd; t0 += MOE_LL_PREFETCH) {
    int64_t ids[MOE_LL_PREFETCH]; /* the rows depend on each other, the loads do not */
#pragma unroll
    for (int j = 0; j < MOE_LL_PREFETCH; j++)
      ids[j] = lane < K && t0 + j < tEnd ? __ldg(a.topkIdx + (size_t)(t0 + j) * K + lane) : -1;
#pragma unroll
    for (int j = 0; j < MOE_LL_PREFETCH; j++) {
      const int t = t0 + j;
      if (t >= tEnd) break;
      const int64_t id = ids[j];
      bad |= lane < K && (id < -1 || id >= E);
      bool valid;
      const unsigned long long key = moe_ll_key(id, E, 0, lane, &valid);
      const unsigned m = __match_any_sync(MOE_FULL_MASK, key);
      const int leader = __ffs(m) - 1;
      int rv = -1;
      if (valid && place) {
        if (leader == lane) {
          rv = sStart[id]; /* repeats were folded: the ids of leaders differ */
          sStart[id] = rv + 1;
        } else {
          rv = -2 - leader;
        }
      }
      if (lane < K) route[(size_t)t * K + lane] = rv;
      if (lane < K && routePeer != NULL) routePeer[(size_t)t * K + lane] = valid ? c.net.slot[id / c.rc.numLocalExperts] : -1;
      __syncwarp();
    }
  }
  if (__any_sync(MOE_FULL_MASK, bad) && lane == 0) moe_record_error(c.rc, MOE_KERR_BAD_EXPERT);
}

/* A lane's vectors of one 512-channel chunk of BF16 token t: FP8 layout (a
 * half-warp per 128-channel block) or plain (lane-strided). */
__device__ __forceinline__ void moe_ll_load_chunk(const moe_ll_args_t& a, int t, int chunk, uint4* v) {
  const int lane = threadIdx.x % MOE_WARP;
  const uint4* xrow = reinterpret_cast<const uint4*>(static_cast<const char*>(a.x) + (size_t)t * a.hidden * 2);
#pragma unroll
  for (int u = 0; u < MOE_LL_LANE_VECS; u++) {
    v[u] = make_uint4(0, 0, 0, 0);
    if (a.sendFp8) {
      const int g = chunk * MOE_LL_CHUNK_GROUPS + 2 * u + lane / MOE_FP8_BLOCK_LANES;
      if (g < a.hidden / NCCL_MOE_FP8_BLOCK) v[u] = moe_ld_nc(xrow + (size_t)g * MOE_FP8_BLOCK_LANES + lane % MOE_FP8_BLOCK_LANES);
    } else {
      const int i = chunk * (MOE_LL_CHUNK / MOE_VEC_BF16) + u * MOE_WARP + lane;
      if (i < a.hidden / MOE_VEC_BF16) v[u] = moe_ld_nc(xrow + i);
    }
  }
}

/* One 512-channel chunk of a token, cast to FP8 (a half-warp per 128-channel
 * block), stored to every destination lane in dmask. Lane k holds the
 * payload and scale row of top-k slot k's destination (an output row on
 * this node, or a record in the slab to a remote rank). */
template <bool NET, bool COLMAJOR>
__device__ __forceinline__ void moe_ll_put_fp8(const moe_ll_args_t& a, const uint4* v, int chunk, unsigned dmask,
                                               char* dPay, char* dScale, bool remote) {
  const int lane = threadIdx.x % MOE_WARP, half = lane / MOE_FP8_BLOCK_LANES, sub = lane % MOE_FP8_BLOCK_LANES;
  const int nS = a.hidden / NCCL_MOE_FP8_BLOCK;
  const int pow2 = a.scaleFormat != MOE_LL_SCALE_FLOAT;
  uint2 code[MOE_LL_CHUNK_GROUPS / 2];
  float scale[MOE_LL_CHUNK_GROUPS / 2];
#pragma unroll
  for (int u = 0; u < MOE_LL_CHUNK_GROUPS / 2; u++) code[u] = moe_fp8_cast_block_dev(v[u], pow2, MOE_FULL_MASK, &scale[u]);
  const int ue8m0Row = (nS + 3) / 4 * 4; /* bytes per UE8M0 scale row */
  for (unsigned m = dmask; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    uint8_t* xdst = reinterpret_cast<uint8_t*>(__shfl_sync(MOE_FULL_MASK, reinterpret_cast<unsigned long long>(dPay), k));
    uint8_t* sdst = reinterpret_cast<uint8_t*>(__shfl_sync(MOE_FULL_MASK, reinterpret_cast<unsigned long long>(dScale), k));
    /* Bytes between two 4-byte scale words of the row: 4 row-major (and in
     * a network record), 4 x the padded token count column-major
     * (ncclMoeScaleColMajor). A compile-time choice: the row-major kernels
     * stay as lean as before. */
    int ws = 4; /* < 2^31: at most 4 * 64 ranks * 4096 tokens */
    if (COLMAJOR) {
      ws = 4 * a.scaleTokenStride;
      if (NET && __shfl_sync(MOE_FULL_MASK, (int)remote, k)) ws = 4;
    }
#pragma unroll
    for (int u = 0; u < MOE_LL_CHUNK_GROUPS / 2; u++) {
      const int g = chunk * MOE_LL_CHUNK_GROUPS + 2 * u + half;
      if (g >= nS) continue;
      reinterpret_cast<uint2*>(xdst + (size_t)g * NCCL_MOE_FP8_BLOCK)[sub] = code[u];
      if (!COLMAJOR) { /* row-major: byte / float g of the row */
        if (a.scaleFormat == MOE_LL_SCALE_UE8M0) {
          if (sub == 0) sdst[g] = (uint8_t)(__float_as_uint(scale[u]) >> 23);
          if (g == nS - 1 && sub > 0 && g + sub < ue8m0Row) sdst[g + sub] = 0; /* pad the last word */
        } else if (sub == 0) {
          reinterpret_cast<float*>(sdst)[g] = scale[u];
        }
      } else if (a.scaleFormat == MOE_LL_SCALE_UE8M0) {
        /* Byte b of the row is byte b % 4 of word b / 4; the chunk's four
         * blocks are one word, word `chunk` (padding bytes included). */
        const int inWord = g - chunk * MOE_LL_CHUNK_GROUPS;
        if (sub == 0) sdst[chunk * ws + inWord] = (uint8_t)(__float_as_uint(scale[u]) >> 23);
        if (g == nS - 1 && sub > 0 && g + sub < ue8m0Row) sdst[chunk * ws + inWord + sub] = 0; /* pad the last word */
      } else if (sub == 0) {
        *reinterpret_cast<float*>(sdst + g * ws) = scale[u];
      }
    }
  }
}

/* One 512-channel chunk of a BF16 token to every destination in dmask. */
__device__ __forceinline__ void moe_ll_put_bf16(const moe_ll_args_t& a, const uint4* v, int chunk, unsigned dmask,
                                                char* dPay) {
  const int lane = threadIdx.x % MOE_WARP;
  const int nVec = a.hidden / MOE_VEC_BF16;
  for (unsigned m = dmask; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    uint4* dst = reinterpret_cast<uint4*>(__shfl_sync(MOE_FULL_MASK, reinterpret_cast<unsigned long long>(dPay), k));
#pragma unroll
    for (int u = 0; u < MOE_LL_LANE_VECS; u++) {
      const int i = chunk * (MOE_LL_CHUNK / MOE_VEC_BF16) + u * MOE_WARP + lane;
      if (i < nVec) dst[i] = v[u];
    }
  }
}

/* Phase D, all warps: every (token, chunk) of the block's tokens to every
 * rank its experts live on; chunk 0 also writes each row's source and slot.
 * On this node each stored chunk is then marked arrived (rowFlag = n) at
 * its receiver; a chunk of a record in a remote rank's slab counts as one
 * part of that slab (`slabs`). */
template <bool NET, bool COLMAJOR>
__device__ void moe_ll_put_tokens(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int tBegin, int tEnd,
                                  const int* route, unsigned long long n, const uint4* first,
                                  const moe_ll_slabs_t& slabs) {
  const int lane = threadIdx.x % MOE_WARP, warp = threadIdx.x / MOE_WARP;
  const int nWarps = blockDim.x / MOE_WARP, K = a.topk, L = c.rc.numLocalExperts, M = c.maxTokens;
  const long long rowsPerExpert = (long long)c.rc.nRanks * M;
  const int nChunks = (a.hidden + MOE_LL_CHUNK - 1) / MOE_LL_CHUNK;
  const int items = (tEnd - tBegin) * nChunks;
  const int esz = a.sendFp8 ? 1 : 2;
  const int scaleRow = moe_ll_scale_bytes(a.hidden, a.sendFp8, a.scaleFormat == MOE_LL_SCALE_UE8M0);
  const size_t recPayload = 16 + moe_align16((size_t)scaleRow);
  for (int it0 = warp; it0 < items; it0 += MOE_LL_BATCH * nWarps) {
    unsigned long long* marks[MOE_LL_BATCH];
    int net[MOE_LL_BATCH];
#pragma unroll
    for (int j = 0; j < MOE_LL_BATCH; j++) {
      marks[j] = NULL;
      net[j] = -1;
      const int it = it0 + j * nWarps;
      if (it >= items) continue;
      const int t = tBegin + it / nChunks, chunk = it % nChunks;
      int rv = -1, dRank = 0, pj = -1;
      long long dRow = 0;
      char *dPay = NULL, *dScale = NULL;
      if (lane < K) {
        rv = route[(size_t)t * K + lane];
        if (rv >= 0) {
          const int e = (int)__ldg(a.topkIdx + (size_t)t * K + lane); /* checked when rv was assigned */
          dRank = e / L;
          pj = NET ? c.net.slot[dRank] : -1;
          if (pj < 0) {
            char* peer = c.rc.peers.base[dRank];
            dRow = (long long)(e - dRank * L) * rowsPerExpert + rv;
            dPay = peer + c.l.recvX[a.set] + (size_t)dRow * a.hidden * esz;
            /* Row-major: row dRow of scaleRow bytes; column-major: expert
             * e - dRank * L owns [words][S], row rv at 4-byte steps. */
            dScale = COLMAJOR ? peer + c.l.recvScales[a.set] +
                                    (size_t)(e - dRank * L) * (size_t)(scaleRow * a.scaleTokenStride) + (size_t)rv * 4
                              : peer + c.l.recvScales[a.set] + (size_t)dRow * scaleRow;
          } else {
            char* rec = moe_ll_net_slab(c, c.net.sendBuf, slabs.ch, pj) + slabs.header + (size_t)rv * slabs.record;
            dScale = rec + 16;
            dPay = rec + recPayload;
          }
        }
      }
      const unsigned dmask = __ballot_sync(MOE_FULL_MASK, rv >= 0);
      if (dmask == 0) continue;
      if (chunk == 0 && rv >= 0) {
        if (pj < 0) {
          char* peer = c.rc.peers.base[dRank];
          reinterpret_cast<int*>(peer + c.l.recvSrc[a.set])[dRow] = c.rc.rank * M + t;
          reinterpret_cast<int*>(peer + c.l.recvK[a.set])[dRow] = lane;
        } else {
          *reinterpret_cast<int4*>(dScale - 16) = make_int4(t, lane, 0, 0);
        }
      }
      uint4 v[MOE_LL_LANE_VECS];
      if (it == warp) { /* the warp's first item, loaded before the count messages arrived */
#pragma unroll
        for (int u = 0; u < MOE_LL_LANE_VECS; u++) v[u] = first[u];
      } else {
        moe_ll_load_chunk(a, t, chunk, v);
      }
      if (a.sendFp8) moe_ll_put_fp8<NET, COLMAJOR>(a, v, chunk, dmask, dPay, dScale, pj >= 0);
      else moe_ll_put_bf16(a, v, chunk, dmask, dPay);
      if (rv >= 0 && pj < 0) marks[j] = moe_ll_row_flag(c, dRank, a.set, (size_t)dRow, chunk);
      if (rv >= 0) net[j] = pj;
    }
    moe_ll_mark(c, marks, net, slabs, n);
  }
}

/* sOff[l] = first flattened row of local expert l (rows of all experts in
 * one sequence), sOff[L] = all rows, from the row counts in sOff[0..L).
 * Every thread of the block; ends with a block barrier. */
__device__ int moe_ll_scan_rows(const moe_ll_ctx_t& c, int* sOff) {
  __syncthreads();
  if (threadIdx.x < MOE_WARP) moe_ll_warp_scan(sOff, c.rc.numLocalExperts, threadIdx.x);
  __syncthreads();
  return sOff[c.rc.numLocalExperts];
}

/* sOff[0..L) = counts[0..L), one of this rank's own arrays of rows per
 * local expert (written by its dispatch), clamped to the expert's rows
 * anyway. */
__device__ void moe_ll_load_counts(const moe_ll_ctx_t& c, size_t counts, int* sOff) {
  const int L = c.rc.numLocalExperts, rows = c.rc.nRanks * c.maxTokens;
  const int* cnt = reinterpret_cast<const int*>(c.rc.peers.base[c.rc.rank] + counts);
  for (int l = threadIdx.x; l < L; l += blockDim.x) sOff[l] = min(max(cnt[l], 0), rows);
}

/* The run holding item g of n runs laid end to end, run i starting at
 * start[i] (start[0] = 0 <= g < start[n], non-decreasing): the i with
 * start[i] <= g < start[i + 1]. Finds an expert from its flattened rows, a
 * network slab from its records. */
__device__ __forceinline__ int moe_ll_find_run(const int* start, int n, int g) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (start[mid] <= g) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* The source rank of row i (from this node) of local expert l (for a
 * timeout message). */
__device__ int moe_ll_row_source(const moe_ll_ctx_t& c, int set, int l, int i) {
  const int N = c.rc.nRanks, MI = c.l.msgInts, L = c.rc.numLocalExperts, M = c.maxTokens;
  const int* msgs = reinterpret_cast<const int*>(c.rc.peers.base[c.rc.rank] + c.l.counts[set]);
  int fault = 0;
  for (int r = 0; r < N; r++) {
    if (c.rc.peers.base[r] == NULL) continue;
    const int n = moe_ll_msg_count(msgs + (size_t)r * MI + c.rc.rank * L + l, M, &fault);
    if (i < n) return r;
    i -= n;
  }
  return -1;
}

/* Dispatch receive from remote ranks, every block, after the rows of this
 * node (sOff: their offsets per local expert, sOff[L] in all): waits for
 * every remote slab of use n, checks the headers, and copies the records
 * to the rows after this node's, sources in rank order; sRem[l] = rows
 * local expert l got from remote ranks. Block 0 keeps each slab's rows in
 * netRows for the combine. The slabs go back to the proxy at the end.
 * False in every thread when a wait failed or a header was bad (recorded). */
__device__ bool moe_ll_net_receive(const moe_ll_ctx_t& c, const moe_ll_args_t& a, unsigned long long n,
                                   const int* sOff, int* sRem) {
  __shared__ int sPre[NCCL_MOE_MAX_EXPERTS + NCCL_MOE_MAX_RANKS]; /* [j][L + 1]: records of slab j before expert l */
  __shared__ int sBase[NCCL_MOE_MAX_EXPERTS];                    /* [j][L]: first row of slab j's rows at expert l */
  __shared__ int sRowsPre[NCCL_MOE_MAX_RANKS + 1];               /* records of slabs before j */
  const int R = c.net.nRemote, L = c.rc.numLocalExperts, M = c.maxTokens;
  const int ch = MOE_LL_NET_CHANNEL(MOE_LL_OP_DISPATCH, a.set);
  if (!moe_ll_net_wait(c, c.net.flags->arrived, ch, n)) return false;
  const bool ue8m0 = a.scaleFormat == MOE_LL_SCALE_UE8M0;
  const size_t header = moe_ll_net_dispatch_header(L), record = moe_ll_net_dispatch_record(a.hidden, a.sendFp8, ue8m0);
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  /* Headers: every count read at once (host memory: one round trip). */
  int fault = 0;
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int j = i / L, l = i % L;
    int v = reinterpret_cast<const volatile int*>(moe_ll_net_slab(c, c.net.recvBuf, ch, j))[l];
    if (v < 0 || v > M) {
      fault = MOE_KERR_BAD_NOTIFY;
      v = 0;
    }
    sBase[i] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const volatile int* h = reinterpret_cast<const volatile int*>(moe_ll_net_slab(c, c.net.recvBuf, ch, j));
    int sum = 0;
    for (int l = 0; l < L; l++) {
      sPre[j * (L + 1) + l] = sum;
      sum += sBase[j * L + l];
    }
    sPre[j * (L + 1) + L] = sum;
    if (h[L] != a.hidden || h[L + 1] != typeCode) fault = MOE_KERR_MISMATCH;
    else if (h[L + 2] != sum || header + (size_t)sum * record > c.net.geom.slab[ch]) fault = MOE_KERR_BAD_NOTIFY;
  }
  const int bad = __syncthreads_or(fault);
  if (bad) {
    if (fault) moe_record_error(c.rc, fault);
    return false;
  }
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int j = 0; j < R; j++) {
      sRowsPre[j] = sum;
      sum += sPre[j * (L + 1) + L];
    }
    sRowsPre[R] = sum;
  }
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int base = sOff[l + 1] - sOff[l];
    for (int j = 0; j < R; j++) {
      const int cnt = sBase[j * L + l];
      sBase[j * L + l] = base;
      base += cnt;
    }
    sRem[l] = base - (sOff[l + 1] - sOff[l]);
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    int* netRows = reinterpret_cast<int*>(c.rc.peers.base[c.rc.rank] + c.l.netRows[a.set]);
    for (int j = threadIdx.x; j < R; j += blockDim.x) netRows[j] = sRowsPre[j + 1] - sRowsPre[j];
  }
  /* Records, a warp per (record, 512-channel chunk). */
  const int lane = threadIdx.x % MOE_WARP;
  const int esz = a.sendFp8 ? 1 : 2, nChunks = (a.hidden + MOE_LL_CHUNK - 1) / MOE_LL_CHUNK;
  const int nVec = a.hidden * esz / 16, chunkVec = MOE_LL_CHUNK * esz / 16;
  const int scaleRow = moe_ll_scale_bytes(a.hidden, a.sendFp8, ue8m0);
  const long long rowsPerExpert = (long long)c.rc.nRanks * M;
  char* own = c.rc.peers.base[c.rc.rank];
  const long long items = (long long)sRowsPre[R] * nChunks;
  const long long warps = (long long)gridDim.x * (blockDim.x / MOE_WARP);
  bool badRec = false;
  for (long long it = blockIdx.x * (blockDim.x / MOE_WARP) + threadIdx.x / MOE_WARP; it < items; it += warps) {
    const int g = (int)(it / nChunks), chunk = (int)(it % nChunks);
    const int j = moe_ll_find_run(sRowsPre, R, g); /* the slab, then the expert */
    const int i = g - sRowsPre[j];
    const int* pre = sPre + j * (L + 1);
    const int lo = moe_ll_find_run(pre, L, i);
    const size_t row = (size_t)lo * rowsPerExpert + sBase[j * L + lo] + (i - pre[lo]);
    const char* rec = moe_ll_net_slab(c, c.net.recvBuf, ch, j) + header + (size_t)i * record;
    const uint4* src = reinterpret_cast<const uint4*>(rec + 16 + moe_align16((size_t)scaleRow));
    uint4* dst = reinterpret_cast<uint4*>(own + c.l.recvX[a.set] + row * a.hidden * esz);
    for (int u = 0; u < esz; u++) {
      const int v = chunk * chunkVec + u * MOE_WARP + lane;
      if (v < nVec) dst[v] = moe_ld_volatile(src + v);
    }
    if (chunk != 0) continue;
    const volatile int* words = reinterpret_cast<const volatile int*>(rec + 16);
    const int nWords = scaleRow / 4;
    int* sdst = reinterpret_cast<int*>(own + c.l.recvScales[a.set]);
    for (int w = lane; w < nWords; w += MOE_WARP) {
      /* Row-major: [row][w]; column-major: expert lo's [w][S], its row row - lo * rowsPerExpert. */
      const size_t at = a.scaleTokenStride > 0
                            ? ((size_t)lo * nWords + w) * a.scaleTokenStride + (row - (size_t)lo * rowsPerExpert)
                            : row * nWords + w;
      sdst[at] = words[w];
    }
    if (lane == 0) {
      const int t = reinterpret_cast<const volatile int*>(rec)[0], k = reinterpret_cast<const volatile int*>(rec)[1];
      if (t < 0 || t >= M || k < 0 || k >= c.maxTopk) {
        badRec = true;
        continue;
      }
      reinterpret_cast<int*>(own + c.l.recvSrc[a.set])[row] = c.net.remoteRank[j] * M + t;
      reinterpret_cast<int*>(own + c.l.recvK[a.set])[row] = k;
      reinterpret_cast<int*>(own + c.l.recvPos[a.set])[row] = i;
    }
  }
  if (badRec) moe_record_error(c.rc, MOE_KERR_BAD_NOTIFY);
  moe_ll_net_release(c, a.set, MOE_LL_OP_DISPATCH, n);
  return true;
}

/* Dispatch receive, every block: waits until every chunk of every row this
 * rank receives from its node is marked n (sOff[0..L): those rows per
 * local expert, turned into offsets), then takes the rows of remote ranks.
 * Block 0 then stores the rows per local expert in recvCount and adds them
 * to the cumulative counter. */
template <bool NET>
__device__ void moe_ll_dispatch_wait(const moe_ll_ctx_t& c, const moe_ll_args_t& a, unsigned long long n, int* sOff) {
  __shared__ int sRem[NCCL_MOE_MAX_EXPERTS];
  const int L = c.rc.numLocalExperts;
  const long long rowsPerExpert = (long long)c.rc.nRanks * c.maxTokens;
  const int F = (a.hidden + MOE_LL_FLAG_CHANNELS - 1) / MOE_LL_FLAG_CHANNELS;
  const long long items = (long long)moe_ll_scan_rows(c, sOff) * F;
  bool ok = true;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; ok && i < items;
       i += (long long)gridDim.x * blockDim.x) {
    const int g = (int)(i / F), f = (int)(i % F);
    const int l = moe_ll_find_run(sOff, L, g);
    const unsigned long long* flag = moe_ll_row_flag(c, c.rc.rank, a.set, (size_t)(l * rowsPerExpert + g - sOff[l]), f);
    if (moe_ld_acquire_sys(flag) >= n) continue;
    ok = moe_wait_geq(c.rc, flag, n, MOE_WAIT_LL_DATA, moe_ll_row_source(c, a.set, l, g - sOff[l]), MOE_WAIT_FROM_NOW,
                      NULL);
  }
  for (int l = threadIdx.x; l < L; l += blockDim.x) sRem[l] = 0;
  ok = __syncthreads_and(ok);
  if (NET && ok) ok = moe_ll_net_receive(c, a, n, sOff, sRem);
  if (!ok || blockIdx.x != 0) return;
  int* recvCount = reinterpret_cast<int*>(c.rc.peers.base[c.rc.rank] + c.l.recvCount[a.set]);
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const int rows = sOff[l + 1] - sOff[l] + sRem[l];
    recvCount[l] = rows;
    if (a.cumulative != NULL) atomicAdd(reinterpret_cast<unsigned long long*>(a.cumulative) + l, (unsigned long long)rows);
    if (a.cumulative32 != NULL) atomicAdd(a.cumulative32 + l, rows);
  }
}

/* ------------------------------------------------------------ dispatch */
/* The send half; with FUSED also the receive half (one kernel per call).
 * NET: some ranks are on other nodes (c.net.nRemote > 0). COLMAJOR: FP8
 * scales column-major at the receivers (a.scaleTokenStride > 0). */
template <bool FUSED, bool NET, bool COLMAJOR>
__global__ void MOE_WAIT_GRID_BOUNDS
moe_ll_dispatch_send_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  __shared__ int sCnt[NCCL_MOE_MAX_EXPERTS];
  __shared__ int sStart[NCCL_MOE_MAX_EXPERTS];
  __shared__ int sTot[NCCL_MOE_MAX_EXPERTS + 1];
  __shared__ int sRows[NCCL_MOE_MAX_RANKS]; /* rows to each remote rank */
  const int E = c.numExperts, T = a.numTokens, L = c.rc.numLocalExperts;
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_DISPATCH) + 1;
  const int per = (T + gridDim.x - 1) / gridDim.x;
  const int tBegin = min(T, (int)blockIdx.x * per), tEnd = min(T, tBegin + per);
  const bool hasTokens = tBegin < tEnd;
  MOE_LL_T(c, 0);
  for (int i = threadIdx.x; i < E; i += blockDim.x) sCnt[i] = sStart[i] = 0;
  for (int i = threadIdx.x; i < L; i += blockDim.x) sTot[i] = 0;
  __syncthreads();
  /* Counts feed the count messages (blocks < N) and the rows of the block's
   * own tokens. */
  if (hasTokens || (int)blockIdx.x < c.rc.nRanks) moe_ll_count(a, E, tBegin, sCnt, sStart);
  __syncthreads();
  moe_ll_send_counts(c, a, sCnt, n);
  const moe_ll_slabs_t slabs = {MOE_LL_NET_CHANNEL(MOE_LL_OP_DISPATCH, a.set), (a.hidden + MOE_LL_CHUNK - 1) / MOE_LL_CHUNK,
                                moe_ll_net_dispatch_header(L),
                                moe_ll_net_dispatch_record(a.hidden, a.sendFp8, a.scaleFormat == MOE_LL_SCALE_UE8M0),
                                sRows};
  bool netOk = true;
  if (NET && (hasTokens || (int)blockIdx.x < c.net.nRemote))
    netOk = moe_ll_net_begin_dispatch(c, a, sCnt, sRows, slabs, n);
  MOE_LL_T(c, 1);

  /* Each warp's first token chunk is loaded while the count messages travel. */
  uint4 first[MOE_LL_LANE_VECS];
  {
    const int nChunks = (a.hidden + MOE_LL_CHUNK - 1) / MOE_LL_CHUNK, w = threadIdx.x / MOE_WARP;
    if (w < (tEnd - tBegin) * nChunks) moe_ll_load_chunk(a, tBegin + w / nChunks, w % nChunks, first);
  }

  /* Every block needs the counts when it also receives; block 0 writes
   * recvCount. */
  if (FUSED || hasTokens || blockIdx.x == 0) {
    bool ok = moe_ll_wait_counts(c, a.set, n) && netOk;
    MOE_LL_T(c, 2);
    if (ok) ok = moe_ll_place(c, a, hasTokens, sCnt, sStart, sTot);
    MOE_LL_T(c, 3);
    char* own = c.rc.peers.base[c.rc.rank];
    int* route = reinterpret_cast<int*>(own + c.l.route[a.set]);
    int* routePeer = NET ? reinterpret_cast<int*>(own + c.l.routePeer[a.set]) : NULL;
    if (threadIdx.x < MOE_WARP) moe_ll_assign_rows(c, a, tBegin, tEnd, sStart, ok, route, routePeer);
    __syncthreads(); /* the block's routes, written by warp 0, are read by all warps */
    MOE_LL_T(c, 4);
    if (ok) moe_ll_put_tokens<NET, COLMAJOR>(c, a, tBegin, tEnd, route, n, first, slabs);
    MOE_LL_T_ALL(c, 5);
  }
  moe_ll_count_use(c, a.set, MOE_LL_OP_DISPATCH, n);
  if (FUSED) moe_ll_dispatch_wait<NET>(c, a, n, sTot);
  MOE_LL_T(c, 6);
}

template <bool NET>
__global__ void MOE_WAIT_GRID_BOUNDS
moe_ll_dispatch_recv_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  __shared__ int sOff[NCCL_MOE_MAX_EXPERTS + 1];
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_DISPATCH);
  moe_ll_load_counts(c, c.l.localCount[a.set], sOff); /* rows per local expert from this node, from the send half */
  moe_ll_dispatch_wait<NET>(c, a, n, sOff);
}

/* ------------------------------------------------------------- combine */
/* Combine send to remote ranks, every block, before any row: sRows[j] =
 * rows received from remote rank j (its slab's records); once the proxy
 * has sent the slabs of the previous use, the headers of slabs j =
 * blockIdx.x (mod gridDim.x). False when the wait failed. */
__device__ bool moe_ll_net_begin_combine(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int* sRows,
                                         const moe_ll_slabs_t& slabs, unsigned long long cu) {
  const int R = c.net.nRemote, maxRows = c.maxTokens * min(c.maxTopk, c.rc.numLocalExperts);
  const int* netRows = reinterpret_cast<const int*>(c.rc.peers.base[c.rc.rank] + c.l.netRows[a.set]);
  for (int j = threadIdx.x; j < R; j += blockDim.x) sRows[j] = min(max(netRows[j], 0), maxRows);
  if (!moe_ll_net_wait(c, c.net.flags->sent, slabs.ch, cu - 1)) return false;
  if (threadIdx.x == 0)
    for (int j = blockIdx.x; j < R; j += gridDim.x)
      *reinterpret_cast<int4*>(moe_ll_net_slab(c, c.net.sendBuf, slabs.ch, j)) = make_int4(sRows[j], a.hidden, 0, 0);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int j = blockIdx.x; j < R; j += gridDim.x) moe_ll_net_add(c, slabs, j, cu);
  return true;
}

/* The send half of combine use cu: every received row (its expert output)
 * back to its source, 1024 channels per item: on this node into half cu % 2
 * of the source's combine rows, each 512-channel chunk marked; on another
 * node into the record of the source's slab that carried it (one part of
 * that slab per item). */
template <bool NET>
__device__ void moe_ll_combine_put(const moe_ll_ctx_t& c, const moe_ll_args_t& a, unsigned long long cu, int* sOff) {
  __shared__ int sRows[NCCL_MOE_MAX_RANKS];
  const int N = c.rc.nRanks, M = c.maxTokens, L = c.rc.numLocalExperts;
  const int half = (int)(cu % MOE_LL_COMB_HALVES);
  moe_ll_load_counts(c, c.l.recvCount[a.set], sOff);
  const int total = moe_ll_scan_rows(c, sOff);
  const int lane = threadIdx.x % MOE_WARP;
  const int nVec = a.hidden / MOE_VEC_BF16;
  const int F = (a.hidden + MOE_LL_FLAG_CHANNELS - 1) / MOE_LL_FLAG_CHANNELS;
  const int perRow = (F + MOE_LL_COMBINE_SEND_FLAGS - 1) / MOE_LL_COMBINE_SEND_FLAGS;
  constexpr int U = MOE_LL_COMBINE_SEND_FLAGS * MOE_LL_FLAG_VEC / MOE_WARP; /* vectors per lane per item */
  const long long warps = (long long)gridDim.x * (blockDim.x / MOE_WARP);
  const char* own = c.rc.peers.base[c.rc.rank];
  const int* recvSrc = reinterpret_cast<const int*>(own + c.l.recvSrc[a.set]);
  const int* recvK = reinterpret_cast<const int*>(own + c.l.recvK[a.set]);
  const int* recvPos = reinterpret_cast<const int*>(own + c.l.recvPos[a.set]);
  const moe_ll_slabs_t slabs = {MOE_LL_NET_CHANNEL(MOE_LL_OP_COMBINE, a.set), perRow, MOE_LL_NET_COMBINE_HEADER,
                                (unsigned long long)a.hidden * 2, sRows};
  if (NET && !moe_ll_net_begin_combine(c, a, sRows, slabs, cu)) return;
  bool bad = false;
  const long long items = (long long)total * perRow;
  for (long long it0 = blockIdx.x * (blockDim.x / MOE_WARP) + threadIdx.x / MOE_WARP; it0 < items;
       it0 += MOE_LL_BATCH * warps) {
    unsigned long long* marks[MOE_LL_BATCH];
    int net[MOE_LL_BATCH];
#pragma unroll
    for (int j = 0; j < MOE_LL_BATCH; j++) {
      marks[j] = NULL;
      net[j] = -1;
      const long long it = it0 + j * warps;
      if (it >= items) continue;
      const int g = (int)(it / perRow), p = (int)(it % perRow);
      const int l = moe_ll_find_run(sOff, L, g);
      const size_t row = (size_t)l * N * M + (g - sOff[l]);
      const int src = __ldcg(recvSrc + row), k = __ldcg(recvK + row); /* written by the source rank */
      if (src < 0 || src >= N * M || k < 0 || k >= c.maxTopk) {
        bad = true;
        continue;
      }
      const int s = src / M, t = src % M, pj = NET ? c.net.slot[s] : -1;
      const size_t crow = moe_ll_comb_row(c, half, t, k);
      const uint4* in = reinterpret_cast<const uint4*>(a.x) + row * nVec;
      uint4* dst;
      if (pj < 0) {
        dst = reinterpret_cast<uint4*>(c.rc.peers.base[s] + c.l.combX[a.set] + crow * c.rowBytes);
      } else {
        const int pos = __ldcg(recvPos + row);
        if (pos < 0 || pos >= sRows[pj]) {
          bad = true;
          continue;
        }
        dst = reinterpret_cast<uint4*>(moe_ll_net_slab(c, c.net.sendBuf, slabs.ch, pj) + MOE_LL_NET_COMBINE_HEADER +
                                       (size_t)pos * slabs.record);
      }
      uint4 buf[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int v = p * (U * MOE_WARP) + u * MOE_WARP + lane;
        if (v < nVec) buf[u] = moe_ld_nc(in + v);
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int v = p * (U * MOE_WARP) + u * MOE_WARP + lane;
        if (v < nVec) dst[v] = buf[u];
      }
      const int f = p * MOE_LL_COMBINE_SEND_FLAGS + lane;
      if (pj < 0 && lane < MOE_LL_COMBINE_SEND_FLAGS && f < F) marks[j] = moe_ll_comb_flag(c, s, a.set, crow, f);
      if (pj >= 0 && lane == 0) net[j] = pj;
    }
    moe_ll_mark(c, marks, net, slabs, cu);
  }
  if (bad) moe_record_error(c.rc, MOE_KERR_BAD_NOTIFY);
}

/* Combine receive from remote ranks, every block, before any reduction:
 * waits until every remote rank's slab of use cu has landed and checks its
 * header; sRows[j] = its records. False in every thread when a wait failed
 * or a header was bad (recorded). */
__device__ bool moe_ll_net_combine_wait(const moe_ll_ctx_t& c, const moe_ll_args_t& a, unsigned long long cu,
                                        int* sRows) {
  const int ch = MOE_LL_NET_CHANNEL(MOE_LL_OP_COMBINE, a.set);
  if (!moe_ll_net_wait(c, c.net.flags->arrived, ch, cu)) return false;
  const unsigned long long room = (c.net.geom.slab[ch] - MOE_LL_NET_COMBINE_HEADER) / ((unsigned long long)a.hidden * 2);
  int bad = 0;
  for (int j = threadIdx.x; j < c.net.nRemote; j += blockDim.x) {
    const volatile int* h = reinterpret_cast<const volatile int*>(moe_ll_net_slab(c, c.net.recvBuf, ch, j));
    const int rows = h[0];
    bad |= h[1] != a.hidden || rows < 0 || (unsigned long long)rows > room;
    sRows[j] = rows;
  }
  if (__syncthreads_or(bad)) {
    if (bad) moe_record_error(c.rc, MOE_KERR_BAD_NOTIFY);
    return false;
  }
  return true;
}

/* The receive half of combine use cu: per (token, 512-channel chunk), one
 * warp waits for the chunk's marks on the token's rows of this node (lane
 * k: top-k slot k when its row was sent), then reduces them in k order.
 * Rows from remote ranks are read from their slabs, which have all landed
 * before the first token (and go back to the proxy after the last). */
template <bool NET>
__device__ void moe_ll_combine_reduce(const moe_ll_ctx_t& c, const moe_ll_args_t& a, unsigned long long cu) {
  __shared__ int sRows[NCCL_MOE_MAX_RANKS];
  const int half = (int)(cu % MOE_LL_COMB_HALVES);
  const int lane = threadIdx.x % MOE_WARP, K = a.topk;
  const int nVec = a.hidden / MOE_VEC_BF16;
  const int F = (a.hidden + MOE_LL_FLAG_CHANNELS - 1) / MOE_LL_FLAG_CHANNELS;
  constexpr int U = MOE_LL_FLAG_VEC / MOE_WARP; /* vectors per lane per item */
  const long long warps = (long long)gridDim.x * (blockDim.x / MOE_WARP);
  const bool remote = NET;
  if (remote && !moe_ll_net_combine_wait(c, a, cu, sRows)) return;
  const char* own = c.rc.peers.base[c.rc.rank];
  const int* route = reinterpret_cast<const int*>(own + c.l.route[a.set]);
  const int* routePeer = reinterpret_cast<const int*>(own + c.l.routePeer[a.set]);
  const int ch = MOE_LL_NET_CHANNEL(MOE_LL_OP_COMBINE, a.set);
  const uint4* rows = reinterpret_cast<const uint4*>(own + c.l.combX[a.set]);
  const size_t rowVec = c.rowBytes / 16;
  const long long items = (long long)a.numTokens * F;
  bool ok = true, bad = false;
  for (long long it = blockIdx.x * (blockDim.x / MOE_WARP) + threadIdx.x / MOE_WARP; ok && it < items;
       it += warps) {
    const int t = (int)(it / F), f = (int)(it % F);
    /* Lane k: the row holding top-k entry k (its own, or that of the first
     * slot of the same expert; NULL if none), whether it is in a network
     * slab, and its weight. */
    const uint4* mine = NULL;
    int mineNet = 0, slot = -1;
    float w = 0.0f;
    bool arrived = true;
    if (lane < K) {
      const int rv = route[(size_t)t * K + lane];
      slot = rv >= 0 ? lane : (rv <= -2 && -2 - rv < K ? -2 - rv : -1);
      w = a.weights != NULL ? __ldg(a.weights + (size_t)t * K + lane) : 1.0f;
      const int pj = rv >= 0 && remote ? routePeer[(size_t)t * K + lane] : -1;
      if (rv >= 0 && pj < 0) {
        mine = rows + moe_ll_comb_row(c, half, t, lane) * rowVec;
        const unsigned long long* flag = moe_ll_comb_flag(c, c.rc.rank, a.set, moe_ll_comb_row(c, half, t, lane), f);
        arrived = moe_wait_geq(c.rc, flag, cu, MOE_WAIT_LL_COMBINE, -1, MOE_WAIT_FROM_NOW, NULL);
      } else if (pj >= 0 && pj < c.net.nRemote && rv < sRows[pj]) {
        mine = reinterpret_cast<const uint4*>(moe_ll_net_slab(c, c.net.recvBuf, ch, pj) + MOE_LL_NET_COMBINE_HEADER +
                                              (size_t)rv * a.hidden * 2);
        mineNet = 1;
      } else if (rv >= 0) {
        bad = true; /* a row the remote rank did not send */
        slot = -1;
      }
    }
    if (!__all_sync(MOE_FULL_MASK, arrived)) { /* timed out (recorded): the comm is broken */
      ok = false;
      break;
    }
    const uint4* src = reinterpret_cast<const uint4*>(
        __shfl_sync(MOE_FULL_MASK, reinterpret_cast<unsigned long long>(mine), slot >= 0 ? slot : lane));
    const int srcNet = __shfl_sync(MOE_FULL_MASK, mineNet, slot >= 0 ? slot : lane);
    if (slot < 0) src = NULL;
    float acc[U][MOE_VEC_BF16];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
      for (int i = 0; i < MOE_VEC_BF16; i++) acc[u][i] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += MOE_LL_COMBINE_KGROUP) {
      uint4 buf[MOE_LL_COMBINE_KGROUP][U];
      const uint4* p[MOE_LL_COMBINE_KGROUP];
#pragma unroll
      for (int j = 0; j < MOE_LL_COMBINE_KGROUP; j++) {
        const int from = (k0 + j) % MOE_WARP;
        p[j] = reinterpret_cast<const uint4*>(__shfl_sync(MOE_FULL_MASK, reinterpret_cast<unsigned long long>(src), from));
        const int net = __shfl_sync(MOE_FULL_MASK, srcNet, from);
        if (k0 + j >= K) p[j] = NULL;
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int v = f * MOE_LL_FLAG_VEC + u * MOE_WARP + lane;
          if (p[j] != NULL && v < nVec) buf[j][u] = net ? moe_ld_volatile(p[j] + v) : __ldcg(p[j] + v);
        }
      }
#pragma unroll
      for (int j = 0; j < MOE_LL_COMBINE_KGROUP; j++) {
        const float wk = __shfl_sync(MOE_FULL_MASK, w, (k0 + j) % MOE_WARP);
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int v = f * MOE_LL_FLAG_VEC + u * MOE_WARP + lane;
          if (p[j] != NULL && v < nVec) moe_fma_bf16x8(acc[u], buf[j][u], wk);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int v = f * MOE_LL_FLAG_VEC + u * MOE_WARP + lane;
      if (v < nVec) reinterpret_cast<uint4*>(a.out)[(size_t)t * nVec + v] = moe_pack_bf16x8(acc[u]);
    }
  }
  if (bad) moe_record_error(c.rc, MOE_KERR_BAD_NOTIFY);
  if (remote) moe_ll_net_release(c, a.set, MOE_LL_OP_COMBINE, cu);
}

/* The send half; with FUSED also the receive half (one kernel per call).
 * NET: some ranks are on other nodes. */
template <bool FUSED, bool NET>
__global__ void MOE_WAIT_GRID_BOUNDS
moe_ll_combine_send_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  __shared__ int sOff[NCCL_MOE_MAX_EXPERTS + 1];
  const unsigned long long cu = moe_ll_read_seq(c, a.set, MOE_LL_OP_COMBINE) + 1;
  MOE_LL_T(c, 8);
  moe_ll_combine_put<NET>(c, a, cu, sOff);
  MOE_LL_T_ALL(c, 9);
  moe_ll_count_use(c, a.set, MOE_LL_OP_COMBINE, cu);
  if (FUSED) moe_ll_combine_reduce<NET>(c, a, cu);
  MOE_LL_T_ALL(c, 10);
}

template <bool NET>
__global__ void MOE_WAIT_GRID_BOUNDS
moe_ll_combine_recv_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  moe_ll_combine_reduce<NET>(c, a, moe_ll_read_seq(c, a.set, MOE_LL_OP_COMBINE));
}

/* ------------------------------------------------------------- launches */
typedef void (*moe_ll_kernel_t)(moe_ll_ctx_t, moe_ll_args_t);

/* Every variant: [net][fused] for the send kernels (dispatch: [colmajor]
 * too), [net] for the receive kernels (net: some rank is on another node;
 * colmajor: column-major FP8 scales). */
static const moe_ll_kernel_t moe_ll_dispatch_send[2][2][2] = {
    {{moe_ll_dispatch_send_kernel<false, false, false>, moe_ll_dispatch_send_kernel<false, false, true>},
     {moe_ll_dispatch_send_kernel<true, false, false>, moe_ll_dispatch_send_kernel<true, false, true>}},
    {{moe_ll_dispatch_send_kernel<false, true, false>, moe_ll_dispatch_send_kernel<false, true, true>},
     {moe_ll_dispatch_send_kernel<true, true, false>, moe_ll_dispatch_send_kernel<true, true, true>}}};
static const moe_ll_kernel_t moe_ll_combine_send[2][2] = {
    {moe_ll_combine_send_kernel<false, false>, moe_ll_combine_send_kernel<true, false>},
    {moe_ll_combine_send_kernel<false, true>, moe_ll_combine_send_kernel<true, true>}};
static const moe_ll_kernel_t moe_ll_dispatch_recv[2] = {moe_ll_dispatch_recv_kernel<false>,
                                                        moe_ll_dispatch_recv_kernel<true>};
static const moe_ll_kernel_t moe_ll_combine_recv[2] = {moe_ll_combine_recv_kernel<false>,
                                                       moe_ll_combine_recv_kernel<true>};

static cudaError_t moe_ll_launch(moe_ll_kernel_t k, const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                 cudaStream_t stream) {
  k<<<args->numBlocks, MOE_WAIT_GRID_THREADS, 0, stream>>>(*ctx, *args);
  return cudaGetLastError();
}

static int moe_ll_net(const moe_ll_ctx_t* ctx) { return ctx->net.nRemote > 0; }

extern "C" cudaError_t moe_ll_dispatch_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                   cudaStream_t stream) {
  return moe_ll_launch(moe_ll_dispatch_send[moe_ll_net(ctx)][args->fused != 0][args->scaleTokenStride > 0], ctx,
                       args, stream);
}

extern "C" cudaError_t moe_ll_dispatch_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                   cudaStream_t stream) {
  return moe_ll_launch(moe_ll_dispatch_recv[moe_ll_net(ctx)], ctx, args, stream);
}

extern "C" cudaError_t moe_ll_combine_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                  cudaStream_t stream) {
  return moe_ll_launch(moe_ll_combine_send[moe_ll_net(ctx)][args->fused != 0], ctx, args, stream);
}

extern "C" cudaError_t moe_ll_combine_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                  cudaStream_t stream) {
  return moe_ll_launch(moe_ll_combine_recv[moe_ll_net(ctx)], ctx, args, stream);
}

extern "C" cudaError_t moe_ll_preload(void) {
  const void* kernels[16];
  int n = 0;
  for (int net = 0; net < 2; net++) {
    for (int fused = 0; fused < 2; fused++) {
      for (int colMajor = 0; colMajor < 2; colMajor++) kernels[n++] = (const void*)moe_ll_dispatch_send[net][fused][colMajor];
      kernels[n++] = (const void*)moe_ll_combine_send[net][fused];
    }
    kernels[n++] = (const void*)moe_ll_dispatch_recv[net];
    kernels[n++] = (const void*)moe_ll_combine_recv[net];
  }
  return moe_preload_kernels(kernels, n);
}
