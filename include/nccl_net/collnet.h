/* SPDX-License-Identifier: Apache-2.0 */
/* Our own declarations of NCCL's CollNet plugin ABI (in-network reductions,
 * e.g. SHARP's libnccl-net.so), versions 8 to 11, written from NCCL's
 * src/include/plugin/net/net_v*.h. We never call these tables ourselves:
 * plugin/moe_collnet.c hands another library's ncclCollNetPlugin_v* to NCCL
 * unchanged. The declarations serve the test double that stands in for such
 * a library, and pin the layouts with static asserts (LP64). */
#ifndef NCCL_MOE_COLLNET_H_
#define NCCL_MOE_COLLNET_H_

#include <nccl.h>

#include "nccl_net/net.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One part of a gathered or scattered buffer. */
typedef struct {
  void* mhandle;
  void* address;
  uint32_t size;
} ncclNetSGE_v8_t;

typedef struct {
  void* mhandle;
  void* address;
  size_t size;
} ncclNetSGE_v9_t;
typedef ncclNetSGE_v9_t ncclNetSGE_v10_t;
typedef ncclNetSGE_v9_t ncclNetSGE_v11_t;

/* v8 (NCCL 2.19 .. 2.21): int allreduce count. */
typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v8_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* handles[], int nranks, int rank, void* listenComm, void** collComm);
  ncclResult_t (*reduceSupport)(ncclDataType_t dataType, ncclRedOp_t redOp, int* supported);
  ncclResult_t (*regMr)(void* collComm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* collComm, void* data, size_t size, int type, uint64_t offset, int fd,
                              void** mhandle);
  ncclResult_t (*deregMr)(void* collComm, void* mhandle);
  ncclResult_t (*iallreduce)(void* collComm, void* sendData, void* recvData, int count, ncclDataType_t dataType,
                             ncclRedOp_t redOp, void* sendMhandle, void* recvMhandle, void** request);
  ncclResult_t (*iallgather)(void* collComm, void* sendData, int nRecvParts, ncclNetSGE_v8_t* recvParts,
                             size_t bytesPerRank, size_t windowOffset, size_t windowBytes, void* sendMhandle,
                             void** request);
  ncclResult_t (*ireducescatter)(void* collComm, int nSendParts, ncclNetSGE_v8_t* sendParts, void* recvData,
                                 size_t bytesPerRank, size_t windowOffset, size_t windowBytes, ncclDataType_t dataType,
                                 ncclRedOp_t redOp, void* recvMhandle, void** request);
  ncclResult_t (*iflush)(void* collComm, void* data, int size, void* mhandle, void** request);
  ncclResult_t (*test)(void* request, int* done, int* size);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
} ncclCollNet_v8_t;

/* v9 and v10 (NCCL 2.22 .. 2.27): size_t counts, virtual devices. The tables
 * differ only in their properties and vdevice types. */
#define NCCL_MOE_COLLNET_V9_V10(props_t, vprops_t, sge_t, table_t)                                                 \
  typedef struct {                                                                                                \
    const char* name;                                                                                             \
    ncclResult_t (*init)(ncclDebugLogger_t logFunction);                                                          \
    ncclResult_t (*devices)(int* ndev);                                                                           \
    ncclResult_t (*getProperties)(int dev, props_t* props);                                                       \
    ncclResult_t (*listen)(int dev, void* handle, void** listenComm);                                             \
    ncclResult_t (*connect)(void* handles[], int nranks, int rank, void* listenComm, void** collComm);            \
    ncclResult_t (*reduceSupport)(ncclDataType_t dataType, ncclRedOp_t redOp, int* supported);                    \
    ncclResult_t (*regMr)(void* collComm, void* data, size_t size, int type, void** mhandle);                     \
    ncclResult_t (*regMrDmaBuf)(void* collComm, void* data, size_t size, int type, uint64_t offset, int fd,       \
                                void** mhandle);                                                                  \
    ncclResult_t (*deregMr)(void* collComm, void* mhandle);                                                       \
    ncclResult_t (*iallreduce)(void* collComm, void* sendData, void* recvData, size_t count,                      \
                               ncclDataType_t dataType, ncclRedOp_t redOp, void* sendMhandle, void* recvMhandle,  \
                               void** request);                                                                   \
    ncclResult_t (*iallgather)(void* collComm, void* sendData, int nRecvParts, sge_t* recvParts,                  \
                               size_t bytesPerRank, size_t windowOffset, size_t windowBytes, void* sendMhandle,   \
                               void** request);                                                                   \
    ncclResult_t (*ireducescatter)(void* collComm, int nSendParts, sge_t* sendParts, void* recvData,              \
                                   size_t bytesPerRank, size_t windowOffset, size_t windowBytes,                  \
                                   ncclDataType_t dataType, ncclRedOp_t redOp, void* recvMhandle, void** request); \
    ncclResult_t (*iflush)(void* collComm, void* data, int size, void* mhandle, void** request);                  \
    ncclResult_t (*test)(void* request, int* done, int* size);                                                    \
    ncclResult_t (*closeColl)(void* collComm);                                                                    \
    ncclResult_t (*closeListen)(void* listenComm);                                                                \
    ncclResult_t (*makeVDevice)(int* d, vprops_t* props);                                                         \
  } table_t

NCCL_MOE_COLLNET_V9_V10(ncclNetProperties_v9_t, ncclNetVDeviceProps_v9_t, ncclNetSGE_v9_t, ncclCollNet_v9_t);
NCCL_MOE_COLLNET_V9_V10(ncclNetProperties_v10_t, ncclNetVDeviceProps_v10_t, ncclNetSGE_v10_t, ncclCollNet_v10_t);
#undef NCCL_MOE_COLLNET_V9_V10

/* v11 (NCCL 2.28+): init/finalize per communicator with a context. */
typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v11_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* handles[], int nranks, int rank, void* listenComm, void** collComm);
  ncclResult_t (*reduceSupport)(ncclDataType_t dataType, ncclRedOp_t redOp, int* supported);
  ncclResult_t (*regMr)(void* collComm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* collComm, void* data, size_t size, int type, uint64_t offset, int fd,
                              void** mhandle);
  ncclResult_t (*deregMr)(void* collComm, void* mhandle);
  ncclResult_t (*iallreduce)(void* collComm, void* sendData, void* recvData, size_t count, ncclDataType_t dataType,
                             ncclRedOp_t redOp, void* sendMhandle, void* recvMhandle, void** request);
  ncclResult_t (*iallgather)(void* collComm, void* sendData, int nRecvParts, ncclNetSGE_v11_t* recvParts,
                             size_t bytesPerRank, size_t windowOffset, size_t windowBytes, void* sendMhandle,
                             void** request);
  ncclResult_t (*ireducescatter)(void* collComm, int nSendParts, ncclNetSGE_v11_t* sendParts, void* recvData,
                                 size_t bytesPerRank, size_t windowOffset, size_t windowBytes, ncclDataType_t dataType,
                                 ncclRedOp_t redOp, void* recvMhandle, void** request);
  ncclResult_t (*iflush)(void* collComm, void* data, int size, void* mhandle, void** request);
  ncclResult_t (*test)(void* request, int* done, int* size);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v11_t* props);
  ncclResult_t (*finalize)(void* ctx);
} ncclCollNet_v11_t;

NCCL_MOE_ABI_ASSERT(sizeof(ncclNetSGE_v8_t) == 24, "v8 SGE size");
NCCL_MOE_ABI_ASSERT(sizeof(ncclNetSGE_v9_t) == 24, "v9 SGE size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclCollNet_v8_t, reduceSupport) == 6 * 8, "v8 CollNet table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclCollNet_v8_t, iallreduce) == 10 * 8, "v8 CollNet table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclCollNet_v8_t) == 17 * 8, "v8 CollNet table size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclCollNet_v9_t, makeVDevice) == 17 * 8, "v9 CollNet table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclCollNet_v9_t) == 18 * 8, "v9 CollNet table size");
NCCL_MOE_ABI_ASSERT(sizeof(ncclCollNet_v10_t) == 18 * 8, "v10 CollNet table size");
NCCL_MOE_ABI_ASSERT(offsetof(ncclCollNet_v11_t, iflush) == 13 * 8, "v11 CollNet table layout");
NCCL_MOE_ABI_ASSERT(offsetof(ncclCollNet_v11_t, finalize) == 18 * 8, "v11 CollNet table layout");
NCCL_MOE_ABI_ASSERT(sizeof(ncclCollNet_v11_t) == 19 * 8, "v11 CollNet table size");

#ifdef __cplusplus
}
#endif
#endif
