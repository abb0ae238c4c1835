/* SPDX-License-Identifier: Apache-2.0 */
/* RC queue pairs of the verbs emulator: creation (which allocates the QP
 * number machine-wide by binding its socket name), the state machine with the
 * attribute checks an HCA makes, posting, and completions (in order per
 * queue; errors and flushes always complete, signaled or not). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "emu.h"

#define EMU_EXPORT __attribute__((visibility("default")))
#define EMU_24BIT 0xffffffu
#define EMU_QPN_TRIES 256

emu_qp_t* emu_qp_by_num(uint32_t qpn) {
  for (emu_qp_t* q = emu.qps; q != NULL; q = q->next)
    if (q->qp.qp_num == qpn) return q;
  return NULL;
}

/* Local ACK timeout: 4.096 us x 2^timeout, tried retry_cnt + 1 times;
 * timeout 0 means wait forever (IB spec). */
uint64_t emu_qp_retry_budget_ns(const emu_qp_t* q) {
  if (q->timeout == 0) return UINT64_MAX;
  return 4096ull * (1ull << q->timeout) * (uint64_t)(q->retry_cnt + 1);
}

/* The IB spec's RNR NAK timer codes, in ns (code 0 is 655.36 ms). */
uint64_t emu_rnr_timer_ns(int code) {
  static const uint32_t us100[32] = {65536, 1,   2,   3,   4,   6,   8,    12,   16,   24,   32,
                                     48,    64,  96,  128, 192, 256, 384,  512,  768,  1024, 1536,
                                     2048,  3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152};
  return (uint64_t)us100[code & 31] * 10000ull; /* units of 10 us */
}

static int emu_bind_qpn(emu_qp_t* q) {
  for (int t = 0; t < EMU_QPN_TRIES; t++) {
    uint32_t qpn = (uint32_t)(emu_random() & EMU_24BIT);
    if (qpn < 2) continue; /* QP0 and QP1 are special */
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int len = emu_listen_name(a.sun_path, sizeof(a.sun_path), qpn);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno;
    if (bind(fd, (struct sockaddr*)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)len)) == 0 &&
        listen(fd, 16) == 0) {
      q->listen_fd = fd;
      q->qp.qp_num = qpn;
      return 0;
    }
    int err = errno;
    close(fd);
    if (err != EADDRINUSE) return err;
  }
  return EAGAIN;
}

EMU_EXPORT struct ibv_qp* ibv_create_qp(struct ibv_pd* pd, struct ibv_qp_init_attr* attr) {
  emu_ctx_t* c = (emu_ctx_t*)pd->context;
  struct ibv_qp_cap* cap = &attr->cap;
  int err = 0;
  if (attr->qp_type != IBV_QPT_RC) {
    errno = EOPNOTSUPP;
    return NULL;
  }
  if (attr->send_cq == NULL || attr->recv_cq == NULL || attr->srq != NULL || attr->send_cq->context != pd->context ||
      attr->recv_cq->context != pd->context || cap->max_send_wr < 1 || cap->max_send_wr > EMU_MAX_QP_WR ||
      cap->max_recv_wr > EMU_MAX_QP_WR || cap->max_send_sge > EMU_MAX_SGE || cap->max_recv_sge > EMU_MAX_SGE ||
      cap->max_inline_data > EMU_MAX_INLINE) {
    errno = EINVAL;
    return NULL;
  }
  pthread_mutex_lock(&emu.lock);
  if (emu_fail_now("create_qp", &err)) {
    pthread_mutex_unlock(&emu.lock);
    errno = err;
    return NULL;
  }
  emu_qp_t* q = calloc(1, sizeof(*q));
  if (q != NULL) {
    q->sq = calloc(cap->max_send_wr, sizeof(*q->sq));
    q->rq = calloc(cap->max_recv_wr > 0 ? cap->max_recv_wr : 1, sizeof(*q->rq));
  }
  if (q == NULL || q->sq == NULL || q->rq == NULL) {
    if (q != NULL) {
      free(q->sq);
      free(q->rq);
      free(q);
    }
    pthread_mutex_unlock(&emu.lock);
    errno = ENOMEM;
    return NULL;
  }
  q->ectx = c;
  q->listen_fd = -1;
  emu_conn_init(&q->out);
  emu_conn_init(&q->in);
  for (int i = 0; i < EMU_PENDING_CONNS; i++) emu_conn_init(&q->pending[i]);
  if ((err = emu_bind_qpn(q)) != 0) {
    free(q->sq);
    free(q->rq);
    free(q);
    pthread_mutex_unlock(&emu.lock);
    errno = err;
    return NULL;
  }
  q->qp.context = pd->context;
  q->qp.qp_context = attr->qp_context;
  q->qp.pd = pd;
  q->qp.send_cq = attr->send_cq;
  q->qp.recv_cq = attr->recv_cq;
  q->qp.state = IBV_QPS_RESET;
  q->qp.qp_type = IBV_QPT_RC;
  pthread_mutex_init(&q->qp.mutex, NULL);
  pthread_cond_init(&q->qp.cond, NULL);
  q->cap = *cap;
  if (q->cap.max_recv_sge == 0) q->cap.max_recv_sge = 1;
  q->remote_dev = -1;
  q->fail_seq = UINT64_MAX;
  ((emu_cq_t*)attr->send_cq)->refs++;
  ((emu_cq_t*)attr->recv_cq)->refs++;
  ((emu_pd_t*)pd)->refs++;
  q->next = emu.qps;
  emu.qps = q;
  pthread_mutex_unlock(&emu.lock);
  return &q->qp;
}

static void emu_flush_all(emu_qp_t* q) {
  while (q->sq_done < q->sq_posted) emu_sq_complete(q, IBV_WC_WR_FLUSH_ERR);
  q->sq_tx = q->sq_done;
  emu_rwr_t wr;
  while (emu_rq_take(q, &wr)) emu_rq_complete(q, &wr, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0);
}

/* Caller holds the lock. The QP stops talking: its streams close (a peer's
 * outstanding requests then time out, as when an HCA stops answering). */
void emu_qp_to_error(emu_qp_t* q) {
  if (q->qp.state == IBV_QPS_ERR) return;
  q->qp.state = IBV_QPS_ERR;
  emu_conn_close(&q->out);
  if (!q->in.close_after_rsp) emu_conn_close(&q->in); /* else a NAK still goes out first */
  for (int i = 0; i < EMU_PENDING_CONNS; i++) emu_conn_close(&q->pending[i]);
  emu_flush_all(q);
}

static void emu_qp_reset(emu_qp_t* q) {
  emu_conn_close(&q->out);
  emu_conn_close(&q->in);
  for (int i = 0; i < EMU_PENDING_CONNS; i++) emu_conn_close(&q->pending[i]);
  for (uint64_t s = q->sq_done; s < q->sq_posted; s++) free(q->sq[s % q->cap.max_send_wr].inline_data);
  q->sq_posted = q->sq_tx = q->sq_done = q->sq_retired = 0;
  q->rq_head = q->rq_count = 0;
  q->reads_out = 0;
  q->rnr_wait = 0;
  q->fail_seq = UINT64_MAX;
  q->remote_dev = -1;
  q->qp.state = IBV_QPS_RESET;
}

/* The device an address vector points at (-1: nobody there). */
static int emu_resolve(const emu_qp_t* q, const struct ibv_ah_attr* ah) {
  for (int d = 0; d < emu.ndevs; d++) {
    const emu_dev_t* dev = &emu.devs[d];
    if (ah->is_global) {
      for (int g = 0; g < dev->ngids; g++)
        if (memcmp(dev->gids[g].raw, ah->grh.dgid.raw, 16) == 0) return d;
    } else if (!dev->eth && dev->lid == ah->dlid) {
      return d;
    }
  }
  (void)q;
  return -1;
}

static int emu_check_av(const emu_qp_t* q, int port, const struct ibv_ah_attr* ah) {
  const emu_dev_t* dev = q->ectx->dev;
  if (ah->port_num != port) return 0;
  if (dev->eth) {
    /* RoCE has no LIDs: every packet carries a GRH with a valid source GID. */
    static const uint8_t zero[16];
    return ah->is_global && ah->grh.sgid_index < dev->ngids && memcmp(ah->grh.dgid.raw, zero, 16) != 0;
  }
  if (ah->dlid == 0) return 0;
  return !ah->is_global || ah->grh.sgid_index < dev->ngids;
}

/* Required and optional attributes of each RC transition (the kernel's
 * qp_state_table). */
static int emu_transition_masks(int cur, int next, int* req_p, int* opt_p) {
  *req_p = IBV_QP_STATE;
  *opt_p = 0;
  if (next == IBV_QPS_RESET || next == IBV_QPS_ERR) return 1;
  if (cur == IBV_QPS_RESET && next == IBV_QPS_INIT) {
    *req_p |= IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
    return 1;
  }
  if (cur == IBV_QPS_INIT && next == IBV_QPS_INIT) {
    *opt_p = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
    return 1;
  }
  if (cur == IBV_QPS_INIT && next == IBV_QPS_RTR) {
    *req_p |= IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
              IBV_QP_MIN_RNR_TIMER;
    *opt_p = IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX;
    return 1;
  }
  if (cur == IBV_QPS_RTR && next == IBV_QPS_RTS) {
    *req_p |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
    *opt_p = IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER | IBV_QP_PATH_MIG_STATE;
    return 1;
  }
  if (cur == IBV_QPS_RTS && next == IBV_QPS_RTS) {
    *opt_p = IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE | IBV_QP_MIN_RNR_TIMER;
    return 1;
  }
  return 0;
}

static int emu_modify_locked(emu_qp_t* q, struct ibv_qp_attr* a, int mask) {
  int cur = q->qp.state;
  int next = (mask & IBV_QP_STATE) ? (int)a->qp_state : cur;
  if ((mask & IBV_QP_CUR_STATE) && (int)a->cur_qp_state != cur) return EINVAL;
  int req, opt;
  if (!emu_transition_masks(cur, next, &req, &opt)) return EINVAL;
  if (!(mask & IBV_QP_STATE)) req &= ~IBV_QP_STATE;
  if ((mask & req) != req || (mask & ~(req | opt | IBV_QP_STATE)) != 0) return EINVAL;
  struct ibv_port_attr pattr;
  memset(&pattr, 0, sizeof(pattr));
  /* Values, all checked before anything changes. */
  if ((mask & IBV_QP_PORT) && (a->port_num < 1 || a->port_num > EMU_PORTS)) return EINVAL;
  if ((mask & IBV_QP_PKEY_INDEX) && a->pkey_index != 0) return EINVAL;
  if ((mask & IBV_QP_ACCESS_FLAGS) &&
      (a->qp_access_flags & ~(IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC)) != 0)
    return EINVAL;
  const int active_mtu = q->ectx->dev->eth ? IBV_MTU_1024 : IBV_MTU_4096;
  if ((mask & IBV_QP_PATH_MTU) && (a->path_mtu < IBV_MTU_256 || (int)a->path_mtu > active_mtu)) return EINVAL;
  if ((mask & IBV_QP_DEST_QPN) && (a->dest_qp_num > EMU_24BIT || a->dest_qp_num < 2)) return EINVAL;
  if ((mask & IBV_QP_RQ_PSN) && a->rq_psn > EMU_24BIT) return EINVAL;
  if ((mask & IBV_QP_SQ_PSN) && a->sq_psn > EMU_24BIT) return EINVAL;
  if ((mask & IBV_QP_MAX_DEST_RD_ATOMIC) && a->max_dest_rd_atomic > EMU_MAX_RD_ATOM) return EINVAL;
  if ((mask & IBV_QP_MAX_QP_RD_ATOMIC) && a->max_rd_atomic > EMU_MAX_RD_ATOM) return EINVAL;
  if ((mask & IBV_QP_TIMEOUT) && a->timeout > 31) return EINVAL;
  if ((mask & IBV_QP_RETRY_CNT) && a->retry_cnt > 7) return EINVAL;
  if ((mask & IBV_QP_RNR_RETRY) && a->rnr_retry > 7) return EINVAL;
  if ((mask & IBV_QP_MIN_RNR_TIMER) && a->min_rnr_timer > 31) return EINVAL;
  if ((mask & IBV_QP_AV) && !emu_check_av(q, (mask & IBV_QP_PORT) ? a->port_num : q->port, &a->ah_attr)) return EINVAL;

  if (mask & IBV_QP_PORT) q->port = a->port_num;
  if (mask & IBV_QP_PKEY_INDEX) q->pkey_index = a->pkey_index;
  if (mask & IBV_QP_ACCESS_FLAGS) q->access = (int)a->qp_access_flags;
  if (mask & IBV_QP_PATH_MTU) q->path_mtu = a->path_mtu;
  if (mask & IBV_QP_DEST_QPN) q->dest_qpn = a->dest_qp_num;
  if (mask & IBV_QP_RQ_PSN) q->rq_psn = q->expect_psn = a->rq_psn;
  if (mask & IBV_QP_SQ_PSN) q->sq_psn = q->next_psn = a->sq_psn;
  if (mask & IBV_QP_MAX_DEST_RD_ATOMIC) q->max_dest_rd_atomic = a->max_dest_rd_atomic;
  if (mask & IBV_QP_MAX_QP_RD_ATOMIC) q->max_rd_atomic = a->max_rd_atomic;
  if (mask & IBV_QP_TIMEOUT) q->timeout = a->timeout;
  if (mask & IBV_QP_RETRY_CNT) q->retry_cnt = a->retry_cnt;
  if (mask & IBV_QP_RNR_RETRY) q->rnr_retry = a->rnr_retry;
  if (mask & IBV_QP_MIN_RNR_TIMER) q->min_rnr_timer = a->min_rnr_timer;
  if (mask & IBV_QP_AV) {
    q->ah = a->ah_attr;
    q->remote_dev = emu_resolve(q, &a->ah_attr);
  }
  if (next == IBV_QPS_RESET) emu_qp_reset(q);
  else if (next == IBV_QPS_ERR) emu_qp_to_error(q);
  else q->qp.state = (enum ibv_qp_state)next;
  if (next == IBV_QPS_RTS && cur != IBV_QPS_RTS) q->progress_ns = emu_now_ns();
  emu_wake();
  return 0;
}

/* Returns the error code (rdma-core's providers do; errno is not set). */
EMU_EXPORT int ibv_modify_qp(struct ibv_qp* qp, struct ibv_qp_attr* attr, int attr_mask) {
  emu_qp_t* q = (emu_qp_t*)qp;
  int err = 0;
  pthread_mutex_lock(&emu.lock);
  if (!emu_fail_now("modify_qp", &err)) err = emu_modify_locked(q, attr, attr_mask);
  pthread_mutex_unlock(&emu.lock);
  return err;
}

EMU_EXPORT int ibv_query_qp(struct ibv_qp* qp, struct ibv_qp_attr* attr, int attr_mask, struct ibv_qp_init_attr* init) {
  emu_qp_t* q = (emu_qp_t*)qp;
  (void)attr_mask;
  pthread_mutex_lock(&emu.lock);
  memset(attr, 0, sizeof(*attr));
  attr->qp_state = attr->cur_qp_state = q->qp.state;
  attr->path_mtu = (enum ibv_mtu)q->path_mtu;
  attr->dest_qp_num = q->dest_qpn;
  attr->rq_psn = q->rq_psn;
  attr->sq_psn = q->sq_psn;
  attr->qp_access_flags = (unsigned)q->access;
  attr->ah_attr = q->ah;
  attr->port_num = (uint8_t)q->port;
  attr->timeout = (uint8_t)q->timeout;
  attr->retry_cnt = (uint8_t)q->retry_cnt;
  attr->rnr_retry = (uint8_t)q->rnr_retry;
  attr->min_rnr_timer = (uint8_t)q->min_rnr_timer;
  attr->max_rd_atomic = (uint8_t)q->max_rd_atomic;
  attr->max_dest_rd_atomic = (uint8_t)q->max_dest_rd_atomic;
  attr->cap = q->cap;
  if (init != NULL) {
    memset(init, 0, sizeof(*init));
    init->send_cq = q->qp.send_cq;
    init->recv_cq = q->qp.recv_cq;
    init->cap = q->cap;
    init->qp_type = IBV_QPT_RC;
  }
  pthread_mutex_unlock(&emu.lock);
  return 0;
}

/* The engine frees destroyed QPs (it may be polling their sockets now). */
EMU_EXPORT int ibv_destroy_qp(struct ibv_qp* qp) {
  emu_qp_t* q = (emu_qp_t*)qp;
  pthread_mutex_lock(&emu.lock);
  emu_qp_t** link = &emu.qps;
  while (*link != NULL && *link != q) link = &(*link)->next;
  if (*link == NULL) {
    pthread_mutex_unlock(&emu.lock);
    return EINVAL;
  }
  *link = q->next;
  q->destroyed = 1;
  ((emu_cq_t*)qp->send_cq)->refs--;
  ((emu_cq_t*)qp->recv_cq)->refs--;
  ((emu_pd_t*)qp->pd)->refs--;
  q->next = emu.zombies;
  emu.zombies = q;
  if (!emu.engine_running) {
    emu.zombies = q->next;
    emu_qp_free(q);
  } else {
    emu_wake();
  }
  pthread_mutex_unlock(&emu.lock);
  return 0;
}

void emu_qp_free(emu_qp_t* q) {
  emu_conn_close(&q->out);
  emu_conn_close(&q->in);
  for (int i = 0; i < EMU_PENDING_CONNS; i++) emu_conn_close(&q->pending[i]);
  if (q->listen_fd >= 0) close(q->listen_fd);
  for (uint64_t s = q->sq_done; s < q->sq_posted; s++) free(q->sq[s % q->cap.max_send_wr].inline_data);
  pthread_mutex_destroy(&q->qp.mutex);
  pthread_cond_destroy(&q->qp.cond);
  free(q->sq);
  free(q->rq);
  free(q);
}

/* ------------------------------------------------------------------------ */
/* Completions. Caller holds the lock. */

static enum ibv_wc_opcode emu_wc_opcode(int wr_opcode) {
  switch (wr_opcode) {
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
    case IBV_WR_RDMA_READ: return IBV_WC_RDMA_READ;
    default: return IBV_WC_SEND;
  }
}

void emu_sq_complete(emu_qp_t* q, enum ibv_wc_status status) {
  emu_swr_t* w = &q->sq[q->sq_done % q->cap.max_send_wr];
  if (w->opcode == IBV_WR_RDMA_READ && q->sq_done < q->sq_tx && q->reads_out > 0) q->reads_out--;
  if (status != IBV_WC_SUCCESS || (w->flags & IBV_SEND_SIGNALED)) {
    emu_cqe_t e = {.qpn = q->qp.qp_num, .is_send = 1, .sq_seq = w->seq};
    e.wc.wr_id = w->wr_id;
    e.wc.status = status;
    e.wc.opcode = emu_wc_opcode(w->opcode);
    e.wc.qp_num = q->qp.qp_num;
    e.wc.byte_len = w->opcode == IBV_WR_RDMA_READ ? w->len : 0;
    if (status != IBV_WC_SUCCESS && status != IBV_WC_WR_FLUSH_ERR) e.wc.vendor_err = 0x81;
    emu_cq_push((emu_cq_t*)q->qp.send_cq, &e, &q->ectx->faults);
  }
  free(w->inline_data);
  w->inline_data = NULL;
  q->sq_done++;
  if (q->sq_tx < q->sq_done) q->sq_tx = q->sq_done;
}

int emu_rq_take(emu_qp_t* q, emu_rwr_t* wr_p) {
  if (q->rq_count == 0) return 0;
  *wr_p = q->rq[q->rq_head];
  q->rq_head = (q->rq_head + 1) % (int)q->cap.max_recv_wr;
  q->rq_count--;
  return 1;
}

void emu_rq_complete(emu_qp_t* q, const emu_rwr_t* wr, enum ibv_wc_status status, int opcode, uint32_t len,
                     uint32_t imm, int with_imm) {
  emu_cqe_t e = {.qpn = q->qp.qp_num};
  e.wc.wr_id = wr->wr_id;
  e.wc.status = status;
  e.wc.opcode = (enum ibv_wc_opcode)opcode;
  e.wc.byte_len = len;
  e.wc.qp_num = q->qp.qp_num;
  e.wc.src_qp = q->dest_qpn;
  e.wc.slid = q->ah.dlid;
  if (with_imm) {
    e.wc.wc_flags = IBV_WC_WITH_IMM;
    e.wc.imm_data = imm;
  }
  emu_cq_push((emu_cq_t*)q->qp.recv_cq, &e, &q->ectx->faults);
}

/* ------------------------------------------------------------------------ */
/* Posting. Errors are returned (with *bad_wr), never put in errno. */

static int emu_sge_total(const struct ibv_sge* sg, int n, uint32_t* len_p) {
  uint64_t total = 0;
  for (int i = 0; i < n; i++) total += sg[i].length;
  if (total > EMU_MAX_MSG) return 0;
  *len_p = (uint32_t)total;
  return 1;
}

static int emu_post_one_send(emu_qp_t* q, const struct ibv_send_wr* wr) {
  switch (wr->opcode) {
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM:
    case IBV_WR_SEND:
    case IBV_WR_SEND_WITH_IMM:
    case IBV_WR_RDMA_READ: break;
    default: return EINVAL;
  }
  if (wr->num_sge < 0 || wr->num_sge > (int)q->cap.max_send_sge || (wr->num_sge > 0 && wr->sg_list == NULL))
    return EINVAL;
  if (q->sq_posted - q->sq_retired >= q->cap.max_send_wr) return ENOMEM;
  uint32_t len = 0;
  if (!emu_sge_total(wr->sg_list, wr->num_sge, &len)) return EINVAL;
  int inl = (wr->send_flags & IBV_SEND_INLINE) != 0 && wr->opcode != IBV_WR_RDMA_READ;
  if (inl && len > q->cap.max_inline_data) return EINVAL;
  emu_swr_t* w = &q->sq[q->sq_posted % q->cap.max_send_wr];
  memset(w, 0, sizeof(*w));
  w->wr_id = wr->wr_id;
  w->opcode = wr->opcode;
  w->flags = wr->send_flags;
  w->imm = wr->imm_data;
  if (wr->opcode == IBV_WR_RDMA_WRITE || wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ||
      wr->opcode == IBV_WR_RDMA_READ) {
    w->raddr = wr->wr.rdma.remote_addr;
    w->rkey = wr->wr.rdma.rkey;
  }
  w->nsge = wr->num_sge;
  for (int i = 0; i < wr->num_sge; i++)
    w->sge[i] = (emu_sge_t){.addr = wr->sg_list[i].addr, .length = wr->sg_list[i].length, .lkey = wr->sg_list[i].lkey};
  w->len = len;
  if (inl && len > 0) {
    w->inline_data = malloc(len);
    if (w->inline_data == NULL) return ENOMEM;
    uint32_t off = 0;
    for (int i = 0; i < wr->num_sge; i++) {
      memcpy(w->inline_data + off, (const void*)(uintptr_t)wr->sg_list[i].addr, wr->sg_list[i].length);
      off += wr->sg_list[i].length;
    }
  }
  w->seq = q->sq_posted++;
  return 0;
}

int emu_post_send(struct ibv_qp* qp, struct ibv_send_wr* wr, struct ibv_send_wr** bad_wr) {
  emu_qp_t* q = (emu_qp_t*)qp;
  int err = 0;
  pthread_mutex_lock(&emu.lock);
  if (emu_fail_now("post_send", &err)) {
    *bad_wr = wr;
  } else if (q->qp.state != IBV_QPS_RTS && q->qp.state != IBV_QPS_ERR) {
    err = EINVAL;
    *bad_wr = wr;
  } else {
    if (q->sq_done == q->sq_posted) q->progress_ns = emu_now_ns(); /* the retry timer starts with the work */
    for (; wr != NULL; wr = wr->next) {
      if ((err = emu_post_one_send(q, wr)) != 0) {
        *bad_wr = wr;
        break;
      }
    }
    if (q->qp.state == IBV_QPS_ERR) emu_flush_all(q); /* an HCA flushes work posted in error at once */
    emu_wake();
  }
  pthread_mutex_unlock(&emu.lock);
  return err;
}

int emu_post_recv(struct ibv_qp* qp, struct ibv_recv_wr* wr, struct ibv_recv_wr** bad_wr) {
  emu_qp_t* q = (emu_qp_t*)qp;
  int err = 0;
  pthread_mutex_lock(&emu.lock);
  if (emu_fail_now("post_recv", &err)) {
    *bad_wr = wr;
  } else if (q->qp.state == IBV_QPS_RESET) {
    err = EINVAL;
    *bad_wr = wr;
  } else {
    for (; wr != NULL; wr = wr->next) {
      uint32_t len = 0;
      if (wr->num_sge < 0 || wr->num_sge > (int)q->cap.max_recv_sge || (wr->num_sge > 0 && wr->sg_list == NULL) ||
          !emu_sge_total(wr->sg_list, wr->num_sge, &len)) {
        err = EINVAL;
      } else if (q->rq_count == (int)q->cap.max_recv_wr) {
        err = ENOMEM;
      }
      if (err != 0) {
        *bad_wr = wr;
        break;
      }
      emu_rwr_t* r = &q->rq[(q->rq_head + q->rq_count++) % (int)q->cap.max_recv_wr];
      r->wr_id = wr->wr_id;
      r->nsge = wr->num_sge;
      for (int i = 0; i < wr->num_sge; i++)
        r->sge[i] = (emu_sge_t){.addr = wr->sg_list[i].addr, .length = wr->sg_list[i].length, .lkey = wr->sg_list[i].lkey};
    }
    if (q->qp.state == IBV_QPS_ERR) emu_flush_all(q);
    emu_wake();
  }
  pthread_mutex_unlock(&emu.lock);
  return err;
}
