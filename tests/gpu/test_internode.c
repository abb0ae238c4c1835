/* SPDX-License-Identifier: Apache-2.0 */
/* Internode dispatch / combine on one GPU with virtual nodes: ranks of one
 * virtual node map each other's buffers, ranks of different ones talk only
 * through the socket transport on loopback (proxy threads, slabs, credits),
 * against the same CPU reference as the intranode tests. Also: every rank a
 * node of its own (the path NCCL_MOE_P2P_DISABLE=1 takes), a peer that never
 * arrives, and a proxy whose connections close. */
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe_case.h"
#include "core/moe_comm.h"
#include "common/moe_env.h"
#include "nccl_moe.h"
#include "test_common.h"
#include "transport/moe_transport.h"

static case_t nodes_case(int nodes, int perNode, int T, int H, int K, int E) {
  case_t c = base_case(nodes * perNode, T, H, K, E);
  c.ranksPerNode = perNode;
  return c;
}

START_TEST(test_2x4_cast_fp8) {
  case_t c = nodes_case(2, 4, 96, 2048, 8, 64);
  c.sendFp8 = 1, c.dropProb = 9;
  run_case(&c);
}
END_TEST

/* Chunks of 4 KiB: every slab travels in dozens of chunks (the kernels wait
 * and mark chunk by chunk). */
START_TEST(test_2x4_many_chunks) {
  setenv("NCCL_MOE_NET_CHUNK_KB", "4", 1);
  moe_env_reload();
  case_t c = nodes_case(2, 4, 96, 2048, 8, 64);
  c.weights = 1, c.dropProb = 7;
  run_case(&c);
  unsetenv("NCCL_MOE_NET_CHUNK_KB");
  moe_env_reload();
}
END_TEST

START_TEST(test_4x2_bf16_exact_uneven) {
  case_t c = nodes_case(4, 2, 120, 1024, 4, 32);
  c.route = ROUTE_SKEWED, c.tokens[1] = 0, c.tokens[6] = 1, c.alignment = 16;
  run_case(&c);
}
END_TEST

START_TEST(test_3x1_fp8_input_capacity_graph) {
  case_t c = nodes_case(3, 1, 64, 1024, 6, 24);
  c.xFp8 = 1, c.sendFp8 = 1, c.capacity = 3 * 64, c.graphReplays = 10, c.dropProb = 5;
  run_case(&c);
}
END_TEST

START_TEST(test_2x4_reuse_zero_copy_all_to_one_rank) {
  case_t c = nodes_case(2, 4, 80, 3072, 3, 16);
  c.reuse = 1, c.zeroCopy = 1, c.route = ROUTE_ONE_RANK; /* node 1 receives nothing */
  run_case(&c);
}
END_TEST

/* Every rank its own node: what NCCL_MOE_P2P_DISABLE=1 gives processes of
 * one host, where nothing moves by peer stores. */
START_TEST(test_8x1_every_rank_a_node) {
  case_t c = nodes_case(8, 1, 40, 2048, 8, 64);
  c.sendFp8 = 1, c.pow2 = 1, c.tokens[2] = 0, c.dropProb = 4;
  run_case(&c);
}
END_TEST

START_TEST(test_2x2_overflow_is_an_error) {
  case_t c = nodes_case(2, 2, 100, 1024, 4, 16);
  c.route = ROUTE_ONE_RANK, c.capacity = 150, c.overflow = 1;
  run_case(&c);
}
END_TEST

/* ---------------------------------------------------------------- errors */
static ncclMoeComm_t g_comms[2];
static void* g_x;
static void* g_idx;

static void make_two_nodes(int timeoutMs) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 32, cfg.hidden = 1024, cfg.numExperts = 8, cfg.maxTopk = 4, cfg.timeoutMs = timeoutMs;
  ncclResult_t res = ncclMoeCommInitVirtualNodes(2, 1, 0, &cfg, g_comms);
  ck_assert_msg(res == ncclSuccess, "init: %s", ncclMoeGetLastError());
  ck_assert_ptr_nonnull(g_comms[0]->inter);
  int rank = -1, nRanks = 0, device = -1, nNodes = 0;
  ncclMoeConfig_t got;
  ck_assert_int_eq(ncclMoeCommQuery(g_comms[1], &rank, &nRanks, &device, &nNodes, &got), ncclSuccess);
  ck_assert(rank == 1 && nRanks == 2 && device == 0 && nNodes == 2);
  ck_assert_int_eq(got.maxTopk, 4);
  ck_assert_int_eq(got.maxRecvTokens, 2 * 32); /* the default, filled in */
  cudaMalloc(&g_x, 32 * 1024 * 2);
  cudaMalloc(&g_idx, 32 * 4 * 8);
  cudaMemset(g_x, 0, 32 * 1024 * 2);
  cudaMemset(g_idx, 0, 32 * 4 * 8); /* expert 0: rank 0 */
}

/* Rank 0 dispatches alone (capacity mode: the call returns while its kernels
 * wait for rank 1); `meanwhile` runs then. Returns the seconds until rank 0's
 * kernels ended, and its async error in *async. */
static double dispatch_alone(ncclResult_t* async, void (*meanwhile)(void)) {
  ncclMoeHandle_t h;
  ck_assert_int_eq(ncclMoeHandleCreate(g_comms[0], &h), ncclSuccess);
  int64_t host[32 * 4];
  for (int i = 0; i < 32 * 4; i++) host[i] = i % 8; /* half the experts are rank 1's */
  cudaMemcpy(g_idx, host, sizeof(host), cudaMemcpyHostToDevice);
  ncclMoeDispatchArgs_t a = {.x = g_x, .xType = ncclBfloat16, .sendType = ncclBfloat16, .numTokens = 32,
                             .hidden = 1024, .topk = 4, .topkIdx = g_idx, .capacity = 64};
  ncclMoeDispatchResult_t r;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ck_assert_int_eq(ncclMoeDispatch(g_comms[0], &a, h, &r, 0), ncclSuccess); /* capacity: no host wait */
  if (meanwhile != NULL) meanwhile();
  ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);                  /* kernels end, no trap */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  ck_assert_int_eq(ncclMoeCommGetAsyncError(g_comms[0], async), ncclSuccess);
  ncclMoeHandleDestroy(h);
  return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
}

static void free_two_nodes(void) {
  cudaFree(g_x);
  cudaFree(g_idx);
  ck_assert_int_eq(ncclMoeCommDestroy(g_comms[0]), ncclSuccess);
  ck_assert_int_eq(ncclMoeCommDestroy(g_comms[1]), ncclSuccess);
}

START_TEST(test_peer_node_never_arrives) {
  make_two_nodes(300);
  ncclResult_t async;
  double s = dispatch_alone(&async, NULL);
  ck_assert_msg(s < 10.0, "timeout took %.1f s", s);
  ck_assert_int_eq(async, ncclSystemError);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "did not answer"));
  free_two_nodes();
}
END_TEST

static void close_rank1(void) {
  moe_proxy_destroy(g_comms[1]->inter->ep.proxy);
  g_comms[1]->inter->ep.proxy = NULL;
}

/* Rank 1's proxy goes away (its connections close): rank 0's proxy sees it,
 * and rank 0's kernels stop at once with the proxy's error, well before the
 * (long) timeout. */
START_TEST(test_closed_connection_is_an_error) {
  make_two_nodes(20000);
  ncclResult_t async;
  double s = dispatch_alone(&async, close_rank1);
  ck_assert_msg(s < 10.0, "the error took %.1f s", s);
  ck_assert_int_eq(async, ncclSystemError);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "network proxy failed") != NULL, "message: %s", ncclMoeGetLastError());
  free_two_nodes();
}
END_TEST

/* Each rank's internode part holds one init() of the transport and gives it
 * back when destroyed: the backend in use (NCCL_MOE_NET_BACKEND: socket
 * unless ib is asked for), counted through a wrapper. */
static const moe_transport_t* g_socket;
static int g_inits, g_finis;
static ncclResult_t counted_init(void) {
  ncclResult_t res = g_socket->init();
  if (res == ncclSuccess) __atomic_add_fetch(&g_inits, 1, __ATOMIC_RELAXED);
  return res;
}
static void counted_fini(void) {
  __atomic_add_fetch(&g_finis, 1, __ATOMIC_RELAXED);
  g_socket->fini();
}

START_TEST(test_transport_reference_released) {
  g_socket = moe_transport_get(moe_env()->net_backend == MOE_NET_BACKEND_IB ? MOE_NET_KIND_IB : MOE_NET_KIND_SOCKET);
  ck_assert_ptr_nonnull(g_socket);
  static moe_transport_t counted;
  counted = *g_socket;
  counted.init = counted_init;
  counted.fini = counted_fini;
  moe_transport_register(&counted);
  make_two_nodes(2000);
  ck_assert_int_eq(g_inits, 2);
  ck_assert_int_eq(g_finis, 0);
  free_two_nodes();
  ck_assert_int_eq(g_finis, 2);
  moe_transport_register(g_socket);
}
END_TEST

START_TEST(test_bad_node_shapes) {
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.maxTokensPerRank = 8, cfg.hidden = 128, cfg.numExperts = 12;
  ncclMoeComm_t comms[6];
  ck_assert_int_eq(ncclMoeCommInitVirtualNodes(6, 4, 0, &cfg, comms), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "ranksPerNode"));
  ck_assert_int_eq(ncclMoeCommInitVirtualNodes(6, 0, 0, &cfg, comms), ncclInvalidArgument);
}
END_TEST

int main(void) {
  moe_test_virtual_env();
  setenv("NCCL_MOE_NET_BACKEND", "socket", 0);
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  moe_test_require_gpus(1);
  moe_test_seed();
  Suite* s = suite_create("internode");
  TCase* tc = tcase_create("virtual_nodes");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, test_2x4_cast_fp8);
  tcase_add_test(tc, test_2x4_many_chunks);
  tcase_add_test(tc, test_4x2_bf16_exact_uneven);
  tcase_add_test(tc, test_3x1_fp8_input_capacity_graph);
  tcase_add_test(tc, test_2x4_reuse_zero_copy_all_to_one_rank);
  tcase_add_test(tc, test_8x1_every_rank_a_node);
  suite_add_tcase(s, tc);
  /* A case of its own, so that CK_RUN_CASE=overflow repeats it alone. */
  TCase* to = tcase_create("overflow");
  tcase_set_timeout(to, 300);
  tcase_add_test(to, test_2x2_overflow_is_an_error);
  suite_add_tcase(s, to);
  TCase* te = tcase_create("errors");
  tcase_set_timeout(te, 120);
  tcase_add_test(te, test_peer_node_never_arrives);
  tcase_add_test(te, test_closed_connection_is_an_error);
  tcase_add_test(te, test_bad_node_shapes);
  tcase_add_test(te, test_transport_reference_released);
  suite_add_tcase(s, te);
  return moe_test_run(s);
}
