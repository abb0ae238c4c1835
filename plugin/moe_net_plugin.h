/* SPDX-License-Identifier: Apache-2.0 */
/* The net plugin's one current implementation (ABI v11 shaped); the exported
 * structs for v8..v11 in moe_net_exports.c are thin shims over it. */
#ifndef MOE_NET_PLUGIN_H_
#define MOE_NET_PLUGIN_H_

#include "nccl_net/net.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The name NCCL logs and NCCL_NET=<name> selects. */
#define MOE_NET_PLUGIN_NAME "MoE"

ncclResult_t moe_net_init(void** ctx, uint64_t comm_id, const ncclNetCommConfig_v11_t* config,
                          ncclDebugLogger_t logger);
/* ABIs before v11 have one init per process and no finalize. */
ncclResult_t moe_net_init_legacy(ncclDebugLogger_t logger);
ncclResult_t moe_net_finalize(void* ctx);
/* The traffic class the communicator asked for at init (ctx NULL: undefined). */
ncclResult_t moe_net_ctx_traffic_class(void* ctx, int* tc_p);
ncclResult_t moe_net_devices(int* ndev);
ncclResult_t moe_net_get_properties(int dev, ncclNetProperties_v11_t* props);
ncclResult_t moe_net_listen(void* ctx, int dev, void* handle, void** listen_comm);
/* traffic_class: NCCL_NET_TRAFFIC_CLASS_UNDEF when the ABI has none. */
ncclResult_t moe_net_connect(int traffic_class, int dev, void* handle, void** send_comm);
ncclResult_t moe_net_accept(void* listen_comm, void** recv_comm);
ncclResult_t moe_net_reg_mr(void* comm, void* data, size_t size, int type, void** mhandle);
ncclResult_t moe_net_reg_mr_dmabuf(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                                   void** mhandle);
ncclResult_t moe_net_dereg_mr(void* comm, void* mhandle);
ncclResult_t moe_net_isend(void* send_comm, void* data, size_t size, int tag, void* mhandle, void** request);
ncclResult_t moe_net_irecv(void* recv_comm, int n, void** data, const size_t* sizes, int* tags, void** mhandles,
                           void** request);
ncclResult_t moe_net_iflush(void* recv_comm, int n, void** data, int* sizes, void** mhandles, void** request);
ncclResult_t moe_net_test(void* request, int* done, int* sizes);
ncclResult_t moe_net_close_send(void* send_comm);
ncclResult_t moe_net_close_recv(void* recv_comm);
ncclResult_t moe_net_close_listen(void* listen_comm);
ncclResult_t moe_net_set_attr(void* ctx, ncclNetAttr_v11_t* attr);

/* Per-communicator contexts currently open (tests). */
int moe_net_open_contexts(void);

#ifdef __cplusplus
}
#endif
#endif
