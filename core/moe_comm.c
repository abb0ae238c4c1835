/* MoE communicator: configuration, buffers, peer mapping (CUDA IPC between
 * processes, plain pointers between virtual ranks of one process), teardown. */
#include "core/moe_comm.h"

#include <cuda_runtime_api.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "common/moe_log.h"

#define MOE_REGION_ALIGN 256
#define MOE_DEFAULT_TOPK 8
#define MOE_MAX_TOKENS_PER_RANK (1 << 20)
#define MOE_MAX_HIDDEN 65536
#define MOE_AUTO_BLOCKS_PER_GPU_RANK 24 /* SMs one rank takes when it has its GPU alone */
#define MOE_BLOCKS_PER_SM 2
#define MOE_HOST_NAME_MAX 64
#define MOE_BUS_ID_LEN 16
#define MOE_MAX_VISIBLE_DEVICES 16
/* sizeof(ncclMoeConfig_t) in version 0.1 (before llMaxTokensPerRank). */
#define MOE_CONFIG_SIZE_0_1 offsetof(ncclMoeConfig_t, llMaxTokensPerRank)

static size_t moe_align_up(size_t v) { return (v + MOE_REGION_ALIGN - 1) / MOE_REGION_ALIGN * MOE_REGION_ALIGN; }

ncclResult_t moe_config_resolve(const ncclMoeConfig_t* config, int nRanks, ncclMoeConfig_t* out_p) {
  MOE_ARG_CHECK(config != NULL, "config is NULL (use NCCL_MOE_CONFIG_INITIALIZER)");
  /* A caller built against an older header passes a shorter struct: the
   * fields it does not know take their defaults (0). */
  MOE_ARG_CHECK(config->magic == NCCL_MOE_CONFIG_MAGIC && config->size >= MOE_CONFIG_SIZE_0_1 &&
                    config->size <= sizeof(ncclMoeConfig_t),
                "config was not initialized with NCCL_MOE_CONFIG_INITIALIZER (magic 0x%x, size %zu)",
                config->magic, config->size);
  MOE_ARG_CHECK(nRanks >= 1 && nRanks <= NCCL_MOE_MAX_RANKS, "%d ranks: at most %d are supported",
                nRanks, NCCL_MOE_MAX_RANKS);
  ncclMoeConfig_t c;
  memset(&c, 0, sizeof(c));
  memcpy(&c, config, config->size);
  c.size = sizeof(c);
  MOE_ARG_CHECK(c.maxTokensPerRank >= 1 && c.maxTokensPerRank <= MOE_MAX_TOKENS_PER_RANK,
                "config.maxTokensPerRank = %d: must be in [1, %d]", c.maxTokensPerRank, MOE_MAX_TOKENS_PER_RANK);
  MOE_ARG_CHECK(c.hidden >= 8 && c.hidden <= MOE_MAX_HIDDEN && c.hidden % 8 == 0,
                "config.hidden = %d: must be a multiple of 8 in [8, %d]", c.hidden, MOE_MAX_HIDDEN);
  MOE_ARG_CHECK(c.numExperts >= nRanks && c.numExperts <= NCCL_MOE_MAX_EXPERTS && c.numExperts % nRanks == 0,
                "config.numExperts = %d: must be a multiple of the %d ranks, at most %d", c.numExperts,
                nRanks, NCCL_MOE_MAX_EXPERTS);
  if (c.maxTopk == 0) c.maxTopk = MOE_DEFAULT_TOPK;
  MOE_ARG_CHECK(c.maxTopk >= 1 && c.maxTopk <= NCCL_MOE_MAX_TOPK, "config.maxTopk = %d: must be in [1, %d]",
                c.maxTopk, NCCL_MOE_MAX_TOPK);
  long long allRecv = (long long)nRanks * c.maxTokensPerRank;
  if (c.maxRecvTokens == 0) c.maxRecvTokens = allRecv > INT_MAX ? INT_MAX : (int)allRecv;
  MOE_ARG_CHECK(c.maxRecvTokens >= 1, "config.maxRecvTokens = %d: must be >= 1 (0 = default)", c.maxRecvTokens);
  MOE_ARG_CHECK(c.numSMs >= 0, "config.numSMs = %d: must be >= 0 (0 = automatic)", c.numSMs);
  MOE_ARG_CHECK(c.timeoutMs >= 0, "config.timeoutMs = %d: must be >= 0 (0 = NCCL_MOE_TIMEOUT_MS)", c.timeoutMs);
  if (c.timeoutMs == 0) c.timeoutMs = moe_env()->timeout_ms;
  MOE_CHECK(moe_ll_config_resolve(&c, nRanks)); /* low-latency mode */
  *out_p = c;
  return ncclSuccess;
}

static void moe_layout_compute(const ncclMoeConfig_t* c, int nRanks, moe_layout_t* l) {
  size_t rows = (size_t)c->maxRecvTokens, off = 0;
  int L = c->numExperts / nRanks;
  l->notifyInts = MOE_NOTIFY_EXPERTS(nRanks) + L;
#define MOE_REGION(field, bytes) do { l->field = off; off = moe_align_up(off + (bytes)); } while (0)
  MOE_REGION(signals, sizeof(unsigned long long) * NCCL_MOE_MAX_RANKS);
  MOE_REGION(notify, sizeof(int) * (size_t)nRanks * l->notifyInts);
  MOE_REGION(recvX, rows * c->hidden * 2);
  MOE_REGION(recvScales, rows * ((c->hidden + NCCL_MOE_FP8_BLOCK - 1) / NCCL_MOE_FP8_BLOCK) * sizeof(float));
  MOE_REGION(recvTopkIdx, rows * c->maxTopk * sizeof(int64_t));
  MOE_REGION(recvTopkWeights, rows * c->maxTopk * sizeof(float));
  MOE_REGION(combineX, rows * c->hidden * 2);
  MOE_REGION(combineWeights, rows * c->maxTopk * sizeof(float));
#undef MOE_REGION
  l->total = off;
}

/* Rank, sizes and config set: allocate this rank's own memory. */
static ncclResult_t moe_comm_alloc(ncclMoeComm_t comm) {
  moe_layout_compute(&comm->config, comm->nRanks, &comm->layout);
  /* Low-latency regions (moe_ll.c) after the normal ones, when configured. */
  comm->layout.total = moe_ll_layout_compute(&comm->config, comm->nRanks, comm->layout.total, &comm->ll.ctx.l);
  comm->numLocalExperts = comm->config.numExperts / comm->nRanks;
  comm->maxRecv = comm->config.maxRecvTokens;
  cudaError_t err = cudaMalloc((void**)&comm->buffer, comm->layout.total);
  if (err != cudaSuccess)
    return MOE_ERROR(ncclUnhandledCudaError,
                     "cannot allocate %zu bytes of communication buffers on device %d (%s): lower "
                     "config.maxRecvTokens, maxTokensPerRank or hidden",
                     comm->layout.total, comm->device, cudaGetErrorString(err));
  MOE_CUDA_CHECK(cudaMemset(comm->buffer, 0, comm->layout.signals + sizeof(unsigned long long) * NCCL_MOE_MAX_RANKS));
  MOE_CHECK(moe_ll_comm_alloc(comm));
  return ncclSuccess;
}

ncclResult_t moe_comm_finish(ncclMoeComm_t comm) {
  size_t scratchBytes = 64 + sizeof(int) * ((size_t)comm->nRanks + comm->config.numExperts);
  MOE_CUDA_CHECK(cudaMalloc(&comm->scratch, scratchBytes));
  MOE_CUDA_CHECK(cudaMemset(comm->scratch, 0, scratchBytes));
  MOE_CUDA_CHECK(cudaStreamSynchronize(0)); /* callers' non-blocking streams do not wait for it */
  MOE_CUDA_CHECK(cudaHostAlloc((void**)&comm->hostError, sizeof(int) * MOE_ERR_WORDS, cudaHostAllocMapped));
  memset(comm->hostError, 0, sizeof(int) * MOE_ERR_WORDS);
  MOE_CUDA_CHECK(cudaHostAlloc((void**)&comm->hostCounts, sizeof(int) * (1 + (size_t)comm->numLocalExperts),
                               cudaHostAllocDefault));
  int* devError = NULL;
  MOE_CUDA_CHECK(cudaHostGetDevicePointer((void**)&devError, comm->hostError, 0));

  moe_rank_ctx_t* ctx = &comm->ctx;
  ctx->layout = comm->layout;
  ctx->rank = comm->rank;
  ctx->nRanks = comm->nRanks;
  ctx->numLocalExperts = comm->numLocalExperts;
  ctx->error = devError;
  ctx->epoch = (unsigned long long*)comm->scratch;
  ctx->blocksDone = (unsigned int*)((char*)comm->scratch + 8);
  ctx->timeoutNs = (long long)comm->config.timeoutMs * 1000000LL;
  comm->tokensPerRank = (int*)((char*)comm->scratch + 64);
  comm->tokensPerExpert = comm->tokensPerRank + comm->nRanks;

  MOE_CUDA_CHECK(moe_intranode_preload());
  MOE_CUDA_CHECK(moe_internode_preload());
  int sms = 0;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, comm->device));
  int blocks = moe_env()->num_sms > 0 ? moe_env()->num_sms : comm->config.numSMs;
  if (blocks == 0) {
    /* Virtual ranks share one GPU: split it between them. */
    blocks = comm->isVirtual ? MOE_BLOCKS_PER_SM * sms / comm->nRanks : MOE_AUTO_BLOCKS_PER_GPU_RANK;
    if (blocks < 1) blocks = 1;
  }
  comm->numBlocks = blocks;
  /* Virtual ranks: kernels whose blocks all wait for peers get half of
   * the rank's blocks, and all ranks together at most half of the GPU's
   * MOE_BLOCKS_PER_SM * sms block slots, so every rank's waiting grid fits
   * at once with room to spare for whatever else runs there. (With a block
   * of margin only, ranks timed out now and then on the device machine; a
   * larger numSMs would deadlock.) */
  comm->waitBlocks = blocks;
  if (comm->isVirtual && comm->nRanks > 1) {
    const int cap = sms / comm->nRanks > 0 ? sms / comm->nRanks : 1;
    comm->waitBlocks = (blocks + 1) / 2 < cap ? (blocks + 1) / 2 : cap;
  }
  MOE_CHECK(moe_ll_comm_init(comm));
  MOE_INFO(NCCL_INIT, "rank %d/%d on device %d: %zu bytes of buffers, %d blocks, max %d rows received",
           comm->rank, comm->nRanks, comm->device, comm->layout.total, blocks, comm->maxRecv);
  return ncclSuccess;
}

/* Frees what one rank owns; safe on a partly built comm. */
static void moe_comm_free(ncclMoeComm_t comm) {
  if (comm == NULL) return;
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(comm->device);
  moe_inter_destroy(comm->inter); /* first: its proxy thread writes hostError */
  for (int r = 0; r < comm->nRanks; r++)
    if (comm->peerIpc[r]) cudaIpcCloseMemHandle(comm->ctx.peers.base[r]);
  if (comm->hostCounts) cudaFreeHost(comm->hostCounts);
  if (comm->hostError) cudaFreeHost(comm->hostError);
  if (comm->scratch) cudaFree(comm->scratch);
  if (comm->buffer) cudaFree(comm->buffer);
  free(comm);
  if (prev >= 0) cudaSetDevice(prev);
}

static const char* moe_wait_name(int what) {
  switch (what) {
    case MOE_WAIT_BARRIER: return "barrier";
    case MOE_WAIT_LL_COUNTS: return "the low-latency count messages of use";
    case MOE_WAIT_LL_DATA: return "the low-latency dispatched rows of use";
    case MOE_WAIT_LL_COMBINE: return "the low-latency combine rows of use";
    case MOE_WAIT_NET: return "a node's network data, step";
    default: return "step";
  }
}

/* What a timed-out wait waited for, and how far its peer had got. */
static void moe_wait_describe(const moe_error_details_t* d, char* buf, size_t size) {
  char peer[32] = "the sender"; /* a low-latency combine row names no rank */
  if (d->peer >= 0) snprintf(peer, sizeof(peer), "rank %d", d->peer);
  if (d->wait == MOE_WAIT_NET_CHUNK) /* progress words: step and chunks landed */
    snprintf(buf, size, "%d chunk(s) of a node's network data, step %llu, %s was at %d chunk(s)%s of step %llu",
             moe_net_progress_chunks(d->want), moe_net_progress_slab(d->want), peer,
             moe_net_progress_chunks(d->seen), moe_net_progress_last(d->seen) ? " (all)" : "",
             moe_net_progress_slab(d->seen));
  else
    snprintf(buf, size, "%s %llu, %s was at %llu", moe_wait_name(d->wait), d->want, peer, d->seen);
}

/* The comm's error record (kernels/moe_error.h) as an ncclResult_t and a
 * message. */
ncclResult_t moe_comm_error(ncclMoeComm_t comm) {
  moe_error_details_t d;
  int hasDetails = 0;
  switch (moe_error_read_host(comm->hostError, &d, &hasDetails)) {
    case MOE_KERR_NONE: return ncclSuccess;
    case MOE_KERR_TIMEOUT: {
      char what[160] = "(not recorded yet)"; /* the winner publishes them right after the code */
      if (hasDetails) moe_wait_describe(&d, what, sizeof(what));
      return MOE_ERROR(ncclSystemError,
                       "rank %d: a peer did not answer within %d ms (NCCL_MOE_TIMEOUT_MS): waiting for %s; the comm "
                       "is unusable",
                       comm->rank, comm->config.timeoutMs, what);
    }
    case MOE_KERR_BAD_EXPERT:
      return MOE_ERROR(ncclInvalidArgument, "rank %d: topkIdx held an expert id outside [-1, %d)", comm->rank,
                       comm->config.numExperts);
    case MOE_KERR_CAPACITY:
      return MOE_ERROR(ncclInvalidArgument, "a rank received more tokens than its capacity; the extra tokens were dropped");
    case MOE_KERR_MISMATCH:
      return MOE_ERROR(ncclInvalidArgument, "ranks called dispatch with different hidden, sendType or topk");
    case MOE_KERR_NET: {
      const char* why = "a peer sent data that does not fit its slab";
      if (comm->inter != NULL && moe_proxy_error(comm->inter->ep.proxy)[0] != '\0') why = moe_proxy_error(comm->inter->ep.proxy);
      if (comm->inter != NULL && moe_proxy_error(comm->inter->ll.proxy)[0] != '\0') why = moe_proxy_error(comm->inter->ll.proxy);
      return MOE_ERROR(ncclSystemError, "rank %d: the network proxy failed: %s; the comm is unusable", comm->rank, why);
    }
    case MOE_KERR_BAD_NOTIFY:
      return MOE_ERROR(ncclRemoteError, "rank %d: a peer sent an invalid notify message", comm->rank);
    default:
      return MOE_ERROR(ncclInternalError, "rank %d: unknown error code in the error record", comm->rank);
  }
}

/* ------------------------------------------------------------ public API */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommGetAsyncError(ncclMoeComm_t comm, ncclResult_t* error_p) {
  MOE_ARG_CHECK(comm != NULL && error_p != NULL, "ncclMoeCommGetAsyncError: comm or error_p is NULL");
  *error_p = moe_comm_error(comm);
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommQuery(ncclMoeComm_t comm, int* rank_p, int* nRanks_p, int* device_p,
                                              int* nNodes_p, ncclMoeConfig_t* config_p) {
  MOE_ARG_CHECK(comm != NULL, "ncclMoeCommQuery: comm is NULL");
  if (rank_p != NULL) *rank_p = comm->rank;
  if (nRanks_p != NULL) *nRanks_p = comm->nRanks;
  if (device_p != NULL) *device_p = comm->device;
  if (nNodes_p != NULL) *nNodes_p = comm->inter != NULL ? comm->inter->net.topo.nNodes : 1;
  if (config_p != NULL) *config_p = comm->config;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommBufferBytes(ncclMoeComm_t comm, size_t* bytes_p) {
  MOE_ARG_CHECK(comm != NULL && bytes_p != NULL, "ncclMoeCommBufferBytes: comm or bytes_p is NULL");
  *bytes_p = comm->layout.total;
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm) {
  MOE_ARG_CHECK(comm != NULL, "ncclMoeCommDestroy: comm is NULL");
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(comm->device);
  cudaDeviceSynchronize(); /* no kernel of ours may still touch the buffers */
  if (prev >= 0) cudaSetDevice(prev);
  moe_comm_free(comm);
  return ncclSuccess;
}

/* Connects the proxies of ranks driven by this thread: each call advances
 * every one that is not done (connect and accept never block). */
static ncclResult_t moe_inter_connect_all(ncclMoeComm_t* comms, int n, const char* handles) {
  int left = n;
  int done[NCCL_MOE_MAX_RANKS] = {0};
  while (left > 0) {
    for (int r = 0; r < n; r++) {
      if (done[r]) continue;
      MOE_CHECK(moe_inter_connect(comms[r]->inter, handles, &done[r]));
      if (done[r]) left--;
    }
  }
  for (int r = 0; r < n; r++) MOE_CHECK(moe_inter_start(comms[r]->inter));
  return ncclSuccess;
}

/* Virtual ranks, split into nodes of ranksPerNode consecutive ranks: ranks of
 * one node map each other's buffers, other nodes are reached through the
 * transport (the socket backend on loopback, unless NCCL_MOE_NET_BACKEND). */
static ncclResult_t moe_init_virtual(int nRanks, int ranksPerNode, int device, const ncclMoeConfig_t* config,
                                     ncclMoeComm_t* comms) {
  MOE_ARG_CHECK(comms != NULL, "ncclMoeCommInitVirtual: comms is NULL");
  ncclMoeConfig_t c;
  MOE_CHECK(moe_config_resolve(config, nRanks, &c));
  MOE_ARG_CHECK(ranksPerNode >= 1 && nRanks % ranksPerNode == 0,
                "ranksPerNode = %d: must divide the %d ranks", ranksPerNode, nRanks);
  int prev = -1, ndev = 0;
  MOE_CUDA_CHECK(cudaGetDeviceCount(&ndev));
  MOE_ARG_CHECK(device >= 0 && device < ndev, "device %d: this process sees %d CUDA devices", device, ndev);
  const char* conn = getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  if (nRanks > 1 && (conn == NULL || atoi(conn) < nRanks + 1))
    MOE_WARN("virtual ranks: set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA starts, or ranks whose streams "
             "share a hardware queue can time out waiting for each other");
  const char* loading = getenv("CUDA_MODULE_LOADING");
  if (nRanks > 1 && (loading == NULL || strcmp(loading, "EAGER") != 0))
    MOE_WARN("virtual ranks: set CUDA_MODULE_LOADING=EAGER before CUDA starts, or a kernel loaded on first use "
             "in one rank's thread (a memset, your own kernel) can wait for the other ranks' waiting kernels "
             "until they time out");
  int nodeKey[NCCL_MOE_MAX_RANKS];
  for (int r = 0; r < nRanks; r++) nodeKey[r] = r / ranksPerNode;
  moe_topo_t topo;
  MOE_CHECK(moe_topo_build(nRanks, 0, nodeKey, &topo));
  MOE_CUDA_CHECK(cudaGetDevice(&prev));
  MOE_CUDA_CHECK(cudaSetDevice(device));
  ncclResult_t res = ncclSuccess;
  char* handles = NULL;
  for (int r = 0; r < nRanks; r++) comms[r] = NULL;
  for (int r = 0; r < nRanks && res == ncclSuccess; r++) {
    comms[r] = calloc(1, sizeof(struct ncclMoeComm));
    if (comms[r] == NULL) { res = MOE_ERROR(ncclSystemError, "out of host memory"); break; }
    comms[r]->rank = r;
    comms[r]->nRanks = nRanks;
    comms[r]->device = device;
    comms[r]->config = c;
    comms[r]->isVirtual = 1;
    res = moe_comm_alloc(comms[r]);
  }
  for (int r = 0; r < nRanks && res == ncclSuccess; r++) {
    for (int p = 0; p < nRanks; p++)
      comms[r]->ctx.peers.base[p] = nodeKey[p] == nodeKey[r] ? comms[p]->buffer : NULL;
    res = moe_comm_finish(comms[r]);
  }
  if (res == ncclSuccess && topo.nNodes > 1) {
    handles = calloc(nRanks, MOE_INTER_HANDLE_BYTES);
    if (handles == NULL) res = MOE_ERROR(ncclSystemError, "out of host memory");
    for (int r = 0; r < nRanks && res == ncclSuccess; r++) {
      moe_topo_t t;
      res = moe_topo_build(nRanks, r, nodeKey, &t);
      if (res == ncclSuccess) res = moe_inter_create(comms[r], &t, &comms[r]->inter);
      if (res == ncclSuccess) moe_inter_handles(comms[r]->inter, handles + (size_t)r * MOE_INTER_HANDLE_BYTES);
    }
    if (res == ncclSuccess) res = moe_inter_connect_all(comms, nRanks, handles);
  }
  free(handles);
  if (res != ncclSuccess) {
    for (int r = 0; r < nRanks; r++) {
      moe_comm_free(comms[r]);
      comms[r] = NULL;
    }
  }
  cudaSetDevice(prev);
  return res;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitVirtual(int nRanks, int device, const ncclMoeConfig_t* config,
                                                    ncclMoeComm_t* comms) {
  return moe_init_virtual(nRanks, nRanks, device, config, comms);
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitVirtualNodes(int nRanks, int ranksPerNode, int device,
                                                         const ncclMoeConfig_t* config, ncclMoeComm_t* comms) {
  return moe_init_virtual(nRanks, ranksPerNode, device, config, comms);
}

/* What each rank tells the others at init (one ncclAllGather). */
typedef struct {
  char host[MOE_HOST_NAME_MAX];
  char bootId[40];
  int pid, device;
  unsigned long long ptr;
  int p2pDisable;                /* NCCL_MOE_P2P_DISABLE of this rank */
  char busId[MOE_BUS_ID_LEN];    /* PCI bus id of this rank's device */
  int nReach;                    /* devices this rank's device can map (itself included) */
  char reach[MOE_MAX_VISIBLE_DEVICES][MOE_BUS_ID_LEN];
  cudaIpcMemHandle_t ipc;
  ncclMoeConfig_t config;
} moe_peer_info_t;

static void moe_host_identity(moe_peer_info_t* info) {
  gethostname(info->host, sizeof(info->host) - 1);
  FILE* f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f != NULL) {
    if (fgets(info->bootId, sizeof(info->bootId), f) == NULL) info->bootId[0] = '\0';
    fclose(f);
  }
}

/* All-gathers `bytes` per rank through `nccl`: all[rank] in, every rank's out. */
static ncclResult_t moe_exchange(ncclComm_t nccl, void* all, size_t bytes, int rank, int nRanks) {
  ncclResult_t res = ncclSuccess;
  char* dev = NULL;
  cudaStream_t stream = NULL;
  MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), res, out);
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&dev, bytes * nRanks), res, out_stream);
  MOE_CUDA_CHECK_GOTO(cudaMemcpy(dev + bytes * rank, (char*)all + bytes * rank, bytes, cudaMemcpyHostToDevice), res,
                      out_free);
  MOE_NCCL_CHECK_GOTO(ncclAllGather(dev + bytes * rank, dev, bytes, ncclChar, nccl, stream), res, out_free);
  MOE_CUDA_CHECK_GOTO(cudaStreamSynchronize(stream), res, out_free);
  MOE_CUDA_CHECK_GOTO(cudaMemcpy(all, dev, bytes * nRanks, cudaMemcpyDeviceToHost), res, out_free);
out_free:
  cudaFree(dev);
out_stream:
  cudaStreamDestroy(stream);
out:
  return res;
}

/* The PCI bus ids of the devices `device` can map: itself and its peers
 * among the devices this process sees. Bus ids, not ordinals: processes
 * that see different devices (CUDA_VISIBLE_DEVICES) still agree on them. */
static void moe_reach(int device, moe_peer_info_t* info) {
  int ndev = 0;
  info->nReach = 0;
  if (cudaDeviceGetPCIBusId(info->busId, MOE_BUS_ID_LEN, device) != cudaSuccess) info->busId[0] = '\0';
  if (cudaGetDeviceCount(&ndev) != cudaSuccess) ndev = 0;
  for (int d = 0; d < ndev && info->nReach < MOE_MAX_VISIBLE_DEVICES; d++) {
    int can = d == device;
    if (!can && cudaDeviceCanAccessPeer(&can, device, d) != cudaSuccess) can = 0;
    if (can && cudaDeviceGetPCIBusId(info->reach[info->nReach], MOE_BUS_ID_LEN, d) == cudaSuccess) info->nReach++;
  }
  cudaGetLastError();
}

static int moe_can_reach(const moe_peer_info_t* from, const char* busId) {
  for (int i = 0; i < from->nReach && i < MOE_MAX_VISIBLE_DEVICES; i++)
    if (strncmp(from->reach[i], busId, MOE_BUS_ID_LEN) == 0) return 1;
  return 0;
}

static int moe_same_host(const moe_peer_info_t* a, const moe_peer_info_t* b) {
  return strcmp(a->host, b->host) == 0 && strcmp(a->bootId, b->bootId) == 0;
}

/* Ranks of one host whose devices can all map each other's memory form a
 * node. On a host where some pair cannot, or where a rank set
 * NCCL_MOE_P2P_DISABLE=1, every rank is a node of its own (the transport
 * path). Computed from exchanged data only, so every rank agrees. */
static void moe_node_keys(const moe_peer_info_t* all, int nRanks, int* nodeKey) {
  for (int r = 0; r < nRanks; r++) {
    int q = 0;
    while (!moe_same_host(&all[q], &all[r])) q++;
    nodeKey[r] = q;
  }
  for (int h = 0; h < nRanks; h++) {
    int split = 0;
    for (int r = 0; r < nRanks; r++) {
      if (nodeKey[r] != h) continue;
      if (all[r].p2pDisable) split = 1;
      for (int q = 0; q < nRanks; q++)
        if (nodeKey[q] == h && !moe_can_reach(&all[r], all[q].busId)) split = 1;
    }
    if (!split) continue;
    for (int r = 0; r < nRanks; r++)
      if (nodeKey[r] == h) nodeKey[r] = nRanks + r; /* a key no host uses */
  }
}

/* Maps every peer's buffer: a pointer within this process, else CUDA IPC. */
static ncclResult_t moe_map_peers(ncclMoeComm_t comm, const moe_peer_info_t* all, const int* nodeKey) {
  const moe_peer_info_t* me = &all[comm->rank];
  for (int r = 0; r < comm->nRanks; r++) {
    const moe_peer_info_t* p = &all[r];
    if (memcmp(&p->config, &me->config, sizeof(ncclMoeConfig_t)) != 0)
      return MOE_ERROR(ncclInvalidArgument, "rank %d and rank %d passed different configs to ncclMoeCommInit",
                       comm->rank, r);
    if (nodeKey[r] != nodeKey[comm->rank]) {
      comm->ctx.peers.base[r] = NULL; /* another node: through the transport */
      continue;
    }
    if (r == comm->rank) {
      comm->ctx.peers.base[r] = comm->buffer;
      continue;
    }
    if (p->pid == me->pid) {
      if (p->device != comm->device) {
        cudaError_t e = cudaDeviceEnablePeerAccess(p->device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
          return MOE_ERROR(ncclUnhandledCudaError, "cudaDeviceEnablePeerAccess(%d): %s", p->device, cudaGetErrorString(e));
        cudaGetLastError();
      }
      comm->ctx.peers.base[r] = (char*)(uintptr_t)p->ptr;
    } else {
      void* mapped = NULL;
      cudaError_t e = cudaIpcOpenMemHandle(&mapped, p->ipc, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess)
        return MOE_ERROR(ncclUnhandledCudaError, "cannot map rank %d's buffer with CUDA IPC: %s", r, cudaGetErrorString(e));
      comm->ctx.peers.base[r] = mapped;
      comm->peerIpc[r] = 1;
    }
  }
  return ncclSuccess;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInit(ncclComm_t nccl, const ncclMoeConfig_t* config, ncclMoeComm_t* comm_p) {
  MOE_ARG_CHECK(nccl != NULL && comm_p != NULL, "ncclMoeCommInit: nccl or comm_p is NULL");
  int rank = 0, nRanks = 0, device = 0, prev = -1;
  MOE_CHECK(ncclCommUserRank(nccl, &rank));
  MOE_CHECK(ncclCommCount(nccl, &nRanks));
  MOE_CHECK(ncclCommCuDevice(nccl, &device));
  ncclMoeConfig_t c;
  MOE_CHECK(moe_config_resolve(config, nRanks, &c));
  MOE_CUDA_CHECK(cudaGetDevice(&prev));
  MOE_CUDA_CHECK(cudaSetDevice(device));

  ncclResult_t res = ncclSuccess;
  moe_peer_info_t* all = NULL;
  char* handles = NULL;
  int nodeKey[NCCL_MOE_MAX_RANKS];
  moe_topo_t topo;
  ncclMoeComm_t comm = calloc(1, sizeof(struct ncclMoeComm));
  if (comm == NULL) { res = MOE_ERROR(ncclSystemError, "out of host memory"); goto out; }
  comm->rank = rank;
  comm->nRanks = nRanks;
  comm->device = device;
  comm->config = c;
  MOE_CHECK_GOTO(moe_comm_alloc(comm), res, out_comm);
  all = calloc(nRanks, sizeof(moe_peer_info_t));
  if (all == NULL) { res = MOE_ERROR(ncclSystemError, "out of host memory"); goto out_comm; }
  moe_host_identity(&all[rank]);
  all[rank].pid = getpid();
  all[rank].device = device;
  all[rank].ptr = (unsigned long long)(uintptr_t)comm->buffer;
  all[rank].config = c;
  all[rank].p2pDisable = moe_env()->p2p_disable;
  moe_reach(device, &all[rank]);
  MOE_CUDA_CHECK_GOTO(cudaIpcGetMemHandle(&all[rank].ipc, comm->buffer), res, out_comm);
  MOE_CHECK_GOTO(moe_exchange(nccl, all, sizeof(moe_peer_info_t), rank, nRanks), res, out_comm);
  moe_node_keys(all, nRanks, nodeKey);
  MOE_CHECK_GOTO(moe_topo_build(nRanks, rank, nodeKey, &topo), res, out_comm);
  MOE_CHECK_GOTO(moe_map_peers(comm, all, nodeKey), res, out_comm);
  MOE_CHECK_GOTO(moe_comm_finish(comm), res, out_comm);
  if (topo.nNodes > 1) {
    /* Every rank listens, then one more all-gather carries the handles. */
    MOE_CHECK_GOTO(moe_inter_create(comm, &topo, &comm->inter), res, out_comm);
    handles = calloc(nRanks, MOE_INTER_HANDLE_BYTES);
    if (handles == NULL) { res = MOE_ERROR(ncclSystemError, "out of host memory"); goto out_comm; }
    moe_inter_handles(comm->inter, handles + (size_t)rank * MOE_INTER_HANDLE_BYTES);
    MOE_CHECK_GOTO(moe_exchange(nccl, handles, MOE_INTER_HANDLE_BYTES, rank, nRanks), res, out_comm);
    MOE_CHECK_GOTO(moe_inter_connect_all(&comm, 1, handles), res, out_comm);
  }
  *comm_p = comm;
  goto out;
out_comm:
  moe_comm_free(comm);
out:
  free(handles);
  free(all);
  cudaSetDevice(prev);
  return res;
}
