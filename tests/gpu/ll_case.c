/* SPDX-License-Identifier: Apache-2.0 */
/* The low-latency test harness (ll_case.h): every rank's inputs drawn
 * fresh each step from one seed, the plain CPU reference (routing, received
 * rows and scales, combine in fp32 with fused multiply-adds), the calls of a
 * round in one of three orders, and the checks. The ranks this process
 * drives are [lo, hi): all of them for virtual ranks, one for a rank in a
 * process of its own (the reference still covers every rank: each process
 * draws every rank's data). */
#include "ll_case.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/moe_comm.h"
#include "tests/support/moe_fp8.h"
#include "tests/support/moe_test_kernels.h"
#include "nccl_moe.h"
#include "test_common.h"

#define SLOTS 2 /* steps in flight: A and B */
#define POISON 0xA5
#define WORK_ROWS 256
#define WORK_HIDDEN 4096

/* One step of one rank: inputs, the reference of what it receives, outputs. */
typedef struct {
  int T;
  uint16_t* x;     /* [M, H] BF16 */
  uint8_t* q;      /* [M, H] FP8 reference */
  float* qs;       /* [M, H/128] reference scales */
  int64_t* idx;    /* [M, K] */
  float* w;        /* [M, K] */
  /* as receiver: rows per local expert, their (src, token, k) and expert outputs */
  int* count;      /* [L] */
  int* rowSrc;     /* [L][N*M]: src * M + t */
  uint16_t* y;     /* [L][N*M][H] only rows < count filled */
  int* rowOf;      /* [M][K]: row at the expert's rank, or -1 */
} step_t;

struct ll {
  const ll_case_t* cs;
  int N, L, M, H, K, E, nS, esz, scaleCols;
  int lo, hi;                  /* the ranks this process drives */
  int ownComms;                /* virtual ranks: the comms are ours to destroy */
  void (*barrier)(void*);      /* ranks in processes: every rank at the same points */
  void* barrierArg;
  ncclMoeComm_t comms[MAXR];
  cudaStream_t streams[MAXR];
  ncclMoeHandle_t handles[MAXR][SLOTS];
  ncclMoeLowLatencyDispatchResult_t res[MAXR][SLOTS];
  step_t st[MAXR][SLOTS];
  void *dx[MAXR][SLOTS], *didx[MAXR][SLOTS], *dw[MAXR][SLOTS], *dy[MAXR][SLOTS], *dout[MAXR][SLOTS];
  int64_t* dcum[MAXR];
  long long cumWant[MAXR][NCCL_MOE_MAX_EXPERTS];
  void *workIn[MAXR], *workCodes[MAXR], *workScales[MAXR];
  moe_rng_t rng;
};

/* Finite BF16 with exponents in [lo, lo + span): 4 values per draw. */
static void fill_bf16(moe_rng_t* rng, uint16_t* v, size_t n, int lo, int span) {
  for (size_t i = 0; i < n; i += 4) {
    uint64_t r = moe_rng_next(rng);
    for (size_t j = i; j < i + 4 && j < n; j++, r >>= 16) {
      const unsigned bits = (unsigned)(r & 0xFFFF);
      v[j] = (uint16_t)((bits & 0x8000u) | ((unsigned)(lo + (int)((bits >> 7) % (unsigned)span)) << 7) | (bits & 0x7Fu));
    }
  }
}

static int draw_tokens(ll_t* t) {
  switch (t->cs->tokens) {
    case LL_TOK_MAX: return t->M;
    case LL_TOK_ONE: return 1;
    default: break;
  }
  switch (moe_rng_below(&t->rng, 8)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return t->M;
    default: return (int)moe_rng_below(&t->rng, (uint32_t)t->M + 1);
  }
}

static int64_t draw_expert(ll_t* t) {
  const ll_case_t* cs = t->cs;
  if (cs->route == LL_ROUTE_ONE_EXPERT) return 0;
  if (cs->route == LL_ROUTE_SKEWED && moe_rng_below(&t->rng, 4) != 0) return moe_rng_below(&t->rng, (uint32_t)(t->E / 8 > 0 ? t->E / 8 : 1));
  return moe_rng_below(&t->rng, (uint32_t)t->E);
}

static void gen_inputs(ll_t* t, step_t* s, int T) {
  const ll_case_t* cs = t->cs;
  const int H = t->H, K = t->K;
  s->T = T;
  fill_bf16(&t->rng, s->x, (size_t)T * H, 112, 24);
  if (T > 0 && moe_rng_below(&t->rng, 4) == 0) memset(s->x, 0, (size_t)H * 2); /* an all-zero token */
  if (t->nS > 0) moe_fp8_quantize_ref(s->x, T, H, cs->scaleFormat != ncclMoeScaleFloat, s->q, s->qs);
  for (int i = 0; i < T; i++) {
    for (int k = 0; k < K; k++) {
      int64_t e;
      int dup, tries = 0;
      do { /* distinct experts, as routers pick them */
        e = draw_expert(t);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= s->idx[(size_t)i * K + j] == e;
      } while (dup && ++tries < 64);
      if (cs->dupProb && k > 0 && moe_rng_below(&t->rng, cs->dupProb) == 0)
        e = s->idx[(size_t)i * K + moe_rng_below(&t->rng, k)];
      if (cs->dropProb && moe_rng_below(&t->rng, cs->dropProb) == 0) e = -1;
      if (cs->badProb && moe_rng_below(&t->rng, cs->badProb) == 0) e = moe_rng_below(&t->rng, 2) ? t->E + 3 : -7;
      s->idx[(size_t)i * K + k] = e;
      s->w[(size_t)i * K + k] = moe_rng_uniform(&t->rng, -1.0f, 1.0f);
    }
  }
}

static int same_node(const ll_t* t, int a, int b) {
  const int rpn = t->cs->ranksPerNode > 0 ? t->cs->ranksPerNode : t->N;
  return a / rpn == b / rpn;
}

/* Reference routing of one slot over all ranks: the rows of each (rank,
 * expert) come from the sources of the receiver's node, then from the other
 * nodes' (each group in source-rank, then token order); rowOf for each
 * source entry (a repeated expert shares the row of its first slot). */
static void ref_route(ll_t* t, int slot) {
  const int N = t->N, L = t->L, M = t->M, K = t->K, E = t->E;
  for (int r = 0; r < N; r++) memset(t->st[r][slot].count, 0, sizeof(int) * L);
  for (int pass = 0; pass < 3; pass++) /* same node, other nodes, repeats */
    for (int s = 0; s < N; s++) {
      step_t* src = &t->st[s][slot];
      for (int i = 0; i < src->T; i++)
        for (int k = 0; k < K; k++) {
          const int64_t e = src->idx[(size_t)i * K + k];
          const int valid = e >= 0 && e < E;
          int first = k;
          for (int j = 0; valid && j < k; j++)
            if (src->idx[(size_t)i * K + j] == e) { first = j; break; }
          int* rowOf = &src->rowOf[(size_t)i * K + k];
          if (pass == 2) {
            if (!valid) *rowOf = -1;
            else if (first < k) *rowOf = src->rowOf[(size_t)i * K + first];
            continue;
          }
          if (!valid || first < k || same_node(t, s, (int)(e / L)) != (pass == 0)) continue;
          step_t* dst = &t->st[e / L][slot];
          *rowOf = dst->count[e % L]++;
          dst->rowSrc[(size_t)(e % L) * N * M + *rowOf] = s * M + i;
        }
    }
}

/* Expert outputs for every valid row, uploaded to dy. */
static void gen_expert_outputs(ll_t* t, int slot) {
  const size_t rowsPerExpert = (size_t)t->N * t->M, H = t->H;
  for (int r = 0; r < t->N; r++) {
    step_t* s = &t->st[r][slot];
    for (int l = 0; l < t->L; l++) {
      uint16_t* rows = s->y + (size_t)l * rowsPerExpert * H;
      fill_bf16(&t->rng, rows, (size_t)s->count[l] * H, 118, 12);
      if (s->count[l] > 0 && r >= t->lo && r < t->hi)
        ck_assert_int_eq(cudaMemcpy((uint16_t*)t->dy[r][slot] + (size_t)l * rowsPerExpert * H, rows,
                                    (size_t)s->count[l] * H * 2, cudaMemcpyHostToDevice), cudaSuccess);
      if (t->cs->cumulative) t->cumWant[r][l] += s->count[l];
    }
  }
}

static void upload_inputs(ll_t* t, int slot) {
  for (int r = t->lo; r < t->hi; r++) {
    step_t* s = &t->st[r][slot];
    if (s->T == 0) continue;
    ck_assert_int_eq(cudaMemcpy(t->dx[r][slot], s->x, (size_t)s->T * t->H * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ck_assert_int_eq(cudaMemcpy(t->didx[r][slot], s->idx, (size_t)s->T * t->K * 8, cudaMemcpyHostToDevice), cudaSuccess);
    ck_assert_int_eq(cudaMemcpy(t->dw[r][slot], s->w, (size_t)s->T * t->K * 4, cudaMemcpyHostToDevice), cudaSuccess);
  }
}

/* Fresh inputs for a slot (T per rank given, or drawn when tokens == NULL). */
static void new_step(ll_t* t, int slot, const int* tokens) {
  for (int r = 0; r < t->N; r++) gen_inputs(t, &t->st[r][slot], tokens ? tokens[r] : draw_tokens(t));
  ref_route(t, slot);
  gen_expert_outputs(t, slot);
  upload_inputs(t, slot);
}

/* Outputs of both slots poisoned: rows past a count must stay so. */
static void poison(ll_t* t) {
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
  for (int r = t->lo; r < t->hi; r++) {
    struct ncclMoeComm* c = t->comms[r];
    const moe_ll_layout_t* l = &c->ll.ctx.l;
    for (int b = 0; b < MOE_LL_SETS; b++) {
      cudaMemset(c->buffer + l->recvX[b], POISON, l->recvScales[b] - l->recvX[b]);
      cudaMemset(c->buffer + l->recvScales[b], POISON, l->recvSrc[b] - l->recvScales[b]);
      cudaMemset(c->buffer + l->recvSrc[b], POISON, l->recvK[b] - l->recvSrc[b]);
    }
    for (int j = 0; j < SLOTS; j++) cudaMemset(t->dout[r][j], 0xFF, (size_t)t->M * t->H * 2);
  }
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
}

/* ------------------------------------------------------------ the calls */
static ncclMoeLowLatencyDispatchArgs_t dispatch_args(ll_t* t, int r, int slot, int sendOnly) {
  ncclMoeLowLatencyDispatchArgs_t a = {.x = t->dx[r][slot], .numTokens = t->st[r][slot].T, .hidden = t->H,
                                       .topk = t->K, .topkIdx = t->didx[r][slot],
                                       .sendType = t->cs->fp8 ? ncclFloat8e4m3 : ncclBfloat16,
                                       .scaleFormat = t->cs->scaleFormat,
                                       .cumulativeRecvCount = t->cs->cumulative ? t->dcum[r] : NULL,
                                       .sendOnly = sendOnly};
  return a;
}

static void dispatch_all(ll_t* t, int slot, int sendOnly) {
  for (int r = t->lo; r < t->hi; r++) {
    ncclMoeLowLatencyDispatchArgs_t a = dispatch_args(t, r, slot, sendOnly);
    ncclResult_t res = ncclMoeLowLatencyDispatch(t->comms[r], &a, t->handles[r][slot], &t->res[r][slot], t->streams[r]);
    ck_assert_msg(res == ncclSuccess, "rank %d dispatch: %s", r, ncclMoeGetLastError());
  }
}

static void dispatch_recv_all(ll_t* t, int slot) {
  for (int r = t->lo; r < t->hi; r++)
    ck_assert_msg(ncclMoeLowLatencyDispatchRecv(t->comms[r], t->handles[r][slot], t->streams[r]) == ncclSuccess,
                  "rank %d: %s", r, ncclMoeGetLastError());
}

static void combine_all(ll_t* t, int slot, int sendOnly) {
  for (int r = t->lo; r < t->hi; r++) {
    ncclMoeLowLatencyCombineArgs_t c = {.x = t->dy[r][slot], .topkWeights = t->cs->weights ? t->dw[r][slot] : NULL,
                                        .out = t->dout[r][slot], .sendOnly = sendOnly};
    ncclResult_t res = ncclMoeLowLatencyCombine(t->comms[r], &c, t->handles[r][slot], t->streams[r]);
    ck_assert_msg(res == ncclSuccess, "rank %d combine: %s", r, ncclMoeGetLastError());
  }
}

static void combine_recv_all(ll_t* t, int slot) {
  for (int r = t->lo; r < t->hi; r++)
    ck_assert_msg(ncclMoeLowLatencyCombineRecv(t->comms[r], t->handles[r][slot], t->streams[r]) == ncclSuccess,
                  "rank %d: %s", r, ncclMoeGetLastError());
}

/* Unrelated GPU work between the halves (a cast and a memset). */
static void work_all(ll_t* t) {
  for (int r = t->lo; r < t->hi; r++) {
    ck_assert_int_eq(moe_fp8_quantize_launch(t->workIn[r], WORK_ROWS, WORK_HIDDEN, 0, t->workCodes[r],
                                             t->workScales[r], t->streams[r]), cudaSuccess);
    ck_assert_int_eq(cudaMemsetAsync(t->workCodes[r], 0, (size_t)WORK_ROWS * WORK_HIDDEN, t->streams[r]), cudaSuccess);
  }
}

/* Both steps of a round in the given order. */
static void run_round(ll_t* t, ll_order_t order) {
  const int reps = t->cs->combineRepeat > 0 ? t->cs->combineRepeat : 1;
  switch (order) {
    case LL_ORDER_SPLIT:
      dispatch_all(t, 0, 1);
      dispatch_all(t, 1, 1);
      work_all(t);
      dispatch_recv_all(t, 0);
      dispatch_recv_all(t, 1);
      for (int i = 0; i < reps; i++) {
        combine_all(t, 0, 1);
        combine_all(t, 1, 1);
        work_all(t);
        combine_recv_all(t, 0);
        combine_recv_all(t, 1);
      }
      break;
    case LL_ORDER_OVERLAP:
      dispatch_all(t, 0, 0);
      dispatch_all(t, 1, 0);
      for (int i = 0; i < reps; i++) {
        combine_all(t, 0, 0);
        combine_all(t, 1, 0);
      }
      break;
    default:
      for (int j = 0; j < SLOTS; j++) {
        dispatch_all(t, j, 0);
        for (int i = 0; i < reps; i++) combine_all(t, j, 0);
      }
      break;
  }
}

/* ------------------------------------------------------------ checking */
static int ue8m0_of(float scale) {
  uint32_t u;
  memcpy(&u, &scale, 4);
  return (int)((u >> 23) & 0xFF);
}

static void check_dispatch(ll_t* t, int r, int slot) {
  const int N = t->N, L = t->L, M = t->M, H = t->H, nS = t->nS;
  const size_t rowsPerExpert = (size_t)N * M, rowBytes = (size_t)H * t->esz;
  const ncclMoeLowLatencyDispatchResult_t* res = &t->res[r][slot];
  const step_t* me = &t->st[r][slot];
  ck_assert_int_eq(res->expertStride, (int)rowsPerExpert);
  ck_assert_int_eq(res->numLocalExperts, L);
  int* count = malloc(sizeof(int) * L);
  int* src = malloc(sizeof(int) * L * rowsPerExpert);
  ck_assert_int_eq(cudaMemcpy(count, res->recvCountPerExpert, sizeof(int) * L, cudaMemcpyDeviceToHost), cudaSuccess);
  ck_assert_int_eq(cudaMemcpy(src, res->recvSource, sizeof(int) * L * rowsPerExpert, cudaMemcpyDeviceToHost), cudaSuccess);
  uint8_t* rx = malloc(rowsPerExpert * rowBytes);
  const size_t scaleRow = t->cs->fp8 ? (size_t)res->scaleStride * 4 : 0;
  uint8_t* rs = malloc(rowsPerExpert * scaleRow + 4);
  if (t->cs->fp8) {
    ck_assert_ptr_nonnull(res->recvScales);
    ck_assert_int_eq(res->scaleStride, t->scaleCols);
  } else {
    ck_assert_ptr_null(res->recvScales);
  }
  for (int l = 0; l < L; l++) {
    const int n = me->count[l];
    ck_assert_msg(count[l] == n, "rank %d slot %d expert %d: %d rows, want %d", r, slot, l, count[l], n);
    if ((size_t)n < rowsPerExpert) /* nothing written past the count */
      ck_assert_msg((unsigned)src[l * rowsPerExpert + n] == 0xA5A5A5A5u, "rank %d expert %d: row %d written", r, l, n);
    if (n == 0) continue;
    ck_assert_int_eq(cudaMemcpy(rx, (char*)res->recvX + l * rowsPerExpert * rowBytes, n * rowBytes,
                                cudaMemcpyDeviceToHost), cudaSuccess);
    if (t->cs->fp8)
      ck_assert_int_eq(cudaMemcpy(rs, (char*)res->recvScales + l * rowsPerExpert * scaleRow, n * scaleRow,
                                  cudaMemcpyDeviceToHost), cudaSuccess);
    for (int p = 0; p < n; p++) {
      const int want = me->rowSrc[l * rowsPerExpert + p];
      ck_assert_msg(src[l * rowsPerExpert + p] == want, "rank %d slot %d expert %d row %d: source %d, want %d", r,
                    slot, l, p, src[l * rowsPerExpert + p], want);
      const int s = want / M, i = want % M;
      const step_t* from = &t->st[s][slot];
      const void* wantX = t->cs->fp8 ? (const void*)(from->q + (size_t)i * H) : (const void*)(from->x + (size_t)i * H);
      ck_assert_msg(memcmp(rx + p * rowBytes, wantX, rowBytes) == 0, "rank %d expert %d row %d (src %d token %d): payload",
                    r, l, p, s, i);
      if (!t->cs->fp8) continue;
      const uint8_t* got = rs + p * scaleRow;
      const float* ws = from->qs + (size_t)i * nS;
      if (t->cs->scaleFormat == ncclMoeScaleUE8M0) {
        for (int g = 0; g < nS; g++)
          ck_assert_msg(got[g] == ue8m0_of(ws[g]), "rank %d expert %d row %d block %d: ue8m0 %d want %d", r, l, p, g,
                        got[g], ue8m0_of(ws[g]));
        for (size_t g = nS; g < scaleRow; g++) ck_assert_msg(got[g] == 0, "ue8m0 padding byte %zu not 0", g);
      } else {
        ck_assert_msg(memcmp(got, ws, nS * 4) == 0, "rank %d expert %d row %d: scales", r, l, p);
      }
    }
  }
  free(count), free(src), free(rx), free(rs);
}

static void check_combine(ll_t* t, int s, int slot) {
  const step_t* me = &t->st[s][slot];
  const int H = t->H, K = t->K, L = t->L, T = me->T;
  const size_t rowsPerExpert = (size_t)t->N * t->M;
  if (T == 0) return;
  uint16_t* out = malloc((size_t)T * H * 2);
  float* acc = malloc(sizeof(float) * H);
  ck_assert_int_eq(cudaMemcpy(out, t->dout[s][slot], (size_t)T * H * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int i = 0; i < T; i++) {
    for (int h = 0; h < H; h++) acc[h] = 0.0f;
    for (int k = 0; k < K; k++) {
      const int row = me->rowOf[(size_t)i * K + k];
      if (row < 0) continue;
      const int64_t e = me->idx[(size_t)i * K + k];
      const uint16_t* y = t->st[e / L][slot].y + ((size_t)(e % L) * rowsPerExpert + row) * H;
      const float w = t->cs->weights ? me->w[(size_t)i * K + k] : 1.0f;
      for (int h = 0; h < H; h++) acc[h] = fmaf(w, moe_bf16_to_float(y[h]), acc[h]);
    }
    for (int h = 0; h < H; h++) {
      const uint16_t want = moe_float_to_bf16(acc[h]);
      ck_assert_msg(out[(size_t)i * H + h] == want, "rank %d slot %d token %d ch %d: 0x%04x want 0x%04x", s, slot, i,
                    h, out[(size_t)i * H + h], want);
    }
  }
  free(out), free(acc);
}

static void check_async(ll_t* t) {
  for (int r = t->lo; r < t->hi; r++) {
    ncclResult_t async;
    ck_assert_int_eq(ncclMoeCommGetAsyncError(t->comms[r], &async), ncclSuccess);
    int bad = 0;
    if (t->cs->badProb)
      for (int j = 0; j < SLOTS; j++)
        for (int i = 0; i < t->st[r][j].T * t->K; i++) bad |= t->st[r][j].idx[i] < -1 || t->st[r][j].idx[i] >= t->E;
    if (bad) ck_assert_msg(async == ncclInvalidArgument, "rank %d: bad ids not reported (%d)", r, async);
    else if (!t->cs->badProb) ck_assert_msg(async == ncclSuccess, "rank %d: async error %s", r, ncclMoeGetLastError());
  }
}

static void check_round(ll_t* t) {
  for (int r = t->lo; r < t->hi; r++)
    ck_assert_msg(cudaStreamSynchronize(t->streams[r]) == cudaSuccess, "rank %d: %s", r,
                  cudaGetErrorString(cudaGetLastError()));
  check_async(t);
  for (int j = 0; j < SLOTS; j++)
    for (int r = t->lo; r < t->hi; r++) {
      check_dispatch(t, r, j);
      check_combine(t, r, j);
    }
}

static void check_cumulative(ll_t* t) {
  if (!t->cs->cumulative) return;
  int64_t got[NCCL_MOE_MAX_EXPERTS];
  for (int r = t->lo; r < t->hi; r++) {
    ck_assert_int_eq(cudaMemcpy(got, t->dcum[r], sizeof(int64_t) * t->L, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int l = 0; l < t->L; l++)
      ck_assert_msg(got[l] == t->cumWant[r][l], "rank %d expert %d: cumulative %lld want %lld", r, l, (long long)got[l],
                    t->cumWant[r][l]);
  }
}

/* ------------------------------------------------------------ set up */
ncclMoeConfig_t ll_case_config(const ll_case_t* cs) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 1; /* normal mode unused */
  cfg.hidden = cs->hidden;
  cfg.numExperts = cs->numExperts;
  cfg.maxTopk = cs->topk;
  cfg.timeoutMs = cs->timeoutMs > 0 ? cs->timeoutMs : LL_CASE_TIMEOUT_MS;
  cfg.llMaxTokensPerRank = cs->maxTokens;
  return cfg;
}

static void no_barrier(void* arg) { (void)arg; }

/* Host data of every rank; comms (virtual ranks when comm is NULL, else
 * `comm` as rank `rank`), streams, handles and device buffers of the ranks
 * this process drives. */
static void setup(ll_t* t, const ll_case_t* cs, int rank, ncclMoeComm_t comm) {
  memset(t, 0, sizeof(*t));
  t->cs = cs;
  t->N = cs->nRanks, t->E = cs->numExperts, t->L = cs->numExperts / cs->nRanks, t->M = cs->maxTokens;
  t->H = cs->hidden, t->K = cs->topk, t->nS = cs->hidden / NCCL_MOE_FP8_BLOCK, t->esz = cs->fp8 ? 1 : 2;
  t->scaleCols = cs->scaleFormat == ncclMoeScaleUE8M0 ? (t->nS + 3) / 4 : t->nS;
  t->barrier = no_barrier;
  moe_rng_init(&t->rng, moe_test_seed() ^ ((uint64_t)t->N << 48) ^ ((uint64_t)t->H << 24) ^ (uint64_t)(t->K * 1009 + t->E));
  ck_assert_int_eq(cudaSetDevice(0), cudaSuccess);
  if (comm == NULL) {
    ncclMoeConfig_t cfg = ll_case_config(cs);
    ncclResult_t ir = cs->ranksPerNode > 0 ? ncclMoeCommInitVirtualNodes(t->N, cs->ranksPerNode, 0, &cfg, t->comms)
                                            : ncclMoeCommInitVirtual(t->N, 0, &cfg, t->comms);
    ck_assert_msg(ir == ncclSuccess, "init: %s", ncclMoeGetLastError());
    t->lo = 0, t->hi = t->N, t->ownComms = 1;
  } else {
    t->comms[rank] = comm;
    t->lo = rank, t->hi = rank + 1;
  }
  if (cs->ranksPerNode > 0) {
    int nodes = 0;
    ck_assert_int_eq(ncclMoeCommQuery(t->comms[t->lo], NULL, NULL, NULL, &nodes, NULL), ncclSuccess);
    ck_assert_int_eq(nodes, t->N / cs->ranksPerNode);
  }
  size_t llBytes = 0, allBytes = 0;
  ck_assert_int_eq(ncclMoeLowLatencyBufferBytes(t->comms[t->lo], &llBytes), ncclSuccess);
  ck_assert_int_eq(ncclMoeCommBufferBytes(t->comms[t->lo], &allBytes), ncclSuccess);
  ck_assert(llBytes > 0 && llBytes <= allBytes);
  const size_t M = t->M, H = t->H, K = t->K, L = t->L, rows = (size_t)t->N * M;
  for (int r = 0; r < t->N; r++)
    for (int j = 0; j < SLOTS; j++) {
      step_t* s = &t->st[r][j];
      s->x = malloc(M * H * 2);
      s->q = malloc(M * H);
      s->qs = malloc(M * (H / 128 + 1) * 4);
      s->idx = malloc(M * K * 8);
      s->w = malloc(M * K * 4);
      s->count = calloc(L, sizeof(int));
      s->rowSrc = malloc(L * rows * sizeof(int));
      s->y = malloc(L * rows * H * 2);
      s->rowOf = malloc(M * K * sizeof(int));
    }
  for (int r = t->lo; r < t->hi; r++) {
    ck_assert_int_eq(cudaStreamCreateWithFlags(&t->streams[r], cudaStreamNonBlocking), cudaSuccess);
    for (int j = 0; j < SLOTS; j++) {
      ck_assert_int_eq(ncclMoeHandleCreate(t->comms[r], &t->handles[r][j]), ncclSuccess);
      ck_assert_int_eq(cudaMalloc(&t->dx[r][j], M * H * 2), cudaSuccess);
      ck_assert_int_eq(cudaMalloc(&t->didx[r][j], M * K * 8), cudaSuccess);
      ck_assert_int_eq(cudaMalloc(&t->dw[r][j], M * K * 4), cudaSuccess);
      ck_assert_int_eq(cudaMalloc(&t->dy[r][j], L * rows * H * 2), cudaSuccess);
      ck_assert_int_eq(cudaMalloc(&t->dout[r][j], M * H * 2), cudaSuccess);
    }
    ck_assert_int_eq(cudaMalloc((void**)&t->dcum[r], sizeof(int64_t) * L), cudaSuccess);
    ck_assert_int_eq(cudaMemset(t->dcum[r], 0, sizeof(int64_t) * L), cudaSuccess);
    ck_assert_int_eq(cudaMalloc(&t->workIn[r], (size_t)WORK_ROWS * WORK_HIDDEN * 2), cudaSuccess);
    ck_assert_int_eq(cudaMemset(t->workIn[r], 0x3c, (size_t)WORK_ROWS * WORK_HIDDEN * 2), cudaSuccess);
    ck_assert_int_eq(cudaMalloc(&t->workCodes[r], (size_t)WORK_ROWS * WORK_HIDDEN), cudaSuccess);
    ck_assert_int_eq(cudaMalloc(&t->workScales[r], (size_t)WORK_ROWS * WORK_HIDDEN / 128 * 4), cudaSuccess);
  }
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
}

static void teardown(ll_t* t) {
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
  for (int r = 0; r < t->N; r++)
    for (int j = 0; j < SLOTS; j++) {
      step_t* s = &t->st[r][j];
      free(s->x), free(s->q), free(s->qs), free(s->idx), free(s->w), free(s->count), free(s->rowSrc), free(s->y);
      free(s->rowOf);
    }
  for (int r = t->lo; r < t->hi; r++) {
    for (int j = 0; j < SLOTS; j++) {
      cudaFree(t->dx[r][j]), cudaFree(t->didx[r][j]), cudaFree(t->dw[r][j]), cudaFree(t->dy[r][j]);
      cudaFree(t->dout[r][j]);
      ncclMoeHandleDestroy(t->handles[r][j]);
    }
    cudaFree(t->dcum[r]), cudaFree(t->workIn[r]), cudaFree(t->workCodes[r]), cudaFree(t->workScales[r]);
    cudaStreamDestroy(t->streams[r]);
  }
  if (t->ownComms)
    for (int r = 0; r < t->N; r++) ck_assert_int_eq(ncclMoeCommDestroy(t->comms[r]), ncclSuccess);
}

/* Eager rounds: fresh inputs, both sets, a random order per round. Ranks
 * in processes meet at the barrier around each round's set-up (poisoning
 * and uploading touch memory the peers' kernels write). */
static void eager_rounds(ll_t* t) {
  const ll_case_t* cs = t->cs;
  for (int round = 0; round < cs->rounds; round++) {
    t->barrier(t->barrierArg);
    poison(t);
    for (int j = 0; j < SLOTS; j++) new_step(t, j, NULL);
    const ll_order_t order = cs->fixedOrder ? (ll_order_t)(cs->fixedOrder - 1)
                                            : (ll_order_t)moe_rng_below(&t->rng, LL_ORDERS);
    t->barrier(t->barrierArg);
    run_round(t, order);
    check_round(t);
  }
  check_cumulative(t);
  t->barrier(t->barrierArg);
}

void ll_run_eager(const ll_case_t* cs) {
  ll_t* t = calloc(1, sizeof(ll_t));
  setup(t, cs, 0, NULL);
  eager_rounds(t);
  teardown(t);
  free(t);
}

void ll_run_eager_rank(const ll_case_t* cs, int rank, ncclMoeComm_t comm, void (*barrier)(void*), void* arg) {
  ll_t* t = calloc(1, sizeof(ll_t));
  setup(t, cs, rank, comm);
  t->barrier = barrier, t->barrierArg = arg;
  eager_rounds(t);
  teardown(t);
  free(t);
}

/* One graph per (rank, slot) holding a whole step with split halves and work
 * in between; replayed with fresh inputs (token counts fixed at capture),
 * then one eager round on the same comms. */
void ll_run_graph(const ll_case_t* cs) {
  ll_t* t = calloc(1, sizeof(ll_t));
  setup(t, cs, 0, NULL);
  int tokens[SLOTS][MAXR];
  for (int j = 0; j < SLOTS; j++)
    for (int r = 0; r < t->N; r++) tokens[j][r] = draw_tokens(t);
  for (int j = 0; j < SLOTS; j++) new_step(t, j, tokens[j]); /* shapes for the capture */
  cudaGraphExec_t exec[MAXR][SLOTS];
  for (int j = 0; j < SLOTS; j++)
    for (int r = 0; r < t->N; r++) {
      cudaGraph_t g;
      ck_assert_int_eq(cudaStreamBeginCapture(t->streams[r], cudaStreamCaptureModeThreadLocal), cudaSuccess);
      ncclMoeLowLatencyDispatchArgs_t a = dispatch_args(t, r, j, 1);
      ck_assert_int_eq(ncclMoeLowLatencyDispatch(t->comms[r], &a, t->handles[r][j], &t->res[r][j], t->streams[r]),
                       ncclSuccess);
      ck_assert_int_eq(moe_fp8_quantize_launch(t->workIn[r], WORK_ROWS, WORK_HIDDEN, 0, t->workCodes[r],
                                               t->workScales[r], t->streams[r]), cudaSuccess);
      ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(t->comms[r], t->handles[r][j], t->streams[r]), ncclSuccess);
      ncclMoeLowLatencyCombineArgs_t c = {.x = t->dy[r][j], .topkWeights = cs->weights ? t->dw[r][j] : NULL,
                                          .out = t->dout[r][j], .sendOnly = 1};
      ck_assert_int_eq(ncclMoeLowLatencyCombine(t->comms[r], &c, t->handles[r][j], t->streams[r]), ncclSuccess);
      ck_assert_int_eq(cudaMemsetAsync(t->workCodes[r], 0, 4096, t->streams[r]), cudaSuccess);
      ck_assert_int_eq(ncclMoeLowLatencyCombineRecv(t->comms[r], t->handles[r][j], t->streams[r]), ncclSuccess);
      ck_assert_int_eq(cudaStreamEndCapture(t->streams[r], &g), cudaSuccess);
      ck_assert_int_eq(cudaGraphInstantiate(&exec[r][j], g, 0), cudaSuccess);
      cudaGraphDestroy(g);
    }
  for (int round = 0; round < cs->rounds; round++) {
    if (round > 0)
      for (int j = 0; j < SLOTS; j++) new_step(t, j, tokens[j]);
    poison(t);
    for (int j = 0; j < SLOTS; j++)
      for (int r = 0; r < t->N; r++) ck_assert_int_eq(cudaGraphLaunch(exec[r][j], t->streams[r]), cudaSuccess);
    check_round(t);
  }
  /* Eager calls after the replays continue the same per-set sequence. */
  poison(t);
  for (int j = 0; j < SLOTS; j++) new_step(t, j, NULL);
  run_round(t, LL_ORDER_SPLIT);
  check_round(t);
  check_cumulative(t);
  for (int j = 0; j < SLOTS; j++)
    for (int r = 0; r < t->N; r++) cudaGraphExecDestroy(exec[r][j]);
  teardown(t);
  free(t);
}

ll_case_t ll_base_case(int N, int M, int H, int K, int E) {
  ll_case_t c;
  memset(&c, 0, sizeof(c));
  c.nRanks = N, c.maxTokens = M, c.hidden = H, c.topk = K, c.numExperts = E;
  c.fp8 = 1, c.weights = 1, c.rounds = 2, c.combineRepeat = 1;
  return c;
}
