/* SPDX-License-Identifier: Apache-2.0 */
/* The error record's device half and the one wait, on a GPU:
 *  - many blocks (codes with details; their claim words in device memory)
 *    and a host thread (the proxy's role: codes only, claimed in the
 *    host-mapped record) race to record random codes into the same records:
 *    per side one winner from NONE and one fatal winner, the record reads as
 *    the protocol's combination, with the blocks' fatal winner's details
 *    intact (kernels/moe_error.h). No kernel does an atomic on host memory,
 *    so this holds whether or not the link has native host atomics;
 *  - moe_wait_geq: a wait that times out records what it waited for and
 *    returns false; a wait whose flag arrives returns the value; waits with a
 *    long timeout end soon after the first timeout broke the comm, without
 *    reading the error word on every spin, and nothing traps. */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/moe_error.h"
#include "kernels/moe_intranode.h"
#include "tests/support/moe_test_kernels.h"
#include "test_common.h"

#define CUDA_OK(call) ck_assert_msg((call) == cudaSuccess, "%s: %s", #call, cudaGetErrorString(cudaGetLastError()))

#define BLOCKS 264   /* device writers: more than the SMs, so blocks of every SM race */
#define RECORDS 64
#define GATE_NS 10000000000LL

static const int codes[] = {MOE_KERR_BAD_EXPERT, MOE_KERR_CAPACITY, MOE_KERR_MISMATCH,
                            MOE_KERR_TIMEOUT,    MOE_KERR_BAD_NOTIFY, MOE_KERR_NET};
#define NCODES ((int)(sizeof(codes) / sizeof(codes[0])))

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef struct {
  volatile int* recs;
  volatile int* go;
  const int* hostCodes; /* [RECORDS] */
  int won[RECORDS];
} host_writer_t;

/* The proxy's role: codes without details. */
static void* host_writer(void* p) {
  host_writer_t* h = p;
  *h->go = 1; /* the blocks start now too */
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  for (int k = 0; k < RECORDS; k++)
    h->won[k] = moe_error_record_host(h->recs + (size_t)k * MOE_ERR_WORDS, h->hostCodes[k]);
  return NULL;
}

START_TEST(test_blocks_and_host_race) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  int nativeAtomics = 0;
  CUDA_OK(cudaDeviceGetAttribute(&nativeAtomics, cudaDevAttrHostNativeAtomicSupported, 0));
  int *recsHost, *goHost, *dRecs, *dGo, *dCodes, *dWon, *dClaims;
  CUDA_OK(cudaHostAlloc((void**)&recsHost, sizeof(int) * RECORDS * MOE_ERR_WORDS, cudaHostAllocMapped));
  CUDA_OK(cudaHostAlloc((void**)&goHost, sizeof(int), cudaHostAllocMapped));
  CUDA_OK(cudaHostGetDevicePointer((void**)&dRecs, recsHost, 0));
  CUDA_OK(cudaHostGetDevicePointer((void**)&dGo, goHost, 0));
  CUDA_OK(cudaMalloc((void**)&dCodes, sizeof(int) * RECORDS * BLOCKS));
  CUDA_OK(cudaMalloc((void**)&dWon, sizeof(int) * RECORDS * BLOCKS));
  CUDA_OK(cudaMalloc((void**)&dClaims, sizeof(int) * RECORDS));
  int* codesHost = malloc(sizeof(int) * RECORDS * (BLOCKS + 1)); /* [k][writer], the host last */
  int* won = malloc(sizeof(int) * RECORDS * BLOCKS);
  int hostCodes[RECORDS];
  int upgrades = 0, hostWins = 0, combined = 0;
  for (int round = 0; round < 8; round++) {
    memset(recsHost, 0, sizeof(int) * RECORDS * MOE_ERR_WORDS);
    CUDA_OK(cudaMemset(dClaims, 0, sizeof(int) * RECORDS));
    *(volatile int*)goHost = 0;
    for (int k = 0; k < RECORDS; k++)
      for (int w = 0; w <= BLOCKS; w++) codesHost[k * (BLOCKS + 1) + w] = codes[moe_rng_below(&rng, NCODES)];
    int* dev = malloc(sizeof(int) * RECORDS * BLOCKS);
    for (int k = 0; k < RECORDS; k++) {
      for (int b = 0; b < BLOCKS; b++) dev[k * BLOCKS + b] = codesHost[k * (BLOCKS + 1) + b];
      hostCodes[k] = codesHost[k * (BLOCKS + 1) + BLOCKS];
    }
    CUDA_OK(cudaMemcpy(dCodes, dev, sizeof(int) * RECORDS * BLOCKS, cudaMemcpyHostToDevice));
    free(dev);
    CUDA_OK(moe_test_error_race_launch((volatile int*)dRecs, dClaims, RECORDS, dCodes, dWon, BLOCKS, (volatile int*)dGo,
                                       GATE_NS, 0));
    host_writer_t h = {(volatile int*)recsHost, (volatile int*)goHost, hostCodes, {0}};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, host_writer, &h), 0);
    pthread_join(th, NULL);
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemcpy(won, dWon, sizeof(int) * RECORDS * BLOCKS, cudaMemcpyDeviceToHost));
    for (int k = 0; k < RECORDS; k++) {
      const int* cw = codesHost + k * (BLOCKS + 1);
      int anyFatal = 0, fatalWins = 0, softWins = 0, fatal = -1, soft = -1;
      for (int w = 0; w < BLOCKS; w++) {
        anyFatal |= moe_kerr_fatal(cw[w]);
        if (!won[k * BLOCKS + w]) continue;
        if (moe_kerr_fatal(cw[w])) fatalWins++, fatal = w;
        else softWins++, soft = w;
      }
      ck_assert_msg(softWins <= 1 && fatalWins == (anyFatal ? 1 : 0), "round %d record %d: %d + %d blocks won",
                    round, k, softWins, fatalWins);
      ck_assert_msg(h.won[k], "round %d record %d: the host's only writer lost", round, k);
      hostWins++;
      const int hostCode = cw[BLOCKS], devFatal = fatal >= 0 ? cw[fatal] : MOE_KERR_NONE;
      const int devSoft = soft >= 0 ? cw[soft] : MOE_KERR_NONE;
      int want;
      if (fatal >= 0 || moe_kerr_fatal(hostCode)) {
        want = moe_kerr_cause(devFatal, moe_kerr_fatal(hostCode) ? hostCode : MOE_KERR_NONE);
        combined += fatal >= 0 && moe_kerr_fatal(hostCode);
      } else {
        want = devSoft != MOE_KERR_NONE ? devSoft : hostCode;
      }
      upgrades += soft >= 0 && fatal >= 0;
      moe_error_details_t d = {0, -1, 0, 0};
      int has = 0;
      const int code = moe_error_read_host(recsHost + (size_t)k * MOE_ERR_WORDS, &d, &has);
      ck_assert_msg(code == want, "round %d record %d: code %d, want %d", round, k, code, want);
      if (fatal >= 0 && code == devFatal) {
        const moe_error_details_t wd = moe_test_error_details(fatal, k);
        ck_assert_msg(has && d.wait == wd.wait && d.peer == wd.peer && d.want == wd.want && d.seen == wd.seen,
                      "round %d record %d: details are not those of block %d", round, k, fatal);
      } else {
        ck_assert_msg(!has, "round %d record %d: details with code %d", round, k, code);
      }
    }
  }
  printf("host native atomics: %d (not needed); host wins %d; fatal on both sides: %d; non-fatal codes replaced "
         "by the blocks: %d\n", nativeAtomics, hostWins, combined, upgrades);
  ck_assert_msg(upgrades > 0, "no block replaced a non-fatal code with a fatal one");
  free(codesHost);
  free(won);
  cudaFree(dCodes);
  cudaFree(dWon);
  cudaFree(dClaims);
  cudaFreeHost(recsHost);
  cudaFreeHost(goHost);
}
END_TEST

/* The host sets flags[1] = 5 after a while; blocks 0 and 2.. never see
 * their flags. */
typedef struct {
  volatile unsigned long long* flag;
} setter_t;

static void* set_later(void* p) {
  setter_t* s = p;
  const struct timespec pause = {0, 20 * 1000 * 1000};
  nanosleep(&pause, NULL);
  __atomic_store_n(s->flag, 5ull, __ATOMIC_RELEASE);
  return NULL;
}

START_TEST(test_wait_timeout_breaks_other_waits) {
  const int blocks = 16;
  const long long timeoutNs = 200LL * 1000 * 1000, longNs = 20LL * 1000 * 1000 * 1000;
  int *recHost, *dRec, *dOk, *dClaim;
  unsigned long long *flagsHost, *dFlags, *dSeen;
  long long* dElapsed;
  CUDA_OK(cudaHostAlloc((void**)&recHost, sizeof(int) * MOE_ERR_WORDS, cudaHostAllocMapped));
  CUDA_OK(cudaHostAlloc((void**)&flagsHost, sizeof(unsigned long long) * 3, cudaHostAllocMapped));
  memset(recHost, 0, sizeof(int) * MOE_ERR_WORDS);
  memset(flagsHost, 0, sizeof(unsigned long long) * 3);
  CUDA_OK(cudaHostGetDevicePointer((void**)&dRec, recHost, 0));
  CUDA_OK(cudaHostGetDevicePointer((void**)&dFlags, flagsHost, 0));
  CUDA_OK(cudaMalloc((void**)&dOk, sizeof(int) * blocks));
  CUDA_OK(cudaMalloc((void**)&dClaim, sizeof(int)));
  CUDA_OK(cudaMemset(dClaim, 0, sizeof(int)));
  CUDA_OK(cudaMalloc((void**)&dSeen, sizeof(unsigned long long) * blocks));
  CUDA_OK(cudaMalloc((void**)&dElapsed, sizeof(long long) * blocks));
  moe_rank_ctx_t ctx;
  memset(&ctx, 0, sizeof(ctx));
  ctx.error = (volatile int*)dRec;
  ctx.errorClaim = dClaim;
  ctx.timeoutNs = timeoutNs;
  const double t0 = now_s();
  CUDA_OK(moe_test_wait_launch(&ctx, dFlags, longNs, blocks, dOk, dSeen, dElapsed, 0));
  setter_t s = {flagsHost + 1};
  pthread_t th;
  ck_assert_int_eq(pthread_create(&th, NULL, set_later, &s), 0);
  CUDA_OK(cudaDeviceSynchronize()); /* the kernel ends: no trap, no hang */
  const double took = now_s() - t0;
  pthread_join(th, NULL);
  int ok[16];
  unsigned long long seen[16];
  long long elapsed[16];
  CUDA_OK(cudaMemcpy(ok, dOk, sizeof(ok), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(seen, dSeen, sizeof(seen), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(elapsed, dElapsed, sizeof(elapsed), cudaMemcpyDeviceToHost));
  ck_assert_msg(took < 5.0, "the waits took %.1f s", took);
  /* Block 0 timed out and said what it waited for. */
  ck_assert_int_eq(ok[0], 0);
  ck_assert_msg(elapsed[0] >= timeoutNs, "block 0 gave up after %lld ns", elapsed[0]);
  moe_error_details_t d;
  int has = 0;
  ck_assert_int_eq(moe_error_read_host(recHost, &d, &has), MOE_KERR_TIMEOUT);
  ck_assert_int_eq(has, 1);
  ck_assert_int_eq(d.wait, MOE_WAIT_BARRIER);
  ck_assert_int_eq(d.peer, 3);
  ck_assert_uint_eq(d.want, 7);
  ck_assert_uint_eq(d.seen, 0);
  /* Block 1's flag arrived. */
  ck_assert_int_eq(ok[1], 1);
  ck_assert_uint_eq(seen[1], 5);
  /* The others ended once the comm was broken, long before their own
   * timeout (the error word is read about once a millisecond). */
  for (int b = 2; b < blocks; b++) {
    ck_assert_int_eq(ok[b], 0);
    ck_assert_msg(elapsed[b] < timeoutNs + 100LL * 1000 * 1000, "block %d waited %lld ns", b, elapsed[b]);
  }
  cudaFree(dOk);
  cudaFree(dClaim);
  cudaFree(dSeen);
  cudaFree(dElapsed);
  cudaFreeHost(recHost);
  cudaFreeHost(flagsHost);
}
END_TEST

int main(void) {
  moe_test_require_gpus(1);
  moe_test_seed();
  Suite* s = suite_create("error_record_gpu");
  TCase* tc = tcase_create("record");
  tcase_add_test(tc, test_blocks_and_host_race);
  tcase_add_test(tc, test_wait_timeout_breaks_other_waits);
  tcase_set_timeout(tc, 120);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
