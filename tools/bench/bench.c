/* nccl-moe-bench: the project's main job. Times layout, notify, dispatch and
 * combine of the normal (high-throughput) mode with N virtual ranks on one
 * GPU, beside a device-to-device copy measured in the same run.
 *
 * Bandwidth is counted as DeepEP counts it: received tokens x bytes per token
 * (FP8: hidden + hidden/128 x 4; BF16: hidden x 2), self traffic included,
 * summed over the ranks on the GPU, over the time from the first rank's start
 * to the last rank's end; median over the timed iterations. Copy bandwidth is
 * bytes copied (once) per second. Ratios are over the copy bandwidth. */
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_fp8.h"
#include "moe_kernels.h"
#include "nccl_moe.h"

#define MAXR NCCL_MOE_MAX_RANKS
#define COPY_BYTES (1ull << 30)

#define CK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); exit(1); } } while (0)
#define NK(call) do { ncclResult_t r_ = (call); if (r_ != ncclSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, ncclMoeGetLastError()); exit(1); } } while (0)

typedef struct {
  int ranks, tokens, hidden, topk, experts, iters, warmup, sms, fp8, cast;
  unsigned long long seed;
} opts_t;

static void usage(void) {
  printf("usage: nccl-moe-bench [--ranks N] [--tokens T] [--hidden H] [--topk K] [--experts E]\n"
         "                      [--dispatch fp8|bf16|cast] [--iters I] [--warmup W] [--sms S] [--seed X]\n"
         "  defaults: 8 virtual ranks on GPU 0, 4096 tokens/rank, hidden 7168, top-8 of 256 experts,\n"
         "  FP8 dispatch (x already FP8; 'cast' = BF16 x cast to FP8 in the kernel), BF16 combine.\n");
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

int main(int argc, char** argv) {
  opts_t o = {.ranks = 8, .tokens = 4096, .hidden = 7168, .topk = 8, .experts = 256, .iters = 20,
              .warmup = 5, .sms = 0, .fp8 = 1, .cast = 0, .seed = 1};
  static struct option lo[] = {{"ranks", 1, 0, 'r'}, {"tokens", 1, 0, 't'}, {"hidden", 1, 0, 'h'},
                               {"topk", 1, 0, 'k'}, {"experts", 1, 0, 'e'}, {"dispatch", 1, 0, 'd'},
                               {"iters", 1, 0, 'i'}, {"warmup", 1, 0, 'w'}, {"sms", 1, 0, 's'},
                               {"seed", 1, 0, 'x'}, {"help", 0, 0, '?'}, {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
    switch (ch) {
      case 'r': o.ranks = atoi(optarg); break;
      case 't': o.tokens = atoi(optarg); break;
      case 'h': o.hidden = atoi(optarg); break;
      case 'k': o.topk = atoi(optarg); break;
      case 'e': o.experts = atoi(optarg); break;
      case 'd':
        o.fp8 = strcmp(optarg, "bf16") != 0;
        o.cast = strcmp(optarg, "cast") == 0;
        break;
      case 'i': o.iters = atoi(optarg); break;
      case 'w': o.warmup = atoi(optarg); break;
      case 's': o.sms = atoi(optarg); break;
      case 'x': o.seed = strtoull(optarg, NULL, 0); break;
      default: usage(); return ch == '?' ? 0 : 2;
    }
  }
  if (o.ranks < 1 || o.ranks > MAXR || o.iters < 1 || o.tokens < 1) { usage(); return 2; }
  /* One hardware queue per rank's stream (see ncclMoeCommInitVirtual). */
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  setvbuf(stdout, NULL, _IOLBF, 0);
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    fprintf(stderr, "nccl-moe-bench: no CUDA device\n");
    return 77;
  }
  CK(cudaSetDevice(0));
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));

  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = o.tokens, cfg.hidden = o.hidden, cfg.numExperts = o.experts, cfg.maxTopk = o.topk;
  cfg.numSMs = o.sms;
  ncclMoeComm_t comms[MAXR];
  NK(ncclMoeCommInitVirtual(o.ranks, 0, &cfg, comms));
  size_t bufBytes = 0;
  NK(ncclMoeCommBufferBytes(comms[0], &bufBytes));

  /* Routing as in DeepEP's tests: each token picks `topk` distinct experts
   * uniformly at random. */
  srand((unsigned)o.seed);
  rank_t rk[MAXR];
  memset(rk, 0, sizeof(rk));
  const size_t T = o.tokens, H = o.hidden, K = o.topk;
  uint16_t* hx = malloc(T * H * 2);
  int64_t* hidx = malloc(T * K * 8);
  float* hw = malloc(T * K * 4);
  for (int r = 0; r < o.ranks; r++) {
    rank_t* p = &rk[r];
    p->comm = comms[r];
    NK(ncclMoeHandleCreate(p->comm, &p->handle));
    CK(cudaStreamCreateWithFlags(&p->stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&p->start));
    CK(cudaEventCreate(&p->end));
    for (size_t i = 0; i < T * H; i++) hx[i] = moe_float_to_bf16((float)rand() / RAND_MAX * 4.0f - 2.0f);
    for (size_t t = 0; t < T; t++)
      for (size_t k = 0; k < K; k++) {
        int64_t e;
        int dup;
        do {
          e = rand() % o.experts;
          dup = 0;
          for (size_t j = 0; j < k; j++) dup |= hidx[t * K + j] == e;
        } while (dup);
        hidx[t * K + k] = e;
        hw[t * K + k] = (float)rand() / RAND_MAX;
      }
    CK(cudaMalloc(&p->x, T * H * 2));
    CK(cudaMalloc(&p->xs, T * (H / 128) * 4 + 16));
    CK(cudaMalloc(&p->idx, T * K * 8));
    CK(cudaMalloc(&p->w, T * K * 4));
    CK(cudaMalloc(&p->out, T * H * 2));
    CK(cudaMalloc(&p->perRank, sizeof(int) * o.ranks));
    CK(cudaMalloc(&p->perExpert, sizeof(int) * o.experts));
    CK(cudaMemcpy(p->x, hx, T * H * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p->idx, hidx, T * K * 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p->w, hw, T * K * 4, cudaMemcpyHostToDevice));
    void* xin = p->x;
    if (o.fp8 && !o.cast) {
      /* FP8 input, as DeepEP's benchmark dispatches it. */
      void* q;
      CK(cudaMalloc(&q, T * H));
      CK(moe_fp8_quantize_launch(p->x, o.tokens, o.hidden, 0, q, p->xs, 0));
      xin = q;
    }
    NK(ncclMoeGetCombineBuffer(p->comm, &p->combineBuf, NULL));
    p->args = (ncclMoeDispatchArgs_t){.x = xin, .xType = (o.fp8 && !o.cast) ? ncclFloat8e4m3 : ncclBfloat16,
                                      .xScales = (o.fp8 && !o.cast) ? p->xs : NULL,
                                      .sendType = o.fp8 ? ncclFloat8e4m3 : ncclBfloat16,
                                      .numTokens = o.tokens, .hidden = o.hidden, .topk = o.topk,
                                      .topkIdx = p->idx, .topkWeights = p->w,
                                      .capacity = o.ranks * o.tokens, .expertAlignment = 1};
  }
  CK(cudaDeviceSynchronize());
  float copy = copy_gbps(&o);

  /* One untimed dispatch fills the handles (the cached runs reuse them). */
  for (int r = 0; r < o.ranks; r++) run_op(&rk[r], &o, OP_DISPATCH);
  CK(cudaDeviceSynchronize());

  float tLayout = time_op(rk, &o, OP_LAYOUT);
  float tDispatch = time_op(rk, &o, OP_DISPATCH);
  float tCached = time_op(rk, &o, OP_DISPATCH_CACHED);
  float tCombine = time_op(rk, &o, OP_COMBINE);
  double recvTotal = 0;
  for (int r = 0; r < o.ranks; r++) {
    int n = 0;
    CK(cudaMemcpy(&n, rk[r].recvCount, sizeof(int), cudaMemcpyDeviceToHost));
    recvTotal += n;
  }
  ncclResult_t async;
  NK(ncclMoeCommGetAsyncError(rk[0].comm, &async));
  if (async != ncclSuccess) { fprintf(stderr, "async error: %s\n", ncclMoeGetLastError()); return 1; }

  double tokBytes = o.fp8 ? (double)H + H / 128 * 4 : (double)H * 2;
  double dispBytes = recvTotal * tokBytes, combBytes = recvTotal * H * 2;
  double dGBps = dispBytes / (tDispatch * 1e-3) / 1e9, cGBps = combBytes / (tCombine * 1e-3) / 1e9;
  double dcGBps = dispBytes / (tCached * 1e-3) / 1e9;
  printf("nccl-moe-bench: %s, %d SMs; %d virtual ranks, %d tokens/rank, hidden %d, top-%d of %d experts, "
         "%s dispatch, BF16 combine; %zu MiB buffers/rank\n",
         prop.name, prop.multiProcessorCount, o.ranks, o.tokens, o.hidden, o.topk, o.experts,
         o.cast ? "BF16->FP8 cast" : (o.fp8 ? "FP8" : "BF16"), bufBytes >> 20);
  printf("received tokens (all ranks): %.0f (%.2f per token)\n", recvTotal, recvTotal / (o.ranks * (double)o.tokens));
  printf("%-28s %10s %12s %8s\n", "phase (median)", "us", "GB/s", "ratio");
  printf("%-28s %10.1f\n", "layout", tLayout * 1e3);
  printf("%-28s %10.1f\n", "notify (full - cached - layout)", (tDispatch - tCached - tLayout) * 1e3);
  printf("%-28s %10.1f %12.1f %8.3f\n", "dispatch (layout+notify+move)", tDispatch * 1e3, dGBps, dGBps / copy);
  printf("%-28s %10.1f %12.1f %8.3f\n", "dispatch, cached handle", tCached * 1e3, dcGBps, dcGBps / copy);
  printf("%-28s %10.1f %12.1f %8.3f\n", "combine", tCombine * 1e3, cGBps, cGBps / copy);
  printf("%-28s %10s %12.1f\n", "device copy (bytes once)", "", copy);
  printf("RESULT mode=normal gpus=1 ranks=%d dispatch_GBps=%.1f combine_GBps=%.1f copy_GBps=%.1f "
         "dispatch_ratio=%.3f combine_ratio=%.3f\n",
         o.ranks, dGBps, cGBps, copy, dGBps / copy, cGBps / copy);
  for (int r = 0; r < o.ranks; r++) {
    ncclMoeHandleDestroy(rk[r].handle);
    ncclMoeCommDestroy(rk[r].comm);
  }
  return 0;
}
