/* SPDX-License-Identifier: Apache-2.0 */
/* The verbs backend of moe_transport_t: RC QPs, a receiver-driven
 * clear-to-send FIFO, RDMA write + write-with-immediate (see moe_ib_wire.h
 * for the protocol). libibverbs is dlopen()ed (moe_ib_verbs.c).
 *
 * NOT YET RUN ON AN HCA: the hosts this was written on have no RDMA NIC. CI
 * runs every net and proxy test over the verbs emulator
 * (tests/support/verbs_emu, NCCL_MOE_IBVERBS_LIBRARY), which checks keys,
 * bounds, QP states, PSNs and send-queue accounting as an HCA does; it cannot
 * show real NIC ordering, PCIe or GPUDirect behaviour.
 *
 * Per connection: `nqps` RC QPs (NCCL_IB_QPS_PER_CONNECTION) on one CQ. The
 * receiver writes a CTS entry for each irecv into the sender's FIFO; the
 * sender matches its isends by tag (a send larger than the matched buffer is
 * a truncation error on the sender), writes the data split over the QPs and
 * finishes with one zero-byte write-with-immediate per QP; the receiver
 * completes request r when every QP has delivered its r-th immediate. For
 * n == 1 the immediate is the size; for grouped receives the sender first
 * writes the sizes into the receiver's sizes array. One-sided write() sets
 * bit 31 of the immediate so the receiver can tell it from a message. A
 * sender that finds no buffer for a message (unknown tag, too large) tells
 * the receiver with MOE_IB_IMM_ABORT, so both sides fail instead of one
 * waiting forever. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <cuda.h>
#include <cuda_runtime_api.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "net_ib/moe_ib_devs.h"
#include "net_ib/moe_ib_wire.h"
#include "transport/moe_net_ifaces.h"

#define MOE_IB_SEND_WR 1024  /* per QP: data writes + sizes + immediates of 32 slots */
#define MOE_IB_CQ_DEPTH 4096
#define MOE_IB_POLL_BATCH 16
#define MOE_IB_IMM_WRITE_BIT 0x80000000u
/* Never a size (<= MOE_NET_MAX_MSG_BYTES) nor a slot: the sender gave up on a message. */
#define MOE_IB_IMM_ABORT 0x7fffffffu
#define MOE_IB_MR_MAGIC 0x524d4249u     /* "IBMR" */
#define MOE_IB_PENDING_MAGIC 0x50424d49u /* "IMBP" */
#define MOE_IB_MAX_PENDING 1024
#define MOE_IB_MAX_INCOMING 64
#define MOE_IB_ASYNC_CHECK_EVERY 1024
#define MOE_IB_MAX_CHUNK ((size_t)1 << 30) /* one work request moves at most this */
/* wr_id of a sender's closing write: this bit | the message number. Flush
 * reads and one-sided writes carry their request's address (bit 63 clear in
 * user space); CTS writes carry 0. */
#define MOE_IB_WRID_CLOSE (1ull << 63)
/* wr_id of a keepalive probe: a zero-length RDMA write (no key is checked),
 * sent when a polled comm saw no completion for MOE_IB_KEEPALIVE_NS. A dead
 * or vanished peer then fails it once the QP's retries run out, so a side
 * that only waits (for a clear-to-send, for data) learns it too. */
#define MOE_IB_WRID_PROBE (1ull << 62)
#define MOE_IB_KEEPALIVE_NS (1000ull * 1000000ull)

/* ------------------------------------------------------------------------ */
/* Process-wide state. */

typedef struct {
  uint64_t start, end; /* page-aligned */
  int dev;
  int refs;
  struct ibv_mr* mr;
} moe_ib_mr_entry_t;

/* What regMr hands out: a reference to a (possibly shared, page-aligned)
 * registration, and the range the caller registered. */
typedef struct {
  uint32_t magic;
  moe_ib_mr_entry_t* entry;
  uint64_t addr, size;
} moe_ib_mr_t;

typedef struct moe_ib_pending moe_ib_pending_t;

static struct {
  pthread_mutex_t lock;
  int refs;
  const moe_ib_verbs_t* v;
  int ndevs;
  moe_ib_dev_t devs[MOE_NET_MAX_DEVS];
  int dev_failed[MOE_NET_MAX_DEVS]; /* a fatal async event was seen */
  moe_net_iface_t side_dev;          /* the interface of the TCP side channel */
  moe_ib_pending_t* pending[MOE_IB_MAX_PENDING];
  moe_ib_mr_entry_t** mrs;          /* the registration cache */
  int nmrs, cap_mrs;
} moe_ib_g = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t moe_ib_timeout_ns(void) { return (uint64_t)moe_env()->timeout_ms * 1000000ull; }

/* ------------------------------------------------------------------------ */
/* init / devices / properties */

static ncclResult_t moe_ib_init(void) {
  ncclResult_t res = ncclSuccess;
  pthread_mutex_lock(&moe_ib_g.lock);
  if (moe_ib_g.refs == 0) {
    const moe_ib_verbs_t* v = NULL;
    if (moe_ib_verbs_load(&v) != ncclSuccess) {
      /* Forced, the reason is the error; under auto the verbs loader said it at INFO. */
      res = moe_env()->net_backend == MOE_NET_BACKEND_IB ? MOE_ERROR(ncclSystemError, "ib: %s", moe_ib_verbs_error())
                                                          : ncclSystemError;
      goto out_unlock;
    }
    moe_ib_gid_rules_t rules = {.gid_index = moe_env()->ib_gid_index, .roce_version = moe_env()->ib_roce_version};
    MOE_CHECK_GOTO(moe_ib_parse_family(moe_env()->ib_addr_family, &rules.family), res, out_unlock);
    int n = 0;
    MOE_CHECK_GOTO(moe_ib_find_devs(v, moe_env()->ib_hca, &rules, moe_ib_g.devs, MOE_NET_MAX_DEVS, &n), res,
                   out_unlock);
    int nside = 0;
    if (n > 0 && (moe_net_find_ifaces(moe_env()->socket_ifname, "/sys/class/net", &moe_ib_g.side_dev, 1, &nside) !=
                      ncclSuccess || nside == 0)) {
      moe_ib_close_devs(v, moe_ib_g.devs, n);
      res = MOE_ERROR(ncclSystemError, "ib: no IP interface for the connection side channel (NCCL_SOCKET_IFNAME)");
      goto out_unlock;
    }
    for (int d = 0; d < n; d++) {
      int fl = fcntl(moe_ib_g.devs[d].ctx->async_fd, F_GETFL);
      fcntl(moe_ib_g.devs[d].ctx->async_fd, F_SETFL, fl | O_NONBLOCK); /* polled, never waited on */
      moe_ib_g.dev_failed[d] = 0;
    }
    moe_ib_g.v = v;
    moe_ib_g.ndevs = n;
  }
  moe_ib_g.refs++;
out_unlock:
  pthread_mutex_unlock(&moe_ib_g.lock);
  return res;
}

static void moe_ib_fini(void) {
  pthread_mutex_lock(&moe_ib_g.lock);
  if (moe_ib_g.refs > 0 && --moe_ib_g.refs == 0) {
    for (int i = 0; i < moe_ib_g.nmrs; i++) {
      moe_ib_g.v->dereg_mr(moe_ib_g.mrs[i]->mr);
      free(moe_ib_g.mrs[i]);
    }
    free(moe_ib_g.mrs);
    moe_ib_g.mrs = NULL;
    moe_ib_g.nmrs = moe_ib_g.cap_mrs = 0;
    if (moe_ib_g.v != NULL) moe_ib_close_devs(moe_ib_g.v, moe_ib_g.devs, moe_ib_g.ndevs);
    moe_ib_g.ndevs = 0;
  }
  pthread_mutex_unlock(&moe_ib_g.lock);
}

static ncclResult_t moe_ib_devices(int* ndev_p) {
  pthread_mutex_lock(&moe_ib_g.lock);
  *ndev_p = moe_ib_g.ndevs;
  pthread_mutex_unlock(&moe_ib_g.lock);
  return ncclSuccess;
}

static ncclResult_t moe_ib_dev(int dev, moe_ib_dev_t** d_p) {
  if (dev < 0 || dev >= moe_ib_g.ndevs)
    return MOE_ERROR(ncclInvalidArgument, "ib: device %d out of range [0, %d)", dev, moe_ib_g.ndevs);
  *d_p = &moe_ib_g.devs[dev];
  return ncclSuccess;
}

static ncclResult_t moe_ib_get_properties(int dev, moe_net_props_t* props_p) {
  moe_ib_dev_t* d = NULL;
  MOE_CHECK(moe_ib_dev(dev, &d));
  moe_net_props_t p = {0};
  _Static_assert(sizeof(p.name) == sizeof(d->name) && sizeof(p.pci_path) == sizeof(d->pci_path), "same sizes");
  memcpy(p.name, d->name, sizeof(p.name));
  memcpy(p.pci_path, d->pci_path, sizeof(p.pci_path));
  p.guid = d->guid;
  p.ptr_support = d->ptr_support;
  p.reg_is_global = 1;  /* MRs live in the device's PD, usable by every comm on it */
  p.force_flush = 0;
  p.speed_mbps = d->speed_mbps;
  p.port = d->port;
  p.latency_us = 0.0f;
  p.max_comms = 65536;
  p.max_recvs = MOE_NET_MAX_RECVS;
  p.max_p2p_bytes = MOE_NET_MAX_MSG_BYTES;
  *props_p = p;
  return ncclSuccess;
}

/* Pending async events of a device: a catastrophic device error fails every
 * comm on it for good. Errors of one QP or CQ are that comm's business (its
 * work completions fail) and a port error may recover, so a peer that sends
 * us a bad key cannot take down the other comms of the device. */
static void moe_ib_check_async(int dev) {
  const moe_ib_verbs_t* v = moe_ib_g.v;
  struct ibv_async_event ev;
  while (v->get_async_event(moe_ib_g.devs[dev].ctx, &ev) == 0) {
    switch (ev.event_type) {
      case IBV_EVENT_DEVICE_FATAL:
        MOE_WARN("ib: %s: async event %s", moe_ib_g.devs[dev].name, v->event_type_str(ev.event_type));
        __atomic_store_n(&moe_ib_g.dev_failed[dev], 1, __ATOMIC_RELEASE);
        break;
      case IBV_EVENT_QP_FATAL:
      case IBV_EVENT_QP_REQ_ERR:
      case IBV_EVENT_QP_ACCESS_ERR:
      case IBV_EVENT_CQ_ERR:
      case IBV_EVENT_PORT_ERR:
        MOE_WARN("ib: %s: async event %s", moe_ib_g.devs[dev].name, v->event_type_str(ev.event_type));
        break;
      default:
        MOE_INFO(NCCL_NET, "ib: %s: async event %s", moe_ib_g.devs[dev].name, v->event_type_str(ev.event_type));
        break;
    }
    v->ack_async_event(&ev);
  }
}

/* ------------------------------------------------------------------------ */
/* Memory registration with a cache (NCCL registers the same buffers often).
 * Every registration covers whole pages, as NCCL's does: the address aligned
 * down, the end aligned up. That is what dma-buf needs (the driver exports
 * and the HCA maps pages), and a cache entry then covers exactly the range
 * its MR covers, so a neighbour inside the same pages may share it. */

typedef CUresult (*moe_cu_get_handle_fn)(void* handle, CUdeviceptr dptr, size_t size, CUmemRangeHandleType type,
                                         unsigned long long flags);

static uint64_t moe_ib_page_size(void) {
  static uint64_t page = 0;
  if (page == 0) page = (uint64_t)sysconf(_SC_PAGESIZE);
  return page;
}

/* A dma-buf fd for the pages [base, base + len) of GPU memory through the
 * driver entry point (libcuda is not linked); -1 when there is none. */
static int moe_ib_cuda_dmabuf_fd(uint64_t base, uint64_t len) {
  static moe_cu_get_handle_fn fn = NULL;
  if (fn == NULL) {
    enum cudaDriverEntryPointQueryResult status;
    void* p = NULL;
    if (cudaGetDriverEntryPointByVersion("cuMemGetHandleForAddressRange", &p, 11070, cudaEnableDefault, &status) !=
            cudaSuccess || status != cudaDriverEntryPointSuccess)
      return -1;
    fn = (moe_cu_get_handle_fn)p;
  }
  int fd = -1;
  if (fn(&fd, (CUdeviceptr)base, (size_t)len, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0) != CUDA_SUCCESS) return -1;
  return fd;
}

/* The pages around [data, data + size): *start_p aligned down, *end_p up. */
static void moe_ib_page_range(const void* data, size_t size, uint64_t* start_p, uint64_t* end_p) {
  const uint64_t page = moe_ib_page_size();
  uint64_t addr = (uint64_t)(uintptr_t)data;
  *start_p = addr & ~(page - 1);
  *end_p = (addr + (size > 0 ? size : 1) + page - 1) & ~(page - 1);
}

/* Registers the pages [start, end). GPU memory: through dma-buf when the
 * device can (the caller's fd, `offset` being where `data` sits in it, or one
 * we export), else as plain user memory for nvidia-peermem. */
static ncclResult_t moe_ib_register(moe_ib_dev_t* d, const void* data, uint64_t start, uint64_t end, int type, int fd,
                                    uint64_t offset, struct ibv_mr** mr_p) {
  const moe_ib_verbs_t* v = moe_ib_g.v;
  const int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  const uint64_t len = end - start;
  struct ibv_mr* mr = NULL;
  if (type == NCCL_PTR_CUDA) {
    if ((d->ptr_support & NCCL_PTR_CUDA) == 0)
      return MOE_ERROR(ncclInvalidUsage, "ib: %s cannot register GPU memory (no dma-buf, no nvidia-peermem, or "
                       "NCCL_NET_GDR_LEVEL=LOC)", d->name);
    int own_fd = -1;
    if (fd >= 0) {
      /* The fd's byte `offset` is `data`: the page start is `delta` before it. */
      uint64_t delta = (uint64_t)(uintptr_t)data - start;
      if (offset < delta)
        return MOE_ERROR(ncclInvalidArgument, "ib: dma-buf offset %llu does not reach back to the page start of %p",
                         (unsigned long long)offset, data);
      offset -= delta;
    } else if (d->dmabuf) {
      fd = own_fd = moe_ib_cuda_dmabuf_fd(start, len);
      offset = 0;
    }
    if (fd >= 0 && v->reg_dmabuf_mr != NULL) mr = v->reg_dmabuf_mr(d->pd, offset, len, start, fd, access);
    if (own_fd >= 0) close(own_fd);
    if (mr == NULL) mr = v->reg_mr(d->pd, (void*)(uintptr_t)start, len, access); /* nvidia-peermem */
  } else {
    mr = v->reg_mr(d->pd, (void*)(uintptr_t)start, len, access);
  }
  if (mr == NULL)
    return MOE_ERROR(ncclSystemError, "ib: registering %llu bytes of %s memory at %p on %s failed: %m",
                     (unsigned long long)len, type == NCCL_PTR_CUDA ? "GPU" : "host", (void*)(uintptr_t)start, d->name);
  *mr_p = mr;
  return ncclSuccess;
}

/* A cached registration covering the pages, with a reference taken; NULL
 * when there is none. Caller holds the lock. */
static moe_ib_mr_entry_t* moe_ib_cache_find(int dev, uint64_t start, uint64_t end) {
  for (int i = 0; i < moe_ib_g.nmrs; i++) {
    moe_ib_mr_entry_t* e = moe_ib_g.mrs[i];
    if (e->dev == dev && e->start <= start && end <= e->end) {
      e->refs++;
      return e;
    }
  }
  return NULL;
}

static ncclResult_t moe_ib_reg_dev(int dev, void* data, size_t size, int type, int fd, uint64_t offset,
                                   void** mr_p) {
  moe_ib_dev_t* d = NULL;
  MOE_CHECK(moe_ib_dev(dev, &d));
  if (type != NCCL_PTR_HOST && type != NCCL_PTR_CUDA)
    return MOE_ERROR(ncclInvalidArgument, "ib: regMr of memory type %d", type);
  uint64_t start, end;
  moe_ib_page_range(data, size, &start, &end);
  moe_ib_mr_t* h = calloc(1, sizeof(*h));
  if (h == NULL) return MOE_ERROR(ncclSystemError, "ib: out of memory for a registration");
  ncclResult_t res = ncclSuccess;
  pthread_mutex_lock(&moe_ib_g.lock);
  h->entry = moe_ib_cache_find(dev, start, end);
  if (h->entry == NULL) {
    moe_ib_mr_entry_t* e = calloc(1, sizeof(*e));
    if (moe_ib_g.nmrs == moe_ib_g.cap_mrs) {
      int cap = moe_ib_g.cap_mrs ? 2 * moe_ib_g.cap_mrs : 64;
      moe_ib_mr_entry_t** grown = realloc(moe_ib_g.mrs, (size_t)cap * sizeof(*grown));
      if (grown != NULL) {
        moe_ib_g.mrs = grown;
        moe_ib_g.cap_mrs = cap;
      }
    }
    if (e == NULL || moe_ib_g.nmrs == moe_ib_g.cap_mrs) {
      free(e);
      res = MOE_ERROR(ncclSystemError, "ib: out of memory for the registration cache");
      goto out_unlock;
    }
    res = moe_ib_register(d, data, start, end, type, fd, offset, &e->mr);
    if (res != ncclSuccess) {
      free(e);
      goto out_unlock;
    }
    e->start = start;
    e->end = end;
    e->dev = dev;
    e->refs = 1;
    moe_ib_g.mrs[moe_ib_g.nmrs++] = e;
    h->entry = e;
  }
out_unlock:
  pthread_mutex_unlock(&moe_ib_g.lock);
  if (res != ncclSuccess) {
    free(h);
    return res;
  }
  h->magic = MOE_IB_MR_MAGIC;
  h->addr = (uint64_t)(uintptr_t)data;
  h->size = size;
  *mr_p = h;
  return ncclSuccess;
}

static ncclResult_t moe_ib_dereg(void* handle) {
  moe_ib_mr_t* h = (moe_ib_mr_t*)handle;
  if (h == NULL || h->magic != MOE_IB_MR_MAGIC)
    return MOE_ERROR(ncclInvalidArgument, "ib: deregMr of something that is not a registration");
  pthread_mutex_lock(&moe_ib_g.lock);
  moe_ib_mr_entry_t* e = h->entry;
  if (--e->refs == 0) {
    for (int i = 0; i < moe_ib_g.nmrs; i++)
      if (moe_ib_g.mrs[i] == e) moe_ib_g.mrs[i] = moe_ib_g.mrs[--moe_ib_g.nmrs];
    moe_ib_g.v->dereg_mr(e->mr);
    free(e);
  }
  pthread_mutex_unlock(&moe_ib_g.lock);
  h->magic = 0;
  free(h);
  return ncclSuccess;
}

static struct ibv_mr* moe_ib_mr_of(void* handle) {
  moe_ib_mr_t* h = (moe_ib_mr_t*)handle;
  return h != NULL && h->magic == MOE_IB_MR_MAGIC ? h->entry->mr : NULL;
}

/* The range the caller registered (not the pages around it): a peer's
 * offsets count from the caller's address. */
static ncclResult_t moe_ib_mr_key(void* handle, moe_net_rkey_t* key_p) {
  moe_ib_mr_t* h = (moe_ib_mr_t*)handle;
  struct ibv_mr* mr = moe_ib_mr_of(handle);
  if (mr == NULL) return MOE_ERROR(ncclInvalidArgument, "ib: mr_key of something that is not a registration");
  *key_p = (moe_net_rkey_t){.addr = h->addr, .size = h->size, .key = mr->rkey};
  return ncclSuccess;
}

/* ------------------------------------------------------------------------ */
/* Comms. */

typedef enum { MOE_IB_REQ_FREE = 0, MOE_IB_REQ_SEND, MOE_IB_REQ_RECV, MOE_IB_REQ_FLUSH, MOE_IB_REQ_WRITE } moe_ib_req_type_t;

typedef struct moe_ib_comm moe_ib_comm_t;

typedef struct {
  moe_net_request_t base;
  moe_ib_comm_t* comm;
  int type;
  uint64_t seq;      /* send/recv: the message number */
  int n;
  size_t sizes[MOE_NET_MAX_RECVS];
  int completions;   /* send/flush/write: signaled completions still expected */
} moe_ib_req_t;

/* What the sender collected for the FIFO slot it is filling. */
typedef struct {
  int have_cts;      /* cts holds our copy of the slot (never re-read from the FIFO) */
  moe_ib_cts_t cts;
  int matched;       /* isends matched to the current CTS entry */
  uint32_t mask;     /* which elements */
  moe_ib_req_t* reqs[MOE_NET_MAX_RECVS];
  void* data[MOE_NET_MAX_RECVS];
  struct ibv_mr* mrs[MOE_NET_MAX_RECVS];
} moe_ib_fill_t;

struct moe_ib_comm {
  moe_net_comm_t base;
  pthread_mutex_t lock;
  int dev;
  ncclResult_t failed;
  struct ibv_cq* cq;
  int nqps;
  struct ibv_qp* qps[MOE_IB_MAX_QPS];
  struct ibv_qp* flush_qp;     /* receive side: connected to itself, for iflush reads */
  moe_ib_req_t reqs[MOE_NET_MAX_REQUESTS];
  uint64_t async_tick;
  uint64_t quiet_since_ns;     /* the last completion (or probe) */
  int probing;                 /* a keepalive probe is outstanding */
  /* Send side. */
  moe_ib_cts_t* fifo;          /* MOE_IB_FIFO_DEPTH entries the receiver writes */
  struct ibv_mr* fifo_mr;
  uint32_t* sizes_out;         /* per slot: the sizes we write to a grouped receiver */
  struct ibv_mr* sizes_out_mr;
  uint64_t seq;
  moe_ib_fill_t fill;
  /* Receive side. */
  uint64_t remote_fifo_addr;
  uint32_t remote_fifo_rkey;
  moe_ib_cts_t* cts_out;       /* staging for the CTS entries we write */
  struct ibv_mr* cts_out_mr;
  uint32_t* sizes_in;          /* MOE_IB_FIFO_DEPTH x MOE_NET_MAX_RECVS sizes written by the sender */
  struct ibv_mr* sizes_in_mr;
  uint64_t posted, completed;
  uint64_t qp_done[MOE_IB_MAX_QPS];      /* immediates (messages) delivered per QP */
  uint32_t imm_of[MOE_IB_FIFO_DEPTH];
  moe_ib_req_t* recv_of[MOE_IB_FIFO_DEPTH];
  moe_imm_ring_t imms;
  char flush_buf[64];
  struct ibv_mr* flush_mr;
};

static ncclResult_t moe_ib_fail(moe_ib_comm_t* c, ncclResult_t res) {
  if (c->failed == ncclSuccess) c->failed = res;
  return res;
}

static void moe_ib_comm_destroy(moe_ib_comm_t* c) {
  if (c == NULL) return;
  const moe_ib_verbs_t* v = moe_ib_g.v;
  for (int q = 0; q < c->nqps; q++)
    if (c->qps[q] != NULL) v->destroy_qp(c->qps[q]);
  if (c->flush_qp != NULL) v->destroy_qp(c->flush_qp);
  if (c->cq != NULL) v->destroy_cq(c->cq);
  struct ibv_mr* mrs[] = {c->fifo_mr, c->sizes_out_mr, c->cts_out_mr, c->sizes_in_mr, c->flush_mr};
  for (size_t i = 0; i < sizeof(mrs) / sizeof(mrs[0]); i++)
    if (mrs[i] != NULL) v->dereg_mr(mrs[i]);
  free(c->fifo);
  free(c->sizes_out);
  free(c->cts_out);
  free(c->sizes_in);
  pthread_mutex_destroy(&c->lock);
  c->base.magic = 0;
  free(c);
}

static ncclResult_t moe_ib_alloc_reg(moe_ib_dev_t* d, size_t bytes, void** buf_p, struct ibv_mr** mr_p) {
  void* buf = NULL;
  if (posix_memalign(&buf, 4096, bytes) != 0) return MOE_ERROR(ncclSystemError, "ib: out of memory (%zu)", bytes);
  memset(buf, 0, bytes);
  struct ibv_mr* mr = moe_ib_g.v->reg_mr(d->pd, buf, bytes,
                                         IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
  if (mr == NULL) {
    int err = errno; /* ibv_reg_mr: NULL and errno */
    free(buf);
    return MOE_ERROR(ncclSystemError, "ib: registering %zu bytes on %s failed: %s", bytes, d->name, strerror(err));
  }
  *buf_p = buf;
  *mr_p = mr;
  return ncclSuccess;
}

static ncclResult_t moe_ib_create_qp(moe_ib_comm_t* c, moe_ib_dev_t* d, struct ibv_qp** qp_p) {
  struct ibv_qp_init_attr init = {
      .send_cq = c->cq, .recv_cq = c->cq, .qp_type = IBV_QPT_RC,
      .cap = {.max_send_wr = MOE_IB_SEND_WR, .max_recv_wr = 2 * MOE_IB_FIFO_DEPTH, .max_send_sge = 1,
              .max_recv_sge = 1}};
  if (d->max_qp_wr > 0 && init.cap.max_send_wr > (uint32_t)d->max_qp_wr) init.cap.max_send_wr = (uint32_t)d->max_qp_wr;
  struct ibv_qp* qp = moe_ib_g.v->create_qp(d->pd, &init);
  if (qp == NULL) return MOE_ERROR(ncclSystemError, "ib: ibv_create_qp on %s failed: %m", d->name);
  struct ibv_qp_attr attr = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = (uint8_t)d->port,
                             .qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ};
  /* ibv_modify_qp returns the error code; errno is not set. */
  int ret = moe_ib_g.v->modify_qp(qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
  if (ret != 0) {
    moe_ib_g.v->destroy_qp(qp);
    return MOE_ERROR(ncclSystemError, "ib: QP to INIT on %s failed: %s", d->name, strerror(ret));
  }
  *qp_p = qp;
  return ncclSuccess;
}

/* INIT -> RTR -> RTS against the peer's QP `remote_qpn`. */
static ncclResult_t moe_ib_qp_connect(struct ibv_qp* qp, moe_ib_dev_t* d, const moe_ib_conn_info_t* peer,
                                      uint32_t remote_qpn, uint32_t local_psn, int traffic_class) {
  const moe_env_t* env = moe_env();
  struct ibv_qp_attr attr;
  memset(&attr, 0, sizeof(attr));
  attr.qp_state = IBV_QPS_RTR;
  attr.path_mtu = (enum ibv_mtu)(peer->mtu < d->mtu ? peer->mtu : d->mtu);
  attr.dest_qp_num = remote_qpn;
  attr.rq_psn = peer->psn;
  attr.max_dest_rd_atomic = 1;
  attr.min_rnr_timer = 12;
  attr.ah_attr.port_num = (uint8_t)d->port;
  attr.ah_attr.sl = (uint8_t)env->ib_sl;
  if (peer->link == MOE_IB_LINK_IB) {
    attr.ah_attr.dlid = peer->lid;
  } else {
    attr.ah_attr.is_global = 1;
    memcpy(attr.ah_attr.grh.dgid.raw, peer->gid, 16);
    attr.ah_attr.grh.sgid_index = (uint8_t)d->gid_index;
    attr.ah_attr.grh.hop_limit = 255;
    attr.ah_attr.grh.traffic_class = (uint8_t)(traffic_class >= 0 ? traffic_class : env->ib_tc);
  }
  int ret = moe_ib_g.v->modify_qp(qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                                 IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
  if (ret != 0) return MOE_ERROR(ncclSystemError, "ib: QP to RTR on %s failed: %s", d->name, strerror(ret));
  memset(&attr, 0, sizeof(attr));
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = (uint8_t)env->ib_timeout;
  attr.retry_cnt = (uint8_t)env->ib_retry_cnt;
  attr.rnr_retry = 7;
  attr.sq_psn = local_psn;
  attr.max_rd_atomic = 1;
  ret = moe_ib_g.v->modify_qp(qp, &attr, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                             IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
  if (ret != 0) return MOE_ERROR(ncclSystemError, "ib: QP to RTS on %s failed: %s", d->name, strerror(ret));
  return ncclSuccess;
}

static ncclResult_t moe_ib_post_recv(moe_ib_comm_t* c, int q) {
  struct ibv_recv_wr wr = {.wr_id = (uint64_t)q, .num_sge = 0}, *bad = NULL;
  int ret = ibv_post_recv(c->qps[q], &wr, &bad); /* the error code, not errno */
  if (ret != 0) return moe_ib_fail(c, MOE_ERROR(ncclSystemError, "ib: ibv_post_recv failed: %s", strerror(ret)));
  return ncclSuccess;
}

/* Creates the comm's CQ, QPs and buffers; fills `me` with what the peer needs. */
static ncclResult_t moe_ib_comm_create(int dev, moe_net_comm_type_t type, int nqps, uint64_t nonce,
                                       moe_ib_comm_t** c_p, moe_ib_conn_info_t* me) {
  moe_ib_dev_t* d = NULL;
  MOE_CHECK(moe_ib_dev(dev, &d));
  ncclResult_t res = ncclSuccess;
  moe_ib_comm_t* c = calloc(1, sizeof(*c));
  if (c == NULL) return MOE_ERROR(ncclSystemError, "ib: out of memory for a comm");
  c->base = (moe_net_comm_t){.magic = MOE_NET_COMM_MAGIC, .type = type, .transport = &moe_transport_ib};
  pthread_mutex_init(&c->lock, NULL);
  c->dev = dev;
  for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++) c->reqs[r].comm = c;
  c->cq = moe_ib_g.v->create_cq(d->ctx, MOE_IB_CQ_DEPTH, NULL, NULL, 0);
  if (c->cq == NULL) {
    res = MOE_ERROR(ncclSystemError, "ib: ibv_create_cq on %s failed: %m", d->name);
    goto out_destroy;
  }
  memset(me, 0, sizeof(*me));
  me->nonce = nonce;
  me->link = d->link;
  me->nqps = nqps;
  me->mtu = d->mtu;
  me->lid = d->lid;
  me->port = (uint8_t)d->port;
  memcpy(me->gid, d->gid, 16);
  me->psn = (uint32_t)(moe_net_random_u64() & 0xffffff);
  for (c->nqps = 0; c->nqps < nqps; c->nqps++) {
    MOE_CHECK_GOTO(moe_ib_create_qp(c, d, &c->qps[c->nqps]), res, out_destroy);
    me->qpn[c->nqps] = c->qps[c->nqps]->qp_num;
  }
  if (type == MOE_NET_COMM_SEND) {
    MOE_CHECK_GOTO(moe_ib_alloc_reg(d, MOE_IB_FIFO_DEPTH * sizeof(moe_ib_cts_t), (void**)&c->fifo, &c->fifo_mr), res,
                   out_destroy);
    MOE_CHECK_GOTO(moe_ib_alloc_reg(d, MOE_IB_FIFO_DEPTH * MOE_NET_MAX_RECVS * sizeof(uint32_t),
                                    (void**)&c->sizes_out, &c->sizes_out_mr), res, out_destroy);
    me->fifo_addr = (uint64_t)(uintptr_t)c->fifo;
    me->fifo_rkey = c->fifo_mr->rkey;
  } else {
    MOE_CHECK_GOTO(moe_ib_alloc_reg(d, MOE_IB_FIFO_DEPTH * sizeof(moe_ib_cts_t), (void**)&c->cts_out,
                                    &c->cts_out_mr), res, out_destroy);
    MOE_CHECK_GOTO(moe_ib_alloc_reg(d, MOE_IB_FIFO_DEPTH * MOE_NET_MAX_RECVS * sizeof(uint32_t),
                                    (void**)&c->sizes_in, &c->sizes_in_mr), res, out_destroy);
    c->flush_mr = moe_ib_g.v->reg_mr(d->pd, c->flush_buf, sizeof(c->flush_buf), IBV_ACCESS_LOCAL_WRITE);
    if (c->flush_mr == NULL) {
      res = MOE_ERROR(ncclSystemError, "ib: registering the flush buffer failed: %m");
      goto out_destroy;
    }
  }
  *c_p = c;
  return ncclSuccess;
out_destroy:
  moe_ib_comm_destroy(c);
  return res;
}

/* Connects the comm's QPs to the peer's; the receive side also pre-posts its
 * receives and connects its flush QP to itself. */
static ncclResult_t moe_ib_comm_connect(moe_ib_comm_t* c, const moe_ib_conn_info_t* me,
                                        const moe_ib_conn_info_t* peer, int traffic_class) {
  moe_ib_dev_t* d = &moe_ib_g.devs[c->dev];
  if (peer->nqps != c->nqps || peer->link != d->link)
    return MOE_ERROR(ncclRemoteError, "ib: peer offers %d QPs on link %d, we have %d on link %d", peer->nqps,
                     peer->link, c->nqps, d->link);
  for (int q = 0; q < c->nqps; q++) MOE_CHECK(moe_ib_qp_connect(c->qps[q], d, peer, peer->qpn[q], me->psn, traffic_class));
  c->quiet_since_ns = moe_net_now_ns();
  if (c->base.type == MOE_NET_COMM_RECV) {
    c->remote_fifo_addr = peer->fifo_addr;
    c->remote_fifo_rkey = peer->fifo_rkey;
    for (int q = 0; q < c->nqps; q++)
      for (int i = 0; i < 2 * MOE_IB_FIFO_DEPTH; i++) MOE_CHECK(moe_ib_post_recv(c, q));
    if (d->ptr_support & NCCL_PTR_CUDA) {
      MOE_CHECK(moe_ib_create_qp(c, d, &c->flush_qp));
      moe_ib_conn_info_t self = *me;
      MOE_CHECK(moe_ib_qp_connect(c->flush_qp, d, &self, c->flush_qp->qp_num, me->psn, traffic_class));
    }
  }
  return ncclSuccess;
}

/* ------------------------------------------------------------------------ */
/* listen / connect / accept over the TCP side channel. */

typedef struct {
  int fd;
  uint8_t buf[MOE_IB_CONN_INFO_BYTES];
  size_t got;
  uint64_t since_ns;
  moe_ib_comm_t* comm;          /* created once the peer's info arrived */
  uint8_t reply[MOE_IB_CONN_INFO_BYTES];
  size_t sent;
} moe_ib_incoming_t;

typedef struct {
  moe_net_comm_t base;
  pthread_mutex_t lock;
  int dev;
  int fd;
  uint64_t nonce;
  int nincoming;
  moe_ib_incoming_t incoming[MOE_IB_MAX_INCOMING];
} moe_ib_listen_t;

struct moe_ib_pending {
  uint64_t cookie;
  int slot;
  int fd;
  int connected;
  uint64_t deadline_ns;
  int traffic_class;
  moe_ib_comm_t* comm;
  moe_ib_conn_info_t me;
  uint8_t out[MOE_IB_CONN_INFO_BYTES];
  size_t sent;
  uint8_t in[MOE_IB_CONN_INFO_BYTES];
  size_t got;
};

static ncclResult_t moe_ib_sock_opts(int fd) {
  int fl = fcntl(fd, F_GETFL);
  int one = 1;
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) return MOE_ERROR(ncclSystemError, "ib: fcntl failed: %m");
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return ncclSuccess;
}

/* Moves bytes on the side channel without blocking; EOF is an error. */
static ncclResult_t moe_ib_side_io(int fd, int is_send, uint8_t* buf, size_t len, size_t* done) {
  while (*done < len) {
    ssize_t n = is_send ? send(fd, buf + *done, len - *done, MSG_DONTWAIT | MSG_NOSIGNAL)
                        : recv(fd, buf + *done, len - *done, MSG_DONTWAIT);
    if (n > 0) {
      *done += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return ncclSuccess;
    return MOE_ERROR(ncclRemoteError, "ib: side channel %s", n == 0 ? "closed by the peer" : strerror(errno));
  }
  return ncclSuccess;
}

static ncclResult_t moe_ib_listen(int dev, void* handle, moe_net_comm_t** listen_p) {
  moe_ib_dev_t* d = NULL;
  MOE_CHECK(moe_ib_dev(dev, &d));
  ncclResult_t res = ncclSuccess;
  moe_ib_listen_t* l = calloc(1, sizeof(*l));
  if (l == NULL) return MOE_ERROR(ncclSystemError, "ib: out of memory");
  struct sockaddr_storage addr = moe_ib_g.side_dev.addr;
  socklen_t len = moe_ib_g.side_dev.addr_len;
  l->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (l->fd < 0 || bind(l->fd, (struct sockaddr*)&addr, len) != 0 || listen(l->fd, 1024) != 0 ||
      getsockname(l->fd, (struct sockaddr*)&addr, &len) != 0) {
    res = MOE_ERROR(ncclSystemError, "ib: side channel listen on %s failed: %m", moe_ib_g.side_dev.name);
    goto out_free;
  }
  MOE_CHECK_GOTO(moe_ib_sock_opts(l->fd), res, out_free);
  l->nonce = moe_net_random_u64();
  moe_ib_handle_t h = {.addr = addr, .addr_len = len, .nonce = l->nonce};
  MOE_CHECK_GOTO(moe_ib_handle_encode(&h, handle, MOE_NET_HANDLE_BYTES), res, out_free);
  l->base = (moe_net_comm_t){.magic = MOE_NET_COMM_MAGIC, .type = MOE_NET_COMM_LISTEN, .transport = &moe_transport_ib};
  pthread_mutex_init(&l->lock, NULL);
  l->dev = dev;
  *listen_p = &l->base;
  return ncclSuccess;
out_free:
  if (l->fd >= 0) close(l->fd);
  free(l);
  return res;
}

static void moe_ib_pending_free(moe_ib_pending_t* p) {
  pthread_mutex_lock(&moe_ib_g.lock);
  if (moe_ib_g.pending[p->slot] == p) moe_ib_g.pending[p->slot] = NULL;
  pthread_mutex_unlock(&moe_ib_g.lock);
  if (p->fd >= 0) close(p->fd);
  moe_ib_comm_destroy(p->comm);
  free(p);
}

static ncclResult_t moe_ib_connect_start(int dev, const moe_net_conn_config_t* config, const void* handle,
                                         uint8_t* scratch, moe_ib_pending_t** p_p) {
  moe_ib_handle_t h;
  MOE_CHECK(moe_ib_handle_decode(handle, MOE_NET_HANDLE_BYTES, &h));
  ncclResult_t res = ncclSuccess;
  moe_ib_pending_t* p = calloc(1, sizeof(*p));
  if (p == NULL) return MOE_ERROR(ncclSystemError, "ib: out of memory");
  p->fd = -1;
  p->slot = -1;
  p->cookie = moe_net_random_u64();
  p->deadline_ns = moe_net_now_ns() + moe_ib_timeout_ns();
  p->traffic_class = config != NULL ? config->traffic_class : NCCL_NET_TRAFFIC_CLASS_UNDEF;
  pthread_mutex_lock(&moe_ib_g.lock);
  for (int s = 0; s < MOE_IB_MAX_PENDING && p->slot < 0; s++)
    if (moe_ib_g.pending[s] == NULL) {
      moe_ib_g.pending[s] = p;
      p->slot = s;
    }
  pthread_mutex_unlock(&moe_ib_g.lock);
  if (p->slot < 0) {
    free(p);
    return MOE_ERROR(ncclSystemError, "ib: more than %d connections in progress", MOE_IB_MAX_PENDING);
  }
  int nqps = moe_env()->ib_qps_per_conn < MOE_IB_MAX_QPS ? moe_env()->ib_qps_per_conn : MOE_IB_MAX_QPS;
  MOE_CHECK_GOTO(moe_ib_comm_create(dev, MOE_NET_COMM_SEND, nqps, h.nonce, &p->comm, &p->me), res, out_free);
  moe_ib_conn_info_encode(&p->me, p->out);
  p->fd = socket(h.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (p->fd < 0) {
    res = MOE_ERROR(ncclSystemError, "ib: socket() failed: %m");
    goto out_free;
  }
  MOE_CHECK_GOTO(moe_ib_sock_opts(p->fd), res, out_free);
  if (connect(p->fd, (struct sockaddr*)&h.addr, h.addr_len) != 0 && errno != EINPROGRESS) {
    res = MOE_ERROR(ncclRemoteError, "ib: side channel connect failed: %m");
    goto out_free;
  }
  moe_put_u32(scratch, MOE_IB_PENDING_MAGIC);
  moe_put_u32(scratch + 4, (uint32_t)p->slot);
  moe_put_u64(scratch + 8, p->cookie);
  *p_p = p;
  return ncclSuccess;
out_free:
  moe_ib_pending_free(p);
  return res;
}

static ncclResult_t moe_ib_connect(int dev, const moe_net_conn_config_t* config, void* handle,
                                   moe_net_comm_t** send_p) {
  uint8_t* scratch = (uint8_t*)handle + MOE_NET_ADDR_HANDLE_SCRATCH_OFF;
  moe_ib_pending_t* p = NULL;
  ncclResult_t res = ncclSuccess;
  *send_p = NULL;
  if (!moe_all_zero(scratch, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES)) {
    uint32_t slot = moe_get_u32(scratch + 4);
    if (moe_get_u32(scratch) != MOE_IB_PENDING_MAGIC || slot >= MOE_IB_MAX_PENDING)
      return MOE_ERROR(ncclInvalidArgument, "ib connect: handle scratch area corrupted");
    pthread_mutex_lock(&moe_ib_g.lock);
    p = moe_ib_g.pending[slot];
    if (p != NULL && p->cookie != moe_get_u64(scratch + 8)) p = NULL;
    pthread_mutex_unlock(&moe_ib_g.lock);
    if (p == NULL) return MOE_ERROR(ncclInvalidArgument, "ib connect: handle refers to no connection in progress");
  } else {
    MOE_CHECK(moe_ib_connect_start(dev, config, handle, scratch, &p));
  }
  if (!p->connected) {
    struct pollfd pfd = {.fd = p->fd, .events = POLLOUT};
    if (poll(&pfd, 1, 0) > 0) {
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        res = MOE_ERROR(ncclRemoteError, "ib: side channel connect failed: %s", strerror(err));
        goto out_abandon;
      }
      p->connected = 1;
    }
  }
  if (p->connected) {
    MOE_CHECK_GOTO(moe_ib_side_io(p->fd, 1, p->out, sizeof(p->out), &p->sent), res, out_abandon);
    if (p->sent == sizeof(p->out))
      MOE_CHECK_GOTO(moe_ib_side_io(p->fd, 0, p->in, sizeof(p->in), &p->got), res, out_abandon);
  }
  if (p->got < sizeof(p->in)) {
    if (moe_net_now_ns() > p->deadline_ns) {
      res = MOE_ERROR(ncclRemoteError, "ib: connection set-up timed out after %d ms", moe_env()->timeout_ms);
      goto out_abandon;
    }
    return ncclSuccess;
  }
  moe_ib_conn_info_t peer;
  MOE_CHECK_GOTO(moe_ib_conn_info_decode(p->in, sizeof(p->in), &peer), res, out_abandon);
  if (peer.nonce != p->me.nonce) {
    res = MOE_ERROR(ncclRemoteError, "ib: the peer answered for another connection");
    goto out_abandon;
  }
  MOE_CHECK_GOTO(moe_ib_comm_connect(p->comm, &p->me, &peer, p->traffic_class), res, out_abandon);
  *send_p = &p->comm->base;
  p->comm = NULL;
  memset(scratch, 0, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES);
  moe_ib_pending_free(p);
  return ncclSuccess;
out_abandon:
  memset(scratch, 0, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES);
  moe_ib_pending_free(p);
  return res;
}

static void moe_ib_incoming_drop(moe_ib_listen_t* l, int i) {
  close(l->incoming[i].fd);
  moe_ib_comm_destroy(l->incoming[i].comm);
  l->incoming[i] = l->incoming[--l->nincoming];
}

static ncclResult_t moe_ib_accept(moe_net_comm_t* listen, moe_net_comm_t** recv_p) {
  moe_ib_listen_t* l = (moe_ib_listen_t*)listen;
  *recv_p = NULL;
  pthread_mutex_lock(&l->lock);
  while (l->nincoming < MOE_IB_MAX_INCOMING) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) break;
    if (moe_ib_sock_opts(fd) != ncclSuccess) {
      close(fd);
      continue;
    }
    l->incoming[l->nincoming++] = (moe_ib_incoming_t){.fd = fd, .since_ns = moe_net_now_ns()};
  }
  uint64_t now = moe_net_now_ns();
  for (int i = 0; i < l->nincoming; i++) {
    moe_ib_incoming_t* in = &l->incoming[i];
    ncclResult_t res = moe_ib_side_io(in->fd, 0, in->buf, sizeof(in->buf), &in->got);
    if (res == ncclSuccess && in->got == sizeof(in->buf) && in->comm == NULL) {
      moe_ib_conn_info_t peer, me;
      res = moe_ib_conn_info_decode(in->buf, sizeof(in->buf), &peer);
      if (res == ncclSuccess && peer.nonce != l->nonce)
        res = MOE_ERROR(ncclRemoteError, "ib accept: a connection for another listener");
      if (res == ncclSuccess) res = moe_ib_comm_create(l->dev, MOE_NET_COMM_RECV, peer.nqps, l->nonce, &in->comm, &me);
      if (res == ncclSuccess) res = moe_ib_comm_connect(in->comm, &me, &peer, NCCL_NET_TRAFFIC_CLASS_UNDEF);
      if (res == ncclSuccess) moe_ib_conn_info_encode(&me, in->reply);
    }
    if (res == ncclSuccess && in->comm != NULL) res = moe_ib_side_io(in->fd, 1, in->reply, sizeof(in->reply), &in->sent);
    if (res != ncclSuccess || (in->sent < sizeof(in->reply) && now - in->since_ns > moe_ib_timeout_ns())) {
      MOE_WARN("ib accept: dropped a connection attempt that failed or stalled");
      moe_ib_incoming_drop(l, i--);
      continue;
    }
    if (in->sent == sizeof(in->reply)) {
      *recv_p = &in->comm->base;
      in->comm = NULL;
      moe_ib_incoming_drop(l, i);
      break;
    }
  }
  pthread_mutex_unlock(&l->lock);
  return ncclSuccess;
}

static ncclResult_t moe_ib_close(moe_net_comm_t* c) {
  if (c->type == MOE_NET_COMM_LISTEN) {
    moe_ib_listen_t* l = (moe_ib_listen_t*)c;
    while (l->nincoming > 0) moe_ib_incoming_drop(l, 0);
    close(l->fd);
    pthread_mutex_destroy(&l->lock);
    l->base.magic = 0;
    free(l);
    return ncclSuccess;
  }
  moe_ib_comm_destroy((moe_ib_comm_t*)c);
  return ncclSuccess;
}

static ncclResult_t moe_ib_reg_mr(moe_net_comm_t* comm, void* data, size_t size, int type, int fd, uint64_t offset,
                                  void** mr_p) {
  int dev = comm->type == MOE_NET_COMM_LISTEN ? ((moe_ib_listen_t*)comm)->dev : ((moe_ib_comm_t*)comm)->dev;
  MOE_CHECK(moe_net_reg_check("ib regMr", data, size, type));
  return moe_ib_reg_dev(dev, data, size, type, fd, offset, mr_p);
}

static ncclResult_t moe_ib_dereg_mr(moe_net_comm_t* comm, void* mr) {
  (void)comm;
  return moe_ib_dereg(mr);
}

/* ------------------------------------------------------------------------ */
/* Data path. */

static moe_ib_req_t* moe_ib_req_alloc(moe_ib_comm_t* c, int type) {
  for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++)
    if (c->reqs[r].type == MOE_IB_REQ_FREE) {
      moe_ib_req_t* req = &c->reqs[r];
      req->base = (moe_net_request_t){.magic = MOE_NET_REQ_MAGIC, .nsizes = 1, .transport = &moe_transport_ib};
      req->type = type;
      req->n = 1;
      req->completions = 0;
      memset(req->sizes, 0, sizeof(req->sizes));
      return req;
    }
  return NULL;
}

static ncclResult_t moe_ib_post_write(moe_ib_comm_t* c, int q, void* local, uint32_t lkey, size_t len,
                                      uint64_t raddr, uint32_t rkey, int with_imm, uint32_t imm, int signaled,
                                      uint64_t wr_id) {
  struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)local, .length = (uint32_t)len, .lkey = lkey};
  struct ibv_send_wr wr = {.wr_id = wr_id, .sg_list = len > 0 ? &sge : NULL, .num_sge = len > 0 ? 1 : 0,
                           .opcode = with_imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE,
                           .send_flags = signaled ? IBV_SEND_SIGNALED : 0, .imm_data = htonl(imm),
                           .wr.rdma = {.remote_addr = raddr, .rkey = rkey}};
  struct ibv_send_wr* bad = NULL;
  int ret = ibv_post_send(c->qps[q], &wr, &bad); /* the error code, not errno */
  if (ret != 0) return moe_ib_fail(c, MOE_ERROR(ncclSystemError, "ib: ibv_post_send failed: %s", strerror(ret)));
  return ncclSuccess;
}

/* All elements of the current CTS entry are matched: send the data. */
static ncclResult_t moe_ib_send_slot(moe_ib_comm_t* c) {
  const moe_ib_cts_t* cts = &c->fill.cts;
  uint32_t slot = moe_ib_fifo_slot(c->seq);
  int n = (int)cts->n;
  for (int i = 0; i < n; i++) {
    moe_ib_req_t* r = c->fill.reqs[i];
    size_t size = r->sizes[0];
    if (size == 0) continue;
    for (int q = 0; q < c->nqps; q++) {
      size_t off, len;
      moe_ib_split(size, c->nqps, q, &off, &len);
      if (len > 0)
        MOE_CHECK(moe_ib_post_write(c, q, (char*)c->fill.data[i] + off, c->fill.mrs[i]->lkey, len,
                                    cts->elem[i].addr + off, cts->elem[i].rkey, 0, 0, 0, 0));
    }
  }
  if (n > 1) {
    uint32_t* out = &c->sizes_out[slot * MOE_NET_MAX_RECVS];
    for (int i = 0; i < n; i++) out[i] = (uint32_t)c->fill.reqs[i]->sizes[0];
    MOE_CHECK(moe_ib_post_write(c, 0, out, c->sizes_out_mr->lkey, (size_t)n * sizeof(uint32_t), cts->sizes_addr,
                                cts->sizes_rkey, 0, 0, 0, 0));
  }
  uint32_t imm = n == 1 ? (uint32_t)c->fill.reqs[0]->sizes[0] : (uint32_t)slot;
  for (int i = 0; i < n; i++) c->fill.reqs[i]->completions = c->nqps;
  /* One signaled write-with-immediate per QP closes the message on that QP;
   * wr_id carries the slot so its completion finds the requests. */
  for (int q = 0; q < c->nqps; q++)
    MOE_CHECK(moe_ib_post_write(c, q, NULL, 0, 0, 0, 0, 1, imm, 1, MOE_IB_WRID_CLOSE | c->seq));
  memset(&c->fill, 0, sizeof(c->fill));
  c->seq++;
  return ncclSuccess;
}

/* The message cannot be delivered (unknown tag, truncation): tell the
 * receiver, whose request would otherwise wait forever. Best effort: this
 * comm fails anyway. */
static void moe_ib_abort_peer(moe_ib_comm_t* c) {
  if (moe_ib_post_write(c, 0, NULL, 0, 0, 0, 0, 1, MOE_IB_IMM_ABORT, 1, 0) != ncclSuccess) moe_clear_last_error();
}

static ncclResult_t moe_ib_poll(moe_ib_comm_t* c) {
  if (c->failed != ncclSuccess) return c->failed;
  if (++c->async_tick % MOE_IB_ASYNC_CHECK_EVERY == 0) moe_ib_check_async(c->dev);
  if (__atomic_load_n(&moe_ib_g.dev_failed[c->dev], __ATOMIC_ACQUIRE))
    return moe_ib_fail(c, MOE_ERROR(ncclSystemError, "ib: device %s reported a fatal error",
                                    moe_ib_g.devs[c->dev].name));
  struct ibv_wc wcs[MOE_IB_POLL_BATCH];
  int n = ibv_poll_cq(c->cq, MOE_IB_POLL_BATCH, wcs);
  if (n < 0) return moe_ib_fail(c, MOE_ERROR(ncclSystemError, "ib: ibv_poll_cq failed (%d): the CQ overran?", n));
  uint64_t now = moe_net_now_ns();
  if (n > 0) {
    c->quiet_since_ns = now;
  } else if (!c->probing && now - c->quiet_since_ns > MOE_IB_KEEPALIVE_NS) {
    MOE_CHECK(moe_ib_post_write(c, 0, NULL, 0, 0, 0, 0, 0, 0, 1, MOE_IB_WRID_PROBE));
    c->probing = 1;
    c->quiet_since_ns = now;
  }
  for (int i = 0; i < n; i++) {
    struct ibv_wc* wc = &wcs[i];
    if (wc->status != IBV_WC_SUCCESS)
      return moe_ib_fail(c, MOE_ERROR(ncclRemoteError, "ib: work completion error: %s (vendor 0x%x); peer dead or "
                                      "NCCL_IB_TIMEOUT/RETRY_CNT too small?", moe_ib_g.v->wc_status_str(wc->status),
                                      wc->vendor_err));
    if (wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
      uint32_t imm = ntohl(wc->imm_data);
      int q = 0;
      while (q < c->nqps && c->qps[q]->qp_num != wc->qp_num) q++;
      if (q == c->nqps) return moe_ib_fail(c, MOE_ERROR(ncclInternalError, "ib: completion for an unknown QP"));
      MOE_CHECK(moe_ib_post_recv(c, q));
      if (imm == MOE_IB_IMM_ABORT)
        return moe_ib_fail(c, MOE_ERROR(ncclInvalidUsage, "ib: the peer sent a message with a tag no posted receive "
                                        "buffer has, or larger than that buffer"));
      if (imm & MOE_IB_IMM_WRITE_BIT) {
        /* NCCL has no one-sided writes: on its comms one is a protocol error
         * (the bytes landed in a registered receive buffer, as with NCCL's
         * own IB transport; nothing reports them as data). */
        if (c->base.flags & MOE_NET_COMM_NO_WRITES)
          return moe_ib_fail(c, MOE_ERROR(ncclRemoteError, "ib: the peer sent a one-sided write on a comm of the "
                                          "NCCL plugin, which has none"));
        if (moe_imm_ring_full(&c->imms))
          return moe_ib_fail(c, MOE_ERROR(ncclInternalError, "ib: immediates not polled (ring of %d full)",
                                          MOE_IMM_RING));
        moe_imm_ring_push(&c->imms, imm & ~MOE_IB_IMM_WRITE_BIT);
        continue;
      }
      uint64_t r = c->qp_done[q]++;
      if (r >= c->posted) return moe_ib_fail(c, MOE_ERROR(ncclRemoteError, "ib: a message arrived for no receive"));
      c->imm_of[moe_ib_fifo_slot(r)] = imm;
    } else if (wc->wr_id == MOE_IB_WRID_PROBE) {
      c->probing = 0;
    } else if (wc->wr_id & MOE_IB_WRID_CLOSE) {
      /* A sender's closing write: every request of that message loses one. */
      uint64_t seq = wc->wr_id & ~MOE_IB_WRID_CLOSE;
      for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++) {
        moe_ib_req_t* req = &c->reqs[r];
        if (req->type == MOE_IB_REQ_SEND && req->seq == seq && req->completions > 0) req->completions--;
      }
    } else if (wc->wr_id >= (uint64_t)(uintptr_t)&c->reqs[0] &&
               wc->wr_id <= (uint64_t)(uintptr_t)&c->reqs[MOE_NET_MAX_REQUESTS - 1]) {
      ((moe_ib_req_t*)(uintptr_t)wc->wr_id)->completions--; /* flush read or one-sided write */
    }
  }
  /* Receives complete in order once every QP delivered their immediate. */
  while (c->completed < c->posted) {
    uint64_t r = c->completed;
    for (int q = 0; q < c->nqps; q++)
      if (c->qp_done[q] <= r) return ncclSuccess;
    uint32_t slot = moe_ib_fifo_slot(r);
    moe_ib_req_t* req = c->recv_of[slot];
    for (int i = 0; i < req->n; i++) {
      uint32_t size = req->n == 1 ? c->imm_of[slot] : c->sizes_in[slot * MOE_NET_MAX_RECVS + i];
      if (size > c->cts_out[slot].elem[i].size)
        return moe_ib_fail(c, MOE_ERROR(ncclRemoteError, "ib: peer reports %u bytes for a %u-byte buffer", size,
                                        c->cts_out[slot].elem[i].size));
      req->sizes[i] = size;
    }
    req->completions = 0;
    c->recv_of[slot] = NULL;
    c->completed++;
  }
  return ncclSuccess;
}

static ncclResult_t moe_ib_isend(moe_net_comm_t* comm, void* data, size_t size, int tag, void* mh,
                                 moe_net_request_t** req_p) {
  moe_ib_comm_t* c = (moe_ib_comm_t*)comm;
  ncclResult_t res = ncclSuccess;
  *req_p = NULL;
  struct ibv_mr* mr = moe_ib_mr_of(mh);
  if (size > MOE_NET_MAX_MSG_BYTES || (size > 0 && mr == NULL))
    return MOE_ERROR(ncclInvalidArgument, "ib: isend of %zu bytes needs a registered buffer (limit %zu)", size,
                     MOE_NET_MAX_MSG_BYTES);
  pthread_mutex_lock(&c->lock);
  MOE_CHECK_GOTO(moe_ib_poll(c), res, out_unlock);
  if (!c->fill.have_cts) {
    int ready = moe_ib_cts_take(&c->fifo[moe_ib_fifo_slot(c->seq)], c->seq, &c->fill.cts);
    if (ready == 0) goto out_unlock; /* the receiver has not posted yet: NCCL retries */
    if (ready < 0) {
      res = moe_ib_fail(c, MOE_ERROR(ncclRemoteError, "ib: malformed clear-to-send entry from the peer"));
      goto out_unlock;
    }
    c->fill.have_cts = 1;
  }
  int e = moe_ib_cts_match(&c->fill.cts, c->fill.mask, tag, size);
  if (e == MOE_IB_CTS_NO_TAG) {
    moe_ib_abort_peer(c);
    res = moe_ib_fail(c, MOE_ERROR(ncclInvalidUsage, "ib: isend with tag %d matches no posted receive buffer", tag));
    goto out_unlock;
  }
  if (e == MOE_IB_CTS_TOO_BIG) {
    moe_ib_abort_peer(c);
    res = moe_ib_fail(c, MOE_ERROR(ncclInvalidUsage, "ib: message truncated: sending %zu bytes to a smaller receive "
                                   "buffer (tag %d)", size, tag));
    goto out_unlock;
  }
  moe_ib_req_t* req = moe_ib_req_alloc(c, MOE_IB_REQ_SEND);
  if (req == NULL) goto out_unlock;
  req->seq = c->seq;
  req->sizes[0] = size;
  req->completions = 1; /* until the slot is sent */
  c->fill.reqs[e] = req;
  c->fill.data[e] = data;
  c->fill.mrs[e] = mr;
  c->fill.mask |= 1u << e;
  if (++c->fill.matched == (int)c->fill.cts.n) res = moe_ib_send_slot(c);
  *req_p = &req->base;
out_unlock:
  pthread_mutex_unlock(&c->lock);
  return res;
}

static ncclResult_t moe_ib_irecv(moe_net_comm_t* comm, int n, void** data, const size_t* sizes, const int* tags,
                                 void** mhs, moe_net_request_t** req_p) {
  moe_ib_comm_t* c = (moe_ib_comm_t*)comm;
  ncclResult_t res = ncclSuccess;
  *req_p = NULL;
  if (n < 1 || n > MOE_NET_MAX_RECVS) return MOE_ERROR(ncclInvalidArgument, "ib: irecv of %d buffers", n);
  pthread_mutex_lock(&c->lock);
  MOE_CHECK_GOTO(moe_ib_poll(c), res, out_unlock);
  if (!moe_ib_fifo_can_post(c->posted, c->completed)) goto out_unlock;
  moe_ib_req_t* req = moe_ib_req_alloc(c, MOE_IB_REQ_RECV);
  if (req == NULL) goto out_unlock;
  uint32_t slot = moe_ib_fifo_slot(c->posted);
  moe_ib_cts_t* cts = &c->cts_out[slot];
  memset(cts, 0, sizeof(*cts));
  for (int i = 0; i < n; i++) {
    struct ibv_mr* mr = moe_ib_mr_of(mhs != NULL ? mhs[i] : NULL);
    if (sizes[i] > MOE_NET_MAX_MSG_BYTES || (sizes[i] > 0 && mr == NULL)) {
      req->type = MOE_IB_REQ_FREE;
      res = MOE_ERROR(ncclInvalidArgument, "ib: irecv buffer %d (%zu bytes) is not registered or too large", i,
                      sizes[i]);
      goto out_unlock;
    }
    cts->elem[i] = (moe_ib_cts_elem_t){.addr = (uint64_t)(uintptr_t)data[i], .size = (uint32_t)sizes[i],
                                       .rkey = mr != NULL ? mr->rkey : 0, .tag = tags != NULL ? tags[i] : 0};
  }
  cts->n = (uint32_t)n;
  cts->sizes_addr = (uint64_t)(uintptr_t)&c->sizes_in[slot * MOE_NET_MAX_RECVS];
  cts->sizes_rkey = c->sizes_in_mr->rkey;
  cts->idx = c->posted + 1;
  req->seq = c->posted;
  req->n = n;
  req->base.nsizes = (uint32_t)n;
  req->completions = 1; /* until the data arrived */
  c->recv_of[slot] = req;
  MOE_CHECK_GOTO(moe_ib_post_write(c, 0, cts, c->cts_out_mr->lkey, sizeof(*cts),
                                   c->remote_fifo_addr + slot * sizeof(moe_ib_cts_t), c->remote_fifo_rkey, 0, 0,
                                   1 /* signaled: reclaims send-queue slots */, 0),
                 res, out_unlock);
  c->posted++;
  *req_p = &req->base;
out_unlock:
  pthread_mutex_unlock(&c->lock);
  return res;
}

static ncclResult_t moe_ib_iflush(moe_net_comm_t* comm, int n, void** data, const int* sizes, void** mhs,
                                  moe_net_request_t** req_p) {
  moe_ib_comm_t* c = (moe_ib_comm_t*)comm;
  ncclResult_t res = ncclSuccess;
  *req_p = NULL;
  if (c->flush_qp == NULL) return ncclSuccess; /* host memory only: nothing to flush */
  pthread_mutex_lock(&c->lock);
  moe_ib_req_t* req = moe_ib_req_alloc(c, MOE_IB_REQ_FLUSH);
  if (req == NULL) goto out_unlock;
  /* A 1-byte RDMA read of the last buffer through the NIC orders every
   * earlier PCIe write into GPU memory before it completes. */
  int last = -1;
  for (int i = 0; i < n; i++)
    if (sizes[i] > 0 && moe_ib_mr_of(mhs[i]) != NULL) last = i;
  if (last < 0) {
    req->type = MOE_IB_REQ_FREE;
    goto out_unlock;
  }
  struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)c->flush_buf, .length = 1, .lkey = c->flush_mr->lkey};
  struct ibv_send_wr wr = {.wr_id = (uint64_t)(uintptr_t)req, .sg_list = &sge, .num_sge = 1,
                           .opcode = IBV_WR_RDMA_READ, .send_flags = IBV_SEND_SIGNALED,
                           .wr.rdma = {.remote_addr = (uint64_t)(uintptr_t)data[last],
                                       .rkey = moe_ib_mr_of(mhs[last])->rkey}};
  struct ibv_send_wr* bad = NULL;
  req->completions = 1;
  int ret = ibv_post_send(c->flush_qp, &wr, &bad);
  if (ret != 0) {
    req->type = MOE_IB_REQ_FREE;
    res = moe_ib_fail(c, MOE_ERROR(ncclSystemError, "ib: posting the flush read failed: %s", strerror(ret)));
    goto out_unlock;
  }
  *req_p = &req->base;
out_unlock:
  pthread_mutex_unlock(&c->lock);
  return res;
}

static ncclResult_t moe_ib_write(moe_net_comm_t* comm, void* local, size_t size, void* mh,
                                 const moe_net_rkey_t* remote, uint64_t offset, int with_imm, uint32_t imm,
                                 moe_net_request_t** req_p) {
  moe_ib_comm_t* c = (moe_ib_comm_t*)comm;
  ncclResult_t res = ncclSuccess;
  struct ibv_mr* mr = moe_ib_mr_of(mh);
  *req_p = NULL;
  if (remote == NULL || size > MOE_IB_MAX_CHUNK || (size > 0 && mr == NULL) || offset > remote->size ||
      size > remote->size - offset || (with_imm && (imm & MOE_IB_IMM_WRITE_BIT)) || remote->key > UINT32_MAX)
    return MOE_ERROR(ncclInvalidArgument, "ib: write of %zu bytes at %llu: unregistered, out of bounds, a key "
                     "that is no rkey, or an immediate >= 2^31", size, (unsigned long long)offset);
  pthread_mutex_lock(&c->lock);
  MOE_CHECK_GOTO(moe_ib_poll(c), res, out_unlock);
  moe_ib_req_t* req = moe_ib_req_alloc(c, MOE_IB_REQ_WRITE);
  if (req == NULL) goto out_unlock;
  req->completions = 1;
  req->sizes[0] = size;
  res = moe_ib_post_write(c, 0, local, mr != NULL ? mr->lkey : 0, size, remote->addr + offset, (uint32_t)remote->key, with_imm,
                          imm | MOE_IB_IMM_WRITE_BIT, 1, (uint64_t)(uintptr_t)req);
  if (res != ncclSuccess) {
    req->type = MOE_IB_REQ_FREE;
    goto out_unlock;
  }
  *req_p = &req->base;
out_unlock:
  pthread_mutex_unlock(&c->lock);
  return res;
}

static ncclResult_t moe_ib_test(moe_net_request_t* r, int* done_p, size_t* sizes_p) {
  moe_ib_req_t* req = (moe_ib_req_t*)r;
  moe_ib_comm_t* c = req->comm;
  *done_p = 0;
  pthread_mutex_lock(&c->lock);
  ncclResult_t res = req->type == MOE_IB_REQ_FREE
                         ? MOE_ERROR(ncclInvalidArgument, "ib: test() of a request that already completed")
                         : moe_ib_poll(c);
  if (res == ncclSuccess && req->completions == 0) {
    if (sizes_p != NULL)
      for (int i = 0; i < req->n; i++) sizes_p[i] = req->sizes[i];
    req->type = MOE_IB_REQ_FREE;
    *done_p = 1;
  }
  pthread_mutex_unlock(&c->lock);
  return res;
}

static ncclResult_t moe_ib_poll_imm(moe_net_comm_t* comm, uint32_t* imm_p, int* got_p) {
  moe_ib_comm_t* c = (moe_ib_comm_t*)comm;
  *got_p = 0;
  pthread_mutex_lock(&c->lock);
  ncclResult_t res = moe_ib_poll(c);
  if (res == ncclSuccess) *got_p = moe_imm_ring_pop(&c->imms, imm_p);
  pthread_mutex_unlock(&c->lock);
  return res;
}

const moe_transport_t moe_transport_ib = {
    .name = "ib",
    .kind = MOE_NET_KIND_IB,
    .init = moe_ib_init,
    .fini = moe_ib_fini,
    .devices = moe_ib_devices,
    .get_properties = moe_ib_get_properties,
    .listen = moe_ib_listen,
    .connect = moe_ib_connect,
    .accept = moe_ib_accept,
    .close = moe_ib_close,
    .reg_mr = moe_ib_reg_mr,
    .dereg_mr = moe_ib_dereg_mr,
    .mr_key = moe_ib_mr_key,
    .isend = moe_ib_isend,
    .irecv = moe_ib_irecv,
    .iflush = moe_ib_iflush,
    .test = moe_ib_test,
    .write = moe_ib_write,
    .poll_imm = moe_ib_poll_imm,
};

__attribute__((constructor)) static void moe_transport_ib_register(void) { moe_transport_register(&moe_transport_ib); }
