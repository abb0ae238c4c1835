/* SPDX-License-Identifier: Apache-2.0 */
/* Net plugin ABI v9 (NCCL 2.22 .. 2.23): size_t message sizes, virtual NICs
 * (makeVDevice), per-operation size limits in the properties. See net.h. */
#ifndef NCCL_MOE_NET_V9_H_
#define NCCL_MOE_NET_V9_H_

#include "nccl_net/net_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int ndevs;
  int devs[NCCL_NET_MAX_DEVS_PER_NIC];
} ncclNetVDeviceProps_v9_t;

typedef struct {
  char* name;
  char* pciPath;
  uint64_t guid;
  int ptrSupport;
  int regIsGlobal;
  int forceFlush;    /* 1: NCCL must flush every receive, even host ones */
  int speed;
  int port;
  float latency;
  int maxComms;
  int maxRecvs;
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
  ncclNetVDeviceProps_v9_t vProps;
  size_t maxP2pBytes;   /* largest single send/recv */
  size_t maxCollBytes;  /* largest single collective-net operation */
} ncclNetProperties_v9_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v9_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, void* handle, void** sendComm, ncclNetDeviceHandle_v9_t** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, ncclNetDeviceHandle_v9_t** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                              void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags, void** mhandles,
                        void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v9_t* props);
} ncclNet_v9_t;

NCCL_MOE_ABI_ASSERT(sizeof(ncclNetVDeviceProps_v9_t) == 20, "v9 vdevice props size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, forceFlush) == 32, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, speed) == 36, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, latency) == 44, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, maxRecvs) == 52, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, netDeviceType) == 56, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, netDeviceVersion) == 60, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, vProps) == 64, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, maxP2pBytes) == 88, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v9_t, maxCollBytes) == 96, "v9 properties layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetProperties_v9_t) == 104, "v9 properties size");

NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v9_t, isend) == 10 * 8, "v9 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v9_t, irecvConsumed) == 18 * 8, "v9 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v9_t, makeVDevice) == 19 * 8, "v9 table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNet_v9_t) == 20 * 8, "v9 table size");

#ifdef __cplusplus
}
#endif
#endif
