/* SPDX-License-Identifier: Apache-2.0 */
/* Internode set-up: topology, network slabs, the proxy and its connections
 * (see kernels/moe_internode.h for the protocol).
 *
 * Slabs live in GPU memory when the transport can register it (verbs with
 * dma-buf or nvidia-peermem: the NIC reads and writes them directly), else in
 * pinned host memory the GPU maps (the socket backend). The proxy never
 * copies payload either way. */
#include "core/moe_inter.h"

#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "common/moe_log.h"
#include "core/moe_backoff.h"

static void moe_inter_geom(const ncclMoeConfig_t* c, int notifyInts, const moe_topo_t* t, moe_net_geom_t* g) {
  const moe_record_t d = moe_dispatch_record(t->ranksPerNode, c->maxTopk, c->hidden, 0);
  const moe_record_t k = moe_combine_record(c->maxTopk, c->hidden);
  g->slab[MOE_CH_NOTIFY] = moe_align16(sizeof(int) * (size_t)t->ranksPerNode * notifyInts);
  g->slab[MOE_CH_DISPATCH] = MOE_SLAB_HEADER + (size_t)c->maxTokensPerRank * d.bytes;
  g->slab[MOE_CH_COMBINE] = MOE_SLAB_HEADER + (size_t)c->maxTokensPerRank * k.bytes;
  size_t off = 0;
  for (int ch = 0; ch < MOE_NET_CHANNELS; ch++) {
    g->off[ch] = off;
    off += g->slab[ch] * (size_t)t->nNodes;
  }
  g->total = off;
}

/* Records per chunk of a dispatch or combine slab: at most
 * MOE_NET_MAX_CHUNKS chunks per slab, and chunks of at least
 * NCCL_MOE_NET_CHUNK_KB at the largest record (fewer, larger messages). */
static int moe_inter_chunk_records(const ncclMoeConfig_t* c, const moe_topo_t* t) {
  const moe_record_t d = moe_dispatch_record(t->ranksPerNode, c->maxTopk, c->hidden, 0);
  const moe_record_t k = moe_combine_record(c->maxTopk, c->hidden);
  const int rec = d.bytes > k.bytes ? d.bytes : k.bytes;
  const size_t minBytes = (size_t)moe_env()->net_chunk_kb << 10;
  const int bySize = (int)((minBytes + rec - 1) / rec);
  const int byCount = (c->maxTokensPerRank + MOE_NET_MAX_CHUNKS - 1) / MOE_NET_MAX_CHUNKS;
  const int records = bySize > byCount ? bySize : byCount;
  return records > 0 ? records : 1;
}

static ncclResult_t moe_host_alloc(size_t bytes, char** host_p, char** dev_p, const char* what) {
  cudaError_t e = cudaHostAlloc((void**)host_p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (e != cudaSuccess)
    return MOE_ERROR(ncclSystemError, "cannot pin %zu bytes of host memory for the %s (%s): lower "
                     "config.maxTokensPerRank, llMaxTokensPerRank or hidden", bytes, what, cudaGetErrorString(e));
  memset(*host_p, 0, bytes);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer((void**)dev_p, *host_p, 0));
  return ncclSuccess;
}

/* Regions of a->geom.total bytes each, counters, and a proxy listening for
 * the peers of `a` (whose transport, device, peers and channels are set). */
static ncclResult_t moe_net_ep_open(ncclMoeComm_t comm, moe_proxy_args_t* a, const char* what,
                                    moe_net_ep_t* ep) {
  for (int ch = 0; ch < a->nChannels; ch++)
    if (a->geom.slab[ch] > MOE_NET_MAX_MSG_BYTES)
      return MOE_ERROR(ncclInvalidArgument, "a %s network slab would take %zu bytes, more than the transport's %zu per "
                       "message: lower config.maxTokensPerRank, llMaxTokensPerRank or hidden", what, a->geom.slab[ch],
                       (size_t)MOE_NET_MAX_MSG_BYTES);
  moe_net_props_t props;
  MOE_CHECK(a->transport->get_properties(a->dev, &props));
  MOE_CHECK(moe_host_alloc(sizeof(moe_net_flags_t), (char**)&ep->flags, (char**)&ep->devFlags, "network counters"));
  /* GPU memory when the NIC can reach it (GPUDirect RDMA): kernels write
   * slabs at device speed and the NIC reads them directly. Else pinned host
   * memory the GPU maps (the socket backend, or NICs without GPUDirect). */
  ep->gpuSlabs = (props.ptr_support & NCCL_PTR_CUDA) != 0;
  if (ep->gpuSlabs) {
    MOE_CUDA_CHECK(cudaMalloc((void**)&ep->sendDev, a->geom.total));
    ep->sendHost = ep->sendDev; /* the proxy only hands them to the transport */
    MOE_CUDA_CHECK(cudaMalloc((void**)&ep->recvDev, a->geom.total));
    ep->recvHost = ep->recvDev;
  } else {
    MOE_CHECK(moe_host_alloc(a->geom.total, &ep->sendHost, &ep->sendDev, "network send slabs"));
    MOE_CHECK(moe_host_alloc(a->geom.total, &ep->recvHost, &ep->recvDev, "network receive slabs"));
  }
  a->sendBuf = ep->sendHost;
  a->recvBuf = ep->recvHost;
  a->bufType = ep->gpuSlabs ? NCCL_PTR_CUDA : NCCL_PTR_HOST;
  a->flags = ep->flags;
  a->rank = comm->rank;
  a->error = comm->hostError;
  a->timeoutMs = comm->config.timeoutMs;
  MOE_CHECK(moe_proxy_create(a, ep->handle, &ep->proxy));
  ep->nPeers = a->nPeers;
  memcpy(ep->peerRank, a->peerRank, sizeof(ep->peerRank));
  MOE_INFO(NCCL_INIT | NCCL_NET, "rank %d: %s proxy with %d channels, 2 x %zu bytes of %s slabs", comm->rank, what,
           a->nChannels, a->geom.total, ep->gpuSlabs ? "GPU" : "pinned host");
  return ncclSuccess;
}

static void moe_net_ep_close(moe_net_ep_t* ep) {
  moe_proxy_destroy(ep->proxy);
  if (ep->gpuSlabs) {
    if (ep->recvDev != NULL) cudaFree(ep->recvDev);
    if (ep->sendDev != NULL) cudaFree(ep->sendDev);
  } else {
    if (ep->recvHost != NULL) cudaFreeHost(ep->recvHost);
    if (ep->sendHost != NULL) cudaFreeHost(ep->sendHost);
  }
  if (ep->flags != NULL) cudaFreeHost(ep->flags);
  memset(ep, 0, sizeof(*ep));
}

/* Low latency: a slab per (operation, buffer set) channel and remote rank,
 * sized for the most records one rank sends another (each token at most
 * once per expert of the receiver), BF16. */
static void moe_ll_net_geom(const ncclMoeConfig_t* c, int nRanks, int nRemote, moe_net_geom_t* g) {
  const int L = c->numExperts / nRanks, K = c->maxTopk;
  const size_t rows = (size_t)c->llMaxTokensPerRank * (size_t)(K < L ? K : L);
  const size_t dispatch = moe_ll_net_dispatch_header(L) + rows * moe_ll_net_dispatch_record(c->hidden, 0, 0);
  const size_t combine = MOE_LL_NET_COMBINE_HEADER + rows * (size_t)c->hidden * 2;
  size_t off = 0;
  memset(g, 0, sizeof(*g));
  for (int op = 0; op < MOE_LL_OPS; op++)
    for (int set = 0; set < MOE_LL_SETS; set++) {
      const int ch = MOE_LL_NET_CHANNEL(op, set);
      g->slab[ch] = op == MOE_LL_OP_DISPATCH ? dispatch : combine;
      g->off[ch] = off;
      off += g->slab[ch] * (size_t)nRemote;
    }
  g->total = off;
}

/* The low-latency proxy: peers are the ranks of other nodes in rank order;
 * this rank's slot at each is its place among that rank's remote ranks. */
static ncclResult_t moe_inter_ll_open(ncclMoeComm_t comm, const moe_topo_t* t, moe_proxy_args_t* a,
                                      moe_inter_comm_t* in) {
  moe_ll_net_t* net = &comm->ll.ctx.net;
  int nRemote = 0;
  for (int r = 0; r < comm->nRanks; r++) {
    if (t->nodeOf[r] == t->node) continue;
    int slot = 0;
    for (int q = 0; q < comm->rank; q++) slot += t->nodeOf[q] != t->nodeOf[r];
    a->peerRank[nRemote] = r;
    a->remoteSlot[nRemote] = slot;
    nRemote++;
  }
  a->nPeers = nRemote;
  a->nChannels = MOE_LL_NET_CHANNELS;
  moe_ll_net_geom(&comm->config, comm->nRanks, nRemote, &a->geom);
  MOE_CHECK(moe_net_ep_open(comm, a, "low-latency", &in->ll));
  in->hasLL = 1;
  net->nRemote = nRemote;
  for (int j = 0; j < nRemote; j++) {
    net->remoteRank[j] = a->peerRank[j];
    net->slot[a->peerRank[j]] = j;
  }
  net->sendBuf = in->ll.sendDev;
  net->recvBuf = in->ll.recvDev;
  net->geom = a->geom;
  net->flags = in->ll.devFlags;
  return ncclSuccess;
}

ncclResult_t moe_inter_create(ncclMoeComm_t comm, const moe_topo_t* topo, moe_inter_comm_t** inter_p) {
  ncclResult_t res = ncclSuccess;
  moe_inter_comm_t* in = calloc(1, sizeof(*in));
  if (in == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  moe_net_ctx_t* n = &in->net;
  n->topo = *topo;
  n->maxTokens = comm->config.maxTokensPerRank;
  moe_inter_geom(&comm->config, comm->layout.notifyInts, topo, &n->geom);
  n->chunkRecords = moe_inter_chunk_records(&comm->config, topo);
  const moe_transport_t* transport = NULL;
  MOE_CHECK_GOTO(moe_transport_select(&transport), res, fail);
  in->transport = transport; /* one init() held: moe_inter_destroy releases it */
  int ndev = 0;
  MOE_CHECK_GOTO(transport->devices(&ndev), res, fail);
  if (ndev < 1) {
    res = MOE_ERROR(ncclSystemError, "the %s transport has no device", transport->name);
    goto fail;
  }
  /* Normal mode: peers are indexed by node, slab m of each region is for node m. */
  moe_proxy_args_t a = {.transport = transport, .dev = topo->local % ndev, .nPeers = topo->nNodes,
                        .nChannels = MOE_NET_CHANNELS, .geom = n->geom};
  for (int m = 0; m < topo->nNodes; m++) {
    a.peerRank[m] = m == topo->node ? -1 : topo->rankAt[m * topo->ranksPerNode + topo->local];
    a.remoteSlot[m] = topo->node;
  }
  MOE_CHECK_GOTO(moe_net_ep_open(comm, &a, "normal-mode", &in->ep), res, fail);
  n->sendBuf = in->ep.sendDev;
  n->recvBuf = in->ep.recvDev;
  n->flags = in->ep.devFlags;
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->seq, sizeof(unsigned long long) * MOE_NET_CHANNELS), res, fail);
  MOE_CUDA_CHECK_GOTO(cudaMemsetAsync(n->seq, 0, sizeof(unsigned long long) * MOE_NET_CHANNELS, comm->stream), res,
                      fail);
  const size_t chunkCounters = sizeof(unsigned int) * MOE_NET_CHANNELS * MOE_MAX_NODES * MOE_NET_MAX_CHUNKS;
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->chunkDone, chunkCounters), res, fail);
  /* On the set-up stream: done before the comm is returned (moe_comm_setup_done). */
  MOE_CUDA_CHECK_GOTO(cudaMemsetAsync(n->chunkDone, 0, chunkCounters, comm->stream), res, fail);
  if (comm->ll.ctx.l.bytes > 0) {
    moe_proxy_args_t b = {.transport = transport, .dev = topo->local % ndev};
    MOE_CHECK_GOTO(moe_inter_ll_open(comm, topo, &b, in), res, fail);
  }
  MOE_INFO(NCCL_INIT | NCCL_NET, "rank %d: node %d of %d, local rank %d of %d, %s transport", comm->rank, topo->node,
           topo->nNodes, topo->local, topo->ranksPerNode, transport->name);
  *inter_p = in;
  return ncclSuccess;
fail:
  moe_inter_destroy(in);
  return res;
}

void moe_inter_handles(const moe_inter_comm_t* in, char* out) {
  memcpy(out, in->ep.handle, MOE_NET_HANDLE_BYTES);                        /* which = 0 */
  memcpy(out + MOE_NET_HANDLE_BYTES, in->ll.handle, MOE_NET_HANDLE_BYTES); /* which = 1 */
}

/* Advances the connections of one proxy; `which` picks its handle in each
 * rank's MOE_INTER_HANDLE_BYTES. */
static ncclResult_t moe_net_ep_connect(const moe_net_ep_t* ep, const char* handles, int which, int* done_p) {
  char byPeer[MOE_MAX_NODES * MOE_NET_HANDLE_BYTES];
  for (int i = 0; i < ep->nPeers; i++)
    if (ep->peerRank[i] >= 0)
      memcpy(byPeer + (size_t)i * MOE_NET_HANDLE_BYTES,
             handles + (size_t)ep->peerRank[i] * MOE_INTER_HANDLE_BYTES + (size_t)which * MOE_NET_HANDLE_BYTES,
             MOE_NET_HANDLE_BYTES);
  return moe_proxy_connect(ep->proxy, byPeer, done_p);
}

ncclResult_t moe_inter_connect_start(moe_inter_comm_t* in, const char* handles) {
  int done = 0, llDone = !in->hasLL;
  moe_backoff_t backoff;
  moe_backoff_init(&backoff, MOE_BACKOFF_SETUP_MAX_NS);
  /* moe_proxy_connect never blocks and fails once a peer is late by the
   * comm's timeout: this loop ends either way. */
  while (!done || !llDone) {
    const int before = done + llDone;
    if (!done) MOE_CHECK(moe_net_ep_connect(&in->ep, handles, 0, &done));
    if (!llDone) MOE_CHECK(moe_net_ep_connect(&in->ll, handles, 1, &llDone));
    if (done + llDone != before) moe_backoff_reset(&backoff);
    else if (!done || !llDone) moe_backoff_wait(&backoff);
  }
  MOE_CHECK(moe_proxy_start(in->ep.proxy));
  if (in->hasLL) MOE_CHECK(moe_proxy_start(in->ll.proxy));
  return ncclSuccess;
}

void moe_inter_stop(moe_inter_comm_t* in) {
  if (in == NULL) return;
  moe_proxy_t* proxies[] = {in->ll.proxy, in->ep.proxy};
  for (size_t i = 0; i < sizeof(proxies) / sizeof(proxies[0]); i++) {
    moe_proxy_abort(proxies[i]);
    moe_proxy_destroy(proxies[i]);
  }
  in->ll.proxy = NULL;
  in->ep.proxy = NULL;
}

void moe_inter_destroy(moe_inter_comm_t* in) {
  if (in == NULL) return;
  moe_net_ep_close(&in->ll);
  moe_net_ep_close(&in->ep);
  if (in->net.seq != NULL) cudaFree(in->net.seq);
  if (in->net.chunkDone != NULL) cudaFree(in->net.chunkDone);
  if (in->transport != NULL) in->transport->fini();
  free(in);
}

size_t moe_inter_route_ints(const moe_inter_comm_t* in) {
  const size_t T = (size_t)in->net.maxTokens, nN = (size_t)in->net.topo.nNodes, R = (size_t)in->net.topo.ranksPerNode;
  return T * nN + nN + nN * R + nN * T * R + nN;
}

void moe_inter_route_init(const moe_inter_comm_t* in, int* p, moe_fwd_route_t* fw) {
  const size_t T = (size_t)in->net.maxTokens, nN = (size_t)in->net.topo.nNodes, R = (size_t)in->net.topo.ranksPerNode;
  fw->nodePos = p;
  p += T * nN;
  fw->tokensPerNode = p;
  p += nN;
  fw->fwdBase = p;
  p += nN * R;
  fw->fwdRows = p;
  p += nN * T * R;
  fw->fwdCount = p;
}
