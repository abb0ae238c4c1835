/* SPDX-License-Identifier: Apache-2.0 */
#include "net_ib/moe_ib_verbs.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "common/moe_env.h"
#include "common/moe_log.h"

#define MOE_IB_VERBS_WHY_MAX 512

static moe_ib_verbs_t moe_ib_verbs_table;
static ncclResult_t moe_ib_verbs_status = ncclSystemError;
static pthread_once_t moe_ib_verbs_once = PTHREAD_ONCE_INIT;
static char moe_ib_verbs_why[MOE_IB_VERBS_WHY_MAX];
/* Kept open until exit: providers register with it and cannot be unloaded safely. */
static void* moe_ib_verbs_lib;

static int moe_ib_verbs_sym(void** field, const char* name, int required, const char* path) {
  *field = dlsym(moe_ib_verbs_lib, name);
  if (*field == NULL && required) {
    snprintf(moe_ib_verbs_why, sizeof(moe_ib_verbs_why), "%s lacks %s", path, name);
    return 0;
  }
  return 1;
}

#define MOE_IB_SYM(field, name, required) moe_ib_verbs_sym((void**)&t->field, name, required, path)

static void moe_ib_verbs_open(void) {
  moe_ib_verbs_t* t = &moe_ib_verbs_table;
  const char* named = moe_env()->ibverbs_library;
  const char* path = named[0] != '\0' ? named : MOE_IB_VERBS_DEFAULT_LIBRARY;
  moe_ib_verbs_lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (moe_ib_verbs_lib == NULL) {
    snprintf(moe_ib_verbs_why, sizeof(moe_ib_verbs_why), "cannot load %s (%s)", path, dlerror());
  } else if (MOE_IB_SYM(get_device_list, "ibv_get_device_list", 1) &&
             MOE_IB_SYM(free_device_list, "ibv_free_device_list", 1) &&
             MOE_IB_SYM(get_device_name, "ibv_get_device_name", 1) &&
             MOE_IB_SYM(open_device, "ibv_open_device", 1) && MOE_IB_SYM(close_device, "ibv_close_device", 1) &&
             MOE_IB_SYM(query_device, "ibv_query_device", 1) && MOE_IB_SYM(query_port, "ibv_query_port", 1) &&
             MOE_IB_SYM(query_gid, "ibv_query_gid", 1) && MOE_IB_SYM(query_gid_ex, "_ibv_query_gid_ex", 0) &&
             MOE_IB_SYM(alloc_pd, "ibv_alloc_pd", 1) && MOE_IB_SYM(dealloc_pd, "ibv_dealloc_pd", 1) &&
             MOE_IB_SYM(reg_mr, "ibv_reg_mr", 1) && MOE_IB_SYM(reg_dmabuf_mr, "ibv_reg_dmabuf_mr", 0) &&
             MOE_IB_SYM(dereg_mr, "ibv_dereg_mr", 1) && MOE_IB_SYM(create_cq, "ibv_create_cq", 1) &&
             MOE_IB_SYM(destroy_cq, "ibv_destroy_cq", 1) && MOE_IB_SYM(create_qp, "ibv_create_qp", 1) &&
             MOE_IB_SYM(modify_qp, "ibv_modify_qp", 1) && MOE_IB_SYM(destroy_qp, "ibv_destroy_qp", 1) &&
             MOE_IB_SYM(get_async_event, "ibv_get_async_event", 1) &&
             MOE_IB_SYM(ack_async_event, "ibv_ack_async_event", 1) &&
             MOE_IB_SYM(wc_status_str, "ibv_wc_status_str", 1) &&
             MOE_IB_SYM(event_type_str, "ibv_event_type_str", 1)) {
    moe_ib_verbs_status = ncclSuccess;
    if (named[0] != '\0') MOE_INFO(NCCL_INIT | NCCL_NET, "ib: verbs from %s (NCCL_MOE_IBVERBS_LIBRARY)", path);
    return;
  }
  /* A library the user named must work; the default one is simply absent on
   * most hosts without an HCA. */
  if (named[0] != '\0') MOE_WARN("ib: NCCL_MOE_IBVERBS_LIBRARY: %s; verbs backend disabled", moe_ib_verbs_why);
  else MOE_INFO(NCCL_INIT | NCCL_NET, "ib: %s; verbs backend disabled", moe_ib_verbs_why);
}

ncclResult_t moe_ib_verbs_load(const moe_ib_verbs_t** verbs_p) {
  pthread_once(&moe_ib_verbs_once, moe_ib_verbs_open);
  if (moe_ib_verbs_status != ncclSuccess) return moe_ib_verbs_status;
  *verbs_p = &moe_ib_verbs_table;
  return ncclSuccess;
}

const char* moe_ib_verbs_error(void) {
  pthread_once(&moe_ib_verbs_once, moe_ib_verbs_open);
  return moe_ib_verbs_why;
}
