/* SPDX-License-Identifier: Apache-2.0 */
/* Intranode dispatch / combine with N virtual ranks on one GPU, against a
 * plain CPU reference on fresh random inputs. Each virtual rank runs on its
 * own host thread and stream, through the public API. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/moe_comm.h"
#include "tests/support/moe_fp8.h"
#include "moe_case.h"
#include "nccl_moe.h"
#include "test_common.h"

START_TEST(test_bf16_exact_2ranks) {
  case_t c = base_case(2, 97, 2048, 4, 8);
  c.dropProb = 7;
  run_case(&c);
}
END_TEST

START_TEST(test_fp8_exact_4ranks) {
  case_t c = base_case(4, 300, 7168, 8, 64);
  c.xFp8 = 1, c.sendFp8 = 1, c.dropProb = 5, c.alignment = 32;
  run_case(&c);
}
END_TEST

START_TEST(test_cast_8ranks_default_shape) {
  case_t c = base_case(8, 256, 7168, 8, 256);
  c.sendFp8 = 1;
  run_case(&c);
}
END_TEST

START_TEST(test_pow2_cast_and_zero_tokens) {
  case_t c = base_case(8, 130, 4096, 9, 288);
  c.sendFp8 = 1, c.pow2 = 1, c.tokens[0] = 0, c.tokens[5] = 0, c.tokens[3] = 1;
  run_case(&c);
}
END_TEST

START_TEST(test_all_to_one_rank) {
  case_t c = base_case(4, 200, 1024, 2, 16);
  c.route = ROUTE_ONE_RANK;
  run_case(&c);
}
END_TEST

START_TEST(test_odd_hidden_bf16_topk1) {
  case_t c = base_case(4, 150, 2056, 1, 8); /* 2056 is not a multiple of 128 */
  c.route = ROUTE_SKEWED, c.weights = 0;
  run_case(&c);
}
END_TEST

START_TEST(test_all_dropped) {
  case_t c = base_case(2, 64, 512, 3, 8);
  c.dropProb = 1; /* every entry -1: no rank receives anything */
  run_case(&c);
}
END_TEST

START_TEST(test_reuse_handle_zero_copy) {
  case_t c = base_case(4, 333, 3072, 6, 32);
  c.sendFp8 = 1, c.reuse = 1, c.zeroCopy = 1, c.dropProb = 9;
  run_case(&c);
}
END_TEST

START_TEST(test_capacity_graph_replays) {
  case_t c = base_case(8, 128, 2048, 8, 64);
  c.xFp8 = 1, c.sendFp8 = 1, c.capacity = 8 * 128, c.graphReplays = 10, c.route = ROUTE_SKEWED;
  run_case(&c);
}
END_TEST

START_TEST(test_capacity_overflow_is_an_error) {
  case_t c = base_case(4, 100, 1024, 4, 16);
  c.route = ROUTE_ONE_RANK, c.capacity = 150, c.overflow = 1; /* rank 0 gets 400 rows */
  run_case(&c);
}
END_TEST

START_TEST(test_capacity_graph_zero_copy_bf16) {
  case_t c = base_case(2, 100, 1024, 4, 16);
  c.capacity = 200, c.graphReplays = 3, c.zeroCopy = 1;
  run_case(&c);
}
END_TEST

/* ---------------------------------------------------------------- errors */
static ncclMoeComm_t g_comms[2];

static void make_comms(int timeoutMs) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 64, cfg.hidden = 1024, cfg.numExperts = 8, cfg.maxTopk = 4, cfg.timeoutMs = timeoutMs;
  ck_assert_int_eq(ncclMoeCommInitVirtual(2, 0, &cfg, g_comms), ncclSuccess);
}

START_TEST(test_timeout_when_peer_never_arrives) {
  make_comms(300);
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(g_comms[0], &h), ncclSuccess);
  void *x, *idx;
  cudaMalloc(&x, 64 * 1024 * 2);
  cudaMalloc(&idx, 64 * 4 * 8);
  cudaMemset(idx, 0, 64 * 4 * 8);
  ncclMoeDispatchArgs_t a = {.x = x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 64,
                             .hidden = 1024, .topk = 4, .topkIdx = idx, .capacity = 128};
  ncclMoeDispatchResult_t r;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ck_assert_int_eq(ncclMoeDispatch(g_comms[0], &a, h, &r, 0), ncclSuccess); /* capacity: no host wait */
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);                  /* kernels end, no trap */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  ck_assert_msg(s < 10.0, "timeout took %.1f s", s);
  ncclResult_t async;
  ck_assert_int_eq(ncclMoeCommGetAsyncError(g_comms[0], &async), ncclSuccess);
  ck_assert_int_eq(async, ncclSystemError);
  ck_assert_int_eq(ncclMoeDispatch(g_comms[0], &a, h, &r, 0), ncclSystemError);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "did not answer"));
  ncclMoeHandleDestroy(h);
  ncclMoeCommDestroy(g_comms[0]);
  ncclMoeCommDestroy(g_comms[1]);
}
END_TEST

/* Exact mode: the host waits for the counts the notify kernel publishes; a
 * peer that never comes ends that wait with the timeout error (no hang, no
 * made-up count). */
START_TEST(test_exact_wait_ends_at_a_timeout) {
  make_comms(300);
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(g_comms[0], &h), ncclSuccess);
  void *x, *idx;
  cudaMalloc(&x, 64 * 1024 * 2);
  cudaMalloc(&idx, 64 * 4 * 8);
  cudaMemset(idx, 0, 64 * 4 * 8);
  ncclMoeDispatchArgs_t a = {.x = x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 64,
                             .hidden = 1024, .topk = 4, .topkIdx = idx, .capacity = 0};
  ncclMoeDispatchResult_t r;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ck_assert_int_eq(ncclMoeDispatch(g_comms[0], &a, h, &r, 0), ncclSystemError);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  ck_assert_msg(s < 10.0, "the exact-mode wait took %.1f s", s);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "did not answer") != NULL, "message: %s", ncclMoeGetLastError());
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
  ncclMoeHandleDestroy(h);
  cudaFree(x);
  cudaFree(idx);
  ncclMoeCommDestroy(g_comms[0]);
  ncclMoeCommDestroy(g_comms[1]);
}
END_TEST

/* Exact mode waits on the host: inside a stream capture it is refused before
 * anything is enqueued (the capture stays valid). */
START_TEST(test_exact_mode_is_not_capturable) {
  make_comms(2000);
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(g_comms[0], &h), ncclSuccess);
  void *x, *idx;
  cudaMalloc(&x, 64 * 1024 * 2);
  cudaMalloc(&idx, 64 * 4 * 8);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  ncclMoeDispatchArgs_t a = {.x = x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 64,
                             .hidden = 1024, .topk = 4, .topkIdx = idx, .capacity = 0};
  ncclMoeDispatchResult_t r;
  ck_assert_int_eq(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  ck_assert_int_eq(ncclMoeDispatch(g_comms[0], &a, h, &r, stream), ncclInvalidUsage);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "CUDA graph") != NULL, "message: %s", ncclMoeGetLastError());
  cudaGraph_t graph;
  ck_assert_int_eq(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  size_t nodes = 1;
  ck_assert_int_eq(cudaGraphGetNodes(graph, NULL, &nodes), cudaSuccess);
  ck_assert_uint_eq(nodes, 0);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  ncclMoeHandleDestroy(h);
  cudaFree(x);
  cudaFree(idx);
  ncclMoeCommDestroy(g_comms[0]);
  ncclMoeCommDestroy(g_comms[1]);
}
END_TEST

/* Each virtual rank is set up by a thread of its own: a failure there comes
 * back to the caller with its message, and nothing is left behind. */
START_TEST(test_virtual_init_failure_is_reported) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 1 << 20, cfg.hidden = 65536, cfg.numExperts = 2; /* 2 x 256 GiB receive rows */
  ncclMoeComm_t comms[2] = {(ncclMoeComm_t)1, (ncclMoeComm_t)1};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ck_assert_int_eq(ncclMoeCommInitVirtual(2, 0, &cfg, comms), ncclUnhandledCudaError);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "cannot allocate") != NULL, "message: %s", ncclMoeGetLastError());
  ck_assert_ptr_null(comms[0]);
  ck_assert_ptr_null(comms[1]);
  ck_assert((t1.tv_sec - t0.tv_sec) < 10);
  ck_assert_int_eq(ncclMoeCommDestroy(NULL), ncclSuccess);
}
END_TEST

START_TEST(test_bad_arguments) {
  make_comms(2000);
  ncclMoeComm_t comm = g_comms[0];
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(comm, &h), ncclSuccess);
  char *x, *idx;
  cudaMalloc((void**)&x, 64 * 1024 * 2 + 64);
  cudaMalloc((void**)&idx, 64 * 4 * 8);
  ncclMoeDispatchResult_t r;
  ncclMoeDispatchArgs_t good = {.x = x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 64,
                                .hidden = 1024, .topk = 4, .topkIdx = (int64_t*)idx, .capacity = 128};
  struct { const char* what; ncclMoeDispatchArgs_t a; const char* msg; } bad[12];
  int n = 0;
#define BAD(field, value, text) do { bad[n].a = good; bad[n].a.field = value; bad[n].what = #field; bad[n].msg = text; n++; } while (0)
  BAD(x, NULL, "x is NULL");
  BAD(x, x + 8, "aligned");
  BAD(topkIdx, NULL, "topkIdx is NULL");
  BAD(capacity, 1000, "capacity");
  BAD(hidden, 2048, "hidden");
  BAD(hidden, 1004, "multiple");
  BAD(topk, 0, "topk");
  BAD(numTokens, 65, "numTokens");
  BAD(xType, ncclFloat, "xType");
  BAD(x, (char*)&good, "not device memory");
#undef BAD
  bad[n].a = good, bad[n].a.xType = ncclFloat8e4m3, bad[n].a.sendType = ncclFloat8e4m3, bad[n].what = "xScales";
  bad[n++].msg = "xScales";
  bad[n].a = good, bad[n].a.reuseHandle = 1, bad[n].what = "reuse", bad[n++].msg = "no routing";
  for (int i = 0; i < n; i++) {
    ncclResult_t res = ncclMoeDispatch(comm, &bad[i].a, h, &r, 0);
    ck_assert_msg(res == ncclInvalidArgument, "%s: got %d", bad[i].what, res);
    ck_assert_msg(strstr(ncclMoeGetLastError(), bad[i].msg) != NULL, "%s: message '%s'", bad[i].what,
                  ncclMoeGetLastError());
  }
  ck_assert_int_eq(ncclMoeDispatch(comm, NULL, h, &r, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeDispatch(comm, &good, NULL, &r, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeDispatch(comm, &good, h, NULL, 0), ncclInvalidArgument);
  ncclMoeCombineArgs_t c = {.x = x, .hidden = 1024, .out = x};
  ck_assert_int_eq(ncclMoeCombine(comm, &c, h, 0), ncclInvalidArgument); /* no dispatch yet */
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "no routing"));
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  ncclMoeComm_t more[3];
  cfg.maxTokensPerRank = 8, cfg.hidden = 128, cfg.numExperts = 8;
  ck_assert_int_eq(ncclMoeCommInitVirtual(3, 0, &cfg, more), ncclInvalidArgument); /* 8 % 3 */
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "multiple of the 3 ranks"));
  cfg.size = 4;
  ck_assert_int_eq(ncclMoeCommInitVirtual(2, 0, &cfg, more), ncclInvalidArgument);
  ncclMoeHandleDestroy(h);
  ncclMoeCommDestroy(g_comms[0]);
  ncclMoeCommDestroy(g_comms[1]);
}
END_TEST

START_TEST(test_bad_expert_id_is_reported) {
  make_comms(5000);
  ncclMoeHandle_t h[2];
  int64_t* idx[2];
  void* x[2];
  for (int r = 0; r < 2; r++) {
    ncclMoeHandleCreate(g_comms[r], &h[r]);
    cudaMalloc((void**)&idx[r], 16 * 4 * 8);
    cudaMalloc(&x[r], 16 * 1024 * 2);
    int64_t host[64];
    for (int i = 0; i < 64; i++) host[i] = i % 8;
    if (r == 1) host[5] = 8; /* out of range */
    cudaMemcpy(idx[r], host, sizeof(host), cudaMemcpyHostToDevice);
  }
  cudaStream_t s[2];
  cudaStreamCreate(&s[0]);
  cudaStreamCreate(&s[1]);
  ncclMoeDispatchResult_t res;
  for (int r = 0; r < 2; r++) {
    ncclMoeDispatchArgs_t a = {.x = x[r], .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 16,
                               .hidden = 1024, .topk = 4, .topkIdx = idx[r], .capacity = 64};
    ck_assert_int_eq(ncclMoeDispatch(g_comms[r], &a, h[r], &res, s[r]), ncclSuccess);
  }
  cudaDeviceSynchronize();
  ncclResult_t async;
  ncclMoeCommGetAsyncError(g_comms[1], &async);
  ck_assert_int_eq(async, ncclInvalidArgument);
  ncclMoeCommGetAsyncError(g_comms[0], &async);
  ck_assert_int_eq(async, ncclSuccess); /* rank 0's batch was fine; the protocol completed */
  for (int r = 0; r < 2; r++) ncclMoeHandleDestroy(h[r]);
  ncclMoeCommDestroy(g_comms[0]);
  ncclMoeCommDestroy(g_comms[1]);
}
END_TEST

int main(void) {
  moe_test_virtual_env();
  moe_test_require_gpus(1);
  moe_test_seed();
  Suite* s = suite_create("intranode");
  TCase* tc = tcase_create("dispatch_combine");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, test_bf16_exact_2ranks);
  tcase_add_test(tc, test_fp8_exact_4ranks);
  tcase_add_test(tc, test_cast_8ranks_default_shape);
  tcase_add_test(tc, test_pow2_cast_and_zero_tokens);
  tcase_add_test(tc, test_all_to_one_rank);
  tcase_add_test(tc, test_odd_hidden_bf16_topk1);
  tcase_add_test(tc, test_all_dropped);
  tcase_add_test(tc, test_reuse_handle_zero_copy);
  tcase_add_test(tc, test_capacity_graph_replays);
  tcase_add_test(tc, test_capacity_graph_zero_copy_bf16);
  suite_add_tcase(s, tc);
  /* A case of its own, so that CK_RUN_CASE=overflow repeats it alone. */
  TCase* to = tcase_create("overflow");
  tcase_set_timeout(to, 300);
  tcase_add_test(to, test_capacity_overflow_is_an_error);
  suite_add_tcase(s, to);
  TCase* te = tcase_create("errors");
  tcase_set_timeout(te, 120);
  tcase_add_test(te, test_timeout_when_peer_never_arrives);
  tcase_add_test(te, test_bad_arguments);
  tcase_add_test(te, test_bad_expert_id_is_reported);
  tcase_add_test(te, test_exact_wait_ends_at_a_timeout);
  tcase_add_test(te, test_exact_mode_is_not_capturable);
  tcase_add_test(te, test_virtual_init_failure_is_reported);
  suite_add_tcase(s, te);
  return moe_test_run(s);
}
