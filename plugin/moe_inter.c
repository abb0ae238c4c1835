/* Internode set-up: topology, network slabs, the proxy and its connections
 * (see kernels/moe_internode.h for the protocol).
 *
 * Slabs live in GPU memory when the transport can register it (verbs with
 * dma-buf or nvidia-peermem: the NIC reads and writes them directly), else in
 * pinned host memory the GPU maps (the socket backend). The proxy never
 * copies payload either way. */
#include "moe_inter.h"

#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "moe_check.h"
#include "moe_comm.h"
#include "moe_env.h"
#include "moe_log.h"

#define MOE_MAX_LOCAL_RANKS 32

ncclResult_t moe_topo_build(int nRanks, int rank, const int* nodeKey, moe_topo_t* topo_p) {
  moe_topo_t t;
  memset(&t, 0, sizeof(t));
  int firstOf[NCCL_MOE_MAX_RANKS] = {0}, count[NCCL_MOE_MAX_RANKS] = {0};
  for (int r = 0; r < nRanks; r++) {
    int n = 0;
    while (n < t.nNodes && nodeKey[firstOf[n]] != nodeKey[r]) n++;
    if (n == t.nNodes) {
      firstOf[n] = r;
      count[n] = 0;
      t.nNodes++;
    }
    t.nodeOf[r] = n;
    t.localOf[r] = count[n]++;
  }
  t.ranksPerNode = count[0];
  for (int n = 1; n < t.nNodes; n++)
    MOE_ARG_CHECK(count[n] == t.ranksPerNode, "node %d has %d ranks and node 0 has %d: every node needs the same "
                  "number of ranks", n, count[n], t.ranksPerNode);
  MOE_ARG_CHECK(t.ranksPerNode <= MOE_MAX_LOCAL_RANKS, "%d ranks on one node: at most %d are supported",
                t.ranksPerNode, MOE_MAX_LOCAL_RANKS);
  for (int r = 0; r < nRanks; r++) t.rankAt[t.nodeOf[r] * t.ranksPerNode + t.localOf[r]] = r;
  t.node = t.nodeOf[rank];
  t.local = t.localOf[rank];
  *topo_p = t;
  return ncclSuccess;
}

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
                     "config.maxTokensPerRank or hidden", bytes, what, cudaGetErrorString(e));
  memset(*host_p, 0, bytes);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer((void**)dev_p, *host_p, 0));
  return ncclSuccess;
}

ncclResult_t moe_inter_create(struct ncclMoeComm* comm, const moe_topo_t* topo, moe_inter_comm_t** inter_p) {
  ncclResult_t res = ncclSuccess;
  moe_inter_comm_t* in = calloc(1, sizeof(*in));
  if (in == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  moe_net_ctx_t* n = &in->net;
  n->topo = *topo;
  n->maxTokens = comm->config.maxTokensPerRank;
  moe_inter_geom(&comm->config, comm->layout.notifyInts, topo, &n->geom);
  n->chunkRecords = moe_inter_chunk_records(&comm->config, topo);
  for (int ch = 0; ch < MOE_NET_CHANNELS; ch++)
    if (n->geom.slab[ch] > MOE_NET_MAX_MSG_BYTES) {
      res = MOE_ERROR(ncclInvalidArgument, "a network slab would take %zu bytes, more than the transport's %zu per "
                      "message: lower config.maxTokensPerRank or hidden", n->geom.slab[ch], MOE_NET_MAX_MSG_BYTES);
      free(in);
      return res;
    }
  const moe_transport_t* transport = NULL;
  MOE_CHECK_GOTO(moe_transport_select(&transport), res, fail);
  int ndev = 0;
  MOE_CHECK_GOTO(transport->devices(&ndev), res, fail);
  if (ndev < 1) {
    res = MOE_ERROR(ncclSystemError, "the %s transport has no device", transport->name);
    goto fail;
  }
  const int dev = topo->local % ndev;
  moe_net_props_t props;
  MOE_CHECK_GOTO(transport->get_properties(dev, &props), res, fail);
  char* devFlags = NULL;
  MOE_CHECK_GOTO(moe_host_alloc(sizeof(moe_net_flags_t), (char**)&in->flags, &devFlags, "network counters"), res, fail);
  n->flags = (moe_net_flags_t*)devFlags;
  /* GPU memory when the NIC can reach it (GPUDirect RDMA): kernels write
   * slabs at device speed and the NIC reads them directly. Else pinned host
   * memory the GPU maps (the socket backend, or NICs without GPUDirect). */
  in->gpuSlabs = (props.ptr_support & NCCL_PTR_CUDA) != 0;
  if (in->gpuSlabs) {
    /* The proxy only hands them to the transport. */
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->sendBuf, n->geom.total), res, fail);
    in->sendHost = n->sendBuf;
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->recvBuf, n->geom.total), res, fail);
    in->recvHost = n->recvBuf;
  } else {
    MOE_CHECK_GOTO(moe_host_alloc(n->geom.total, &in->sendHost, &n->sendBuf, "network send slabs"), res, fail);
    MOE_CHECK_GOTO(moe_host_alloc(n->geom.total, &in->recvHost, &n->recvBuf, "network receive slabs"), res, fail);
  }
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->seq, sizeof(unsigned long long) * MOE_NET_CHANNELS), res, fail);
  MOE_CUDA_CHECK_GOTO(cudaMemset(n->seq, 0, sizeof(unsigned long long) * MOE_NET_CHANNELS), res, fail);
  const size_t chunkCounters = sizeof(unsigned int) * MOE_NET_CHANNELS * MOE_MAX_NODES * MOE_NET_MAX_CHUNKS;
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&n->chunkDone, chunkCounters), res, fail);
  MOE_CUDA_CHECK_GOTO(cudaMemset(n->chunkDone, 0, chunkCounters), res, fail);
  /* The callers' streams do not wait for the legacy stream the memset ran on. */
  MOE_CUDA_CHECK_GOTO(cudaStreamSynchronize(0), res, fail);

  /* Peers are indexed by node: slab m of each region is for node m. */
  moe_proxy_args_t a = {.transport = transport, .dev = dev, .rank = comm->rank, .nPeers = topo->nNodes,
                        .nChannels = MOE_NET_CHANNELS, .sendBuf = in->sendHost, .recvBuf = in->recvHost,
                        .bufType = in->gpuSlabs ? NCCL_PTR_CUDA : NCCL_PTR_HOST, .geom = n->geom, .flags = in->flags,
                        .error = comm->hostError, .timeoutMs = comm->config.timeoutMs};
  for (int m = 0; m < topo->nNodes; m++) {
    a.peerRank[m] = m == topo->node ? -1 : topo->rankAt[m * topo->ranksPerNode + topo->local];
    a.remoteSlot[m] = topo->node;
  }
  MOE_CHECK_GOTO(moe_proxy_create(&a, in->handle, &in->proxy), res, fail);
  MOE_INFO(NCCL_INIT | NCCL_NET, "rank %d: node %d of %d, local rank %d of %d, %s transport, 2 x %zu bytes of %s slabs",
           comm->rank, topo->node, topo->nNodes, topo->local, topo->ranksPerNode, transport->name, n->geom.total,
           in->gpuSlabs ? "GPU" : "pinned host");
  *inter_p = in;
  return ncclSuccess;
fail:
  moe_inter_destroy(in);
  return res;
}

ncclResult_t moe_inter_connect(moe_inter_comm_t* in, const char* handles, int* done_p) {
  const moe_topo_t* t = &in->net.topo;
  char byNode[MOE_MAX_NODES * MOE_NET_HANDLE_BYTES];
  for (int m = 0; m < t->nNodes; m++)
    memcpy(byNode + (size_t)m * MOE_NET_HANDLE_BYTES,
           handles + (size_t)t->rankAt[m * t->ranksPerNode + t->local] * MOE_NET_HANDLE_BYTES, MOE_NET_HANDLE_BYTES);
  return moe_proxy_connect(in->proxy, byNode, done_p);
}

ncclResult_t moe_inter_start(moe_inter_comm_t* in) { return moe_proxy_start(in->proxy); }

void moe_inter_destroy(moe_inter_comm_t* in) {
  if (in == NULL) return;
  moe_proxy_destroy(in->proxy);
  if (in->net.seq != NULL) cudaFree(in->net.seq);
  if (in->net.chunkDone != NULL) cudaFree(in->net.chunkDone);
  if (in->gpuSlabs) {
    if (in->recvHost != NULL) cudaFree(in->recvHost);
    if (in->sendHost != NULL) cudaFree(in->sendHost);
  } else {
    if (in->recvHost != NULL) cudaFreeHost(in->recvHost);
    if (in->sendHost != NULL) cudaFreeHost(in->sendHost);
  }
  if (in->flags != NULL) cudaFreeHost(in->flags);
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
