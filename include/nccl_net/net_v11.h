/* SPDX-License-Identifier: Apache-2.0 */
/* Net plugin ABI v11 (NCCL 2.28+): init/finalize per communicator with a
 * context pointer that listen/connect receive, the comm config moved to init,
 * multi-request size and application-aware attributes. See net.h. */
#ifndef NCCL_MOE_NET_V11_H_
#define NCCL_MOE_NET_V11_H_

#include "nccl_net/net_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int ndevs;
  int devs[NCCL_NET_MAX_DEVS_PER_NIC];
} ncclNetVDeviceProps_v11_t;

typedef struct {
  int trafficClass;  /* NCCL_NET_TRAFFIC_CLASS_UNDEF or a plugin-specific value */
} ncclNetCommConfig_v11_t;

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
  ncclNetVDeviceProps_v11_t vProps;
  size_t maxP2pBytes;
  size_t maxCollBytes;
  int maxMultiRequestSize;  /* requests one multi-request may group (1: none) */
} ncclNetProperties_v11_t;

#define NCCL_NET_ATTR_UNDEF (-1)

typedef struct {
  int32_t maxConcurrentPeers;
  int32_t minConcurrentPeers;
  int32_t maxFlowsPerPeer;
  int32_t minFlowsPerPeer;
} ncclNetCommAttr_v11_t;

typedef struct {
  ncclNetCommAttr_v11_t sendCommAttr;
  ncclNetCommAttr_v11_t recvCommAttr;
  uint32_t op;
  uint32_t algo;
  uint32_t proto;
} ncclNetAttr_v11_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclNetCommConfig_v11_t* config,
                       ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v11_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm,
                          ncclNetDeviceHandle_v11_t** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, ncclNetDeviceHandle_v11_t** recvDevComm);
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
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v11_t* props);
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, ncclNetAttr_v11_t* netAttr);
} ncclNet_v11_t;

NCCL_MOE_ABI_ASSERT(sizeof(ncclNetCommConfig_v11_t) == 4, "v11 comm config size");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetVDeviceProps_v11_t) == 20, "v11 vdevice props size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v11_t, vProps) == 64, "v11 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v11_t, maxP2pBytes) == 88, "v11 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v11_t, maxCollBytes) == 96, "v11 properties layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize) == 104, "v11 properties layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetProperties_v11_t) == 112, "v11 properties size");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetCommAttr_v11_t) == 16, "v11 comm attr size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNetAttr_v11_t, op) == 32, "v11 net attr layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetAttr_v11_t) == 44, "v11 net attr size");

NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v11_t, listen) == 4 * 8, "v11 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v11_t, isend) == 10 * 8, "v11 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v11_t, makeVDevice) == 19 * 8, "v11 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v11_t, finalize) == 20 * 8, "v11 table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclNet_v11_t, setNetAttr) == 21 * 8, "v11 table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNet_v11_t) == 22 * 8, "v11 table size");

#ifdef __cplusplus
}
#endif
#endif
