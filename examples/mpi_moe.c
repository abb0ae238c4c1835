/* SPDX-License-Identifier: Apache-2.0 */
/* nccl-moe in an MPI job without PyTorch and without an NCCL communicator:
 * the comm is bootstrapped with MPI_Allgather as ncclMoeCommInitOob's
 * all-gather. One process per GPU of a node (ranks of a node take its GPUs
 * in turn), every rank dispatches a batch of random tokens to random
 * experts, an "expert" doubles what it receives, and combine brings the rows
 * back: every token must come back as its input times 2 times the number of
 * ranks it went to. Build: meson builds it as examples/mpi_moe when it finds
 * MPI. Run:
 *     mpirun -np 4 build/examples/mpi_moe
 * The library needs no NCCL here (it calls none). */
#include <cuda_runtime_api.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nccl_moe.h"

#define TOKENS 512
#define HIDDEN 2048
#define TOPK 4
#define EXPERTS_PER_RANK 8

#define CUDA_OK(call)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                    \
    }                                                                                  \
  } while (0)
#define MOE_OK(call)                                                                   \
  do {                                                                                 \
    ncclResult_t r_ = (call);                                                          \
    if (r_ != ncclSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, ncclMoeGetLastError()); \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                    \
    }                                                                                  \
  } while (0)

/* ncclMoeAllGatherFn_t over an MPI communicator (ctx: the MPI_Comm). MPI
 * counts are ints: larger exchanges are refused (nccl-moe sends a few KiB). */
static int mpi_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  MPI_Comm comm = *(MPI_Comm*)ctx;
  if (bytes > INT_MAX) return 1;
  return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, comm) == MPI_SUCCESS ? 0 : 1;
}

/* BF16 <-> float, enough for the check (values are small integers). */
static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Doubles every received row in place (the "expert"), on the host. */
static void experts(void* rows, int n) {
  uint16_t* h = malloc((size_t)n * HIDDEN * 2);
  CUDA_OK(cudaMemcpy(h, rows, (size_t)n * HIDDEN * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < (size_t)n * HIDDEN; i++) h[i] = to_bf16(2.0f * from_bf16(h[i]));
  CUDA_OK(cudaMemcpy(rows, h, (size_t)n * HIDDEN * 2, cudaMemcpyHostToDevice));
  free(h);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm world = MPI_COMM_WORLD, node;
  int rank, size, local;
  MPI_Comm_rank(world, &rank);
  MPI_Comm_size(world, &size);
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local);
  int ngpu = 0;
  CUDA_OK(cudaGetDeviceCount(&ngpu));
  CUDA_OK(cudaSetDevice(local % ngpu)); /* the comm uses the current device */

  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = TOKENS, cfg.hidden = HIDDEN, cfg.numExperts = EXPERTS_PER_RANK * size, cfg.maxTopk = TOPK;
  ncclMoeComm_t comm;
  MOE_OK(ncclMoeCommInitOob(rank, size, mpi_allgather, &world, &cfg, &comm));
  int nodes = 0;
  MOE_OK(ncclMoeCommQuery(comm, NULL, NULL, NULL, &nodes, NULL));
  if (rank == 0) printf("mpi_moe: %d ranks, %d node(s)\n", size, nodes);

  /* Inputs: small integers (exact in BF16 and in the sums), random experts. */
  srand(1234u + (unsigned)rank);
  uint16_t* hx = malloc((size_t)TOKENS * HIDDEN * 2);
  int64_t* hidx = malloc((size_t)TOKENS * TOPK * 8);
  int* ranksOf = calloc(TOKENS, sizeof(int));
  for (int t = 0; t < TOKENS; t++) {
    for (int h = 0; h < HIDDEN; h++) hx[(size_t)t * HIDDEN + h] = to_bf16((float)((t + h) % 7 - 3));
    unsigned long long seen = 0;
    for (int k = 0; k < TOPK; k++) {
      const int e = rand() % cfg.numExperts;
      hidx[(size_t)t * TOPK + k] = e;
      seen |= 1ull << (e / EXPERTS_PER_RANK);
    }
    ranksOf[t] = __builtin_popcountll(seen);
  }
  void *x, *idx, *out;
  CUDA_OK(cudaMalloc(&x, (size_t)TOKENS * HIDDEN * 2));
  CUDA_OK(cudaMalloc(&idx, (size_t)TOKENS * TOPK * 8));
  CUDA_OK(cudaMalloc(&out, (size_t)TOKENS * HIDDEN * 2));
  CUDA_OK(cudaMemcpy(x, hx, (size_t)TOKENS * HIDDEN * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(idx, hidx, (size_t)TOKENS * TOPK * 8, cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));

  ncclMoeHandle_t handle;
  MOE_OK(ncclMoeHandleCreate(comm, &handle));
  ncclMoeDispatchArgs_t d = {.x = x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = TOKENS,
                             .hidden = HIDDEN, .topk = TOPK, .topkIdx = idx};
  ncclMoeDispatchResult_t res;
  MOE_OK(ncclMoeDispatch(comm, &d, handle, &res, stream)); /* exact mode: res.numRecv is known */
  CUDA_OK(cudaStreamSynchronize(stream));
  experts(res.recvX, res.numRecv);
  ncclMoeCombineArgs_t c = {.x = res.recvX, .hidden = HIDDEN, .out = out};
  MOE_OK(ncclMoeCombine(comm, &c, handle, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  ncclResult_t async;
  MOE_OK(ncclMoeCommGetAsyncError(comm, &async));

  uint16_t* hout = malloc((size_t)TOKENS * HIDDEN * 2);
  CUDA_OK(cudaMemcpy(hout, out, (size_t)TOKENS * HIDDEN * 2, cudaMemcpyDeviceToHost));
  long bad = async != ncclSuccess;
  for (int t = 0; t < TOKENS; t++)
    for (int h = 0; h < HIDDEN; h++) {
      const float want = 2.0f * (float)ranksOf[t] * from_bf16(hx[(size_t)t * HIDDEN + h]);
      bad += fabsf(from_bf16(hout[(size_t)t * HIDDEN + h]) - want) > 0.0f;
    }
  long allBad = 0;
  MPI_Allreduce(&bad, &allBad, 1, MPI_LONG, MPI_SUM, world);
  if (rank == 0) printf("mpi_moe: %ld rows received on rank 0; %s\n", (long)res.numRecv,
                        allBad == 0 ? "every token came back right" : "MISMATCH");

  /* Every rank is done with the others' memory before any frees its own. */
  MPI_Barrier(world);
  ncclMoeHandleDestroy(handle);
  ncclMoeCommDestroy(comm);
  cudaFree(x), cudaFree(idx), cudaFree(out);
  cudaStreamDestroy(stream);
  free(hx), free(hidx), free(ranksOf), free(hout);
  MPI_Comm_free(&node);
  MPI_Finalize();
  return allBad == 0 ? 0 : 1;
}
