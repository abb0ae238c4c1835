/* SPDX-License-Identifier: Apache-2.0 */
/* The multiproc tier: ranks in processes of their own on ONE GPU, the path
 * real jobs run (buffers mapped across processes with CUDA IPC, host-mapped
 * flags per process, each process launching its own kernels), bootstrapped
 * out of band through ncclMoeCommInitOob (NCCL refuses two ranks on one GPU).
 *
 * This program is both the parent (Check tests, no CUDA context ever) and
 * the ranks: a test spawns N copies of it (fork + exec, tests/support/
 * moe_procs.h), each rank's process finds its case in MOE_MP_CASE, and the
 * parent relays their all-gathers. Every process draws every rank's inputs
 * from one seed and checks its own rank against the CPU reference of
 * tests/gpu/moe_case.c and ll_case.c. Cases: normal mode (exact and
 * capacity, BF16 and FP8), low latency (whole calls and split halves),
 * across nodes (NCCL_MOE_P2P_DISABLE=1: every process a node of its own,
 * the socket transport), set-up failures (a bad config, different configs,
 * a failing all-gather: every rank fails, none hangs), and dead peers: a
 * rank SIGKILLed or SIGSTOPped in the middle of a loop of steps, where every
 * survivor must see an error (ncclMoeCommGetAsyncError, or the failed call)
 * within timeout + 1 s of the kill, ncclMoeCommAbort must return, and the
 * process must exit.
 *
 * Kernels of different processes run side by side only under MPS: when
 * nvidia-cuda-mps-control exists, main() starts a private daemon
 * (tests/support/moe_mps.h) and stops it at the end; the first line says
 * "MPS: on ..." or "MPS: off (why)". Without MPS the processes take turns
 * on the GPU (time slices): the cases still run, with long timeouts.
 * NCCL_MOE_TEST_MPS=0 turns MPS off. Exits 77 without a GPU. */
#include <cuda_runtime_api.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ll_case.h"
#include "moe_case.h"
#include "nccl_moe.h"
#include "test_common.h"
#include "tests/support/moe_fp8.h"
#include "tests/support/moe_mps.h"
#include "tests/support/moe_procs.h"

#define ENV_CASE "MOE_MP_CASE"
#define ENV_TIMEOUT "MOE_MP_TIMEOUT_MS"
/* Comm timeouts: correctness cases under MPS and time-sliced; dead-peer
 * cases (the survivors' bound is this + 1 s). */
#define TIMEOUT_MPS_MS 20000
#define TIMEOUT_SLICED_MS 120000
#define DEAD_TIMEOUT_MPS_MS 2000
#define DEAD_TIMEOUT_SLICED_MS 10000
#define DETECT_SLACK_MS 1000
/* Bound on one all-gather of the ranks (set-up included). */
#define GATHER_TIMEOUT_MS 300000
/* Bound on a whole case, spawn to reap. */
#define CASE_LIMIT_MS 240000
#define REAP_MS 10000
#define MPS_READY_MS 60000 /* for the MPS server to take clients again after a dead-peer case */
/* Dead-peer loops: the victim is hit once every rank finished this many
 * steps; a survivor gives up polling a step after this many timeouts. */
#define DEAD_AFTER_STEPS 3
#define DEAD_MAX_STEPS 100000
#define DEAD_POLL_US 200
#define DEAD_STEP_TIMEOUTS 4
/* Shapes of the dead-peer loops. */
#define DEAD_TOKENS 128
#define DEAD_HIDDEN 2048
#define DEAD_TOPK 4
#define DEAD_EXPERTS_PER_RANK 8
#define DEAD_LL_TOKENS 32
/* The children's CUDA environment: kernels loaded at start (a lazy load in
 * one process could wait for another process's spinning kernel, under MPS
 * they share the server's context), few hardware queues each (MPS has a
 * budget for all its clients). */
#define CHILD_MODULE_LOADING "CUDA_MODULE_LOADING=EAGER"
#define CHILD_CONNECTIONS "CUDA_DEVICE_MAX_CONNECTIONS=4"

/* What a rank reports to the parent. */
enum {
  R_READY = 1,    /* its comm is up */
  R_STEP = 2,     /* value: steps done */
  R_DETECTED = 3, /* value: when (CLOCK_MONOTONIC ns); data: the error */
  R_ABORTED = 4,  /* value: how long ncclMoeCommAbort took (ns) */
  R_RESULT = 5    /* value: 0 passed, else failed; data: why */
};

typedef enum { MP_NORMAL, MP_LL, MP_DEAD, MP_BAD_CONFIG, MP_CONFIG_MISMATCH, MP_GATHER_FAILS } mp_kind_t;
typedef enum { DEAD_CAPACITY, DEAD_EXACT, DEAD_LL } dead_mode_t;

typedef struct {
  const char* name;
  mp_kind_t kind;
  int nRanks;
  int internode;       /* NCCL_MOE_P2P_DISABLE=1: every process a node, socket transport */
  case_t normal;       /* MP_NORMAL */
  ll_case_t ll;        /* MP_LL */
  dead_mode_t dead;    /* MP_DEAD */
  int victim, signal;
} mp_case_t;

static int g_mps_on;
static moe_mps_t g_mps;

/* ------------------------------------------------------------ the cases */
static case_t normal_case(int N, int T, int H, int K, int E) {
  case_t c = base_case(N, T, H, K, E);
  return c;
}

/* Fills *c for `name`; 0 when there is no such case. Parent and ranks
 * build the same table. */
static int mp_case(const char* name, mp_case_t* c) {
  memset(c, 0, sizeof(*c));
  c->name = name;
  if (strcmp(name, "normal_bf16_exact_2") == 0) {
    c->kind = MP_NORMAL, c->nRanks = 2;
    c->normal = normal_case(2, 97, 2048, 4, 8);
    c->normal.dropProb = 7;
  } else if (strcmp(name, "normal_fp8_capacity_4") == 0) {
    c->kind = MP_NORMAL, c->nRanks = 4;
    c->normal = normal_case(4, 256, 7168, 8, 64);
    c->normal.xFp8 = 1, c->normal.sendFp8 = 1, c->normal.capacity = 4 * 256, c->normal.dropProb = 5;
    c->normal.alignment = 32;
  } else if (strcmp(name, "normal_cast_exact_8") == 0) {
    c->kind = MP_NORMAL, c->nRanks = 8;
    c->normal = normal_case(8, 200, 4096, 8, 64);
    c->normal.sendFp8 = 1, c->normal.pow2 = 1, c->normal.tokens[3] = 0, c->normal.tokens[5] = 1;
  } else if (strcmp(name, "normal_bf16_capacity_graph_8") == 0) {
    c->kind = MP_NORMAL, c->nRanks = 8;
    c->normal = normal_case(8, 120, 2048, 6, 64);
    c->normal.capacity = 8 * 120, c->normal.graphReplays = 4, c->normal.zeroCopy = 1, c->normal.route = ROUTE_SKEWED;
  } else if (strcmp(name, "ll_fp8_whole_4") == 0) {
    c->kind = MP_LL, c->nRanks = 4;
    c->ll = ll_base_case(4, 64, 4096, 8, 64);
    c->ll.rounds = 3, c->ll.dropProb = 10, c->ll.dupProb = 20, c->ll.cumulative = 1;
    c->ll.fixedOrder = LL_ORDER_OVERLAP + 1;
  } else if (strcmp(name, "ll_bf16_halves_8") == 0) {
    c->kind = MP_LL, c->nRanks = 8;
    c->ll = ll_base_case(8, 32, 2048, 6, 64);
    c->ll.fp8 = 0, c->ll.rounds = 3, c->ll.route = LL_ROUTE_SKEWED, c->ll.fixedOrder = LL_ORDER_SPLIT + 1;
  } else if (strcmp(name, "ll_ue8m0_random_orders_2") == 0) {
    c->kind = MP_LL, c->nRanks = 2;
    c->ll = ll_base_case(2, 48, 7168, 8, 32);
    c->ll.scaleFormat = ncclMoeScaleUE8M0, c->ll.rounds = 4, c->ll.combineRepeat = 2;
  } else if (strcmp(name, "internode_fp8_exact_4") == 0) {
    c->kind = MP_NORMAL, c->nRanks = 4, c->internode = 1;
    c->normal = normal_case(4, 96, 2048, 8, 32);
    c->normal.sendFp8 = 1, c->normal.ranksPerNode = 1, c->normal.dropProb = 6;
  } else if (strcmp(name, "internode_ll_2") == 0) {
    c->kind = MP_LL, c->nRanks = 2, c->internode = 1;
    c->ll = ll_base_case(2, 24, 2048, 4, 16);
    c->ll.ranksPerNode = 1, c->ll.rounds = 3;
  } else if (strcmp(name, "bad_config_on_one_rank_4") == 0) {
    c->kind = MP_BAD_CONFIG, c->nRanks = 4;
  } else if (strcmp(name, "configs_differ_3") == 0) {
    c->kind = MP_CONFIG_MISMATCH, c->nRanks = 3;
  } else if (strcmp(name, "allgather_fails_on_one_rank_4") == 0) {
    c->kind = MP_GATHER_FAILS, c->nRanks = 4;
  } else if (strcmp(name, "kill_capacity_4") == 0) {
    c->kind = MP_DEAD, c->nRanks = 4, c->dead = DEAD_CAPACITY, c->victim = 2, c->signal = SIGKILL;
  } else if (strcmp(name, "kill_exact_8") == 0) {
    c->kind = MP_DEAD, c->nRanks = 8, c->dead = DEAD_EXACT, c->victim = 5, c->signal = SIGKILL;
  } else if (strcmp(name, "kill_ll_4") == 0) {
    c->kind = MP_DEAD, c->nRanks = 4, c->dead = DEAD_LL, c->victim = 1, c->signal = SIGKILL;
  } else if (strcmp(name, "kill_internode_4") == 0) {
    c->kind = MP_DEAD, c->nRanks = 4, c->dead = DEAD_CAPACITY, c->victim = 0, c->signal = SIGKILL, c->internode = 1;
  } else if (strcmp(name, "stop_capacity_4") == 0) {
    c->kind = MP_DEAD, c->nRanks = 4, c->dead = DEAD_CAPACITY, c->victim = 3, c->signal = SIGSTOP;
  } else if (strcmp(name, "stop_ll_2") == 0) {
    c->kind = MP_DEAD, c->nRanks = 2, c->dead = DEAD_LL, c->victim = 0, c->signal = SIGSTOP;
  } else if (strcmp(name, "stop_internode_exact_4") == 0) {
    c->kind = MP_DEAD, c->nRanks = 4, c->dead = DEAD_EXACT, c->victim = 1, c->signal = SIGSTOP, c->internode = 1;
  } else {
    return 0;
  }
  return 1;
}

/* ============================================================ the ranks */
static moe_oob_t g_oob;
static mp_case_t g_case;
static int g_timeout_ms;

static void report(int kind, long long value, const char* text) {
  moe_oob_report(&g_oob, kind, value, text, text != NULL ? strlen(text) + 1 : 0);
}

static void oob_barrier(void* arg) {
  (void)arg;
  char b = 0, all[MOE_OOB_MAX_RANKS];
  ck_assert_msg(moe_oob_allgather(&b, all, 1, &g_oob) == 0, "barrier: %s", g_oob.error);
}

static ncclMoeComm_t init_comm(const ncclMoeConfig_t* cfg) {
  ncclMoeComm_t comm = NULL;
  const ncclResult_t res = ncclMoeCommInitOob(g_oob.rank, g_oob.nRanks, moe_oob_allgather, &g_oob, cfg, &comm);
  ck_assert_msg(res == ncclSuccess, "rank %d: ncclMoeCommInitOob: %s (%s)", g_oob.rank, ncclMoeGetLastError(),
                g_oob.error);
  int rank = -1, n = 0, device = -1, nodes = 0;
  ck_assert_int_eq(ncclMoeCommQuery(comm, &rank, &n, &device, &nodes, NULL), ncclSuccess);
  ck_assert(rank == g_oob.rank && n == g_oob.nRanks && device == 0);
  ck_assert_int_eq(nodes, g_case.internode ? n : 1);
  report(R_READY, 0, NULL);
  return comm;
}

static void finish_comm(ncclMoeComm_t comm) {
  ncclResult_t async = ncclInternalError;
  ck_assert_int_eq(ncclMoeCommGetAsyncError(comm, &async), ncclSuccess);
  ck_assert_msg(async == ncclSuccess || g_case.normal.overflow, "async error: %s", ncclMoeGetLastError());
  ck_assert_int_eq(ncclMoeCommDestroy(comm), ncclSuccess);
}

static void rank_normal(void) {
  case_t* cs = &g_case.normal;
  cs->timeoutMs = g_timeout_ms;
  const ncclMoeConfig_t cfg = case_config(cs);
  ncclMoeComm_t comm = init_comm(&cfg);
  run_case_rank(cs, g_oob.rank, comm, oob_barrier, NULL);
  finish_comm(comm);
}

static void rank_ll(void) {
  ll_case_t* cs = &g_case.ll;
  cs->timeoutMs = g_timeout_ms;
  const ncclMoeConfig_t cfg = ll_case_config(cs);
  ncclMoeComm_t comm = init_comm(&cfg);
  ll_run_eager_rank(cs, g_oob.rank, comm, oob_barrier, NULL);
  finish_comm(comm);
}

static ncclMoeConfig_t small_config(int nRanks) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 16, cfg.hidden = 1024, cfg.numExperts = 4 * nRanks, cfg.maxTopk = 4;
  cfg.timeoutMs = g_timeout_ms;
  return cfg;
}

/* Set-up failures: every rank returns an error, none waits. */
static void rank_bad_set_up(void) {
  const int me = g_oob.rank;
  ncclMoeConfig_t cfg = small_config(g_oob.nRanks);
  if (g_case.kind == MP_BAD_CONFIG && me == 1) cfg.magic = 0;
  if (g_case.kind == MP_CONFIG_MISMATCH && me == 2) cfg.hidden = 2048;
  ncclMoeComm_t comm = NULL;
  const long long t0 = moe_oob_now_ns();
  const ncclResult_t res = ncclMoeCommInitOob(me, g_oob.nRanks, moe_oob_allgather, &g_oob, &cfg, &comm);
  const char* msg = ncclMoeGetLastError();
  printf("rank %d: %s\n", me, msg);
  ck_assert_ptr_null(comm);
  ck_assert_msg(moe_oob_now_ns() - t0 < (long long)g_timeout_ms * 1000000LL, "the failure took too long");
  if (g_case.kind == MP_BAD_CONFIG) {
    ck_assert_int_eq(res, ncclInvalidArgument);
    if (me != 1) ck_assert_msg(strstr(msg, "rank 1 failed its set-up") != NULL, "rank %d: %s", me, msg);
    else ck_assert_msg(strstr(msg, "NCCL_MOE_CONFIG_INITIALIZER") != NULL, "%s", msg);
  } else {
    ck_assert_int_eq(res, ncclInvalidArgument);
    ck_assert_msg(strstr(msg, "different configs: hidden is") != NULL, "rank %d: %s", me, msg);
  }
}

/* Rank 0's all-gather fails in the last set-up round (and the rank then
 * exits): rank 0 reports its callback's failure, the others the hub's. */
static int failing_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  moe_oob_t* o = ctx;
  if (o->rank == 0 && o->round == 1) return 42;
  return moe_oob_allgather(send, recv, bytes, ctx);
}

static void rank_gather_fails(void) {
  const int me = g_oob.rank;
  ncclMoeConfig_t cfg = small_config(g_oob.nRanks);
  ncclMoeComm_t comm = NULL;
  const ncclResult_t res = ncclMoeCommInitOob(me, g_oob.nRanks, failing_allgather, &g_oob, &cfg, &comm);
  const char* msg = ncclMoeGetLastError();
  printf("rank %d: %s\n", me, msg);
  ck_assert_int_ne(res, ncclSuccess);
  ck_assert_ptr_null(comm);
  ck_assert_msg(strstr(msg, "all-gather of set-up status") != NULL, "rank %d: %s", me, msg);
  if (me == 0) {
    ck_assert_msg(strstr(msg, "failed (42)") != NULL, "%s", msg);
  } else {
    /* The hub tells the others that rank 0 left the exchange. */
    ck_assert_msg(strstr(msg, "failed (-1)") != NULL, "rank %d: %s", me, msg);
    ck_assert_msg(strstr(g_oob.error, "rank 0") != NULL && strstr(g_oob.error, "went away") != NULL, "rank %d: %s",
                  me, g_oob.error);
  }
}

/* ----------------------------------------------------- dead-peer loops */
typedef struct {
  ncclMoeComm_t comm;
  ncclMoeHandle_t handle;
  cudaStream_t stream;
  void *x, *idx, *w, *out, *y, *combine;
  int T, H, K, L, E;
} dead_t;

static void dead_setup(dead_t* d) {
  const int N = g_oob.nRanks;
  d->H = DEAD_HIDDEN, d->K = DEAD_TOPK, d->L = DEAD_EXPERTS_PER_RANK, d->E = DEAD_EXPERTS_PER_RANK * N;
  d->T = g_case.dead == DEAD_LL ? DEAD_LL_TOKENS : DEAD_TOKENS;
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = d->T, cfg.hidden = d->H, cfg.numExperts = d->E, cfg.maxTopk = d->K;
  cfg.timeoutMs = g_timeout_ms;
  if (g_case.dead == DEAD_LL) cfg.llMaxTokensPerRank = d->T;
  d->comm = init_comm(&cfg);
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() + (uint64_t)g_oob.rank);
  const size_t T = d->T, H = d->H, K = d->K;
  uint16_t* hx = malloc(T * H * 2);
  int64_t* hidx = malloc(T * K * 8);
  float* hw = malloc(T * K * 4);
  for (size_t i = 0; i < T * H; i++) hx[i] = moe_float_to_bf16(moe_rng_normal(&rng));
  for (size_t t = 0; t < T; t++)
    for (size_t k = 0; k < K; k++) {
      hidx[t * K + k] = (int64_t)((t * K + k) % (size_t)d->E); /* every rank receives */
      hw[t * K + k] = moe_rng_uniform(&rng, 0.0f, 1.0f);
    }
  const size_t yRows = g_case.dead == DEAD_LL ? (size_t)d->L * N * T : (size_t)N * T;
  ck_assert_int_eq(cudaMalloc(&d->x, T * H * 2), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&d->idx, T * K * 8), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&d->w, T * K * 4), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&d->out, T * H * 2), cudaSuccess);
  ck_assert_int_eq(cudaMalloc(&d->y, yRows * H * 2), cudaSuccess);
  ck_assert_int_eq(cudaMemset(d->y, 0, yRows * H * 2), cudaSuccess);
  cudaMemcpy(d->x, hx, T * H * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d->idx, hidx, T * K * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(d->w, hw, T * K * 4, cudaMemcpyHostToDevice);
  free(hx), free(hidx), free(hw);
  ck_assert_int_eq(ncclMoeHandleCreate(d->comm, &d->handle), ncclSuccess);
  ck_assert_int_eq(ncclMoeGetCombineBuffer(d->comm, &d->combine, NULL), ncclSuccess);
  ck_assert_int_eq(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking), cudaSuccess);
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
}

/* One step (dispatch + combine) enqueued; exact mode waits for the counts. */
static ncclResult_t dead_step(dead_t* d) {
  const int N = g_oob.nRanks;
  if (g_case.dead == DEAD_LL) {
    ncclMoeLowLatencyDispatchArgs_t a = {.x = d->x, .numTokens = d->T, .hidden = d->H, .topk = d->K,
                                         .topkIdx = d->idx, .sendType = ncclFloat8e4m3};
    ncclMoeLowLatencyDispatchResult_t r;
    ncclResult_t res = ncclMoeLowLatencyDispatch(d->comm, &a, d->handle, &r, d->stream);
    ncclMoeLowLatencyCombineArgs_t c = {.x = d->y, .topkWeights = d->w, .out = d->out};
    if (res == ncclSuccess) res = ncclMoeLowLatencyCombine(d->comm, &c, d->handle, d->stream);
    return res;
  }
  ncclMoeDispatchArgs_t a = {.x = d->x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = d->T,
                             .hidden = d->H, .topk = d->K, .topkIdx = d->idx, .topkWeights = d->w,
                             .capacity = g_case.dead == DEAD_EXACT ? 0 : N * d->T};
  ncclMoeDispatchResult_t r;
  ncclResult_t res = ncclMoeDispatch(d->comm, &a, d->handle, &r, d->stream);
  ncclMoeCombineArgs_t c = {.x = d->combine, .hidden = d->H, .out = d->out};
  if (res == ncclSuccess) res = ncclMoeCombine(d->comm, &c, d->handle, d->stream);
  return res;
}

/* Steps until something fails; then abort and report. The survivor's
 * story: when it saw the error, what it was, how long the abort took. */
static void rank_dead(void) {
  dead_t d;
  memset(&d, 0, sizeof(d));
  dead_setup(&d);
  oob_barrier(NULL);
  char why[512] = "";
  const long long stepLimitNs = (long long)DEAD_STEP_TIMEOUTS * g_timeout_ms * 1000000LL;
  int step = 0;
  for (; step < DEAD_MAX_STEPS && why[0] == '\0'; step++) {
    const ncclResult_t res = dead_step(&d);
    if (res != ncclSuccess) {
      snprintf(why, sizeof(why), "step %d: the call returned %d: %s", step, res, ncclMoeGetLastError());
      /* The comm's error record says so too. */
      ncclResult_t async = ncclSuccess;
      ncclMoeCommGetAsyncError(d.comm, &async);
      ck_assert_msg(async != ncclSuccess, "%s, but ncclMoeCommGetAsyncError reports nothing", why);
      break;
    }
    const long long start = moe_oob_now_ns();
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclMoeCommGetAsyncError(d.comm, &async);
      if (async != ncclSuccess) {
        snprintf(why, sizeof(why), "step %d: async error %d: %s", step, async, ncclMoeGetLastError());
        break;
      }
      const cudaError_t e = cudaStreamQuery(d.stream);
      if (e == cudaSuccess) break;
      ck_assert_msg(e == cudaErrorNotReady, "step %d: %s", step, cudaGetErrorString(e));
      ck_assert_msg(moe_oob_now_ns() - start < stepLimitNs, "step %d: no end and no error within %d ms: a hang",
                    step, DEAD_STEP_TIMEOUTS * g_timeout_ms);
      usleep(DEAD_POLL_US);
    }
    if (why[0] == '\0') report(R_STEP, step + 1, NULL);
  }
  ck_assert_msg(why[0] != '\0', "%d steps and no error: the victim was never hit", step);
  report(R_DETECTED, moe_oob_now_ns(), why);
  printf("rank %d: %s\n", g_oob.rank, why);
  ck_assert_int_eq(ncclMoeHandleDestroy(d.handle), ncclSuccess); /* a broken comm: allowed */
  const long long t0 = moe_oob_now_ns();
  ck_assert_int_eq(ncclMoeCommAbort(d.comm), ncclSuccess);
  report(R_ABORTED, moe_oob_now_ns() - t0, NULL);
  /* No frees: the process ends here, with the comm aborted. */
}

START_TEST(rank_main) {
  switch (g_case.kind) {
    case MP_NORMAL: rank_normal(); break;
    case MP_LL: rank_ll(); break;
    case MP_DEAD: rank_dead(); break;
    case MP_BAD_CONFIG:
    case MP_CONFIG_MISMATCH: rank_bad_set_up(); break;
    case MP_GATHER_FAILS: rank_gather_fails(); break;
  }
}
END_TEST

static int rank_process(void) {
  if (moe_oob_attach(&g_oob, GATHER_TIMEOUT_MS) != 0) {
    fprintf(stderr, "rank: not started by the hub\n");
    return 2;
  }
  const char* name = getenv(ENV_CASE);
  if (name == NULL || !mp_case(name, &g_case) || g_case.nRanks != g_oob.nRanks) {
    fprintf(stderr, "rank %d: no case '%s' for %d ranks\n", g_oob.rank, name ? name : "", g_oob.nRanks);
    return 2;
  }
  g_timeout_ms = getenv(ENV_TIMEOUT) != NULL ? atoi(getenv(ENV_TIMEOUT)) : TIMEOUT_MPS_MS;
  const cudaError_t e = cudaSetDevice(0);
  if (e != cudaSuccess) {
    fprintf(stderr, "rank %d: cudaSetDevice(0): %s\n", g_oob.rank, cudaGetErrorString(e));
    report(R_RESULT, 1, "no CUDA device");
    return 2;
  }
  /* Check without fork: an assertion fails this process, which reports it. */
  Suite* s = suite_create(name);
  TCase* tc = tcase_create("rank");
  tcase_add_test(tc, rank_main);
  suite_add_tcase(s, tc);
  SRunner* sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK);
  srunner_run_all(sr, CK_MINIMAL);
  const int failed = srunner_ntests_failed(sr);
  char why[600] = "";
  if (failed) {
    TestResult** tr = srunner_failures(sr);
    snprintf(why, sizeof(why), "rank %d: %s:%d: %s", g_oob.rank, tr_lfile(tr[0]), tr_lno(tr[0]), tr_msg(tr[0]));
    fprintf(stderr, "%s\n", why);
    free(tr);
  }
  report(R_RESULT, failed, why);
  srunner_free(sr);
  fflush(stdout);
  return failed ? 1 : 0;
}

/* ============================================================ the parent */
typedef struct {
  const mp_case_t* cs;
  int timeoutMs;
  moe_hub_t* hub;
  int steps[MOE_OOB_MAX_RANKS], ready[MOE_OOB_MAX_RANKS], result[MOE_OOB_MAX_RANKS], exited[MOE_OOB_MAX_RANKS];
  char why[MOE_OOB_MAX_RANKS][600];
  long long hitAt;                        /* when the victim was signalled (0: not yet) */
  long long detectedAt[MOE_OOB_MAX_RANKS], abortNs[MOE_OOB_MAX_RANKS], exitAt[MOE_OOB_MAX_RANKS];
  char detected[MOE_OOB_MAX_RANKS][512];
} mp_run_t;

static int survivors_done(const mp_run_t* m) {
  for (int r = 0; r < m->cs->nRanks; r++)
    if (r != m->cs->victim && !m->exited[r]) return 0;
  return 1;
}

static int on_event(moe_hub_t* hub, const moe_hub_event_t* ev, void* arg) {
  mp_run_t* m = arg;
  const mp_case_t* cs = m->cs;
  const int r = ev->rank;
  if (ev->type == MOE_HUB_EXIT) {
    m->exited[r] = 1;
    m->exitAt[r] = ev->atNs;
    if (cs->kind == MP_DEAD && r == cs->victim && cs->signal == SIGKILL) moe_mps_client_died(&g_mps, moe_hub_pid(hub, r));
    /* A stopped victim never closes its socket: done when the others are. */
    return cs->kind == MP_DEAD && cs->signal == SIGSTOP && m->hitAt != 0 && survivors_done(m);
  }
  if (ev->type != MOE_HUB_REPORT) return 0;
  const char* text = ev->bytes > 0 ? (const char*)ev->data : "";
  switch (ev->kind) {
    case R_READY: m->ready[r] = 1; break;
    case R_STEP: m->steps[r] = (int)ev->value; break;
    case R_DETECTED:
      m->detectedAt[r] = ev->value;
      snprintf(m->detected[r], sizeof(m->detected[r]), "%.*s", (int)ev->bytes, text);
      break;
    case R_ABORTED: m->abortNs[r] = ev->value; break;
    case R_RESULT:
      m->result[r] = ev->value != 0 ? 2 : 1;
      snprintf(m->why[r], sizeof(m->why[r]), "%.*s", (int)ev->bytes, text);
      break;
    default: break;
  }
  if (cs->kind == MP_DEAD && m->hitAt == 0) {
    int all = 1;
    for (int q = 0; q < cs->nRanks; q++) all &= m->steps[q] >= DEAD_AFTER_STEPS;
    if (all) {
      m->hitAt = moe_oob_now_ns();
      kill(moe_hub_pid(hub, cs->victim), cs->signal);
      printf("%s: signal %d to rank %d (pid %d) after %d steps\n", cs->name, cs->signal, cs->victim,
             (int)moe_hub_pid(hub, cs->victim), DEAD_AFTER_STEPS);
    }
  }
  return 0;
}

/* The hub of the case running now: a case whose assertion fails before it
 * freed its hub leaves it to the teardown, which kills its ranks. */
static moe_hub_t* g_hub;
static mp_run_t* g_run;

static void case_teardown(void) {
  moe_hub_free(g_hub);
  g_hub = NULL;
  free(g_run);
  g_run = NULL;
}

/* Spawns the case's ranks, serves them, reaps them, checks what they said. */
static void run_mp(const char* name) {
  mp_case_t cs;
  ck_assert_msg(mp_case(name, &cs), "no case %s", name);
  const int dead = cs.kind == MP_DEAD;
  const int timeoutMs = dead ? (g_mps_on ? DEAD_TIMEOUT_MPS_MS : DEAD_TIMEOUT_SLICED_MS)
                             : (g_mps_on ? TIMEOUT_MPS_MS : TIMEOUT_SLICED_MS);
  char caseEnv[128], timeoutEnv[64], seedEnv[64];
  snprintf(caseEnv, sizeof(caseEnv), "%s=%s", ENV_CASE, name);
  snprintf(timeoutEnv, sizeof(timeoutEnv), "%s=%d", ENV_TIMEOUT, timeoutMs);
  snprintf(seedEnv, sizeof(seedEnv), "MOE_TEST_SEED=%llu", (unsigned long long)moe_test_seed());
  const char* env[] = {caseEnv, timeoutEnv, seedEnv, CHILD_MODULE_LOADING, CHILD_CONNECTIONS,
                       cs.internode ? "NCCL_MOE_P2P_DISABLE=1" : "NCCL_MOE_P2P_DISABLE=0",
                       cs.internode ? "NCCL_MOE_NET_BACKEND=socket" : NULL, NULL};
  char* argv[] = {"/proc/self/exe", NULL};
  moe_hub_args_t a = {.nRanks = cs.nRanks, .argv = argv, .env = env};
  if (!dead) cs.victim = -1;
  mp_run_t* m = calloc(1, sizeof(mp_run_t));
  g_run = m;
  m->cs = &cs;
  m->timeoutMs = timeoutMs;
  printf("%s: %d processes on GPU 0, comm timeout %d ms, %s\n", name, cs.nRanks, timeoutMs,
         g_mps_on ? "under MPS" : "time-sliced (no MPS)");
  fflush(stdout);
  moe_hub_t* hub = NULL;
  ck_assert_int_eq(moe_hub_spawn(&a, &hub), 0);
  g_hub = hub;
  m->hub = hub;
  const int served = moe_hub_serve(hub, CASE_LIMIT_MS, on_event, m);
  if (dead && cs.signal == SIGSTOP && m->hitAt != 0) {
    /* The survivors are gone: now end the stopped rank. */
    kill(moe_hub_pid(hub, cs.victim), SIGKILL);
    kill(moe_hub_pid(hub, cs.victim), SIGCONT);
  }
  int status[MOE_OOB_MAX_RANKS];
  const int killed = moe_hub_reap(hub, REAP_MS, status);
  if (dead && cs.signal == SIGSTOP && m->hitAt != 0) moe_mps_client_died(&g_mps, moe_hub_pid(hub, cs.victim));
  moe_hub_free(hub);
  g_hub = NULL;
  /* A rank that died with work on the GPU: the MPS server may take new
   * clients only once it recovered. */
  const int ready = !dead || moe_mps_wait_ready(&g_mps, MPS_READY_MS);
  /* Every rank's story first: one failure often explains another. */
  char story[MOE_OOB_MAX_RANKS][160];
  for (int r = 0; r < cs.nRanks; r++) {
    char st[64];
    snprintf(story[r], sizeof(story[r]), "%s, %s", moe_hub_status_str(status[r], st, sizeof(st)),
             m->result[r] == 1 ? "passed" : m->result[r] == 2 ? "FAILED" : "no result");
    printf("  rank %d: %s%s%s\n", r, story[r], m->why[r][0] ? ": " : "", m->why[r]);
    if (dead && r != cs.victim && m->detectedAt[r] != 0)
      printf("    saw the error %.0f ms after the signal (abort %.0f ms, exit %.0f ms after the signal): %s\n",
             (m->detectedAt[r] - m->hitAt) / 1e6, m->abortNs[r] / 1e6, (m->exitAt[r] - m->hitAt) / 1e6,
             m->detected[r]);
  }
  fflush(stdout);
  ck_assert_msg(served >= 0, "%s: the ranks did not finish within %d ms", name, CASE_LIMIT_MS);
  if (!dead) {
    ck_assert_int_eq(killed, 0);
    for (int r = 0; r < cs.nRanks; r++)
      ck_assert_msg(m->result[r] == 1 && WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0, "rank %d: %s %s", r,
                    story[r], m->why[r]);
    return;
  }
  ck_assert_msg(m->hitAt != 0, "%s: the ranks never all reached step %d", name, DEAD_AFTER_STEPS);
  ck_assert_msg(ready, "%s: the MPS server took no new client within %d ms of the case", name, MPS_READY_MS);
  const long long boundNs = (long long)(timeoutMs + DETECT_SLACK_MS) * 1000000LL;
  for (int r = 0; r < cs.nRanks; r++) {
    if (r == cs.victim) continue;
    ck_assert_msg(m->result[r] == 1 && WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0, "rank %d: %s %s", r,
                  story[r], m->why[r]);
    ck_assert_msg(m->detectedAt[r] > m->hitAt, "rank %d saw an error before the victim was hit: %s", r,
                  m->detected[r]);
    ck_assert_msg(m->detectedAt[r] - m->hitAt <= boundNs, "rank %d saw the error %lld ms after the signal (bound: "
                  "timeout %d ms + %d ms)", r, (m->detectedAt[r] - m->hitAt) / 1000000, timeoutMs, DETECT_SLACK_MS);
    ck_assert_msg(m->abortNs[r] <= boundNs, "rank %d: ncclMoeCommAbort took %lld ms", r, m->abortNs[r] / 1000000);
  }
}

#define MP_TEST(name)  \
  START_TEST(name) {   \
    run_mp(#name);     \
  }                    \
  END_TEST

MP_TEST(normal_bf16_exact_2)
MP_TEST(normal_fp8_capacity_4)
MP_TEST(normal_cast_exact_8)
MP_TEST(normal_bf16_capacity_graph_8)
MP_TEST(ll_fp8_whole_4)
MP_TEST(ll_bf16_halves_8)
MP_TEST(ll_ue8m0_random_orders_2)
MP_TEST(internode_fp8_exact_4)
MP_TEST(internode_ll_2)
MP_TEST(bad_config_on_one_rank_4)
MP_TEST(configs_differ_3)
MP_TEST(allgather_fails_on_one_rank_4)
MP_TEST(kill_capacity_4)
MP_TEST(kill_exact_8)
MP_TEST(kill_ll_4)
MP_TEST(kill_internode_4)
MP_TEST(stop_capacity_4)
MP_TEST(stop_ll_2)
MP_TEST(stop_internode_exact_4)

int main(void) {
  if (getenv(MOE_OOB_ENV_FD) != NULL) return rank_process();
  moe_test_require_gpus(1); /* in a child: this process never makes a CUDA context */
  moe_test_seed();
  const char* want = getenv("NCCL_MOE_TEST_MPS");
  g_mps_on = moe_mps_start(&g_mps, want != NULL && strcmp(want, "0") == 0 ? MOE_MPS_OFF : MOE_MPS_AUTO);
  char line[1024];
  printf("%s\n", moe_mps_describe(&g_mps, line, sizeof(line)));
  fflush(stdout);
  Suite* s = suite_create("multiproc");
  TCase* tc = tcase_create("data");
  tcase_add_checked_fixture(tc, NULL, case_teardown);
  tcase_add_test(tc, normal_bf16_exact_2);
  tcase_add_test(tc, normal_fp8_capacity_4);
  tcase_add_test(tc, normal_cast_exact_8);
  tcase_add_test(tc, normal_bf16_capacity_graph_8);
  tcase_add_test(tc, ll_fp8_whole_4);
  tcase_add_test(tc, ll_bf16_halves_8);
  tcase_add_test(tc, ll_ue8m0_random_orders_2);
  tcase_add_test(tc, internode_fp8_exact_4);
  tcase_add_test(tc, internode_ll_2);
  suite_add_tcase(s, tc);
  TCase* tb = tcase_create("set_up_failures");
  tcase_add_checked_fixture(tb, NULL, case_teardown);
  tcase_add_test(tb, bad_config_on_one_rank_4);
  tcase_add_test(tb, configs_differ_3);
  tcase_add_test(tb, allgather_fails_on_one_rank_4);
  suite_add_tcase(s, tb);
  TCase* td = tcase_create("dead_peers");
  tcase_add_checked_fixture(td, NULL, case_teardown);
  tcase_add_test(td, kill_capacity_4);
  tcase_add_test(td, kill_exact_8);
  tcase_add_test(td, kill_ll_4);
  tcase_add_test(td, kill_internode_4);
  tcase_add_test(td, stop_capacity_4);
  tcase_add_test(td, stop_ll_2);
  tcase_add_test(td, stop_internode_exact_4);
  suite_add_tcase(s, td);
  /* No fork per test: this process stays the ranks' parent, so that they
   * die with it (PR_SET_PDEATHSIG) and so does the MPS daemon (its janitor
   * watches this process), whatever ends it. Every case bounds itself
   * (CASE_LIMIT_MS, then the ranks are killed). */
  SRunner* sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK);
  srunner_run_all(sr, CK_NORMAL);
  const int rc = srunner_ntests_failed(sr) == 0 ? 0 : 1;
  srunner_free(sr);
  moe_mps_stop(&g_mps);
  printf("multiproc: %s; MPS daemon stopped\n", rc == 0 ? "passed" : "FAILED");
  return rc;
}
