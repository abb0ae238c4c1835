/* SPDX-License-Identifier: Apache-2.0 */
/* What only the verbs emulator can show (run with NCCL_MOE_NET_BACKEND=ib,
 * NCCL_MOE_IBVERBS_LIBRARY=libverbs-emu.so, VERBS_EMU_DMABUF=1):
 *
 *  - raw verbs against the emulator, checking that it behaves as an HCA
 *    does: the QP state machine's required attributes, errors returned (not
 *    put in errno), remote access and bounds errors with the QP going to
 *    error and everything after it flushed, send-queue slots freed only by
 *    a polled completion, RDMA READ, RNR waits, PSN mismatches, sends larger
 *    than the receive;
 *  - the plugin under injected faults (late completions, reordering between
 *    QPs, a QP error after N operations, a device going dark, a verb failing)
 *    ending in errors within the timeout, never in a hang or wrong data;
 *  - dma-buf registration aligned to pages (address down, size up, offset
 *    adjusted) and the registration cache that relies on it;
 *  - a peer in another process, and one killed mid-stream;
 *  - NCCL_IB_HCA over two devices, and a RoCE port (GIDs, no LIDs). */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "net_ib/moe_ib_verbs.h"
#include "net_test_util.h"
#include "test_common.h"

#define RAW_DEPTH 16
#define RAW_WAIT_MS 5000
#define STREAM_WINDOW 8
#define STREAM_GRACE_MS 10000

/* ======================================================================== */
/* Raw verbs: two RC QPs of one device connected to each other. */

typedef struct {
  const moe_ib_verbs_t* v;
  struct ibv_device** list;
  struct ibv_context* ctx;
  struct ibv_pd* pd;
  struct ibv_cq* cq[2];
  struct ibv_qp* qp[2];
  uint16_t lid;
} raw_t;

static void raw_open(raw_t* r, int max_send_wr) {
  memset(r, 0, sizeof(*r));
  ck_assert_int_eq(moe_ib_verbs_load(&r->v), ncclSuccess);
  int n = 0;
  r->list = r->v->get_device_list(&n);
  ck_assert(r->list != NULL && n >= 1);
  r->ctx = r->v->open_device(r->list[0]);
  ck_assert_ptr_nonnull(r->ctx);
  struct ibv_port_attr pa;
  memset(&pa, 0, sizeof(pa));
  ck_assert_int_eq(r->v->query_port(r->ctx, 1, &pa), 0);
  ck_assert_int_eq(pa.state, IBV_PORT_ACTIVE);
  r->lid = pa.lid;
  r->pd = r->v->alloc_pd(r->ctx);
  ck_assert_ptr_nonnull(r->pd);
  for (int i = 0; i < 2; i++) {
    r->cq[i] = r->v->create_cq(r->ctx, 256, NULL, NULL, 0);
    ck_assert_ptr_nonnull(r->cq[i]);
    struct ibv_qp_init_attr ia = {.send_cq = r->cq[i], .recv_cq = r->cq[i], .qp_type = IBV_QPT_RC,
                                  .cap = {.max_send_wr = (uint32_t)max_send_wr, .max_recv_wr = RAW_DEPTH,
                                          .max_send_sge = 1, .max_recv_sge = 1}};
    r->qp[i] = r->v->create_qp(r->pd, &ia);
    ck_assert_ptr_nonnull(r->qp[i]);
  }
}

static void raw_close(raw_t* r) {
  for (int i = 0; i < 2; i++) {
    if (r->qp[i] != NULL) ck_assert_int_eq(r->v->destroy_qp(r->qp[i]), 0);
    ck_assert_int_eq(r->v->destroy_cq(r->cq[i]), 0);
  }
  ck_assert_int_eq(r->v->dealloc_pd(r->pd), 0);
  ck_assert_int_eq(r->v->close_device(r->ctx), 0);
  r->v->free_device_list(r->list);
}

static int raw_init(raw_t* r, int i, int access) {
  struct ibv_qp_attr a = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1, .qp_access_flags = (unsigned)access};
  return r->v->modify_qp(r->qp[i], &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

static int raw_rtr(raw_t* r, int i, uint32_t rq_psn) {
  struct ibv_qp_attr a;
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = IBV_MTU_4096;
  a.dest_qp_num = r->qp[1 - i]->qp_num;
  a.rq_psn = rq_psn;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = 1; /* 0.01 ms */
  a.ah_attr.dlid = r->lid;
  a.ah_attr.port_num = 1;
  return r->v->modify_qp(r->qp[i], &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                           IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
}

static int raw_rts(raw_t* r, int i, uint32_t sq_psn, int rnr_retry) {
  struct ibv_qp_attr a;
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTS;
  a.timeout = 14;
  a.retry_cnt = 7;
  a.rnr_retry = (uint8_t)rnr_retry;
  a.sq_psn = sq_psn;
  a.max_rd_atomic = 1;
  return r->v->modify_qp(r->qp[i], &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                           IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
}

/* Both QPs to RTS; QP 1 expects PSN `psn1_expect` from QP 0 (which starts at 100). */
static void raw_connect(raw_t* r, uint32_t psn1_expect, int rnr_retry) {
  const int access = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  for (int i = 0; i < 2; i++) ck_assert_int_eq(raw_init(r, i, access), 0);
  ck_assert_int_eq(raw_rtr(r, 0, 200), 0);
  ck_assert_int_eq(raw_rtr(r, 1, psn1_expect), 0);
  ck_assert_int_eq(raw_rts(r, 0, 100, rnr_retry), 0);
  ck_assert_int_eq(raw_rts(r, 1, 200, rnr_retry), 0);
}

/* The next completion of side i within ms; 0 when none came. */
static int raw_poll(raw_t* r, int i, struct ibv_wc* wc, int ms) {
  uint64_t deadline = net_now_ms() + (uint64_t)ms;
  for (;;) {
    int n = ibv_poll_cq(r->cq[i], 1, wc);
    ck_assert_int_ge(n, 0);
    if (n == 1) return 1;
    if (net_now_ms() > deadline) return 0;
    usleep(100);
  }
}

static int raw_write(raw_t* r, int opcode, void* src, uint32_t len, uint32_t lkey, uint64_t raddr, uint32_t rkey,
                     uint64_t wr_id, int signaled, uint32_t imm) {
  struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)src, .length = len, .lkey = lkey};
  struct ibv_send_wr wr = {.wr_id = wr_id, .sg_list = len ? &sge : NULL, .num_sge = len ? 1 : 0,
                           .opcode = (enum ibv_wr_opcode)opcode, .send_flags = signaled ? IBV_SEND_SIGNALED : 0,
                           .imm_data = htonl(imm), .wr.rdma = {.remote_addr = raddr, .rkey = rkey}};
  struct ibv_send_wr* bad = NULL;
  return ibv_post_send(r->qp[0], &wr, &bad);
}

static int raw_recv(raw_t* r, int i, void* buf, uint32_t len, uint32_t lkey, uint64_t wr_id) {
  struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)buf, .length = len, .lkey = lkey};
  struct ibv_recv_wr wr = {.wr_id = wr_id, .sg_list = len ? &sge : NULL, .num_sge = len ? 1 : 0};
  struct ibv_recv_wr* bad = NULL;
  return ibv_post_recv(r->qp[i], &wr, &bad);
}

START_TEST(test_raw_state_machine) {
  raw_t r;
  raw_open(&r, RAW_DEPTH);
  /* Verbs return the error; errno is left alone. */
  errno = ENOTTY;
  struct ibv_qp_attr a;
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTR;
  ck_assert_int_eq(raw_rtr(&r, 0, 0), EINVAL); /* RESET -> RTR skips INIT */
  ck_assert_int_eq(errno, ENOTTY);
  a.qp_state = IBV_QPS_INIT;
  a.port_num = 1;
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_ACCESS_FLAGS), EINVAL);
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
                                                   IBV_QP_TIMEOUT),
                   EINVAL); /* an attribute INIT does not take */
  a.port_num = 2;
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS),
                   EINVAL); /* no such port */
  ck_assert_int_eq(raw_init(&r, 0, IBV_ACCESS_REMOTE_WRITE), 0);
  ck_assert_int_eq(raw_init(&r, 1, IBV_ACCESS_REMOTE_WRITE), 0);
  /* Posting sends before RTS is refused; receives are fine from INIT. */
  char buf[64];
  struct ibv_mr* mr = r.v->reg_mr(r.pd, buf, sizeof(buf), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ck_assert_ptr_nonnull(mr);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, buf, 8, mr->lkey, (uint64_t)(uintptr_t)buf, mr->rkey, 1, 1, 0),
                   EINVAL);
  ck_assert_int_eq(raw_recv(&r, 0, buf, 8, mr->lkey, 1), 0);
  /* RTR on InfiniBand needs a LID; RTS needs its five attributes. */
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = IBV_MTU_1024;
  a.dest_qp_num = r.qp[1]->qp_num;
  a.ah_attr.port_num = 1;
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                                   IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER),
                   EINVAL);
  ck_assert_int_eq(raw_rtr(&r, 0, 0), 0);
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTS;
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE | IBV_QP_SQ_PSN), EINVAL);
  ck_assert_int_eq(raw_rts(&r, 0, 0, 7), 0);
  ck_assert_int_eq(errno, ENOTTY);
  /* A QP in error accepts work and flushes it at once, signaled or not. */
  a.qp_state = IBV_QPS_ERR;
  ck_assert_int_eq(r.v->modify_qp(r.qp[0], &a, IBV_QP_STATE), 0);
  struct ibv_wc wc;
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_WR_FLUSH_ERR); /* the receive posted in INIT */
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, buf, 8, mr->lkey, (uint64_t)(uintptr_t)buf, mr->rkey, 7, 0, 0), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_WR_FLUSH_ERR);
  ck_assert_uint_eq(wc.wr_id, 7);
  ck_assert_int_eq(r.v->dereg_mr(mr), 0);
  raw_close(&r);
}
END_TEST

START_TEST(test_raw_access_errors) {
  enum { N = 1 << 16 };
  raw_t r;
  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 7);
  char* src = malloc(N);
  char* dst = malloc(N);
  net_fill(src, N, 1);
  memset(dst, 0x3C, N);
  const int rw = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  struct ibv_mr* smr = r.v->reg_mr(r.pd, src, N, IBV_ACCESS_LOCAL_WRITE);
  struct ibv_mr* dmr = r.v->reg_mr(r.pd, dst, N, rw);
  ck_assert(smr != NULL && dmr != NULL);
  uint64_t daddr = (uint64_t)(uintptr_t)dst;
  /* A good write lands and completes. */
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, src, 1000, smr->lkey, daddr + 64, dmr->rkey, 1, 1, 0), 0);
  struct ibv_wc wc;
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  ck_assert_int_eq(wc.opcode, IBV_WC_RDMA_WRITE);
  ck_assert_int_eq(memcmp(dst + 64, src, 1000), 0);
  /* Past the end of the region: a remote access error, nothing lands. */
  memset(dst, 0x3C, N);
  ck_assert_int_eq(raw_recv(&r, 1, NULL, 0, 0, 55), 0);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, src, 100, smr->lkey, daddr + N - 50, dmr->rkey, 2, 1, 0), 0);
  /* What follows is flushed, and completes although unsignaled. */
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, src, 8, smr->lkey, daddr, dmr->rkey, 3, 0, 0), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_REM_ACCESS_ERR);
  ck_assert_uint_eq(wc.wr_id, 2);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_WR_FLUSH_ERR);
  ck_assert_uint_eq(wc.wr_id, 3);
  /* The responder QP went to error too: its receive is flushed, and an
   * access-violation async event is waiting. */
  ck_assert(raw_poll(&r, 1, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_WR_FLUSH_ERR);
  ck_assert_uint_eq(wc.wr_id, 55);
  int fl = fcntl(r.ctx->async_fd, F_GETFL);
  ck_assert_int_eq(fcntl(r.ctx->async_fd, F_SETFL, fl | O_NONBLOCK), 0);
  struct ibv_async_event ev;
  ck_assert_int_eq(r.v->get_async_event(r.ctx, &ev), 0);
  ck_assert_int_eq(ev.event_type, IBV_EVENT_QP_ACCESS_ERR);
  ck_assert_ptr_eq(ev.element.qp, r.qp[1]);
  r.v->ack_async_event(&ev);
  for (int i = 0; i < N; i++) ck_assert_int_eq((unsigned char)dst[i], 0x3C);
  ck_assert_int_eq(r.v->dereg_mr(smr), 0);
  ck_assert_int_eq(r.v->dereg_mr(dmr), 0);
  raw_close(&r);

  /* A key that is not (or no longer) registered, and a region without remote write. */
  for (int c = 0; c < 2; c++) {
    raw_open(&r, RAW_DEPTH);
    raw_connect(&r, 100, 7);
    smr = r.v->reg_mr(r.pd, src, N, IBV_ACCESS_LOCAL_WRITE);
    dmr = r.v->reg_mr(r.pd, dst, N, c == 0 ? rw : IBV_ACCESS_LOCAL_WRITE);
    uint32_t rkey = dmr->rkey;
    if (c == 0) ck_assert_int_eq(r.v->dereg_mr(dmr), 0);
    ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, src, 100, smr->lkey, daddr, rkey, 4, 1, 0), 0);
    ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
    ck_assert_int_eq(wc.status, IBV_WC_REM_ACCESS_ERR);
    ck_assert_int_eq(r.v->dereg_mr(smr), 0);
    if (c == 1) ck_assert_int_eq(r.v->dereg_mr(dmr), 0);
    raw_close(&r);
    for (int i = 0; i < N; i++) ck_assert_int_eq((unsigned char)dst[i], 0x3C);
  }
  free(src);
  free(dst);
}
END_TEST

/* Send-queue slots come back only when a completion at or after them is
 * polled: unsignaled work alone fills the queue (ENOMEM), as on an HCA. */
START_TEST(test_raw_send_queue_accounting) {
  enum { DEPTH = 8 };
  raw_t r;
  raw_open(&r, DEPTH);
  raw_connect(&r, 100, 7);
  for (int i = 0; i < DEPTH; i++) ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, i, 0, 0), 0);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, 99, 1, 0), ENOMEM);
  raw_close(&r);
  raw_open(&r, DEPTH);
  raw_connect(&r, 100, 7);
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < DEPTH; i++)
      ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, i, i == DEPTH - 1, 0), 0);
    ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, 99, 1, 0), ENOMEM);
    struct ibv_wc wc;
    ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
    ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
    ck_assert_uint_eq(wc.wr_id, DEPTH - 1);
  }
  raw_close(&r);
}
END_TEST

START_TEST(test_raw_read_send_and_length_errors) {
  enum { N = 300000 };
  raw_t r;
  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 7);
  char* remote = malloc(N);
  char* local = malloc(N);
  net_fill(remote, N, 5);
  memset(local, 0, N);
  struct ibv_mr* rmr = r.v->reg_mr(r.pd, remote, N, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
  struct ibv_mr* lmr = r.v->reg_mr(r.pd, local, N, IBV_ACCESS_LOCAL_WRITE);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_READ, local, N, lmr->lkey, (uint64_t)(uintptr_t)remote, rmr->rkey, 1, 1, 0),
                   0);
  struct ibv_wc wc;
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  ck_assert_int_eq(wc.opcode, IBV_WC_RDMA_READ);
  ck_assert_uint_eq(wc.byte_len, N);
  ck_assert(net_check(local, N, 5));
  /* A SEND lands in the posted receive; one larger than it fails on both ends. */
  ck_assert_int_eq(raw_recv(&r, 1, remote, 1000, rmr->lkey, 11), 0);
  ck_assert_int_eq(raw_write(&r, IBV_WR_SEND_WITH_IMM, local, 1000, lmr->lkey, 0, 0, 2, 1, 0xBEEF), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  ck_assert(raw_poll(&r, 1, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  ck_assert_int_eq(wc.opcode, IBV_WC_RECV);
  ck_assert_uint_eq(wc.byte_len, 1000);
  ck_assert_uint_eq(ntohl(wc.imm_data), 0xBEEF);
  ck_assert_int_eq(memcmp(remote, local, 1000), 0);
  ck_assert_int_eq(raw_recv(&r, 1, remote, 100, rmr->lkey, 12), 0);
  ck_assert_int_eq(raw_write(&r, IBV_WR_SEND, local, 1000, lmr->lkey, 0, 0, 3, 1, 0), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_REM_INV_REQ_ERR);
  ck_assert(raw_poll(&r, 1, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_LOC_LEN_ERR);
  ck_assert_int_eq(r.v->dereg_mr(rmr), 0);
  ck_assert_int_eq(r.v->dereg_mr(lmr), 0);
  raw_close(&r);
  /* Reading a region that does not allow remote reads. */
  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 7);
  rmr = r.v->reg_mr(r.pd, remote, N, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  lmr = r.v->reg_mr(r.pd, local, N, IBV_ACCESS_LOCAL_WRITE);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_READ, local, 64, lmr->lkey, (uint64_t)(uintptr_t)remote, rmr->rkey, 1, 1, 0),
                   0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_REM_ACCESS_ERR);
  ck_assert_int_eq(r.v->dereg_mr(rmr), 0);
  ck_assert_int_eq(r.v->dereg_mr(lmr), 0);
  raw_close(&r);
  free(remote);
  free(local);
}
END_TEST

/* Receiver not ready: with rnr_retry 7 the write with immediate waits for a
 * receive as long as it takes; with 0 it fails after one RNR timer. A wrong
 * PSN is never accepted: the requester runs out of retries. */
START_TEST(test_raw_rnr_and_psn) {
  raw_t r;
  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 7);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE_WITH_IMM, NULL, 0, 0, 0, 0, 1, 1, 42), 0);
  struct ibv_wc wc;
  ck_assert(!raw_poll(&r, 0, &wc, 300)); /* waits: no receive posted */
  ck_assert_int_eq(raw_recv(&r, 1, NULL, 0, 0, 9), 0);
  ck_assert(raw_poll(&r, 1, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  ck_assert_int_eq(wc.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
  ck_assert(wc.wc_flags & IBV_WC_WITH_IMM);
  ck_assert_uint_eq(ntohl(wc.imm_data), 42);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_SUCCESS);
  raw_close(&r);

  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 0);
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE_WITH_IMM, NULL, 0, 0, 0, 0, 1, 1, 42), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_RNR_RETRY_EXC_ERR);
  raw_close(&r);

  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 101, 7); /* QP 1 expects PSN 101, QP 0 starts at 100 */
  uint64_t t0 = net_now_ms();
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, 1, 1, 0), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_RETRY_EXC_ERR);
  /* 8 tries of 4.096 us x 2^14 (NCCL_IB_TIMEOUT=14 in raw_rts): about 0.54 s. */
  ck_assert_uint_ge(net_now_ms() - t0, 400);
  raw_close(&r);

  /* A peer QP that is destroyed stops answering. */
  raw_open(&r, RAW_DEPTH);
  raw_connect(&r, 100, 7);
  ck_assert_int_eq(r.v->destroy_qp(r.qp[1]), 0);
  r.qp[1] = NULL;
  ck_assert_int_eq(raw_write(&r, IBV_WR_RDMA_WRITE, NULL, 0, 0, 0, 0, 1, 1, 0), 0);
  ck_assert(raw_poll(&r, 0, &wc, RAW_WAIT_MS));
  ck_assert_int_eq(wc.status, IBV_WC_RETRY_EXC_ERR);
  raw_close(&r);
}
END_TEST

/* ======================================================================== */
/* The plugin over the emulator. */

typedef struct {
  net_plugin_t plugin;
  ncclNet_v11_t* net;
  void* ctx;
} plug_t;

static void plug_up(plug_t* p) {
  net_test_env();
  ck_assert_int_eq(net_plugin_load(NULL, &p->plugin), 0);
  p->net = p->plugin.net;
  ck_assert_int_eq(p->net->init(&p->ctx, 1, NULL, NULL, NULL), ncclSuccess);
}

static void plug_down(plug_t* p) {
  ck_assert_int_eq(p->net->finalize(p->ctx), ncclSuccess);
  net_plugin_unload(&p->plugin);
}

typedef struct {
  void *send, *recv, *listen;
} pair_t;

static void pair_up(plug_t* p, int dev, pair_t* pr) {
  ck_assert_int_eq(net_connect_pair(p->net, p->ctx, dev, &pr->send, &pr->recv, &pr->listen), ncclSuccess);
}

static void pair_down(plug_t* p, pair_t* pr) {
  p->net->closeSend(pr->send);
  p->net->closeRecv(pr->recv);
  p->net->closeListen(pr->listen);
}

/* A stream of `msgs` messages with up to STREAM_WINDOW in flight each way,
 * driven from one thread as NCCL's proxy does. It stops when both sides
 * finished, or both failed, or one failed and the other stayed quiet for
 * STREAM_GRACE_MS, or at the test deadline. */
typedef struct {
  int received;        /* receives completed with the right bytes */
  int corrupt;         /* receives completed with wrong bytes */
  ncclResult_t send_err, recv_err;
  int deadline_hit;
} stream_t;

static size_t stream_size(uint64_t seed, int m, size_t max) {
  moe_rng_t r;
  moe_rng_init(&r, seed + (uint64_t)m * 7919);
  switch (moe_rng_below(&r, 4)) {
    case 0: return 0;
    case 1: return 1 + moe_rng_below(&r, 100);
    case 2: return max;
    default: return moe_rng_below(&r, (uint32_t)max);
  }
}

static void run_stream(ncclNet_v11_t* net, pair_t* pr, int msgs, size_t max, uint64_t seed, stream_t* out) {
  memset(out, 0, sizeof(*out));
  char *sbuf[STREAM_WINDOW], *rbuf[STREAM_WINDOW];
  void *smh[STREAM_WINDOW], *rmh[STREAM_WINDOW], *sreq[STREAM_WINDOW] = {0}, *rreq[STREAM_WINDOW] = {0};
  for (int i = 0; i < STREAM_WINDOW; i++) {
    sbuf[i] = malloc(max + 1);
    rbuf[i] = malloc(max + 1);
    smh[i] = net_reg(net, pr->send, sbuf[i], max + 1);
    rmh[i] = net_reg(net, pr->recv, rbuf[i], max + 1);
    ck_assert(smh[i] != NULL && rmh[i] != NULL);
  }
  int posted_r = 0, done_r = 0, posted_s = 0, done_s = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS, first_err = 0;
  while (done_r < msgs || done_s < msgs) {
    uint64_t now = net_now_ms();
    if (now > deadline) {
      out->deadline_hit = 1;
      break;
    }
    if (out->send_err != ncclSuccess && out->recv_err != ncclSuccess) break;
    if ((out->send_err != ncclSuccess || out->recv_err != ncclSuccess) && now - first_err > STREAM_GRACE_MS) break;
    if (out->recv_err == ncclSuccess) {
      if (posted_r < msgs && posted_r < done_r + STREAM_WINDOW) {
        int i = posted_r % STREAM_WINDOW;
        void* data[1] = {rbuf[i]};
        size_t cap[1] = {max};
        int tag[1] = {7};
        out->recv_err = net->irecv(pr->recv, 1, data, cap, tag, &rmh[i], NULL, &rreq[i]);
        if (out->recv_err == ncclSuccess && rreq[i] != NULL) posted_r++;
      }
      if (out->recv_err == ncclSuccess && done_r < posted_r) {
        int i = done_r % STREAM_WINDOW, done = 0, size = -1;
        out->recv_err = net->test(rreq[i], &done, &size);
        if (out->recv_err == ncclSuccess && done) {
          size_t want = stream_size(seed, done_r, max);
          if (size == (int)want && net_check(rbuf[i], want, seed + (uint64_t)done_r)) out->received++;
          else out->corrupt++;
          done_r++;
        }
      }
      if (out->recv_err != ncclSuccess && first_err == 0) first_err = net_now_ms();
    }
    if (out->send_err == ncclSuccess) {
      if (posted_s < msgs && posted_s < done_s + STREAM_WINDOW) {
        int i = posted_s % STREAM_WINDOW;
        size_t len = stream_size(seed, posted_s, max);
        if (sreq[i] == NULL) net_fill(sbuf[i], len, seed + (uint64_t)posted_s);
        void* req = NULL;
        out->send_err = net->isend(pr->send, sbuf[i], len, 7, smh[i], NULL, &req);
        if (out->send_err == ncclSuccess && req != NULL) {
          sreq[i] = req;
          posted_s++;
        }
      }
      if (out->send_err == ncclSuccess && done_s < posted_s) {
        int i = done_s % STREAM_WINDOW, done = 0;
        out->send_err = net->test(sreq[i], &done, NULL);
        if (out->send_err == ncclSuccess && done) {
          sreq[i] = NULL;
          done_s++;
        }
      }
      if (out->send_err != ncclSuccess && first_err == 0) first_err = net_now_ms();
    }
  }
  for (int i = 0; i < STREAM_WINDOW; i++) {
    net_dereg(net, pr->send, smh[i]);
    net_dereg(net, pr->recv, rmh[i]);
    free(sbuf[i]);
    free(rbuf[i]);
  }
}

START_TEST(test_delayed_completions_and_reordering) {
  /* Late completions, and four QPs per connection served in random order
   * with random holds: slower, never wrong. */
  setenv("VERBS_EMU_DELAY_US", "3000", 1);
  setenv("VERBS_EMU_REORDER", "1", 1);
  setenv("NCCL_IB_QPS_PER_CONNECTION", "4", 1);
  uint64_t seed = moe_test_seed();
  char sv[32];
  snprintf(sv, sizeof(sv), "%llu", (unsigned long long)seed);
  setenv("VERBS_EMU_SEED", sv, 1);
  plug_t p;
  plug_up(&p);
  pair_t pr;
  pair_up(&p, 0, &pr);
  stream_t st;
  run_stream(p.net, &pr, 120, 300000, seed, &st);
  ck_assert_msg(st.send_err == ncclSuccess && st.recv_err == ncclSuccess && !st.deadline_hit,
                "send %d recv %d deadline %d: %s", st.send_err, st.recv_err, st.deadline_hit,
                net_plugin_last_error(&p.plugin));
  ck_assert_int_eq(st.corrupt, 0);
  ck_assert_int_eq(st.received, 120);
  pair_down(&p, &pr);
  plug_down(&p);
}
END_TEST

/* The n-th request this process sends fails (a link error on its QP): the
 * error surfaces within the timeout, the keepalive carries it to the other
 * side, and every message that did complete is intact. */
START_TEST(test_qp_error_after_n_ops) {
  const char* after[] = {"1", "7", "60"};
  for (int k = 0; k < 3; k++) {
    setenv("VERBS_EMU_QP_ERROR_AFTER", after[k], 1);
    plug_t p;
    plug_up(&p);
    pair_t pr;
    pair_up(&p, 0, &pr);
    stream_t st;
    uint64_t t0 = net_now_ms();
    run_stream(p.net, &pr, 400, 20000, moe_test_seed() + (uint64_t)k, &st);
    ck_assert_msg(!st.deadline_hit, "after %s: a hang (%d received)", after[k], st.received);
    ck_assert_int_eq(st.corrupt, 0);
    ck_assert_msg(st.send_err != ncclSuccess && st.recv_err != ncclSuccess, "after %s: send %d recv %d", after[k],
                  st.send_err, st.recv_err);
    ck_assert_int_lt(st.received, 400);
    ck_assert_uint_lt(net_now_ms() - t0, NET_TEST_DEADLINE_MS);
    pair_down(&p, &pr);
    plug_down(&p);
  }
}
END_TEST

/* The device goes dark mid-stream (a pulled cable, a dead node): nothing is
 * sent or answered any more; both sides fail once their retries run out. */
START_TEST(test_lost_peer) {
  setenv("VERBS_EMU_LOSE_AFTER", "40", 1);
  plug_t p;
  plug_up(&p);
  pair_t pr;
  pair_up(&p, 0, &pr);
  stream_t st;
  run_stream(p.net, &pr, 400, 50000, moe_test_seed(), &st);
  ck_assert(!st.deadline_hit);
  ck_assert_int_eq(st.corrupt, 0);
  ck_assert_int_eq(st.send_err, ncclRemoteError);
  ck_assert_int_eq(st.recv_err, ncclRemoteError);
  ck_assert_msg(strstr(net_plugin_last_error(&p.plugin), "retry") != NULL, "%s", net_plugin_last_error(&p.plugin));
  pair_down(&p, &pr);
  plug_down(&p);
}
END_TEST

/* Verbs that fail report their own error code, not errno: the connector's
 * first ibv_modify_qp (to INIT) fails with EPROTO, the first post (the
 * receiver's clear-to-send) with EMSGSIZE. */
START_TEST(test_verb_errors_name_their_code) {
  struct {
    const char* fail;
    const char* text;
  } cases[] = {{"modify_qp:71:1", "Protocol error"}, {"post_send:90:1", "Message too long"}};
  for (int k = 0; k < 2; k++) {
    setenv("VERBS_EMU_FAIL", cases[k].fail, 1);
    plug_t p;
    plug_up(&p);
    char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
    void *listen = NULL, *send = NULL, *recv = NULL;
    ck_assert_int_eq(p.net->listen(p.ctx, 0, handle, &listen), ncclSuccess);
    ncclResult_t res = ncclSuccess;
    uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
    while (res == ncclSuccess && (send == NULL || recv == NULL) && net_now_ms() < deadline) {
      if (send == NULL) res = p.net->connect(p.ctx, 0, handle, &send, NULL);
      if (res == ncclSuccess && recv == NULL) res = p.net->accept(listen, &recv, NULL);
    }
    if (k == 1 && res == ncclSuccess) {
      /* The first post is the receiver's clear-to-send. */
      char buf[64];
      void* mh = net_reg(p.net, recv, buf, sizeof(buf));
      void* data[1] = {buf};
      size_t cap[1] = {sizeof(buf)};
      int tag[1] = {0};
      void* req = NULL;
      res = p.net->irecv(recv, 1, data, cap, tag, &mh, NULL, &req);
      net_dereg(p.net, recv, mh);
    }
    ck_assert_int_ne(res, ncclSuccess);
    ck_assert_msg(strstr(net_plugin_last_error(&p.plugin), cases[k].text) != NULL, "%s: %s", cases[k].fail,
                  net_plugin_last_error(&p.plugin));
    if (send != NULL) p.net->closeSend(send);
    if (recv != NULL) p.net->closeRecv(recv);
    p.net->closeListen(listen);
    plug_down(&p);
    unsetenv("VERBS_EMU_FAIL");
  }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* dma-buf: a memfd stands in for GPU memory. */

/* regMrDmaBuf of [data, data + size) where data sits `off` bytes into the fd. */
static ncclResult_t reg_dmabuf(plug_t* p, void* comm, char* base, size_t off, size_t size, int fd, void** mh) {
  return p->net->regMrDmaBuf(comm, base + off, size, NCCL_PTR_CUDA, off, fd, mh);
}

/* One message from `src` into the registered receive buffer rbuf. */
static void transfer(plug_t* p, pair_t* pr, char* src, void* smh, char* rbuf, void* rmh, size_t size, uint64_t seed) {
  net_fill(src, size, seed);
  void *sreq, *rreq;
  void* data[1] = {rbuf};
  size_t cap[1] = {size};
  int tag[1] = {3};
  ck_assert_int_eq(net_irecv(p->net, pr->recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
  ck_assert_int_eq(net_isend(p->net, pr->send, src, size, 3, smh, &sreq), ncclSuccess);
  ck_assert_int_eq(net_wait(p->net, sreq, NULL), ncclSuccess);
  ck_assert_msg(net_wait(p->net, rreq, NULL) == ncclSuccess, "%s", net_plugin_last_error(&p->plugin));
  ck_assert(net_check(rbuf, size, seed));
}

START_TEST(test_dmabuf_registration_is_page_aligned) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  int fd = memfd_create("moe-fake-gpu", MFD_CLOEXEC);
  ck_assert_int_ge(fd, 0);
  ck_assert_int_eq(ftruncate(fd, (off_t)(4 * page)), 0);
  char* base = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ck_assert(base != MAP_FAILED);
  memset(base, 0, 4 * page);
  void* emu = dlopen(getenv("NCCL_MOE_IBVERBS_LIBRARY"), RTLD_NOW | RTLD_NOLOAD);
  plug_t p;
  plug_up(&p);
  if (emu == NULL) emu = dlopen(getenv("NCCL_MOE_IBVERBS_LIBRARY"), RTLD_NOW | RTLD_NOLOAD);
  ck_assert_ptr_nonnull(emu);
  void (*last)(uint64_t*, uint64_t*, uint64_t*) = (void (*)(uint64_t*, uint64_t*, uint64_t*))dlsym(emu,
                                                                                                  "verbs_emu_last_dmabuf_reg");
  ck_assert_ptr_nonnull(last);
  ncclNetProperties_v11_t props;
  ck_assert_int_eq(p.net->getProperties(0, &props), ncclSuccess);
  ck_assert_int_eq(props.ptrSupport & NCCL_PTR_DMABUF, NCCL_PTR_DMABUF);
  pair_t pr;
  pair_up(&p, 0, &pr);
  /* An unaligned buffer: [base + 100, base + 5100). */
  void* mh = NULL;
  ck_assert_int_eq(reg_dmabuf(&p, pr.recv, base, 100, 5000, fd, &mh), ncclSuccess);
  uint64_t offset = 1, length = 1, iova = 1;
  last(&offset, &length, &iova);
  ck_assert_uint_eq(offset, 0);                         /* the fd's page start */
  ck_assert_uint_eq(length, 2 * page);                  /* whole pages */
  ck_assert_uint_eq(iova, (uint64_t)(uintptr_t)base);   /* the address aligned down */
  char* src = malloc(5000);
  void* smh = net_reg(p.net, pr.send, src, 5000);
  transfer(&p, &pr, src, smh, base + 100, mh, 5000, 11);
  /* A neighbour in the same pages shares that registration (the cache); the
   * NIC must be allowed to write there too. */
  void* mh2 = NULL;
  ck_assert_int_eq(reg_dmabuf(&p, pr.recv, base, 6000, 100, fd, &mh2), ncclSuccess);
  transfer(&p, &pr, src, smh, base + 6000, mh2, 100, 12);
  /* A buffer straddling into the third page gets its own registration. */
  void* mh3 = NULL;
  ck_assert_int_eq(reg_dmabuf(&p, pr.recv, base, 2 * page - 10, 3000, fd, &mh3), ncclSuccess);
  last(&offset, &length, &iova);
  ck_assert_uint_eq(offset, page);
  ck_assert_uint_eq(length, 2 * page);
  ck_assert_uint_eq(iova, (uint64_t)(uintptr_t)base + page);
  transfer(&p, &pr, src, smh, base + 2 * page - 10, mh3, 3000, 13);
  /* An offset that does not reach back to the page start cannot be aligned. */
  void* bad = NULL;
  ck_assert_int_eq(p.net->regMrDmaBuf(pr.recv, base + 3 * page + 100, 10, NCCL_PTR_CUDA, 50, fd, &bad),
                   ncclInvalidArgument);
  ck_assert_int_eq(p.net->deregMr(pr.recv, mh), ncclSuccess);
  ck_assert_int_eq(p.net->deregMr(pr.recv, mh2), ncclSuccess);
  ck_assert_int_eq(p.net->deregMr(pr.recv, mh3), ncclSuccess);
  net_dereg(p.net, pr.send, smh);
  free(src);
  pair_down(&p, &pr);
  plug_down(&p);
  munmap(base, 4 * page);
  close(fd);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Peers in two processes. */

enum { XP_MSGS = 60, XP_MAX = 200000, XP_KILL_AFTER = 10 };

/* The child: receives messages (exits with 0 when all were right, or kills
 * itself after `kill_after` of them). */
static int xp_child(int to_parent, int kill_after, uint64_t seed) {
  plug_t p;
  net_test_env();
  if (net_plugin_load(NULL, &p.plugin) != 0) return 10;
  p.net = p.plugin.net;
  if (p.net->init(&p.ctx, 2, NULL, NULL, NULL) != ncclSuccess) return 11;
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void *listen = NULL, *recv = NULL;
  if (p.net->listen(p.ctx, 0, handle, &listen) != ncclSuccess) return 12;
  if (write(to_parent, handle, sizeof(handle)) != (ssize_t)sizeof(handle)) return 13;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (recv == NULL) {
    if (p.net->accept(listen, &recv, NULL) != ncclSuccess || net_now_ms() > deadline) return 14;
  }
  char* buf = malloc(XP_MAX);
  void* mh = net_reg(p.net, recv, buf, XP_MAX);
  for (int m = 0; m < XP_MSGS; m++) {
    if (m == kill_after) raise(SIGKILL);
    void* data[1] = {buf};
    size_t cap[1] = {XP_MAX};
    int tag[1] = {m}, size = -1;
    void* req = NULL;
    if (net_irecv(p.net, recv, 1, data, cap, tag, &mh, &req) != ncclSuccess) return 15;
    if (net_wait(p.net, req, &size) != ncclSuccess) return 16;
    if (size != (int)stream_size(seed, m, XP_MAX) || !net_check(buf, (size_t)size, seed + (uint64_t)m)) return 17;
  }
  net_dereg(p.net, recv, mh);
  p.net->closeRecv(recv);
  p.net->closeListen(listen);
  p.net->finalize(p.ctx);
  return 0;
}

/* The parent: connects to the child and sends; returns the first error. */
static ncclResult_t xp_parent(int from_child, uint64_t seed, int* sent_p) {
  char handle[NCCL_NET_HANDLE_MAXSIZE];
  ck_assert_int_eq(read(from_child, handle, sizeof(handle)), (ssize_t)sizeof(handle));
  plug_t p;
  plug_up(&p);
  void* send = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (send == NULL) {
    ck_assert_int_eq(p.net->connect(p.ctx, 0, handle, &send, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  char* buf = malloc(XP_MAX);
  void* mh = net_reg(p.net, send, buf, XP_MAX);
  ncclResult_t res = ncclSuccess;
  *sent_p = 0;
  for (int m = 0; m < XP_MSGS && res == ncclSuccess; m++) {
    size_t size = stream_size(seed, m, XP_MAX);
    net_fill(buf, size, seed + (uint64_t)m);
    void* req = NULL;
    res = net_isend(p.net, send, buf, size, m, mh, &req);
    if (res == ncclSuccess) res = net_wait(p.net, req, NULL);
    if (res == ncclSuccess) (*sent_p)++;
  }
  net_dereg(p.net, send, mh);
  p.net->closeSend(send);
  plug_down(&p);
  free(buf);
  return res;
}

static void xp_run(int kill_after, int* child_status, ncclResult_t* parent_res, int* sent) {
  uint64_t seed = moe_test_seed();
  int fds[2];
  ck_assert_int_eq(pipe(fds), 0);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    _exit(xp_child(fds[1], kill_after, seed));
  }
  close(fds[1]);
  *parent_res = xp_parent(fds[0], seed, sent);
  close(fds[0]);
  ck_assert_int_eq(waitpid(pid, child_status, 0), pid);
}

START_TEST(test_two_processes) {
  int status = 0, sent = 0;
  ncclResult_t res;
  xp_run(-1, &status, &res, &sent);
  ck_assert_int_eq(res, ncclSuccess);
  ck_assert_int_eq(sent, XP_MSGS);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status 0x%x", status);
}
END_TEST

/* The receiving process dies (SIGKILL) mid-stream: the sender, waiting for a
 * clear-to-send that never comes, fails within its keepalive and retry
 * budget instead of waiting forever. */
START_TEST(test_peer_process_killed) {
  int status = 0, sent = 0;
  ncclResult_t res;
  uint64_t t0 = net_now_ms();
  xp_run(XP_KILL_AFTER, &status, &res, &sent);
  ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  ck_assert_int_eq(res, ncclRemoteError);
  ck_assert_int_le(sent, XP_KILL_AFTER + 1);
  ck_assert_uint_lt(net_now_ms() - t0, NET_TEST_DEADLINE_MS);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Device selection and RoCE. */

static int ndevs_with(const char* hca, char names[][16]) {
  if (hca != NULL) setenv("NCCL_IB_HCA", hca, 1);
  else unsetenv("NCCL_IB_HCA");
  setenv("NCCL_MOE_NET_BACKEND", "auto", 1);
  plug_t p;
  net_test_env();
  ck_assert_int_eq(net_plugin_load(NULL, &p.plugin), 0);
  p.net = p.plugin.net;
  ck_assert_int_eq(p.net->init(&p.ctx, 1, NULL, NULL, NULL), ncclSuccess);
  int n = 0;
  ck_assert_int_eq(p.net->devices(&n), ncclSuccess);
  for (int d = 0; d < n; d++) {
    ncclNetProperties_v11_t props;
    ck_assert_int_eq(p.net->getProperties(d, &props), ncclSuccess);
    snprintf(names[d], 16, "%s", props.name);
  }
  plug_down(&p);
  return n;
}

/* NCCL_IB_HCA as NCCL reads it: prefixes, '=' exact, '^' exclude, ':port'
 * (and ':rail:plane' accepted); nothing selected: auto uses sockets. */
START_TEST(test_hca_selection) {
  setenv("VERBS_EMU_DEVICES", "2", 1);
  char names[4][16];
  ck_assert_int_eq(ndevs_with(NULL, names), 2);
  ck_assert_str_eq(names[0], "emu0");
  ck_assert_str_eq(names[1], "emu1");
  ck_assert_int_eq(ndevs_with("emu", names), 2);
  ck_assert_int_eq(ndevs_with("=emu1", names), 1);
  ck_assert_str_eq(names[0], "emu1");
  ck_assert_int_eq(ndevs_with("^emu0", names), 1);
  ck_assert_str_eq(names[0], "emu1");
  ck_assert_int_eq(ndevs_with("^=emu", names), 2);  /* exact: "emu" is no device */
  ck_assert_int_eq(ndevs_with("=emu", names), 1);   /* nothing: the socket backend */
  ck_assert_str_eq(names[0], "lo");
  ck_assert_int_eq(ndevs_with("emu0:1,emu1:2", names), 1);
  ck_assert_str_eq(names[0], "emu0");
  ck_assert_int_eq(ndevs_with("emu1:1:0:0", names), 1); /* rail and plane fields */
  ck_assert_str_eq(names[0], "emu1");
  ck_assert_int_eq(ndevs_with("emu0:", names), 1);      /* empty port: any */
  ck_assert_str_eq(names[0], "emu0");
  ck_assert_int_eq(ndevs_with("^", names), 1);          /* exclude everything, as NCCL */
  ck_assert_str_eq(names[0], "lo");
  /* Traffic over the second device. */
  setenv("NCCL_MOE_NET_BACKEND", "ib", 1);
  unsetenv("NCCL_IB_HCA");
  plug_t p;
  plug_up(&p);
  pair_t pr;
  pair_up(&p, 1, &pr);
  stream_t st;
  run_stream(p.net, &pr, 20, 100000, moe_test_seed(), &st);
  ck_assert(st.send_err == ncclSuccess && st.recv_err == ncclSuccess && st.received == 20);
  pair_down(&p, &pr);
  plug_down(&p);
}
END_TEST

/* A RoCE port: no LIDs, GIDs chosen by NCCL's rules from the verbs GID
 * table (no sysfs here), every packet addressed by GID. */
START_TEST(test_roce_port) {
  setenv("VERBS_EMU_LINK", "eth", 1);
  const char* index[] = {NULL, "0", "2"};
  const char* version[] = {NULL, "2", "1"};
  for (int k = 0; k < 3; k++) {
    if (index[k] != NULL) setenv("NCCL_IB_GID_INDEX", index[k], 1);
    else unsetenv("NCCL_IB_GID_INDEX");
    if (version[k] != NULL) setenv("NCCL_IB_ROCE_VERSION_NUM", version[k], 1);
    plug_t p;
    plug_up(&p);
    pair_t pr;
    pair_up(&p, 0, &pr);
    stream_t st;
    run_stream(p.net, &pr, 30, 200000, moe_test_seed() + (uint64_t)k, &st);
    ck_assert_msg(st.send_err == ncclSuccess && st.recv_err == ncclSuccess && st.received == 30, "case %d: %s", k,
                  net_plugin_last_error(&p.plugin));
    pair_down(&p, &pr);
    plug_down(&p);
  }
  /* An index with no GID: no usable port; forced ib says why. */
  setenv("NCCL_IB_GID_INDEX", "9", 1);
  plug_t p;
  net_test_env();
  ck_assert_int_eq(net_plugin_load(NULL, &p.plugin), 0);
  void* ctx = NULL;
  ck_assert_int_ne(p.plugin.net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
  p.plugin.net->finalize(ctx);
  net_plugin_unload(&p.plugin);
}
END_TEST

static void add(Suite* s, const char* name, const TTest* t, int timeout) {
  TCase* tc = tcase_create(name);
  tcase_set_timeout(tc, timeout);
  _tcase_add_test(tc, t, 0, 0, 0, 1);
  suite_add_tcase(s, tc);
}

int main(void) {
  if (getenv("NCCL_MOE_IBVERBS_LIBRARY") == NULL) {
    fprintf(stderr, "test_net_ib_emu: NCCL_MOE_IBVERBS_LIBRARY (the verbs emulator) is not set; skipping\n");
    return MOE_TEST_SKIP;
  }
  moe_test_seed();
  net_test_env();
  Suite* s = suite_create("net_ib_emu");
  add(s, "raw_state_machine", test_raw_state_machine, 60);
  add(s, "raw_access_errors", test_raw_access_errors, 60);
  add(s, "raw_send_queue", test_raw_send_queue_accounting, 60);
  add(s, "raw_read_send", test_raw_read_send_and_length_errors, 60);
  add(s, "raw_rnr_psn", test_raw_rnr_and_psn, 60);
  add(s, "delay_reorder", test_delayed_completions_and_reordering, 120);
  add(s, "qp_error_after", test_qp_error_after_n_ops, 120);
  add(s, "lost_peer", test_lost_peer, 120);
  add(s, "verb_errors", test_verb_errors_name_their_code, 60);
  add(s, "dmabuf", test_dmabuf_registration_is_page_aligned, 60);
  add(s, "two_processes", test_two_processes, 120);
  add(s, "peer_killed", test_peer_process_killed, 120);
  add(s, "hca_selection", test_hca_selection, 120);
  add(s, "roce", test_roce_port, 120);
  return moe_test_run(s);
}
