/* SPDX-License-Identifier: Apache-2.0 */
/* A verbs emulator for tests: a library with libibverbs' API (the subset
 * net_ib/ uses) that emulates an RC HCA between threads and processes of one
 * machine, so the verbs backend runs in CI and on hosts without an HCA.
 * Loaded instead of libibverbs with NCCL_MOE_IBVERBS_LIBRARY=<this library>.
 *
 * Model (what a real HCA does, reduced to one host):
 *  - Devices "emu0".."emuN-1" (VERBS_EMU_DEVICES, default 1), one port each,
 *    the same for every process of the machine: InfiniBand link with a LID
 *    (default) or RoCE with a GID table (VERBS_EMU_LINK=eth).
 *  - Every QP owns a listening unix socket in the abstract namespace named
 *    by its QP number: that is the machine-wide registry through which QPs
 *    of any process find each other. A QP number is unique machine-wide
 *    because binding the name is how it is allocated; the stream's first
 *    record (a hello) names both ends' devices and addresses, checked as an
 *    HCA checks a packet's LID/GID and QP number.
 *  - The requester side of a QP connects to its peer's name once in RTS and
 *    streams its requests (RDMA WRITE [+imm], SEND [+imm], RDMA READ) there;
 *    the peer's engine answers each with an ACK, a NAK or read data on the
 *    same stream. Memory is only ever touched by its own process: the engine
 *    copies payloads between the socket and registered memory.
 *  - One engine thread per process ("the HCA") moves all bytes, checks keys,
 *    bounds, access rights, QP states and PSNs, and writes completions, so
 *    remote writes land while the application does not call into verbs.
 *  - post_send/post_recv/poll_cq are reached through the context's ops table,
 *    exactly as verbs.h's inline functions call a real provider.
 *
 * Fault injection (read when a device is opened):
 *  VERBS_EMU_DELAY_US=n       completions become visible up to n us late
 *  VERBS_EMU_QP_ERROR_AFTER=n the n-th request this process transmits fails
 *                             (IBV_WC_RETRY_EXC_ERR) and its QP goes to error
 *  VERBS_EMU_LOSE_AFTER=n     after n requests the device goes dark (a pulled
 *                             cable or a dead node): nothing more is sent or
 *                             answered, peers and local requests time out
 *  VERBS_EMU_REORDER=1        QPs are served in random order with random
 *                             holds, so operations on different QPs land out
 *                             of posting order (per-QP order is kept)
 *  VERBS_EMU_FAIL=verb[:errno[:nth]]  the nth call (default 1) of a verb
 *                             (open_device, alloc_pd, reg_mr, reg_dmabuf_mr,
 *                             create_cq, create_qp, modify_qp, post_send,
 *                             post_recv) fails with errno (default EINVAL)
 *  VERBS_EMU_SEED=n           seed of the random choices above
 * Other settings: VERBS_EMU_DMABUF=1 (ibv_reg_dmabuf_mr maps any mmap-able
 * fd: a memfd stands in for GPU memory), VERBS_EMU_NAMESPACE=name (keeps
 * concurrent test runs apart). */
#ifndef VERBS_EMU_H_
#define VERBS_EMU_H_

#include <infiniband/verbs.h>
#include <pthread.h>
#include <stdint.h>

#define EMU_MAX_DEVS 4
#define EMU_PORTS 1
#define EMU_MAX_QP_WR 32768
#define EMU_MAX_SGE 4
#define EMU_MAX_INLINE 256
#define EMU_MAX_CQE (1 << 20)
#define EMU_MAX_RD_ATOM 16
#define EMU_MAX_MSG ((uint32_t)1 << 31)
#define EMU_ASYNC_QUEUE 64
#define EMU_PENDING_CONNS 4   /* accepted connections not yet identified, per QP */
#define EMU_RSP_QUEUE 64      /* responses a responder may owe before it stops reading */
#define EMU_IO_CHUNK (256u << 10)
#define EMU_GIDS_ETH 4
#define EMU_MR_BUCKETS 256

typedef struct {
  uint64_t delay_ns;
  uint64_t qp_error_after;  /* 0: never */
  uint64_t lose_after;      /* 0: never */
  int reorder;
  uint64_t seed;
} emu_faults_t;

/* One emulated device: identical in every process of the machine. */
typedef struct {
  struct ibv_device dev;
  int index;
  int eth;                  /* RoCE (GIDs) instead of InfiniBand (LIDs) */
  uint16_t lid;
  uint64_t guid;
  union ibv_gid gids[EMU_GIDS_ETH];
  int gid_types[EMU_GIDS_ETH]; /* enum ibv_gid_type */
  int ngids;
} emu_dev_t;

typedef struct emu_ctx {
  struct ibv_context ctx;   /* first: the application sees this */
  emu_dev_t* dev;
  int async_pipe[2];
  struct ibv_async_event events[EMU_ASYNC_QUEUE];
  int ev_head, ev_count;
  emu_faults_t faults;
  uint64_t ops;             /* requests transmitted (fault counters) */
  int dark;                 /* VERBS_EMU_LOSE_AFTER reached */
  int nobjs;                /* PDs and CQs still open */
} emu_ctx_t;

typedef struct {
  struct ibv_pd pd;
  int refs;                 /* MRs and QPs */
} emu_pd_t;

typedef struct emu_mr {
  struct ibv_mr mr;
  struct emu_mr* next;      /* hash bucket by key */
  uint8_t* host;            /* where iova maps in this process */
  uint64_t iova;
  size_t len;
  int access;
  void* map;                /* dma-buf: our mapping of the fd */
  size_t map_len;
} emu_mr_t;

typedef struct {
  struct ibv_wc wc;
  uint64_t visible_ns;
  uint32_t qpn;
  int is_send;
  uint64_t sq_seq;          /* send: the WR's sequence number (retires the SQ up to it) */
} emu_cqe_t;

typedef struct {
  struct ibv_cq cq;
  emu_cqe_t* ring;
  int cap, head, count;
  int count_hint;           /* count, read without the lock by poll_cq */
  int overrun;
  int refs;                 /* QPs using it */
  uint64_t last_visible_ns;
} emu_cq_t;

typedef struct {
  uint64_t addr;
  uint32_t length, lkey;
} emu_sge_t;

typedef struct {
  uint64_t wr_id;
  int opcode;               /* enum ibv_wr_opcode */
  unsigned flags;           /* IBV_SEND_* */
  uint32_t imm;             /* as posted (network order) */
  uint64_t raddr;
  uint32_t rkey;
  emu_sge_t sge[EMU_MAX_SGE];
  int nsge;
  uint32_t len;
  uint8_t* inline_data;     /* IBV_SEND_INLINE: copied at post time */
  uint32_t psn;
  uint64_t seq;
} emu_swr_t;

typedef struct {
  uint64_t wr_id;
  emu_sge_t sge[EMU_MAX_SGE];
  int nsge;
} emu_rwr_t;

/* Wire records (both ends are on this machine: host byte order). */
#define EMU_HELLO_MAGIC 0x454d5548u /* "HUME" */
#define EMU_REQ_MAGIC 0x454d5552u
#define EMU_RSP_MAGIC 0x454d5553u
#define EMU_WIRE_VERSION 1
typedef struct {
  uint32_t magic, version;
  uint32_t src_qpn, dst_qpn;
  uint32_t src_dev, dst_dev;
  uint16_t src_lid;
  uint16_t pad;
  uint8_t src_gid[16];
} emu_hello_t;

enum { EMU_OP_WRITE = 1, EMU_OP_WRITE_IMM, EMU_OP_SEND, EMU_OP_SEND_IMM, EMU_OP_READ };
typedef struct {
  uint32_t magic;
  uint8_t op, pad[3];
  uint32_t psn, imm;
  uint64_t raddr;
  uint32_t rkey, len;
} emu_req_t;

enum { EMU_RSP_ACK = 1, EMU_RSP_NAK, EMU_RSP_READ, EMU_RSP_RNR };
typedef struct {
  uint32_t magic;
  uint8_t type, status, pad[2]; /* status: the requester's ibv_wc_status for a NAK */
  uint32_t psn, len;
  uint32_t rnr_ns_lo, rnr_ns_hi; /* RNR: the responder's min_rnr_timer in ns */
} emu_rsp_t;

/* A response a responder owes, in order. */
typedef struct {
  emu_rsp_t hdr;
  uint32_t rkey;            /* READ: where the data comes from */
  uint64_t raddr;
} emu_rsp_item_t;

#define EMU_HDR_MAX 48
typedef struct {
  int fd;                   /* -1: none */
  int tx_blocked;           /* the last send hit EAGAIN: wait for POLLOUT */
  int close_after_rsp;      /* the QP went to error after a NAK: close once the NAK is out */
  int identified;           /* responder: the hello was read and accepted */
  /* requester transmit: a header (hello or request), then the payload */
  int tx_kind;              /* EMU_TX_* */
  uint8_t hdr[EMU_HDR_MAX];
  uint32_t hdr_len, hdr_sent;
  uint32_t pay_len, pay_sent;
  /* receive: a header, then a payload into memory (or discarded) */
  uint8_t rx[EMU_HDR_MAX];
  uint32_t rx_got;
  int rx_state;             /* EMU_RX_* */
  emu_req_t req;            /* responder: the request being received */
  emu_rsp_t rsp_in;         /* requester: the response being received */
  uint32_t rx_done;         /* payload bytes consumed */
  int rx_status;            /* what to report once a discarded payload is drained */
  emu_rwr_t rwr;            /* SEND: the receive it lands in */
  int rnr_sent;
  /* responder: responses owed, oldest first */
  emu_rsp_item_t rsp[EMU_RSP_QUEUE];
  int rsp_head, rsp_count;
  uint32_t rsp_sent;        /* bytes of the oldest response (header + payload) already sent */
} emu_conn_t;

enum { EMU_TX_NONE = 0, EMU_TX_HELLO, EMU_TX_REQ };
enum { EMU_EV_LISTEN = 1, EMU_EV_PENDING = 2, EMU_EV_OUT_R = 4, EMU_EV_OUT_W = 8, EMU_EV_IN_R = 16, EMU_EV_IN_W = 32 };
enum { EMU_RX_HDR = 0, EMU_RX_PAYLOAD, EMU_RX_PARKED, EMU_RX_DISCARD, EMU_RX_WAIT };

typedef struct emu_qp {
  struct ibv_qp qp;
  struct emu_qp* next;      /* all live QPs of the process */
  emu_ctx_t* ectx;
  int destroyed;
  int listen_fd;
  struct ibv_qp_cap cap;
  /* attributes as modified */
  int port, access, pkey_index;
  int path_mtu;
  uint32_t dest_qpn, rq_psn, sq_psn;
  int timeout, retry_cnt, rnr_retry, min_rnr_timer, max_rd_atomic, max_dest_rd_atomic;
  struct ibv_ah_attr ah;
  int remote_dev;           /* device the AV resolves to, -1 unreachable */
  /* send queue: [retired, posted) in the ring; [done, tx) wait for a response */
  emu_swr_t* sq;
  uint64_t sq_posted, sq_tx, sq_done, sq_retired;
  uint32_t next_psn;
  int reads_out;
  /* receive queue */
  emu_rwr_t* rq;
  int rq_head, rq_count;
  uint32_t expect_psn;
  /* connections: requester (out) and responder (in, plus unidentified ones) */
  emu_conn_t out, in;
  emu_conn_t pending[EMU_PENDING_CONNS];
  /* the requester's timer */
  uint64_t progress_ns;
  uint64_t rnr_until_ns;    /* RNR wait: give up at this time (UINT64_MAX: never) */
  int rnr_wait;
  uint64_t hold_until_ns;   /* VERBS_EMU_REORDER */
  uint64_t connect_retry_ns;
  /* a WR that failed before it went out: completes in error when its turn comes */
  uint64_t fail_seq;
  int fail_status;
  int ev;                   /* EMU_EV_*: what the last poll reported for its sockets */
} emu_qp_t;

/* Process-wide state; one lock guards everything. */
typedef struct {
  pthread_mutex_t lock;
  int ndevs;
  emu_dev_t devs[EMU_MAX_DEVS];
  int devs_ready;
  int dmabuf;
  char ns[64];
  int nctx;
  emu_qp_t* qps;
  emu_qp_t* zombies;        /* destroyed QPs the engine frees */
  emu_mr_t* mrs[EMU_MR_BUCKETS];
  uint32_t mr_serial;
  uint64_t rng;
  pthread_t engine;
  pthread_mutex_t engine_ctl; /* serializes starting and stopping the engine */
  int engine_running, engine_stop, engine_polling;
  int debug;
  int wake_fd;
  /* VERBS_EMU_FAIL */
  char fail_verb[32];
  int fail_errno, fail_nth, fail_calls;
  /* what the last ibv_reg_dmabuf_mr got (tests) */
  uint64_t last_dmabuf_offset, last_dmabuf_len, last_dmabuf_iova;
} emu_global_t;

extern emu_global_t emu;

/* emu_dev.c */
uint64_t emu_now_ns(void);
uint64_t emu_random(void);
int emu_fail_now(const char* verb, int* err_p);
void emu_async_event(emu_ctx_t* c, enum ibv_event_type type, void* element);
emu_mr_t* emu_mr_find(uint32_t key);
/* The host address of [addr, addr+len) in the MR of `key` when the MR is in
 * `pd`, allows `access` and covers the range; NULL otherwise. */
uint8_t* emu_mr_translate(uint32_t key, struct ibv_pd* pd, uint64_t addr, uint64_t len, int access);
void emu_cq_push(emu_cq_t* cq, const emu_cqe_t* e, const emu_faults_t* f);
void emu_wake(void);
void emu_log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/* emu_qp.c */
emu_qp_t* emu_qp_by_num(uint32_t qpn);
void emu_qp_to_error(emu_qp_t* q);
/* Completes the send WR at sq_done with `status` (a CQE when signaled or failed). */
void emu_sq_complete(emu_qp_t* q, enum ibv_wc_status status);
int emu_rq_take(emu_qp_t* q, emu_rwr_t* wr_p);
void emu_rq_complete(emu_qp_t* q, const emu_rwr_t* wr, enum ibv_wc_status status, int opcode, uint32_t len,
                     uint32_t imm, int with_imm);
void emu_qp_free(emu_qp_t* q);
uint64_t emu_qp_retry_budget_ns(const emu_qp_t* q);
uint64_t emu_rnr_timer_ns(int code);
extern struct ibv_context_ops emu_ops_template;

/* emu_engine.c */
int emu_engine_start(void);
void emu_engine_stop(void);
void emu_conn_close(emu_conn_t* c);
void emu_conn_init(emu_conn_t* c);
int emu_listen_name(char* buf, size_t len, uint32_t qpn);

#endif
