/* Comm set-up across ranks: each rank's identity (host, process, device, the
 * devices it can map), buffer (pointer, CUDA IPC handle) and config, gathered
 * from every rank with one all-gather; from them the nodes and the peer
 * table. The all-gather is a callback, so one path serves ncclMoeCommInit
 * (ncclAllGather on the caller's communicator, core/moe_nccl.h), virtual
 * ranks (threads of this process, moe_local_allgather below) and any other
 * out-of-band bootstrap (MPI, a store: the UCC/UCX pattern). */
#ifndef MOE_BOOTSTRAP_H_
#define MOE_BOOTSTRAP_H_

#include <cuda_runtime_api.h>
#include <stddef.h>

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
 * naming `what`. */
ncclResult_t moe_bootstrap_allgather(const moe_bootstrap_t* b, const void* send, void* recv, size_t bytes,
                                     const char* what);

/* Exchanges this rank's peer info, checks that every rank passed the same
 * config, groups the ranks into nodes (*topo_p) and maps the buffers of this
 * node's ranks into comm->ctx.peers (CUDA IPC across processes). `comm` is
 * allocated (moe_comm_alloc) and its device is current. */
ncclResult_t moe_bootstrap_peers(ncclMoeComm_t comm, const moe_bootstrap_t* b, moe_topo_t* topo_p);

/* ---------------------------------------------- pieces, for the tests */
#define MOE_HOST_NAME_MAX 64
#define MOE_BOOT_ID_MAX 40
#define MOE_BUS_ID_LEN 16
#define MOE_MAX_VISIBLE_DEVICES 16

/* What each rank tells the others. */
typedef struct {
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
} moe_peer_info_t;

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
