/* Plain structs shared by the host (the proxy thread) and the internode
 * kernels. Ranks are grouped into nodes; a token crosses the network once per
 * destination node, to the rank with the same local index there (its
 * "forwarder"), which writes it over NVLink to the ranks of its node.
 *
 * Every rank has a send region and a receive region for the network, each cut
 * into one slab per (channel, peer node). A slab goes from a sender to its
 * peer as one one-sided write with an immediate; the counters below, in
 * host-mapped memory, tell the GPU and the proxy thread where each slab is:
 *
 *   GPU (sender)   fills send slab k of (channel c, node m), writes bytes, then
 *                  ready[c][m] = k (release, system scope)
 *   proxy          waits for credit[c][m] >= k - 1 (the peer read slab k - 1),
 *                  writes it to the peer, sets sent[c][m] = k when the local
 *                  slab may be reused
 *   proxy (peer)   sees the immediate, sets arrived[c][n] = k
 *   GPU (peer)     waits for arrived[c][n] >= k, reads the slab, then
 *                  consumed[c][n] = k; the peer's proxy returns it as credit.
 *
 * k counts operations of channel c on this comm, from 1, on the device (so
 * CUDA graph replays keep counting). */
#ifndef MOE_INTERNODE_H_
#define MOE_INTERNODE_H_

#include <stddef.h>
#include <stdint.h>

#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { MOE_CH_NOTIFY = 0, MOE_CH_DISPATCH = 1, MOE_CH_COMBINE = 2, MOE_NET_CHANNELS = 3 };
#define MOE_MAX_NODES NCCL_MOE_MAX_RANKS

typedef struct {
  volatile unsigned long long ready[MOE_NET_CHANNELS][MOE_MAX_NODES];    /* GPU -> proxy */
  volatile unsigned long long bytes[MOE_NET_CHANNELS][MOE_MAX_NODES];    /* GPU -> proxy */
  volatile unsigned long long sent[MOE_NET_CHANNELS][MOE_MAX_NODES];     /* proxy -> GPU */
  volatile unsigned long long arrived[MOE_NET_CHANNELS][MOE_MAX_NODES];  /* proxy -> GPU */
  volatile unsigned long long consumed[MOE_NET_CHANNELS][MOE_MAX_NODES]; /* GPU -> proxy */
} moe_net_flags_t;

/* Where the slabs are: slab (c, m) of the send region starts at
 * off[c] + m * slab[c]; the receive region has the same shape, indexed by
 * the source node. */
typedef struct {
  size_t slab[MOE_NET_CHANNELS];
  size_t off[MOE_NET_CHANNELS];
  size_t total;
} moe_net_geom_t;

static inline size_t moe_net_slab_offset(const moe_net_geom_t* g, int c, int node) {
  return g->off[c] + (size_t)node * g->slab[c];
}

#ifdef __cplusplus
}
#endif
#endif
