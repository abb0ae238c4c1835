/* SPDX-License-Identifier: Apache-2.0 */
/* nccl-moe-bench: the project's main job. Times layout, notify, dispatch and
 * combine of the normal (high-throughput) mode with N virtual ranks on one
 * GPU, beside a device-to-device copy measured in the same run. With
 * --mode ll it times the low-latency dispatch and combine instead (see
 * ll_main below).
 *
 * Bandwidth is counted as DeepEP counts it: received tokens x bytes per token
 * (FP8: hidden + hidden/128 x 4; BF16: hidden x 2), self traffic included,
 * summed over the ranks on the GPU, over the time from the first rank's start
 * to the last rank's end; median over the timed iterations. Copy bandwidth is
 * bytes copied (once) per second. Ratios are over the copy bandwidth. */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_net.h"
#include "tests/support/moe_fp8.h"
#include "tests/support/moe_mps.h"
#include "tests/support/moe_procs.h"
#include "tests/support/moe_test_kernels.h"
#include "kernels/moe_lowlatency.h"
#include "nccl_moe.h"
#include "tools/common/json.h"
#include "tools/common/opts.h"

#define MAXR NCCL_MOE_MAX_RANKS
#define COPY_BYTES (1ull << 30)
#define BENCH_MAX_TOKENS (1 << 20) /* the library's largest maxTokensPerRank */
#define BENCH_MAX_HIDDEN 65536     /* the library's largest hidden */
#define BENCH_MAX_ITERS 1000000
#define BENCH_MAX_SMS 1024
#define BENCH_MAX_SWEEP 32 /* token counts of one --sweep */
#define BENCH_DEFAULT_TOKENS 4096 /* normal mode; LL_DEFAULT_* below for --mode ll */
#define BENCH_DEFAULT_ITERS 20
#define BENCH_DEFAULT_WARMUP 5

#define CK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); exit(1); } } while (0)
#define NK(call) do { ncclResult_t r_ = (call); if (r_ != ncclSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, ncclMoeGetLastError()); exit(1); } } while (0)

typedef struct {
  int ranks, tokens, hidden, topk, experts, iters, warmup, sms, fp8, cast;
  int nodes;                       /* --nodes: virtual nodes */
  int gpus;                        /* --gpus: one process per GPU (normal mode) */
  int procs;                       /* --procs: one process per rank, out-of-band bootstrap */
  int mps;                         /* --mps auto|off (--procs): a private MPS daemon when available */
  unsigned long long seed;
  int ll;                          /* --mode ll */
  ncclMoeScaleFormat_t scaleFormat; /* --scales (low-latency FP8 cast) */
  int json;                        /* --json: one JSON object per result on stdout */
  FILE* text;                      /* the human-readable report: stdout, or stderr with --json */
  int sweepCount;                  /* --sweep: token counts to run, in order */
  int sweepTokens[BENCH_MAX_SWEEP];
} opts_t;

/* --sweep without a list: token counts per rank of each mode. */
static const int SWEEP_NORMAL[] = {128, 256, 512, 1024, 2048, 4096, 8192};
static const int SWEEP_LL[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};

static void usage(FILE* out) {
  fprintf(out,
          "usage: nccl-moe-bench [--mode normal|ll] [--ranks N | --gpus N | --procs N [--gpus G] [--mps auto|off]]\n"
          "                      [--nodes M]\n"
          "                      [--tokens T | --sweep[=T,T,...]] [--hidden H] [--topk K] [--experts E]\n"
          "                      [--dispatch fp8|bf16|cast] [--scales float|pow2|ue8m0] [--iters I]\n"
          "                      [--warmup W] [--sms S] [--seed X] [--json]\n"
          "  defaults: 8 virtual ranks on GPU 0, 4096 tokens/rank, hidden 7168, top-8 of 256 experts,\n"
          "  FP8 dispatch (x already FP8; 'cast' = BF16 x cast to FP8 in the kernel), BF16 combine,\n"
          "  20 timed runs after 5 warm-ups.\n"
          "  --nodes M: the ranks form M virtual nodes talking through the network transport (socket on\n"
          "  loopback unless NCCL_MOE_NET_BACKEND); adds network-side GB/s and the transport's own GB/s.\n"
          "  --gpus N: one process per GPU (GPUs 0..N-1) over a real NCCL communicator instead of virtual\n"
          "  ranks; GB/s are per GPU (normal mode only).\n"
          "  --procs N: one process per rank (rank r on GPU r %% G), bootstrapped with ncclMoeCommInitOob;\n"
          "  on one GPU the same shapes with N virtual ranks first, then RESULT ... procs=N ... procs_ratio\n"
          "  (processes' / virtual ranks' bandwidth). Under a private MPS daemon when nvidia-cuda-mps-control\n"
          "  exists (--mps off: never; without MPS the processes only take turns on the GPU).\n"
          "  --mode ll: low-latency dispatch/combine, 128 tokens/rank, BF16 x cast to FP8 in the kernel\n"
          "  (fp8 and cast alike; bf16 sends BF16) with --scales (default float), median of 200 graph\n"
          "  replays after 20. With --nodes M the ranks of other nodes are reached through the\n"
          "  low-latency proxy and the network transport.\n"
          "  --sweep: one run per token count (normal: 128..8192, ll: 1..256, doubling), progress on stderr.\n"
          "  --json: one JSON object per result on stdout (every figure of the report, which goes to stderr);\n"
          "  scripts/plot_perf.py draws a sweep's.\n"
          "  Exit status: 0 ok, 1 failure, 2 bad arguments, 77 no (or too few) GPUs.\n");
}

static int cmp_float(const void* a, const void* b) {
  float x = *(const float*)a, y = *(const float*)b;
  return x < y ? -1 : x > y;
}

static float median(float* v, int n) {
  qsort(v, n, sizeof(float), cmp_float);
  return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

typedef struct {
  ncclMoeComm_t comm;
  ncclMoeHandle_t handle;
  cudaStream_t stream;
  cudaEvent_t start, end;
  void *x, *xs, *idx, *w, *perRank, *perExpert, *out;
  void* xq; /* x as FP8 (an FP8 dispatch of FP8 input), else NULL */
  void* combineBuf;
  ncclMoeDispatchArgs_t args;
  int* recvCount; /* device, from the last dispatch */
} rank_t;

typedef enum { OP_LAYOUT, OP_DISPATCH, OP_DISPATCH_CACHED, OP_COMBINE } op_t;

static void run_op(rank_t* r, const opts_t* o, op_t op) {
  ncclMoeDispatchResult_t res;
  ncclMoeCombineArgs_t c = {.x = r->combineBuf, .hidden = o->hidden, .out = r->out};
  switch (op) {
    case OP_LAYOUT:
      NK(ncclMoeGetDispatchLayout(r->comm, r->args.topkIdx, o->tokens, o->topk, r->perRank, r->perExpert, NULL, r->stream));
      break;
    case OP_DISPATCH:
      r->args.reuseHandle = 0;
      NK(ncclMoeDispatch(r->comm, &r->args, r->handle, &res, r->stream));
      r->recvCount = res.recvCount;
      break;
    case OP_DISPATCH_CACHED:
      r->args.reuseHandle = 1;
      NK(ncclMoeDispatch(r->comm, &r->args, r->handle, &res, r->stream));
      break;
    case OP_COMBINE:
      NK(ncclMoeCombine(r->comm, &c, r->handle, r->stream));
      break;
  }
}

/* Median over iterations of (last rank's end - first rank's start), in ms.
 * All ranks' work is enqueued from this thread without host waits (capacity
 * mode), so the ranks run side by side on the GPU. */
static float time_op(rank_t* rk, const opts_t* o, op_t op) {
  float* span = malloc(sizeof(float) * o->iters);
  cudaEvent_t ref;
  CK(cudaEventCreate(&ref));
  for (int i = 0; i < o->warmup + o->iters; i++) {
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(ref, rk[0].stream));
    for (int r = 0; r < o->ranks; r++) CK(cudaStreamWaitEvent(rk[r].stream, ref, 0));
    for (int r = 0; r < o->ranks; r++) {
      CK(cudaEventRecord(rk[r].start, rk[r].stream));
      run_op(&rk[r], o, op);
      CK(cudaEventRecord(rk[r].end, rk[r].stream));
    }
    CK(cudaDeviceSynchronize());
    if (i < o->warmup) continue;
    float first = 1e30f, last = 0;
    for (int r = 0; r < o->ranks; r++) {
      float s, e;
      CK(cudaEventElapsedTime(&s, ref, rk[r].start));
      CK(cudaEventElapsedTime(&e, ref, rk[r].end));
      if (s < first) first = s;
      if (e > last) last = e;
    }
    span[i - o->warmup] = last - first;
  }
  float m = median(span, o->iters);
  free(span);
  cudaEventDestroy(ref);
  return m;
}

static float copy_gbps(const opts_t* o) {
  void *a, *b;
  CK(cudaMalloc(&a, COPY_BYTES));
  CK(cudaMalloc(&b, COPY_BYTES));
  CK(cudaMemset(a, 1, COPY_BYTES));
  cudaEvent_t s, e;
  cudaEventCreate(&s);
  cudaEventCreate(&e);
  float* t = malloc(sizeof(float) * o->iters);
  for (int i = 0; i < o->warmup + o->iters; i++) {
    CK(cudaEventRecord(s, 0));
    CK(cudaMemcpyAsync(b, a, COPY_BYTES, cudaMemcpyDeviceToDevice, 0));
    CK(cudaEventRecord(e, 0));
    CK(cudaEventSynchronize(e));
    if (i >= o->warmup) CK(cudaEventElapsedTime(&t[i - o->warmup], s, e));
  }
  float ms = median(t, o->iters);
  free(t);
  cudaFree(a);
  cudaFree(b);
  return (float)(COPY_BYTES / (ms * 1e-3) / 1e9);
}

/* One rank's tokens (BF16 uniform in [-2, 2]), routing and weights: `topk`
 * distinct experts per token, uniformly, as DeepEP's tests route. */
static void draw_inputs(const opts_t* o, uint16_t* hx, int64_t* hidx, float* hw) {
  const size_t T = o->tokens, H = o->hidden, K = o->topk;
  for (size_t i = 0; i < T * H; i++) hx[i] = moe_float_to_bf16((float)rand() / RAND_MAX * 4.0f - 2.0f);
  for (size_t t = 0; t < T; t++)
    for (size_t k = 0; k < K; k++) {
      int64_t e;
      int dup;
      do {
        e = rand() % o->experts;
        dup = 0;
        for (size_t j = 0; j < k; j++) dup |= hidx[t * K + j] == e;
      } while (dup);
      hidx[t * K + k] = e;
      hw[t * K + k] = (float)rand() / RAND_MAX;
    }
}

/* ------------------------------------------------------------ --mode ll */
/* Low-latency mode. The timed figure: one graph holds a whole dispatch
 * (send and receive half) of every rank, as parallel branches, and another
 * the whole combine; time = from before the graph's launch to its end, median
 * over the replays. Dispatch and combine replays alternate, as in decoding
 * (each combine before the next dispatch on the buffer set, as the API asks).
 * Also printed: each rank's own graph on its own stream, held behind a gate
 * (one kernel spinning on a host flag, an event the rank streams wait on) and
 * then released: time = last rank's end - first rank's start. On one GPU that
 * includes the front end's skew in starting eight streams (printed), which
 * separate GPUs do not have.
 * Bandwidth as ANCHORS.md counts low-latency mode, per valid (token, expert)
 * pair summed over the ranks on the GPU: FP8 dispatch hidden + hidden/128 x 4
 * + 16 bytes (BF16 dispatch, by the same rule: hidden x 2 + 16), BF16 combine
 * hidden x 2. Ratios are over the copy bandwidth of the same run. */
#define LL_DEFAULT_TOKENS 128
#define LL_DEFAULT_ITERS 200
#define LL_DEFAULT_WARMUP 20
#define LL_GATE_TIMEOUT_NS 10000000000LL
#define LL_HEADER_BYTES 16 /* per pair, in DeepEP's accounting */
#define LL_EXPERT_OUT_BYTE 0x3c /* expert outputs: every BF16 value 0x3c3c */
#define LL_FLOOR_BLOCKS 16 /* blocks of the empty kernels (their number barely matters) */
#define LL_FLOOR_THREADS 512 /* threads of each, as many as a low-latency kernel block */

/* LL_FLOOR: an empty kernel per rank instead of a call, for the launch floor. */
enum { LL_DISPATCH = 0, LL_COMBINE = 1, LL_FLOOR = 2 };

typedef struct {
  ncclMoeComm_t comm;
  ncclMoeHandle_t handle;
  cudaStream_t stream;
  cudaEvent_t start, end;
  void *x, *idx, *w, *y, *out;
  ncclMoeLowLatencyDispatchArgs_t args;
  ncclMoeLowLatencyDispatchResult_t res;
  cudaGraphExec_t graph[2]; /* LL_DISPATCH, LL_COMBINE */
} ll_rank_t;

typedef struct {
  cudaStream_t stream;
  cudaEvent_t open;
  int* hostFlag; /* host-mapped */
  int* devFlag;
} ll_gate_t;

static void ll_call(ll_rank_t* r, int op) {
  if (op == LL_DISPATCH) {
    NK(ncclMoeLowLatencyDispatch(r->comm, &r->args, r->handle, &r->res, r->stream));
  } else {
    ncclMoeLowLatencyCombineArgs_t c = {.x = r->y, .topkWeights = r->w, .out = r->out};
    NK(ncclMoeLowLatencyCombine(r->comm, &c, r->handle, r->stream));
  }
}

/* (token, expert) pairs of one rank's routing: distinct valid experts per token. */
static long long ll_pairs(const int64_t* idx, int T, int K) {
  long long n = 0;
  for (int t = 0; t < T; t++)
    for (int k = 0; k < K; k++) {
      int first = idx[(size_t)t * K + k] >= 0;
      for (int j = 0; j < k && first; j++) first = idx[(size_t)t * K + j] != idx[(size_t)t * K + k];
      n += first;
    }
  return n;
}

static void ll_setup_rank(ll_rank_t* p, ncclMoeComm_t comm, const opts_t* o, uint16_t* hx, int64_t* hidx,
                          float* hw, long long* pairs) {
  const size_t T = o->tokens, H = o->hidden, K = o->topk;
  const size_t yBytes = (size_t)o->experts * T * H * 2; /* [L, nRanks * T, H] */
  p->comm = comm;
  NK(ncclMoeHandleCreate(comm, &p->handle));
  CK(cudaStreamCreateWithFlags(&p->stream, cudaStreamNonBlocking));
  CK(cudaEventCreate(&p->start));
  CK(cudaEventCreate(&p->end));
  draw_inputs(o, hx, hidx, hw);
  *pairs += ll_pairs(hidx, o->tokens, o->topk);
  CK(cudaMalloc(&p->x, T * H * 2));
  CK(cudaMalloc(&p->idx, T * K * 8));
  CK(cudaMalloc(&p->w, T * K * 4));
  CK(cudaMalloc(&p->out, T * H * 2));
  CK(cudaMalloc(&p->y, yBytes));
  CK(cudaMemcpy(p->x, hx, T * H * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->idx, hidx, T * K * 8, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->w, hw, T * K * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(p->y, LL_EXPERT_OUT_BYTE, yBytes));
  p->args = (ncclMoeLowLatencyDispatchArgs_t){.x = p->x, .numTokens = o->tokens, .hidden = o->hidden,
                                              .topk = o->topk, .topkIdx = p->idx,
                                              .sendType = o->fp8 ? ncclFloat8e4m3 : ncclBfloat16,
                                              .scaleFormat = o->scaleFormat};
}

static void ll_capture(ll_rank_t* rk, int ranks, int op) {
  for (int r = 0; r < ranks; r++) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(rk[r].stream, cudaStreamCaptureModeThreadLocal));
    ll_call(&rk[r], op);
    CK(cudaStreamEndCapture(rk[r].stream, &g));
    CK(cudaGraphInstantiate(&rk[r].graph[op], g, 0));
    CK(cudaGraphDestroy(g));
  }
}

/* One graph holding `op` of every rank as parallel branches, forked from
 * and joined to `stream`: the ranks start together, as separate GPUs would,
 * without the front end's skew between eight streams' launches. With
 * LL_FLOOR, the same shape with an empty kernel per rank: what launching the
 * all-rank graph costs on this GPU (separate GPUs would launch one branch
 * each), printed beside the figures. */
static cudaGraphExec_t ll_capture_all(ll_rank_t* rk, int ranks, int op, cudaStream_t stream, cudaEvent_t fork) {
  cudaGraph_t g;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  CK(cudaEventRecord(fork, stream));
  for (int r = 0; r < ranks; r++) {
    CK(cudaStreamWaitEvent(rk[r].stream, fork, 0));
    if (op == LL_FLOOR) CK(moe_test_noop_launch(LL_FLOOR_BLOCKS, LL_FLOOR_THREADS, rk[r].stream));
    else ll_call(&rk[r], op);
    CK(cudaEventRecord(rk[r].end, rk[r].stream));
    CK(cudaStreamWaitEvent(stream, rk[r].end, 0));
  }
  CK(cudaStreamEndCapture(stream, &g));
  CK(cudaGraphInstantiate(&exec, g, 0));
  CK(cudaGraphDestroy(g));
  return exec;
}

/* Median (ms) of replays of the all-rank graphs, dispatch and combine
 * alternately: from before the launch to the end, on one stream. */
static void ll_time_all(cudaGraphExec_t* exec, const opts_t* o, cudaStream_t stream, float* spanMs) {
  float* t[2] = {malloc(sizeof(float) * o->iters), malloc(sizeof(float) * o->iters)};
  cudaEvent_t ev[2];
  CK(cudaEventCreate(&ev[0]));
  CK(cudaEventCreate(&ev[1]));
  for (int i = 0; i < o->warmup + o->iters; i++)
    for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) {
      CK(cudaEventRecord(ev[0], stream));
      CK(cudaGraphLaunch(exec[op], stream));
      CK(cudaEventRecord(ev[1], stream));
      CK(cudaStreamSynchronize(stream));
      float ms;
      CK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      if (i >= o->warmup) t[op][i - o->warmup] = ms;
    }
  for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) spanMs[op] = median(t[op], o->iters);
  CK(cudaEventDestroy(ev[0]));
  CK(cudaEventDestroy(ev[1]));
  free(t[0]);
  free(t[1]);
}

/* One gated replay of `op` on every rank: the span in ms; *skewMs = how
 * much later than the first rank the last rank started. */
static float ll_replay(ll_rank_t* rk, int ranks, ll_gate_t* gate, int op, float* skewMs) {
  __atomic_store_n(gate->hostFlag, 0, __ATOMIC_RELEASE);
  CK(moe_test_gate_launch(gate->devFlag, 1, LL_GATE_TIMEOUT_NS, gate->stream));
  CK(cudaEventRecord(gate->open, gate->stream));
  for (int r = 0; r < ranks; r++) {
    CK(cudaStreamWaitEvent(rk[r].stream, gate->open, 0));
    CK(cudaEventRecord(rk[r].start, rk[r].stream));
    CK(cudaGraphLaunch(rk[r].graph[op], rk[r].stream));
    CK(cudaEventRecord(rk[r].end, rk[r].stream));
  }
  __atomic_store_n(gate->hostFlag, 1, __ATOMIC_RELEASE);
  CK(cudaDeviceSynchronize());
  float first = 1e30f, lastStart = 0.0f, last = 0.0f;
  for (int r = 0; r < ranks; r++) {
    float s, e;
    CK(cudaEventElapsedTime(&s, gate->open, rk[r].start));
    CK(cudaEventElapsedTime(&e, gate->open, rk[r].end));
    if (s < first) first = s;
    if (s > lastStart) lastStart = s;
    if (e > last) last = e;
  }
  *skewMs = lastStart - first;
  return last - first;
}

/* Medians (ms) of the span and of the start skew of dispatch and combine
 * ([LL_DISPATCH], [LL_COMBINE]), replayed alternately. */
static void ll_time(ll_rank_t* rk, const opts_t* o, ll_gate_t* gate, float* spanMs, float* skewMs) {
  float* t[4];
  for (int i = 0; i < 4; i++) t[i] = malloc(sizeof(float) * o->iters);
  for (int i = 0; i < o->warmup + o->iters; i++)
    for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) {
      float skew;
      const float ms = ll_replay(rk, o->ranks, gate, op, &skew);
      if (i >= o->warmup) t[op][i - o->warmup] = ms, t[2 + op][i - o->warmup] = skew;
    }
  for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) {
    spanMs[op] = median(t[op], o->iters);
    skewMs[op] = median(t[2 + op], o->iters);
  }
  for (int i = 0; i < 4; i++) free(t[i]);
}

#ifdef MOE_LL_TRACE
cudaError_t moe_ll_trace_take(unsigned long long* out, int n);
/* Diagnostic build: one replay of each all-rank graph, then the latest time
 * any block of each rank reached each phase point, relative to the earliest
 * start of any rank. */
static void ll_trace(cudaGraphExec_t* exec, const opts_t* o, cudaStream_t stream) {
  unsigned long long t[MAXR][16];
  for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) {
    CK(moe_ll_trace_take(&t[0][0], o->ranks));
    CK(cudaGraphLaunch(exec[op], stream));
    CK(cudaStreamSynchronize(stream));
    CK(moe_ll_trace_take(&t[0][0], o->ranks));
    const int first = op == LL_DISPATCH ? 0 : 8, last = op == LL_DISPATCH ? 6 : 10;
    unsigned long long t0 = ~0ull;
    for (int r = 0; r < o->ranks; r++) if (t[r][first] && t[r][first] < t0) t0 = t[r][first];
    for (int r = 0; r < o->ranks; r++) {
      fprintf(o->text, "trace %s rank %d:", op == LL_DISPATCH ? "dispatch" : "combine", r);
      for (int i = first; i <= last; i++) fprintf(o->text, " %6.2f", t[r][i] ? (t[r][i] - t0) * 1e-3 : -1.0);
      fprintf(o->text, "\n");
    }
  }
}
#endif

/* Rows received over all ranks (after a dispatch). */
static long long ll_received(ll_rank_t* rk, int ranks) {
  long long n = 0;
  for (int r = 0; r < ranks; r++) {
    int counts[NCCL_MOE_MAX_EXPERTS];
    const int L = rk[r].res.numLocalExperts;
    CK(cudaMemcpy(counts, rk[r].res.recvCountPerExpert, sizeof(int) * L, cudaMemcpyDeviceToHost));
    for (int l = 0; l < L; l++) n += counts[l];
  }
  return n;
}

static void ll_check_async(ll_rank_t* rk, int ranks) {
  for (int r = 0; r < ranks; r++) {
    ncclResult_t async;
    NK(ncclMoeCommGetAsyncError(rk[r].comm, &async));
    if (async != ncclSuccess) {
      fprintf(stderr, "rank %d: async error: %s\n", r, ncclMoeGetLastError());
      exit(1);
    }
  }
}

/* The fields every --json object starts with: what ran, where, on what. */
static void json_head(moe_json_t* j, const opts_t* o, const char* mode, const char* device, int sms, int gpus,
                      int ranks) {
  moe_json_begin(j, stdout);
  moe_json_str(j, "tool", "nccl-moe-bench");
  moe_json_str(j, "version", NCCL_MOE_VERSION_STRING);
  moe_json_str(j, "mode", mode);
  moe_json_str(j, "device", device);
  moe_json_int(j, "sms", sms);
  moe_json_int(j, "sm_budget", o->sms); /* --sms: 0 = automatic */
  moe_json_int(j, "gpus", gpus);
  moe_json_int(j, "ranks", ranks);
  moe_json_int(j, "nodes", o->nodes);
  moe_json_int(j, "tokens", o->tokens);
  moe_json_int(j, "hidden", o->hidden);
  moe_json_int(j, "topk", o->topk);
  moe_json_int(j, "experts", o->experts);
  moe_json_int(j, "iters", o->iters);
  moe_json_int(j, "warmup", o->warmup);
  moe_json_uint(j, "seed", o->seed);
}

static void ll_teardown_rank(ll_rank_t* p) {
  cudaGraphExecDestroy(p->graph[LL_DISPATCH]);
  cudaGraphExecDestroy(p->graph[LL_COMBINE]);
  ncclMoeHandleDestroy(p->handle);
  cudaFree(p->x), cudaFree(p->idx), cudaFree(p->w), cudaFree(p->out), cudaFree(p->y);
  cudaEventDestroy(p->start), cudaEventDestroy(p->end);
  cudaStreamDestroy(p->stream);
}

static int ll_main(const opts_t* o) {
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 1; /* normal mode unused: keep its buffers small */
  cfg.hidden = o->hidden, cfg.numExperts = o->experts, cfg.maxTopk = o->topk, cfg.numSMs = o->sms;
  cfg.llMaxTokensPerRank = o->tokens;
  ncclMoeComm_t comms[MAXR];
  CK(moe_test_kernels_preload()); /* the gate and the launch-floor kernel, before ranks wait on each other */
  NK(ncclMoeCommInitVirtualNodes(o->ranks, o->ranks / o->nodes, 0, &cfg, comms));
  size_t llBytes = 0;
  NK(ncclMoeLowLatencyBufferBytes(comms[0], &llBytes));

  srand((unsigned)o->seed);
  static ll_rank_t rk[MAXR];
  memset(rk, 0, sizeof(rk));
  const size_t T = o->tokens, H = o->hidden, K = o->topk;
  uint16_t* hx = malloc(T * H * 2);
  int64_t* hidx = malloc(T * K * 8);
  float* hw = malloc(T * K * 4);
  long long pairs = 0;
  for (int r = 0; r < o->ranks; r++) ll_setup_rank(&rk[r], comms[r], o, hx, hidx, hw, &pairs);
  free(hx), free(hidx), free(hw);
  ll_gate_t gate;
  CK(cudaStreamCreateWithFlags(&gate.stream, cudaStreamNonBlocking));
  CK(cudaEventCreate(&gate.open));
  CK(cudaHostAlloc((void**)&gate.hostFlag, sizeof(int), cudaHostAllocMapped));
  CK(cudaHostGetDevicePointer((void**)&gate.devFlag, gate.hostFlag, 0));
  CK(cudaDeviceSynchronize());
  const float copy = copy_gbps(o);

  /* One eager step checks the routing end to end, then the graphs. */
  for (int op = LL_DISPATCH; op <= LL_COMBINE; op++)
    for (int r = 0; r < o->ranks; r++) ll_call(&rk[r], op);
  CK(cudaDeviceSynchronize());
  ll_check_async(rk, o->ranks);
  const long long received = ll_received(rk, o->ranks);
  if (received != pairs) {
    fprintf(stderr, "nccl-moe-bench: %lld rows received, %lld (token, expert) pairs sent\n", received, pairs);
    return 1;
  }
  ll_capture(rk, o->ranks, LL_DISPATCH);
  ll_capture(rk, o->ranks, LL_COMBINE);
  float span[2], skew[2];
  ll_time(rk, o, &gate, span, skew);
  cudaGraphExec_t all[2];
  for (int op = LL_DISPATCH; op <= LL_COMBINE; op++) all[op] = ll_capture_all(rk, o->ranks, op, gate.stream, gate.open);
  float allSpan[2], floorSpan[2];
  ll_time_all(all, o, gate.stream, allSpan);
  cudaGraphExec_t floorGraph[2];
  floorGraph[0] = floorGraph[1] = ll_capture_all(rk, o->ranks, LL_FLOOR, gate.stream, gate.open);
  ll_time_all(floorGraph, o, gate.stream, floorSpan);
  cudaGraphExecDestroy(floorGraph[0]);
  const float tDispatch = allSpan[LL_DISPATCH], tCombine = allSpan[LL_COMBINE];
#ifdef MOE_LL_TRACE
  ll_trace(all, o, gate.stream);
#endif
  ll_check_async(rk, o->ranks);
  if (ll_received(rk, o->ranks) != pairs) {
    fprintf(stderr, "nccl-moe-bench: the replays received a different number of rows\n");
    return 1;
  }

  const double dispBytes = (double)pairs * (o->fp8 ? (double)H + H / 128 * 4 + LL_HEADER_BYTES : (double)H * 2 + LL_HEADER_BYTES);
  const double combBytes = (double)pairs * H * 2;
  const double dGBps = dispBytes / (tDispatch * 1e-3) / 1e9, cGBps = combBytes / (tCombine * 1e-3) / 1e9;
  const double dRatio = dGBps / copy, cRatio = cGBps / copy;
  const char* scales = o->scaleFormat == ncclMoeScaleUE8M0 ? "UE8M0" : o->scaleFormat == ncclMoeScalePow2 ? "pow2" : "float";
  fprintf(o->text,
          "nccl-moe-bench --mode ll: %s, %d SMs; %d virtual ranks in %d node(s), %d tokens/rank, hidden %d, top-%d of "
          "%d experts, %s%s%s dispatch, BF16 combine; %zu MiB low-latency buffers/rank\n",
          prop.name, prop.multiProcessorCount, o->ranks, o->nodes, o->tokens, o->hidden, o->topk, o->experts,
          o->fp8 ? "FP8 (BF16 cast in the kernel, " : "BF16", o->fp8 ? scales : "", o->fp8 ? " scales)" : "",
          llBytes >> 20);
  fprintf(o->text, "valid (token, expert) pairs (all ranks): %lld (%.2f per token)\n", pairs,
          pairs / ((double)o->ranks * T));
  fprintf(o->text, "%-34s %10s %12s %8s\n", "phase (median of graph replays)", "us", "GB/s", "ratio");
  fprintf(o->text, "%-34s %10.1f %12.1f %8.3f\n", "ll dispatch (send + receive)", tDispatch * 1e3, dGBps, dRatio);
  fprintf(o->text, "%-34s %10.1f %12.1f %8.3f\n", "ll combine (send + receive)", tCombine * 1e3, cGBps, cRatio);
  fprintf(o->text, "the same as one graph per rank on its own stream, behind a gate (first start to last end):\n");
  fprintf(o->text, "%-34s %10.1f   (start skew of the ranks %.1f)\n", "ll dispatch", span[LL_DISPATCH] * 1e3,
          skew[LL_DISPATCH] * 1e3);
  fprintf(o->text, "%-34s %10.1f   (start skew of the ranks %.1f)\n", "ll combine", span[LL_COMBINE] * 1e3,
          skew[LL_COMBINE] * 1e3);
  fprintf(o->text, "%-34s %10.1f   (the same graph with an empty kernel per rank)\n", "launch floor",
          floorSpan[0] * 1e3);
  fprintf(o->text, "%-34s %10s %12.1f\n", "device copy (bytes once)", "", copy);
  fprintf(o->text, "RESULT mode=ll gpus=1 ranks=%d tokens=%d ll_dispatch_us=%.1f ll_combine_us=%.1f ll_ratio=%.3f "
          "ll_dispatch_GBps=%.1f ll_combine_GBps=%.1f copy_GBps=%.1f ll_dispatch_ratio=%.3f ll_combine_ratio=%.3f "
          "nodes=%d\n",
          o->ranks, o->tokens, tDispatch * 1e3, tCombine * 1e3, dRatio < cRatio ? dRatio : cRatio, dGBps, cGBps, copy,
          dRatio, cRatio, o->nodes);
  if (o->json) {
    moe_json_t j;
    json_head(&j, o, "ll", prop.name, prop.multiProcessorCount, 1, o->ranks);
    moe_json_str(&j, "dispatch", o->fp8 ? "fp8" : "bf16");
    moe_json_str(&j, "scales", o->fp8 ? scales : "none");
    moe_json_int(&j, "buffer_MiB", (long long)(llBytes >> 20));
    moe_json_int(&j, "pairs", pairs);
    moe_json_num(&j, "dispatch_us", tDispatch * 1e3);
    moe_json_num(&j, "dispatch_GBps", dGBps);
    moe_json_num(&j, "dispatch_ratio", dRatio);
    moe_json_num(&j, "combine_us", tCombine * 1e3);
    moe_json_num(&j, "combine_GBps", cGBps);
    moe_json_num(&j, "combine_ratio", cRatio);
    moe_json_num(&j, "gated_dispatch_us", span[LL_DISPATCH] * 1e3);
    moe_json_num(&j, "gated_dispatch_skew_us", skew[LL_DISPATCH] * 1e3);
    moe_json_num(&j, "gated_combine_us", span[LL_COMBINE] * 1e3);
    moe_json_num(&j, "gated_combine_skew_us", skew[LL_COMBINE] * 1e3);
    moe_json_num(&j, "launch_floor_us", floorSpan[0] * 1e3);
    moe_json_num(&j, "copy_GBps", copy);
    moe_json_end(&j);
  }
  cudaGraphExecDestroy(all[LL_DISPATCH]);
  cudaGraphExecDestroy(all[LL_COMBINE]);
  for (int r = 0; r < o->ranks; r++) ll_teardown_rank(&rk[r]);
  for (int r = 0; r < o->ranks; r++) ncclMoeCommDestroy(rk[r].comm);
  cudaFreeHost(gate.hostFlag);
  cudaEventDestroy(gate.open);
  cudaStreamDestroy(gate.stream);
  return 0;
}

/* ------------------------------------------------------- normal mode */
/* Draws one rank's tokens and routing (DeepEP's tests: `topk` distinct
 * experts per token, uniformly), allocates its inputs, and counts the
 * (token, other node) pairs that will cross the network. */
static void setup_rank(rank_t* p, ncclMoeComm_t comm, const opts_t* o, int rank, int nRanks, int perNode,
                       double* netTokens) {
  const size_t T = o->tokens, H = o->hidden, K = o->topk;
  const int L = o->experts / nRanks;
  uint16_t* hx = malloc(T * H * 2);
  int64_t* hidx = malloc(T * K * 8);
  float* hw = malloc(T * K * 4);
  p->comm = comm;
  NK(ncclMoeHandleCreate(p->comm, &p->handle));
  CK(cudaStreamCreateWithFlags(&p->stream, cudaStreamNonBlocking));
  CK(cudaEventCreate(&p->start));
  CK(cudaEventCreate(&p->end));
  draw_inputs(o, hx, hidx, hw);
  for (size_t t = 0; t < T; t++) {
    unsigned long long nodes = 0;
    for (size_t k = 0; k < K; k++) nodes |= 1ull << (hidx[t * K + k] / L / perNode);
    nodes &= ~(1ull << (rank / perNode));
    *netTokens += __builtin_popcountll(nodes);
  }
  CK(cudaMalloc(&p->x, T * H * 2));
  CK(cudaMalloc(&p->xs, T * (H / 128) * 4 + 16));
  CK(cudaMalloc(&p->idx, T * K * 8));
  CK(cudaMalloc(&p->w, T * K * 4));
  CK(cudaMalloc(&p->out, T * H * 2));
  CK(cudaMalloc(&p->perRank, sizeof(int) * nRanks));
  CK(cudaMalloc(&p->perExpert, sizeof(int) * o->experts));
  CK(cudaMemcpy(p->x, hx, T * H * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->idx, hidx, T * K * 8, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->w, hw, T * K * 4, cudaMemcpyHostToDevice));
  void* xin = p->x;
  if (o->fp8 && !o->cast) {
    /* FP8 input, as DeepEP's benchmark dispatches it. */
    CK(cudaMalloc(&p->xq, T * H));
    CK(moe_fp8_quantize_launch(p->x, o->tokens, o->hidden, 0, p->xq, p->xs, 0));
    xin = p->xq;
  }
  NK(ncclMoeGetCombineBuffer(p->comm, &p->combineBuf, NULL));
  p->args = (ncclMoeDispatchArgs_t){.x = xin, .xType = (o->fp8 && !o->cast) ? ncclFloat8e4m3 : ncclBfloat16,
                                    .xScales = (o->fp8 && !o->cast) ? p->xs : NULL,
                                    .sendType = o->fp8 ? ncclFloat8e4m3 : ncclBfloat16,
                                    .numTokens = o->tokens, .hidden = o->hidden, .topk = o->topk,
                                    .topkIdx = p->idx, .topkWeights = p->w,
                                    .capacity = nRanks * o->tokens, .expertAlignment = 1};
  free(hx), free(hidx), free(hw);
}

static void teardown_rank(rank_t* p) {
  ncclMoeHandleDestroy(p->handle);
  cudaFree(p->x), cudaFree(p->xs), cudaFree(p->xq), cudaFree(p->idx), cudaFree(p->w), cudaFree(p->out);
  cudaFree(p->perRank), cudaFree(p->perExpert);
  cudaEventDestroy(p->start), cudaEventDestroy(p->end);
  cudaStreamDestroy(p->stream);
}

/* Per-phase medians (ms) and received rows, whatever runs the ranks. */
typedef struct {
  float layout, dispatch, cached, combine, copy;
  double recvTotal, netTokens;
  size_t bufBytes;
  int gpus, ranks;
} results_t;

/* Where virtual_main also leaves its figures (the --procs comparison), or NULL. */
static results_t* g_results_out;

static void report(const opts_t* o, const results_t* m, const char* device, int sms) {
  const double H = o->hidden;
  const double tokBytes = o->fp8 ? H + H / 128 * 4 : H * 2;
  /* Bandwidth per GPU: a GPU's ranks' received bytes over the span. */
  const double dispBytes = m->recvTotal * tokBytes / m->gpus, combBytes = m->recvTotal * H * 2 / m->gpus;
  const double dGBps = dispBytes / (m->dispatch * 1e-3) / 1e9, cGBps = combBytes / (m->combine * 1e-3) / 1e9;
  const double dcGBps = dispBytes / (m->cached * 1e-3) / 1e9;
  fprintf(o->text,
          "nccl-moe-bench: %s, %d SMs; %d %s ranks on %d GPU(s), %d tokens/rank, hidden %d, top-%d of %d experts, "
          "%s dispatch, BF16 combine; %zu MiB buffers/rank\n",
          device, sms, m->ranks, m->gpus > 1 ? "process" : "virtual", m->gpus, o->tokens, o->hidden, o->topk,
          o->experts, o->cast ? "BF16->FP8 cast" : (o->fp8 ? "FP8" : "BF16"), m->bufBytes >> 20);
  fprintf(o->text, "received tokens (all ranks): %.0f (%.2f per token)\n", m->recvTotal,
          m->recvTotal / (m->ranks * (double)o->tokens));
  fprintf(o->text, "%-28s %10s %12s %8s\n", "phase (median)", "us", "GB/s/GPU", "ratio");
  fprintf(o->text, "%-28s %10.1f\n", "layout", m->layout * 1e3);
  fprintf(o->text, "%-28s %10.1f\n", "notify (full - cached - layout)", (m->dispatch - m->cached - m->layout) * 1e3);
  fprintf(o->text, "%-28s %10.1f %12.1f %8.3f\n", "dispatch (layout+notify+move)", m->dispatch * 1e3, dGBps,
          dGBps / m->copy);
  fprintf(o->text, "%-28s %10.1f %12.1f %8.3f\n", "dispatch, cached handle", m->cached * 1e3, dcGBps, dcGBps / m->copy);
  fprintf(o->text, "%-28s %10.1f %12.1f %8.3f\n", "combine", m->combine * 1e3, cGBps, cGBps / m->copy);
  fprintf(o->text, "%-28s %10s %12.1f\n", "device copy (bytes once)", "", m->copy);
  moe_json_t j;
  if (o->json) {
    json_head(&j, o, "normal", device, sms, m->gpus, m->ranks);
    moe_json_str(&j, "dispatch", o->cast ? "cast" : (o->fp8 ? "fp8" : "bf16"));
    moe_json_int(&j, "buffer_MiB", (long long)(m->bufBytes >> 20));
    moe_json_num(&j, "received_tokens", m->recvTotal);
    moe_json_num(&j, "layout_us", m->layout * 1e3);
    moe_json_num(&j, "notify_us", (m->dispatch - m->cached - m->layout) * 1e3);
    moe_json_num(&j, "dispatch_us", m->dispatch * 1e3);
    moe_json_num(&j, "dispatch_GBps", dGBps);
    moe_json_num(&j, "dispatch_ratio", dGBps / m->copy);
    moe_json_num(&j, "cached_dispatch_us", m->cached * 1e3);
    moe_json_num(&j, "cached_dispatch_GBps", dcGBps);
    moe_json_num(&j, "cached_dispatch_ratio", dcGBps / m->copy);
    moe_json_num(&j, "combine_us", m->combine * 1e3);
    moe_json_num(&j, "combine_GBps", cGBps);
    moe_json_num(&j, "combine_ratio", cGBps / m->copy);
    moe_json_num(&j, "copy_GBps", m->copy);
  }
  if (o->nodes > 1) {
    /* Network side, as DeepEP counts RDMA traffic: (token, destination node
     * other than its own) pairs x bytes per token, over the phase's time;
     * beside the transport moving the same slabs (one per sending rank and
     * peer node, one in flight each) on its own. */
    const int pairs = m->ranks * (o->nodes - 1);
    const double slab = m->netTokens / pairs * tokBytes;
    const double nd = m->netTokens * tokBytes / (m->dispatch * 1e-3) / 1e9;
    const double nc = m->netTokens * H * 2 / (m->combine * 1e-3) / 1e9;
    const double transport = bench_transport_gbps(pairs > 64 ? 64 : pairs, slab > 16 ? (size_t)slab : 16, 2.0);
    const double net = nd < nc ? nd : nc;
    fprintf(o->text, "network side (%d virtual nodes of %d ranks): %.0f (token, node) pairs, %.1f MiB slabs\n",
            o->nodes, m->ranks / o->nodes, m->netTokens, slab / (1 << 20));
    fprintf(o->text, "%-28s %10s %12.2f\n", "dispatch, network side", "", nd);
    fprintf(o->text, "%-28s %10s %12.2f\n", "combine, network side", "", nc);
    fprintf(o->text, "%-28s %10s %12.2f\n", "transport alone (same slabs)", "", transport);
    fprintf(o->text, "RESULT mode=normal gpus=%d ranks=%d nodes=%d net_GBps=%.2f transport_GBps=%.2f net_ratio=%.3f "
            "net_dispatch_GBps=%.2f net_combine_GBps=%.2f dispatch_GBps=%.1f combine_GBps=%.1f copy_GBps=%.1f\n",
            m->gpus, m->ranks, o->nodes, net, transport, net / transport, nd, nc, dGBps, cGBps, m->copy);
    if (o->json) {
      moe_json_num(&j, "net_pairs", m->netTokens);
      moe_json_num(&j, "net_slab_MiB", slab / (1 << 20));
      moe_json_num(&j, "net_dispatch_GBps", nd);
      moe_json_num(&j, "net_combine_GBps", nc);
      moe_json_num(&j, "net_GBps", net);
      moe_json_num(&j, "transport_GBps", transport);
      moe_json_num(&j, "net_ratio", net / transport);
    }
  } else {
    fprintf(o->text, "RESULT mode=normal gpus=%d ranks=%d dispatch_GBps=%.1f combine_GBps=%.1f copy_GBps=%.1f "
            "dispatch_ratio=%.3f combine_ratio=%.3f\n",
            m->gpus, m->ranks, dGBps, cGBps, m->copy, dGBps / m->copy, cGBps / m->copy);
  }
  if (o->json) moe_json_end(&j);
}

/* N virtual ranks (optionally in virtual nodes) on GPU 0. */
static int virtual_main(const opts_t* o) {
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = o->tokens, cfg.hidden = o->hidden, cfg.numExperts = o->experts, cfg.maxTopk = o->topk;
  cfg.numSMs = o->sms;
  ncclMoeComm_t comms[MAXR];
  NK(ncclMoeCommInitVirtualNodes(o->ranks, o->ranks / o->nodes, 0, &cfg, comms));
  results_t m = {.gpus = 1, .ranks = o->ranks};
  NK(ncclMoeCommBufferBytes(comms[0], &m.bufBytes));
  srand((unsigned)o->seed);
  static rank_t rk[MAXR];
  memset(rk, 0, sizeof(rk));
  for (int r = 0; r < o->ranks; r++) setup_rank(&rk[r], comms[r], o, r, o->ranks, o->ranks / o->nodes, &m.netTokens);
  CK(cudaDeviceSynchronize());
  m.copy = copy_gbps(o);
  /* One untimed dispatch fills the handles (the cached runs reuse them). */
  for (int r = 0; r < o->ranks; r++) run_op(&rk[r], o, OP_DISPATCH);
  CK(cudaDeviceSynchronize());
  m.layout = time_op(rk, o, OP_LAYOUT);
  m.dispatch = time_op(rk, o, OP_DISPATCH);
  m.cached = time_op(rk, o, OP_DISPATCH_CACHED);
  m.combine = time_op(rk, o, OP_COMBINE);
  for (int r = 0; r < o->ranks; r++) {
    int n = 0;
    CK(cudaMemcpy(&n, rk[r].recvCount, sizeof(int), cudaMemcpyDeviceToHost));
    m.recvTotal += n;
    ncclResult_t async;
    NK(ncclMoeCommGetAsyncError(rk[r].comm, &async));
    if (async != ncclSuccess) { fprintf(stderr, "rank %d: async error: %s\n", r, ncclMoeGetLastError()); return 1; }
  }
  report(o, &m, prop.name, prop.multiProcessorCount);
  if (g_results_out != NULL) *g_results_out = m;
  for (int r = 0; r < o->ranks; r++) teardown_rank(&rk[r]);
  for (int r = 0; r < o->ranks; r++) ncclMoeCommDestroy(rk[r].comm);
  return 0;
}

/* ---------------------------------------------------------- --gpus N */
/* One process per GPU over a real NCCL communicator. Each timed iteration
 * starts behind an all-reduce on the ranks' streams (a barrier); the span of
 * an iteration is the slowest rank's, its median is reported. */
#define MP_UID_WAIT_S 60

typedef struct {
  volatile int ready;
  ncclUniqueId id;
} mp_shared_t;

static float mp_time_op(rank_t* r, const opts_t* o, op_t op, ncclComm_t nccl, float* dev) {
  float* span = malloc(sizeof(float) * o->iters);
  for (int i = 0; i < o->warmup + o->iters; i++) {
    if (ncclAllReduce(dev, dev, 1, ncclFloat, ncclSum, nccl, r->stream) != ncclSuccess) exit(1);
    CK(cudaEventRecord(r->start, r->stream));
    run_op(r, o, op);
    CK(cudaEventRecord(r->end, r->stream));
    CK(cudaStreamSynchronize(r->stream));
    if (i >= o->warmup) CK(cudaEventElapsedTime(&span[i - o->warmup], r->start, r->end));
  }
  CK(cudaMemcpy(dev + 1, span, sizeof(float) * o->iters, cudaMemcpyHostToDevice));
  if (ncclAllReduce(dev + 1, dev + 1, o->iters, ncclFloat, ncclMax, nccl, r->stream) != ncclSuccess) exit(1);
  CK(cudaMemcpyAsync(span, dev + 1, sizeof(float) * o->iters, cudaMemcpyDeviceToHost, r->stream));
  CK(cudaStreamSynchronize(r->stream));
  const float m = median(span, o->iters);
  free(span);
  return m;
}

static int mp_rank(const opts_t* o, int rank, mp_shared_t* sh) {
  const int n = o->gpus;
  if (rank == 0) {
    if (ncclGetUniqueId(&sh->id) != ncclSuccess) return 1;
    __atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
  } else {
    for (int i = 0; i < MP_UID_WAIT_S * 1000 && !__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE); i++) usleep(1000);
    if (!sh->ready) return 1;
  }
  CK(cudaSetDevice(rank));
  ncclComm_t nccl;
  if (ncclCommInitRank(&nccl, n, sh->id, rank) != ncclSuccess) return 1;
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = o->tokens, cfg.hidden = o->hidden, cfg.numExperts = o->experts, cfg.maxTopk = o->topk;
  cfg.numSMs = o->sms;
  ncclMoeComm_t comm;
  NK(ncclMoeCommInit(nccl, &cfg, &comm));
  results_t m = {.gpus = n, .ranks = n};
  NK(ncclMoeCommBufferBytes(comm, &m.bufBytes));
  srand((unsigned)(o->seed + 7919 * rank));
  rank_t r;
  memset(&r, 0, sizeof(r));
  setup_rank(&r, comm, o, rank, n, n / o->nodes, &m.netTokens);
  float* dev;
  CK(cudaMalloc((void**)&dev, sizeof(float) * (1 + o->iters + 4)));
  CK(cudaMemset(dev, 0, sizeof(float) * (1 + o->iters + 4)));
  CK(cudaDeviceSynchronize());
  m.copy = copy_gbps(o);
  run_op(&r, o, OP_DISPATCH);
  CK(cudaStreamSynchronize(r.stream));
  m.layout = mp_time_op(&r, o, OP_LAYOUT, nccl, dev);
  m.dispatch = mp_time_op(&r, o, OP_DISPATCH, nccl, dev);
  m.cached = mp_time_op(&r, o, OP_DISPATCH_CACHED, nccl, dev);
  m.combine = mp_time_op(&r, o, OP_COMBINE, nccl, dev);
  /* Totals over the ranks: received rows and network pairs. */
  int recv = 0;
  CK(cudaMemcpy(&recv, r.recvCount, sizeof(int), cudaMemcpyDeviceToHost));
  float tot[2] = {(float)recv, (float)m.netTokens};
  CK(cudaMemcpy(dev, tot, sizeof(tot), cudaMemcpyHostToDevice));
  if (ncclAllReduce(dev, dev, 2, ncclFloat, ncclSum, nccl, r.stream) != ncclSuccess) return 1;
  CK(cudaMemcpyAsync(tot, dev, sizeof(tot), cudaMemcpyDeviceToHost, r.stream));
  CK(cudaStreamSynchronize(r.stream));
  m.recvTotal = tot[0], m.netTokens = tot[1];
  ncclResult_t async;
  NK(ncclMoeCommGetAsyncError(comm, &async));
  if (async != ncclSuccess) { fprintf(stderr, "rank %d: async error: %s\n", rank, ncclMoeGetLastError()); return 1; }
  if (rank == 0) {
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    report(o, &m, prop.name, prop.multiProcessorCount);
  }
  ncclMoeHandleDestroy(r.handle);
  ncclMoeCommDestroy(comm);
  ncclCommDestroy(nccl);
  return 0;
}

/* GPUs present, counted in a child so that this process never initializes
 * CUDA (a CUDA context does not survive fork). */
static int mp_gpu_count(void) {
  pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    _exit(n > 250 ? 250 : n);
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return 0;
  return WEXITSTATUS(st);
}

/* Forks one process per GPU before this process touches CUDA. */
static int mp_main(const opts_t* o) {
  const int have = mp_gpu_count();
  if (have < o->gpus) {
    fprintf(stderr, "nccl-moe-bench: --gpus %d but %d CUDA device(s)\n", o->gpus, have);
    return 77;
  }
  mp_shared_t* sh = mmap(NULL, sizeof(mp_shared_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (sh == MAP_FAILED) return 1;
  memset(sh, 0, sizeof(*sh));
  pid_t pids[MAXR];
  for (int r = 0; r < o->gpus; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(mp_rank(o, r, sh));
  }
  int failed = 0;
  for (int r = 0; r < o->gpus; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      fprintf(stderr, "nccl-moe-bench: rank %d failed\n", r);
      failed = 1;
    }
  }
  munmap(sh, sizeof(*sh));
  return failed;
}

/* --------------------------------------------------------- --procs N */
/* One process per rank (rank r on GPU r % gpus), bootstrapped out of band:
 * ncclMoeCommInitOob with an all-gather through this process, the hub of
 * tests/support/moe_procs.h, which starts the ranks with fork + exec of this
 * program (and never makes a CUDA context itself). The path real jobs run:
 * buffers mapped across processes with CUDA IPC, every process launching its
 * own kernels. On one GPU, kernels of different processes run side by side
 * only under MPS: the bench starts a private MPS daemon when
 * nvidia-cuda-mps-control exists (--mps off: never), and first runs the same
 * shapes with virtual ranks (in a child, under the same daemon), so that its
 * RESULT line (procs=N) carries procs_ratio, the processes' bandwidth over
 * the virtual ranks'. Each timed iteration starts behind a host barrier of
 * the ranks (an all-gather through the hub). The ranks then start together,
 * as the virtual ranks do behind one event: every process queues a gate
 * kernel (spinning on a page of host memory all of them map, a memfd the hub
 * hands down) before its operation, and rank 0 raises the gate once every
 * rank has queued its work. An iteration's span is the slowest rank's, from
 * the gate's opening to its end; the median is reported. Without the gate
 * (the page cannot be mapped for the GPU) each rank's span starts at its own
 * start, and the processes' launch skew after the barrier counts in it. */
#define PROCS_GATHER_TIMEOUT_MS 600000
#define PROCS_LIMIT_MS 1800000
#define PROCS_REAP_MS 30000
#define PROCS_REPORT_RESULTS 1
#define PROCS_CHILD_CONNECTIONS "CUDA_DEVICE_MAX_CONNECTIONS=4" /* MPS budgets hardware queues over its clients */
#define PROCS_CHILD_LOADING "CUDA_MODULE_LOADING=EAGER"
#define PROCS_GATE_ENV "NCCL_MOE_BENCH_GATE_FD" /* the hub's memfd holding the gate word */
#define PROCS_GATE_BYTES 4096

static moe_oob_t g_procs_oob;

/* The start gate every rank process maps (NULL host: ungated). */
typedef struct {
  int* host;
  int* dev;
  int round; /* the value that opens the next round's gate */
  cudaEvent_t open;
} procs_gate_t;

static procs_gate_t g_gate;

static void procs_gather(const void* mine, void* all, size_t bytes) {
  if (moe_oob_allgather(mine, all, bytes, &g_procs_oob) != 0) {
    fprintf(stderr, "nccl-moe-bench: %s\n", g_procs_oob.error);
    exit(1);
  }
}

static void procs_barrier(void) {
  char b = 0, all[MAXR];
  procs_gather(&b, all, 1);
}

static void procs_gate_detach(void) {
  if (g_gate.host == NULL) return;
  cudaHostUnregister(g_gate.host);
  munmap(g_gate.host, PROCS_GATE_BYTES);
  cudaEventDestroy(g_gate.open);
  g_gate.host = NULL;
}

/* Maps the hub's gate page for this process's GPU. The ranks agree: where
 * any one cannot map it, none uses it (a note on stderr from rank 0). */
static void procs_gate_attach(int rank) {
  const char* env = getenv(PROCS_GATE_ENV);
  const int fd = env != NULL ? atoi(env) : -1;
  void* p = fd >= 0 ? mmap(NULL, PROCS_GATE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  if (fd >= 0) close(fd);
  if (p != MAP_FAILED && cudaHostRegister(p, PROCS_GATE_BYTES, cudaHostRegisterMapped) == cudaSuccess &&
      cudaHostGetDevicePointer((void**)&g_gate.dev, p, 0) == cudaSuccess) {
    g_gate.host = p;
    CK(cudaEventCreate(&g_gate.open));
  } else if (p != MAP_FAILED) {
    cudaHostUnregister(p); /* where the registration itself worked */
    cudaGetLastError();
    munmap(p, PROCS_GATE_BYTES);
  }
  char mine = g_gate.host != NULL, all[MAXR];
  procs_gather(&mine, all, 1);
  for (int r = 0; r < g_procs_oob.nRanks; r++) {
    if (all[r]) continue;
    procs_gate_detach();
    if (rank == 0) fprintf(stderr, "nccl-moe-bench: --procs runs ungated: rank %d cannot map the start gate\n", r);
    return;
  }
}

/* v[i] = the largest v[i] of any rank. */
static void procs_max(float* v, int n) {
  const int N = g_procs_oob.nRanks;
  float* all = malloc(sizeof(float) * (size_t)n * N);
  procs_gather(v, all, sizeof(float) * (size_t)n);
  for (int i = 0; i < n; i++)
    for (int r = 0; r < N; r++) v[i] = all[(size_t)r * n + i] > v[i] ? all[(size_t)r * n + i] : v[i];
  free(all);
}

static double procs_sum(double v) {
  double all[MAXR], s = 0;
  procs_gather(&v, all, sizeof(v));
  for (int r = 0; r < g_procs_oob.nRanks; r++) s += all[r];
  return s;
}

static float procs_time_op(rank_t* r, const opts_t* o, op_t op) {
  float* span = malloc(sizeof(float) * o->iters);
  const int gated = g_gate.host != NULL;
  for (int i = 0; i < o->warmup + o->iters; i++) {
    procs_barrier();
    const int round = ++g_gate.round;
    if (gated) {
      CK(moe_test_gate_launch(g_gate.dev, round, LL_GATE_TIMEOUT_NS, r->stream));
      CK(cudaEventRecord(g_gate.open, r->stream));
    }
    CK(cudaEventRecord(r->start, r->stream));
    run_op(r, o, op);
    CK(cudaEventRecord(r->end, r->stream));
    if (gated) {
      procs_barrier(); /* every rank's work is queued behind its gate */
      if (g_procs_oob.rank == 0) __atomic_store_n(g_gate.host, round, __ATOMIC_RELEASE);
    }
    CK(cudaStreamSynchronize(r->stream));
    if (i >= o->warmup) CK(cudaEventElapsedTime(&span[i - o->warmup], gated ? g_gate.open : r->start, r->end));
  }
  procs_max(span, o->iters);
  const float m = median(span, o->iters);
  free(span);
  return m;
}

/* A rank (a child of procs_main): its figures go to the hub from rank 0. */
static int procs_rank_main(const opts_t* o) {
  if (moe_oob_attach(&g_procs_oob, PROCS_GATHER_TIMEOUT_MS) != 0) {
    fprintf(stderr, "nccl-moe-bench: a --procs rank not started by the bench\n");
    return 2;
  }
  const int rank = g_procs_oob.rank, n = g_procs_oob.nRanks;
  CK(cudaSetDevice(rank % o->gpus)); /* the comm takes the current device */
  procs_gate_attach(rank);
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = o->tokens, cfg.hidden = o->hidden, cfg.numExperts = o->experts, cfg.maxTopk = o->topk;
  cfg.numSMs = o->sms;
  ncclMoeComm_t comm;
  NK(ncclMoeCommInitOob(rank, n, moe_oob_allgather, &g_procs_oob, &cfg, &comm));
  results_t m = {.gpus = o->gpus, .ranks = n};
  NK(ncclMoeCommBufferBytes(comm, &m.bufBytes));
  srand((unsigned)(o->seed + 7919 * rank));
  rank_t r;
  memset(&r, 0, sizeof(r));
  setup_rank(&r, comm, o, rank, n, n, &m.netTokens);
  CK(cudaDeviceSynchronize());
  /* The copy with the GPU to itself: rank 0 measures while the others wait. */
  procs_barrier();
  if (rank == 0) m.copy = copy_gbps(o);
  procs_barrier();
  run_op(&r, o, OP_DISPATCH); /* fills the handle the cached runs reuse */
  CK(cudaStreamSynchronize(r.stream));
  m.layout = procs_time_op(&r, o, OP_LAYOUT);
  m.dispatch = procs_time_op(&r, o, OP_DISPATCH);
  m.cached = procs_time_op(&r, o, OP_DISPATCH_CACHED);
  m.combine = procs_time_op(&r, o, OP_COMBINE);
  int recv = 0;
  CK(cudaMemcpy(&recv, r.recvCount, sizeof(int), cudaMemcpyDeviceToHost));
  m.recvTotal = procs_sum(recv);
  ncclResult_t async;
  NK(ncclMoeCommGetAsyncError(comm, &async));
  if (async != ncclSuccess) {
    fprintf(stderr, "rank %d: async error: %s\n", rank, ncclMoeGetLastError());
    return 1;
  }
  if (rank == 0) moe_oob_report(&g_procs_oob, PROCS_REPORT_RESULTS, 0, &m, sizeof(m));
  NK(ncclMoeHandleDestroy(r.handle));
  procs_barrier(); /* no rank frees its buffers while a peer may still read them */
  NK(ncclMoeCommDestroy(comm));
  procs_gate_detach();
  return 0;
}

typedef struct {
  results_t m;
  int got;
} procs_got_t;

static int procs_on_event(moe_hub_t* hub, const moe_hub_event_t* ev, void* arg) {
  (void)hub;
  procs_got_t* g = arg;
  if (ev->type == MOE_HUB_REPORT && ev->kind == PROCS_REPORT_RESULTS && ev->rank == 0 && ev->bytes == sizeof(g->m)) {
    memcpy(&g->m, ev->data, sizeof(g->m));
    g->got = 1;
  }
  return 0;
}

/* GB/s per GPU of a phase of `ms`, as report() counts them. */
static double procs_gbps(const opts_t* o, const results_t* m, float ms, int combine) {
  const double H = o->hidden, tokBytes = combine ? H * 2 : (o->fp8 ? H + H / 128 * 4 : H * 2);
  return m->recvTotal * tokBytes / m->gpus / (ms * 1e-3) / 1e9;
}

static void procs_report(const opts_t* o, const results_t* p, const results_t* v, int mpsOn) {
  const double pd = procs_gbps(o, p, p->dispatch, 0), pc = procs_gbps(o, p, p->combine, 1);
  const double pk = procs_gbps(o, p, p->cached, 0);
  printf("nccl-moe-bench --procs: %d processes on %d GPU(s), one rank each, ncclMoeCommInitOob; %s\n", p->ranks,
         p->gpus, mpsOn ? "under a private MPS daemon" : "without MPS (time-sliced: not a meaningful figure)");
  printf("%-28s %10s %12s %10s %12s %8s\n", "phase (median)", "us", "GB/s/GPU", "virtual us", "virtual GB/s", "ratio");
  const float* pt[] = {&p->layout, &p->dispatch, &p->cached, &p->combine};
  const float* vt[] = {&v->layout, &v->dispatch, &v->cached, &v->combine};
  const char* names[] = {"layout", "dispatch (layout+notify+move)", "dispatch, cached handle", "combine"};
  for (int i = 0; i < 4; i++) {
    const int comb = i == 3;
    const double g = i == 0 ? 0 : procs_gbps(o, p, *pt[i], comb), vg = i == 0 || v->ranks == 0 ? 0 : procs_gbps(o, v, *vt[i], comb);
    printf("%-28s %10.1f %12.1f %10.1f %12.1f %8.3f\n", names[i], *pt[i] * 1e3, g, *vt[i] * 1e3, vg,
           vg > 0 ? g / vg : 0.0);
  }
  const double vd = v->ranks > 0 ? procs_gbps(o, v, v->dispatch, 0) : 0, vc = v->ranks > 0 ? procs_gbps(o, v, v->combine, 1) : 0;
  const double rd = vd > 0 ? pd / vd : 0, rc = vc > 0 ? pc / vc : 0;
  printf("RESULT mode=normal procs=%d gpus=%d ranks=%d mps=%d dispatch_GBps=%.1f combine_GBps=%.1f "
         "cached_dispatch_GBps=%.1f copy_GBps=%.1f virtual_dispatch_GBps=%.1f virtual_combine_GBps=%.1f "
         "procs_dispatch_ratio=%.3f procs_combine_ratio=%.3f procs_ratio=%.3f\n",
         p->ranks, p->gpus, p->ranks, mpsOn, pd, pc, pk, p->copy, vd, vc, rd, rc, rd < rc ? rd : rc);
}

/* The parent: MPS, the virtual run, the processes, the comparison. */
static int procs_main(const opts_t* o, char** argv) {
  if (getenv(MOE_OOB_ENV_FD) != NULL) return procs_rank_main(o);
  const int have = mp_gpu_count();
  if (have < o->gpus) {
    fprintf(stderr, "nccl-moe-bench: --procs on %d GPU(s) but %d CUDA device(s)\n", o->gpus, have);
    return 77;
  }
  moe_mps_t mps;
  moe_mps_start(&mps, o->mps ? MOE_MPS_AUTO : MOE_MPS_OFF);
  char line[1024];
  printf("%s\n", moe_mps_describe(&mps, line, sizeof(line)));
  results_t* virt = mmap(NULL, sizeof(results_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (virt == MAP_FAILED) {
    moe_mps_stop(&mps);
    return 1;
  }
  memset(virt, 0, sizeof(*virt));
  int failed = 0;
  if (o->gpus == 1) {
    /* The same shapes with virtual ranks, in a child: this process makes no CUDA context. */
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
      opts_t v = *o;
      v.ranks = o->procs;
      g_results_out = virt;
      if (cudaSetDevice(0) != cudaSuccess) _exit(1);
      _exit(virtual_main(&v));
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      fprintf(stderr, "nccl-moe-bench: the virtual-rank run failed\n");
      failed = 1;
    }
  }
  argv[0] = "/proc/self/exe";
  /* The start gate's page, inherited by the children (no close-on-exec). */
  const int gateFd = memfd_create("nccl-moe-bench-gate", 0);
  char gateEnv[64];
  const char* env[] = {PROCS_CHILD_CONNECTIONS, PROCS_CHILD_LOADING, NULL, NULL};
  if (gateFd >= 0 && ftruncate(gateFd, PROCS_GATE_BYTES) == 0) {
    snprintf(gateEnv, sizeof(gateEnv), "%s=%d", PROCS_GATE_ENV, gateFd);
    env[2] = gateEnv;
  }
  moe_hub_args_t a = {.nRanks = o->procs, .argv = argv, .env = env};
  moe_hub_t* hub = NULL;
  procs_got_t got;
  memset(&got, 0, sizeof(got));
  if (!failed && moe_hub_spawn(&a, &hub) == 0) {
    const int served = moe_hub_serve(hub, PROCS_LIMIT_MS, procs_on_event, &got);
    int status[MAXR];
    moe_hub_reap(hub, PROCS_REAP_MS, status);
    for (int r = 0; r < o->procs; r++) {
      char s[64];
      if (status[r] == -1 || !WIFEXITED(status[r]) || WEXITSTATUS(status[r]) != 0) {
        fprintf(stderr, "nccl-moe-bench: --procs rank %d: %s\n", r, moe_hub_status_str(status[r], s, sizeof(s)));
        failed = 1;
      }
    }
    if (served < 0) failed = 1;
    moe_hub_free(hub);
  } else {
    failed = 1;
  }
  if (gateFd >= 0) close(gateFd);
  const int mpsOn = mps.on; /* what the run had: stopping clears it */
  moe_mps_stop(&mps);
  if (!failed && got.got) procs_report(o, &got.m, virt, mpsOn);
  munmap(virt, sizeof(*virt));
  return failed || !got.got;
}

/* ------------------------------------------------------------ options */
static const char* const MODE_NAMES[] = {"normal", "ll"};
static const char* const DISPATCH_NAMES[] = {"fp8", "bf16", "cast"};
static const char* const SCALE_NAMES[] = {"float", "pow2", "ue8m0"};
static const char* const MPS_NAMES[] = {"auto", "off"};
static const ncclMoeScaleFormat_t SCALE_FORMATS[] = {ncclMoeScaleFloat, ncclMoeScalePow2, ncclMoeScaleUE8M0};

/* What the command line set explicitly (defaults depend on the mode). */
typedef struct {
  int tokens, ranks, iters, warmup, scales, sweep;
} given_t;

static void parse_args(int argc, char** argv, opts_t* o, given_t* g, moe_opts_t* p) {
  enum { O_RANKS = 1, O_TOKENS, O_HIDDEN, O_TOPK, O_EXPERTS, O_DISPATCH, O_ITERS, O_WARMUP, O_SMS, O_SEED, O_MODE,
         O_SCALES, O_NODES, O_GPUS, O_PROCS, O_MPS, O_SWEEP, O_JSON, O_HELP };
  static const struct option lo[] = {
      {"ranks", required_argument, 0, O_RANKS},     {"tokens", required_argument, 0, O_TOKENS},
      {"hidden", required_argument, 0, O_HIDDEN},   {"topk", required_argument, 0, O_TOPK},
      {"experts", required_argument, 0, O_EXPERTS}, {"dispatch", required_argument, 0, O_DISPATCH},
      {"iters", required_argument, 0, O_ITERS},     {"warmup", required_argument, 0, O_WARMUP},
      {"sms", required_argument, 0, O_SMS},         {"seed", required_argument, 0, O_SEED},
      {"mode", required_argument, 0, O_MODE},       {"scales", required_argument, 0, O_SCALES},
      {"nodes", required_argument, 0, O_NODES},     {"gpus", required_argument, 0, O_GPUS},
      {"procs", required_argument, 0, O_PROCS},     {"mps", required_argument, 0, O_MPS},
      {"sweep", optional_argument, 0, O_SWEEP},     {"json", no_argument, 0, O_JSON},
      {"help", no_argument, 0, O_HELP},             {0, 0, 0, 0}};
  p->longopts = lo;
  int ch;
  while ((ch = moe_opts_next(p, argc, argv)) != -1) {
    switch (ch) {
      case O_RANKS: o->ranks = (int)moe_opts_int(p, optarg, 1, MAXR), g->ranks = 1; break;
      case O_NODES: o->nodes = (int)moe_opts_int(p, optarg, 1, MAXR); break;
      case O_GPUS: o->gpus = (int)moe_opts_int(p, optarg, 1, MAXR); break;
      case O_PROCS: o->procs = (int)moe_opts_int(p, optarg, 1, MAXR); break;
      case O_MPS: o->mps = moe_opts_choice(p, optarg, MPS_NAMES, 2) == 0; break;
      case O_TOKENS: o->tokens = (int)moe_opts_int(p, optarg, 1, BENCH_MAX_TOKENS), g->tokens = 1; break;
      case O_HIDDEN: o->hidden = (int)moe_opts_int(p, optarg, 8, BENCH_MAX_HIDDEN); break;
      case O_TOPK: o->topk = (int)moe_opts_int(p, optarg, 1, NCCL_MOE_MAX_TOPK); break;
      case O_EXPERTS: o->experts = (int)moe_opts_int(p, optarg, 1, NCCL_MOE_MAX_EXPERTS); break;
      case O_DISPATCH: {
        const int d = moe_opts_choice(p, optarg, DISPATCH_NAMES, 3);
        o->fp8 = d != 1, o->cast = d == 2;
        break;
      }
      case O_ITERS: o->iters = (int)moe_opts_int(p, optarg, 1, BENCH_MAX_ITERS), g->iters = 1; break;
      case O_WARMUP: o->warmup = (int)moe_opts_int(p, optarg, 0, BENCH_MAX_ITERS), g->warmup = 1; break;
      case O_SMS: o->sms = (int)moe_opts_int(p, optarg, 0, BENCH_MAX_SMS); break;
      case O_SEED: o->seed = moe_opts_u64(p, optarg); break;
      case O_MODE: o->ll = moe_opts_choice(p, optarg, MODE_NAMES, 2) == 1; break;
      case O_SCALES: o->scaleFormat = SCALE_FORMATS[moe_opts_choice(p, optarg, SCALE_NAMES, 3)], g->scales = 1; break;
      case O_SWEEP:
        g->sweep = 1;
        if (optarg != NULL)
          o->sweepCount = moe_opts_int_list(p, optarg, 1, BENCH_MAX_TOKENS, o->sweepTokens, BENCH_MAX_SWEEP);
        break;
      case O_JSON: o->json = 1; break;
    }
  }
}

/* Combinations that cannot run, each with its reason (before any CUDA call). */
static void check_args(opts_t* o, const given_t* g, const moe_opts_t* p) {
  if (o->procs > 0) {
    if (o->ll) moe_opts_fail(p, "--procs measures normal mode; --mode ll runs virtual ranks on one GPU");
    if (o->nodes > 1) moe_opts_fail(p, "--nodes splits virtual ranks into virtual nodes; with --procs each rank is a process");
    if (g->sweep) moe_opts_fail(p, "--procs runs one token count: give --tokens instead of --sweep");
    if (g->ranks && o->ranks != o->procs)
      moe_opts_fail(p, "--ranks %d with --procs %d: one rank per process, give one of them", o->ranks, o->procs);
    o->ranks = o->procs;
  } else if (o->gpus > 1) {
    if (o->ll)
      moe_opts_fail(p, "--mode ll runs virtual ranks on one GPU; --gpus N (one process per GPU) is for --mode normal");
    if (o->nodes > 1)
      moe_opts_fail(p, "--nodes splits virtual ranks into virtual nodes; with --gpus each rank is a process");
    if (g->ranks && o->ranks != o->gpus)
      moe_opts_fail(p, "--ranks %d with --gpus %d: one rank per GPU, give one of them", o->ranks, o->gpus);
    o->ranks = o->gpus;
  }
  if (o->ranks % o->nodes != 0) moe_opts_fail(p, "--nodes %d does not divide the %d ranks", o->nodes, o->ranks);
  if (o->experts % o->ranks != 0)
    moe_opts_fail(p, "--experts %d is not a multiple of the %d ranks", o->experts, o->ranks);
  if (o->topk > o->experts)
    moe_opts_fail(p, "--topk %d: a token picks distinct experts, and there are %d", o->topk, o->experts);
  if (o->hidden % 8 != 0)
    moe_opts_fail(p, "--hidden %d: rows must be a multiple of 8 channels (16 bytes of BF16)", o->hidden);
  if (o->fp8 && o->hidden % NCCL_MOE_FP8_BLOCK != 0)
    moe_opts_fail(p, "--hidden %d: FP8 needs a multiple of %d (one scale per block); use --dispatch bf16", o->hidden,
                  NCCL_MOE_FP8_BLOCK);
  if (g->scales && !o->ll) moe_opts_fail(p, "--scales is for --mode ll (normal mode sends FP8 with float scales)");
  if (g->sweep && g->tokens)
    moe_opts_fail(p, "--sweep runs its own token counts: give them as --sweep=T,T,... instead of --tokens");
  if (g->sweep && o->sweepCount == 0) {
    const int* list = o->ll ? SWEEP_LL : SWEEP_NORMAL;
    o->sweepCount = o->ll ? (int)(sizeof(SWEEP_LL) / sizeof(int)) : (int)(sizeof(SWEEP_NORMAL) / sizeof(int));
    memcpy(o->sweepTokens, list, sizeof(int) * o->sweepCount);
  }
  if (!g->sweep) o->sweepTokens[0] = g->tokens ? o->tokens : (o->ll ? LL_DEFAULT_TOKENS : BENCH_DEFAULT_TOKENS);
  if (!g->sweep) o->sweepCount = 1;
  for (int i = 0; o->ll && i < o->sweepCount; i++)
    if (o->sweepTokens[i] > NCCL_MOE_LL_MAX_TOKENS)
      moe_opts_fail(p, "%d tokens: --mode ll takes at most %d tokens per rank", o->sweepTokens[i],
                    NCCL_MOE_LL_MAX_TOKENS);
  if (!g->iters) o->iters = o->ll ? LL_DEFAULT_ITERS : BENCH_DEFAULT_ITERS;
  if (!g->warmup) o->warmup = o->ll ? LL_DEFAULT_WARMUP : BENCH_DEFAULT_WARMUP;
}

/* One run per token count; progress on stderr when there are several. */
static int run_all(opts_t* o) {
  int rc = 0;
  for (int i = 0; i < o->sweepCount && rc == 0; i++) {
    o->tokens = o->sweepTokens[i];
    if (o->sweepCount > 1)
      fprintf(stderr, "nccl-moe-bench: sweep %d/%d: %d tokens/rank (%s mode)\n", i + 1, o->sweepCount, o->tokens,
              o->ll ? "ll" : "normal");
    if (o->gpus > 1) rc = mp_main(o);
    else rc = o->ll ? ll_main(o) : virtual_main(o);
  }
  return rc;
}

int main(int argc, char** argv) {
  opts_t o = {.ranks = 8, .nodes = 1, .gpus = 1, .mps = 1, .hidden = 7168, .topk = 8, .experts = 256, .sms = 0, .fp8 = 1,
              .cast = 0, .seed = 1, .scaleFormat = ncclMoeScaleFloat};
  given_t given = {0};
  moe_opts_t p = {.prog = "nccl-moe-bench", .usage = usage};
  parse_args(argc, argv, &o, &given, &p);
  check_args(&o, &given, &p);
  o.text = o.json ? stderr : stdout;
  /* One hardware queue per rank's stream, every kernel loaded at start (see
   * ncclMoeCommInitVirtual): this program's own process, before CUDA starts. */
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (o.procs > 0) { /* before this process touches CUDA; one token count (check_args) */
    o.tokens = o.sweepTokens[0];
    return procs_main(&o, argv);
  }
  if (o.gpus > 1) return run_all(&o); /* forks before this process touches CUDA */
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    fprintf(stderr, "nccl-moe-bench: no CUDA device\n");
    return 77;
  }
  CK(cudaSetDevice(0));
  return run_all(&o);
}
