/* SPDX-License-Identifier: Apache-2.0 */
/* Plain structs shared by the host and the low-latency kernels, and their
 * launch functions (see lowlatency.cu for the protocol).
 *
 * Every low-latency region lives in the comm's peer-visible buffer, after the
 * normal-mode regions, at the offsets of moe_ll_layout_t (the same on every
 * rank). A rank writes into a peer's regions through moe_peers_t, exactly as
 * the intranode kernels do. Two buffer sets (index `set`) are used in turn. */
#ifndef MOE_LOWLATENCY_H_
#define MOE_LOWLATENCY_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "kernels/moe_internode.h"
#include "kernels/moe_intranode.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_LL_SETS 2
/* Operations that count their uses of a set (one sequence number each). */
enum { MOE_LL_OP_DISPATCH = 0, MOE_LL_OP_COMBINE = 1, MOE_LL_OPS = 2 };
/* Scale formats of the in-kernel FP8 cast (ncclMoeScaleFormat_t values). */
enum { MOE_LL_SCALE_FLOAT = 0, MOE_LL_SCALE_POW2 = 1, MOE_LL_SCALE_UE8M0 = 2 };
/* Ints after the per-expert counts of a count message: hidden, type code. */
#define MOE_LL_MSG_HIDDEN(E) (E)
#define MOE_LL_MSG_TYPE(E) ((E) + 1)
#define MOE_LL_MSG_EXTRA 2
/* Channels of a row per arrival flag (dispatch rows and combine rows). */
#define MOE_LL_FLAG_CHANNELS 512
/* Halves of a set's combine rows: combine use c writes half c % 2. */
#define MOE_LL_COMB_HALVES 2

/* Byte offsets into a rank's comm buffer (absolute, like moe_layout_t).
 * N ranks, E experts, L = E / N local experts, M = llMaxTokensPerRank,
 * K = config.maxTopk, H = config.hidden, R = L * N * M rows per set,
 * F = flagChunks = ceil(H / MOE_LL_FLAG_CHANNELS).
 *
 * Zero-initialized state (one region, cleared at comm init):
 *   seq       uint64 [SETS][OPS]: uses of each (set, op) so far (private)
 *   done      uint32 [SETS][OPS]: grid-completion counters (private)
 *   cntFlag   uint64 [SETS][N]: source s's count message for use n is here
 *   rowFlag   uint64 [SETS][R][F]: chunk f of dispatch row i holds use n's data
 *   combFlag  uint64 [SETS][2][M][K][F]: chunk f of combine row (half, t, k)
 *             holds combine use c's data
 *   netDone   uint32 [MOE_LL_NET_CHANNELS][N]: parts of the network slab to
 *             each remote rank written so far (private)
 *   recvDone  uint32 [SETS][OPS]: grid-completion counters of the receive
 *             halves that read network slabs (private)
 * Per set (not initialized):
 *   counts    int32 [N][msgInts]: each source's rows per global expert, then
 *             MOE_LL_MSG_EXTRA ints (hidden, type code)
 *   recvX     [R] rows of H elements (BF16 or FP8; sized for BF16)
 *   recvScales fp32 [R][ceil(H/128)] (UE8M0: bytes, 4-byte padded rows);
 *             column-major: per expert [words][S], S = N * M rounded up to
 *             NCCL_MOE_SCALE_TOKEN_ALIGN (sized L * S * ceil(H/128) * 4)
 *   recvSrc   int32 [R]: srcRank * M + token
 *   recvK     int32 [R]: the top-k slot of the row at its source (combine)
 *   recvPos   int32 [R]: rows from another node: the record in the source's
 *             network slab (its combine row goes back to the same place)
 *   combX     BF16 [2][M][K] rows of H: combine rows, by (half, token, top-k
 *             slot)
 *   route     int32 [M][K]: per (token, k) of this rank's dispatch: the row
 *             at the receiver (>= 0), -1 (not sent), or -2 - k0 (a repeat of
 *             the expert of slot k0) (private); for a receiver on another
 *             node, the record in the network slab to it
 *   routePeer int32 [M][K]: the remote index of the receiver, -1 on this
 *             node (private)
 *   localCount int32 [L]: rows per local expert from this node (private)
 *   netRows   int32 [N]: records in each remote rank's dispatch slab (private)
 *   recvCount int32 [L]: rows per local expert (private) */
typedef struct {
  size_t state, stateBytes;
  size_t seq, done, cntFlag, netDone, recvDone;
  size_t rowFlag[MOE_LL_SETS];
  size_t combFlag[MOE_LL_SETS];
  size_t counts[MOE_LL_SETS];
  size_t recvX[MOE_LL_SETS];
  size_t recvScales[MOE_LL_SETS];
  size_t recvSrc[MOE_LL_SETS];
  size_t recvK[MOE_LL_SETS];
  size_t recvPos[MOE_LL_SETS];
  size_t combX[MOE_LL_SETS];
  size_t route[MOE_LL_SETS];
  size_t routePeer[MOE_LL_SETS];
  size_t localCount[MOE_LL_SETS];
  size_t netRows[MOE_LL_SETS];
  size_t recvCount[MOE_LL_SETS];
  size_t bytes;          /* all low-latency regions together; 0 = none */
  int msgInts;           /* ints per count message (16-byte multiple) */
  int flagChunks;        /* F */
} moe_ll_layout_t;

/* Across nodes. Ranks of this node are reached with peer stores; every rank
 * of another node ("remote", numbered 0..nRemote-1 in rank order) through
 * this rank's low-latency proxy: one slab per (channel, remote rank) in a
 * send and a receive region, counters in moe_net_flags_t (the protocol of
 * kernels/moe_internode.h with one chunk per slab; use n of a set is slab
 * n of its channel). A receiver places the rows of remote sources after
 * those of its own node, each group in rank order. */
#define MOE_LL_NET_CHANNELS (MOE_LL_OPS * MOE_LL_SETS)
#define MOE_LL_NET_CHANNEL(op, set) ((op) * MOE_LL_SETS + (set))
/* Dispatch slab: a header of ints [L rows per local expert of the receiver]
 * [hidden] [type code] [rows], padded to 16 bytes, then `rows` records
 * packed by local expert, each [token, top-k slot, 0, 0] [scales as in the
 * output row] [payload]. */
#define MOE_LL_NET_HDR_EXTRA 3
static inline MOE_HD size_t moe_ll_net_dispatch_header(int L) {
  return moe_align16(sizeof(int) * (size_t)(L + MOE_LL_NET_HDR_EXTRA));
}
/* Bytes of a row's scales: floats, or UE8M0 bytes padded to 4. */
static inline MOE_HD int moe_ll_scale_bytes(int hidden, int sendFp8, int ue8m0) {
  const int nS = hidden / NCCL_MOE_FP8_BLOCK;
  return !sendFp8 ? 0 : ue8m0 ? (nS + 3) / 4 * 4 : nS * (int)sizeof(float);
}
static inline MOE_HD size_t moe_ll_net_dispatch_record(int hidden, int sendFp8, int ue8m0) {
  return 16 + moe_align16((size_t)moe_ll_scale_bytes(hidden, sendFp8, ue8m0)) +
         moe_align16((size_t)hidden * (sendFp8 ? 1 : 2));
}
/* Combine slab: a header [rows, hidden, 0, 0], then the BF16 rows in the
 * order of the dispatch slab they answer. */
#define MOE_LL_NET_COMBINE_HEADER 16

typedef struct {
  int nRemote;                          /* 0: every rank is on this node */
  int slot[NCCL_MOE_MAX_RANKS];         /* rank -> remote index, -1 on this node */
  int remoteRank[NCCL_MOE_MAX_RANKS];   /* remote index -> rank */
  char* sendBuf;                        /* the regions as the GPU addresses them */
  char* recvBuf;
  moe_net_geom_t geom;
  moe_net_flags_t* flags;               /* host-mapped, as the GPU addresses it */
} moe_ll_net_t;

/* What every low-latency kernel of one rank needs (passed by value). */
typedef struct {
  moe_rank_ctx_t rc;     /* peers, rank, nRanks, numLocalExperts, error, timeout */
  moe_ll_layout_t l;
  moe_ll_net_t net;
  int numExperts;
  int maxTokens;         /* M = config.llMaxTokensPerRank */
  int maxTopk;           /* K of the layout = config.maxTopk */
  int rowBytes;          /* combX row stride: config.hidden * 2 */
} moe_ll_ctx_t;

/* One call half. Dispatch: x = BF16 tokens, topkIdx, numTokens, topk,
 * hidden, sendFp8, scaleFormat, cumulative. Combine: x = expert outputs,
 * weights, out, and the dispatch's numTokens / topk / hidden. */
typedef struct {
  int set;
  const void* x;
  const int64_t* topkIdx;
  const float* weights;
  void* out;
  int64_t* cumulative;
  int numTokens, hidden, topk;
  int sendFp8, scaleFormat;
  int numBlocks;         /* blocks of every low-latency kernel */
  int fused;             /* 1: the send kernel also runs the receive half */
  /* > 0: FP8 scales column-major (ncclMoeScaleColMajor): expert l's scales
   * are [scale words of a row][this] from l * words * this; 0: row-major. */
  int scaleTokenStride;
  int* cumulative32;     /* int32 twin of cumulative, or NULL */
} moe_ll_args_t;

/* The four halves. Each is enqueued on `stream`; a receive half must follow
 * its send half in stream order. With args->fused the send launch runs both
 * halves in one kernel (no receive launch follows). */
cudaError_t moe_ll_dispatch_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                        cudaStream_t stream);
cudaError_t moe_ll_dispatch_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                        cudaStream_t stream);
cudaError_t moe_ll_combine_send_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                       cudaStream_t stream);
cudaError_t moe_ll_combine_recv_launch(const moe_ll_ctx_t* ctx, const moe_ll_args_t* args,
                                       cudaStream_t stream);

/* Loads every low-latency kernel now (see intranode.cu: lazy loading). */
cudaError_t moe_ll_preload(void);

#ifdef __cplusplus
}
#endif
#endif
