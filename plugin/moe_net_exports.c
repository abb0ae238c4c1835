/* SPDX-License-Identifier: Apache-2.0 */
/* The structs NCCL looks up: ncclNetPlugin_v11 .. _v8, thin shims over the
 * one implementation in moe_net_plugin.c. We offer no device offload, no
 * virtual-NIC merging (makeVDevice NULL: NCCL then uses the physical devices)
 * and no CollNet, so those entries stay NULL. */
#include <stddef.h>
#include <string.h>

#include "common/moe_check.h"
#include "plugin/moe_net_plugin.h"
#include "transport/moe_transport.h"

#define MOE_EXPORT __attribute__((visibility("default")))

/* --- v11 ------------------------------------------------------------------ */
static ncclResult_t moe_v11_init(void** ctx, uint64_t comm_id, ncclNetCommConfig_v11_t* config,
                                 ncclDebugLogger_t logger, ncclProfilerCallback_t prof) {
  (void)prof;
  return moe_net_init(ctx, comm_id, config, logger);
}

static ncclResult_t moe_v11_get_properties(int dev, ncclNetProperties_v11_t* props) {
  return moe_net_get_properties(dev, props);
}

static ncclResult_t moe_v11_connect(void* ctx, int dev, void* handle, void** send_comm,
                                    ncclNetDeviceHandle_v11_t** dev_comm) {
  (void)dev_comm;
  int tc = NCCL_NET_TRAFFIC_CLASS_UNDEF;
  MOE_CHECK(moe_net_ctx_traffic_class(ctx, &tc));
  return moe_net_connect(tc, dev, handle, send_comm);
}

static ncclResult_t moe_v11_accept(void* listen_comm, void** recv_comm, ncclNetDeviceHandle_v11_t** dev_comm) {
  (void)dev_comm;
  return moe_net_accept(listen_comm, recv_comm);
}

static ncclResult_t moe_v11_isend(void* send_comm, void* data, size_t size, int tag, void* mhandle, void* phandle,
                                  void** request) {
  (void)phandle;
  return moe_net_isend(send_comm, data, size, tag, mhandle, request);
}

static ncclResult_t moe_v11_irecv(void* recv_comm, int n, void** data, size_t* sizes, int* tags, void** mhandles,
                                  void** phandles, void** request) {
  (void)phandles;
  return moe_net_irecv(recv_comm, n, data, sizes, tags, mhandles, request);
}

MOE_EXPORT ncclNet_v11_t ncclNetPlugin_v11 = {
    .name = MOE_NET_PLUGIN_NAME,
    .init = moe_v11_init,
    .devices = moe_net_devices,
    .getProperties = moe_v11_get_properties,
    .listen = moe_net_listen,
    .connect = moe_v11_connect,
    .accept = moe_v11_accept,
    .regMr = moe_net_reg_mr,
    .regMrDmaBuf = moe_net_reg_mr_dmabuf,
    .deregMr = moe_net_dereg_mr,
    .isend = moe_v11_isend,
    .irecv = moe_v11_irecv,
    .iflush = moe_net_iflush,
    .test = moe_net_test,
    .closeSend = moe_net_close_send,
    .closeRecv = moe_net_close_recv,
    .closeListen = moe_net_close_listen,
    .getDeviceMr = NULL,
    .irecvConsumed = NULL,
    .makeVDevice = NULL,
    .finalize = moe_net_finalize,
    .setNetAttr = moe_net_set_attr,
};

/* --- v10 ------------------------------------------------------------------ */
static ncclResult_t moe_v10_init(ncclDebugLogger_t logger, ncclProfilerCallback_t prof) {
  (void)prof;
  return moe_net_init_legacy(logger);
}

static ncclResult_t moe_v10_get_properties(int dev, ncclNetProperties_v10_t* props) {
  ncclNetProperties_v11_t p;
  MOE_CHECK(moe_net_get_properties(dev, &p));
  /* v10 is v11 without maxMultiRequestSize at the end. */
  _Static_assert(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize) == sizeof(ncclNetProperties_v10_t),
                 "v10 properties must be a prefix of v11's");
  memcpy(props, &p, sizeof(*props));
  return ncclSuccess;
}

static ncclResult_t moe_v10_listen(int dev, void* handle, void** listen_comm) {
  return moe_net_listen(NULL, dev, handle, listen_comm);
}

static ncclResult_t moe_v10_connect(int dev, ncclNetCommConfig_v10_t* config, void* handle, void** send_comm,
                                    ncclNetDeviceHandle_v10_t** dev_comm) {
  (void)dev_comm;
  int tc = config != NULL ? config->trafficClass : NCCL_NET_TRAFFIC_CLASS_UNDEF;
  return moe_net_connect(tc, dev, handle, send_comm);
}

MOE_EXPORT ncclNet_v10_t ncclNetPlugin_v10 = {
    .name = MOE_NET_PLUGIN_NAME,
    .init = moe_v10_init,
    .devices = moe_net_devices,
    .getProperties = moe_v10_get_properties,
    .listen = moe_v10_listen,
    .connect = moe_v10_connect,
    .accept = moe_v11_accept,
    .regMr = moe_net_reg_mr,
    .regMrDmaBuf = moe_net_reg_mr_dmabuf,
    .deregMr = moe_net_dereg_mr,
    .isend = moe_v11_isend,
    .irecv = moe_v11_irecv,
    .iflush = moe_net_iflush,
    .test = moe_net_test,
    .closeSend = moe_net_close_send,
    .closeRecv = moe_net_close_recv,
    .closeListen = moe_net_close_listen,
    .getDeviceMr = NULL,
    .irecvConsumed = NULL,
    .makeVDevice = NULL,
};

/* --- v9 ------------------------------------------------------------------- */
static ncclResult_t moe_v9_init(ncclDebugLogger_t logger) { return moe_net_init_legacy(logger); }

static ncclResult_t moe_v9_get_properties(int dev, ncclNetProperties_v9_t* props) {
  ncclNetProperties_v11_t p;
  MOE_CHECK(moe_net_get_properties(dev, &p));
  _Static_assert(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize) == sizeof(ncclNetProperties_v9_t),
                 "v9 properties must be a prefix of v11's");
  memcpy(props, &p, sizeof(*props));
  return ncclSuccess;
}

static ncclResult_t moe_v9_connect(int dev, void* handle, void** send_comm, ncclNetDeviceHandle_v9_t** dev_comm) {
  (void)dev_comm;
  return moe_net_connect(NCCL_NET_TRAFFIC_CLASS_UNDEF, dev, handle, send_comm);
}

static ncclResult_t moe_v9_isend(void* send_comm, void* data, size_t size, int tag, void* mhandle, void** request) {
  return moe_net_isend(send_comm, data, size, tag, mhandle, request);
}

static ncclResult_t moe_v9_irecv(void* recv_comm, int n, void** data, size_t* sizes, int* tags, void** mhandles,
                                 void** request) {
  return moe_net_irecv(recv_comm, n, data, sizes, tags, mhandles, request);
}

MOE_EXPORT ncclNet_v9_t ncclNetPlugin_v9 = {
    .name = MOE_NET_PLUGIN_NAME,
    .init = moe_v9_init,
    .devices = moe_net_devices,
    .getProperties = moe_v9_get_properties,
    .listen = moe_v10_listen,
    .connect = moe_v9_connect,
    .accept = moe_v11_accept,
    .regMr = moe_net_reg_mr,
    .regMrDmaBuf = moe_net_reg_mr_dmabuf,
    .deregMr = moe_net_dereg_mr,
    .isend = moe_v9_isend,
    .irecv = moe_v9_irecv,
    .iflush = moe_net_iflush,
    .test = moe_net_test,
    .closeSend = moe_net_close_send,
    .closeRecv = moe_net_close_recv,
    .closeListen = moe_net_close_listen,
    .getDeviceMr = NULL,
    .irecvConsumed = NULL,
    .makeVDevice = NULL,
};

/* --- v8 ------------------------------------------------------------------- */
static ncclResult_t moe_v8_get_properties(int dev, ncclNetProperties_v8_t* props) {
  ncclNetProperties_v11_t p;
  MOE_CHECK(moe_net_get_properties(dev, &p));
  /* v8 has no forceFlush: copy field by field. */
  *props = (ncclNetProperties_v8_t){
      .name = p.name, .pciPath = p.pciPath, .guid = p.guid, .ptrSupport = p.ptrSupport,
      .regIsGlobal = p.regIsGlobal, .speed = p.speed, .port = p.port, .latency = p.latency,
      .maxComms = p.maxComms, .maxRecvs = p.maxRecvs, .netDeviceType = p.netDeviceType,
      .netDeviceVersion = p.netDeviceVersion};
  return ncclSuccess;
}

static ncclResult_t moe_v8_isend(void* send_comm, void* data, int size, int tag, void* mhandle, void** request) {
  MOE_ARG_CHECK(size >= 0, "net isend: negative size %d", size);
  return moe_net_isend(send_comm, data, (size_t)size, tag, mhandle, request);
}

static ncclResult_t moe_v8_irecv(void* recv_comm, int n, void** data, int* sizes, int* tags, void** mhandles,
                                 void** request) {
  MOE_ARG_CHECK(n >= 1 && n <= MOE_NET_MAX_RECVS && sizes != NULL, "net irecv: n = %d out of range", n);
  size_t wide[MOE_NET_MAX_RECVS];
  for (int i = 0; i < n; i++) {
    MOE_ARG_CHECK(sizes[i] >= 0, "net irecv: negative size %d for buffer %d", sizes[i], i);
    wide[i] = (size_t)sizes[i];
  }
  return moe_net_irecv(recv_comm, n, data, wide, tags, mhandles, request);
}

MOE_EXPORT ncclNet_v8_t ncclNetPlugin_v8 = {
    .name = MOE_NET_PLUGIN_NAME,
    .init = moe_v9_init,
    .devices = moe_net_devices,
    .getProperties = moe_v8_get_properties,
    .listen = moe_v10_listen,
    .connect = moe_v9_connect,
    .accept = moe_v11_accept,
    .regMr = moe_net_reg_mr,
    .regMrDmaBuf = moe_net_reg_mr_dmabuf,
    .deregMr = moe_net_dereg_mr,
    .isend = moe_v8_isend,
    .irecv = moe_v8_irecv,
    .iflush = moe_net_iflush,
    .test = moe_net_test,
    .closeSend = moe_net_close_send,
    .closeRecv = moe_net_close_recv,
    .closeListen = moe_net_close_listen,
    .getDeviceMr = NULL,
    .irecvConsumed = NULL,
};
