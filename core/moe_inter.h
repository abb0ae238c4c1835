/* Internode state of a comm (internal): topology, the network regions and
 * counters, the proxy; and the handle's forwarding routes. */
#ifndef MOE_INTER_H_
#define MOE_INTER_H_

#include "kernels/moe_internode.h"
#include "core/moe_proxy.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ncclMoeComm;

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
} moe_inter_comm_t;

/* Bytes of listen handles each rank contributes to the exchange. */
#define MOE_INTER_HANDLE_BYTES (2 * MOE_NET_HANDLE_BYTES)

/* Groups ranks into nodes: nodeKey[r] is equal for ranks of one node (any
 * int). Every node must have the same number of ranks, at most 32 (a warp's
 * lanes index them). */
ncclResult_t moe_topo_build(int nRanks, int rank, const int* nodeKey, moe_topo_t* topo_p);

/* Allocates the network regions and counters of `comm` (whose config and
 * rank are set; with low-latency buffers, also those of the low-latency
 * proxy, and comm->ll.ctx.net is filled) and starts listening:
 * moe_inter_handles() is ready to exchange. */
ncclResult_t moe_inter_create(struct ncclMoeComm* comm, const moe_topo_t* topo, moe_inter_comm_t** inter_p);

/* This rank's MOE_INTER_HANDLE_BYTES of listen handles into `out`. */
void moe_inter_handles(const moe_inter_comm_t* inter, char* out);
/* handles[r * MOE_INTER_HANDLE_BYTES]: the listen handles of every rank.
 * Non-blocking; call until *done_p (moe_proxy_connect). */
ncclResult_t moe_inter_connect(moe_inter_comm_t* inter, const char* handles, int* done_p);

/* Starts the proxy threads. */
ncclResult_t moe_inter_start(moe_inter_comm_t* inter);

/* Stops the proxy and frees everything; NULL is a no-op. */
void moe_inter_destroy(moe_inter_comm_t* inter);

/* Device ints a handle needs for its forwarding routes. */
size_t moe_inter_route_ints(const moe_inter_comm_t* inter);
/* Cuts `mem` (moe_inter_route_ints ints) into the routes. */
void moe_inter_route_init(const moe_inter_comm_t* inter, int* mem, moe_fwd_route_t* fwd);

#ifdef __cplusplus
}
#endif
#endif
