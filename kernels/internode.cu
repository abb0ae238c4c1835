/* SPDX-License-Identifier: Apache-2.0 */
/* Internode kernels (high-throughput mode): ranks on several nodes.
 *
 * A token crosses the network once per destination node, as a record in the
 * slab to that node's rank with this rank's local index (its forwarder),
 * which writes it over NVLink to the ranks of its node that need it. Tokens
 * for this rank's own node go straight to their ranks, as in intranode.cu.
 * Combine runs the other way: each forwarder sums, per record, the rows of
 * its node's ranks (local index order, fp32, rounded to BF16) and sends one
 * partial per record back; the source sums the partials in node order, its
 * own node's partial computed the same way from its node's ranks.
 *
 * Slabs travel through the proxy thread (plugin/moe_proxy.c): see
 * moe_internode.h for the counters. Every wait is bounded by the comm's
 * timeout; a proxy error (MOE_KERR_NET) ends every wait at once. Values read
 * from the network (record counts, positions) are bounded before use. */
#include "kernels/moe_copy.cuh"
#include "kernels/moe_fp8.cuh"
#include "kernels/moe_kernels.h"
#include "kernels/moe_internode.h"
#include "kernels/moe_notify.cuh"
#include "kernels/moe_sync.cuh"

#define MOE_INTER_LAYOUT_THREADS 1024

/* ------------------------------------------------------------- waiting */
/* The forwarder this rank meets on node m (the rank with its local index). */
__device__ __forceinline__ int moe_net_peer(const moe_net_ctx_t& n, int m) {
  return n.topo.rankAt[m * n.topo.ranksPerNode + n.topo.local];
}

/* One thread waits on counter[ch][m] >= want for every other node m (the
 * proxy's counters: `what` is MOE_WAIT_NET for operation numbers,
 * MOE_WAIT_NET_CHUNK for progress words). */
__device__ bool moe_net_wait_nodes(const moe_rank_ctx_t& c, const moe_net_ctx_t& n,
                                   const volatile unsigned long long (*counter)[MOE_MAX_NODES], int ch,
                                   unsigned long long want, moe_wait_t what) {
  const moe_topo_t& t = n.topo;
  for (int m = 0; m < t.nNodes; m++) {
    if (m == t.node) continue;
    const unsigned long long* f = const_cast<const unsigned long long*>(&counter[ch][m]);
    if (!moe_wait_geq(c, f, want, what, moe_net_peer(n, m), MOE_WAIT_FROM_NOW, NULL)) return false;
  }
  return true;
}

__device__ __forceinline__ void moe_net_publish(const volatile unsigned long long* flag, unsigned long long v) {
  moe_st_release_sys(const_cast<unsigned long long*>(flag), v);
}

__device__ __forceinline__ char* moe_slab(const moe_net_ctx_t& n, char* region, int ch, int node) {
  return moe_net_slab(&n.geom, region, ch, node);
}

/* ---------------------------------------------------------------- chunks */
/* One more write of chunk i of the slab (channel ch, node m) being filled,
 * whose slab holds cnt records: the write that completes the chunk marks it
 * ready for the proxy. Chunk 0 also counts the header. Called by one thread
 * after a system fence over what it (or its warp) wrote. */
__device__ void moe_net_chunk_add(const moe_net_ctx_t& n, int ch, int m, int i, int cnt, unsigned long long seq) {
  const int C = n.chunkRecords;
  const unsigned target = (unsigned)(min(C, cnt - i * C) + (i == 0 ? 1 : 0));
  unsigned int* done = n.chunkDone + ((size_t)ch * MOE_MAX_NODES + m) * MOE_NET_MAX_CHUNKS + i;
  if (atomicAdd(done, 1u) + 1 == target) {
    *done = 0; /* nobody else adds to it in this operation */
    moe_net_publish(&n.flags->chunkReady[ch][m][i], seq);
  }
}

/* A warp wrote record `slot` of the slab (ch, m) holding cnt records. */
__device__ __forceinline__ void moe_net_record_done(const moe_net_ctx_t& n, int ch, int m, int slot, int cnt,
                                                    unsigned long long seq, int lane) {
  __syncwarp();
  if (lane == 0) {
    __threadfence_system(); /* with the warp barrier: the whole record before the count */
    moe_net_chunk_add(n, ch, m, slot / n.chunkRecords, cnt, seq);
  }
  __syncwarp();
}

/* One thread, before any record of slab seq to every other node: the record
 * count into each slab's header, its size and chunk geometry to the proxy,
 * then ready = seq, and the header's share of chunk 0. cnt[m]: records to
 * node m. */
__device__ void moe_net_begin_slabs(const moe_net_ctx_t& n, int ch, const int* cnt, int recBytes,
                                    unsigned long long seq) {
  const moe_topo_t& tp = n.topo;
  const int C = n.chunkRecords;
  for (int m = 0; m < tp.nNodes; m++) {
    if (m == tp.node) continue;
    *reinterpret_cast<volatile int*>(moe_slab(n, n.sendBuf, ch, m)) = cnt[m];
    n.flags->bytes[ch][m] = MOE_SLAB_HEADER + (unsigned long long)cnt[m] * recBytes;
    n.flags->chunkBytes[ch][m] = (unsigned long long)C * recBytes;
    n.flags->nchunks[ch][m] = cnt[m] == 0 ? 1 : (cnt[m] + C - 1) / C;
  }
  __threadfence_system();
  for (int m = 0; m < tp.nNodes; m++) {
    if (m == tp.node) continue;
    moe_net_publish(&n.flags->ready[ch][m], seq);
    moe_net_chunk_add(n, ch, m, 0, cnt[m], seq);
  }
}

/* One thread: waits until chunk i of slab seq from node m has landed (its
 * progress counter); *seen caches the last value read. False on a timeout
 * (recorded) or once the comm is broken. */
__device__ bool moe_net_wait_chunk(const moe_rank_ctx_t& c, const moe_net_ctx_t& n, int ch, int m,
                                   unsigned long long seq, int i, unsigned long long* seen) {
  const unsigned long long want = moe_net_progress(seq, 0, i + 1);
  if (*seen >= want) return true;
  const unsigned long long* f = const_cast<const unsigned long long*>(&n.flags->progress[ch][m]);
  return moe_wait_geq(c, f, want, MOE_WAIT_NET_CHUNK, moe_net_peer(n, m), MOE_WAIT_FROM_NOW, seen);
}

/* The same for a whole warp (lane 0 waits); true in every lane. */
__device__ __forceinline__ bool moe_net_warp_wait_chunk(const moe_rank_ctx_t& c, const moe_net_ctx_t& n, int ch,
                                                        int m, unsigned long long seq, int i, unsigned long long* seen,
                                                        int lane) {
  int ok = 1;
  if (lane == 0) ok = moe_net_wait_chunk(c, n, ch, m, seq, i, seen);
  return __shfl_sync(MOE_FULL_MASK, ok, 0) != 0;
}

/* Record count of a received slab, bounded (it came from the network). */
__device__ __forceinline__ int moe_slab_count(const moe_rank_ctx_t& c, const moe_net_ctx_t& n, int ch, int node) {
  const int cnt = *reinterpret_cast<const volatile int*>(moe_slab(n, n.recvBuf, ch, node));
  if (cnt < 0 || cnt > n.maxTokens) {
    moe_record_error(c, MOE_KERR_NET);
    return 0;
  }
  return cnt;
}

/* Lane l (< ranksPerNode) -> the rank with local index l on `node`. */
__device__ __forceinline__ void moe_fill_lane_ranks(const moe_net_ctx_t& n, int node, int* sRank) {
  for (int l = threadIdx.x; l < n.topo.ranksPerNode; l += blockDim.x)
    sRank[l] = n.topo.rankAt[node * n.topo.ranksPerNode + l];
}

/* For each rank of this node (by local index): the rank, this rank's first
 * row there, and its capacity. Ends with a block barrier. */
__device__ __forceinline__ void moe_load_node_rows(const moe_net_ctx_t& n, const moe_route_t& rt, int* sRank,
                                                   int* sBase, int* sCap) {
  moe_fill_lane_ranks(n, n.topo.node, sRank);
  __syncthreads();
  moe_load_rows(rt, sRank, n.topo.ranksPerNode, sBase, sCap);
  __syncthreads();
}

/* -------------------------------------------------------------- layout */
/* One block: for every other node, each token's record index in the slab to
 * that node (an exclusive scan over the tokens that go there). */
__global__ void __launch_bounds__(MOE_INTER_LAYOUT_THREADS)
moe_inter_layout_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt, moe_fwd_route_t fw, int T) {
  __shared__ int warpCnt[MOE_INTER_LAYOUT_THREADS / MOE_WARP];
  __shared__ int carry;
  const moe_topo_t& tp = n.topo;
  const int N = c.nRanks, R = tp.ranksPerNode, nN = tp.nNodes;
  const int lane = threadIdx.x % MOE_WARP, warp = threadIdx.x / MOE_WARP;
  const int nWarps = blockDim.x / MOE_WARP;
  for (int m = 0; m < nN; m++) {
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int t0 = 0; t0 < T; t0 += blockDim.x) {
      const int t = t0 + threadIdx.x;
      int in = 0;
      if (t < T && m != tp.node)
        for (int l = 0; l < R && !in; l++) in = rt.pos[(size_t)t * N + tp.rankAt[m * R + l]] >= 0;
      const unsigned b = __ballot_sync(MOE_FULL_MASK, in);
      if (lane == 0) warpCnt[warp] = __popc(b);
      __syncthreads();
      if (threadIdx.x == 0) {
        int run = carry;
        for (int w = 0; w < nWarps; w++) {
          const int v = warpCnt[w];
          warpCnt[w] = run;
          run += v;
        }
        carry = run;
      }
      __syncthreads();
      if (t < T) fw.nodePos[(size_t)t * nN + m] = in ? warpCnt[warp] + __popc(b & ((1u << lane) - 1u)) : -1;
      __syncthreads();
    }
    if (threadIdx.x == 0) fw.tokensPerNode[m] = carry;
    __syncthreads();
  }
}

/* -------------------------------------------------------------- notify */
/* One block. Messages to this node's ranks go straight into their notify
 * areas; those to another node's ranks go in one slab to the forwarder there,
 * which copies them into its ranks' areas. Then the node's ranks meet at a
 * barrier, and every rank holds every source's message. */
__global__ void __launch_bounds__(MOE_NOTIFY_THREADS)
moe_inter_notify_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt, moe_fwd_route_t fw,
                        moe_notify_args_t a) {
  __shared__ int proceed;
  const moe_topo_t& tp = n.topo;
  const int N = c.nRanks, M = c.layout.notifyInts, R = tp.ranksPerNode, nN = tp.nNodes;
  const unsigned long long seq = n.seq[MOE_CH_NOTIFY] + 1;
  if (threadIdx.x == 0)
    proceed = !moe_comm_broken(c) && moe_net_wait_nodes(c, n, n.flags->sent, MOE_CH_NOTIFY, seq - 1, MOE_WAIT_NET);
  __syncthreads();
  if (!proceed) return;
  for (int i = threadIdx.x; i < N * M; i += blockDim.x) {
    const int r = i / M, j = i % M;
    const int v = moe_notify_value(c, rt, a, r, j);
    if (tp.nodeOf[r] == tp.node) {
      reinterpret_cast<volatile int*>(c.peers.base[r] + c.layout.notify)[(size_t)c.rank * M + j] = v;
    } else {
      int* slab = reinterpret_cast<int*>(moe_slab(n, n.sendBuf, MOE_CH_NOTIFY, tp.nodeOf[r]));
      slab[tp.localOf[r] * M + j] = v;
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int m = 0; m < nN; m++) {
      if (m == tp.node) continue;
      const unsigned long long bytes = sizeof(int) * (unsigned long long)R * M;
      n.flags->bytes[MOE_CH_NOTIFY][m] = bytes; /* one chunk: no header, no records */
      n.flags->chunkBytes[MOE_CH_NOTIFY][m] = bytes;
      n.flags->nchunks[MOE_CH_NOTIFY][m] = 1;
      n.flags->chunkReady[MOE_CH_NOTIFY][m][0] = seq;
      moe_net_publish(&n.flags->ready[MOE_CH_NOTIFY][m], seq);
    }
    proceed = moe_net_wait_nodes(c, n, n.flags->arrived, MOE_CH_NOTIFY, seq, MOE_WAIT_NET);
  }
  __syncthreads();
  if (!proceed) return;
  /* Slab from node m: the messages of its rank with our local index (the
   * source) to each rank of this node, in local order. */
  for (int m = 0; m < nN; m++) {
    if (m == tp.node) continue;
    const int src = tp.rankAt[m * R + tp.local];
    const volatile int* slab = reinterpret_cast<const volatile int*>(moe_slab(n, n.recvBuf, MOE_CH_NOTIFY, m));
    for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
      const int l = i / M, j = i % M;
      const int dst = tp.rankAt[tp.node * R + l];
      reinterpret_cast<volatile int*>(c.peers.base[dst] + c.layout.notify)[(size_t)src * M + j] = slab[i];
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int m = 0; m < nN; m++)
      if (m != tp.node) moe_net_publish(&n.flags->consumed[MOE_CH_NOTIFY][m], seq);
    n.seq[MOE_CH_NOTIFY] = seq;
    proceed = moe_barrier(c);
  }
  __syncthreads();
  if (!proceed) return;
  moe_notify_finish(c, rt, a);
  moe_notify_publish(rt, a, c.numLocalExperts);
  /* Where the tokens this rank forwards from node m start at each rank of
   * this node: after those of every lower source rank. */
  const volatile int* msg = reinterpret_cast<const volatile int*>(c.peers.base[c.rank] + c.layout.notify);
  for (int i = threadIdx.x; i < nN * R; i += blockDim.x) {
    const int m = i / R, l = i % R;
    const int src = tp.rankAt[m * R + tp.local], dst = tp.rankAt[tp.node * R + l];
    int before = 0;
    for (int s = 0; s < src; s++) before += msg[s * M + dst];
    fw.fwdBase[i] = before;
  }
}

/* ------------------------------------------------------------ dispatch */
/* This node's ranks get their rows directly; every other node gets one
 * record per token in the slab to its forwarder. */
__global__ void MOE_WAIT_GRID_BOUNDS moe_inter_dispatch_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt, moe_fwd_route_t fw,
                                          moe_dispatch_args_t a) {
  __shared__ int sBase[MOE_WARP], sCap[MOE_WARP], sRank[MOE_WARP], sCount[MOE_MAX_NODES];
  __shared__ int proceed;
  const moe_topo_t& tp = n.topo;
  const int N = c.nRanks, K = a.topk, R = tp.ranksPerNode, nN = tp.nNodes;
  const unsigned long long seq = n.seq[MOE_CH_DISPATCH] + 1;
  const moe_record_t rec = moe_dispatch_record(R, K, a.hidden, a.sendFp8);
  moe_load_node_rows(n, rt, sRank, sBase, sCap);
  for (int m = threadIdx.x; m < nN; m += blockDim.x) sCount[m] = fw.tokensPerNode[m];
  __syncthreads();
  if (threadIdx.x == 0) {
    proceed = !moe_comm_broken(c) && moe_net_wait_nodes(c, n, n.flags->sent, MOE_CH_DISPATCH, seq - 1, MOE_WAIT_NET);
    if (proceed && blockIdx.x == 0) moe_net_begin_slabs(n, MOE_CH_DISPATCH, sCount, rec.bytes, seq);
  }
  __syncthreads();
  if (!proceed) return;
  const int lane = threadIdx.x % MOE_WARP, warpsPerBlock = blockDim.x / MOE_WARP;
  const int nScales = a.hidden / NCCL_MOE_FP8_BLOCK;
  const int inBytes = a.hidden * (a.xIsFp8 ? 1 : 2), outBytes = a.hidden * (a.sendFp8 ? 1 : 2);
  const bool withWeights = a.topkWeights != NULL;
  for (int t = blockIdx.x * warpsPerBlock + threadIdx.x / MOE_WARP; t < a.numTokens;
       t += gridDim.x * warpsPerBlock) {
    int64_t e = -1;
    float w = 0.0f;
    if (lane < K) {
      e = a.topkIdx[(size_t)t * K + lane];
      if (withWeights) w = a.topkWeights[(size_t)t * K + lane];
    }
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(a.x) + (size_t)t * inBytes);
    const bool cast = a.sendFp8 && !a.xIsFp8;
    /* This node: lane l holds the row at local rank l. */
    const int row = moe_lane_row(c, rt, sRank, sBase, sCap, R, t, lane);
    const moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, sRank, NULL, NULL};
    if (d.dmask != 0) {
      moe_write_meta(c, d, K, lane, e, w, withWeights, a.xIsFp8 ? a.xScales + (size_t)t * nScales : NULL, nScales,
                     false);
      if (cast) moe_cast_row_to(c, src, a.hidden, a.pow2Scales, d, lane);
      else moe_copy_row_to(c, src, outBytes / 16, d, lane, false);
    }
    /* Other nodes: one record each. */
    for (int m = 0; m < nN; m++) {
      const int slot = m == tp.node ? -1 : fw.nodePos[(size_t)t * nN + m];
      if (slot < 0) continue;
      char* r = moe_slab(n, n.sendBuf, MOE_CH_DISPATCH, m) + MOE_SLAB_HEADER + (size_t)slot * rec.bytes;
      int* hdr = reinterpret_cast<int*>(r);
      if (lane == 0) hdr[0] = t;
      if (lane < R) hdr[1 + lane] = rt.pos[(size_t)t * N + tp.rankAt[m * R + lane]];
      if (lane < K) {
        reinterpret_cast<int64_t*>(r + rec.ids)[lane] = e;
        reinterpret_cast<float*>(r + rec.weights)[lane] = w;
      }
      float* scales = reinterpret_cast<float*>(r + rec.scales);
      if (a.xIsFp8)
        for (int j = lane; j < nScales; j += MOE_WARP) scales[j] = a.xScales[(size_t)t * nScales + j];
      moe_dests_t one = {0, -1, NULL, r + rec.payload, scales};
      if (cast) moe_cast_row_to(c, src, a.hidden, a.pow2Scales, one, lane);
      else moe_copy_row_to(c, src, outBytes / 16, one, lane, false);
      moe_net_record_done(n, MOE_CH_DISPATCH, m, slot, sCount[m], seq, lane);
    }
  }
}

/* Records from every other node go to the ranks of this node that need
 * them; the rows are remembered for combine. Ends with this node's barrier,
 * after which every rank holds all its rows. */
__global__ void MOE_WAIT_GRID_BOUNDS moe_inter_forward_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt, moe_fwd_route_t fw,
                                         moe_dispatch_args_t a) {
  __shared__ int sCap[MOE_WARP], sRank[MOE_WARP];
  __shared__ int proceed;
  const moe_topo_t& tp = n.topo;
  const int K = a.topk, R = tp.ranksPerNode, nN = tp.nNodes;
  const unsigned long long seq = n.seq[MOE_CH_DISPATCH] + 1;
  moe_fill_lane_ranks(n, tp.node, sRank);
  __syncthreads();
  for (int l = threadIdx.x; l < R; l += blockDim.x) sCap[l] = rt.cap[sRank[l]];
  /* Chunk 0 (the header) of every node's slab; the rest is waited for chunk
   * by chunk, so forwarding overlaps the transfer. */
  if (threadIdx.x == 0)
    proceed = !moe_comm_broken(c) &&
              moe_net_wait_nodes(c, n, n.flags->progress, MOE_CH_DISPATCH, moe_net_progress(seq, 0, 1),
                                 MOE_WAIT_NET_CHUNK);
  __syncthreads();
  const int lane = threadIdx.x % MOE_WARP, warpsPerBlock = blockDim.x / MOE_WARP;
  const int gwarp = blockIdx.x * warpsPerBlock + threadIdx.x / MOE_WARP, nwarps = gridDim.x * warpsPerBlock;
  const int nScales = a.hidden / NCCL_MOE_FP8_BLOCK, outBytes = a.hidden * (a.sendFp8 ? 1 : 2);
  /* The record carries the source's weights (0 when it passed none): write
   * them whatever this forwarder's own call passed. */
  const bool withWeights = true;
  const moe_record_t rec = moe_dispatch_record(R, K, a.hidden, a.sendFp8);
  for (int m = 0; m < nN && proceed; m++) {
    if (m == tp.node) continue;
    const int cnt = moe_slab_count(c, n, MOE_CH_DISPATCH, m);
    if (blockIdx.x == 0 && threadIdx.x == 0) fw.fwdCount[m] = cnt;
    const char* slab = moe_slab(n, n.recvBuf, MOE_CH_DISPATCH, m) + MOE_SLAB_HEADER;
    unsigned long long seen = 0;
    for (int i = gwarp; i < cnt; i += nwarps) {
      if (!moe_net_warp_wait_chunk(c, n, MOE_CH_DISPATCH, m, seq, i / n.chunkRecords, &seen, lane)) break;
      const char* r = slab + (size_t)i * rec.bytes;
      int row = -1;
      if (lane < R) {
        const int p = reinterpret_cast<const volatile int*>(r)[1 + lane];
        const int b = fw.fwdBase[m * R + lane];
        if (p >= 0 && p < sCap[lane] - b) row = b + p; /* bounded: p came from the network */
        fw.fwdRows[((size_t)m * n.maxTokens + i) * R + lane] = row;
      }
      moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, sRank, NULL, NULL};
      if (d.dmask == 0) continue;
      int64_t e = -1;
      float w = 0.0f;
      if (lane < K) {
        e = reinterpret_cast<const volatile int64_t*>(r + rec.ids)[lane];
        w = reinterpret_cast<const volatile float*>(r + rec.weights)[lane];
      }
      const float* scales = a.sendFp8 ? reinterpret_cast<const float*>(r + rec.scales) : NULL;
      moe_write_meta(c, d, K, lane, e, w, withWeights, scales, nScales, true);
      moe_copy_row_to(c, reinterpret_cast<const uint4*>(r + rec.payload), outBytes / 16, d, lane, true);
    }
  }
  if (moe_last_block(c)) {
    if (proceed && !moe_comm_broken(c)) {
      for (int m = 0; m < nN; m++)
        if (m != tp.node) moe_net_publish(&n.flags->consumed[MOE_CH_DISPATCH][m], seq);
      n.seq[MOE_CH_DISPATCH] = seq;
    }
    if (!moe_comm_broken(c)) moe_barrier(c);
  }
}

/* ------------------------------------------------------------- combine */
/* Forwarder side: one BF16 partial per record received at dispatch, summed
 * over this node's ranks, into the slab back to the record's node. */
__global__ void MOE_WAIT_GRID_BOUNDS moe_inter_combine_send_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt,
                                              moe_fwd_route_t fw, moe_combine_args_t a) {
  __shared__ int sRank[MOE_WARP], sCount[MOE_MAX_NODES];
  __shared__ int proceed;
  const moe_topo_t& tp = n.topo;
  const int K = a.topk, R = tp.ranksPerNode, nN = tp.nNodes;
  const unsigned long long seq = n.seq[MOE_CH_COMBINE] + 1;
  const moe_record_t rec = moe_combine_record(K, a.hidden);
  moe_fill_lane_ranks(n, tp.node, sRank);
  for (int m = threadIdx.x; m < nN; m += blockDim.x) sCount[m] = m == tp.node ? 0 : fw.fwdCount[m];
  __syncthreads();
  if (threadIdx.x == 0) {
    proceed = !moe_comm_broken(c) && moe_net_wait_nodes(c, n, n.flags->sent, MOE_CH_COMBINE, seq - 1, MOE_WAIT_NET);
    if (proceed && blockIdx.x == 0) moe_net_begin_slabs(n, MOE_CH_COMBINE, sCount, rec.bytes, seq);
  }
  __syncthreads();
  if (!proceed) return;
  const int lane = threadIdx.x % MOE_WARP, warpsPerBlock = blockDim.x / MOE_WARP;
  const int gwarp = blockIdx.x * warpsPerBlock + threadIdx.x / MOE_WARP, nwarps = gridDim.x * warpsPerBlock;
  const int nvec = a.hidden / MOE_VEC_BF16;
  for (int m = 0; m < nN; m++) {
    if (m == tp.node) continue;
    const int cnt = sCount[m];
    char* slab = moe_slab(n, n.sendBuf, MOE_CH_COMBINE, m) + MOE_SLAB_HEADER;
    for (int i = gwarp; i < cnt; i += nwarps) {
      const int row = lane < R ? fw.fwdRows[((size_t)m * n.maxTokens + i) * R + lane] : -1;
      const moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, sRank, NULL, NULL};
      uint4* out = reinterpret_cast<uint4*>(slab + (size_t)i * rec.bytes);
      for (int v0 = 0; v0 < nvec; v0 += MOE_WARP * MOE_COMBINE_UNROLL) {
        float acc[MOE_COMBINE_UNROLL][MOE_VEC_BF16];
        moe_acc_zero(acc);
        moe_acc_peer_rows(c, d, nvec, v0, lane, acc); /* local order */
        moe_store_acc(out, acc, nvec, v0, lane);
      }
      /* Always: the source decides whether it wants weights back. */
      const float sum = moe_sum_peer_weights(c, d, K, lane);
      if (lane < K) reinterpret_cast<float*>(reinterpret_cast<char*>(out) + rec.weights)[lane] = sum;
      moe_net_record_done(n, MOE_CH_COMBINE, m, i, cnt, seq, lane);
    }
  }
}

/* Source side: out[t] = sum over nodes, in node order, of each node's BF16
 * partial (this node's computed here from its ranks), in fp32. */
__global__ void MOE_WAIT_GRID_BOUNDS moe_inter_combine_recv_kernel(moe_rank_ctx_t c, moe_net_ctx_t n, moe_route_t rt,
                                              moe_fwd_route_t fw, moe_combine_args_t a) {
  __shared__ int sBase[MOE_WARP], sCap[MOE_WARP], sRank[MOE_WARP], sCount[MOE_MAX_NODES];
  __shared__ unsigned long long sSeen[MOE_WAIT_GRID_THREADS / MOE_WARP][MOE_MAX_NODES]; /* per warp: progress read */
  __shared__ int proceed;
  const moe_topo_t& tp = n.topo;
  const int K = a.topk, R = tp.ranksPerNode, nN = tp.nNodes;
  const unsigned long long seq = n.seq[MOE_CH_COMBINE] + 1;
  moe_load_node_rows(n, rt, sRank, sBase, sCap);
  for (int i = threadIdx.x; i < (MOE_WAIT_GRID_THREADS / MOE_WARP) * MOE_MAX_NODES; i += blockDim.x)
    (&sSeen[0][0])[i] = 0;
  /* Chunk 0 (the header) of every node's slab; the partials are waited for
   * chunk by chunk, so the sum overlaps the transfer. */
  if (threadIdx.x == 0)
    proceed = !moe_comm_broken(c) &&
              moe_net_wait_nodes(c, n, n.flags->progress, MOE_CH_COMBINE, moe_net_progress(seq, 0, 1),
                                 MOE_WAIT_NET_CHUNK);
  __syncthreads();
  for (int m = threadIdx.x; m < nN && proceed; m += blockDim.x)
    sCount[m] = m == tp.node ? 0 : moe_slab_count(c, n, MOE_CH_COMBINE, m);
  __syncthreads();
  const int lane = threadIdx.x % MOE_WARP, warpsPerBlock = blockDim.x / MOE_WARP, warp = threadIdx.x / MOE_WARP;
  const int nvec = a.hidden / MOE_VEC_BF16;
  const moe_record_t rec = moe_combine_record(K, a.hidden);
  for (int t = blockIdx.x * warpsPerBlock + warp; t < a.numTokens && proceed;
       t += gridDim.x * warpsPerBlock) {
    /* Every node's partial of this token has landed. */
    bool landed = true;
    for (int m = 0; m < nN && landed; m++) {
      if (m == tp.node) continue;
      const int slot = fw.nodePos[(size_t)t * nN + m];
      if (slot < 0 || slot >= sCount[m]) continue;
      landed = moe_net_warp_wait_chunk(c, n, MOE_CH_COMBINE, m, seq, slot / n.chunkRecords, &sSeen[warp][m], lane);
    }
    if (!landed) break;
    const int row = moe_lane_row(c, rt, sRank, sBase, sCap, R, t, lane);
    const moe_dests_t d = {__ballot_sync(MOE_FULL_MASK, row >= 0), row, sRank, NULL, NULL};
    uint4* out = reinterpret_cast<uint4*>(a.out) + (size_t)t * nvec;
    for (int v0 = 0; v0 < nvec; v0 += MOE_WARP * MOE_COMBINE_UNROLL) {
      float acc[MOE_COMBINE_UNROLL][MOE_VEC_BF16];
      moe_acc_zero(acc);
      /* This node's partial first (its place in the sum comes below),
       * rounded to BF16 like every other node's. */
      uint4 own[MOE_COMBINE_UNROLL];
      if (d.dmask != 0) {
        moe_acc_peer_rows(c, d, nvec, v0, lane, acc);
#pragma unroll
        for (int u = 0; u < MOE_COMBINE_UNROLL; u++) own[u] = moe_pack_bf16x8(acc[u]);
        moe_acc_zero(acc);
      }
      for (int m = 0; m < nN; m++) {
        if (m == tp.node) {
          if (d.dmask == 0) continue;
#pragma unroll
          for (int u = 0; u < MOE_COMBINE_UNROLL; u++) moe_acc_bf16x8(acc[u], own[u]);
          continue;
        }
        const int slot = fw.nodePos[(size_t)t * nN + m];
        if (slot < 0 || slot >= sCount[m]) continue;
        const uint4* src = reinterpret_cast<const uint4*>(moe_slab(n, n.recvBuf, MOE_CH_COMBINE, m) + MOE_SLAB_HEADER +
                                                          (size_t)slot * rec.bytes);
#pragma unroll
        for (int u = 0; u < MOE_COMBINE_UNROLL; u++) {
          const int v = v0 + u * MOE_WARP + lane;
          if (v < nvec) moe_acc_bf16x8(acc[u], moe_ld_volatile(src + v));
        }
      }
      moe_store_acc(out, acc, nvec, v0, lane);
    }
    if (a.withWeights) {
      float sum = 0.0f;
      for (int m = 0; m < nN; m++) {
        if (m == tp.node) {
          sum += moe_sum_peer_weights(c, d, K, lane);
          continue;
        }
        const int slot = fw.nodePos[(size_t)t * nN + m];
        if (slot < 0 || slot >= sCount[m] || lane >= K) continue;
        const char* r = moe_slab(n, n.recvBuf, MOE_CH_COMBINE, m) + MOE_SLAB_HEADER + (size_t)slot * rec.bytes;
        sum += reinterpret_cast<const volatile float*>(r + rec.weights)[lane];
      }
      if (lane < K) a.outTopkWeights[(size_t)t * K + lane] = sum;
    }
  }
  if (moe_last_block(c)) {
    if (proceed && !moe_comm_broken(c)) {
      for (int m = 0; m < nN; m++)
        if (m != tp.node) moe_net_publish(&n.flags->consumed[MOE_CH_COMBINE][m], seq);
      n.seq[MOE_CH_COMBINE] = seq;
    }
    if (!moe_comm_broken(c)) moe_barrier(c);
  }
}

/* ------------------------------------------------------------- launches */
extern "C" cudaError_t moe_inter_layout_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net,
                                               const moe_route_t* route, const moe_fwd_route_t* fwd, int numTokens,
                                               cudaStream_t stream) {
  moe_inter_layout_kernel<<<1, MOE_INTER_LAYOUT_THREADS, 0, stream>>>(*ctx, *net, *route, *fwd, numTokens);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_inter_notify_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net,
                                               const moe_route_t* route, const moe_fwd_route_t* fwd,
                                               const moe_notify_args_t* args, cudaStream_t stream) {
  moe_inter_notify_kernel<<<1, MOE_NOTIFY_THREADS, 0, stream>>>(*ctx, *net, *route, *fwd, *args);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_inter_dispatch_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net,
                                                 const moe_route_t* route, const moe_fwd_route_t* fwd,
                                                 const moe_dispatch_args_t* args, cudaStream_t stream) {
  moe_inter_dispatch_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *net, *route, *fwd, *args);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  moe_inter_forward_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *net, *route, *fwd, *args);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_inter_combine_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net,
                                                const moe_route_t* route, const moe_fwd_route_t* fwd,
                                                const moe_combine_args_t* args, cudaStream_t stream) {
  moe_inter_combine_send_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *net, *route, *fwd, *args);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  moe_inter_combine_recv_kernel<<<args->numBlocks, args->threads, 0, stream>>>(*ctx, *net, *route, *fwd, *args);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_internode_preload(void) {
  const void* kernels[] = {(const void*)moe_inter_layout_kernel, (const void*)moe_inter_notify_kernel,
                           (const void*)moe_inter_dispatch_kernel, (const void*)moe_inter_forward_kernel,
                           (const void*)moe_inter_combine_send_kernel, (const void*)moe_inter_combine_recv_kernel};
  return moe_preload_kernels(kernels, sizeof(kernels) / sizeof(kernels[0]));
}
