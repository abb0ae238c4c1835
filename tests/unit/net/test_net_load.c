/* SPDX-License-Identifier: Apache-2.0 */
/* Loading the plugin the ways NCCL does: dlopen by full path and by
 * "libnccl-net-<name>.so" lookup, the versioned symbols, unload and reload,
 * finalize after a failed init, and the pre-v11 ABIs through their shims. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "net_test_util.h"
#include "test_common.h"

static void transfer_once(ncclNet_v11_t* net, void* ctx, size_t size) {
  void *send, *recv, *listen;
  ck_assert_int_eq(net_connect_pair(net, ctx, 0, &send, &recv, &listen), ncclSuccess);
  char* s = malloc(size + 1);
  char* r = malloc(size + 1);
  net_fill(s, size, size);
  void* smh = net_reg(net, send, s, size + 1);
  void* rmh = net_reg(net, recv, r, size + 1);
  ck_assert(smh != NULL && rmh != NULL);
  void *sreq, *rreq;
  void* data[1] = {r};
  size_t cap[1] = {size};
  int tag[1] = {1};
  ck_assert_int_eq(net_irecv(net, recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
  ck_assert_int_eq(net_isend(net, send, s, size, 1, smh, &sreq), ncclSuccess);
  ck_assert_int_eq(net_wait(net, sreq, NULL), ncclSuccess);
  ck_assert_int_eq(net_wait(net, rreq, NULL), ncclSuccess);
  ck_assert(net_check(r, size, size));
  net_dereg(net, send, smh);
  net_dereg(net, recv, rmh);
  free(s);
  free(r);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
}

START_TEST(test_symbols_by_path) {
  net_test_env();
  void* lib = dlopen(getenv("MOE_NET_PLUGIN_PATH"), RTLD_NOW | RTLD_LOCAL);
  ck_assert_msg(lib != NULL, "%s", dlerror());
  const char* present[] = {"ncclNetPlugin_v11", "ncclNetPlugin_v10", "ncclNetPlugin_v9", "ncclNetPlugin_v8"};
  for (int i = 0; i < 4; i++) ck_assert_msg(dlsym(lib, present[i]) != NULL, "%s missing", present[i]);
  /* No CollNet unless NCCL_MOE_COLLNET_PLUGIN names a library (test_collnet). */
  const char* absent[] = {"ncclCollNetPlugin_v11", "ncclCollNetPlugin_v10", "ncclNetPlugin_v12", "moe_net_init",
                          "moe_transport_socket"};
  for (int i = 0; i < 5; i++) ck_assert_msg(dlsym(lib, absent[i]) == NULL, "%s exported", absent[i]);
  ck_assert_int_eq(dlclose(lib), 0);
}
END_TEST

START_TEST(test_lookup_by_name) {
  /* NCCL_NET_PLUGIN=moe: NCCL dlopen()s "libnccl-net-moe.so" through the
   * library search path (LD_LIBRARY_PATH holds the build root here). */
  net_test_env();
  net_plugin_t p;
  ck_assert_int_eq(net_plugin_load("libnccl-net-moe.so", &p), 0);
  ck_assert_str_eq(p.net->name, "MoE");
  void* ctx = NULL;
  ck_assert_int_eq(p.net->init(&ctx, 7, NULL, NULL, NULL), ncclSuccess);
  transfer_once(p.net, ctx, 4096);
  ck_assert_int_eq(p.net->finalize(ctx), ncclSuccess);
  net_plugin_unload(&p);
}
END_TEST

START_TEST(test_unload_reload) {
  net_test_env();
  const char* path = getenv("MOE_NET_PLUGIN_PATH");
  for (int round = 0; round < 3; round++) {
    net_plugin_t p;
    ck_assert_int_eq(net_plugin_load(path, &p), 0);
    void *ctx1 = NULL, *ctx2 = NULL;
    /* Two communicators share the plugin; the second finalize tears down. */
    ck_assert_int_eq(p.net->init(&ctx1, 1, NULL, NULL, NULL), ncclSuccess);
    ck_assert_int_eq(p.net->init(&ctx2, 2, NULL, NULL, NULL), ncclSuccess);
    transfer_once(p.net, ctx1, 1 << 20);
    ck_assert_int_eq(p.net->finalize(ctx1), ncclSuccess);
    transfer_once(p.net, ctx2, 100);
    ck_assert_int_eq(p.net->finalize(ctx2), ncclSuccess);
    /* Used after the last finalize: an error, not a crash. */
    int ndev = 0;
    ck_assert_int_ne(p.net->devices(&ndev), ncclSuccess);
    net_plugin_unload(&p);
    /* Really unmapped: the next round starts from fresh globals. */
    ck_assert_ptr_null(dlopen(path, RTLD_NOW | RTLD_NOLOAD));
  }
}
END_TEST

START_TEST(test_finalize_after_failed_init) {
  net_test_env();
  const int ib = net_test_ib();
  /* Forced ib that cannot start (NCCL_IB_DISABLE means no verbs, as in NCCL). */
  setenv("NCCL_MOE_NET_BACKEND", "ib", 1);
  setenv("NCCL_IB_DISABLE", "1", 1);
  net_plugin_t p;
  ck_assert_int_eq(net_plugin_load(NULL, &p), 0);
  void* ctx = (void*)0x1;
  ck_assert_int_ne(p.net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
  ck_assert_int_eq(p.net->finalize(ctx), ncclSuccess); /* as NCCL does after a failed init */
  int ndev = 0;
  ck_assert_int_ne(p.net->devices(&ndev), ncclSuccess);
  net_plugin_unload(&p);
  /* auto falls back to sockets cleanly when verbs are disabled ... */
  setenv("NCCL_MOE_NET_BACKEND", "auto", 1);
  ck_assert_int_eq(net_plugin_load(NULL, &p), 0);
  ck_assert_int_eq(p.net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
  ck_assert_int_eq(p.net->devices(&ndev), ncclSuccess);
  ck_assert_int_eq(ndev, 1);
  ncclNetProperties_v11_t props;
  ck_assert_int_eq(p.net->getProperties(0, &props), ncclSuccess);
  ck_assert_str_eq(props.name, "lo");
  transfer_once(p.net, ctx, 10);
  ck_assert_int_eq(p.net->finalize(ctx), ncclSuccess);
  net_plugin_unload(&p);
  /* ... and picks the verbs backend when a port is active (the emulator's). */
  unsetenv("NCCL_IB_DISABLE");
  ck_assert_int_eq(net_plugin_load(NULL, &p), 0);
  ck_assert_int_eq(p.net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
  ck_assert_int_eq(p.net->devices(&ndev), ncclSuccess);
  ck_assert_int_eq(ndev, 1);
  ck_assert_int_eq(p.net->getProperties(0, &props), ncclSuccess);
  if (net_test_emulated()) ck_assert_str_eq(props.name, "emu0");
  else if (!ib && access("/sys/class/infiniband", F_OK) != 0) ck_assert_str_eq(props.name, "lo");
  transfer_once(p.net, ctx, 10);
  ck_assert_int_eq(p.net->finalize(ctx), ncclSuccess);
  /* A second finalize of the same context is caught. */
  net_plugin_unload(&p);
}
END_TEST

START_TEST(test_legacy_abis) {
  net_test_env();
  void* lib = dlopen(getenv("MOE_NET_PLUGIN_PATH"), RTLD_NOW | RTLD_LOCAL);
  ck_assert_ptr_nonnull(lib);
  ncclNet_v8_t* v8 = dlsym(lib, "ncclNetPlugin_v8");
  ncclNet_v9_t* v9 = dlsym(lib, "ncclNetPlugin_v9");
  ncclNet_v10_t* v10 = dlsym(lib, "ncclNetPlugin_v10");
  /* Older NCCLs call init once per communicator without a finalize. */
  ck_assert_int_eq(v8->init(NULL), ncclSuccess);
  ck_assert_int_eq(v9->init(NULL), ncclSuccess);
  ck_assert_int_eq(v10->init(NULL, NULL), ncclSuccess);
  int ndev = 0;
  ck_assert_int_eq(v8->devices(&ndev), ncclSuccess);
  ck_assert_int_eq(ndev, 1);
  ncclNetProperties_v8_t p8;
  ncclNetProperties_v9_t p9;
  ncclNetProperties_v10_t p10;
  ck_assert_int_eq(v8->getProperties(0, &p8), ncclSuccess);
  ck_assert_int_eq(v9->getProperties(0, &p9), ncclSuccess);
  ck_assert_int_eq(v10->getProperties(0, &p10), ncclSuccess);
  if (net_test_emulated()) ck_assert_str_eq(p8.name, "emu0");
  else if (!net_test_ib()) ck_assert_str_eq(p8.name, "lo");
  ck_assert_int_eq(p8.maxRecvs, 8);
  ck_assert_int_ne(p8.ptrSupport & NCCL_PTR_HOST, 0);
  ck_assert_uint_eq(p9.maxP2pBytes, 1u << 30);
  ck_assert_int_eq(p10.vProps.ndevs, 1);
  /* A message through the v8 shims (int sizes). */
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void *listen = NULL, *send = NULL, *recv = NULL;
  ck_assert_int_eq(v8->listen(0, handle, &listen), ncclSuccess);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (send == NULL || recv == NULL) {
    if (send == NULL) ck_assert_int_eq(v8->connect(0, handle, &send, NULL), ncclSuccess);
    if (recv == NULL) ck_assert_int_eq(v8->accept(listen, &recv, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  static char s[300000], r[300000];
  net_fill(s, sizeof(s), 3);
  void *smh = NULL, *rmh = NULL;
  ck_assert_int_eq(v8->regMr(send, s, sizeof(s), NCCL_PTR_HOST, &smh), ncclSuccess);
  ck_assert_int_eq(v8->regMr(recv, r, sizeof(r), NCCL_PTR_HOST, &rmh), ncclSuccess);
  void *sreq = NULL, *rreq = NULL;
  void* data[1] = {r};
  int cap[1] = {(int)sizeof(r)};
  int tag[1] = {9};
  ck_assert_int_eq(v8->isend(send, s, -1, 9, smh, &sreq), ncclInvalidArgument);
  int neg[1] = {-5};
  ck_assert_int_eq(v8->irecv(recv, 1, data, neg, tag, &rmh, &rreq), ncclInvalidArgument);
  rreq = sreq = NULL;
  while (rreq == NULL) {
    ck_assert_int_eq(v8->irecv(recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  while (sreq == NULL) { /* ib: until the receiver's clear-to-send arrived */
    ck_assert_int_eq(v8->isend(send, s, (int)sizeof(s), 9, smh, &sreq), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  int sdone = 0, rdone = 0, rsize = 0;
  while (!sdone || !rdone) {
    if (!sdone) ck_assert_int_eq(v8->test(sreq, &sdone, NULL), ncclSuccess);
    if (!rdone) ck_assert_int_eq(v8->test(rreq, &rdone, &rsize), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(rsize, (int)sizeof(s));
  ck_assert(net_check(r, sizeof(r), 3));
  ck_assert_int_eq(v8->deregMr(send, smh), ncclSuccess);
  ck_assert_int_eq(v8->deregMr(recv, rmh), ncclSuccess);
  ck_assert_int_eq(v8->closeSend(send), ncclSuccess);
  ck_assert_int_eq(v8->closeRecv(recv), ncclSuccess);
  ck_assert_int_eq(v8->closeListen(listen), ncclSuccess);
  ck_assert_int_eq(dlclose(lib), 0);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_load");
  TCase* tc = tcase_create("load");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, test_symbols_by_path);
  tcase_add_test(tc, test_lookup_by_name);
  tcase_add_test(tc, test_unload_reload);
  tcase_add_test(tc, test_finalize_after_failed_init);
  tcase_add_test(tc, test_legacy_abis);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
