/* SPDX-License-Identifier: Apache-2.0 */
#include "core/moe_nccl.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "common/moe_check.h"

/* libnccl objects looked at in the link map (more is a misconfigured process). */
#define MOE_NCCL_MAX_LOADED 8
#define MOE_NCCL_SONAME_PREFIX "libnccl.so"

typedef struct {
  int n;
  char path[MOE_NCCL_MAX_LOADED][MOE_NCCL_WHERE_MAX];
} moe_nccl_loaded_t;

static pthread_mutex_t moe_nccl_lock = PTHREAD_MUTEX_INITIALIZER;
static moe_nccl_t moe_nccl_table;
static const moe_nccl_t* moe_nccl_resolved; /* set once, under the lock */

static int moe_nccl_collect(struct dl_phdr_info* info, size_t size, void* arg) {
  (void)size;
  moe_nccl_loaded_t* loaded = arg;
  const char* path = info->dlpi_name;
  if (path == NULL || path[0] == '\0') return 0; /* the executable */
  const char* base = strrchr(path, '/');
  base = base != NULL ? base + 1 : path;
  if (strncmp(base, MOE_NCCL_SONAME_PREFIX, strlen(MOE_NCCL_SONAME_PREFIX)) != 0) return 0;
  if (loaded->n < MOE_NCCL_MAX_LOADED && strlen(path) < MOE_NCCL_WHERE_MAX)
    strcpy(loaded->path[loaded->n++], path);
  return 0;
}

/* Fills t's functions from `handle` (a dlopen handle or RTLD_DEFAULT); the
 * name of the first missing one, or NULL when all are there. */
static const char* moe_nccl_bind(void* handle, moe_nccl_t* t) {
  static const char* const names[] = {"ncclCommUserRank", "ncclCommCount", "ncclCommCuDevice", "ncclAllGather"};
  void* fn[sizeof(names) / sizeof(names[0])];
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    fn[i] = dlsym(handle, names[i]);
    if (fn[i] == NULL) return names[i];
  }
  /* POSIX: a data pointer from dlsym converts to a function pointer. */
  memcpy(&t->commUserRank, &fn[0], sizeof(fn[0]));
  memcpy(&t->commCount, &fn[1], sizeof(fn[1]));
  memcpy(&t->commCuDevice, &fn[2], sizeof(fn[2]));
  memcpy(&t->allGather, &fn[3], sizeof(fn[3]));
  return NULL;
}

/* Under the lock. */
static ncclResult_t moe_nccl_resolve(moe_nccl_t* t) {
  moe_nccl_loaded_t loaded = {0};
  dl_iterate_phdr(moe_nccl_collect, &loaded);
  if (loaded.n > 1)
    MOE_WARN("%d NCCL libraries are loaded (%s, %s%s): nccl-moe uses the first; a communicator works only with "
             "the NCCL that created it", loaded.n, loaded.path[0], loaded.path[1], loaded.n > 2 ? ", ..." : "");
  for (int i = 0; i < loaded.n; i++) {
    /* RTLD_NOLOAD: only a handle to what is there, whatever its scope. */
    void* h = dlopen(loaded.path[i], RTLD_LAZY | RTLD_NOLOAD);
    if (h == NULL) continue;
    const char* missing = moe_nccl_bind(h, t);
    if (missing == NULL) {
      snprintf(t->where, sizeof(t->where), "%s", loaded.path[i]);
      return ncclSuccess; /* the handle stays open: the functions must stay */
    }
    MOE_WARN("%s has no %s: not used as NCCL", loaded.path[i], missing);
    dlclose(h);
  }
  if (moe_nccl_bind(RTLD_DEFAULT, t) == NULL) {
    snprintf(t->where, sizeof(t->where), "the global symbol scope");
    return ncclSuccess;
  }
  return MOE_ERROR(ncclInvalidUsage,
                   "no NCCL is loaded in this process: ncclMoeCommInit needs the NCCL that created the communicator "
                   "(found no %s* in the link map and no ncclCommUserRank, ncclCommCount, ncclCommCuDevice and "
                   "ncclAllGather in the global symbol scope). Create the communicator with NCCL in this process "
                   "first; nccl-moe does not load NCCL itself", MOE_NCCL_SONAME_PREFIX);
}

ncclResult_t moe_nccl_get(const moe_nccl_t** nccl_p) {
  const moe_nccl_t* t = __atomic_load_n(&moe_nccl_resolved, __ATOMIC_ACQUIRE);
  if (t != NULL) {
    *nccl_p = t;
    return ncclSuccess;
  }
  pthread_mutex_lock(&moe_nccl_lock);
  ncclResult_t res = ncclSuccess;
  if (moe_nccl_resolved == NULL) {
    moe_nccl_t found;
    memset(&found, 0, sizeof(found));
    res = moe_nccl_resolve(&found);
    if (res == ncclSuccess) {
      moe_nccl_table = found;
      __atomic_store_n(&moe_nccl_resolved, &moe_nccl_table, __ATOMIC_RELEASE);
      MOE_INFO(NCCL_INIT, "NCCL functions from %s", moe_nccl_table.where);
    }
  }
  if (res == ncclSuccess) *nccl_p = moe_nccl_resolved;
  pthread_mutex_unlock(&moe_nccl_lock);
  return res;
}

int moe_nccl_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  const moe_nccl_allgather_ctx_t* a = ctx;
  ncclResult_t res = ncclSuccess;
  char* dev = NULL;
  MOE_CUDA_CHECK_GOTO(cudaMalloc((void**)&dev, bytes * (size_t)a->nRanks), res, out);
  char* mine = dev + bytes * (size_t)a->rank;
  MOE_CUDA_CHECK_GOTO(cudaMemcpyAsync(mine, send, bytes, cudaMemcpyHostToDevice, a->stream), res, out_free);
  res = a->nccl->allGather(mine, dev, bytes, ncclChar, a->comm, a->stream);
  if (res != ncclSuccess) {
    MOE_ERROR(res, "ncclAllGather (of %s) failed: %s", a->nccl->where, moe_result_str(res));
    goto out_free;
  }
  MOE_CUDA_CHECK_GOTO(cudaMemcpyAsync(recv, dev, bytes * (size_t)a->nRanks, cudaMemcpyDeviceToHost, a->stream), res,
                      out_free);
  MOE_CUDA_CHECK_GOTO(cudaStreamSynchronize(a->stream), res, out_free);
out_free:
  cudaFree(dev);
out:
  return (int)res;
}
