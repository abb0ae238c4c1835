/* SPDX-License-Identifier: Apache-2.0 */
/* Creating and ending comms: ncclMoeCommInit (ranks of the caller's NCCL
 * communicator), ncclMoeCommInitOob (the caller's all-gather),
 * ncclMoeCommInitVirtual / ...VirtualNodes (ranks of this process, one thread
 * each while they set up), destroy and abort, and the comm-level queries.
 * Every rank is built by moe_comm_create, whatever bootstraps it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_check.h"
#include "common/moe_log.h"
#include "core/moe_bootstrap.h"
#include "core/moe_comm.h"
#include "core/moe_config.h"
#include "core/moe_device.h"
#include "core/moe_inter.h"
#include "core/moe_ll.h"
#include "core/moe_nccl.h"

#define MOE_ERROR_COPY_MAX 1024
/* Virtual ranks need a hardware queue per stream: the ranks' streams and one more. */
#define MOE_VIRTUAL_CONNECTIONS_HINT 32
/* ncclMoeCommAbort waits this much longer than the comm's timeout for the
 * comm's kernels to end (a wait that started just before the abort ends by
 * its own timeout at the latest) before it leaves their memory allocated. */
#define MOE_ABORT_GRACE_MS 1000

/* Frees one rank, on its device: its internode part first (the proxy
 * threads write the comm's error word), then its own memory. */
static void moe_comm_destroy_rank(ncclMoeComm_t comm) {
  if (comm == NULL) return;
  char pending[MOE_ERROR_COPY_MAX]; /* the error that brought us here, if any, stays the caller's */
  snprintf(pending, sizeof(pending), "%s", moe_last_error());
  moe_device_guard_t guard;
  if (moe_device_enter(comm->device, &guard) != ncclSuccess) moe_set_last_error(pending); /* free what we can */
  moe_inter_destroy(comm->inter);
  comm->inter = NULL;
  moe_comm_free(comm);
  moe_device_leave(&guard);
}

/* A new rank's struct and its own memory (the comm's device is current). */
static ncclResult_t moe_comm_new(const moe_bootstrap_t* boot, int device, const ncclMoeConfig_t* c,
                                 ncclMoeComm_t* comm_p) {
  ncclMoeComm_t comm = calloc(1, sizeof(struct ncclMoeComm));
  if (comm == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  comm->rank = boot->rank;
  comm->nRanks = boot->nRanks;
  comm->device = device;
  comm->config = *c;
  comm->gpuRanks = 1;
  *comm_p = comm; /* freed by the caller, partly built or not */
  return moe_comm_alloc(comm);
}

/* One rank, bootstrapped through `boot`: own memory, peers, kernels'
 * context, low latency, then (ranks on several nodes) the network. `c` is
 * resolved when `local` (this rank's status so far) is ncclSuccess.
 * Collective: the rounds of moe_bootstrap.h, the same on every rank whatever
 * fails, so that a rank's failure is every rank's error (and no rank waits
 * for a peer that gave up). The caller's device is left as it was. */
static ncclResult_t moe_comm_create(const moe_bootstrap_t* boot, int device, ncclResult_t local,
                                    const ncclMoeConfig_t* c, ncclMoeComm_t* comm_p) {
  moe_device_guard_t guard = {.prev = -1, .dev = device};
  /* A failure so far (`local`: a bad config) is reported in the first round. */
  if (local == ncclSuccess) local = moe_device_enter(device, &guard);
  ncclResult_t res = ncclSuccess;
  ncclMoeComm_t comm = NULL;
  moe_peer_info_t* all = NULL;
  char* handles = NULL;
  moe_topo_t topo;
  if (local == ncclSuccess) local = moe_comm_new(boot, device, c, &comm);
  MOE_CHECK_GOTO(moe_bootstrap_exchange(boot, comm, local, &all, &topo), res, out_comm);
  local = moe_bootstrap_map(comm, all, &topo);
  if (local == ncclSuccess) local = moe_comm_finish(comm);
  if (local == ncclSuccess) local = moe_ll_comm_init(comm);
  if (topo.nNodes > 1) {
    /* Every rank listens, then one more round carries the handles. */
    char mine[MOE_INTER_HANDLE_BYTES];
    memset(mine, 0, sizeof(mine));
    handles = calloc((size_t)boot->nRanks, MOE_INTER_HANDLE_BYTES);
    if (handles == NULL && local == ncclSuccess) local = MOE_ERROR(ncclSystemError, "out of host memory");
    if (local == ncclSuccess) local = moe_inter_create(comm, &topo, &comm->inter);
    if (local == ncclSuccess) moe_inter_handles(comm->inter, mine);
    MOE_CHECK_GOTO(moe_bootstrap_round(boot, local, mine, handles, MOE_INTER_HANDLE_BYTES, "network handles"), res,
                   out_comm);
    local = moe_inter_connect_start(comm->inter, handles);
  }
  if (local == ncclSuccess) local = moe_comm_setup_done(comm);
  MOE_CHECK_GOTO(moe_bootstrap_round(boot, local, NULL, NULL, 0, "set-up status"), res, out_comm);
  *comm_p = comm;
  goto out;
out_comm:
  moe_comm_destroy_rank(comm);
out:
  free(handles);
  free(all);
  moe_device_leave(&guard);
  return res;
}

/* ---------------------------------------------------- ncclMoeCommInit */
static ncclResult_t moe_nccl_query(ncclResult_t res, const char* fn, const moe_nccl_t* nccl) {
  if (res == ncclSuccess) return ncclSuccess;
  return MOE_ERROR(res, "ncclMoeCommInit: %s (of %s) failed: %s", fn, nccl->where, moe_result_str(res));
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInit(ncclComm_t nccl, const ncclMoeConfig_t* config, ncclMoeComm_t* comm_p) {
  MOE_ARG_CHECK(nccl != NULL && comm_p != NULL, "ncclMoeCommInit: nccl or comm_p is NULL");
  const moe_nccl_t* lib = NULL;
  MOE_CHECK(moe_nccl_get(&lib));
  int rank = 0, nRanks = 0, device = 0;
  MOE_CHECK(moe_nccl_query(lib->commUserRank(nccl, &rank), "ncclCommUserRank", lib));
  MOE_CHECK(moe_nccl_query(lib->commCount(nccl, &nRanks), "ncclCommCount", lib));
  MOE_CHECK(moe_nccl_query(lib->commCuDevice(nccl, &device), "ncclCommCuDevice", lib));
  ncclMoeConfig_t c;
  const ncclResult_t local = moe_config_resolve(config, nRanks, &c); /* the peers learn of a bad config */

  moe_device_guard_t guard;
  MOE_CHECK(moe_device_enter(device, &guard));
  ncclResult_t res = ncclSuccess;
  moe_nccl_allgather_ctx_t gather = {.nccl = lib, .comm = nccl, .rank = rank, .nRanks = nRanks};
  MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&gather.stream, cudaStreamNonBlocking), res, out);
  const moe_bootstrap_t boot = {.rank = rank, .nRanks = nRanks, .allgather = moe_nccl_allgather, .ctx = &gather};
  res = moe_comm_create(&boot, device, local, &c, comm_p);
  cudaStreamDestroy(gather.stream);
out:
  moe_device_leave(&guard);
  return res;
}

/* ------------------------------------------------- ncclMoeCommInitOob */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitOob(int rank, int nRanks, ncclMoeAllGatherFn_t allgather, void* ctx,
                                                const ncclMoeConfig_t* config, ncclMoeComm_t* comm_p) {
  MOE_ARG_CHECK(allgather != NULL && comm_p != NULL, "ncclMoeCommInitOob: allgather or comm_p is NULL");
  MOE_ARG_CHECK(nRanks >= 1 && nRanks <= NCCL_MOE_MAX_RANKS, "ncclMoeCommInitOob: nRanks = %d: must be in [1, %d]",
                nRanks, NCCL_MOE_MAX_RANKS);
  MOE_ARG_CHECK(rank >= 0 && rank < nRanks, "ncclMoeCommInitOob: rank = %d: must be in [0, nRanks = %d)", rank,
                nRanks);
  ncclMoeConfig_t c;
  /* From here on every failure is reported to the peers in the first round. */
  ncclResult_t local = moe_config_resolve(config, nRanks, &c);
  int device = -1;
  if (local == ncclSuccess) {
    const cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) {
      cudaGetLastError();
      local = MOE_ERROR(ncclUnhandledCudaError, "ncclMoeCommInitOob: rank %d has no usable current CUDA device (%s): "
                        "the comm uses the device current on the calling thread", rank, cudaGetErrorString(e));
    }
  }
  const moe_bootstrap_t boot = {.rank = rank, .nRanks = nRanks, .allgather = allgather, .ctx = ctx};
  return moe_comm_create(&boot, device, local, &c, comm_p);
}

/* ------------------------------------------------------ virtual ranks */
typedef struct {
  moe_bootstrap_t boot;
  moe_local_member_t member;
  int device;
  const ncclMoeConfig_t* config;
  ncclMoeComm_t comm;
  ncclResult_t res;
  char error[MOE_ERROR_COPY_MAX];
} moe_virtual_rank_t;

static void* moe_virtual_rank_main(void* arg) {
  moe_virtual_rank_t* v = arg;
  v->res = moe_comm_create(&v->boot, v->device, ncclSuccess, v->config, &v->comm);
  if (v->res != ncclSuccess) {
    snprintf(v->error, sizeof(v->error), "%s", moe_last_error());
    moe_local_group_abort(v->member.group, v->boot.rank);
  }
  return NULL;
}

static void moe_virtual_warn_env(int nRanks) {
  const char* conn = getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  if (nRanks > 1 && (conn == NULL || atoi(conn) < nRanks + 1))
    MOE_WARN("virtual ranks: set CUDA_DEVICE_MAX_CONNECTIONS=%d before CUDA starts, or ranks whose streams "
             "share a hardware queue can time out waiting for each other", MOE_VIRTUAL_CONNECTIONS_HINT);
  const char* loading = getenv("CUDA_MODULE_LOADING");
  if (nRanks > 1 && (loading == NULL || strcmp(loading, "EAGER") != 0))
    MOE_WARN("virtual ranks: set CUDA_MODULE_LOADING=EAGER before CUDA starts, or a kernel loaded on first use "
             "in one rank's thread (a memset, your own kernel) can wait for the other ranks' waiting kernels "
             "until they time out");
}

/* Virtual ranks, split into nodes of ranksPerNode consecutive ranks: ranks of
 * one node map each other's buffers, other nodes are reached through the
 * transport (the socket backend on loopback, unless NCCL_MOE_NET_BACKEND).
 * Each rank is set up by a thread of its own, exchanging through an
 * all-gather between the threads: the same path as ranks of separate
 * processes. */
static ncclResult_t moe_init_virtual(int nRanks, int ranksPerNode, int device, const ncclMoeConfig_t* config,
                                     ncclMoeComm_t* comms) {
  MOE_ARG_CHECK(comms != NULL, "ncclMoeCommInitVirtual: comms is NULL");
  ncclMoeConfig_t c;
  MOE_CHECK(moe_config_resolve(config, nRanks, &c));
  MOE_ARG_CHECK(ranksPerNode >= 1 && nRanks % ranksPerNode == 0,
                "ranksPerNode = %d: must divide the %d ranks", ranksPerNode, nRanks);
  int ndev = 0;
  MOE_CUDA_CHECK(cudaGetDeviceCount(&ndev));
  MOE_ARG_CHECK(device >= 0 && device < ndev, "device %d: this process sees %d CUDA devices", device, ndev);
  moe_virtual_warn_env(nRanks);
  int nodeKey[NCCL_MOE_MAX_RANKS];
  for (int r = 0; r < nRanks; r++) nodeKey[r] = r / ranksPerNode;
  moe_topo_t topo;
  MOE_CHECK(moe_topo_build(nRanks, 0, nodeKey, &topo)); /* a bad split fails here, once */

  ncclResult_t res = ncclSuccess;
  moe_local_group_t* group = NULL;
  pthread_t threads[NCCL_MOE_MAX_RANKS];
  int started = 0;
  moe_virtual_rank_t* ranks = calloc((size_t)nRanks, sizeof(moe_virtual_rank_t));
  if (ranks == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  MOE_CHECK_GOTO(moe_local_group_create(nRanks, c.timeoutMs, &group), res, out);
  for (int r = 0; r < nRanks; r++) {
    moe_virtual_rank_t* v = &ranks[r];
    v->member = (moe_local_member_t){.group = group, .rank = r};
    v->boot = (moe_bootstrap_t){.rank = r, .nRanks = nRanks, .allgather = moe_local_allgather, .ctx = &v->member,
                                .nodeKey = nodeKey};
    v->device = device;
    v->config = &c;
  }
  for (; started < nRanks; started++) {
    const int e = pthread_create(&threads[started], NULL, moe_virtual_rank_main, &ranks[started]);
    if (e != 0) {
      res = MOE_ERROR(ncclSystemError, "cannot start a set-up thread for virtual rank %d: %s", started, strerror(e));
      moe_local_group_abort(group, started); /* the started ones stop at their next all-gather */
      break;
    }
  }
  for (int r = 0; r < started; r++) pthread_join(threads[r], NULL);
  if (res == ncclSuccess) {
    /* The rank whose failure stopped the others tells what went wrong. */
    int first = moe_local_group_first_failure(group);
    if (first < 0)
      for (int r = 0; r < nRanks && first < 0; r++)
        if (ranks[r].res != ncclSuccess) first = r;
    if (first >= 0) {
      res = ranks[first].res;
      moe_set_last_error(ranks[first].error);
    }
  }
  for (int r = 0; r < nRanks; r++) {
    if (res != ncclSuccess) moe_comm_destroy_rank(ranks[r].comm);
    comms[r] = res == ncclSuccess ? ranks[r].comm : NULL;
  }
out:
  moe_local_group_destroy(group);
  free(ranks);
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

/* ------------------------------------------------- destroy and queries */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm) {
  if (comm == NULL) return ncclSuccess; /* like free(NULL) */
  moe_device_guard_t guard;
  const ncclResult_t res = moe_device_enter(comm->device, &guard);
  /* No kernel of this comm may still touch its buffers or counters: wait
   * for what it enqueued, then stop the proxies, then free. */
  moe_comm_wait_idle(comm);
  moe_comm_destroy_rank(comm);
  moe_device_leave(&guard);
  return res;
}

NCCL_MOE_EXPORT ncclResult_t ncclMoeCommAbort(ncclMoeComm_t comm) {
  if (comm == NULL) return ncclSuccess; /* like ncclMoeCommDestroy(NULL) */
  moe_device_guard_t guard;
  const ncclResult_t res = moe_device_enter(comm->device, &guard);
  /* The kernels' waits end at their next look at the error record, the
   * proxies stop without finishing what peers wait for, and nothing waits
   * for a peer. */
  moe_comm_mark_aborted(comm);
  moe_inter_stop(comm->inter);
  /* Memory a kernel still touches cannot be freed (nor a peer's mapping
   * closed): wait for this comm's kernels, as long as a wait of theirs may
   * last. */
  const int waitMs = comm->config.timeoutMs + MOE_ABORT_GRACE_MS;
  if (moe_comm_wait_idle_for(comm, waitMs)) {
    moe_comm_destroy_rank(comm);
  } else {
    MOE_WARN("rank %d: ncclMoeCommAbort: work of this comm (or work before it on the same streams) still ran %d ms "
             "after the abort: the comm's memory stays allocated, since freeing it under a running kernel would "
             "poison this process's CUDA context", comm->rank, waitMs);
  }
  moe_device_leave(&guard);
  return res;
}

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
