/* SPDX-License-Identifier: Apache-2.0 */
/* One rank's own memory and the kernels' context: allocation, the block
 * budget, teardown, the error word, and the work ncclMoeCommDestroy waits for. */
#include "core/moe_comm.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "common/moe_log.h"
#include "core/moe_config.h"

#define MOE_AUTO_BLOCKS_PER_GPU_RANK 24 /* SMs one rank takes when it has its GPU alone */
#define MOE_BLOCKS_PER_SM 2
/* Scratch: the barrier epoch (8 bytes), the grid-completion counter, the
 * error record's claim word, then the layout's counts from this offset. */
#define MOE_SCRATCH_COUNTS 64

ncclResult_t moe_comm_alloc(ncclMoeComm_t comm) {
  moe_layout_compute(&comm->config, comm->nRanks, &comm->layout);
  /* Low-latency regions after the normal ones, when configured. */
  comm->layout.total = moe_ll_layout_compute(&comm->config, comm->nRanks, comm->layout.total, &comm->ll.ctx.l);
  comm->numLocalExperts = comm->config.numExperts / comm->nRanks;
  comm->maxRecv = comm->config.maxRecvTokens;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&comm->stream, cudaStreamNonBlocking));
  cudaError_t err = cudaMalloc((void**)&comm->buffer, comm->layout.total);
  if (err != cudaSuccess)
    return MOE_ERROR(ncclUnhandledCudaError,
                     "cannot allocate %zu bytes of communication buffers on device %d (%s): lower "
                     "config.maxRecvTokens, maxTokensPerRank or hidden",
                     comm->layout.total, comm->device, cudaGetErrorString(err));
  MOE_CUDA_CHECK(cudaMemsetAsync(comm->buffer + comm->layout.signals, 0,
                                 sizeof(unsigned long long) * NCCL_MOE_MAX_RANKS, comm->stream));
  const moe_ll_layout_t* l = &comm->ll.ctx.l;
  if (l->bytes > 0) MOE_CUDA_CHECK(cudaMemsetAsync(comm->buffer + l->state, 0, l->stateBytes, comm->stream));
  /* Done before any peer can map the buffer (the bootstrap exchange). */
  MOE_CUDA_CHECK(cudaStreamSynchronize(comm->stream));
  return ncclSuccess;
}

/* Kernels whose blocks all wait for peers (internode, low latency) must have
 * every rank's grid resident at once. Ranks sharing a GPU (virtual ranks, or
 * processes on one GPU under MPS): such kernels get half of the rank's
 * blocks, and all ranks together at most half of the GPU's
 * MOE_BLOCKS_PER_SM * sms block slots, so every rank's waiting grid fits at
 * once with room to spare for whatever else runs there. (With a block of
 * margin only, ranks timed out now and then on the device machine; a larger
 * numSMs would deadlock.) */
static void moe_comm_blocks(ncclMoeComm_t comm, int sms) {
  const int share = comm->gpuRanks > 1 ? comm->gpuRanks : 1;
  int blocks = moe_env()->num_sms > 0 ? moe_env()->num_sms : comm->config.numSMs; /* both <= NCCL_MOE_MAX_SMS */
  if (blocks == 0) {
    /* Ranks sharing one GPU split it between them. */
    blocks = share > 1 ? MOE_BLOCKS_PER_SM * sms / share : MOE_AUTO_BLOCKS_PER_GPU_RANK;
    if (blocks < 1) blocks = 1;
  }
  comm->numBlocks = blocks;
  comm->waitBlocks = blocks;
  if (share > 1) {
    const int cap = sms / share > 0 ? sms / share : 1;
    comm->waitBlocks = (blocks + 1) / 2 < cap ? (blocks + 1) / 2 : cap;
  }
}

ncclResult_t moe_comm_finish(ncclMoeComm_t comm) {
  const size_t scratchBytes = MOE_SCRATCH_COUNTS + sizeof(int) * ((size_t)comm->nRanks + comm->config.numExperts);
  MOE_CUDA_CHECK(cudaMalloc(&comm->scratch, scratchBytes));
  MOE_CUDA_CHECK(cudaMemsetAsync(comm->scratch, 0, scratchBytes, comm->stream));
  MOE_CUDA_CHECK(cudaHostAlloc((void**)&comm->hostError, sizeof(int) * MOE_ERR_WORDS, cudaHostAllocMapped));
  memset(comm->hostError, 0, sizeof(int) * MOE_ERR_WORDS);
  const size_t countBytes = sizeof(int) * (MOE_HOST_EXPERTS + (size_t)comm->numLocalExperts);
  MOE_CUDA_CHECK(cudaHostAlloc((void**)&comm->hostCounts, countBytes, cudaHostAllocMapped));
  memset(comm->hostCounts, 0, countBytes);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer((void**)&comm->devHostCounts, comm->hostCounts, 0));
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&comm->notified, cudaEventDisableTiming));
  int* devError = NULL;
  MOE_CUDA_CHECK(cudaHostGetDevicePointer((void**)&devError, comm->hostError, 0));

  moe_rank_ctx_t* ctx = &comm->ctx;
  ctx->layout = comm->layout;
  ctx->rank = comm->rank;
  ctx->nRanks = comm->nRanks;
  ctx->numLocalExperts = comm->numLocalExperts;
  ctx->error = devError;
  ctx->epoch = (unsigned long long*)comm->scratch;
  ctx->blocksDone = (unsigned int*)((char*)comm->scratch + sizeof(unsigned long long));
  ctx->errorClaim = (int*)((char*)comm->scratch + sizeof(unsigned long long) + sizeof(unsigned int));
  ctx->timeoutNs = (long long)comm->config.timeoutMs * 1000000LL;
  comm->tokensPerRank = (int*)((char*)comm->scratch + MOE_SCRATCH_COUNTS);
  comm->tokensPerExpert = comm->tokensPerRank + comm->nRanks;

  MOE_CUDA_CHECK(moe_intranode_preload());
  MOE_CUDA_CHECK(moe_internode_preload());
  int sms = 0;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, comm->device));
  moe_comm_blocks(comm, sms);
  MOE_INFO(NCCL_INIT, "rank %d/%d on device %d: %zu bytes of buffers, %d blocks, max %d rows received",
           comm->rank, comm->nRanks, comm->device, comm->layout.total, comm->numBlocks, comm->maxRecv);
  return ncclSuccess;
}

ncclResult_t moe_comm_setup_done(ncclMoeComm_t comm) {
  MOE_CUDA_CHECK(cudaStreamSynchronize(comm->stream));
  return ncclSuccess;
}

void moe_comm_free(ncclMoeComm_t comm) {
  if (comm == NULL) return;
  for (int i = 0; i < comm->nTracked; i++) cudaEventDestroy(comm->tracked[i].event);
  if (comm->notified) cudaEventDestroy(comm->notified);
  for (int r = 0; r < comm->nRanks; r++)
    if (comm->peerIpc[r]) cudaIpcCloseMemHandle(comm->ctx.peers.base[r]);
  if (comm->hostCounts) cudaFreeHost(comm->hostCounts);
  if (comm->hostError) cudaFreeHost(comm->hostError);
  if (comm->scratch) cudaFree(comm->scratch);
  if (comm->buffer) cudaFree(comm->buffer);
  if (comm->stream) cudaStreamDestroy(comm->stream);
  free(comm);
}

/* ------------------------------------------------------------- checks */
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
    case MOE_KERR_ABORT:
      return MOE_ERROR(ncclInvalidUsage, "rank %d: the comm was aborted (ncclMoeCommAbort)", comm->rank);
    case MOE_KERR_BAD_NOTIFY:
      return MOE_ERROR(ncclRemoteError, "rank %d: a peer sent an invalid notify message", comm->rank);
    default:
      return MOE_ERROR(ncclInternalError, "rank %d: unknown error code in the error record", comm->rank);
  }
}

/* Only a timeout (or a corrupt notify, a failed proxy, an abort) breaks a
 * comm; a bad batch (expert id out of range, capacity exceeded, mismatched
 * shapes) is reported through ncclMoeCommGetAsyncError while every rank keeps
 * calling in step, since a rank that skipped a call would leave its peers
 * waiting. */
ncclResult_t moe_comm_ready(ncclMoeComm_t comm) {
  MOE_ARG_CHECK(comm != NULL, "comm is NULL");
  return moe_kerr_fatal(moe_error_read_host(comm->hostError, NULL, NULL)) ? moe_comm_error(comm) : ncclSuccess;
}

void moe_comm_mark_aborted(ncclMoeComm_t comm) {
  if (comm->hostError == NULL) return; /* never finished its set-up: no kernel can run */
  /* A fatal code replaces a non-fatal one (kernels' waits then end); an
   * earlier fatal error stays, and is what the comm reports. */
  moe_error_record_host(comm->hostError, MOE_KERR_ABORT);
}

/* A pointer the kernels will dereference: device (or managed) memory, with
 * the alignment its accesses need. */
ncclResult_t moe_check_device_ptr(const void* p, size_t align, const char* what) {
  MOE_ARG_CHECK(p != NULL, "%s is NULL", what);
  MOE_ARG_CHECK(((uintptr_t)p) % align == 0, "%s (%p) is not %zu-byte aligned", what, p, align);
  struct cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return MOE_ERROR(ncclInvalidArgument, "%s (%p) is not CUDA memory", what, p);
  }
  MOE_ARG_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
                "%s (%p) is not device memory", what, p);
  return ncclSuccess;
}

/* ------------------------------------------------------ work tracking */
void moe_comm_track(ncclMoeComm_t comm, cudaStream_t stream) {
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();
    comm->untracked = 1;
    return;
  }
  if (capture != cudaStreamCaptureStatusNone) return;
  int i = 0;
  while (i < comm->nTracked && comm->tracked[i].stream != stream) i++;
  if (i == comm->nTracked) {
    if (i == MOE_TRACKED_STREAMS ||
        cudaEventCreateWithFlags(&comm->tracked[i].event, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      comm->untracked = 1;
      return;
    }
    comm->tracked[i].stream = stream;
    comm->nTracked++;
  }
  if (cudaEventRecord(comm->tracked[i].event, stream) != cudaSuccess) {
    cudaGetLastError();
    comm->untracked = 1;
  }
}

/* ncclMoeCommAbort's bounded wait: moe_comm_wait_idle on a helper thread,
 * given up on after the timeout (the thread then finishes on its own and
 * frees the state; the comm stays allocated for it). */
typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  ncclMoeComm_t comm;
  int done, abandoned;
} moe_idle_wait_t;

static void* moe_idle_main(void* arg) {
  moe_idle_wait_t* w = arg;
  cudaSetDevice(w->comm->device);
  moe_comm_wait_idle(w->comm);
  pthread_mutex_lock(&w->lock);
  w->done = 1;
  const int abandoned = w->abandoned;
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->lock);
  if (abandoned) {
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->lock);
    free(w);
  }
  return NULL;
}

int moe_comm_wait_idle_for(ncclMoeComm_t comm, int timeoutMs) {
  moe_idle_wait_t* w = calloc(1, sizeof(*w));
  if (w == NULL) return 0;
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->cond, &attr);
  pthread_condattr_destroy(&attr);
  w->comm = comm;
  pthread_t thread;
  if (pthread_create(&thread, NULL, moe_idle_main, w) != 0) {
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->lock);
    free(w);
    return 0;
  }
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += timeoutMs / 1000;
  deadline.tv_nsec += (long)(timeoutMs % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&w->lock);
  while (!w->done)
    if (pthread_cond_timedwait(&w->cond, &w->lock, &deadline) == ETIMEDOUT) break;
  const int done = w->done;
  if (!done) w->abandoned = 1;
  pthread_mutex_unlock(&w->lock);
  if (!done) {
    pthread_detach(thread);
    return 0;
  }
  pthread_join(thread, NULL);
  pthread_cond_destroy(&w->cond);
  pthread_mutex_destroy(&w->lock);
  free(w);
  return 1;
}

void moe_comm_wait_idle(ncclMoeComm_t comm) {
  if (comm->untracked) {
    MOE_INFO(NCCL_INIT, "rank %d: work on more than %d streams (or an untrackable stream): destroy synchronizes "
             "device %d", comm->rank, MOE_TRACKED_STREAMS, comm->device);
    cudaDeviceSynchronize();
  }
  for (int i = 0; i < comm->nTracked; i++) cudaEventSynchronize(comm->tracked[i].event);
  if (comm->stream) cudaStreamSynchronize(comm->stream);
  cudaGetLastError(); /* an earlier kernel fault is the caller's to see, not destroy's */
}

ncclResult_t moe_comm_enter(ncclMoeComm_t comm, const char* fn, moe_device_guard_t* guard) {
  MOE_ARG_CHECK(comm != NULL, "%s: comm is NULL", fn);
  return moe_device_enter(comm->device, guard);
}

ncclResult_t moe_comm_leave(ncclMoeComm_t comm, cudaStream_t stream, moe_device_guard_t* guard, ncclResult_t res) {
  moe_comm_track(comm, stream);
  moe_device_leave(guard);
  return res;
}
