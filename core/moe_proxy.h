/* SPDX-License-Identifier: Apache-2.0 */
/* The network proxy of one rank: connections to a set of peers (the normal
 * path: the rank with the same local index on every other node, indexed by
 * node; the low-latency path: every rank of another node), made through the internal transport interface,
 * and a thread that turns slab chunks the GPU marks ready into one-sided writes,
 * turns arriving immediates into counters the GPU polls, and returns credits
 * so that a sender never overwrites a slab its receiver has not read. See
 * kernels/moe_internode.h for the protocol. Nothing here touches CUDA: the
 * regions and counters are plain pointers (host-mapped memory in production,
 * malloc'ed memory in the unit tests). */
#ifndef MOE_PROXY_H_
#define MOE_PROXY_H_

#include "kernels/moe_internode.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_proxy moe_proxy_t;

typedef struct {
  const moe_transport_t* transport;
  int dev;                 /* the transport's device */
  int rank;
  int nPeers;              /* peer indices 0..nPeers-1 (slabs of both regions are per index) */
  int peerRank[MOE_MAX_NODES]; /* global rank of the peer at each index; -1: none there */
  int remoteSlot[MOE_MAX_NODES]; /* the index of this rank in that peer's receive region */
  int nChannels;           /* 1..MOE_NET_MAX_CHANNELS */
  char* sendBuf;           /* geom.total bytes: slabs this rank sends */
  char* recvBuf;           /* geom.total bytes: slabs peers write */
  int bufType;             /* NCCL_PTR_HOST or NCCL_PTR_CUDA */
  moe_net_geom_t geom;
  moe_net_flags_t* flags;  /* counters shared with the GPU */
  volatile int* error;     /* the comm's error record (MOE_ERR_*); the proxy sets MOE_KERR_NET */
  int timeoutMs;           /* bound on connection set-up */
} moe_proxy_args_t;

/* Listens and writes the handle peers connect to (MOE_NET_HANDLE_BYTES). */
ncclResult_t moe_proxy_create(const moe_proxy_args_t* args, void* handle, moe_proxy_t** proxy_p);

/* Connects to every peer and identifies every accepted connection; never
 * blocks. handles[i * MOE_NET_HANDLE_BYTES] is the handle of peer index i. Call until *done_p; ranks of one process are progressed in turn. A peer
 * that does not finish within timeoutMs of the first call is an error. */
ncclResult_t moe_proxy_connect(moe_proxy_t* proxy, const char* handles, int* done_p);

/* Starts the proxy thread (after moe_proxy_connect finished). */
ncclResult_t moe_proxy_start(moe_proxy_t* proxy);

/* Stops the thread at once (ncclMoeCommAbort): slabs and credits peers
 * wait for are not finished. NULL is a no-op. */
void moe_proxy_abort(moe_proxy_t* proxy);

/* Stops the thread (first finishing, within timeoutMs, what the GPU handed
 * over), closes connections, frees everything. NULL is a no-op. */
void moe_proxy_destroy(moe_proxy_t* proxy);

/* The message of the error that stopped the thread ("" if none). */
const char* moe_proxy_error(const moe_proxy_t* proxy);

/* Immediates (below 2^31): the kind (channel, or MOE_IMM_CREDIT + channel
 * for a credit) in bits 28..30, the low 20 bits of the operation number in
 * bits 0..19; a data write also carries the number of the slab's chunks
 * landed with it (bits 20..26) and whether it ends the slab (bit 27). */
#define MOE_IMM_SEQ_BITS 20
#define MOE_IMM_SEQ_MASK ((1u << MOE_IMM_SEQ_BITS) - 1u)
#define MOE_IMM_CHUNK_SHIFT 20
#define MOE_IMM_CHUNK_MASK 0x7fu
#define MOE_IMM_LAST (1u << 27)
#define MOE_IMM_KIND_SHIFT 28
#define MOE_IMM_KIND_MASK (7u << MOE_IMM_KIND_SHIFT)
#define MOE_IMM_CREDIT 4
_Static_assert(MOE_IMM_CREDIT >= MOE_NET_MAX_CHANNELS && MOE_IMM_CREDIT + MOE_NET_MAX_CHANNELS <= 8,
               "a channel's data and credit kinds fit in 3 bits");
static inline uint32_t moe_imm_encode(int kind, unsigned long long seq) {
  return ((uint32_t)kind << MOE_IMM_KIND_SHIFT) | ((uint32_t)seq & MOE_IMM_SEQ_MASK);
}
static inline uint32_t moe_imm_data(int channel, unsigned long long seq, int chunkEnd, int last) {
  return moe_imm_encode(channel, seq) | ((uint32_t)chunkEnd << MOE_IMM_CHUNK_SHIFT) | (last ? MOE_IMM_LAST : 0u);
}

#ifdef __cplusplus
}
#endif
#endif
