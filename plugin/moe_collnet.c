/* SPDX-License-Identifier: Apache-2.0 */
/* CollNet pass-through. NCCL takes its net plugin and its CollNet plugin
 * (in-network reductions: SHARP's libnccl-net.so exports ncclCollNetPlugin_v*)
 * from one library, so users of such a plugin would lose it when they pick
 * ours. With NCCL_MOE_COLLNET_PLUGIN=<library> we load that library when NCCL
 * loads us and hand NCCL its ncclCollNetPlugin_vN structs unchanged: NCCL then
 * calls that plugin directly, as if it had loaded it itself.
 *
 * Which versions NCCL sees is decided when NCCL asks, not when we are built:
 * each exported ncclCollNetPlugin_vN is a GNU indirect symbol, and glibc's
 * dlsym() returns what its resolver returns, here the other library's struct
 * of that version or NULL. NCCL looks the versions up newest first, so it
 * gets the newest version both it and that library know, and without the
 * variable it finds no CollNet at all (its own fallback: no CollNet). A
 * forwarding struct of our own could not do that: NCCL would pick our newest
 * version whether or not the other library has it, and we would have to
 * translate between versions.
 *
 * One exception, v11: NCCL gets a copy of the library's table whose init is
 * ours (moe_collnet_v11_init below), to keep NCCL 2.28.3 alive when the
 * library offers no devices. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/moe_env.h"
#include "common/moe_log.h"
#include "nccl_net/collnet.h"

#define MOE_COLLNET_OLDEST 6 /* what NCCL 2.19 still looks up */
#define MOE_COLLNET_NEWEST 12
#define MOE_COLLNET_SYM_MAX 32

static void* moe_collnet_lib;
static void* moe_collnet_table[MOE_COLLNET_NEWEST + 1]; /* the library's struct of each version, or NULL */
static ncclCollNet_v11_t moe_collnet_v11; /* what NCCL gets for v11 (see moe_collnet_v11_init) */

static void moe_collnet_v11_copy(void);

/* Runs when NCCL (or anyone) loads this library, before any dlsym on it. */
__attribute__((constructor)) static void moe_collnet_load(void) {
  const char* path = moe_env()->collnet_plugin;
  if (path[0] == '\0') return;
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    MOE_WARN("NCCL_MOE_COLLNET_PLUGIN=%s cannot be loaded (%s): no CollNet", path, dlerror());
    return;
  }
  if (dlsym(lib, "ncclMoeGetLastError") != NULL) {
    MOE_WARN("NCCL_MOE_COLLNET_PLUGIN=%s is this library: no CollNet", path);
    dlclose(lib);
    return;
  }
  char found[MOE_COLLNET_SYM_MAX * 2] = "";
  for (int v = MOE_COLLNET_OLDEST; v <= MOE_COLLNET_NEWEST; v++) {
    char name[MOE_COLLNET_SYM_MAX];
    snprintf(name, sizeof(name), "ncclCollNetPlugin_v%d", v);
    moe_collnet_table[v] = dlsym(lib, name);
    if (moe_collnet_table[v] != NULL)
      snprintf(found + strlen(found), sizeof(found) - strlen(found), "%sv%d", found[0] ? " " : "", v);
  }
  if (found[0] == '\0') {
    MOE_WARN("NCCL_MOE_COLLNET_PLUGIN=%s exports no ncclCollNetPlugin_v%d..v%d: no CollNet", path,
             MOE_COLLNET_OLDEST, MOE_COLLNET_NEWEST);
    dlclose(lib);
    return;
  }
  moe_collnet_lib = lib;
  if (moe_collnet_table[11] != NULL) moe_collnet_v11_copy();
  MOE_INFO(NCCL_INIT | NCCL_NET, "CollNet of %s offered to NCCL (%s)", path, found);
}

/* NCCL may unload us (and load us again): the other library goes with us. */
__attribute__((destructor)) static void moe_collnet_unload(void) {
  for (int v = 0; v <= MOE_COLLNET_NEWEST; v++) moe_collnet_table[v] = NULL;
  memset(&moe_collnet_v11, 0, sizeof(moe_collnet_v11));
  if (moe_collnet_lib != NULL) dlclose(moe_collnet_lib);
  moe_collnet_lib = NULL;
}

/* An indirect symbol is declared as a function; NCCL reads what dlsym gives
 * as a struct pointer, and the resolver's value is one. */
typedef void (*moe_collnet_sym_t)(void);

#define MOE_COLLNET_VERSION(v)                                                                        \
  static moe_collnet_sym_t moe_collnet_resolve_v##v(void) {                                          \
    return (moe_collnet_sym_t)(uintptr_t)moe_collnet_table[v];                                       \
  }                                                                                                   \
  __attribute__((visibility("default"))) void ncclCollNetPlugin_v##v(void)                            \
      __attribute__((ifunc("moe_collnet_resolve_v" #v)));

MOE_COLLNET_VERSION(6)
MOE_COLLNET_VERSION(7)
MOE_COLLNET_VERSION(8)
MOE_COLLNET_VERSION(9)
MOE_COLLNET_VERSION(10)
MOE_COLLNET_VERSION(12)

/* v11 and NCCL 2.28.3. NCCL (src/plugin/net.cc, ncclNetPluginInit) calls
 * init(&comm->collNetContext, ...), then devices(); with no devices (or a
 * failed init) it leaves CollNet off and never sets comm->ncclCollNet. At
 * ncclCommDestroy or ncclCommAbort (commFree in init.cc), ncclNetFinalize runs
 *   if (comm->collNetContext) comm->ncclCollNet->finalize(comm->collNetContext);
 * through that NULL pointer: a segfault in every process whose CollNet
 * library (SHARP's on a node without SHARP, our test double) makes a
 * context and then offers no devices. NCCL 2.28.7 asks the plugin's state
 * instead, but leaves such a context unfinalized. So NCCL sees a context only
 * when CollNet will be used; otherwise the library's context is finalized here
 * and NCCL gets NULL, which every NCCL version handles. */
static ncclResult_t moe_collnet_v11_init(void** ctx_p, uint64_t comm_id, ncclDebugLogger_t logger) {
  const ncclCollNet_v11_t* lib = moe_collnet_table[11];
  void* ctx = NULL;
  *ctx_p = NULL;
  if (lib->init == NULL) {
    MOE_WARN("CollNet %s has no init: no CollNet", lib->name != NULL ? lib->name : "(unnamed)");
    return ncclInternalError;
  }
  ncclResult_t res = lib->init(&ctx, comm_id, logger);
  moe_collnet_v11_copy(); /* a library may fill in its table during init */
  if (res != ncclSuccess) return res; /* NCCL turns CollNet off; a failed init's context is not valid */
  int ndev = 0;
  if (lib->devices != NULL && lib->devices(&ndev) == ncclSuccess && ndev > 0) {
    *ctx_p = ctx;
    return ncclSuccess;
  }
  const char* name = lib->name != NULL ? lib->name : "(unnamed)";
  MOE_INFO(NCCL_INIT | NCCL_NET, "CollNet %s offers no devices: its context is closed and NCCL gets none", name);
  if (ctx != NULL && lib->finalize != NULL) {
    res = lib->finalize(ctx);
    if (res != ncclSuccess) MOE_WARN("CollNet %s: finalize of an unused context failed (%d)", name, (int)res);
  }
  return ncclSuccess; /* NCCL asks devices() itself and leaves CollNet off */
}

/* The library's v11 table with our init. Rewritten only when the library's
 * table changed (at load, or when its init filled it in), so a table NCCL's
 * threads already call through is never stored to. */
static void moe_collnet_v11_copy(void) {
  ncclCollNet_v11_t t = *(const ncclCollNet_v11_t*)moe_collnet_table[11];
  t.init = moe_collnet_v11_init;
  if (memcmp(&t, &moe_collnet_v11, sizeof(t)) != 0) moe_collnet_v11 = t;
}

static moe_collnet_sym_t moe_collnet_resolve_v11(void) {
  return moe_collnet_table[11] != NULL ? (moe_collnet_sym_t)(uintptr_t)&moe_collnet_v11 : NULL;
}
__attribute__((visibility("default"))) void ncclCollNetPlugin_v11(void)
    __attribute__((ifunc("moe_collnet_resolve_v11")));
