/* SPDX-License-Identifier: Apache-2.0 */
#include "transport/moe_transport.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "common/moe_check.h"
#include "common/moe_env.h"

uint64_t moe_net_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t moe_net_random_u64(void) {
  uint64_t v = 0;
  while (v == 0) {
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v)) {
      /* No entropy yet (early boot): ids only need to differ, not be secret. */
      static uint64_t counter = 0;
      uint64_t c = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
      v = moe_net_now_ns() ^ ((uint64_t)getpid() << 32) ^ (c * 0x9E3779B97F4A7C15ull);
    }
  }
  return v;
}

#define MOE_TRANSPORT_WHY_MAX 512
/* Pages mincore() reports on per call: a bounded stack vector. */
#define MOE_NET_MINCORE_PAGES 16384

/* 1 when every page of [data, data + size) is mapped: mincore() fails with
 * ENOMEM on a range with a hole, and touches nothing. */
static int moe_net_host_mapped(const void* data, size_t size) {
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t begin = (uintptr_t)data & ~(page - 1);
  const uintptr_t end = (uintptr_t)data + size;
  unsigned char vec[MOE_NET_MINCORE_PAGES];
  while (begin < end) {
    uintptr_t len = end - begin;
    if (len > (uintptr_t)MOE_NET_MINCORE_PAGES * page) len = (uintptr_t)MOE_NET_MINCORE_PAGES * page;
    if (mincore((void*)begin, (size_t)len, vec) != 0 && errno == ENOMEM) return 0;
    begin += len;
  }
  return 1;
}

ncclResult_t moe_net_reg_check(const char* what, const void* data, size_t size, int type) {
  if (data == NULL && size > 0) return MOE_ERROR(ncclInvalidArgument, "%s: NULL region of %zu bytes", what, size);
  if ((uint64_t)size > MOE_NET_MAX_REG_BYTES)
    return MOE_ERROR(ncclInvalidArgument, "%s: region of %zu bytes exceeds the limit of %llu (MOE_NET_MAX_REG_BYTES)",
                     what, size, (unsigned long long)MOE_NET_MAX_REG_BYTES);
  if ((uintptr_t)data + size < (uintptr_t)data)
    return MOE_ERROR(ncclInvalidArgument, "%s: region %p + %zu bytes wraps around the address space", what, data, size);
  if (type == NCCL_PTR_HOST && size > 0 && !moe_net_host_mapped(data, size))
    return MOE_ERROR(ncclInvalidArgument, "%s: host region [%p, +%zu bytes) is not (entirely) mapped memory", what,
                     data, size);
  return ncclSuccess;
}

static const moe_transport_t* moe_transports[MOE_NET_KINDS];

void moe_transport_register(const moe_transport_t* transport) {
  if (transport != NULL && transport->kind > 0 && transport->kind < MOE_NET_KINDS)
    __atomic_store_n(&moe_transports[transport->kind], transport, __ATOMIC_RELEASE);
}

const moe_transport_t* moe_transport_get(moe_net_kind_t kind) {
  return kind > 0 && kind < MOE_NET_KINDS ? __atomic_load_n(&moe_transports[kind], __ATOMIC_ACQUIRE) : NULL;
}

/* auto: the ib backend when it starts and finds an active port. */
static ncclResult_t moe_transport_try_ib(int forced, const moe_transport_t** transport_p) {
  const moe_transport_t* ib = moe_transport_get(MOE_NET_KIND_IB);
  if (ib == NULL) {
    if (forced) return MOE_ERROR(ncclInvalidUsage, "NCCL_MOE_NET_BACKEND=ib: this library has no verbs backend");
    return ncclSystemError;
  }
  /* NCCL_IB_DISABLE means what it means to NCCL: no verbs at all. */
  if (moe_env()->ib_disable) {
    if (forced)
      return MOE_ERROR(ncclInvalidUsage, "NCCL_MOE_NET_BACKEND=ib but NCCL_IB_DISABLE is set: unset one of them");
    MOE_INFO(NCCL_INIT | NCCL_NET, "NCCL_IB_DISABLE set: not trying the verbs backend");
    return ncclSystemError;
  }
  moe_clear_last_error();
  ncclResult_t res = ib->init();
  if (res != ncclSuccess) {
    if (forced) {
      char why[MOE_TRANSPORT_WHY_MAX]; /* the backend's own message, before ours replaces it */
      snprintf(why, sizeof(why), "%s", moe_last_error());
      return MOE_ERROR(res, "NCCL_MOE_NET_BACKEND=ib: the verbs backend failed to start%s%s", why[0] ? ": " : "",
                       why);
    }
    return res;
  }
  int ndev = 0;
  res = ib->devices(&ndev);
  if (res == ncclSuccess && ndev > 0) {
    *transport_p = ib;
    return ncclSuccess;
  }
  ib->fini();
  if (forced) return MOE_ERROR(ncclSystemError, "NCCL_MOE_NET_BACKEND=ib: no active verbs port found (NCCL_IB_HCA=\"%s\")",
                               moe_env()->ib_hca);
  return ncclSystemError;
}

ncclResult_t moe_transport_select(const moe_transport_t** transport_p) {
  int backend = moe_env()->net_backend;
  const moe_transport_t* chosen = NULL;
  if (backend == MOE_NET_BACKEND_IB) {
    MOE_CHECK(moe_transport_try_ib(1, &chosen));
  } else if (backend == MOE_NET_BACKEND_AUTO && moe_transport_try_ib(0, &chosen) != ncclSuccess) {
    moe_clear_last_error();
    MOE_INFO(NCCL_INIT | NCCL_NET, "no usable verbs device; using the socket backend");
    chosen = NULL;
  }
  if (chosen == NULL) {
    chosen = moe_transport_get(MOE_NET_KIND_SOCKET);
    if (chosen == NULL) return MOE_ERROR(ncclInternalError, "no socket backend is registered");
    MOE_CHECK(chosen->init());
  }
  *transport_p = chosen;
  return ncclSuccess;
}
