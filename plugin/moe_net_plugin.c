/* SPDX-License-Identifier: Apache-2.0 */
/* The net plugin's current implementation over the transport interface.
 *
 * Process-wide state is one reference-counted record: the first init picks
 * and starts the backend, the last finalize stops it, so a plugin that NCCL
 * finalizes, dlclose()s and loads again starts from a clean slate; a
 * destructor covers an unload without finalize (ABIs before v11 have none).
 * Everything NCCL hands us (comms, requests, handles) is checked before use:
 * contexts, comms and registrations are looked up in a registry of live
 * objects before they are touched, so a second close, deregMr or finalize is
 * ncclInvalidArgument instead of a double free. Every comm handed to NCCL
 * refuses one-sided writes from its peer (NCCL has no such operation; the
 * MoE internode path uses the transport directly). */
#include "plugin/moe_net_plugin.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_check.h"
#include "transport/moe_net_live.h"
#include "transport/moe_transport.h"

typedef struct {
  uint64_t comm_id;
  int traffic_class;
} moe_net_ctx_t;

static struct {
  pthread_mutex_t lock;
  int refs;            /* open v11 contexts, plus one for a legacy init */
  int legacy;          /* a pre-v11 init happened: hold a reference until unload */
  const moe_transport_t* transport;
  /* NCCL keeps the name/pciPath pointers getProperties returns: keep them stable. */
  char names[MOE_NET_MAX_DEVS][MOE_NET_NAME_MAX];
  char pci_paths[MOE_NET_MAX_DEVS][MOE_NET_PATH_MAX];
} moe_net_g = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Contexts, comms and registrations handed to NCCL and not yet released. */
static moe_net_live_t moe_net_objs = MOE_NET_LIVE_INITIALIZER;

static int moe_net_ctx_ok(void* ctx) { return ctx == NULL || moe_net_live_has(&moe_net_objs, ctx, MOE_NET_LIVE_CTX); }

static moe_net_live_kind_t moe_net_live_kind(moe_net_comm_type_t type) {
  return type == MOE_NET_COMM_LISTEN ? MOE_NET_LIVE_LISTEN : type == MOE_NET_COMM_SEND ? MOE_NET_LIVE_SEND
                                                                                     : MOE_NET_LIVE_RECV;
}

/* 1 when `comm` is a live comm of this plugin of `type` (checked before any
 * byte of it is read). */
static int moe_net_comm_live(const void* comm, moe_net_comm_type_t type) {
  return comm != NULL && moe_net_live_has(&moe_net_objs, comm, moe_net_live_kind(type)) && moe_net_comm_ok(comm, type);
}

/* Takes a comm the backend just created into the registry, refusing
 * one-sided writes on it; closes it when it cannot be recorded. */
static ncclResult_t moe_net_adopt(moe_net_comm_t* c) {
  c->flags |= MOE_NET_COMM_NO_WRITES;
  ncclResult_t res = moe_net_live_add(&moe_net_objs, c, moe_net_live_kind((moe_net_comm_type_t)c->type));
  if (res != ncclSuccess) c->transport->close(c);
  return res;
}

static const moe_transport_t* moe_net_transport(void) {
  return __atomic_load_n(&moe_net_g.transport, __ATOMIC_ACQUIRE);
}

#define MOE_NET_TRANSPORT_OR_FAIL(t)                                                              \
  const moe_transport_t* t = moe_net_transport();                                                 \
  if (t == NULL) return MOE_ERROR(ncclInvalidUsage, "net plugin used before init (or after finalize)")

/* Takes a reference; the first one starts the backend. Caller holds the lock. */
static ncclResult_t moe_net_ref_locked(ncclDebugLogger_t logger) {
  if (logger != NULL) moe_log_set_nccl_logger(logger);
  if (moe_net_g.refs == 0) {
    const moe_transport_t* t = NULL;
    MOE_CHECK(moe_transport_select(&t));
    MOE_INFO(NCCL_INIT | NCCL_NET, "net plugin %s using the %s backend", MOE_NET_PLUGIN_NAME, t->name);
    __atomic_store_n(&moe_net_g.transport, t, __ATOMIC_RELEASE);
  }
  moe_net_g.refs++;
  return ncclSuccess;
}

static void moe_net_unref_locked(void) {
  if (moe_net_g.refs == 0 || --moe_net_g.refs > 0) return;
  const moe_transport_t* t = moe_net_g.transport;
  __atomic_store_n(&moe_net_g.transport, NULL, __ATOMIC_RELEASE);
  if (t != NULL) t->fini();
  /* NCCL's logger lives in libnccl, which may go away before we do. */
  moe_log_set_nccl_logger(NULL);
}

/* Frees a context and drops its reference. */
static void moe_net_finalize_ctx(moe_net_ctx_t* c) {
  free(c);
  pthread_mutex_lock(&moe_net_g.lock);
  moe_net_unref_locked();
  pthread_mutex_unlock(&moe_net_g.lock);
}

ncclResult_t moe_net_init(void** ctx, uint64_t comm_id, const ncclNetCommConfig_v11_t* config,
                          ncclDebugLogger_t logger) {
  MOE_ARG_CHECK(ctx != NULL, "net init: ctx is NULL");
  *ctx = NULL;  /* NCCL calls finalize(ctx) also after a failed init */
  moe_net_ctx_t* c = calloc(1, sizeof(*c));
  if (c == NULL) return MOE_ERROR(ncclSystemError, "net init: out of memory");
  pthread_mutex_lock(&moe_net_g.lock);
  ncclResult_t res = moe_net_ref_locked(logger);
  pthread_mutex_unlock(&moe_net_g.lock);
  if (res != ncclSuccess) {
    free(c);
    return res;
  }
  c->comm_id = comm_id;
  c->traffic_class = config != NULL ? config->trafficClass : NCCL_NET_TRAFFIC_CLASS_UNDEF;
  res = moe_net_live_add(&moe_net_objs, c, MOE_NET_LIVE_CTX);
  if (res != ncclSuccess) {
    moe_net_finalize_ctx(c);
    return res;
  }
  *ctx = c;
  return ncclSuccess;
}

ncclResult_t moe_net_init_legacy(ncclDebugLogger_t logger) {
  ncclResult_t res = ncclSuccess;
  pthread_mutex_lock(&moe_net_g.lock);
  if (!moe_net_g.legacy) {
    res = moe_net_ref_locked(logger);
    moe_net_g.legacy = res == ncclSuccess;
  } else if (logger != NULL) {
    moe_log_set_nccl_logger(logger);
  }
  pthread_mutex_unlock(&moe_net_g.lock);
  return res;
}

ncclResult_t moe_net_finalize(void* ctx) {
  if (ctx == NULL) return ncclSuccess;  /* the init failed: nothing was taken */
  MOE_ARG_CHECK(moe_net_live_take(&moe_net_objs, ctx, MOE_NET_LIVE_CTX),
                "net finalize: %p is not a context of this plugin (or finalized twice)", ctx);
  moe_net_finalize_ctx((moe_net_ctx_t*)ctx);
  return ncclSuccess;
}

ncclResult_t moe_net_ctx_traffic_class(void* ctx, int* tc_p) {
  MOE_ARG_CHECK(moe_net_ctx_ok(ctx), "net: %p is not a context of this plugin", ctx);
  const moe_net_ctx_t* c = (const moe_net_ctx_t*)ctx;
  *tc_p = c != NULL ? c->traffic_class : NCCL_NET_TRAFFIC_CLASS_UNDEF;
  return ncclSuccess;
}

int moe_net_open_contexts(void) {
  pthread_mutex_lock(&moe_net_g.lock);
  int n = moe_net_g.refs - moe_net_g.legacy;
  pthread_mutex_unlock(&moe_net_g.lock);
  return n;
}

/* An unload without finalize (pre-v11 ABIs, or a crashed caller). */
__attribute__((destructor)) static void moe_net_unload(void) {
  pthread_mutex_lock(&moe_net_g.lock);
  if (moe_net_g.refs > 0) {
    moe_net_g.refs = 1;
    moe_net_unref_locked();
  }
  moe_net_g.legacy = 0;
  pthread_mutex_unlock(&moe_net_g.lock);
  moe_net_live_clear(&moe_net_objs);
}

ncclResult_t moe_net_devices(int* ndev) {
  MOE_ARG_CHECK(ndev != NULL, "net devices: ndev is NULL");
  MOE_NET_TRANSPORT_OR_FAIL(t);
  int n = 0;
  MOE_CHECK(t->devices(&n));
  *ndev = n < MOE_NET_MAX_DEVS ? n : MOE_NET_MAX_DEVS;
  return ncclSuccess;
}

ncclResult_t moe_net_get_properties(int dev, ncclNetProperties_v11_t* props) {
  MOE_ARG_CHECK(props != NULL, "net getProperties: props is NULL");
  MOE_NET_TRANSPORT_OR_FAIL(t);
  int n = 0;
  MOE_CHECK(t->devices(&n));
  MOE_ARG_CHECK(dev >= 0 && dev < n && dev < MOE_NET_MAX_DEVS, "net getProperties: device %d out of range [0, %d)",
                dev, n);
  moe_net_props_t p;
  MOE_CHECK(t->get_properties(dev, &p));
  pthread_mutex_lock(&moe_net_g.lock);
  snprintf(moe_net_g.names[dev], MOE_NET_NAME_MAX, "%s", p.name);
  snprintf(moe_net_g.pci_paths[dev], MOE_NET_PATH_MAX, "%s", p.pci_path);
  pthread_mutex_unlock(&moe_net_g.lock);
  memset(props, 0, sizeof(*props));
  props->name = moe_net_g.names[dev];
  props->pciPath = p.pci_path[0] != '\0' ? moe_net_g.pci_paths[dev] : NULL;
  props->guid = p.guid;
  props->ptrSupport = p.ptr_support;
  props->regIsGlobal = p.reg_is_global;
  props->forceFlush = p.force_flush;
  props->speed = p.speed_mbps;
  props->port = p.port;
  props->latency = p.latency_us;
  props->maxComms = p.max_comms;
  props->maxRecvs = p.max_recvs;
  props->netDeviceType = NCCL_NET_DEVICE_HOST;
  props->netDeviceVersion = NCCL_NET_DEVICE_INVALID_VERSION;
  props->vProps.ndevs = 1;
  props->vProps.devs[0] = dev;
  props->maxP2pBytes = p.max_p2p_bytes;
  props->maxCollBytes = p.max_p2p_bytes;
  props->maxMultiRequestSize = 1;
  return ncclSuccess;
}

ncclResult_t moe_net_listen(void* ctx, int dev, void* handle, void** listen_comm) {
  MOE_ARG_CHECK(handle != NULL && listen_comm != NULL, "net listen: NULL handle or listenComm");
  MOE_ARG_CHECK(moe_net_ctx_ok(ctx), "net listen: %p is not a context of this plugin", ctx);
  MOE_NET_TRANSPORT_OR_FAIL(t);
  *listen_comm = NULL;
  moe_net_comm_t* c = NULL;
  MOE_CHECK(t->listen(dev, handle, &c));
  MOE_CHECK(moe_net_adopt(c));
  *listen_comm = c;
  return ncclSuccess;
}

ncclResult_t moe_net_connect(int traffic_class, int dev, void* handle, void** send_comm) {
  MOE_ARG_CHECK(handle != NULL && send_comm != NULL, "net connect: NULL handle or sendComm");
  MOE_NET_TRANSPORT_OR_FAIL(t);
  moe_net_conn_config_t config = {.traffic_class = traffic_class};
  moe_net_comm_t* c = NULL;
  *send_comm = NULL;
  MOE_CHECK(t->connect(dev, &config, handle, &c));
  if (c != NULL) MOE_CHECK(moe_net_adopt(c));
  *send_comm = c;
  return ncclSuccess;
}

ncclResult_t moe_net_accept(void* listen_comm, void** recv_comm) {
  MOE_ARG_CHECK(recv_comm != NULL, "net accept: recvComm is NULL");
  MOE_ARG_CHECK(moe_net_comm_live(listen_comm, MOE_NET_COMM_LISTEN), "net accept: not a listen comm of this plugin");
  const moe_net_comm_t* l = (const moe_net_comm_t*)listen_comm;
  moe_net_comm_t* c = NULL;
  *recv_comm = NULL;
  MOE_CHECK(l->transport->accept((moe_net_comm_t*)listen_comm, &c));
  if (c != NULL) MOE_CHECK(moe_net_adopt(c));
  *recv_comm = c;
  return ncclSuccess;
}

static int moe_net_data_comm_ok(const void* comm) {
  return moe_net_comm_live(comm, MOE_NET_COMM_SEND) || moe_net_comm_live(comm, MOE_NET_COMM_RECV);
}

ncclResult_t moe_net_reg_mr_dmabuf(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                                   void** mhandle) {
  MOE_ARG_CHECK(mhandle != NULL, "net regMr: mhandle is NULL");
  MOE_ARG_CHECK(moe_net_data_comm_ok(comm), "net regMr: not a send/recv comm of this plugin");
  MOE_ARG_CHECK(type == NCCL_PTR_HOST || type == NCCL_PTR_CUDA, "net regMr: unknown memory type %d", type);
  MOE_CHECK(moe_net_reg_check("net regMr", data, size, type));
  moe_net_comm_t* c = (moe_net_comm_t*)comm;
  void* mr = NULL;
  MOE_CHECK(c->transport->reg_mr(c, data, size, type, fd, offset, &mr));
  ncclResult_t res = moe_net_live_add(&moe_net_objs, mr, MOE_NET_LIVE_MR);
  if (res != ncclSuccess) {
    c->transport->dereg_mr(c, mr);
    return res;
  }
  *mhandle = mr;
  return ncclSuccess;
}

ncclResult_t moe_net_reg_mr(void* comm, void* data, size_t size, int type, void** mhandle) {
  return moe_net_reg_mr_dmabuf(comm, data, size, type, 0, -1, mhandle);
}

ncclResult_t moe_net_dereg_mr(void* comm, void* mhandle) {
  MOE_ARG_CHECK(moe_net_data_comm_ok(comm), "net deregMr: not a send/recv comm of this plugin");
  MOE_ARG_CHECK(moe_net_live_take(&moe_net_objs, mhandle, MOE_NET_LIVE_MR),
                "net deregMr: %p is not a registration of this plugin (or deregistered twice)", mhandle);
  moe_net_comm_t* c = (moe_net_comm_t*)comm;
  ncclResult_t res = c->transport->dereg_mr(c, mhandle);
  /* Refused (e.g. another comm than it was registered on): still live. */
  if (res != ncclSuccess && moe_net_live_add(&moe_net_objs, mhandle, MOE_NET_LIVE_MR) != ncclSuccess)
    MOE_WARN("net deregMr: lost track of registration %p", mhandle);
  return res;
}

ncclResult_t moe_net_isend(void* send_comm, void* data, size_t size, int tag, void* mhandle, void** request) {
  MOE_ARG_CHECK(request != NULL, "net isend: request is NULL");
  MOE_ARG_CHECK(moe_net_comm_live(send_comm, MOE_NET_COMM_SEND), "net isend: not a send comm of this plugin");
  moe_net_comm_t* c = (moe_net_comm_t*)send_comm;
  moe_net_request_t* r = NULL;
  *request = NULL;
  MOE_CHECK(c->transport->isend(c, data, size, tag, mhandle, &r));
  *request = r;
  return ncclSuccess;
}

ncclResult_t moe_net_irecv(void* recv_comm, int n, void** data, const size_t* sizes, int* tags, void** mhandles,
                           void** request) {
  MOE_ARG_CHECK(request != NULL, "net irecv: request is NULL");
  MOE_ARG_CHECK(moe_net_comm_live(recv_comm, MOE_NET_COMM_RECV), "net irecv: not a recv comm of this plugin");
  MOE_ARG_CHECK(n >= 1 && n <= MOE_NET_MAX_RECVS && data != NULL && sizes != NULL,
                "net irecv: n = %d buffers (1..%d) with data and sizes required", n, MOE_NET_MAX_RECVS);
  moe_net_comm_t* c = (moe_net_comm_t*)recv_comm;
  moe_net_request_t* r = NULL;
  *request = NULL;
  MOE_CHECK(c->transport->irecv(c, n, data, sizes, tags, mhandles, &r));
  *request = r;
  return ncclSuccess;
}

ncclResult_t moe_net_iflush(void* recv_comm, int n, void** data, int* sizes, void** mhandles, void** request) {
  MOE_ARG_CHECK(request != NULL, "net iflush: request is NULL");
  MOE_ARG_CHECK(moe_net_comm_live(recv_comm, MOE_NET_COMM_RECV), "net iflush: not a recv comm of this plugin");
  MOE_ARG_CHECK(n >= 0 && n <= MOE_NET_MAX_RECVS, "net iflush: n = %d out of range", n);
  moe_net_comm_t* c = (moe_net_comm_t*)recv_comm;
  moe_net_request_t* r = NULL;
  *request = NULL;
  MOE_CHECK(c->transport->iflush(c, n, data, sizes, mhandles, &r));
  *request = r;
  return ncclSuccess;
}

ncclResult_t moe_net_test(void* request, int* done, int* sizes) {
  MOE_ARG_CHECK(done != NULL, "net test: done is NULL");
  moe_net_request_t* r = (moe_net_request_t*)request;
  MOE_ARG_CHECK(r != NULL && r->magic == MOE_NET_REQ_MAGIC && r->transport != NULL &&
                    r->nsizes >= 1 && r->nsizes <= MOE_NET_MAX_RECVS,
                "net test: not a request of this plugin");
  size_t wide[MOE_NET_MAX_RECVS];
  uint32_t nsizes = r->nsizes;
  *done = 0;
  MOE_CHECK(r->transport->test(r, done, wide));
  if (*done && sizes != NULL)
    for (uint32_t i = 0; i < nsizes; i++) sizes[i] = (int)wide[i]; /* <= MOE_NET_MAX_MSG_BYTES < INT_MAX */
  return ncclSuccess;
}

static ncclResult_t moe_net_close(void* comm, moe_net_comm_type_t type, const char* what) {
  if (comm == NULL) return ncclSuccess;
  MOE_ARG_CHECK(moe_net_live_take(&moe_net_objs, comm, moe_net_live_kind(type)),
                "net %s: %p is not such a comm of this plugin (or closed twice)", what, comm);
  moe_net_comm_t* c = (moe_net_comm_t*)comm;
  return c->transport->close(c);
}

ncclResult_t moe_net_close_send(void* send_comm) { return moe_net_close(send_comm, MOE_NET_COMM_SEND, "closeSend"); }
ncclResult_t moe_net_close_recv(void* recv_comm) { return moe_net_close(recv_comm, MOE_NET_COMM_RECV, "closeRecv"); }
ncclResult_t moe_net_close_listen(void* listen_comm) {
  return moe_net_close(listen_comm, MOE_NET_COMM_LISTEN, "closeListen");
}

ncclResult_t moe_net_set_attr(void* ctx, ncclNetAttr_v11_t* attr) {
  MOE_ARG_CHECK(moe_net_ctx_ok(ctx), "net setNetAttr: %p is not a context of this plugin", ctx);
  (void)attr;  /* hints about concurrency; neither backend tunes on them yet */
  return ncclSuccess;
}
