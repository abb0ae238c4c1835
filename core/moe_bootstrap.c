#include "core/moe_bootstrap.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "common/moe_log.h"
#define MOE_BOOT_ID_PATH "/proc/sys/kernel/random/boot_id"
#define MOE_MAX_LOCAL_RANKS 32

ncclResult_t moe_bootstrap_allgather(const moe_bootstrap_t* b, const void* send, void* recv, size_t bytes,
                                     const char* what) {
  moe_clear_last_error();
  const int rc = b->allgather(send, recv, bytes, b->ctx);
  if (rc == 0) return ncclSuccess;
  /* Our own all-gathers return an ncclResult_t and leave a message. */
  const ncclResult_t res = rc > 0 && rc < ncclNumResults ? (ncclResult_t)rc : ncclSystemError;
  char detail[256];
  snprintf(detail, sizeof(detail), "%s", moe_last_error());
  return MOE_ERROR(res, "rank %d: the bootstrap all-gather of %s (%zu bytes per rank) failed (%d)%s%s", b->rank, what,
                   bytes, rc, detail[0] != '\0' ? ": " : "", detail);
}

/* --------------------------------------------------------- peer info */
static void moe_host_identity(moe_peer_info_t* info) {
  gethostname(info->host, sizeof(info->host) - 1);
  FILE* f = fopen(MOE_BOOT_ID_PATH, "r");
  if (f != NULL) {
    if (fgets(info->bootId, sizeof(info->bootId), f) == NULL) info->bootId[0] = '\0';
    fclose(f);
  }
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

static void moe_local_info(ncclMoeComm_t comm, moe_peer_info_t* info) {
  memset(info, 0, sizeof(*info));
  moe_host_identity(info);
  info->pid = getpid();
  info->device = comm->device;
  info->ptr = (unsigned long long)(uintptr_t)comm->buffer;
  info->config = comm->config;
  info->p2pDisable = moe_env()->p2p_disable;
  moe_reach(comm->device, info);
  /* Needed only by ranks of other processes: a failure here is theirs to
   * report (ranks of one process map the pointer). */
  cudaError_t e = cudaIpcGetMemHandle(&info->ipc, comm->buffer);
  info->ipcOk = e == cudaSuccess;
  if (!info->ipcOk) {
    snprintf(info->ipcError, sizeof(info->ipcError), "%s", cudaGetErrorString(e));
    cudaGetLastError();
  }
}

static int moe_can_reach(const moe_peer_info_t* from, const char* busId) {
  for (int i = 0; i < from->nReach && i < MOE_MAX_VISIBLE_DEVICES; i++)
    if (strncmp(from->reach[i], busId, MOE_BUS_ID_LEN) == 0) return 1;
  return 0;
}

static int moe_same_host(const moe_peer_info_t* a, const moe_peer_info_t* b) {
  return strncmp(a->host, b->host, MOE_HOST_NAME_MAX) == 0 && strncmp(a->bootId, b->bootId, MOE_BOOT_ID_MAX) == 0;
}

void moe_node_keys(const moe_peer_info_t* all, int nRanks, int* nodeKey) {
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
      if (!p->ipcOk)
        return MOE_ERROR(ncclUnhandledCudaError, "rank %d cannot share its buffer with CUDA IPC (%.*s)", r,
                         (int)sizeof(p->ipcError), p->ipcError);
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

ncclResult_t moe_bootstrap_peers(ncclMoeComm_t comm, const moe_bootstrap_t* b, moe_topo_t* topo_p) {
  ncclResult_t res = ncclSuccess;
  int nodeKey[NCCL_MOE_MAX_RANKS];
  moe_peer_info_t mine;
  moe_peer_info_t* all = calloc((size_t)b->nRanks, sizeof(moe_peer_info_t));
  if (all == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  moe_local_info(comm, &mine);
  MOE_CHECK_GOTO(moe_bootstrap_allgather(b, &mine, all, sizeof(mine), "peer information"), res, out);
  if (b->nodeKey != NULL) memcpy(nodeKey, b->nodeKey, sizeof(int) * (size_t)b->nRanks);
  else moe_node_keys(all, b->nRanks, nodeKey);
  MOE_CHECK_GOTO(moe_topo_build(b->nRanks, b->rank, nodeKey, topo_p), res, out);
  MOE_CHECK_GOTO(moe_map_peers(comm, all, nodeKey), res, out);
out:
  free(all);
  return res;
}

/* ------------------------------------------- the in-process all-gather */
struct moe_local_group {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int nRanks, timeoutMs;
  int arrived;                 /* members in the current round */
  int leaving;                 /* members still to copy the last round out */
  unsigned long long round;    /* rounds completed */
  size_t bytes;                /* per rank, of the current round */
  char* buf;                   /* nRanks * bytes */
  size_t cap;
  int aborted, firstFailure;
};

ncclResult_t moe_local_group_create(int nRanks, int timeoutMs, moe_local_group_t** group_p) {
  moe_local_group_t* g = calloc(1, sizeof(*g));
  if (g == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_mutex_init(&g->lock, NULL);
  pthread_cond_init(&g->cond, &attr);
  pthread_condattr_destroy(&attr);
  g->nRanks = nRanks;
  g->timeoutMs = timeoutMs;
  g->firstFailure = -1;
  *group_p = g;
  return ncclSuccess;
}

void moe_local_group_destroy(moe_local_group_t* g) {
  if (g == NULL) return;
  pthread_cond_destroy(&g->cond);
  pthread_mutex_destroy(&g->lock);
  free(g->buf);
  free(g);
}

/* Under the lock. */
static void moe_local_group_abort_locked(moe_local_group_t* g, int rank) {
  if (!g->aborted) g->firstFailure = rank;
  g->aborted = 1;
  pthread_cond_broadcast(&g->cond);
}

void moe_local_group_abort(moe_local_group_t* g, int rank) {
  pthread_mutex_lock(&g->lock);
  moe_local_group_abort_locked(g, rank);
  pthread_mutex_unlock(&g->lock);
}

int moe_local_group_first_failure(moe_local_group_t* g) {
  pthread_mutex_lock(&g->lock);
  const int r = g->aborted ? g->firstFailure : -1;
  pthread_mutex_unlock(&g->lock);
  return r;
}

/* Waits on the group's condition until `deadline`; 0 when it passed. */
static int moe_local_wait(moe_local_group_t* g, const struct timespec* deadline) {
  return pthread_cond_timedwait(&g->cond, &g->lock, deadline) != ETIMEDOUT;
}

int moe_local_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  const moe_local_member_t* m = ctx;
  moe_local_group_t* g = m->group;
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += g->timeoutMs / 1000;
  deadline.tv_nsec += (long)(g->timeoutMs % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  ncclResult_t res = ncclSuccess;
  pthread_mutex_lock(&g->lock);
  /* The previous round's buffer is in use until every member copied it out. */
  while (g->leaving > 0 && !g->aborted)
    if (!moe_local_wait(g, &deadline)) break;
  if (g->aborted) {
    res = MOE_ERROR(ncclSystemError, "virtual rank %d: virtual rank %d failed during set-up", m->rank, g->firstFailure);
    goto out;
  }
  if (g->leaving > 0) {
    res = MOE_ERROR(ncclSystemError, "virtual rank %d: the other ranks did not finish the previous all-gather within "
                    "%d ms", m->rank, g->timeoutMs);
    moe_local_group_abort_locked(g, m->rank);
    goto out;
  }
  if (g->arrived == 0) {
    if ((size_t)g->nRanks * bytes > g->cap) {
      char* grown = realloc(g->buf, (size_t)g->nRanks * bytes);
      if (grown == NULL) {
        res = MOE_ERROR(ncclSystemError, "out of host memory");
        moe_local_group_abort_locked(g, m->rank);
        goto out;
      }
      g->buf = grown;
      g->cap = (size_t)g->nRanks * bytes;
    }
    g->bytes = bytes;
  } else if (bytes != g->bytes) {
    res = MOE_ERROR(ncclInternalError, "virtual rank %d: all-gather of %zu bytes while the others gather %zu", m->rank,
                    bytes, g->bytes);
    moe_local_group_abort_locked(g, m->rank);
    goto out;
  }
  memcpy(g->buf + (size_t)m->rank * bytes, send, bytes);
  const unsigned long long round = g->round;
  if (++g->arrived == g->nRanks) {
    g->arrived = 0;
    g->leaving = g->nRanks;
    g->round++;
    pthread_cond_broadcast(&g->cond);
  }
  while (g->round == round && !g->aborted)
    if (!moe_local_wait(g, &deadline)) break;
  if (g->round == round) {
    if (!g->aborted) {
      res = MOE_ERROR(ncclSystemError, "virtual rank %d: the other virtual ranks did not reach the all-gather within "
                      "%d ms", m->rank, g->timeoutMs);
      moe_local_group_abort_locked(g, m->rank);
    } else {
      res = MOE_ERROR(ncclSystemError, "virtual rank %d: virtual rank %d failed during set-up", m->rank,
                      g->firstFailure);
    }
    goto out;
  }
  memcpy(recv, g->buf, (size_t)g->nRanks * bytes);
  if (--g->leaving == 0) pthread_cond_broadcast(&g->cond);
out:
  pthread_mutex_unlock(&g->lock);
  return (int)res;
}
