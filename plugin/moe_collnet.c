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
 * translate between versions. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/moe_env.h"
#include "common/moe_log.h"

#define MOE_COLLNET_OLDEST 6 /* what NCCL 2.19 still looks up */
#define MOE_COLLNET_NEWEST 12
#define MOE_COLLNET_SYM_MAX 32

static void* moe_collnet_lib;
static void* moe_collnet_table[MOE_COLLNET_NEWEST + 1]; /* the library's struct of each version, or NULL */

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
  MOE_INFO(NCCL_INIT | NCCL_NET, "CollNet of %s offered to NCCL (%s)", path, found);
}

/* NCCL may unload us (and load us again): the other library goes with us. */
__attribute__((destructor)) static void moe_collnet_unload(void) {
  for (int v = 0; v <= MOE_COLLNET_NEWEST; v++) moe_collnet_table[v] = NULL;
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
MOE_COLLNET_VERSION(11)
MOE_COLLNET_VERSION(12)
