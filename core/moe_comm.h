/* The MoE communicator and handle (internal). */
#ifndef MOE_COMM_H_
#define MOE_COMM_H_

#include "core/moe_inter.h"
#include "kernels/moe_intranode.h"
#include "core/moe_ll.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ncclMoeComm {
  int rank, nRanks, device, numLocalExperts;
  ncclMoeConfig_t config;      /* validated, defaults filled in */
  int maxRecv;                 /* rows of every receive buffer */
  int numBlocks;               /* dispatch/combine blocks (the SM budget) */
  int waitBlocks;              /* blocks of kernels whose blocks all wait for peers (internode,
                                  low latency): for virtual ranks half of numBlocks, at most
                                  sms / nRanks (moe_comm_finish) */
  int isVirtual;               /* peers are pointers of this process */
  moe_layout_t layout;
  char* buffer;                /* this rank's peer-visible buffer */
  int peerIpc[NCCL_MOE_MAX_RANKS]; /* 1: peers.base[r] came from cudaIpcOpenMemHandle */
  void* scratch;               /* private device memory: epoch, counters, layout scratch */
  int* hostError;              /* host-mapped error word the kernels write */
  int* hostCounts;             /* pinned: recvCount then per-expert counts (exact mode) */
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

/* Builds the comm of one rank once peers are known: allocates scratch and
 * host memory and fills ctx. `comm` has rank/nRanks/device/config/buffer. */
ncclResult_t moe_comm_finish(ncclMoeComm_t comm);

/* Validates `config` for nRanks and fills defaults into *out_p. */
ncclResult_t moe_config_resolve(const ncclMoeConfig_t* config, int nRanks, ncclMoeConfig_t* out_p);

/* The comm's async error as ncclResult_t (ncclSuccess when none). */
ncclResult_t moe_comm_error(ncclMoeComm_t comm);

/* Runs `call` (an ncclResult_t expression) with the comm's device current,
 * then restores the caller's device and returns the result: the library's
 * CUDA runtime is its own (static), so the caller's current device says
 * nothing reliable about the comm. */
#define MOE_ON_COMM_DEVICE(comm, call)                                              \
  do {                                                                              \
    if ((comm) == NULL) return MOE_ERROR(ncclInvalidArgument, "comm is NULL");      \
    int moe_prev_ = -1;                                                             \
    if (cudaGetDevice(&moe_prev_) != cudaSuccess) moe_prev_ = -1;                   \
    if (moe_prev_ != (comm)->device) cudaSetDevice((comm)->device);                 \
    ncclResult_t moe_res_ = (call);                                                 \
    if (moe_prev_ >= 0 && moe_prev_ != (comm)->device) cudaSetDevice(moe_prev_);    \
    return moe_res_;                                                                \
  } while (0)

/* moe_ops.c: the comm can still run collectives (not NULL, no timeout). */
ncclResult_t moe_comm_ready(ncclMoeComm_t comm);

/* moe_ops.c: `p` is device (or managed) memory aligned to `align`. */
ncclResult_t moe_check_device_ptr(const void* p, size_t align, const char* what);

#ifdef __cplusplus
}
#endif
#endif
