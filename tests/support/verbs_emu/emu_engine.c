/* SPDX-License-Identifier: Apache-2.0 */
/* The engine thread of the verbs emulator: the "HCA" of this process.
 *
 * It owns every socket. Each iteration (under the lock): free destroyed QPs,
 * run each QP's timers, accept and identify incoming streams, send requests
 * (requester) and responses (responder), receive both, and write
 * completions. Then it polls, without the lock, the sockets that can make
 * progress and an eventfd that posting threads poke.
 *
 * Per QP the wire is two byte streams: the one it connected (it sends
 * requests, reads responses) and the one its peer connected (it reads
 * requests, sends responses). Requests are executed in PSN order, one after
 * the other, and every request is answered in order, so completions are in
 * order per QP as on RC. Nothing orders different QPs. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "emu.h"

#define EMU_MAX_POLL_MS 100
#define EMU_CONNECT_RETRY_NS 1000000ull
#define EMU_HOLD_MAX_NS 2000000ull /* VERBS_EMU_REORDER: longest hold of a QP */
#define EMU_24BIT 0xffffffu
/* Bytes one QP may move per engine pass, so one large transfer does not
 * hold the lock (and every other QP) for its whole length. */
#define EMU_STEP_BYTES (4u << 20)

/* PSN a <= b in 24-bit serial arithmetic. */
static int emu_psn_le(uint32_t a, uint32_t b) { return ((b - a) & EMU_24BIT) < (1u << 23); }

int emu_listen_name(char* buf, size_t len, uint32_t qpn) {
  /* Abstract namespace: leading NUL, no file, gone with the socket. */
  int n = snprintf(buf + 1, len - 1, "verbs-emu/%u/%s/%u", (unsigned)getuid(), emu.ns, qpn);
  buf[0] = '\0';
  return n + 1 < (int)len ? n + 1 : (int)len;
}

void emu_conn_init(emu_conn_t* c) {
  memset(c, 0, sizeof(*c));
  c->fd = -1;
}

void emu_conn_close(emu_conn_t* c) {
  if (c->fd >= 0) close(c->fd);
  emu_conn_init(c);
}

/* ------------------------------------------------------------------------ */
/* Socket I/O: returns bytes moved, 0 for "would block", -1 for a broken
 * stream (closed by the peer or an error). */

static uint32_t emu_step_left; /* this pass's allowance (engine thread only) */

static ssize_t emu_send(emu_conn_t* c, const void* p, size_t len) {
  if (emu_step_left == 0) return 0; /* more next pass: the socket stays ready, poll returns at once */
  if (len > EMU_IO_CHUNK) len = EMU_IO_CHUNK;
  if (len > emu_step_left) len = emu_step_left;
  ssize_t n = send(c->fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n > 0) {
    emu_step_left -= (uint32_t)n;
    return n;
  }
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
    c->tx_blocked = 1;
    return 0;
  }
  return -1;
}

static ssize_t emu_recv(emu_conn_t* c, void* p, size_t len) {
  if (emu_step_left == 0) return 0;
  if (len > EMU_IO_CHUNK) len = EMU_IO_CHUNK;
  if (len > emu_step_left) len = emu_step_left;
  ssize_t n = recv(c->fd, p, len, MSG_DONTWAIT);
  if (n > 0) {
    emu_step_left -= (uint32_t)n;
    return n;
  }
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
  return -1;
}

/* Reads a header of `want` bytes into c->rx: 1 complete, 0 not yet, -1 broken. */
static int emu_recv_hdr(emu_conn_t* c, uint32_t want) {
  while (c->rx_got < want) {
    ssize_t n = emu_recv(c, c->rx + c->rx_got, want - c->rx_got);
    if (n <= 0) return (int)n;
    c->rx_got += (uint32_t)n;
  }
  return 1;
}

/* ------------------------------------------------------------------------ */
/* Errors of a QP. */

/* A responder error: the requester gets `status` in a NAK, and this QP goes
 * to the error state (with an async event) once the NAK is out. */
static void emu_responder_fail(emu_qp_t* q, emu_conn_t* c, uint32_t psn, enum ibv_wc_status status,
                               enum ibv_event_type event) {
  emu_log("QP %u: NAK psn %u: %s", q->qp.qp_num, psn, ibv_wc_status_str(status));
  if (c->rsp_count < EMU_RSP_QUEUE) {
    emu_rsp_item_t* it = &c->rsp[(c->rsp_head + c->rsp_count++) % EMU_RSP_QUEUE];
    memset(it, 0, sizeof(*it));
    it->hdr = (emu_rsp_t){.magic = EMU_RSP_MAGIC, .type = EMU_RSP_NAK, .status = (uint8_t)status, .psn = psn};
  }
  c->close_after_rsp = 1;
  c->rx_state = EMU_RX_WAIT;
  emu_async_event(q->ectx, event, &q->qp);
  emu_qp_to_error(q);
}

/* The WR at the head of the send queue fails: its error completion, the
 * QP to error, every later WR flushed. */
static void emu_requester_fail(emu_qp_t* q, enum ibv_wc_status status) {
  emu_log("QP %u: WR %llu fails: %s", q->qp.qp_num, (unsigned long long)q->sq_done, ibv_wc_status_str(status));
  if (q->sq_done < q->sq_posted) emu_sq_complete(q, status);
  emu_qp_to_error(q);
}

/* ------------------------------------------------------------------------ */
/* Requester: connect, send requests, receive responses. */

static void emu_out_connect(emu_qp_t* q, uint64_t now) {
  if (now < q->connect_retry_ns) return;
  if (q->remote_dev < 0) {
    q->connect_retry_ns = UINT64_MAX; /* nobody at that address: requests time out */
    return;
  }
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  int len = emu_listen_name(a.sun_path, sizeof(a.sun_path), q->dest_qpn);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  if (connect(fd, (struct sockaddr*)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)len)) != 0) {
    close(fd);
    q->connect_retry_ns = now + EMU_CONNECT_RETRY_NS;
    return;
  }
  emu_conn_t* c = &q->out;
  emu_conn_init(c);
  c->fd = fd;
  emu_hello_t h = {.magic = EMU_HELLO_MAGIC, .version = EMU_WIRE_VERSION, .src_qpn = q->qp.qp_num,
                   .dst_qpn = q->dest_qpn, .src_dev = (uint32_t)q->ectx->dev->index, .dst_dev = (uint32_t)q->remote_dev,
                   .src_lid = q->ectx->dev->lid};
  if (q->ah.is_global) memcpy(h.src_gid, q->ectx->dev->gids[q->ah.grh.sgid_index].raw, 16);
  memcpy(c->hdr, &h, sizeof(h));
  c->hdr_len = sizeof(h);
  c->tx_kind = EMU_TX_HELLO;
}

/* Checks the local buffers of a WR before it goes out; 0 or the error status. */
static int emu_check_local(emu_qp_t* q, const emu_swr_t* w) {
  if (w->inline_data != NULL) return 0;
  int access = w->opcode == IBV_WR_RDMA_READ ? IBV_ACCESS_LOCAL_WRITE : 0;
  for (int i = 0; i < w->nsge; i++)
    if (w->sge[i].length > 0 &&
        emu_mr_translate(w->sge[i].lkey, q->qp.pd, w->sge[i].addr, w->sge[i].length, access) == NULL)
      return IBV_WC_LOC_PROT_ERR;
  return 0;
}

/* The host bytes of a WR's local buffers at byte `off`: up to *len_p bytes
 * (shortened to one SGE); NULL when the memory is no longer registered. */
static uint8_t* emu_local_at(emu_qp_t* q, emu_swr_t* w, uint32_t off, uint32_t* len_p, int access) {
  if (w->inline_data != NULL) {
    *len_p = w->len - off < *len_p ? w->len - off : *len_p;
    return w->inline_data + off;
  }
  for (int i = 0; i < w->nsge; i++) {
    if (off < w->sge[i].length) {
      uint32_t n = w->sge[i].length - off;
      if (n > *len_p) n = *len_p;
      *len_p = n;
      return emu_mr_translate(w->sge[i].lkey, q->qp.pd, w->sge[i].addr + off, n, access);
    }
    off -= w->sge[i].length;
  }
  return NULL;
}

static int emu_req_op(int opcode) {
  switch (opcode) {
    case IBV_WR_RDMA_WRITE: return EMU_OP_WRITE;
    case IBV_WR_RDMA_WRITE_WITH_IMM: return EMU_OP_WRITE_IMM;
    case IBV_WR_SEND: return EMU_OP_SEND;
    case IBV_WR_SEND_WITH_IMM: return EMU_OP_SEND_IMM;
    default: return EMU_OP_READ;
  }
}

/* Starts the next WR on the out stream; 0 when there is none to start. */
static int emu_start_wr(emu_qp_t* q) {
  emu_ctx_t* ctx = q->ectx;
  if (q->sq_tx >= q->sq_posted || q->fail_seq != UINT64_MAX) return 0;
  emu_swr_t* w = &q->sq[q->sq_tx % q->cap.max_send_wr];
  int max_reads = q->max_rd_atomic > 0 ? q->max_rd_atomic : 1;
  if (w->opcode == IBV_WR_RDMA_READ && q->reads_out >= max_reads) return 0;
  ctx->ops++;
  if (ctx->faults.lose_after != 0 && ctx->ops >= ctx->faults.lose_after && !ctx->dark) {
    emu_log("device %s goes dark after %llu requests", ctx->dev->dev.name, (unsigned long long)ctx->ops);
    ctx->dark = 1;
    emu_async_event(ctx, IBV_EVENT_PORT_ERR, NULL);
    return 0;
  }
  int status = emu_check_local(q, w);
  if (status == 0 && ctx->faults.qp_error_after != 0 && ctx->ops == ctx->faults.qp_error_after)
    status = IBV_WC_RETRY_EXC_ERR;
  if (status != 0) {
    /* It fails when its turn to complete comes; nothing after it goes out. */
    q->fail_seq = w->seq;
    q->fail_status = status;
    return 0;
  }
  w->psn = q->next_psn;
  q->next_psn = (q->next_psn + 1) & EMU_24BIT;
  emu_req_t r = {.magic = EMU_REQ_MAGIC, .op = (uint8_t)emu_req_op(w->opcode), .psn = w->psn, .imm = w->imm,
                 .raddr = w->raddr, .rkey = w->rkey, .len = w->len};
  emu_conn_t* c = &q->out;
  memcpy(c->hdr, &r, sizeof(r));
  c->hdr_len = sizeof(r);
  c->hdr_sent = 0;
  c->pay_len = r.op == EMU_OP_READ ? 0 : w->len;
  c->pay_sent = 0;
  c->tx_kind = EMU_TX_REQ;
  return 1;
}

/* Sends what the out stream owes; -1 when the stream broke. */
static int emu_out_send(emu_qp_t* q, uint64_t now) {
  emu_conn_t* c = &q->out;
  for (;;) {
    if (c->tx_kind == EMU_TX_NONE) {
      if (q->hold_until_ns > now || !emu_start_wr(q)) return 0;
    }
    while (c->hdr_sent < c->hdr_len) {
      ssize_t n = emu_send(c, c->hdr + c->hdr_sent, c->hdr_len - c->hdr_sent);
      if (n <= 0) return (int)n;
      c->hdr_sent += (uint32_t)n;
      q->progress_ns = now;
    }
    if (c->tx_kind == EMU_TX_HELLO) {
      c->tx_kind = EMU_TX_NONE;
      continue;
    }
    emu_swr_t* w = &q->sq[q->sq_tx % q->cap.max_send_wr];
    while (c->pay_sent < c->pay_len) {
      uint32_t len = c->pay_len - c->pay_sent;
      const uint8_t* src = emu_local_at(q, w, c->pay_sent, &len, 0);
      if (src == NULL) {
        /* Deregistered while it went out: the stream is cut mid-message. */
        q->fail_seq = w->seq;
        q->fail_status = IBV_WC_LOC_PROT_ERR;
        return -1;
      }
      ssize_t n = emu_send(c, src, len);
      if (n <= 0) return (int)n;
      c->pay_sent += (uint32_t)n;
      q->progress_ns = now;
    }
    if (w->opcode == IBV_WR_RDMA_READ) q->reads_out++;
    q->sq_tx++;
    c->tx_kind = EMU_TX_NONE;
    if (q->ectx->faults.reorder && emu_random() % 4 == 0) q->hold_until_ns = now + emu_random() % EMU_HOLD_MAX_NS;
  }
}

/* Completes writes and sends up to `psn` (an ACK covers everything before it). */
static void emu_ack_through(emu_qp_t* q, uint32_t psn) {
  while (q->sq_done < q->sq_tx) {
    emu_swr_t* w = &q->sq[q->sq_done % q->cap.max_send_wr];
    if (!emu_psn_le(w->psn, psn) || w->opcode == IBV_WR_RDMA_READ) break;
    emu_sq_complete(q, IBV_WC_SUCCESS);
  }
}

/* Reads responses; -1 when the stream broke or said something impossible. */
static int emu_out_recv(emu_qp_t* q, uint64_t now) {
  emu_conn_t* c = &q->out;
  for (;;) {
    if (c->rx_state == EMU_RX_HDR) {
      int got = emu_recv_hdr(c, sizeof(emu_rsp_t));
      if (got <= 0) return got;
      memcpy(&c->rsp_in, c->rx, sizeof(c->rsp_in));
      c->rx_got = 0;
      const emu_rsp_t* r = &c->rsp_in;
      q->progress_ns = now;
      if (r->magic != EMU_RSP_MAGIC) return -1;
      if (r->type == EMU_RSP_RNR) {
        /* The responder has no receive posted: wait, within rnr_retry. */
        uint64_t t = ((uint64_t)r->rnr_ns_hi << 32) | r->rnr_ns_lo;
        q->rnr_wait = 1;
        q->rnr_until_ns = q->rnr_retry == 7 ? UINT64_MAX : now + t * (uint64_t)(q->rnr_retry + 1);
        continue;
      }
      q->rnr_wait = 0;
      if (r->type == EMU_RSP_ACK) {
        emu_ack_through(q, r->psn);
        continue;
      }
      if (r->type == EMU_RSP_NAK) {
        emu_ack_through(q, (r->psn - 1) & EMU_24BIT);
        emu_requester_fail(q, (enum ibv_wc_status)r->status);
        return 0;
      }
      if (r->type != EMU_RSP_READ) return -1;
      emu_ack_through(q, (r->psn - 1) & EMU_24BIT);
      emu_swr_t* w = q->sq_done < q->sq_tx ? &q->sq[q->sq_done % q->cap.max_send_wr] : NULL;
      if (w == NULL || w->opcode != IBV_WR_RDMA_READ || w->psn != r->psn || r->len != w->len) {
        emu_requester_fail(q, IBV_WC_BAD_RESP_ERR);
        return 0;
      }
      c->rx_state = EMU_RX_PAYLOAD;
      c->rx_done = 0;
      c->rx_status = IBV_WC_SUCCESS;
    }
    /* Read data into the WR's local buffers (or drain it after an error). */
    emu_swr_t* w = &q->sq[q->sq_done % q->cap.max_send_wr];
    while (c->rx_done < c->rsp_in.len) {
      uint8_t sink[4096];
      uint32_t len = c->rsp_in.len - c->rx_done;
      uint8_t* dst = c->rx_status == IBV_WC_SUCCESS ? emu_local_at(q, w, c->rx_done, &len, IBV_ACCESS_LOCAL_WRITE) : NULL;
      if (dst == NULL) {
        c->rx_status = IBV_WC_LOC_PROT_ERR;
        dst = sink;
        if (len > sizeof(sink)) len = sizeof(sink);
      }
      ssize_t n = emu_recv(c, dst, len);
      if (n <= 0) return (int)n;
      c->rx_done += (uint32_t)n;
      q->progress_ns = now;
    }
    c->rx_state = EMU_RX_HDR;
    if (c->rx_status != IBV_WC_SUCCESS) {
      emu_requester_fail(q, (enum ibv_wc_status)c->rx_status);
      return 0;
    }
    emu_sq_complete(q, IBV_WC_SUCCESS);
  }
}

/* ------------------------------------------------------------------------ */
/* Responder: identify incoming streams, execute requests, send responses. */

static int emu_hello_ok(const emu_qp_t* q, const emu_hello_t* h) {
  if (h->magic != EMU_HELLO_MAGIC || h->version != EMU_WIRE_VERSION || h->dst_qpn != q->qp.qp_num ||
      h->dst_dev != (uint32_t)q->ectx->dev->index)
    return 0;
  if (h->src_qpn != q->dest_qpn) return 0; /* RC: only the connected peer is heard */
  if (h->src_dev >= (uint32_t)emu.ndevs || (int)h->src_dev != q->remote_dev) return 0;
  if (q->ah.is_global) return memcmp(h->src_gid, q->ah.grh.dgid.raw, 16) == 0;
  return h->src_lid == q->ah.dlid;
}

static void emu_accept_all(emu_qp_t* q) {
  for (;;) {
    int fd = accept4(q->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    int slot = -1;
    for (int i = 0; i < EMU_PENDING_CONNS && slot < 0; i++)
      if (q->pending[i].fd < 0) slot = i;
    if (slot < 0) {
      close(fd);
      continue;
    }
    emu_conn_init(&q->pending[slot]);
    q->pending[slot].fd = fd;
  }
}

/* Reads hellos; a stream from the connected peer becomes the QP's `in` once
 * the QP is ready to receive (RTR or RTS); others are dropped. */
static void emu_identify(emu_qp_t* q) {
  for (int i = 0; i < EMU_PENDING_CONNS; i++) {
    emu_conn_t* p = &q->pending[i];
    if (p->fd < 0) continue;
    int got = emu_recv_hdr(p, sizeof(emu_hello_t));
    if (got < 0) {
      emu_conn_close(p);
      continue;
    }
    if (got == 0) continue;
    if (q->qp.state != IBV_QPS_RTR && q->qp.state != IBV_QPS_RTS) {
      if (q->qp.state != IBV_QPS_INIT) emu_conn_close(p); /* INIT: wait for RTR */
      continue;
    }
    emu_hello_t h;
    memcpy(&h, p->rx, sizeof(h));
    if (!emu_hello_ok(q, &h)) {
      emu_log("QP %u: dropping a stream from QP %u (not the connected peer)", q->qp.qp_num, h.src_qpn);
      emu_conn_close(p);
      continue;
    }
    emu_conn_close(&q->in);
    q->in = *p;
    q->in.rx_got = 0;
    q->in.identified = 1;
    emu_conn_init(p);
  }
}

static void emu_queue_rsp(emu_conn_t* c, int type, uint32_t psn, uint32_t len, uint32_t rkey, uint64_t raddr) {
  emu_rsp_item_t* it = &c->rsp[(c->rsp_head + c->rsp_count++) % EMU_RSP_QUEUE];
  memset(it, 0, sizeof(*it));
  it->hdr = (emu_rsp_t){.magic = EMU_RSP_MAGIC, .type = (uint8_t)type, .psn = psn, .len = len};
  it->rkey = rkey;
  it->raddr = raddr;
}

static uint32_t emu_rwr_total(const emu_rwr_t* r) {
  uint64_t t = 0;
  for (int i = 0; i < r->nsge; i++) t += r->sge[i].length;
  return t > UINT32_MAX ? UINT32_MAX : (uint32_t)t;
}

/* The host address of byte `off` of a receive's buffers (one SGE at most). */
static uint8_t* emu_rwr_at(emu_qp_t* q, const emu_rwr_t* r, uint32_t off, uint32_t* len_p) {
  for (int i = 0; i < r->nsge; i++) {
    if (off < r->sge[i].length) {
      uint32_t n = r->sge[i].length - off;
      if (n > *len_p) n = *len_p;
      *len_p = n;
      return emu_mr_translate(r->sge[i].lkey, q->qp.pd, r->sge[i].addr + off, n, IBV_ACCESS_LOCAL_WRITE);
    }
    off -= r->sge[i].length;
  }
  return NULL;
}

/* A request header arrived: check it and decide where its payload goes. */
static void emu_in_request(emu_qp_t* q, emu_conn_t* c) {
  const emu_req_t* r = &c->req;
  c->rx_done = 0;
  c->rx_status = IBV_WC_SUCCESS;
  c->rx_state = EMU_RX_PAYLOAD;
  int needs_recv = r->op == EMU_OP_WRITE_IMM || r->op == EMU_OP_SEND || r->op == EMU_OP_SEND_IMM;
  if (needs_recv && q->rq_count == 0) {
    c->rx_state = EMU_RX_PARKED; /* RNR: the requester waits, this stream stops */
    return;
  }
  c->rnr_sent = 0;
  if (r->op == EMU_OP_SEND || r->op == EMU_OP_SEND_IMM) {
    emu_rq_take(q, &c->rwr);
    if (r->len > emu_rwr_total(&c->rwr)) c->rx_status = IBV_WC_LOC_LEN_ERR;
  } else if (r->op == EMU_OP_WRITE || r->op == EMU_OP_WRITE_IMM) {
    /* A zero-length write checks no key (IB spec). */
    if (!(q->access & IBV_ACCESS_REMOTE_WRITE) ||
        (r->len > 0 && emu_mr_translate(r->rkey, q->qp.pd, r->raddr, r->len, IBV_ACCESS_REMOTE_WRITE) == NULL))
      c->rx_status = IBV_WC_REM_ACCESS_ERR;
  } else if (r->op == EMU_OP_READ) {
    if (!(q->access & IBV_ACCESS_REMOTE_READ) ||
        (r->len > 0 && emu_mr_translate(r->rkey, q->qp.pd, r->raddr, r->len, IBV_ACCESS_REMOTE_READ) == NULL))
      c->rx_status = IBV_WC_REM_ACCESS_ERR;
  } else {
    c->rx_status = IBV_WC_REM_INV_REQ_ERR;
  }
}

/* The request's payload is all in: complete and answer it. */
static void emu_in_finish(emu_qp_t* q, emu_conn_t* c) {
  const emu_req_t* r = &c->req;
  c->rx_state = EMU_RX_HDR;
  q->expect_psn = (q->expect_psn + 1) & EMU_24BIT;
  if (c->rx_status != IBV_WC_SUCCESS) {
    enum ibv_wc_status to_requester = (enum ibv_wc_status)c->rx_status;
    if (r->op == EMU_OP_SEND || r->op == EMU_OP_SEND_IMM) {
      /* The receive fails here, the sender learns the request was invalid. */
      emu_rq_complete(q, &c->rwr, (enum ibv_wc_status)c->rx_status, IBV_WC_RECV, r->len, 0, 0);
      to_requester = c->rx_status == IBV_WC_LOC_LEN_ERR ? IBV_WC_REM_INV_REQ_ERR : IBV_WC_REM_OP_ERR;
    }
    emu_responder_fail(q, c, r->psn, to_requester,
                       to_requester == IBV_WC_REM_ACCESS_ERR ? IBV_EVENT_QP_ACCESS_ERR : IBV_EVENT_QP_REQ_ERR);
    return;
  }
  switch (r->op) {
    case EMU_OP_WRITE_IMM: {
      emu_rwr_t rwr;
      if (!emu_rq_take(q, &rwr)) { /* flushed meanwhile */
        emu_responder_fail(q, c, r->psn, IBV_WC_REM_OP_ERR, IBV_EVENT_QP_REQ_ERR);
        return;
      }
      emu_rq_complete(q, &rwr, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, r->len, r->imm, 1);
      break;
    }
    case EMU_OP_SEND:
    case EMU_OP_SEND_IMM:
      emu_rq_complete(q, &c->rwr, IBV_WC_SUCCESS, IBV_WC_RECV, r->len, r->imm, r->op == EMU_OP_SEND_IMM);
      break;
    default: break;
  }
  if (r->op == EMU_OP_READ) emu_queue_rsp(c, EMU_RSP_READ, r->psn, r->len, r->rkey, r->raddr);
  else emu_queue_rsp(c, EMU_RSP_ACK, r->psn, 0, 0, 0);
}

/* Reads and executes requests while responses can be queued. */
static int emu_in_recv(emu_qp_t* q) {
  emu_conn_t* c = &q->in;
  while (c->fd >= 0 && c->rsp_count < EMU_RSP_QUEUE - 1) {
    if (c->rx_state == EMU_RX_WAIT) return 0;
    if (c->rx_state == EMU_RX_PARKED) {
      if (q->rq_count == 0) {
        if (!c->rnr_sent) {
          uint64_t t = emu_rnr_timer_ns(q->min_rnr_timer);
          emu_queue_rsp(c, EMU_RSP_RNR, c->req.psn, 0, 0, 0);
          emu_rsp_item_t* it = &c->rsp[(c->rsp_head + c->rsp_count - 1) % EMU_RSP_QUEUE];
          it->hdr.rnr_ns_lo = (uint32_t)t;
          it->hdr.rnr_ns_hi = (uint32_t)(t >> 32);
          c->rnr_sent = 1;
        }
        return 0;
      }
      emu_in_request(q, c);
      continue;
    }
    if (c->rx_state == EMU_RX_HDR) {
      int got = emu_recv_hdr(c, sizeof(emu_req_t));
      if (got <= 0) return got;
      memcpy(&c->req, c->rx, sizeof(c->req));
      c->rx_got = 0;
      if (c->req.magic != EMU_REQ_MAGIC) return -1;
      if (c->req.psn != q->expect_psn) {
        /* An HCA NAKs a PSN sequence error and the requester retries until it
         * gives up: the same end, a transport retry error there. */
        emu_log("QP %u: PSN %u, expected %u: dropping the stream", q->qp.qp_num, c->req.psn, q->expect_psn);
        return -1;
      }
      emu_in_request(q, c);
      continue;
    }
    /* Payload into memory; after an error it is drained and discarded. */
    const emu_req_t* r = &c->req;
    uint32_t want = r->op == EMU_OP_READ ? 0 : r->len;
    while (c->rx_done < want) {
      uint8_t sink[4096];
      uint32_t len = want - c->rx_done;
      uint8_t* dst = NULL;
      if (c->rx_status == IBV_WC_SUCCESS) {
        if (r->op == EMU_OP_SEND || r->op == EMU_OP_SEND_IMM) {
          dst = emu_rwr_at(q, &c->rwr, c->rx_done, &len);
          if (dst == NULL) c->rx_status = IBV_WC_LOC_PROT_ERR;
        } else {
          if (len > EMU_IO_CHUNK) len = EMU_IO_CHUNK;
          /* Looked up again per chunk: a region deregistered meanwhile is gone. */
          dst = emu_mr_translate(r->rkey, q->qp.pd, r->raddr + c->rx_done, len, IBV_ACCESS_REMOTE_WRITE);
          if (dst == NULL) c->rx_status = IBV_WC_REM_ACCESS_ERR;
        }
      }
      if (dst == NULL) {
        dst = sink;
        if (len > sizeof(sink)) len = sizeof(sink);
      }
      ssize_t n = emu_recv(c, dst, len);
      if (n <= 0) return (int)n;
      c->rx_done += (uint32_t)n;
    }
    emu_in_finish(q, c);
  }
  return 0;
}

/* Sends the responses owed, read data straight from memory. */
static int emu_in_send(emu_qp_t* q) {
  emu_conn_t* c = &q->in;
  while (c->fd >= 0 && c->rsp_count > 0) {
    emu_rsp_item_t* it = &c->rsp[c->rsp_head];
    const uint32_t hdr = sizeof(emu_rsp_t);
    while (c->rsp_sent < hdr) {
      ssize_t n = emu_send(c, (const uint8_t*)&it->hdr + c->rsp_sent, hdr - c->rsp_sent);
      if (n <= 0) return (int)n;
      c->rsp_sent += (uint32_t)n;
    }
    uint32_t total = it->hdr.type == EMU_RSP_READ ? it->hdr.len : 0;
    while (c->rsp_sent - hdr < total) {
      uint32_t off = c->rsp_sent - hdr, len = total - off;
      if (len > EMU_IO_CHUNK) len = EMU_IO_CHUNK;
      const uint8_t* src = emu_mr_translate(it->rkey, q->qp.pd, it->raddr + off, len, IBV_ACCESS_REMOTE_READ);
      if (src == NULL) return -1; /* deregistered under a read: the stream breaks */
      ssize_t n = emu_send(c, src, len);
      if (n <= 0) return (int)n;
      c->rsp_sent += (uint32_t)n;
    }
    c->rsp_head = (c->rsp_head + 1) % EMU_RSP_QUEUE;
    c->rsp_count--;
    c->rsp_sent = 0;
  }
  if (c->fd >= 0 && c->close_after_rsp && c->rsp_count == 0) emu_conn_close(c);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* One QP, one iteration. Caller holds the lock. */

static void emu_qp_timers(emu_qp_t* q, uint64_t now) {
  if (q->qp.state != IBV_QPS_RTS) return;
  if (q->fail_seq != UINT64_MAX && q->sq_done == q->fail_seq) {
    int status = q->fail_status;
    q->fail_seq = UINT64_MAX;
    emu_requester_fail(q, (enum ibv_wc_status)status);
    return;
  }
  if (q->sq_done == q->sq_posted) return; /* nothing outstanding */
  if (q->rnr_wait) {
    if (now >= q->rnr_until_ns) emu_requester_fail(q, IBV_WC_RNR_RETRY_EXC_ERR);
    return;
  }
  uint64_t budget = emu_qp_retry_budget_ns(q);
  if (budget != UINT64_MAX && now - q->progress_ns > budget) emu_requester_fail(q, IBV_WC_RETRY_EXC_ERR);
}

static void emu_qp_step(emu_qp_t* q, uint64_t now) {
  if (q->destroyed) return;
  emu_step_left = EMU_STEP_BYTES;
  int ev = q->ev;
  q->ev = 0;
  emu_qp_timers(q, now);
  if (q->ectx->dark || q->qp.state == IBV_QPS_RESET) return;
  if (q->qp.state == IBV_QPS_ERR) {
    if (q->in.fd >= 0 && q->in.close_after_rsp && emu_in_send(q) < 0) emu_conn_close(&q->in);
    return;
  }
  if (ev & EMU_EV_LISTEN) emu_accept_all(q);
  emu_identify(q);
  /* Responder. */
  if (q->in.fd >= 0) {
    int broken = 0;
    if ((ev & EMU_EV_IN_R) || q->in.rx_state == EMU_RX_PARKED) broken = emu_in_recv(q) < 0;
    if (!broken && q->in.fd >= 0 && q->in.rsp_count > 0 && (!q->in.tx_blocked || (ev & EMU_EV_IN_W))) {
      q->in.tx_blocked = 0;
      broken = emu_in_send(q) < 0;
    }
    if (broken) emu_conn_close(&q->in);
    if (q->qp.state != IBV_QPS_RTS) return;
  }
  /* Requester. */
  if (q->qp.state != IBV_QPS_RTS) return;
  int has_work = q->sq_tx < q->sq_posted || q->out.tx_kind != EMU_TX_NONE;
  if (q->out.fd < 0 && has_work && q->sq_done == q->sq_tx) emu_out_connect(q, now);
  if (q->out.fd < 0) return;
  int broken = 0;
  if (!q->out.tx_blocked || (ev & EMU_EV_OUT_W)) {
    q->out.tx_blocked = 0;
    broken = emu_out_send(q, now) < 0;
  }
  if (!broken && (ev & EMU_EV_OUT_R) && q->out.fd >= 0 && q->qp.state == IBV_QPS_RTS)
    broken = emu_out_recv(q, now) < 0;
  if (broken && q->qp.state == IBV_QPS_RTS) {
    /* A broken path: no more answers come, outstanding work times out. */
    emu_log("QP %u: stream to QP %u broke", q->qp.qp_num, q->dest_qpn);
    emu_conn_close(&q->out);
    q->connect_retry_ns = UINT64_MAX;
  }
}

/* ------------------------------------------------------------------------ */
/* The thread. */

typedef struct {
  struct pollfd* fds;
  emu_qp_t** owner;
  int* bits; /* EMU_EV_* for readable; the write bit is bits << 1 for out/in */
  int n, cap;
} emu_pollset_t;

static void emu_pollset_add(emu_pollset_t* s, int fd, short events, emu_qp_t* q, int bits) {
  if (s->n == s->cap) {
    int cap = s->cap ? 2 * s->cap : 64;
    struct pollfd* f = realloc(s->fds, (size_t)cap * sizeof(*f));
    emu_qp_t** o = f != NULL ? realloc(s->owner, (size_t)cap * sizeof(*o)) : NULL;
    int* b = o != NULL ? realloc(s->bits, (size_t)cap * sizeof(*b)) : NULL;
    if (f != NULL) s->fds = f;
    if (o != NULL) s->owner = o;
    if (b == NULL) return; /* out of memory: that socket waits for the next round */
    s->bits = b;
    s->cap = cap;
  }
  s->fds[s->n] = (struct pollfd){.fd = fd, .events = events};
  s->owner[s->n] = q;
  s->bits[s->n] = bits;
  s->n++;
}

/* The next time a QP's timers need the engine (UINT64_MAX: none). */
static uint64_t emu_qp_deadline(const emu_qp_t* q, uint64_t now) {
  if (q->qp.state != IBV_QPS_RTS || q->sq_done == q->sq_posted) return UINT64_MAX;
  if (q->fail_seq != UINT64_MAX && q->sq_done == q->fail_seq) return now;
  uint64_t t = UINT64_MAX, budget = emu_qp_retry_budget_ns(q);
  if (q->rnr_wait) t = q->rnr_until_ns;
  else if (budget != UINT64_MAX) t = q->progress_ns + budget + 1;
  if (q->ectx->dark) return t;
  if (q->out.fd < 0 && q->connect_retry_ns < t) t = q->connect_retry_ns;
  if (q->hold_until_ns > now && q->hold_until_ns < t) t = q->hold_until_ns;
  /* Work that can go out now (not blocked by the socket, a hold or the read limit). */
  if (q->out.fd >= 0 && !q->out.tx_blocked && q->hold_until_ns <= now && q->fail_seq == UINT64_MAX &&
      q->sq_tx < q->sq_posted) {
    const emu_swr_t* w = &q->sq[q->sq_tx % q->cap.max_send_wr];
    int max_reads = q->max_rd_atomic > 0 ? q->max_rd_atomic : 1;
    if (w->opcode != IBV_WR_RDMA_READ || q->reads_out < max_reads) t = now;
  }
  return t;
}

/* The sockets worth waiting on; returns how long to sleep at most (ns). */
static uint64_t emu_build_pollset(emu_pollset_t* s, uint64_t now) {
  s->n = 0;
  emu_pollset_add(s, emu.wake_fd, POLLIN, NULL, 0);
  uint64_t wake = now + (uint64_t)EMU_MAX_POLL_MS * 1000000ull;
  for (emu_qp_t* q = emu.qps; q != NULL; q = q->next) {
    uint64_t t = emu_qp_deadline(q, now);
    if (t < wake) wake = t;
    if (q->ectx->dark || q->qp.state == IBV_QPS_RESET) continue;
    if (q->qp.state == IBV_QPS_ERR) {
      if (q->in.fd >= 0 && q->in.close_after_rsp) emu_pollset_add(s, q->in.fd, POLLOUT, q, EMU_EV_IN_W);
      continue;
    }
    emu_pollset_add(s, q->listen_fd, POLLIN, q, EMU_EV_LISTEN);
    for (int i = 0; i < EMU_PENDING_CONNS; i++)
      if (q->pending[i].fd >= 0 && q->pending[i].rx_got < sizeof(emu_hello_t))
        emu_pollset_add(s, q->pending[i].fd, POLLIN, q, EMU_EV_PENDING);
    if (q->in.fd >= 0) {
      if (q->in.rx_state != EMU_RX_PARKED && q->in.rx_state != EMU_RX_WAIT && q->in.rsp_count < EMU_RSP_QUEUE - 1)
        emu_pollset_add(s, q->in.fd, POLLIN, q, EMU_EV_IN_R);
      if (q->in.rsp_count > 0) {
        if (q->in.tx_blocked) emu_pollset_add(s, q->in.fd, POLLOUT, q, EMU_EV_IN_W);
        else wake = now;
      }
      if (q->in.rx_state == EMU_RX_PARKED && q->rq_count > 0) wake = now;
    }
    if (q->out.fd >= 0) {
      emu_pollset_add(s, q->out.fd, POLLIN, q, EMU_EV_OUT_R);
      if (q->out.tx_blocked) emu_pollset_add(s, q->out.fd, POLLOUT, q, EMU_EV_OUT_W);
    }
  }
  if (wake <= now) return 0;
  uint64_t ns = wake - now, max = (uint64_t)EMU_MAX_POLL_MS * 1000000ull;
  return ns > max ? max : ns;
}

/* Hands what poll saw to the QPs (a socket closed meanwhile is skipped:
 * its descriptor no longer matches). */
static void emu_dispatch_events(const emu_pollset_t* s) {
  for (int f = 1; f < s->n; f++) {
    const struct pollfd* p = &s->fds[f];
    emu_qp_t* q = s->owner[f];
    if (p->revents == 0 || q == NULL) continue;
    int fd_ok = 0;
    switch (s->bits[f]) {
      case EMU_EV_LISTEN: fd_ok = q->listen_fd == p->fd; break;
      case EMU_EV_PENDING: fd_ok = 1; break;
      case EMU_EV_OUT_R:
      case EMU_EV_OUT_W: fd_ok = q->out.fd == p->fd; break;
      default: fd_ok = q->in.fd == p->fd; break;
    }
    if (fd_ok) q->ev |= s->bits[f];
  }
}

static void emu_free_zombies(void) {
  while (emu.zombies != NULL) {
    emu_qp_t* q = emu.zombies;
    emu.zombies = q->next;
    emu_qp_free(q);
  }
}

/* Serves every QP once, in a fresh random order when reordering is asked for. */
static void emu_serve(uint64_t now) {
  int nq = 0, k = 0, shuffle = 0;
  for (emu_qp_t* q = emu.qps; q != NULL; q = q->next) {
    nq++;
    shuffle |= q->ectx->faults.reorder;
  }
  emu_qp_t** order = shuffle && nq > 1 ? malloc((size_t)nq * sizeof(*order)) : NULL;
  if (order == NULL) {
    for (emu_qp_t *q = emu.qps, *next; q != NULL; q = next) {
      next = q->next; /* a step never unlinks QPs, but keep the walk obviously safe */
      emu_qp_step(q, now);
    }
    return;
  }
  for (emu_qp_t* q = emu.qps; q != NULL; q = q->next) order[k++] = q;
  for (int i = k - 1; i > 0; i--) {
    int j = (int)(emu_random() % (uint64_t)(i + 1));
    emu_qp_t* t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (int i = 0; i < k; i++) emu_qp_step(order[i], now);
  free(order);
}

static void* emu_engine_main(void* arg) {
  (void)arg;
  emu_pollset_t set = {0};
  pthread_mutex_lock(&emu.lock);
  while (!emu.engine_stop) {
    emu_free_zombies();
    emu_serve(emu_now_ns());
    uint64_t sleep_ns = emu_build_pollset(&set, emu_now_ns());
    struct timespec timeout = {.tv_sec = (time_t)(sleep_ns / 1000000000ull), .tv_nsec = (long)(sleep_ns % 1000000000ull)};
    emu.engine_polling = 1;
    pthread_mutex_unlock(&emu.lock);
    ppoll(set.fds, (nfds_t)set.n, &timeout, NULL); /* timers below a millisecond (holds, RNR) */
    pthread_mutex_lock(&emu.lock);
    emu.engine_polling = 0;
    uint64_t drained;
    while (read(emu.wake_fd, &drained, sizeof(drained)) > 0) {
    }
    emu_dispatch_events(&set);
  }
  emu_free_zombies();
  pthread_mutex_unlock(&emu.lock);
  free(set.fds);
  free(set.owner);
  free(set.bits);
  return NULL;
}

/* Caller holds emu.lock (and engine_ctl). */
int emu_engine_start(void) {
  emu.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (emu.wake_fd < 0) return -1;
  emu.engine_stop = 0;
  if (pthread_create(&emu.engine, NULL, emu_engine_main, NULL) != 0) {
    close(emu.wake_fd);
    emu.wake_fd = -1;
    return -1;
  }
  emu.engine_running = 1;
  return 0;
}

/* Caller holds engine_ctl, not emu.lock. */
void emu_engine_stop(void) {
  pthread_mutex_lock(&emu.lock);
  emu.engine_stop = 1;
  uint64_t one = 1;
  ssize_t unused = write(emu.wake_fd, &one, sizeof(one));
  (void)unused;
  pthread_mutex_unlock(&emu.lock);
  pthread_join(emu.engine, NULL);
  pthread_mutex_lock(&emu.lock);
  emu.engine_running = 0;
  close(emu.wake_fd);
  emu.wake_fd = -1;
  pthread_mutex_unlock(&emu.lock);
}
