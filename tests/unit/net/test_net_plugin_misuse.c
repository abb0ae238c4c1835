/* SPDX-License-Identifier: Apache-2.0 */
/* The plugin misused the way a buggy caller or a hostile peer would (issue
 * 15, items 2, 3 and 7 on the NCCL path): a second close, deregMr or finalize
 * is ncclInvalidArgument and touches no freed memory (the ASan build checks
 * the latter); a comm handed to NCCL refuses one-sided writes from its peer
 * even with the right key; regMr refuses regions that cannot be memory. */
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "net_raw_peer.h"
#include "net_test_util.h"
#include "plugin/moe_net_plugin.h"
#include "test_common.h"

static net_plugin_t plugin;
static ncclNet_v11_t* net;
static void* ctx;

static void setup(void) {
  net_test_env();
  ck_assert_int_eq(net_plugin_load(NULL, &plugin), 0);
  net = plugin.net;
  ck_assert_int_eq(net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
}

static void teardown(void) {
  if (ctx != NULL) ck_assert_int_eq(net->finalize(ctx), ncclSuccess);
  net_plugin_unload(&plugin);
}

START_TEST(test_close_listen_twice) {
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* listen = NULL;
  ck_assert_int_eq(net->listen(ctx, 0, handle, &listen), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclInvalidArgument);
  void* recv = NULL;
  ck_assert_int_eq(net->accept(listen, &recv, NULL), ncclInvalidArgument);
}
END_TEST

START_TEST(test_close_send_and_recv_twice) {
  void *send, *recv, *listen;
  ck_assert_int_eq(net_connect_pair(net, ctx, 0, &send, &recv, &listen), ncclSuccess);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeSend(send), ncclInvalidArgument);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(recv), ncclInvalidArgument);
  /* A closed comm is not usable either (nor closable as another kind). */
  char buf[8];
  void* req = NULL;
  ck_assert_int_eq(net->isend(send, buf, sizeof(buf), 0, NULL, NULL, &req), ncclInvalidArgument);
  ck_assert_int_eq(net->closeListen(send), ncclInvalidArgument);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
}
END_TEST

START_TEST(test_dereg_twice) {
  void *send, *recv, *listen;
  ck_assert_int_eq(net_connect_pair(net, ctx, 0, &send, &recv, &listen), ncclSuccess);
  static char buf[4096];
  void* mh = NULL;
  ck_assert_int_eq(net->regMr(recv, buf, sizeof(buf), NCCL_PTR_HOST, &mh), ncclSuccess);
  ck_assert_int_eq(net->deregMr(recv, mh), ncclSuccess);
  ck_assert_int_eq(net->deregMr(recv, mh), ncclInvalidArgument);
  ck_assert_int_eq(net->deregMr(send, mh), ncclInvalidArgument);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
}
END_TEST

START_TEST(test_finalize_twice) {
  void* other = NULL;
  ck_assert_int_eq(net->init(&other, 2, NULL, NULL, NULL), ncclSuccess);
  ck_assert_int_eq(net->finalize(other), ncclSuccess);
  ck_assert_int_eq(net->finalize(other), ncclInvalidArgument);
  /* The plugin still serves the first context. */
  void *send, *recv, *listen;
  ck_assert_int_eq(net_connect_pair(net, ctx, 0, &send, &recv, &listen), ncclSuccess);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
  ck_assert_int_eq(net->finalize(ctx), ncclSuccess);
  ck_assert_int_eq(net->finalize(ctx), ncclInvalidArgument);
  ctx = NULL;
}
END_TEST

START_TEST(test_regmr_checks_the_region) {
  void *send, *recv, *listen;
  ck_assert_int_eq(net_connect_pair(net, ctx, 0, &send, &recv, &listen), ncclSuccess);
  static char ok[256];
  char* gone = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert_ptr_ne(gone, MAP_FAILED);
  munmap(gone, 1 << 20);
  void* mh = NULL;
  ck_assert_int_eq(net->regMr(recv, ok, SIZE_MAX, NCCL_PTR_HOST, &mh), ncclInvalidArgument);
  ck_assert_int_eq(net->regMr(recv, NULL, 64, NCCL_PTR_HOST, &mh), ncclInvalidArgument);
  ck_assert_int_eq(net->regMr(recv, gone, 1 << 20, NCCL_PTR_HOST, &mh), ncclInvalidArgument);
  ck_assert_int_eq(net->regMr(send, (void*)(UINTPTR_MAX - 63), 128, NCCL_PTR_HOST, &mh), ncclInvalidArgument);
  ck_assert_int_eq(net->regMr(recv, ok, sizeof(ok), NCCL_PTR_HOST, &mh), ncclSuccess);
  ck_assert_int_eq(net->deregMr(recv, mh), ncclSuccess);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
}
END_TEST

/* The plugin's implementation linked in (the same code the exported structs
 * call), so the test can read the key of a registration the way a peer that
 * learned it would use it: a raw peer writes into a region registered on its
 * own connection, with the exact key, and is refused. */
START_TEST(test_plugin_comms_refuse_writes) {
  void* pctx = NULL;
  ck_assert_int_eq(moe_net_init(&pctx, 3, NULL, NULL), ncclSuccess);
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* listen = NULL;
  ck_assert_int_eq(moe_net_listen(pctx, 0, handle, &listen), ncclSuccess);
  raw_conn_t rc;
  ck_assert_int_eq(raw_dial(handle, 1, 5, &rc), 0);
  void* recv = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (recv == NULL) {
    ck_assert_int_eq(moe_net_accept(listen, &recv), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  enum { SIZE = 4096 };
  char* region = calloc(1, SIZE);
  void* mh = NULL;
  ck_assert_int_eq(moe_net_reg_mr(recv, region, SIZE, NCCL_PTR_HOST, &mh), ncclSuccess);
  const moe_transport_t* t = moe_transport_get(MOE_NET_KIND_SOCKET);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mh, &key), ncclSuccess);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .size = 64, .key = key.key};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &h), 0);
  char payload[64];
  memset(payload, 0x66, sizeof(payload));
  ck_assert_int_eq(raw_send_all(rc.ctrl, payload, sizeof(payload)), 0);
  /* Then a message the receive below waits for: it must fail instead. */
  moe_sock_hdr_t m = {.op = MOE_SOCK_OP_MSG, .size = 8};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &m), 0);
  ck_assert_int_eq(raw_send_all(rc.ctrl, payload, 8), 0);
  char got[8];
  void* data[1] = {got};
  size_t cap[1] = {sizeof(got)};
  int tag[1] = {0};
  void* req = NULL;
  ncclResult_t res = ncclSuccess;
  deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (res == ncclSuccess && req == NULL) {
    res = moe_net_irecv(recv, 1, data, cap, tag, NULL, &req);
    ck_assert(net_now_ms() < deadline);
  }
  int done = 0;
  while (res == ncclSuccess && !done) {
    res = moe_net_test(req, &done, NULL);
    ck_assert_msg(net_now_ms() < deadline, "the refused write never surfaced as an error");
  }
  ck_assert_int_eq(res, ncclRemoteError);
  for (int i = 0; i < SIZE; i++) ck_assert_msg(region[i] == 0, "the peer wrote byte %d of a plugin registration", i);
  ck_assert_int_eq(moe_net_dereg_mr(recv, mh), ncclSuccess);
  free(region);
  ck_assert_int_eq(moe_net_close_recv(recv), ncclSuccess);
  ck_assert_int_eq(moe_net_close_listen(listen), ncclSuccess);
  ck_assert_int_eq(moe_net_finalize(pctx), ncclSuccess);
  raw_close(&rc);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_plugin_misuse");
  TCase* tc = tcase_create("misuse");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_close_listen_twice);
  tcase_add_test(tc, test_close_send_and_recv_twice);
  tcase_add_test(tc, test_dereg_twice);
  tcase_add_test(tc, test_finalize_twice);
  tcase_add_test(tc, test_regmr_checks_the_region);
  tcase_add_test(tc, test_plugin_comms_refuse_writes);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
