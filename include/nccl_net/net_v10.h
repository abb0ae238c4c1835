/* SPDX-License-Identifier: Apache-2.0 */
/* Net plugin ABI v10 (NCCL 2.24 .. 2.27): a profiler callback at init, a
 * per-connection config (traffic class) at connect, profiler handles on
 * isend/irecv. See net.h. */
#ifndef NCCL_MOE_NET_V10_H_
#define NCCL_MOE_NET_V10_H_

#include "nccl_net/net_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int ndevs;
  int devs[NCCL_NET_MAX_DEVS_PER_NIC];
} ncclNetVDeviceProps_v10_t;

typedef struct {
  int trafficClass;  /* NCCL_NET_TRAFFIC_CLASS_UNDEF or a plugin-specific value */
} ncclNetCommConfig_v10_t;

typedef struct {
  char* name;
  char* pciPath;
  uint64_t guid;
  int ptrSupport;
  int regIsGlobal;
  int forceFlush;
  int speed;
  int port;
  float latency;
  int maxComms;
  int maxRecvs;
  ncclNetDeviceType netDeviceType;
  int netDeviceVersion;
  ncclNetVDeviceProps_v10_t vProps;
  size_t maxP2pBytes;
  size_t maxCollBytes;
} ncclNetProperties_v10_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v10_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, ncclNetCommConfig_v10_t* config, void* handle, void** sendComm,
                          ncclNetDeviceHandle_v10_t** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, ncclNetDeviceHandle_v10_t** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                              void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle, void* phandle,
                        void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags, void** mhandles,
                        void** phandles, void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v10_t* props);
} ncclNet_v10_t;

NCCL_MOE_ABI_ASSERT(sizeof(ncclNetCommConfig_v10_t) == 4, "v10 comm config size");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetVDeviceProps_v10_t) == 20, "v10 vdevice props size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v10_t, vProps) == 64, "v10 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v10_t, maxP2pBytes) == 88, "v10 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v10_t, maxCollBytes) == 96, "v10 properties layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetProperties_v10_t) == 104, "v10 properties size");

NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v10_t, connect) == 5 * 8, "v10 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v10_t, isend) == 10 * 8, "v10 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v10_t, makeVDevice) == 19 * 8, "v10 table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNet_v10_t) == 20 * 8, "v10 table size");

#ifdef __cplusplus
}
#endif
#endif
