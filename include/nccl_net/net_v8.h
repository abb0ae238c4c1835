/* SPDX-License-Identifier: Apache-2.0 */
/* Net plugin ABI v8 (NCCL 2.19 .. 2.21): int message sizes, one init per
 * process, no device merging. See net.h. */
#ifndef NCCL_MOE_NET_V8_H_
#define NCCL_MOE_NET_V8_H_

#include "nccl_net/net_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  char* name;        /* for logs */
  char* pciPath;     /* the device's PCI path in /sys, NULL when virtual */
  uint64_t guid;     /* identifies the NIC chip across its PCI functions */
  int ptrSupport;    /* NCCL_PTR_* bits */
  int regIsGlobal;   /* 1: a registration is usable with every comm */
  int speed;         /* Mbps */
  int port;
  float latency;     /* us */
  int maxComms;
  int maxRecvs;      /* buffers one irecv may cover */
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
} ncclNetProperties_v8_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v8_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, void* handle, void** sendComm, ncclNetDeviceHandle_v8_t** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, ncclNetDeviceHandle_v8_t** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                              void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, int size, int tag, void* mhandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, int* sizes, int* tags, void** mhandles,
                        void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
} ncclNet_v8_t;

NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, guid) == 16, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, ptrSupport) == 24, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, regIsGlobal) == 28, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, speed) == 32, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, port) == 36, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, latency) == 40, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, maxComms) == 44, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, maxRecvs) == 48, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, netDeviceType) == 52, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v8_t, netDeviceVersion) == 56, "v8 properties layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetProperties_v8_t) == 64, "v8 properties size");

NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, init) == 1 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, listen) == 4 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, regMr) == 7 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, isend) == 10 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, test) == 13 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, closeListen) == 16 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v8_t, irecvConsumed) == 18 * 8, "v8 table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNet_v8_t) == 19 * 8, "v8 table size");

#ifdef __cplusplus
}
#endif
#endif
