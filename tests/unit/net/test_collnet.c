/* SPDX-License-Identifier: Apache-2.0 */
/* The CollNet pass-through (plugin/moe_collnet.c): NCCL finds another
 * library's ncclCollNetPlugin_vN in ours, the newest version both have, when
 * NCCL_MOE_COLLNET_PLUGIN names it, and nothing otherwise; driven through v11
 * as NCCL 2.28.3 drives it, a library without devices leaves NCCL no context
 * to finalize. The stand-in libraries (tests/support/fake_collnet.c) export
 * v11 and v8, or v8 only. */
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nccl_net/collnet.h"
#include "net_test_util.h"
#include "test_common.h"

#define OLDEST 6
#define NEWEST 12

static const char* path_of(const char* var) {
  const char* p = getenv(var);
  ck_assert_msg(p != NULL, "%s is not set", var);
  return p;
}

/* dlopen()s our plugin with NCCL_MOE_COLLNET_PLUGIN=collnet (NULL: unset). */
static void* load(const char* collnet) {
  net_test_env();
  if (collnet != NULL) setenv("NCCL_MOE_COLLNET_PLUGIN", collnet, 1);
  else unsetenv("NCCL_MOE_COLLNET_PLUGIN");
  void* lib = dlopen(path_of("MOE_NET_PLUGIN_PATH"), RTLD_NOW | RTLD_LOCAL);
  ck_assert_msg(lib != NULL, "%s", dlerror());
  return lib;
}

/* What NCCL does: ncclCollNetPlugin_v12, then _v11, ... the first found wins. */
static int nccl_pick(void* lib, void** table_p) {
  for (int v = NEWEST; v >= OLDEST; v--) {
    char name[32];
    snprintf(name, sizeof(name), "ncclCollNetPlugin_v%d", v);
    void* t = dlsym(lib, name);
    if (t != NULL) {
      *table_p = t;
      return v;
    }
  }
  *table_p = NULL;
  return 0;
}

static void unload(void* lib) {
  ck_assert_int_eq(dlclose(lib), 0);
  ck_assert_ptr_null(dlopen(path_of("MOE_NET_PLUGIN_PATH"), RTLD_NOW | RTLD_NOLOAD));
}

START_TEST(test_no_collnet_without_the_variable) {
  void* lib = load(NULL);
  void* t = NULL;
  ck_assert_int_eq(nccl_pick(lib, &t), 0);
  ck_assert_ptr_nonnull(dlsym(lib, "ncclNetPlugin_v11"));
  unload(lib);
}
END_TEST

/* The v11 table NCCL gets: the library's, but for init (see moe_collnet.c). */
static void ck_v11_is_the_library_s(const ncclCollNet_v11_t* ours, const ncclCollNet_v11_t* theirs) {
  ck_assert_ptr_ne(ours, theirs);
  ck_assert_ptr_ne(ours->init, theirs->init);
  ck_assert_ptr_eq(ours->name, theirs->name);
  const size_t from = offsetof(ncclCollNet_v11_t, devices);
  ck_assert_msg(memcmp((const char*)ours + from, (const char*)theirs + from, sizeof(*ours) - from) == 0,
                "the v11 table NCCL gets differs from the library's beyond init");
}

START_TEST(test_newest_common_version) {
  const char* fake_path = path_of("FAKE_COLLNET_LIB");
  void* lib = load(fake_path);
  void* fake = dlopen(fake_path, RTLD_NOW | RTLD_NOLOAD); /* loaded by ours */
  ck_assert_ptr_nonnull(fake);
  void* t = NULL;
  ck_assert_int_eq(nccl_pick(lib, &t), 11);
  ck_v11_is_the_library_s(t, dlsym(fake, "ncclCollNetPlugin_v11"));
  ck_assert_ptr_eq(dlsym(lib, "ncclCollNetPlugin_v8"), dlsym(fake, "ncclCollNetPlugin_v8")); /* its own struct */
  const int absent[] = {12, 10, 9, 7, 6};
  for (int i = 0; i < 5; i++) {
    char name[32];
    snprintf(name, sizeof(name), "ncclCollNetPlugin_v%d", absent[i]);
    ck_assert_msg(dlsym(lib, name) == NULL, "%s offered", name);
  }
  /* NCCL's calls land in the other library. */
  int* calls = dlsym(fake, "fake_collnet_calls");
  ck_assert_ptr_nonnull(calls);
  ncclCollNet_v11_t* cn = t;
  ck_assert_str_eq(cn->name, "FakeCollNet");
  setenv("FAKE_COLLNET_DEVICES", "2", 1);
  void* ctx = NULL;
  int ndev = -1, before = *calls;
  ck_assert_int_eq(cn->init(&ctx, 42, NULL), ncclSuccess);
  ck_assert_ptr_eq(ctx, dlsym(fake, "fake_collnet_live")); /* the library's context, passed through */
  ck_assert_int_eq(cn->devices(&ndev), ncclSuccess);
  ck_assert_int_eq(ndev, 2);
  ck_assert_int_eq(cn->finalize(ctx), ncclSuccess);
  ck_assert_int_eq(*calls, before + 4); /* init, our devices probe, devices, finalize */
  unsetenv("FAKE_COLLNET_DEVICES");
  ck_assert_int_eq(dlclose(fake), 0); /* our reference remains */
  /* Unloading us unloads it (NCCL may unload and reload its plugin). */
  unload(lib);
  ck_assert_ptr_null(dlopen(fake_path, RTLD_NOW | RTLD_NOLOAD));
  lib = load(fake_path);
  ck_assert_int_eq(nccl_pick(lib, &t), 11);
  unload(lib);
}
END_TEST

/* What NCCL 2.28.3 does with a v11 CollNet (src/plugin/net.cc): per comm,
 * ncclNetPluginInit calls init(&comm->collNetContext, ...) then devices(), and
 * only with devices > 0 does ncclNetPluginAssignToComm set comm->ncclCollNet;
 * at ncclCommDestroy ncclNetFinalize calls
 * comm->ncclCollNet->finalize(comm->collNetContext) whenever the context is
 * not NULL. */
typedef struct {
  ncclCollNet_v11_t* collnet; /* comm->ncclCollNet */
  void* context;              /* comm->collNetContext */
} nccl_2_28_3_comm_t;

static void nccl_2_28_3_comm_init(ncclCollNet_v11_t* cn, nccl_2_28_3_comm_t* comm) {
  comm->collnet = NULL;
  comm->context = NULL;
  int ndev = 0;
  if (cn->init(&comm->context, 0x5eed, NULL) != ncclSuccess) return;
  if (cn->devices(&ndev) != ncclSuccess || ndev <= 0) return;
  comm->collnet = cn;
}

static void nccl_2_28_3_comm_destroy(nccl_2_28_3_comm_t* comm) {
  if (comm->context == NULL) return;
  ck_assert_msg(comm->collnet != NULL, "NCCL 2.28.3 would call finalize through a NULL ncclCollNet");
  ck_assert_int_eq(comm->collnet->finalize(comm->context), ncclSuccess);
}

/* devices: FAKE_COLLNET_DEVICES (NULL: unset); init_fails: FAKE_COLLNET_INIT_FAIL. */
static void run_as_nccl_2_28_3(const char* devices, int init_fails, int want_collnet) {
  const char* fake_path = path_of("FAKE_COLLNET_LIB");
  if (devices != NULL) setenv("FAKE_COLLNET_DEVICES", devices, 1);
  else unsetenv("FAKE_COLLNET_DEVICES");
  if (init_fails) setenv("FAKE_COLLNET_INIT_FAIL", "1", 1);
  else unsetenv("FAKE_COLLNET_INIT_FAIL");
  void* lib = load(fake_path);
  void* fake = dlopen(fake_path, RTLD_NOW | RTLD_NOLOAD);
  int* live = dlsym(fake, "fake_collnet_live");
  ck_assert_ptr_nonnull(live);
  void* t = NULL;
  ck_assert_int_eq(nccl_pick(lib, &t), 11);
  nccl_2_28_3_comm_t comm;
  nccl_2_28_3_comm_init(t, &comm);
  ck_assert_int_eq(comm.collnet != NULL, want_collnet);
  if (want_collnet) {
    /* The library filled reduceSupport in during init: NCCL sees it. */
    int supported = 0;
    ck_assert_ptr_nonnull(comm.collnet->reduceSupport);
    ck_assert_int_eq(comm.collnet->reduceSupport(ncclFloat32, ncclSum, &supported), ncclSuccess);
    ck_assert_int_eq(supported, 1);
  }
  nccl_2_28_3_comm_destroy(&comm);
  ck_assert_int_eq(*live, 0); /* no context left behind */
  unsetenv("FAKE_COLLNET_DEVICES");
  unsetenv("FAKE_COLLNET_INIT_FAIL");
  dlclose(fake);
  unload(lib);
}

START_TEST(test_nccl_2_28_3_no_devices) { run_as_nccl_2_28_3(NULL, 0, 0); }
END_TEST

START_TEST(test_nccl_2_28_3_init_fails) { run_as_nccl_2_28_3("2", 1, 0); }
END_TEST

START_TEST(test_nccl_2_28_3_with_devices) { run_as_nccl_2_28_3("2", 0, 1); }
END_TEST

START_TEST(test_older_library) {
  const char* fake_path = path_of("FAKE_COLLNET_V8_LIB");
  void* lib = load(fake_path);
  void* fake = dlopen(fake_path, RTLD_NOW | RTLD_NOLOAD);
  void* t = NULL;
  ck_assert_int_eq(nccl_pick(lib, &t), 8);
  ck_assert_ptr_eq(t, dlsym(fake, "ncclCollNetPlugin_v8"));
  ncclCollNet_v8_t* cn = t;
  ck_assert_int_eq(cn->init(NULL), ncclSuccess);
  ck_assert_int_eq(cn->iallreduce(NULL, NULL, NULL, 0, ncclFloat, ncclSum, NULL, NULL, NULL), ncclInternalError);
  dlclose(fake);
  unload(lib);
}
END_TEST

/* A library that cannot be loaded, that has no CollNet, or that is ours:
 * no CollNet, and the net plugin works as ever. */
START_TEST(test_unusable_libraries) {
  const char* bad[] = {"/nonexistent/libnccl-net-sharp.so", path_of("VERBS_EMU_LIB"), path_of("MOE_NET_PLUGIN_PATH")};
  for (int i = 0; i < 3; i++) {
    void* lib = load(bad[i]);
    void* t = NULL;
    ck_assert_msg(nccl_pick(lib, &t) == 0, "%s", bad[i]);
    ncclNet_v11_t* net = dlsym(lib, "ncclNetPlugin_v11");
    void* ctx = NULL;
    ck_assert_int_eq(net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
    ck_assert_int_eq(net->finalize(ctx), ncclSuccess);
    unload(lib);
  }
}
END_TEST

int main(void) {
  Suite* s = suite_create("collnet");
  TCase* tc = tcase_create("passthrough");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_no_collnet_without_the_variable);
  tcase_add_test(tc, test_newest_common_version);
  tcase_add_test(tc, test_nccl_2_28_3_no_devices);
  tcase_add_test(tc, test_nccl_2_28_3_init_fails);
  tcase_add_test(tc, test_nccl_2_28_3_with_devices);
  tcase_add_test(tc, test_older_library);
  tcase_add_test(tc, test_unusable_libraries);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
