/* SPDX-License-Identifier: Apache-2.0 */
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
#include "core/moe_config.h"
#define MOE_BOOT_ID_PATH "/proc/sys/kernel/random/boot_id"
#define MOE_MAX_LOCAL_RANKS 32
/* Bytes after the all-gather's nRanks * bytes that must come back untouched:
 * a callback that writes past the end is caught (when it writes a little). */
#define MOE_BOOT_GUARD_BYTES 64
#define MOE_BOOT_GUARD_FILL 0x5a
/* The largest payload of one round (network handles are 2 x 128 bytes). */
#define MOE_BOOT_ROUND_MAX (1 << 16)

static void moe_boot_copy_str(char* dst, size_t n, const char* src) {
  snprintf(dst, n, "%s", src);
}

ncclResult_t moe_bootstrap_allgather(const moe_bootstrap_t* b, const void* send, void* recv, size_t bytes,
                                     const char* what) {
  const size_t total = (size_t)b->nRanks * bytes;
  unsigned char* buf = malloc(total + MOE_BOOT_GUARD_BYTES);
  if (buf == NULL) return MOE_ERROR(ncclSystemError, "out of host memory");
  memset(buf + total, MOE_BOOT_GUARD_FILL, MOE_BOOT_GUARD_BYTES);
  moe_clear_last_error();
  const int rc = b->allgather(send, buf, bytes, b->ctx);
  ncclResult_t res = ncclSuccess;
  if (rc != 0) {
    /* Our own all-gathers return an ncclResult_t and leave a message. */
    res = rc > 0 && rc < ncclNumResults ? (ncclResult_t)rc : ncclSystemError;
    char detail[256];
    moe_boot_copy_str(detail, sizeof(detail), moe_last_error());
    res = MOE_ERROR(res, "rank %d: the bootstrap all-gather of %s (%zu bytes per rank) failed (%d)%s%s", b->rank,
                    what, bytes, rc, detail[0] != '\0' ? ": " : "", detail);
    goto out;
  }
  for (size_t i = 0; i < MOE_BOOT_GUARD_BYTES; i++)
    if (buf[total + i] != MOE_BOOT_GUARD_FILL) {
      res = MOE_ERROR(ncclInvalidUsage, "rank %d: the bootstrap all-gather of %s wrote past the %zu bytes of its "
                      "receive buffer (%d ranks x %zu bytes)", b->rank, what, total, b->nRanks, bytes);
      goto out;
    }
  if (bytes > 0 && memcmp(buf + (size_t)b->rank * bytes, send, bytes) != 0) {
    res = MOE_ERROR(ncclInvalidUsage, "rank %d: the bootstrap all-gather of %s returned other bytes than this rank's "
                    "own at its place: an all-gather must put rank r's bytes at offset r * bytes (ranks numbered as "
                    "passed at init)", b->rank, what);
    goto out;
  }
  memcpy(recv, buf, total);
out:
  free(buf);
  return res;
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

/* This rank's info: its identity always; its buffer and config when `local`
 * succeeded, else only why it failed. */
static void moe_local_info(const moe_bootstrap_t* b, ncclMoeComm_t comm, ncclResult_t local, moe_peer_info_t* info) {
  memset(info, 0, sizeof(*info));
  info->magic = MOE_BOOT_MAGIC;
  info->bytes = (uint32_t)sizeof(*info);
  info->rank = b->rank;
  info->nRanks = b->nRanks;
  info->pid = getpid();
  moe_host_identity(info);
  if (local == ncclSuccess && comm == NULL) local = ncclInternalError;
  info->status = (int)local;
  if (local != ncclSuccess) {
    moe_boot_copy_str(info->failure, sizeof(info->failure), moe_last_error());
    return;
  }
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
    moe_boot_copy_str(info->ipcError, sizeof(info->ipcError), cudaGetErrorString(e));
    cudaGetLastError();
  }
}

static void moe_terminate(char* s, size_t n) { s[n - 1] = '\0'; }

/* A failed rank's status as the error every rank returns. */
static ncclResult_t moe_remote_failure(int me, int r, int status, const char* why, const char* what) {
  const ncclResult_t res = status > 0 && status < ncclNumResults ? (ncclResult_t)status : ncclSystemError;
  return MOE_ERROR(res, "rank %d: rank %d failed its set-up (%s, before the %s exchange)%s%s", me, r,
                   moe_result_str(res), what, why[0] != '\0' ? ": " : "", why);
}

ncclResult_t moe_peer_infos_check(moe_peer_info_t* all, int nRanks, int rank) {
  for (int r = 0; r < nRanks; r++) {
    moe_peer_info_t* p = &all[r];
    if (p->magic != MOE_BOOT_MAGIC || p->bytes != (uint32_t)sizeof(*p))
      return MOE_ERROR(ncclInvalidUsage, "rank %d: the peer information at rank %d's place is not from this version "
                       "of nccl-moe (magic 0x%x, %u bytes; expected 0x%x, %zu): every rank must load the same library, "
                       "and the all-gather must return every rank's bytes unchanged", rank, r, p->magic, p->bytes,
                       MOE_BOOT_MAGIC, sizeof(*p));
    /* Strings are used from here on: terminated whatever arrived. */
    moe_terminate(p->failure, sizeof(p->failure));
    moe_terminate(p->host, sizeof(p->host));
    moe_terminate(p->bootId, sizeof(p->bootId));
    moe_terminate(p->busId, sizeof(p->busId));
    for (int i = 0; i < MOE_MAX_VISIBLE_DEVICES; i++) moe_terminate(p->reach[i], sizeof(p->reach[i]));
    moe_terminate(p->ipcError, sizeof(p->ipcError));
    if (p->rank != r || p->nRanks != nRanks)
      return MOE_ERROR(ncclInvalidArgument, "rank %d: the peer at rank %d's place says it is rank %d of %d, not rank "
                       "%d of %d: every rank passes its own rank and the same nRanks, and the all-gather puts rank "
                       "r's bytes at offset r * bytes", rank, r, p->rank, p->nRanks, r, nRanks);
  }
  for (int r = 0; r < nRanks; r++)
    if (all[r].status != ncclSuccess) return moe_remote_failure(rank, r, all[r].status, all[r].failure, "peer");
  for (int r = 0; r < nRanks; r++) {
    const moe_peer_info_t* p = &all[r];
    long long mine = 0, theirs = 0;
    const char* field = moe_config_diff(&all[rank].config, &p->config, &mine, &theirs);
    if (field != NULL)
      return MOE_ERROR(ncclInvalidArgument, "rank %d and rank %d passed different configs: %s is %lld here and %lld "
                       "there (every rank passes equal config values; timeoutMs 0 takes each process's "
                       "NCCL_MOE_TIMEOUT_MS)", rank, r, field, mine, theirs);
    if (p->nReach < 0 || p->nReach > MOE_MAX_VISIBLE_DEVICES || p->device < 0 || p->pid <= 0)
      return MOE_ERROR(ncclRemoteError, "rank %d: rank %d sent impossible peer information (device %d, pid %d, %d "
                       "reachable devices)", rank, r, p->device, p->pid, p->nReach);
  }
  return ncclSuccess;
}

static int moe_can_reach(const moe_peer_info_t* from, const char* busId) {
  for (int i = 0; i < from->nReach && i < MOE_MAX_VISIBLE_DEVICES; i++)
    if (strncmp(from->reach[i], busId, MOE_BUS_ID_LEN) == 0) return 1;
  return 0;
}

static int moe_same_host(const moe_peer_info_t* a, const moe_peer_info_t* b) {
  return strncmp(a->host, b->host, MOE_HOST_NAME_MAX) == 0 && strncmp(a->bootId, b->bootId, MOE_BOOT_ID_MAX) == 0;
}

int moe_gpu_ranks(const moe_peer_info_t* all, int nRanks, int rank) {
  const moe_peer_info_t* me = &all[rank];
  int n = 0;
  for (int r = 0; r < nRanks; r++) {
    const moe_peer_info_t* p = &all[r];
    if (!moe_same_host(p, me)) continue;
    /* Bus ids name a GPU across processes; without one, only this process's
     * ordinal does. */
    if (me->busId[0] != '\0' ? strncmp(p->busId, me->busId, MOE_BUS_ID_LEN) == 0
                             : (p->pid == me->pid && p->device == me->device))
      n++;
  }
  return n > 0 ? n : 1;
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

/* Maps every peer's buffer of this node: a pointer within this process,
 * else CUDA IPC (another process, on this GPU or another one). */
ncclResult_t moe_bootstrap_map(ncclMoeComm_t comm, const moe_peer_info_t* all, const moe_topo_t* topo) {
  const moe_peer_info_t* me = &all[comm->rank];
  comm->gpuRanks = moe_gpu_ranks(all, comm->nRanks, comm->rank);
  for (int r = 0; r < comm->nRanks; r++) {
    const moe_peer_info_t* p = &all[r];
    if (topo->nodeOf[r] != topo->node) {
      comm->ctx.peers.base[r] = NULL; /* another node: through the transport */
      continue;
    }
    if (r == comm->rank) {
      comm->ctx.peers.base[r] = comm->buffer;
      continue;
    }
    if (p->pid == me->pid && moe_same_host(p, me)) {
      if (p->device != comm->device) {
        cudaError_t e = cudaDeviceEnablePeerAccess(p->device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
          return MOE_ERROR(ncclUnhandledCudaError, "cudaDeviceEnablePeerAccess(%d): %s", p->device, cudaGetErrorString(e));
        cudaGetLastError();
      }
      comm->ctx.peers.base[r] = (char*)(uintptr_t)p->ptr;
    } else {
      if (!p->ipcOk)
        return MOE_ERROR(ncclUnhandledCudaError, "rank %d cannot share its buffer with CUDA IPC (%s)", r, p->ipcError);
      void* mapped = NULL;
      cudaError_t e = cudaIpcOpenMemHandle(&mapped, p->ipc, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess)
        return MOE_ERROR(ncclUnhandledCudaError, "rank %d: cannot map rank %d's buffer (process %d, %s) with CUDA "
                         "IPC: %s", comm->rank, r, p->pid, p->busId, cudaGetErrorString(e));
      comm->ctx.peers.base[r] = mapped;
      comm->peerIpc[r] = 1;
    }
  }
  return ncclSuccess;
}

ncclResult_t moe_bootstrap_exchange(const moe_bootstrap_t* b, ncclMoeComm_t comm, ncclResult_t local,
                                    moe_peer_info_t** all_p, moe_topo_t* topo_p) {
  ncclResult_t res = ncclSuccess;
  int nodeKey[NCCL_MOE_MAX_RANKS];
  moe_peer_info_t mine;
  moe_peer_info_t* all = calloc((size_t)b->nRanks, sizeof(moe_peer_info_t));
  moe_local_info(b, comm, all == NULL ? MOE_ERROR(ncclSystemError, "out of host memory") : local, &mine);
  if (all == NULL) return (ncclResult_t)mine.status; /* cannot take part: peers fail in their all-gather */
  MOE_CHECK_GOTO(moe_bootstrap_allgather(b, &mine, all, sizeof(mine), "peer information"), res, fail);
  if (local != ncclSuccess) {
    res = local;
    moe_set_last_error(mine.failure);
    goto fail;
  }
  MOE_CHECK_GOTO(moe_peer_infos_check(all, b->nRanks, b->rank), res, fail);
  if (b->nodeKey != NULL) memcpy(nodeKey, b->nodeKey, sizeof(int) * (size_t)b->nRanks);
  else moe_node_keys(all, b->nRanks, nodeKey);
  MOE_CHECK_GOTO(moe_topo_build(b->nRanks, b->rank, nodeKey, topo_p), res, fail);
  *all_p = all;
  return ncclSuccess;
fail:
  free(all);
  return res;
}

/* What a round after the first carries besides its payload. */
typedef struct {
  uint32_t magic;
  int rank;
  int status;
  char failure[MOE_BOOT_FAILURE_MAX];
} moe_round_head_t;

ncclResult_t moe_bootstrap_round(const moe_bootstrap_t* b, ncclResult_t local, const void* mine, void* all,
                                 size_t bytes, const char* what) {
  if (bytes > MOE_BOOT_ROUND_MAX) return MOE_ERROR(ncclInternalError, "a %zu-byte bootstrap round", bytes);
  const size_t slot = sizeof(moe_round_head_t) + bytes;
  ncclResult_t res = ncclSuccess;
  char* send = calloc(1, slot);
  char* recv = calloc((size_t)b->nRanks, slot);
  if (send == NULL || recv == NULL) {
    res = MOE_ERROR(ncclSystemError, "out of host memory");
    goto out;
  }
  moe_round_head_t head = {.magic = MOE_BOOT_MAGIC, .rank = b->rank, .status = (int)local};
  if (local != ncclSuccess) moe_boot_copy_str(head.failure, sizeof(head.failure), moe_last_error());
  memcpy(send, &head, sizeof(head));
  if (local == ncclSuccess && bytes > 0) memcpy(send + sizeof(head), mine, bytes);
  MOE_CHECK_GOTO(moe_bootstrap_allgather(b, send, recv, slot, what), res, out);
  if (local != ncclSuccess) {
    res = local;
    moe_set_last_error(head.failure);
    goto out;
  }
  for (int r = 0; r < b->nRanks; r++) {
    moe_round_head_t* h = (moe_round_head_t*)(recv + (size_t)r * slot);
    moe_terminate(h->failure, sizeof(h->failure));
    if (h->magic != MOE_BOOT_MAGIC || h->rank != r) {
      res = MOE_ERROR(ncclInvalidUsage, "rank %d: the %s exchange returned, at rank %d's place, bytes of rank %d "
                      "(magic 0x%x): the all-gather must put rank r's bytes at offset r * bytes", b->rank, what, r,
                      h->rank, h->magic);
      goto out;
    }
    if (h->status != ncclSuccess) {
      res = moe_remote_failure(b->rank, r, h->status, h->failure, what);
      goto out;
    }
  }
  for (int r = 0; r < b->nRanks && bytes > 0; r++)
    memcpy((char*)all + (size_t)r * bytes, recv + (size_t)r * slot + sizeof(moe_round_head_t), bytes);
out:
  free(send);
  free(recv);
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
