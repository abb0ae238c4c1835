/* SPDX-License-Identifier: Apache-2.0 */
#include "net_test_util.h"

#include <dlfcn.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

uint64_t net_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

char* net_guarded_alloc(size_t size, int fill) {
  char* p = malloc(size + 2 * NET_GUARD);
  if (p == NULL) return NULL;
  memset(p, NET_GUARD_BYTE, NET_GUARD);
  memset(p + NET_GUARD, fill, size);
  memset(p + NET_GUARD + size, NET_GUARD_BYTE, NET_GUARD);
  return p + NET_GUARD;
}

int net_all_bytes(const char* p, size_t n, int v) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] != (unsigned char)v) return 0;
  return 1;
}

int net_guarded_free(char* region, size_t size) {
  const int intact = net_all_bytes(region - NET_GUARD, NET_GUARD, NET_GUARD_BYTE) &&
                     net_all_bytes(region + size, NET_GUARD, NET_GUARD_BYTE);
  free(region - NET_GUARD);
  return intact;
}

void net_test_env(void) {
  /* Meson runs the suites once per backend by setting NCCL_MOE_NET_BACKEND
   * (and, for ib, NCCL_MOE_IBVERBS_LIBRARY=the verbs emulator). */
  setenv("NCCL_MOE_NET_BACKEND", "socket", 0);
  setenv("NCCL_SOCKET_IFNAME", "lo", 1);
}

int net_test_ib(void) {
  const char* b = getenv("NCCL_MOE_NET_BACKEND");
  return b != NULL && strcmp(b, "ib") == 0;
}

int net_test_emulated(void) {
  const char* lib = getenv("NCCL_MOE_IBVERBS_LIBRARY");
  return net_test_ib() && lib != NULL && strstr(lib, "verbs-emu") != NULL;
}

int net_plugin_load(const char* path, net_plugin_t* p) {
  if (path == NULL) path = getenv("MOE_NET_PLUGIN_PATH");
  if (path == NULL) {
    fprintf(stderr, "MOE_NET_PLUGIN_PATH is not set\n");
    return -1;
  }
  p->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (p->lib == NULL) {
    fprintf(stderr, "dlopen(%s): %s\n", path, dlerror());
    return -1;
  }
  p->net = (ncclNet_v11_t*)dlsym(p->lib, "ncclNetPlugin_v11");
  if (p->net == NULL) {
    fprintf(stderr, "dlsym(ncclNetPlugin_v11): %s\n", dlerror());
    dlclose(p->lib);
    return -1;
  }
  return 0;
}

const char* net_plugin_last_error(const net_plugin_t* p) {
  const char* (*fn)(void) = p->lib != NULL ? (const char* (*)(void))dlsym(p->lib, "ncclMoeGetLastError") : NULL;
  return fn != NULL ? fn() : "(no ncclMoeGetLastError in the plugin)";
}

void net_plugin_unload(net_plugin_t* p) {
  if (p->lib != NULL) dlclose(p->lib);
  p->lib = NULL;
  p->net = NULL;
}

ncclResult_t net_connect_pair(ncclNet_v11_t* net, void* ctx, int dev, void** send_comm, void** recv_comm,
                              void** listen_comm) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  memset(handle, 0, sizeof(handle));
  *send_comm = *recv_comm = NULL;
  ncclResult_t res = net->listen(ctx, dev, handle, listen_comm);
  if (res != ncclSuccess) return res;
  /* NCCL hands the peer a copy of the handle and retries connect on that copy. */
  char remote[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(remote, handle, sizeof(remote));
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (*send_comm == NULL || *recv_comm == NULL) {
    ncclNetDeviceHandle_v11_t* dev_handle = NULL;
    if (*send_comm == NULL && (res = net->connect(ctx, dev, remote, send_comm, &dev_handle)) != ncclSuccess)
      return res;
    if (*recv_comm == NULL && (res = net->accept(*listen_comm, recv_comm, &dev_handle)) != ncclSuccess) return res;
    if (net_now_ms() > deadline) return ncclInternalError;
  }
  return ncclSuccess;
}

ncclResult_t net_wait(ncclNet_v11_t* net, void* request, int* sizes) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  for (;;) {
    int done = 0;
    ncclResult_t res = net->test(request, &done, sizes);
    if (res != ncclSuccess || done) return res;
    if (net_now_ms() > deadline) return ncclInternalError;
    sched_yield();
  }
}

ncclResult_t net_isend(ncclNet_v11_t* net, void* comm, void* data, size_t size, int tag, void* mh, void** req) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  *req = NULL;
  while (*req == NULL) {
    ncclResult_t res = net->isend(comm, data, size, tag, mh, NULL, req);
    if (res != ncclSuccess) return res;
    if (net_now_ms() > deadline) return ncclInternalError;
  }
  return ncclSuccess;
}

ncclResult_t net_irecv(ncclNet_v11_t* net, void* comm, int n, void** data, size_t* sizes, int* tags, void** mh,
                       void** req) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  *req = NULL;
  while (*req == NULL) {
    ncclResult_t res = net->irecv(comm, n, data, sizes, tags, mh, NULL, req);
    if (res != ncclSuccess) return res;
    if (net_now_ms() > deadline) return ncclInternalError;
  }
  return ncclSuccess;
}

void* net_reg(ncclNet_v11_t* net, void* comm, void* data, size_t size) {
  void* mh = NULL;
  if (net->regMr(comm, data, size, NCCL_PTR_HOST, &mh) != ncclSuccess) return NULL;
  return mh;
}

void net_dereg(ncclNet_v11_t* net, void* comm, void* mh) {
  if (mh != NULL) net->deregMr(comm, mh);
}

static uint64_t net_mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

void net_fill(void* buf, size_t size, uint64_t seed) {
  uint8_t* p = (uint8_t*)buf;
  uint64_t s = net_mix(seed + 1);
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    memcpy(p + i, &s, 8);
  }
  for (; i < size; i++) p[i] = (uint8_t)(net_mix(s + i));
}

int net_check(const void* buf, size_t size, uint64_t seed) {
  uint8_t* ref = malloc(size > 0 ? size : 1);
  net_fill(ref, size, seed);
  int ok = size == 0 || memcmp(ref, buf, size) == 0;
  free(ref);
  return ok;
}
