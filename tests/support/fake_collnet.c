/* SPDX-License-Identifier: Apache-2.0 */
/* A stand-in for an in-network reduction plugin (SHARP's libnccl-net.so) to
 * test the CollNet pass-through: exports ncclCollNetPlugin_v11 and _v8 (only
 * _v8 when built with FAKE_COLLNET_ONLY_V8), counts the calls that reach it,
 * and says so through NCCL's logger so a run with real NCCL shows it was used.
 * It offers no devices unless FAKE_COLLNET_DEVICES says so: with real NCCL it
 * is loaded and initialized, and CollNet then stays off.
 *
 * Its v11 behaves as a real library may: init makes a context before NCCL
 * asks for devices (even when there are none), fills part of its table
 * (reduceSupport) only then, and fails with its context set when
 * FAKE_COLLNET_INIT_FAIL is set. fake_collnet_live counts contexts made and
 * not finalized. */
#include <stdlib.h>

#include "nccl_net/collnet.h"

#define FAKE_EXPORT __attribute__((visibility("default")))
#define FAKE_NAME "FakeCollNet"

/* Calls that reached this library (tests read it with dlsym). */
FAKE_EXPORT int fake_collnet_calls;

static ncclResult_t fake_devices(int* ndev) {
  fake_collnet_calls++;
  const char* n = getenv("FAKE_COLLNET_DEVICES");
  *ndev = n != NULL ? atoi(n) : 0;
  return ncclSuccess;
}

static ncclResult_t fake_unsupported(void) { return ncclInternalError; }

static void fake_hello(ncclDebugLogger_t log, int version) {
  fake_collnet_calls++;
  if (log != NULL) log(NCCL_LOG_INFO, NCCL_INIT | NCCL_NET, __FILE__, __LINE__, FAKE_NAME " v%d: init", version);
}

static ncclResult_t fake_init_v8(ncclDebugLogger_t log) {
  fake_hello(log, 8);
  return ncclSuccess;
}

#define FAKE_UNSUPPORTED(field) .field = (void*)fake_unsupported

FAKE_EXPORT ncclCollNet_v8_t ncclCollNetPlugin_v8 = {
    .name = FAKE_NAME,
    .init = fake_init_v8,
    .devices = fake_devices,
    FAKE_UNSUPPORTED(getProperties), FAKE_UNSUPPORTED(listen), FAKE_UNSUPPORTED(connect),
    FAKE_UNSUPPORTED(reduceSupport), FAKE_UNSUPPORTED(regMr), FAKE_UNSUPPORTED(regMrDmaBuf),
    FAKE_UNSUPPORTED(deregMr), FAKE_UNSUPPORTED(iallreduce), FAKE_UNSUPPORTED(iallgather),
    FAKE_UNSUPPORTED(ireducescatter), FAKE_UNSUPPORTED(iflush), FAKE_UNSUPPORTED(test),
    FAKE_UNSUPPORTED(closeColl), FAKE_UNSUPPORTED(closeListen),
};

#ifndef FAKE_COLLNET_ONLY_V8
/* Contexts made by init and not yet finalized (tests read it with dlsym). */
FAKE_EXPORT int fake_collnet_live;

static ncclResult_t fake_reduce_support(ncclDataType_t type, ncclRedOp_t op, int* supported) {
  fake_collnet_calls++;
  *supported = type == ncclFloat32 && op == ncclSum;
  return ncclSuccess;
}

static ncclResult_t fake_init_v11(void** ctx, uint64_t comm_id, ncclDebugLogger_t log);

static ncclResult_t fake_finalize(void* ctx) {
  fake_collnet_calls++;
  if (ctx != &fake_collnet_live || fake_collnet_live <= 0) return ncclInvalidArgument;
  fake_collnet_live--;
  return ncclSuccess;
}

FAKE_EXPORT ncclCollNet_v11_t ncclCollNetPlugin_v11 = {
    .name = FAKE_NAME,
    .init = fake_init_v11,
    .devices = fake_devices,
    FAKE_UNSUPPORTED(getProperties), FAKE_UNSUPPORTED(listen), FAKE_UNSUPPORTED(connect),
    .reduceSupport = NULL, /* filled in by init */
    FAKE_UNSUPPORTED(regMr), FAKE_UNSUPPORTED(regMrDmaBuf),
    FAKE_UNSUPPORTED(deregMr), FAKE_UNSUPPORTED(iallreduce), FAKE_UNSUPPORTED(iallgather),
    FAKE_UNSUPPORTED(ireducescatter), FAKE_UNSUPPORTED(iflush), FAKE_UNSUPPORTED(test),
    FAKE_UNSUPPORTED(closeColl), FAKE_UNSUPPORTED(closeListen), FAKE_UNSUPPORTED(makeVDevice),
    .finalize = fake_finalize,
};

static ncclResult_t fake_init_v11(void** ctx, uint64_t comm_id, ncclDebugLogger_t log) {
  (void)comm_id;
  fake_hello(log, 11);
  *ctx = &fake_collnet_live;
  if (getenv("FAKE_COLLNET_INIT_FAIL") != NULL) return ncclSystemError;
  fake_collnet_live++;
  ncclCollNetPlugin_v11.reduceSupport = fake_reduce_support;
  return ncclSuccess;
}
#endif
