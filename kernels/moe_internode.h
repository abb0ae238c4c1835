/* SPDX-License-Identifier: Apache-2.0 */
/* Plain structs shared by the host (the proxy thread) and the internode
 * kernels. Ranks are grouped into nodes; a token crosses the network once per
 * destination node, to the rank with the same local index there (its
 * "forwarder"), which writes it over NVLink to the ranks of its node.
 *
 * Every rank has a send region and a receive region for the network, each cut
 * into one slab per (channel, peer node). A slab is cut into chunks (runs of
 * records; chunk 0 also holds the header) that travel as soon as the GPU has
 * written them, so the GPU filling a slab, the network and the GPU reading
 * it at the far end overlap. The counters below, in host-mapped memory, tell
 * the GPU and the proxy thread where each slab is:
 *
 *   GPU (sender)   once sent[c][m] >= k - 1, writes slab k's header, bytes,
 *                  nchunks and chunkBytes, then ready[c][m] = k; marks each
 *                  chunk i once all its records are written:
 *                  chunkReady[c][m][i] = k (release, system scope)
 *   proxy          once credit[c][m] >= k - 1 (the peer read slab k - 1),
 *                  writes runs of ready chunks to the peer in order, one
 *                  write with an immediate each; sets sent[c][m] = k when
 *                  every write of the slab completed
 *   proxy (peer)   sees the immediates, sets progress[c][n] (chunks landed,
 *                  see moe_net_progress) and, with the last one,
 *                  arrived[c][n] = k
 *   GPU (peer)     reads each chunk once progress covers it, then
 *                  consumed[c][n] = k; the peer's proxy returns it as credit.
 *
 * k counts operations of channel c on this comm, from 1, on the device (so
 * CUDA graph replays keep counting). Writes on one connection land in the
 * order they were posted (both transports), so "chunks landed" is a count. */
#ifndef MOE_INTERNODE_H_
#define MOE_INTERNODE_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "nccl_moe.h"
#include "kernels/moe_intranode.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { MOE_CH_NOTIFY = 0, MOE_CH_DISPATCH = 1, MOE_CH_COMBINE = 2, MOE_NET_CHANNELS = 3 };
#define MOE_MAX_NODES NCCL_MOE_MAX_RANKS
/* Channels a proxy can serve: the normal path uses MOE_NET_CHANNELS, the
 * low-latency path one per (operation, buffer set). */
#define MOE_NET_MAX_CHANNELS 4

/* Chunks per slab at most (their smallest size: NCCL_MOE_NET_CHUNK_KB). */
#define MOE_NET_MAX_CHUNKS 64

typedef struct {
  volatile unsigned long long ready[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES];    /* GPU -> proxy: slab k began */
  volatile unsigned long long bytes[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES];    /* GPU -> proxy: slab size */
  volatile unsigned long long nchunks[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES];  /* GPU -> proxy: 1..MOE_NET_MAX_CHUNKS */
  volatile unsigned long long chunkBytes[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES]; /* GPU -> proxy (see moe_net_chunk_range) */
  volatile unsigned long long chunkReady[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES][MOE_NET_MAX_CHUNKS]; /* GPU -> proxy */
  volatile unsigned long long sent[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES];     /* proxy -> GPU */
  volatile unsigned long long progress[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES]; /* proxy -> GPU */
  volatile unsigned long long arrived[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES];  /* proxy -> GPU */
  volatile unsigned long long consumed[MOE_NET_MAX_CHANNELS][MOE_MAX_NODES]; /* GPU -> proxy */
} moe_net_flags_t;

/* The progress word, progress[c][n]: slab k with `chunks` of its chunks
 * landed (`last`: all of them). It grows with k, then with chunks, so one
 * comparison answers "has chunk i of slab k landed". The proxy writes it, the
 * kernels wait on it, and the host decodes it in a timeout message: these
 * accessors are its only encoding. */
#define MOE_NET_PROGRESS_LAST_SHIFT 16
#define MOE_NET_PROGRESS_SLAB_SHIFT 17
#define MOE_NET_PROGRESS_CHUNKS_MASK ((1ull << MOE_NET_PROGRESS_LAST_SHIFT) - 1)
static inline MOE_HD unsigned long long moe_net_progress(unsigned long long k, int last, int chunks) {
  return (k << MOE_NET_PROGRESS_SLAB_SHIFT) | ((unsigned long long)(last != 0) << MOE_NET_PROGRESS_LAST_SHIFT) |
         ((unsigned long long)chunks & MOE_NET_PROGRESS_CHUNKS_MASK);
}
static inline MOE_HD unsigned long long moe_net_progress_slab(unsigned long long v) {
  return v >> MOE_NET_PROGRESS_SLAB_SHIFT;
}
static inline MOE_HD int moe_net_progress_last(unsigned long long v) {
  return (int)((v >> MOE_NET_PROGRESS_LAST_SHIFT) & 1);
}
static inline MOE_HD int moe_net_progress_chunks(unsigned long long v) {
  return (int)(v & MOE_NET_PROGRESS_CHUNKS_MASK);
}

/* Where the slabs are: slab (c, m) of the send region starts at
 * off[c] + m * slab[c]; the receive region has the same shape, indexed by
 * the source node. */
typedef struct {
  size_t slab[MOE_NET_MAX_CHANNELS];
  size_t off[MOE_NET_MAX_CHANNELS];
  size_t total;
} moe_net_geom_t;

static inline MOE_HD size_t moe_net_slab_offset(const moe_net_geom_t* g, int c, int node) {
  return g->off[c] + (size_t)node * g->slab[c];
}

/* Slab (c, node) of a region (the send or the receive region). */
static inline MOE_HD char* moe_net_slab(const moe_net_geom_t* g, char* region, int c, int node) {
  return region + moe_net_slab_offset(g, c, node);
}

/* Which node each rank is on; ranks need not be numbered node by node, but
 * every node has ranksPerNode ranks. A rank's forwarder on node m is
 * rankAt[m * ranksPerNode + (its own local index)]. */
typedef struct {
  int nNodes, ranksPerNode, node, local;
  int rankAt[NCCL_MOE_MAX_RANKS]; /* [node * ranksPerNode + local] -> rank */
  int nodeOf[NCCL_MOE_MAX_RANKS];
  int localOf[NCCL_MOE_MAX_RANKS];
} moe_topo_t;

/* What the internode kernels of one rank need besides moe_rank_ctx_t. */
typedef struct {
  moe_topo_t topo;
  char* sendBuf;            /* the regions as the GPU addresses them */
  char* recvBuf;
  moe_net_geom_t geom;
  moe_net_flags_t* flags;   /* host-mapped, as the GPU addresses it */
  unsigned long long* seq;  /* device [MOE_NET_CHANNELS]: operations finished per channel */
  unsigned int* chunkDone;  /* device [MOE_NET_CHANNELS][MOE_MAX_NODES][MOE_NET_MAX_CHUNKS]: records written
                               into each chunk of the slab being filled (zero between operations) */
  int maxTokens;            /* records one dispatch or combine slab holds (config.maxTokensPerRank) */
  int chunkRecords;         /* records per chunk of a dispatch or combine slab */
} moe_net_ctx_t;

/* Routing an internode handle keeps besides moe_route_t (device arrays). */
typedef struct {
  int* nodePos;       /* [maxTokens, nNodes]: the token's record in the slab to each node, -1 none */
  int* tokensPerNode; /* [nNodes] */
  int* fwdBase;       /* [nNodes, ranksPerNode]: first row, at each rank of this node, of the
                         tokens of the source this rank forwards from node m */
  int* fwdRows;       /* [nNodes, maxTokens, ranksPerNode]: row of each forwarded record, -1 none */
  int* fwdCount;      /* [nNodes]: records forwarded from each node */
} moe_fwd_route_t;

/* Slab header: the record count, padded to 16 bytes. */
#define MOE_SLAB_HEADER 16
static inline MOE_HD size_t moe_align16(size_t v) { return (v + 15) / 16 * 16; }

/* One dispatch record: [source token, position at each rank of the
 * destination node] [topk ids int64] [weights fp32] [scales fp32] [payload]. */
typedef struct {
  int ids, weights, scales, payload, bytes;
} moe_record_t;

static inline MOE_HD moe_record_t moe_dispatch_record(int ranksPerNode, int topk, int hidden, int sendFp8) {
  moe_record_t r;
  r.ids = (int)moe_align16(sizeof(int) * (size_t)(1 + ranksPerNode));
  r.weights = r.ids + (int)sizeof(int64_t) * topk;
  r.scales = r.weights + (int)sizeof(float) * topk;
  r.payload = (int)moe_align16((size_t)r.scales + sizeof(float) * (size_t)(hidden / NCCL_MOE_FP8_BLOCK));
  r.bytes = r.payload + hidden * (sendFp8 ? 1 : 2);
  return r;
}

/* One combine record: [BF16 partial sum] [summed weights fp32]. */
static inline MOE_HD moe_record_t moe_combine_record(int topk, int hidden) {
  moe_record_t r;
  r.ids = 0;
  r.scales = 0;
  r.payload = 0;
  r.weights = hidden * 2;
  r.bytes = (int)moe_align16((size_t)r.weights + sizeof(float) * (size_t)topk);
  return r;
}

/* Bytes [*begin, *end) of chunk i of a slab of `bytes` bytes: the records
 * after the header in runs of chunkBytes; chunk 0 also carries the header. */
static inline MOE_HD void moe_net_chunk_range(unsigned long long bytes, unsigned long long chunkBytes, int i,
                                                    unsigned long long* begin, unsigned long long* end) {
  const unsigned long long b = i == 0 ? 0 : MOE_SLAB_HEADER + (unsigned long long)i * chunkBytes;
  const unsigned long long e = MOE_SLAB_HEADER + (unsigned long long)(i + 1) * chunkBytes;
  *begin = b < bytes ? b : bytes;
  *end = e < bytes ? e : bytes;
}

/* Launches, in stream order (see internode.cu). layout: after moe_layout_launch
 * filled route->pos; notify: instead of moe_notify_launch; dispatch: the
 * direct/record kernel then the forward kernel; combine: after the staging
 * copy and a barrier of the node, the partial sums then the final sum. */
cudaError_t moe_inter_layout_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net, const moe_route_t* route,
                                    const moe_fwd_route_t* fwd, int numTokens, cudaStream_t stream);
cudaError_t moe_inter_notify_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net, const moe_route_t* route,
                                    const moe_fwd_route_t* fwd, const moe_notify_args_t* args, cudaStream_t stream);
cudaError_t moe_inter_dispatch_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net, const moe_route_t* route,
                                      const moe_fwd_route_t* fwd, const moe_dispatch_args_t* args,
                                      cudaStream_t stream);
cudaError_t moe_inter_combine_launch(const moe_rank_ctx_t* ctx, const moe_net_ctx_t* net, const moe_route_t* route,
                                     const moe_fwd_route_t* fwd, const moe_combine_args_t* args, cudaStream_t stream);
cudaError_t moe_internode_preload(void);

#ifdef __cplusplus
}
#endif
#endif
