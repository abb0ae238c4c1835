/* SPDX-License-Identifier: Apache-2.0 */
/* Dispatch / combine with one process per GPU: real NCCL communicator, CUDA
 * IPC between processes (and, with NCCL_MOE_P2P_DISABLE=1, the internode
 * path through the transport), checked against a CPU reference.
 * Every process draws every rank's inputs from the same seed, so each can
 * compute what it must receive and what its combine must return.
 * Skips with fewer than 2 GPUs. */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/support/moe_fp8.h"
#include "nccl_moe.h"
#include "test_common.h"

#define T 256
#define H 2048
#define K 8
#define MAXR 8

typedef struct {
  uint16_t x[MAXR][T * H];
  uint8_t xq[MAXR][T * H];
  float xs[MAXR][T * (H / 128)];
  int64_t idx[MAXR][T * K];
  int row[MAXR][T][MAXR]; /* row of (src, token) at each rank, -1 none */
  int count[MAXR];
} world_t;

static void make_world(world_t* w, int N, int E, uint64_t seed) {
  moe_rng_t rng;
  moe_rng_init(&rng, seed);
  for (int s = 0; s < N; s++) {
    for (int i = 0; i < T * H; i++) w->x[s][i] = moe_float_to_bf16(moe_rng_normal(&rng));
    moe_fp8_quantize_ref(w->x[s], T, H, 0, w->xq[s], w->xs[s]);
    for (int i = 0; i < T * K; i++) w->idx[s][i] = moe_rng_below(&rng, 6) == 0 ? -1 : (int64_t)moe_rng_below(&rng, E);
  }
  const int L = E / N;
  for (int r = 0; r < N; r++) {
    int next = 0;
    for (int s = 0; s < N; s++)
      for (int t = 0; t < T; t++) {
        int in = 0;
        for (int k = 0; k < K; k++) in |= w->idx[s][t * K + k] >= 0 && w->idx[s][t * K + k] / L == r;
        w->row[s][t][r] = in ? next++ : -1;
      }
    w->count[r] = next;
  }
}

/* Combine input of rank r, row i: a value both sides can recompute. */
static uint16_t y_value(int r, int i, int h) { return moe_float_to_bf16((float)((r * 7 + i * 3 + h) % 17) - 8.0f); }

static int run_rank(int rank, int N, const char* uid_path) {
  ncclUniqueId id;
  if (rank == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess || moe_test_put_uid(uid_path, &id, sizeof(id)) != 0) return 1;
  } else if (moe_test_get_uid(uid_path, &id, sizeof(id), 60000) != 0) {
    return 1;
  }
  const int E = 16 * N, L = E / N;
  world_t* w = malloc(sizeof(world_t));
  make_world(w, N, E, moe_test_seed());
  cudaSetDevice(rank);
  ncclComm_t nccl;
  if (ncclCommInitRank(&nccl, N, id, rank) != ncclSuccess) return 1;
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = T, cfg.hidden = H, cfg.numExperts = E, cfg.maxTopk = K, cfg.timeoutMs = 30000;
  ncclMoeComm_t moe;
  ncclMoeHandle_t h;
  if (ncclMoeCommInit(nccl, &cfg, &moe) != ncclSuccess || ncclMoeHandleCreate(moe, &h) != ncclSuccess) {
    fprintf(stderr, "rank %d: %s\n", rank, ncclMoeGetLastError());
    return 1;
  }
  void *dxq, *dxs, *didx, *dout, *combineBuf;
  cudaMalloc(&dxq, T * H);
  cudaMalloc(&dxs, sizeof(w->xs[0]));
  cudaMalloc(&didx, sizeof(w->idx[0]));
  cudaMalloc(&dout, T * H * 2);
  cudaMemcpy(dxq, w->xq[rank], T * H, cudaMemcpyHostToDevice);
  cudaMemcpy(dxs, w->xs[rank], sizeof(w->xs[0]), cudaMemcpyHostToDevice);
  cudaMemcpy(didx, w->idx[rank], sizeof(w->idx[0]), cudaMemcpyHostToDevice);
  ncclMoeGetCombineBuffer(moe, &combineBuf, NULL);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  int bad = 0;
  /* Round 0: exact mode. Round 1: capacity mode captured in a graph, replayed. */
  for (int round = 0; round < 2 && !bad; round++) {
    ncclMoeDispatchArgs_t a = {.x = dxq, .xType = ncclFloat8e4m3, .xScales = dxs, .sendType = ncclFloat8e4m3,
                               .numTokens = T, .hidden = H, .topk = K, .topkIdx = didx,
                               .capacity = round == 0 ? 0 : N * T};
    ncclMoeDispatchResult_t res;
    ncclMoeCombineArgs_t c = {.x = combineBuf, .hidden = H, .out = dout};
    /* Expert outputs written straight into the combine buffer (zero-copy). */
    uint16_t* y = malloc((size_t)N * T * H * 2);
    for (int i = 0; i < w->count[rank]; i++)
      for (int hh = 0; hh < H; hh++) y[(size_t)i * H + hh] = y_value(rank, i, hh);
    cudaMemcpy(combineBuf, y, (size_t)w->count[rank] * H * 2, cudaMemcpyHostToDevice);
    free(y);
    cudaMemset(dout, 0xFF, T * H * 2);
    if (round == 0) {
      bad |= ncclMoeDispatch(moe, &a, h, &res, stream) != ncclSuccess;
      bad |= !bad && res.numRecv != w->count[rank];
      bad |= !bad && ncclMoeCombine(moe, &c, h, stream) != ncclSuccess;
    } else {
      cudaGraph_t g;
      cudaGraphExec_t ge;
      cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
      bad |= ncclMoeDispatch(moe, &a, h, &res, stream) != ncclSuccess;
      bad |= ncclMoeCombine(moe, &c, h, stream) != ncclSuccess;
      bad |= cudaStreamEndCapture(stream, &g) != cudaSuccess;
      bad |= cudaGraphInstantiate(&ge, g, 0) != cudaSuccess;
      for (int i = 0; i < 5 && !bad; i++) bad |= cudaGraphLaunch(ge, stream) != cudaSuccess;
    }
    bad |= cudaStreamSynchronize(stream) != cudaSuccess;
    ncclResult_t async;
    ncclMoeCommGetAsyncError(moe, &async);
    bad |= async != ncclSuccess;
    if (bad) { fprintf(stderr, "rank %d round %d: %s\n", rank, round, ncclMoeGetLastError()); break; }
    /* What arrived here. */
    const int n = w->count[rank], nS = H / 128;
    uint8_t* rx = malloc((size_t)n * H + 1);
    float* rs = malloc((size_t)n * nS * 4 + 4);
    int64_t* ri = malloc((size_t)n * K * 8 + 8);
    cudaMemcpy(rx, res.recvX, (size_t)n * H, cudaMemcpyDeviceToHost);
    cudaMemcpy(rs, res.recvScales, (size_t)n * nS * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(ri, res.recvTopkIdx, (size_t)n * K * 8, cudaMemcpyDeviceToHost);
    for (int s = 0; s < N && !bad; s++)
      for (int t = 0; t < T && !bad; t++) {
        int row = w->row[s][t][rank];
        if (row < 0) continue;
        bad |= memcmp(rx + (size_t)row * H, w->xq[s] + (size_t)t * H, H) != 0;
        bad |= memcmp(rs + (size_t)row * nS, w->xs[s] + (size_t)t * nS, nS * 4) != 0;
        for (int k = 0; k < K; k++) {
          int64_t e = w->idx[s][t * K + k];
          bad |= ri[(size_t)row * K + k] != ((e >= 0 && e / L == rank) ? e % L : -1);
        }
        if (bad) fprintf(stderr, "rank %d round %d: received row %d (src %d token %d) differs\n", rank, round, row, s, t);
      }
    free(rx), free(rs), free(ri);
    /* What combine returned here: fp32 sum in rank order, rounded once. */
    uint16_t* out = malloc(T * H * 2);
    cudaMemcpy(out, dout, T * H * 2, cudaMemcpyDeviceToHost);
    for (int t = 0; t < T && !bad; t++)
      for (int hh = 0; hh < H && !bad; hh++) {
        float acc = 0.0f;
        for (int r = 0; r < N; r++)
          if (w->row[rank][t][r] >= 0) acc += moe_bf16_to_float(y_value(r, w->row[rank][t][r], hh));
        bad |= out[(size_t)t * H + hh] != moe_float_to_bf16(acc);
        if (bad) fprintf(stderr, "rank %d round %d: combine token %d channel %d differs\n", rank, round, t, hh);
      }
    free(out);
  }
  ncclMoeHandleDestroy(h);
  ncclMoeCommDestroy(moe);
  ncclCommDestroy(nccl);
  free(w);
  return bad;
}

START_TEST(test_dispatch_combine_one_process_per_gpu) {
  int n = moe_test_gpu_count();
  if (n > MAXR) n = MAXR;
  ck_assert_int_eq(moe_test_spawn_ranks(n, run_rank), 0);
}
END_TEST

/* Every rank a node of its own: tokens cross the socket transport (loopback)
 * through the proxies instead of CUDA IPC. One BF16 value per node partial,
 * so the combine reference is unchanged. */
START_TEST(test_p2p_disabled_goes_through_the_transport) {
  setenv("NCCL_MOE_P2P_DISABLE", "1", 1);
  setenv("NCCL_MOE_NET_BACKEND", "socket", 0);
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  int n = moe_test_gpu_count();
  if (n > MAXR) n = MAXR;
  ck_assert_int_eq(moe_test_spawn_ranks(n, run_rank), 0);
}
END_TEST

int main(void) {
  moe_test_require_gpus(2);
  moe_test_seed();
  Suite* s = suite_create("intranode_mp");
  TCase* tc = tcase_create("multigpu");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_dispatch_combine_one_process_per_gpu);
  tcase_add_test(tc, test_p2p_disabled_goes_through_the_transport);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
