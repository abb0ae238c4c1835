/* SPDX-License-Identifier: Apache-2.0 */
/* Comm set-up across ranks: each rank's identity (host, process, device, the
 * devices it can map), buffer (pointer, CUDA IPC handle) and config, gathered
 * from every rank with an all-gather; from them the nodes and the peer
 * table. The all-gather is a callback, so one path serves ncclMoeCommInit
 * (ncclAllGather on the caller's communicator, core/moe_nccl.h),
 * ncclMoeCommInitOob (the caller's callback: MPI, a store, the UCC/UCX
 * pattern) and virtual ranks (threads of this process, moe_local_allgather
 * below). What a callback returns is other processes' data: checked before
 * use. */
#ifndef MOE_BOOTSTRAP_H_
#define MOE_BOOTSTRAP_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "core/moe_comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* All-gathers `bytes` per rank: `send` holds this rank's bytes, `recv`
 * receives nRanks * bytes, rank r's at r * bytes. Collective: every rank
 * calls it, in the same order, with the same `bytes`. Returns 0 on success. */
typedef int (*moe_allgather_fn)(const void* send, void* recv, size_t bytes, void* ctx);

typedef struct {
  int rank, nRanks;
  moe_allgather_fn allgather;
  void* ctx;
  /* NULL: ranks are grouped into nodes by host and peer access
   * (moe_node_keys); else nodeKey[r] for every rank (virtual nodes). */
  const int* nodeKey;
} moe_bootstrap_t;

/* b->allgather, with a failure turned into an ncclResult_t and a message
 * naming `what`. What the callback returns is checked as far as this rank
 * can: nothing written past nRanks * bytes, and this rank's own bytes at its
 * place. */
ncclResult_t moe_bootstrap_allgather(const moe_bootstrap_t* b, const void* send, void* recv, size_t bytes,
                                     const char* what);

/* ---------------------------------------------- the set-up rounds */
/* A comm is set up in rounds of one all-gather each, the same on every rank
 * whatever happens: each round carries every rank's set-up status, so a rank
 * that failed locally (out of memory, a peer it cannot map) still takes part
 * in the next round and every rank then returns an error naming it, instead
 * of its peers waiting for it. A round that reports a failure is the last.
 *   round 1 (moe_bootstrap_exchange): identity, buffer, config -> topology
 *   round 2 (moe_bootstrap_round, only across nodes): network handles
 *   round 3 (moe_bootstrap_round, no payload): set-up done, so that no rank
 *           starts a kernel while a peer still sets up. */
typedef struct moe_peer_info moe_peer_info_t;

/* Round 1. `local`: this rank's status so far; when it is not ncclSuccess
 * (or comm is NULL) this rank only reports its failure. On success *all_p
 * (the caller frees it) holds every rank's checked info and *topo_p the
 * nodes. Every rank gets an error when any rank failed or the infos do not
 * agree (ranks, nRanks, configs). */
ncclResult_t moe_bootstrap_exchange(const moe_bootstrap_t* b, ncclMoeComm_t comm, ncclResult_t local,
                                    moe_peer_info_t** all_p, moe_topo_t* topo_p);

/* This rank's part after round 1 (local: its failure goes into the next
 * round): counts the ranks that share its GPU (comm->gpuRanks) and maps the
 * buffers of its node's ranks into comm->ctx.peers (CUDA IPC across
 * processes). The comm's device is current. */
ncclResult_t moe_bootstrap_map(ncclMoeComm_t comm, const moe_peer_info_t* all, const moe_topo_t* topo);

/* Rounds after the first: every rank's status and `bytes` of payload (mine:
 * this rank's, all: nRanks * bytes; both may be NULL when bytes is 0).
 * Returns `local` when it failed, else an error naming the first rank that
 * did (every rank then returns an error). */
ncclResult_t moe_bootstrap_round(const moe_bootstrap_t* b, ncclResult_t local, const void* mine, void* all,
                                 size_t bytes, const char* what);

/* ---------------------------------------------- pieces, for the tests */
#define MOE_HOST_NAME_MAX 64
#define MOE_BOOT_ID_MAX 40
#define MOE_BUS_ID_LEN 16
#define MOE_MAX_VISIBLE_DEVICES 16
#define MOE_BOOT_FAILURE_MAX 192
#define MOE_BOOT_MAGIC 0x6d6f6542u /* "moeB" */

/* What each rank tells the others in round 1. */
struct moe_peer_info {
  uint32_t magic;                /* MOE_BOOT_MAGIC */
  uint32_t bytes;                /* sizeof(moe_peer_info_t): the same library layout */
  int rank, nRanks;              /* as this rank was told */
  int status;                    /* its ncclResult_t so far; `failure` says why */
  char failure[MOE_BOOT_FAILURE_MAX];
  char host[MOE_HOST_NAME_MAX];
  char bootId[MOE_BOOT_ID_MAX];
  int pid, device;
  unsigned long long ptr;
  int p2pDisable;                /* NCCL_MOE_P2P_DISABLE of this rank */
  char busId[MOE_BUS_ID_LEN];    /* PCI bus id of this rank's device */
  int nReach;                    /* devices this rank's device can map (itself included) */
  char reach[MOE_MAX_VISIBLE_DEVICES][MOE_BUS_ID_LEN];
  int ipcOk;                     /* 0: `ipc` could not be made (ipcError says why) */
  cudaIpcMemHandle_t ipc;
  char ipcError[64];
  ncclMoeConfig_t config;
};

/* Checks what the all-gather of round 1 returned, other processes' data
 * (validated once, then used): every slot's header, rank and nRanks, the
 * set-up status (a failed rank's message), equal configs, sane counts; and
 * NUL-terminates every string in place. `rank` is the caller's. */
ncclResult_t moe_peer_infos_check(moe_peer_info_t* all, int nRanks, int rank);

/* The ranks of `all` on the same GPU as `rank` (itself included). */
int moe_gpu_ranks(const moe_peer_info_t* all, int nRanks, int rank);

/* Ranks of one host whose devices can all map each other's memory form a
 * node; on a host where some pair cannot, or where a rank set
 * NCCL_MOE_P2P_DISABLE=1, every rank is a node of its own. nodeKey[r] is
 * equal for ranks of one node. Computed from exchanged data only, so every
 * rank agrees. */
void moe_node_keys(const moe_peer_info_t* all, int nRanks, int* nodeKey);

/* Groups ranks into nodes: nodeKey[r] is equal for ranks of one node (any
 * int). Every node must have the same number of ranks, at most 32 (a warp's
 * lanes index them). */
ncclResult_t moe_topo_build(int nRanks, int rank, const int* nodeKey, moe_topo_t* topo_p);

/* Virtual ranks: an all-gather among the threads of this process that
 * build the ranks, one thread per rank. A member that fails calls
 * moe_local_group_abort: every all-gather of the group, waiting or later,
 * then fails instead of waiting for it. */
typedef struct moe_local_group moe_local_group_t;
typedef struct {
  moe_local_group_t* group;
  int rank;
} moe_local_member_t;

/* A wait for the other members longer than timeoutMs fails (and aborts the group). */
ncclResult_t moe_local_group_create(int nRanks, int timeoutMs, moe_local_group_t** group_p);
void moe_local_group_destroy(moe_local_group_t* group);
void moe_local_group_abort(moe_local_group_t* group, int rank);
/* The rank whose failure aborted the group first, -1 when none did. */
int moe_local_group_first_failure(moe_local_group_t* group);
/* moe_allgather_fn; ctx is the caller's moe_local_member_t. Returns an
 * ncclResult_t, with the message set on failure. */
int moe_local_allgather(const void* send, void* recv, size_t bytes, void* ctx);

#ifdef __cplusplus
}
#endif
#endif
