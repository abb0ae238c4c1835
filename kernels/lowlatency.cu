/* Low-latency (decode) dispatch and combine, intranode over peer stores.
 *
 * Dispatch, send half (one kernel per rank, use n of buffer set b):
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
 *     chunk) to FP8 once and store it to every destination;
 *  E. the last block to finish publishes dataFlag = n at every rank.
 * Dispatch, receive half: waits for dataFlag = n from every rank.
 * Combine, send half: every received row goes back to (source rank, token,
 * top-k slot) in the source's combX; the last block publishes combFlag = n.
 * It first waits for combAck >= n - 1 (the source has read use n - 1).
 * Combine, receive half: waits for combFlag = n from every rank, reduces the
 * top-k rows of each token in k order in fp32 (fma, weights), writes BF16,
 * and the last block acks (combAck = n) to every rank.
 *
 * Flags are never cleared: each carries the use number n of its set, counted
 * on the GPU (seq), so graph replays advance it. Every wait is bounded by the
 * comm's timeout and records MOE_KERR_TIMEOUT; ids out of range are dropped
 * and recorded; counts and row metadata from peers are checked before use. */
#include "moe_copy.cuh"
#include "moe_fp8.cuh"
#include "moe_kernels.h"
#include "moe_lowlatency.h"
#include "moe_sync.cuh"

#define MOE_LL_WARP 32
#define MOE_LL_FULL 0xffffffffu
#define MOE_LL_THREADS 512
#define MOE_LL_MIN_BLOCKS_PER_SM 2 /* keeps every rank's blocks co-resident (<= 64 registers) */
#define MOE_LL_RECV_THREADS 128
#define MOE_LL_VEC 8                                       /* BF16 values per 16-byte vector */
#define MOE_LL_FP8_LANES MOE_FP8_BLOCK_LANES
#define MOE_LL_CHUNK_GROUPS 4                              /* dispatch item: 4 blocks = 512 channels */
#define MOE_LL_CHUNK (MOE_LL_CHUNK_GROUPS * NCCL_MOE_FP8_BLOCK)
#define MOE_LL_COMBINE_SEND_UNROLL 4                       /* combine send item: 4 x 256 channels */
#define MOE_LL_COMBINE_KGROUP 4                            /* top-k rows loaded at once */
#define MOE_LL_BROKEN_CHECK_NS 1000000                     /* how often a long wait reads the error word (host memory) */

/* ------------------------------------------------------------- helpers */
__device__ __forceinline__ unsigned long long* moe_ll_flag(const moe_ll_ctx_t& c, int owner, size_t region,
                                                           int set, int from) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[owner] + region) + (size_t)set * c.rc.nRanks + from;
}

__device__ __forceinline__ unsigned long long* moe_ll_seq(const moe_ll_ctx_t& c, int set, int op) {
  return reinterpret_cast<unsigned long long*>(c.rc.peers.base[c.rc.rank] + c.l.seq) + set * MOE_LL_OPS + op;
}

__device__ __forceinline__ unsigned int* moe_ll_done(const moe_ll_ctx_t& c, int set, int kind) {
  return reinterpret_cast<unsigned int*>(c.rc.peers.base[c.rc.rank] + c.l.done) + set * MOE_LL_DONE_KINDS + kind;
}

/* The current use count of (set, op), as the previous kernel left it. */
__device__ __forceinline__ unsigned long long moe_ll_read_seq(const moe_ll_ctx_t& c, int set, int op) {
  return *reinterpret_cast<volatile unsigned long long*>(moe_ll_seq(c, set, op));
}

/* Spins until *flag >= want (flag written by `peer` with release). False on
 * timeout (recorded) or when the comm broke meanwhile (the error word is read
 * only during long waits: it is host memory, slow to read). */
__device__ bool moe_ll_wait(const moe_ll_ctx_t& c, const unsigned long long* flag, unsigned long long want,
                            int peer, moe_wait_t what) {
  unsigned long long v = moe_ld_acquire_sys(flag);
  if (v >= want) return true;
  const long long start = moe_now_ns();
  long long nextCheck = start + MOE_LL_BROKEN_CHECK_NS;
  for (;;) {
    v = moe_ld_acquire_sys(flag);
    if (v >= want) return true;
    const long long now = moe_now_ns();
    if (now > nextCheck) {
      if (moe_comm_broken(c.rc)) return false;
      nextCheck = now + MOE_LL_BROKEN_CHECK_NS;
    }
    if (now - start > c.rc.timeoutNs) {
      moe_record_timeout(c.rc, want, peer, v, what);
      return false;
    }
  }
}

/* Every thread of the block: waits for flags[r] >= want for every rank r
 * (flags in this rank's buffer, one per source). True in every thread when
 * all arrived. Ends with a block barrier. */
__device__ bool moe_ll_wait_all(const moe_ll_ctx_t& c, size_t region, int set, unsigned long long want) {
  const moe_wait_t what = region == c.l.cntFlag    ? MOE_WAIT_LL_COUNTS
                          : region == c.l.dataFlag ? MOE_WAIT_LL_DATA
                          : region == c.l.combAck  ? MOE_WAIT_LL_ACK
                                                   : MOE_WAIT_LL_COMBINE;
  bool ok = true;
  for (int r = threadIdx.x; r < c.rc.nRanks; r += blockDim.x)
    ok &= moe_ll_wait(c, moe_ll_flag(c, c.rc.rank, region, set, r), want, r, what);
  return __syncthreads_and(ok);
}

/* Called by every thread of every block after its last peer store: true in
 * every thread of the block that finished last (its stores, and those of all
 * other blocks, are then visible system-wide). Blocks never wait here. */
__device__ bool moe_ll_last_block(unsigned int* done) {
  __shared__ int last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(done, 1u);
    last = prev == gridDim.x - 1;
    if (last) {
      *done = 0; /* every block has counted: the next launch starts from 0 */
      __threadfence_system();
    }
  }
  __syncthreads();
  return last != 0;
}

/* Publishes `value` into flag slot [set][this rank] of every rank. */
__device__ void moe_ll_publish(const moe_ll_ctx_t& c, size_t region, int set, unsigned long long value) {
  for (int r = threadIdx.x; r < c.rc.nRanks; r += blockDim.x)
    moe_st_release_sys(moe_ll_flag(c, r, region, set, c.rc.rank), value);
}

/* In-place exclusive scan of s[0..n) by one full warp; s[n] = total. */
__device__ void moe_ll_warp_scan(int* s, int n, int lane) {
  const int per = (n + MOE_LL_WARP - 1) / MOE_LL_WARP;
  const int lo = min(n, lane * per), hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; i++) sum += s[i];
  int incl = sum;
#pragma unroll
  for (int d = 1; d < MOE_LL_WARP; d <<= 1) {
    const int y = __shfl_up_sync(MOE_LL_FULL, incl, d);
    if (lane >= d) incl += y;
  }
  int run = incl - sum;
  for (int i = lo; i < hi; i++) {
    const int v = s[i];
    s[i] = run;
    run += v;
  }
  if (lane == MOE_LL_WARP - 1) s[n] = incl;
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
  const int lane = threadIdx.x % MOE_LL_WARP, warp = threadIdx.x / MOE_LL_WARP;
  const int nWarps = blockDim.x / MOE_LL_WARP, half = lane / 16, k = lane % 16;
  for (int t0 = 2 * warp; t0 < a.numTokens; t0 += 2 * nWarps) {
    const int t = t0 + half;
    int64_t id = -1;
    if (t < a.numTokens && k < a.topk) id = __ldg(a.topkIdx + (size_t)t * a.topk + k);
    bool valid;
    const unsigned long long key = moe_ll_key(id, E, half, lane, &valid);
    const unsigned m = __match_any_sync(MOE_LL_FULL, key);
    if (valid && __ffs(m) - 1 == lane) {
      atomicAdd(&sCnt[id], 1);
      if (t < tBegin) atomicAdd(&sStart[id], 1);
    }
  }
}

/* Phase B: this block's share of the count messages (ranks blockIdx.x,
 * blockIdx.x + gridDim.x, ...), each followed by its flag. */
__device__ void moe_ll_send_counts(const moe_ll_ctx_t& c, const moe_ll_args_t& a, const int* sCnt,
                                   unsigned long long n) {
  const int N = c.rc.nRanks, E = c.numExperts, MI = c.l.msgInts;
  if ((int)blockIdx.x >= N) return;
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  for (int r = blockIdx.x; r < N; r += gridDim.x) {
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
      moe_st_release_sys(moe_ll_flag(c, r, c.l.cntFlag, a.set, c.rc.rank), n);
}

/* A count from a peer's message, checked: 0 <= v <= M. */
__device__ __forceinline__ int moe_ll_msg_count(const volatile int* msg, int M, int* fault) {
  int v = *msg;
  if (v < 0 || v > M) {
    *fault = MOE_KERR_BAD_NOTIFY;
    v = v < 0 ? 0 : M;
  }
  return v;
}

/* Phase C (after every count message arrived): sStart[e] += rows of sources
 * before this rank at e's receiver; block 0 also writes recvCount. Returns
 * false in every thread when the ranks disagree on hidden / type. */
__device__ bool moe_ll_place(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int* sStart) {
  const int N = c.rc.nRanks, E = c.numExperts, L = c.rc.numLocalExperts, M = c.maxTokens, MI = c.l.msgInts;
  const int s = c.rc.rank;
  const volatile int* msgs = reinterpret_cast<const int*>(c.rc.peers.base[s] + c.l.counts[a.set]);
  const int typeCode = a.sendFp8 ? 1 + a.scaleFormat : 0;
  int fault = 0, differs = 0;
  for (int r = threadIdx.x; r < N; r += blockDim.x)
    differs |= msgs[(size_t)r * MI + MOE_LL_MSG_HIDDEN(E)] != a.hidden || msgs[(size_t)r * MI + MOE_LL_MSG_TYPE(E)] != typeCode;
  const bool mismatch = __syncthreads_or(differs);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int base = 0;
    for (int r = 0; r < s; r++) base += moe_ll_msg_count(msgs + (size_t)r * MI + e, M, &fault);
    sStart[e] += base;
  }
  if (blockIdx.x == 0) {
    int* recvCount = reinterpret_cast<int*>(c.rc.peers.base[s] + c.l.recvCount[a.set]);
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      int sum = 0;
      for (int r = 0; r < N; r++) sum += moe_ll_msg_count(msgs + (size_t)r * MI + s * L + l, M, &fault);
      recvCount[l] = mismatch ? 0 : sum;
    }
    if (fault) moe_record_error(c.rc, fault); /* one report per rank */
    if (mismatch && threadIdx.x == 0) moe_record_error(c.rc, MOE_KERR_MISMATCH);
  }
  __syncthreads();
  return !mismatch;
}

/* Phase D, one warp: rows for the pairs of tokens [tBegin, tEnd), in token
 * order, into route (see moe_lowlatency.h). With place == false every pair
 * is marked unsent. */
__device__ void moe_ll_assign_rows(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int tBegin, int tEnd, int* sStart,
                                   bool place, int* route) {
  const int lane = threadIdx.x % MOE_LL_WARP, K = a.topk, E = c.numExperts;
  bool bad = false;
  for (int t = tBegin; t < tEnd; t++) {
    int64_t id = -1;
    if (lane < K) {
      id = __ldg(a.topkIdx + (size_t)t * K + lane);
      bad |= id < -1 || id >= E;
    }
    bool valid;
    const unsigned long long key = moe_ll_key(id, E, 0, lane, &valid);
    const unsigned m = __match_any_sync(MOE_LL_FULL, key);
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
    __syncwarp();
  }
  if (__any_sync(MOE_LL_FULL, bad) && lane == 0) moe_record_error(c.rc, MOE_KERR_BAD_EXPERT);
}

/* One 512-channel chunk of a token, cast to FP8 (a half-warp per 128-channel
 * block), stored to every destination lane in dmask. Lane k holds the
 * destination rank and row of top-k slot k. */
__device__ __forceinline__ void moe_ll_put_fp8(const moe_ll_ctx_t& c, const moe_ll_args_t& a, const uint4* xrow,
                                               int chunk, unsigned dmask, int dRank, long long dRow) {
  const int lane = threadIdx.x % MOE_LL_WARP, half = lane / MOE_LL_FP8_LANES, sub = lane % MOE_LL_FP8_LANES;
  const int nS = a.hidden / NCCL_MOE_FP8_BLOCK;
  const int pow2 = a.scaleFormat != MOE_LL_SCALE_FLOAT;
  uint2 code[MOE_LL_CHUNK_GROUPS / 2];
  float scale[MOE_LL_CHUNK_GROUPS / 2];
#pragma unroll
  for (int u = 0; u < MOE_LL_CHUNK_GROUPS / 2; u++) {
    const int g = chunk * MOE_LL_CHUNK_GROUPS + 2 * u + half;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (g < nS) v = moe_ld_nc(xrow + (size_t)g * MOE_LL_FP8_LANES + sub);
    code[u] = moe_fp8_cast_block_dev(v, pow2, MOE_LL_FULL, &scale[u]);
  }
  const int ue8m0Row = (nS + 3) / 4 * 4; /* bytes per UE8M0 scale row */
  for (unsigned m = dmask; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    const int r = __shfl_sync(MOE_LL_FULL, dRank, k);
    const long long row = __shfl_sync(MOE_LL_FULL, dRow, k);
    char* peer = c.rc.peers.base[r];
    uint8_t* xdst = reinterpret_cast<uint8_t*>(peer + c.l.recvX[a.set]) + (size_t)row * a.hidden;
#pragma unroll
    for (int u = 0; u < MOE_LL_CHUNK_GROUPS / 2; u++) {
      const int g = chunk * MOE_LL_CHUNK_GROUPS + 2 * u + half;
      if (g >= nS) continue;
      reinterpret_cast<uint2*>(xdst + (size_t)g * NCCL_MOE_FP8_BLOCK)[sub] = code[u];
      if (a.scaleFormat == MOE_LL_SCALE_UE8M0) {
        uint8_t* sdst = reinterpret_cast<uint8_t*>(peer + c.l.recvScales[a.set]) + (size_t)row * ue8m0Row;
        if (sub == 0) sdst[g] = (uint8_t)(__float_as_uint(scale[u]) >> 23);
        if (g == nS - 1 && sub > 0 && g + sub < ue8m0Row) sdst[g + sub] = 0; /* pad the last word */
      } else if (sub == 0) {
        reinterpret_cast<float*>(peer + c.l.recvScales[a.set])[(size_t)row * nS + g] = scale[u];
      }
    }
  }
}

/* One 512-channel chunk of a BF16 token to every destination in dmask. */
__device__ __forceinline__ void moe_ll_put_bf16(const moe_ll_ctx_t& c, const moe_ll_args_t& a, const uint4* xrow,
                                                int chunk, unsigned dmask, int dRank, long long dRow) {
  const int lane = threadIdx.x % MOE_LL_WARP;
  const int nVec = a.hidden / MOE_LL_VEC;
  constexpr int U = MOE_LL_CHUNK / MOE_LL_VEC / MOE_LL_WARP;
  uint4 buf[U];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int v = chunk * (MOE_LL_CHUNK / MOE_LL_VEC) + u * MOE_LL_WARP + lane;
    if (v < nVec) buf[u] = moe_ld_nc(xrow + v);
  }
  for (unsigned m = dmask; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    const int r = __shfl_sync(MOE_LL_FULL, dRank, k);
    const long long row = __shfl_sync(MOE_LL_FULL, dRow, k);
    uint4* dst = reinterpret_cast<uint4*>(c.rc.peers.base[r] + c.l.recvX[a.set]) + (size_t)row * nVec;
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int v = chunk * (MOE_LL_CHUNK / MOE_LL_VEC) + u * MOE_LL_WARP + lane;
      if (v < nVec) dst[v] = buf[u];
    }
  }
}

/* Phase D, all warps: every (token, chunk) of the block's tokens to every
 * rank its experts live on; chunk 0 also writes each row's source and slot.
 * This is the only place that stores dispatch rows into peers: an
 * internode (proxy) path would take the pairs of remote ranks here. */
__device__ void moe_ll_put_tokens(const moe_ll_ctx_t& c, const moe_ll_args_t& a, int tBegin, int tEnd,
                                  const int* route) {
  const int lane = threadIdx.x % MOE_LL_WARP, warp = threadIdx.x / MOE_LL_WARP;
  const int nWarps = blockDim.x / MOE_LL_WARP, K = a.topk, L = c.rc.numLocalExperts, M = c.maxTokens;
  const long long rowsPerExpert = (long long)c.rc.nRanks * M;
  const int nChunks = (a.hidden + MOE_LL_CHUNK - 1) / MOE_LL_CHUNK;
  const int items = (tEnd - tBegin) * nChunks;
  const size_t xBytes = (size_t)a.hidden * 2;
  for (int it = warp; it < items; it += nWarps) {
    const int t = tBegin + it / nChunks, chunk = it % nChunks;
    int rv = -1, dRank = 0;
    long long dRow = 0;
    if (lane < K) {
      rv = route[(size_t)t * K + lane];
      if (rv >= 0) {
        const int e = (int)__ldg(a.topkIdx + (size_t)t * K + lane); /* checked when rv was assigned */
        dRank = e / L;
        dRow = (long long)(e - dRank * L) * rowsPerExpert + rv;
      }
    }
    const unsigned dmask = __ballot_sync(MOE_LL_FULL, rv >= 0);
    if (dmask == 0) continue;
    if (chunk == 0 && rv >= 0) {
      char* peer = c.rc.peers.base[dRank];
      reinterpret_cast<int*>(peer + c.l.recvSrc[a.set])[dRow] = c.rc.rank * M + t;
      reinterpret_cast<int*>(peer + c.l.recvK[a.set])[dRow] = lane;
    }
    const uint4* xrow = reinterpret_cast<const uint4*>(static_cast<const char*>(a.x) + (size_t)t * xBytes);
    if (a.sendFp8) moe_ll_put_fp8(c, a, xrow, chunk, dmask, dRank, dRow);
    else moe_ll_put_bf16(c, a, xrow, chunk, dmask, dRank, dRow);
  }
}

__global__ void __launch_bounds__(MOE_LL_THREADS, MOE_LL_MIN_BLOCKS_PER_SM)
moe_ll_dispatch_send_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  __shared__ int sCnt[NCCL_MOE_MAX_EXPERTS];
  __shared__ int sStart[NCCL_MOE_MAX_EXPERTS];
  const int E = c.numExperts, T = a.numTokens;
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_DISPATCH) + 1;
  const int per = (T + gridDim.x - 1) / gridDim.x;
  const int tBegin = min(T, (int)blockIdx.x * per), tEnd = min(T, tBegin + per);
  for (int i = threadIdx.x; i < E; i += blockDim.x) sCnt[i] = sStart[i] = 0;
  __syncthreads();
  /* Counts feed the count messages (blocks < N) and the rows of the block's
   * own tokens. */
  if (tBegin < tEnd || (int)blockIdx.x < c.rc.nRanks) moe_ll_count(a, E, tBegin, sCnt, sStart);
  __syncthreads();
  moe_ll_send_counts(c, a, sCnt, n);

  if (tBegin < tEnd || blockIdx.x == 0) {
    bool ok = moe_ll_wait_all(c, c.l.cntFlag, a.set, n);
    if (ok) ok = moe_ll_place(c, a, sStart);
    int* route = reinterpret_cast<int*>(c.rc.peers.base[c.rc.rank] + c.l.route[a.set]);
    if (threadIdx.x < MOE_LL_WARP) moe_ll_assign_rows(c, a, tBegin, tEnd, sStart, ok, route);
    __syncthreads(); /* the block's routes, written by warp 0, are read by all warps */
    if (ok) moe_ll_put_tokens(c, a, tBegin, tEnd, route);
  }

  if (moe_ll_last_block(moe_ll_done(c, a.set, MOE_LL_DONE_DISPATCH_SEND))) {
    moe_ll_publish(c, c.l.dataFlag, a.set, n);
    if (threadIdx.x == 0) *moe_ll_seq(c, a.set, MOE_LL_OP_DISPATCH) = n;
  }
}

extern "C" cudaError_t moe_ll_dispatch_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                   cudaStream_t stream) {
  moe_ll_dispatch_send_kernel<<<args->numBlocks, MOE_LL_THREADS, 0, stream>>>(*ctx, *args);
  return cudaGetLastError();
}

/* --------------------------------------------------- dispatch: receive */
__global__ void __launch_bounds__(MOE_LL_RECV_THREADS)
moe_ll_dispatch_recv_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_DISPATCH);
  const bool ok = moe_ll_wait_all(c, c.l.dataFlag, a.set, n);
  if (!ok || a.cumulative == NULL) return;
  const int* recvCount = reinterpret_cast<const int*>(c.rc.peers.base[c.rc.rank] + c.l.recvCount[a.set]);
  for (int l = threadIdx.x; l < c.rc.numLocalExperts; l += blockDim.x)
    atomicAdd(reinterpret_cast<unsigned long long*>(a.cumulative) + l, (unsigned long long)recvCount[l]);
}

extern "C" cudaError_t moe_ll_dispatch_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                   cudaStream_t stream) {
  moe_ll_dispatch_recv_kernel<<<1, MOE_LL_RECV_THREADS, 0, stream>>>(*ctx, *args);
  return cudaGetLastError();
}

/* ------------------------------------------------------- combine: send */
/* sOff[l] = first flattened row of local expert l (rows of all experts in
 * one sequence), sOff[L] = all rows. Counts are this rank's own (written by
 * its dispatch), clamped to the expert's rows anyway. */
__device__ int moe_ll_row_offsets(const moe_ll_ctx_t& c, int set, int* sOff) {
  const int L = c.rc.numLocalExperts, rows = c.rc.nRanks * c.maxTokens;
  const int* recvCount = reinterpret_cast<const int*>(c.rc.peers.base[c.rc.rank] + c.l.recvCount[set]);
  for (int l = threadIdx.x; l < L; l += blockDim.x) sOff[l] = min(max(recvCount[l], 0), rows);
  __syncthreads();
  if (threadIdx.x < MOE_LL_WARP) moe_ll_warp_scan(sOff, L, threadIdx.x);
  __syncthreads();
  return sOff[L];
}

/* The expert whose flattened rows hold row g (< sOff[L]): sOff[l] <= g < sOff[l + 1]. */
__device__ __forceinline__ int moe_ll_find_expert(const int* sOff, int L, int g) {
  int lo = 0, hi = L;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (sOff[mid] <= g) lo = mid;
    else hi = mid;
  }
  return lo;
}

__global__ void __launch_bounds__(MOE_LL_THREADS, MOE_LL_MIN_BLOCKS_PER_SM)
moe_ll_combine_send_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  __shared__ int sOff[NCCL_MOE_MAX_EXPERTS + 1];
  const int N = c.rc.nRanks, M = c.maxTokens, L = c.rc.numLocalExperts;
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_COMBINE) + 1;
  const int total = moe_ll_row_offsets(c, a.set, sOff);
  /* Every token rank has read the rows of the previous combine on this set. */
  const bool ok = moe_ll_wait_all(c, c.l.combAck, a.set, n - 1);
  const int lane = threadIdx.x % MOE_LL_WARP;
  const int nVec = a.hidden / MOE_LL_VEC;
  constexpr int chunkVec = MOE_LL_COMBINE_SEND_UNROLL * MOE_LL_WARP;
  const int nChunks = (nVec + chunkVec - 1) / chunkVec;
  const int warps = gridDim.x * (blockDim.x / MOE_LL_WARP);
  const char* own = c.rc.peers.base[c.rc.rank];
  const int* recvSrc = reinterpret_cast<const int*>(own + c.l.recvSrc[a.set]);
  const int* recvK = reinterpret_cast<const int*>(own + c.l.recvK[a.set]);
  bool bad = false;
  const long long items = ok ? (long long)total * nChunks : 0;
  for (long long it = blockIdx.x * (blockDim.x / MOE_LL_WARP) + threadIdx.x / MOE_LL_WARP; it < items; it += warps) {
    const int g = (int)(it / nChunks), chunk = (int)(it % nChunks);
    const int l = moe_ll_find_expert(sOff, L, g);
    const size_t row = (size_t)l * N * M + (g - sOff[l]);
    const int src = __ldcg(recvSrc + row), k = __ldcg(recvK + row); /* written by the source rank */
    if (src < 0 || src >= N * M || k < 0 || k >= c.maxTopk) {
      bad = true;
      continue;
    }
    const int s = src / M, t = src % M;
    const uint4* in = reinterpret_cast<const uint4*>(a.x) + row * nVec;
    uint4* dst = reinterpret_cast<uint4*>(c.rc.peers.base[s] + c.l.combX[a.set] +
                                          ((size_t)t * c.maxTopk + k) * c.rowBytes);
    uint4 buf[MOE_LL_COMBINE_SEND_UNROLL];
#pragma unroll
    for (int u = 0; u < MOE_LL_COMBINE_SEND_UNROLL; u++) {
      const int v = chunk * chunkVec + u * MOE_LL_WARP + lane;
      if (v < nVec) buf[u] = moe_ld_nc(in + v);
    }
#pragma unroll
    for (int u = 0; u < MOE_LL_COMBINE_SEND_UNROLL; u++) {
      const int v = chunk * chunkVec + u * MOE_LL_WARP + lane;
      if (v < nVec) dst[v] = buf[u];
    }
  }
  if (bad) moe_record_error(c.rc, MOE_KERR_BAD_NOTIFY);
  if (moe_ll_last_block(moe_ll_done(c, a.set, MOE_LL_DONE_COMBINE_SEND))) {
    moe_ll_publish(c, c.l.combFlag, a.set, n);
    if (threadIdx.x == 0) *moe_ll_seq(c, a.set, MOE_LL_OP_COMBINE) = n;
  }
}

extern "C" cudaError_t moe_ll_combine_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                  cudaStream_t stream) {
  moe_ll_combine_send_kernel<<<args->numBlocks, MOE_LL_THREADS, 0, stream>>>(*ctx, *args);
  return cudaGetLastError();
}

/* ---------------------------------------------------- combine: receive */
__device__ __forceinline__ void moe_ll_fma_bf16x8(float* acc, uint4 v, float w) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 f = __bfloat1622float2(p[i]);
    acc[2 * i] = __fmaf_rn(w, f.x, acc[2 * i]);
    acc[2 * i + 1] = __fmaf_rn(w, f.y, acc[2 * i + 1]);
  }
}

__device__ __forceinline__ uint4 moe_ll_pack_bf16x8(const float* acc) {
  uint4 v;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) p[i] = __float22bfloat162_rn(make_float2(acc[2 * i], acc[2 * i + 1]));
  return v;
}

__global__ void __launch_bounds__(MOE_LL_THREADS, MOE_LL_MIN_BLOCKS_PER_SM)
moe_ll_combine_recv_kernel(moe_ll_ctx_t c, moe_ll_args_t a) {
  const unsigned long long n = moe_ll_read_seq(c, a.set, MOE_LL_OP_COMBINE);
  const bool ok = moe_ll_wait_all(c, c.l.combFlag, a.set, n);
  const int lane = threadIdx.x % MOE_LL_WARP, K = a.topk;
  const int nVec = a.hidden / MOE_LL_VEC;
  const int nChunks = (nVec + MOE_LL_WARP - 1) / MOE_LL_WARP; /* one vector per lane per item */
  const int warps = gridDim.x * (blockDim.x / MOE_LL_WARP);
  const char* own = c.rc.peers.base[c.rc.rank];
  const int* route = reinterpret_cast<const int*>(own + c.l.route[a.set]);
  const uint4* rows = reinterpret_cast<const uint4*>(own + c.l.combX[a.set]);
  const size_t rowVec = c.rowBytes / 16;
  const long long items = ok ? (long long)a.numTokens * nChunks : 0;
  for (long long it = blockIdx.x * (blockDim.x / MOE_LL_WARP) + threadIdx.x / MOE_LL_WARP; it < items; it += warps) {
    const int t = (int)(it / nChunks), v = (int)(it % nChunks) * MOE_LL_WARP + lane;
    /* Lane k: the combine row slot holding top-k entry k (its own slot, or
     * the first slot of the same expert), -1 if none; and its weight. */
    int slot = -1;
    float w = 0.0f;
    if (lane < K) {
      const int rv = route[(size_t)t * K + lane];
      slot = rv >= 0 ? lane : (rv <= -2 && -2 - rv < K ? -2 - rv : -1);
      w = a.weights != NULL ? __ldg(a.weights + (size_t)t * K + lane) : 1.0f;
    }
    float acc[MOE_LL_VEC];
#pragma unroll
    for (int i = 0; i < MOE_LL_VEC; i++) acc[i] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += MOE_LL_COMBINE_KGROUP) {
      uint4 buf[MOE_LL_COMBINE_KGROUP];
      int sl[MOE_LL_COMBINE_KGROUP];
#pragma unroll
      for (int j = 0; j < MOE_LL_COMBINE_KGROUP; j++) {
        sl[j] = __shfl_sync(MOE_LL_FULL, slot, (k0 + j) % MOE_LL_WARP);
        if (k0 + j < K && sl[j] >= 0 && v < nVec)
          buf[j] = __ldcg(rows + ((size_t)t * c.maxTopk + sl[j]) * rowVec + v);
      }
#pragma unroll
      for (int j = 0; j < MOE_LL_COMBINE_KGROUP; j++) {
        const float wk = __shfl_sync(MOE_LL_FULL, w, (k0 + j) % MOE_LL_WARP);
        if (k0 + j < K && sl[j] >= 0 && v < nVec) moe_ll_fma_bf16x8(acc, buf[j], wk);
      }
    }
    if (v < nVec) reinterpret_cast<uint4*>(a.out)[(size_t)t * nVec + v] = moe_ll_pack_bf16x8(acc);
  }
  /* This rank's reads of its combine rows are done: peers may overwrite. */
  if (moe_ll_last_block(moe_ll_done(c, a.set, MOE_LL_DONE_COMBINE_RECV))) moe_ll_publish(c, c.l.combAck, a.set, n);
}

extern "C" cudaError_t moe_ll_combine_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                                  cudaStream_t stream) {
  moe_ll_combine_recv_kernel<<<args->numBlocks, MOE_LL_THREADS, 0, stream>>>(*ctx, *args);
  return cudaGetLastError();
}

/* ------------------------------------------------------------ helpers */
__global__ void moe_ll_gate_kernel(const volatile int* flag, long long timeoutNs) {
  const long long start = moe_now_ns();
  while (*flag == 0 && moe_now_ns() - start < timeoutNs) {
  }
}

extern "C" cudaError_t moe_ll_gate_launch(const volatile int* flag, long long timeoutNs, cudaStream_t stream) {
  moe_ll_gate_kernel<<<1, 1, 0, stream>>>(flag, timeoutNs);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_ll_preload(void) {
  const void* kernels[] = {(const void*)moe_ll_dispatch_send_kernel, (const void*)moe_ll_dispatch_recv_kernel,
                           (const void*)moe_ll_combine_send_kernel, (const void*)moe_ll_combine_recv_kernel,
                           (const void*)moe_ll_gate_kernel};
  return moe_preload_kernels(kernels, sizeof(kernels) / sizeof(kernels[0]));
}
