/* SPDX-License-Identifier: Apache-2.0 */
/* The one internal network-transport interface.
 *
 * Both the NCCL net plugin (plugin/) and the MoE internode path talk to
 * the network only through a moe_transport_t: a table of functions that each
 * backend (net_socket/, net_ib/) fills in. Semantics follow NCCL's net plugin
 * contract so the plugin layer stays a thin adapter:
 *
 *  - listen() writes an opaque handle (at most MOE_NET_HANDLE_BYTES) that the
 *    peer passes to connect(). connect() and accept() never block: they
 *    succeed with *comm_p == NULL and expect to be called again (connect with
 *    the same handle memory, which it may use as scratch). Handles come from
 *    the network: backends validate them before use.
 *  - isend()/irecv() return a request or, when the comm's request slots are
 *    full, NULL ("try again later"). Sends and receives match in posting order;
 *    one irecv may cover up to MOE_NET_MAX_RECVS buffers, each message picking
 *    its buffer by tag. A message longer than the buffer it matched is an
 *    error on the receiving side (truncation), never silent.
 *  - test() completes a request; sizes_p (may be NULL) receives one size per
 *    buffer of the request.
 *  - write() is one-sided: it copies local bytes into a peer region that the
 *    peer registered and described with mr_key(); with `imm` the receiving
 *    side sees the value through poll_imm() once the bytes landed. Immediates
 *    must be below 2^31 (the ib backend uses the top bit to tell them from
 *    message completions). A region is reachable only through the connection
 *    (comm) it was registered on, under a key a peer cannot guess; a comm
 *    flagged MOE_NET_COMM_NO_WRITES (every comm the NCCL plugin hands out:
 *    NCCL has no one-sided operation) refuses incoming writes.
 *    Order on one comm, which the internode proxy relies on: writes complete
 *    at the sender (test()) in posting order, and their immediates come out
 *    of poll_imm() in posting order, each once the bytes of its write and of
 *    every earlier write landed. The placement of bytes of different writes
 *    is not ordered (the socket backend stripes large writes over several
 *    TCP streams; RDMA promises no placement order either): a write must not
 *    overlap one still in flight.
 *  - After a call reports an error for a request (test(), or the isend/irecv
 *    that created it), the backend never touches that request's buffers
 *    again: it stops or drains whatever still moved them before reporting.
 *  - close(), dereg_mr() and the plugin's finalize() on an object that is
 *    already gone are the caller's bug; the plugin layer catches them for
 *    NCCL with a registry of live objects (moe_net_live.h).
 *
 * Every wait on a peer is bounded by NCCL_MOE_TIMEOUT_MS: a dead peer gives an
 * error, never a hang. Comms are used by one thread at a time each; different
 * comms may be used from different threads at once. */
#ifndef MOE_TRANSPORT_H_
#define MOE_TRANSPORT_H_

#include <stddef.h>
#include <stdint.h>

#include "nccl_net/net.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_NET_HANDLE_BYTES NCCL_NET_HANDLE_MAXSIZE
/* Requests in flight per comm (NCCL never posts more). */
#define MOE_NET_MAX_REQUESTS NCCL_NET_MAX_REQUESTS
/* Buffers one irecv may cover (NCCL's grouped receives). */
#define MOE_NET_MAX_RECVS 8
/* Largest single message: test() reports sizes as int, so stay below 2 GiB. */
#define MOE_NET_MAX_MSG_BYTES ((size_t)1 << 30)
/* Devices a backend exposes at most. */
#define MOE_NET_MAX_DEVS 16
#define MOE_NET_NAME_MAX 64
#define MOE_NET_PATH_MAX 256

/* Wire identifiers of the backends (also the handle's backend byte). */
typedef enum { MOE_NET_KIND_IB = 1, MOE_NET_KIND_SOCKET = 2 } moe_net_kind_t;

typedef struct {
  char name[MOE_NET_NAME_MAX];      /* "eth0", "mlx5_0" */
  char pci_path[MOE_NET_PATH_MAX];  /* realpath in /sys, "" when virtual */
  uint64_t guid;
  int ptr_support;                  /* NCCL_PTR_* */
  int reg_is_global;
  int force_flush;
  int speed_mbps;
  int port;
  float latency_us;
  int max_comms;
  int max_recvs;
  size_t max_p2p_bytes;
} moe_net_props_t;

typedef struct {
  int traffic_class;  /* NCCL_NET_TRAFFIC_CLASS_UNDEF: the backend's default */
} moe_net_conn_config_t;

typedef struct moe_transport moe_transport_t;

/* Every backend's comm and request starts with these headers, so the plugin
 * layer can check a pointer it is handed and find the transport. */
#define MOE_NET_COMM_MAGIC 0x6d6f6543u /* "moeC" */
#define MOE_NET_REQ_MAGIC 0x6d6f6552u  /* "moeR" */
typedef enum { MOE_NET_COMM_LISTEN = 1, MOE_NET_COMM_SEND = 2, MOE_NET_COMM_RECV = 3 } moe_net_comm_type_t;

/* moe_net_comm_t.flags */
#define MOE_NET_COMM_NO_WRITES 0x1u /* incoming one-sided writes are a protocol error */

typedef struct {
  uint32_t magic;
  uint32_t type; /* moe_net_comm_type_t */
  const moe_transport_t* transport;
  /* MOE_NET_COMM_*; set by the comm's user before it posts anything. */
  uint32_t flags;
} moe_net_comm_t;

typedef struct {
  uint32_t magic;
  uint32_t nsizes; /* buffers covered: entries test() writes */
  const moe_transport_t* transport;
} moe_net_request_t;

/* What a peer needs to write() into a registered region. It travels between
 * ranks as is (24 bytes, the proxy's key message), so its layout is fixed. */
typedef struct {
  uint64_t addr;  /* the region's base as the owner sees it */
  uint64_t size;
  /* Backend-specific and opaque to the user: the NIC's 32-bit rkey (ib), or
   * a 64-bit key with 52 random bits (socket). */
  uint64_t key;
} moe_net_rkey_t;
_Static_assert(sizeof(moe_net_rkey_t) == 24, "moe_net_rkey_t travels on the wire");

/* Largest region reg_mr() accepts (a larger size is a caller's bug: no host
 * or GPU has that much memory to register). */
#define MOE_NET_MAX_REG_BYTES ((uint64_t)1 << 40)

struct moe_transport {
  const char* name;
  moe_net_kind_t kind;
  /* Process-wide setup, reference counted by the caller; idempotent. */
  ncclResult_t (*init)(void);
  void (*fini)(void);
  ncclResult_t (*devices)(int* ndev_p);
  ncclResult_t (*get_properties)(int dev, moe_net_props_t* props_p);

  ncclResult_t (*listen)(int dev, void* handle, moe_net_comm_t** listen_p);
  ncclResult_t (*connect)(int dev, const moe_net_conn_config_t* config, void* handle,
                          moe_net_comm_t** send_p);
  ncclResult_t (*accept)(moe_net_comm_t* listen, moe_net_comm_t** recv_p);
  ncclResult_t (*close)(moe_net_comm_t* comm);

  /* type: NCCL_PTR_HOST or NCCL_PTR_CUDA; dmabuf_fd -1 when not dma-buf. */
  ncclResult_t (*reg_mr)(moe_net_comm_t* comm, void* data, size_t size, int type, int dmabuf_fd,
                         uint64_t dmabuf_offset, void** mr_p);
  ncclResult_t (*dereg_mr)(moe_net_comm_t* comm, void* mr);
  ncclResult_t (*mr_key)(void* mr, moe_net_rkey_t* key_p);

  ncclResult_t (*isend)(moe_net_comm_t* send, void* data, size_t size, int tag, void* mr,
                        moe_net_request_t** req_p);
  ncclResult_t (*irecv)(moe_net_comm_t* recv, int n, void** data, const size_t* sizes, const int* tags,
                        void** mrs, moe_net_request_t** req_p);
  /* Makes received GPU data visible to the GPU; *req_p NULL when nothing to do. */
  ncclResult_t (*iflush)(moe_net_comm_t* recv, int n, void** data, const int* sizes, void** mrs,
                         moe_net_request_t** req_p);
  ncclResult_t (*test)(moe_net_request_t* req, int* done_p, size_t* sizes_p);

  /* One-sided: copies [local, local+size) to remote->addr + offset. */
  ncclResult_t (*write)(moe_net_comm_t* send, void* local, size_t size, void* mr,
                        const moe_net_rkey_t* remote, uint64_t offset, int with_imm, uint32_t imm,
                        moe_net_request_t** req_p);
  /* Receiving side of write(): progresses the comm and returns the next
   * immediate that arrived (*got_p = 1) or nothing yet (*got_p = 0). A user
   * of write() with immediates must call it: see MOE_IMM_RING. */
  ncclResult_t (*poll_imm)(moe_net_comm_t* recv, uint32_t* imm_p, int* got_p);
};

/* The backend registry. Each backend registers its table from a constructor
 * in its own folder when the library loads, so the layers above reach a
 * backend only through here and the backends never see each other. */
#define MOE_NET_KINDS 3 /* moe_net_kind_t values are below this */
void moe_transport_register(const moe_transport_t* transport);
/* The registered backend of `kind`, NULL when none is compiled in. */
const moe_transport_t* moe_transport_get(moe_net_kind_t kind);

/* Picks the backend for NCCL_MOE_NET_BACKEND (auto: ib when an active verbs
 * port exists, else socket) and initializes it. A forced backend that cannot
 * start is an error; auto falls back to the socket backend with an INFO line. */
ncclResult_t moe_transport_select(const moe_transport_t** transport_p);

/* Monotonic clock in nanoseconds. */
uint64_t moe_net_now_ns(void);
/* A random 64-bit value that is never zero (connection ids, cookies, keys). */
uint64_t moe_net_random_u64(void);

/* Checks a region a caller wants registered: NULL only with size 0, size at
 * most MOE_NET_MAX_REG_BYTES, no address wrap-around, and, for host memory
 * (type NCCL_PTR_HOST), every page mapped. ncclInvalidArgument with a message
 * naming `what` otherwise. */
ncclResult_t moe_net_reg_check(const char* what, const void* data, size_t size, int type);

/* Checks that `comm` carries our header and the expected type. */
static inline int moe_net_comm_ok(const void* comm, moe_net_comm_type_t type) {
  const moe_net_comm_t* c = (const moe_net_comm_t*)comm;
  return c != NULL && c->magic == MOE_NET_COMM_MAGIC && c->type == (uint32_t)type && c->transport != NULL;
}

/* Immediates of one-sided writes that arrived and wait for poll_imm: a FIFO
 * both backends share. The owner serializes access (its comm lock). When it
 * is full the backend stops taking writes (back-pressure) and fails the comm
 * if poll_imm() makes no room within NCCL_MOE_TIMEOUT_MS: a bounded stall,
 * never a silent one. */
#define MOE_IMM_RING 1024
typedef struct {
  uint32_t v[MOE_IMM_RING];
  uint32_t head, count;
} moe_imm_ring_t;

static inline int moe_imm_ring_full(const moe_imm_ring_t* r) { return r->count == MOE_IMM_RING; }

static inline void moe_imm_ring_push(moe_imm_ring_t* r, uint32_t imm) {
  r->v[(r->head + r->count++) % MOE_IMM_RING] = imm;
}

/* 1 and the oldest immediate in *imm_p, or 0 when empty. */
static inline int moe_imm_ring_pop(moe_imm_ring_t* r, uint32_t* imm_p) {
  if (r->count == 0) return 0;
  *imm_p = r->v[r->head];
  r->head = (r->head + 1) % MOE_IMM_RING;
  r->count--;
  return 1;
}

#ifdef __cplusplus
}
#endif
#endif
