/* SPDX-License-Identifier: Apache-2.0 */
/* Low-latency dispatch / combine with N virtual ranks on one GPU, against a
 * plain CPU reference, fresh random inputs every step (the harness is
 * ll_case.c). One host thread enqueues every rank's calls on the rank's own
 * stream: the low-latency calls never wait on the host, so the ranks meet on
 * the GPU. Each round runs two steps (A on buffer set 0, B on set 1) in one
 * of three orders (overlapped with split halves and work in between,
 * overlapped whole calls, or one step after the other), then checks both.
 * Also: timeouts, bad arguments and the call order. */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ll_case.h"
#include "nccl_moe.h"
#include "test_common.h"

/* ------------------------------------------------------------ tests */
START_TEST(test_default_shape_fp8_many_steps) {
  ll_case_t c = ll_base_case(8, 128, 7168, 8, 256);
  c.rounds = 4, c.dropProb = 10, c.dupProb = 25, c.cumulative = 1;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_topk9_288_experts_ue8m0_max_tokens) {
  ll_case_t c = ll_base_case(8, 64, 4096, 9, 288);
  c.scaleFormat = ncclMoeScaleUE8M0, c.tokens = LL_TOK_MAX, c.dropProb = 6, c.dupProb = 15;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_one_token_hidden8192_pow2) {
  ll_case_t c = ll_base_case(8, 1, 8192, 4, 64);
  c.scaleFormat = ncclMoeScalePow2, c.tokens = LL_TOK_ONE, c.rounds = 6;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_bf16_topk1_hidden2048_one_expert) {
  ll_case_t c = ll_base_case(4, 96, 2048, 1, 16);
  c.fp8 = 0, c.weights = 0, c.route = LL_ROUTE_ONE_EXPERT, c.tokens = LL_TOK_MAX; /* expert 0 gets every row */
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_hidden_not_multiple_of_512) {
  ll_case_t c = ll_base_case(2, 200, 2176, 6, 32); /* 17 blocks of 128: partial chunks */
  c.route = LL_ROUTE_SKEWED, c.dropProb = 4, c.rounds = 3;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_bf16_hidden2056_skewed) {
  ll_case_t c = ll_base_case(4, 33, 2056, 3, 8); /* BF16 needs only a multiple of 8 channels */
  c.fp8 = 0, c.route = LL_ROUTE_SKEWED, c.dupProb = 5;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_single_rank) {
  ll_case_t c = ll_base_case(1, 40, 1024, 3, 8);
  c.rounds = 3, c.dropProb = 5;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_combine_repeated) {
  ll_case_t c = ll_base_case(4, 50, 2048, 4, 32);
  c.combineRepeat = 3, c.rounds = 3;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_graph_replays) {
  ll_case_t c = ll_base_case(8, 128, 7168, 8, 256);
  c.rounds = 5, c.cumulative = 1, c.dropProb = 12, c.graph = 1;
  ll_run_graph(&c);
}
END_TEST

START_TEST(test_graph_replays_ue8m0_small) {
  ll_case_t c = ll_base_case(4, 16, 2048, 5, 40);
  c.rounds = 8, c.scaleFormat = ncclMoeScaleUE8M0, c.dupProb = 4, c.graph = 1;
  ll_run_graph(&c);
}
END_TEST

START_TEST(test_bad_expert_ids_are_reported_and_dropped) {
  ll_case_t c = ll_base_case(2, 64, 1024, 4, 8);
  c.badProb = 9, c.rounds = 2, c.fixedOrder = LL_ORDER_SEQUENTIAL + 1;
  ll_run_eager(&c);
}
END_TEST

/* ----------------------------------------------------------------- nodes */
/* Virtual nodes: ranks of other nodes through the proxy and the socket
 * transport on loopback, those of the same node with peer stores. */
START_TEST(test_nodes_2x4_fp8) {
  ll_case_t c = ll_base_case(8, 64, 2048, 8, 64);
  c.ranksPerNode = 4, c.rounds = 3, c.dropProb = 10, c.dupProb = 20, c.cumulative = 1;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_nodes_4x2_bf16_topk9_288_experts) {
  ll_case_t c = ll_base_case(8, 24, 2056, 9, 288); /* BF16, a partial last chunk */
  c.ranksPerNode = 2, c.fp8 = 0, c.route = LL_ROUTE_SKEWED, c.dupProb = 6;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_nodes_8x1_one_token_ue8m0) {
  ll_case_t c = ll_base_case(8, 1, 7168, 8, 256); /* every peer on another node */
  c.ranksPerNode = 1, c.tokens = LL_TOK_ONE, c.scaleFormat = ncclMoeScaleUE8M0, c.rounds = 4;
  ll_run_eager(&c);
}
END_TEST

START_TEST(test_nodes_graph_replays_pow2) {
  ll_case_t c = ll_base_case(4, 32, 4096, 6, 32);
  c.ranksPerNode = 2, c.rounds = 5, c.scaleFormat = ncclMoeScalePow2, c.cumulative = 1, c.dropProb = 8, c.graph = 1;
  ll_run_graph(&c);
}
END_TEST

START_TEST(test_nodes_combine_repeated_max_tokens) {
  ll_case_t c = ll_base_case(4, 40, 1024, 4, 16);
  c.ranksPerNode = 2, c.combineRepeat = 3, c.tokens = LL_TOK_MAX, c.rounds = 2;
  ll_run_eager(&c);
}
END_TEST

/* ---------------------------------------------------------------- errors */
/* n virtual ranks in nodes of ranksPerNode (n: one node). */
static ncclMoeComm_t make_comms(int n, int ranksPerNode, int llTokens, int timeoutMs, ncclMoeComm_t* comms) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 16, cfg.hidden = 1024, cfg.numExperts = 8, cfg.maxTopk = 4, cfg.timeoutMs = timeoutMs;
  cfg.llMaxTokensPerRank = llTokens;
  ck_assert_msg(ncclMoeCommInitVirtualNodes(n, ranksPerNode, 0, &cfg, comms) == ncclSuccess, "init: %s",
                ncclMoeGetLastError());
  return comms[0];
}

/* Rank 0 dispatches, rank 1 (on the same node, or another) never does. */
static void dispatch_alone_times_out(int ranksPerNode) {
  ncclMoeComm_t comms[2];
  ncclMoeComm_t comm = make_comms(2, ranksPerNode, 16, 300, comms);
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(comm, &h), ncclSuccess);
  void *x, *idx;
  cudaMalloc(&x, 16 * 1024 * 2);
  cudaMalloc(&idx, 16 * 4 * 8);
  cudaMemset(idx, 0, 16 * 4 * 8);
  ncclMoeLowLatencyDispatchArgs_t a = {.x = x, .numTokens = 16, .hidden = 1024, .topk = 4, .topkIdx = idx,
                                       .sendType = ncclFloat8e4m3};
  ncclMoeLowLatencyDispatchResult_t r;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h, &r, 0), ncclSuccess); /* no host wait */
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);                        /* kernels end, no trap */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  ck_assert_msg(s < 10.0, "timeout took %.1f s", s);
  ncclResult_t async;
  ck_assert_int_eq(ncclMoeCommGetAsyncError(comm, &async), ncclSuccess);
  ck_assert_int_eq(async, ncclSystemError);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h, &r, 0), ncclSystemError);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "did not answer"));
  ncclMoeHandleDestroy(h);
  cudaFree(x), cudaFree(idx);
  ncclMoeCommDestroy(comms[0]);
  ncclMoeCommDestroy(comms[1]);
}

START_TEST(test_timeout_when_peer_never_arrives) {
  dispatch_alone_times_out(2);
}
END_TEST

START_TEST(test_nodes_timeout_when_remote_rank_never_sends) {
  dispatch_alone_times_out(1);
}
END_TEST

/* Rank 0 combines, rank 1 never does: rank 0's receive half times out on
 * the rows rank 1 should send back, and says what it waited for. */
START_TEST(test_combine_timeout_when_expert_rank_never_sends) {
  ncclMoeComm_t comms[2];
  make_comms(2, 2, 16, 300, comms);
  ncclMoeHandle_t h[2];
  cudaStream_t s[2];
  void *x, *idx, *y, *out;
  cudaMalloc(&x, 16 * 1024 * 2);
  cudaMalloc(&idx, 16 * 4 * 8);
  cudaMalloc(&y, 4 * 2 * 16 * 1024 * 2); /* [L, N * M, H] */
  cudaMalloc(&out, 16 * 1024 * 2);
  int64_t hidx[16 * 4];
  for (int i = 0; i < 16 * 4; i++) hidx[i] = i % 4 == 0 ? 4 : -1; /* expert 4 lives on rank 1 */
  cudaMemcpy(idx, hidx, sizeof(hidx), cudaMemcpyHostToDevice);
  cudaMemset(x, 0, 16 * 1024 * 2);
  for (int r = 0; r < 2; r++) {
    ck_assert_int_eq(ncclMoeHandleCreate(comms[r], &h[r]), ncclSuccess);
    cudaStreamCreateWithFlags(&s[r], cudaStreamNonBlocking);
    ncclMoeLowLatencyDispatchArgs_t a = {.x = r == 0 ? x : NULL, .numTokens = r == 0 ? 16 : 0, .hidden = 1024,
                                         .topk = 4, .topkIdx = r == 0 ? idx : NULL, .sendType = ncclBfloat16};
    ncclMoeLowLatencyDispatchResult_t res;
    ck_assert_int_eq(ncclMoeLowLatencyDispatch(comms[r], &a, h[r], &res, s[r]), ncclSuccess);
  }
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
  ncclMoeLowLatencyCombineArgs_t c = {.x = y, .out = out};
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comms[0], &c, h[0], s[0]), ncclSuccess);
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess); /* kernels end, no trap */
  ncclResult_t async;
  ck_assert_int_eq(ncclMoeCommGetAsyncError(comms[0], &async), ncclSuccess);
  ck_assert_int_eq(async, ncclSystemError);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "combine rows") != NULL, "message: %s", ncclMoeGetLastError());
  for (int r = 0; r < 2; r++) ncclMoeHandleDestroy(h[r]), cudaStreamDestroy(s[r]);
  cudaFree(x), cudaFree(idx), cudaFree(y), cudaFree(out);
  ncclMoeCommDestroy(comms[0]);
  ncclMoeCommDestroy(comms[1]);
}
END_TEST

START_TEST(test_bad_arguments) {
  ncclMoeComm_t comms[1];
  ncclMoeComm_t comm = make_comms(1, 1, 16, 2000, comms);
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(comm, &h), ncclSuccess);
  char *x, *idx, *cum;
  cudaMalloc((void**)&x, 16 * 1024 * 2 + 64);
  cudaMalloc((void**)&idx, 16 * 4 * 8);
  cudaMalloc((void**)&cum, 64);
  cudaMemset(idx, 0xFF, 16 * 4 * 8); /* all -1 */
  ncclMoeLowLatencyDispatchResult_t r;
  const ncclMoeLowLatencyDispatchArgs_t good = {.x = x, .numTokens = 16, .hidden = 1024, .topk = 4,
                                                .topkIdx = (int64_t*)idx, .sendType = ncclFloat8e4m3};
  struct { const char* what; ncclMoeLowLatencyDispatchArgs_t a; const char* msg; } bad[16];
  int n = 0;
#define BAD(field, value, text) do { bad[n].a = good; bad[n].a.field = value; bad[n].what = #field; bad[n].msg = text; n++; } while (0)
  BAD(x, NULL, "x is NULL");
  BAD(x, x + 8, "aligned");
  BAD(x, (char*)&good, "not device memory");
  BAD(topkIdx, NULL, "topkIdx is NULL");
  BAD(numTokens, 17, "llMaxTokensPerRank");
  BAD(numTokens, -1, "numTokens");
  BAD(hidden, 2048, "config.hidden");
  BAD(hidden, 1000, "multiple of 128");
  BAD(topk, 0, "topk");
  BAD(topk, 5, "maxTopk");
  BAD(sendType, ncclFloat, "sendType");
  BAD(scaleFormat, (ncclMoeScaleFormat_t)7, "scaleFormat");
  BAD(cumulativeRecvCount, (int64_t*)(cum + 4), "cumulativeRecvCount");
  BAD(sendOnly, 2, "sendOnly");
#undef BAD
  for (int i = 0; i < n; i++) {
    ncclResult_t res = ncclMoeLowLatencyDispatch(comm, &bad[i].a, h, &r, 0);
    ck_assert_msg(res == ncclInvalidArgument, "%s: got %d", bad[i].what, res);
    ck_assert_msg(strstr(ncclMoeGetLastError(), bad[i].msg) != NULL, "%s: message '%s'", bad[i].what,
                  ncclMoeGetLastError());
  }
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, NULL, h, &r, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &good, NULL, &r, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &good, h, NULL, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(NULL, &good, h, &r, 0), ncclInvalidArgument);
  /* BF16 may use any multiple of 8; 0 tokens need no pointers. */
  ncclMoeLowLatencyDispatchArgs_t ok = good;
  ok.sendType = ncclBfloat16, ok.hidden = 1000, ok.scaleFormat = (ncclMoeScaleFormat_t)7;
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &ok, h, &r, 0), ncclSuccess);
  ck_assert_ptr_null(r.recvScales);
  ok = good, ok.numTokens = 0, ok.x = NULL, ok.topkIdx = NULL;
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &ok, h, &r, 0), ncclSuccess);

  /* Combine arguments. */
  ncclMoeLowLatencyCombineArgs_t c = {.x = x, .out = x};
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, NULL, h, 0), ncclInvalidArgument);
  c.x = NULL;
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h, 0), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "x is NULL"));
  c.x = x, c.sendOnly = 3;
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h, 0), ncclInvalidArgument);
  c.sendOnly = 0;
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h, 0), ncclSuccess); /* 0 tokens: out unused */
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);

  /* A comm without low-latency buffers. */
  ncclMoeComm_t plain[1];
  make_comms(1, 1, 0, 2000, plain);
  size_t bytes = 1;
  ck_assert_int_eq(ncclMoeLowLatencyBufferBytes(plain[0], &bytes), ncclSuccess);
  ck_assert_uint_eq(bytes, 0);
  ncclMoeHandle_t hp;
  ck_assert_int_eq(ncclMoeHandleCreate(plain[0], &hp), ncclSuccess);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(plain[0], &good, hp, &r, 0), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "llMaxTokensPerRank"));
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &good, hp, &r, 0), ncclInvalidArgument); /* other comm's handle */
  ncclMoeHandleDestroy(hp);
  ncclMoeCommDestroy(plain[0]);

  /* Config limits. */
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 8, cfg.hidden = 128, cfg.numExperts = 8, cfg.llMaxTokensPerRank = NCCL_MOE_LL_MAX_TOKENS + 1;
  ncclMoeComm_t more[2];
  ck_assert_int_eq(ncclMoeCommInitVirtual(2, 0, &cfg, more), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "llMaxTokensPerRank"));
  cfg.llMaxTokensPerRank = -1;
  ck_assert_int_eq(ncclMoeCommInitVirtual(2, 0, &cfg, more), ncclInvalidArgument);

  ncclMoeHandleDestroy(h);
  cudaFree(x), cudaFree(idx), cudaFree(cum);
  ncclMoeCommDestroy(comms[0]);
}
END_TEST

/* Halves in the wrong order are refused on the host (one rank: the kernels
 * of the calls that do go through complete on their own). */
START_TEST(test_call_order) {
  ncclMoeComm_t comms[1];
  ncclMoeComm_t comm = make_comms(1, 1, 16, 2000, comms);
  ncclMoeHandle_t h[3];
  for (int i = 0; i < 3; i++) ck_assert_int_eq(ncclMoeHandleCreate(comm, &h[i]), ncclSuccess);
  char *x, *idx;
  cudaMalloc((void**)&x, 16 * 1024 * 2);
  cudaMalloc((void**)&idx, 16 * 4 * 8);
  cudaMemset(idx, 0, 16 * 4 * 8);
  ncclMoeLowLatencyDispatchResult_t r;
  ncclMoeLowLatencyDispatchArgs_t a = {.x = x, .numTokens = 16, .hidden = 1024, .topk = 4, .topkIdx = (int64_t*)idx,
                                       .sendType = ncclBfloat16, .sendOnly = 1};
  ncclMoeLowLatencyCombineArgs_t c = {.x = x, .out = x};
  ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(comm, h[0], 0), ncclInvalidUsage); /* nothing sent */
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclInvalidUsage);  /* nothing dispatched */
  ck_assert_int_eq(ncclMoeLowLatencyCombineRecv(comm, h[0], 0), ncclInvalidUsage);
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h[0], &r, 0), ncclSuccess); /* set 0 */
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h[0], &r, 0), ncclInvalidUsage); /* h[0] pending */
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclInvalidUsage);         /* not received */
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "DispatchRecv"));
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h[1], &r, 0), ncclSuccess); /* set 1 */
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h[2], &r, 0), ncclInvalidUsage); /* set 0 still pending */
  ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(comm, h[0], 0), ncclSuccess);
  ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(comm, h[1], 0), ncclSuccess);
  ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(comm, h[1], 0), ncclInvalidUsage); /* twice */
  c.sendOnly = 1;
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclSuccess);
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclInvalidUsage); /* receive pending */
  ck_assert_int_eq(ncclMoeLowLatencyCombineRecv(comm, h[0], 0), ncclSuccess);
  c.sendOnly = 0;
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclSuccess); /* again: allowed */
  a.sendOnly = 0;
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(comm, &a, h[2], &r, 0), ncclSuccess); /* takes set 0 */
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[0], 0), ncclInvalidUsage); /* h[0]'s set reused */
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "buffer set"));
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[1], 0), ncclSuccess);
  ck_assert_int_eq(ncclMoeLowLatencyCombine(comm, &c, h[2], 0), ncclSuccess);
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
  ncclResult_t async;
  ck_assert_int_eq(ncclMoeCommGetAsyncError(comm, &async), ncclSuccess);
  ck_assert_int_eq(async, ncclSuccess);
  for (int i = 0; i < 3; i++) ncclMoeHandleDestroy(h[i]);
  cudaFree(x), cudaFree(idx);
  ncclMoeCommDestroy(comms[0]);
}
END_TEST

int main(void) {
  moe_test_virtual_env();
  moe_test_require_gpus(1);
  moe_test_seed();
  Suite* s = suite_create("lowlatency");
  TCase* tc = tcase_create("dispatch_combine");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_default_shape_fp8_many_steps);
  tcase_add_test(tc, test_topk9_288_experts_ue8m0_max_tokens);
  tcase_add_test(tc, test_one_token_hidden8192_pow2);
  tcase_add_test(tc, test_bf16_topk1_hidden2048_one_expert);
  tcase_add_test(tc, test_hidden_not_multiple_of_512);
  tcase_add_test(tc, test_bf16_hidden2056_skewed);
  tcase_add_test(tc, test_single_rank);
  tcase_add_test(tc, test_combine_repeated);
  tcase_add_test(tc, test_graph_replays);
  tcase_add_test(tc, test_graph_replays_ue8m0_small);
  tcase_add_test(tc, test_bad_expert_ids_are_reported_and_dropped);
  TCase* tn = tcase_create("nodes");
  tcase_set_timeout(tn, 600);
  tcase_add_test(tn, test_nodes_2x4_fp8);
  tcase_add_test(tn, test_nodes_4x2_bf16_topk9_288_experts);
  tcase_add_test(tn, test_nodes_8x1_one_token_ue8m0);
  tcase_add_test(tn, test_nodes_graph_replays_pow2);
  tcase_add_test(tn, test_nodes_combine_repeated_max_tokens);
  suite_add_tcase(s, tc);
  suite_add_tcase(s, tn);
  TCase* te = tcase_create("errors");
  tcase_set_timeout(te, 120);
  tcase_add_test(te, test_timeout_when_peer_never_arrives);
  tcase_add_test(te, test_nodes_timeout_when_remote_rank_never_sends);
  tcase_add_test(te, test_combine_timeout_when_expert_rank_never_sends);
  tcase_add_test(te, test_bad_arguments);
  tcase_add_test(te, test_call_order);
  suite_add_tcase(s, te);
  return moe_test_run(s);
}
