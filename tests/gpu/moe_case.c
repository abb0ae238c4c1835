/* SPDX-License-Identifier: Apache-2.0 */
/* The dispatch/combine test harness (moe_case.h). */
#include "moe_case.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/moe_comm.h"
#include "core/moe_inter.h"
#include "tests/support/moe_fp8.h"
#include "nccl_moe.h"
#include "test_common.h"

/* Host-side data of one rank. */
typedef struct {
  int T;
  uint16_t* x;      /* BF16 [T, H] */
  uint8_t* xq;      /* FP8 [T, H] (host-quantized) */
  float* xs;        /* [T, H/128] */
  int64_t* idx;     /* [T, K] */
  float* w;         /* [T, K] */
  uint16_t* y;      /* combine input [cap rows, H] */
  /* device */
  void *dx, *dxs, *didx, *dw, *dy, *dout, *doutw;
} rank_data_t;

/* A worker's timeline: when each of its calls began and returned, in ms
 * since the case started its workers (CLOCK_MONOTONIC). Printed when a case
 * fails, and with MOE_CASE_TRACE=1 always: a rank whose kernels started
 * after its peers had given up (the peers' timeout names it "at 0") shows
 * whether its own thread was late, or which call of which rank held it up. */
#define TRACE_STEPS 32
typedef struct {
  const char* what[TRACE_STEPS];
  double ms[TRACE_STEPS];
  int n;
  struct timespec t0;
} trace_t;

static double ms_since(const struct timespec* t0) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (t.tv_sec - t0->tv_sec) * 1e3 + (t.tv_nsec - t0->tv_nsec) * 1e-6;
}

static void mark(trace_t* tr, const char* what) {
  if (tr->n == TRACE_STEPS) return;
  tr->ms[tr->n] = ms_since(&tr->t0);
  tr->what[tr->n++] = what;
}

typedef struct {
  const case_t* cs;
  ncclMoeComm_t comm;
  ncclMoeHandle_t handle;
  cudaStream_t stream;
  rank_data_t* d;
  int rank;
  ncclResult_t res;
  char err[256];
  ncclMoeDispatchResult_t result;
  int recvRowsDevice;
  trace_t trace;
} worker_t;

/* Every rank's host data, and the reference's rows and counts. */
struct case_data {
  const case_t* cs;
  rank_data_t d[MAXR];
  int counts[MAXR];   /* rows each rank receives */
  int* rows;          /* row of (src s, token t) at rank r, or -1: [s][maxT][r] */
  int maxT;
};

static void gen_routing(moe_rng_t* rng, const case_t* cs, int T, int64_t* idx) {
  const int E = cs->numExperts, K = cs->topk, L = E / cs->nRanks;
  for (int t = 0; t < T; t++) {
    for (int k = 0; k < K; k++) {
      int64_t e;
      int dup;
      do {
        if (cs->route == ROUTE_ONE_RANK) e = moe_rng_below(rng, L);            /* rank 0's experts */
        else if (cs->route == ROUTE_SKEWED && moe_rng_below(rng, 4) != 0) e = moe_rng_below(rng, E / 4 > 0 ? E / 4 : 1);
        else e = moe_rng_below(rng, E);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= idx[(size_t)t * K + j] == e;
      } while (dup && K <= (cs->route == ROUTE_ONE_RANK ? L : E) / 2);
      if (cs->dropProb && moe_rng_below(rng, cs->dropProb) == 0) e = -1;
      idx[(size_t)t * K + k] = e;
    }
  }
}

/* Row of (src s, token t) at rank r in the reference order, or -1. */
static int* ref_rows(const case_t* cs, rank_data_t* d, int* counts) {
  const int N = cs->nRanks, K = cs->topk, L = cs->numExperts / N;
  int maxT = 0;
  for (int s = 0; s < N; s++) if (d[s].T > maxT) maxT = d[s].T;
  int* rows = malloc(sizeof(int) * N * (maxT + 1) * N);
  for (int r = 0; r < N; r++) {
    int next = 0;
    for (int s = 0; s < N; s++)
      for (int t = 0; t < d[s].T; t++) {
        int in = 0;
        for (int k = 0; k < K; k++) {
          int64_t e = d[s].idx[(size_t)t * K + k];
          in |= e >= 0 && e / L == r;
        }
        rows[((size_t)s * maxT + t) * N + r] = in ? next++ : -1;
      }
    counts[r] = next;
  }
  return rows;
}

static void* worker(void* arg) {
  worker_t* w = arg;
  const case_t* cs = w->cs;
  rank_data_t* d = &w->d[w->rank];
  ncclMoeComm_t comm = w->comm;
  /* No allocation in here: a cudaMalloc or cudaFree while peers' kernels
   * spin would serialize the streams they need. */
  cudaStream_t stream = w->stream;
  ncclMoeHandle_t handle = w->handle;
  ncclResult_t res = ncclSuccess;
  trace_t* tr = &w->trace;
  mark(tr, "thread");
  cudaSetDevice(0);
  mark(tr, "device set");
  ncclMoeDispatchArgs_t a = {
      .x = d->dx, .xType = cs->xFp8 ? ncclFloat8e4m3 : ncclBfloat16,
      .xScales = cs->xFp8 ? d->dxs : NULL, .sendType = cs->sendFp8 ? ncclFloat8e4m3 : ncclBfloat16,
      .scaleFormat = cs->pow2 ? ncclMoeScalePow2 : ncclMoeScaleFloat, .numTokens = d->T,
      .hidden = cs->hidden, .topk = cs->topk, .topkIdx = d->didx, .topkWeights = cs->weights ? d->dw : NULL,
      .capacity = cs->capacity, .expertAlignment = cs->alignment};
  void* combineBuf = NULL;
  ncclMoeGetCombineBuffer(comm, &combineBuf, NULL);
  ncclMoeCombineArgs_t c = {.x = cs->zeroCopy ? combineBuf : d->dy, .hidden = cs->hidden,
                            .topkWeights = NULL, .out = d->dout, .outTopkWeights = cs->weights ? d->doutw : NULL};
  int rounds = cs->reuse ? 2 : 1;
  cudaGraphExec_t exec = NULL;
  for (int round = 0; round < rounds && res == ncclSuccess; round++) {
    a.reuseHandle = round > 0;
    if (cs->graphReplays > 0) {
      cudaGraph_t graph;
      cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
      mark(tr, "capture");
      res = ncclMoeDispatch(comm, &a, handle, &w->result, stream);
      c.topkWeights = cs->weights ? w->result.recvTopkWeights : NULL;
      if (res == ncclSuccess) res = ncclMoeCombine(comm, &c, handle, stream);
      cudaError_t ce = cudaStreamEndCapture(stream, &graph);
      if (res == ncclSuccess && ce == cudaSuccess) ce = cudaGraphInstantiate(&exec, graph, 0);
      mark(tr, "instantiated");
      if (ce != cudaSuccess && res == ncclSuccess) {
        res = ncclUnhandledCudaError;
        snprintf(w->err, sizeof(w->err), "graph: %s", cudaGetErrorString(ce));
      }
      if (res == ncclSuccess && cs->zeroCopy) cudaMemcpyAsync(combineBuf, d->dy, (size_t)cs->capacity * cs->hidden * 2, cudaMemcpyDeviceToDevice, stream);
      for (int i = 0; i < cs->graphReplays && res == ncclSuccess; i++) {
        cudaMemsetAsync(d->dout, 0xFF, (size_t)d->T * cs->hidden * 2 + 16, stream);
        if (cudaGraphLaunch(exec, stream) != cudaSuccess) res = ncclUnhandledCudaError;
        if (i == 0) mark(tr, "replay 0 launched");
      }
      mark(tr, "replays launched");
      cudaGraphDestroy(graph);
    } else {
      mark(tr, "dispatch call");
      res = ncclMoeDispatch(comm, &a, handle, &w->result, stream);
      mark(tr, "dispatch returned");
      if (res == ncclSuccess) {
        int rows = w->result.numRecv >= 0 ? w->result.numRecv : cs->capacity;
        if (cs->zeroCopy) cudaMemcpyAsync(combineBuf, d->dy, (size_t)rows * cs->hidden * 2, cudaMemcpyDeviceToDevice, stream);
        c.topkWeights = cs->weights ? w->result.recvTopkWeights : NULL;
        /* Nothing received (exact mode): combine must not need any input. */
        if (w->result.numRecv == 0) c.x = NULL;
        cudaMemsetAsync(d->dout, 0xFF, (size_t)d->T * cs->hidden * 2 + 16, stream);
        mark(tr, "combine call");
        res = ncclMoeCombine(comm, &c, handle, stream);
        mark(tr, "combine returned");
      }
    }
    if (cudaStreamSynchronize(stream) != cudaSuccess && res == ncclSuccess) res = ncclUnhandledCudaError;
    mark(tr, "stream synchronized");
  }
  if (res == ncclSuccess) {
    ncclResult_t async;
    ncclMoeCommGetAsyncError(comm, &async);
    res = async;
  }
  if (res != ncclSuccess && w->err[0] == '\0') snprintf(w->err, sizeof(w->err), "%s", ncclMoeGetLastError());
  cudaMemcpy(&w->recvRowsDevice, w->result.recvCount, sizeof(int), cudaMemcpyDeviceToHost);
  if (exec) cudaGraphExecDestroy(exec);
  w->res = res;
  return NULL;
}

static float bf16f(uint16_t v) { return moe_bf16_to_float(v); }

ncclMoeConfig_t case_config(const case_t* cs) {
  int maxT = 1;
  for (int r = 0; r < cs->nRanks; r++)
    if (cs->tokens[r] > maxT) maxT = cs->tokens[r];
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = maxT;
  cfg.hidden = cs->hidden;
  cfg.numExperts = cs->numExperts;
  cfg.maxTopk = cs->topk;
  cfg.timeoutMs = cs->timeoutMs > 0 ? cs->timeoutMs : CASE_TIMEOUT_MS;
  return cfg;
}

case_data_t* case_data_new(const case_t* cs) {
  const int N = cs->nRanks, H = cs->hidden, K = cs->topk, E = cs->numExperts;
  const int nS = H / NCCL_MOE_FP8_BLOCK;
  case_data_t* cd = calloc(1, sizeof(case_data_t));
  ck_assert_ptr_nonnull(cd);
  cd->cs = cs;
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() ^ ((uint64_t)N << 40) ^ ((uint64_t)H << 20) ^ (uint64_t)(K * 131 + E));
  cd->maxT = 1;
  for (int r = 0; r < N; r++)
    if (cs->tokens[r] > cd->maxT) cd->maxT = cs->tokens[r];
  for (int r = 0; r < N; r++) {
    rank_data_t* p = &cd->d[r];
    p->T = cs->tokens[r];
    size_t T = p->T > 0 ? p->T : 1;
    p->x = malloc(T * H * 2);
    p->xq = malloc(T * H);
    p->xs = malloc(T * nS * 4 + 4);
    p->idx = malloc(T * K * 8);
    p->w = malloc(T * K * 4);
    for (size_t i = 0; i < (size_t)p->T * H; i++) p->x[i] = moe_float_to_bf16(moe_rng_normal(&rng) * 3.0f);
    if (nS > 0) moe_fp8_quantize_ref(p->x, p->T, H, cs->pow2, p->xq, p->xs);
    gen_routing(&rng, cs, p->T, p->idx);
    for (size_t i = 0; i < (size_t)p->T * K; i++) p->w[i] = moe_rng_uniform(&rng, 0.0f, 1.0f);
  }
  cd->rows = ref_rows(cs, cd->d, cd->counts);
  for (int r = 0; r < N; r++) {
    /* Combine input: fresh random rows, one per received row. */
    int cap = cs->capacity ? cs->capacity : (cd->counts[r] > 0 ? cd->counts[r] : 1);
    cd->d[r].y = malloc((size_t)cap * H * 2);
    for (size_t i = 0; i < (size_t)cap * H; i++) cd->d[r].y[i] = moe_float_to_bf16(moe_rng_normal(&rng));
  }
  return cd;
}

void case_data_free(case_data_t* cd) {
  if (cd == NULL) return;
  for (int r = 0; r < cd->cs->nRanks; r++) {
    rank_data_t* p = &cd->d[r];
    free(p->x), free(p->xq), free(p->xs), free(p->idx), free(p->w), free(p->y);
  }
  free(cd->rows);
  free(cd);
}

/* Rank r's inputs on the device, and its comm's outputs poisoned. */
static void upload_rank(case_data_t* cd, int r, ncclMoeComm_t comm) {
  const case_t* cs = cd->cs;
  const int H = cs->hidden, K = cs->topk, nS = H / NCCL_MOE_FP8_BLOCK;
  rank_data_t* p = &cd->d[r];
  size_t T = p->T > 0 ? p->T : 1;
  ck_assert_int_eq(cudaMalloc(&p->dx, T * H * 2), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&p->dxs, T * nS * 4 + 4), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&p->didx, T * K * 8), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&p->dw, T * K * 4), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&p->dout, T * H * 2 + 16), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&p->doutw, T * K * 4), cudaSuccess);
  if (cs->xFp8) cudaMemcpy(p->dx, p->xq, (size_t)p->T * H, cudaMemcpyHostToDevice);
  else cudaMemcpy(p->dx, p->x, (size_t)p->T * H * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(p->dxs, p->xs, (size_t)p->T * nS * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(p->didx, p->idx, (size_t)p->T * K * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(p->dw, p->w, (size_t)p->T * K * 4, cudaMemcpyHostToDevice);
  const int cap = cs->capacity ? cs->capacity : (cd->counts[r] > 0 ? cd->counts[r] : 1);
  ck_assert_int_eq(cudaMalloc(&p->dy, (size_t)cap * H * 2), cudaSuccess);
  cudaMemcpy(p->dy, p->y, (size_t)cap * H * 2, cudaMemcpyHostToDevice);
  /* Poison the comm-owned outputs. */
  struct ncclMoeComm* cm = comm;
  cudaMemset(cm->buffer + cm->layout.recvX, 0xA5, cm->layout.recvScales - cm->layout.recvX);
  cudaMemset(cm->buffer + cm->layout.recvScales, 0xA5, cm->layout.combineX - cm->layout.recvScales);
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
}

static void free_rank(case_data_t* cd, int r) {
  rank_data_t* p = &cd->d[r];
  cudaFree(p->dx), cudaFree(p->dxs), cudaFree(p->didx), cudaFree(p->dw), cudaFree(p->dy);
  cudaFree(p->dout), cudaFree(p->doutw);
}

/* What rank r received, against the reference. */
static void check_dispatch(const case_data_t* cd, int r, const worker_t* w) {
  const case_t* cs = cd->cs;
  const int N = cs->nRanks, H = cs->hidden, K = cs->topk, L = cs->numExperts / N, nS = H / NCCL_MOE_FP8_BLOCK;
  const int esz = cs->sendFp8 ? 1 : 2, maxT = cd->maxT;
  const rank_data_t* d = cd->d;
  const ncclMoeDispatchResult_t* res = &w->result;
  int cap = cs->capacity ? cs->capacity : cd->counts[r];
  if (cs->capacity == 0) ck_assert_int_eq(res->numRecv, cd->counts[r]);
  else ck_assert_int_eq(res->numRecv, -1);
  ck_assert_int_eq(w->recvRowsDevice, cd->counts[r]);
  int got = cd->counts[r] < cap ? cd->counts[r] : cap;
  /* Per-expert counts, padded. */
  int* perExpert = calloc(L, sizeof(int));
  for (int s = 0; s < N; s++)
    for (int t = 0; t < d[s].T; t++)
      for (int k = 0; k < K; k++) {
        int64_t e = d[s].idx[(size_t)t * K + k];
        if (e >= 0 && e / L == r) perExpert[e % L]++;
      }
  int* gotPerExpert = malloc(L * sizeof(int));
  cudaMemcpy(gotPerExpert, res->recvTokensPerExpert, L * sizeof(int), cudaMemcpyDeviceToHost);
  int align = cs->alignment > 0 ? cs->alignment : 1;
  for (int l = 0; l < L; l++) {
    int want = (perExpert[l] + align - 1) / align * align;
    ck_assert_msg(gotPerExpert[l] == want, "rank %d expert %d: %d rows, want %d", r, l, gotPerExpert[l], want);
    if (cs->capacity == 0) ck_assert_int_eq(res->hostRecvTokensPerExpert[l], want);
  }
  free(perExpert);
  free(gotPerExpert);
  if (got == 0) return;
  uint8_t* rx = malloc((size_t)got * H * esz);
  float* rs = malloc((size_t)got * nS * 4 + 4);
  int64_t* ri = malloc((size_t)got * K * 8);
  float* rw = malloc((size_t)got * K * 4);
  cudaMemcpy(rx, res->recvX, (size_t)got * H * esz, cudaMemcpyDeviceToHost);
  if (cs->sendFp8) cudaMemcpy(rs, res->recvScales, (size_t)got * nS * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(ri, res->recvTopkIdx, (size_t)got * K * 8, cudaMemcpyDeviceToHost);
  if (cs->weights) cudaMemcpy(rw, res->recvTopkWeights, (size_t)got * K * 4, cudaMemcpyDeviceToHost);
  for (int s = 0; s < N; s++)
    for (int t = 0; t < d[s].T; t++) {
      int row = cd->rows[((size_t)s * maxT + t) * N + r];
      if (row < 0 || row >= got) continue;
      const void* want = cs->sendFp8 ? (const void*)(d[s].xq + (size_t)t * H) : (const void*)(d[s].x + (size_t)t * H);
      ck_assert_msg(memcmp(rx + (size_t)row * H * esz, want, (size_t)H * esz) == 0,
                    "rank %d row %d (src %d token %d): payload differs", r, row, s, t);
      if (cs->sendFp8)
        ck_assert_msg(memcmp(rs + (size_t)row * nS, d[s].xs + (size_t)t * nS, nS * 4) == 0,
                      "rank %d row %d: scales differ", r, row);
      for (int k = 0; k < K; k++) {
        int64_t e = d[s].idx[(size_t)t * K + k];
        int64_t local = (e >= 0 && e / L == r) ? e % L : -1;
        ck_assert_msg(ri[(size_t)row * K + k] == local, "rank %d row %d k %d: id %lld want %lld", r, row, k,
                      (long long)ri[(size_t)row * K + k], (long long)local);
        if (cs->weights) ck_assert_float_eq(rw[(size_t)row * K + k], local >= 0 ? d[s].w[(size_t)t * K + k] : 0.0f);
      }
    }
  free(rx), free(rs), free(ri), free(rw);
}

/* Combine at source s: fp32 sum in rank order, rounded to BF16 once. Across
 * nodes: each node's fp32 sum (its ranks in order) rounded to BF16, then
 * those partials summed in fp32 in node order and rounded once more. */
static void check_combine(const case_data_t* cd, int s) {
  const case_t* cs = cd->cs;
  const int N = cs->nRanks, H = cs->hidden, K = cs->topk, L = cs->numExperts / N, maxT = cd->maxT;
  const int R = cs->ranksPerNode > 0 ? cs->ranksPerNode : N;
  const rank_data_t* d = cd->d;
  if (d[s].T == 0) return;
  uint16_t* out = malloc((size_t)d[s].T * H * 2);
  float* ow = malloc((size_t)d[s].T * K * 4);
  cudaMemcpy(out, d[s].dout, (size_t)d[s].T * H * 2, cudaMemcpyDeviceToHost);
  if (cs->weights) cudaMemcpy(ow, d[s].doutw, (size_t)d[s].T * K * 4, cudaMemcpyDeviceToHost);
  for (int t = 0; t < d[s].T; t++) {
    for (int h = 0; h < H; h++) {
      float acc = 0.0f;
      for (int n0 = 0; n0 < N; n0 += R) {
        float part = 0.0f;
        for (int r = n0; r < n0 + R; r++) {
          int row = cd->rows[((size_t)s * maxT + t) * N + r];
          int cap = cs->capacity ? cs->capacity : cd->counts[r];
          if (row >= 0 && row < cap) part += bf16f(d[r].y[(size_t)row * H + h]);
        }
        acc += R == N ? part : bf16f(moe_float_to_bf16(part));
      }
      uint16_t want = moe_float_to_bf16(acc);
      ck_assert_msg(out[(size_t)t * H + h] == want, "src %d token %d ch %d: 0x%04x want 0x%04x", s, t, h,
                    out[(size_t)t * H + h], want);
    }
    if (cs->weights)
      for (int k = 0; k < K; k++) {
        /* A weight comes back from its expert's rank, unless the token was
         * dropped there (over capacity). */
        int64_t e = d[s].idx[(size_t)t * K + k];
        int r = e >= 0 ? (int)(e / L) : 0;
        int row = e >= 0 ? cd->rows[((size_t)s * maxT + t) * N + r] : -1;
        int cap = cs->capacity ? cs->capacity : cd->counts[r];
        float want = (row >= 0 && row < cap) ? d[s].w[(size_t)t * K + k] : 0.0f;
        ck_assert_float_eq(ow[(size_t)t * K + k], want);
      }
  }
  free(out), free(ow);
}

static ncclResult_t want_of(const case_t* cs) { return cs->overflow ? ncclInvalidArgument : ncclSuccess; }

static int env_is_1(const char* name) {
  const char* v = getenv(name);
  return v != NULL && strcmp(v, "1") == 0;
}

static void print_trace(const worker_t* w) {
  const trace_t* tr = &w->trace;
  fprintf(stderr, "rank %d timeline (ms since the workers started):", w->rank);
  for (int i = 0; i < tr->n; i++) fprintf(stderr, "%s %s %.3f", i > 0 ? "," : "", tr->what[i], tr->ms[i]);
  fprintf(stderr, "\n");
}

/* Where each rank's barrier stood once every worker returned: its epoch
 * (barriers it arrived at) and the epoch each rank last signalled into its
 * buffer. A rank that arrived after its peers gave up shows its later epochs
 * there; an arrival that never landed leaves 0. */
static void print_barrier_state(ncclMoeComm_t* comms, int N) {
  for (int r = 0; r < N; r++) {
    unsigned long long epoch = 0, slots[MAXR] = {0};
    cudaError_t e = cudaMemcpy(&epoch, comms[r]->ctx.epoch, sizeof(epoch), cudaMemcpyDeviceToHost);
    if (e == cudaSuccess)
      e = cudaMemcpy(slots, comms[r]->buffer + comms[r]->layout.signals, sizeof(slots[0]) * N, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
      fprintf(stderr, "rank %d: barrier state unreadable: %s\n", r, cudaGetErrorString(e));
      continue;
    }
    fprintf(stderr, "rank %d: epoch %llu; signal slots (epoch of rank 0..%d):", r, epoch, N - 1);
    for (int s = 0; s < N; s++) fprintf(stderr, " %llu", slots[s]);
    fprintf(stderr, "\n");
  }
}

/* MOE_CASE_PREWARM=1 (a diagnostic): each rank's stream goes through one
 * entry point before the workers start, while no kernel waits, so that the
 * comm's first use of that stream (moe_comm_track creates its event) happens
 * then instead of while the peers' kernels spin. */
static void prewarm_streams(ncclMoeComm_t* comms, const worker_t* w, const case_t* cs, const case_data_t* cd) {
  const int N = cs->nRanks;
  int* counts = NULL;
  ck_assert_int_eq(cudaMalloc((void**)&counts, sizeof(int) * (N + cs->numExperts)), cudaSuccess);
  for (int r = 0; r < N; r++) {
    ncclResult_t res = ncclMoeGetDispatchLayout(comms[r], cd->d[r].didx, 0, cs->topk, counts, counts + N, NULL,
                                                w[r].stream);
    ck_assert_msg(res == ncclSuccess, "prewarm: %s", ncclMoeGetLastError());
    ck_assert_int_eq(cudaStreamSynchronize(w[r].stream), cudaSuccess);
  }
  cudaFree(counts);
}

void run_case(const case_t* cs) {
  const int N = cs->nRanks;
  ncclMoeConfig_t cfg = case_config(cs);
  ncclMoeComm_t comms[MAXR];
  ck_assert_int_eq(cudaSetDevice(0), cudaSuccess);
  const int R = cs->ranksPerNode > 0 ? cs->ranksPerNode : N;
  ncclResult_t ir = ncclMoeCommInitVirtualNodes(N, R, 0, &cfg, comms);
  ck_assert_msg(ir == ncclSuccess, "init: %s", ncclMoeGetLastError());
  case_data_t* cd = case_data_new(cs);
  for (int r = 0; r < N; r++) upload_rank(cd, r, comms[r]);

  worker_t w[MAXR];
  pthread_t th[MAXR];
  memset(w, 0, sizeof(w));
  for (int r = 0; r < N; r++) {
    w[r] = (worker_t){.cs = cs, .comm = comms[r], .d = cd->d, .rank = r};
    ck_assert_int_eq(ncclMoeHandleCreate(comms[r], &w[r].handle), ncclSuccess);
    ck_assert_int_eq(cudaStreamCreateWithFlags(&w[r].stream, cudaStreamNonBlocking), cudaSuccess);
  }
  if (env_is_1("MOE_CASE_PREWARM")) prewarm_streams(comms, w, cs, cd);
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int r = 0; r < N; r++) {
    w[r].trace.t0 = t0;
    pthread_create(&th[r], NULL, worker, &w[r]);
  }
  for (int r = 0; r < N; r++) pthread_join(th[r], NULL);
  const ncclResult_t want = want_of(cs);
  int failed = 0;
  for (int r = 0; r < N; r++) /* every rank's outcome first: one failure often explains another */
    if (w[r].res != want) {
      fprintf(stderr, "rank %d: %d (want %d) %s\n", r, w[r].res, want, w[r].err);
      failed = 1;
    }
  for (int r = 0; (failed || env_is_1("MOE_CASE_TRACE")) && r < N; r++) print_trace(&w[r]);
  if (failed) print_barrier_state(comms, N);
  for (int r = 0; failed && r < N; r++) /* and where each rank's network slabs were */
    if (comms[r]->inter != NULL)
      for (int c = 0; c < MOE_NET_CHANNELS; c++)
        for (int m = 0; m < comms[r]->inter->net.topo.nNodes; m++) {
          const moe_net_flags_t* f = comms[r]->inter->ep.flags;
          if (m != comms[r]->inter->net.topo.node)
            fprintf(stderr, "rank %d channel %d node %d: ready %llu sent %llu progress %llx arrived %llu consumed %llu\n",
                    r, c, m, f->ready[c][m], f->sent[c][m], f->progress[c][m], f->arrived[c][m], f->consumed[c][m]);
        }
  for (int r = 0; r < N; r++)
    ck_assert_msg(w[r].res == want, "rank %d: %d (want %d) %s", r, w[r].res, want, w[r].err);
  for (int r = 0; r < N; r++) check_dispatch(cd, r, &w[r]);
  for (int s = 0; s < N; s++) check_combine(cd, s);
  for (int r = 0; r < N; r++) free_rank(cd, r);
  case_data_free(cd);
  for (int r = 0; r < N; r++) {
    ncclMoeHandleDestroy(w[r].handle);
    cudaStreamDestroy(w[r].stream);
  }
  for (int r = 0; r < N; r++) ck_assert_int_eq(ncclMoeCommDestroy(comms[r]), ncclSuccess);
}

void run_case_rank(const case_t* cs, int rank, ncclMoeComm_t comm, void (*barrier)(void*), void* arg) {
  case_data_t* cd = case_data_new(cs);
  upload_rank(cd, rank, comm);
  worker_t w;
  memset(&w, 0, sizeof(w));
  w = (worker_t){.cs = cs, .comm = comm, .d = cd->d, .rank = rank};
  ck_assert_int_eq(ncclMoeHandleCreate(comm, &w.handle), ncclSuccess);
  ck_assert_int_eq(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking), cudaSuccess);
  barrier(arg); /* no rank's kernels wait while a peer still allocates */
  clock_gettime(CLOCK_MONOTONIC, &w.trace.t0);
  worker(&w);
  if (w.res != want_of(cs) || env_is_1("MOE_CASE_TRACE")) print_trace(&w);
  ck_assert_msg(w.res == want_of(cs), "rank %d: %d (want %d) %s", rank, w.res, want_of(cs), w.err);
  check_dispatch(cd, rank, &w);
  check_combine(cd, rank);
  barrier(arg); /* every rank is done with the others' memory */
  free_rank(cd, rank);
  case_data_free(cd);
  ncclMoeHandleDestroy(w.handle);
  cudaStreamDestroy(w.stream);
}

case_t base_case(int N, int T, int H, int K, int E) {
  case_t c;
  memset(&c, 0, sizeof(c));
  c.nRanks = N, c.hidden = H, c.topk = K, c.numExperts = E, c.weights = 1;
  for (int r = 0; r < N; r++) c.tokens[r] = T;
  return c;
}

