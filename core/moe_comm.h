/* SPDX-License-Identifier: Apache-2.0 */
/* The MoE communicator and handle (internal): every state type of a comm and
 * a handle (normal mode, low latency, internode), and what one rank does
 * with its own memory: allocate and free it, fill the kernels' context,
 * decode the error word the kernels write, check that the comm can still
 * run. The layers above (moe_ll.c, moe_inter.c, moe_ops.c, moe_bootstrap.c,
 * moe_init.c) fill and use these; nothing here calls them. */
#ifndef MOE_COMM_H_
#define MOE_COMM_H_

#include <cuda_runtime_api.h>

#include "core/moe_device.h"
#include "core/moe_proxy.h"
#include "kernels/moe_internode.h"
#include "kernels/moe_intranode.h"
#include "kernels/moe_lowlatency.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------- low latency */
/* Per comm. */
typedef struct {
  moe_ll_ctx_t ctx;            /* what the kernels get; ctx.l.bytes == 0: no LL buffers */
  int nextSet;                 /* buffer set of the next dispatch */
  unsigned long long gen[MOE_LL_SETS];  /* dispatches that took each set so far */
  struct ncclMoeHandle* pending[MOE_LL_SETS]; /* handle whose receive half on the set is not enqueued */
} moe_ll_comm_t;

typedef enum {
  MOE_LL_IDLE = 0,             /* no low-latency dispatch */
  MOE_LL_DISPATCH_SENT,        /* dispatch send half enqueued, receive half not yet */
  MOE_LL_DISPATCHED,           /* dispatch received: combine may follow */
  MOE_LL_COMBINE_SENT,         /* combine send half enqueued, receive half not yet */
} moe_ll_state_t;

/* Per handle: the dispatch it holds, and a pending combine's outputs. */
typedef struct {
  moe_ll_state_t state;
  int set;
  unsigned long long gen;      /* comm gen[set] when the dispatch took the set */
  int numTokens, hidden, topk;
  int sendFp8, scaleFormat;    /* the dispatch's payload (its receive half reads network slabs of it) */
  int64_t* cumulative;         /* pending dispatch receive */
  const float* weights;        /* pending combine receive */
  void* out;
  int scaleTokenStride;        /* > 0: column-major scales (moe_ll_args_t) */
  int* cumulative32;           /* pending dispatch receive, int32 counters */
} moe_ll_handle_t;

/* --------------------------------------------------------- internode */
/* One proxy and what it serves: send and receive regions, counters. */
typedef struct {
  moe_net_flags_t* flags;     /* host view of the counters */
  moe_net_flags_t* devFlags;  /* the same as the GPU addresses them */
  char* sendHost;             /* the regions as the proxy hands them to the transport */
  char* recvHost;
  char* sendDev;              /* ... and as the GPU addresses them */
  char* recvDev;
  int gpuSlabs;               /* 1: regions in GPU memory (GPUDirect RDMA), else pinned host */
  moe_proxy_t* proxy;
  char handle[MOE_NET_HANDLE_BYTES]; /* its listen handle */
  int nPeers;                 /* the proxy's peers (moe_proxy_args_t) */
  int peerRank[MOE_MAX_NODES];
} moe_net_ep_t;

typedef struct moe_inter_comm {
  moe_net_ctx_t net;          /* what the normal-mode kernels get */
  moe_net_ep_t ep;            /* normal mode: the same local index on every other node */
  moe_net_ep_t ll;            /* low latency (when configured): every rank of another node */
  int hasLL;
  const moe_transport_t* transport; /* holds one init() of it, released by moe_inter_destroy */
} moe_inter_comm_t;

/* ---------------------------------------------------- comm and handle */
/* Streams whose work ncclMoeCommDestroy waits for by event; work on more
 * streams than this makes it synchronize the device instead. */
#define MOE_TRACKED_STREAMS 8

struct ncclMoeComm {
  int rank, nRanks, device, numLocalExperts;
  ncclMoeConfig_t config;      /* validated, defaults filled in */
  int maxRecv;                 /* rows of every receive buffer */
  int numBlocks;               /* dispatch/combine blocks (the SM budget) */
  int waitBlocks;              /* blocks of kernels whose blocks all wait for peers (internode,
                                  low latency): for ranks sharing a GPU half of numBlocks, at
                                  most sms / gpuRanks (moe_comm_finish) */
  int gpuRanks;                /* ranks on this rank's GPU, itself included (virtual ranks, or
                                  processes sharing one GPU): they split its SMs */
  moe_layout_t layout;
  char* buffer;                /* this rank's peer-visible buffer */
  int peerIpc[NCCL_MOE_MAX_RANKS]; /* 1: peers.base[r] came from cudaIpcOpenMemHandle */
  void* scratch;               /* private device memory: epoch, counters, layout scratch */
  int* hostError;              /* host-mapped error word the kernels write */
  int* hostCounts;             /* host-mapped [MOE_HOST_EXPERTS + L] (exact mode, see moe_notify_args_t) */
  int* devHostCounts;          /* the same as the GPU addresses it */
  unsigned int exactSeq;       /* exact-mode dispatches so far (the notify kernel publishes it) */
  cudaEvent_t notified;        /* recorded after an exact-mode notify kernel */
  cudaStream_t stream;         /* set-up work (memsets, the bootstrap copies); never the callers' */
  struct {
    cudaStream_t stream;
    cudaEvent_t event;         /* recorded after this comm's last work on `stream` */
  } tracked[MOE_TRACKED_STREAMS];
  int nTracked;
  int untracked;               /* some work is not covered by `tracked`: destroy synchronizes the device */
  moe_rank_ctx_t ctx;
  int* tokensPerRank;          /* layout scratch (device) */
  int* tokensPerExpert;
  moe_ll_comm_t ll;            /* low-latency mode (moe_ll.c) */
  moe_inter_comm_t* inter;     /* ranks on several nodes (moe_inter.c); NULL on one node */
  /* Split halves (moe_ops.c): the handle whose send half's receive half is
   * not enqueued yet (no other dispatch / combine meanwhile), and whether the
   * last combine's receive half arrived without waiting for peers (the next
   * combine then waits before staging its rows over ones peers may read). */
  struct ncclMoeHandle* splitPending;
  int splitUnmatched;
};

/* A handle's split state (ncclMoeDispatch / ncclMoeCombine with sendOnly). */
enum { MOE_SPLIT_NONE = 0, MOE_SPLIT_DISPATCH_SENT = 1, MOE_SPLIT_COMBINE_SENT = 2 };

struct ncclMoeHandle {
  ncclMoeComm_t comm;
  moe_route_t route;
  void* mem;
  int valid;                   /* holds the routing of a finished dispatch */
  int numTokens, capacity, hidden, topk;
  int numRecv;                 /* rows received (exact mode), -1 when unknown (capacity mode) */
  moe_ll_handle_t ll;          /* low-latency dispatch held (moe_ll.c) */
  moe_fwd_route_t fwd;         /* internode: forwarding routes (in mem, after route) */
  int split;                   /* MOE_SPLIT_*: a send half whose receive half is pending */
  moe_combine_args_t splitCombine; /* the pending combine receive half's kernel arguments */
};

/* ------------------------------------------------ a rank's own memory */
/* `comm` has rank, nRanks, device and a resolved config; the
 * device is current. Lays out and allocates this rank's peer-visible buffer
 * and clears what peers read before they write (signals, low-latency state),
 * finished before it returns: peers may write as soon as they can map it. */
ncclResult_t moe_comm_alloc(ncclMoeComm_t comm);

/* Once peers are mapped (ctx.peers, gpuRanks): scratch and host-mapped
 * memory, the kernels' context, the block budget, every kernel loaded. */
ncclResult_t moe_comm_finish(ncclMoeComm_t comm);

/* Waits until the set-up work on comm->stream is done (before the comm is
 * returned to the caller, whose streams are not ordered after it). */
ncclResult_t moe_comm_setup_done(ncclMoeComm_t comm);

/* Frees what moe_comm_alloc and moe_comm_finish made, and `comm`; safe on a
 * partly built comm and on NULL. comm->inter must be gone (moe_inter_destroy),
 * and no kernel of the comm may still run (moe_comm_wait_idle). */
void moe_comm_free(ncclMoeComm_t comm);

/* ------------------------------------------------------------- checks */
/* The comm's async error as ncclResult_t (ncclSuccess when none). */
ncclResult_t moe_comm_error(ncclMoeComm_t comm);

/* The comm can still run collectives (not NULL, no timeout, no network or
 * notify failure, not aborted). */
ncclResult_t moe_comm_ready(ncclMoeComm_t comm);

/* Records MOE_KERR_ABORT in the error record unless a fatal error is there
 * already (the first fatal error wins; a recorded bad batch gives way, so
 * that the kernels' waits end): from then on every wait of the comm's
 * kernels ends and every call fails. */
void moe_comm_mark_aborted(ncclMoeComm_t comm);

/* `p` is device (or managed) memory aligned to `align`. */
ncclResult_t moe_check_device_ptr(const void* p, size_t align, const char* what);

/* ------------------------------------------------------ work tracking */
/* Called after an entry point enqueued work on `stream`: destroy waits for
 * it. Work captured into a CUDA graph is not tracked (its replays are the
 * caller's to finish before destroying the comm). */
void moe_comm_track(ncclMoeComm_t comm, cudaStream_t stream);

/* What every stream entry point does around its work: `fn` names it in the
 * NULL-comm message; enter makes the comm's device current, leave tracks
 * `stream` (moe_comm_track), restores the caller's device and returns res. */
ncclResult_t moe_comm_enter(ncclMoeComm_t comm, const char* fn, moe_device_guard_t* guard);
ncclResult_t moe_comm_leave(ncclMoeComm_t comm, cudaStream_t stream, moe_device_guard_t* guard, ncclResult_t res);

/* Waits for every tracked piece of work and the set-up stream. */
void moe_comm_wait_idle(ncclMoeComm_t comm);

/* moe_comm_wait_idle bounded by `timeoutMs`: 1 when the comm's work ended
 * in time; 0 when it did not (a kernel still runs: its memory must stay). */
int moe_comm_wait_idle_for(ncclMoeComm_t comm, int timeoutMs);

#ifdef __cplusplus
}
#endif
#endif
